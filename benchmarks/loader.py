"""Images per second per CPU core of the training input paths: torchvision's ImageFolder against clmae's loaders.

An ImageNet-scale GPU run is input bound when the CPU cores cannot decode and augment as fast as the GPU trains,
so what matters is the CPU time one training image costs. Every path here turns a JPEG into the same output, a
normalised ``float32 (N, 3, 224, 224)`` batch of RandomResizedCrop(224, scale 0.2-1, bicubic) + horizontal flip:

* ``torchvision``: ``torchvision.datasets.ImageFolder`` with MAE's standard transforms (RandomResizedCrop,
  RandomHorizontalFlip, ToTensor, Normalize) and a plain ``DataLoader`` — the baseline every user knows;
* ``clmae_folder``: clmae's image-folder path (``TrainBatches`` over ``load_dataset(folder)``);
* ``clmae_shards``: clmae's tar shards (``ShardBatches`` over shards written by ``write_shards``);
* ``*_preresized``: shards written with ``--resize 256`` (and the baseline on the same JPEGs);
* ``*_device``: ``--augment-on device`` (workers decode, the training process resizes) and
  ``*_decode_device``: ``--decode-on device`` (workers read the files, the training process decodes and crops);

each with 0, 1 and 2 DataLoader workers, one epoch per setting. *Per core* is images divided by the CPU seconds
the training process and its workers spent (read from /proc), so a shared machine's load changes it little; the
wall-clock rate is recorded too. An in-process pass splits each path's cost into decode, augmentation (crop,
resize, flip, to tensor) and batching (collate, normalise).

The photos: ``--images`` JPEGs (2,000; ``--quick``: 200) of 350-500 px at quality 90, cut from the real photographs
that scikit-learn and matplotlib ship (scikit-image, whose ``skimage.data`` would do as well, is not a dependency):
random crops at random scales, flips, colour gains and gamma, and a little sensor-like noise, so they decode
like camera photos (their mean file size is recorded next to ImageNet's ~110 KB). They are cached in
``--cache`` (default: the system's temp folder) and rebuilt only when missing.

    python benchmarks/loader.py                      # ~2,000 photos, writes benchmarks/results/loader.json
    python benchmarks/loader.py --quick --output /tmp/loader.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling module, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_state, write_json

SIZE = 224
SCALE = (0.2, 1.0)
PRERESIZE = 256  # the shorter side of pre-resized shards (python -m clmae.data.shards --resize 256)
CLASSES = 10
TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# The photos


def source_photos() -> list[np.ndarray]:
    """The real photographs shipped with the installed dependencies (RGB uint8 arrays)."""
    import matplotlib
    import sklearn.datasets

    files = [Path(sklearn.datasets.__file__).parent / "images" / name for name in ("china.jpg", "flower.jpg")]
    files.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def make_photo(sources: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    """One camera-like photo: a random crop of a source at a random scale, flipped, colour-shifted, with noise."""
    src = sources[rng.integers(len(sources))]
    long_side = int(rng.integers(420, 501))
    short_side = int(np.clip(long_side / rng.uniform(1.0, 1.5), 350, long_side))
    width, height = (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)
    k = min(rng.uniform(0.8, 1.25), src.shape[1] / width, src.shape[0] / height)
    cw, ch = int(width * k), int(height * k)
    x0, y0 = int(rng.integers(0, src.shape[1] - cw + 1)), int(rng.integers(0, src.shape[0] - ch + 1))
    img = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw]).resize((width, height), Image.BICUBIC)
    a = np.asarray(img).astype(np.float32) / 255.0
    if rng.random() < 0.5:
        a = a[:, ::-1]
    a = np.power(a, rng.uniform(0.8, 1.25)) * rng.uniform(0.85, 1.15, size=3)
    a = a * 255.0 + rng.normal(0.0, 1.5, size=a.shape)  # sensor-like noise: a photo's entropy, not a resampling's
    out = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return out.convert("L") if rng.random() < 0.02 else out  # ImageNet holds a few grayscale JPEGs


def build_photos(n: int, cache: Path, seed: int = 0) -> Path:
    """An ImageFolder of ``n`` JPEGs in ``CLASSES`` class folders under ``cache``, built once."""
    root = cache / f"photos-{n}-s{seed}"
    done = root / ".complete"
    if done.is_file():
        return root
    sources = source_photos()
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        make_photo(sources, rng).save(folder / f"img{i:05d}.jpg", "JPEG", quality=90)
    done.write_text("ok\n")
    return root


def photo_stats(root: Path) -> dict[str, Any]:
    files = sorted(root.rglob("*.jpg"))
    sizes = [f.stat().st_size for f in files]
    shorts = []
    for f in files[:400]:
        with Image.open(f) as im:
            shorts.append(min(im.size))
    return {"images": len(files), "mean_kib": round(sum(sizes) / len(sizes) / 1024, 1),
            "shorter_side_px": [min(shorts), int(np.median(shorts)), max(shorts)],
            "note": "ImageNet-1k train: ~110 KiB per JPEG, typically 500x375 (shorter side median ~375 px)"}


# ---------------------------------------------------------------------------------------------
# CPU time of this process and its workers


def _descendants() -> list[int]:
    """Every process below this one: DataLoader workers, also those started by a fork server (grandchildren)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    below, frontier = [], [os.getpid()]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        below += frontier
    return below


def _cpu_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


class CpuClock:
    """CPU seconds of this process and of every child alive at the readings (DataLoader workers start at zero)."""

    def __init__(self) -> None:
        self.children: dict[int, float] = {}

    def read(self) -> tuple[float, float]:
        """``(this process, its workers)``."""
        for pid in _descendants():
            self.children[pid] = max(self.children.get(pid, 0.0), _cpu_of(pid))
        return time.process_time(), sum(self.children.values())


# ---------------------------------------------------------------------------------------------
# The paths


def torchvision_batches(root: Path, batch: int, workers: int, seed: int) -> Iterator[torch.Tensor]:
    from torchvision import datasets, transforms

    from clmae.data.images import IMAGENET_MEAN, IMAGENET_STD

    transform = transforms.Compose([
        transforms.RandomResizedCrop(SIZE, scale=SCALE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    data = datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    for x, _ in loader:
        yield x


def clmae_batches(data: str, batch: int, workers: int, seed: int, augment_on: str = "workers",
                  decode_on: str = "workers") -> Iterator[torch.Tensor]:
    from clmae.data.datasets import load_dataset
    from clmae.data.loader import ShardBatches, TrainBatches
    from clmae.data.shards import ShardData

    dataset = load_dataset(data)
    kind = ShardBatches if isinstance(dataset, ShardData) else TrainBatches
    yield from kind(dataset, batch, SIZE, torch.device("cpu"), seed, num_workers=workers,
                    augment_on=augment_on, decode_on=decode_on).epoch(0)


def measure(make: Callable[[], Iterator[torch.Tensor]], expected: int, skip: int) -> dict[str, Any]:
    """One epoch, timed in its steady state: wall and CPU seconds (this process and its workers) from the arrival of
    batch ``skip`` to that of the last one. Workers keep ``prefetch`` batches in flight, as much at the first reading
    as at the last, so the window's work is that of the batches it received; a stream that never ends (shards) is
    not charged for the batches it prefetched past the epoch."""
    clock = CpuClock()
    t_start = time.perf_counter()
    images = batches = 0
    shape = None
    main0 = work0 = t0 = first = 0.0
    counted = 0
    it = make()
    for x in it:
        batches += 1
        images += x.shape[0]
        shape = list(x.shape)
        if batches == skip:
            (main0, work0), t0, first = clock.read(), time.perf_counter(), time.perf_counter() - t_start
            counted = images
        if images >= expected:
            break
    wall = time.perf_counter() - t0
    main1, work1 = clock.read()
    main, work = main1 - main0, work1 - work0
    with contextlib.suppress(Exception):
        it.close()  # type: ignore[attr-defined]
    timed = images - counted
    return {"images": timed, "batch_shape": shape, "wall_s": round(wall, 2), "cpu_s": round(main + work, 2),
            "main_cpu_s": round(main, 2), "worker_cpu_s": round(work, 2), "img_per_s": round(timed / wall, 1),
            "img_per_s_per_core": round(timed / (main + work), 1),
            "img_per_s_per_worker_core": round(timed / work, 1) if work > 0.05 else None,
            "first_batches_s": round(first, 2), "untimed_first_batches": skip}


# ---------------------------------------------------------------------------------------------
# Where the time goes (in-process, no workers)


def _timed(f: Callable[[], Any], out: list[float]) -> Any:
    t = time.perf_counter()
    value = f()
    out.append(time.perf_counter() - t)
    return value


def breakdown(root: Path, resized: Path, n: int, batch: int, seed: int) -> dict[str, dict[str, float]]:
    """Milliseconds per image of decode, augmentation and batching, for the baseline and clmae's per-image code.

    ``clmae`` is the code of clmae's folder and shard paths for an upright JPEG whose crop needs no reduced decode
    (:class:`clmae.data.images.CropDecoder`: torchvision.io's decode straight into a tensor, then the box cut and
    resized by torch's uint8 antialiased bicubic);
    ``clmae_tensor_transform`` the per-image code they used before it (``open_image`` + ``train_transform``:
    PILToTensor + torchvision v2 resize on the tensor);
    ``*_preresized`` the same code on the photos pre-resized to a shorter side of ``PRERESIZE`` px.
    """
    from torchvision import transforms
    from torchvision.datasets.folder import pil_loader

    from clmae.data import images
    from clmae.data.loader import collate_skipping

    torch.manual_seed(seed)
    files = sorted(root.rglob("*.jpg"))[:n]
    small = [resized / f.relative_to(root) for f in files]
    mean = torch.tensor(images.IMAGENET_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(images.IMAGENET_STD).view(1, -1, 1, 1)
    tv = transforms.Compose([
        transforms.RandomResizedCrop(SIZE, scale=SCALE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(images.IMAGENET_MEAN, images.IMAGENET_STD)])
    crops = images.CropDecoder(SIZE, SCALE)
    before = images.train_transform(SIZE, SCALE)

    def clmae_batch(xs: list[torch.Tensor]) -> torch.Tensor:
        return (collate_skipping([(x, 0, None) for x in xs])[0].float().div_(255) - mean) / std

    def tv_batch(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.utils.data.default_collate([(x, 0) for x in xs])[0]

    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    def ours(f: Path):  # what CropDecoder does with an upright JPEG that needs no reduced decode: decode...
        data = f.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            box = crops.draw_box(img.height, img.width)
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB), box

    def ours_crop(decoded) -> torch.Tensor:  # ...then cut and resize (decode_crops)
        x, (top, left, h, w) = decoded
        x = TF.resized_crop(x, int(top), int(left), int(h), int(w), [SIZE, SIZE],
                            interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        return x.flip(-1) if bool(torch.rand(1) < 0.5) else x

    paths: dict[str, tuple[list[Path], Callable, Callable, Callable]] = {
        "torchvision": (files, lambda f: pil_loader(str(f)), tv, tv_batch),
        "clmae": (files, ours, ours_crop, clmae_batch),
        "clmae_tensor_transform": (files, lambda f: images.open_image(f, 3, 3 * SIZE), before, clmae_batch),
        "torchvision_preresized": (small, lambda f: pil_loader(str(f)), tv, tv_batch),
        "clmae_preresized": (small, ours, ours_crop, clmae_batch),
    }
    result = {}
    for name, (files, decode, augment, collate) in paths.items():
        dec: list[float] = []
        aug: list[float] = []
        col: list[float] = []
        xs: list[torch.Tensor] = []
        for f in files:
            img = _timed(partial(decode, f), dec)
            xs.append(_timed(partial(augment, img), aug))
            if len(xs) == batch:
                _timed(partial(collate, xs), col)
                xs = []
        per = 1000.0 / len(files)
        used = (len(files) // batch) * batch
        result[name] = {"decode_ms": round(sum(dec) * per, 3), "augment_ms": round(sum(aug) * per, 3),
                        "batch_ms": round(sum(col) * 1000.0 / max(used, 1), 3)}
        result[name]["total_ms"] = round(sum(result[name].values()), 3)
    return result


# ---------------------------------------------------------------------------------------------


def shard_set(root: Path, cache: Path, **options) -> Path:
    from clmae.data.shards import write_shards

    tag = hashlib.blake2b(repr(sorted(options.items())).encode(), digest_size=4).hexdigest()
    out = cache / f"{root.name}-shards-{tag}"
    if not (out / ".complete").is_file():
        write_shards(root, out, shard_size=250, **options)
        (out / ".complete").write_text("ok\n")
    return out


def preresized_folder(root: Path, side: int) -> Path:
    """The photos stored as pre-resized shards store them (``clmae.data.shards.preresize``), as an ImageFolder."""
    from clmae.data.shards import preresize

    out = root.parent / f"{root.name}-short{side}"
    if not (out / ".complete").is_file():
        for f in sorted(root.rglob("*.jpg")):
            (out / f.parent.name).mkdir(parents=True, exist_ok=True)
            (out / f.relative_to(root)).write_bytes(preresize(f.read_bytes(), side)[0])
        (out / ".complete").write_text("ok\n")
    return out


# An H100/H200 SXM's dense bf16 peak, and the share of it a ViT-B/16 MAE step is assumed to reach: the GPU side of
# the estimate until a GPU measures it (benchmarks/gpu.py).
GPU_PEAK_BF16 = 989e12
GPU_FRACTIONS = (0.25, 0.35, 0.5)


def gpu_estimate(result: dict[str, Any]) -> dict[str, Any]:
    """FLOPs per image of an MAE and a CL-MAE iteration at ViT-B/16, 224 px (counted on the CPU by the trainer's own
    step, as benchmarks/throughput.py counts them), the img/s a GPU would train at for an assumed share of its
    peak, and the CPU cores each loader path then needs (its measured img/s per worker core)."""
    from throughput import Runner, build_trainer

    flops = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("mae", "clmae"):
            args = argparse.Namespace(data="synthetic", data_dir=None, model="vit_base_patch16_224", batch_size=2,
                                      device="cpu", seed=0, compile=False, masker_every=1, masker_batch_fraction=1.0)
            flops[method] = Runner(build_trainer(method, args, Path(tmp))).count_flops(1)["iteration"] / 2
    per_core = result["best_img_per_s_per_worker_core"]
    out: dict[str, Any] = {
        "what": "an estimate, not a measurement: FLOPs counted, GPU speed assumed", "model": "vit_base_patch16_224",
        "flops_per_image": {m: round(f / 1e9, 1) for m, f in flops.items()}, "flops_unit": "GFLOP",
        "gpu_peak_bf16_tflops": GPU_PEAK_BF16 / 1e12, "assumed_fraction_of_peak": list(GPU_FRACTIONS),
        "per_method": {},
    }
    for method, f in flops.items():
        rates = [GPU_PEAK_BF16 * share / f for share in GPU_FRACTIONS]
        out["per_method"][method] = {
            "gpu_img_per_s": [round(r) for r in rates],
            "cpu_cores_needed": {path: [round(r / v, 1) for r in rates] for path, v in per_core.items() if v},
        }
    return {**out, **git_state(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200 photos instead of 2,000 (a check, not a measurement)")
    p.add_argument("--images", type=int, default=None, help="number of photos (default 2000, --quick 200)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--breakdown-images", type=int, default=None, help="photos timed in-process (default 400)")
    p.add_argument("--device-images", type=int, default=448,
                   help="images per run of the --augment-on device paths (default 448)")
    p.add_argument("--cache", default=None, help="folder for the photos and shards (default: temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="benchmarks/results/loader.json")
    p.add_argument("--estimate-only", action="store_true",
                   help="only (re)count the GPU estimate (ViT-B FLOPs; ~1 min) into an existing --output JSON")
    p.add_argument("--no-estimate", action="store_true", help="leave out the GPU estimate")
    args = p.parse_args(argv)
    if args.estimate_only:
        import json

        result = json.loads(Path(args.output).read_text())
        result["gpu_estimate"] = gpu_estimate(result)
        write_json(args.output, result)
        return 0
    torch.set_num_threads(1)  # per core: one thread per process, the loaders' usual setting
    n = args.images or (200 if args.quick else 2000)
    batch = min(args.batch_size, 32) if args.quick else args.batch_size
    cache = Path(args.cache) if args.cache else Path(tempfile.gettempdir()) / "clmae-loader-bench"
    began = time.perf_counter()
    load_before = os.getloadavg()
    root = build_photos(n, cache, args.seed)
    shards = shard_set(root, cache)
    small_shards = shard_set(root, cache, resize=PRERESIZE, quality=90)
    small = preresized_folder(root, PRERESIZE)
    paths: dict[str, Callable[[int], Iterator[torch.Tensor]]] = {
        "torchvision": lambda w: torchvision_batches(root, batch, w, args.seed),
        "clmae_folder": lambda w: clmae_batches(str(root), batch, w, args.seed),
        "clmae_shards": lambda w: clmae_batches(str(shards), batch, w, args.seed),
        "clmae_shards_preresized": lambda w: clmae_batches(str(small_shards), batch, w, args.seed),
        # Workers only decode; the crops are resized in this process, standing in for the GPU.
        "clmae_shards_preresized_device": lambda w: clmae_batches(str(small_shards), batch, w, args.seed, "device"),
        "clmae_shards_device": lambda w: clmae_batches(str(shards), batch, w, args.seed, "device"),
        # Workers only read the files; this process decodes (torchvision.io, standing in for nvJPEG) and crops.
        "clmae_shards_preresized_decode_device": lambda w: clmae_batches(str(small_shards), batch, w, args.seed,
                                                                         decode_on="device"),
        "clmae_folder_decode_device": lambda w: clmae_batches(str(root), batch, w, args.seed, decode_on="device"),
        # Where the pre-resized shards' gain comes from: the baseline on the same pre-resized JPEGs.
        "torchvision_preresized": lambda w: torchvision_batches(small, batch, w, args.seed),
    }
    expected = (n // batch) * batch
    skip = 2 if args.quick else 3
    for make in paths.values():  # warm-up: first imports and first use of each path are not timed
        measure(lambda make=make: make(0), 2 * batch, 1)
    runs: dict[str, dict[str, Any]] = {}
    # The --augment-on device paths resize in this process, on the CPU here, which is slow (dense matrix products
    # meant for a GPU) and not what they cost a GPU run: they are timed with workers only, on fewer images, for the
    # workers' CPU. The --decode-on device paths decode in this process with libjpeg-turbo, as the workers would:
    # timed like the others.
    device_paths = {name for name in paths if name.endswith("_device") and not name.endswith("decode_device")}
    device_images = min(expected, (args.device_images // batch) * batch)
    for workers in args.workers:  # interleaved: a change in the machine's load hits every path alike
        for name, make in paths.items():
            if name in device_paths and workers == 0:
                continue
            r = measure(lambda make=make, workers=workers: make(workers),
                        device_images if name in device_paths else expected, skip)
            runs.setdefault(name, {})[f"workers_{workers}"] = r
            per_worker = r["img_per_s_per_worker_core"]
            print(f"{name:>30} workers {workers}: {r['img_per_s_per_core']:7.1f} img/s per core, "
                  f"{per_worker or float('nan'):7.1f} per worker core ({r['img_per_s']:.1f} img/s wall, CPU s "
                  f"{r['main_cpu_s']} main + {r['worker_cpu_s']} workers for {r['images']} images)", flush=True)
    split = breakdown(root, small, args.breakdown_images or min(n, 400), batch, args.seed)
    for name, s in split.items():
        print(f"{name:>14}: decode {s['decode_ms']:.2f} + augment {s['augment_ms']:.2f} + batch {s['batch_ms']:.2f} "
              f"= {s['total_ms']:.2f} ms per image (in-process)")
    base = max(r["img_per_s_per_core"] for r in runs["torchvision"].values())
    best = {name: max(r["img_per_s_per_core"] for r in per.values()) for name, per in runs.items()}
    ratios = {name: round(v / base, 2) for name, v in best.items()}
    fastest = max((k for k in best if k.startswith("clmae")), key=best.get)
    print(f"best per core (all processes) vs torchvision: {ratios}; fastest clmae path: {fastest} "
          f"({ratios[fastest]}x)")
    # What a GPU run costs the CPU: the workers' time (there the training process's resize and normalisation run on
    # the GPU; here they run on this CPU and are left out of this figure).
    wbest = {name: max((r["img_per_s_per_worker_core"] or 0.0) for r in per.values()) for name, per in runs.items()}
    wbase = wbest["torchvision"]
    wratios = {name: round(v / wbase, 2) if wbase else None for name, v in wbest.items()}
    # Decoding on the device leaves the workers only the file reads: their figure says how little CPU that takes,
    # not how fast a GPU decodes (unmeasured here), so they are not candidates for the fastest path.
    wfastest = max((k for k in wbest if k.startswith("clmae") and "decode_device" not in k), key=wbest.get)
    print(f"best per worker core vs torchvision: {wratios}; fastest clmae path: {wfastest} ({wratios[wfastest]}x)")
    # The strictest comparison: clmae's workers against the baseline's best figure of either kind (its best is
    # often without workers, where no batch crosses between processes).
    strict = round(wbest[wfastest] / max(base, wbase), 2)
    print(f"strict: {wfastest} per worker core / torchvision's best (per core or per worker core) = {strict}x")
    command = "python benchmarks/loader.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    result = {
        "benchmark": "loader", "when": time.strftime("%Y-%m-%d %H:%M:%S"), **git_state(), "command": command,
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
                  f"torch {torch.__version__}, 1 thread per process",
        "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in os.getloadavg()],
        "output": f"normalised float32 ({batch}, 3, {SIZE}, {SIZE}): RandomResizedCrop({SIZE}, scale {SCALE}, "
                  "bicubic) + horizontal flip",
        "photos": photo_stats(root), "preresized_photos": {"shorter_side": PRERESIZE, "quality": 90,
                                                          **photo_stats(small)},
        "batch_size": batch,
        "per_core": "images / CPU seconds of the training process and its DataLoader workers over one epoch",
        "runs": runs, "breakdown_ms_per_image": split,
        "best_img_per_s_per_core": best, "ratio_to_torchvision": ratios, "fastest_clmae_path": fastest,
        "per_worker_core": "images / CPU seconds of the DataLoader workers alone (runs with 1 or 2 workers): what a "
                           "GPU run costs the CPU cores, where the training process's crop resize (device paths) "
                           "and normalisation run on the GPU",
        "best_img_per_s_per_worker_core": wbest, "ratio_to_torchvision_per_worker_core": wratios,
        "fastest_clmae_path_per_worker_core": wfastest,
        "strict_ratio": {"path": wfastest, "ratio": strict,
                         "what": "its img/s per worker core / torchvision's best img/s per core or per worker core"},
        "device_paths": {"images_per_run": device_images, "note": "--augment-on device: the crops are resized in the "
                         "training process, on the CPU here (dense batched matrix products meant for a GPU); their "
                         "per-core figure counts that, their per-worker-core figure what a GPU run costs the CPU. "
                         "--decode-on device (*_decode_device): the workers only read the files, the training "
                         "process decodes them with torchvision.io.decode_jpeg (libjpeg-turbo here, nvJPEG on "
                         "CUDA) and crops them; their per-worker-core figure is the CPU a GPU run needs if the GPU "
                         "decodes as fast as it trains (not measured)"},
        "seconds": round(time.perf_counter() - began, 1),
    }
    if not args.no_estimate:
        result["gpu_estimate"] = gpu_estimate(result)
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
