"""The interface every masking strategy implements, and what a strategy may look at in a step.

A strategy is a :class:`Masker` (an ``nn.Module``, so its state travels with checkpoints) with one
required hook and a few optional ones, each a no-op by default:

* :meth:`Masker.keep_indices` — which patches each image keeps visible (required);
* :meth:`Masker.attach` — once the autoencoder's starting weights are in place (EMA copies);
* :meth:`Masker.mae_step_terms` — extra loss terms added to the MAE step's loss (HPM's predictor);
* :meth:`Masker.own_step_terms` — the loss of a step of its own on its parameters (CL-MAE), in the
  iterations :meth:`Masker.own_step_due` says;
* :meth:`Masker.after_optimizer_step` — after each MAE optimiser step (EMA updates);
* :meth:`Masker.token_gates` — value-neutral gates on the MAE's tokens, through which the reconstruction
  loss reaches the strategy's parameters (straight-through; AutoMAE's mask generator);
* :meth:`Masker.scores` — a per-patch map for pictures; :meth:`Masker.schedule` — values to log;
  :meth:`Masker.mask_stats` — values describing the masks just drawn, to log.

The trainer does the generic work around the hooks (autocast, freezing, gradient accumulation,
gradient averaging over ranks, skipping non-finite steps, the optimiser of the masker's trainable
parameters) and hands every hook a :class:`MaskingBatch`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..distributed import SINGLE, DistContext, average_over_ranks
from ..runtime import to_device


@dataclass
class MaskingBatch:
    """What a strategy may look at in one step.

    ``generator`` is shared: the same on every rank, so draw for the *global* batch
    (:meth:`global_rand`) and take this rank's rows; then N ranks choose exactly the masks one
    process with the whole batch would. ``mae`` is the online autoencoder, to read and never to
    train here; ``progress`` is the fractional epoch of this step (``epoch + step / steps``).
    Losses that depend on the batch as a whole (normalised by a count, a batch statistic) should
    be evaluated per group of rows with :func:`clmae.distributed.split_mean` over ``loss_groups``
    groups: DDP averages per-rank losses, and ``loss_groups`` lets one process do the same.
    """

    imgs: torch.Tensor  # (N, C, H, W) this rank's images, normalised
    tokens: torch.Tensor  # (N, L, D) = mae.embed(imgs), without gradient
    num_keep: int  # K visible patches per image
    generator: torch.Generator | None = None
    mae: nn.Module | None = None
    progress: float = 0.0
    epochs: int = 1
    dist: DistContext = field(default_factory=lambda: SINGLE)
    loss_groups: int = 1

    @property
    def size(self) -> int:
        """N, this rank's images."""
        return self.tokens.shape[0]

    @property
    def num_patches(self) -> int:
        """L, patches per image."""
        return self.tokens.shape[1]

    @property
    def num_hidden(self) -> int:
        return self.num_patches - self.num_keep

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def global_rand(self, *shape: int) -> torch.Tensor:
        """Uniform numbers in [0, 1) of shape ``(world · N, *shape)`` drawn once; this rank's ``(N, *shape)``."""
        n = self.size
        full = torch.rand(n * self.dist.world_size, *shape, generator=self.generator)
        return to_device(full[self.dist.rows(n)], self.device)

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over all ranks (itself for one process): keeps state the same everywhere."""
        return average_over_ranks(value, self.dist)

    def rows(self, index: torch.Tensor) -> MaskingBatch:
        """The same step restricted to some of this rank's images (``index`` into the batch)."""
        return dataclasses.replace(self, imgs=self.imgs.index_select(0, index),
                                   tokens=self.tokens.index_select(0, index))


class Masker(nn.Module):
    """A masking strategy. Subclasses implement :meth:`keep_indices`; the other hooks are optional.

    Trainable parameters (``requires_grad``) get an optimiser of their own with the MAE's learning
    rate schedule and weight decay; they are trained either by the terms of :meth:`mae_step_terms`
    (backpropagated with the MAE's loss) or by :meth:`own_step_terms` (a separate step with the MAE
    frozen), never both. Frozen parameters and buffers (EMA copies) are state: saved in checkpoints
    and restored on resume whenever ``state_dict()`` is not empty.
    """

    #: Masks are uniformly random whatever the image (plain MAE): nothing image-specific to probe or draw.
    uniform: bool = False
    #: How pictures name this strategy's masks and its score map (:meth:`scores`).
    mask_label: str = "mask"
    score_label: str | None = None
    #: Fixed colour scale of the scores (CL-MAE's are in (0, 1)); None: each image's own range.
    score_range: tuple[float, float] | None = None
    #: :meth:`keep_indices` chooses how many patches stay visible (SBAM's adaptive ratio): ``K'`` per batch,
    #: the same in every row and on every rank, not necessarily ``batch.num_keep``. Everything downstream
    #: (the MAE's forward, the probe's and the pictures' random baselines) follows the width it returns.
    adaptive_count: bool = False

    # -- required -----------------------------------------------------------------------------

    def keep_indices(self, batch: MaskingBatch) -> torch.Tensor:
        """Indices ``(N, K)`` of the patches each image keeps visible: K distinct values in ``[0, L)`` per row.

        Called under ``no_grad`` (and the run's autocast) before the MAE step, in train mode. ``K`` is
        ``batch.num_keep`` unless the strategy sets :attr:`adaptive_count`.
        """
        raise NotImplementedError

    # -- optional -----------------------------------------------------------------------------

    def attach(self, mae: nn.Module) -> None:
        """Called once the autoencoder's starting weights are in place (after initialisation or
        ``--init-from``, before a resume restores this masker's state): take EMA copies here."""

    def scores(self, batch: MaskingBatch) -> torch.Tensor | None:
        """A per-patch map ``(N, L)`` that explains the masks (for pictures), or None.

        Called just before :meth:`keep_indices` with the same generator (:func:`strategy_masks`): a
        strategy whose map is drawn at random restores the generator, so the map explains the masks.
        """
        return None

    def token_gates(self, batch: MaskingBatch, ids_keep: torch.Tensor) -> torch.Tensor | None:
        """Gates ``(N, L)`` for the MAE's patch tokens in this step, or None (the default: no gates).

        Called with gradients enabled (and the run's autocast) after :meth:`keep_indices`, before the MAE's
        forward, which applies them value-neutrally (:meth:`~clmae.models.mae.MaskedAutoencoderViT.forward`):
        the tokens, the loss and the MAE's gradients are unchanged, and the gradient of the loss reaches
        the gates as ``⟨x_i, ∂loss/∂x_i⟩`` for each kept token ``x_i`` (0 for hidden ones). A strategy
        trained in the MAE step learns from the reconstruction loss through them (straight-through).
        """
        return None

    def schedule(self, progress: float) -> dict[str, float]:
        """Values of the strategy's schedules at a fractional epoch, logged with the metrics."""
        return {}

    def mask_stats(self) -> dict[str, float]:
        """Values describing the training masks drawn since the last call (not losses; SBAM's ratio), logged
        with the iteration's metrics; called once per iteration. Must be the same on every rank."""
        return {}

    def mae_step_terms(self, batch: MaskingBatch, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extra loss terms for the MAE step, each added to the reconstruction loss and logged.

        ``out`` is the autoencoder's forward output: ``loss``, ``pred`` ``(N, L, P)``, ``mask``
        ``(N, L)`` (1 = hidden) and ``decoder_tokens`` ``(N, 1 + L, D_dec)`` (the decoder's input).
        """
        return {}

    def own_step_terms(self, batch: MaskingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, terms to log)`` of a step of this strategy's own, after the MAE step, on its parameters.

        Called with the MAE frozen (no weight gradients) and ``batch.tokens`` embedded by the MAE as the
        MAE step left it. Only strategies that override this have such a step.
        """
        raise NotImplementedError

    def own_step_due(self, iteration: int) -> bool:
        """Whether the own step runs in this iteration (0-based optimiser steps); every iteration by default."""
        return True

    def after_optimizer_step(self, batch: MaskingBatch) -> None:
        """After each optimiser step of the MAE (once per accumulation window): EMA updates."""

    # -- derived ------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def learnable(self) -> bool:
        """True when the strategy has parameters to train (and the run an optimiser for them)."""
        return bool(self.trainable_parameters())

    @property
    def has_own_step(self) -> bool:
        return type(self).own_step_terms is not Masker.own_step_terms

    @property
    def trains_in_mae_step(self) -> bool:
        return self.learnable and not self.has_own_step

    @property
    def has_state(self) -> bool:
        """Whether checkpoints must carry this masker (weights, EMA copies, buffers)."""
        return len(self.state_dict()) > 0


@torch.no_grad()
def strategy_masks(mae, masker, x: torch.Tensor, num_keep: int, generator: torch.Generator, progress: float,
                   epochs: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A strategy's scores (or None) and kept indices on the normalised images ``x``, at a point of its run.

    ``scores`` first, then ``keep_indices`` with the same generator (see :meth:`Masker.scores`).
    """
    batch = MaskingBatch(x, mae.embed(x), num_keep, generator, mae, progress, epochs)
    scores = masker.scores(batch)
    return (None if scores is None else scores.float()), masker.keep_indices(batch)
