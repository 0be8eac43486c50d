"""Does the curriculum help? MAE vs CL-MAE (and ablations) on CIFAR-10, reproducibly.

Every arm gets identical data, augmentation, model, epochs and seeds; only the masking differs::

    python experiments/cifar10/run.py                  # the full study (hours on 2 CPU cores)
    python experiments/cifar10/run.py --quick          # every arm end to end, a few minutes
    python experiments/cifar10/run.py --arms mae clmae_official --seeds 0

Resumable: each (arm, seed) lives in ``OUT/runs/ARM-sSEED``; a finished run is not retrained, an
interrupted one resumes from its checkpoint, finished evaluations are read back from their JSON.
Outputs in ``OUT`` (default ``experiments/cifar10/results`` or ``.../quick``): ``results.json``
(every number), ``results.md`` (mean ± std over seeds, compute per arm), ``curves.png``
(mask_difficulty and k-NN accuracy over training for each arm).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent

# The arms: overrides of the shared base config (config.yaml).
ARMS: dict[str, dict[str, Any]] = {
    "mae": {"method": "mae"},
    "clmae_official": {"method": "clmae", "curriculum": "official"},
    "clmae_partner": {"method": "clmae", "curriculum": "partner"},
    "clmae_adversary": {"method": "clmae", "curriculum": "adversary"},
    "clmae_linear": {"method": "clmae", "curriculum": "linear"},
    "clmae_every4": {"method": "clmae", "curriculum": "official", "masker_every": 4},
}
# Metrics reported per arm (from the evaluation JSONs): name in report → column title.
METRICS = {
    ("knn", "knn_majority_top1"): "k-NN k=5 (authors)",
    ("knn", "knn_weighted_top1"): "k-NN k=20 weighted",
    ("linear", "linear_top1"): "linear probe",
    ("fewshot", "fewshot_10shot_top1"): "10-shot",
}


def load_config(quick: bool) -> dict[str, Any]:
    cfg = yaml.safe_load((HERE / "config.yaml").read_text())
    base, evaluation = cfg["pretrain"], cfg["evaluation"]
    if quick:
        base.update(cfg["quick"]["pretrain"])
        evaluation.update(cfg["quick"]["evaluation"])
    return {"pretrain": base, "evaluation": evaluation, "seeds": cfg["quick" if quick else "study"]["seeds"]}


class StudyStopped(Exception):
    """A run was stopped (Ctrl-C / SIGTERM) before its last epoch: its checkpoint is saved, nothing is evaluated."""


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


def train_arm(arm: str, seed: int, base: dict[str, Any], run_dir: Path, data_dir: str) -> dict[str, Any]:
    """Pretrain one arm (or resume it); return wall-clock and throughput."""
    from clmae.checkpoint import read_training_state
    from clmae.config import make_config
    from clmae.trainer import Trainer

    values = {**base, **ARMS[arm], "seed": seed, "data_dir": data_dir, "output_dir": str(run_dir)}
    timing_file = run_dir / "study-timing.json"
    state_file = run_dir / "checkpoint-last.pt"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    if state_file.exists():
        done = read_training_state(state_file)["epoch"]
        if done >= values["epochs"] and timing.get("epochs_done", done) >= values["epochs"]:
            return timing
        values["resume"] = str(run_dir)
        # Time spent up to the checkpoint we resume from (older timing files have no epochs_done: all of it).
        spent = timing.get("wall_s", 0.0) if timing.get("epochs_done", done) <= done else 0.0
    else:
        spent = 0.0
    trainer = Trainer(make_config(values), overrides=values if "resume" in values else None)
    clock = TimingFile(timing_file, spent)
    trainer.callbacks.append(clock)
    trainer.fit()
    if trainer.epoch < trainer.cfg.epochs:
        raise StudyStopped(f"{arm} seed {seed} stopped at epoch {trainer.epoch}/{trainer.cfg.epochs}")
    return clock.write(trainer)


def evaluate_arm(run_dir: Path, evaluation: dict[str, Any], data_dir: str,
                 reference: bool = True) -> dict[str, dict[str, Any]]:
    """k-NN (both protocols), linear probe and n-shot on the run's checkpoint, cached as JSON.

    ``reference``: also evaluate the random-init encoder. Every arm of a seed starts from the same
    weights (same model, same seed), so the study evaluates that encoder once per seed, with the first arm.
    """
    from clmae import evaluation as ev
    from clmae.checkpoint import checkpoint_file, file_sha256
    from clmae.reports import write_report

    options = ev.EvalOptions(max_train=evaluation.get("max_train"), max_test=evaluation.get("max_test"),
                             progress=False, random_reference=reference)
    reports, setup = {}, None
    sha = file_sha256(checkpoint_file(run_dir))
    for protocol in ("knn", "linear", "fewshot"):
        out = run_dir / f"eval-{protocol}.json"
        if out.exists():
            cached = json.loads(out.read_text())
            if cached.get("checkpoint_sha256") == sha:  # an evaluation of other weights is redone
                reports[protocol] = cached
                continue
        if setup is None:
            setup = ev.prepare(run_dir, "cifar10", data_dir, options)
        config = ev.protocol_config(protocol, **evaluation.get(protocol, {}))
        reports[protocol] = ev.run_protocol(setup, protocol, config)
        write_report(reports[protocol], out)
    return reports


def collect_curves(run_dir: Path) -> dict[str, Any]:
    """The run's curriculum and k-NN curves from metrics.jsonl, so results.json alone can redraw curves.png;
    also the median training throughput of its log windows."""
    from clmae.metrics import read_metrics

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


def paired_differences(results: dict[str, Any], reference: str = "mae") -> str:
    """Each arm minus the reference arm, paired by seed (same data order, crops and init): mean ± std."""
    arms = results["arms"]
    if reference not in arms:
        return ""
    header = ["arm", *(f"Δ {title}" for title in METRICS.values()), "cost (× MAE wall)", "cost (× MAE img/s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, seeds in arms.items():
        if arm == reference:
            continue
        shared = [s for s in seeds if s in arms[reference]]
        cells = [arm]
        for (protocol, name) in METRICS:
            diffs = []
            for s in shared:
                mine = seeds[s]["metrics"][protocol]["pretrained"].get(name)
                ref = arms[reference][s]["metrics"][protocol]["pretrained"].get(name)
                if mine is not None and ref is not None:
                    diffs.append(mine - ref)
            cells.append(_mean_std(diffs, signed=True))
        cells.append(_mean_std([seeds[s]["timing"]["wall_s"] / arms[reference][s]["timing"]["wall_s"]
                                for s in shared], digits=2))
        cells.append(_mean_std([_train_rate(arms[reference][s]) / _train_rate(seeds[s]) for s in shared
                                if _train_rate(seeds[s]) and _train_rate(arms[reference][s])], digits=2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(results: dict[str, Any], out: Path) -> str:
    """Markdown table: mean ± std over seeds per arm and metric, with compute."""
    header = ["arm", *METRICS.values(), "train img/s", "wall (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, seeds in results["arms"].items():
        cells = [arm]
        for (protocol, name) in METRICS:
            values = [s["metrics"][protocol]["pretrained"].get(name) for s in seeds.values()]
            values = [v for v in values if v is not None]
            cells.append(_mean_std(values))
        cells.append(_mean_std([_train_rate(s) for s in seeds.values() if _train_rate(s)], digits=0))
        cells.append(_mean_std([s["timing"]["wall_s"] / 60 for s in seeds.values()], digits=1))
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["random init (reference)"]
    for (protocol, name) in METRICS:  # the encoder every arm of a seed started from: once per seed
        per_seed: dict[str, float] = {}
        for seeds in results["arms"].values():
            for seed, run in seeds.items():
                value = (run["metrics"][protocol]["random_init"] or {}).get(name)
                if value is not None:
                    per_seed.setdefault(seed, value)
        cells.append(_mean_std(list(per_seed.values())))
    lines.append("| " + " | ".join(cells + ["", ""]) + " |")
    table = "\n".join(lines)
    text = (f"# CIFAR-10 study ({results['mode']})\n\nCommand: `{results['command']}` (commit {results['commit']})\n\n"
            f"Seeds: {results['seeds']}. Accuracies in %, mean ± std over seeds. train img/s: median over the "
            "training log windows; wall: the whole pretraining run, including the held-out k-NN passes between "
            f"epochs (the same for every arm).\n\n{table}\n")
    diffs = paired_differences(results)
    if diffs:
        text += ("\n## Each arm minus MAE, paired by seed (percentage points, mean ± std over seeds)\n\n"
                 f"{diffs}\n")
    (out / "results.md").write_text(text)
    return table


def _train_rate(run: dict[str, Any]) -> float | None:
    return (run.get("curves") or {}).get("train_img_per_s")


def _mean_std(values: list[float], digits: int = 2, signed: bool = False) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{mean:{sign}.{digits}f}"
    return f"{mean:{sign}.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plot_curves(results: dict[str, Any], out: Path) -> Path:
    """λ, mask_difficulty and held-out k-NN accuracy over training, one colour per arm, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_d, ax_k) = plt.subplots(1, 3, figsize=(16, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (arm, seeds) in enumerate(results["arms"].items()):
        colour = colours[i % len(colours)]
        for j, info in enumerate(seeds.values()):
            curves = info["curves"]
            style = {"color": colour, "ls": "-" if j == 0 else "--", "label": arm if j == 0 else None}
            probe = curves["probe"]
            if probe:
                steps = [r["step"] for r in probe]
                ax_l.plot(steps, [r.get("curriculum_factor", float("nan")) for r in probe], **style)
                ax_d.plot(steps, [r["mask_difficulty"] for r in probe], **style)
            if curves["knn"]:
                ax_k.plot([r["epoch"] + 1 for r in curves["knn"]], [r["knn_top1"] for r in curves["knn"]],
                          marker="o", ms=3, **style)
    ax_d.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax_l.set(title="curriculum factor λ (masking-module arms)", xlabel="iteration", ylabel="λ")
    ax_d.set(title="mask difficulty, own MAE: loss learned / random masks", xlabel="iteration", ylabel="ratio")
    ax_k.set(title="held-out k-NN top-1 during pretraining", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_l, ax_d, ax_k):
        ax.grid(alpha=0.3)
    ax_k.legend(fontsize=8, title="solid: seed 1st, dashed: 2nd", title_fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarise_only(out: Path) -> int:
    """Rebuild the markdown and the curves from results.json alone."""
    path = out / "results.json"
    if not path.exists():
        print(f"study: error: {path} does not exist; run the study first", file=sys.stderr)
        return 2
    results = json.loads(path.read_text())
    print(summarise(results, out))
    plot_curves(results, out)
    return 0


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny version of every arm (minutes)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, help="override the config's seeds")
    parser.add_argument("--data-dir", default=None, help="folder with cifar10.npz (default: ../shared/datasets)")
    parser.add_argument("--output", type=Path, default=None, help="results folder")
    parser.add_argument("--epochs", type=int, help="override the pretraining epochs (e.g. for a CI-sized run)")
    parser.add_argument("--subset", type=int, help="override the number of training images")
    parser.add_argument("--summarise", action="store_true",
                        help="only rebuild results.md and curves.png from OUTPUT/results.json")
    args = parser.parse_args(argv)

    import torch

    from clmae.errors import ClmaeError

    cfg = load_config(args.quick)
    base, evaluation = cfg["pretrain"], cfg["evaluation"]
    if args.epochs:
        base["epochs"] = args.epochs
        base["warmup_epochs"] = min(base.get("warmup_epochs") or 0, args.epochs)
    if args.subset:
        base["subset"] = args.subset
    seeds = args.seeds or cfg["seeds"]
    data_dir = args.data_dir or os.environ.get("CLMAE_DATA") or str(HERE.parents[2] / "shared" / "datasets")
    out = args.output or HERE / ("quick" if args.quick else "results")
    if args.summarise:
        return summarise_only(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else "run.py " + " ".join(argv),
        "commit": git_commit(), "torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads(),
        "pretrain": base, "evaluation": evaluation, "seeds": seeds, "arms": {},
    }
    try:
        for seed in seeds:  # seed-major: a study cut short still has every arm for the first seed
            for arm in args.arms:
                run_dir = out / "runs" / f"{arm}-s{seed}"
                print(f"[study] {arm} seed {seed}: pretraining → {run_dir}", file=sys.stderr)
                timing = train_arm(arm, seed, base, run_dir, data_dir)
                print(f"[study] {arm} seed {seed}: evaluating", file=sys.stderr)
                reports = evaluate_arm(run_dir, evaluation, data_dir, reference=arm == args.arms[0])
                metrics = {p: {"pretrained": r["results"]["pretrained"], "random_init": r["results"].get("random_init")}
                           for p, r in reports.items()}
                results["arms"].setdefault(arm, {})[str(seed)] = {"run_dir": str(run_dir.relative_to(out)),
                                                                  "timing": timing,
                                                                  "metrics": metrics,
                                                                  "curves": collect_curves(run_dir)}
                (out / "results.json").write_text(json.dumps(results, indent=2))
    except StudyStopped as exc:
        print(f"study: {exc}; checkpoint saved. Run the same command again to resume.", file=sys.stderr)
        return 130
    except ClmaeError as exc:
        print(f"study: error: {exc}", file=sys.stderr)
        return 2
    table = summarise(results, out)
    plot_curves(results, out)
    print(table)
    print(f"\nresults in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
