"""The MAE's building blocks: fixed position embeddings, patches, token gathering, initialisation, ViT blocks.

Small pure functions and timm's layers, shared by the autoencoder (:mod:`clmae.models.mae`) and the
strategies' own networks (CL-MAE's masking module, HPM's loss predictor).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block

from ..errors import ConfigError
from .configs import ModelConfig

LAYER_NORM_EPS = 1e-6


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings, shape ``(cls + grid², dim)``.

    Half the channels encode the row, half the column; each half is a 1-D sin/cos code with
    frequencies ``1 / 10000^(2i/d)``. The CLS slot (if any) is all zeros.
    """
    if dim % 4:
        raise ConfigError(f"embedding width {dim} must be divisible by 4 for 2-D sin-cos embeddings")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    coords = np.arange(grid_size, dtype=np.float64)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")  # rows vary along the first grid axis

    def code(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    # First half: column (x) coordinate, second half: row (y) coordinate.
    emb = np.concatenate([code(cols), code(rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()


def fixed_pos_embed(dim: int, config: ModelConfig) -> torch.Tensor:
    """The model's sin-cos embeddings ``(1, 1 + L, dim)``: made for ``pos_embed_grid``, resampled to its grid.

    timm's ``resample_abs_pos_embed`` (bicubic, antialiased, in fp32, the CLS slot kept), so an encoder
    exported at another resolution holds the embedding timm itself would make from the original one.
    """
    base = sincos_pos_embed_2d(dim, config.pos_embed_grid or config.grid_size)[None]
    return resample_abs_pos_embed(base, [config.grid_size, config.grid_size])


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(N, C, H, W)`` images → ``(N, L, p·p·C)`` patches, row-major over the grid."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # n, gh, gw, p, p, c
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for square grids."""
    n, length, _ = patches.shape
    g = int(round(length**0.5))
    if g * g != length:
        raise ValueError(f"{length} patches do not form a square grid")
    p = patch_size
    x = patches.reshape(n, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, g * p, g * p)


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select ``tokens[n, ids[n, k]]`` for every sample: ``(N, L, D), (N, K) → (N, K, D)``."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def per_patch_target(imgs: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """The reconstruction target: pixels per patch, optionally normalised per patch (MAE)."""
    target = patchify(imgs, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linears, unit LayerNorms: the MAE initialisation (``model.apply(init_weights)``;
    the strategies' own networks use it too)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def transformer_blocks(dim: int, depth: int, heads: int, mlp_ratio: float,
                       eps: float = LAYER_NORM_EPS) -> nn.ModuleList:
    """``depth`` timm ViT blocks (qkv bias, pre-norm LayerNorms of ``eps``), as the MAE builds them."""
    norm = partial(nn.LayerNorm, eps=eps)
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
    )
