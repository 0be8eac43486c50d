"""Evaluation you can trust: damaged weights refused, one checkpoint file per report, reports that say
what was evaluated, `eval all` with shared features, comparisons that cannot mislead, the Python API,
other resolutions, and k-NN / linear-probe numerics."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import clmae
from clmae.cli.app import main
from clmae.config import make_config
from clmae.errors import CheckpointError, ConfigError
from clmae.evaluation.protocols import knn_class_scores, linear_probe_metrics
from clmae.evaluation.runner import EvalOptions, prepare, run_protocols
from clmae.io.checkpoint import file_sha256, load_checkpoint, load_pretrained, read_training_state, weights_file
from clmae.models.mae import MaskedAutoencoderViT, create_model
from clmae.train.trainer import Trainer, pretrain

REPO = Path(__file__).resolve().parents[1]
TENSOR = "mae.blocks.0.attn.qkv.weight"


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> Path:
    """A tiny finished digits run (1 epoch); tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("trusted") / "run"
    pretrain(data="digits", epochs=1, subset=256, batch_size=64, output_dir=str(out), progress=False, probe_every=0,
             snapshot_every=0)
    return out


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("eval-*", "features", "compare.*"))
    return dest


def opts(**kw) -> EvalOptions:
    return EvalOptions(**{"progress": False, "num_workers": 0, "feature_cache": False, **kw})


def poison(run: Path, tensor: str = TENSOR) -> None:
    """Put one NaN into ``tensor`` of both checkpoint files (the pair stays consistent)."""
    st = run / "checkpoint-last.safetensors"
    with safe_open(str(st), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors[tensor][0, 0] = float("nan")
    save_file(tensors, str(st), metadata=meta)
    pt = run / "checkpoint-last.pt"
    state = torch.load(pt, weights_only=True)
    state["weights"][tensor][0, 0] = float("nan")
    torch.save(state, pt)


# ---------------------------------------------------------------------------------------------
# 1. Weights checked on load


def test_nan_checkpoint_is_refused_by_every_command(run, tmp_path, capsys):
    bad = copy_run(run, tmp_path / "bad")
    poison(bad)
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(bad), "--data", "digits", "--no-progress",
                 "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"checkpoint-last\.safetensors: tensor '{re.escape(TENSOR)}' holds 1 non-finite value", err)
    assert err.count("\n") == 1 and not list(bad.glob("eval-*.json"))

    target = tmp_path / "exports" / "timm"
    assert main(["export", "--checkpoint", str(bad), "--format", "timm", "--output", str(target)]) == 2
    assert TENSOR in capsys.readouterr().err
    assert not (tmp_path / "exports").exists()  # not even the parent folder it would have made

    for path in (bad, bad / "checkpoint-last.pt"):
        with pytest.raises(CheckpointError, match=f"{re.escape(path.name if path.suffix else 'safetensors')}.*"
                                                  f"{re.escape(TENSOR)}.*NaN"):
            load_pretrained(path)
    assert main(["visualize", "--checkpoint", str(bad), "--output", str(tmp_path / "v.png")]) == 2
    assert TENSOR in capsys.readouterr().err and not (tmp_path / "v.png").exists()

    # --resume reads the .pt; --init-from the folder's file
    assert main(["pretrain", "--resume", str(bad), "--no-progress"]) == 2
    assert f"checkpoint-last.pt: tensor '{TENSOR}'" in capsys.readouterr().err
    assert main(["pretrain", "--data", "digits", "--init-from", str(bad), "--output-dir", str(tmp_path / "new"),
                 "--epochs", "1", "--subset", "64", "--no-progress", "--probe-every", "0"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-last.safetensors: tensor 'blocks.0.attn.qkv.weight' holds 1 non-finite" in err


def test_nan_in_optimizer_state_is_refused_on_resume(run, tmp_path):
    bad = copy_run(run, tmp_path / "bad")
    state = read_training_state(bad / "checkpoint-last.pt")
    first = next(iter(state["opt_mae"]["state"].values()))
    first["exp_avg_sq"].view(-1)[0] = float("inf")
    torch.save(state, bad / "checkpoint-last.pt")
    load_pretrained(bad / "checkpoint-last.pt")  # the weights themselves are fine
    with pytest.raises(CheckpointError, match=r"opt_mae\.\d+\.exp_avg_sq' holds 1 non-finite"):
        Trainer(make_config({"data": "digits", "subset": 256, "batch_size": 64, "epochs": 2, "resume": str(bad),
                             "progress": False, "probe_every": 0}), overrides={"epochs": 2, "resume": str(bad)})


# ---------------------------------------------------------------------------------------------
# 2 + 3. One file per report; reports say exactly what was evaluated


def test_torn_pair_report_takes_everything_from_the_newer_file(tmp_path, monkeypatch):
    """Killed between the two files of epoch 2 of 3: the report's sha256, position and weights are the .pt's."""
    import clmae.train.run_folder as run_folder_module

    class Killed(BaseException):
        pass

    real, calls = run_folder_module.save_weights, {"n": 0}

    def save_weights(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed
        return real(*args, **kwargs)

    run = tmp_path / "torn"
    monkeypatch.setattr(run_folder_module, "save_weights", save_weights)
    with pytest.raises(Killed):
        pretrain(data="digits", epochs=3, subset=128, batch_size=64, output_dir=str(run), progress=False,
                 probe_every=0, snapshot_every=0)
    monkeypatch.undo()
    pt, st = run / "checkpoint-last.pt", run / "checkpoint-last.safetensors"
    assert weights_file(run) == pt

    setup = prepare(run, "digits", options=opts(max_train=200, max_test=50))
    report = run_protocols(setup, {"knn": None})["knn"]
    assert report["checkpoint_file"] == str(pt)
    assert report["checkpoint_sha256"] == file_sha256(pt) != file_sha256(st)
    assert report["pretrain_epochs"] == 2 and report["pretrain"]["epochs_planned"] == 3
    assert report["pretrain"]["interrupted"] is True
    state = read_training_state(pt)["weights"]
    model = setup.encoders[0].model
    assert all(torch.equal(v, state[f"mae.{k}"]) for k, v in model.state_dict().items())
    assert report["model"] == read_training_state(pt)["run_config"]["model"]
    # export, visualize and load_pretrained read the same file
    loaded = load_checkpoint(run)
    assert loaded.file == pt and loaded.sha256 == report["checkpoint_sha256"] and loaded.position["epoch"] == 2


def test_report_says_exactly_what_was_evaluated(run, tmp_path):
    setup = prepare(run, "digits", options=opts(max_train=300, max_test=100, seed=3, pool="mean"))
    report = run_protocols(setup, {"knn": None})["knn"]
    st = run / "checkpoint-last.safetensors"
    assert report["checkpoint_file"] == str(st) and report["checkpoint_sha256"] == file_sha256(st)
    assert report["pretrain"] == {"epochs_completed": 1, "epochs_planned": 1, "interrupted": False,
                                  "step_in_epoch": 0, "iteration": 4, "img_size": 8}
    d = report["data"]
    assert (d["train_size"], d["test_size"], d["train_total"], d["test_total"]) == (300, 100, 1437, 360)
    assert d["train_subset_seed"] == 3 and d["test_subset_seed"] == 3 and len(d["train_subset_digest"]) == 12
    assert report["features"] == {"pool": "mean", "img_size": 8, "pretrain_img_size": 8}
    assert report["random_init"]["seed"] == 0 and len(report["random_init"]["architecture"]) == 16


def test_stopped_run_reports_epochs_done_not_planned(tmp_path, capsys, stop_after_first_epoch):
    out = tmp_path / "stopped"
    trainer = Trainer(make_config({"data": "digits", "subset": 128, "batch_size": 64, "epochs": 3, "progress": False,
                                   "probe_every": 0, "snapshot_every": 0, "output_dir": str(out)}))
    trainer.callbacks.append(stop_after_first_epoch)
    trainer.fit()
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(out), "--max-train", "200", "--max-test", "50", "--no-progress",
                 "--num-workers", "0", "--no-feature-cache"]) == 0
    assert "saved after 1 of 3 pretraining epochs" in capsys.readouterr().err
    report = json.loads((out / "eval-knn-digits.json").read_text())
    assert report["pretrain_epochs"] == 1 and report["pretrain"]["epochs_planned"] == 3
    assert report["pretrain"]["interrupted"] is True


# ---------------------------------------------------------------------------------------------
# 4. eval all: one extraction per encoder, features cached on disk


def test_eval_all_extracts_features_once_per_encoder_and_reuses_the_cache(run, tmp_path, monkeypatch, capsys):
    run = copy_run(run, tmp_path / "run")
    calls: dict[int, int] = {}
    original = MaskedAutoencoderViT.forward_features

    def counting(self, imgs, pool="cls"):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return original(self, imgs, pool)

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_features", counting)
    args = ["eval", "all", "--checkpoint", str(run), "--data", "digits", "--max-train", "300", "--max-test", "100",
            "--extract-batch-size", "128", "--no-progress", "--num-workers", "0", "--linear-min-steps", "100",
            "--fewshot-steps", "30", "--fewshot-draws", "2"]
    assert main(args) == 0
    # 300 train images in 3 batches + 100 test images in 1, for each of the two encoders, for all three protocols
    assert sorted(calls.values()) == [4, 4]
    reports = {p: json.loads((run / f"eval-{p}-digits.json").read_text()) for p in ("knn", "linear", "fewshot")}
    assert {r["protocol"] for r in reports.values()} == {"knn", "linear", "fewshot"}
    summary = (run / "eval-summary-digits.md").read_text()
    assert "| linear | linear_top1 |" in summary and "300 train / 100 test" in summary
    assert capsys.readouterr().out.startswith("| protocol | metric | pretrained | random init |")
    cached = sorted(p.name for p in (run / "features").iterdir())
    assert len(cached) == 4 and all(name.endswith(".pt") for name in cached)

    # A new command (its own memory): the files are reused, no forward pass, the same numbers.
    calls.clear()
    assert main(args) == 0
    assert calls == {}
    again = json.loads((run / "eval-knn-digits.json").read_text())
    assert again["results"] == reports["knn"]["results"]
    assert any(k.endswith("_cached") for k in again["timings"])

    # Other pooling or subset: other features. A damaged cache file: recomputed, not trusted.
    victim = run / "features" / cached[0]
    victim.write_bytes(victim.read_bytes()[:100])
    assert main(args) == 0 and sum(calls.values()) == 1  # only the damaged split, one batch of 100 test images
    calls.clear()
    assert main(args + ["--pool", "mean"]) == 0 and sorted(calls.values()) == [4, 4]
    assert len(list((run / "features").iterdir())) == 8


def test_feature_cache_refuses_pickled_code(run, tmp_path):
    from clmae.evaluation.features import read_cached

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    f = tmp_path / "features.pt"
    torch.save({"format": "clmae-features-v1", "key": "k", "features": Evil()}, f)
    assert read_cached(f, ("k",)) is None and not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------
# 5. compare that cannot mislead


def knn_report(run: Path, out: Path, **options) -> Path:
    clmae.evaluate("knn", run, "digits", output=out, progress=False, num_workers=0, feature_cache=False, **options)
    return out


def test_compare_refuses_reports_of_different_test_subsets(run, tmp_path, capsys, monkeypatch):
    a = knn_report(run, tmp_path / "a" / "eval-knn-digits.json", max_test=100)
    b = knn_report(run, tmp_path / "b" / "eval-knn-digits.json", max_test=200)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test size: 100 in" in err and "200 in" in err and "--allow-mismatch" in err
    assert not list(tmp_path.rglob("compare.*"))

    assert main(["compare", str(a), str(b), "--allow-mismatch"]) == 0
    out = capsys.readouterr().out
    assert "not evaluated the same way" in out and "test size: 100 in" in out
    md = (tmp_path / "a" / "compare.md").read_text()  # beside the first report, not in the current folder
    assert "[test size 100]" in md and "[test size 200]" in md and "| train | test |" in md
    assert not (tmp_path / "compare.md").exists() and (tmp_path / "a" / "compare.png").is_file()
    assert main(["compare", str(a), str(b), "--allow-mismatch", "--output-dir", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "compare.md").is_file()


def test_compare_keeps_a_random_init_row_per_run_unless_provably_the_same(run, tmp_path):
    from clmae.evaluation.compare import comparison_table

    base = json.loads(knn_report(run, tmp_path / "base.json", max_train=300, max_test=100).read_text())

    def variant(name: str, sha: str, random_init, results) -> Path:
        path = tmp_path / name / "eval-knn-digits.json"
        path.parent.mkdir()
        rep = {**base, "checkpoint": str(path.parent), "checkpoint_sha256": sha, "random_init": random_init}
        rep["results"] = {"pretrained": base["results"]["pretrained"], "random_init": results}
        path.write_text(json.dumps(rep))
        return path

    same = variant("x", "1" * 64, base["random_init"], base["results"]["random_init"])
    other_seed = variant("y", "2" * 64, {**base["random_init"], "seed": 7}, {"knn_majority_top1": 12.5})
    legacy = variant("z", "3" * 64, None, {"knn_majority_top1": 11.0})
    table = comparison_table([tmp_path / "base.json", same, other_seed, legacy])
    randoms = [r for r in table.rows if r.startswith("random init")]
    assert len([r for r in table.rows if not r.startswith("random init")]) == 4
    assert randoms == ["random init (vit_micro_patch2_8, seed 0)", "random init (vit_micro_patch2_8, seed 7)",
                       "random init of z (clmae)"]
    assert table.values[(randoms[1], "knn_majority_top1")][0] == 12.5
    assert table.sizes[randoms[0]] == (300, 100)
    # One random encoder, but two reports disagreeing about its accuracy: refused, not one of them kept.
    clash = variant("w", "4" * 64, base["random_init"], {**base["results"]["random_init"], "knn_majority_top1": 1.0})
    with pytest.raises(ConfigError, match="two values for random init"):
        comparison_table([tmp_path / "base.json", clash])


# ---------------------------------------------------------------------------------------------
# 6. Python API parity


def test_python_api_writes_the_report_like_the_cli(run, tmp_path, capsys):
    run = copy_run(run, tmp_path / "run")
    assert clmae.EvalOptions is EvalOptions
    report = clmae.evaluate("knn", run, "digits", max_train=300, max_test=100, progress=False, num_workers=0,
                            k_majority=3)
    saved = json.loads((run / "eval-knn-digits.json").read_text())
    assert saved["results"] == report["results"] and saved["data"]["train_size"] == 300
    assert saved["hyperparameters"]["k_majority"] == 3 and saved["options"]["max_test"] == 100
    os.unlink(run / "eval-knn-digits.json")
    clmae.evaluate("knn", run, "digits", max_train=300, max_test=100, progress=False, write=False)
    assert not (run / "eval-knn-digits.json").exists()
    names = {f.name for f in dataclasses.fields(EvalOptions)}
    for protocol in ("knn", "linear", "fewshot", "finetune"):  # one keyword, one meaning
        assert not names & {f.name for f in dataclasses.fields(clmae.evaluation.runner.config_class(protocol))}
    with pytest.raises(ConfigError, match="unknown option.*max_trian"):
        clmae.evaluate("knn", run, "digits", max_trian=300)
    with pytest.raises(ConfigError, match="--max-train"):
        clmae.evaluate("knn", run, "digits", max_train=0)
    reports = clmae.evaluate_all(run, "digits", protocols=("knn", "linear"), max_train=300, max_test=100,
                                 progress=False, configs={"linear": {"min_steps": 50}})
    assert set(reports) == {"knn", "linear"} and (run / "eval-summary-digits.md").is_file()


def test_documented_snippets_run(run, tmp_path, monkeypatch):
    """Every ```python block of docs/evaluation.md runs as written, in a folder holding runs/digits."""
    copy_run(run, tmp_path / "runs" / "digits")
    monkeypatch.chdir(tmp_path)
    text = (REPO / "docs" / "evaluation.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/evaluation.md", "exec"), namespace)  # our own documentation
    assert (tmp_path / "runs" / "digits" / "eval-knn-digits.json").is_file()


def test_long_evaluations_announce_their_estimate_first(run, capsys, monkeypatch):
    import clmae.evaluation.runner as ev

    setup = prepare(run, "digits", options=opts(max_train=300, max_test=100))
    assert ev.estimate_seconds(setup, {"knn": None}) is None  # surely short: not even timed
    rate = ev.measure_throughput(setup.encoders[0].model, setup)
    assert 0 < rate < float("inf")
    monkeypatch.setattr(ev, "SLOWEST_FLOPS", 0.0)  # pretend every evaluation could be long: time it
    monkeypatch.setattr(ev, "measure_throughput", lambda model, s: 1.0)  # and a slow machine
    capsys.readouterr()
    run_protocols(setup, {"knn": None})
    err = capsys.readouterr().err
    # 2 encoders x 400 images at 1 img/s
    assert "this evaluation will take about 13 min: 800 image passes" in err and "--max-train N --max-test N" in err


# ---------------------------------------------------------------------------------------------
# 7. Any resolution


def test_a_32px_checkpoint_evaluates_at_48_and_64_px(tmp_path):
    out = tmp_path / "run32"
    pretrain(data="digits", model="vit_micro_patch2_8", img_size=32, patch_size=8, epochs=1, subset=256,
             batch_size=64, output_dir=str(out), progress=False, probe_every=0, snapshot_every=0)
    for size in (48, 64):
        setup = prepare(out, "digits", options=opts(img_size=size, max_train=500, max_test=200))
        assert setup.img_size == size and setup.encoders[0].model.config.num_patches == (size // 8) ** 2
        feats, _ = setup.features(setup.encoders[0], setup.test)
        assert torch.isfinite(feats).all()
        report = run_protocols(setup, {"knn": None})["knn"]
        assert report["features"] == {"pool": "cls", "img_size": size, "pretrain_img_size": 32}
        assert report["results"]["pretrained"]["knn_majority_top1"] > 40.0  # chance: 10
    setup = prepare(out, "digits", options=opts(img_size=48, max_train=500, max_test=200, random_reference=False))
    config = clmae.evaluation.runner.protocol_config("finetune", epochs=3, warmup_epochs=0.5, crop_scale=1.0,
                                                     flip=False)
    tuned = run_protocols(setup, {"finetune": config})["finetune"]
    assert tuned["features"]["img_size"] == 48
    # 24 steps from a 1-epoch encoder: measured 9.5 -> 19.5 at 48 px (27.5 at the pretraining size, 32 px)
    assert tuned["results"]["pretrained"]["finetune_top1"] > tuned["details"]["pretrained"]["before_top1"] + 5.0
    with pytest.raises(ConfigError, match="--img-size: got 50, expected a multiple of the checkpoint's patch size 8"):
        prepare(out, "digits", options=opts(img_size=50))


def test_resampled_encoder_matches_timm_resampling_and_loads_strictly(run, tmp_path):
    import timm
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    assert main(["export", "--checkpoint", str(run), "--format", "timm", "--output", str(tmp_path / "at8")]) == 0
    assert main(["export", "--checkpoint", str(run), "--format", "timm", "--output", str(tmp_path / "at16"),
                 "--img-size", "16"]) == 0
    pos8 = load_file(str(tmp_path / "at8" / "model.safetensors"))["pos_embed"]
    pos16 = load_file(str(tmp_path / "at16" / "model.safetensors"))["pos_embed"]
    assert pos16.shape == (1, 1 + 8 * 8, 64)
    assert torch.equal(pos16, resample_abs_pos_embed(pos8, [8, 8], num_prefix_tokens=1))
    cfg = json.loads((tmp_path / "at16" / "config.json").read_text())
    assert cfg["model_args"]["img_size"] == 16 and cfg["pretrained_cfg"]["input_size"] == [1, 16, 16]
    model = timm.create_model(f"local-dir:{tmp_path / 'at16'}", pretrained=True).eval()  # strict load
    ours = load_pretrained(run, img_size=16)[0]
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[:, 0], ours.forward_features(x), rtol=1e-5, atol=1e-5)


def test_model_at_another_size_keeps_its_weights_and_the_callers_rng():
    mae = create_model("vit_micro_patch2_8").eval()
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    bigger = mae.at_img_size(16)
    assert torch.equal(torch.rand(1), expected)
    assert bigger.config.img_size == 16 and bigger.config.pos_embed_grid == 4 and mae.at_img_size(8) is mae
    assert all(torch.equal(a, b) for a, b in zip(mae.state_dict().values(), bigger.state_dict().values()))
    back = bigger.at_img_size(8)  # resampled from the pretraining grid, not from the resampled one
    assert torch.equal(back.pos_embed, mae.pos_embed) and back.config.pos_embed_grid == 4


# ---------------------------------------------------------------------------------------------
# 8. Numerics


def test_euclidean_knn_does_not_depend_on_a_constant_offset():
    """Features on a 2^-10 grid, so that adding 500 is exact in float32: only the k-NN could change.

    With the former float32 shortcut (2 q·t − ‖t‖² on raw features) 304 of these 500 predictions
    changed; now none does, and the neighbours are those of exact distances.
    """
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 64, generator=g)
    y = torch.arange(10).repeat(150)
    x = 0.1 * (centers[y] + 1.5 * torch.randn(len(y), 64, generator=g))
    x = torch.round(x * 1024) / 1024
    xtr, ytr, xte = x[:1000], y[:1000], x[1000:]
    assert torch.equal((xte + 500) - 500, xte) and torch.equal((xtr + 500) - 500, xtr)
    plain = knn_class_scores(xtr, ytr, xte, 10, 5, "euclidean")
    shifted = knn_class_scores(xtr + 500, ytr, xte + 500, 10, 5, "euclidean")
    assert len(xte) == 500 and torch.equal(plain.argmax(1), shifted.argmax(1))
    nearest = torch.cdist(xte.double(), xtr.double()).argsort(dim=1, stable=True)[:, :5]
    exact = torch.zeros(500, 10).scatter_add_(1, ytr[nearest], torch.ones(500, 5))
    bonus = ((5 - torch.arange(5.0)) / 6).expand(500, 5).contiguous()
    exact += torch.zeros(500, 10).scatter_reduce_(1, ytr[nearest], bonus, reduce="amax", include_self=True)
    torch.testing.assert_close(plain, exact, rtol=0, atol=1e-6)


def test_linear_probe_comes_within_a_point_of_logistic_regression(run):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    setup = prepare(run, "digits", options=opts(random_reference=False))
    xtr, ytr = setup.features(setup.encoders[0], setup.train)
    xte, yte = setup.features(setup.encoders[0], setup.test)
    metrics, details = linear_probe_metrics(xtr, ytr, xte, yte, 10)
    with threadpool_limits(1):
        scaler = StandardScaler().fit(xtr.numpy())
        reference = LogisticRegression(max_iter=5000).fit(scaler.transform(xtr.numpy()), ytr.numpy())
        sklearn_top1 = 100.0 * float((reference.predict(scaler.transform(xte.numpy())) == yte.numpy()).mean())
    assert details["steps"] == 1000  # digits: 6 batches an epoch, so the step floor decides
    assert metrics["linear_top1"] >= sklearn_top1 - 1.0, (metrics, sklearn_top1)


# ---------------------------------------------------------------------------------------------
# Export: staged, readable, and precise about what differs


def test_failed_export_leaves_nothing_and_says_what_differs(run, tmp_path, monkeypatch):
    import clmae.io.export as export

    target = tmp_path / "out" / "timm"
    real = export.timm_state_dict

    def off_by_a_bit(mae):
        state = real(mae)
        state["norm.weight"] = state["norm.weight"] + 1.0
        return state

    monkeypatch.setattr(export, "timm_state_dict", off_by_a_bit)
    with pytest.raises(CheckpointError, match="CLS features differ from clmae's by up to .*nothing was exported"):
        export.export_timm(run, target)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    result = export.export_timm(run, target)
    assert "timm CLS features match" in result.verified
    mode = 0o666 & ~_umask()
    for f in (target / "model.safetensors", target / "config.json"):
        assert stat.S_IMODE(f.stat().st_mode) == mode
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["timm"]  # no temporary folder left
    # Into an existing folder with other files: they stay, the export's files are replaced.
    (target / "README.md").write_text("mine")
    export.export_hf(run, target, overwrite=True)
    assert (target / "README.md").read_text() == "mine" and (target / "preprocessor_config.json").is_file()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
