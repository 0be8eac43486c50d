"""How often a training iteration waits for the device: counted, so that host reads cannot creep back into the loop.

On a GPU every read of a device value (``.item()``, ``.tolist()``, ``bool()``, ``float()``, ...) drains the queue
of kernels; a small model then spends its time waiting. On the CPU nothing is queued, so the count is taken with
a wrapper around those reads, classified by where they happen:

* **iteration**: inside ``Trainer.train_step`` (the steps, the updates, the checks);
* **log step**: inside the log window every ``--log-every`` iterations (the queued checks and the window's means:
  two reads), and the epoch's end and the run's end (not counted here).

The numbers, per iteration outside log steps:

* **0** on the path a GPU takes: fused AdamW skips a non-finite update on the device (``found_inf``), for every
  strategy, in fp32, bf16 and fp16 (both loss scalers);
* **one per optimiser update** on the CPU's default path (foreach AdamW, kept for bit-identical numbers): the
  host decides each update from one read of its queued checks (MAE, block, HPM, AttMask: 1; CL-MAE: 2 when its
  masking module has a step). A read on the CPU drains nothing: there is no queue.

Counted apart, because they read CPU tensors on every device: block masks, drawn on the host by design (BEiT's
Python loop per image), and foreach AdamW's step counters (``.item()`` in ``torch.optim``; on CUDA too they live on
the CPU unless the optimiser is fused or capturable). On a GPU, ``benchmarks/gpu.py`` counts the synchronisations
of the same iterations with ``torch.cuda.set_sync_debug_mode``, which also sees blocking copies.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from clmae.config import make_config
from clmae.optim import make_optimizer
from clmae.train.trainer import Trainer

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
SRC = str(Path(__file__).resolve().parents[1] / "src" / "clmae")
HOST_SIDE = ("maskers/block.py", "maskers/indices.py")  # block masks: Python per image, on CPU tensors
ITERATIONS, LOG_EVERY = 6, 3


class ReadCounter:
    """Counts reads of tensor values while active: ``reads[(where, iteration)]`` and the host-side ones apart."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.reads: Counter = Counter()
        self.host_side: Counter = Counter()
        self.optimizer_counters = 0
        self.sites: Counter = Counter()
        self.saved: dict[str, object] = {}

    def __enter__(self) -> ReadCounter:
        for name in READS:
            original = getattr(torch.Tensor, name)
            self.saved[name] = original

            def counted(tensor, *args, _original=original, _name=name, **kwargs):
                self.record(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)

    def record(self, name: str) -> None:
        frame, where, site = sys._getframe(2), "other", None
        if f"torch{os.sep}optim{os.sep}" in frame.f_code.co_filename:  # foreach AdamW's CPU step counters
            self.optimizer_counters += 1
            return
        while frame is not None:
            path, qualname = frame.f_code.co_filename, frame.f_code.co_qualname
            if site is None and path.startswith(SRC):
                site = f"{path[len(SRC) + 1:]}:{qualname}"
            if qualname == "LogWindow.add":
                where = "log"
                break
            if qualname == "Trainer.train_step":
                where = "iteration"
                break
            frame = frame.f_back
        if where == "iteration" and site is not None and site.startswith(HOST_SIDE):
            self.host_side[self.trainer.position.iteration] += 1
            return
        self.reads[(where, self.trainer.position.iteration)] += 1
        self.sites[(where, site, name)] += 1

    def per_iteration(self) -> list[int]:
        return [self.reads[("iteration", i)] for i in range(ITERATIONS)]


def counted_run(tmp_path, method: str, precision: str = "fp32", fused: bool = False,
                **options) -> tuple[Trainer, ReadCounter]:
    values = dict(data="digits", model="vit_micro_patch2_8", subset=16 * ITERATIONS, batch_size=16, epochs=1,
                  device="cpu", num_workers=0, progress=False, probe_every=0, snapshot_every=0, log_every=LOG_EVERY,
                  method=method, precision=precision, output_dir=str(tmp_path / "run"), **options)
    trainer = Trainer(make_config(values))
    if fused:  # the CUDA default, on the CPU: the GPU's code path
        trainer.opt_mae = make_optimizer(trainer.mae, trainer.lr, trainer.cfg.weight_decay, trainer.device, True)
        if trainer.opt_masker is not None:
            trainer.opt_masker = make_optimizer(trainer.masker, trainer.lr, trainer.cfg.weight_decay,
                                                trainer.device, True)
    assert trainer.decides_on_device == fused
    with ReadCounter(trainer) as counter:
        trainer.fit()
    assert trainer.position.iteration == ITERATIONS
    return trainer, counter


@pytest.mark.parametrize("method", ["mae", "block", "clmae", "hpm", "attmask"])
def test_no_host_read_in_an_iteration_on_the_gpu_path(tmp_path, method):
    """Fused AdamW (what CUDA runs): zero reads of device values per iteration outside log steps."""
    trainer, counter = counted_run(tmp_path, method, fused=True)
    assert counter.per_iteration() == [0] * ITERATIONS, counter.sites
    # a log step reads twice: the queued checks and the log window's means
    assert [counter.reads[("log", i)] for i in range(1, ITERATIONS + 1)] == [0, 0, 2, 0, 0, 2], counter.sites
    if method == "block":  # the host-side mask drawing, the only reads in a block iteration
        assert all(counter.host_side[i] > 0 for i in range(ITERATIONS))
    else:
        assert not counter.host_side


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_no_host_read_in_an_iteration_under_autocast_and_loss_scaling(tmp_path, precision):
    """The same in bf16 and in fp16, where both of CL-MAE's loss scalers unscale and update on the device."""
    _, counter = counted_run(tmp_path, "clmae", precision, fused=True)
    assert counter.per_iteration() == [0] * ITERATIONS, counter.sites


@pytest.mark.parametrize("method, updates", [("mae", 1), ("hpm", 1), ("attmask", 1), ("clmae", 2)])
def test_one_host_read_per_update_on_the_cpu_default_path(tmp_path, method, updates):
    """foreach AdamW (the CPU default) decides each update on the host: one read per optimiser update."""
    _, counter = counted_run(tmp_path, method)
    assert counter.per_iteration() == [updates] * ITERATIONS, counter.sites
    assert counter.optimizer_counters > 0  # counted apart: CPU tensors on every device
    sites = {site for (where, site, _), n in counter.sites.items() if where == "iteration"}
    assert sites == {"train/steps.py:read_all"}, sites  # every one of them is the checks' single read


def test_cheap_clmae_reads_only_when_its_masking_module_steps(tmp_path):
    """``--masker-every 2``: the masking module's update (and its read) every other iteration."""
    _, counter = counted_run(tmp_path, "clmae", masker_every=2, masker_batch_fraction=0.5)
    assert counter.per_iteration() == [2, 1, 2, 1, 2, 1]
