"""Shared fixtures: small, fast, CPU-only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One thread: the tiny test models are faster single-threaded than with thread hand-offs,
# and spinning OpenMP threads make them 10x slower on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Keep every test single-threaded, also after a test that changed the thread count."""
    torch.set_num_threads(1)
    yield


class StopAfterFirstEpoch:
    """Trainer callback: ask the run to stop once its first epoch (and that epoch's checkpoint) is done,
    as a Ctrl-C there would; through the public callback API, not by patching the trainer."""

    def on_step(self, run, metrics) -> None:
        pass

    def on_epoch_end(self, run) -> None:
        run.request_stop()


@pytest.fixture
def stop_after_first_epoch() -> StopAfterFirstEpoch:
    """A callback for ``trainer.callbacks``: the run stops after its first epoch (to test resuming)."""
    return StopAfterFirstEpoch()


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The folder holding cifar10.npz (../shared/datasets beside the checkout, or $CLMAE_DATA)."""
    for d in (os.environ.get("CLMAE_DATA"), SHARED_DATA):
        if d and (Path(d) / "cifar10.npz").is_file():
            return Path(d)
    pytest.fail("cifar10.npz not found in $CLMAE_DATA or ../shared/datasets; the CIFAR-10 tests need it")
