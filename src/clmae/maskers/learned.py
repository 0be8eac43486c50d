"""CL-MAE's learned masking (Madan et al., WACV 2024): a small transformer scores every patch.

The masking module sees the patch tokens (with position embeddings, detached from the encoder) and
gives each patch a score in (0, 1); the MAE keeps the ``K`` highest-scored patches visible. The
module is trained by the trainer's masking-module step on the losses of :mod:`clmae.losses`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from ..errors import ConfigError
from .base import Masker
from .indices import topk_keep_indices


class MaskingModule(nn.Module):
    """The CL-MAE masking network: a CLS token plus a few transformer blocks, one score per patch.

    Input: patch tokens with position embeddings ``(N, L, D_in)`` (the caller detaches them).
    Output: scores in (0, 1), ``(N, L)``, from LayerNorm → Linear → sigmoid on the CLS output.
    """

    def __init__(self, num_patches: int, in_dim: int, dim: int | None = None, depth: int = 5, num_heads: int = 4,
                 mlp_ratio: float = 4.0):
        super().__init__()
        dim = dim or in_dim
        if dim % num_heads:
            raise ConfigError(f"masker_num_heads: {num_heads} does not divide the masker width {dim}")
        norm = partial(nn.LayerNorm, eps=1e-6)
        # The authors' width equals the encoder's; a projection only exists when they differ.
        self.proj = nn.Identity() if dim == in_dim else nn.Linear(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.head_norm = norm(dim)
        self.head = nn.Linear(dim, num_patches)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj(tokens)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return torch.sigmoid(self.head(self.head_norm(x[:, 0])).float())


class LearnedMasker(Masker):
    """CL-MAE's masking: keep the patches the masking module scores highest (deterministic top-k)."""

    learnable = True

    def __init__(self, num_patches: int, in_dim: int, dim: int | None = None, depth: int = 5, num_heads: int = 4):
        super().__init__()
        self.network = MaskingModule(num_patches, in_dim, dim, depth, num_heads)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Soft scores ``(N, L)``; the tokens are detached so no gradient reaches the encoder."""
        return self.network(tokens.detach())

    def keep_indices(self, tokens, num_keep, generator=None):
        with torch.no_grad():
            return topk_keep_indices(self(tokens), num_keep)
