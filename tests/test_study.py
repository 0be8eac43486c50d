"""The CIFAR-10 study script runs every arm end to end (CI-sized) and resumes without retraining."""

from __future__ import annotations

import importlib.util
import json

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_study():
    spec = importlib.util.spec_from_file_location("study_run", REPO / "experiments" / "cifar10" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_study_runs_every_arm_and_resumes(cifar_dir, tmp_path):
    study = load_study()
    args = ["--quick", "--epochs", "1", "--subset", "128", "--data-dir", str(cifar_dir), "--output", str(tmp_path)]
    assert study.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["arms"]) == set(study.ARMS)
    for arm, seeds in results["arms"].items():
        run = seeds["0"]
        assert set(run["metrics"]) == {"knn", "linear", "fewshot"}
        assert run["metrics"]["knn"]["random_init"] is not None
        assert run["timing"]["images"] == 2 * 64  # 128 images, batch 64, one epoch
        assert run["run_dir"] == f"runs/{arm}-s0"  # relative: results.json travels with the results folder
        assert run["curves"]["knn"], arm  # held-out k-NN at the end of the epoch
        probes = run["curves"]["probe"]
        if arm == "mae":
            assert probes == []  # no masking module, no mask difficulty
        else:
            assert probes and all(isinstance(r["mask_difficulty"], float) for r in probes), arm
    every4 = json.loads((tmp_path / "runs" / "clmae_every4-s0" / "config.json").read_text())
    assert every4["run_config"]["masker_every"] == 4
    assert results["arms"]["clmae_adversary"]["0"]["curves"]["probe"][0]["curriculum_factor"] == -1.0
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.count("| clmae_") == 2 * 5  # the results table and the paired-difference table
    official = results["arms"]["clmae_official"]["0"]["metrics"]["knn"]["pretrained"]["knn_majority_top1"]
    mae = results["arms"]["mae"]["0"]["metrics"]["knn"]["pretrained"]["knn_majority_top1"]
    assert f"| clmae_official | {official - mae:+.2f} |" in markdown
    assert (tmp_path / "curves.png").stat().st_size > 0
    # --summarise rebuilds the markdown and the picture from results.json alone.
    (tmp_path / "results.md").unlink()
    (tmp_path / "curves.png").unlink()
    assert study.main(["--summarise", "--output", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == markdown
    assert (tmp_path / "curves.png").stat().st_size > 0
    # A second call finds every run and evaluation done and only rewrites the summary.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/checkpoint-last.pt")}
    assert study.main(args) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/checkpoint-last.pt")}
