"""Checkpoints that are safe to write, safe to load and readable by other tools.

A checkpoint named ``STEM`` (e.g. ``runs/x/checkpoint-last``) is two files:

* ``STEM.safetensors`` — the weights (``mae.*`` and, for CL-MAE, ``masker.*``) with the full run
  configuration as JSON in the metadata. Portable: no pickle, loads anywhere.
* ``STEM.pt`` — everything needed to resume (weights, both optimizers, schedule position, RNG
  state), loadable with ``torch.load(..., weights_only=True)`` and therefore never runs code.

Each file is written to a temporary name, flushed to disk and renamed over the old one, so a crash
or a full disk leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

FORMAT = "clmae-checkpoint-v1"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically rename to ``path``; on any error nothing changes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"could not write {path}: {exc.strerror or exc}; the previous checkpoint is intact — free disk space "
                "or choose another --output-dir, then --resume"
            ) from None
        raise


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
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a ``.safetensors`` checkpoint: ``(tensors, metadata)`` with metadata JSON-decoded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file, possibly truncated ({exc})") from None
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


def read_training_state(path: str | Path) -> dict[str, Any]:
    """Load a ``.pt`` resume file without ever executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it contains Python objects that could run code "
            f"({str(exc).splitlines()[0][:200]}); only clmae checkpoints of tensors and plain values are accepted"
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a clmae resume checkpoint (no {FORMAT!r} marker)")
    return state


def split_prefix(flat: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in flat.items() if k.startswith(p)}


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, source: str) -> None:
    """``load_state_dict`` with an error that names the mismatching keys and shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
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
        path = path / "checkpoint-last"
    if path.suffix in (".pt", ".safetensors"):
        path = path.with_suffix("")
    candidate = path.with_name(path.name + suffix)
    if not candidate.is_file():
        raise CheckpointError(f"{candidate}: checkpoint not found (give a run folder or a checkpoint file)")
    return candidate


def load_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the trained model from a checkpoint: ``(mae, masker or None, run_config dict)``.

    Accepts a run folder, ``*.safetensors`` or ``*.pt``.
    """
    from .maskers import create_masker
    from .model import MaskedAutoencoderViT, ModelConfig

    path = Path(path)
    if path.suffix == ".pt":
        state = read_training_state(path)
        flat, meta = state["weights"], {"model_config": state["model_config"], "run_config": state["run_config"],
                                         "data": state.get("data", {})}
        source = str(path)
    else:
        file = resolve_checkpoint(path, ".safetensors")
        flat, meta = read_weights(file)
        source = str(file)
        if meta.get("format") != FORMAT or "model_config" not in meta:
            raise CheckpointError(f"{source}: not a clmae checkpoint (no model configuration in its metadata)")
    try:
        model_cfg = ModelConfig(**meta["model_config"])
    except TypeError as exc:
        raise CheckpointError(f"{source}: unreadable model configuration ({exc})") from None
    mae = MaskedAutoencoderViT(model_cfg)
    load_state_checked(mae, split_prefix(flat, "mae"), "autoencoder", source)
    masker = None
    run_cfg = dict(meta.get("run_config") or {})
    masker_state = split_prefix(flat, "masker")
    if masker_state:
        masker = create_masker("clmae", model_cfg)
        load_state_checked(masker, masker_state, "masking module", source)
    run_cfg["data_info"] = meta.get("data", {})
    return mae.to(device).eval(), (None if masker is None else masker.to(device).eval()), run_cfg
