"""MAE checkpoints into clmae: start (CL-)MAE training from an MAE someone already trained.

Reads facebookresearch/mae ``.pth`` files, clmae runs and exported encoders (``--init-from``). The
file is loaded without running code from it: ``torch.load(weights_only=True)``, allowing only the
``argparse.Namespace`` MAE saves its training arguments in.
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .checkpoint import FORMAT, LAST, check_finite, not_a_torch_file, read_weights, split_prefix, weights_file


@dataclass
class ImportReport:
    source: str
    encoder_tensors: int
    decoder: str  # "loaded" or "new (not in the checkpoint)"
    notes: list[str] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.encoder_tensors} encoder tensors, decoder {self.decoder}"] + self.notes
        return "; ".join(parts)


IGNORED = ("pos_embed", "decoder_pos_embed")  # fixed sin-cos in clmae; checked, not loaded


def _load_pickle(path: Path) -> Any:
    """``torch.load(weights_only=True)``, allowing only ``argparse.Namespace`` (MAE's saved ``args``)."""
    if why := not_a_torch_file(path):
        raise CheckpointError(f"{path}: {why}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = next((ln.strip() for ln in str(exc).splitlines() if "nsupported" in ln or "allowed" in ln),
                      str(exc).splitlines()[0] if str(exc) else "")
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain values ({reason[:160]}); "
            "if you trust the file, keep only the weights with: python -c \"import torch; "
            f"c = torch.load('{path}', weights_only=False); torch.save({{'model': c['model']}}, 'weights.pth')\""
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None


def read_mae_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """``(state dict in MAE layout, training args, description)`` from any supported file or folder.

    NaN or Inf in any tensor is an error naming the file and the tensor.
    """
    file = _weights_path(Path(path).expanduser())
    state, args, kind = _read_state(file)
    check_finite(state, str(file))
    return state, args, kind


def _weights_path(path: Path) -> Path:
    """The file a ``--init-from`` path means (a clmae run folder: :func:`~clmae.io.checkpoint.weights_file`)."""
    if path.is_dir():
        if any((path / f"{LAST}{s}").is_file() for s in (".safetensors", ".pt")):
            path = weights_file(path)  # a clmae run: the same file every other command reads
        elif (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        else:
            raise CheckpointError(f"{path}: no {LAST}.safetensors or model.safetensors in this folder")
    if not path.is_file():
        raise CheckpointError(f"--init-from: {path} not found")
    return path


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    if path.suffix == ".safetensors":
        tensors, meta = read_weights(path)
        if meta.get("format") == FORMAT:
            return split_prefix(tensors, "mae"), dict(meta.get("run_config") or {}), "clmae checkpoint"
        return tensors, {}, "safetensors"
    obj = _load_pickle(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT and isinstance(obj.get("weights"), dict):
        return split_prefix(obj["weights"], "mae"), dict(obj.get("run_config") or {}), "clmae resume file"
    args: dict[str, Any] = {}
    if isinstance(obj, dict):
        raw_args = obj.get("args")
        if isinstance(raw_args, argparse.Namespace):
            args = dict(vars(raw_args))
        elif isinstance(raw_args, dict):
            args = dict(raw_args)
        for key in ("model", "state_dict", "model_state"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state dict found (expected a dict of tensors, or one under 'model')")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    return state, args, "MAE checkpoint"


def load_mae_checkpoint(path: str | Path, model) -> ImportReport:
    """Load an MAE's encoder (and decoder, if present) into ``model`` (a :class:`MaskedAutoencoderViT`).

    Keys follow facebookresearch/mae (``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``,
    ``decoder_blocks.N.*``, …), optionally under ``model`` and with DDP's ``module.`` prefix.
    ``pos_embed``/``decoder_pos_embed`` are clmae's fixed sin-cos and are only checked. A
    checkpoint without decoder (e.g. the released encoder-only MAE weights) keeps the new decoder.
    """
    state, args, kind = read_mae_weights(path)
    source = str(path)
    own = model.state_dict()
    notes: list[str] = []

    for name in IGNORED:
        if name in state:
            theirs, ours = state.pop(name).float(), getattr(model, name).float().cpu()
            if theirs.shape != ours.shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(theirs.shape)}, the model "
                                      f"{tuple(ours.shape)}; check --model, --img-size and --patch-size")
            if float((theirs - ours).abs().max()) > 1e-3:
                raise CheckpointError(f"{source}: {name} is not the fixed 2-D sin-cos embedding clmae uses (learned "
                                      "position embeddings cannot be imported)")
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        hint = ("; it looks like a fine-tuned classifier, not an MAE pretraining checkpoint"
                if any(k.startswith(("head.", "fc_norm.")) for k in unexpected) else "")
        raise CheckpointError(f"{source}: keys clmae's MAE does not have: {unexpected[:5]}"
                              f"{' …' if len(unexpected) > 5 else ''}{hint}")
    decoder_keys = {k for k in own if k.startswith(("decoder_", "mask_token"))}
    encoder_keys = set(own) - decoder_keys
    missing = sorted(encoder_keys - set(state))
    if missing:
        raise CheckpointError(f"{source}: encoder weights missing: {missing[:5]}{' …' if len(missing) > 5 else ''}")
    have_decoder = decoder_keys & set(state)
    if have_decoder and have_decoder != decoder_keys:
        gone = sorted(decoder_keys - have_decoder)
        raise CheckpointError(f"{source}: decoder weights incomplete, missing {gone[:5]}")
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if v.shape != own[k].shape]
    if shapes:
        raise CheckpointError(f"{source}: shape mismatch ({'; '.join(shapes[:3])}); check --model, --img-size and "
                              "--patch-size")
    model.load_state_dict(state, strict=False)
    if "norm_pix_loss" in args and bool(args["norm_pix_loss"]) != bool(model.config.norm_pix_loss):
        flag = "--norm-pix-loss" if args["norm_pix_loss"] else "--no-norm-pix-loss"
        notes.append(f"the checkpoint was trained with norm_pix_loss={bool(args['norm_pix_loss'])}, this run uses "
                     f"{bool(model.config.norm_pix_loss)} (pass {flag} to match)")
    decoder = "loaded" if have_decoder else "new (not in the checkpoint)"
    return ImportReport(source, len(encoder_keys), decoder, notes, args)
