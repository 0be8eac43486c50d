"""Throughput of one iteration of a masking strategy against one plain-MAE iteration, measured through the trainer.

What is timed is exactly what ``clmae pretrain`` runs: :class:`clmae.train.trainer.Trainer` objects
(``method="mae"`` and one per ``--method``, CL-MAE by default) are built with the same model and
batch, and each iteration is ``next(batches)`` + ``trainer.train_step([imgs], lr)``, at the middle
of a 100-epoch run (where schedules such as HPM's hard share are half-way). The variants are
timed interleaved in one process (rep 1: MAE, each strategy, matmul; rep 2: ...), so a noisy
shared machine hits all of them alike; ratios are medians of per-rep ratios. JSON keys carry the
method's name (``img_per_s_hpm``, ``ratio_hpm_to_mae``), ``per_method`` gathers the headline
numbers, and a single-method run also has them as ``*_method*``.

Reported per variant: median and spread of seconds per iteration, images/s, the split of the
strategy's iteration into its MAE step (and in it the masks' choice) and its own step (CL-MAE's
masking-module step), data time vs compute time, FLOPs per
iteration (counted with ``torch.utils.flop_counter.FlopCounterMode`` on one eager iteration:
matmuls, convolutions and attention, forward and backward; element-wise ops and the optimiser
are not counted), achieved FLOP/s and its fraction of a dense matmul measured in the same reps.
Peak memory is measured in a fresh subprocess per variant: the RSS high-water mark on CPU,
``torch.cuda.max_memory_allocated`` on CUDA.

    python benchmarks/throughput.py --model vit_tiny_patch4_32 --batch-size 128 \
        --output benchmarks/results/throughput_tiny_b128.json
    python benchmarks/throughput.py --method clmae block hpm attmask colormae sbam automae \
        --model vit_mini_patch4_32 --batch-size 128 --threads 2 \
        --output benchmarks/results/throughput_strategies_mini_b128.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clmae.config import make_config
from clmae.maskers import METHODS
from clmae.models.configs import model_config
from clmae.runtime import flop_counter
from clmae.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling module, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_state  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Small helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles: the numbers every timing is reported with."""
    v = sorted(values)
    q = np.percentile(v, [25, 75]) if len(v) > 1 else (v[0], v[0])
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": float(q[0]), "q3": float(q[1]),
            "n": len(v)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def current_rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """High-water mark of this process's RSS.

    On Linux this is ``VmHWM`` of the current address space: ``ru_maxrss`` would not do, because
    a child inherits the parent's RSS at fork as its starting high-water mark.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart the RSS high-water mark from the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Building the trainers


def synthetic_npz(folder: Path, n: int, img_size: int, channels: int, seed: int = 0) -> Path:
    """Random uint8 images of the model's size: the cost of an iteration does not depend on content."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, img_size, img_size, channels), dtype=np.uint8)
    path = folder / "synthetic.npz"
    np.savez(path, x_train=x, y_train=np.zeros(n, dtype=np.int64))
    return path


def build_trainer(method: str, args: argparse.Namespace, workdir: Path,
                  options: dict[str, Any] | None = None) -> Trainer:
    """A trainer exactly as ``clmae pretrain`` would build it, writing into a scratch folder; ``options``: more
    PretrainConfig values (``precision``, ...), as benchmarks/gpu.py passes them."""
    data = args.data
    if data == "synthetic":
        mc = model_config(args.model)
        data = str(synthetic_npz(workdir, args.batch_size * 2, mc.img_size, mc.in_chans))
    own = {"masker_every": args.masker_every, "masker_batch_fraction": args.masker_batch_fraction}
    cfg = make_config({
        "data": data, "data_dir": args.data_dir, "subset": args.batch_size * 2 if args.data != "synthetic" else None,
        "method": method, "model": args.model, "batch_size": args.batch_size, "device": args.device,
        "seed": args.seed, "compile": args.compile, "epochs": 100, "warmup_epochs": 0,
        "output_dir": str(workdir / f"run-{method}"), "progress": False,
        **{k: v for k, v in own.items() if k in METHODS[method].options.keys()},  # CL-MAE's cost knobs
        **(options or {}),
    })
    trainer = Trainer(cfg)
    trainer.position.epoch = cfg.epochs // 2  # mid-run: schedules (HPM's hard share, EMA momenta) half-way
    return trainer


class Runner:
    """Drives one trainer like ``Trainer.fit`` does and times each iteration and its parts.

    The strategy's own step (CL-MAE's masking-module step) and its choice of masks in the MAE
    step are wrapped with timers on the instance (the wrapped functions are called unchanged), so
    the iteration can be split into its parts without touching the trainer's code.
    """

    def __init__(self, trainer: Trainer, lam: float = 1.0):
        self.trainer = trainer
        self.device = trainer.device
        self.lam = lam
        self.lr = trainer.lr
        self.epoch = 0
        self.batches = self._batches()
        self.parts: dict[str, float] = {}
        if trainer.masker.has_own_step:
            self._wrap(trainer, "strategy_step", "masker_step")
        if not trainer.masker.uniform:
            self._wrap(trainer.masker, "keep_indices", "masker_scores")

    def _wrap(self, obj: Any, name: str, label: str) -> None:
        fn: Callable = getattr(obj, name)

        def timed(*a, **kw):
            sync(self.device)
            t0 = time.perf_counter()
            result = fn(*a, **kw)
            sync(self.device)
            self.parts[label] = self.parts.get(label, 0.0) + time.perf_counter() - t0
            return result

        setattr(obj, name, timed)

    def _batches(self):
        while True:
            yield from self.trainer.batches.epoch(self.epoch)
            self.epoch += 1

    def iterate(self, count: int) -> dict[str, float]:
        """Run ``count`` iterations; seconds per iteration for data, step, and the step's parts."""
        self.parts = {}
        data = step = 0.0
        cpu0 = time.process_time()
        for _ in range(count):
            sync(self.device)
            t0 = time.perf_counter()
            imgs = next(self.batches)
            sync(self.device)
            t1 = time.perf_counter()
            self.trainer.train_step([imgs], self.lr)
            self.trainer.position.iteration += 1
            sync(self.device)
            t2 = time.perf_counter()
            data += t1 - t0
            step += t2 - t1
        cpu = time.process_time() - cpu0
        out = {"data": data / count, "step": step / count, "iteration": (data + step) / count, "cpu": cpu / count}
        out.update({k: v / count for k, v in self.parts.items()})
        return out

    def count_flops(self, count: int) -> dict[str, float]:
        """FLOPs per iteration (and of the masking-module step) over ``count`` eager iterations."""
        t = self.trainer
        soft = getattr(t.masker, "soft_forward", None)
        compiled = (t.mae_forward, soft, getattr(t.masker, "_compiled_call_impl", None))
        if t.cfg.compile:  # count on the eager modules: same maths, and the counter sees every op
            t.mae_forward = getattr(t, "mae_ddp", t.mae)
            if soft is not None:
                t.masker.soft_forward = getattr(soft, "_torchdynamo_orig_callable", soft)
            t.masker._compiled_call_impl = None  # what nn.Module.compile() set
        masker_flops = [0]
        original = t.strategy_step

        def counted(*a, **kw):
            with flop_counter() as inner:
                result = original(*a, **kw)
            masker_flops[0] += inner.get_total_flops()
            return result

        if t.masker.has_own_step:
            t.strategy_step = counted
        try:
            with flop_counter() as fc:
                for _ in range(count):
                    t.train_step([next(self.batches)], self.lr)
                    t.position.iteration += 1
        finally:
            t.mae_forward = compiled[0]
            if soft is not None:
                t.masker.soft_forward = compiled[1]
            if t.cfg.compile:
                t.masker._compiled_call_impl = compiled[2]
            t.strategy_step = original
        total = fc.get_total_flops()
        return {"iteration": total / count, "masker_step": masker_flops[0] / count,
                "mae_step": (total - masker_flops[0]) / count}


def model_fwd_bwd(trainer: Trainer, imgs: torch.Tensor) -> Callable[[], None]:
    """The plain MAE's forward + backward alone (no data, no masker, no optimiser): the blocks' work."""
    mae = trainer.mae
    gen = torch.Generator().manual_seed(0)
    num_keep = mae.num_keep(trainer.cfg.mask_ratio)
    ids = torch.rand(imgs.shape[0], mae.num_patches, generator=gen).argsort(1)[:, :num_keep].to(imgs.device)

    def run() -> None:
        with trainer.autocast_context():
            loss = mae(imgs, ids)["loss"]
        loss.backward()
        mae.zero_grad(set_to_none=True)

    return run


def matmul_peak(device: torch.device, size: int | None = None) -> tuple[Callable[[], None], float]:
    """A dense square matmul in the dtype the model computes in (fp32 on CPU, bf16 on CUDA)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    repeat = 10 if device.type == "cuda" else 2

    def run() -> None:
        for _ in range(repeat):
            torch.mm(a, b)

    return run, 2.0 * n**3 * repeat


def timed(fn: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Wall-clock and process CPU seconds of one call."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}


# ---------------------------------------------------------------------------------------------
# Peak memory, one fresh process per variant


def memory_probe(args: argparse.Namespace) -> dict[str, Any]:
    """Build one variant, run two iterations (the first has a masking-module step), report the high-water mark."""
    with tempfile.TemporaryDirectory(prefix="clmae-bench-") as tmp:
        trainer = build_trainer(args.memory_probe, args, Path(tmp))
        runner = Runner(trainer)
        device = trainer.device
        sync(device)
        result: dict[str, Any] = {"variant": args.memory_probe, "peak_rss_during_setup_bytes": peak_rss_bytes(),
                                  "rss_after_setup_bytes": current_rss_bytes(), "peak_reset": reset_peak_rss()}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            result["allocated_after_setup_bytes"] = torch.cuda.memory_allocated(device)
        runner.iterate(2)
        result["peak_rss_bytes"] = peak_rss_bytes()
        if device.type == "cuda":
            result.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                          peak_reserved_bytes=torch.cuda.max_memory_reserved(device))
            result["peak_bytes"] = result["peak_allocated_bytes"]
            result["increment_bytes"] = result["peak_allocated_bytes"] - result["allocated_after_setup_bytes"]
        else:
            result["peak_bytes"] = result["peak_rss_bytes"]
            result["increment_bytes"] = result["peak_rss_bytes"] - result["rss_after_setup_bytes"]
        return result


def measure_memory(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", variant, "--model", args.model,
           "--batch-size", str(args.batch_size), "--device", args.device, "--data", args.data,
           "--masker-every", str(args.masker_every), "--masker-batch-fraction", str(args.masker_batch_fraction),
           "--seed", str(args.seed), "--output", os.devnull]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.compile:
        cmd.append("--compile")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The benchmark


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.time()
    k = args.masker_every
    methods = args.method
    with tempfile.TemporaryDirectory(prefix="clmae-bench-") as tmp:
        mae_runner = Runner(build_trainer("mae", args, Path(tmp)))
        runners = {m: Runner(build_trainer(m, args, Path(tmp))) for m in methods}
        device = mae_runner.device
        imgs = next(mae_runner.batches)
        fwd_bwd = model_fwd_bwd(mae_runner.trainer, imgs)
        peak_fn, peak_flops = matmul_peak(device, args.matmul_size)

        # The first pass counts FLOPs (eager) and doubles as warm-up for the eager parts.
        log(f"counting FLOPs: {k} iteration(s) per variant")
        flops = {"mae": mae_runner.count_flops(k), **{m: r.count_flops(k) for m, r in runners.items()}}
        with flop_counter() as fc:
            fwd_bwd()
        flops["mae_fwd_bwd"] = fc.get_total_flops()
        log(f"warm-up: {args.warmup} x {k} iteration(s) per variant")
        for _ in range(args.warmup):
            mae_runner.iterate(k)
            for runner in runners.values():
                runner.iterate(k)
            fwd_bwd()
            peak_fn()

        reps: list[dict[str, Any]] = []
        for r in range(args.reps):
            rec = {"mae": mae_runner.iterate(k), **{m: runner.iterate(k) for m, runner in runners.items()},
                   "mae_fwd_bwd": timed(fwd_bwd, device), "matmul": timed(peak_fn, device)}
            reps.append(rec)
            mae_it, mae_cpu = rec["mae"]["iteration"], rec["mae"]["cpu"]
            parts = "  ".join(f"{method_label(m)} {rec[m]['iteration']:.3f}s (x{rec[m]['iteration'] / mae_it:.2f}, "
                              f"CPU time x{rec[m]['cpu'] / mae_cpu:.2f})" for m in methods)
            log(f"rep {r + 1}/{args.reps}: MAE {rec['mae']['iteration']:.3f}s  {parts}  "
                f"matmul {peak_flops / rec['matmul']['wall'] / 1e9:.1f} GFLOP/s")
        model_cfg = dataclasses.asdict(mae_runner.trainer.model_config)

    memory = {}
    if not args.no_memory:
        for variant in ("mae", *methods):
            log(f"peak memory: {variant} (separate process)")
            memory[variant] = measure_memory(args, variant)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    extra = {"load_avg_before": load_before, "load_avg_after": load_after, "wall_s": round(time.time() - started, 1),
             "model_config": model_cfg}
    return summarise_all(args, reps, flops, peak_flops, memory, device, extra)


def method_label(method: str) -> str:
    return {"clmae": "CL-MAE", "mae": "MAE", "hpm": "HPM", "attmask": "AttMask", "block": "block",
            "colormae": "ColorMAE", "sbam": "SBAM", "automae": "AutoMAE"}.get(method, method)


def memory_fields(memory: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """Peak memory per variant and its ratio to MAE's (``peak_mem_ratio_M``; unsuffixed for one method)."""
    out: dict[str, Any] = {"peak_mem_mae_bytes": memory.get("mae", {}).get("peak_bytes"),
                           "peak_mem_mae_increment_bytes": memory.get("mae", {}).get("increment_bytes")}
    for m in methods:
        mem = {v: memory.get(v, {}) for v in ("mae", m)}
        both = bool(mem["mae"]) and bool(mem[m])
        fields = {
            f"peak_mem_{m}_bytes": mem[m].get("peak_bytes"),
            f"peak_mem_ratio_{m}": mem[m]["peak_bytes"] / mem["mae"]["peak_bytes"] if both else None,
            f"peak_mem_{m}_increment_bytes": mem[m].get("increment_bytes"),
            f"peak_mem_increment_ratio_{m}": (mem[m]["increment_bytes"] / mem["mae"]["increment_bytes"] if both
                                              else None),
        }
        out.update(fields)
        if len(methods) == 1:
            out.update(peak_mem_ratio=fields[f"peak_mem_ratio_{m}"],
                       peak_mem_method_bytes=fields[f"peak_mem_{m}_bytes"],
                       peak_mem_increment_ratio=fields[f"peak_mem_increment_ratio_{m}"])
    out["memory"] = memory
    return out


def summarise_all(args, reps, flops, peak_flops, memory, device, extra) -> dict[str, Any]:
    """:func:`summarise` for each method of the run, merged (the MAE's and the machine's fields are shared)."""
    methods = args.method
    res: dict[str, Any] = {}
    for m in methods:
        part = summarise(args, reps, flops, peak_flops, memory, device, extra, m)
        seconds = {**res.get("seconds", {}), **part["seconds"]}
        res.update(part)
        res["seconds"] = seconds
    res.update(memory_fields(memory, methods))
    res["methods"] = methods
    if len(methods) > 1:  # the unsuffixed *_method* fields belong to single-method runs
        for key in [k for k in res if "_method" in k and k != "methods"]:
            del res[key]
        res["method"] = None
    res["per_method"] = {m: {
        "img_per_s": res[f"img_per_s_{m}"], "ratio_to_mae": res[f"ratio_{m}_to_mae"],
        "ratio_to_mae_spread": res[f"ratio_{m}_to_mae_spread"],
        "ratio_to_mae_cpu_time": res[f"ratio_{m}_to_mae_cpu_time"],
        "ratio_flops_to_mae": res[f"ratio_flops_{m}_to_mae"], "peak_mem_ratio": res.get(f"peak_mem_ratio_{m}"),
        "masks_seconds": res["seconds"][f"{m}_masker_scores_in_mae_step"]["median"],
        "own_step_seconds": res["seconds"][f"{m}_masker_step"]["median"],
    } for m in methods}
    return res


def summarise(args, reps, flops, peak_flops, memory, device, extra, m: str) -> dict[str, Any]:
    """Medians over reps for method ``m``; ratios are medians of per-rep ratios (paired, so shared noise cancels)."""
    b = args.batch_size
    med = statistics.median

    def col(variant: str, key: str) -> list[float]:
        return [rep[variant][key] for rep in reps]

    def paired(a: list[float], c: list[float]) -> list[float]:
        return [x / y for x, y in zip(a, c)]

    mae_it, cl_it = col("mae", "iteration"), col(m, "iteration")
    mae_cpu, cl_cpu = col("mae", "cpu"), col(m, "cpu")
    masker_step = col(m, "masker_step") if "masker_step" in reps[0][m] else [0.0] * len(reps)
    mm_wall, mm_cpu = col("matmul", "wall"), col("matmul", "cpu")
    fb_wall, fb_cpu = col("mae_fwd_bwd", "wall"), col("mae_fwd_bwd", "cpu")
    peak = [peak_flops / t for t in mm_wall]
    peak_cpu = [peak_flops / t for t in mm_cpu]

    def frac(work: float, times: list[float], peaks: list[float]) -> float:
        return med([work / t / p for t, p in zip(times, peaks)])

    f_mae, f_cl, f_fb = flops["mae"]["iteration"], flops[m]["iteration"], flops["mae_fwd_bwd"]
    return {
        "benchmark": "throughput",
        "method": m,
        "model": args.model,
        "batch_size": b,
        "masker_every": args.masker_every,
        "masker_batch_fraction": args.masker_batch_fraction,
        "compile": args.compile,
        "data": args.data,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        **git_state(),
        "warmup": args.warmup,
        "reps": args.reps,
        "iterations_per_rep": args.masker_every,
        # headline numbers; an iteration is next(batch) + train_step, as in Trainer.fit
        "img_per_s_mae": b / med(mae_it),
        f"img_per_s_{m}": b / med(cl_it),
        f"ratio_{m}_to_mae": med(paired(cl_it, mae_it)),
        f"ratio_{m}_to_mae_spread": spread(paired(cl_it, mae_it)),
        f"ratio_{m}_to_mae_cpu_time": med(paired(cl_cpu, mae_cpu)),
        f"ratio_{m}_to_mae_cpu_time_spread": spread(paired(cl_cpu, mae_cpu)),
        f"ratio_flops_{m}_to_mae": f_cl / f_mae,
        # the same headline numbers under method-independent names, for tables over strategies
        "img_per_s_method": b / med(cl_it),
        "ratio_method_to_mae": med(paired(cl_it, mae_it)),
        "ratio_method_to_mae_cpu_time": med(paired(cl_cpu, mae_cpu)),
        "ratio_flops_method_to_mae": f_cl / f_mae,

        "peak_mem_note": ("CPU: RSS high-water mark (VmHWM) of a fresh process per variant over two iterations, "
                          "reset after building the trainer; increment = peak minus RSS after building the trainer. "
                          "CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats"),
        # seconds per iteration (wall clock unless named cpu)
        "seconds": {
            "mae_iteration": spread(mae_it),
            f"{m}_iteration": spread(cl_it),
            "mae_iteration_cpu": spread(mae_cpu),
            f"{m}_iteration_cpu": spread(cl_cpu),
            f"{m}_mae_step": spread([s - own for s, own in zip(col(m, "step"), masker_step)]),
            f"{m}_masker_scores_in_mae_step": spread(col(m, "masker_scores") if "masker_scores" in reps[0][m]
                                                     else [0.0] * len(reps)),
            f"{m}_masker_step": spread(masker_step),
            "mae_data": spread(col("mae", "data")),
            f"{m}_data": spread(col(m, "data")),
            "mae_model_fwd_bwd": spread(fb_wall),
            "matmul_call": spread(mm_wall),
        },
        "data_fraction_mae": med(paired(col("mae", "data"), mae_it)),
        f"data_fraction_{m}": med(paired(col(m, "data"), cl_it)),
        # work and efficiency
        "flops_note": ("torch.utils.flop_counter.FlopCounterMode over one eager pass of the same iterations: "
                       "matmul, convolution and attention FLOPs, forward and backward (CPU flash attention "
                       "added with torch's SDPA formulas); element-wise ops and the optimiser are not counted"),
        "flops_per_iteration_mae": f_mae,
        f"flops_per_iteration_{m}": f_cl,
        f"flops_{m}_mae_step": flops[m]["mae_step"],
        f"flops_{m}_masker_step": flops[m]["masker_step"],
        "flops_mae_model_fwd_bwd": f_fb,
        "matmul_size": args.matmul_size or (8192 if device.type == "cuda" else 2048),
        "matmul_peak_flop_s": spread(peak),
        "matmul_peak_flop_s_cpu_time": spread(peak_cpu),
        "flop_s_mae_iteration": f_mae / med(mae_it),
        f"flop_s_{m}_iteration": f_cl / med(cl_it),
        "flop_s_mae_model_fwd_bwd": f_fb / med(fb_wall),
        "frac_of_peak_mae_iteration": frac(f_mae, mae_it, peak),
        f"frac_of_peak_{m}_iteration": frac(f_cl, cl_it, peak),
        "frac_of_peak_mae_model_fwd_bwd": frac(f_fb, fb_wall, peak),
        "frac_of_peak_cpu_time_mae_iteration": frac(f_mae, mae_cpu, peak_cpu),
        f"frac_of_peak_cpu_time_{m}_iteration": frac(f_cl, cl_cpu, peak_cpu),
        "frac_of_peak_cpu_time_mae_model_fwd_bwd": frac(f_fb, fb_cpu, peak_cpu),
        "frac_note": ("FLOP/s of the work divided by the FLOP/s of a dense square matmul timed in the same rep; "
                      "median over reps. *_cpu_time uses process CPU seconds for both, which is robust to the "
                      "process being descheduled on a shared machine"),
        "raw_reps": reps,
        "args": {k: v for k, v in vars(args).items() if k != "memory_probe"},
        **extra,
    }


def print_summary(res: dict[str, Any]) -> None:
    s = res["seconds"]
    methods = res.get("methods") or [res.get("method") or "clmae"]
    gib = 2**30
    pct = lambda x: f"{100 * x:.0f}%"
    lines = [
        (f"{res['model']} batch {res['batch_size']} on {res['device']} ({res['device_name']}, "
         f"{res['threads']} threads, "
         f"{res['precision']}), masker_every={res['masker_every']}, "
         f"masker_batch_fraction={res['masker_batch_fraction']}"),
        f"  MAE iteration     {s['mae_iteration']['median']:.3f} s  ({res['img_per_s_mae']:.1f} img/s)",
    ]
    for m in methods:
        label = method_label(m)
        lines += [
            f"  {label + ' iteration':<18}{s[f'{m}_iteration']['median']:.3f} s  ({res[f'img_per_s_{m}']:.1f} img/s)",
            (f"    MAE step        {s[f'{m}_mae_step']['median']:.3f} s  (of which choosing the masks "
             f"{s[f'{m}_masker_scores_in_mae_step']['median']:.3f} s)"),
        ]
        if res.get(f"flops_{m}_masker_step"):  # a strategy with a step of its own (CL-MAE's masking module)
            lines.append(f"    masking step    {s[f'{m}_masker_step']['median']:.3f} s  (per iteration)")
        lines.append(f"  {'ratio ' + label + '/MAE':<18}{res[f'ratio_{m}_to_mae']:.2f} wall "
                     f"(reps {res[f'ratio_{m}_to_mae_spread']['min']:.2f}-"
                     f"{res[f'ratio_{m}_to_mae_spread']['max']:.2f}), {res[f'ratio_{m}_to_mae_cpu_time']:.2f} CPU "
                     f"time, {res[f'ratio_flops_{m}_to_mae']:.2f} FLOPs, {pct(res[f'data_fraction_{m}'])} data, "
                     f"{pct(res[f'frac_of_peak_{m}_iteration'])} of matmul peak")
        if res["peak_mem_mae_bytes"] and res.get(f"peak_mem_{m}_bytes"):
            lines.append(f"    peak memory     {res[f'peak_mem_{m}_bytes'] / gib:.2f} GiB "
                         f"(x{res[f'peak_mem_ratio_{m}']:.2f} MAE's); above setup "
                         f"{res[f'peak_mem_{m}_increment_bytes'] / gib:.2f} GiB "
                         f"(x{res[f'peak_mem_increment_ratio_{m}']:.2f})")
    lines += [
        f"  data time         {pct(res['data_fraction_mae'])} of the MAE iteration",
        (f"  matmul peak       {res['matmul_peak_flop_s']['median'] / 1e9:.1f} GFLOP/s wall, "
         f"{res['matmul_peak_flop_s_cpu_time']['median'] / 1e9:.1f} GFLOP/CPU-s"),
        (f"  fraction of peak  MAE fwd+bwd {pct(res['frac_of_peak_mae_model_fwd_bwd'])} "
         f"(CPU time {pct(res['frac_of_peak_cpu_time_mae_model_fwd_bwd'])}), "
         f"MAE iteration {pct(res['frac_of_peak_mae_iteration'])} ({pct(res['frac_of_peak_cpu_time_mae_iteration'])})"),
    ]
    if res["peak_mem_mae_bytes"]:
        lines.append(f"  peak memory       MAE {res['peak_mem_mae_bytes'] / gib:.2f} GiB; above setup "
                     f"{res['peak_mem_mae_increment_bytes'] / gib:.2f} GiB")
    print("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", nargs="+", default=["clmae"], choices=[n for n in METHODS if n != "mae"],
                   help="the masking strategies timed against MAE, all interleaved in one run")
    p.add_argument("--model", default="vit_tiny_patch4_32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--masker-every", type=int, default=1)
    p.add_argument("--masker-batch-fraction", type=float, default=1.0)
    p.add_argument("--data", default="synthetic",
                   help="synthetic (random images of the model's size), cifar10, digits, ...")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--warmup", type=int, default=1,
                   help="warm-up reps after the FLOP-counting pass (each masker_every iterations per variant)")
    p.add_argument("--reps", type=int, default=5, help="timed reps (each masker_every iterations per variant)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--matmul-size", type=int, default=None, help="side of the square matmul for the peak")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model and masker (as --compile in pretrain)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-only", action="store_true",
                   help="only (re)measure peak memory and update the memory fields of an existing --output JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="JSON file to write (e.g. benchmarks/results/throughput_NAME.json)")
    p.add_argument("--memory-probe", choices=list(METHODS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return 0
    if args.memory_only:
        out = Path(args.output)
        res = json.loads(out.read_text())
        res.update(memory_fields({v: measure_memory(args, v) for v in ("mae", *args.method)}, args.method))
        res["memory_measured_separately"] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), **git_state()}
        out.write_text(json.dumps(res, indent=2, default=str) + "\n")
        print_summary(res)
        return 0
    res = benchmark(args)
    print_summary(res)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
