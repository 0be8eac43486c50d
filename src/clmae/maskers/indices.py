"""Pure helpers on index tensors: which patches stay visible, as ``(N, K)`` indices or ``(N, L)`` masks.

Conventions used everywhere in clmae: a *keep* tensor ``(N, K)`` holds the indices of the visible
patches of each image; a *mask* ``(N, L)`` is 1 where the patch is hidden and 0 where it is visible.
"""

from __future__ import annotations

import torch


def topk_keep_indices(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices of the ``num_keep`` highest scores per row, highest first: ``(N, L) → (N, K)``."""
    return torch.topk(scores, num_keep, dim=1, largest=True, sorted=True).indices


def random_keep_indices(
    batch: int, length: int, num_keep: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """A uniformly random subset of ``num_keep`` of ``length`` positions per row, ``(N, K)``."""
    noise = torch.rand(batch, length, generator=generator)
    return topk_keep_indices(noise, num_keep).to(device)


def mask_from_keep(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """Binary mask ``(N, L)``: 0 where the patch is visible, 1 where it is hidden."""
    mask = torch.ones(ids_keep.shape[0], length, device=ids_keep.device)
    return mask.scatter_(1, ids_keep, 0.0)


def keep_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`mask_from_keep` (indices in ascending order); every row must keep as many."""
    visible = mask == 0
    counts = visible.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every row of the mask must have the same number of visible patches")
    order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)
    return order[:, : int(counts[0])]
