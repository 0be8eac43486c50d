"""What a run says while it trains: a bar in a terminal, one line per epoch everywhere, an ETA, a summary.

:class:`Console` is a trainer callback (:class:`clmae.train.callbacks.Callback`, rank 0 only) that reads the
run through its :class:`~clmae.train.callbacks.RunView`. In a terminal it draws a progress bar with the epoch
and the running loss from the first iteration on. With ``--no-progress``, or when stdout or stderr is
not a terminal (a cluster log, a pipe, a file), nothing is redrawn with ``\\r``; what it prints is lines:

* first, what runs (:func:`header_line`: method, data, the model and why it was chosen, device, folder) and
  how the data was read when that needs saying (text labels, channels-first arrays);
* after the first few iterations (after the first one when it took 20 s or more), how long the whole run
  will take and how many iterations are left (on CPU, a warning with ways to make the run smaller when that
  is more than a few hours); speeds under 10 img/s keep decimals (``0.45 img/s``);
* one line per epoch, for instance
  ``epoch 3/30  loss_mae 0.4521  λ +0.87  loss_masker 0.1234  mask_difficulty 0.95  knn_top1 45.20
  310 img/s  elapsed 1m12s  ETA 10m05s`` (λ and loss_masker for CL-MAE, mask_difficulty when the
  curriculum probe measured it during the epoch, knn_top1 with ``--eval-every``);
* at the end, :func:`summary_lines`: time, speed, final losses, where the files are, how to look at them.

Epoch lines and the summary go to stdout and are flushed at once (cluster logs see them live); notes,
warnings and the bar go to stderr.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

from ..maskers import METHODS, REFERENCE_METHOD
from .callbacks import RunView

ETA_AFTER_ITERATIONS = 5  # timed iterations (the first one, with its warm-up, is not timed) …
ETA_AFTER_SECONDS = 20.0  # … or this long, whichever comes first
LONG_CPU_RUN_S = 3 * 3600  # warn on CPU when a run is estimated to take longer
BAR_LOSS_EVERY_S = 0.5  # the bar reads a step's loss at most this often (a read waits for the GPU's queue)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h35m``, ``31d06h``: short and unambiguous in a log line."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 2 * 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def format_speed(images_per_s: float) -> str:
    """``882 img/s``, ``3.2 img/s``, ``0.45 img/s``: whole numbers from 10 on, decimals below (never ``0 img/s``)."""
    if images_per_s >= 10:
        return f"{images_per_s:.0f} img/s"
    return f"{images_per_s:.1f} img/s" if images_per_s >= 1 else f"{images_per_s:.2g} img/s"


def header_line(run: RunView) -> str:
    """What runs on what, in which precision, and why this model: ``clmae: clmae on x.npz (2048 images, 28 px,
    gray), model …, device cuda:0, bf16, output …`` (on the CPU also its threads: ``…, fp32, 2 threads, …``)."""
    cfg, choice, scan, mc = run.cfg, run.model_choice, run.data_scan, run.model_config
    native = f", {scan.size} px" if scan.size else ""
    colour = "gray" if run.dataset.channels == 1 else "RGB"
    if run.resumed:
        why = "as the run started"
    else:
        why = choice.reason
        if cfg.model is None:
            why += "; --model/--img-size to override"
        elif scan.size and scan.size != mc.img_size:
            why += f"; the data is {scan.size} px"
    pipeline = f", {run.input_pipeline}" if run.input_pipeline else ""
    threads = run.cpu_threads
    threads_text = "" if threads is None else f", {threads} thread{'s' if threads != 1 else ''}"
    return (f"clmae: {cfg.method} on {run.dataset.name} ({len(run.dataset)} images{native}, {colour}), "
            f"model {choice.name} at {mc.img_size} px ({why}), {mc.grid_size}x{mc.grid_size} patches of "
            f"{mc.patch_size} px, device {run.device}, {run.precision}{pipeline}{threads_text}, output "
            f"{run.output_dir}")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def interactive(*streams: TextIO) -> bool:
    """True when every stream is a terminal (a bar redrawn with ``\\r`` is readable there and only there)."""
    return all(getattr(s, "isatty", lambda: False)() for s in streams)


class Console:
    """Trainer callback that reports progress; see the module docstring for what it prints and where."""

    def __init__(self, run: RunView, progress: bool = True, out: TextIO | None = None, err: TextIO | None = None):
        self.run = run
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.show_bar = progress and interactive(self.out, self.err)
        self.bar: tqdm | None = None
        self.started = time.perf_counter()
        self.first_step_end: float | None = None  # timing starts after the first iteration (warm-up)
        self.first_timed_iteration = 0
        self.eta_said = False
        self.epoch_started = self.started
        self.last_step_time = self.started
        self.last_epoch_end: tuple[float, int] | None = None  # (time, iteration) at the previous epoch line
        self.epoch_images = 0
        self.epoch_loss_sum, self.epoch_loss_n = 0.0, 0  # the bar's loss: the mean of the steps it read
        self.loss_read = -math.inf
        self.line_step = run.iteration  # probe records after this iteration are new for the next line

    # -- printing ---------------------------------------------------------------------------

    def line(self, text: str) -> None:
        """A result line on stdout, flushed, without breaking the bar."""
        tqdm.write(text, file=self.out)
        self.out.flush()

    def note(self, text: str) -> None:
        tqdm.write(text, file=self.err)
        self.err.flush()

    # -- the run ----------------------------------------------------------------------------

    def begin(self) -> None:
        """The loop starts: say what runs (:func:`header_line`, how the data was read), reset the clocks, draw the
        bar (in a terminal)."""
        run = self.run
        self.note(header_line(run))
        for note in getattr(run.dataset, "notes", []):
            self.note(f"clmae: note: {note}")
        self.started = self.epoch_started = self.last_step_time = time.perf_counter()
        self.line_step = run.iteration
        if self.show_bar:
            total = run.epochs * run.steps_per_epoch
            self.bar = tqdm(total=total, initial=min(run.iteration, total), unit="it", dynamic_ncols=True,
                            file=self.err, desc=self._desc(run.epoch))
        elif run.epoch < run.epochs:
            self.note(f"clmae: epoch {run.epoch + 1}/{run.epochs}: {run.steps_per_epoch} iterations of "
                      f"{run.global_batch} images per epoch; a line per epoch follows")

    def _desc(self, epoch: int) -> str:
        return f"epoch {min(epoch + 1, self.run.epochs)}/{self.run.epochs}"

    def on_step(self, run: RunView, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        self.last_step_time = now
        self.epoch_images += run.global_batch
        # Only the bar shows a step's loss, read at most every BAR_LOSS_EVERY_S: a read waits for the GPU.
        if self.bar is not None and now - self.loss_read >= BAR_LOSS_EVERY_S:
            self.loss_read = now
            loss = _number(metrics.get("loss_mae"))
            if loss is not None and math.isfinite(loss):
                self.epoch_loss_sum += loss
                self.epoch_loss_n += 1
        if self.bar is not None:
            self.bar.update(1)
            if self.epoch_loss_n:
                self.bar.set_postfix_str(f"loss {self.epoch_loss_sum / self.epoch_loss_n:.4f}", refresh=False)
        if self.first_step_end is None:
            self.first_step_end, self.first_timed_iteration = now, run.iteration
            if now - self.started >= ETA_AFTER_SECONDS:  # slow iterations: the first one (warm-up and all) is all
                self.eta_said = True                     # there is to go by, and the run may have only a few
                self._say_eta(run, now - self.started, "from the first iteration")
            return
        timed = run.iteration - self.first_timed_iteration
        if not self.eta_said and timed > 0 and (timed >= ETA_AFTER_ITERATIONS or
                                                now - self.first_step_end >= ETA_AFTER_SECONDS):
            self.eta_said = True
            self._say_eta(run, (now - self.first_step_end) / timed)

    def seconds_per_iteration(self, run: RunView) -> float | None:
        """Recent wall-clock per iteration, everything included (checkpoints, k-NN, probe): over the last epoch,
        or since the first iteration during the first epoch. Recent, so a machine that got busier or quieter
        shows in the ETA at the next line."""
        now = time.perf_counter()
        if self.last_epoch_end is not None and run.iteration > self.last_epoch_end[1]:
            return (now - self.last_epoch_end[0]) / (run.iteration - self.last_epoch_end[1])
        if self.first_step_end is None or run.iteration <= self.first_timed_iteration:
            return None
        return (now - self.first_step_end) / (run.iteration - self.first_timed_iteration)

    def _say_eta(self, run: RunView, per_iteration: float, measured: str = "") -> None:
        """How long the run will take, from ``per_iteration`` seconds: said once, only while iterations are left."""
        total_iterations = run.epochs * run.steps_per_epoch
        left = max(total_iterations - run.iteration, 0)
        if left == 0:
            return
        remaining = left * per_iteration
        whole = time.perf_counter() - self.started + remaining
        how = f", {measured}" if measured else ""
        self.note(f"clmae: {per_iteration:.3g} s per iteration ({format_speed(run.global_batch / per_iteration)}{how}):"
                  f" about {format_duration(whole)} for the whole run ({total_iterations} iterations), "
                  f"{format_duration(remaining)} to go ({left} iteration{'s' if left != 1 else ''} left)")
        if run.device.type == "cpu" and remaining > LONG_CPU_RUN_S:
            cfg = run.cfg
            cost = METHODS[cfg.method].cost if cfg.method in METHODS else ""
            costly = cost and not cost.startswith("1")
            cheaper = f", --method {REFERENCE_METHOD} ({cost.split()[0]} less compute)" if costly else ""
            self.note(f"clmae: warning: this run needs about {format_duration(remaining)} more on CPU; to make it "
                      f"smaller: fewer --epochs (now {run.epochs}), --subset N (now {len(run.dataset)} images), a "
                      f"smaller --img-size (now {run.model_config.img_size} px){cheaper}, or a GPU (--device cuda)")

    def on_epoch_end(self, run: RunView) -> None:
        now = time.perf_counter()
        records = run.last_records
        epoch = records.get("epoch", {})
        parts = [f"epoch {run.epoch}/{run.epochs}"]
        loss = _number(epoch.get("loss_mae"))
        if loss is not None:
            parts.append(f"loss_mae {loss:.4f}")
        # The strategy's schedules at the epoch's last step (λ for CL-MAE, HPM's hard share, ...), as recorded.
        for key in run.schedule_done():
            value = epoch.get(key)
            if _number(value) is not None:
                parts.append(f"λ {value:+.2f}" if key == "curriculum_factor" else f"{key} {value:.4g}")
        masker_loss = _number(epoch.get("loss_masker"))
        if masker_loss is not None:
            parts.append(f"loss_masker {masker_loss:.4f}")
        probe = records.get("probe", {})
        difficulty = _number(probe.get("mask_difficulty"))
        if difficulty is not None and int(probe.get("step", -1)) > self.line_step:
            parts.append(f"mask_difficulty {difficulty:.3f}")
        evaluation = records.get("eval", {})
        knn = _number(evaluation.get("knn_top1"))
        if knn is not None and evaluation.get("epoch") == run.epoch - 1:
            parts.append(f"knn_top1 {knn:.2f}")
        train_time = self.last_step_time - self.epoch_started
        if self.epoch_images and train_time > 0:
            parts.append(format_speed(self.epoch_images / train_time))
        parts.append(f"elapsed {format_duration(now - self.started)}")
        per_iteration = self.seconds_per_iteration(run)
        remaining_iterations = max(run.epochs * run.steps_per_epoch - run.iteration, 0)
        if run.epoch < run.epochs and per_iteration is not None:
            parts.append(f"ETA {format_duration(remaining_iterations * per_iteration)}")
        self.line("  ".join(parts))
        if self.bar is not None:
            self.bar.set_description_str(self._desc(run.epoch), refresh=False)
        self.epoch_started = self.last_step_time = time.perf_counter()
        self.last_epoch_end = (now, run.iteration)
        self.epoch_images = 0
        self.epoch_loss_sum, self.epoch_loss_n = 0.0, 0
        self.line_step = run.iteration

    def close(self) -> None:
        """The loop is over: remove the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self, result) -> None:
        """Print the summary of a finished (or stopped) run: :func:`summary_lines`."""
        self.close()
        for text in summary_lines(result, self.run.last_records):
            self.line(text)


def summary_lines(result, records: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The end of a run in a few lines: time and speed, final values, the files and what to do with them.

    ``result`` is a :class:`clmae.train.trainer.RunResult`; ``records`` the last logged record of each kind.
    """
    records = records or {}
    stopped = getattr(result, "stopped_by", None)
    speed = f", {format_speed(result.images_per_s)}" if getattr(result, "images_per_s", 0) else ""
    elapsed = format_duration(getattr(result, "elapsed_s", float("nan")))
    head = (f"stopped by {stopped} after {result.epochs_done} of {result.epochs} epochs" if stopped
            else f"done: {result.epochs_done} epochs")
    lines = [f"{head} in {elapsed}{speed}"]
    losses = result.final or records.get("train", {})  # a run stopped in its first epoch: the last logged
    values = [f"{key} {v:.4f}" for key in ("loss_mae", "loss_masker") if (v := _number(losses.get(key))) is not None]
    probe = records.get("probe", {})
    difficulty = _number(probe.get("mask_difficulty"))
    if difficulty is not None and probe.get("step"):  # not the measurement before training
        values.append(f"mask_difficulty {difficulty:.3f}")
    knn = _number(records.get("eval", {}).get("knn_top1"))
    if knn is not None:
        values.append(f"knn_top1 {knn:.2f}")
    if values:
        lines.append("final        " + "  ".join(values))
    out = result.output_dir
    lines += [f"run folder   {out}",
              f"weights      {result.weights}",
              f"resume from  {result.checkpoint}",
              f"metrics      {result.metrics}",
              f"config       {out / 'config.json'}"]
    if stopped:
        lines.append(f"continue     clmae pretrain --resume {out}")
    else:
        lines += [f"report       clmae report {out}", f"evaluate     clmae eval knn --checkpoint {out}"]
    return lines
