"""Optimisers and the learning-rate schedule (per-iteration warmup, then half-cycle cosine)."""

from __future__ import annotations

import inspect
import math

import torch

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed")


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; biases, norms (1-D), tokens and the names the module's
    ``no_weight_decay()`` returns (timm's convention; e.g. AutoMAE's discriminator) without."""
    decay, no_decay = [], []
    exempt = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or any(t in name for t in NO_DECAY_NAMES) or name in exempt:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(module: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
                   fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with the MAE betas (0.9, 0.95); fused kernels on CUDA, multi-tensor (foreach) elsewhere.

    Fused AdamW can skip an update on the device (``found_inf``), so the trainer never waits for the GPU to
    decide one (clmae.train.steps). ``fused=True`` also on the CPU (torch >= 2.4): the same code path as on
    a GPU, for tests; the CPU default stays foreach, whose numbers the golden runs pin (fused rounds the last
    bit differently).
    """
    if fused is None:
        fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=(0.9, 0.95), **kwargs)


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """Learning rate at a fractional epoch: linear warmup from 0, then cosine down to ``min_lr``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:
        return lr
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
