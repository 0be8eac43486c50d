"""AutoMAE (Chen, Zhang, Wang, Yang, "Improving Masked Autoencoders by Learning Where to Mask", PRCV 2023): a
mask generator trained end to end through Gumbel-softmax, shaped by a discriminator's object-centric prior.

* **Generator.** A two-layer CNN reads the per-head CLS attention of an encoder (the scorer) on the
  patch grid and gives log-probabilities ``ℓ`` over the patches. Each step samples ``K`` patches
  without replacement (Gumbel-top-k on ``ℓ + γ``, ``K`` = the visible count, as the authors) and
  pushes them towards hidden: the mask keeps the ``K`` smallest ``z = u + β·b`` (``u`` uniform, ``b``
  the selection's indicator, ``β`` = ``--automae-mask-factor`` 0.5); at 75% nearly every selected
  patch is hidden and the rest of the mask is random.
* **Reconstruction path.** ``b`` enters as ``b + p − sg(p)`` (straight-through, ``p`` the soft
  Gumbel sample) and ``z`` gates the MAE's tokens value-neutrally (:meth:`Masker.token_gates`), so the
  MAE loss trains the generator in the MAE's own backward, as in the authors' code. Only kept tokens
  pass gradient, and the generator descends the loss by raising the probability of the kept tokens
  the reconstruction leans on, which are then selected, hence hidden, in later steps: the masks move
  towards a *higher* reconstruction loss (tests/test_new_strategies.py measures it).
* **Adversarial prior.** A small spectral-norm CNN (the discriminator) learns to tell the soft
  samples from "real" maps: a random rectangle of height 0.5 plus uniform noise, softmaxed over the
  grid (least-squares GAN). The generator's term ``0.2·(D(p) − 1)²`` and the discriminator's loss are
  both trained in the MAE step by the strategy's optimiser (the discriminator without weight decay,
  as its Adam upstream).

The scorer is, by default, an EMA of the encoder (AttMask's cosine momentum): the authors read a
frozen pretrained MAE, which ``--automae-scorer init`` with ``--init-from`` reproduces. The
generator, the discriminator (with its spectral-norm vectors) and the scorer copy are state, saved
in checkpoints. Deviations from the authors' code are listed in docs/masking-strategies.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

from ..errors import ConfigError
from ..models.mae import per_patch_error
from ..runtime import frozen
from .attmask import cls_attention
from .base import Masker, MaskingBatch
from .ema import cosine_momentum, ema_update, encoder_copy
from .indices import topk_keep_indices
from .options import AutomaeOptions

UPSTREAM_GRID = 14  # the authors' prior is sized for ViT-B/16 at 224 px: rectangles 4…10 patches wide, 40…160 in area
UPSTREAM_WIDTH = 4
UPSTREAM_AREA = (40, 160)
MIN_GRID = 4  # the discriminator's two stride-2 convolutions need at least a 4x4 grid
MAP_EPS = 1e-8  # standardising a constant attention map gives zeros, not NaN
GUMBEL_TINY = 1e-20  # uniform draws are clamped above 0 before -log(-log(u))


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniform draws in [0, 1): ``−log(−log u)``."""
    return -torch.log(-torch.log(u.clamp_min(GUMBEL_TINY)))


def prior_ranges(grid: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((min width, max width), (min area, max area))`` of the prior's rectangles on a ``grid × grid`` grid:
    the authors' 4…10 and 40…160 on 14×14, scaled to the grid (at least 1 patch)."""
    margin = round(UPSTREAM_WIDTH * grid / UPSTREAM_GRID)
    width = (max(1, margin), max(max(1, margin), grid - margin))
    scale = grid * grid / UPSTREAM_GRID**2
    low = max(1, round(UPSTREAM_AREA[0] * scale))
    return width, (low, max(low, min(grid * grid, round(UPSTREAM_AREA[1] * scale))))


def gumbel_top_k(logits: torch.Tensor, noise: torch.Tensor, k: int) -> torch.Tensor:
    """Indicator ``(N, L)`` of the ``k`` largest ``ℓ + γ``: ``k`` patches drawn without replacement from
    ``softmax(ℓ)`` (the Gumbel-top-k trick; the temperature does not change the order)."""
    return torch.zeros_like(logits).scatter_(1, torch.topk(logits + noise, k, dim=1).indices, 1.0)


def rectangles(u: torch.Tensor, grid: int, width: tuple[int, int], area: tuple[int, int]) -> torch.Tensor:
    """One random rectangle per row of ``u`` ``(N, 4)`` (uniform draws), as a flat indicator ``(N, g·g)``.

    Width uniform in ``width``, area uniform in ``area``, height ``min(g, ⌈area / width⌉)``, position
    uniform on the grid (the authors' prior, drawn from given numbers instead of Python's ``random``).
    """
    (w_lo, w_hi), (a_lo, a_hi) = width, area
    w = (w_lo + (u[:, 0] * (w_hi - w_lo + 1)).long()).clamp_max(w_hi)
    a = (a_lo + (u[:, 1] * (a_hi - a_lo + 1)).long()).clamp_max(a_hi)
    h = torch.div(a + w - 1, w, rounding_mode="floor").clamp_max(grid)
    top = (u[:, 2] * (grid - h + 1)).long()
    left = (u[:, 3] * (grid - w + 1)).long()
    steps = torch.arange(grid, device=u.device)
    rows = (steps >= top[:, None]) & (steps < (top + h)[:, None])
    cols = (steps >= left[:, None]) & (steps < (left + w)[:, None])
    return (rows[:, :, None] & cols[:, None, :]).flatten(1)


class MaskGenerator(nn.Module):
    """The authors' scorer head: Conv 3×3 (H → H/2), ReLU, Conv 3×3 (→ 1) on the per-head attention maps
    ``(N, H, g, g)``; log-softmax over the patches ``(N, L)``, in fp32. PyTorch's default initialisation."""

    def __init__(self, heads: int):
        super().__init__()
        hidden = max(1, heads // 2)
        self.net = nn.Sequential(nn.Conv2d(heads, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, 1, 3, padding=1))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        with torch.autocast(maps.device.type, enabled=False):
            return torch.log_softmax(self.net(maps.float()).flatten(1), dim=1)


class Discriminator(nn.Module):
    """The authors' discriminator: spectral-norm convolutions without biases, 4×4/2 (1 → 16), LeakyReLU 0.2,
    4×4/2 (16 → 32), LeakyReLU, 3×3 (32 → 1); one raw score per map ``(N,)``, fp32.

    On 14×14 the last convolution leaves one position, as upstream; on grids where fewer than 3×3
    positions remain it is padded, and the positions left are averaged.
    """

    def __init__(self, grid: int):
        super().__init__()
        side = (grid - 2) // 2 + 1
        side = (side - 2) // 2 + 1
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(1, 16, 4, stride=2, padding=1, bias=False)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(16, 32, 4, stride=2, padding=1, bias=False)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(32, 1, 3, padding=0 if side >= 3 else 1, bias=False)),
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        with torch.autocast(maps.device.type, enabled=False):
            return self.net(maps.float()).flatten(1).mean(dim=1)


def lsgan(scores: torch.Tensor, target: float) -> torch.Tensor:
    """The least-squares GAN loss: ``mean((D(x) − target)²)``."""
    return (scores - target).pow(2).mean()


@dataclass
class Draw:
    """One step's draws, from :meth:`AutomaeMasker.keep_indices` to the hooks after it."""

    imgs: torch.Tensor  # the batch they belong to
    maps: torch.Tensor  # (N, H, g, g) the scorer's attention
    gumbel: torch.Tensor  # (N, L)
    uniform: torch.Tensor  # (N, L)
    selected: torch.Tensor  # (N, L) 1 where the generator selected the patch
    soft: torch.Tensor | None = None  # (N, L) the soft Gumbel sample, with gradient (token_gates)


class AutomaeMasker(Masker):
    """AutoMAE's masking: a learned generator selects K patches that are (almost surely) hidden; the rest random.

    Options (``--automae-*``, the authors' defaults): ``mask_factor`` 0.5, ``adv_weight`` 0.2, ``tau``
    1, ``rect_value`` 0.5; ``scorer`` ema (``init``: a frozen copy of the
    starting weights; ``online``: the MAE itself) with ``scorer_momentum`` 0.996 rising to 1.
    """

    mask_label = "AutoMAE mask"
    score_label = "generator prob."

    def __init__(self, model_config, epochs: int = 100, options: AutomaeOptions | None = None):
        super().__init__()
        o = (options or AutomaeOptions()).validate()
        grid = model_config.grid_size
        if grid < MIN_GRID:
            raise ConfigError(f"--method automae: a {grid}x{grid} patch grid is too small for the discriminator "
                              f"(at least {MIN_GRID}x{MIN_GRID}); use a smaller --patch-size")
        self.grid, self.epochs = grid, epochs
        self.mask_factor, self.adv_weight, self.tau = o.mask_factor, o.adv_weight, o.tau
        self.objective, self.rec_weight = o.objective, o.rec_weight
        self.scorer_kind, self.scorer_momentum, self.rect_value = o.scorer, o.scorer_momentum, o.rect_value
        self.rect_width, self.rect_area = prior_ranges(grid)
        self.mask_generator = MaskGenerator(model_config.num_heads)
        self.discriminator = Discriminator(grid)
        self._draw: Draw | None = None

    def attach(self, mae: nn.Module) -> None:
        if self.scorer_kind != "online":
            self.scorer = encoder_copy(mae)  # "ema" follows the MAE after each step; "init" stays as it starts

    def no_weight_decay(self) -> set[str]:
        """The discriminator's parameters: trained without weight decay (its Adam upstream)."""
        return {n for n, _ in self.named_parameters() if n.startswith("discriminator.")}

    # -- schedules ------------------------------------------------------------------------------

    def momentum_at(self, progress: float) -> float:
        return cosine_momentum(self.scorer_momentum, progress, self.epochs)

    def schedule(self, progress: float) -> dict[str, float]:
        return {"automae_scorer_momentum": self.momentum_at(progress)} if self.scorer_kind == "ema" else {}

    # -- masks ----------------------------------------------------------------------------------

    def attention_maps(self, batch: MaskingBatch) -> torch.Tensor:
        """The scorer's per-head CLS attention on the patch grid, standardised per image and head, ``(N, H, g, g)``
        fp32 (raw attention is ≈ 1/L: the generator's convolutions would see little but their biases)."""
        scorer = batch.mae if self.scorer_kind == "online" else self.scorer
        att = cls_attention(scorer, batch.imgs, per_head=True)
        att = (att - att.mean(dim=2, keepdim=True)) / att.std(dim=2, keepdim=True).clamp_min(MAP_EPS)
        return att.view(att.shape[0], att.shape[1], self.grid, self.grid)

    def scores(self, batch: MaskingBatch) -> torch.Tensor:
        """The generator's probabilities ``softmax(ℓ)`` per patch (deterministic: no draws)."""
        with torch.no_grad():
            return self.mask_generator(self.attention_maps(batch)).exp()

    def keep_indices(self, batch: MaskingBatch) -> torch.Tensor:
        maps = self.attention_maps(batch)
        logits = self.mask_generator(maps)
        length, k = batch.num_patches, batch.num_keep
        noise = gumbel(batch.global_rand(length))
        uniform = batch.global_rand(length)
        selected = gumbel_top_k(logits, noise, k)
        self._draw = Draw(batch.imgs, maps, noise, uniform, selected)
        return topk_keep_indices(-(uniform + self.mask_factor * selected), k)  # keep the K smallest z

    def _current(self, batch: MaskingBatch) -> Draw:
        d = self._draw
        if d is None or d.imgs is not batch.imgs:
            raise RuntimeError("AutomaeMasker: token_gates and mae_step_terms need the keep_indices of the same batch")
        return d

    def soft_sample(self, d: Draw) -> torch.Tensor:
        """The step's soft Gumbel sample ``p = softmax((ℓ + γ)/τ)``, with gradient (computed once per step)."""
        if d.soft is None:
            d.soft = torch.softmax((self.mask_generator(d.maps) + d.gumbel) / self.tau, dim=1)
        return d.soft

    def token_gates(self, batch: MaskingBatch, ids_keep: torch.Tensor) -> torch.Tensor | None:
        """``z = u + β·(b + p − sg(p))``: the ranking that chose the mask, with the soft sample's gradient
        (the official objective; None for the adversarial one, which reads the MAE's errors instead)."""
        if self.objective != "official":
            return None
        d = self._current(batch)
        soft = self.soft_sample(d)
        return d.uniform + self.mask_factor * (d.selected + soft - soft.detach())

    # -- training -------------------------------------------------------------------------------

    def prior(self, batch: MaskingBatch) -> torch.Tensor:
        """The discriminator's "real" maps ``(N, 1, g, g)``: a random rectangle of height ``rect_value`` plus
        uniform noise, softmaxed over the grid (the authors' object-centric prior), from the shared generator."""
        g = self.grid
        inside = rectangles(batch.global_rand(4), g, self.rect_width, self.rect_area).float()
        value = self.rect_value * inside + batch.global_rand(g * g)
        return torch.softmax(value, dim=1).view(-1, 1, g, g)

    def mae_step_terms(self, batch: MaskingBatch, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The generator's adversarial term (discriminator frozen) and the discriminator's loss (LSGAN) on a
        fresh soft sample, against the rectangle prior. Neither reaches the MAE's weights."""
        d = self._current(batch)
        soft = self.soft_sample(d)
        terms = {} if self.objective == "official" else {"loss_automae_rec": -self.rec_weight * self.error_gain(
            batch, out, soft)}
        shape = (-1, 1, self.grid, self.grid)
        with torch.no_grad():  # the discriminator's "fake": its own sample, as upstream
            fake = torch.softmax((self.mask_generator(d.maps) + gumbel(batch.global_rand(self.grid**2))) / self.tau,
                                 dim=1)
        real = self.prior(batch)
        loss_d = lsgan(self.discriminator(real), 1.0) + lsgan(self.discriminator(fake.view(shape)), 0.0)
        with frozen(self.discriminator):
            loss_g = lsgan(self.discriminator(soft.view(shape)), 1.0)
        self._draw = None  # used: a later call without keep_indices is an error, not a stale batch
        return {**terms, "loss_automae_g": self.adv_weight * loss_g, "loss_automae_d": loss_d}

    def error_gain(self, batch: MaskingBatch, out: dict[str, torch.Tensor], soft: torch.Tensor) -> torch.Tensor:
        """The adversarial objective's gain, to ascend: over the hidden patches, the soft sample's weighted mean of
        the reconstruction error relative to the plain mean (each image's own scale), minus 1, averaged over
        images. Its gradient moves probability onto the hidden patches that reconstruct worse than the
        others, so later masks select, hence hide, such patches. The errors are detached (no MAE gradient)."""
        hidden = out["mask"]
        error = per_patch_error(out["pred"], batch.mae.target(batch.imgs)).detach() * hidden
        relative = error / (error.sum(1, keepdim=True) / hidden.sum(1, keepdim=True)).clamp_min(1e-12)
        weight = soft.float() * hidden
        return ((weight * relative).sum(1) / weight.sum(1).clamp_min(1e-12) - 1.0).mean()

    def after_optimizer_step(self, batch: MaskingBatch) -> None:
        if self.scorer_kind == "ema":
            ema_update(self.scorer, batch.mae, self.momentum_at(batch.progress))
