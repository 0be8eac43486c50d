#!/usr/bin/env python
"""Crash-safety soak: SIGKILL a pretraining run at random points and prove it always resumes.

Each round starts ``python -m clmae pretrain`` (fresh, or ``--resume`` once a checkpoint exists)
and kills it with SIGKILL at a random point, until the planned number of kills is reached; then
the run is resumed to the end. After every kill it checks that

* ``checkpoint-last.pt`` and ``checkpoint-last.safetensors`` load (``read_training_state`` and
  ``load_pretrained``), i.e. a kill never leaves a torn checkpoint;
* the checkpoint never goes back in time and at most the work since the last checkpoint (one
  epoch) is lost;

and at the end that the final weights and optimiser states equal, bit for bit, those of an
uninterrupted run with the same seed (CPU, one thread), and that no temporary file is left.

Kill points (``--faults``):

* ``time``       — SIGKILL from outside, at a uniformly random moment of the training;
* ``step``       — SIGKILL inside iteration K, after the backward pass, before the optimiser step;
* ``write-mid``  — SIGKILL in the middle of the N-th checkpoint file write (half the bytes written);
* ``write-full`` — SIGKILL once the N-th file is fully written, before its fsync and rename;
* ``save-gap``   — SIGKILL between the ``.pt`` and the ``.safetensors`` of the N-th save;
* ``enospc``     — not a kill: the N-th write fails with ENOSPC (disk full); the run must stop
  with exit code 2 and a one-line error, the previous checkpoint intact, and resume later.

``time`` kills use the plain CLI; the others run the same CLI (``clmae.cli.app``) through this
script's ``child`` sub-command, which installs the fault first. Usage::

    python scripts/soak_kill_resume.py --kills 12          # `make soak`; a few minutes on 2 CPU cores
    python scripts/soak_kill_resume.py --kills 3 --faults step,write-mid,save-gap --seed 1

tests/test_reliability.py runs a three-kill version of the same code inside ``make test``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

FAULTS = ("time", "step", "write-mid", "write-full", "save-gap", "enospc")
KILL_FAULTS = FAULTS[:-1]

# A small, fast, fully deterministic run: digits, the 8-pixel micro ViT, CPU, one thread.
# The probe is off: it writes snapshot files through the same atomic writer and would shift write counts.
DEFAULT_TRAIN = dict(epochs=6, subset=256, batch_size=32)


def train_args(epochs: int, subset: int, batch_size: int, seed: int = 0) -> list[str]:
    return ["pretrain", "--data", "digits", "--model", "vit_micro_patch2_8", "--epochs", str(epochs),
            "--subset", str(subset), "--batch-size", str(batch_size), "--seed", str(seed), "--device", "cpu",
            "--num-workers", "0", "--log-every", "1", "--probe-every", "0", "--snapshot-every", "0", "--no-progress"]


def child_env() -> dict[str, str]:
    """The same threads in every process: CPU float results then match bit for bit."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", CLMAE_SOAK="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


# ---------------------------------------------------------------------------------------------
# The child: the real CLI with one fault installed


def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


def install_fault(kind: str, at: int) -> None:
    """Arm one fault in this process; ``at`` counts from 1 (write number, save number or iteration)."""
    import clmae.io.checkpoint as ckpt

    if kind in ("write-mid", "write-full", "save-gap", "enospc"):
        real_atomic_write = ckpt.write_run_file
        count = {"n": 0}
        # save-gap: the .safetensors write of the at-th save, which is write 2*at (the .pt comes first).
        target = 2 * at if kind == "save-gap" else at

        def faulty_atomic_write(path, write):
            count["n"] += 1
            if count["n"] != target:
                return real_atomic_write(path, write)
            if kind == "save-gap":
                _kill_self()

            def broken_write(tmp: str) -> None:
                write(tmp)
                if kind in ("write-mid", "enospc"):
                    size = os.path.getsize(tmp)
                    with open(tmp, "r+b") as fh:
                        fh.truncate(size // 2)
                if kind == "enospc":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
                _kill_self()

            return real_atomic_write(path, broken_write)

        # save_weights / save_training_state look the writer up in the module at call time.
        ckpt.write_run_file = faulty_atomic_write
    elif kind == "step":
        from clmae.train.trainer import Trainer

        real_step = Trainer.train_step
        calls = {"n": 0}

        def faulty_step(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at:
                def die(*_a, **_k):  # after forward and backward, before the update
                    _kill_self()

                self.opt_mae.step = die
            return real_step(self, *args, **kwargs)

        Trainer.train_step = faulty_step
    else:
        raise SystemExit(f"unknown fault {kind!r}; choose from {', '.join(FAULTS[1:])}")


def child_main(argv: list[str]) -> int:
    kind, at = argv[0].split(":")
    install_fault(kind, int(at))
    from clmae.cli.app import main

    return main(argv[1:])


# ---------------------------------------------------------------------------------------------
# The harness


@dataclass
class Position:
    epoch: int
    step_in_epoch: int
    iteration: int


@dataclass
class Event:
    fault: str
    at: float
    rc: int
    before: Position | None
    after: Position | None
    lost_steps: int = 0
    temp_files: int = 0
    seconds: float = 0.0
    note: str = ""


@dataclass
class SoakResult:
    events: list[Event] = field(default_factory=list)
    runs: int = 0
    seconds: float = 0.0

    @property
    def kills(self) -> int:
        return sum(e.rc == -signal.SIGKILL for e in self.events)


class SoakFailure(AssertionError):
    pass


def check(cond: bool, message: str) -> None:
    if not cond:
        raise SoakFailure(message)


def read_position(run_dir: Path) -> Position | None:
    """Load both checkpoint files the way users do; ``None`` when no checkpoint was written yet."""
    from clmae.io.checkpoint import load_pretrained, read_training_state

    pt = run_dir / "checkpoint-last.pt"
    if not pt.exists():
        return None
    state = read_training_state(pt)  # raises CheckpointError if torn
    load_pretrained(run_dir)  # the .safetensors: raises if torn
    load_pretrained(pt)
    return Position(state["epoch"], state["step_in_epoch"], state["iteration"])


def logged_steps(metrics: Path, offset: int) -> list[int]:
    """Iterations this process logged (``--log-every 1``), from ``offset`` bytes on."""
    if not metrics.exists():
        return []
    steps = []
    with open(metrics, "rb") as fh:
        fh.seek(offset)
        for line in fh.read().decode("utf-8", "replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a kill tore
            if rec.get("kind") == "train":
                steps.append(int(rec["step"]))
    return steps


def launch(args: list[str], fault: str | None, at: float, log: Path) -> subprocess.Popen:
    if fault in (None, "time"):
        cmd = [sys.executable, "-m", "clmae", *args]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "child", f"{fault}:{int(at)}", *args]
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                                stdin=subprocess.DEVNULL)


def wait_for_steps(proc: subprocess.Popen, metrics: Path, offset: int, n: int, timeout: float) -> bool:
    """Wait until the process has logged ``n`` training steps; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(logged_steps(metrics, offset)) >= n:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.kill()
    raise SoakFailure(f"no training progress within {timeout:.0f} s")


def run_reference(run_dir: Path, args: list[str], log: Path, timeout: float = 300) -> subprocess.Popen:
    """Start the uninterrupted run (in the background; ``wait`` on the result)."""
    return launch([*args, "--output-dir", str(run_dir)], None, 0, log)


def final_state(run_dir: Path) -> dict:
    """Everything that must match an uninterrupted run: weights (both files), optimisers, position."""
    import torch

    from clmae.io.checkpoint import read_training_state, read_weights

    state = read_training_state(run_dir / "checkpoint-last.pt")
    weights = read_weights(run_dir / "checkpoint-last.safetensors")[0]
    flat: dict[str, object] = {f"safetensors/{k}": v for k, v in weights.items()}

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, torch.Tensor):
            flat[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)
        elif isinstance(obj, (int, float, str, bool)) or obj is None:
            flat[prefix] = obj

    for key in ("weights", "opt_mae", "opt_masker", "generator", "epoch", "step_in_epoch", "iteration",
                "masker_updates", "skipped_steps"):
        walk(key, state.get(key))
    return flat


def differences(a: dict, b: dict) -> list[str]:
    import torch

    diffs = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.shape != y.shape or not torch.equal(x, y):
                diffs.append(k)
        elif x != y:
            diffs.append(k)
    return diffs


def draw_position(kind: str, rng: random.Random, remaining_steps: int, remaining_saves: int) -> float:
    """A random point of ``kind`` inside what is left of the run, so the fault always fires."""
    if kind == "time":
        return round(rng.uniform(0.05, 0.95), 3)  # fraction of the remaining training time
    if kind == "step":
        return rng.randint(1, remaining_steps)  # iteration of this process
    if kind == "save-gap":
        return rng.randint(1, remaining_saves)  # save of this process
    return rng.randint(1, 2 * remaining_saves)  # write-mid, write-full, enospc: file write, two per save


def chaos_run(run_dir: Path, args: list[str], faults: list, steps_per_epoch: int, epochs: int, log: Path,
              timeout: float = 300, rng: random.Random | None = None, progress=print,
              inspect: Callable[[Event, Path], None] | None = None) -> list[Event]:
    """One run, one process per fault in ``faults``, then resumed to the end; checks after each.

    A fault is a kind (its position drawn at random within what is left of the run) or a
    ``(kind, position)`` pair: ``time`` positions are fractions of the remaining training, the others
    count from 1 within the process (iteration, file write or save). One :class:`Event` per process;
    ``inspect(event, run_dir)`` is called after each one's checks, for more.
    """
    rng = rng or random.Random(0)
    total = epochs * steps_per_epoch
    events: list[Event] = []
    metrics = run_dir / "metrics.jsonl"
    todo = list(faults)
    while True:
        before = read_position(run_dir)
        done = before.iteration if before else 0
        fault, at = None, 0.0
        if todo and done < total:
            item = todo.pop(0)
            fault, at = item if isinstance(item, tuple) else (item, None)
            if at is None:
                at = draw_position(fault, rng, total - done, epochs - (before.epoch if before else 0))
        resume = before is not None
        cmd = [*args, "--resume", str(run_dir)] if resume else [*args, "--output-dir", str(run_dir)]
        offset = metrics.stat().st_size if metrics.exists() else 0
        temps_before = len(list(run_dir.glob(".*.tmp")))
        t0 = time.monotonic()
        proc = launch(cmd, fault, at, log)
        note = ""
        if fault == "time" and wait_for_steps(proc, metrics, offset, 1, timeout):
            # Seconds per step from this process's first steps, then a random moment of the rest.
            probe = min(3, total - done)
            t_first = time.monotonic()
            wait_for_steps(proc, metrics, offset, probe, timeout)
            per_step = (time.monotonic() - t_first) / max(probe - 1, 1)
            delay = at * (total - done) * per_step
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.002)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            note = f"{delay:.2f}s after the first steps"
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise SoakFailure(f"{fault}:{at} did not finish within {timeout:.0f} s (stalled?); see {log}") from None
        seconds = time.monotonic() - t0
        after = read_position(run_dir)  # raises CheckpointError if the kill left a torn checkpoint
        temps = len(list(run_dir.glob(".*.tmp")))
        steps = logged_steps(metrics, offset)
        ev = Event(fault or "finish", at, rc, before, after, temp_files=temps, seconds=seconds, note=note)
        events.append(ev)

        # The checkpoint never goes back in time.
        if before is not None:
            check(after is not None and after.iteration >= before.iteration,
                  f"checkpoint went back from {before} to {after} ({fault}:{at})")
        if rc == 0:
            if fault is not None:
                ev.note = "finished before the fault point"
            progress(f"  {ev.fault:<10} {'':<6}    rc {rc:>4}  checkpoint iteration "
                     f"{done:>3} -> {after.iteration:>3}  {seconds:5.1f}s {ev.note}")
            check(after.iteration == total, f"the run ended at iteration {after.iteration} of {total}")
            if inspect is not None:
                inspect(ev, run_dir)
            break
        check(fault is not None, f"the final resume failed with exit code {rc}; see {log}")
        if fault == "enospc":
            check(rc == 2, f"a full disk should end the run with exit code 2, got {rc}; see {log}")
            tail = log.read_text(errors="replace").strip().splitlines()[-1]
            check(tail.startswith("clmae: error: could not write") and "No space left" in tail
                  and "--resume" in tail, f"unexpected disk-full message: {tail!r}")
            check(temps <= temps_before, "the failed write left its temporary file behind")
        else:
            check(rc == -signal.SIGKILL, f"{fault}:{at} should have been killed, exit code {rc}; see {log}")
        # At most the work since the last checkpoint is lost: never more than one epoch.
        if steps:
            ev.lost_steps = max(steps) - (after.iteration if after else 0)
            check(ev.lost_steps <= steps_per_epoch,
                  f"{ev.lost_steps} steps lost by {fault}:{at}, more than one epoch ({steps_per_epoch})")
        progress(f"  {fault:<10} at {at:<6.3g} rc {rc:>4}  checkpoint iteration {done:>3} -> "
                 f"{after.iteration if after else 0:>3}  lost {ev.lost_steps:>2} steps  temp files {temps}  "
                 f"{seconds:5.1f}s {note}")
        if inspect is not None:
            inspect(ev, run_dir)
    leftovers = sorted(p.name for p in run_dir.glob(".*.tmp"))
    check(not leftovers, f"temporary files left in {run_dir}: {leftovers}")
    return events


def fault_schedule(n: int, faults: list[str], rng: random.Random) -> list[str]:
    """``n`` kill kinds: each kind once (shuffled) while ``n`` allows, then random kinds."""
    kinds = list(faults)
    rng.shuffle(kinds)
    return kinds[:n] + [rng.choice(faults) for _ in range(n - len(kinds))]


def soak(workdir: Path, kills: int, faults: list[str], seed: int, epochs: int, subset: int, batch_size: int,
         timeout: float = 300, progress=print) -> SoakResult:
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    args = train_args(epochs, subset, batch_size)
    steps_per_epoch = subset // batch_size
    t0 = time.monotonic()
    ref_dir = workdir / "reference"
    shutil.rmtree(ref_dir, ignore_errors=True)
    progress(f"reference run: {epochs} epochs x {steps_per_epoch} steps (in the background)")
    ref = run_reference(ref_dir, args, workdir / "reference.log")
    result = SoakResult()
    kill_faults = [f for f in faults if f != "enospc"]
    ref_state = None
    for round_ in range(1, 4 * max(kills, 1) + 2):
        run_dir = workdir / f"chaos-{round_}"
        shutil.rmtree(run_dir, ignore_errors=True)
        plan: list = fault_schedule(kills - result.kills, kill_faults, rng) if kill_faults else []
        if "enospc" in faults and round_ == 1:  # one disk-full fault too
            plan.insert(rng.randint(0, len(plan)), "enospc")
        progress(f"round {round_}: {len(plan)} faults")
        result.events += chaos_run(run_dir, args, plan, steps_per_epoch, epochs, workdir / f"chaos-{round_}.log",
                                   timeout, rng, progress)
        if ref_state is None:
            check(ref.wait(timeout=timeout) == 0, f"the reference run failed; see {workdir / 'reference.log'}")
            ref_state = final_state(ref_dir)
        diffs = differences(ref_state, final_state(run_dir))
        check(not diffs, f"round {round_}: the resumed run differs from the uninterrupted one in {diffs[:8]}")
        progress(f"round {round_}: final weights, optimiser states and position equal the uninterrupted run's "
                 f"({len(ref_state)} entries compared)")
        result.runs += 1
        if result.kills >= kills or not kill_faults:
            break
    result.seconds = time.monotonic() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        return child_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=12, help="fault points to inject (at least 10 for the soak)")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {', '.join(FAULTS)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule (training always uses seed 0)")
    p.add_argument("--epochs", type=int, default=DEFAULT_TRAIN["epochs"])
    p.add_argument("--subset", type=int, default=DEFAULT_TRAIN["subset"])
    p.add_argument("--batch-size", type=int, default=DEFAULT_TRAIN["batch_size"])
    p.add_argument("--workdir", type=Path, default=None, help="keep runs and logs here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=300, help="seconds one process may take")
    a = p.parse_args(argv)
    faults = [f.strip() for f in a.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        p.error(f"unknown faults {unknown}")
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="clmae-soak-"))
    print(f"soak: {a.kills} fault points ({', '.join(faults)}), seed {a.seed}, work dir {workdir}")
    try:
        result = soak(workdir, a.kills, faults, a.seed, a.epochs, a.subset, a.batch_size, a.timeout)
    except SoakFailure as exc:
        print(f"soak: FAILED: {exc}", file=sys.stderr)
        return 1
    by_kind: dict[str, int] = {}
    for e in result.events:
        if e.rc == -signal.SIGKILL or (e.fault == "enospc" and e.rc == 2):
            by_kind[e.fault] = by_kind.get(e.fault, 0) + 1
    lost = [e.lost_steps for e in result.events if e.rc == -signal.SIGKILL]
    print(f"soak: OK: {result.kills} SIGKILLs + {by_kind.get('enospc', 0)} disk-full faults over {result.runs} runs "
          f"({', '.join(f'{k} {v}' for k, v in sorted(by_kind.items()))}); every checkpoint loadable, at most "
          f"{max(lost, default=0)} steps lost, final states bit-identical to the uninterrupted run; "
          f"{result.seconds:.0f} s")
    if a.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
