"""Losses of CL-MAE, as small pure functions on tensors.

Scores ``s`` have shape ``(N, L)``: one value in (0, 1) per patch, high = keep visible.
Each function returns the *unweighted* term; the caller applies λ. The masking module minimises
``λ·soft_reconstruction + λ_gauss·binarization + λ_kl·mask_ratio_kl + λ_div·diversity``.
"""

from __future__ import annotations

import math

import torch

GAUSS_SIGMA = 0.12


def per_patch_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over each patch's pixels: ``(N, L, P), (N, L, P) → (N, L)``, fp32."""
    return (pred.float() - target.float()).pow(2).mean(dim=-1)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE loss: per-patch error averaged over the hidden patches (``mask == 1``)."""
    mask = mask.float()
    return (per_patch_error(pred, target) * mask).sum() / mask.sum()


def soft_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``Σ (1−s)·ℓ / Σ (1−s)``: reconstruction error weighted by how hidden each patch is."""
    hidden = 1.0 - scores.float()
    return (hidden * per_patch_error(pred, target)).sum() / hidden.sum()


def binarization_loss(scores: torch.Tensor) -> torch.Tensor:
    """Mean of a Gaussian bump centred at 0.5: pushes scores towards 0 or 1.

    The authors divide the Gaussian by its normalising constant ``1/(σ√(2π))``, i.e. multiply by
    ``σ√(2π)`` (≈0.30), so the peak is 0.30 rather than 1; we keep their scale.
    """
    s = scores.float()
    bump = torch.exp(-((s - 0.5) ** 2) / (2 * GAUSS_SIGMA**2))
    return (GAUSS_SIGMA * math.sqrt(2 * math.pi)) * bump.mean()


def mask_ratio_kl_loss(scores: torch.Tensor, keep_ratio: float = 0.25, reduction: str = "sum") -> torch.Tensor:
    """Bernoulli KL between each image's mean score ``p_i`` and the target keep ratio ``k``.

    ``Σ_i [p_i log(p_i/k) + (1−p_i) log((1−p_i)/(1−k))]``; ``reduction="sum"`` is the authors'
    (it grows with the batch), ``"mean"`` divides by the batch size.
    """
    if not 0.0 < keep_ratio < 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1), got {keep_ratio}")
    p = scores.float().mean(dim=-1)
    kl = p * torch.log(p / keep_ratio) + (1 - p) * torch.log((1 - p) / (1 - keep_ratio))
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def diversity_loss(scores: torch.Tensor, scale: float = 0.1) -> torch.Tensor:
    """``mean_{i<j} exp(−scale·‖s_i − s_j‖₂)``: penalises images that get the same mask.

    Vectorised over all pairs (the authors loop over pairs in Python). Zero for a batch of one.
    Distances come from the differences, not from ``|a|² + |b|² − 2ab``: that matmul shortcut
    (cdist's default above 25 rows) rounds close pairs to distance 0 and drops their gradient,
    which is the signal this loss exists for. The exact form costs ~3 ms (256 images, one core).
    """
    n = scores.shape[0]
    if n < 2:
        return scores.sum() * 0.0
    s = scores.float().unsqueeze(0)
    dist = torch.cdist(s, s, compute_mode="donot_use_mm_for_euclid_dist").squeeze(0)  # (N, N)
    i, j = torch.triu_indices(n, n, offset=1, device=s.device)
    return torch.exp(-scale * dist[i, j]).mean()
