"""The pretraining loop: the MAE step with the strategy's masks, then the strategy's own step, if it has one.

Read :meth:`Trainer.fit` top to bottom for the whole run and :meth:`Trainer.train_step` for one
iteration. Every masking strategy (``--method``, see :mod:`clmae.maskers`) runs through the same
loop and the same hooks: the strategy chooses the masks, may add loss terms to the MAE step (HPM),
may run a step of its own after it (CL-MAE's masking module) and may update state after each
optimiser step (EMA copies). Plain MAE is the loop with a random masker and nothing else.

Two optimisers, one per part (the MAE; the strategy's trainable parameters), share the schedule,
so the part that is frozen in a step is never touched by weight decay or momentum. In CL-MAE's
masking-module step the MAE's parameters get no gradient at all: ``backward(inputs=masker
parameters)`` asks autograd only for what it needs.

Launched by ``torchrun`` the same loop is data-parallel (see :mod:`clmae.distributed`): the MAE is
DDP-wrapped, the strategy's gradients are averaged over the ranks once per accumulation window,
``batch_size`` is per rank, and only rank 0 writes.

What lives elsewhere: the run folder, resume rules and checkpoint payload in :mod:`clmae.run_folder`,
signal handling in :mod:`clmae.signals`, the callback interface in :mod:`clmae.callbacks`, batches
and skipped-file reports in :mod:`clmae.batches`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .atomic import write_text
from .batches import RankBatches, ShardBatches, map_position, report_skipped_files
from .callbacks import Callback, RunView
from .checkpoint import checkpoint_pair_complete
from .config import PretrainConfig, make_config
from .console import Console, summary_lines
from .data import FolderData, load_dataset, scan_data
from .distributed import (
    SINGLE,
    DistContext,
    all_true,
    any_true,
    average_gradients,
    barrier,
    broadcast_object,
    mean_metrics,
    no_sync,
    on_main,
    teardown,
    wrap,
)
from .distributed import setup as setup_distributed
from .errors import ClmaeError, ConfigError, TrainingDiverged
from .evaluation import quick_knn
from .mae_import import load_mae_checkpoint
from .maskers import Masker, MaskingBatch, create_masker
from .metrics import MetricsLogger, MetricWindow
from .model import MaskedAutoencoderViT, model_config, resolve_model
from .optim import lr_at, make_optimizer, set_lr
from .probe import CurriculumProbe
from .run_folder import (
    LAST,
    Position,
    RunState,
    default_output_dir,
    discard_unsaved,
    load_run_checkpoint,
    prepare_output_dir,
    resume_config,
    save_run_checkpoint,
)
from .runtime import autocast, frozen, resolve_device
from .shards import ShardData
from .signals import GracefulStop
from .version import __version__


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
    """Builds data, model, masker and optimisers from a :class:`PretrainConfig` and trains."""

    @_discard_folder_on_failure
    def __init__(self, config: PretrainConfig, overrides: dict[str, Any] | None = None):
        cfg = config.validate()
        self.resume_path: Path | None = None
        note = None
        if cfg.resume:
            resumed = resume_config(cfg, overrides)
            cfg, self.resume_path, note = resumed.config, resumed.path, resumed.note
        self.cfg = cfg
        # One process per device under torchrun; SINGLE otherwise.
        self.dist: DistContext = setup_distributed(cfg.device) or SINGLE
        self.device = self.dist.device if self.dist.enabled else resolve_device(cfg.device)

        # Data, model and batch size are checked before the run folder exists. In-memory sets keep
        # their channels; folders are read as RGB, or grayscale when every sampled image is.
        self.dataset = load_dataset(cfg.data, cfg.data_dir, "train").subset(cfg.subset)
        self.data_scan = scan_data(self.dataset)
        if isinstance(self.dataset, FolderData):
            self.dataset = self.dataset.with_channels(self.data_scan.channels)
        # Without --model: the model that fits the data's native size (clmae.model.resolve_model).
        self.model_choice = resolve_model(cfg.model, cfg.img_size, cfg.patch_size, self.data_scan.size,
                                          self.dataset.channels, self.data_scan.note)
        self.model_config = model_config(
            self.model_choice.name, in_chans=self.dataset.channels, img_size=self.model_choice.img_size,
            patch_size=self.model_choice.patch_size, norm_pix_loss=cfg.norm_pix_loss or None,
        )
        self.batches = self._make_batches()
        self.held_out = None  # the labeled test split of --eval-every, loaded at its first use
        wanted = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg)
        self.output_folder = on_main(lambda: prepare_output_dir(wanted, resuming=self.resume_path is not None,
                                                                claim_new=not cfg.output_dir), self.dist)
        note = note or self.output_folder.note
        if note and self.dist.is_main:
            print(f"clmae: note: {note}", file=sys.stderr)
        self.run = RunState(self.output_folder.path, self.model_choice.name, cfg.warmup(), cfg.snapshot_interval(),
                            knn_eval=cfg.eval_every > 0, img_size=self.model_config.img_size,
                            patch_size=self.model_config.patch_size)

        torch.manual_seed(cfg.seed)
        self.mae = MaskedAutoencoderViT(self.model_config).to(self.device)
        if cfg.init_from and not cfg.resume:
            report = load_mae_checkpoint(cfg.init_from, self.mae)
            if self.dist.is_main:
                print(f"clmae: initialised from {cfg.init_from}: {report.summary()}", file=sys.stderr)
        self.masker: Masker = create_masker(cfg.method, self.model_config, cfg).to(self.device)
        self.masker.attach(self.mae)  # EMA strategies copy the starting weights (a resume then restores theirs)
        # Augmentation, random masks, sub-batches. The same on every rank: global draws, sliced per rank.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.lr = cfg.absolute_lr(self.dist.world_size)
        self.opt_mae = make_optimizer(self.mae, self.lr, cfg.weight_decay, self.device)
        self.opt_masker = (make_optimizer(self.masker, self.lr, cfg.weight_decay, self.device)
                           if self.masker.learnable else None)
        # >1: the strategy's losses are the mean of this many per-group losses, as DDP over that
        # many ranks computes them; lets one process reproduce an N-rank run (per-device semantics).
        self.masker_loss_groups = 1

        # Position in the run; restored by resume.
        position = Position()
        if cfg.resume:
            position = self._load_resume_state()
        self.epoch, self.step_in_epoch, self.iteration = position.epoch, position.step_in_epoch, position.iteration
        self.masker_updates, self.skipped_steps = position.masker_updates, position.skipped_steps
        self.nonfinite_in_a_row = 0
        self.window_backwards = self.masker_window_backwards = 0  # micro-steps of this window that backpropagated
        self.stop_requested = False
        # DDP after every weight is in place: the MAE step runs through mae_ddp, the masking step
        # through the plain MAE (see module docstring of clmae.distributed).
        self.mae_ddp = wrap(self.mae, self.dist)
        self.mae_forward = torch.compile(self.mae_ddp) if cfg.compile else self.mae_ddp
        self.soft_forward = torch.compile(self.mae.forward_soft) if cfg.compile else self.mae.forward_soft
        if cfg.compile and self.masker.learnable:
            self.masker.compile()  # the strategy's forward (CL-MAE's scores, HPM's loss predictor)
        self.logger = MetricsLogger(self.output_dir, enabled=self.dist.is_main)
        # Observers of the run (rank 0 only), see clmae.callbacks.
        self.view = RunView(self)
        self.callbacks: list[Callback] = []
        # What the run prints (bar, a line per epoch, ETA, summary): clmae.console.
        self.console = Console(self.view, progress=cfg.progress) if self.dist.is_main else None
        if (cfg.probe_every or self.run.snapshot_every) and self.dist.is_main:
            if isinstance(self.dataset, ShardData):
                print("clmae: the curriculum probe needs random access to images; it is off for tar shards",
                      file=sys.stderr)
            else:
                self.callbacks.append(CurriculumProbe(self.view))
        if self.console is not None:
            self.callbacks.append(self.console)

    @property
    def output_dir(self) -> Path:
        return self.run.output_dir

    @property
    def model_name(self) -> str:
        return self.run.model_name

    def autocast_context(self):
        return autocast(self.device)

    def progress(self) -> float:
        """The fractional epoch of the next iteration: ``epoch + step_in_epoch / steps_per_epoch``."""
        return self.epoch + self.step_in_epoch / max(len(self.batches), 1)

    def progress_done(self) -> float:
        """The fractional epoch of the iteration just done (0 before the first): after an epoch, its last step's."""
        steps = max(len(self.batches), 1)
        if self.step_in_epoch > 0:  # the value progress() had when that iteration ran, to the bit
            return self.epoch + (self.step_in_epoch - 1) / steps
        return (self.epoch - 1) + (steps - 1) / steps if self.epoch > 0 else 0.0

    def schedule_done(self) -> dict[str, float]:
        """The strategy's schedule values (λ, ...) at :meth:`progress_done`: those its last training step used.

        The epoch record, the console's epoch line and the probe's epoch snapshot all report these.
        """
        return dict(self.masker.schedule(self.progress_done()))

    def masking_batch(self, imgs: torch.Tensor, progress: float) -> MaskingBatch:
        """What the strategy sees of this step (tokens computed here, without gradient)."""
        with torch.no_grad():
            tokens = self.mae.embed(imgs)
        return MaskingBatch(imgs, tokens, self.mae.num_keep(self.cfg.mask_ratio), self.generator, self.mae,
                            progress, self.cfg.epochs, self.dist, self.masker_loss_groups)

    def _make_batches(self):
        """This rank's training batches: tar shards stream, everything else by global permutation."""
        cfg, size = self.cfg, self.model_config.img_size
        if isinstance(self.dataset, ShardData):
            return ShardBatches(self.dataset, cfg.batch_size, size, self.device, cfg.seed, cfg.num_workers, self.dist)
        return RankBatches(self.dataset, cfg.batch_size, size, self.device, cfg.seed, cfg.num_workers, self.dist)

    def _load_resume_state(self) -> Position:
        modules = {"mae": self.mae, "masker": self.masker if self.masker.has_state else None}
        optimizers = {"opt_mae": self.opt_mae, "opt_masker": self.opt_masker}
        position, state = load_run_checkpoint(self.resume_path, modules, optimizers, self.generator)
        # The state is rank-independent; a changed global batch (world size or --batch-size) keeps
        # the images of the epoch already seen, rounded down to whole new batches.
        saved_global = state.get("global_batch", state["run_config"]["batch_size"])
        global_batch = self.cfg.batch_size * self.dist.world_size
        if saved_global != global_batch:
            mapped = map_position(position.step_in_epoch, saved_global, global_batch)
            if self.dist.is_main:
                print(f"clmae: global batch {saved_global} -> {global_batch} images "
                      f"({state.get('world_size', 1)} -> {self.dist.world_size} processes); resuming epoch "
                      f"{position.epoch} at step {mapped} (was {position.step_in_epoch}); lr follows the new batch",
                      file=sys.stderr)
            position.step_in_epoch = mapped
        if position.epoch >= self.cfg.epochs and self.dist.is_main:
            print(f"clmae: {self.resume_path} already finished {position.epoch} of {self.cfg.epochs} epochs; "
                  "pass a larger --epochs to train longer", file=sys.stderr)
        return position

    # ------------------------------------------------------------------------------------------
    # one iteration

    def train_step(self, imgs: torch.Tensor, lr: float | None = None) -> dict[str, float]:
        """One iteration on ``imgs`` at the run's position: the MAE step, then (if due) the strategy's own step.

        ``lr``: the learning rate of both optimisers (default: the schedule's at this position).
        """
        cfg = self.cfg
        accum = cfg.accum_iter
        window = self.iteration // accum
        boundary = (self.iteration + 1) % accum == 0
        if self.iteration % accum == 0:  # a new accumulation window: nothing backpropagated yet
            self.window_backwards = self.masker_window_backwards = 0
        progress = self.progress()
        if lr is None:
            lr = lr_at(progress, self.lr, cfg.min_lr, self.run.warmup_epochs, cfg.epochs)
        out: dict[str, float] = {}

        # 1) MAE step: masks from the strategy, no gradient through them, plus any loss terms it
        #    adds. Random draws are made for the global batch so N ranks see what one process would.
        with no_sync(self.mae_ddp, not boundary):
            with self.autocast_context():
                batch = self.masking_batch(imgs, progress)
                with torch.no_grad():
                    ids_keep = self.masker.keep_indices(batch)
                result = self.mae_forward(imgs, ids_keep)
                terms = self.masker.mae_step_terms(batch, result)
                loss = result["loss"] + sum(terms.values()) if terms else result["loss"]
            loss_value = loss.item()
            loss_ok = all_true(math.isfinite(loss_value), self.dist)
            if loss_ok:
                (loss / accum).backward()
                self.window_backwards += 1
        if not loss_ok:
            # Never backpropagated: the window's gradients so far are clean and stay. At the window's
            # end they are applied (this micro-step adds nothing); with none, the step is skipped.
            out.update(self._skip_step("loss_mae", loss_value, poisoned=False))
            if not (boundary and self.window_backwards):
                return out
            # DDP averages gradients in the boundary's backward, which did not run.
            average_gradients([p for p in self.mae.parameters() if p.grad is not None], self.dist)
        if boundary:
            out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.mae.parameters(), float("inf")))
            if not math.isfinite(out["grad_norm"]):
                return self._skip_step("grad_norm", out["grad_norm"])
            if self.masker.trains_in_mae_step:
                params = self.masker.trainable_parameters()
                average_gradients(params, self.dist)
                out["masker_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
                if not all_true(math.isfinite(out["masker_grad_norm"]), self.dist):
                    return self._skip_step("masker_grad_norm", out["masker_grad_norm"])
            set_lr(self.opt_mae, lr)
            self.opt_mae.step()
            self.opt_mae.zero_grad(set_to_none=True)
            if self.masker.trains_in_mae_step:
                set_lr(self.opt_masker, lr)
                self.opt_masker.step()
                self.opt_masker.zero_grad(set_to_none=True)
                self.masker_updates += 1
            self.masker.after_optimizer_step(batch)
        if loss_ok and terms:  # a non-finite loss is reported by the skip record, not averaged into the metrics
            values = torch.stack([result["loss"].detach().float(), *(t.detach().float() for t in terms.values())])
            out.update(zip(["loss_mae", *terms], values.tolist()))
        elif loss_ok:
            out["loss_mae"] = loss_value

        # 2) The strategy's own step (CL-MAE's masking module): MAE frozen, its parameters only.
        #    After a non-finite MAE loss only its window's end (the update with earlier gradients).
        if self.masker.has_own_step and window % cfg.masker_every == 0:
            out.update(self._masker_step(batch, lr, boundary, backward=loss_ok))
        if "skipped" not in out:  # a skipped masking-module step counts towards --max-nonfinite too
            self.nonfinite_in_a_row = 0
        return out

    def _masker_step(self, batch: MaskingBatch, lr: float, boundary: bool, backward: bool = True) -> dict[str, float]:
        cfg = self.cfg
        params = self.masker.trainable_parameters()
        out: dict[str, float] = {}
        if backward:
            imgs = batch.imgs
            if cfg.masker_batch_fraction < 1.0:
                imgs = imgs.index_select(0, self._masker_rows(imgs.shape[0]).to(imgs.device))
            with self.autocast_context(), frozen(self.mae):
                with torch.no_grad():
                    tokens = self.mae.embed(imgs)
                loss, logs = self.masker.own_step_terms(dataclasses.replace(batch, imgs=imgs, tokens=tokens),
                                                        self.soft_forward)
            value = loss.item()
            if all_true(math.isfinite(value), self.dist):
                (loss / cfg.accum_iter).backward(inputs=params)
                self.masker_window_backwards += 1
                out = dict(zip(logs, torch.stack(list(logs.values())).tolist()))  # one device sync, not seven
                out["loss_masker"] = value
            else:  # never backpropagated: the window's earlier gradients are clean and stay
                out = self._skip_step("loss_masker", value, poisoned=False)
        if boundary and self.masker_window_backwards:
            average_gradients(params, self.dist)  # what DDP would do, once per accumulation window
            set_lr(self.opt_masker, lr)
            self.opt_masker.step()
            self.opt_masker.zero_grad(set_to_none=True)
            self.masker_updates += 1
        return out

    def _masker_rows(self, local: int) -> torch.Tensor:
        """This rank's rows for the masking-module step under ``--masker-batch-fraction``.

        The global batch is ``world_size x masker_loss_groups`` loss groups of equal size (a rank's
        per-device loss, or one of the groups by which one process reproduces N ranks); each group
        keeps its own random ``fraction`` of its rows, drawn group after group from the shared
        generator, so N ranks choose what one process with N loss groups chooses, and every rank
        draws every group's permutation (the generator stays the same everywhere). One process with
        one group: the single ``randperm`` over the batch of earlier versions.
        """
        groups = self.masker_loss_groups
        if local % groups:
            raise ConfigError(f"cannot split a batch of {local} into {groups} equal loss groups")
        size = local // groups
        keep = min(size, max(2, int(round(size * self.cfg.masker_batch_fraction))))
        perms = [torch.randperm(size, generator=self.generator)[:keep] for _ in range(groups * self.dist.world_size)]
        mine = range(self.dist.rank * groups, (self.dist.rank + 1) * groups)
        return torch.cat([perms[t] + (t - mine.start) * size for t in mine])

    def _skip_step(self, what: str, value: float, poisoned: bool = True) -> dict[str, float]:
        """A non-finite loss or gradient: warn, stop after several in a row; drop this step's gradients.

        ``poisoned``: a non-finite gradient norm, i.e. a non-finite value was backpropagated; the
        window's gradients are dropped. A non-finite loss (``poisoned=False``) was never
        backpropagated: the gradients accumulated by earlier micro-steps of the window stay.
        """
        if poisoned:
            self.opt_mae.zero_grad(set_to_none=True)
            if self.opt_masker is not None:
                self.opt_masker.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        self.skipped_steps += 1
        self.logger.log({"kind": "skip", "epoch": self.epoch, "step": self.iteration, "what": what, "value": value,
                         "in_a_row": self.nonfinite_in_a_row, "skipped_steps": self.skipped_steps}, step=self.iteration)
        if self.dist.is_main:
            tqdm.write(f"clmae: warning: non-finite {what} ({value}) at iteration {self.iteration}; step skipped "
                       f"({self.nonfinite_in_a_row} in a row)", file=sys.stderr)
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite:
            self.save_checkpoint()
            raise TrainingDiverged(
                f"{self.nonfinite_in_a_row} non-finite steps in a row (last: {what}={value}); "
                f"the last good weights are in "
                f"{self.output_dir / (LAST + '.safetensors')}. Lower --base-lr or check the data, then --resume"
            )
        return {"skipped": 1.0}

    # ------------------------------------------------------------------------------------------
    # the run

    @_discard_folder_on_failure
    def fit(self) -> RunResult:
        """Train from the current position to ``cfg.epochs``; checkpoint every epoch.

        Stopped by SIGINT/SIGTERM (or a callback), it saves and returns; the result says by what
        (``stopped_by``) and the exit code a command should end with (``exit_code``).
        """
        cfg = self.cfg
        steps_per_epoch = len(self.batches)
        self._write_run_info(steps_per_epoch)
        started, first_iteration = time.perf_counter(), self.iteration
        if self.console is not None:
            self.console.begin()
        window = MetricWindow()
        last_log = time.perf_counter()
        images_since_log = 0
        final: dict[str, float] = {}
        with GracefulStop(announce=self.dist.is_main) as signals:
            while self.epoch < cfg.epochs and not self.stop_requested:
                epoch_window = MetricWindow()
                for imgs in self.batches.epoch(self.epoch, self.step_in_epoch):
                    progress = self.progress()
                    schedule = self.masker.schedule(progress)
                    lr = lr_at(progress, self.lr, cfg.min_lr, self.run.warmup_epochs, cfg.epochs)
                    metrics = self.train_step(imgs, lr)
                    self.iteration += 1
                    self.step_in_epoch += 1
                    images_since_log += imgs.shape[0]
                    window.add(metrics)
                    epoch_window.add(metrics)
                    for cb in self.callbacks:
                        cb.on_step(self.view, metrics)
                    self.stop_requested = self.stop_requested or signals.requested
                    if self.dist.enabled:  # a signal seen by one rank stops all of them at the same step
                        self.stop_requested = any_true(self.stop_requested, self.dist)
                    if self.iteration % cfg.log_every == 0:
                        now = time.perf_counter()
                        record = mean_metrics(window.means(), self.dist)
                        record.update(kind="train", epoch=self.epoch, step=self.iteration, lr=lr,
                                      img_per_s=images_since_log * self.dist.world_size / max(now - last_log, 1e-9))
                        record.update(schedule)
                        if self.masker.learnable:
                            record["masker_updates"] = self.masker_updates
                        self.logger.log(record, step=self.iteration)
                        window.reset()
                        last_log, images_since_log = now, 0
                    if self.stop_requested:
                        break
                if self.stop_requested:
                    break
                final = mean_metrics(epoch_window.means(), self.dist)
                self.epoch += 1
                self.step_in_epoch = 0
                self._end_of_epoch(final)
            # The end of the run stays inside GracefulStop: a signal during the final save is
            # handled like any other (the first sets a flag, a repeat within 2 s is ignored).
            if self.console is not None:
                self.console.close()
            stopped_by = None
            if self.stop_requested:
                stopped_by = signals.signal_name or "request_stop"  # what stopped the loop, not a later signal
                self.save_checkpoint()
                if self.dist.is_main:
                    print(f"clmae: stopped at epoch {self.epoch}, iteration {self.iteration}; checkpoint saved. "
                          f"Resume with: clmae pretrain --resume {self.output_dir}", file=sys.stderr)
            elif not broadcast_object(checkpoint_pair_complete(self.output_dir / LAST), self.dist):
                self.save_checkpoint()
            report_skipped_files(self.batches, self.dist, self.logger)
            self.logger.close()
            barrier(self.dist)  # every rank returns only once rank 0 has written everything
            teardown(self.dist)
        # Read after the handlers are restored: a signal that came during the final save still
        # gives the command its exit code (128 + its number), so `pretrain && evaluate` stops there.
        elapsed = time.perf_counter() - started
        images = (self.iteration - first_iteration) * cfg.batch_size * self.dist.world_size
        result = RunResult(self.output_dir, self.output_dir / f"{LAST}.pt", self.output_dir / f"{LAST}.safetensors",
                           self.logger.path, self.epoch, final, epochs=cfg.epochs, elapsed_s=elapsed,
                           images_per_s=images / elapsed if elapsed > 0 else 0.0, stopped_by=stopped_by,
                           exit_code=signals.exit_code)
        if self.console is not None:
            self.console.finish(result)
        return result

    def _end_of_epoch(self, epoch_means: dict[str, float]) -> None:
        cfg = self.cfg
        record = {"kind": "epoch", "epoch": self.epoch - 1, "step": self.iteration, **epoch_means}
        record.update(self.schedule_done())  # the values of the epoch's last training step
        self.logger.log(record, step=self.iteration)
        self.save_checkpoint()
        if cfg.save_every and self.epoch % cfg.save_every == 0:
            self.save_checkpoint(f"checkpoint-{self.epoch:04d}")
        if self.run.knn_eval and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs) and self.dist.is_main:
            self.evaluate_knn()  # rank 0 only; the others wait at the next collective
        for cb in self.callbacks:
            cb.on_epoch_end(self.view)

    def evaluate_knn(self) -> dict[str, float]:
        """Quick k-NN accuracy of the current encoder on the held-out split (if it has labels)."""
        if isinstance(self.dataset, ShardData):
            tqdm.write("clmae: k-NN evaluation skipped: tar shards have no random access; evaluate the "
                       "checkpoint on an image folder with `clmae eval knn`", file=sys.stderr)
            self.run.knn_eval = False
            return {}
        was_training = self.mae.training
        try:
            if self.held_out is None:  # loaded once per run: decoding a test split can take seconds
                self.held_out = load_dataset(self.cfg.data, self.cfg.data_dir, "test", channels=self.dataset.channels)
            test = self.held_out
            self.mae.eval()
            result = quick_knn(self.mae, self.dataset, test, self.model_config.img_size, self.device)
        except ClmaeError as exc:  # no held-out split or no labels: say so once, keep training
            tqdm.write(f"clmae: k-NN evaluation skipped: {exc}", file=sys.stderr)
            self.run.knn_eval = False
            return {}
        finally:
            self.mae.train(was_training)
        record = {"kind": "eval", "epoch": self.epoch - 1, "step": self.iteration, **result}
        self.logger.log(record, step=self.iteration)
        return result

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def run_info(self) -> dict[str, Any]:
        return {
            "model_config": dataclasses.asdict(self.model_config),
            "run_config": self.run.recorded_config(self.cfg).to_dict(),
            "data": {"name": self.dataset.name, "mean": list(self.dataset.mean), "std": list(self.dataset.std),
                     "channels": self.dataset.channels, "img_size": self.model_config.img_size,
                     "num_train": len(self.dataset)},
            "model_name": self.model_name,
            "method": self.cfg.method,
            "clmae_version": __version__,
        }

    def _write_run_info(self, steps_per_epoch: int) -> None:
        if not self.dist.is_main:
            return
        info = {**self.run_info(), "steps_per_epoch": steps_per_epoch, "torch": torch.__version__,
                "device": str(self.device), "argv": sys.argv, "world_size": self.dist.world_size,
                "global_batch": self.cfg.batch_size * self.dist.world_size,
                "effective_batch": self.cfg.effective_batch_size * self.dist.world_size, "lr": self.lr}
        write_text(self.output_dir / "config.json", json.dumps(info, indent=2, default=str))  # never half a file

    def save_checkpoint(self, stem: str = LAST) -> Path:
        """Write ``STEM.pt`` and ``STEM.safetensors`` (rank 0 only; the state is the same on every rank)."""
        if not self.dist.is_main:
            return self.output_dir / f"{stem}.pt"
        position = Position(self.epoch, self.step_in_epoch, self.iteration, self.masker_updates, self.skipped_steps)
        extra = {"world_size": self.dist.world_size, "global_batch": self.cfg.batch_size * self.dist.world_size}
        modules = {"mae": self.mae, "masker": self.masker if self.masker.has_state else None}
        optimizers = {"opt_mae": self.opt_mae, "opt_masker": self.opt_masker}
        return save_run_checkpoint(self.output_dir, stem, self.run_info(), position, modules, optimizers,
                                   self.generator, extra)


def pretrain(config: PretrainConfig | None = None, **options) -> RunResult:
    """Pretrain with CL-MAE (or MAE) and return where the outputs are.

    ``pretrain(data="cifar10", data_dir="data", model="vit_tiny_patch4_32", epochs=100)`` or
    ``pretrain(PretrainConfig(...))``; keyword options override the config's fields.
    """
    values = dataclasses.asdict(config) if config is not None else {}
    values.update(options)
    cfg = make_config(values)
    return Trainer(cfg, overrides=options if cfg.resume else None).fit()
