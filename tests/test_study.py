"""The masking study (experiments/cifar10): every arm end to end on any labeled npz, equal compute from counted
FLOPs, resumable, clear errors, and statistics that say what is and is not distinguishable from seed noise."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def load_study(script: str = "run.py"):
    spec = importlib.util.spec_from_file_location(f"study_{script[:-3]}", REPO / "experiments" / "cifar10" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def labeled_npz(path: Path, size: int = 24, classes: int = 5, train: int = 200, test: int = 100) -> Path:
    """Noisy images around one coarse pattern per class: labeled, learnable, not CIFAR-10's size."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (classes, size // 4, size // 4, 3))

    def split(n: int):
        y = rng.integers(0, classes, n)
        x = 0.3 * np.kron(patterns[y], np.ones((1, 4, 4, 1))) + 0.7 * rng.integers(0, 256, (n, size, size, 3))
        return x.astype(np.uint8), y.astype(np.int64)

    (x_train, y_train), (x_test, y_test) = split(train), split(test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def registered_default_arms(study) -> list[str]:
    """The default arms whose method this clmae has (all of them once the masking strategies are merged);
    the others are checked to be a clear error in test_unregistered_method_is_a_clear_error."""
    from clmae.maskers import METHODS

    raw = study.read_config_file()
    return [arm for arm in raw["default_arms"] if raw["arms"][arm]["method"] in METHODS]


def test_quick_study_on_another_npz_runs_every_arm_and_resumes(tmp_path, monkeypatch):
    study = load_study()
    data = labeled_npz(tmp_path / "mine.npz")
    out = tmp_path / "out"
    arms = registered_default_arms(study)
    assert {"mae", "mae_equal_compute", "clmae", "clmae_cheap"} <= set(arms)
    args = ["--quick", "--data", str(data), "--epochs", "1", "--subset", "128", "--output", str(out),
            "--arms", *arms]
    assert study.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == arms and results["data"] == str(data) and results["train_images"] == 128

    # FLOPs per image counted on the training loop: CL-MAE > its cheap variant > MAE; equal compute follows.
    flops = {arm: c["flops_per_image"] for arm, c in results["compute"]["arms"].items()}
    assert flops["clmae"] > flops["clmae_cheap"] > flops["mae"] > 0
    assert flops["mae_equal_compute"] == flops["mae"]
    assert results["compute"]["arms"]["clmae_cheap"]["iterations_counted"] == 4  # a whole masker_every period
    equal_epochs = round(flops["clmae"] / flops["mae"])
    assert equal_epochs > 1 and results["plan"]["mae_equal_compute"]["epochs"] == equal_epochs
    equal_run = json.loads((out / "runs" / "mae_equal_compute-s0" / "config.json").read_text())["run_config"]
    assert equal_run["epochs"] == equal_epochs and equal_run["warmup_epochs"] == equal_epochs  # 1 of 1 epochs, scaled
    cheap = json.loads((out / "runs" / "clmae_cheap-s0" / "config.json").read_text())["run_config"]
    assert (cheap["masker_every"], cheap["masker_batch_fraction"]) == (4, 0.25)

    for arm, seeds in results["arms"].items():
        run = seeds["0"]
        assert set(run["metrics"]) == {"knn", "linear", "fewshot"}
        # The random-init encoder is the same for every arm of a seed: evaluated once, with the first arm.
        assert (run["metrics"]["knn"]["random_init"] is not None) == (arm == arms[0])
        epochs = equal_epochs if arm == "mae_equal_compute" else 1
        assert run["timing"]["images"] == epochs * 2 * 64  # 128 images, batch 64
        assert run["run_dir"] == f"runs/{arm}-s0"  # relative: results.json travels with the results folder
        assert run["curves"]["knn"] and run["curves"]["train_img_per_s"] > 0, arm
        probes = run["curves"]["probe"]
        if arm.startswith("clmae"):
            assert probes and all(isinstance(r["mask_difficulty"], float) for r in probes), arm
        elif arm.startswith("mae"):
            assert probes == []  # no masking module, no mask difficulty

    markdown = (out / "results.md").read_text()
    clmae, equal = (results["arms"][a]["0"]["metrics"]["linear"]["pretrained"]["linear_top1"]
                    for a in ("clmae", "mae_equal_compute"))
    knn = {a: results["arms"][a]["0"]["metrics"]["knn"]["pretrained"]["knn_majority_top1"] for a in ("clmae", "mae")}
    assert f"| clmae | {knn['clmae'] - knn['mae']:+.2f} (1 seed) |" in markdown  # equal epochs, paired by seed
    assert f"clmae − MAE on linear probe = {clmae - equal:+.2f} points over 1 seed(s)" in markdown  # the verdict
    assert "## Equal compute: each arm minus `mae_equal_compute`" in markdown
    assert markdown.count("\n| clmae_cheap |") == 4  # compute, accuracy, equal-epoch and equal-compute tables
    assert (out / "curves.png").stat().st_size > 0

    # --summarise rebuilds the markdown and the picture from results.json alone.
    (out / "results.md").unlink()
    (out / "curves.png").unlink()
    assert study.main(["--summarise", "--output", str(out)]) == 0
    assert (out / "results.md").read_text() == markdown
    assert (out / "curves.png").stat().st_size > 0

    # Every arm whose masks are not uniformly random is judged by the mae arm's MAE (and by its own).
    assert load_study("mask_difficulty.py").main(["--output", str(out), "--images", "32", "--draws", "2"]) == 0
    difficulty = json.loads((out / "mask_difficulty.json").read_text())
    assert set(difficulty["arms"]) == set(arms) - {"mae", "mae_equal_compute"}
    assert difficulty["not_measured_uniform_random"] == ["mae_equal_compute"]
    for rows in difficulty["arms"].values():
        assert all(0 < v < 10 for v in rows["0"].values())

    # A second call finds every run and evaluation done and the FLOPs cached: it only rewrites the summary.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoint-last.pt")}
    monkeypatch.setattr(study, "count_flops_per_iteration", lambda *a, **k: pytest.fail("FLOPs counted again"))
    assert study.main(args) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoint-last.pt")}
    assert (out / "results.md").read_text() == markdown

    # A clone without runs/ (a later session: only finished/ is committed) reads every arm x seed back and
    # neither trains nor evaluates.
    assert sorted(p.name for p in (out / "finished").iterdir()) == sorted(f"{arm}-s0.json" for arm in arms)
    shutil.rmtree(out / "runs")
    monkeypatch.setattr(study, "train_arm", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(study, "evaluate_arm", lambda *a, **k: pytest.fail("evaluated again"))
    assert study.main(args) == 0
    assert (out / "results.md").read_text() == markdown


def test_finished_entries_are_gathered_across_seeds_and_other_settings_are_redone(tmp_path, capsys):
    study = load_study()
    key = study.entry_key({"method": "mae", "epochs": 2, "seed": 0, "output_dir": "x"}, {"max_test": 10}, "d", "cpu")
    for seed in (2, 0):  # written by two invocations on different --seeds
        study.write_entry(tmp_path, "mae", seed, key, {"metrics": {"seed": seed}})
    other = study.entry_key({"method": "mae", "epochs": 3}, {"max_test": 10}, "d", "cpu")
    study.write_entry(tmp_path, "mae", 1, other, {"metrics": {"seed": 1}})
    study.write_entry(tmp_path, "mae_equal_compute", 0, key, {"metrics": {}})  # another arm, same prefix
    gathered = study.gather_entries(tmp_path, ["mae"], {"mae": key})
    assert list(gathered) == ["mae"] and list(gathered["mae"]) == ["0", "2"]
    assert gathered["mae"]["2"] == {"metrics": {"seed": 2}}
    assert "mae-s1.json was made with other settings" in capsys.readouterr().err  # epochs changed: redone
    assert study.read_entry(tmp_path, "mae", 0, other) is None
    assert not list(tmp_path.glob("finished/.*"))  # atomic writes leave no temporary files
    # An invocation on --arms clmae reports the arms finished earlier too (its MAE pairing), in config order.
    cfg = {"arms": {"mae": {}, "mae_equal_compute": {}, "clmae": {}, "hpm": {}}}
    assert study.report_arms(cfg, ["clmae"], tmp_path) == ["mae", "mae_equal_compute", "clmae"]
    assert study.report_arms(cfg, ["hpm"], tmp_path / "empty") == ["hpm"]


def test_arm_a_parallel_invocation_finishes_meanwhile_is_in_the_results(tmp_path, monkeypatch):
    """Two invocations on other --arms into one folder: the one that ends last reports both (its MAE pairing)."""
    study = load_study()
    data = labeled_npz(tmp_path / "mine.npz", train=96, test=40)
    common = ["--quick", "--data", str(data), "--epochs", "1", "--output", str(tmp_path / "out")]
    evaluate = study.evaluate_arm
    parallel = []

    def evaluate_while_another_finishes(run_dir, *args, **kwargs):
        if not parallel:  # while mae is evaluated, the other invocation trains and finishes clmae
            parallel.append("running")
            parallel[0] = study.main([*common, "--arms", "clmae"])
        return evaluate(run_dir, *args, **kwargs)

    monkeypatch.setattr(study, "evaluate_arm", evaluate_while_another_finishes)
    assert study.main([*common, "--arms", "mae"]) == 0 and parallel == [0]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["arms"]) == ["mae", "clmae"] and set(results["plan"]) == {"mae", "clmae"}
    assert results["compute"]["arms"]["clmae"]["flops_per_image"] > results["compute"]["arms"]["mae"]["flops_per_image"]
    assert "clmae" in (tmp_path / "out" / "results.md").read_text()


def test_finished_arm_whose_method_is_gone_is_left_out_of_the_results(capsys):
    study = load_study()
    base = study.load_config("quick")["pretrain"]
    cfg = {"reference_arm": "mae", "arms": {"mae": {"method": "mae"}, "ghost": {"method": "no_such_method"},
                                            "ghost_equal": {"method": "mae", "equal_compute_with": "ghost"}}}
    needed = study.flops_needed(cfg, ["mae"])
    assert study.plannable(cfg, ["mae", "ghost", "ghost_equal"], needed, base) == ["mae"]
    err = capsys.readouterr().err
    assert "ghost: finished earlier, but ghost needs --method no_such_method" in err
    assert "ghost_equal: finished earlier, but ghost needs --method no_such_method" in err
    # Chosen now (--estimate: guessed FLOPs), an arm and its target are planned: nothing is left out.
    chosen = study.flops_needed(cfg, ["ghost_equal"])
    assert study.plannable(cfg, ["mae", "ghost", "ghost_equal"], chosen, base) == ["mae", "ghost", "ghost_equal"]


def test_unregistered_method_is_a_clear_error_and_estimate_uses_its_guess(tmp_path, monkeypatch, capsys):
    study = load_study()
    raw = study.read_config_file()
    raw["arms"]["ghost"] = {"method": "no_such_method"}
    raw["arms"]["typo"] = {"method": "mae", "no_such_option": 1}
    raw["quick"]["budget"]["guessed_flop_ratio"] = {"no_such_method": 2.5}
    monkeypatch.setattr(study, "read_config_file", lambda: raw)
    data = labeled_npz(tmp_path / "mine.npz", train=80, test=40)
    common = ["--quick", "--data", str(data), "--output", str(tmp_path / "out")]
    assert study.main([*common, "--arms", "mae", "ghost"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("study: error: ghost needs --method no_such_method, which this clmae does not have")
    assert "Leave them out with --arms mae" in err and "Traceback" not in err
    assert study.main([*common, "--arms", "mae", "typo"]) == 2
    assert "arm 'typo': unknown options ['no_such_option']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was trained or written
    # --estimate plans the study with the guessed FLOP ratio of a method that does not exist yet, trains nothing.
    assert study.main([*common, "--arms", "mae", "ghost", "--estimate", "--epochs", "2"]) == 0
    plan = capsys.readouterr().err
    assert re.search(r"ghost +2 +2\.50 +guess", plan)
    assert "estimated pretraining:" in plan and not (tmp_path / "out").exists()


def test_estimate_on_cifar10_counts_flops_and_trains_nothing(cifar_dir, tmp_path, capsys):
    study = load_study()
    out = tmp_path / "out"
    args = ["--quick", "--arms", "mae", "--estimate", "--data-dir", str(cifar_dir), "--output", str(out)]
    assert study.main(args) == 0
    plan = capsys.readouterr().err
    assert "counting the training FLOPs of mae" in plan and "plan: 1 seed(s), 256 training images" in plan
    assert re.search(r"mae +2 +1\.00 +measured", plan) and not out.exists()


def test_stopped_run_is_not_evaluated_and_resumes_with_its_time(tmp_path, monkeypatch, capsys):
    study = load_study()
    data = labeled_npz(tmp_path / "mine.npz", train=128, test=40)
    args = ["--quick", "--arms", "mae", "--epochs", "2", "--data", str(data), "--output", str(tmp_path / "out")]
    run = tmp_path / "out" / "runs" / "mae-s0"

    def stop_after_first_epoch(self, trainer):  # as if a cluster's SIGTERM arrived during the second epoch
        self.write(trainer)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(study.TimingFile, "on_epoch_end", stop_after_first_epoch)
    assert study.main(args) == 143  # 128 + SIGTERM, as `clmae pretrain` ends: a shell chain stops here
    assert not list(run.glob("eval-*.json"))  # a half-trained encoder is never evaluated
    first = json.loads((run / "study-timing.json").read_text())
    assert first["epochs_done"] == 1 and first["images"] == 2 * 64

    monkeypatch.undo()
    # A run folder this study did not make (another edition, another arm) is refused, not resumed.
    marker = (run / "study-run.json").read_text()
    (run / "study-run.json").unlink()
    assert study.main(args) == 2
    assert "holds a run of another study" in capsys.readouterr().err
    (run / "study-run.json").write_text(marker)
    assert study.main(args) == 0
    timing = json.loads((tmp_path / "out" / "results.json").read_text())["arms"]["mae"]["0"]["timing"]
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
    # So is an evaluation of the same weights made another way (another test subset, other hyper-parameters).
    for key, value in (("options", {**redone["options"], "max_test": 7}),
                       ("hyperparameters", {**redone["hyperparameters"], "k_majority": 3})):
        stale = {**redone, key: value, "results": {"pretrained": {"knn_majority_top1": -1.0}}}
        (run / "eval-knn.json").write_text(json.dumps(stale))
        assert study.main(args) == 0
        again = json.loads((run / "eval-knn.json").read_text())
        assert again[key] == redone[key] and again["results"]["pretrained"]["knn_majority_top1"] >= 0, key


def test_equal_compute_plan_scales_epochs_warmup_and_knn_points():
    study = load_study()
    cfg = study.load_config("cpu")
    base = {**cfg["pretrain"], "epochs": 8, "warmup_epochs": 1, "eval_every": 4}
    plan = study.plan_arms(cfg, ["mae", "mae_equal_compute", "clmae"], base,
                           {"mae": 2.0, "mae_equal_compute": 2.0, "clmae": 9.0})
    equal = plan["mae_equal_compute"]["values"]
    assert (equal["epochs"], equal["warmup_epochs"], equal["eval_every"]) == (36, 4.5, 18)
    assert plan["clmae"]["values"]["epochs"] == 8 and plan["mae"]["epoch_scale"] == 1.0
    assert study.knn_passes(8, 4) == study.knn_passes(36, 18) == 2 and study.knn_passes(5, 0) == 0
    est = study.estimate(plan, {"mae": 2.0, "mae_equal_compute": 2.0, "clmae": 9.0},
                         dict.fromkeys(plan, "measured"), "mae",
                         {"mae_img_per_s": 100, "knn_pass_s": 10, "assumed_sustained_tflops": 1e-12}, 1000, 3)
    # 1000 images at batch 128 → 7 steps → 896 images per epoch.
    assert est["arms"]["clmae"]["cpu_s"] == pytest.approx(3 * (896 * 8 * 4.5 / 100 + 2 * 10))
    assert est["arms"]["mae_equal_compute"]["cpu_s"] == pytest.approx(3 * (896 * 36 / 100 + 2 * 10))
    assert est["gpu_min_assumed"] == pytest.approx(3 * 896 * (8 * 2 + 36 * 2 + 8 * 9) / 60)
    gpu = study.load_config("gpu")
    assert gpu["pretrain"]["model"] == "vit_tiny_patch4_32" and gpu["pretrain"]["subset"] is None
    assert gpu["pretrain"]["epochs"] >= 100 and gpu["evaluation"]["max_test"] is None


def test_threads_of_the_study_are_the_runs_own():
    """--threads reaches each run's config (a resumed one too), so the library's busy-machine rule cannot lower it;
    without --threads the rule stays in charge."""
    study = load_study()
    values = study.study_values({"epochs": 2}, 1, Path("runs/mae-s1"), None, "cpu", 2)
    assert values["threads"] == 2 and values["seed"] == 1
    assert "threads" not in study.study_values({"epochs": 2}, 1, Path("runs/mae-s1"), None, "cpu")


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


def fake_results(linear: dict[str, list[float]], more_flops: dict[str, float] | None = None) -> dict:
    """A results.json with three seeds and only linear-probe numbers: enough for the verdict."""
    runs = {arm: {str(seed): {"metrics": {"linear": {"pretrained": {"linear_top1": value}, "random_init": None}},
                              "timing": {"images": 1000 * (4 if arm == "mae_equal_compute" else 1), "wall_s": 60},
                              "curves": {"train_img_per_s": 400 if arm.startswith("mae") else 100}}
                  for seed, value in enumerate(values)} for arm, values in linear.items()}
    flops = {"mae": 1.0, "mae_equal_compute": 1.0, "clmae": 4.0, "block": 1.0, **(more_flops or {})}
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
    # An arm of about CL-MAE's FLOPs (within 10% of the equal-compute arm's) gets its own equal-compute sentence;
    # a cheap one (1.5x) is not compared with MAE at 4x.
    more = fake_results({"mae": [40.0, 41.0, 42.0], "mae_equal_compute": [43.0, 44.5, 45.0],
                         "clmae": [41.0, 42.0, 43.5], "clmae_hide_st": [44.0, 45.5, 46.5], "clmae_cheap": [41, 42, 43]},
                        more_flops={"clmae_hide_st": 3.8, "clmae_cheap": 1.5})
    text = "\n".join(summary.verdict(more))
    assert "clmae − MAE on linear probe = -2.00 points" in text  # the equal-compute arm's own target comes first
    # clmae_hide_st − mae_equal_compute = [1, 1, 1.5]: mean +1.17, std 0.29, half-width 0.72.
    assert "With about the same training FLOPs (clmae_hide_st costs 3.80× MAE's FLOPs" in text
    assert "clmae_hide_st − MAE on linear probe = +1.17 points over 3 seed(s), 95% interval [+0.45, +1.88]" in text
    assert "clmae_hide_st is better than MAE even at equal compute" in text
    assert "clmae_cheap costs" not in text and "**What would change it (clmae_hide_st).**" in text
    assert text.index("clmae − MAE") < text.index("clmae_hide_st − MAE") < text.index("**Equal epochs")


def test_every_equal_compute_arm_judges_the_arm_it_was_sized_for(tmp_path):
    """A second equal-compute arm (MAE at the cheap CL-MAE's FLOPs) gets its own verdict sentence and table; the
    cheap arm, 1.5x, is judged against it and not against MAE at CL-MAE's 4x."""
    summary = load_study("study_summary.py")
    results = fake_results({"mae": [40.0, 41.0, 42.0], "mae_equal_compute": [43.0, 44.5, 45.0],
                            "clmae": [41.0, 42.0, 43.5], "clmae_cheap": [41.5, 42.0, 43.0]},
                           more_flops={"clmae_cheap": 1.5})
    results["arms"]["mae_equal_cheap"] = {
        str(seed): {"metrics": {"linear": {"pretrained": {"linear_top1": value}, "random_init": None}},
                    "timing": {"images": 1500, "wall_s": 60}, "curves": {"train_img_per_s": 400}}
        for seed, value in enumerate([41.0, 41.5, 43.0])}
    results["compute"]["arms"]["mae_equal_cheap"] = {"flops_per_image": 1.0}
    results["plan"]["mae_equal_cheap"] = {"epochs": 12, "method": "mae", "overrides": {},
                                          "equal_compute_with": "clmae_cheap"}
    assert summary.equal_compute_arms(results) == {"mae_equal_compute": "clmae", "mae_equal_cheap": "clmae_cheap"}
    text = "\n".join(summary.verdict(results))
    # clmae_cheap − mae_equal_cheap = [0.5, 0.5, 0]: mean +0.33; clmae still against mae_equal_compute (-2.00).
    assert "With the same training FLOPs (clmae_cheap costs 1.50× MAE's FLOPs" in text
    assert "clmae_cheap − MAE on linear probe = +0.33 points over 3 seed(s)" in text
    assert "MAE gets 12 instead of 8" in text
    assert "clmae − MAE on linear probe = -2.00 points" in text
    assert text.index("clmae − MAE") < text.index("clmae_cheap − MAE") < text.index("**Equal epochs")
    # Neither MAE at more epochs is an equal-epochs competitor.
    assert "mae_equal_cheap (" not in text.split("**Equal epochs")[1]
    markdown = summary.write_summary({**results, "command": "run.py", "commit": "0" * 40, "seeds": [0, 1, 2]}, tmp_path)
    for equal, target in (("mae_equal_compute", "clmae"), ("mae_equal_cheap", "clmae_cheap")):
        assert f"## Equal compute: each arm minus `{equal}` (MAE trained with {target}'s training FLOPs)" in markdown
    # 5 arms x 3 seeds of 60 s each: 15 runs, 900 s = 0.25 h.
    assert "Total: 15 arm × seed runs, 0.2 h (15 min) of pretraining wall summed over runs" in markdown


def test_masks_during_pretraining_are_averaged_per_third_of_each_run(tmp_path):
    """The probe's records of each run (the untrained first one left out) in thirds, then mean ± std over seeds;
    an arm without probe records (plain MAE) has no rows."""
    summary = load_study("study_summary.py")
    results = fake_results({"mae": [40.0, 41.0], "mae_equal_compute": [43.0, 44.0], "clmae": [41.0, 42.0]})

    def probe(difficulty: list[float], shuffled: float) -> list[dict]:
        return [{"step": 10 * i, "curriculum_factor": 1.0 - 2 * i / 6, "mask_difficulty": d,
                 "mask_difficulty_shuffled": shuffled} for i, d in enumerate([1.0, *difficulty])]

    results["arms"]["clmae"]["0"]["curves"]["probe"] = probe([0.8, 0.9, 0.9, 1.0, 1.2, 1.4], 0.9)
    results["arms"]["clmae"]["1"]["curves"]["probe"] = probe([0.6, 0.7, 0.9, 1.0, 1.0, 1.2], float("nan"))
    table = summary.masks_table(results).splitlines()
    assert len(table) == 2 + 3 and not any(line.startswith("| mae") for line in table)
    # thirds: seed 0 (0.85, 0.95, 1.30), seed 1 (0.65, 0.95, 1.10); λ of the thirds +0.50, -0.17, -0.83 on both.
    assert table[2] == "| clmae | first third | +0.50 | 0.75 ± 0.14 | 0.90 | 2 |"
    assert table[3] == "| clmae | middle third | -0.17 | 0.95 ± 0.00 | 0.90 | 2 |"
    assert table[4] == "| clmae | last third | -0.83 | 1.20 ± 0.14 | 0.90 | 2 |"
    markdown = summary.write_summary({**results, "command": "run.py", "commit": "0" * 40, "seeds": [0, 1]}, tmp_path)
    assert "## Masks during pretraining" in markdown and table[2] in markdown
    del results["arms"]["clmae"]
    assert summary.masks_table(results) == ""


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
