"""Observers of a training run: the interface they implement and the read-only view of the run they get.

A callback (the curriculum probe, the study's timer, a user's logger) implements :class:`Callback`
and is called on rank 0 after every iteration and after every epoch's checkpoint. It sees the run
through a :class:`RunView`: the position, the models, the data and a way to log, but nothing it
could use to change training (no optimisers, no setters). Callbacks must not change the weights:
the probe, for instance, runs under ``no_grad`` in eval mode with its own random generator.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from ..data.datasets import load_dataset
from ..data.shards import ShardData
from ..errors import ClmaeError
from ..evaluation.runner import data_notes, quick_knn


@runtime_checkable
class Callback(Protocol):
    def on_step(self, run: RunView, metrics: dict[str, float]) -> None:
        """After every iteration, with that iteration's metrics."""

    def on_epoch_end(self, run: RunView) -> None:
        """After each epoch's checkpoint is written."""


class RunView:
    """What a callback may read of a run. Properties only (nothing can be assigned); the config is a copy.

    The one thing a callback may ask of the run is to stop it: :meth:`request_stop`, as Ctrl-C would.
    """

    __slots__ = ("_trainer", "_cfg")

    def __init__(self, trainer) -> None:
        object.__setattr__(self, "_trainer", trainer)
        object.__setattr__(self, "_cfg", dataclasses.replace(trainer.cfg))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"RunView is read-only: cannot set {name!r}")

    def request_stop(self) -> None:
        """Stop after this step: the run saves a checkpoint and returns, as on SIGINT."""
        self._trainer.stop_requested = True

    # position
    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self._trainer.position.epoch

    @property
    def step_in_epoch(self) -> int:
        return self._trainer.position.step_in_epoch

    @property
    def iteration(self) -> int:
        """Iterations completed over the whole run."""
        return self._trainer.position.iteration

    @property
    def progress_done(self) -> float:
        """The fractional epoch of the iteration just done (after an epoch: its last step's)."""
        return self._trainer.progress_done()

    def schedule_done(self) -> dict[str, float]:
        """The strategy's schedule values (λ, ...) at :attr:`progress_done`, as the epoch record has them."""
        return self._trainer.schedule_done()

    @property
    def steps_per_epoch(self) -> int:
        """Iterations (optimiser steps) per epoch."""
        return self._trainer.iterations_per_epoch

    @property
    def global_batch(self) -> int:
        """Images per iteration, over all processes (every micro-batch of it)."""
        return self._trainer.cfg.effective_batch_size * self._trainer.dist.world_size

    # what the run is
    @property
    def cfg(self):
        return self._cfg

    @property
    def epochs(self) -> int:
        return self._cfg.epochs

    @property
    def snapshot_every(self) -> int:
        return self._trainer.run.snapshot_every

    @property
    def output_dir(self) -> Path:
        return self._trainer.run.output_dir

    @property
    def model_config(self):
        return self._trainer.model_config

    @property
    def dataset(self):
        return self._trainer.dataset

    @property
    def input_pipeline(self) -> str:
        """How batches are made (workers, prefetch, pinned memory), as the header line says it."""
        return self._trainer.batches.describe()

    @property
    def data_scan(self):
        """The data's native size and channels, as measured (:class:`clmae.data.datasets.DataScan`)."""
        return self._trainer.data_scan

    @property
    def model_choice(self):
        """The model and sizes chosen for the data, and why (:class:`clmae.models.configs.ModelChoice`)."""
        return self._trainer.model_choice

    @property
    def resumed(self) -> bool:
        """Whether this run continues from a checkpoint (``--resume``)."""
        return self._trainer.resume_path is not None

    @property
    def device(self) -> torch.device:
        return self._trainer.device

    @property
    def precision(self) -> str:
        """What ``--precision`` resolved to on this device: ``fp32``, ``bf16`` or ``fp16``."""
        return self._trainer.precision

    @property
    def cpu_threads(self) -> int | None:
        """The threads a CPU run computes with (``--threads``); None on a GPU."""
        return torch.get_num_threads() if self._trainer.device.type == "cpu" else None

    # the models (to measure, never to train)
    @property
    def mae(self) -> torch.nn.Module:
        return self._trainer.mae

    @property
    def masker(self) -> torch.nn.Module:
        return self._trainer.masker

    def autocast(self):
        """The run's mixed-precision context (``--precision``; nothing for fp32)."""
        return self._trainer.autocast_context()

    # logging
    def log(self, record: dict[str, Any]) -> None:
        """Append a record to ``metrics.jsonl`` (and TensorBoard) at the current iteration."""
        self._trainer.logger.log(record, step=self._trainer.position.iteration)

    @property
    def last_records(self) -> dict[str, dict[str, Any]]:
        """A copy of the last record of each kind logged so far (``"epoch"``, ``"probe"``, ``"eval"``, …)."""
        return {kind: dict(record) for kind, record in self._trainer.logger.latest.items()}

    @property
    def tensorboard(self):
        """The TensorBoard ``SummaryWriter``, or None when TensorBoard is not installed."""
        return self._trainer.logger.tb


class HeldOutKnn:
    """``--eval-every N``: a quick k-NN of the encoder on the held-out split every N epochs and at the end,
    logged as ``kind="eval"`` (``knn_top1``). Data without a labeled held-out split (or tar shards, which
    have no random access) turns it off with one line."""

    def __init__(self) -> None:
        self.held_out = None  # loaded at its first use: decoding a test split can take seconds
        self.off = False

    def on_step(self, run: RunView, metrics: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, run: RunView) -> None:
        cfg = run.cfg
        if self.off or not (run.epoch % cfg.eval_every == 0 or run.epoch == cfg.epochs):
            return
        if isinstance(run.dataset, ShardData):
            return self._off("tar shards have no random access; evaluate the checkpoint on an image folder with "
                             "`clmae eval knn`")
        mae, was_training = run.mae, run.mae.training
        try:
            if self.held_out is None:
                self.held_out = load_dataset(cfg.data, cfg.data_dir, "test", channels=run.dataset.channels)
                for note in data_notes(run.dataset, self.held_out, run.model_config.img_size):
                    if note not in getattr(run.dataset, "notes", []):  # those were said when the run started
                        tqdm.write(f"clmae: note: {note}", file=sys.stderr)
            mae.eval()
            result = quick_knn(mae, run.dataset, self.held_out, run.model_config.img_size, run.device)
        except ClmaeError as exc:  # no held-out split or no labels: say so once, keep training
            return self._off(str(exc))
        finally:
            mae.train(was_training)
        run.log({"kind": "eval", "epoch": run.epoch - 1, "step": run.iteration, **result})

    def _off(self, why: str) -> None:
        tqdm.write(f"clmae: k-NN evaluation skipped: {why}", file=sys.stderr)
        self.off = True
