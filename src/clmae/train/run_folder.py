"""A run's folder and its state on disk: where it goes, what resuming may change, what a checkpoint holds.

* :func:`prepare_output_dir` — create the run folder, refusing to overwrite a run; a folder holding
  only an earlier start that saved nothing is started over. Without ``--output-dir`` it claims the
  first free default name (:func:`default_output_dir`) by creating it. :func:`discard_unsaved` removes the
  folders a run created when it fails before saving anything.
* :func:`resume_config` — the configuration a ``--resume`` continues with: the saved one, plus the
  few options a resumed run may change (:data:`RESUMABLE_OVERRIDES`); a run killed before its first
  checkpoint starts over in its folder.
* :class:`RunState` — values resolved when a run starts (model and sizes chosen for the data, output
  folder, warmup, snapshot interval); the config itself keeps what the user asked for.
* :class:`Position` and :func:`save_run_checkpoint` / :func:`load_run_checkpoint` — the checkpoint
  payload: weights, optimiser states, RNG state and position in the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import PretrainConfig, config_from_record, known_keys
from ..data.datasets import dataset_label
from ..data.loader import map_position
from ..errors import CheckpointError, ConfigError
from ..io.atomic import write_text
from ..io.checkpoint import (
    FORMAT,
    LAST,
    check_finite,
    load_state_checked,
    read_training_state,
    resolve_checkpoint,
    save_training_state,
    save_weights,
    split_prefix,
)
from ..maskers import create_masker
from ..models.configs import default_model
from ..optim import lr_at
from ..options import flag
from ..version import __version__

# Options a resumed run may change; every other one must match the checkpoint.
# device/precision/threads: a run may continue on another machine (an fp16 run's loss scale travels in the checkpoint).
# batch_size/accum_iter may change so the global batch can be kept when the number of GPUs changes.
RESUMABLE_OVERRIDES = {"device", "precision", "num_workers", "prefetch", "augment_on", "decode_on", "progress",
                       "log_every", "eval_every", "save_every", "epochs", "max_nonfinite", "data_dir", "output_dir",
                       "resume", "compile", "batch_size", "accum_iter", "threads"}
CONFIG = "config.json"
# What a run writes before its first checkpoint: an earlier start that saved nothing left only these.
EARLY_FILES = ("metrics.jsonl", "tensorboard", "probe", CONFIG)


@dataclass
class RunState:
    """What a run resolved when it started, beside the config the user gave."""

    output_dir: Path
    model_name: str
    warmup_epochs: float
    snapshot_every: int
    img_size: int | None = None  # the image and patch size the model was built with
    patch_size: int | None = None

    def recorded_config(self, cfg: PretrainConfig) -> PretrainConfig:
        """The config as it ran: what ``config.json`` and checkpoints store, so a resume repeats it."""
        sizes = {k: v for k, v in (("img_size", self.img_size), ("patch_size", self.patch_size)) if v is not None}
        return dataclasses.replace(cfg, output_dir=str(self.output_dir), model=self.model_name,
                                   warmup_epochs=self.warmup_epochs, snapshot_every=self.snapshot_every, **sizes)


@dataclass
class Position:
    """Where a run stands; restored by resume."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # micro-batches of this epoch trained
    iteration: int = 0  # iterations (optimiser steps) done over the whole run
    masker_updates: int = 0
    skipped_steps: int = 0

    def progress(self, steps_per_epoch: int, micro_step: int = 0) -> float:
        """The fractional epoch of the next micro-batch (plus ``micro_step``): ``epoch + step / steps_per_epoch``."""
        return self.epoch + (self.step_in_epoch + micro_step) / max(steps_per_epoch, 1)

    def progress_done(self, steps_per_epoch: int) -> float:
        """The fractional epoch of the last micro-batch trained (0 before the first): after an epoch, its last's."""
        steps = max(steps_per_epoch, 1)
        if self.step_in_epoch > 0:  # the value progress() had when that micro-batch ran, to the bit
            return self.epoch + (self.step_in_epoch - 1) / steps
        return (self.epoch - 1) + (steps - 1) / steps if self.epoch > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# The folder


def default_output_dir(cfg: PretrainConfig) -> Path:
    """``runs/<method>-<data>-<time>``, with ``-2``, ``-3``, … when runs start within the same second.

    Only the name: nothing is created (set-up is validated first); :func:`prepare_output_dir` claims it.
    """
    return Path("runs", f"{cfg.method}-{dataset_label(cfg.data)}-{time.strftime('%Y%m%d-%H%M%S')}")


def _claim_new_folder(base: Path) -> Path:
    """Create and return ``base``, or ``base-2``, ``base-3``, … : the first that did not exist."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            out.mkdir()
            return out
        except FileExistsError:
            n += 1


@dataclass
class OutputFolder:
    """The run folder, the folders this run created for it (outermost first) and a note for the user."""

    path: Path
    created: list[Path]
    note: str | None = None


def has_checkpoint(out: Path) -> bool:
    """Whether the folder holds any checkpoint file (the last one or a kept ``checkpoint-EPOCH``)."""
    return out.is_dir() and (any(out.glob("checkpoint-*.pt")) or any(out.glob("checkpoint-*.safetensors")))


def earlier_start(out: Path) -> bool:
    """An existing folder with only what a run writes before its first checkpoint (a start killed early)."""
    if not out.is_dir() or has_checkpoint(out):
        return False
    names = {p.name for p in out.iterdir()}
    return bool(names) and names <= set(EARLY_FILES) and (out / CONFIG).is_file()


def prepare_output_dir(out: Path, resuming: bool, claim_new: bool = False) -> OutputFolder:
    """Create the run folder; refuse a folder that already holds a run unless resuming it.

    A folder holding an earlier start that saved no checkpoint (killed in its first epoch) is
    started over: its metrics, probe and TensorBoard files are removed, with a note.
    ``claim_new`` (a new run without ``--output-dir``, ``out`` from :func:`default_output_dir`): take the
    first free one of ``out``, ``out-2``, ``out-3``, … by creating it (one ``mkdir`` decides, so two
    runs started at once never share a folder).
    """
    if claim_new and not resuming:
        created = [p for p in out.parents if not p.exists()][::-1]
        try:
            claimed = _claim_new_folder(out)
        except OSError as exc:
            raise ConfigError(f"--output-dir: cannot create {out}: {exc.strerror}") from None
        if not os.access(claimed, os.W_OK):
            raise ConfigError(f"--output-dir: {claimed} is not writable; choose another folder")
        return OutputFolder(claimed, [*created, claimed])
    out = Path(out)
    if not resuming and (out / f"{LAST}.pt").exists():
        raise ConfigError(
            f"--output-dir: {out} already holds a run; pass --resume to continue it or choose another --output-dir "
            "(nothing was overwritten)"
        )
    note = None
    if not resuming and earlier_start(out):
        for name in EARLY_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        note = (f"{out} holds an earlier start of a run that was stopped before its first checkpoint; "
                "starting the run over in it")
    created = [p for p in (out, *out.parents) if not p.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--output-dir: cannot create {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"--output-dir: {out} is not writable; choose another folder")
    return OutputFolder(out, created, note)


def discard_unsaved(folder: OutputFolder) -> bool:
    """Remove the folders this run created, if no checkpoint was saved in them; True if removed.

    A run that fails during set-up (or before its first checkpoint) leaves nothing behind.
    """
    if not folder.created or has_checkpoint(folder.path):
        return False
    shutil.rmtree(folder.path, ignore_errors=True)
    # Parents it created go too, innermost first, but only while empty: another run may live there by now.
    for parent in reversed(folder.created[:-1]):
        try:
            parent.rmdir()
        except OSError:
            break
    return not folder.path.exists()


# ---------------------------------------------------------------------------------------------
# Resuming


def resume_target(cfg: PretrainConfig) -> Path:
    """What ``--resume`` names: the given run folder or checkpoint, or ``--output-dir``'s (``--resume`` alone)."""
    target = cfg.resume
    if target == "auto":
        if not cfg.output_dir:
            raise ConfigError("--resume: give the run folder or checkpoint to resume, or --output-dir of the run")
        target = cfg.output_dir
    return Path(target)


def resume_file(cfg: PretrainConfig) -> Path:
    """The ``.pt`` a ``--resume`` reads: the given run folder or checkpoint, or ``--output-dir``'s."""
    return resolve_checkpoint(resume_target(cfg), ".pt")


@dataclass
class Resumed:
    """What a ``--resume`` continues with: the config, the checkpoint (None: start over), a note."""

    config: PretrainConfig
    path: Path | None
    note: str | None = None


def _start_over(cfg: PretrainConfig, folder: Path, given: dict[str, Any]) -> Resumed:
    """``--resume`` of a folder without a checkpoint: the run recorded there (or the options given), from zero."""
    note = (f"{folder} has no checkpoint yet (the run was stopped before its first save); "
            "starting it from the beginning there")
    recorded = folder / CONFIG
    if not recorded.is_file():
        return Resumed(dataclasses.replace(cfg, resume=None, output_dir=str(folder)).validate(), None, note)
    try:
        saved = json.loads(recorded.read_text())["run_config"]
        config = as_recorded({**saved, **given, "resume": None, "output_dir": str(folder)}, recorded)
    except (ValueError, KeyError, TypeError, AttributeError, CheckpointError):
        raise ConfigError(f"--resume: {folder} has no checkpoint and its {CONFIG} is not a clmae run's; "
                          "start a new run instead") from None
    return Resumed(config.validate(), None, note)


def as_recorded(values: dict[str, Any], source: Path) -> PretrainConfig:
    """The run configuration ``source`` stored, as the run used it (:func:`~clmae.config.config_from_record`:
    an option an older clmae did not record ran with its default). An option this clmae does not know
    (a newer clmae's run) cannot be repeated, and is refused."""
    unknown = sorted(set(values) - known_keys())
    if unknown:
        raise CheckpointError(f"{source}: the stored run configuration does not fit this clmae (unknown options "
                              f"{', '.join(unknown)}); continue the run with the clmae version that started it")
    return config_from_record(values)


def resume_config(cfg: PretrainConfig, overrides: dict[str, Any] | None) -> Resumed:
    """The config to continue with and the resume file: the saved config with the allowed overrides applied.

    An option the user gave that a resumed run cannot change, with a value other than the one the run
    was started with, is an error naming that value; for an option an older clmae did not record, that
    is its default (:func:`as_recorded`, the one reader of a stored config). A folder holding only a
    start killed before its first checkpoint is started over (see :func:`earlier_start`).
    """
    given = {k: v for k, v in (overrides or {}).items() if k != "resume"}
    target = resume_target(cfg)
    never_saved = target.is_dir() and not (target / f"{LAST}.pt").exists()
    if never_saved and (earlier_start(target) or not any(target.iterdir())):
        return _start_over(cfg, target, given)
    path = resume_file(cfg)
    state = read_training_state(path)
    saved = dict(state["run_config"])
    if saved.get("model") is None:  # recorded by an older clmae: the model its default rule chose then
        mc = state.get("model_config") or {}
        saved.update(model=default_model(str(saved.get("data"))), img_size=saved.get("img_size") or mc.get("img_size"),
                     patch_size=saved.get("patch_size") or mc.get("patch_size"))
    ran = as_recorded(saved, path)
    started_with = ran.to_dict()  # options the record lacks: the defaults the run used
    for key, value in given.items():
        if key not in started_with:
            raise ConfigError(f"unknown option {key!r}; see `clmae pretrain --help`")
        if key not in RESUMABLE_OVERRIDES and started_with[key] != value:
            raise ConfigError(f"{flag(key)}: the run was started with {started_with[key]!r}; a resumed run cannot "
                              "change it (start a new run instead)")
    changes = {k: v for k, v in given.items() if k in RESUMABLE_OVERRIDES}
    changes["resume"] = str(path)
    if ran.output_dir is None or "output_dir" not in given:
        changes["output_dir"] = str(path.parent)
    return Resumed(dataclasses.replace(ran, **changes).validate(), path)


# ---------------------------------------------------------------------------------------------
# The checkpoint payload


def save_run_checkpoint(out: Path, stem: str, info: dict[str, Any], position: Position, modules: dict[str, Any],
                        optimizers: dict[str, Any], generator: torch.Generator, extra: dict[str, Any],
                        scalers: dict[str, Any] | None = None) -> Path:
    """Write ``STEM.pt`` (everything to resume) and ``STEM.safetensors`` (weights and run info).

    ``modules``: ``{"mae": module, "masker": module or None}``; ``optimizers`` likewise; ``extra``:
    more position fields (world size, global batch) stored with both files; ``scalers``: fp16's loss
    scalers (``{"scaler_mae": GradScaler or None, ...}``), stored only when there are any, so a resumed
    fp16 run continues with the same loss scale.
    """
    where = {**dataclasses.asdict(position), **extra}
    skipped = where.pop("skipped_steps")
    state = {
        "format": FORMAT,
        **where,
        "skipped_steps": skipped,
        "weights": {f"{p}.{k}": v.detach().cpu().clone() for p, m in modules.items() if m is not None
                    for k, v in m.state_dict().items()},
        **{name: (opt.state_dict() if opt is not None else None) for name, opt in optimizers.items()},
        **{name: scaler.state_dict() for name, scaler in (scalers or {}).items() if scaler is not None},
        "generator": generator.get_state(),
        "model_config": info["model_config"],
        "run_config": info["run_config"],
        "data": info["data"],
    }
    save_training_state(out / f"{stem}.pt", state)
    save_weights(out / f"{stem}.safetensors", modules, {**info, **where})
    return out / f"{stem}.pt"


def load_run_checkpoint(path: Path, modules: dict[str, Any], optimizers: dict[str, Any], generator: torch.Generator,
                        scalers: dict[str, Any] | None = None) -> tuple[Position, dict[str, Any]]:
    """Restore weights, optimiser, loss-scaler and RNG states from a resume file; ``(position, the whole state)``.

    A loss scaler the file has no state for (the run trained in fp32 or bf16 until now) starts afresh."""
    state = read_training_state(path)
    check_finite(state["weights"], str(path))
    for name in optimizers:  # NaN moments would poison every later step as surely as NaN weights
        moments = (state.get(name) or {}).get("state", {})
        check_finite({f"{name}.{i}.{k}": v for i, s in moments.items() for k, v in s.items()}, str(path))
    names = {"mae": "autoencoder", "masker": "masking module"}
    for prefix, module in modules.items():
        if module is not None:
            load_state_checked(module, split_prefix(state["weights"], prefix), names.get(prefix, prefix), str(path))
    for name, opt in optimizers.items():
        if opt is not None:
            opt.load_state_dict(state[name])
    for name, scaler in (scalers or {}).items():
        if scaler is not None and isinstance(state.get(name), dict):
            scaler.load_state_dict(state[name])
    generator.set_state(state["generator"])
    position = Position(state["epoch"], state["step_in_epoch"], state["iteration"], state["masker_updates"],
                        state.get("skipped_steps", 0))
    return position, state


def resume_position(path: Path, modules: dict[str, Any], optimizers: dict[str, Any], generator: torch.Generator,
                    cfg: PretrainConfig, dist, steps_per_epoch: int | None = None,
                    scalers: dict[str, Any] | None = None) -> Position:
    """Restore a run from its resume file and say where it continues.

    The state is rank-independent; a changed global batch (world size or ``--batch-size``) keeps the
    images of the epoch already seen, rounded down to whole new batches. Another ``--epochs`` than
    planned changes the schedules from here on: one line says how (:func:`epochs_change_note`).
    """
    position, state = load_run_checkpoint(path, modules, optimizers, generator, scalers)
    saved_global = state.get("global_batch", state["run_config"]["batch_size"])
    global_batch = cfg.batch_size * dist.world_size
    if saved_global != global_batch:
        mapped = map_position(position.step_in_epoch, saved_global, global_batch)
        if dist.is_main:
            print(f"clmae: global batch {saved_global} -> {global_batch} images ({state.get('world_size', 1)} -> "
                  f"{dist.world_size} processes); resuming epoch {position.epoch} at step {mapped} (was "
                  f"{position.step_in_epoch}); lr follows the new batch", file=sys.stderr)
        position.step_in_epoch = mapped
    if position.epoch >= cfg.epochs and dist.is_main:
        print(f"clmae: {path} already finished {position.epoch} of {cfg.epochs} epochs; pass a larger --epochs to "
              "train longer", file=sys.stderr)
    planned = state["run_config"].get("epochs")
    if dist.is_main and steps_per_epoch and planned and planned != cfg.epochs and position.epoch < cfg.epochs:
        note = epochs_change_note(cfg, int(planned), position, steps_per_epoch, modules["mae"].config, dist.world_size)
        print(f"clmae: note: {note}", file=sys.stderr)
    return position


def epochs_change_note(cfg: PretrainConfig, planned: int, position: Position, steps_per_epoch: int, model_config,
                       world_size: int) -> str:
    """What a resume with another ``--epochs`` than ``planned`` changes: the learning rate and the strategy's
    schedules (CL-MAE's λ, ...) are functions of the planned epochs, so from here on they follow the new length.
    Says each value the old plan gives at the resume point (for a run past its plan: where the plan ended, the
    value its last step trained with) and the value the new plan gives there."""
    progress = position.progress(steps_per_epoch)
    ended = progress >= planned
    then_at = position.progress_done(steps_per_epoch) if ended else progress
    before = dataclasses.replace(cfg, epochs=planned)
    peak = cfg.absolute_lr(world_size)
    lrs = (lr_at(then_at, peak, before.min_lr, before.warmup(), planned),
           lr_at(progress, peak, cfg.min_lr, cfg.warmup(), cfg.epochs))
    with torch.random.fork_rng(devices=[]):  # building a strategy draws initial weights: leave the run's stream
        then = create_masker(before.method, model_config, before).schedule(then_at)
        now = create_masker(cfg.method, model_config, cfg).schedule(progress)
    changes = [f"λ {then[key]:+.3f} → {now[key]:+.3f}" if key == "curriculum_factor" else
               f"{key} {then[key]:.4g} → {now[key]:.4g}" for key in now if key in then and then[key] != now[key]]
    if lrs[0] != lrs[1]:
        changes.append(f"lr {lrs[0]:.4g} → {lrs[1]:.4g}")
    what = ", ".join(changes) if changes else "at this point both are still the same (warmup)"
    where = "the last step of the plan" if ended else "the old plan"
    return (f"--epochs {cfg.epochs} instead of the {planned} the run planned: the learning rate and the masking "
            f"schedules follow the new length from epoch {progress:.2f} on ({where} → the new): {what}; resume "
            f"with --epochs {planned} to keep the plan")


def run_info(cfg: PretrainConfig, run: RunState, dataset, model_config, masker) -> dict[str, Any]:
    """What a run is, as config.json and every checkpoint record it: models, the config as it ran, the data's
    statistics, the method and what the report needs to know of its masks."""
    return {
        "model_config": dataclasses.asdict(model_config),
        "run_config": run.recorded_config(cfg).to_dict(),
        "data": {"name": dataset.name, "mean": list(dataset.mean), "std": list(dataset.std),
                 "channels": dataset.channels, "img_size": model_config.img_size, "num_train": len(dataset)},
        "model_name": run.model_name,
        "method": cfg.method,
        "masker": {"uniform": masker.uniform, "mask_label": masker.mask_label,
                   "schedules": sorted(masker.schedule(0.0))},
        "clmae_version": __version__,
    }


def write_config_json(out: Path, info: dict[str, Any], cfg: PretrainConfig, device, dist, steps_per_epoch: int,
                      lr: float, precision: str = "fp32") -> None:
    """``RUN/config.json``: :func:`run_info` plus how this start runs it (device, precision, processes, batch, lr,
    argv). ``precision`` is what ``--precision`` resolved to on this device (``run_config`` keeps the option)."""
    info = {**info, "steps_per_epoch": steps_per_epoch, "torch": torch.__version__, "device": str(device),
            "precision": precision,
            "argv": sys.argv, "world_size": dist.world_size, "global_batch": cfg.batch_size * dist.world_size,
            "effective_batch": cfg.effective_batch_size * dist.world_size, "lr": lr}
    write_text(out / CONFIG, json.dumps(info, indent=2, default=str))
