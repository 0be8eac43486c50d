"""Evaluation reports: the JSON every protocol writes, where it goes, and its lines on the terminal.

A report says exactly what was evaluated (the checkpoint file and its sha256, model, epochs of
pretraining actually done and whether the run was interrupted, data, split sizes and subset seeds,
pooling, image size, hyper-parameters, options) and the results of the pretrained encoder and of
its random-init reference. :mod:`clmae.evaluation.compare` reads them back.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import dataset_label
from ..errors import ConfigError
from ..io.atomic import write_text
from ..version import __version__

REPORT_FORMAT = "clmae-eval-v1"


def _subset(split, seed: int) -> dict[str, Any]:
    """What part of a split was used: its size, the full size, and for a random subset its seed and digest."""
    total = int(split.dataset.labels.numel())
    capped = len(split) < total
    return {"size": len(split), "total": total, "subset_seed": seed if capped else None,
            "subset_digest": split.identity.rsplit("|", 1)[-1] if capped else None}


def pretrain_position(setup) -> dict[str, Any]:
    """How far pretraining got: epochs completed (from the checkpoint), planned, and whether it stopped early."""
    planned = setup.run_config.get("epochs")
    done = setup.position.get("epoch")
    step = setup.position.get("step_in_epoch")
    interrupted = None if done is None or planned is None else bool(done < planned)
    return {"epochs_completed": done, "epochs_planned": planned, "interrupted": interrupted,
            "step_in_epoch": step, "iteration": setup.position.get("iteration"), "img_size": setup.pretrain_img_size}


def assemble_report(setup, protocol: str, config, results: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready report of ``protocol`` run on the encoders of ``setup`` (an ``EvalSetup``).

    Everything that decides the numbers is in it: the checkpoint file and its sha256, how far its
    pretraining got, the data, split sizes and subsets, pooling, image size and hyper-parameters.
    """
    o = setup.options
    rc = setup.run_config
    pretrain = pretrain_position(setup)
    train, test = _subset(setup.train, o.seed), _subset(setup.test, o.seed)
    return {
        "format": REPORT_FORMAT,
        "protocol": protocol,
        "checkpoint": setup.checkpoint,
        "checkpoint_file": str(setup.checkpoint_file),
        "checkpoint_sha256": setup.checkpoint_sha256,
        "model": setup.model_name,
        "method": rc.get("method"),
        "pretrain_epochs": pretrain["epochs_completed"],
        "pretrain": pretrain,
        "data": {"name": setup.data, "data_dir": setup.data_dir, "train_size": train["size"],
                 "test_size": test["size"], "train_total": train["total"], "test_total": test["total"],
                 "train_subset_seed": train["subset_seed"], "test_subset_seed": test["subset_seed"],
                 "train_subset_digest": train["subset_digest"], "test_subset_digest": test["subset_digest"],
                 "holdout": None if o.holdout is None else {"fraction": o.holdout, "seed": o.seed},
                 "num_classes": setup.num_classes, "img_size": setup.img_size,
                 "mean": list(setup.mean), "std": list(setup.std)},
        "features": {"pool": o.pool, "img_size": setup.img_size, "pretrain_img_size": setup.pretrain_img_size},
        "hyperparameters": dataclasses.asdict(config),
        "options": {k: v for k, v in dataclasses.asdict(o).items() if k not in ("progress",)},
        "random_init_seed": setup.random_init_seed,
        "random_init": (None if setup.random_init_seed is None else
                        {"seed": setup.random_init_seed, "architecture": setup.random_init_architecture}),
        "results": results,
        "details": details,
        "timings": dict(setup.timings),
        "device": str(setup.device),
        "torch": torch.__version__,
        "clmae_version": __version__,
        "command": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_report(report: dict[str, Any], output: str | Path) -> Path:
    """Write ``report`` as indented JSON; an unwritable path is a one-line error naming ``--output``."""
    output = Path(output)
    try:
        write_text(output, json.dumps(report, indent=2, default=str) + "\n")
    except OSError as exc:
        raise ConfigError(f"--output: cannot write {output}: {exc.strerror or exc}; choose another path") from None
    return output


def _run_folder(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def default_output(checkpoint: str | Path, protocol: str, data: str) -> Path:
    """``RUN/eval-PROTOCOL-DATA.json`` beside the checkpoint (the run folder for a folder)."""
    return _run_folder(checkpoint) / f"eval-{protocol}-{dataset_label(data)}.json"


def summary_output(checkpoint: str | Path, data: str) -> Path:
    """``RUN/eval-summary-DATA.md``: the table of ``clmae eval all``."""
    return _run_folder(checkpoint) / f"eval-summary-{dataset_label(data)}.md"


def summary_table(reports: list[dict[str, Any]]) -> str:
    """A markdown table of several reports of one checkpoint: one row per metric, pretrained vs random init."""
    lines = ["| protocol | metric | pretrained | random init |", "|---|---|---:|---:|"]

    def cell(metrics: dict[str, Any] | None, name: str) -> str:
        if not metrics or metrics.get(name) is None:
            return "—"
        std = metrics.get(name + "_std")
        return f"{metrics[name]:.2f}" + (f" ± {std:.2f}" if std is not None else "")

    for rep in reports:
        pre, ref = rep["results"].get("pretrained", {}), rep["results"].get("random_init")
        for name in pre:
            if not name.endswith("_std"):
                lines.append(f"| {rep['protocol']} | {name} | {cell(pre, name)} | {cell(ref, name)} |")
    if reports:
        r = reports[0]
        d, p = r["data"], r.get("pretrain") or {}
        done = p.get("epochs_completed")
        epochs = "" if done is None else f", pretrained {done}/{p.get('epochs_planned')} epochs" + (
            " (interrupted)" if p.get("interrupted") else "")
        lines += ["", f"{r['model']} from {r.get('checkpoint_file', r['checkpoint'])} (sha256 "
                      f"{str(r['checkpoint_sha256'])[:12]}…){epochs}; {d['name']}: {d['train_size']} train / "
                      f"{d['test_size']} test images, {r['features']['pool']} pooling, {d['img_size']} px"]
    return "\n".join(lines)


def write_summary(text: str, output: str | Path) -> Path:
    output = Path(output)
    try:
        write_text(output, text + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}; check the run folder's permissions") from None
    return output


def _fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One readable line per metric: pretrained value, then the random-init reference."""
    res = report["results"]
    pre, ref = res.get("pretrained", {}), res.get("random_init")
    lines = []
    for name, value in pre.items():
        if name.endswith("_std"):
            continue
        std = pre.get(name + "_std")
        text = f"{_fmt(value)}%" + (f" ± {std:5.2f}" if std is not None else "")
        line = f"{report['protocol']:<8} {report['data']['name']:<10} {name:<24} {text}"
        if ref is not None:
            rstd = ref.get(name + "_std")
            line += f"   (random init {_fmt(ref.get(name))}%" + (f" ± {rstd:5.2f}" if rstd is not None else "") + ")"
        lines.append(line)
    return lines


def below_random_init(reports: list[dict[str, Any]]) -> str | None:
    """One line when the pretrained encoder does worse than its own random initialisation, else None.

    Per report, the mean of its top-1 accuracies (k-NN's two protocols, the probe's, every shot count) is
    compared; the line names each protocol below with its numbers, the likely reason and what to try.
    """
    below = []
    for rep in reports:
        pre, ref = rep["results"].get("pretrained") or {}, rep["results"].get("random_init") or {}
        names = [n for n in pre if n.endswith("top1") and pre.get(n) is not None and ref.get(n) is not None]
        if not names:
            continue
        mine, theirs = (sum(m[n] for n in names) / len(names) for m in (pre, ref))
        if mine < theirs:
            below.append(f"{rep['protocol']} {mine:.2f} vs {theirs:.2f}")
    if not below:
        return None
    p = reports[0].get("pretrain") or {}
    done = p.get("epochs_completed")
    how_long = f" ({done} epoch{'s' if done != 1 else ''})" if done is not None else ""
    return (f"clmae: note: the pretrained encoder is below its own random initialisation (top-1, "
            f"{'; '.join(below)}): most likely pretraining was too short{how_long} to learn more than the random "
            "features offer; train longer (--epochs, --resume), on more images, or check that loss_mae fell "
            "(clmae report RUN)")
