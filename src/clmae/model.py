"""The masked autoencoder: a ViT encoder that sees only visible patches and a light decoder.

One class, :class:`MaskedAutoencoderViT`, holds the encoder and the decoder. It does not decide
*which* patches are hidden: a masker (see :mod:`clmae.maskers`) hands it the indices to keep,
so random masking (MAE) and learned masking (CL-MAE) run through the same model.

Two forward paths exist, one per step of CL-MAE:

* :meth:`MaskedAutoencoderViT.forward` — the MAE step: encode the kept patches, decode with mask
  tokens, mean squared error over the hidden patches.
* :meth:`MaskedAutoencoderViT.forward_soft` — the masking-module step: every patch token is scaled
  by its soft score, the encoder sees all patches and the decoder gets no mask tokens.

Named configurations live in :data:`MODEL_CONFIGS`; :func:`create_model` builds one by name.
Without ``--model`` a run gets the model that fits its data (:func:`resolve_model`, the rule in
:func:`default_model_for`): small images train at about their own size, large ones at 224 px. The
registry and that rule are plain Python in :mod:`clmae.model_configs`, re-exported here.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from .errors import ConfigError
from .losses import reconstruction_loss

# The registry and the default-model rule, torch-free in model_configs; re-exported (``X as X``) as this module's API.
from .model_configs import DEFAULT_BANDS as DEFAULT_BANDS
from .model_configs import LARGE_FROM as LARGE_FROM
from .model_configs import LEGACY_DEFAULTS as LEGACY_DEFAULTS
from .model_configs import LEGACY_FALLBACK as LEGACY_FALLBACK
from .model_configs import MIN_GRID as MIN_GRID
from .model_configs import MODEL_CONFIGS as MODEL_CONFIGS
from .model_configs import SUITS as SUITS
from .model_configs import ModelChoice as ModelChoice
from .model_configs import ModelConfig as ModelConfig
from .model_configs import default_model as default_model
from .model_configs import default_model_for as default_model_for
from .model_configs import list_models as list_models
from .model_configs import model_config as model_config
from .model_configs import param_count as param_count
from .model_configs import resolve_model as resolve_model

LAYER_NORM_EPS = 1e-6


def create_model(name: str, **overrides) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(model_config(name, **overrides))


# ---------------------------------------------------------------------------------------------
# Pure helpers


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


def resample_pos_embed(pos_embed: torch.Tensor, grid_size: int, prefix_tokens: int = 1) -> torch.Tensor:
    """Position embeddings ``(1, prefix + g², D)`` of a square grid resampled to ``grid_size²`` patches.

    Bicubic with antialiasing in float32, the prefix (CLS) slots kept as they are: the computation
    timm's ``resample_abs_pos_embed`` does by default, so an encoder exported at another resolution
    holds the embedding timm itself would make from the original one.
    """
    prefix, grid = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    old = int(round(grid.shape[1] ** 0.5))
    if old * old != grid.shape[1]:
        raise ValueError(f"{grid.shape[1]} position embeddings do not form a square grid")
    if old == grid_size:
        return pos_embed
    dim = grid.shape[-1]
    image = grid.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid_size, grid_size), mode="bicubic", align_corners=False, antialias=True)
    grid = image.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def fixed_pos_embed(dim: int, config: ModelConfig) -> torch.Tensor:
    """The model's sin-cos embeddings ``(1, 1 + L, dim)``: made for ``pos_embed_grid``, resampled to its grid."""
    base = sincos_pos_embed_2d(dim, config.pos_embed_grid or config.grid_size)[None]
    return resample_pos_embed(base, config.grid_size)


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


# ---------------------------------------------------------------------------------------------
# The model


class MaskedAutoencoderViT(nn.Module):
    """ViT encoder over visible patches plus a lightweight transformer decoder (He et al., 2022)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        # Same key names as timm's ViT and the MAE checkpoints (patch_embed.proj.*), so weights travel.
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.register_buffer("pos_embed", fixed_pos_embed(c.embed_dim, c), persistent=False)
        self.blocks = transformer_blocks(c.embed_dim, c.depth, c.num_heads, c.mlp_ratio)
        self.norm = nn.LayerNorm(c.embed_dim, eps=LAYER_NORM_EPS)

        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", fixed_pos_embed(c.decoder_embed_dim, c), persistent=False)
        self.decoder_blocks = transformer_blocks(c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads, c.mlp_ratio)
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_weights)
        w = self.patch_embed.proj.weight.data  # initialise the patch projection like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the bias keeps Conv2d's default, as in MAE/CL-MAE/HPM
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    def num_keep(self, mask_ratio: float) -> int:
        """How many patches stay visible: ``int(L · (1 − mask_ratio))``, at least one."""
        return max(1, int(self.num_patches * (1 - mask_ratio)))

    # -- pieces ----------------------------------------------------------------------------

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch tokens with position embeddings, no CLS: ``(N, L, D)``. The maskers' input."""
        x = self.patch_embed(imgs)
        return x + self.pos_embed[:, 1:].to(x.dtype)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the encoder on already-embedded tokens; returns ``(N, 1 + K, D)`` with CLS first."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def decode(self, latent: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Predict every patch's pixels: ``(N, 1 + K, D) → (N, L, p·p·C)``."""
        return self.decode_tokens(self.decoder_tokens(latent, ids_keep))

    def decoder_tokens(self, latent: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's input ``(N, 1 + L, D_dec)``, CLS first, position embeddings added.

        With ``ids_keep`` the latent holds the visible patches in that order, and every other
        position gets the mask token. Without it the latent already covers all ``L`` patches.
        """
        x = self.decoder_embed(latent)
        cls, visible = x[:, :1], x[:, 1:]
        if ids_keep is not None:
            n, length, d = x.shape[0], self.num_patches, x.shape[-1]
            full = self.mask_token.to(x.dtype).expand(n, length, d).clone()
            full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), visible)
            visible = full
        return torch.cat([cls, visible], dim=1) + self.decoder_pos_embed.to(x.dtype)

    def decode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's blocks and pixel head on :meth:`decoder_tokens`: ``(N, L, p·p·C)``."""
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        return per_patch_target(imgs, self.config.patch_size, self.config.norm_pix_loss)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.config.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.config.patch_size, self.config.in_chans)

    # -- the two steps ---------------------------------------------------------------------

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """MAE step: keep ``ids_keep`` ``(N, K)``, reconstruct, loss over the hidden patches.

        Also returns the prediction, the mask (1 = hidden) and the decoder's input, which masking
        strategies may read (HPM's loss predictor runs on it).
        """
        tokens = gather_tokens(self.embed(imgs), ids_keep)
        decoder_tokens = self.decoder_tokens(self.encode_tokens(tokens), ids_keep)
        pred = self.decode_tokens(decoder_tokens)
        mask = torch.ones(pred.shape[:2], device=pred.device, dtype=torch.float32)
        mask.scatter_(1, ids_keep, 0.0)  # 1 = hidden, 0 = visible
        loss = reconstruction_loss(pred, self.target(imgs), mask)
        return {"loss": loss, "pred": pred, "mask": mask, "decoder_tokens": decoder_tokens}

    def forward_soft(self, imgs: torch.Tensor, scores: torch.Tensor,
                     tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Masking-module step: scale each patch token by its score, encode all, decode all.

        Returns the prediction ``(N, L, p·p·C)``; gradients reach ``scores`` through the encoder
        and decoder activations. ``tokens`` may be passed when already computed by :meth:`embed`.
        """
        if tokens is None:
            tokens = self.embed(imgs)
        latent = self.encode_tokens(tokens * scores.unsqueeze(-1).to(tokens.dtype))
        return self.decode(latent)

    # -- downstream ------------------------------------------------------------------------

    def forward_features(self, imgs: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """Encoder features of whole images (no masking): CLS token or mean of patch tokens."""
        latent = self.encode_tokens(self.embed(imgs))
        if pool == "cls":
            return latent[:, 0]
        if pool == "mean":
            return latent[:, 1:].mean(dim=1)
        raise ConfigError(f"pool: must be 'cls' or 'mean', got {pool!r}")

    def at_img_size(self, img_size: int) -> MaskedAutoencoderViT:
        """This model for ``img_size`` inputs: the same weights, the position embeddings of the
        pretraining grid resampled to the new one (``self`` when the size is already ``img_size``)."""
        if img_size == self.config.img_size:
            return self
        cfg = dataclasses.replace(self.config, img_size=img_size,
                                  pos_embed_grid=self.config.pos_embed_grid or self.config.grid_size)
        with torch.random.fork_rng(devices=[]):  # the throw-away initialisation leaves the caller's RNG alone
            model = MaskedAutoencoderViT(cfg)
        model.load_state_dict(self.state_dict())
        weight = self.cls_token
        return model.to(device=weight.device, dtype=weight.dtype).train(self.training)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the encoder's weights (what downstream users need)."""
        skip = ("decoder_", "mask_token")
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

