"""The pretraining loop: read :meth:`Trainer.fit` for the whole run and :meth:`Trainer.train_step` for one iteration.

An iteration is one optimiser step. It loops over its micro-batches (``--accum-iter``, nanoGPT's
shape): for each, the MAE step with the masking strategy's masks (:meth:`Trainer.mae_step`) and, when
the strategy has one, the strategy's own step (:meth:`Trainer.strategy_step`, CL-MAE's masking
module); after the last, each part's optimiser update (:func:`~clmae.train.steps.update_if`).
Every strategy (``--method``, :mod:`clmae.maskers`) runs through the same loop and the same hooks;
plain MAE is the loop with a random masker and nothing else. The trainer knows no method by name.

Two optimisers, one per part (the MAE; the strategy's trainable parameters), share the schedule,
so the part that is frozen in a step is never touched by weight decay or momentum. In a strategy's
own step the MAE's parameters get no gradient at all (``backward(inputs=...)``).

An iteration waits for the device at most once per optimiser update and, with fused AdamW (the CUDA
default), not at all: losses, gradient norms and checks stay on the device and are read on log steps,
epoch ends and checkpoints (:mod:`clmae.train.steps`; tests/test_syncs.py counts the reads). The run
computes in ``--precision`` (bf16 or fp16 autocast; fp16 with a loss scaler per optimiser).

Launched by ``torchrun`` the same loop is data-parallel (:mod:`clmae.distributed`): the MAE is
DDP-wrapped, the strategy's gradients are averaged once per iteration, ``batch_size`` is per rank,
and only rank 0 writes. The parts are built in :mod:`clmae.train.build`; the run folder, resume rules
and checkpoint payload are in :mod:`clmae.train.run_folder`.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import PretrainConfig, make_config
from ..data.loader import report_skipped_files
from ..distributed import any_true, average_gradients, barrier, broadcast_object, mean_metrics, no_sync, teardown
from ..io.checkpoint import LAST, checkpoint_pair_complete
from ..io.records import MetricsLogger
from ..maskers import MaskingBatch
from ..optim import lr_at
from ..runtime import autocast, frozen
from .build import (
    build_callbacks,
    build_config,
    build_data,
    build_forward,
    build_models,
    build_optimizers,
    build_precision,
    build_run_state,
    build_runtime,
    build_scalers,
)
from .callbacks import Callback, RunView
from .console import Console, summary_lines
from .run_folder import Position, discard_unsaved, resume_position, run_info, save_run_checkpoint, write_config_json
from .signals import GracefulStop
from .steps import (
    Check,
    Checks,
    DeviceMetrics,
    MeanWindow,
    PartWindow,
    agree,
    clean_accumulation,
    grad_norm,
    micro_windows,
    skips_on_device,
    update_if,
)

STOP_CHECK_EVERY = 50  # under DDP, ranks agree on a stop request every this many iterations at most (and each epoch)


@dataclass
class RunResult:
    """What a finished run produced."""

    output_dir: Path
    checkpoint: Path
    weights: Path
    metrics: Path
    epochs_done: int
    final: dict[str, float] = field(default_factory=dict)
    epochs: int = 0  # epochs the run was asked for
    elapsed_s: float = 0.0  # wall-clock of this call to fit
    images_per_s: float = 0.0
    stopped_by: str | None = None  # "SIGINT", "SIGTERM" or "request_stop" when stopped before the end
    exit_code: int = 0  # for the command: 128 + the signal's number after a signal (130, 143), else 0

    def summary(self) -> str:
        return "\n".join(summary_lines(self))


def _discard_folder_on_failure(method):
    """Set-up or training that fails before anything is saved removes the run folder it created."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            folder = getattr(self, "output_folder", None)
            if folder is not None and self.dist.is_main:
                discard_unsaved(folder)
            raise

    return wrapper


class Trainer:
    """Assembles the parts of a run from a :class:`PretrainConfig` (:mod:`clmae.train.build`) and trains."""

    @_discard_folder_on_failure
    def __init__(self, config: PretrainConfig, overrides: dict[str, Any] | None = None):
        self.cfg, self.resume_path, note = build_config(config, overrides)
        self.dist, self.device = build_runtime(self.cfg)
        precision = build_precision(self.cfg, self.device)  # an fp16 this device cannot run: refused here
        data = build_data(self.cfg, self.dist, self.device)  # checked before the run folder exists
        self.dataset, self.data_scan, self.model_choice = data.dataset, data.scan, data.model_choice
        self.model_config, self.batches = data.model_config, data.batches
        self.run, self.output_folder = build_run_state(self.cfg, data, self.resume_path is not None, self.dist)
        if (note or self.output_folder.note) and self.dist.is_main:
            print(f"clmae: note: {note or self.output_folder.note}", file=sys.stderr)
        self.mae, self.masker = build_models(self.cfg, self.model_config, self.device, self.dist)
        # Masks, sub-batches: one stream, the same on every rank (global draws, sliced per rank).
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.lr, self.opt_mae, self.opt_masker = build_optimizers(self.cfg, self.mae, self.masker, self.device,
                                                                 self.dist.world_size)
        precision = build_scalers(precision, self.device, self.masker)
        self.precision, self.scaler_mae, self.scaler_masker = precision.name, precision.scaler_mae, \
            precision.scaler_masker
        # >1: a strategy's losses are the mean of this many per-group losses, as DDP over that many ranks
        # computes them; lets one process reproduce an N-rank run (per-device semantics).
        self.loss_groups = 1
        self.position = (resume_position(self.resume_path, *self.parts(), self.generator, self.cfg, self.dist,
                                         len(self.batches), self.scalers()) if self.resume_path else Position())
        self.stop_requested = False  # asked for (a signal, a callback) ...
        self.stopping = False  # ... and agreed by every rank: the loop stops
        self.mae_ddp, self.mae_forward = build_forward(self.cfg, self.mae, self.masker, self.dist)
        self.logger = MetricsLogger(self.output_dir, enabled=self.dist.is_main)
        self.checks = Checks(self.cfg.max_nonfinite, lambda: self.position, self.logger, self.diverged,
                             announce=self.dist.is_main)
        self.view = RunView(self)  # what callbacks see of the run (rank 0 only), see clmae.train.callbacks
        self.console = Console(self.view, progress=self.cfg.progress) if self.dist.is_main else None
        self.callbacks: list[Callback] = build_callbacks(self.cfg, self.view, self.console, self.dist)

    @property
    def output_dir(self) -> Path:
        return self.run.output_dir

    @property
    def iterations_per_epoch(self) -> int:
        return -(-len(self.batches) // self.cfg.accum_iter)  # the last window of an epoch may be short

    def autocast_context(self):
        """The run's precision: bf16 or fp16 autocast, or nothing for fp32."""
        return autocast(self.device, self.precision)

    @property
    def decides_on_device(self) -> bool:
        """Whether both optimisers skip a non-finite update on the device (fused AdamW, the CUDA default): then an
        iteration reads nothing from the device. Otherwise (foreach AdamW, the CPU default) each update is
        decided on the host: one read per optimiser update."""
        return skips_on_device(self.opt_mae) and skips_on_device(self.opt_masker)

    def scalers(self) -> dict[str, torch.amp.GradScaler | None]:
        """fp16's loss scalers by their checkpoint names (None for fp32 and bf16)."""
        return {"scaler_mae": self.scaler_mae, "scaler_masker": self.scaler_masker}

    def progress(self, micro_step: int = 0) -> float:
        """The fractional epoch of the next micro-batch (plus ``micro_step``)."""
        return self.position.progress(len(self.batches), micro_step)

    def progress_done(self) -> float:
        """The fractional epoch of the last micro-batch trained (after an epoch: its last's)."""
        return self.position.progress_done(len(self.batches))

    def schedule_done(self) -> dict[str, float]:
        """The strategy's schedule values (λ, ...) at :meth:`progress_done`, those its last step used."""
        return dict(self.masker.schedule(self.progress_done()))

    def masking_batch(self, imgs: torch.Tensor, progress: float) -> MaskingBatch:
        """What the strategy sees of a step; the tokens are those of the MAE as it is now, without gradient."""
        with torch.no_grad():
            tokens = self.mae.embed(imgs)
        return MaskingBatch(imgs, tokens, self.mae.num_keep(self.cfg.mask_ratio), self.generator, self.mae,
                            progress, self.cfg.epochs, self.dist, self.loss_groups)

    # ------------------------------------------------------------------------------------------
    # one iteration

    def train_step(self, micro_batches: list[torch.Tensor], lr: float | None = None) -> DeviceMetrics:
        """One iteration, one optimiser update per part, on its micro-batches (``--accum-iter`` of them).

        ``lr``: the learning rate of both optimisers (default: the schedule's at this position). Returns the
        iteration's metrics on the device (a mapping of floats, read when looked at): the means of the
        micro-steps that counted, and ``skipped`` when a check failed.
        """
        lr = self.lr_now() if lr is None else lr
        own = self.masker.has_own_step and self.masker.own_step_due(self.position.iteration)
        n = len(micro_batches)
        isolate = n > 1  # micro-steps share the gradients: a non-finite one must not spoil the others'
        manual_sync = self.dist.enabled and isolate  # gradients set aside would escape DDP's averaging
        mae_part, own_part = PartWindow(), PartWindow()
        update = None
        for i, imgs in enumerate(micro_batches):
            last, scale = i == n - 1, 1.0 / n
            batch = self.masking_batch(imgs, self.progress(i))
            with no_sync(self.mae_ddp, manual_sync or not last):
                step = self.mae_step(batch, scale, isolate)
            mae_part.add(step)
            if last:
                update = self.mae_update(batch, lr, mae_part, manual_sync)
            if own:  # after a non-finite MAE loss or gradient the batch is not trusted: its own step does not count
                trusted = step.ok & update.trusted if last else step.ok
                own_part.add(self.strategy_step(self.masking_batch(imgs, self.progress(i)), scale, isolate, trusted))
        ended_well = mae_part.last_ok & update.ok
        if own:
            ended_well = ended_well & own_part.last_ok & self.own_update(lr, own_part, update.trusted)
        self.checks.end_of_iteration(ended_well)
        skipped = DeviceMetrics(("skipped",), torch.ones(1, dtype=update.values.dtype, device=update.values.device),
                                (~ended_well).reshape(1))
        return DeviceMetrics.join([update, own_part.means(), self.mask_stats(update.values.device), skipped])

    def mask_stats(self, device: torch.device) -> DeviceMetrics:
        """What the strategy logs about this iteration's masks (SBAM's ratio: host numbers, as its count is)."""
        stats = self.masker.mask_stats()
        return DeviceMetrics.of({k: torch.tensor(float(v), device=device) for k, v in stats.items()})

    def mae_step(self, batch: MaskingBatch, scale: float = 1.0, isolate: bool = False) -> DeviceMetrics:
        """The MAE's forward and backward under the strategy's masks, with the terms the strategy adds (HPM's
        predictor); the loss is multiplied by ``scale`` for the backward (and by fp16's loss scale).

        A non-finite loss is checked on the device, never read here: it does not count (``ok`` false), the
        update it is part of is skipped, and with ``isolate`` (a micro-step of a longer window) the window's
        earlier gradients stay clean."""
        with self.autocast_context():
            with torch.no_grad():
                ids_keep = self.masker.keep_indices(batch)
            gates = self.masker.token_gates(batch, ids_keep)  # None but for strategies that learn through them
            result = (self.mae_forward(batch.imgs, ids_keep) if gates is None
                      else self.mae_forward(batch.imgs, ids_keep, gates=gates))
            terms = self.masker.mae_step_terms(batch, result)
            loss = result["loss"] + sum(terms.values()) if terms else result["loss"]
        ok = agree(torch.isfinite(loss.detach()), self.dist)
        self.checks.check("loss_mae", ~ok, loss)
        with clean_accumulation(self.mae_step_parameters(), ok, enabled=isolate):
            scaled = loss * scale if scale != 1.0 else loss
            (self.scaler_mae.scale(scaled) if self.scaler_mae is not None else scaled).backward()
        return DeviceMetrics.of({"loss_mae": result["loss"], **terms} if terms else {"loss_mae": loss}, ok)

    def mae_step_parameters(self) -> list[torch.nn.Parameter]:
        """What the MAE step's backward reaches: the MAE, and the strategy when it trains in that step (HPM)."""
        extra = self.masker.trainable_parameters() if self.masker.trains_in_mae_step else []
        return [*self.mae.parameters(), *extra]

    def mae_update(self, batch: MaskingBatch, lr: float, window: PartWindow,
                   manual_sync: bool = False) -> DeviceMetrics:
        """The MAE's optimiser update at the end of an iteration, and the strategy's when it trains in the MAE
        step; skipped (gradients dropped) when no micro-step counted or a gradient norm is not finite (with
        fp16: an overflow, logged, the loss scale lowered, never counted as non-finite)."""
        parts = [("grad_norm", self.opt_mae, list(self.mae.parameters()))]
        if self.masker.trains_in_mae_step:
            parts.append(("masker_grad_norm", self.opt_masker, self.masker.trainable_parameters()))
        if manual_sync:
            average_gradients([p for p in self.mae.parameters() if p.grad is not None], self.dist)
        norms = {}
        for name, optimizer, params in parts:
            if name == "masker_grad_norm":
                average_gradients(params, self.dist)
            if self.scaler_mae is not None:
                self.scaler_mae.unscale_(optimizer)
            norms[name] = grad_norm(params)
        counted = window.any_ok
        finite = counted
        for name, value in norms.items():
            good = torch.isfinite(value)
            if self.scaler_mae is None:  # the first non-finite norm is the one reported
                self.checks.check(name, finite & ~good, value)
            finite = finite & good
        if self.scaler_mae is not None:
            self.checks.check("overflow", counted & ~finite, norms["grad_norm"], part="mae")
        decided = self.decide(finite)
        for _, optimizer, _ in parts:
            update_if(optimizer, lr, finite, decided)
        if self.scaler_mae is not None:
            self.scaler_mae.update()
        if self.masker.trains_in_mae_step:
            self.checks.count_masker_updates(finite if decided is None else decided)
        if decided is not False:  # on the device path EMA copies follow an unchanged MAE after a skipped update
            self.masker.after_optimizer_step(batch)
        # Where a micro-step counted and nothing non-finite was backpropagated (an fp16 overflow is not that) the
        # losses are logged and the batch is trusted for the strategy's own step.
        trusted = counted if self.scaler_mae is not None else finite
        out = DeviceMetrics.join([window.means(trusted), DeviceMetrics.of(norms, finite)])
        out.ok, out.trusted = finite, trusted
        return out

    def strategy_step(self, batch: MaskingBatch, scale: float = 1.0, isolate: bool = False,
                      trusted: torch.Tensor | bool = True) -> DeviceMetrics:
        """The strategy's own step after the MAE's (CL-MAE's masking module): the MAE frozen, only the strategy's
        parameters get gradients. A non-finite loss does not count (checked on the device, never read here),
        nor does a step on a batch whose MAE step failed (``trusted`` false: it is not checked either)."""
        with self.autocast_context(), frozen(self.mae):
            loss, logs = self.masker.own_step_terms(batch)
        finite = agree(torch.isfinite(loss.detach()), self.dist)
        self.checks.check("loss_masker", (trusted & ~finite) if trusted is not True else ~finite, loss)
        ok = finite & trusted if trusted is not True else finite
        params = self.masker.trainable_parameters()
        with clean_accumulation(params, ok, enabled=isolate):
            scaled = loss * scale if scale != 1.0 else loss
            (self.scaler_masker.scale(scaled) if self.scaler_masker is not None else scaled).backward(inputs=params)
        return DeviceMetrics.of({**logs, "loss_masker": loss}, ok)

    def own_update(self, lr: float, window: PartWindow, trusted: torch.Tensor) -> torch.Tensor:
        """The strategy's optimiser update after its own steps: averaged over the ranks (what DDP would do), skipped
        when none counted or the MAE's update was poisoned (``trusted`` false), or on an fp16 overflow. Whether it
        was applied (a device bool)."""
        params = self.masker.trainable_parameters()
        average_gradients(params, self.dist)
        ok = window.any_ok & trusted
        if self.scaler_masker is not None:
            self.scaler_masker.unscale_(self.opt_masker)
            good = torch.isfinite(grad_norm(params))
            self.checks.check("overflow", ok & ~good, good.to(torch.float32), part="masker")
            ok = ok & good
        decided = self.decide(ok)
        update_if(self.opt_masker, lr, ok, decided)
        if self.scaler_masker is not None:
            self.scaler_masker.update()
        self.checks.count_masker_updates(ok if decided is None else decided)
        return ok

    def decide(self, ok: torch.Tensor) -> bool | None:
        """None when the optimisers skip on the device (nothing read); else the queued checks and ``ok`` are read
        now, in one read (the host decides the update)."""
        if self.decides_on_device:
            return None
        return self.checks.flush([ok])[0] > 0.5

    def lr_now(self) -> float:
        """The learning rate of the schedule at the run's position (linear warmup, then cosine)."""
        return lr_at(self.progress(), self.lr, self.cfg.min_lr, self.run.warmup_epochs, self.cfg.epochs)

    def diverged(self, check: Check, value: float) -> None:
        """``--max-nonfinite`` checks failed in a row: save the last good weights (skipped updates never changed
        them) and stop the run."""
        self.save_checkpoint()
        raise self.checks.error(check.what, value, self.output_dir / f"{LAST}.safetensors")

    # ------------------------------------------------------------------------------------------
    # the run

    @_discard_folder_on_failure
    def fit(self) -> RunResult:
        """Train from the current position to ``--epochs``, a checkpoint every epoch.

        Stopped by SIGINT/SIGTERM (or a callback), it saves and returns; the result says by what
        (``stopped_by``) and the exit code a command should end with (``exit_code``).
        """
        cfg, p = self.cfg, self.position
        started, first_iteration = time.perf_counter(), p.iteration
        self.write_run_info()
        log, final = LogWindow(self), {}
        with GracefulStop(announce=self.dist.is_main) as signals:
            if self.console is not None:
                self.console.begin()
            while p.epoch < cfg.epochs and not self.stop_between_epochs(signals):  # also one during the save
                epoch_window = MeanWindow()
                for micro_batches in micro_windows(self.batches.epoch(p.epoch, p.step_in_epoch), cfg.accum_iter):
                    if self.stop_before_step(signals):  # it came while the batch was loaded: no new step
                        break
                    lr = self.lr_now()
                    schedule = self.masker.schedule(self.progress())
                    metrics = self.train_step(micro_batches, lr)
                    p.iteration += 1
                    p.step_in_epoch += len(micro_batches)
                    epoch_window.add(metrics)
                    for cb in self.callbacks:
                        cb.on_step(self.view, metrics)
                    stop = self.check_stop(signals)
                    log.add(metrics, sum(b.shape[0] for b in micro_batches), lr, schedule)
                    if stop:
                        break
                if self.stopping:
                    break
                p.epoch, p.step_in_epoch = p.epoch + 1, 0
                final = mean_metrics(epoch_window.means(), self.dist)
                self.end_of_epoch(final)
            stopped_by = self.finish_run(signals)
        elapsed = time.perf_counter() - started
        images = (p.iteration - first_iteration) * cfg.effective_batch_size * self.dist.world_size
        result = RunResult(self.output_dir, self.output_dir / f"{LAST}.pt", self.output_dir / f"{LAST}.safetensors",
                           self.logger.path, p.epoch, final, epochs=cfg.epochs, elapsed_s=elapsed,
                           images_per_s=images / elapsed if elapsed > 0 else 0.0, stopped_by=stopped_by,
                           exit_code=signals.exit_code)  # read after the handlers are restored: a signal
        if self.console is not None:                    # during the final save still sets the exit code
            self.console.finish(result)
        return result

    def check_stop(self, signals: GracefulStop) -> bool:
        """Whether to stop after this iteration: a signal or a callback asked; on every rank at the same step.

        Under DDP the ranks agree (an all-reduce, a host read) only every ``min(--log-every, 50)`` iterations
        and at each epoch's end, so a stop lands within that many iterations; one process stops at once."""
        self.stop_requested = self.stop_requested or signals.requested
        if not self.dist.enabled or self.position.iteration % min(self.cfg.log_every, STOP_CHECK_EVERY) == 0:
            self.agree_stop()
        return self.stopping

    def agree_stop(self) -> None:
        self.stopping = any_true(self.stop_requested, self.dist) if self.dist.enabled else self.stop_requested

    def stop_before_step(self, signals: GracefulStop) -> bool:
        """Whether a stop asked since the last check forbids the next step. One process reads its signal flag here;
        the ranks of a torchrun job agree only in :meth:`check_stop` and between epochs, as a collective here
        would cost every step another one."""
        if not self.dist.enabled:
            self.stop_requested = self.stop_requested or signals.requested
            self.stopping = self.stop_requested
        return self.stopping

    def stop_between_epochs(self, signals: GracefulStop) -> bool:
        """Whether to stop before the next epoch: a signal during the epoch's save, or a callback at its end;
        every rank agrees."""
        self.stop_requested = self.stop_requested or signals.requested
        self.agree_stop()
        return self.stopping

    def finish_run(self, signals: GracefulStop) -> str | None:
        """The end of the run, inside GracefulStop (a signal during the final save is handled like any other):
        the last checkpoint, the skipped-files report, the logs closed. Returns what stopped the loop, if anything."""
        if self.console is not None:
            self.console.close()
        self.checks.flush()
        stopped_by = None
        if self.stopping:
            stopped_by = signals.signal_name or "request_stop"  # what stopped the loop, not a later signal
            self.save_checkpoint()
            if self.dist.is_main:
                print(f"clmae: stopped at epoch {self.position.epoch}, iteration {self.position.iteration}; checkpoint "
                      f"saved. Resume with: clmae pretrain --resume {self.output_dir}", file=sys.stderr)
        elif not broadcast_object(checkpoint_pair_complete(self.output_dir / LAST), self.dist):
            self.save_checkpoint()
        report_skipped_files(self.batches, self.dist, self.logger)
        self.logger.close()
        barrier(self.dist)  # every rank returns only once rank 0 has written everything
        teardown(self.dist)
        return stopped_by

    def end_of_epoch(self, epoch_means: dict[str, float]) -> None:
        """The epoch record (with the schedule values its last step trained with), checkpoints, callbacks."""
        self.checks.flush()  # the epoch's skipped steps and masking-module updates, before its record and checkpoint
        cfg, epoch = self.cfg, self.position.epoch
        record = {"kind": "epoch", "epoch": epoch - 1, "step": self.position.iteration, **epoch_means}
        self.logger.log({**record, **self.schedule_done()}, step=self.position.iteration)
        self.save_checkpoint()
        if cfg.save_every and epoch % cfg.save_every == 0:
            self.save_checkpoint(f"checkpoint-{epoch:04d}")
        for cb in self.callbacks:  # the held-out k-NN first (rank 0 only; the others wait at the next collective)
            cb.on_epoch_end(self.view)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def write_run_info(self) -> None:
        """``config.json``: the run as it runs (rank 0; written whole, never half a file)."""
        if self.dist.is_main:
            write_config_json(self.output_dir, self.run_info(), self.cfg, self.device, self.dist, len(self.batches),
                              self.lr, self.precision)

    def run_info(self) -> dict[str, Any]:
        return run_info(self.cfg, self.run, self.dataset, self.model_config, self.masker)

    def parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The modules and optimisers a checkpoint holds (the masker when it has state)."""
        return ({"mae": self.mae, "masker": self.masker if self.masker.has_state else None},
                {"opt_mae": self.opt_mae, "opt_masker": self.opt_masker})

    def save_checkpoint(self, stem: str = LAST) -> Path:
        """Write ``STEM.pt`` and ``STEM.safetensors`` (rank 0 only; the state is the same on every rank)."""
        if not self.dist.is_main:
            return self.output_dir / f"{stem}.pt"
        extra = {"world_size": self.dist.world_size, "global_batch": self.cfg.batch_size * self.dist.world_size}
        return save_run_checkpoint(self.output_dir, stem, self.run_info(), self.position, *self.parts(),
                                   self.generator, extra, self.scalers())



class LogWindow:
    """The ``kind="train"`` lines of metrics.jsonl: means over ``--log-every`` iterations, all ranks averaged.

    The window adds the iterations' metrics up on the device; a log step reads them (and the queued checks),
    the only reads of an iteration on the device path."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.window = trainer, MeanWindow()
        self.since, self.images = time.perf_counter(), 0

    def add(self, metrics: dict[str, float], images: int, lr: float, schedule: dict[str, float]) -> None:
        t = self.trainer
        self.window.add(metrics)
        self.images += images
        if t.position.iteration % t.cfg.log_every:
            return
        t.checks.flush()
        means = self.window.means()  # waits for the window's work: the time below includes it
        now = time.perf_counter()
        record = mean_metrics(means, t.dist)
        record.update(kind="train", epoch=t.position.epoch, step=t.position.iteration, lr=lr,
                      img_per_s=self.images * t.dist.world_size / max(now - self.since, 1e-9), **schedule)
        if t.masker.learnable:
            record["masker_updates"] = t.position.masker_updates
        for name, scaler in t.scalers().items():
            if scaler is not None:
                record[name.replace("scaler", "loss_scale")] = scaler.get_scale()
        t.logger.log(record, step=t.position.iteration)
        self.window.reset()
        self.since, self.images = now, 0


def pretrain(config: PretrainConfig | None = None, **options) -> RunResult:
    """Pretrain with CL-MAE (or another ``method``) and return where the outputs are.

    ``pretrain(data="cifar10", data_dir="data", model="vit_tiny_patch4_32", epochs=100)`` or
    ``pretrain(PretrainConfig(...))``; keyword options override the config's (flat configuration keys,
    a strategy's options included: ``pretrain(method="hpm", hpm_hard_max=0.3)``).
    """
    cfg = make_config(options, defaults=config.to_dict() if config is not None else None)
    return Trainer(cfg, overrides=options if cfg.resume else None).fit()
