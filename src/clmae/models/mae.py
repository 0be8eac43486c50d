"""The masked autoencoder (He et al., 2022): a ViT encoder that sees only the visible patches, a light decoder.

One class, :class:`MaskedAutoencoderViT`, holds the encoder and the decoder. It does not decide
*which* patches are hidden: a masking strategy (:mod:`clmae.maskers`) hands it the indices to keep,
so every strategy trains through the same model and the same loss (:func:`reconstruction_loss`).
Its pieces (:meth:`~MaskedAutoencoderViT.embed`, :meth:`~MaskedAutoencoderViT.encode_tokens`,
:meth:`~MaskedAutoencoderViT.decoder_tokens`, :meth:`~MaskedAutoencoderViT.decode_tokens`) are public,
so a strategy can run the frozen MAE another way (CL-MAE's soft path, :mod:`clmae.maskers.clmae`).
Named configurations and the default-model rule are in :mod:`clmae.models.configs`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from timm.layers import PatchEmbed

from ..errors import ConfigError
from .configs import ModelConfig, model_config
from .layers import (
    LAYER_NORM_EPS,
    fixed_pos_embed,
    gather_tokens,
    init_weights,
    patchify,
    per_patch_target,
    transformer_blocks,
    unpatchify,
)


def create_model(name: str, **overrides) -> MaskedAutoencoderViT:
    """The autoencoder of a named configuration (``clmae models``), with fields overridden."""
    return MaskedAutoencoderViT(model_config(name, **overrides))


def per_patch_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over each patch's pixels: ``(N, L, P), (N, L, P) → (N, L)``, in fp32."""
    return (pred.float() - target.float()).pow(2).mean(dim=-1)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The MAE loss: the per-patch error averaged over the hidden patches (``mask == 1``), in fp32."""
    mask = mask.float()
    return (per_patch_error(pred, target) * mask).sum() / mask.sum()


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

    # -- the MAE step ----------------------------------------------------------------------

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor,
                gates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """MAE step: keep ``ids_keep`` ``(N, K)``, reconstruct, loss over the hidden patches.

        Also returns the prediction, the mask (1 = hidden) and the decoder's input, which masking
        strategies may read (HPM's loss predictor runs on it). ``gates`` ``(N, L)`` (a strategy's
        :meth:`~clmae.maskers.base.Masker.token_gates`) multiply each token by ``1 + (g − sg(g))``: exactly
        1 in value, so the tokens, the loss and every weight's gradient stay what they are without gates,
        while ``∂loss/∂g_i = ⟨x_i, ∂loss/∂x_i⟩`` (straight-through; 0 for hidden patches).
        """
        tokens = self.embed(imgs)
        if gates is not None:
            tokens = tokens + tokens * (gates - gates.detach()).unsqueeze(-1).to(tokens.dtype)
        tokens = gather_tokens(tokens, ids_keep)
        decoder_tokens = self.decoder_tokens(self.encode_tokens(tokens), ids_keep)
        pred = self.decode_tokens(decoder_tokens)
        mask = torch.ones(pred.shape[:2], device=pred.device, dtype=torch.float32)
        mask.scatter_(1, ids_keep, 0.0)  # 1 = hidden, 0 = visible
        loss = reconstruction_loss(pred, self.target(imgs), mask)
        return {"loss": loss, "pred": pred, "mask": mask, "decoder_tokens": decoder_tokens}

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

