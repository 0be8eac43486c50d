"""CL-MAE's learned masking (Madan et al., "CL-MAE: Curriculum-Learned Masked Autoencoders", WACV 2024).

The masking module sees the patch tokens (with position embeddings, detached from the encoder) and
gives each patch a score in (0, 1); the MAE keeps the ``K`` highest-scored patches visible. The
module is trained by a step of its own after every MAE step (:meth:`LearnedMasker.own_step_terms`):
the MAE, frozen, encodes every patch token scaled by its score, and the module minimises
``λ·soft_reconstruction + λ_gauss·binarization + λ_kl·mask_ratio_kl + λ_div·diversity`` (the losses
of :mod:`clmae.losses`), where the curriculum factor λ goes from +1 (easy masks) to −1 (hard).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..curriculum import curriculum_factor
from ..distributed import split_mean
from ..errors import ConfigError
from ..losses import binarization_loss, diversity_loss, mask_ratio_kl_loss, soft_reconstruction_loss
from ..model import init_weights, transformer_blocks
from .base import Masker, MaskingBatch
from .indices import topk_keep_indices

# The authors build the masking network with PyTorch's default LayerNorm (eps 1e-5), unlike the MAE
# (1e-6); the difference alone changes the masking module's gradients by about 0.9%.
MASKER_LAYER_NORM_EPS = 1e-5


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
        # The authors' width equals the encoder's; a projection only exists when they differ.
        self.proj = nn.Identity() if dim == in_dim else nn.Linear(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = transformer_blocks(dim, depth, num_heads, mlp_ratio, eps=MASKER_LAYER_NORM_EPS)
        self.head_norm = nn.LayerNorm(dim, eps=MASKER_LAYER_NORM_EPS)
        self.head = nn.Linear(dim, num_patches)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_weights)  # the MAE's initialisation
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj(tokens)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return torch.sigmoid(self.head(self.head_norm(x[:, 0])).float())


@dataclass(frozen=True)
class CurriculumObjective:
    """The masking module's loss weights and λ schedule (the :class:`~clmae.config.PretrainConfig` fields)."""

    curriculum: str = "official"
    curriculum_value: float = 1.0
    epochs: int = 30
    lambda_gauss: float = 1.0
    lambda_kl: float = 0.1
    lambda_div: float = 2.0
    kl_reduction: str = "sum"
    mask_ratio: float = 0.75

    @classmethod
    def from_config(cls, cfg) -> CurriculumObjective:
        """The fields of a run configuration with these names (defaults for a missing configuration)."""
        if cfg is None:
            return cls()
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})


def masker_loss_terms(pred, target, scores, objective: CurriculumObjective) -> dict[str, torch.Tensor]:
    """The weighted terms of the masking module's loss (without λ on the reconstruction)."""
    o = objective
    return {
        "loss_rec": soft_reconstruction_loss(pred, target, scores),
        "loss_gauss": o.lambda_gauss * binarization_loss(scores),
        "loss_kl": o.lambda_kl * mask_ratio_kl_loss(scores, 1.0 - o.mask_ratio, o.kl_reduction),
        "loss_div": o.lambda_div * diversity_loss(scores),
    }


class LearnedMasker(Masker):
    """CL-MAE's masking: keep the patches the masking module scores highest (deterministic top-k)."""

    mask_label = "learned mask"
    score_label = "scores"
    score_range = (0.0, 1.0)

    def __init__(self, num_patches: int, in_dim: int, dim: int | None = None, depth: int = 5, num_heads: int = 4,
                 objective: CurriculumObjective | None = None):
        super().__init__()
        self.network = MaskingModule(num_patches, in_dim, dim, depth, num_heads)
        self.objective = objective or CurriculumObjective()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Soft scores ``(N, L)``; the tokens are detached so no gradient reaches the encoder."""
        return self.network(tokens.detach())

    def keep_indices(self, batch: MaskingBatch) -> torch.Tensor:
        with torch.no_grad():
            return topk_keep_indices(self(batch.tokens), batch.num_keep)

    def scores(self, batch: MaskingBatch) -> torch.Tensor:
        with torch.no_grad():
            return self(batch.tokens).float()

    def schedule(self, progress: float) -> dict[str, float]:
        """λ at a fractional epoch (per-epoch schedules use the epoch it falls in)."""
        o = self.objective
        return {"curriculum_factor": curriculum_factor(progress, o.epochs, o.curriculum, o.curriculum_value)}

    def own_step_terms(self, batch: MaskingBatch, forward_soft) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The masking-module step's loss: the MAE, frozen, sees every token scaled by its score.

        KL, diversity and the soft reconstruction ratio are per-device terms (the authors'), hence
        evaluated per group of ``batch.loss_groups`` rows.
        """
        lam = self.schedule(batch.progress)["curriculum_factor"]
        scores = self(batch.tokens)
        pred = forward_soft(batch.imgs, scores, batch.tokens)
        terms = split_mean(lambda p, t, s: masker_loss_terms(p, t, s, self.objective), batch.loss_groups,
                           pred, batch.mae.target(batch.imgs), scores)
        loss = lam * terms["loss_rec"] + terms["loss_gauss"] + terms["loss_kl"] + terms["loss_div"]
        s = scores.detach().float()
        logs = {**{k: v.detach().float() for k, v in terms.items()}, "score_mean": s.mean(),
                "score_low_frac": (s < 0.1).float().mean(), "score_high_frac": (s > 0.9).float().mean()}
        return loss, logs
