"""Datasets and the training input pipeline.

Two kinds of data, one interface:

* :class:`InMemoryImages` — digits, CIFAR-10 and any ``.npz``: all images as one ``uint8`` tensor
  ``(N, C, H, W)``, moved to the training device once; batches are gathered and augmented there
  in one batched call (:func:`random_resized_crop_flip`), so data never holds up a small run.
* :class:`ImageFiles` — a folder of images (ImageFolder layout with class sub-folders, or a flat
  folder for unlabeled pretraining), decoded by DataLoader workers. Unreadable files (empty, cut,
  not images, over Pillow's decompression-bomb limit) are skipped and counted by reason, never
  fatal; huge images are decoded at reduced scale so memory stays bounded.

:func:`load_dataset` turns the ``--data`` string into one of them.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
BUILTIN = ("digits", "cifar10")


# ---------------------------------------------------------------------------------------------
# Augmentation (batched, on the training device)


def sample_crop_boxes(
    n: int, height: int, width: int, generator: torch.Generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), tries: int = 10
) -> torch.Tensor:
    """RandomResizedCrop boxes for a batch, ``(N, 4)`` as ``(top, left, h, w)`` in pixels.

    Same distribution as torchvision's RandomResizedCrop: area fraction uniform in ``scale``,
    log-aspect uniform in ``ratio``, up to ``tries`` attempts, else the whole image.
    """
    area = height * width * torch.empty(n, tries).uniform_(*scale, generator=generator)
    log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    h = torch.where(first >= 0, h[rows, first.clamp_min(0)], torch.full((n,), float(height)))
    w = torch.where(first >= 0, w[rows, first.clamp_min(0)], torch.full((n,), float(width)))
    top = torch.floor(torch.rand(n, generator=generator) * (height - h + 1))
    left = torch.floor(torch.rand(n, generator=generator) * (width - w + 1))
    return torch.stack([top, left, h, w], dim=1)


def random_resized_crop_flip(
    images: torch.Tensor, size: int, generator: torch.Generator, scale=(0.2, 1.0), flip: bool = True
) -> torch.Tensor:
    """Batched random-resized-crop (bicubic) and horizontal flip of ``uint8 (N, C, H, W)`` images.

    Returns floats in [0, 1] of shape ``(N, C, size, size)``. Every image gets its own crop; all
    random numbers come from ``generator`` (on the CPU), so runs are reproducible on any device.
    """
    n, _, height, width = images.shape
    boxes = sample_crop_boxes(n, height, width, generator, scale)
    flips = (torch.rand(n, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    return crop_flip(images, boxes, flips, size)


def crop_flip(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Resample given crop boxes ``(N, 4)`` (top, left, h, w) and flips ``(N,)`` to ``size``×``size``.

    One bicubic ``grid_sample`` for the whole batch. Split from the sampling so that distributed
    runs can draw the random numbers for the global batch and apply each rank's rows.
    """
    n, _, height, width = images.shape
    top, left, h, w = boxes.unbind(1)
    # Affine map from output coords in [-1, 1] to input coords (align_corners=False convention).
    sx, sy = w / width, h / height
    cx = (left + w / 2) / width * 2 - 1
    cy = (top + h / 2) / height * 2 - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flips, -sx, sx)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    theta = theta.to(images.device)
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    x = images.float().div_(255.0)
    out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: leave SIGINT/SIGTERM to the training process.

    Ctrl-C and SLURM's or torchrun's SIGTERM reach the whole process group. The training process
    then finishes its step and saves a checkpoint; workers that died on the signal would make the
    DataLoader raise in the middle of that. Workers still exit when the training process does.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Deterministic evaluation view: ``uint8 (N, C, H, W)`` → floats in [0, 1] at ``size``×``size``."""
    x = images.float().div(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp_(0.0, 1.0)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


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

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else int(self.labels.max()) + 1

    def subset(self, n: int | None) -> "InMemoryImages":
        if n is None or n >= len(self):
            return self
        labels = None if self.labels is None else self.labels[:n]
        return InMemoryImages(self.name, self.images[:n], labels, self.mean, self.std)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of a uint8 image tensor, computed in chunks."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for chunk in images.split(4096):
        x = chunk.double().div(255.0).transpose(0, 1).reshape(c, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(max(v, 1e-3), 4) for v in std.tolist())


def _from_arrays(name: str, x: np.ndarray, y: np.ndarray | None, stats_from: np.ndarray | None = None) -> InMemoryImages:
    """NHWC or NHW uint8 arrays → :class:`InMemoryImages` (NCHW)."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{name}: images must have shape (N, H, W), (N, H, W, 1) or (N, H, W, 3); got {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{name}: the image array is empty")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{name}: images must be numbers (uint8 0..255 or floats 0..1); got dtype {x.dtype}")
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise DataError(f"{name}: the images contain NaN or infinite values")
        if np.issubdtype(x.dtype, np.floating) and x.max() <= 1.0:
            x = np.round(x * 255)
        x = np.clip(x, 0, 255).astype(np.uint8)
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    labels = None
    if y is not None:
        y = np.asarray(y).reshape(-1)
        if y.shape[0] != images.shape[0]:
            raise DataError(f"{name}: {images.shape[0]} images but {y.shape[0]} labels")
        labels = torch.from_numpy(y.astype(np.int64))
    stats_images = images if stats_from is None else _from_arrays(name, stats_from, None).images
    mean, std = channel_stats(stats_images)
    return InMemoryImages(name, images, labels, mean, std)


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
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except Exception as exc:  # noqa: BLE001 — any unreadable archive gets the same message
        raise DataError(f"{path}: not a readable .npz archive ({exc.__class__.__name__}: {exc})") from None
    xk, yk = ("x_train", "y_train") if split == "train" else ("x_test", "y_test")
    if xk not in keys:
        if split != "train" and "x_train" in keys:
            raise DataError(f"{path}: has no {xk!r} array, so there is no held-out split; add x_test/y_test")
        raise DataError(
            f"{path}: missing key {xk!r} (found {sorted(keys)}); an .npz needs x_train (N,H,W[,C]) uint8 "
            "and optionally y_train, x_test, y_test"
        )
    try:
        x = archive[xk]
        y = archive[yk] if yk in keys else None
        stats = archive["x_train"] if split != "train" else None
    except Exception as exc:  # noqa: BLE001
        if "allow_pickle" in str(exc):
            raise DataError(f"{path}: {xk!r} holds pickled Python objects, which are never loaded (they could run "
                            "code); store plain numeric arrays") from None
        raise DataError(f"{path}: could not read {xk!r} ({exc.__class__.__name__}: {exc}); the file may be truncated") from None
    return _from_arrays(name, x, y, stats_from=stats)


def load_cifar10(data_dir: str | None, split: str) -> InMemoryImages:
    """CIFAR-10 from ``cifar10.npz`` or torchvision's ``cifar-10-batches-py`` in the data dirs.

    Downloads through torchvision only when neither is found (and the network allows).
    """
    candidates = data_dirs(data_dir)
    for d in candidates:
        if (d / "cifar10.npz").is_file():
            return load_npz(d / "cifar10.npz", split, name="cifar10")
        if (d / "cifar-10-batches-py").is_dir():
            return _torchvision_cifar(d, split, download=False)
    target = candidates[0] if candidates else Path("data")
    try:
        return _torchvision_cifar(target, split, download=True)
    except Exception as exc:  # noqa: BLE001 — no network, disk full, …: one clear message
        looked = ", ".join(str(d) for d in candidates)
        raise DataError(
            f"cifar10: not found in {looked} (looked for cifar10.npz or cifar-10-batches-py) and the download "
            f"failed ({exc.__class__.__name__}); pass --data-dir DIR or set CLMAE_DATA"
        ) from None


def _torchvision_cifar(root: Path, split: str, download: bool) -> InMemoryImages:
    from torchvision.datasets import CIFAR10

    train = CIFAR10(str(root), train=True, download=download)
    ds = train if split == "train" else CIFAR10(str(root), train=False, download=download)
    return _from_arrays("cifar10", ds.data, np.asarray(ds.targets), stats_from=train.data if split != "train" else None)


# -- image folders ----------------------------------------------------------------------------


class ImageTooLarge(ValueError):
    """More pixels than ``PIL.Image.MAX_IMAGE_PIXELS``: Pillow's decompression-bomb guard."""


def skip_reason(exc: BaseException) -> str:
    """``"category: detail"`` for a file that could not be used; the category is what gets counted."""
    from PIL import UnidentifiedImageError

    detail = f"{exc.__class__.__name__}: {str(exc)[:120]}"
    if isinstance(exc, (ImageTooLarge, Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too large: {detail} (Pillow's decompression-bomb guard; raise PIL.Image.MAX_IMAGE_PIXELS to allow)"
    if isinstance(exc, UnidentifiedImageError):
        return f"not an image: {detail}"
    if isinstance(exc, (OSError, SyntaxError, EOFError, ValueError, IndexError)):
        return f"truncated or corrupt: {detail}"
    return f"{exc.__class__.__name__}: {str(exc)[:120]}"


def _draft_size(width: int, height: int, min_side: int) -> tuple[int, int]:
    """The smallest size of the same aspect whose shorter side is at least ``min_side``."""
    short = min(width, height)
    return max(1, math.ceil(width * min_side / short)), max(1, math.ceil(height * min_side / short))


def open_image(path, channels: int = 3, min_side: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode any common image and convert it to RGB (or L): grayscale, RGBA, palette, 16-bit.

    ``min_side``: images whose shorter side is over twice that are decoded at reduced scale
    (JPEG ``draft``, free) or box-reduced right after decoding, so a huge photo costs little memory
    downstream. ``max_pixels`` (default: ``PIL.Image.MAX_IMAGE_PIXELS``) refuses bigger images
    before decoding them; Pillow's own decompression-bomb error is never silenced.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's harmless format warnings (EXIF, palette transparency, …)
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # …but never the size guard
        with Image.open(path) as img:
            if limit and img.width * img.height > limit:
                raise ImageTooLarge(f"{img.width}x{img.height} = {img.width * img.height} pixels > {limit}")
            if min_side and min(img.size) > 2 * min_side and img.format == "JPEG":
                img.draft(None, _draft_size(img.width, img.height, min_side))  # decode at 1/2, 1/4 or 1/8 scale
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                peak = float(arr.max()) if arr.size else 0.0
                if mode.startswith("I;16") or peak > 255:
                    hi = 65535.0
                elif mode == "F" and peak <= 1.0:
                    hi = 1.0  # float images in [0, 1]
                else:
                    hi = 255.0
                img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
            elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            out = img.convert("RGB" if channels == 3 else "L")
    if min_side and min(out.size) >= 2 * min_side:
        out = out.reduce(min(out.size) // min_side)  # box filter: anti-aliased, shorter side stays >= min_side
    return out


def _scan(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageFiles(torch.utils.data.Dataset):
    """A folder of images: ImageFolder layout (``root/class/x.png``, labeled) or flat (unlabeled).

    ``__getitem__`` never raises for a bad file: it returns ``(None, path, reason)`` and the
    collate function drops it and counts it, so one corrupt image among millions costs nothing.
    """

    def __init__(self, root: str | Path, channels: int = 3, transform=None, min_side: int | None = None):
        root = Path(root)
        if not root.exists():
            raise DataError(f"{root}: folder not found")
        if not root.is_dir():
            raise DataError(f"{root}: is not a folder or a known dataset (digits, cifar10, *.npz)")
        self.root = root
        self.channels = channels
        self.transform = transform
        # Decode huge images at reduced scale (see open_image); the trainer sets it from --img-size.
        self.min_side = min_side
        # Captured here so DataLoader workers apply the limit in force now, whatever their start method.
        self.max_pixels = Image.MAX_IMAGE_PIXELS
        direct = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if subdirs and not direct:
            self.classes = [d.name for d in subdirs]
            files, labels = [], []
            for label, d in enumerate(subdirs):
                found = _scan(d)
                files += found
                labels += [label] * len(found)
            self.files, self.labels = files, labels
        else:
            self.classes = []
            self.files, self.labels = _scan(root), None
        if not self.files:
            raise DataError(
                f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}); put images in the folder "
                "or in one sub-folder per class"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        label = -1 if self.labels is None else self.labels[index]
        try:
            if path.stat().st_size == 0:
                return None, str(path), "empty file: 0 bytes"
            img = open_image(path, self.channels, self.min_side, self.max_pixels)
            x = self.transform(img) if self.transform is not None else img
            return x, label, None
        except Exception as exc:  # noqa: BLE001 — any undecodable file is skipped with its reason
            return None, str(path), skip_reason(exc)


def collate_skipping(batch):
    """Stack the good samples; return ``(images, labels, skipped)`` with the skipped reasons."""
    good = [b for b in batch if b[0] is not None]
    skipped = [(b[1], b[2]) for b in batch if b[0] is None]
    if not good:
        return None, None, skipped
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    return images, labels, skipped


def _train_transform(size: int):
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
    ])


def _eval_transform(size: int):
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(size),
    ])


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

    def subset(self, n: int | None) -> "FolderData":
        """``n`` files drawn at random with a fixed seed (files are sorted by class, so not the first n)."""
        if n is None or n >= len(self.files):
            return self
        pick = sorted(torch.randperm(len(self.files), generator=torch.Generator().manual_seed(0))[:n].tolist())
        files = copy.copy(self.files)
        files.files = [self.files.files[i] for i in pick]
        files.labels = None if self.files.labels is None else [self.files.labels[i] for i in pick]
        return FolderData(self.name, files, self.mean, self.std)


Dataset = InMemoryImages | FolderData


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
    from .shards import is_shard_spec, load_shards  # tar shards: x.tar, x-{0000..0099}.tar, a folder of *.tar

    if is_shard_spec(data):
        return load_shards(data, split, channels)
    path = Path(data).expanduser()
    if path.suffix == ".npz":
        return load_npz(path, split)
    if not path.exists():
        raise DataError(f"--data: {data!r} is not a built-in dataset ({', '.join(BUILTIN)}), an .npz file or an existing folder")
    if path.is_file():
        raise DataError(f"--data: {data} is a file; give a folder of images, an .npz archive, or one of {', '.join(BUILTIN)}")
    split_dirs = {"train": ["train"], "test": ["val", "test"]}[split]
    for d in split_dirs:
        if (path / d).is_dir():
            path = path / d
            break
    else:
        if split == "test":
            raise DataError(f"{data}: no val/ or test/ sub-folder, so there is no held-out split")
    files = ImageFiles(path, channels=channels)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    return FolderData(str(data), files, mean, std)


# ---------------------------------------------------------------------------------------------
# Training batches


class SkippedFiles:
    """Batches decoded by DataLoader workers: skip bookkeeping and full-size batching.

    Unreadable inputs are counted once per file however many epochs see them. Subclasses set
    ``batch_size``, ``device``, ``_mean`` and ``_std``.
    """

    def __init__(self) -> None:
        self.bad_files: dict[str, str] = {}  # path (or shard key) → reason

    def record(self, skipped: list[tuple[str, str]]) -> None:
        for path, reason in skipped:
            self.bad_files.setdefault(path, reason)

    @property
    def skipped(self) -> Counter:
        """How many distinct files were skipped, by reason (``empty file``, ``not an image``, …)."""
        return Counter(reason.split(":")[0] for reason in self.bad_files.values())

    @property
    def skipped_examples(self) -> list[tuple[str, str]]:
        return list(self.bad_files.items())[:20]

    def full_batches(self, loader) -> Iterator[torch.Tensor]:
        """Normalised batches of exactly ``batch_size`` on the device from ``collate_skipping`` output.

        Skipped files shrink a loader batch; it is topped up from the next one so every step is full.
        """
        pending: list[torch.Tensor] = []
        count = 0
        for images, _, skipped in loader:
            self.record(skipped)
            if images is None:
                continue
            pending.append(images)
            count += images.shape[0]
            while count >= self.batch_size:
                cat = torch.cat(pending)
                batch, rest = cat[: self.batch_size], cat[self.batch_size :]
                pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
                x = batch.to(self.device, non_blocking=True).float().div_(255.0)
                yield (x - self._mean) / self._std


class TrainBatches(SkippedFiles):
    """Yields augmented, normalised training batches on ``device``, reproducibly per epoch.

    The order of epoch ``e`` is a permutation drawn from ``seed`` and ``e`` alone, so a run
    resumed at step ``s`` of an epoch sees exactly the batches an uninterrupted run would.
    The last incomplete batch is dropped (as with ``drop_last``), so every step has full size.
    """

    def __init__(self, dataset: Dataset, batch_size: int, img_size: int, device: torch.device, seed: int,
                 num_workers: int = 2):
        if len(dataset) < batch_size:
            raise DataError(
                f"{dataset.name}: {len(dataset)} training images, fewer than --batch-size {batch_size}; "
                "lower --batch-size or use more data"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.img_size = img_size
        self.device = device
        self.seed = seed
        self.num_workers = num_workers
        SkippedFiles.__init__(self)
        if isinstance(dataset, InMemoryImages):
            self._images = dataset.images.to(device)
        self._mean = torch.tensor(dataset.mean, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(dataset.std, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset) // self.batch_size

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.dataset), generator=g)

    def epoch(self, epoch: int, generator: torch.Generator, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Batches of ``epoch`` from ``start_step`` on; ``generator`` drives the augmentation."""
        order = self._order(epoch)[: len(self) * self.batch_size]
        if isinstance(self.dataset, InMemoryImages):
            for step in range(start_step, len(self)):
                idx = order[step * self.batch_size : (step + 1) * self.batch_size].to(self.device)
                x = random_resized_crop_flip(self._images.index_select(0, idx), self.img_size, generator)
                yield (x - self._mean) / self._std
        else:
            yield from self._folder_epoch(order[start_step * self.batch_size :], generator)

    def _folder_epoch(self, order: torch.Tensor, generator: torch.Generator) -> Iterator[torch.Tensor]:
        files = self.dataset.files
        files.transform = _train_transform(self.img_size)
        if files.min_side is None:
            # Random crops cover >= 20% of the area: 3x the input size keeps them sharp.
            files.min_side = 3 * self.img_size
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        loader = torch.utils.data.DataLoader(
            files,
            batch_size=self.batch_size,
            sampler=order.tolist(),
            num_workers=self.num_workers,
            collate_fn=collate_skipping,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=ignore_stop_signals if self.num_workers > 0 else None,
        )
        yielded = 0
        for batch in self.full_batches(loader):
            yielded += 1
            yield batch
        if yielded == 0 and len(order) >= self.batch_size:
            reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common()) or "none"
            raise DataError(
                f"{files.root}: not one batch of {self.batch_size} readable images in this epoch "
                f"({len(order)} files tried; unreadable so far: {reasons}); check the folder or lower --batch-size"
            )
