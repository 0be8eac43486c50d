"""How long `make run` takes: its two commands, timed as the Makefile runs them, with the machine's load.

    clmae pretrain --output-dir RUN        # CL-MAE on the built-in digits, 30 epochs, default settings
    clmae eval knn --checkpoint RUN --no-progress

Each runs in a fresh process with its output in a file (no terminal, so no bar), exactly as `make run`
does after `setup`. Recorded: wall-clock of each command and of both, the CPU time they used (user + system,
from the children's rusage; on a machine whose cores are free the wall-clock is about this divided by the
cores the run keeps busy), the load average before and after (the machine is shared: other jobs on the same
cores make every run slower), the training time and speed the run printed, and the first k-NN line.

    python benchmarks/make_run.py --output benchmarks/results/make_run.json
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_state, write_json  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(args: list[str], log: Path, cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cpu, began = cpu_seconds(), time.perf_counter()
    with open(log, "a") as out:
        rc = subprocess.run([sys.executable, "-m", "clmae", *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd, check=False).returncode
    return {"command": "clmae " + " ".join(args), "exit_code": rc, "wall_s": round(time.perf_counter() - began, 1),
            "cpu_s": round(cpu_seconds() - cpu, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder, log = Path(tmp), Path(tmp) / "make-run.log"
        load = os.getloadavg()
        steps = [timed(["pretrain", "--output-dir", "runs/default"], log, folder),
                 timed(["eval", "knn", "--checkpoint", "runs/default", "--no-progress"], log, folder)]
        after = os.getloadavg()
        text = log.read_text()
    done = re.search(r"^done: (\d+) epochs in (\S+), (\S+) img/s", text, flags=re.M)
    knn = next((ln for ln in text.splitlines() if ln.startswith("knn ")), None)
    result = {"benchmark": "make_run", "when": time.strftime("%Y-%m-%d %H:%M:%S"), **git_state(),
              "command": " && ".join(s["command"] for s in steps),
              "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
              "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
              "load_before": [round(v, 2) for v in load], "load_after": [round(v, 2) for v in after],
              "steps": steps, "wall_s": round(sum(s["wall_s"] for s in steps), 1),
              "cpu_s": round(sum(s["cpu_s"] for s in steps), 1),
              "training": done.group(0) if done else None, "first_knn_line": knn,
              "output": text.splitlines()}
    for s in steps:
        print(f"{s['command']}: {s['wall_s']} s wall, {s['cpu_s']} s CPU, exit {s['exit_code']}")
    print(f"make run: {result['wall_s']} s wall, {result['cpu_s']} s CPU; load {load[0]:.2f} -> {after[0]:.2f}")
    if args.output:
        write_json(args.output, result)
    return 0 if all(s["exit_code"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
