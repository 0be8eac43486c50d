"""Evaluation reports: the JSON every protocol writes, where it goes, and its lines on the terminal.

A report says what was evaluated (checkpoint and its sha256, model, data and split sizes, pooling,
hyper-parameters, options) and the results of the pretrained encoder and of its random-init
reference. :mod:`clmae.compare` reads them back.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .data import dataset_label
from .errors import ConfigError
from .version import __version__

REPORT_FORMAT = "clmae-eval-v1"


def assemble_report(setup, protocol: str, config, results: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready report of ``protocol`` run on the encoders of ``setup`` (an ``EvalSetup``)."""
    o = setup.options
    rc = setup.run_config
    return {
        "format": REPORT_FORMAT,
        "protocol": protocol,
        "checkpoint": setup.checkpoint,
        "checkpoint_sha256": setup.checkpoint_sha256,
        "model": setup.model_name,
        "method": rc.get("method"),
        "pretrain_epochs": rc.get("epochs"),
        "data": {"name": setup.data, "data_dir": setup.data_dir, "train_size": len(setup.train),
                 "test_size": len(setup.test), "num_classes": setup.num_classes, "img_size": setup.img_size,
                 "mean": list(setup.mean), "std": list(setup.std)},
        "features": {"pool": o.pool},
        "hyperparameters": dataclasses.asdict(config),
        "options": {k: v for k, v in dataclasses.asdict(o).items() if k not in ("progress",)},
        "random_init_seed": setup.random_init_seed,
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
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    except OSError as exc:
        raise ConfigError(f"--output: cannot write {output}: {exc.strerror or exc}; choose another path") from None
    return output


def default_output(checkpoint: str | Path, protocol: str, data: str) -> Path:
    """``RUN/eval-PROTOCOL-DATA.json`` beside the checkpoint (the run folder for a folder)."""
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    return folder / f"eval-{protocol}-{dataset_label(data)}.json"


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
