"""Frozen encoder features: extracted once in batches, kept in memory and optionally on disk.

Every frozen-feature protocol (k-NN, linear probe, few-shot) reads features through a
:class:`FeatureCache`, keyed by what determines them: the encoder's weights, the exact data and
subset, the pooling and the evaluation view (image size, normalisation). A protocol run after
another on the same encoder and data costs no second forward pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from .errors import DataError
from .runtime import autocast

Features = tuple[torch.Tensor, torch.Tensor]  # (features float32 (N, D), labels (N,)), on the CPU


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


class FeatureCache:
    """Features by key, in memory for the life of the process and, with ``folder``, as ``.pt`` files."""

    def __init__(self) -> None:
        self.memory: dict[tuple, Features] = {}

    def clear(self) -> None:
        self.memory.clear()

    def get(self, key: tuple, extract: Callable[[], Features], folder: str | Path | None = None,
            name: str = "features") -> Features:
        """The features under ``key``; ``extract()`` computes them on a miss. A broken file is recomputed."""
        if key in self.memory:
            return self.memory[key]
        file = None
        if folder:
            digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
            file = Path(folder) / f"{name}-{digest}.pt"
            if file.is_file():
                try:
                    saved = torch.load(file, map_location="cpu", weights_only=True)
                    if saved.get("key") == repr(key):
                        self.memory[key] = (saved["features"], saved["labels"])
                        return self.memory[key]
                except Exception:  # noqa: BLE001 — a broken cache file is simply recomputed
                    pass
        feats = extract()
        self.memory[key] = feats
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": repr(key), "features": feats[0], "labels": feats[1]}, file)
        return feats
