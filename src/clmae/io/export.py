"""The encoder in other libraries' formats (MAE checkpoints into clmae: :mod:`clmae.io.mae_import`).

* :func:`export_timm` — ``model.safetensors`` + ``config.json`` in timm's Hub layout: load with
  ``timm.create_model("local-dir:DIR", pretrained=True)``.
* :func:`export_hf` — a Hugging Face ``ViTModel`` folder: ``ViTModel.from_pretrained(DIR,
  add_pooling_layer=False)``.

Only the encoder travels out: patch embedding, CLS token, blocks, final norm, and the fixed
sin-cos position embedding (CLS slot included) as the learned ``pos_embed`` the other libraries
expect. No decoder, masking module or mask token. ``img_size`` exports the encoder for another
input size: the position embedding resampled bicubically as timm's ``resample_abs_pos_embed`` does.

An export is written into a temporary folder next to the target, reloaded and checked there (its
tensors read back, finite, and the other library's features equal to clmae's), and only then moved
into place (an earlier export in ``--output`` is swapped out whole, never file by file): a failed
export leaves nothing behind and the earlier export as it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..data.images import default_stats
from ..errors import CheckpointError, ConfigError
from ..models.layers import LAYER_NORM_EPS
from . import EXPORT_FORMATS as FORMATS
from . import atomic
from .atomic import remove_stale_temp_files
from .checkpoint import check_finite, load_checkpoint

# timm architectures by (width, depth, heads); any other shape is described fully by model_args.
TIMM_BY_SHAPE = {
    (192, 12, 3): "vit_tiny_patch16_224",
    (384, 12, 6): "vit_small_patch16_224",
    (768, 12, 12): "vit_base_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
    (1280, 32, 16): "vit_huge_patch14_224",
}
VERIFY_ATOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Encoder weights in timm's naming (ours already is, plus pos_embed)


def timm_state_dict(mae) -> dict[str, torch.Tensor]:
    """The encoder as a timm ``VisionTransformer(num_classes=0, global_pool='token')`` state dict."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in mae.encoder_state_dict().items()}
    state["pos_embed"] = mae.pos_embed.detach().float().cpu().contiguous()  # fixed sin-cos, CLS slot zeros
    return state


def timm_architecture(mae, model_name: str | None = None) -> str:
    import timm

    c = mae.config
    if model_name and timm.is_model(model_name):
        return model_name
    return TIMM_BY_SHAPE.get((c.embed_dim, c.depth, c.num_heads), "vit_base_patch16_224")


def timm_model_args(mae) -> dict[str, Any]:
    c = mae.config
    return {"img_size": c.img_size, "patch_size": c.patch_size, "in_chans": c.in_chans, "embed_dim": c.embed_dim,
            "depth": c.depth, "num_heads": c.num_heads, "mlp_ratio": c.mlp_ratio, "qkv_bias": True,
            "class_token": True, "global_pool": "token", "num_classes": 0}


def hf_state_dict(mae) -> dict[str, torch.Tensor]:
    """The encoder as a transformers ``ViTModel`` state dict (the Hub's long-standing key layout).

    timm's fused ``qkv`` is split into query, key and value (rows in that order).
    """
    t = timm_state_dict(mae)
    out = {
        "embeddings.cls_token": t["cls_token"],
        "embeddings.position_embeddings": t["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
        "layernorm.weight": t["norm.weight"],
        "layernorm.bias": t["norm.bias"],
    }
    names = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(mae.config.depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{theirs}.{p}"] = t[f"{src}{ours}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = t[f"{src}attn.qkv.{p}"].chunk(3, dim=0)
            for name, part in (("query", q), ("key", k), ("value", v)):
                out[f"{dst}attention.attention.{name}.{p}"] = part.contiguous()
    return out


def hf_config(mae) -> dict[str, Any]:
    c = mae.config
    return {
        "architectures": ["ViTModel"], "model_type": "vit",
        "hidden_size": c.embed_dim, "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads,
        "intermediate_size": int(c.embed_dim * c.mlp_ratio), "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS, "image_size": c.img_size, "patch_size": c.patch_size,
        "num_channels": c.in_chans,
        "qkv_bias": True, "encoder_stride": c.patch_size, "torch_dtype": "float32",
    }


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportResult:
    output: Path
    files: list[Path]
    verified: str  # what the round-trip check compared, or why it was not run

    def summary(self) -> str:
        return "\n".join([f"wrote {p}" for p in self.files] + [f"check        {self.verified}"])


def _source(checkpoint, img_size: int | None = None) -> tuple[Any, dict[str, Any], str | None]:
    """``(mae, data_info, model_name)`` from a checkpoint path or an in-memory model, at ``img_size``."""
    if isinstance(checkpoint, torch.nn.Module):
        return (checkpoint if img_size is None else checkpoint.at_img_size(img_size)), {}, None
    loaded = load_checkpoint(checkpoint, "cpu", img_size)
    return loaded.mae, dict(loaded.run_config.get("data_info") or {}), loaded.model_name


@contextmanager
def export_folder(output: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``output`` to write into; moved into place when the block succeeds.

    :func:`clmae.io.atomic.staged_folder` with the export's rules: ``output`` must not be a file, and
    may hold an earlier export only with ``overwrite``. An earlier export is replaced whole (the
    folder is swapped, other files in it carried over); on any error nothing new is left and an
    existing ``output`` is as it was. Temporary folders of a killed export of ``output`` are removed.
    """
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output: {out} is a file; give a folder to write the export into")
    if (out / "model.safetensors").exists() and not overwrite:
        raise ConfigError(f"--output: {out} already holds a model.safetensors; pass --overwrite or choose another "
                          "folder")
    remove_stale_temp_files(out)
    try:
        with atomic.staged_folder(out) as tmp:
            yield tmp
    except OSError as exc:
        raise ConfigError(f"--output: cannot write {out}: {exc.strerror or exc}") from None


def _stats(mae, data_info: dict[str, Any]) -> tuple[list[float], list[float]]:
    c = mae.config.in_chans
    default_mean, default_std = default_stats(c)
    mean = list(data_info.get("mean") or default_mean)
    std = list(data_info.get("std") or default_std)
    return mean, std


def _probe_input(mae, n: int = 2) -> torch.Tensor:
    c = mae.config
    return torch.randn(n, c.in_chans, c.img_size, c.img_size, generator=torch.Generator().manual_seed(0))


def _tensor_differences(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
                        values: bool = True) -> list[str]:
    """What differs between two state dicts: missing and extra keys, shapes, values (first few of each)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = [k for k in expected if k in found and expected[k].shape != found[k].shape]
    unequal = [k for k in expected if values and k in found and k not in shapes
               and not torch.equal(expected[k].float(), found[k].float())]

    def gap(k: str) -> float:
        return float((found[k].float() - expected[k].float()).abs().max())

    parts = []
    if missing:
        parts.append("missing " + ", ".join(missing[:3]) + (" …" if len(missing) > 3 else ""))
    if extra:
        parts.append("unexpected " + ", ".join(extra[:3]) + (" …" if len(extra) > 3 else ""))
    if shapes:
        parts.append("other shape " + ", ".join(f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}"
                                                 for k in shapes[:3]))
    if unequal:
        parts.append("other values " + ", ".join(f"{k} (max abs diff {gap(k):.2e})" for k in unequal[:3])
                     + (f" and {len(unequal) - 3} more" if len(unequal) > 3 else ""))
    return parts


def _check_file(file: Path, expected: dict[str, torch.Tensor]) -> None:
    """The written file reads back finite and identical to what was meant to be written."""
    found = load_file(str(file))
    check_finite(found, str(file))
    differences = _tensor_differences(expected, found)
    if differences:
        raise CheckpointError(f"{file.name} does not read back as written ({'; '.join(differences)}); nothing was "
                              "exported")


def _compare(ours: torch.Tensor, theirs: torch.Tensor, library: str) -> str:
    diff = float((ours - theirs).abs().max())
    tolerance = VERIFY_ATOL * max(1.0, float(ours.abs().max()))
    if not diff <= tolerance:  # also catches NaN
        rows = (ours - theirs).abs().flatten(1).amax(1)
        raise CheckpointError(
            f"reloaded in {library}, the exported encoder's CLS features differ from clmae's by up to {diff:.2e} "
            f"(tolerance {tolerance:.1e}; per probe image {', '.join(f'{float(r):.1e}' for r in rows)}) although "
            "every tensor reads back identical: the two compute different functions of the same weights; nothing "
            "was exported"
        )
    return f"{library} CLS features match clmae's (max abs diff {diff:.1e})"


def export_timm(checkpoint, output: str | Path, overwrite: bool = False, verify: bool = True,
                img_size: int | None = None) -> ExportResult:
    """Write ``model.safetensors`` and ``config.json`` (timm Hub layout) for the checkpoint's encoder.

    ``img_size``: export the encoder for this input size instead of the pretraining one.
    """
    import timm

    mae, data_info, model_name = _source(checkpoint, img_size)
    mae = mae.float().eval()
    arch = timm_architecture(mae, model_name)
    args = timm_model_args(mae)
    state = timm_state_dict(mae)
    check_finite(state, "the encoder to export")
    c = mae.config
    mean, std = _stats(mae, data_info)
    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": c.embed_dim,
        "global_pool": "token",
        "model_args": args,
        "pretrained_cfg": {
            "tag": "clmae", "custom_load": False, "input_size": [c.in_chans, c.img_size, c.img_size],
            "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": mean, "std": std, "num_classes": 0, "pool_size": None,
            "first_conv": "patch_embed.proj", "classifier": "head",
        },
    }
    model = timm.create_model(arch, pretrained=False, **args)
    differences = _tensor_differences(state, model.state_dict(), values=False)
    if differences:
        raise CheckpointError(f"timm's {arch} with {args} does not take the encoder's tensors "
                              f"({'; '.join(differences)}); nothing was exported")
    out = Path(output)
    verified = "not run"
    with export_folder(out, overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if verify:
            _check_file(tmp / "model.safetensors", state)
            reloaded = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
            differences = _tensor_differences(state, reloaded.state_dict())
            if differences:
                raise CheckpointError(f"timm.create_model('local-dir:…') loaded the export differently from what "
                                      f"was written ({'; '.join(differences)}); nothing was exported")
            x = _probe_input(mae)
            with torch.no_grad():
                verified = _compare(mae.forward_features(x, "cls"), reloaded.forward_features(x)[:, 0], "timm")
    return ExportResult(out, [out / "model.safetensors", out / "config.json"], verified)


def export_hf(checkpoint, output: str | Path, overwrite: bool = False, verify: bool = True,
              img_size: int | None = None) -> ExportResult:
    """Write a transformers ``ViTModel`` folder (``config.json``, ``model.safetensors``, image processor)."""
    mae, data_info, _ = _source(checkpoint, img_size)
    mae = mae.float().eval()
    c = mae.config
    mean, std = _stats(mae, data_info)
    state = hf_state_dict(mae)
    check_finite(state, "the encoder to export")
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                 "size": {"height": c.img_size, "width": c.img_size}, "resample": 3, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean, "image_std": std}
    out = Path(output)
    names = ["model.safetensors", "config.json", "preprocessor_config.json"]
    verified = "not run"
    with export_folder(out, overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(mae), indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
        if verify:
            _check_file(tmp / "model.safetensors", state)
            try:
                from transformers import ViTModel
            except ImportError:
                verified = "reload in transformers not run (transformers is not installed)"
            else:
                from transformers.utils import logging as hf_logging

                shown = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()  # our own check: no "Loading weights" bar of theirs in a log
                try:
                    model, info = ViTModel.from_pretrained(str(tmp), add_pooling_layer=False, output_loading_info=True)
                finally:
                    if shown:
                        hf_logging.enable_progress_bar()
                bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                       and v}
                if bad:
                    raise CheckpointError(f"transformers' ViTModel did not take the exported tensors as written "
                                          f"({'; '.join(f'{k}: {sorted(v)[:3]}' for k, v in bad.items())}); nothing "
                                          "was exported")
                x = _probe_input(mae)
                with torch.no_grad():
                    theirs = model.eval()(pixel_values=x).last_hidden_state[:, 0]
                    verified = _compare(mae.forward_features(x, "cls"), theirs, "transformers")
    return ExportResult(out, [out / n for n in names], verified)


def export_encoder(checkpoint, fmt: str, output: str | Path, overwrite: bool = False,
                   verify: bool = True, img_size: int | None = None) -> ExportResult:
    """``clmae export``: the encoder of ``checkpoint`` (a run folder, a checkpoint file or a model) as ``fmt``
    (``"timm"`` or ``"hf"``) in the folder ``output``, reloaded in that library and checked unless ``verify=False``."""
    if fmt == "timm":
        return export_timm(checkpoint, output, overwrite, verify, img_size)
    if fmt == "hf":
        return export_hf(checkpoint, output, overwrite, verify, img_size)
    raise ConfigError(f"--format: got {fmt!r}, expected one of {', '.join(FORMATS)}")


__all__ = ["export_timm", "export_hf", "export_encoder", "timm_state_dict", "hf_state_dict", "ExportResult"]
