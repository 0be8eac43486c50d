"""Every masking strategy on data none of them was tuned on: does the loss fall, does --resume continue it?

Builds a small npz of 24x24 RGB images of random textured shapes (ellipses, rectangles and
triangles, each filled with stripes, checks or noise of random colours on a textured background;
seeded, never used in tuning), then for each ``--method`` runs what a user would type:

    clmae pretrain --data shapes24.npz --method M --model vit_micro_patch2_8 --img-size 24 --patch-size 4 \
        --epochs E1 --output-dir RUN
    clmae pretrain --resume RUN --epochs E2

and records the per-epoch MAE loss (first and last epoch, before and after the resume) in
``benchmarks/results/strategies_check.json``, with the command, the machine and the commit.

    python benchmarks/strategies_check.py            # all methods, ~15 min on 2 shared CPU cores
    python benchmarks/strategies_check.py --methods colormae sbam automae --merge   # re-run some, keep the rest

Each method's entry records the commit it ran at (``--merge`` keeps the other methods' entries of the
existing file, each with its own commit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling module, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_state, write_json  # noqa: E402


def textured_shapes(n: int, size: int = 24, seed: int = 0) -> np.ndarray:
    """``n`` uint8 RGB images (N, size, size, 3): one to three textured shapes on a textured background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def texture() -> np.ndarray:
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        kind = rng.integers(3)
        if kind == 0:  # stripes at a random angle and period
            angle, period = rng.uniform(0, np.pi), rng.uniform(2.5, 8)
            t = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0).astype(np.float32)
        elif kind == 1:  # checks
            cell = rng.integers(2, 6)
            t = ((xx // cell + yy // cell) % 2).astype(np.float32)
        else:  # smooth noise
            t = rng.uniform(0, 1, (size // 4 + 1, size // 4 + 1)).repeat(4, 0).repeat(4, 1)[:size, :size]
        return a * t[..., None] + b * (1 - t[..., None])

    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = texture()
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(4, size - 4, 2)
            ry, rx = rng.uniform(3, size / 2.5, 2)
            kind = rng.integers(3)
            if kind == 0:
                inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            elif kind == 1:
                inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            else:
                inside = (yy >= cy - ry) & (np.abs(xx - cx) <= (yy - cy + ry) * rx / (2 * ry))
            img = np.where(inside[..., None], texture(), img)
        images[i] = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return images


def epoch_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_epoch = {r["epoch"]: r["loss_mae"] for r in records if r.get("kind") == "epoch" and "loss_mae" in r}
    return [by_epoch[e] for e in sorted(by_epoch)]


def clmae(*args: str) -> list[str]:
    return [sys.executable, "-m", "clmae", "pretrain", *args, "--no-progress", "--device", "cpu"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["mae", "block", "clmae", "hpm", "attmask", "colormae", "sbam",
                                                    "automae"])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=4, help="epochs of the first run")
    p.add_argument("--resume-epochs", type=int, default=6, help="--epochs of the resumed run")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "strategies_check.json"))
    p.add_argument("--merge", action="store_true",
                   help="keep the other methods' entries of an existing --output (same images and epochs)")
    args = p.parse_args(argv)
    commit = git_state()["commit"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="clmae-check-") as tmp:
        data = Path(tmp) / "shapes24.npz"
        images = textured_shapes(args.images)
        np.savez(data, x_train=images, y_train=np.zeros(len(images), dtype=np.int64))
        for method in args.methods:
            run = Path(tmp) / method
            first = clmae("--data", str(data), "--method", method, "--model", "vit_micro_patch2_8", "--img-size", "24",
                          "--patch-size", "4", "--batch-size", "64", "--epochs", str(args.epochs), "--seed", "0",
                          "--output-dir", str(run))
            second = clmae("--resume", str(run), "--epochs", str(args.resume_epochs))
            t0 = time.time()
            for cmd in (first, second):
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                if cmd is first:
                    before_resume = epoch_losses(run)
            losses = epoch_losses(run)
            results[method] = {
                "epoch_loss_mae": losses, "first": losses[0], "last_before_resume": before_resume[-1],
                "last": losses[-1], "falls": losses[-1] < losses[0],
                "resume_continued": len(losses) == args.resume_epochs and losses[:args.epochs] == before_resume,
                "seconds": round(time.time() - t0, 1), "commit": commit,
            }
            print(f"{method:8} loss {losses[0]:.4f} -> {before_resume[-1]:.4f} (epoch {args.epochs}) -> "
                  f"{losses[-1]:.4f} (epoch {args.resume_epochs}, resumed)  {results[method]['seconds']} s", flush=True)
    commands = [" ".join(["clmae pretrain", *cmd[4:]]).replace(tmp, "TMP").replace(method, "METHOD")
                for cmd in (first, second)]
    described = f"{args.images} textured-shape images, 24x24 RGB, seed 0 (benchmarks/strategies_check.py)"
    if args.merge and Path(args.output).is_file():
        old = json.loads(Path(args.output).read_text())
        if old.get("commands") != commands or old.get("data") != described:
            raise SystemExit(f"--merge: {args.output} was made with other images or commands; run all methods")
        for name, entry in old["methods"].items():
            if name not in results:
                results[name] = {**entry, "commit": entry.get("commit", old["commit"])}
    out = {
        "benchmark": "strategies_check",
        "data": described,
        "commands": commands,
        "methods": results,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "load_avg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "commit": commit, "wall_s": round(time.time() - started, 1),
    }
    write_json(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
