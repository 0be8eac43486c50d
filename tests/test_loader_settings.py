"""DataLoader settings at scale: workers per rank from the cores it may use, prefetch, pinned memory on CUDA only,
and the header line that says them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clmae.config import make_config
from clmae.data.datasets import load_dataset
from clmae.data.loader import TrainBatches, make_loader, worker_count
from clmae.errors import ConfigError


def test_minus_one_workers_share_the_granted_cores_among_the_machines_ranks(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    assert worker_count(3) == 3 and worker_count(0) == 0  # a number is taken as given
    assert worker_count(-1, local_ranks=1) == 15  # one core for the training process
    assert worker_count(-1, local_ranks=2) == 7
    assert worker_count(-1, local_ranks=8) == 1
    assert worker_count(-1, local_ranks=32) == 1  # never none
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # as torchrun sets it
    assert worker_count(-1) == 3


def test_worker_options_are_checked_in_one_line():
    assert make_config({"num_workers": -1}).num_workers == -1
    with pytest.raises(ConfigError, match="--num-workers: got -2"):
        make_config({"num_workers": -2})
    with pytest.raises(ConfigError, match="--prefetch: got 0"):
        make_config({"prefetch": 0})


def test_memory_is_pinned_for_cuda_only_and_prefetch_reaches_the_loader():
    data = torch.utils.data.TensorDataset(torch.zeros(4, 1))
    assert make_loader(data, 2, torch.device("cuda"), 0).pin_memory
    assert not make_loader(data, 2, torch.device("cpu"), 0).pin_memory
    assert make_loader(data, 2, torch.device("cpu"), 2, prefetch=6).prefetch_factor == 6


def test_the_batches_say_how_they_are_made(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    folder = load_dataset(str(tmp_path))
    batches = TrainBatches(folder, 4, 16, torch.device("cpu"), seed=0, num_workers=3, prefetch=2)
    assert batches.describe() == "data: 3 workers, prefetch 2, JPEGs decoded at the crop's scale"
    assert TrainBatches(folder, 4, 16, torch.device("cpu"), 0, num_workers=0).describe().startswith(
        "data: no workers (decoded in the training process)")
    memory = TrainBatches(load_dataset("digits"), 4, 8, torch.device("cpu"), 0)
    assert memory.describe() == ""  # nothing to say: no DataLoader, the header line stays as it was
