"""How much pretraining does an MAE need before it beats its own random init? k-NN and linear probe vs images seen.

The study (run.py) compares masking strategies; a comparison means something only where pretraining has
learned something. This script trains the study's MAE arm at several budgets (``--epochs`` over
``--subset`` images, each a full run with its own warmup and cosine schedule), evaluates each exactly
as the study does (same evaluation options, random-init reference), and writes
``results/learning_curve/learning_curve.{json,md,png}``: the gain over random init against images seen,
from which the study's size is chosen (a gain of at least 5 k-NN points beyond seed noise).

    python experiments/cifar10/learning_curve.py --data-dir ../shared/datasets --epochs 4 8 16 24

Each budget is one ``run.py --arms mae`` study in a folder of its own, so an interrupted curve resumes
where it stopped (finished runs and evaluations are read back) and ``--summarise`` redraws from the JSONs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "learning_curve"
METRICS = (("knn", "knn_majority_top1", "k-NN k=5"), ("knn", "knn_weighted_top1", "k-NN k=20 weighted"),
           ("linear", "linear_top1", "linear probe"))


def study_module():
    spec = importlib.util.spec_from_file_location("clmae_study_run", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def budget_dir(out: Path, subset: int | None, epochs: int) -> Path:
    return out / f"mae-n{subset or 'all'}-e{epochs}"


def collect(out: Path) -> list[dict[str, Any]]:
    """One row per (budget, seed) from the budgets' results.json files."""
    rows = []
    for results in sorted(out.glob("mae-n*-e*/results.json")):
        data = json.loads(results.read_text())
        for seed, run in (data.get("arms", {}).get("mae") or {}).items():
            row = {"budget": results.parent.name, "seed": int(seed), "epochs": data["pretrain"]["epochs"],
                   "train_images": data["train_images"], "images_seen": run["timing"]["images"],
                   "wall_s": run["timing"]["wall_s"], "model": data["pretrain"]["model"]}
            for protocol, key, _ in METRICS:
                m = run["metrics"].get(protocol) or {}
                row[key] = (m.get("pretrained") or {}).get(key)
                row[f"random_{key}"] = (m.get("random_init") or {}).get(key)
            rows.append(row)
    # the random-init reference is evaluated with the first (only) arm of each study: the same encoder per seed
    return sorted(rows, key=lambda r: (r["images_seen"], r["seed"]))


def summarise(out: Path, command: str) -> dict[str, Any]:
    rows = collect(out)
    summary = {"command": command, "rows": rows,
               "note": "each row is a whole MAE run (warmup + cosine) of the study's cpu profile at that budget, "
                       "evaluated as the study evaluates (10,000-image bank, the full test set)"}
    (out / "learning_curve.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# MAE learning curve on CIFAR-10 (the study's MAE arm at several budgets)", "",
             f"Command: `{command}`", "",
             "| budget | seed | images seen | wall (min) | " + " | ".join(
                 f"{label} (gain over random init)" for _, _, label in METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for r in rows:
        cells = []
        for _, key, _ in METRICS:
            if r[key] is None or r[f"random_{key}"] is None:
                cells.append("—")
            else:
                cells.append(f"{r[key]:.2f} ({r[key] - r[f'random_{key}']:+.2f})")
        lines.append(f"| {r['budget']} | {r['seed']} | {r['images_seen']:,} | {r['wall_s'] / 60:.1f} | "
                     + " | ".join(cells) + " |")
    (out / "learning_curve.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "learning_curve.png")
    return summary


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for (_, key, label), color in zip(METRICS, ("C0", "C1", "C2")):
        pts = [(r["images_seen"], r[key] - r[f"random_{key}"]) for r in rows
               if r[key] is not None and r[f"random_{key}"] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-", color=color, label=label, markersize=4)
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.axhline(5, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("images seen in pretraining")
    ax.set_ylabel("accuracy gain over random init (points)")
    ax.set_title("MAE (vit_mini_patch4_32) on CIFAR-10: when has pretraining learned something?", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", nargs="+", type=int, default=[4, 8, 16, 24], help="budgets: epochs per run")
    parser.add_argument("--subset", type=int, default=10000, help="training images (of 50,000)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--summarise", action="store_true", help="only rebuild the summary from the JSONs")
    args = parser.parse_args(argv)
    command = "python experiments/cifar10/learning_curve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.output.mkdir(parents=True, exist_ok=True)
    if not args.summarise:
        run = study_module()
        for epochs in sorted(args.epochs):
            study = ["--arms", "mae", "--epochs", str(epochs), "--subset", str(args.subset), "--seeds",
                     *map(str, args.seeds), "--device", args.device,
                     "--output", str(budget_dir(args.output, args.subset, epochs))]
            study += ["--data-dir", args.data_dir] if args.data_dir else []
            study += ["--threads", str(args.threads)] if args.threads else []
            code = run.main(study)
            if code:
                summarise(args.output, command)
                return code
    summary = summarise(args.output, command)
    print((args.output / "learning_curve.md").read_text())
    return 0 if summary["rows"] else 2


if __name__ == "__main__":
    sys.exit(main())
