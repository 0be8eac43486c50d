"""MAE's masking: a uniformly random subset of patches per image (He et al., 2022)."""

from __future__ import annotations

import torch

from .base import Masker, MaskingBatch
from .indices import topk_keep_indices


class RandomMasker(Masker):
    """MAE's masking: each image keeps a uniformly random subset of its patches.

    The noise is drawn for the global batch and sliced to this rank's rows, so N ranks mask
    exactly like one process with the whole batch.
    """

    uniform = True
    mask_label = "random mask"

    def keep_indices(self, batch: MaskingBatch) -> torch.Tensor:
        return topk_keep_indices(batch.global_rand(batch.num_patches), batch.num_keep)
