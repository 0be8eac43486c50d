"""A new user's first runs on their own data, timed: a 28x28 grayscale .npz and a folder of small photos.

Builds the two data sets of issue 12 under a temporary folder (seeded, synthetic): 2,048 grayscale 28x28
images of ten drawn shapes in an .npz (with a 512-image test split), and 300 photo-like images of 40-80 px
(smooth colour fields and blobs, six of them grayscale, JPEG and PNG) of which one is a cut JPEG. Then runs
what the user would type, with no --model:

    clmae pretrain --data shapes28.npz --epochs 2 --no-progress
    clmae pretrain --data photos --epochs 2 --no-progress

each in a fresh process, and records the wall-clock time, the model chosen (from the header line), the
epoch lines and the exit code, with the machine's load before and after (the machine is shared: a busy one
makes every run slower, so the load is part of the result).

    python benchmarks/first_run.py --output benchmarks/results/first_run.json
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling module, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_state, write_json  # noqa: E402


def shape_image(rng: np.random.Generator, size: int, label: int) -> Image.Image:
    """One of ten outline/filled shapes, white on black, slightly blurred."""
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    m = size // 6
    x0, y0 = (int(v) for v in rng.integers(0, m + 1, 2))
    x1, y1 = (size - 1 - int(v) for v in rng.integers(0, m + 1, 2))
    w, c, mid = max(1, size // 10), 255, size // 2
    drawings = [
        lambda: d.ellipse([x0, y0, x1, y1], outline=c, width=w),
        lambda: d.line([(mid, y0), (mid, y1)], fill=c, width=w),
        lambda: d.rectangle([x0, y0, x1, y1], outline=c, width=w),
        lambda: d.polygon([(mid, y0), (x1, y1), (x0, y1)], outline=c, width=w),
        lambda: (d.line([(x0, y0), (x1, y1)], fill=c, width=w), d.line([(x0, y1), (x1, y0)], fill=c, width=w)),
        lambda: d.ellipse([x0, y0, x1, y1], fill=c),
        lambda: d.rectangle([x0, y0, x1, y1], fill=c),
        lambda: d.line([(x0, mid), (x1, mid)], fill=c, width=w),
        lambda: d.polygon([(mid, y0), (x1, mid), (mid, y1), (x0, mid)], fill=c),
        lambda: d.arc([x0, y0, x1, y1], 0, 180, fill=c, width=w),
    ]
    drawings[label]()
    return img.filter(ImageFilter.GaussianBlur(0.6))


def make_npz(path: Path, rng: np.random.Generator, n: int = 2048, n_test: int = 512) -> None:
    y = rng.integers(0, 10, n + n_test)
    x = np.stack([np.asarray(shape_image(rng, 28, int(label))) for label in y]).astype(np.int16)
    x = np.clip(x + rng.integers(-20, 21, x.shape), 0, 255).astype(np.uint8)
    np.savez(path, x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])


def make_photos(folder: Path, rng: np.random.Generator, n: int = 300) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(40, 81, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([rng.uniform(0, 255) + rng.uniform(-2, 2) * xx + rng.uniform(-2, 2) * yy for _ in range(3)], -1)
        for _ in range(3):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 25)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
            base += blob * rng.uniform(-120, 120, 3)
        base += rng.normal(0, 8, base.shape)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        if i % 50 == 7:
            img = img.convert("L")  # a few grayscale photos
        ext = "jpg" if i % 3 else "png"
        img.save(folder / f"img{i:03d}.{ext}", **({"quality": 90} if ext == "jpg" else {}))
    blob = (folder / "img001.jpg").read_bytes()
    (folder / "img001.jpg").write_bytes(blob[: len(blob) // 3])  # one corrupt file


def run(args: list[str], cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    load = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "clmae", *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    header = next((ln for ln in proc.stderr.splitlines() if ln.startswith("clmae: ") and " model " in ln), "")
    model = re.search(r"model (\S+) at (\d+) px \(([^)]*)\), (\d+)x\d+ patches of (\d+) px", header)
    return {
        "command": "clmae " + " ".join(args), "exit_code": proc.returncode, "wall_s": round(seconds, 1),
        "load_before": [round(v, 2) for v in load], "load_after": [round(v, 2) for v in os.getloadavg()],
        "model": model.group(1) if model else None, "img_size": int(model.group(2)) if model else None,
        "patch_size": int(model.group(5)) if model else None, "why": model.group(3) if model else None,
        "header": header, "epoch_lines": [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ")],
        "stderr_notes": [ln for ln in proc.stderr.splitlines() if ln.startswith("clmae: ") and ln != header],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--workdir", type=Path, default=None, help="where data and runs go (default: a temp folder)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="clmae-first-run-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if not (work / "shapes28.npz").exists():
        make_npz(work / "shapes28.npz", rng)
    if not (work / "photos").exists():
        make_photos(work / "photos", rng)
    runs = [run(["pretrain", "--data", "shapes28.npz", "--epochs", "2", "--no-progress"], work),
            run(["pretrain", "--data", "photos", "--epochs", "2", "--no-progress"], work)]
    result = {"benchmark": "first_run", "when": time.strftime("%Y-%m-%d %H:%M:%S"), **git_state(),
              "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "workdir": str(work), "runs": runs}
    for r in runs:
        print(f"{r['command']}: exit {r['exit_code']}, {r['wall_s']:.0f} s, {r['model']} at {r['img_size']} px "
              f"({len(r['epoch_lines'])} epoch lines; load {r['load_before'][0]} -> {r['load_after'][0]})")
    if args.output:
        write_json(args.output, result)


if __name__ == "__main__":
    main()
