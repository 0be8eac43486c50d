"""Exponential moving averages of the autoencoder: the frozen copies HPM, AttMask and AutoMAE choose masks with."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False``: state for checkpoints, never in an optimiser."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone


def encoder_copy(mae: nn.Module, with_decoder_input: bool = False) -> nn.Module:
    """A frozen copy of the autoencoder without its pixel decoder (blocks, norm, head).

    ``with_decoder_input`` keeps ``decoder_embed`` (and the mask token), what HPM's loss predictor
    reads; without it only the encoder is kept.
    """
    clone = frozen_copy(mae)
    clone.decoder_blocks = nn.ModuleList()
    clone.decoder_norm = nn.Identity()
    clone.decoder_pred = nn.Identity()
    if not with_decoder_input:
        clone.decoder_embed = nn.Identity()
        del clone.mask_token
    return clone


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, decay: float) -> None:
    """``ema ← decay · ema + (1 − decay) · online`` for every parameter of ``ema`` (matched by name)."""
    params = dict(online.named_parameters())
    pairs = [(p, params[name]) for name, p in ema.named_parameters()]
    if not pairs:
        return
    emas = [e for e, _ in pairs]
    torch._foreach_mul_(emas, decay)
    torch._foreach_add_(emas, [o.detach() for _, o in pairs], alpha=1.0 - decay)


def cosine_momentum(start: float, progress: float, epochs: int) -> float:
    """``1 − (1 − m0)(1 + cos(π·t/T))/2``: DINO's per-iteration cosine from ``m0`` to 1 over the run (AttMask's)."""
    t = min(max(progress / epochs, 0.0), 1.0)
    return 1.0 - (1.0 - start) * (1.0 + math.cos(math.pi * t)) / 2.0
