"""Labeled splits for evaluation: which images, which labels, and their deterministic evaluation view.

A :class:`LabeledSplit` is a loaded dataset's split (train or test) or a seeded random subset of it,
with an ``identity`` string that says exactly what data it is (used in cache keys and reports).
:func:`eval_batches` streams its images resized to the model's input and normalised, on the device.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.datasets import BUILTIN, FolderData, InMemoryImages
from ..data.images import eval_transform, normalize, open_image, resize_images
from ..data.loader import make_loader
from ..errors import DataError
from .options import show_progress


@dataclass
class LabeledSplit:
    """A labeled split of a dataset, optionally a seeded random subset (``indices`` into it)."""

    name: str
    split: str
    dataset: InMemoryImages | FolderData
    indices: torch.Tensor  # positions in ``dataset``, sorted
    labels: torch.Tensor  # labels of ``indices``
    identity: str  # what the data is, for cache keys

    def __len__(self) -> int:
        return int(self.indices.numel())


def labeled_split(dataset, split: str, max_items: int | None, seed: int, identity: str = "") -> LabeledSplit:
    """Wrap a loaded dataset, refusing unlabeled ones; keep a seeded random subset if capped."""
    labels = dataset.labels
    if labels is None:
        raise DataError(
            f"{dataset.name}: the {split} split has no labels; evaluation needs labeled data (an image folder with one "
            "sub-folder per class, an .npz with y_train/y_test, digits or cifar10)"
        )
    n = labels.numel()
    if max_items is not None and max_items < n:
        g = torch.Generator().manual_seed(seed * 7919 + (1 if split == "test" else 0))
        indices = torch.randperm(n, generator=g)[:max_items].sort().values
    else:
        indices = torch.arange(n)
    if (labels < 0).any():
        raise DataError(f"{dataset.name}: the {split} labels contain negative values; labels must be 0..C-1")
    digest = hashlib.sha1(indices.numpy().tobytes()).hexdigest()[:12]
    return LabeledSplit(dataset.name, split, dataset, indices, labels[indices], f"{identity}|{split}|{n}|{digest}")


def content_identity(split: LabeledSplit) -> str:
    """``split.identity`` plus, for image folders, a digest of every chosen file's path, size and time.

    Used where a result outlives the process (the feature cache on disk): an image replaced in a
    class sub-folder changes no folder's own modification time, but changes this.
    """
    if not isinstance(split.dataset, FolderData):
        return split.identity
    h = hashlib.sha1()
    files = split.dataset.files.files
    for i in split.indices.tolist():
        try:
            st = os.stat(files[i])
            h.update(f"{files[i]}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{files[i]}:missing\n".encode())
    return f"{split.identity}|files:{h.hexdigest()[:16]}"


def data_identity(data: str, data_dir: str | None) -> str:
    """What ``--data`` points at, for cache keys: a path with its modification time and size, or a built-in name."""
    path = Path(data).expanduser()
    if data not in BUILTIN and path.exists():
        st = path.stat()
        return f"{path.resolve()}:{st.st_mtime_ns}:{st.st_size}"
    return f"{data}:{data_dir or ''}"


def eval_batches(split: LabeledSplit, img_size: int, mean, std, device: torch.device, batch_size: int,
                 num_workers: int = 2, progress: bool = False,
                 desc: str = "") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised evaluation views ``(x, y)`` on ``device``; unreadable folder images are dropped."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(split), desc=desc, unit="img", disable=not show_progress(progress), leave=False,
               dynamic_ncols=True)
    try:
        if isinstance(split.dataset, InMemoryImages):
            images = split.dataset.images
            for idx, y in zip(split.indices.split(batch_size), split.labels.split(batch_size)):
                x = resize_images(images.index_select(0, idx).to(device, non_blocking=True), img_size)
                bar.update(len(idx))
                yield normalize(x, mean, std), y
            return
        files = copy.copy(split.dataset.files)
        files.transform = eval_transform(img_size)
        loader = make_loader(torch.utils.data.Subset(files, split.indices.tolist()), batch_size, device, num_workers)
        skipped = 0
        for images, labels, bad in loader:
            skipped += len(bad)
            bar.update((0 if images is None else images.shape[0]) + len(bad))
            if images is None:
                continue
            x = images.to(device, non_blocking=True).float().div_(255.0)
            yield normalize(x, mean, std), labels
        if skipped:
            print(f"clmae: skipped {skipped} unreadable image(s) in {split.name} ({split.split})", file=sys.stderr)
    finally:
        bar.close()


def class_count(train: LabeledSplit, test: LabeledSplit) -> int:
    """Classes of a train/test pair; image folders must have the same class sub-folders in both."""
    if isinstance(train.dataset, FolderData):
        train_classes, test_classes = train.dataset.files.classes, test.dataset.files.classes
        if train_classes != test_classes:
            missing = [c for c in train_classes if c not in test_classes]
            extra = [c for c in test_classes if c not in train_classes]
            what = "; ".join(part for part in (
                f"the held-out folder lacks {', '.join(map(repr, missing))}" if missing else "",
                f"it has {', '.join(map(repr, extra))}, which train lacks" if extra else "") if part)
            shown = ", ".join(train_classes[:10]) + (", …" if len(train_classes) > 10 else "")
            raise DataError(f"{train.name}: the train and val/test folders have different class sub-folders ({what}; "
                            f"train has {len(train_classes)}: {shown}); give both the same class sub-folders")
        return len(train_classes)
    if train.dataset.classes:  # text labels: every class named in the file, present in these splits or not
        return len(train.dataset.classes)
    return int(max(train.labels.max(), test.labels.max())) + 1


def holdout_splits(dataset, fraction: float, seed: int, max_train: int | None, max_test: int | None,
                   identity: str) -> tuple[LabeledSplit, LabeledSplit]:
    """``(train, test)`` from one labeled split: a seeded random ``fraction`` of it held out, for data without
    a test split of its own (an image folder without ``val/``, an .npz without ``x_test``)."""
    full = labeled_split(dataset, "train", None, seed, identity)
    n = len(full)
    held = max(1, round(n * fraction))
    if held >= n:
        raise DataError(f"{dataset.name}: --holdout {fraction} of {n} images leaves nothing to train on; "
                        "choose a smaller fraction")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 2))
    parts = {}
    for split, picked, cap in (("train", order[held:], max_train), ("test", order[:held], max_test)):
        if cap is not None and cap < len(picked):
            picked = picked[torch.randperm(len(picked), generator=torch.Generator().manual_seed(seed))[:cap]]
        indices = picked.sort().values
        digest = hashlib.sha1(indices.numpy().tobytes()).hexdigest()[:12]
        parts[split] = LabeledSplit(dataset.name, split, dataset, indices, full.labels[indices],
                                    f"{identity}|holdout {fraction} seed {seed}|{split}|{n}|{digest}")
    return parts["train"], parts["test"]


# ---------------------------------------------------------------------------------------------
# A few fixed images (probe, pictures)


def choose_indices(total: int, seed: int) -> list[int]:
    """A seeded random order of ``range(total)``: the first ones form the batch, the rest are spares."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()


def eval_images(dataset, indices: list[int], size: int, limit: int | None = None) -> tuple[list[int], torch.Tensor]:
    """The evaluation view of ``dataset[indices]``: floats in [0, 1], ``(N, C, size, size)``.

    In-memory sets are resized with :func:`clmae.data.images.resize_images`; image files get
    :func:`clmae.data.images.eval_transform` (short side resized, centre-cropped). Unreadable files are
    passed over; at most ``limit`` images are returned (default: all). Returns the indices actually
    used and the images.
    """
    limit = len(indices) if limit is None else limit
    if isinstance(dataset, InMemoryImages):
        used = indices[:limit]
        return used, resize_images(dataset.images[torch.tensor(used, dtype=torch.long)], size)
    view = eval_transform(size)
    used, images = [], []
    for i in indices:
        if len(used) == limit:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = open_image(dataset.files.files[i], dataset.channels)
        except Exception:  # noqa: BLE001 — an unreadable file is simply not chosen
            continue
        used.append(i)
        images.append(resize_images(view(img).unsqueeze(0), size)[0])
    if not images:
        raise DataError(f"{dataset.name}: none of the chosen images could be read")
    return used, torch.stack(images)
