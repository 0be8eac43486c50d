"""Is learned masking worth its compute? Every masking arm against MAE at equal epochs and at equal compute.

Every arm of a seed gets the same data order, the same crops and the same initial weights; only the
masking (and, for the equal-compute MAE arm, the number of epochs) differs::

    python experiments/cifar10/run.py                   # the study the README quotes (2 CPU cores)
    python experiments/cifar10/run.py --estimate        # count FLOPs, print the plan and its time, train nothing
    python experiments/cifar10/run.py --quick           # every arm end to end, a few minutes
    python experiments/cifar10/run.py --config gpu --device cuda      # full CIFAR-10, ViT-Tiny, 100 epochs
    python experiments/cifar10/run.py --config gpu-short --device cuda   # one seed of 4 arms in ~10 min of GPU
    python experiments/cifar10/run.py --quick --data my_images.npz    # the same study on your labeled npz
    python experiments/cifar10/run.py --arms mae clmae --seeds 0

The arms, profiles and budgets are in ``config.yaml``. Before training, the study counts each arm's
training FLOPs per image with ``torch.utils.flop_counter.FlopCounterMode`` on a few iterations of the real
``Trainer.fit`` (cached in ``results.json``); the ``equal_compute_with`` arm gets its epochs from them.

Resumable: each (arm, seed) lives in ``OUT/runs/ARM-sSEED``; a finished run is not retrained, an
interrupted one resumes from its checkpoint, finished evaluations are read back from their JSON (and
redone if the checkpoint they name changed). Each evaluated (arm, seed) also leaves
``OUT/finished/ARM-sSEED.json``, small enough to commit: with it a later session (or a clone without
``runs/``) skips that arm x seed. Invocations on different ``--seeds`` may run at once on the same ``OUT``
(one per core: ``--threads 1``); each ``results.json`` gathers everything finished. Outputs in ``OUT``
(default ``experiments/cifar10/results``, ``quick`` or ``results-gpu``): ``results.json`` (every number),
``results.md`` (tables, paired differences with 95% intervals, the verdict), ``curves.png``. ``--summarise``
rebuilds the last two from the first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE) not in sys.path:  # the sibling module, also when this file is loaded by path (tests)
    sys.path.insert(0, str(HERE))

import study_summary as summary  # noqa: E402

# The profiles of config.yaml and the folder each writes by default (under experiments/cifar10/).
DEFAULT_OUTPUT = {"cpu": "results", "quick": "quick", "learned": "results-learned", "gpu": "results-gpu",
                  "gpu-short": "results-gpu-short"}
PROFILES = tuple(DEFAULT_OUTPUT)
# Keys of an arm in config.yaml that are the study's, not PretrainConfig fields.
STUDY_KEYS = ("equal_compute_with",)
# Run folders written by this edition of the study (crops shared by the arms of a seed): older ones are not resumed.
EDITION = 2
# OUT/finished/ARM-sSEED.json: the result of one pretrained and evaluated arm x seed. Small, meant to be committed
# (OUT/runs/, with the checkpoints, is not), so a study that takes several sessions picks up where it stopped.
ENTRIES = "finished"
# Settings that do not change the FLOPs of one training iteration (left out of the FLOP cache key).
NOT_FLOPS = ("seed", "epochs", "warmup_epochs", "eval_every", "probe_every", "progress", "output_dir", "data_dir",
             "subset", "base_lr", "lr", "min_lr", "weight_decay", "curriculum", "curriculum_value", "log_every",
             "device", "resume")


class StudyError(Exception):
    """Something the user can fix before anything is trained (reported as one ``study: error:`` line)."""


class StudyStopped(Exception):
    """A run was stopped (Ctrl-C / SIGTERM) before its last epoch: its checkpoint is saved, nothing is evaluated."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # 130 after SIGINT, 143 after SIGTERM: what the trainer's run ended with


# ---------------------------------------------------------------------------------------------
# Configuration and arms


def read_config_file(path: Path = HERE / "config.yaml") -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def load_config(profile: str, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """The study settings of ``profile``: ``cpu``'s, with the profile's pretrain/evaluation/budget keys replaced."""
    raw = raw if raw is not None else read_config_file()
    if profile not in PROFILES:
        raise StudyError(f"--config: unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    base, chosen = raw["cpu"], raw[profile]
    merged = {key: {**(base.get(key) or {}), **(chosen.get(key) or {})} for key in ("pretrain", "evaluation", "budget")}
    settings = {key: raw[key] for key in ("arms", "default_arms", "reference_arm", "equal_compute_arm",
                                          "verdict_metric", "flop_iterations")}
    settings["default_arms"] = list(chosen.get("default_arms", settings["default_arms"]))  # a profile may choose
    return {"profile": profile, "seeds": list(chosen.get("seeds", base["seeds"])), **settings, **merged}


def arm_overrides(spec: dict[str, Any]) -> dict[str, Any]:
    """The PretrainConfig overrides of an arm (its config.yaml entry without the study's own keys)."""
    return {k: v for k, v in spec.items() if k not in STUDY_KEYS}


def check_arms(cfg: dict[str, Any], arms: list[str], base: dict[str, Any]) -> list[str]:
    """Validate every arm before anything runs; return the arms whose ``--method`` this clmae lacks.

    An arm with an unknown option or a bad value raises here, naming the arm and the option.
    """
    from clmae.config import make_config
    from clmae.errors import ConfigError
    from clmae.maskers import METHODS

    missing = []
    for arm in arms:
        spec = cfg["arms"][arm]
        target = spec.get("equal_compute_with")
        if target is not None and target not in cfg["arms"]:
            raise StudyError(f"arm {arm!r}: equal_compute_with names {target!r}, which is not an arm in config.yaml")
        if spec.get("method") not in METHODS:
            missing.append(arm)
            continue
        try:
            make_config({**base, **arm_overrides(spec)})
        except ConfigError as exc:
            raise StudyError(f"arm {arm!r}: {exc}") from None
    return missing


def missing_method_message(cfg: dict[str, Any], missing: list[str], arms: list[str]) -> str:
    from clmae.maskers import METHODS

    needs = ", ".join(f"{a} needs --method {cfg['arms'][a].get('method')}" for a in missing)
    runnable = [a for a in arms if a not in missing]
    return (f"{needs}, which this clmae does not have (clmae.maskers.METHODS: {', '.join(METHODS)}); the masking "
            f"strategies come with issue 15. Leave them out with --arms {' '.join(runnable) or '...'}")


def flops_needed(cfg: dict[str, Any], arms: list[str]) -> list[str]:
    """Arms whose FLOPs the plan needs: the chosen ones, the reference, and every equal-compute target."""
    needed = [cfg["reference_arm"], *arms]
    needed += [cfg["arms"][a]["equal_compute_with"] for a in arms if cfg["arms"][a].get("equal_compute_with")]
    return list(dict.fromkeys(needed))


# ---------------------------------------------------------------------------------------------
# Training FLOPs, counted on the real training loop


class StopAfter:
    """Trainer callback: stop the run after ``iterations`` iterations (FLOP counting)."""

    def __init__(self, iterations: int) -> None:
        self.iterations = iterations

    def on_step(self, run, metrics: dict[str, float]) -> None:
        if run.iteration >= self.iterations:
            run.request_stop()

    def on_epoch_end(self, run) -> None:
        pass


def count_flops_per_iteration(values: dict[str, Any], iterations: int, device: str, data_dir: str | None) -> float:
    """Training FLOPs of one iteration: ``Trainer.fit`` under FlopCounterMode for ``iterations`` iterations, averaged.

    Counts what FlopCounterMode counts (matmuls, convolutions, attention; forward and backward), in
    everything the loop runs: the MAE step, the masker's scoring, the masking-module step when due.
    The probe and the k-NN passes are off; they are measurement, not training.
    """
    from clmae.config import make_config
    from clmae.runtime import flop_counter
    from clmae.train.trainer import Trainer

    counter = flop_counter()
    with tempfile.TemporaryDirectory(prefix="clmae-study-flops-") as tmp:
        run = {**values, "seed": 0, "output_dir": tmp, "epochs": iterations, "warmup_epochs": 0, "eval_every": 0,
               "probe_every": 0, "snapshot_every": 0, "save_every": 0, "progress": False, "device": device,
               "data_dir": data_dir}
        # A 4-iteration run's lines and stop message are not news (its console is built with the trainer).
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer = Trainer(make_config(run))
            trainer.callbacks.append(StopAfter(iterations))
            with counter:
                trainer.fit()
        if trainer.position.iteration != iterations:
            raise RuntimeError(f"FLOP count ran {trainer.position.iteration} iterations, expected {iterations}")
    return counter.get_total_flops() / iterations


def flop_key(values: dict[str, Any], iterations: int, device: str) -> dict[str, Any]:
    """What the FLOPs of one iteration depend on: the cache key in results.json."""
    key = {k: v for k, v in sorted(values.items()) if k not in NOT_FLOPS}
    return {**key, "iterations": iterations, "device": device, "edition": EDITION}


def measure_compute(cfg: dict[str, Any], arms: list[str], base: dict[str, Any], device: str, data_dir: str | None,
                    cache: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """FLOPs per iteration and per image of every arm in ``arms``, from ``cache`` (or an arm counted just before)
    when the key matches: arms that differ only in what does not change an iteration's FLOPs are counted once."""
    out: dict[str, dict[str, Any]] = {}
    known = {json.dumps(c["key"], sort_keys=True): c for c in cache.values() if isinstance(c, dict) and "key" in c}
    for arm in arms:
        values = {**base, **arm_overrides(cfg["arms"][arm])}
        iterations = math.lcm(int(cfg["flop_iterations"]), int(values.get("masker_every", 1)))
        key = flop_key(values, iterations, device)
        found = known.get(json.dumps(key, sort_keys=True))
        if found is None:
            print(f"[study] counting the training FLOPs of {arm} ({iterations} iterations of Trainer.fit)",
                  file=sys.stderr)
            per_iteration = count_flops_per_iteration(values, iterations, device, data_dir)
            found = {"flops_per_iteration": per_iteration, "flops_per_image": per_iteration / values["batch_size"],
                     "iterations_counted": iterations, "key": key}
            known[json.dumps(key, sort_keys=True)] = found
        out[arm] = dict(found)
    return out


# ---------------------------------------------------------------------------------------------
# The plan: each arm's settings and epochs, and the time it should take


def plan_arms(cfg: dict[str, Any], arms: list[str], base: dict[str, Any],
              per_image: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each arm's PretrainConfig values (without seed and folders), equal-compute epochs resolved.

    ``per_image``: training FLOPs per image of each arm (those of the equal-compute targets included).
    """
    plan = {}
    for arm in arms:
        spec = cfg["arms"][arm]
        values = {**base, **arm_overrides(spec)}
        target = spec.get("equal_compute_with")
        scale = 1.0
        if target:
            epochs = max(1, round(base["epochs"] * per_image[target] / per_image[arm]))
            scale = epochs / base["epochs"]
            values["epochs"] = epochs
            if values.get("warmup_epochs") is not None:  # same warmup fraction: the schedule shape is kept
                values["warmup_epochs"] = round(values["warmup_epochs"] * scale, 3)
            if values.get("eval_every"):  # as many k-NN points as the other arms
                values["eval_every"] = max(1, round(values["eval_every"] * scale))
        plan[arm] = {"method": spec.get("method"), "overrides": arm_overrides(spec), "equal_compute_with": target,
                     "epochs": values["epochs"], "epoch_scale": scale, "values": values}
    return plan


def plan_summary(plan: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The plan as results.json records it: each arm's plan without its full PretrainConfig values."""
    return {arm: {k: v for k, v in p.items() if k != "values"} for arm, p in plan.items()}


def knn_passes(epochs: int, eval_every: int) -> int:
    """Between-epoch k-NN passes of a run (every ``eval_every`` epochs and after the last)."""
    if not eval_every:
        return 0
    return sum(1 for e in range(1, epochs + 1) if e % eval_every == 0 or e == epochs)


def measured_gpu_rates(budget: dict[str, Any], model: str, batch: int) -> dict[str, Any] | None:
    """The training img/s that benchmarks/gpu.py measured (eager, ``model`` at ``batch``) per variant, from the
    newest JSON matching ``budget["measured_rates"]``; None when there is none."""
    pattern = budget.get("measured_rates")
    if not pattern:
        return None
    where = Path(pattern)
    found = where.parent.glob(where.name) if where.is_absolute() else REPO.glob(pattern)
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            result = json.loads(path.read_text())
            runs = result["throughput"]["runs"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        rates = {}
        for key, run in runs.items():
            parts = key.split("/")
            if (len(parts) == 3 and parts[0] == model and parts[2] == "eager" and run.get("batch") == batch
                    and run.get("img_per_s")):
                rates[parts[1]] = float(run["img_per_s"])
        if rates:
            env = result.get("environment", {})
            shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            return {"rates": rates, "file": str(shown), "device": env.get("device_name"), "commit": env.get("commit")}
    return None


def estimate(plan: dict[str, dict[str, Any]], per_image: dict[str, float], sources: dict[str, str], reference: str,
             budget: dict[str, Any], train_images: int, seeds: int) -> dict[str, Any]:
    """Pretraining time of the plan: from MAE's measured rate and the FLOP ratios (CPU), from the img/s that
    benchmarks/gpu.py measured (GPU, when it has run), or from an assumed sustained FLOP rate (GPU). All are
    estimates; the study reports what it then measures."""
    rows, total_cpu, total_flops = {}, 0.0, 0.0
    first = next(iter(plan.values()))["values"] if plan else {}
    measured = measured_gpu_rates(budget, first.get("model"), first.get("batch_size")) if plan else None
    variants = budget.get("gpu_variant") or {}
    total_gpu = 0.0 if measured and all(variants.get(a) in measured["rates"] for a in plan) else None
    for arm, p in plan.items():
        batch = p["values"]["batch_size"]
        images = (train_images // batch) * batch * p["epochs"]
        ratio = per_image[arm] / per_image[reference]
        row = {"epochs": p["epochs"], "flop_ratio": ratio, "source": sources[arm],
               "training_flops": seeds * images * per_image[arm]}
        total_flops += row["training_flops"]
        passes = knn_passes(p["epochs"], p["values"].get("eval_every") or 0)
        if budget.get("mae_img_per_s"):
            row["cpu_s"] = seeds * (images * ratio / budget["mae_img_per_s"] + passes * budget.get("knn_pass_s", 0))
            total_cpu += row["cpu_s"]
        if total_gpu is not None:
            row["gpu_s"] = seeds * (images / measured["rates"][variants[arm]] + passes * budget.get("knn_pass_s", 0))
            total_gpu += row["gpu_s"]
        rows[arm] = row
    out: dict[str, Any] = {"arms": rows, "seeds": seeds, "train_images": train_images, "budget": budget,
                           "training_flops": total_flops}
    if budget.get("mae_img_per_s"):
        out["cpu_min"] = total_cpu / 60
    evaluation_s = seeds * len(plan) * budget.get("assumed_eval_s_per_arm", 0)
    if total_gpu is not None:
        out["gpu_min_measured_rates"] = (total_gpu + evaluation_s) / 60
        out["measured"] = measured
    if budget.get("assumed_sustained_tflops"):
        out["gpu_min_assumed"] = total_flops / (budget["assumed_sustained_tflops"] * 1e12) / 60
        if evaluation_s:
            out["gpu_min_assumed_with_evaluation"] = out["gpu_min_assumed"] + evaluation_s / 60
    return out


def format_estimate(est: dict[str, Any]) -> str:
    lines = [f"[study] plan: {est['seeds']} seed(s), {est['train_images']} training images",
             f"  {'arm':<20}{'epochs':>7}{'FLOPs/img ×ref':>16}  {'source':<9}{'est. min':>9}"]
    for arm, row in est["arms"].items():
        seconds = row.get("cpu_s", row.get("gpu_s"))
        minutes = f"{seconds / 60:9.1f}" if seconds is not None else f"{'':9}"
        lines.append(f"  {arm:<20}{row['epochs']:>7}{row['flop_ratio']:>16.2f}  {row['source']:<9}{minutes}")
    budget = est["budget"]
    limit = budget.get("limit_min")

    def verdict(minutes: float) -> str:
        if not limit:
            return ""
        return (" (within the limit of " if minutes <= limit else " (OVER the limit of ") + f"{limit} min)"

    if "cpu_min" in est:
        cpu_min = est["cpu_min"]
        lines.append(f"  estimated pretraining: {cpu_min:.0f} min{verdict(cpu_min)}; assumes MAE trains at "
                     f"{budget['mae_img_per_s']} img/s, wall ratio = FLOP ratio, {budget.get('knn_pass_s', 0)} s per "
                     "between-epoch k-NN pass")
    if "gpu_min_measured_rates" in est:
        m = est["measured"]
        rates = ", ".join(f"{k} {v:.0f}" for k, v in m["rates"].items())
        gpu_min = est["gpu_min_measured_rates"]
        lines.append(f"  ESTIMATED GPU time: {gpu_min:.1f} min{verdict(gpu_min)} "
                     f"= images / the img/s benchmarks/gpu.py measured ({rates} img/s on {m['device']}, {m['file']}, "
                     f"commit {(m['commit'] or '?')[:10]}) + {budget.get('knn_pass_s', 0)} s per k-NN pass + an "
                     f"assumed {budget.get('assumed_eval_s_per_arm', 0)} s of evaluation per arm; an estimate until "
                     "measured")
    if "gpu_min_assumed" in est:
        total = est.get("gpu_min_assumed_with_evaluation", est["gpu_min_assumed"])
        evaluation = (f" + an assumed {budget['assumed_eval_s_per_arm']} s of evaluation per arm"
                      if "gpu_min_assumed_with_evaluation" in est else "")
        lines.append(f"  estimated GPU pretraining: {est['gpu_min_assumed']:.0f} min = {est['training_flops']:.3g} "
                     f"training FLOPs / an ASSUMED sustained {budget['assumed_sustained_tflops']} TFLOP/s (an "
                     f"estimate, not a measurement){evaluation}: {total:.1f} min{verdict(total)}"
                     + ("" if "gpu_min_measured_rates" in est else
                        "; run benchmarks/gpu.py on the GPU first and this uses its measured img/s"))
    if any(row["source"] == "guess" for row in est["arms"].values()):
        lines.append("  'guess': not counted (this clmae has no such method); its FLOP ratio is config.yaml's "
                     "guessed_flop_ratio")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One run: pretrain, evaluate, collect


class TimingFile:
    """Trainer callback: the run's pretraining wall-clock so far, written at every epoch end (with the checkpoint).

    A killed run resumes from its last epoch-end checkpoint, so the time recorded there is exactly the compute
    that produced the result; the lost part of the interrupted epoch is redone and counted once.
    """

    def __init__(self, path: Path, spent: float) -> None:
        self.path, self.spent, self.start = path, spent, time.perf_counter()

    def on_step(self, trainer, metrics: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, trainer) -> None:
        self.write(trainer)

    def write(self, trainer) -> dict[str, Any]:
        wall = self.spent + time.perf_counter() - self.start
        images = trainer.iteration * trainer.cfg.batch_size
        timing = {"wall_s": round(wall, 2), "images": images, "img_per_s": round(images / max(wall, 1e-9), 2),
                  "epochs_done": trainer.epoch}
        self.path.write_text(json.dumps(timing))
        return timing


def study_values(plan_values: dict[str, Any], seed: int, run_dir: Path, data_dir: str | None,
                 device: str, threads: int | None = None) -> dict[str, Any]:
    """The PretrainConfig values of one arm x seed. ``--threads`` is the run's own ``threads`` (also when it resumes),
    so the library's busy-machine rule does not lower it: resuming with 2 threads right after the 1-thread
    processes stopped would otherwise read their load average and train with 1."""
    values = {**plan_values, "seed": seed, "data_dir": data_dir, "output_dir": str(run_dir), "device": device}
    return values if threads is None else {**values, "threads": threads}


def train_arm(arm: str, seed: int, values: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Pretrain one arm (or resume it); return wall-clock and throughput."""
    from clmae.config import make_config
    from clmae.io.checkpoint import LAST, read_training_state
    from clmae.train.trainer import Trainer

    values = dict(values)
    marker = run_dir / "study-run.json"
    timing_file = run_dir / "study-timing.json"
    state_file = run_dir / f"{LAST}.pt"
    mine = {"edition": EDITION, "arm": arm, "seed": seed}
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    if state_file.exists():
        found = json.loads(marker.read_text()) if marker.exists() else {}
        if found != mine:
            raise StudyError(f"{run_dir} holds a run of another study (or edition) than {arm} seed {seed} of this one "
                             f"({found or 'no study-run.json'}); choose another --output or delete that folder")
        done = read_training_state(state_file)["epoch"]
        if done >= values["epochs"] and timing.get("epochs_done", done) >= values["epochs"]:
            return timing
        values["resume"] = str(run_dir)
        # Time spent up to the checkpoint we resume from (older timing files have no epochs_done: all of it).
        spent = timing.get("wall_s", 0.0) if timing.get("epochs_done", done) <= done else 0.0
    else:
        spent = 0.0
    trainer = Trainer(make_config(values), overrides=values if "resume" in values else None)
    marker.write_text(json.dumps(mine))
    clock = TimingFile(timing_file, spent)
    trainer.callbacks.append(clock)
    result = trainer.fit()
    if trainer.position.epoch < trainer.cfg.epochs:
        raise StudyStopped(f"{arm} seed {seed} stopped at epoch {trainer.position.epoch}/{trainer.cfg.epochs}",
                           result.exit_code or 130)
    return clock.write(trainer.view)


def same_evaluation(report: dict[str, Any], sha: str, config: Any, options: Any) -> bool:
    """Whether a cached report evaluated these weights exactly as the study would now.

    Same checkpoint bytes, protocol hyper-parameters and evaluation options (subset sizes, pooling,
    device, random-init reference): a report of a changed config.yaml or an older edition is redone.
    """
    def as_json(value: Any) -> Any:
        return json.loads(json.dumps(value, default=str))

    wanted = {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"}
    return (report.get("checkpoint_sha256") == sha
            and report.get("hyperparameters") == as_json(dataclasses.asdict(config))
            and report.get("options") == as_json(wanted))


def evaluate_arm(run_dir: Path, evaluation: dict[str, Any], data: str, data_dir: str | None, device: str,
                 reference: bool = True, caches: Any = None) -> dict[str, dict[str, Any]]:
    """k-NN (both protocols), linear probe and n-shot on the run's checkpoint, cached as JSON.

    ``reference``: also evaluate the random-init encoder. Every arm of a seed starts from the same
    weights (same model, same seed), so the study evaluates that encoder once per seed, with the first arm.
    ``caches``: the study's :class:`clmae.evaluation.runner.EvalCaches` (the data is decoded once per study).
    """
    from clmae.evaluation import runner as ev
    from clmae.evaluation.results import write_report
    from clmae.io.checkpoint import file_sha256, weights_file

    options = ev.EvalOptions(max_train=evaluation.get("max_train"), max_test=evaluation.get("max_test"),
                             progress=False, random_reference=reference, device=device)
    reports, setup = {}, None
    sha = file_sha256(weights_file(run_dir))
    for protocol in ("knn", "linear", "fewshot"):
        out = run_dir / f"eval-{protocol}.json"
        config = ev.protocol_config(protocol, **evaluation.get(protocol, {}))
        if out.exists():
            cached = json.loads(out.read_text())
            if same_evaluation(cached, sha, config, options):
                reports[protocol] = cached
                continue
        if setup is None:
            setup = ev.prepare(run_dir, data, data_dir, options, caches=caches)
        reports[protocol] = ev.run_protocol(setup, protocol, config)
        write_report(reports[protocol], out)
    return reports


def collect_curves(run_dir: Path) -> dict[str, Any]:
    """The run's curriculum and k-NN curves from metrics.jsonl, so results.json alone can redraw curves.png;
    also the median training throughput of its log windows."""
    from clmae.io.records import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    probe_keys = ("step", "epoch", "curriculum_factor", "mask_difficulty", "mask_difficulty_shuffled",
                  "score_entropy", "mask_overlap")
    last: dict[tuple[str, int], dict[str, float]] = {}  # a resumed run repeats steps: keep the newest record
    for r in records:
        if r.get("kind") == "probe" and isinstance(r.get("mask_difficulty"), float):
            last[("probe", r["step"])] = {k: r[k] for k in probe_keys if k in r}
        elif r.get("kind") == "eval" and "knn_top1" in r:
            last[("knn", r["step"])] = {k: r[k] for k in ("step", "epoch", "knn_top1", "knn_majority_top1") if k in r}
        elif r.get("kind") == "epoch":
            last[("loss", r["step"])] = {k: r[k] for k in ("step", "epoch", "loss_mae") if k in r}
    curves: dict[str, Any] = {"probe": [], "knn": [], "loss": []}
    for (kind, _), row in sorted(last.items(), key=lambda item: (item[0][0], item[0][1])):
        curves[kind].append(row)
    # Training throughput without the held-out k-NN passes between epochs: median over the log windows.
    rates = [r["img_per_s"] for r in records if r.get("kind") == "train" and r.get("img_per_s")]
    curves["train_img_per_s"] = round(statistics.median(rates), 1) if rates else None
    return curves


# ---------------------------------------------------------------------------------------------
# The study


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def training_images(data: str, data_dir: str | None) -> int:
    """How many training images ``--data`` has, checked up front: the study needs in-memory images (shared
    crops) with labels in both splits (evaluation). An npz is checked from its zip directory and array header,
    without decompressing it; anything unreadable is left to the library's loader and its error."""
    from clmae.data.datasets import data_dirs, load_dataset

    if data == "digits":
        return len(load_dataset(data, data_dir, "train"))
    if data == "cifar10":
        found = [d / "cifar10.npz" for d in data_dirs(data_dir) if (d / "cifar10.npz").is_file()]
        if not found:  # torchvision's folder, or the library's not-found error
            return len(load_dataset(data, data_dir, "train"))
        path = found[0]
    elif data.endswith(".npz"):
        path = Path(data).expanduser()
    else:
        raise StudyError(f"--data: {data} is not in-memory data; the study takes cifar10, digits or a labeled .npz "
                         f"({', '.join(NPZ_KEYS)})")
    try:
        with zipfile.ZipFile(path) as archive:
            keys = {name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")}
            if "x_train" not in keys:
                raise KeyError("x_train")
            with archive.open("x_train.npy") as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape = read_header(member)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return len(load_dataset(data, data_dir, "train"))  # raises the library's message for a bad file
    missing = [key for key in NPZ_KEYS if key not in keys]
    if missing:
        raise StudyError(f"--data: {path} has no {', '.join(missing)}; the study evaluates with labels, so it needs "
                         f"{', '.join(NPZ_KEYS)}")
    return int(shape[0])


def build_parser(raw: dict[str, Any]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=PROFILES, default=None, help="profile of config.yaml (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="the quick profile: every arm, tiny (minutes)")
    parser.add_argument("--arms", nargs="+", choices=list(raw["arms"]), default=None,
                        help=f"arms to run (default: {' '.join(raw['default_arms'])})")
    parser.add_argument("--seeds", nargs="+", type=int, help="override the profile's seeds")
    parser.add_argument("--data", default=None, help="cifar10 (default), digits, or any labeled .npz "
                                                     "(x_train, y_train, x_test, y_test)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with cifar10.npz (default: $CLMAE_DATA, else ../shared/datasets beside the repo)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (pretraining and evaluation)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is faster on a machine shared with other jobs)")
    parser.add_argument("--output", type=Path, default=None, help="results folder")
    parser.add_argument("--epochs", type=int, help="override the pretraining epochs (the equal-compute arm scales)")
    parser.add_argument("--subset", type=int, help="override the number of training images")
    parser.add_argument("--estimate", action="store_true",
                        help="count FLOPs, print the plan and its estimated time, train nothing")
    parser.add_argument("--summarise", action="store_true",
                        help="only rebuild results.md and curves.png from OUTPUT/results.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    raw = read_config_file()
    args = build_parser(raw).parse_args(argv)
    try:
        return run_study(args, raw, argv)
    except StudyStopped as exc:
        print(f"study: {exc}; checkpoint saved. Run the same command again to resume.", file=sys.stderr)
        return exc.exit_code
    except StudyError as exc:
        print(f"study: error: {exc}", file=sys.stderr)
        return 2


def run_study(args: argparse.Namespace, raw: dict[str, Any], argv: list[str] | None) -> int:
    from clmae.errors import ClmaeError

    if args.quick and args.config not in (None, "quick"):
        raise StudyError(f"--quick and --config {args.config} contradict each other; give one")
    profile = "quick" if args.quick else (args.config or "cpu")
    cfg = load_config(profile, raw)
    base = dict(cfg["pretrain"])
    if args.epochs:
        base["epochs"] = args.epochs
        base["warmup_epochs"] = min(base.get("warmup_epochs") or 0, args.epochs)
    if args.subset:
        base["subset"] = args.subset
    if args.data:
        base["data"] = args.data
    data = base["data"]
    data_dir = args.data_dir or os.environ.get("CLMAE_DATA") or str(REPO.parent / "shared" / "datasets")
    out = args.output or HERE / (DEFAULT_OUTPUT[profile] + ("" if data == "cifar10" else f"-{Path(data).stem}"))
    if args.summarise:
        return summarise_only(out)
    arms = args.arms or list(cfg["default_arms"])
    seeds = args.seeds or cfg["seeds"]

    import torch

    from clmae.runtime import resolve_device

    if args.threads is not None:
        if args.threads < 1:
            raise StudyError(f"--threads: got {args.threads}, expected an integer >= 1")
        torch.set_num_threads(args.threads)
    try:
        device = str(resolve_device(args.device))
        missing = check_arms(cfg, flops_needed(cfg, arms), base)
        if missing and not args.estimate:
            raise StudyError(missing_method_message(cfg, missing, arms))
        available = training_images(data, data_dir)
        train_images = min(available, base.get("subset") or available)
        cache = cached_compute(out / "results.json")
        compute = measure_compute(cfg, [a for a in flops_needed(cfg, arms) if a not in missing], base, device, data_dir,
                                  cache)
        per_image = {arm: c["flops_per_image"] for arm, c in compute.items()}
        sources = dict.fromkeys(per_image, "measured")
        for arm in missing:  # --estimate only: the guess of config.yaml, clearly labelled
            guess = (cfg["budget"].get("guessed_flop_ratio") or {}).get(cfg["arms"][arm]["method"])
            if guess is None:
                raise StudyError(f"arm {arm!r}: no measured FLOPs and no guessed_flop_ratio in config.yaml")
            per_image[arm], sources[arm] = guess * per_image[cfg["reference_arm"]], "guess"
        plan = plan_arms(cfg, arms, base, per_image)
        est = estimate(plan, per_image, sources, cfg["reference_arm"], cfg["budget"], train_images, len(seeds))
        print(format_estimate(est), file=sys.stderr)
        if args.estimate:
            return 0

        out.mkdir(parents=True, exist_ok=True)
        reported, compute, plan, keys = report_plan(cfg, arms, base, out, data, device, data_dir, compute)
        results: dict[str, Any] = {
            "edition": EDITION, "mode": profile, "profile": profile,
            "command": ("python " + " ".join(sys.argv)) if argv is None else "run.py " + " ".join(argv),
            "commit": git_commit(), "torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
            "data": data, "train_images": train_images, "pretrain": base, "evaluation": cfg["evaluation"],
            "seeds": seeds, "reference_arm": cfg["reference_arm"], "equal_compute_arm": cfg["equal_compute_arm"],
            "verdict_metric": cfg["verdict_metric"],
            "plan": plan_summary(plan),
            "compute": {"counted_with": "torch.utils.flop_counter.FlopCounterMode on Trainer.fit (matmul, conv, "
                                        "attention; forward and backward)", "device": device, "arms": compute},
            "estimate": est, "arms": {},
        }
        save_results(out, results, gather_entries(out, reported, keys), seeds)  # the FLOP cache survives an interrupt
        from clmae.evaluation.runner import EvalCaches
        from clmae.io.checkpoint import LAST

        caches = EvalCaches()  # the study's: every arm is evaluated on the same data
        for seed in seeds:  # seed-major: a study cut short still has every arm for the first seeds
            for arm in arms:
                run_dir = out / "runs" / f"{arm}-s{seed}"
                # Without its run folder (a clone, a later session) a finished arm x seed is read back; with it,
                # the run and its evaluations are checked as always (an evaluation of other weights is redone).
                if not (run_dir / f"{LAST}.pt").exists() and read_entry(out, arm, seed, keys[arm]) is not None:
                    print(f"[study] {arm} seed {seed}: finished earlier ({ENTRIES}/{arm}-s{seed}.json)",
                          file=sys.stderr)
                    continue
                print(f"[study] {arm} seed {seed}: pretraining → {run_dir}", file=sys.stderr)
                values = study_values(plan[arm]["values"], seed, run_dir, data_dir, device, args.threads)
                timing = train_arm(arm, seed, values, run_dir)
                print(f"[study] {arm} seed {seed}: evaluating", file=sys.stderr)
                reports = evaluate_arm(run_dir, cfg["evaluation"], data, data_dir, device,
                                       reference=arm == arms[0], caches=caches)
                metrics = {p: {"pretrained": r["results"]["pretrained"], "random_init": r["results"].get("random_init")}
                           for p, r in reports.items()}
                write_entry(out, arm, seed, keys[arm], {"run_dir": str(run_dir.relative_to(out)), "timing": timing,
                                                        "metrics": metrics, "curves": collect_curves(run_dir)})
                save_results(out, results, gather_entries(out, reported, keys), seeds)
        # Also what a parallel invocation (other seeds, other --arms) finished meanwhile.
        reported, compute, plan, keys = report_plan(cfg, arms, base, out, data, device, data_dir, compute)
        results["plan"] = plan_summary(plan)
        results["compute"]["arms"] = compute
        save_results(out, results, gather_entries(out, reported, keys), seeds)
    except ClmaeError as exc:
        raise StudyError(str(exc)) from None
    text = summary.write_summary(results, out)
    summary.plot_curves(results, out)
    print(text)
    print(f"\nresults in {out}", file=sys.stderr)
    return 0


def entry_key(plan_values: dict[str, Any], evaluation: dict[str, Any], data: str, device: str) -> dict[str, Any]:
    """What makes a finished arm x seed reusable: the edition, the data, its pretraining values (the seed, paths and
    progress bar aside) and the evaluation settings. A changed config.yaml retrains the arms it changes."""
    skip = ("seed", "data_dir", "output_dir", "progress")
    return {"edition": EDITION, "data": data, "device": device, "evaluation": evaluation,
            "pretrain": {k: v for k, v in plan_values.items() if k not in skip}}


def entry_path(out: Path, arm: str, seed: int) -> Path:
    return out / ENTRIES / f"{arm}-s{seed}.json"


def read_entry(out: Path, arm: str, seed: int, key: dict[str, Any]) -> dict[str, Any] | None:
    """The committed result of one finished arm x seed, if it was made with ``key``'s settings (else None)."""
    path = entry_path(out, arm, seed)
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or found.get("key") != json.loads(json.dumps(key)):
        print(f"[study] {path} was made with other settings: not used ({arm} seed {seed} is trained again when it "
              "runs)", file=sys.stderr)
        return None
    return found["result"]


def write_entry(out: Path, arm: str, seed: int, key: dict[str, Any], result: dict[str, Any]) -> None:
    path = entry_path(out, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"arm": arm, "seed": seed, "commit": git_commit(), "key": key, "result": result},
                                  indent=2))


def finished_names(out: Path) -> list[tuple[str, int]]:
    """``(arm, seed)`` of every entry file in ``out`` (``finished/ARM-sSEED.json``), in seed order."""
    names = (p.stem.rsplit("-s", 1) for p in (out / ENTRIES).glob("*-s*.json"))
    return sorted(((arm, int(seed)) for arm, seed in names if seed.isdigit()), key=lambda name: name[1])


def report_arms(cfg: dict[str, Any], arms: list[str], out: Path) -> list[str]:
    """The arms the results report: those chosen now (``--arms`` only takes arms of config.yaml) and every arm with
    a finished entry in ``out`` (an invocation on ``--arms clmae`` still reports the MAE it is paired with), in
    config.yaml's order."""
    finished = {arm for arm, _ in finished_names(out)}
    return [arm for arm in cfg["arms"] if arm in arms or arm in finished]


def plannable(cfg: dict[str, Any], reported: list[str], needed: list[str], base: dict[str, Any]) -> list[str]:
    """The reported arms this clmae can plan. An arm only finished earlier (not needed now) whose method, or whose
    equal-compute target's method, this clmae lacks has no FLOPs to count: it is left out of the results, with a
    line saying so, instead of stopping an invocation that does not train it."""
    lacking = set(check_arms(cfg, [a for a in flops_needed(cfg, reported) if a not in needed], base))
    kept = []
    for arm in reported:
        target = cfg["arms"][arm].get("equal_compute_with")
        cause = arm if arm in lacking else target if target in lacking else None
        if cause is None:
            kept.append(arm)
        else:
            print(f"[study] {arm}: finished earlier, but {cause} needs --method {cfg['arms'][cause].get('method')}, "
                  "which this clmae does not have: left out of the results", file=sys.stderr)
    return kept


def report_plan(cfg: dict[str, Any], arms: list[str], base: dict[str, Any], out: Path, data: str, device: str,
                data_dir: str | None, counted: dict[str, Any]
                ) -> tuple[list[str], dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """What the results report, as ``out`` holds it now: the arms (:func:`report_arms`, :func:`plannable`), their
    FLOPs (``counted`` and results.json's first: each arm is counted once), their plans and their entry keys.
    Asked again at the end, it finds the arms a parallel invocation on other ``--arms`` finished meanwhile."""
    reported = plannable(cfg, report_arms(cfg, arms, out), flops_needed(cfg, arms), base)
    compute = measure_compute(cfg, flops_needed(cfg, reported), base, device, data_dir,
                              {**cached_compute(out / "results.json"), **counted})
    plan = plan_arms(cfg, reported, base, {arm: c["flops_per_image"] for arm, c in compute.items()})
    keys = {arm: entry_key(plan[arm]["values"], cfg["evaluation"], data, device) for arm in reported}
    return reported, compute, plan, keys


def gather_entries(out: Path, arms: list[str], keys: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every finished arm x seed on disk for these arms and settings, in arm order then seed order: also those a
    parallel invocation on other seeds (same --output) or an earlier session finished."""
    gathered: dict[str, dict[str, Any]] = {}
    names = finished_names(out)
    for arm in arms:
        for seed in (s for a, s in names if a == arm):
            found = read_entry(out, arm, seed, keys[arm])
            if found is not None:
                gathered.setdefault(arm, {})[str(seed)] = found
    return gathered


def save_results(out: Path, results: dict[str, Any], entries: dict[str, dict[str, Any]], seeds: list[int]) -> None:
    """results.json with these entries; its seeds are those trained now and those of every entry reported."""
    results["arms"] = entries
    results["seeds"] = sorted({int(s) for runs in entries.values() for s in runs} | set(seeds))
    write_atomic(out / "results.json", json.dumps(results, indent=2))


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a reader (or a parallel invocation) never sees half a file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
    os.replace(handle.name, path)


def cached_compute(path: Path) -> dict[str, Any]:
    """The FLOP counts of an earlier invocation (results.json's ``compute.arms``); none if unreadable."""
    try:
        return (json.loads(path.read_text()).get("compute") or {}).get("arms") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def summarise_only(out: Path) -> int:
    """Rebuild the markdown and the curves from results.json alone."""
    path = out / "results.json"
    if not path.exists():
        raise StudyError(f"{path} does not exist; run the study first")
    results = json.loads(path.read_text())
    print(summary.write_summary(results, out))
    summary.plot_curves(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
