"""CL-MAE, the method in one file (Madan et al., "CL-MAE: Curriculum-Learned Masked Autoencoders", WACV 2024).

A small transformer, the *masking module*, reads the patch tokens and gives every patch a score in
(0, 1); the MAE keeps the ``K`` highest-scored patches visible (:meth:`LearnedMasker.keep_indices`).
After every MAE step the module takes a step of its own with the MAE frozen
(:meth:`LearnedMasker.own_step_terms`): the MAE reconstructs the images through a *soft* path in
which each patch counts by its score, and the module minimises

    λ · soft_reconstruction + λ_gauss · binarization + λ_kl · mask_ratio_kl + λ_div · diversity

where the curriculum factor λ moves from +1 (a partner: easy masks) to −1 (an adversary: hard
masks). Read top to bottom: the network, the four loss terms, the λ schedules, the soft path, the
masker. Its options (loss weights, schedule, cost knobs) are :class:`~clmae.maskers.options.ClmaeOptions`;
deviations from the authors' code are listed in docs/method.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from ..distributed import split_mean
from ..errors import ConfigError
from ..models.layers import init_weights, transformer_blocks
from ..models.mae import per_patch_error
from ..runtime import to_device
from .base import Masker, MaskingBatch
from .indices import mask_from_keep, topk_keep_indices
from .options import CURRICULA, ClmaeOptions

# The authors build the masking network with PyTorch's default LayerNorm (eps 1e-5), unlike the MAE
# (1e-6); the difference alone changes the masking module's gradients by about 0.9%.
MASKER_LAYER_NORM_EPS = 1e-5
GAUSS_SIGMA = 0.12  # width of the binarization loss's bump


# ---------------------------------------------------------------------------------------------
# The masking network


class MaskingModule(nn.Module):
    """A CLS token plus a few transformer blocks, one score per patch.

    Input: patch tokens with position embeddings ``(N, L, D_in)`` (the caller detaches them).
    Output: scores in (0, 1), ``(N, L)``, from LayerNorm → Linear → sigmoid on the CLS output, in fp32 also
    under autocast: bf16 logits (8 bits of mantissa) would tie patches that top-K must tell apart.
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
        with torch.autocast(x.device.type, enabled=False):
            return torch.sigmoid(self.head(self.head_norm(x[:, 0].float())))


# ---------------------------------------------------------------------------------------------
# The four loss terms: pure functions of scores s (N, L), high = keep visible; unweighted, in fp32


def soft_reconstruction_loss(error: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``Σ (1−s)·ℓ / Σ (1−s)``: the per-patch error ``ℓ`` ``(N, L)`` weighted by how hidden each patch is."""
    hidden = 1.0 - scores.float()
    return (hidden * error.float()).sum() / hidden.sum()


def binarization_loss(scores: torch.Tensor) -> torch.Tensor:
    """``σ√(2π) · mean exp(−(s − ½)² / 2σ²)``, σ = 0.12: a bump at ½ that pushes scores to 0 or 1.

    The authors divide the Gaussian by its normalising constant ``1/(σ√(2π))``, so the peak is 0.30;
    we keep their scale.
    """
    s = scores.float()
    bump = torch.exp(-((s - 0.5) ** 2) / (2 * GAUSS_SIGMA**2))
    return (GAUSS_SIGMA * math.sqrt(2 * math.pi)) * bump.mean()


def mask_ratio_kl_loss(scores: torch.Tensor, keep_ratio: float = 0.25, reduction: str = "sum") -> torch.Tensor:
    """``Σ_i [p_i log(p_i/k) + (1−p_i) log((1−p_i)/(1−k))]``: Bernoulli KL of each image's mean score
    ``p_i`` from the keep ratio ``k``; ``"sum"`` over the batch is the authors' (it grows with the batch)."""
    if not 0.0 < keep_ratio < 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1), got {keep_ratio}")
    p = scores.float().mean(dim=-1)
    kl = p * torch.log(p / keep_ratio) + (1 - p) * torch.log((1 - p) / (1 - keep_ratio))
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def diversity_loss(scores: torch.Tensor, scale: float = 0.1) -> torch.Tensor:
    """``mean_{i<j} exp(−scale·‖s_i − s_j‖₂)``: penalises images that get the same mask (0 for one image).

    Distances from the differences, not from ``|a|² + |b|² − 2ab``: that shortcut (cdist's default
    above 25 rows) rounds close pairs to distance 0 and drops the gradient this loss exists for.
    """
    n = scores.shape[0]
    if n < 2:
        return scores.sum() * 0.0
    s = scores.float().unsqueeze(0)
    dist = torch.cdist(s, s, compute_mode="donot_use_mm_for_euclid_dist").squeeze(0)  # (N, N)
    i, j = torch.triu_indices(n, n, offset=1, device=s.device)
    return torch.exp(-scale * dist[i, j]).mean()


def masker_loss_terms(error: torch.Tensor, scores: torch.Tensor, options: ClmaeOptions, mask_ratio: float,
                      shown: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weighted terms of the module's loss, all but λ (which multiplies ``loss_rec``). ``shown``: the
    scores the soft path ran at, which weight the reconstruction (default: ``scores``)."""
    o = options
    return {
        "loss_rec": soft_reconstruction_loss(error, scores if shown is None else shown),
        "loss_gauss": o.lambda_gauss * binarization_loss(scores),
        "loss_kl": o.lambda_kl * mask_ratio_kl_loss(scores, 1.0 - mask_ratio, o.kl_reduction),
        "loss_div": o.lambda_div * diversity_loss(scores),
    }


# ---------------------------------------------------------------------------------------------
# The curriculum factor λ: +1 = partner (easy masks), 0 = neutral, −1 = adversary (hard masks)

_CONSTANTS = {"partner": 1.0, "neutral": 0.0, "adversary": -1.0}


def curriculum_factor(epoch: float, epochs: int, schedule: str = "official", value: float = 1.0) -> float:
    """λ for ``epoch`` of ``epochs``.

    * ``official`` — the authors' per-epoch schedule: ``1 − 2e/E`` for ``e < E/2``, else
      ``1 − 2(e+1)/E``; for E=200 it goes 1.00, 0.99, …, 0.01, −0.01, …, −1.00 (never 0).
    * ``linear`` — per step (a fractional epoch ``e + step/steps_per_epoch``): ``1 − 2e/E``.
    * ``constant`` — ``value`` throughout; ``partner``/``neutral``/``adversary`` are +1/0/−1.
    """
    if epochs <= 0:
        raise ConfigError(f"epochs: must be positive, got {epochs}")
    if schedule == "official":
        e = int(epoch)
        return 1 - 2 * e / epochs if e < epochs / 2 else 1 - 2 * (e + 1) / epochs
    if schedule == "linear":
        return 1 - 2 * min(max(float(epoch), 0.0), float(epochs)) / epochs
    if schedule == "constant":
        return float(value)
    if schedule in _CONSTANTS:
        return _CONSTANTS[schedule]
    raise ConfigError(f"curriculum: unknown schedule {schedule!r}; choose one of {', '.join(CURRICULA)}")


# ---------------------------------------------------------------------------------------------
# The soft path: how the frozen MAE reconstructs an image whose patches count by their scores


def scaled_soft_forward(mae: nn.Module, imgs: torch.Tensor, scores: torch.Tensor,
                        tokens: torch.Tensor) -> torch.Tensor:
    """``--soft-path scale``, the authors': each patch token times its score, the encoder on all patches, the
    decoder on all of them without mask tokens. Returns the prediction ``(N, L, p·p·C)``.

    Pre-norm LayerNorm undoes most of the scaling, so a patch scored 0 still reaches every other
    patch through attention (docs/method.md): what this path rewards is not what the hard masks do.
    """
    latent = mae.encode_tokens(tokens * scores.unsqueeze(-1).to(tokens.dtype))
    return mae.decode(latent)


def hiding_soft_forward(mae: nn.Module, imgs: torch.Tensor, scores: torch.Tensor, tokens: torch.Tensor,
                        log_scores: torch.Tensor | None = None) -> torch.Tensor:
    """``--soft-path hide``: a score hides its patch as the MAE's hard masks do, continuously.

    Every encoder block attends with the additive key bias ``log s_j`` (the CLS key 0), so a patch of
    score 0 is attended by nobody, exactly a dropped token; the decoder's input for patch j is
    ``s_j·embed(enc_j) + (1 − s_j)·mask_token`` plus its position, as the hard path builds it. With
    binary scores the soft loss is the MAE's own loss on those masks (tests/test_mechanism.py).
    ``log_scores``: the key bias, when it is not ``log s`` (:func:`straight_through`).
    """
    n = scores.shape[0]
    # ≈ −69 for a score of 0: weight 1e-30, i.e. hidden
    wide = torch.promote_types(scores.dtype, torch.float32)  # fp32 at least (fp64 stays: the gradient tests)
    log_s = torch.log(scores.to(wide).clamp_min(1e-30)) if log_scores is None else log_scores.to(wide)
    bias = torch.cat([log_s.new_zeros(n, 1), log_s], dim=1)[:, None, None, :].to(tokens.dtype)
    cls = (mae.cls_token + mae.pos_embed[:, :1]).expand(n, -1, -1)
    x = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
    for blk in mae.blocks:
        x = blk(x, attn_mask=bias)
    y = mae.decoder_embed(mae.norm(x))
    s = scores.unsqueeze(-1).to(y.dtype)
    patches = s * y[:, 1:] + (1 - s) * mae.mask_token.to(y.dtype)
    return mae.decode_tokens(torch.cat([y[:, :1], patches], dim=1) + mae.decoder_pos_embed.to(y.dtype))


STRAIGHT_THROUGH_FLOOR = 1e-12  # a hidden key's weight in the straight-through path (log: −27.6)


def straight_through(scores: torch.Tensor, num_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``--soft-path hide_st``: the top-K mask forward, the soft scores' gradient backward.

    Returns ``(b + s − sg(s), log max(b, ε) + (s − sg(s)) / max(b, ε))``, ``b`` the binary top-K scores
    (exactly K ones, the mask the MAE trains on) and ``sg`` stop-gradient: the values are ``b`` and ``log b``,
    so the reconstruction term *is* the MAE's loss on its next mask; the derivatives w.r.t. ``s`` are 1 and
    ``1/max(b, ε)``, so a hidden key's gradient is the first-order effect of letting it in (the softmax's
    ``a_j·(v_j − out)`` over its weight ``a_j ∝ ε``, finite). Why: the plain ``hide`` relaxation lets an
    adversary score patches in between, which the MAE never sees (docs/method.md). Under fp16 autocast the
    weight ``ε`` underflows, and hidden keys get no gradient: use bf16 or fp32 with this path.
    """
    b = 1.0 - mask_from_keep(topk_keep_indices(scores.detach(), num_keep), scores.shape[1]).to(scores.dtype)
    delta = scores - scores.detach()
    floor = b.clamp_min(STRAIGHT_THROUGH_FLOOR)
    return b + delta, floor.log() + delta / floor


def straight_through_soft_forward(mae: nn.Module, imgs: torch.Tensor, scores: torch.Tensor, tokens: torch.Tensor,
                                  num_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``--soft-path hide_st``: :func:`hiding_soft_forward` at :func:`straight_through`'s scores; returns
    ``(prediction, the scores it ran at)`` (those weight the reconstruction term)."""
    shown, log_shown = straight_through(scores, num_keep)
    return hiding_soft_forward(mae, imgs, shown, tokens, log_shown), shown


SOFT_FORWARDS = {"scale": scaled_soft_forward, "hide": hiding_soft_forward, "hide_st": straight_through_soft_forward}


# ---------------------------------------------------------------------------------------------
# The masker


def loss_group_rows(local: int, fraction: float, groups: int, batch: MaskingBatch) -> torch.Tensor:
    """This rank's rows for a step on ``fraction`` of the batch (``--masker-batch-fraction``).

    The global batch is ``world_size × groups`` loss groups of equal size (a rank's per-device
    loss, or one of the groups by which one process reproduces N ranks); each keeps its own random
    ``fraction``, drawn group after group from the shared generator, so N ranks choose what one
    process with N groups chooses. One process, one group: a single ``randperm`` over the batch.
    """
    if local % groups:
        raise ConfigError(f"cannot split a batch of {local} into {groups} equal loss groups")
    size = local // groups
    keep = min(size, max(2, int(round(size * fraction))))
    dist = batch.dist
    perms = [torch.randperm(size, generator=batch.generator)[:keep] for _ in range(groups * dist.world_size)]
    mine = range(dist.rank * groups, (dist.rank + 1) * groups)
    return torch.cat([perms[t] + (t - mine.start) * size for t in mine])


class LearnedMasker(Masker):
    """CL-MAE's masking: keep the patches the masking module scores highest (deterministic top-k)."""

    mask_label = "learned mask"
    score_label = "scores"
    score_range = (0.0, 1.0)

    def __init__(self, num_patches: int, in_dim: int, dim: int | None = None, depth: int = 5, num_heads: int = 4,
                 options: ClmaeOptions | None = None, epochs: int = 30, mask_ratio: float = 0.75):
        super().__init__()
        self.network = MaskingModule(num_patches, in_dim, dim, depth, num_heads)
        self.options = (options or ClmaeOptions()).validate()
        self.epochs, self.mask_ratio = epochs, mask_ratio
        self.soft_forward: Callable[..., torch.Tensor] = SOFT_FORWARDS[self.options.soft_path]

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
        o = self.options
        return {"curriculum_factor": curriculum_factor(progress, self.epochs, o.curriculum, o.curriculum_value)}

    def own_step_due(self, iteration: int) -> bool:
        """Every ``--masker-every`` iterations (optimiser steps), from the first."""
        return iteration % self.options.masker_every == 0

    def own_step_terms(self, batch: MaskingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The module's loss on this step's images (a random ``--masker-batch-fraction`` of them).

        KL, diversity and the soft reconstruction ratio are per-device terms (the authors'), hence
        evaluated per group of ``batch.loss_groups`` rows.
        """
        if self.options.masker_batch_fraction < 1.0:
            rows = loss_group_rows(batch.size, self.options.masker_batch_fraction, batch.loss_groups, batch)
            batch = batch.rows(to_device(rows, batch.device))
        return self.objective(batch, self(batch.tokens))

    def loss_terms(self, batch: MaskingBatch, scores: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        """``(λ, the four terms with their graphs)`` of the scores ``(N, L)`` on ``batch``, what :meth:`objective`
        sums; apart so that each term's gradient can be measured (experiments/mechanism)."""
        lam = self.schedule(batch.progress)["curriculum_factor"]
        if self.options.soft_path == "hide_st":  # reconstruction at the top-K mask, regularisers on the scores
            pred, shown = self.soft_forward(batch.mae, batch.imgs, scores, batch.tokens, batch.num_keep)
        else:
            pred, shown = self.soft_forward(batch.mae, batch.imgs, scores, batch.tokens), scores
        error = per_patch_error(pred, batch.mae.target(batch.imgs))
        terms = split_mean(lambda e, s, v: masker_loss_terms(e, s, self.options, self.mask_ratio, v),
                           batch.loss_groups, error, scores, shown)
        return lam, terms

    def objective(self, batch: MaskingBatch, scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, terms to log)`` of the scores ``(N, L)`` on ``batch``: the four terms, λ on the reconstruction."""
        lam, terms = self.loss_terms(batch, scores)
        loss = lam * terms["loss_rec"] + terms["loss_gauss"] + terms["loss_kl"] + terms["loss_div"]
        s = scores.detach().float()
        logs = {**{k: v.detach().float() for k, v in terms.items()}, "score_mean": s.mean(),
                "score_low_frac": (s < 0.1).float().mean(), "score_high_frac": (s > 0.9).float().mean()}
        return loss, logs

    def compile(self, *args, **kwargs) -> None:
        """``--compile``: the scoring network and the soft path through the MAE."""
        super().compile(*args, **kwargs)
        self.soft_forward = torch.compile(self.soft_forward)
