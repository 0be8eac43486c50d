"""The interface every masking strategy implements."""

from __future__ import annotations

import torch
import torch.nn as nn


class Masker(nn.Module):
    """Interface of a masking strategy. Subclasses implement :meth:`keep_indices`."""

    #: True when the masker has parameters trained by the masking-module step.
    learnable: bool = False

    def keep_indices(
        self, tokens: torch.Tensor, num_keep: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        raise NotImplementedError
