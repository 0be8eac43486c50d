"""The small mechanics of an iteration: grouping micro-batches, metrics kept on the device, the conditional update,
non-finite bookkeeping.

Kept apart from :mod:`clmae.train.trainer` so the loop there reads as what it does, not how.

Nothing here reads a value from the device on its own. A step's losses and gradient norms stay tensors
(:class:`DeviceMetrics`, :class:`MeanWindow`); whether a step is finite is a device bool; the checks of an
iteration wait in :class:`Checks` until :meth:`Checks.flush` reads all of them at once. Where the optimiser can
skip its own update on the device (fused AdamW, which takes ``found_inf`` as ``torch.amp.GradScaler`` uses it:
the CUDA default) the trainer flushes only on log steps, epoch ends and checkpoints; elsewhere (foreach AdamW,
the CPU default, kept for bit-identical numbers) an update is decided on the host, one read per update.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..distributed import DistContext, all_reduce_min
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


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The gradients' total L2 norm as a device tensor (nothing is clipped, nothing is read)."""
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """Sums of logged values in float64 (what Python's floats did before), float32 where there is none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def agree(ok: torch.Tensor, dist: DistContext) -> torch.Tensor:
    """``ok`` on every rank (a device bool, all ranks then skip the same steps): one small all-reduce, no read."""
    return all_reduce_min(ok, dist)


def read_all(tensors: list[torch.Tensor]) -> list[float]:
    """Every value of ``tensors`` (0-dim each) on the host: one device→host read."""
    if not tensors:
        return []
    dtype = accumulation_dtype(tensors[0].device)
    return torch.stack([t.detach().reshape(()).to(dtype) for t in tensors]).tolist()


# ---------------------------------------------------------------------------------------------
# Metrics on the device


class DeviceMetrics(Mapping):
    """Named scalar metrics kept on the device as one vector, with which of them are there (a device bool
    vector; None: all); a ``Mapping[str, float]`` whose values are read (all at once, one read) only when
    first looked at.

    What a step or an iteration returns: ``"loss_mae" in step`` and ``step["loss_mae"]`` read it;
    :class:`MeanWindow` adds it up without reading. ``ok``: whether the step counted (a device bool).
    """

    def __init__(self, keys: tuple[str, ...], values: torch.Tensor | None, present: torch.Tensor | None = None,
                 ok: torch.Tensor | bool = True) -> None:
        self.keys_, self.values, self.present, self.ok = keys, values, present, ok
        self._read: dict[str, float] | None = None

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], ok: torch.Tensor | bool = True) -> DeviceMetrics:
        """0-dim tensors as one vector (one kernel), all of them there where ``ok``."""
        keys = tuple(tensors)
        if not keys:
            return cls((), None, None, ok)
        first = next(iter(tensors.values()))
        values = torch.stack([torch.as_tensor(t, device=first.device).detach().float() for t in tensors.values()])
        values = values.to(accumulation_dtype(values.device))
        present = None if not isinstance(ok, torch.Tensor) else ok.reshape(1).expand(len(keys))
        return cls(keys, values, present, ok)

    @classmethod
    def join(cls, parts: list[DeviceMetrics]) -> DeviceMetrics:
        """One vector of several parts' metrics (their keys must differ)."""
        parts = [m for m in parts if m.keys_]
        if not parts:
            return cls((), None)
        keys = tuple(k for m in parts for k in m.keys_)
        values = torch.cat([m.values for m in parts])
        if all(m.present is None for m in parts):
            return cls(keys, values)
        present = torch.cat([m.present if m.present is not None else
                             torch.ones(len(m.keys_), dtype=torch.bool, device=values.device) for m in parts])
        return cls(keys, values, present)

    def there(self) -> torch.Tensor | None:
        return self.present

    def read(self) -> dict[str, float]:
        """The metrics that are there, as floats (one device→host read, the first time)."""
        if self._read is None:
            if not self.keys_:
                self._read = {}
            elif self.present is None:
                self._read = dict(zip(self.keys_, self.values.tolist()))
            else:
                both = torch.cat([self.values, self.present.to(self.values.dtype)]).tolist()
                n = len(self.keys_)
                self._read = {k: v for k, v, p in zip(self.keys_, both[:n], both[n:]) if p > 0.5}
        return self._read

    def __getitem__(self, key: str) -> float:
        return self.read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.read())

    def __len__(self) -> int:
        return len(self.read())

    def __repr__(self) -> str:
        return f"DeviceMetrics({self.read()!r})"


def as_device_metrics(metrics: Mapping[str, float]) -> DeviceMetrics:
    """Plain float metrics (a caller's own) as :class:`DeviceMetrics` on the CPU."""
    if isinstance(metrics, DeviceMetrics):
        return metrics
    return DeviceMetrics.of({k: torch.tensor(float(v), dtype=torch.float64) for k, v in metrics.items()})


class MeanWindow:
    """Running means of metrics since the last :meth:`reset` (a log window, an epoch, an iteration's micro-steps),
    added up on the device: a metric counts where it is there. :meth:`means` reads them all with one read."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[tuple[str, ...], torch.Tensor] = {}  # per set of keys (iterations with an own step, ...)
        self.counts: dict[tuple[str, ...], torch.Tensor] = {}

    def add(self, metrics: Mapping[str, float]) -> None:
        m = as_device_metrics(metrics)
        if not m.keys_:
            return
        if m.present is None:
            value, count = m.values, torch.ones_like(m.values)
        else:
            value = torch.where(m.present, m.values, torch.zeros((), dtype=m.values.dtype, device=m.values.device))
            count = m.present.to(m.values.dtype)
        group = m.keys_
        if group in self.sums:
            self.sums[group] = self.sums[group] + value
            self.counts[group] = self.counts[group] + count
        else:
            self.sums[group], self.counts[group] = value, count

    def totals(self) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor] | None:
        """``(keys, sums, counts)`` for a window of one set of keys (an iteration's part), else None."""
        if len(self.sums) != 1:
            return None
        (group, sums), = self.sums.items()
        return group, sums, self.counts[group]

    def means(self) -> dict[str, float]:
        """Each metric's mean over the adds where it was there (one read for all)."""
        groups = list(self.sums)
        if not groups:
            return {}
        flat = torch.cat([t for g in groups for t in (self.sums[g], self.counts[g])]).tolist()
        totals: dict[str, list[float]] = {}
        at = 0
        for g in groups:
            n = len(g)
            for key, total, count in zip(g, flat[at:at + n], flat[at + n:at + 2 * n]):
                acc = totals.setdefault(key, [0.0, 0.0])
                acc[0] += total
                acc[1] += count
            at += 2 * n
        return {k: total / count for k, (total, count) in totals.items() if count > 0}


class PartWindow:
    """One part's micro-steps in an iteration (the MAE's, the strategy's own): their metrics added up on the
    device, and whether any and whether the last counted (device bools)."""

    def __init__(self) -> None:
        self.metrics = MeanWindow()
        self.any_ok: torch.Tensor | bool = False
        self.last_ok: torch.Tensor | bool = True
        self.steps = 0

    def add(self, step: DeviceMetrics) -> None:
        self.metrics.add(step)
        self.any_ok = step.ok if self.steps == 0 else (self.any_ok | step.ok)
        self.last_ok = step.ok
        self.steps += 1

    def means(self, present: torch.Tensor | None = None) -> DeviceMetrics:
        """The means of the micro-steps that counted, there where any counted (and ``present``)."""
        found = self.metrics.totals()
        if found is None:
            return DeviceMetrics((), None)
        keys, sums, counts = found
        there = counts > 0
        if present is not None:
            there = there & present
        return DeviceMetrics(keys, sums / counts, there)


# ---------------------------------------------------------------------------------------------
# Accumulating and applying gradients


@contextlib.contextmanager
def clean_accumulation(params: list[torch.nn.Parameter], ok: torch.Tensor, enabled: bool = True) -> Iterator[None]:
    """A micro-step's backward inside adds its gradients to those already accumulated only where ``ok``.

    Without a host read: the accumulated gradients are set aside during the backward, then the new
    ones are zeroed on the device where ``ok`` is false (a non-finite loss) and added. The sum is the
    one autograd would accumulate (the same additions, in the same order), so nothing changes for
    finite steps; a non-finite one leaves the window's earlier gradients clean.
    """
    if not enabled:
        yield
        return
    before = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        bad = ~ok
        for p, old in zip(params, before):
            new = p.grad
            if new is None:
                p.grad = old
                continue
            new.masked_fill_(bad, 0.0)
            p.grad = new if old is None else old.add_(new)


def skips_on_device(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether the optimiser can skip an update on the device (``found_inf``: fused AdamW, as GradScaler uses)."""
    return optimizer is None or bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def update_if(optimizer: torch.optim.Optimizer, lr: float, ok: torch.Tensor, decided: bool | None) -> None:
    """One optimiser update at ``lr`` where ``ok``, then the gradients dropped.

    ``decided``: the host's reading of ``ok``, or None to let the optimiser skip on the device
    (:func:`skips_on_device`): no read, the weights, moments and step count unchanged where not ``ok``.
    """
    set_lr(optimizer, lr)
    if decided is None:
        optimizer.found_inf = (~ok).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif decided:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Non-finite steps and overflows, read in batches


@dataclass
class Check:
    """One check of an iteration: ``what`` (``loss_mae``, ``grad_norm``, ``loss_masker``, ``overflow``) failed
    where ``bad``; ``value`` is what was checked. An overflow (fp16) is logged, never counted as non-finite."""

    what: str
    bad: torch.Tensor
    value: torch.Tensor
    epoch: int
    iteration: int
    part: str = "mae"

    @property
    def overflow(self) -> bool:
        return self.what == "overflow"


@dataclass
class Checks:
    """The non-finite checks (``--max-nonfinite``) and fp16 overflows of the run, read in batches.

    Checks, the end of each iteration (whether it ended well, which resets the count in a row) and
    counters (masking-module updates) are queued as device tensors in the order they happen; a
    :meth:`flush` reads them with one read and does what the old per-step code did at once: a
    ``kind="skip"`` record and a warning per failed check, the count of non-finite steps in a row, and
    ``diverge`` (save the last good weights, raise) when it reaches ``limit``.
    """

    limit: int
    position: Callable[[], Any]  # the run's clmae.train.run_folder.Position
    logger: Any  # clmae.io.records.MetricsLogger
    diverge: Callable[[Check, float], None]
    announce: bool = True
    in_a_row: int = 0
    pending: list[tuple[str, Any]] = field(default_factory=list)

    def check(self, what: str, bad: torch.Tensor, value: torch.Tensor, part: str = "mae") -> None:
        p = self.position()
        self.pending.append(("check", Check(what, bad, value.detach(), p.epoch, p.iteration, part)))

    def end_of_iteration(self, ended_well: torch.Tensor | bool) -> None:
        self.pending.append(("end", ended_well))

    def count_masker_updates(self, done: torch.Tensor | bool) -> None:
        """A masking-module update happened (a host bool: counted now) or happened where ``done`` (queued)."""
        if isinstance(done, torch.Tensor):
            self.pending.append(("masker_updates", done))
        else:
            self.position().masker_updates += int(done)

    def flush(self, extra: list[torch.Tensor] = ()) -> list[float]:
        """Read every queued check and ``extra`` (one read), act on the checks in order; ``extra``'s values."""
        pending, self.pending = self.pending, []
        tensors = [t for kind, item in pending for t in (self._tensors(kind, item))] + list(extra)
        values = iter(read_all(tensors))
        diverged = None
        for kind, item in pending:
            if kind == "check":
                bad, value = next(values) > 0.5, next(values)
                if bad and diverged is None:
                    diverged = self._failed(item, value)
            else:
                flag = next(values) if isinstance(item, torch.Tensor) else float(item)
                if kind == "end" and flag > 0.5 and diverged is None:
                    self.in_a_row = 0
                elif kind == "masker_updates":
                    self.position().masker_updates += int(round(flag))
        rest = list(values)
        if diverged is not None:
            self.diverge(*diverged)
        return rest

    @staticmethod
    def _tensors(kind: str, item: Any) -> list[torch.Tensor]:
        if kind == "check":
            return [item.bad, item.value]
        return [item] if isinstance(item, torch.Tensor) else []

    def _failed(self, check: Check, value: float) -> tuple[Check, float] | None:
        """Log a failed check; ``(check, value)`` when it makes the run diverge."""
        p = self.position()
        if check.overflow:  # fp16: the loss scale was too high for this step; the scaler lowers it
            self.logger.log({"kind": "skip", "epoch": check.epoch, "step": check.iteration, "what": "overflow",
                             "part": check.part}, step=check.iteration)
            return None
        self.in_a_row += 1
        p.skipped_steps += 1
        self.logger.log({"kind": "skip", "epoch": check.epoch, "step": check.iteration, "what": check.what,
                         "value": value, "in_a_row": self.in_a_row, "skipped_steps": p.skipped_steps},
                        step=check.iteration)
        if self.announce:
            tqdm.write(f"clmae: warning: non-finite {check.what} ({value}) at iteration {check.iteration}; step "
                       f"skipped ({self.in_a_row} in a row)", file=sys.stderr)
        return (check, value) if self.in_a_row >= self.limit else None

    def error(self, what: str, value: Any, weights: Path) -> TrainingDiverged:
        return TrainingDiverged(f"{self.in_a_row} non-finite steps in a row (last: {what}={value}); the last good "
                                f"weights are in {weights}. Lower --base-lr or check the data, then --resume")
