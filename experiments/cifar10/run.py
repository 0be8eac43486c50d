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


def train_arm(arm: str, seed: int, base: dict[str, Any], run_dir: Path, data_dir: str) -> dict[str, Any]:
    """Pretrain one arm (or resume it); return wall-clock and throughput."""
    from clmae.checkpoint import read_training_state
    from clmae.config import make_config
    from clmae.trainer import Trainer

    values = {**base, **ARMS[arm], "seed": seed, "data_dir": data_dir, "output_dir": str(run_dir)}
    timing_file = run_dir / "study-timing.json"
    state_file = run_dir / "checkpoint-last.pt"
    if state_file.exists():
        done = read_training_state(state_file)["epoch"]
        if done >= values["epochs"] and timing_file.exists():
            return json.loads(timing_file.read_text())
        values["resume"] = str(run_dir)
    spent = json.loads(timing_file.read_text())["wall_s"] if timing_file.exists() else 0.0
    start = time.perf_counter()
    trainer = Trainer(make_config(values), overrides=values if "resume" in values else None)
    trainer.fit()
    wall = spent + time.perf_counter() - start
    images = trainer.iteration * trainer.cfg.batch_size
    timing = {"wall_s": round(wall, 2), "images": images, "img_per_s": round(images / max(wall, 1e-9), 2)}
    timing_file.write_text(json.dumps(timing))
    return timing


def evaluate_arm(run_dir: Path, evaluation: dict[str, Any], data_dir: str) -> dict[str, dict[str, Any]]:
    """k-NN (both protocols), linear probe and n-shot on the run's checkpoint, cached as JSON."""
    from clmae import evaluation as ev

    options = ev.EvalOptions(max_train=evaluation.get("max_train"), max_test=evaluation.get("max_test"),
                             progress=False)
    reports, setup = {}, None
    for protocol in ("knn", "linear", "fewshot"):
        out = run_dir / f"eval-{protocol}.json"
        if out.exists():
            reports[protocol] = json.loads(out.read_text())
            continue
        if setup is None:
            setup = ev.prepare(run_dir, "cifar10", data_dir, options)
        config = ev.protocol_config(protocol, **evaluation.get(protocol, {}))
        reports[protocol] = ev.run_protocol(setup, protocol, config)
        ev.write_report(reports[protocol], out)
    return reports


def summarise(results: dict[str, Any], out: Path) -> str:
    """Markdown table: mean ± std over seeds per arm and metric, with compute."""
    header = ["arm", *METRICS.values(), "img/s", "wall (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, seeds in results["arms"].items():
        cells = [arm]
        for (protocol, name) in METRICS:
            values = [s["metrics"][protocol]["pretrained"].get(name) for s in seeds.values()]
            values = [v for v in values if v is not None]
            cells.append(_mean_std(values))
        cells.append(_mean_std([s["timing"]["img_per_s"] for s in seeds.values()], digits=0))
        cells.append(_mean_std([s["timing"]["wall_s"] / 60 for s in seeds.values()], digits=1))
        lines.append("| " + " | ".join(cells) + " |")
    ref = next(iter(next(iter(results["arms"].values())).values()))["metrics"]
    cells = ["random init (reference)"]
    for (protocol, name) in METRICS:
        cells.append(_mean_std([ref[protocol]["random_init"].get(name)] if ref[protocol].get("random_init") else []))
    lines.append("| " + " | ".join(cells + ["", ""]) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(f"# CIFAR-10 study ({results['mode']})\n\nCommand: `{results['command']}`\n\n"
                                    f"Seeds: {results['seeds']}. Accuracies in %, mean ± std over seeds.\n\n{table}\n")
    return table


def _mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plot_curves(results: dict[str, Any], out: Path) -> Path:
    """mask_difficulty and k-NN accuracy over training, one line per arm (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clmae.metrics import read_metrics

    fig, (ax_d, ax_k) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, seeds in results["arms"].items():
        seed, info = next(iter(seeds.items()))
        records = read_metrics(Path(info["run_dir"]) / "metrics.jsonl")
        probe = [r for r in records if r.get("kind") == "probe" and isinstance(r.get("mask_difficulty"), float)]
        if probe:
            ax_d.plot([r["step"] for r in probe], [r["mask_difficulty"] for r in probe], label=arm)
        evals = [r for r in records if r.get("kind") == "eval" and "knn_top1" in r]
        if evals:
            ax_k.plot([r["epoch"] + 1 for r in evals], [r["knn_top1"] for r in evals], marker="o", label=arm)
    ax_d.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_d.set(title="mask difficulty (learned / random MAE loss)", xlabel="iteration", ylabel="ratio")
    ax_k.set(title="k-NN top-1 during pretraining (held-out)", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_d, ax_k):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else "run.py " + " ".join(argv),
        "commit": git_commit(), "torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads(),
        "pretrain": base, "evaluation": evaluation, "seeds": seeds, "arms": {},
    }
    try:
        for arm in args.arms:
            for seed in seeds:
                run_dir = out / "runs" / f"{arm}-s{seed}"
                print(f"[study] {arm} seed {seed}: pretraining → {run_dir}", file=sys.stderr)
                timing = train_arm(arm, seed, base, run_dir, data_dir)
                print(f"[study] {arm} seed {seed}: evaluating", file=sys.stderr)
                reports = evaluate_arm(run_dir, evaluation, data_dir)
                metrics = {p: {"pretrained": r["results"]["pretrained"], "random_init": r["results"].get("random_init")}
                           for p, r in reports.items()}
                results["arms"].setdefault(arm, {})[str(seed)] = {"run_dir": str(run_dir), "timing": timing,
                                                                  "metrics": metrics}
                (out / "results.json").write_text(json.dumps(results, indent=2))
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
