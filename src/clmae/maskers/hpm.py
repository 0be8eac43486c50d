"""HPM: Hard Patches Mining (Wang et al., "Hard Patches Mining for Masked Image Modeling", CVPR 2023).

The MAE also learns to predict, for every hidden patch, how badly it will reconstruct it: a loss
predictor (a second decoder, as deep and wide as the pixel decoder) reads the decoder's input and
is trained with a *relative* objective, a binary cross-entropy on every ordered pair of an image's
hidden patches that asks which of the two has the larger reconstruction error. Its loss is added
to the MAE's with weight 1 and, as in the authors' code, reaches the encoder as well.

Masks come from an EMA copy of the MAE and of the predictor, run on the whole image: a share of
the hidden patches, ``α = α_max · (e + 1) / E`` at epoch ``e`` of ``E`` (``α_max = 0.5``), are the
patches predicted hardest; the rest of the mask is uniformly random. The EMA decay rises linearly
from 0.999 to 0.9999 over the first 100 epochs. Deviations from the authors' code are listed in
docs/masking-strategies.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..distributed import split_mean
from ..models.layers import LAYER_NORM_EPS, init_weights, transformer_blocks
from ..models.mae import per_patch_error
from .base import Masker, MaskingBatch
from .ema import ema_update, encoder_copy, frozen_copy
from .indices import topk_keep_indices
from .options import HpmOptions

PAIR_EPS = 1e-6  # the authors' log(σ + 1e-6)


def relative_loss(predicted: torch.Tensor, error: torch.Tensor, hidden: torch.Tensor,
                  num_hidden: int | None = None) -> torch.Tensor:
    """HPM's ranking objective: BCE on every ordered pair ``(i, j)``, ``i ≠ j``, of an image's hidden patches.

    ``y = [e_j > e_i]``, logit ``s_j − s_i``, loss ``−[y·log(σ + ε) + (1 − y)·log(1 − σ + ε)]``; pairs with
    equal errors are left out. Mean over the valid pairs of the whole batch. Shapes ``(N, L)``; every
    row of ``hidden`` (1 = hidden) holds the same number of hidden patches, ``num_hidden`` when the caller
    knows it (else it is read from ``hidden``, a wait for the GPU). Computed in fp32.
    """
    num_hidden = int(hidden[0].sum()) if num_hidden is None else num_hidden
    idx = torch.argsort((hidden < 0.5).to(torch.int8), dim=1, stable=True)[:, :num_hidden]  # hidden, ascending
    s = torch.gather(predicted.float(), 1, idx)
    e = torch.gather(error.float(), 1, idx)
    logit = s.unsqueeze(1) - s.unsqueeze(2)  # [n, i, j] = s_j − s_i
    harder = (e.unsqueeze(1) > e.unsqueeze(2)).float()
    valid = (e.unsqueeze(1) != e.unsqueeze(2)).float()  # also drops the diagonal
    p = torch.sigmoid(logit)
    pair = -(harder * torch.log(p + PAIR_EPS) + (1 - harder) * torch.log(1 - p + PAIR_EPS))
    return (pair * valid).sum() / valid.sum().clamp_min(1.0)


class LossPredictor(nn.Module):
    """HPM's loss predictor: decoder-sized blocks on the decoder's input, LayerNorm, a pixel-sized head
    averaged to one predicted loss per patch. ``(N, 1 + L, D_dec) → (N, L)`` (CLS dropped), fp32."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, patch_dim: int):
        super().__init__()
        self.blocks = transformer_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(dim, patch_dim)
        self.apply(init_weights)  # the MAE's initialisation

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))[:, 1:].float().mean(dim=-1)


class HardPatchesMasker(Masker):
    """HPM's masking: hide the patches an EMA loss predictor expects to be hardest, plus random ones.

    Options (the authors' defaults): ``hard_max`` 0.5 (``--hpm-hard-max``), ``loss_weight`` 1
    (``--hpm-loss-weight``), EMA decay 0.999 → 0.9999 over 100 epochs (``--hpm-ema-decay``,
    ``--hpm-ema-decay-end``, ``--hpm-ema-ramp-epochs``; 0 epochs: the end value throughout).
    """

    mask_label = "HPM mask"
    score_label = "predicted loss"

    def __init__(self, model_config, epochs: int = 200, options: HpmOptions | None = None):
        super().__init__()
        c, o = model_config, (options or HpmOptions()).validate()
        self.predictor = LossPredictor(c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads, c.mlp_ratio,
                                       c.patch_dim)
        self.epochs, self.hard_max, self.loss_weight = epochs, o.hard_max, o.loss_weight
        self.ema_decay, self.ema_decay_end, self.ema_ramp_epochs = o.ema_decay, o.ema_decay_end, o.ema_ramp_epochs

    def attach(self, mae: nn.Module) -> None:
        self.ema_mae = encoder_copy(mae, with_decoder_input=True)
        self.ema_predictor = frozen_copy(self.predictor)

    # -- schedules ------------------------------------------------------------------------------

    def hard_share(self, progress: float) -> float:
        """α = α_max · (e + 1) / E: the share of the hidden patches chosen by predicted loss in epoch e."""
        e = min(int(progress), self.epochs - 1)
        return self.hard_max * (e + 1) / self.epochs

    def decay(self, progress: float) -> float:
        """The EMA decay in epoch e: linear from the start to the end value over ``ema_ramp_epochs``."""
        if self.ema_ramp_epochs <= 0:
            return self.ema_decay_end
        ramp = min(int(progress), self.ema_ramp_epochs) / self.ema_ramp_epochs
        return self.ema_decay + ramp * (self.ema_decay_end - self.ema_decay)

    def schedule(self, progress: float) -> dict[str, float]:
        return {"hpm_hard_share": self.hard_share(progress), "hpm_ema_decay": self.decay(progress)}

    # -- masks ----------------------------------------------------------------------------------

    def forward(self, decoder_tokens: torch.Tensor) -> torch.Tensor:
        """The online predictor's per-patch loss prediction ``(N, L)``."""
        return self.predictor(decoder_tokens)

    @torch.no_grad()
    def predicted_loss(self, imgs: torch.Tensor) -> torch.Tensor:
        """The EMA model's predicted loss ``(N, L)`` on the whole, unmasked image (the authors')."""
        ema = self.ema_mae
        latent = ema.encode_tokens(ema.embed(imgs))
        return self.ema_predictor(ema.decoder_tokens(latent)).float()

    def scores(self, batch: MaskingBatch) -> torch.Tensor:
        return self.predicted_loss(batch.imgs)

    def keep_indices(self, batch: MaskingBatch) -> torch.Tensor:
        noise = batch.global_rand(batch.num_patches)  # drawn every step: the stream does not depend on α
        num_hard = int(batch.num_hidden * self.hard_share(batch.progress))
        if num_hard > 0:
            hard = self.predicted_loss(batch.imgs).topk(num_hard, dim=1).indices
            noise = noise.scatter(1, hard, -1.0)  # below every draw: never kept
        return topk_keep_indices(noise, batch.num_keep)

    # -- training -------------------------------------------------------------------------------

    def mae_step_terms(self, batch: MaskingBatch, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The predictor's ranking loss on this step's hidden patches (target detached, input not)."""
        predicted = self(out["decoder_tokens"])
        error = per_patch_error(out["pred"], batch.mae.target(batch.imgs)).detach()
        terms = split_mean(lambda p, e, m: {"loss_hpm": relative_loss(p, e, m, batch.num_hidden)}, batch.loss_groups,
                           predicted, error, out["mask"])
        return {"loss_hpm": self.loss_weight * terms["loss_hpm"]}

    def after_optimizer_step(self, batch: MaskingBatch) -> None:
        decay = self.decay(batch.progress)
        ema_update(self.ema_mae, batch.mae, decay)
        ema_update(self.ema_predictor, self.predictor, decay)
