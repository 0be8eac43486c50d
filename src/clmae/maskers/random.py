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
        noise = torch.rand(batch.size * batch.dist.world_size, batch.num_patches, generator=batch.generator)
        return topk_keep_indices(noise, batch.num_keep).to(batch.device)[batch.dist.rows(batch.size)]
