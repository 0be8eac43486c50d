"""Frozen encoder features: extracted once in batches, kept in memory and on disk.

Every frozen-feature protocol (k-NN, linear probe, few-shot) reads features through a
:class:`FeatureCache`, keyed by what determines them: the encoder's weights (checkpoint sha256,
or architecture and seed of a random-init encoder), the exact data and subset, the pooling and the
evaluation view (image size, normalisation). A protocol run after another on the same encoder and
data costs no second forward pass, in this process (memory) or a later one (``.pt`` files).

Files on disk are written atomically (temporary name, then rename), read back with
``torch.load(weights_only=True)`` (never code), and used only when their stored key and labels
match exactly; anything else is recomputed and overwritten.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import DataError
from ..io.atomic import atomic_write
from ..runtime import autocast

Features = tuple[torch.Tensor, torch.Tensor]  # (features float32 (N, D), labels (N,)), on the CPU
CACHE_FORMAT = "clmae-features-v1"


@torch.no_grad()
def extract_features(encoder: nn.Module, batches, pool: str, device: torch.device) -> Features:
    """``(features float32 (N, D), labels (N,))`` on the CPU from ``encoder.forward_features``."""
    feats, labels = [], []
    for x, y in batches:
        with autocast(device):
            f = encoder.forward_features(x, pool=pool)
        feats.append(f.float().cpu())
        labels.append(y.cpu())
    if not feats:
        raise DataError("no readable images to extract features from")
    return torch.cat(feats), torch.cat(labels)


def read_cached(file: Path, key: tuple, labels: torch.Tensor | None = None) -> Features | None:
    """The features stored in ``file`` if it holds exactly ``key`` (and ``labels``); else ``None``."""
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 — missing, cut or foreign: recomputed
        return None
    if not isinstance(saved, dict) or saved.get("format") != CACHE_FORMAT or saved.get("key") != repr(key):
        return None
    feats, saved_labels = saved.get("features"), saved.get("labels")
    if not (isinstance(feats, torch.Tensor) and isinstance(saved_labels, torch.Tensor) and feats.ndim == 2
            and feats.dtype == torch.float32 and feats.shape[0] == saved_labels.shape[0]):
        return None
    if labels is not None and not torch.equal(saved_labels, labels.cpu()):
        return None
    return feats, saved_labels


def write_cached(file: Path, key: tuple, feats: Features) -> bool:
    """Store ``feats`` under ``key`` in ``file`` atomically; a failure is a warning, not an error."""
    payload = {"format": CACHE_FORMAT, "key": repr(key), "features": feats[0], "labels": feats[1]}
    try:
        atomic_write(file, lambda tmp: torch.save(payload, tmp))
        return True
    except (OSError, RuntimeError) as exc:  # RuntimeError: torch's writer on a full disk
        print(f"clmae: features not cached in {file.parent}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return False


class FeatureCache:
    """Features by key, in memory for the life of the process and, with a file, on disk."""

    def __init__(self) -> None:
        self.memory: dict[tuple, Features] = {}
        self.read_from: dict[tuple, Path] = {}  # the keys whose features came from a file

    def clear(self) -> None:
        self.memory.clear()
        self.read_from.clear()

    def has(self, key: tuple, file: Path | None = None, labels: torch.Tensor | None = None) -> bool:
        """Whether :meth:`get` would cost no extraction (loads a matching file into memory)."""
        if key in self.memory:
            return True
        if file is not None and file.is_file():
            found = read_cached(file, key, labels)
            if found is not None:
                self.memory[key] = found
                self.read_from[key] = file
                return True
        return False

    def get(self, key: tuple, extract: Callable[[], Features], file: Path | None = None,
            labels: torch.Tensor | None = None) -> Features:
        """The features under ``key``; ``extract()`` computes them on a miss (and stores them in ``file``)."""
        if self.has(key, file, labels):
            return self.memory[key]
        feats = extract()
        self.memory[key] = feats
        if file is not None:
            write_cached(file, key, feats)
        return feats
