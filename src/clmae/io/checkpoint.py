"""Checkpoints that are safe to write, safe to load and readable by other tools.

A checkpoint named ``STEM`` (e.g. ``runs/x/checkpoint-last``) is two files:

* ``STEM.safetensors`` — the weights (``mae.*`` and, for CL-MAE, ``masker.*``) with the full run
  configuration as JSON in the metadata. Portable: no pickle, loads anywhere.
* ``STEM.pt`` — everything needed to resume (weights, both optimizers, schedule position, RNG
  state), loadable with ``torch.load(..., weights_only=True)`` and therefore never runs code.

Each file is written to a temporary name, flushed to disk and renamed over the old one, so a crash
or a full disk leaves the previous checkpoint intact. The ``.pt`` is written first: a process killed
between the two renames leaves a new ``.pt`` (what ``--resume`` reads) next to the previous
``.safetensors``, both loadable; the trainer rewrites the pair when it finds it torn
(:func:`checkpoint_pair_complete`). Temporary files left by a killed writer are removed by the
next write of the same file.

Which file of a run folder is read is decided in one place, :func:`weights_file` (the newer of the
pair), and :func:`load_checkpoint` takes the weights, model name, training position and sha256 all
from that one file, so evaluation, visualize, export and :func:`load_pretrained` agree on it.

Loading never runs code from the file: safetensors has no code, the ``.pt`` goes through PyTorch's
weights-only unpickler, and anything else (truncated, edited, foreign files, NaN/Inf weights) is a
:class:`~clmae.errors.CheckpointError` whose message says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import FIELDS, config_from_record
from ..errors import CheckpointError
from ..maskers import METHODS, create_masker
from ..models.configs import ModelConfig, default_model
from ..models.mae import MaskedAutoencoderViT
from ..options import check_option
from . import atomic
from .atomic import remove_stale_temp_files

FORMAT = "clmae-checkpoint-v1"
LAST = "checkpoint-last"  # the stem of a run's latest checkpoint: RUN/checkpoint-last.{pt,safetensors}
MAX_PATCHES = 1 << 16  # a 256x256 patch grid; a larger count in a file is an error, not an allocation


def write_run_file(path: Path, write: Callable[[str], None]) -> None:
    """:func:`clmae.io.atomic.atomic_write` for a run folder's files (one writer per folder: a killed
    writer's temporary files are removed first); an OS error is a :class:`CheckpointError` naming the cause."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path)
        atomic.atomic_write(path, write)
    except OSError as exc:
        raise CheckpointError(
            f"could not write {path}: {exc.strerror or exc}; the previous checkpoint is intact. Free disk space "
            f"(or pass --output-dir elsewhere) and continue with: clmae pretrain --resume {path.parent}"
        ) from None


def _flat_weights(modules: dict[str, torch.nn.Module | None]) -> dict[str, torch.Tensor]:
    flat = {}
    for prefix, module in modules.items():
        if module is None:
            continue
        for k, v in module.state_dict().items():
            flat[f"{prefix}.{k}"] = v.detach().to("cpu").contiguous()
    return flat


def save_weights(path: Path, modules: dict[str, torch.nn.Module | None], metadata: dict[str, Any]) -> None:
    """Weights as safetensors; ``metadata`` values are stored as JSON strings."""
    tensors = _flat_weights(modules)
    meta = {"format": FORMAT, **{k: json.dumps(v) for k, v in metadata.items()}}
    write_run_file(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    write_run_file(Path(path), lambda tmp: torch.save(state, tmp))


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a ``.safetensors`` checkpoint: ``(tensors, metadata)`` with metadata JSON-decoded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), "pt") as fh:
            raw = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 — SafetensorError, OSError, …: any unreadable file, one message
        raise CheckpointError(
            f"{path}: not a readable safetensors file, possibly truncated or not a checkpoint "
            f"({exc.__class__.__name__}: {_first_line(exc)})"
        ) from None
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


# What a resume file must hold, and of which type, before anything in it is used.
RESUME_KEYS: dict[str, type | tuple[type, ...]] = {
    "weights": dict, "opt_mae": dict, "generator": torch.Tensor, "epoch": int, "step_in_epoch": int,
    "iteration": int, "masker_updates": int, "model_config": dict, "run_config": dict,
}


def _first_line(exc: BaseException) -> str:
    """The first sentence of the error's first line (PyTorch's go on with paragraphs of advice), at most 200 chars."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return exc.__class__.__name__
    return lines[0].split(". ")[0][:200]


def not_a_torch_file(path: Path) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file (neither a zip archive nor a pickle), or None if it may be one:
    a text or image file named ``.pt`` gets a plain answer instead of the unpickler's "Unsupported operand"."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if head.startswith(b"PK") or head[:1] == b"\x80":  # zip (torch.save since 1.6) or a pickle (the legacy format)
        return None
    return "not a PyTorch checkpoint (neither a zip archive nor a pickle)" if head else "empty file: 0 bytes"


def _refusal_reason(exc: BaseException) -> str:
    """The line of PyTorch's weights-only error that says what was refused (not its advice to disable it)."""
    for line in str(exc).splitlines():
        if "unsupported" in line.lower() or "not an allowed global" in line.lower():
            return line.strip()[:200]
    return "objects outside the allowed tensor/plain-value types"


def read_training_state(path: str | Path) -> dict[str, Any]:
    """Load a ``.pt`` resume file without ever executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if why := not_a_torch_file(path):
        raise CheckpointError(f"{path}: {why}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "pickle protocol 4" notices for foreign files
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it contains Python objects that could run code ({_refusal_reason(exc)}); "
            "only clmae checkpoints of tensors and plain values are accepted"
        ) from None
    except Exception as exc:  # noqa: BLE001 — EOFError, zip errors, …: a cut or damaged file
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({exc.__class__.__name__}: {_first_line(exc)})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a clmae resume checkpoint (no {FORMAT!r} marker)")
    missing = [k for k in RESUME_KEYS if k not in state]
    wrong = [k for k, t in RESUME_KEYS.items() if k in state and not isinstance(state[k], t)]
    if missing or wrong:
        raise CheckpointError(
            f"{path}: incomplete clmae checkpoint (missing {missing}, wrong type {wrong}); "
            "resume from another checkpoint"
        )
    bad = [k for k, v in state["weights"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: corrupt checkpoint: weights {bad[:3]} are not tensors")
    return state


def check_finite(tensors: dict[str, Any], source: str) -> None:
    """Refuse NaN/Inf weights, naming the file and the first bad tensor.

    A damaged file or a diverged run must be an error, not an evaluation at chance accuracy.
    Non-tensor values and integer tensors are passed over.
    """
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = int(finite.numel() - finite.sum())
                raise CheckpointError(
                    f"{source}: tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf) out of {value.numel()}; "
                    "the file is damaged or the run diverged: use an earlier checkpoint"
                )


def split_prefix(flat: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in flat.items() if k.startswith(p)}


def _architecture_hint(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """Name the architectural difference behind a mismatch: patch size, channels, width, depth, patches."""
    hints = []

    def shape(d, k):
        return tuple(d[k].shape) if k in d else None

    a, b = shape(state, "patch_embed.proj.weight"), shape(own, "patch_embed.proj.weight")
    if a and b and len(a) == len(b) == 4:
        if a[2:] != b[2:]:
            hints.append(f"patch size {a[2]} in the checkpoint vs {b[2]} in the model")
        if a[1] != b[1]:
            hints.append(f"{a[1]} input channels in the checkpoint vs {b[1]} in the model")
        if a[0] != b[0]:
            hints.append(f"embedding width {a[0]} in the checkpoint vs {b[0]} in the model")
    a, b = shape(state, "network.head.weight"), shape(own, "network.head.weight")  # masking module: 1 score/patch
    if a and b and a[0] != b[0]:
        hints.append(f"{a[0]} patches in the checkpoint vs {b[0]} in the model (image size / patch size)")

    def depth(d, prefix):
        return len({k.split(".")[1] for k in d if k.startswith(prefix)})

    for prefix, what in (("blocks.", "encoder depth"), ("decoder_blocks.", "decoder depth"),
                         ("network.blocks.", "masking-module depth")):
        da, db = depth(state, prefix), depth(own, prefix)
        if da != db:
            hints.append(f"{what} {da} in the checkpoint vs {db} in the model")
    return hints


def config_weight_mismatch(cfg, weights: dict[str, torch.Tensor]) -> list[str]:
    """What in a model configuration disagrees with an autoencoder state dict (empty if nothing)."""
    expected = {
        "patch_embed.proj.weight": (cfg.embed_dim, cfg.in_chans, cfg.patch_size, cfg.patch_size),
        "decoder_embed.weight": (cfg.decoder_embed_dim, cfg.embed_dim),
        "decoder_pred.weight": (cfg.patch_size**2 * cfg.in_chans, cfg.decoder_embed_dim),
        "blocks.0.mlp.fc1.weight": (int(cfg.embed_dim * cfg.mlp_ratio), cfg.embed_dim),
        "decoder_blocks.0.mlp.fc1.weight": (int(cfg.decoder_embed_dim * cfg.mlp_ratio), cfg.decoder_embed_dim),
    }
    problems = [f"{k}: weights {tuple(weights[k].shape)} vs configuration {shape}"
                for k, shape in expected.items() if k in weights and tuple(weights[k].shape) != shape]
    problems += [f"{k}: missing" for k in expected if k not in weights]
    for prefix, depth, what in (("blocks.", cfg.depth, "depth"),
                                ("decoder_blocks.", cfg.decoder_depth, "decoder_depth")):
        found = len({k.split(".")[1] for k in weights if k.startswith(prefix)})
        if found != depth:
            problems.append(f"{what} {depth} in the configuration vs {found} blocks in the weights")
    if cfg.num_patches > MAX_PATCHES:
        problems.append(f"{cfg.num_patches} patches (img_size {cfg.img_size} / patch_size {cfg.patch_size}) "
                        "is implausible")
    return problems


def shape_mismatch(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> list[str]:
    """``KEY: weights SHAPE vs configuration SHAPE`` for every tensor both hold with another shape."""
    return [f"{k}: weights {tuple(weights[k].shape)} vs configuration {tuple(v.shape)}"
            for k, v in own.items() if k in weights and tuple(weights[k].shape) != tuple(v.shape)]


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, source: str) -> None:
    """``load_state_dict`` with an error that names the mismatching keys and shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = _architecture_hint(own, state)
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]) + (" …" if len(shapes) > 3 else ""))
        if missing:
            parts.append(f"missing {missing[:4]}" + (" …" if len(missing) > 4 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}" + (" …" if len(unexpected) > 4 else ""))
        raise CheckpointError(
            f"{source}: the {what} weights do not match the architecture ({'; '.join(parts)}); "
            "check --model, --img-size and --patch-size"
        )
    module.load_state_dict(state)


def resolve_checkpoint(path: str | Path, suffix: str) -> Path:
    """Accept a run folder, a checkpoint stem, or a file; return the file with ``suffix``."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if path.suffix in (".pt", ".safetensors"):
        path = path.with_suffix("")
    candidate = path.with_name(path.name + suffix)
    if not candidate.is_file():
        raise CheckpointError(f"{candidate}: checkpoint not found (give a run folder or a checkpoint file)")
    return candidate


def _position(file: Path) -> tuple[int, int, int] | None:
    """``(epoch, step_in_epoch, iteration)`` a checkpoint file was saved at; ``None`` if unreadable.

    Cheap: the ``.safetensors`` header only; the ``.pt`` memory-mapped, its tensors never read.
    """
    keys = ("epoch", "step_in_epoch", "iteration")
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), "pt") as fh:
                meta = fh.metadata() or {}
            return tuple(int(json.loads(meta[k])) for k in keys)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        return tuple(int(state[k]) for k in keys)
    except Exception:  # noqa: BLE001 — missing, truncated, foreign: "no usable position"
        return None


def checkpoint_pair_complete(stem: str | Path) -> bool:
    """True when ``STEM.pt`` and ``STEM.safetensors`` both exist and were saved at the same position.

    A process killed between the two renames leaves a newer ``.pt`` next to the previous
    ``.safetensors``; the trainer re-saves when this is False, so the pair is consistent again.
    """
    stem = Path(stem)
    a = _position(stem.with_name(stem.name + ".pt"))
    return a is not None and a == _position(stem.with_name(stem.name + ".safetensors"))


def weights_file(path: str | Path) -> Path:
    """The one rule for which file a checkpoint path means (evaluation, visualize, export, load_pretrained).

    An explicit file is itself; for a run folder or stem its ``.safetensors``, unless a kill left the
    ``.pt`` newer (or the ``.safetensors`` missing or unreadable), then the ``.pt``, which holds the
    same weights and more."""
    path = Path(path)
    if path.suffix == ".pt" or (path.suffix == ".safetensors" and path.is_file()):
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found")
        return path
    if path.is_file():
        raise CheckpointError(f"{path}: not a clmae checkpoint (expected a run folder, .safetensors or .pt file)")
    if path.is_dir():
        stem = path / LAST
    else:
        stem = path.with_suffix("") if path.suffix == ".safetensors" else path
    st, pt = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".pt")
    if not st.is_file() and not pt.is_file():
        raise CheckpointError(f"{st}: checkpoint not found (give a run folder or a checkpoint file)")
    if pt.is_file():
        pos_pt = _position(pt)
        if pos_pt is not None and (not st.is_file() or (_position(st) or (-1, -1, -1)) < pos_pt):
            return pt
    if not st.is_file():
        return pt  # unreadable .pt and no .safetensors: read_training_state says what is wrong
    return st


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class LoadedCheckpoint:
    """A checkpoint rebuilt from one file, with what reports say about it, all read from that file."""

    file: Path
    sha256: str
    model_config: ModelConfig  # as pretrained (``mae.config`` differs when loaded at another img_size)
    mae: MaskedAutoencoderViT
    masker: torch.nn.Module | None
    run_config: dict[str, Any]  # the run's configuration as it ran, plus ``data_info`` (the data's stats)
    model_name: str
    position: dict[str, int | None]  # epoch (completed), step_in_epoch, iteration when it was saved

    @property
    def pretrain_img_size(self) -> int:
        return self.model_config.img_size


def _stat_identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", img_size: int | None = None,
                    attempts: int = 3) -> LoadedCheckpoint:
    """Rebuild the trained model from the file :func:`weights_file` picks, with its sha256 and position.

    ``img_size`` other than the pretraining size gives the encoder for that input size (position
    embeddings resampled, see :meth:`MaskedAutoencoderViT.at_img_size`); the masking module scores a
    fixed patch grid and is then not returned. A file replaced while it is read (a run saving) is
    read again, so the hash always belongs to the weights returned.
    """
    for _ in range(attempts):
        file = weights_file(path)
        before = _stat_identity(file)
        sha = file_sha256(file)
        mae, masker, run_cfg, meta = _load_file(file)
        if _stat_identity(file) == before:
            break
    else:
        raise CheckpointError(f"{file}: the file changed while it was being read (is a run still saving it?); "
                              "try again when the run has finished")
    position = {k: (int(meta[k]) if isinstance(meta.get(k), (int, float)) else None)
                for k in ("epoch", "step_in_epoch", "iteration")}
    name = meta.get("model_name") or run_cfg.get("model") or default_model(str(run_cfg.get("data")))
    model_config = mae.config
    if img_size is not None and img_size != mae.config.img_size:
        p = mae.config.patch_size
        check_option(img_size >= p and img_size % p == 0, "img_size", img_size,
                     f"a multiple of the checkpoint's patch size {p}")
        mae, masker = mae.at_img_size(img_size), None
    masker = None if masker is None else masker.to(device).eval()
    return LoadedCheckpoint(file, sha, model_config, mae.to(device).eval(), masker, run_cfg, str(name), position)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", img_size: int | None = None):
    """Rebuild the trained model from a checkpoint: ``(mae, masker or None, run_config dict)``.

    The masker is the run's masking strategy with its saved state (CL-MAE's masking module, EMA
    copies); None for uniformly random masks (MAE) and for a method not registered in this process.
    Accepts a run folder, ``*.safetensors`` or ``*.pt`` (see :func:`weights_file`); ``img_size``
    rebuilds the encoder for another input size (see :func:`load_checkpoint`). Never runs code
    from the file; a truncated, foreign, mismatching or non-finite file raises :class:`CheckpointError`.
    """
    loaded = load_checkpoint(path, device, img_size)
    return loaded.mae, loaded.masker, loaded.run_config


def _load_file(path: Path) -> tuple[MaskedAutoencoderViT, torch.nn.Module | None, dict[str, Any], dict[str, Any]]:
    """``(mae, masker or None, run_config with data_info, metadata)`` from one checkpoint file, on the CPU."""
    if path.suffix == ".pt":
        state = read_training_state(path)
        flat = state["weights"]
        meta = {k: v for k, v in state.items() if k not in ("weights", "opt_mae", "opt_masker", "generator")}
        source = str(path)
    else:
        file = path
        flat, meta = read_weights(file)
        source = str(file)
        if meta.get("format") != FORMAT or "model_config" not in meta:
            raise CheckpointError(f"{source}: not a clmae checkpoint (no model configuration in its metadata)")
    check_finite(flat, source)
    try:
        model_cfg = ModelConfig(**meta["model_config"])
        model_cfg.validate()
    except (TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise CheckpointError(f"{source}: unreadable model configuration ({exc})") from None
    # Compare before building: a crafted configuration must not make us allocate a giant model.
    problems = config_weight_mismatch(model_cfg, split_prefix(flat, "mae"))
    if problems:
        raise CheckpointError(
            f"{source}: its model configuration does not match its weights ({'; '.join(problems)}); the file was "
            "edited or is not a clmae checkpoint"
        )
    mae = MaskedAutoencoderViT(model_cfg)
    load_state_checked(mae, split_prefix(flat, "mae"), "autoencoder", source)
    masker = None
    run_cfg = dict(meta.get("run_config") or {})
    masker_state = split_prefix(flat, "masker")
    method = run_cfg.get("method") or FIELDS["method"].default  # recorded since the first version
    if method in METHODS:
        masker = create_masker(method, model_cfg, config_from_record(run_cfg))
        masker.attach(mae)
        if masker.has_state:
            problems = shape_mismatch(masker.state_dict(), masker_state)
            if problems:
                raise CheckpointError(f"{source}: its model configuration does not match its {method} masker's "
                                      f"weights ({'; '.join(problems)})")
            load_state_checked(masker, masker_state, f"{method} masker", source)
        elif masker_state:
            raise CheckpointError(f"{source}: it holds masker weights but method {method!r} has no state; "
                                  "the file was edited or is not a clmae checkpoint")
        if masker.uniform:
            masker = None
    run_cfg["data_info"] = meta.get("data", {}) or {}
    return mae.eval(), (None if masker is None else masker.eval()), run_cfg, meta
