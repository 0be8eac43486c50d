"""Shared fixtures: small, fast, CPU-only."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
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


def stopped_and_resumed(options: dict, epochs: int, folder: Path):
    """The run of ``options`` for ``epochs`` in ``folder``, stopped after its first epoch (as a Ctrl-C there
    would), then continued by ``--resume``; returns the resumed run's result."""
    from clmae.config import make_config
    from clmae.train.trainer import Trainer, pretrain

    part = Trainer(make_config(dict(epochs=epochs, output_dir=str(folder), **options)))
    part.callbacks.append(StopAfterFirstEpoch())
    part.fit()
    assert part.position.epoch == 1
    resumed = pretrain(resume=str(folder), progress=False)
    assert resumed.epochs_done == epochs
    return resumed


def assert_same_weights(checkpoint_a, checkpoint_b) -> None:
    """Two ``.pt`` resume files hold bit-identical weights (the same names, equal tensors)."""
    a = torch.load(checkpoint_a, weights_only=True)["weights"]
    b = torch.load(checkpoint_b, weights_only=True)["weights"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar10_like(train: int = 512, test: int = 128, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` as CIFAR-10 stores them (uint8 (N, 32, 32, 3), uint8 labels 0-9),
    drawn from scikit-learn's 8x8 digits (bundled with it, BSD-3; the UCI digits, CC BY 4.0): each digit scaled
    up 4x, in its own foreground and background colour, with noise. Learnable like photos of ten classes, built
    here, so no test needs the real CIFAR-10 (which has no licence to ship it under)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(digits.images))[: train + test]
    shape = digits.images[pick] / 16.0  # (N, 8, 8) in 0..1
    big = np.kron(shape, np.ones((1, 4, 4)))[..., None]  # (N, 32, 32, 1)
    fg = rng.uniform(140, 255, (len(pick), 1, 1, 3))
    bg = rng.uniform(0, 110, (len(pick), 1, 1, 3))
    x = bg + (fg - bg) * big + rng.normal(0, 8, (len(pick), 32, 32, 3))
    x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    y = digits.target[pick].astype(np.uint8)
    return x[:train], y[:train], x[train:], y[train:]


def write_cifar10_npz(folder: Path, arrays) -> Path:
    """``folder/cifar10.npz`` with CIFAR-10's keys, dtypes and shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = arrays
    np.savez_compressed(folder / "cifar10.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return folder


def write_cifar10_batches(folder: Path, arrays, batches: int = 5) -> Path:
    """``folder/cifar-10-batches-py/`` as the official Python version has it: ``data_batch_1..5`` and
    ``test_batch``, pickled dicts (protocol 2) of ``data`` (uint8 (N, 3072): the red, green, blue planes of each
    image), ``labels`` (a list), ``batch_label`` and ``filenames``, plus ``batches.meta`` with the class names."""
    out = folder / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = arrays

    def dump(name: str, x: np.ndarray, y: np.ndarray, label: str) -> None:
        batch = {"batch_label": label, "labels": [int(v) for v in y],
                 "data": np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), -1)),
                 "filenames": [f"{CIFAR_CLASSES[int(v)]}_s_{i:06d}.png" for i, v in enumerate(y)]}
        raw = pickle.dumps(batch, protocol=2)  # the originals name numpy's array rebuilder by its old module
        (out / name).write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))

    for i, part in enumerate(np.array_split(np.arange(len(x_train)), batches), 1):
        dump(f"data_batch_{i}", x_train[part], y_train[part], f"training batch {i} of {batches}")
    dump("test_batch", x_test, y_test, "testing batch 1 of 1")
    meta = {"num_cases_per_batch": -(-len(x_train) // batches), "label_names": CIFAR_CLASSES, "num_vis": 3072}
    (out / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


@pytest.fixture(scope="session")
def cifar_arrays():
    return cifar10_like()


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory, cifar_arrays) -> Path:
    """A folder holding ``cifar10.npz`` in CIFAR-10's format (built by :func:`cifar10_like`, 512 + 128 images)."""
    return write_cifar10_npz(tmp_path_factory.mktemp("cifar-npz"), cifar_arrays)


@pytest.fixture(scope="session")
def cifar_batches_dir(tmp_path_factory, cifar_arrays) -> Path:
    """A folder holding ``cifar-10-batches-py/`` (torchvision's download) with the same images as :func:`cifar_dir`."""
    return write_cifar10_batches(tmp_path_factory.mktemp("cifar-batches"), cifar_arrays)
