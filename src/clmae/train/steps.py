"""The small mechanics of an iteration: grouping micro-batches, the optimiser update, non-finite bookkeeping, means.

Kept apart from :mod:`clmae.train.trainer` so the loop there reads as what it does, not how.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..distributed import DistContext, all_true
from ..errors import TrainingDiverged
from ..optim import set_lr


def micro_windows(batches: Iterable[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    """An epoch's micro-batches in groups of ``size`` (``--accum-iter``), one group per iteration; the last
    group of an epoch may be shorter, so an iteration never spans two epochs."""
    group: list[torch.Tensor] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def grad_norm(params: list[torch.nn.Parameter]) -> float:
    """The gradients' total L2 norm (nothing is clipped)."""
    return float(torch.nn.utils.clip_grad_norm_(params, float("inf")))


def apply_update(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """One optimiser update at ``lr``: set the rate, step, drop the gradients."""
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def all_finite(value: float, dist: DistContext) -> bool:
    """Whether ``value`` is finite on every rank (so all ranks skip the same steps)."""
    return all_true(math.isfinite(value), dist)


class StepWindow:
    """One part's micro-steps in an iteration: the values they logged and how many were backpropagated."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.backwards = 0
        self.last_ok = True

    def add(self, metrics: dict[str, float]) -> bool:
        """Record a micro-step's metrics; False when it was skipped (nothing backpropagated)."""
        self.last_ok = "skipped" not in metrics
        if self.last_ok:
            self.backwards += 1
            for k, v in metrics.items():
                self.values.setdefault(k, []).append(v)
        return self.last_ok

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.values.items() if v}


class MetricWindow(StepWindow):
    """Running values of each metric since the last :meth:`reset` (a log window, an epoch)."""

    def add(self, metrics: dict[str, float]) -> bool:
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(v)
        return True

    def reset(self) -> None:
        self.values = {}


class NonFinite:
    """Non-finite steps in a row; the run stops after ``limit`` of them (``--max-nonfinite``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0

    def record(self, what: str, value: float, position, logger, announce: bool = True) -> int:
        """Count a skipped step in the run's position, log it (``kind="skip"``) and warn; the count in a row."""
        self.in_a_row += 1
        position.skipped_steps += 1
        logger.log({"kind": "skip", "epoch": position.epoch, "step": position.iteration, "what": what, "value": value,
                    "in_a_row": self.in_a_row, "skipped_steps": position.skipped_steps}, step=position.iteration)
        if announce:
            tqdm.write(f"clmae: warning: non-finite {what} ({value}) at iteration {position.iteration}; step skipped "
                       f"({self.in_a_row} in a row)", file=sys.stderr)
        return self.in_a_row

    def reset(self) -> None:
        self.in_a_row = 0

    @property
    def diverged(self) -> bool:
        return self.in_a_row >= self.limit

    def error(self, what: str, value: Any, weights: Path) -> TrainingDiverged:
        return TrainingDiverged(f"{self.in_a_row} non-finite steps in a row (last: {what}={value}); the last good "
                                f"weights are in {weights}. Lower --base-lr or check the data, then --resume")
