"""SBAM (Choi, Park, Yi, Cha, Min, "Salience-Based Adaptive Masking: Revisiting Token Dynamics for Enhanced
Pre-training", ECCV 2024): hide the salient patches, with noise, at a ratio the batch's salience sets.

A patch's salience is the attention it receives from all patches: the softmax of the raw dot
products of the MAE's own patch embeddings (position embedding added, no CLS, no scaling), summed
over the queries, then min-max normalised per image to [0, 1]. Uniform noise of range 1/2 is added
and the patches with the *largest* salience-plus-noise are hidden: salient patches are hidden
almost always, background ones often enough for diversity.

The adaptive masking ratio (AMR): the mask ratio is ``r = r₀ − v + 2·v·ρ``, ρ the share of patches
whose salience exceeds δ, so ``r ∈ [r₀ − v, r₀ + v]``; r₀ is ``--mask-ratio``. As in the authors'
code, one ratio serves the whole batch (one K for every row), here computed over the *global*
batch from exact integer counts, so N ranks choose the same K as one process. ``v = 0`` is SBM,
the fixed ratio. No network and no loss of its own: one ``(L × L)`` affinity per image.
Deviations from the authors' code are listed in docs/masking-strategies.md.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Masker, MaskingBatch
from .indices import topk_keep_indices
from .options import SbamOptions

RANGE_EPS = 1e-6  # min-max normalisation of a constant salience (a blank image): all zeros, not NaN


@torch.no_grad()
def token_salience(tokens: torch.Tensor) -> torch.Tensor:
    """Normalised salience ``(N, L)`` in [0, 1] of patch tokens ``(N, L, D)``, in fp32 outside autocast.

    ``A = softmax_j(x_i · x_j)`` per row (raw dot products, as the authors), salience ``s_j = Σ_i A_ij``,
    then ``(s − min s) / (max s − min s)`` per image.
    """
    with torch.autocast(tokens.device.type, enabled=False):
        x = tokens.float()
        attention = torch.softmax(x @ x.transpose(1, 2), dim=-1)
        s = attention.sum(dim=1)
        low, high = s.amin(dim=1, keepdim=True), s.amax(dim=1, keepdim=True)
        return (s - low) / (high - low).clamp_min(RANGE_EPS)


class SalienceMasker(Masker):
    """SBAM's masking: hide the patches whose salience plus noise is largest, at the adaptive ratio (AMR).

    Options (``--sbam-*``): ``ratio_var`` v (0.1; 0 = SBM, the fixed ratio), ``delta`` δ (0.5),
    ``noise`` (0.5, the authors'), ``start_epoch`` (random masks before it; 0).
    """

    mask_label = "SBAM mask"
    score_label = "token salience"
    score_range = (0.0, 1.0)

    def __init__(self, num_patches: int, mask_ratio: float = 0.75, options: SbamOptions | None = None):
        super().__init__()
        o = (options or SbamOptions()).validate()
        self.num_patches, self.mask_ratio = num_patches, mask_ratio
        self.ratio_var, self.delta, self.noise, self.start_epoch = o.ratio_var, o.delta, o.noise, o.start_epoch
        self.adaptive_count = o.ratio_var > 0
        low, high = self.ratio_bounds()
        if not 0.0 < low <= high < 1.0 or not 1 <= self.keep_count(high) <= self.keep_count(low) < num_patches:
            raise ConfigError(f"--sbam-ratio-var: got {o.ratio_var}, but the mask ratio {mask_ratio} ± it must stay "
                              f"in (0, 1) and keep between 1 and {num_patches - 1} of {num_patches} patches visible")
        self._ratios: list[float] = []

    def ratio_bounds(self) -> tuple[float, float]:
        """The lowest and highest mask ratio AMR can choose: ``r₀ ∓ v``."""
        return self.mask_ratio - self.ratio_var, self.mask_ratio + self.ratio_var

    def keep_count(self, ratio: float) -> int:
        """K visible patches at mask ratio ``ratio``: ``int(L · (1 − r))``, as the MAE's."""
        return max(1, int(self.num_patches * (1 - ratio)))

    def adaptive_ratio(self, batch: MaskingBatch, salience: torch.Tensor) -> float:
        """AMR's ratio for the global batch: ``r₀ − v + 2·v·ρ``, ρ the share of its patches salient above δ.

        The count is an integer, averaged over the ranks in float64 (exact for equal batches), so every
        rank, and one process with the whole batch, gets the same ratio.
        """
        count = (salience > self.delta).sum().to(torch.float64)
        share = float(batch.mean_over_ranks(count)) / (batch.size * batch.num_patches)
        low, high = self.ratio_bounds()
        return min(max(self.mask_ratio - self.ratio_var + 2 * self.ratio_var * share, low), high)

    def scores(self, batch: MaskingBatch) -> torch.Tensor:
        return token_salience(batch.tokens)

    def keep_indices(self, batch: MaskingBatch) -> torch.Tensor:
        noise = self.noise * batch.global_rand(batch.num_patches)  # drawn every step: one stream in every phase
        if batch.progress < self.start_epoch:
            return topk_keep_indices(noise, batch.num_keep)
        salience = token_salience(batch.tokens)
        num_keep = batch.num_keep
        if self.adaptive_count:
            ratio = self.adaptive_ratio(batch, salience)
            num_keep = self.keep_count(ratio)
            if self.training:  # the training steps' ratios are logged; the probe's and pictures' are not
                self._ratios.append(ratio)
        return topk_keep_indices(-(salience + noise), num_keep)  # the largest salience + noise are hidden

    def mask_stats(self) -> dict[str, float]:
        """The mean AMR ratio of the masks drawn since the last call (``sbam_mask_ratio``), then forgotten."""
        ratios, self._ratios = self._ratios, []
        return {"sbam_mask_ratio": sum(ratios) / len(ratios)} if ratios else {}
