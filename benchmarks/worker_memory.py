"""What DataLoader workers cost in memory: forked from the training process, or from clmae's fork server.

Issue 24's trial: 160 photos of about 200 px, ViT-B at 224 px on CPU, 2 workers. `top` showed clmae at 13.5 GB
and each worker at about 6 GB. A worker's RSS counts every page of the training process it maps, shared or
not, so RSS alone cannot say whether the workers copied anything. This runs the same kind of job,

    clmae pretrain --data PHOTOS --method mae --subset 32 --batch-size 16 --epochs 2 --num-workers 2 --device cpu

once with workers forked from the training process (the old way: ``worker_context`` replaced by None, Linux's
default) and once as clmae starts them now (from a fork server), and samples every 0.5 s, from
/proc/PID/smaps_rollup, the training process and every process below it: RSS, PSS (each shared page divided
among the processes sharing it) and USS (pages of that process alone). What the workers really cost is the
process tree's PSS minus the training process's own PSS at the same moment (``workers_cost``); ``worker_*`` are
the largest process below the training process (with a fork server, that is the server itself).

    python benchmarks/worker_memory.py --output benchmarks/results/worker_memory.json
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_state, write_json  # noqa: E402

# Runs clmae's CLI with workers forked from the training process (START=fork) or as clmae starts them.
RUNNER = """
import os, sys
import clmae.data.loader as loader
if os.environ["START"] == "fork":
    loader.worker_context = lambda: None  # the DataLoader's default: fork (Linux)
from clmae.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


def photos(folder: Path, n: int = 160, seed: int = 0) -> Path:
    """``n`` smooth colour JPEGs of 180-240 px a side, as phone photos scaled down."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(180, 240, 2))
        coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        img.save(folder / f"p{i:03d}.jpg", quality=90)
    return folder


def rollup(pid: int) -> dict[str, int] | None:
    """RSS, PSS, USS (MiB) of one process, or None once it is gone."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, value = line.split(":", 1)
            fields[key.strip()] = int(value.split()[0]) // 1024
    except (OSError, ValueError):
        return None
    return {"rss": fields.get("Rss", 0), "pss": fields.get("Pss", 0),
            "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parents[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def measure(start: str, data: Path, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-c", RUNNER, "pretrain", "--data", str(data), *args, "--output-dir", str(out)]
    env = {**os.environ, "START": start, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"main_rss": 0, "main_pss": 0, "worker_rss": 0, "worker_pss": 0, "worker_uss": 0, "tree_pss": 0,
            "workers_cost": 0}
    while proc.poll() is None:
        main = rollup(proc.pid)
        others = [m for m in (rollup(c) for c in descendants(proc.pid)) if m]
        if main:
            tree = main["pss"] + sum(m["pss"] for m in others)
            now = {"main_rss": main["rss"], "main_pss": main["pss"], "tree_pss": tree,
                   "workers_cost": tree - main["pss"],
                   "worker_rss": max((m["rss"] for m in others), default=0),
                   "worker_pss": max((m["pss"] for m in others), default=0),
                   "worker_uss": max((m["uss"] for m in others), default=0)}
            peak = {k: max(v, now[k]) for k, v in peak.items()}
        time.sleep(0.5)
    log = proc.stdout.read()
    return {"start": start, "exit_code": proc.returncode, "seconds": round(time.perf_counter() - began, 1),
            "peak_mib": peak, "epoch_lines": [ln for ln in log.splitlines() if ln.startswith(("epoch ", "done:"))]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--subset", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    train = ["--method", "mae", "--subset", str(args.subset), "--batch-size", str(args.batch_size), "--epochs",
             str(args.epochs), "--num-workers", "2", "--probe-every", "0", "--snapshot-every", "0", "--device", "cpu",
             "--no-progress"]
    with tempfile.TemporaryDirectory() as tmp:
        data = photos(Path(tmp) / "photos")
        load = os.getloadavg()
        runs = [measure(start, data, train, Path(tmp) / f"run-{start}") for start in ("fork", "forkserver")]
    result = {"benchmark": "worker_memory", "when": time.strftime("%Y-%m-%d %H:%M:%S"), **git_state(),
              "command": f"clmae pretrain --data PHOTOS(160 JPEGs, 180-240 px) {' '.join(train)}",
              "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
              "load_before": [round(v, 2) for v in load], "load_after": [round(v, 2) for v in os.getloadavg()],
              "model": "vit_base_patch16_224 (chosen for the 200 px photos)", "runs": runs}
    for r in runs:
        p = r["peak_mib"]
        print(f"{r['start']:>10}: training process RSS {p['main_rss']} MiB; largest process below it RSS "
              f"{p['worker_rss']} / PSS {p['worker_pss']} / USS {p['worker_uss']} MiB; workers' real cost (tree PSS "
              "- training PSS) "
              f"{p['workers_cost']} MiB; {r['seconds']} s, exit {r['exit_code']}")
    if args.output:
        write_json(args.output, result)
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
