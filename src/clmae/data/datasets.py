"""Datasets: what ``--data`` names, loaded into one of three shapes.

* :class:`InMemoryImages` — digits, CIFAR-10 and any ``.npz``: all images as one ``uint8`` tensor
  ``(N, C, H, W)`` plus labels and normalisation statistics; training moves it to the device once
  and augments batches there (:mod:`clmae.data.augment`), so data never holds up a small run.
* :class:`ImageFiles` — a folder of images (ImageFolder layout with class sub-folders, or a flat
  folder for unlabeled pretraining), decoded by DataLoader workers. Unreadable files (empty, cut,
  not images, over Pillow's decompression-bomb limit) are skipped and counted by reason, never
  fatal; huge images are decoded at reduced scale so memory stays bounded.
* :class:`~clmae.data.shards.ShardData` — tar shards, streamed (:mod:`clmae.data.shards`).

:func:`load_dataset` turns the ``--data`` string into one of them; :func:`scan_data` measures its
native image size and channels (a sample of file headers for folders), from which the default
model is chosen; :mod:`clmae.data.loader` turns a dataset into training batches.
"""

from __future__ import annotations

import copy
import os
import pickle
import statistics
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .images import (
    GRAY_MODES,
    CropDecoder,
    ImageTooLarge,
    channel_stats,
    default_stats,
    list_image_folder,
    open_image,
    skip_reason,
)
from .shards import ShardData, is_shard_spec, load_shards

BUILTIN = ("digits", "cifar10")  # dataset names --data accepts besides paths


class NoHeldOutSplit(DataError):
    """The data has only a training split (an image folder without ``val/``, an .npz without ``x_test``)."""


def dataset_label(data: str) -> str:
    """A short name for ``--data`` in file and folder names: the built-in name or the path's stem."""
    return data if data in BUILTIN else Path(data).stem


# ---------------------------------------------------------------------------------------------
# Datasets


@dataclass
class InMemoryImages:
    """Images as one ``uint8 (N, C, H, W)`` tensor, optional integer labels, normalisation stats."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped: Counter = field(default_factory=Counter)
    classes: list[str] | None = None  # the names of text labels, by class index (None: integer labels)
    notes: list[str] = field(default_factory=list)  # how the arrays were read (layout, labels), said once per run

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def num_classes(self) -> int | None:
        if self.labels is None:
            return None
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    def subset(self, n: int | None) -> InMemoryImages:
        if n is None or n >= len(self):
            return self
        labels = None if self.labels is None else self.labels[:n]
        return InMemoryImages(self.name, self.images[:n], labels, self.mean, self.std, classes=self.classes,
                              notes=self.notes)


def _channels_last(name: str, x: np.ndarray, notes: list[str]) -> np.ndarray:
    """``(N, C, H, W)`` arrays (PyTorch's layout) become ``(N, H, W, C)``, with a note; others pass unchanged."""
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        notes.append(f"{name}: images are channels-first {tuple(x.shape)}; read as (N, H, W, C) = "
                     f"{(x.shape[0], x.shape[2], x.shape[3], x.shape[1])}")
        return np.moveaxis(x, 1, -1)
    return x


def _pixels(name: str, x: np.ndarray) -> np.ndarray:
    """Any numeric array of pixels as ``uint8`` 0..255: floats in 0..1 are scaled; what cannot be pixels is refused."""
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * 255
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{name}: images must be numbers (uint8 0..255 or floats 0..1); got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise DataError(f"{name}: the images contain NaN or infinite values")
    lo, hi = (x.min().item(), x.max().item()) if x.size else (0, 0)
    if lo < 0 or hi > 255:
        raise DataError(f"{name}: pixel values range from {lo:g} to {hi:g}, outside 0..255; store uint8 0..255 or "
                        "floats 0..1 (not normalised or 16-bit values)")
    if np.issubdtype(x.dtype, np.floating) and hi <= 1.0:
        x = np.round(x * 255)
    return x.astype(np.uint8)


def _labels(name: str, y: np.ndarray, n: int, classes: list[str] | None, notes: list[str]) -> torch.Tensor:
    """Class indices ``0..C-1`` from integer labels, whole-number floats, one-hot rows or strings (via ``classes``)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[0] == n and y.shape[1] > 1:  # one-hot (N, C)
        if not (np.isin(y, (0, 1)).all() and (y.sum(1) == 1).all()):
            raise DataError(f"{name}: labels of shape {y.shape} are not one-hot rows; store one class index per image")
        notes.append(f"{name}: one-hot labels {y.shape} read as class indices")
        y = y.argmax(1)
    y = y.reshape(-1)
    if y.shape[0] != n:
        raise DataError(f"{name}: {n} images but {y.shape[0]} labels")
    if y.dtype.kind in "US":  # text labels: 'cat', 'dog', ... (classes: sorted, from every split)
        names = [v.decode() if isinstance(v, bytes) else str(v) for v in y.tolist()]
        index = {c: i for i, c in enumerate(classes or sorted(set(names)))}
        missing = sorted(set(names) - set(index))
        if missing:
            raise DataError(f"{name}: labels {missing[:5]} are not among the classes {sorted(index)[:10]}")
        return torch.tensor([index[v] for v in names], dtype=torch.int64)
    if y.dtype == np.bool_:
        y = y.astype(np.int64)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{name}: labels must be integers 0..C-1 or text; got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise DataError(f"{name}: labels must be whole numbers (class indices 0..C-1); found fractions, NaN or "
                            "infinite values")
    if y.size and y.min() < 0:
        raise DataError(f"{name}: labels must be class indices 0..C-1; found {y.min():g}")
    return torch.from_numpy(y.astype(np.int64))


def _from_arrays(name: str, x: np.ndarray, y: np.ndarray | None, stats_from: np.ndarray | None = None,
                 classes: list[str] | None = None, notes: list[str] | None = None) -> InMemoryImages:
    """NHWC, NCHW or NHW arrays → :class:`InMemoryImages` (NCHW uint8); ``notes`` collects what was converted."""
    notes = [] if notes is None else notes
    x = _channels_last(name, np.asarray(x), notes)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{name}: images must have shape (N, H, W), (N, H, W, 1), (N, H, W, 3) or (N, 1|3, H, W); "
                        f"got {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{name}: the image array is empty")
    x = _pixels(name, x)
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    labels = None if y is None else _labels(name, y, images.shape[0], classes, notes)
    stats_images = images if stats_from is None else _from_arrays(name, stats_from, None).images
    mean, std = channel_stats(stats_images)
    return InMemoryImages(name, images, labels, mean, std, classes=classes, notes=notes)


def load_digits(split: str) -> InMemoryImages:
    """scikit-learn's 8×8 handwritten digits (1,797 images), split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 → 0..255
    y = bunch.target
    order = np.random.RandomState(0).permutation(len(x))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    idx = train if split == "train" else test
    return _from_arrays("digits", x[idx], y[idx], stats_from=x[train])


def data_dirs(data_dir: str | None) -> list[Path]:
    """Where built-in datasets are looked for: ``--data-dir``, ``$CLMAE_DATA``, ``./data``."""
    dirs = [data_dir, os.environ.get("CLMAE_DATA"), "data"]
    return [Path(d).expanduser() for d in dirs if d]


def load_npz(path: Path, split: str, name: str | None = None) -> InMemoryImages:
    """An ``.npz`` with ``x_train``/``y_train`` (and optionally ``x_test``/``y_test``)."""
    name = name or path.name
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle and answer about allow_pickle
        raise DataError(f"{path}: not a readable .npz archive (not a zip file: cut short, or not written by "
                        "numpy.savez)")
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except Exception as exc:  # noqa: BLE001 — any unreadable archive gets the same message
        raise DataError(f"{path}: not a readable .npz archive ({exc.__class__.__name__}: {exc})") from None
    xk, yk = ("x_train", "y_train") if split == "train" else ("x_test", "y_test")
    if xk not in keys:
        if split != "train" and "x_train" in keys:
            raise NoHeldOutSplit(f"{path}: has no {xk!r} array, so there is no held-out split; add x_test/y_test")
        raise DataError(
            f"{path}: missing key {xk!r} (found {sorted(keys)}); an .npz needs x_train (N,H,W[,C]) uint8 "
            "and optionally y_train, x_test, y_test"
        )
    try:
        x = archive[xk]
        y = archive[yk] if yk in keys else None
        stats = archive["x_train"] if split != "train" else None
        classes = _text_classes(archive, keys, path) if y is not None and y.dtype.kind in "US" else None
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 — numpy raises ValueError, zip and OS errors alike for a bad member
        if "allow_pickle" in str(exc):
            raise DataError(f"{path}: {xk!r} holds pickled Python objects, which are never loaded (they could run "
                            "code); store plain numeric arrays") from None
        raise DataError(f"{path}: could not read {xk!r} ({exc.__class__.__name__}: {exc}); "
                        "the file may be truncated") from None
    notes: list[str] = []
    if classes:
        shown = ", ".join(f"{c}={i}" for i, c in enumerate(classes[:12])) + (", …" if len(classes) > 12 else "")
        notes.append(f"{name}: text labels read as {len(classes)} classes in sorted order ({shown})")
    return _from_arrays(name, x, y, stats_from=stats, classes=classes, notes=notes)


def _text_classes(archive, keys: set[str], path: Path) -> list[str]:
    """The sorted names of text labels over every split, so train and test number the classes alike."""
    names: set[str] = set()
    for key in ("y_train", "y_test"):
        if key in keys:
            y = archive[key]
            if y.dtype.kind not in "US":
                raise DataError(f"{path}: {key!r} holds numbers but another split's labels are text; use one kind")
            names.update(v.decode() if isinstance(v, bytes) else str(v) for v in y.reshape(-1).tolist())
    return sorted(names)


CIFAR_BATCHES = "cifar-10-batches-py"
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def load_cifar10(data_dir: str | None, split: str) -> InMemoryImages:
    """CIFAR-10 from ``cifar10.npz`` or the ``cifar-10-batches-py`` folder (the official Python version, as
    torchvision downloads it) in the data dirs. Nothing is downloaded: a missing copy is one line saying how."""
    candidates = data_dirs(data_dir)
    for d in candidates:
        if (d / "cifar10.npz").is_file():
            return load_npz(d / "cifar10.npz", split, name="cifar10")
        if (d / CIFAR_BATCHES).is_dir():
            return load_cifar_batches(d / CIFAR_BATCHES, split)
    looked = ", ".join(str(d) for d in candidates)
    raise DataError(
        f"cifar10: not found in {looked} (looked for cifar10.npz or {CIFAR_BATCHES}/); clmae downloads nothing: "
        "fetch it with `python -c \"import torchvision; torchvision.datasets.CIFAR10('data', download=True)\"`, "
        "then pass --data-dir DIR or set CLMAE_DATA"
    )


class _ArraysOnly(pickle.Unpickler):
    """Unpickles the CIFAR-10 batch files' dicts, lists and numpy arrays, and refuses every other object (a pickle
    can name any function to call; these files need only numpy's array rebuilders)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} (only numpy arrays are read)")
        if name == "_reconstruct":  # numpy 2 moved numpy.core to numpy._core; both names are one function
            return np.ndarray.__reduce__(np.zeros(0))[0]
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; {path.parent} should hold "
                        f"{', '.join(CIFAR_FILES['train'] + CIFAR_FILES['test'])}") from None
    except Exception as exc:  # noqa: BLE001 — truncated, not a pickle, a refused object: one message
        raise DataError(f"{path}: not a readable CIFAR-10 batch file ({exc.__class__.__name__}: {exc})") from None
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()} if isinstance(batch, dict) else {}
    if not isinstance(batch.get("data"), np.ndarray) or "labels" not in batch:
        raise DataError(f"{path}: not a CIFAR-10 batch file (no 'data' array and 'labels' list)")
    return batch


def _cifar_arrays(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x (N, 32, 32, 3) uint8, y (N,))`` of one split from the batch files: rows of 3072 bytes, R then G then B."""
    xs, ys = [], []
    for file in CIFAR_FILES[split]:
        batch = _read_batch(folder / file)
        data = batch["data"]
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{folder / file}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar_batches(folder: Path, split: str) -> InMemoryImages:
    """CIFAR-10's ``cifar-10-batches-py`` folder, read without running its pickles' code (:class:`_ArraysOnly`)."""
    x, y = _cifar_arrays(folder, split)
    stats = _cifar_arrays(folder, "train")[0] if split != "train" else None
    return _from_arrays("cifar10", x, y, stats_from=stats)


# -- image folders ----------------------------------------------------------------------------


class ImageFiles(torch.utils.data.Dataset):
    """A folder of images: ImageFolder layout (``root/class/x.png``, labeled) or flat (unlabeled).

    ``__getitem__`` never raises for a bad file: it returns ``(None, path, reason)`` and the
    collate function drops it and counts it, so one corrupt image among millions costs nothing.
    """

    def __init__(self, root: str | Path, channels: int = 3, transform=None, min_side: int | None = None):
        self.root = Path(root)
        self.files, self.labels, self.classes = list_image_folder(self.root)
        self.channels = channels
        self.transform = transform
        # Decode huge images at reduced scale (see open_image); the trainer sets it from --img-size.
        self.min_side = min_side
        # Captured here so DataLoader workers apply the limit in force now, whatever their start method.
        self.max_pixels = Image.MAX_IMAGE_PIXELS

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        label = -1 if self.labels is None else self.labels[index]
        try:
            if path.stat().st_size == 0:
                return None, str(path), "empty file: 0 bytes"
            if isinstance(self.transform, CropDecoder):  # decodes the file itself, only as large as its crop needs
                return self.transform(path, self.channels, self.max_pixels), label, None
            img = open_image(path, self.channels, self.min_side, self.max_pixels)
            x = self.transform(img) if self.transform is not None else img
            return x, label, None
        except Exception as exc:  # noqa: BLE001 — any undecodable file is skipped with its reason
            return None, str(path), skip_reason(exc)


@dataclass
class FolderData:
    """An image folder plus what the trainer needs to know about it."""

    name: str
    files: ImageFiles
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def channels(self) -> int:
        return self.files.channels

    @property
    def labels(self):
        return None if self.files.labels is None else torch.tensor(self.files.labels)

    @property
    def num_classes(self) -> int | None:
        return len(self.files.classes) or None

    def with_channels(self, channels: int) -> FolderData:
        """The same files decoded to ``channels`` (1: grayscale, 3: RGB), with the matching default statistics."""
        if channels == self.channels:
            return self
        files = copy.copy(self.files)
        files.channels = channels
        mean, std = default_stats(channels)
        return FolderData(self.name, files, mean, std)

    def subset(self, n: int | None) -> FolderData:
        """``n`` files drawn at random with a fixed seed (files are sorted by class, so not the first n)."""
        if n is None or n >= len(self.files):
            return self
        pick = sorted(torch.randperm(len(self.files), generator=torch.Generator().manual_seed(0))[:n].tolist())
        files = copy.copy(self.files)
        files.files = [self.files.files[i] for i in pick]
        files.labels = None if self.files.labels is None else [self.files.labels[i] for i in pick]
        return FolderData(self.name, files, self.mean, self.std)


Dataset = InMemoryImages | FolderData | ShardData


def load_dataset(data: str, data_dir: str | None = None, split: str = "train", channels: int = 3) -> Dataset:
    """Resolve ``--data``: ``digits``, ``cifar10``, a ``.npz`` file, or a folder of images.

    For a folder with ``train/`` and ``val/`` sub-folders, ``split`` picks one (``test`` → ``val/``).
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if data == "digits":
        return load_digits(split)
    if data == "cifar10":
        return load_cifar10(data_dir, split)
    if is_shard_spec(data):  # tar shards: x.tar, x-{0000..0099}.tar, a folder of *.tar
        return load_shards(data, split, channels)
    path = Path(data).expanduser()
    if path.suffix == ".npz":
        return load_npz(path, split)
    if not path.exists():
        raise DataError(f"--data: {data!r} is not a built-in dataset ({', '.join(BUILTIN)}), an .npz file "
                        "or an existing folder")
    if path.is_file():
        raise DataError(f"--data: {data} is a file; give a folder of images, an .npz archive, "
                        f"or one of {', '.join(BUILTIN)}")
    split_dirs = {"train": ["train"], "test": ["val", "test"]}[split]
    for d in split_dirs:
        if (path / d).is_dir():
            path = path / d
            break
    else:
        if split == "test":
            raise NoHeldOutSplit(f"{data}: no val/ or test/ sub-folder, so there is no held-out split")
    files = ImageFiles(path, channels=channels)
    mean, std = default_stats(channels)
    return FolderData(str(data), files, mean, std)


# ---------------------------------------------------------------------------------------------
# What the data looks like: native size and channels (the default model is chosen from them)

SCAN_SAMPLE = 200  # file headers read to measure a folder


def skip_summary(counts: Counter) -> str:
    """``"3 files skipped: not an image × 2, empty file × 1"``: every reason, with its count."""
    total = sum(counts.values())
    reasons = ", ".join(f"{reason} × {n}" for reason, n in counts.most_common())
    return f"{total} file{'s' if total != 1 else ''} skipped: {reasons}"


@dataclass(frozen=True)
class DataScan:
    """The data's native image size (shorter side, px) and channels, and how they were measured."""

    size: int | None  # None when not measured (tar shards)
    channels: int
    note: str  # e.g. "median shorter side of 200 sampled files, 40-80 px"
    skipped: Counter = field(default_factory=Counter)  # unreadable files met while scanning, by reason


def _header(path: Path, limit: int | None) -> tuple[int, int, str] | str:
    """``(width, height, mode)`` from the file's header (pixels are not decoded), or why it is unusable."""
    try:
        if path.stat().st_size == 0:
            return "empty file: 0 bytes"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                width, height, mode = img.width, img.height, img.mode
        if limit and width * height > limit:
            raise ImageTooLarge(f"{width}x{height} = {width * height} pixels > {limit}")
        return width, height, mode
    except Exception as exc:  # noqa: BLE001 — any unusable file gets its reason, as in training
        return skip_reason(exc)


def scan_folder(folder: FolderData, sample: int = SCAN_SAMPLE, seed: int = 0) -> DataScan:
    """Median shorter side and grayscale-or-not of a seeded sample of the folder's image headers.

    A folder where no file is a readable image is a :class:`DataError` listing every skip reason
    with its count (when the sample finds none, every file is checked before saying so).
    """
    files = folder.files.files
    limit = folder.files.max_pixels
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    picked = order[:sample]
    skipped: Counter = Counter()
    sides: list[int] = []
    gray = True
    for pass_indices in (picked, order[sample:]):
        for i in pass_indices:
            found = _header(files[i], limit)
            if isinstance(found, str):
                skipped[found.split(":")[0]] += 1
                continue
            width, height, mode = found
            sides.append(min(width, height))
            gray = gray and mode in GRAY_MODES
        if sides:
            break
    if not sides:
        raise DataError(f"{folder.files.root}: no readable image among {len(files)} files ({skip_summary(skipped)}); "
                        "check the folder")
    sampled = "sampled " if len(files) > len(picked) else ""
    note = (f"median shorter side of {len(sides)} {sampled}images, {min(sides)}-{max(sides)} px"
            if min(sides) != max(sides) else f"all {len(sides)} {sampled}images {sides[0]} px")
    return DataScan(int(statistics.median_low(sides)), 1 if gray else 3, note, skipped)


def scan_data(dataset: Dataset, sample: int = SCAN_SAMPLE, seed: int = 0) -> DataScan:
    """Native size and channels: from the array shape in memory, from file headers for folders."""
    if isinstance(dataset, InMemoryImages):
        _, channels, height, width = dataset.images.shape
        note = f"{height}x{width} px" if height != width else ""
        return DataScan(min(height, width), channels, note)
    if isinstance(dataset, FolderData):
        return scan_folder(dataset, sample, seed)
    return DataScan(None, dataset.channels, "tar shards are not scanned")
