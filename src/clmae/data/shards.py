"""Streaming training images from tar shards (the WebDataset layout), for image sets too big for folders.

A shard is a plain ``.tar`` whose members are grouped into samples by key: ``KEY.jpg`` (any
image extension) plus optionally ``KEY.cls`` (an integer label). ``--data`` may name one shard
(``train-0000.tar``), a brace range (``shards/train-{0000..1023}.tar``), a glob, or a folder of
``*.tar`` (a folder with ``train/``/``val/`` sub-folders of shards picks the split).

Reading is sequential (``tarfile`` stream mode), so shards on network file systems or object-store
mounts are read at full speed. Each epoch shuffles the shard order with ``seed + epoch``; rank
``r`` of ``N`` and DataLoader worker ``w`` of ``K`` read every ``N·K``-th shard, and samples are
mixed in a shuffle buffer. Every rank produces the same number of batches per epoch (its shards
are cycled if it runs short), so no rank ever waits for another in a collective.

``python -m clmae.data.shards SRC_FOLDER OUT_FOLDER`` turns an image folder into shards.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import random
import re
import statistics
import sys
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import DataError
from .images import (
    GRAY_MODES,
    IMAGE_EXTENSIONS,
    CropDecoder,
    default_stats,
    list_image_folder,
    open_image,
    upright_size,
)

SIZES_FILE = "sizes.json"  # {shard file name: number of samples}, written by write_shards
IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}
SHUFFLE_BUFFER = 512


# ---------------------------------------------------------------------------------------------
# Finding shards


def expand_braces(pattern: str) -> list[str]:
    """Expand numeric ranges ``{000..127}`` (zero padding kept) and lists ``{a,b}``, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise DataError(f"--data: empty range {{{body}}} in {pattern!r}")
        width = len(r.group(1))
        items = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    return [s for item in items for s in expand_braces(head + item + tail)]


def is_shard_spec(data: str) -> bool:
    """Whether ``--data`` names tar shards rather than an image folder or a built-in set."""
    if ".tar" in data and ("{" in data or "*" in data or "?" in data or data.endswith(".tar")):
        return True
    path = Path(data).expanduser()
    if not path.is_dir():
        return False
    if (path / "train").is_dir():  # train/ decides: shards in it, or an image folder
        return any((path / "train").glob("*.tar"))
    # A folder of shards holds .tar files (and sizes.json …) but no images or class folders; an
    # ImageNet download's ILSVRC2012_img_train.tar beside the class folders is not a shard set.
    entries = list(path.iterdir())
    return (any(p.suffix == ".tar" and p.is_file() for p in entries)
            and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in entries)
            and not any(p.is_dir() and p.name not in ("val", "test") for p in entries))


def find_shards(data: str, split: str = "train") -> list[Path]:
    """The shard files ``--data`` names, sorted; a folder's ``val/`` (or ``test/``) for ``split='test'``."""
    path = Path(data).expanduser()
    if path.is_dir():
        if split == "train":
            folder = path / "train" if (path / "train").is_dir() else path
        else:
            folder = next((path / d for d in ("val", "test") if any((path / d).glob("*.tar"))), None)
            if folder is None:
                raise DataError(f"{data}: no val/ or test/ sub-folder with .tar shards, so there is no held-out split")
        shards = sorted(folder.glob("*.tar"))
    else:
        if split != "train":
            raise DataError(f"{data}: a list of shards has no held-out split; give a folder with train/ and val/ "
                            "shards")
        names = expand_braces(str(path))
        shards = []
        for name in names:
            if any(c in name for c in "*?["):
                p = Path(name)
                shards += sorted(p.parent.glob(p.name))
            else:
                shards.append(Path(name))
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"--data: shard {missing[0]} not found{more}; check the pattern {data!r}")
    if not shards:
        raise DataError(f"--data: {data!r} matches no .tar shards")
    return shards


# ---------------------------------------------------------------------------------------------
# Reading


def split_key(name: str) -> tuple[str, str]:
    """``dir/abc.seg.jpg`` → ``("dir/abc", "seg.jpg")``: the key ends at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """Stream ``(key, {extension: bytes}, error)`` from one shard, members grouped by key.

    A truncated or corrupt shard ends with one ``error`` entry instead of raising, so one bad
    shard among thousands costs its remaining samples, not the run.
    """
    key, parts = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_key(member.name)
                if k != key:
                    if key is not None and parts:
                        yield key, parts, None
                    key, parts = k, {}
                fh = tar.extractfile(member)
                parts[ext] = fh.read() if fh is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        if key is not None and parts:
            yield key, parts, None
        yield f"{path}", {}, f"unreadable shard ({exc.__class__.__name__}: {str(exc)[:80]})"
        return
    if key is not None and parts:
        yield key, parts, None


def image_part(parts: dict[str, bytes]) -> bytes | None:
    for ext, data in parts.items():
        if ext.rpartition(".")[2] in IMAGE_EXTS:
            return data
    return None


def count_samples(path: Path) -> int:
    """Number of samples with an image in one shard (reads the tar headers only)."""
    keys = set()
    try:
        tar = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{path}: not a readable tar shard ({exc.__class__.__name__}: {exc})") from None
    try:
        for member in tar:
            if member.isfile():
                k, ext = split_key(member.name)
                if ext.rpartition(".")[2] in IMAGE_EXTS:
                    keys.add(k)
    except (tarfile.TarError, OSError, EOFError):
        pass  # a truncated shard: count what is there; reading it later skips the rest
    finally:
        tar.close()
    return len(keys)


def shard_sizes(shards: list[Path]) -> list[int]:
    """Samples per shard, from each folder's ``sizes.json`` where present, else by reading the headers."""
    cache: dict[Path, dict[str, int]] = {}
    sizes = []
    for shard in shards:
        folder = shard.parent
        if folder not in cache:
            index = folder / SIZES_FILE
            try:
                cache[folder] = json.loads(index.read_text()) if index.is_file() else {}
            except (OSError, json.JSONDecodeError):
                cache[folder] = {}
        known = cache[folder].get(shard.name)
        sizes.append(int(known) if isinstance(known, int) else count_samples(shard))
    return sizes


def decode(data: bytes, channels: int, transform) -> torch.Tensor:
    """One sample's image bytes through ``transform``: a :class:`CropDecoder` decodes them itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(transform, CropDecoder):
            return transform(io.BytesIO(data), channels)
        img = open_image(io.BytesIO(data), channels)
    return transform(img)


# ---------------------------------------------------------------------------------------------
# Dataset and batches


@dataclass
class ShardData:
    """Tar shards plus what the trainer needs to know about them (no random access)."""

    name: str
    shards: list[Path]
    sizes: list[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3
    subset_size: int | None = None

    def __len__(self) -> int:
        n = sum(self.sizes)
        return n if self.subset_size is None else min(n, self.subset_size)

    labels = None
    num_classes = None

    def subset(self, n: int | None) -> ShardData:
        """An epoch of ``n`` samples (streamed from all shards)."""
        return ShardData(self.name, self.shards, self.sizes, self.mean, self.std, self.channels, n)


def load_shards(data: str, split: str = "train", channels: int = 3) -> ShardData:
    shards = find_shards(data, split)
    sizes = shard_sizes(shards)
    if sum(sizes) == 0:
        raise DataError(f"--data: the {len(shards)} shard(s) of {data!r} hold no images "
                        f"(looked for members ending in {', '.join(sorted(IMAGE_EXTS))})")
    mean, std = default_stats(channels)
    return ShardData(str(data), shards, sizes, mean, std, channels)


class ShardStream(torch.utils.data.IterableDataset):
    """Endless stream of ``(image, label, None)`` or ``(None, key, reason)`` for one rank's workers.

    Consumer ``slot = rank·K + worker`` of ``N·K`` reads shards ``slot, slot + N·K, …`` of the
    epoch's shuffled order (or, with fewer shards than consumers, every ``N·K``-th sample of all
    shards). When its shards are done it starts again with a new order, so every rank can always
    fill its batches; the consumer (:class:`ShardBatches`) takes exactly one epoch's worth.
    """

    def __init__(self, shards: list[Path], rank: int, world_size: int, seed: int, transform, channels: int = 3,
                 buffer: int = SHUFFLE_BUFFER):
        self.shards = list(shards)
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.transform = transform
        self.channels = channels
        self.buffer = buffer

    def _assignment(self, slot: int, slots: int, rng: random.Random) -> tuple[list[Path], int | None]:
        order = self.shards[:]
        rng.shuffle(order)  # same order on every rank and worker (same seed)
        if len(order) >= slots:
            return order[slot::slots], None
        return order, slot  # too few shards: everyone reads all, keeps every slots-th sample

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        slots = self.world_size * workers
        slot = self.rank * workers + wid
        local = random.Random(f"{self.seed}-buffer-{slot}")
        passes = 0
        while True:
            mine, keep_every = self._assignment(slot, slots, random.Random(f"{self.seed}-order-{passes}"))
            buf: list = []
            produced = 0
            for shard in mine:
                for i, (key, parts, error) in enumerate(iter_samples(shard)):
                    if keep_every is not None and i % slots != keep_every:
                        continue
                    produced += error is None
                    buf.append((key, parts, error))
                    if len(buf) >= self.buffer:  # emit a random buffered sample (swap with last, pop)
                        j = local.randrange(len(buf))
                        buf[j], buf[-1] = buf[-1], buf[j]
                        yield self._sample(buf.pop())
            local.shuffle(buf)  # a pass ends with its buffer, so one pass yields each sample once
            for item in buf:
                yield self._sample(item)
            if produced == 0:  # nothing readable at all: end rather than spin
                return
            passes += 1

    def _sample(self, item):
        key, parts, error = item
        if error is not None:
            return None, key, error
        data = image_part(parts)
        if data is None:
            return None, key, "no image in sample"
        try:
            label = int(parts["cls"].decode().strip()) if "cls" in parts else -1
        except ValueError:
            label = -1
        try:
            return decode(data, self.channels, self.transform), label, None
        except Exception as exc:  # noqa: BLE001 — an undecodable image is skipped with its reason
            return None, key, f"{exc.__class__.__name__}: {str(exc)[:120]}"


# ---------------------------------------------------------------------------------------------
# Writing


RESIZED_FILE = "resized.json"  # {prefix: what write_shards(resize=...) did and the originals' statistics}


def preresize(data: bytes, side: int, quality: int = 90) -> tuple[bytes, str, tuple[int, int] | None]:
    """``(bytes, extension, original (width, height))`` of one image stored with its shorter side at most ``side``.

    Larger images are decoded upright (:func:`open_image`: EXIF orientation applied, RGB or L kept), resized
    (bicubic, antialiased) so the shorter side is ``side`` and re-encoded as JPEG at ``quality``; others keep their
    bytes. An unreadable file keeps its bytes too (``None`` size), so training skips and counts it as before.
    """
    try:
        with Image.open(io.BytesIO(data)) as head:
            channels = 1 if head.mode in GRAY_MODES else 3
            original = upright_size(head)
        if min(original) <= side:
            return data, "", original
        img = open_image(io.BytesIO(data), channels, min_side=side)  # JPEGs far larger than side decode reduced
    except Exception:  # noqa: BLE001 — stored as it is; the reader reports it
        return data, "", None
    w, h = img.size
    size = (side, max(side, round(h * side / w))) if w <= h else (max(side, round(w * side / h)), side)
    out = io.BytesIO()
    img.resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=quality)
    return out.getvalue(), "jpg", original


def _stored(job: tuple[Path, int | None, int]) -> tuple[bytes, str, tuple[int, int] | None]:
    path, side, quality = job
    data = path.read_bytes()
    if side is None:
        return data, "", None
    return preresize(data, side, quality)


def _spread(values: list[int]) -> dict[str, int]:
    return {"min": min(values), "median": int(statistics.median_low(values)), "max": max(values)} if values else {}


def write_shards(source: str | Path, out_dir: str | Path, shard_size: int = 1000, prefix: str = "shard",
                 shuffle_seed: int | None = 0, resize: int | None = None, quality: int = 90,
                 workers: int = 0) -> list[Path]:
    """Pack an image folder (ImageFolder layout or flat) into tar shards with ``KEY.ext`` and ``KEY.cls``.

    The images' bytes are stored as they are (no re-encoding), or with ``resize`` pre-resized so the shorter side
    is at most ``resize`` px (JPEG at ``quality``; :func:`preresize`), the usual ImageNet trick: a smaller JPEG
    decodes in a fraction of the time; the originals' sizes and bytes go to ``resized.json``. Files are shuffled
    once with ``shuffle_seed`` (``None`` keeps the sorted order) so every shard mixes classes. Writes ``sizes.json``
    beside the shards so training need not count samples. ``workers`` processes re-encode in parallel.
    """
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    if resize is not None and resize < 8:
        raise DataError(f"--resize must be at least 8 px, got {resize}")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality must be 1..100, got {quality}")
    files, labels, classes = list_image_folder(Path(source))
    items = list(zip(files, labels or [-1] * len(files)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str((len(items) - 1) // shard_size)))
    written, sizes = [], {}
    originals: list[tuple[int, int]] = []
    counts = {"resized": 0, "kept": 0, "unreadable": 0, "original_bytes": 0, "stored_bytes": 0}
    pool = concurrent.futures.ProcessPoolExecutor(workers) if workers > 0 and resize is not None else None
    try:
        for start in range(0, len(items), shard_size):
            name = f"{prefix}-{start // shard_size:0{width}d}.tar"
            chunk = items[start:start + shard_size]
            jobs = [(path, resize, quality) for path, _ in chunk]  # one shard's images in memory at a time
            stored = pool.map(_stored, jobs, chunksize=16) if pool is not None else map(_stored, jobs)
            with tarfile.open(out / name, "w") as tar:
                for i, (path, label) in enumerate(chunk):
                    key = f"{start + i:09d}"
                    data, ext, original = next(stored)
                    if resize is not None:
                        counts["original_bytes"] += path.stat().st_size
                        counts["stored_bytes"] += len(data)
                        counts["unreadable" if original is None else "resized" if ext else "kept"] += 1
                        if original is not None:
                            originals.append(original)
                    _add_member(tar, f"{key}.{ext or path.suffix.lower().lstrip('.')}", data)
                    if label >= 0:
                        _add_member(tar, f"{key}.cls", str(label).encode())
            written.append(out / name)
            sizes[name] = len(chunk)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    index = out / SIZES_FILE
    previous = json.loads(index.read_text()) if index.is_file() else {}
    index.write_text(json.dumps({**previous, **sizes}, indent=1))
    if classes:
        (out / "classes.json").write_text(json.dumps(classes))
    if resize is not None:
        record = {"shorter_side": resize, "quality": quality, "images": len(items), **counts,
                  "original": {"shorter_side_px": _spread([min(s) for s in originals]),
                               "width_px": _spread([s[0] for s in originals]),
                               "height_px": _spread([s[1] for s in originals])}}
        stats = out / RESIZED_FILE
        before = json.loads(stats.read_text()) if stats.is_file() else {}
        stats.write_text(json.dumps({**before, prefix: record}, indent=1))
    return written


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clmae.data.shards", description="Pack an image folder into tar shards.")
    p.add_argument("source", help="image folder (ImageFolder layout or flat)")
    p.add_argument("output", help="folder for the .tar shards")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000, ~100 MB for ImageNet)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    p.add_argument("--resize", type=int, default=None, metavar="PX",
                   help="store images pre-resized, shorter side at most PX (e.g. 256; default: the original bytes)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of pre-resized images (default 90)")
    p.add_argument("--workers", type=int, default=0, help="processes that pre-resize in parallel (default 0: this one)")
    args = p.parse_args(argv)
    try:
        shards = write_shards(args.source, args.output, args.shard_size, args.prefix, resize=args.resize,
                              quality=args.quality, workers=args.workers)
    except DataError as exc:
        print(f"clmae: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(shards)} shard(s) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
