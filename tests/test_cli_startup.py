"""``clmae --help``, any ``--help`` and any usage error answer without importing torch.

The parser of every sub-command is built from torch-free modules (the configuration, the model and
method registries, the option dataclasses); what a command runs is imported when it runs. These
tests hold that in place: each runs the real command in a fresh interpreter and reads, with
``python -X importtime``, every module it imported. How long the answers take, against
``import torch`` on the same machine, is measured by benchmarks/cli_startup.py, not here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import clmae
from clmae import maskers

SRC = Path(__file__).resolve().parents[1] / "src"
# Each costs a noticeable share of a second to import (torch and timm several seconds); the CLI's
# answers need none of them.
HEAVY = {"torch", "timm", "torchvision", "numpy", "safetensors", "matplotlib", "PIL", "sklearn", "tqdm"}


def run_python(*args: str) -> tuple[subprocess.CompletedProcess, set[str], str]:
    """Run ``python -X importtime ARGS`` on this checkout: the process, the modules it imported, its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "100"}
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    imported, stderr = set(), []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):  # import time: self [us] | cumulative | imported package
            imported.add(line.rsplit("|", 1)[1].strip())
        else:
            stderr.append(line)
    return proc, imported, "\n".join(stderr)


def heavy(imported: set[str]) -> list[str]:
    return sorted(name for name in imported if name.split(".")[0] in HEAVY)


def test_the_whole_parser_builds_and_formats_without_torch():
    code = ("import argparse\n"
            "from clmae import cli\n"
            "def walk(parser):\n"
            "    parser.format_help()\n"
            "    for action in parser._actions:\n"
            "        if isinstance(action, argparse._SubParsersAction):\n"
            "            for sub in action.choices.values():\n"
            "                walk(sub)\n"
            "walk(cli.build_parser())\n")
    proc, imported, stderr = run_python("-c", code)
    assert proc.returncode == 0, stderr
    assert {"clmae.cli.app", "clmae.config", "clmae.cli.eval", "clmae.maskers", "clmae.evaluation.options"} <= imported
    assert heavy(imported) == [], "the parser imports modules it does not need"


@pytest.mark.parametrize("argv, fragments", [
    (["--help"], ["usage: clmae [-h] [--version] COMMAND", "pretrain", "eval", "compare", "visualize", "export"]),
    (["pretrain", "--help"], ["training epochs (default: 30)",
                              "--method {clmae,mae,block,hpm,attmask,colormae,sbam,automae}",
                              "see `clmae models`", "--attmask-variant {high,low}"]),
    (["eval", "knn", "--help"], ["--checkpoint PATH", "--k-majority N", "--pool {cls,mean}",
                                 "auto, cpu, cuda, cuda:N or mps"]),
    (["export", "--help"], ["--format {timm,hf}"]),
    (["visualize", "--help"], ["rows of the grid (1 to 64)"]),
])
def test_help_answers_without_torch(argv, fragments):
    proc, imported, stderr = run_python("-m", "clmae", *argv)
    assert proc.returncode == 0, stderr
    text = " ".join(proc.stdout.split())
    for fragment in fragments:
        assert fragment in text, fragment
    assert heavy(imported) == []


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--epochs", "x"], "clmae: error: argument --epochs: invalid int value: 'x' "
                                    "(see `clmae pretrain --help`)"),
    (["eval", "knn"], "clmae: error: the following arguments are required: --checkpoint (see `clmae eval knn --help`)"),
    (["pretrain", "--method", "bert"], "clmae: error: argument --method: invalid choice: 'bert'"),
])
def test_usage_errors_answer_in_one_line_without_torch(argv, message):
    proc, imported, stderr = run_python("-m", "clmae", *argv)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(stderr.splitlines()) == 1 and stderr.startswith(message), stderr
    assert heavy(imported) == []


def test_import_clmae_lists_the_api_without_importing_torch():
    code = "import clmae; print(' '.join(sorted(set(clmae.__all__) & set(dir(clmae)))))"
    proc, imported, stderr = run_python("-c", code)
    assert proc.returncode == 0, stderr
    names = set(proc.stdout.split())
    assert {"pretrain", "evaluate", "evaluate_all", "report", "visualize", "export", "compare"} <= names
    assert heavy(imported) == []


def test_the_lazy_package_still_offers_its_whole_api():
    """``clmae`` and ``clmae.maskers`` import their names on first use; every name they list resolves."""
    for module in (clmae, maskers):
        for name in module.__all__:
            assert getattr(module, name) is not None, name
            assert name in dir(module)
    from clmae.evaluation.runner import EvalOptions

    assert clmae.EvalOptions is EvalOptions
    assert maskers.LearnedMasker.__module__ == "clmae.maskers.clmae"
    # One Python function per command: report, visualize, export, compare (offered under the command's name).
    from clmae.evaluation.compare import compare
    from clmae.io.export import export_encoder
    from clmae.viz.report import build_report
    from clmae.viz.visualize import visualize_checkpoint

    assert (clmae.report, clmae.visualize, clmae.export, clmae.compare) == (build_report, visualize_checkpoint,
                                                                          export_encoder, compare)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = clmae.no_such_name
