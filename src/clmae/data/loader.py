"""Training batches: one interface over in-memory data, image folders and tar shards, for one rank.

Every source yields normalised ``(N, C, H, W)`` float batches of exactly ``batch_size`` on the
training device, epoch by epoch, reproducibly:

* :class:`TrainBatches` — in-memory sets (gathered and augmented on the
  device in one batched call) and image folders (decoded by DataLoader workers). The order of an
  epoch is a permutation drawn from ``seed`` and the epoch alone, so a run resumed in the middle of
  an epoch sees exactly the batches an uninterrupted run would. Under torchrun each rank takes its
  block of every global batch (see :mod:`clmae.distributed`).
* :class:`ShardBatches` — tar shards streamed by DataLoader workers (:mod:`clmae.data.shards`).

Unreadable files never stop a run: :class:`BatchSource` drops and counts them, once per file, by
reason. :func:`make_loader` is the one place DataLoaders are configured.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from ..distributed import SINGLE, DistContext, all_true, gather_objects
from ..errors import DataError
from ..runtime import usable_cores
from .augment import crop_flip, resample_regions, sample_crop_boxes
from .datasets import Dataset, InMemoryImages, skip_summary
from .images import CropDecoder, EncodedCrop, Region, decode_crops
from .shards import SHUFFLE_BUFFER, ShardData, ShardStream

# ---------------------------------------------------------------------------------------------
# DataLoaders


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: leave SIGINT/SIGTERM to the training process.

    Ctrl-C and SLURM's or torchrun's SIGTERM reach the whole process group. The training process
    then finishes its step and saves a checkpoint; workers that died on the signal would make the
    DataLoader raise in the middle of that. Workers still exit when the training process does.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class RegionBatch(NamedTuple):
    """Workers' :class:`~clmae.data.images.Region` samples as one batch (a NamedTuple, so the DataLoader pins it)."""

    images: torch.Tensor  # uint8 (N, C, H, W), each region at the top left, zero-padded to the largest
    boxes: torch.Tensor  # (N, 4) float: the crop in its region's pixels
    flips: torch.Tensor  # (N,) bool
    sizes: torch.Tensor  # (N, 2): each region's valid (h, w)


def collate_regions(regions: list[Region]) -> RegionBatch:
    height = max(r.pixels.shape[1] for r in regions)
    width = max(r.pixels.shape[2] for r in regions)
    images = torch.zeros(len(regions), regions[0].pixels.shape[0], height, width, dtype=torch.uint8)
    for i, r in enumerate(regions):
        images[i, :, : r.pixels.shape[1], : r.pixels.shape[2]] = r.pixels
    return RegionBatch(images, torch.tensor([r.box for r in regions], dtype=torch.float32),
                       torch.tensor([r.flip for r in regions], dtype=torch.bool),
                       torch.tensor([r.pixels.shape[1:] for r in regions], dtype=torch.int64))


class EncodedBatch(NamedTuple):
    """A batch whose JPEGs the training device decodes (``--decode-on device``), in the samples' order."""

    files: list[torch.Tensor]  # uint8 (bytes,) per encoded sample
    boxes: torch.Tensor  # (E, 4): each encoded sample's crop
    flips: torch.Tensor  # (E,) bool
    encoded: torch.Tensor  # (N,) bool: which samples are encoded (the others were cropped by their worker)
    crops: torch.Tensor  # uint8 (N - E, C, S, S): the workers' crops of the files the device does not decode
    names: list[str]  # each encoded sample's file, to report one that does not decode


def collate_encoded(samples: list) -> EncodedBatch:
    """Samples that are each an :class:`EncodedCrop` or a worker's ``uint8`` crop, as one batch."""
    encoded = [x for x in samples if isinstance(x, EncodedCrop)]
    made = [x for x in samples if not isinstance(x, EncodedCrop)]
    return EncodedBatch([e.data for e in encoded], torch.tensor([e.box for e in encoded], dtype=torch.float32),
                        torch.tensor([e.flip for e in encoded], dtype=torch.bool),
                        torch.tensor([isinstance(x, EncodedCrop) for x in samples], dtype=torch.bool),
                        torch.stack(made) if made else torch.zeros(0, dtype=torch.uint8),
                        [e.name or "a shard sample decoded on the device" for e in encoded])


def collate_skipping(batch):
    """Stack the good samples; return ``(images, labels, skipped)`` with the skipped reasons."""
    good = [b for b in batch if b[0] is not None]
    skipped = [(b[1], b[2]) for b in batch if b[0] is None]
    if not good:
        return None, None, skipped
    if isinstance(good[0][0], Region):
        return collate_regions([b[0] for b in good]), torch.tensor([b[1] for b in good], dtype=torch.long), skipped
    if any(isinstance(b[0], EncodedCrop) for b in good):
        return collate_encoded([b[0] for b in good]), torch.tensor([b[1] for b in good], dtype=torch.long), skipped
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    return images, labels, skipped


# What a fork server preloads, so each epoch's workers start in a fraction of a second.
WORKER_PRELOAD = ["torch", "torchvision.transforms.v2", "clmae.data.datasets", "clmae.data.shards"]
# Workers fork from a training process holding less anonymous memory than this (torch alone holds ~400 MiB, a
# ViT-Tiny run ~450, a ViT-B one ~1 GiB before its first step): they could keep no more, and start at once.
FORK_BELOW_MIB = 768
_GUARD = re.compile(r"""__name__\s*==\s*['"]__main__['"]""")
_said: set[str] = set()


def anonymous_mib() -> int | None:
    """This process's anonymous resident memory (heap, tensors) in MiB, from /proc (None where there is none)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def main_reimportable() -> bool:
    """Whether worker processes that do not fork from this one may import its ``__main__``, as they do: a module
    run with ``-m``, no file at all (a notebook, the REPL, ``-c``), or a script with an ``if __name__ ==
    "__main__":`` guard (console scripts such as ``clmae`` have one). An unguarded script would train again in
    every worker."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(main, "__spec__", None) is not None:
        return True
    try:
        return _GUARD.search(Path(path).read_text(errors="replace")) is not None
    except OSError:
        return False


def worker_context():
    """How DataLoader workers start (None: the platform's default, fork on Linux, spawn elsewhere).

    On Linux, a worker forked from the training process maps all of its memory (the model, the optimiser
    moments, the allocator's freed activations), and every page the training then rewrites (every parameter
    and moment, every step) is copied for the training while the worker keeps the old one. For ViT-B at 224 px
    on CPU with 2 workers, at batch 16, the workers held 2072 MiB beyond the run's own 3.6 GiB; from a fork
    server, 479 MiB, the server included (``benchmarks/worker_memory.py``). So a large training process
    (:data:`FORK_BELOW_MIB`) gets its workers from a fork server instead: a small process started once (torch
    and clmae's decoders imported, a few seconds), never running the user's script. Its workers import a
    script's ``__main__`` as spawn's do, so an unguarded script keeps forked workers, with a note.
    """
    import multiprocessing

    anonymous = anonymous_mib()
    if not sys.platform.startswith("linux") or anonymous is None or anonymous < FORK_BELOW_MIB:
        return None
    if not main_reimportable():
        script = getattr(sys.modules.get("__main__"), "__file__", "your script")
        if script not in _said:
            _said.add(script)
            print(f"clmae: note: DataLoader workers are forked from this process ({anonymous} MiB) because {script} "
                  "has no `if __name__ == \"__main__\":` guard; they keep copies of the memory the training "
                  "rewrites, up to that much; put the script's work under such a guard to start them small",
                  file=sys.stderr)
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)  # not __main__: the server never runs the user's script
    return context


def worker_count(requested: int, local_ranks: int | None = None) -> int:
    """DataLoader workers per rank: ``requested``, or for ``-1`` the CPU cores this process may use (its affinity:
    what SLURM or taskset granted) shared by the ranks on this machine (``LOCAL_WORLD_SIZE``, set by torchrun),
    less one core for each rank's training process; at least 1."""
    if requested >= 0:
        return requested
    cores = usable_cores()
    ranks = local_ranks if local_ranks is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, ranks) - 1)


def make_loader(dataset, batch_size: int, device: torch.device, num_workers: int, *, sampler=None,
                shuffle: bool = False, drop_last: bool = False, seed: int | None = None,
                prefetch: int = 4) -> torch.utils.data.DataLoader:
    """A DataLoader over a dataset that yields ``(x, label, None)`` or ``(None, key, reason)`` samples.

    Batches come out of :func:`collate_skipping`; workers ignore stop signals (the training process
    saves a checkpoint first); memory is pinned for CUDA only (elsewhere pinning is a copy for nothing).
    ``seed`` fixes the workers' random streams. Workers are not persistent: each epoch's loader starts its own
    from a fork server (:func:`worker_context`) in a fraction of a second, which keeps every epoch's crops a
    function of the seed and the epoch alone.
    """
    workers = num_workers > 0
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle, drop_last=drop_last,
        num_workers=num_workers, collate_fn=collate_skipping, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=prefetch if workers else None,
        generator=None if seed is None else torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals if workers else None,
        multiprocessing_context=worker_context() if workers else None,
    )


# ---------------------------------------------------------------------------------------------
# Batches


def augmentation_seed(seed: int, epoch: int, step: int = -1) -> int:
    """The seed of one step's crops and flips (``step=-1``: of an epoch's DataLoader workers).

    A function of the run's seed, the epoch and the step alone: augmentation shares no random stream
    with the masking strategy, so every strategy run with one seed sees the same crops, and a run
    resumed in the middle of an epoch the same as an uninterrupted one.
    """
    digest = hashlib.blake2b(f"{seed}/{epoch}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # below 2**63: a valid torch seed


class BatchSource:
    """What every batch source shares: its settings, normalisation, skip bookkeeping, full-size batching.

    Unreadable inputs are counted once per file however many epochs see them.
    """

    def __init__(self, dataset: Dataset, batch_size: int, img_size: int, device: torch.device, seed: int,
                 num_workers: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.img_size = img_size
        self.device = device
        self.seed = seed
        self.num_workers = num_workers
        self.prefetch = 4
        self.augment_on = "workers"  # or "device": workers only decode, crops are resampled there in batches
        self.decode_on = "workers"  # or "device": workers only read JPEG files, the device decodes and crops them
        self._mean = torch.tensor(dataset.mean, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(dataset.std, device=device).view(1, -1, 1, 1)
        # uint8 batches from workers are normalised in place in one pass each: (x - 255·mean) · 1/(255·std)
        self._shift, self._gain = self._mean * 255.0, 1.0 / (self._std * 255.0)
        self.bad_files: dict[str, str] = {}  # path (or shard key) → reason

    def record(self, skipped: list[tuple[str, str]]) -> None:
        for path, reason in skipped:
            self.bad_files.setdefault(path, reason)

    @property
    def skipped(self) -> Counter:
        """How many distinct files were skipped, by reason (``empty file``, ``not an image``, …)."""
        return Counter(reason.split(":")[0] for reason in self.bad_files.values())

    def describe(self) -> str:
        """How batches are made, for the run's header line: ``"data: 10 workers, prefetch 4, pinned memory, …"``
        (empty for in-memory data: it is on the device and augmented there, no DataLoader)."""
        if isinstance(self.dataset, InMemoryImages):
            return ""
        workers = f"{self.num_workers} worker{'s' if self.num_workers != 1 else ''}" if self.num_workers else \
            "no workers (decoded in the training process)"
        pinned = ", pinned memory" if self.device.type == "cuda" else ""
        ahead = f", prefetch {self.prefetch}" if self.num_workers else ""
        where = ", crops resized on the device" if self.augment_on == "device" else ""
        if self.decode_on == "device":
            return f"data: {workers}{ahead}{pinned}, JPEGs decoded and cropped on the device (torchvision.io)"
        return f"data: {workers}{ahead}{pinned}, JPEGs decoded at the crop's scale{where}"

    def decode_batch(self, batch: EncodedBatch) -> torch.Tensor | None:
        """``uint8 (N, C, S, S)`` on the device from an :class:`EncodedBatch`: its JPEGs decoded and cropped there,
        the workers' crops put in their places; a file that does not decode is skipped and counted (None: none
        left)."""
        crops = decode_crops(batch.files, batch.boxes, batch.flips, self.img_size, self.dataset.channels, self.device)
        self.record([(name, "truncated or corrupt: torchvision.io.decode_jpeg failed") for name, c in
                     zip(batch.names, crops) if c is None])
        made = iter(batch.crops.to(self.device, non_blocking=True))
        decoded = iter(crops)
        ordered = [next(decoded) if e else next(made) for e in batch.encoded.tolist()]
        kept = [x for x in ordered if x is not None]
        return torch.stack(kept) if kept else None

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
            if isinstance(images, RegionBatch):  # crops resampled here, on the device, in one batched call
                images = resample_regions(*(t.to(self.device, non_blocking=True) for t in images), self.img_size)
            elif isinstance(images, EncodedBatch):  # JPEGs decoded here, on the device, in one batched call
                images = self.decode_batch(images)
                if images is None:
                    continue
            pending.append(images)
            count += images.shape[0]
            while count >= self.batch_size:
                cat = pending[0] if len(pending) == 1 else torch.cat(pending)  # a worker's full batch: no copy
                batch, rest = cat[: self.batch_size], cat[self.batch_size :]
                pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
                x = batch.to(self.device, non_blocking=True).float()
                yield x.sub_(self._shift).mul_(self._gain)


class TrainBatches(BatchSource):
    """This rank's augmented, normalised training batches on ``device``, reproducibly per epoch.

    The order of epoch ``e`` is a permutation drawn from ``seed`` and ``e`` alone, so a run resumed
    at step ``s`` of an epoch sees exactly the batches an uninterrupted run would; the last
    incomplete global batch is dropped (as with ``drop_last``), so every step has full size.
    ``batch_size`` is per rank: each of ``world_size`` ranks takes its block of every global batch.
    For in-memory data, N ranks together yield bit for bit the batches one process with batch N·B
    would (the crops are drawn for the global batch); for image folders each rank decodes only its
    own files, and its workers' augmentation seeds differ per rank.
    """

    def __init__(self, dataset: Dataset, batch_size: int, img_size: int, device: torch.device, seed: int,
                 num_workers: int = 2, ctx: DistContext = SINGLE, prefetch: int = 4, augment_on: str = "workers",
                 decode_on: str = "workers"):
        self.ctx = ctx
        self.global_batch = batch_size * ctx.world_size
        if len(dataset) < self.global_batch:
            many = f"one global batch ({batch_size} per rank x {ctx.world_size} ranks)" if ctx.enabled else \
                f"--batch-size {batch_size}"
            raise DataError(f"{dataset.name}: {len(dataset)} training images, fewer than {many}; lower --batch-size "
                            "or use more data")
        super().__init__(dataset, batch_size, img_size, device, seed, num_workers)
        self.prefetch, self.augment_on, self.decode_on = prefetch, augment_on, decode_on
        if isinstance(dataset, InMemoryImages):
            self._images = dataset.images.to(device)

    def __len__(self) -> int:
        return len(self.dataset) // self.global_batch

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.dataset), generator=g)

    def rank_indices(self, epoch: int, start_step: int = 0) -> torch.Tensor:
        """This rank's sample indices for the rest of ``epoch``, step after step."""
        g, b = self.global_batch, self.batch_size
        order = self._order(epoch)[: len(self) * g].view(len(self), g)
        return order[start_step:, self.ctx.rows(b)].reshape(-1)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Batches of ``epoch`` from ``start_step`` on; crops and flips come from :func:`augmentation_seed`."""
        if isinstance(self.dataset, InMemoryImages):
            yield from self._memory_epoch(epoch, start_step)
        else:
            # The epoch's worker seed, offset per rank so that ranks decode with different random streams.
            seed = augmentation_seed(self.seed, epoch) + 7919 * self.ctx.rank
            batches = self._folder_epoch(self.rank_indices(epoch, start_step), seed)
            yield from in_step(batches, len(self) - start_step, self.ctx)

    def _memory_epoch(self, epoch: int, start_step: int) -> Iterator[torch.Tensor]:
        b, g = self.batch_size, self.global_batch
        rows = self.ctx.rows(b)
        _, _, height, width = self.dataset.images.shape
        idx_all = self.rank_indices(epoch, start_step).view(-1, b)
        for step, idx in enumerate(idx_all, start=start_step):
            # Random numbers for the whole global batch; keep this rank's rows.
            crops = torch.Generator().manual_seed(augmentation_seed(self.seed, epoch, step))
            boxes = sample_crop_boxes(g, height, width, crops)
            flips = torch.rand(g, generator=crops) < 0.5
            images = self._images.index_select(0, idx.to(self.device))
            x = crop_flip(images, boxes[rows], flips[rows], self.img_size)
            yield (x - self._mean) / self._std

    def _folder_epoch(self, order: torch.Tensor, seed: int) -> Iterator[torch.Tensor]:
        files = self.dataset.files
        # seed: the crops' when drawn without workers
        files.transform = CropDecoder(self.img_size, seed=seed, on_device=self.augment_on == "device",
                                      decode_on_device=self.decode_on == "device")
        if files.min_side is None:
            # Random crops cover >= 20% of the area: 3x the input size keeps them sharp.
            files.min_side = 3 * self.img_size
        loader = make_loader(files, self.batch_size, self.device, self.num_workers, sampler=order.tolist(), seed=seed,
                             prefetch=self.prefetch)
        yielded = 0
        for batch in self.full_batches(loader):
            yielded += 1
            yield batch
        if yielded == 0 and len(order) >= self.batch_size:
            raise DataError(
                f"{files.root}: fewer than one batch of {self.batch_size} readable images among the {len(order)} "
                f"files tried ({skip_summary(self.skipped)}); check the folder or lower --batch-size"
            )


def map_position(step_in_epoch: int, saved_global_batch: int, global_batch: int) -> int:
    """The step to resume at after the global batch changed (other world size or --batch-size).

    Keeps the number of images of the epoch already seen, rounded down to whole new batches:
    no image of the epoch is skipped; at most one new batch's worth is seen again.
    """
    if saved_global_batch == global_batch:
        return step_in_epoch
    return (step_in_epoch * saved_global_batch) // global_batch


def in_step(batches: Iterator[torch.Tensor], steps: int, ctx: DistContext) -> Iterator[torch.Tensor]:
    """At most ``steps`` batches, ending on every rank as soon as one rank runs out.

    Skipped unreadable files can leave a rank one batch short at the end of an epoch; the others
    must not wait for it in the next gradient all-reduce.
    """
    it = iter(batches)
    for _ in range(steps):
        batch = next(it, None)
        if not all_true(batch is not None, ctx):
            return
        yield batch


class ShardBatches(BatchSource):
    """Training batches from tar shards for one rank: the :class:`TrainBatches` interface.

    ``len()`` is the epoch length in steps (``samples // (batch · world_size)``). Decoding and
    augmentation run in ``num_workers`` DataLoader processes, each with ``prefetch`` batches in
    flight; pinned memory and non-blocking copies keep the GPU fed.
    """

    def __init__(self, dataset: ShardData, batch_size: int, img_size: int, device: torch.device, seed: int,
                 num_workers: int = 2, ctx=None, prefetch: int = 4, buffer: int = SHUFFLE_BUFFER,
                 augment_on: str = "workers", decode_on: str = "workers"):
        self.ctx = ctx or SINGLE
        if len(dataset) < batch_size * self.ctx.world_size:
            raise DataError(f"{dataset.name}: {len(dataset)} training images, fewer than one global batch "
                            f"({batch_size} x {self.ctx.world_size}); lower --batch-size or use more data")
        super().__init__(dataset, batch_size, img_size, device, seed, num_workers)
        self.prefetch = prefetch
        self.buffer = buffer
        self.augment_on = augment_on
        self.decode_on = decode_on

    def __len__(self) -> int:
        return len(self.dataset) // (self.batch_size * self.ctx.world_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """The remaining batches of ``epoch``. A resumed epoch restarts the stream with a new shuffle."""
        seed = augmentation_seed(self.seed, epoch, start_step) + 7919 * self.ctx.rank
        crops = CropDecoder(self.img_size, seed=seed, on_device=self.augment_on == "device",
                            decode_on_device=self.decode_on == "device")
        stream = ShardStream(self.dataset.shards, self.ctx.rank, self.ctx.world_size,
                             seed=(self.seed * 100_003 + epoch) * 1_000 + start_step, transform=crops,
                             channels=self.dataset.channels, buffer=self.buffer)
        loader = make_loader(stream, self.batch_size, self.device, self.num_workers, prefetch=self.prefetch, seed=seed)
        yield from in_step(self.full_batches(loader), len(self) - start_step, self.ctx)


# ---------------------------------------------------------------------------------------------
# Reporting skipped files


def report_skipped_files(batches, ctx: DistContext, logger) -> Counter:
    """Print every rank's skipped files on rank 0 (stderr) and log them as a ``"kind": "data"`` record."""
    parts = gather_objects((dict(getattr(batches, "skipped", {})), getattr(batches, "skipped_examples", [])[:5]), ctx)
    skipped: Counter = Counter()
    examples: list[tuple[str, str]] = []
    for counts, some in parts:
        skipped.update(counts)
        examples += some
    if ctx.is_main and skipped:
        total = sum(skipped.values())
        print(f"clmae: {skip_summary(skipped)} (unreadable; each counted once)", file=sys.stderr)
        for path, reason in examples[:5]:
            print(f"  {path}: {reason}", file=sys.stderr)
        logger.log({"kind": "data", "skipped_files": total, **{f"skipped_{r}": n for r, n in skipped.items()}})
    return skipped
