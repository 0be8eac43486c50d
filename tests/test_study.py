"""The CIFAR-10 study script runs every arm end to end (CI-sized) and resumes without retraining."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_study(script: str = "run.py"):
    spec = importlib.util.spec_from_file_location(f"study_{script[:-3]}", REPO / "experiments" / "cifar10" / script)
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
