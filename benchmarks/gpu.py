"""Everything a short GPU lease must answer, in one command: correctness on CUDA, precisions, speed, DDP, evaluation.

    python benchmarks/gpu.py                          # on a machine with a GPU: ~6-8 min on one H100/H200
    python benchmarks/gpu.py --device cpu --quick     # the same script on tiny settings (the test suite runs it)

It writes one JSON (default ``benchmarks/results/gpu-<device>-<date>.json``, with the command, the machine, the
commit) and prints a summary. No network, no dataset: the images are synthetic. Sections, in this order (each
one is time-boxed and fails alone: its error is recorded and the next runs):

1. ``matmul_peak``: dense square matmuls (bf16, fp16, fp32 with and without TF32), TFLOP/s; the bf16 figure (fp32
   on a CPU) is the peak every throughput below is a fraction of.
2. ``parity``: for every strategy, the first MAE step's and own step's losses on CUDA in fp32 and on the CPU in
   fp32, the same weights, batch and masks (max relative difference; CUDA's TF32 convolutions are reported).
3. ``precisions``: every strategy in bf16 and in fp16 (loss scaling) on the device: the first step's losses
   against fp32 on the same weights, then a short run: all losses finite, overflows (fp16's first steps
   calibrate the loss scale), the scale reached.
4. ``syncs``: device synchronisations per iteration, counted by ``torch.cuda.set_sync_debug_mode`` (CUDA only),
   for ``train_step`` alone and with the data loader.
5. ``throughput``: images/s, peak memory and fraction of the bf16 matmul peak of ``mae``, ``clmae`` and the cheap
   CL-MAE (``--masker-every 4 --masker-batch-fraction 0.25``) for ``vit_tiny_patch4_32`` (batch 256) and
   ``vit_base_patch16_224`` (batch 128; 64 if 128 does not fit) on synthetic data, eager first, then with
   ``--compile`` while the time budget lasts. FLOPs are counted with ``FlopCounterMode`` on eager iterations.
6. ``ddp``: a one-rank DDP run over a real NCCL process group (gloo on the CPU) against the same run without DDP.
   With ``--quick`` the precisions are checked for mae and clmae only (tests/test_precision.py covers them all).
7. ``evaluation``: k-NN and linear probe of a trained checkpoint on the device and on the CPU (accuracy, seconds).
8. ``jpeg_decode``: ``--decode-on device``: 256 pre-resized photo JPEGs decoded by nvJPEG and cropped on the GPU
   against the CPU's libjpeg-turbo (same boxes; mean absolute difference in uint8 levels), the GPU's img/s for the
   batch, and a truncated file skipped rather than fatal.

The iterations are ``Trainer.train_step`` as ``clmae pretrain`` runs it (built by ``benchmarks/throughput.py``'s
``build_trainer``), timed without a synchronisation between them: the loop never waits for the GPU, so neither
does the clock, except at the end of each timed block.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:  # the sibling modules, also when this file is loaded by path (tests)
    sys.path.insert(0, str(HERE))
from provenance import git_state, write_json  # noqa: E402
from throughput import build_trainer, cpu_name, synthetic_npz  # noqa: E402

from clmae.config import make_config  # noqa: E402
from clmae.runtime import flop_counter  # noqa: E402
from clmae.train.trainer import Trainer  # noqa: E402

STRATEGIES = ("mae", "block", "clmae", "hpm", "attmask")
VARIANTS = {"mae": {"method": "mae"}, "clmae": {"method": "clmae"},
            "clmae_cheap": {"method": "clmae", "masker_every": 4, "masker_batch_fraction": 0.25}}
TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 5e-3}  # relative, first-step losses (tests/test_precision.py)


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Budget:
    """The run's time budget: sections ask whether they may start, and record what was skipped."""

    def __init__(self, seconds: float) -> None:
        self.started, self.seconds = time.perf_counter(), seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def allows(self, needed: float) -> bool:
        return self.left >= needed


def section(name: str, results: dict[str, Any], budget: Budget, needed: float, fn, *args) -> None:
    """Run one section into ``results[name]``; an error or a lack of time is recorded, never raised."""
    if not budget.allows(needed):
        results[name] = {"skipped": f"time budget: {budget.left:.0f} s left, about {needed:.0f} s needed"}
        log(f"{name}: skipped ({results[name]['skipped']})")
        return
    log(f"{name} ...")
    t0 = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as exc:  # noqa: BLE001 — one failed check must not lose the others
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        log(f"{name}: FAILED {type(exc).__name__}: {exc}")
    results[name] = {**results[name], "seconds": round(time.perf_counter() - t0, 2)} if isinstance(
        results[name], dict) else results[name]
    log(f"{name}: done in {time.perf_counter() - t0:.1f} s")


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Settings


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes of every section: the GPU's, or ``--quick``'s (tiny, for the test suite and a first look)."""
    if args.quick:
        return {"check_model": "vit_micro_patch2_8", "check_batch": 8, "run_iterations": 2, "matmul": 1024,
                "precision_strategies": ("mae", "clmae"),  # tests/test_precision.py covers every strategy
                "throughput": [("vit_micro_patch2_8", 16, None)], "timed": 2, "warmup": 1, "flop_iterations": 1,
                "compile": False, "ddp_iterations": 2, "eval_train": 64, "eval_test": 32, "eval_images": (96, 48),
                "decode_images": 8, "decode_size": 64, "decode_repeats": 1}
    return {"check_model": "vit_tiny_patch4_32", "check_batch": 64, "run_iterations": 20, "matmul": 8192,
            "throughput": [("vit_tiny_patch4_32", 256, None), ("vit_base_patch16_224", 128, 64)],
            "precision_strategies": STRATEGIES, "timed": 30, "warmup": 5, "flop_iterations": 4,
            "compile": not args.no_compile, "ddp_iterations": 20,
            "eval_train": 5000, "eval_test": 1000, "eval_images": (5000, 1000),
            "decode_images": 256, "decode_size": 224, "decode_repeats": 5}


def trainer_for(method: str, device: str, precision: str, model: str, batch: int, workdir: Path,
                **options) -> Trainer:
    """A trainer of ``method`` on synthetic images of the model's size (the same data and seed every time)."""
    args = argparse.Namespace(data="synthetic", data_dir=None, model=model, batch_size=batch, device=device, seed=0,
                              compile=options.pop("compile", False), masker_every=options.pop("masker_every", 1),
                              masker_batch_fraction=options.pop("masker_batch_fraction", 1.0))
    folder = workdir / f"{method}-{device.replace(':', '')}-{precision}-{model}-{time.monotonic_ns()}"
    folder.mkdir(parents=True)
    with contextlib.redirect_stderr(io.StringIO()):
        return build_trainer(method, args, folder, {"precision": precision, **options})


def endless(trainer: Trainer):
    """The trainer's batches of its current epoch, over and over (synthetic data: two batches an epoch)."""
    while True:
        yield from trainer.batches.epoch(trainer.position.epoch)


def first_batch(trainer: Trainer) -> torch.Tensor:
    return next(iter(trainer.batches.epoch(trainer.position.epoch)))


def first_step(trainer: Trainer, imgs: torch.Tensor) -> dict[str, float]:
    """The MAE step's and the strategy's own step's losses at the trainer's weights, on ``imgs`` (no update)."""
    imgs = imgs.to(trainer.device)
    losses = dict(trainer.mae_step(trainer.masking_batch(imgs, trainer.progress())))
    if trainer.masker.has_own_step:
        losses.update(trainer.strategy_step(trainer.masking_batch(imgs, trainer.progress())))
    trainer.opt_mae.zero_grad(set_to_none=True)
    if trainer.opt_masker is not None:
        trainer.opt_masker.zero_grad(set_to_none=True)
    return losses


def relative(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-3) for k in b if k in a}


# ---------------------------------------------------------------------------------------------
# 1. matmul peak


def matmul_peak(device: torch.device, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"size": n}
    kinds = [("fp32", torch.float32, False)]  # a CPU emulates bf16 and fp16: minutes for one matmul, not a peak
    if device.type == "cuda":
        kinds = [("bf16", torch.bfloat16, None), ("fp16", torch.float16, None), *kinds, ("tf32", torch.float32, True)]
    for name, dtype, tf32 in kinds:
        before = torch.backends.cuda.matmul.allow_tf32
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            repeat = 20 if device.type == "cuda" else 2
            torch.mm(a, b)
            best = math.inf
            for _ in range(3):
                sync(device)
                t0 = time.perf_counter()
                for _ in range(repeat):
                    torch.mm(a, b)
                sync(device)
                best = min(best, time.perf_counter() - t0)
            out[f"{name}_tflop_s"] = 2.0 * n**3 * repeat / best / 1e12
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    # The peak of what training computes in: bf16 on a GPU, fp32 on a CPU (which emulates bf16, slowly).
    out["peak_of"] = "bf16" if device.type == "cuda" else "fp32"
    out["peak_flop_s"] = out[f"{out['peak_of']}_tflop_s"] * 1e12
    return out


# ---------------------------------------------------------------------------------------------
# 2-3. correctness: CUDA vs CPU, bf16 and fp16 vs fp32


def parity(device: str, s: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """fp32 on ``device`` against fp32 on the CPU, every strategy: the same weights (seeded), batch and masks."""
    out: dict[str, Any] = {"model": s["check_model"], "batch": s["check_batch"],
                           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "strategies": {}}
    for method in STRATEGIES:
        cpu = trainer_for(method, "cpu", "fp32", s["check_model"], s["check_batch"], workdir)
        dev = trainer_for(method, device, "fp32", s["check_model"], s["check_batch"], workdir)
        same_weights = all(torch.equal(a.cpu(), b) for a, b in zip(dev.mae.state_dict().values(),
                                                                   cpu.mae.state_dict().values()))
        imgs = first_batch(cpu)
        ref, got = first_step(cpu, imgs), first_step(dev, imgs)
        rel = relative(got, ref)
        out["strategies"][method] = {"cpu": ref, "device": got, "max_rel_diff": max(rel.values()),
                                     "worst": max(rel, key=rel.get), "same_initial_weights": same_weights,
                                     "within_tolerance": max(rel.values()) <= TOLERANCE["fp32"]}
        del cpu, dev
        free_memory(torch.device(device))
    out["max_rel_diff"] = max(v["max_rel_diff"] for v in out["strategies"].values())
    out["tolerance"] = TOLERANCE["fp32"]
    out["ok"] = all(v["within_tolerance"] and v["same_initial_weights"] for v in out["strategies"].values())
    return out


def precisions(device: str, s: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """bf16 and fp16 of every strategy on ``device``: first step against fp32, then a short run."""
    out: dict[str, Any] = {"model": s["check_model"], "batch": s["check_batch"], "iterations": s["run_iterations"],
                           "tolerance": {k: v for k, v in TOLERANCE.items() if k != "fp32"}, "runs": {}}
    for method in s["precision_strategies"]:
        ref_trainer = trainer_for(method, device, "fp32", s["check_model"], s["check_batch"], workdir)
        imgs = first_batch(ref_trainer)
        reference = first_step(ref_trainer, imgs)
        del ref_trainer
        for precision in ("bf16", "fp16"):
            t = trainer_for(method, device, precision, s["check_model"], s["check_batch"], workdir)
            rel = relative(first_step(t, imgs), reference)
            losses, batches = [], endless(t)
            for _ in range(s["run_iterations"]):
                m = t.train_step([next(batches)])
                t.position.iteration += 1
                losses.append(m)
            read = [dict(m) for m in losses]  # one read per iteration, after the run
            skipped = sum(1 for m in read if "skipped" in m)
            t.checks.flush()
            finite = all(math.isfinite(v) for m in read for v in m.values())
            run = {"first_step_max_rel_diff": max(rel.values()), "first_step_worst": max(rel, key=rel.get),
                   "first_step_within_tolerance": max(rel.values()) <= TOLERANCE[precision],
                   "losses_finite": finite, "skipped_iterations": skipped,
                   "loss_mae_first": read[0].get("loss_mae"), "loss_mae_last": read[-1].get("loss_mae")}
            if t.scaler_mae is not None:
                run["loss_scale_mae"] = t.scaler_mae.get_scale()
            if t.scaler_masker is not None:
                run["loss_scale_masker"] = t.scaler_masker.get_scale()
            out["runs"][f"{method}/{precision}"] = run
            del t
            free_memory(torch.device(device))
    out["ok"] = all(r["losses_finite"] and r["first_step_within_tolerance"] for r in out["runs"].values())
    return out


# ---------------------------------------------------------------------------------------------
# 4. synchronisations


def count_syncs(device: str, s: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Synchronising CUDA calls per iteration (``set_sync_debug_mode("warn")``): the loop's, and the loader's."""
    if not device.startswith("cuda"):
        return {"not_applicable": "CUDA only: torch.cuda.set_sync_debug_mode counts CUDA synchronisations "
                                  "(tests/test_syncs.py counts host reads on the CPU)"}
    model, batch, _ = s["throughput"][0]
    out: dict[str, Any] = {"model": model, "batch": batch}
    for name, spec in VARIANTS.items():
        t = trainer_for(spec["method"], device, "auto", model, batch, workdir,
                        **{k: v for k, v in spec.items() if k != "method"})
        batches = endless(t)
        for _ in range(2):  # warm-up (lazy initialisations synchronise once)
            t.train_step([next(batches)])
            t.position.iteration += 1
        prefetched = [next(batches) for _ in range(4)]
        counts = {}
        for label, source in (("train_step", iter(prefetched)), ("with_loader", batches)):
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for _ in range(4):
                        t.train_step([next(source)])
                        t.position.iteration += 1
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
            counts[label] = {"per_iteration": len(syncs) / 4, "examples": sorted(set(syncs))[:5]}
        out[name] = counts
        del t
        free_memory(torch.device(device))
    return out


# ---------------------------------------------------------------------------------------------
# 5. throughput


def throughput(device: str, s: dict[str, Any], peak: float, budget: Budget, workdir: Path) -> dict[str, Any]:
    """Images/s, peak memory and fraction of the matmul peak per (model, variant, compile)."""
    dev = torch.device(device)
    out: dict[str, Any] = {"timed_iterations": s["timed"], "warmup_iterations": s["warmup"], "peak_flop_s": peak,
                           "runs": {}}
    flops: dict[tuple[str, str], float] = {}
    compile_seconds: list[float] = []
    plans = [(compiled, model, batch, fallback, name) for compiled in ((False, True) if s["compile"] else (False,))
             for model, batch, fallback in s["throughput"] for name in VARIANTS]
    for compiled, model, batch, fallback, name in plans:
        key = f"{model}/{name}/{'compile' if compiled else 'eager'}"
        needed = 30 + (max(compile_seconds) * 1.3 if compile_seconds else 150) * compiled
        if not budget.allows(needed):
            out["runs"][key] = {"skipped": f"time budget ({budget.left:.0f} s left, ~{needed:.0f} s needed)"}
            continue
        for size in (batch, fallback):
            if size is None:
                continue
            try:
                out["runs"][key] = one_throughput(device, model, size, name, compiled, s, peak, flops, workdir)
                if compiled:
                    compile_seconds.append(out["runs"][key]["first_iterations_s"])
                break
            except torch.cuda.OutOfMemoryError:
                out["runs"][key] = {"error": f"out of memory at batch {size}"}
            except Exception as exc:  # noqa: BLE001
                out["runs"][key] = {"error": f"{type(exc).__name__}: {exc}",
                                    "traceback": traceback.format_exc()[-3000:]}
                break
            finally:
                free_memory(dev)
        log(f"  {key}: {summary_of_run(out['runs'][key])}")
    out["ok"] = not any("error" in run for run in out["runs"].values())
    return out


def one_throughput(device: str, model: str, batch: int, name: str, compiled: bool, s: dict[str, Any], peak: float,
                   flops: dict, workdir: Path) -> dict[str, Any]:
    spec = VARIANTS[name]
    dev = torch.device(device)
    t = trainer_for(spec["method"], device, "auto", model, batch, workdir, compile=compiled,
                    **{k: v for k, v in spec.items() if k != "method"})
    period = spec.get("masker_every", 1)
    source = endless(t)

    def run(count: int) -> None:
        for _ in range(count):
            t.train_step([next(source)])
            t.position.iteration += 1

    if (model, name) not in flops and not compiled:  # eager iterations (the same maths compiled), a whole period
        with flop_counter() as counter:
            run(max(s["flop_iterations"], period))
        flops[(model, name)] = counter.get_total_flops() / max(s["flop_iterations"], period)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    run(max(s["warmup"], period))  # compiles when --compile
    sync(dev)
    first = time.perf_counter() - t0
    timed = -(-s["timed"] // period) * period  # whole periods of the masking module's schedule
    t0 = time.perf_counter()
    run(timed)
    sync(dev)
    seconds = (time.perf_counter() - t0) / timed
    counted = flops.get((model, name))
    result = {"model": model, "batch": batch, "variant": name, "compile": compiled, "precision": t.precision,
              "img_per_s": batch / seconds, "seconds_per_iteration": seconds, "flops_per_iteration": counted,
              "frac_of_peak": counted / seconds / peak if counted else None, "first_iterations_s": first}
    if dev.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return result


def summary_of_run(run: dict[str, Any]) -> str:
    if "img_per_s" not in run:
        return run.get("skipped") or run.get("error", "?")
    mem = f", {run['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in run else ""
    frac = f", {100 * run['frac_of_peak']:.1f}% of peak" if run.get("frac_of_peak") else ""
    return f"{run['img_per_s']:.0f} img/s{frac}{mem}"


# ---------------------------------------------------------------------------------------------
# 6. one-rank DDP


def ddp(device: str, s: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The same short CL-MAE run without DDP and as one DDP rank over a real NCCL process group (gloo on the
    CPU): every collective of the DDP path runs (``DistContext`` skips them for a single process, so the rank
    is a one-rank context that says it is distributed); the weights must agree."""
    import torch.distributed as dist

    import clmae.train.trainer as trainer_module
    from clmae.distributed import DistContext

    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    data = synthetic_npz(workdir, s["check_batch"] * s["ddp_iterations"], *_size_channels(s["check_model"]))
    values = {"data": str(data), "model": s["check_model"], "batch_size": s["check_batch"], "epochs": 1,
              "device": str(dev), "seed": 0, "progress": False, "probe_every": 0, "snapshot_every": 0,
              "method": "clmae", "log_every": 5, "warmup_epochs": 0}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        single = Trainer(make_config({**values, "output_dir": str(workdir / "ddp-single")}))
        single.fit()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    class OneRank(DistContext):
        @property
        def enabled(self) -> bool:
            return True

    context = OneRank(0, 1, dev.index or 0, dev, backend, owns_group=False)
    real = trainer_module.build_runtime
    trainer_module.build_runtime = lambda cfg: (context, dev)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            wrapped = Trainer(make_config({**values, "output_dir": str(workdir / "ddp-rank")}))
            kind = type(wrapped.mae_ddp).__name__
            t0 = time.perf_counter()
            wrapped.fit()
            seconds = time.perf_counter() - t0
    finally:
        trainer_module.build_runtime = real
        dist.destroy_process_group()
    a, b = single.mae.state_dict(), wrapped.mae.state_dict()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    scale = max(float(a[k].float().abs().max()) for k in a)
    return {"backend": backend, "world_size": 1, "wrapped_in": kind, "iterations": wrapped.position.iteration,
            "fit_seconds": round(seconds, 2), "max_abs_weight_diff": diff, "max_abs_weight": scale,
            "same_as_without_ddp": diff <= 1e-4 * max(scale, 1.0), "ok": diff <= 1e-4 * max(scale, 1.0)}


def _size_channels(model: str) -> tuple[int, int]:
    from clmae.models.configs import model_config

    mc = model_config(model)
    return mc.img_size, mc.in_chans


# ---------------------------------------------------------------------------------------------
# 7. evaluation on the device


def labeled_npz(folder: Path, train: int, test: int, size: int, channels: int) -> Path:
    """Ten classes of stripes (orientation and colour by class) on noise: learnable by k-NN on any encoder."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n)
        angle = labels[:, None, None] * np.pi / 10
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / 6) > 0
        colour = (labels[:, None] * np.array([[25, 70, 130]]) % 255)[:, None, None, :channels]
        noise = rng.integers(0, 60, (n, size, size, channels))
        x = np.clip(stripes[..., None] * colour + noise, 0, 255).astype(np.uint8)
        return (x[..., 0] if channels == 1 else x), labels

    (xtr, ytr), (xte, yte) = images(train), images(test)
    path = folder / "labeled.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return path


def evaluation(device: str, s: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Pretrain a few iterations, then k-NN and a linear probe of its checkpoint on ``device`` and on the CPU."""
    from clmae.evaluation import runner as ev

    size, channels = _size_channels(s["check_model"])
    data = labeled_npz(workdir, *s["eval_images"], size, channels)
    run = workdir / "eval-run"
    values = {"data": str(data), "model": s["check_model"], "batch_size": s["check_batch"], "epochs": 1,
              "subset": s["check_batch"] * s["run_iterations"], "device": device, "progress": False,
              "probe_every": 0, "snapshot_every": 0, "method": "mae", "output_dir": str(run)}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        Trainer(make_config(values)).fit()
    out: dict[str, Any] = {"model": s["check_model"], "max_train": s["eval_train"], "max_test": s["eval_test"]}
    for where in dict.fromkeys((device, "cpu")):
        options = ev.EvalOptions(max_train=s["eval_train"], max_test=s["eval_test"], progress=False,
                                 random_reference=False, device=where, feature_cache=False, num_workers=0)
        setup = ev.prepare(run, str(data), None, options)
        row = {}
        for protocol, config in (("knn", None), ("linear", ev.protocol_config("linear", epochs=5, min_steps=200))):
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):
                report = ev.run_protocol(setup, protocol, config)
            row[protocol] = {**report["results"]["pretrained"], "seconds": round(time.perf_counter() - t0, 2)}
        out["cpu" if where == "cpu" else "device"] = row
    if "device" in out:
        out["knn_top1_difference"] = abs(out["device"]["knn"]["knn_weighted_top1"] -
                                         out["cpu"]["knn"]["knn_weighted_top1"])
    return out


def jpeg_decode(device: str, s: dict[str, Any]) -> dict[str, Any]:
    """``--decode-on device``: a batch of pre-resized photo JPEGs decoded and cropped on ``device``
    (:func:`clmae.data.images.decode_crops`, nvJPEG on CUDA) against the same on the CPU (libjpeg-turbo), the same
    boxes; the device's img/s for the whole batch; and a truncated file skipped, not fatal."""
    from loader import make_photo, source_photos

    from clmae.data.images import decode_crops
    from clmae.data.shards import preresize

    n, size = s["decode_images"], s["decode_size"]
    rng = np.random.default_rng(0)
    sources = source_photos()
    files = []
    for _ in range(n):
        buf = io.BytesIO()
        make_photo(sources, rng).convert("RGB").save(buf, "JPEG", quality=90)
        files.append(torch.frombuffer(bytearray(preresize(buf.getvalue(), 256)[0]), dtype=torch.uint8))
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[int(v) for v in (10 + 5 * torch.rand(2, generator=g)).tolist()] + [200, 200]
                          for _ in range(n)], dtype=torch.float32)
    flips = torch.rand(n, generator=g) < 0.5
    dev = torch.device(device)
    on_cpu = torch.stack(decode_crops(files, boxes, flips, size, 3, torch.device("cpu")))  # type: ignore[arg-type]
    on_dev = torch.stack(decode_crops(files, boxes, flips, size, 3, dev)).cpu()  # type: ignore[arg-type]
    diff = (on_dev.float() - on_cpu.float()).abs()
    times = []
    for _ in range(s["decode_repeats"]):
        sync(dev)
        t0 = time.perf_counter()
        decode_crops(files, boxes, flips, size, 3, dev)
        sync(dev)
        times.append(time.perf_counter() - t0)
    broken = files[:3] + [files[3][: len(files[3]) // 2]]
    kept = decode_crops(broken, boxes[:4], flips[:4], size, 3, dev)
    ok = diff.mean().item() < 1.0 and [c is None for c in kept] == [False, False, False, True]
    return {"ok": ok, "images": n, "size": size, "mean_abs_diff_vs_cpu": round(diff.mean().item(), 4),
            "max_abs_diff_vs_cpu": diff.max().item(), "img_per_s": round(n / min(times), 1),
            "seconds_per_batch": [round(t, 4) for t in times], "truncated_file_skipped": kept[3] is None}


# ---------------------------------------------------------------------------------------------
# The whole run


def environment(device: str) -> dict[str, Any]:
    dev = torch.device(device)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device,
           "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), **git_state()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    else:
        env["device_name"] = cpu_name()
    return env


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    s = settings(args)
    budget = Budget(args.budget_s)
    results: dict[str, Any] = {"benchmark": "gpu", "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
                               "quick": args.quick, "budget_s": args.budget_s,
                               "when": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment(args.device),
                               "settings": dict(s)}
    with tempfile.TemporaryDirectory(prefix="clmae-gpu-") as tmp:
        work = Path(tmp)
        section("matmul_peak", results, budget, 5, matmul_peak, torch.device(args.device), s["matmul"])
        peak = results["matmul_peak"].get("peak_flop_s") or float("nan")
        section("parity", results, budget, 20, parity, args.device, s, work)
        section("precisions", results, budget, 30, precisions, args.device, s, work)
        section("syncs", results, budget, 20, count_syncs, args.device, s, work)
        section("ddp", results, budget, 30, ddp, args.device, s, work)
        section("evaluation", results, budget, 30, evaluation, args.device, s, work)
        section("jpeg_decode", results, budget, 20, jpeg_decode, args.device, s)
        section("throughput", results, budget, 30, throughput, args.device, s, peak, budget, work)
    results["wall_s"] = round(time.perf_counter() - budget.started, 1)
    names = ("matmul_peak", "parity", "precisions", "syncs", "ddp", "evaluation", "jpeg_decode", "throughput")
    results["ok"] = all(results[k].get("ok", True) and "error" not in results[k] and "skipped" not in results[k]
                        for k in names)  # a section skipped for time is a check not done
    return results


def summary(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"clmae GPU check on {env.get('device_name')} ({env['device']}), torch {env['torch']}, commit "
             f"{(env.get('commit') or '?')[:10]}{' (dirty)' if env.get('dirty') else ''}: "
             f"{'all checks passed' if results['ok'] else 'SOME CHECKS FAILED OR NOT RUN'} in "
             f"{results['wall_s']:.0f} s"]

    def part(name: str) -> dict[str, Any]:
        value = results.get(name, {})
        if "error" in value or "skipped" in value or "not_applicable" in value:
            lines.append(f"  {name:<12}{value.get('error') or value.get('skipped') or value['not_applicable']}")
            return {}
        return value

    if mm := part("matmul_peak"):
        lines.append("  matmul      " + ", ".join(f"{k[:-8]} {v:.2f}" for k, v in mm.items() if k.endswith("_tflop_s"))
                     + f" TFLOP/s (the peak: {mm['peak_of']})")
    if p := part("parity"):
        lines.append(f"  parity      fp32 device vs CPU, max relative loss difference {p['max_rel_diff']:.2e} "
                     f"(tolerance {p['tolerance']:.0e}): {'ok' if p['ok'] else 'FAILED'}")
    if pr := part("precisions"):
        worst = max(pr["runs"].items(), key=lambda kv: kv[1]["first_step_max_rel_diff"])
        overflows = sum(r["skipped_iterations"] for k, r in pr["runs"].items() if k.endswith("fp16"))
        lines.append(f"  precisions  bf16+fp16 x {len(pr['runs']) // 2} strategies: {'ok' if pr['ok'] else 'FAILED'}; "
                     f"worst first-step difference {worst[1]['first_step_max_rel_diff']:.2e} ({worst[0]}); "
                     f"fp16 skipped iterations (loss-scale calibration) {overflows}")
    if sy := part("syncs"):
        lines.append("  syncs/iter  " + ", ".join(f"{k} {v['train_step']['per_iteration']:g} "
                                                  f"(+loader {v['with_loader']['per_iteration']:g})"
                                                  for k, v in sy.items() if isinstance(v, dict) and "train_step" in v))
    if d := part("ddp"):
        lines.append(f"  ddp         one {d['backend']} rank, {d['wrapped_in']}: max weight difference to no DDP "
                     f"{d['max_abs_weight_diff']:.2e} ({'ok' if d['same_as_without_ddp'] else 'DIFFERS'})")
    if e := part("evaluation"):
        row = e.get("device", e.get("cpu"))
        knn, linear = row["knn"], row["linear"]
        lines.append(f"  evaluation  k-NN {knn['knn_weighted_top1']:.1f}% in {knn['seconds']:.1f} s, linear "
                     f"{linear.get('linear_top1', float('nan')):.1f}% in {linear['seconds']:.1f} s "
                     f"(CPU k-NN {e['cpu']['knn']['knn_weighted_top1']:.1f}%)")
    if j := part("jpeg_decode"):
        lines.append(f"  jpeg_decode {j['images']} JPEGs decoded and cropped at {j['img_per_s']:.0f} img/s, "
                     f"{j['mean_abs_diff_vs_cpu']:.3f} levels from the CPU's decode "
                     f"({'ok' if j['ok'] else 'DIFFERS'}; a truncated file "
                     f"{'skipped' if j['truncated_file_skipped'] else 'NOT skipped'})")
    if th := part("throughput"):
        for key, run in th["runs"].items():
            lines.append(f"  {key:<42}{summary_of_run(run)}")
    return "\n".join(lines)


def default_output(device: str) -> Path:
    name = "cpu" if device == "cpu" else torch.cuda.get_device_name(torch.device(device))
    tag = "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
    return REPO / "benchmarks" / "results" / f"gpu-{tag}-{time.strftime('%Y%m%d-%H%M')}.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else None,
                   help="cuda, cuda:N or cpu (default: cuda when there is one)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the whole script in well under a minute")
    p.add_argument("--no-compile", action="store_true", help="leave out the --compile throughput runs")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting sections after this many seconds (default: 450, --quick: 120)")
    p.add_argument("--output", default=None, help="the JSON (default: benchmarks/results/gpu-<device>-<date>.json)")
    args = p.parse_args(argv)
    if args.device is None:
        p.error("no CUDA GPU here; pass --device cpu (with --quick for the short check)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is available; use --device cpu")
    if args.budget_s is None:
        args.budget_s = 120.0 if args.quick else 450.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_all(args)
    out = Path(args.output) if args.output else default_output(args.device)
    write_json(out, results)
    print(summary(results))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
