"""How long the ``clmae`` command takes to answer ``--help`` and a usage error, against ``import torch``.

A user who types ``clmae --help`` or mistypes a flag should get the answer at once. What the command
imports before it answers sets that time, so the yardstick is ``python -c "import torch"`` measured
in the same run: the ratios say how much of a torch import each answer costs, whatever the machine.

Each command runs in a fresh interpreter (``python -m clmae ...``, as the console script does), the
commands interleaved rep after rep so a busy shared machine slows all of them alike; times are the
medians of the reps, ratios the medians of the per-rep ratios.

    python benchmarks/cli_startup.py --reps 7 --label before --output benchmarks/results/cli_startup_before.json

What the answers may import is held by tests/test_cli_startup.py (no torch, timm or numpy); this
script only times them. The before/after pair is benchmarks/results/cli_startup_{before,after}.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling module, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_state, write_json  # noqa: E402

COMMANDS: dict[str, list[str]] = {
    "import torch": ["-c", "import torch"],
    "python (no imports)": ["-c", "pass"],
    "clmae --help": ["-m", "clmae", "--help"],
    "clmae pretrain --help": ["-m", "clmae", "pretrain", "--help"],
    "usage error (clmae pretrain --epochs x)": ["-m", "clmae", "pretrain", "--epochs", "x"],
    "clmae eval knn --help": ["-m", "clmae", "eval", "knn", "--help"],
    "usage error (clmae eval knn, no --checkpoint)": ["-m", "clmae", "eval", "knn"],
    "clmae models": ["-m", "clmae", "models"],
}
YARDSTICK = "import torch"


def run_once(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          check=False)
    return time.perf_counter() - start, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed reps per command (after one untimed warm-up)")
    parser.add_argument("--label", default="", help="a note stored with the numbers (e.g. before / after)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    codes: dict[str, int] = {}
    for name, cmd in COMMANDS.items():  # warm-up: the page cache holds every file afterwards
        codes[name] = run_once(cmd, env)[1]
    load_before = os.getloadavg()
    for _ in range(args.reps):
        for name, cmd in COMMANDS.items():
            seconds, codes[name] = run_once(cmd, env)
            times[name].append(seconds)
    load_after = os.getloadavg()

    rows: dict[str, Any] = {}
    for name, values in times.items():
        ratios = [v / t for v, t in zip(values, times[YARDSTICK])]
        rows[name] = {"median_s": round(statistics.median(values), 4), "min_s": round(min(values), 4),
                      "max_s": round(max(values), 4), "ratio_to_import_torch": round(statistics.median(ratios), 3),
                      "exit_code": codes[name], "reps_s": [round(v, 4) for v in values]}
    result = {
        "benchmark": "cli_startup",
        "label": args.label,
        "command": "python " + " ".join(sys.argv),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        **git_state(),
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
        "reps": args.reps,
        "results": rows,
    }
    width = max(len(n) for n in rows)
    print(f"{'command':<{width}}  median s   × import torch  exit")
    for name, row in rows.items():
        print(f"{name:<{width}}  {row['median_s']:8.3f}   {row['ratio_to_import_torch']:13.2f}  {row['exit_code']:>4}")
    if args.output:
        write_json(args.output, result)


if __name__ == "__main__":
    main()
