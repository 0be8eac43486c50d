"""Masking strategies: which patches the MAE gets to see.

Every masker answers one question, :meth:`Masker.keep_indices`: given the patch tokens of a batch
``(N, L, D)`` and how many to keep ``K``, return the indices ``(N, K)`` of the visible patches.

* :class:`RandomMasker` — MAE: a uniformly random subset per image.
* :class:`LearnedMasker` — CL-MAE: a small transformer scores every patch; the top-``K`` stay.

The index helpers below are pure functions, easy to test and to reuse in new maskers.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from .errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Pure index helpers


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


# ---------------------------------------------------------------------------------------------
# Maskers


class Masker(nn.Module):
    """Interface of a masking strategy. Subclasses implement :meth:`keep_indices`."""

    #: True when the masker has parameters trained by the masking-module step.
    learnable: bool = False

    def keep_indices(
        self, tokens: torch.Tensor, num_keep: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        raise NotImplementedError


class RandomMasker(Masker):
    """MAE's masking: each image keeps a uniformly random subset of its patches."""

    def keep_indices(self, tokens, num_keep, generator=None):
        n, length = tokens.shape[:2]
        return random_keep_indices(n, length, num_keep, generator, tokens.device)


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


MASKERS = {"random": RandomMasker, "learned": LearnedMasker}


def create_masker(method: str, model_config) -> Masker:
    """The masker a pretraining method uses: ``mae`` → random, ``clmae`` → learned."""
    if method == "mae":
        return RandomMasker()
    if method == "clmae":
        c = model_config
        return LearnedMasker(c.num_patches, c.embed_dim, c.masker_dim, c.masker_depth, c.masker_num_heads)
    raise ConfigError(f"method: must be 'clmae' or 'mae', got {method!r}")
