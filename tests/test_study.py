"""The CIFAR-10 study script runs every arm end to end (CI-sized) and resumes without retraining."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_study(script: str = "run.py"):
    spec = importlib.util.spec_from_file_location(f"study_{script[:-3]}", REPO / "experiments" / "cifar10" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
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
        # The random-init encoder is the same for every arm of a seed: evaluated once, with the first arm.
        assert (run["metrics"]["knn"]["random_init"] is not None) == (arm == "mae")
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
    # Every CL-MAE arm's masks judged by the mae arm's MAE (and by its own).
    assert load_study("mask_difficulty.py").main(["--output", str(tmp_path), "--images", "32", "--draws", "2"]) == 0
    difficulty = json.loads((tmp_path / "mask_difficulty.json").read_text())["arms"]
    assert set(difficulty) == set(study.ARMS) - {"mae"}
    for rows in difficulty.values():
        assert all(0 < v < 10 for v in rows["0"].values())
    assert (tmp_path / "mask_difficulty.md").read_text().count("| clmae_") == 5
    # A second call finds every run and evaluation done and only rewrites the summary.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/checkpoint-last.pt")}
    assert study.main(args) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/checkpoint-last.pt")}


def test_stopped_run_is_not_evaluated_and_resumes_with_its_time(cifar_dir, tmp_path, monkeypatch):
    study = load_study()
    args = ["--quick", "--arms", "mae", "--epochs", "2", "--subset", "128", "--data-dir", str(cifar_dir),
            "--output", str(tmp_path)]
    run = tmp_path / "runs" / "mae-s0"

    def stop_after_first_epoch(self, trainer):  # as if Ctrl-C arrived during the second epoch
        self.write(trainer)
        trainer.request_stop()

    monkeypatch.setattr(study.TimingFile, "on_epoch_end", stop_after_first_epoch)
    assert study.main(args) == 130
    assert not list(run.glob("eval-*.json"))  # a half-trained encoder is never evaluated
    first = json.loads((run / "study-timing.json").read_text())
    assert first["epochs_done"] == 1 and first["images"] == 2 * 64

    monkeypatch.undo()
    assert study.main(args) == 0
    timing = json.loads((tmp_path / "results.json").read_text())["arms"]["mae"]["0"]["timing"]
    assert timing["epochs_done"] == 2 and timing["images"] == 4 * 64
    assert timing["wall_s"] > first["wall_s"]  # the first segment's time is kept, not restarted from zero
    # An evaluation of other weights (here: the checkpoint changed after it was written) is redone.
    report = json.loads((run / "eval-knn.json").read_text())
    report["checkpoint_sha256"] = "0" * 64
    report["results"]["pretrained"]["knn_majority_top1"] = -1.0
    (run / "eval-knn.json").write_text(json.dumps(report))
    assert study.main(args) == 0
    redone = json.loads((run / "eval-knn.json").read_text())
    assert redone["results"]["pretrained"]["knn_majority_top1"] >= 0


def test_t_quantiles_and_paired_intervals():
    summary = load_study("study_summary.py")
    for df, expected in ((1, 12.706), (2, 4.303), (3, 3.182), (9, 2.262), (30, 2.042)):
        assert summary.t_quantile(df) == pytest.approx(expected, abs=1e-3)
    iv = summary.interval([2.0, 3.0, 4.0])  # mean 3, std 1: [3 − 2.48, 3 + 2.48]
    assert (iv.n, iv.mean, iv.sd) == (3, 3.0, 1.0)
    assert iv.half == pytest.approx(4.303 / 3 ** 0.5, abs=1e-3) and iv.excludes_zero is True
    assert summary.interval([1.0, 2.0, 3.0]).excludes_zero is False  # [2 − 2.48, 2 + 2.48]
    assert summary.interval([-1.0, 1.0, 0.5]).excludes_zero is False
    assert summary.interval([0.7]).excludes_zero is None and summary.interval([]) is None
    assert summary.seeds_to_resolve(1.0, 1.0) == 7  # t(5)·1/√6 = 1.05 > 1; t(6)·1/√7 = 0.92 < 1


def fake_results(linear: dict[str, list[float]]) -> dict:
    """A results.json with three seeds and only linear-probe numbers: enough for the verdict."""
    runs = {arm: {str(seed): {"metrics": {"linear": {"pretrained": {"linear_top1": value}, "random_init": None}},
                              "timing": {"images": 1000 * (4 if arm == "mae_equal_compute" else 1), "wall_s": 60},
                              "curves": {"train_img_per_s": 400 if arm.startswith("mae") else 100}}
                  for seed, value in enumerate(values)} for arm, values in linear.items()}
    flops = {"mae": 1.0, "mae_equal_compute": 1.0, "clmae": 4.0, "block": 1.0}
    return {"arms": runs, "reference_arm": "mae", "equal_compute_arm": "mae_equal_compute",
            "verdict_metric": "linear probe", "device": "cpu", "threads": 2, "pretrain": {"epochs": 8},
            "compute": {"arms": {a: {"flops_per_image": f} for a, f in flops.items()}},
            "plan": {a: {"epochs": 32 if a == "mae_equal_compute" else 8, "method": a, "overrides": {},
                         "equal_compute_with": "clmae" if a == "mae_equal_compute" else None} for a in flops}}


def test_verdict_sentences_follow_the_intervals():
    summary = load_study("study_summary.py")
    results = fake_results({"mae": [40.0, 41.0, 42.0], "mae_equal_compute": [43.0, 44.5, 45.0],
                            "clmae": [41.0, 42.0, 43.5], "block": [40.2, 40.9, 42.3]})
    text = "\n".join(summary.verdict(results))
    # clmae − mae_equal_compute = [-2, -2.5, -1.5]: mean -2, std 0.5, half-width 4.303·0.5/√3 = 1.24.
    assert "clmae − MAE on linear probe = -2.00 points over 3 seed(s), 95% interval [-3.24, -0.76]" in text
    assert "the interval lies below 0: at equal compute MAE is better" in text
    assert "clmae costs 4.00× MAE's FLOPs and 4.00× its training wall-clock" in text
    assert "MAE gets 32 instead of 8 epochs" in text
    # Equal epochs: clmae − mae = [1, 1, 1.5] excludes 0; block − mae = [0.2, -0.1, 0.3] does not.
    assert "beyond seed noise (95% interval excludes 0): clmae (+1.17 [+0.45, +1.88] *)" in text
    assert "within seed noise: block (+0.13" in text
    assert "With 3 seeds the interval's half-width is ±1.24 points" in text
    tied = fake_results({"mae": [40.0, 41.0, 42.0], "mae_equal_compute": [41.0, 42.0, 43.0],
                         "clmae": [42.0, 41.0, 43.5]})
    text = "\n".join(summary.verdict(tied))
    assert "the interval includes 0: at equal compute the two are not distinguishable from seed noise" in text
    assert "Resolving the observed +0.17 points at this spread would take about" in text


def test_hidden_to_visible_distance_on_a_hand_made_mask():
    import torch

    difficulty = load_study("mask_difficulty.py")
    visible = torch.zeros(1, 9, dtype=torch.bool)
    visible[0, 0] = True  # 3x3 grid, only the top-left patch visible
    # hidden patches' distances to (0, 0): 1, 2, 1, √2, √5, 2, √5, √8
    expected = (1 + 2 + 1 + 2 ** 0.5 + 5 ** 0.5 + 2 + 5 ** 0.5 + 8 ** 0.5) / 8
    assert abs(difficulty.hidden_to_visible_distance(visible) - expected) < 1e-6
    visible[0, 8] = True  # add the bottom-right patch: (1,2) and (2,1) are now 1 away, (2,2) is visible
    expected = (1 + 2 + 1 + 2 ** 0.5 + 1 + 2 + 1) / 7
    assert abs(difficulty.hidden_to_visible_distance(visible) - expected) < 1e-6
