"""The pretraining loop: read :meth:`Trainer.fit` for the whole run and :meth:`Trainer.train_step` for one iteration.

An iteration is one optimiser step. It loops over its micro-batches (``--accum-iter``, nanoGPT's
shape): for each, the MAE step with the masking strategy's masks (:meth:`Trainer.mae_step`) and, when
the strategy has one, the strategy's own step (:meth:`Trainer.strategy_step`, CL-MAE's masking
module); after the last, each part's optimiser update (:func:`~clmae.train.steps.apply_update`).
Every strategy (``--method``, :mod:`clmae.maskers`) runs through the same loop and the same hooks;
plain MAE is the loop with a random masker and nothing else. The trainer knows no method by name.

Two optimisers, one per part (the MAE; the strategy's trainable parameters), share the schedule,
so the part that is frozen in a step is never touched by weight decay or momentum. In a strategy's
own step the MAE's parameters get no gradient at all (``backward(inputs=...)``).

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
    build_run_state,
    build_runtime,
)
from .callbacks import Callback, RunView
from .console import Console, summary_lines
from .run_folder import Position, discard_unsaved, resume_position, run_info, save_run_checkpoint, write_config_json
from .signals import GracefulStop
from .steps import MetricWindow, NonFinite, StepWindow, all_finite, apply_update, grad_norm, micro_windows


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
        # >1: a strategy's losses are the mean of this many per-group losses, as DDP over that many ranks
        # computes them; lets one process reproduce an N-rank run (per-device semantics).
        self.loss_groups = 1
        self.position = (resume_position(self.resume_path, *self.parts(), self.generator, self.cfg, self.dist)
                         if self.resume_path else Position())
        self.nonfinite = NonFinite(self.cfg.max_nonfinite)
        self.stop_requested = False
        self.mae_ddp, self.mae_forward = build_forward(self.cfg, self.mae, self.masker, self.dist)
        self.logger = MetricsLogger(self.output_dir, enabled=self.dist.is_main)
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
        return autocast(self.device)

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

    def train_step(self, micro_batches: list[torch.Tensor], lr: float | None = None) -> dict[str, float]:
        """One iteration, one optimiser update per part, on its micro-batches (``--accum-iter`` of them).

        ``lr``: the learning rate of both optimisers (default: the schedule's at this position).
        """
        lr = self.lr_now() if lr is None else lr
        own = self.masker.has_own_step and self.masker.own_step_due(self.position.iteration)
        mae_part, own_part, out = StepWindow(), StepWindow(), {}
        for i, imgs in enumerate(micro_batches):
            last, scale = i == len(micro_batches) - 1, 1.0 / len(micro_batches)
            batch = self.masking_batch(imgs, self.progress(i))
            with no_sync(self.mae_ddp, not last):
                mae_ok = mae_part.add(self.mae_step(batch, scale))
            if last:
                out.update(self.mae_update(batch, lr, mae_part))
                mae_ok = mae_ok and "skipped" not in out
            if own and mae_ok:  # after a non-finite MAE loss or gradient, the batch is not trusted for a 2nd step
                own_part.add(self.strategy_step(self.masking_batch(imgs, self.progress(i)), scale))
            if own and last and own_part.backwards:
                average_gradients(self.masker.trainable_parameters(), self.dist)  # what DDP would do
                apply_update(self.opt_masker, lr)
                self.position.masker_updates += 1
        out.update(own_part.means())
        out.update(self.masker.mask_stats())  # what the strategy logs about its masks (SBAM's ratio)
        if "skipped" in out or not (mae_part.last_ok and (not own or own_part.last_ok)):
            out["skipped"] = 1.0
        else:
            self.nonfinite.reset()
        return out

    def mae_step(self, batch: MaskingBatch, scale: float = 1.0) -> dict[str, float]:
        """The MAE's forward and backward under the strategy's masks, with the terms the strategy adds (HPM's
        predictor); the loss is multiplied by ``scale`` for the backward. A non-finite loss is skipped, not
        backpropagated: the iteration's earlier gradients stay clean."""
        with self.autocast_context():
            with torch.no_grad():
                ids_keep = self.masker.keep_indices(batch)
            gates = self.masker.token_gates(batch, ids_keep)  # None but for strategies that learn through them
            result = (self.mae_forward(batch.imgs, ids_keep) if gates is None
                      else self.mae_forward(batch.imgs, ids_keep, gates=gates))
            terms = self.masker.mae_step_terms(batch, result)
            loss = result["loss"] + sum(terms.values()) if terms else result["loss"]
        value = loss.item()
        if not all_finite(value, self.dist):
            return self.skip("loss_mae", value)
        (loss * scale if scale != 1.0 else loss).backward()
        if not terms:
            return {"loss_mae": value}
        values = torch.stack([result["loss"].detach().float(), *(t.detach().float() for t in terms.values())])
        return dict(zip(["loss_mae", *terms], values.tolist()))

    def mae_update(self, batch: MaskingBatch, lr: float, window: StepWindow) -> dict[str, float]:
        """The MAE's optimiser update at the end of an iteration, and the strategy's when it trains in the MAE
        step; skipped (gradients dropped) when a gradient norm is not finite."""
        out = window.means()
        if not window.backwards:
            return out
        if not window.last_ok:  # DDP averages gradients in the last backward, which did not run
            average_gradients([p for p in self.mae.parameters() if p.grad is not None], self.dist)
        parts = [("grad_norm", self.opt_mae, list(self.mae.parameters()))]
        if self.masker.trains_in_mae_step:
            parts.append(("masker_grad_norm", self.opt_masker, self.masker.trainable_parameters()))
        for name, _, params in parts:
            if name == "masker_grad_norm":
                average_gradients(params, self.dist)
            out[name] = grad_norm(params)
            if not all_finite(out[name], self.dist):
                return self.skip(name, out[name], poisoned=True)
        for _, optimizer, _ in parts:
            apply_update(optimizer, lr)
        self.position.masker_updates += int(self.masker.trains_in_mae_step)
        self.masker.after_optimizer_step(batch)
        return out

    def strategy_step(self, batch: MaskingBatch, scale: float = 1.0) -> dict[str, float]:
        """The strategy's own step after the MAE's (CL-MAE's masking module): the MAE frozen, only the strategy's
        parameters get gradients. A non-finite loss is skipped, not backpropagated."""
        with self.autocast_context(), frozen(self.mae):
            loss, logs = self.masker.own_step_terms(batch)
        value = loss.item()
        if not all_finite(value, self.dist):
            return self.skip("loss_masker", value)
        (loss * scale if scale != 1.0 else loss).backward(inputs=self.masker.trainable_parameters())
        return {**dict(zip(logs, torch.stack(list(logs.values())).tolist())), "loss_masker": value}

    def lr_now(self) -> float:
        """The learning rate of the schedule at the run's position (linear warmup, then cosine)."""
        return lr_at(self.progress(), self.lr, self.cfg.min_lr, self.run.warmup_epochs, self.cfg.epochs)

    def skip(self, what: str, value: float, poisoned: bool = False) -> dict[str, float]:
        """A non-finite loss or gradient norm: warn and log it; stop the run after ``--max-nonfinite`` in a row.

        ``poisoned``: a non-finite gradient norm (something non-finite was backpropagated): the iteration's
        gradients are dropped. A non-finite loss was never backpropagated: the other gradients stay.
        """
        if poisoned:
            for optimizer in (self.opt_mae, self.opt_masker):
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
        self.nonfinite.record(what, value, self.position, self.logger, announce=self.dist.is_main)
        if self.nonfinite.diverged:
            self.save_checkpoint()
            raise self.nonfinite.error(what, value, self.output_dir / f"{LAST}.safetensors")
        return {"skipped": 1.0}

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
            while p.epoch < cfg.epochs and not self.stop_requested:
                epoch_window = MetricWindow()
                for micro_batches in micro_windows(self.batches.epoch(p.epoch, p.step_in_epoch), cfg.accum_iter):
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
                if self.stop_requested:
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
        """Whether to stop after this iteration: a signal or a callback asked; on every rank at the same step."""
        self.stop_requested = self.stop_requested or signals.requested
        if self.dist.enabled:
            self.stop_requested = any_true(self.stop_requested, self.dist)
        return self.stop_requested

    def finish_run(self, signals: GracefulStop) -> str | None:
        """The end of the run, inside GracefulStop (a signal during the final save is handled like any other):
        the last checkpoint, the skipped-files report, the logs closed. Returns what stopped the loop, if anything."""
        if self.console is not None:
            self.console.close()
        stopped_by = None
        if self.stop_requested:
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
                              self.lr)

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
                                   self.generator, extra)



class LogWindow:
    """The ``kind="train"`` lines of metrics.jsonl: means over ``--log-every`` iterations, all ranks averaged."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.window = trainer, MetricWindow()
        self.since, self.images = time.perf_counter(), 0

    def add(self, metrics: dict[str, float], images: int, lr: float, schedule: dict[str, float]) -> None:
        t = self.trainer
        self.window.add(metrics)
        self.images += images
        if t.position.iteration % t.cfg.log_every:
            return
        now = time.perf_counter()
        record = mean_metrics(self.window.means(), t.dist)
        record.update(kind="train", epoch=t.position.epoch, step=t.position.iteration, lr=lr,
                      img_per_s=self.images * t.dist.world_size / max(now - self.since, 1e-9), **schedule)
        if t.masker.learnable:
            record["masker_updates"] = t.position.masker_updates
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
