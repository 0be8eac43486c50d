"""MAE's masking: a uniformly random subset of patches per image (He et al., 2022)."""

from __future__ import annotations

import torch

from ..distributed import DistContext
from .base import Masker
from .indices import random_keep_indices


class RandomMasker(Masker):
    """MAE's masking: each image keeps a uniformly random subset of its patches."""

    def keep_indices(self, tokens, num_keep, generator=None):
        n, length = tokens.shape[:2]
        return random_keep_indices(n, length, num_keep, generator, tokens.device)


def global_random_keep(masker: Masker, tokens: torch.Tensor, num_keep: int, generator: torch.Generator,
                       ctx: DistContext) -> torch.Tensor:
    """Keep-indices of a random masker drawn for the global batch; this rank's rows.

    Random maskers only look at the token shape, so the global batch is an expanded view (no
    copy). With one process this is exactly ``masker.keep_indices(tokens, ...)``.
    """
    b = tokens.shape[0]
    full = tokens[:1].expand(b * ctx.world_size, *tokens.shape[1:])
    return masker.keep_indices(full, num_keep, generator)[ctx.rows(b)]
