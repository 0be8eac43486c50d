"""Evaluation protocols: hand-checked k-NN, probes, few-shot draws, fine-tuning, bad inputs, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clmae.cli.app import main
from clmae.errors import CheckpointError, ConfigError, DataError
from clmae.evaluation.compare import compare, format_markdown
from clmae.evaluation.protocols import (
    FewShotConfig,
    LinearConfig,
    fewshot_metrics,
    knn_class_scores,
    knn_metrics,
    linear_probe_metrics,
    sample_support,
    topk_accuracy,
)
from clmae.evaluation.runner import (
    EvalOptions,
    evaluate,
    prepare,
    protocol_config,
    quick_knn,
    run_protocol,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    from clmae.train.trainer import pretrain

    out = tmp_path_factory.mktemp("eval") / "run"
    pretrain(data="digits", epochs=1, subset=512, batch_size=64, output_dir=str(out), progress=False,
             probe_every=0, snapshot_every=0)
    return out


def opts(**kw) -> EvalOptions:
    return EvalOptions(**{"progress": False, "num_workers": 0, **kw})


# ---------------------------------------------------------------------------------------------
# k-NN by hand


def test_majority_knn_matches_hand_computation_including_ties():
    # 1-D features. Classes A=0, B=1, C=2.
    train = torch.tensor([[0.0], [0.9], [1.1], [2.0], [5.0], [100.0], [101.0]])
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 2])
    queries = torch.tensor([[1.02], [0.97], [60.0]])
    scores = knn_class_scores(train, labels, queries, 3, k=5, metric="euclidean")
    # q=1.02: neighbours by distance 1.1(A) .9(B) 2.0(B) 0.0(A) 5.0(C): votes A2 B2 C1, tie A/B → A
    # (its nearest member ranks first). Tie bonus (k - rank)/(k + 1) of each class's best rank.
    assert torch.allclose(scores[0], torch.tensor([2 + 5 / 6, 2 + 4 / 6, 1 + 1 / 6]))
    # q=0.97: .9(B) 1.1(A) 0.0(A) 2.0(B) 5.0(C): same votes, tie now goes to B.
    assert torch.allclose(scores[1], torch.tensor([2 + 4 / 6, 2 + 5 / 6, 1 + 1 / 6]))
    # q=60: 100(C) 101(C) 5(C) 2.0(B) 1.1(A): C wins 3 votes to 1 each.
    assert torch.allclose(scores[2], torch.tensor([1 + 1 / 6, 1 + 2 / 6, 3 + 5 / 6]))
    assert scores.argmax(1).tolist() == [0, 1, 2]
    # Chunking changes nothing.
    assert torch.equal(scores, knn_class_scores(train, labels, queries, 3, 5, "euclidean", chunk_size=1))


def test_weighted_cosine_knn_matches_hand_computation():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[1.0, 0.1]])
    norm = math.hypot(1.0, 0.1)
    sims = [1.0 / norm, 0.86 / norm, 0.68 / norm]  # the 3 most similar; (-1, 0) is excluded by k=3
    for t in (0.07, 1.0):
        w = [math.exp(s / t) for s in sims]
        scores = knn_class_scores(train, labels, q, 3, k=3, metric="cosine", temperature=t)
        expected = torch.tensor([[w[0], w[1] + w[2], 0.0]])
        assert torch.allclose(scores, expected, rtol=1e-4)
    # At T=0.07 the single closest neighbour outweighs two farther ones; at T=1 it does not;
    # the plain majority vote (Euclidean) picks the class with two votes.
    assert knn_class_scores(train, labels, q, 3, 3, "cosine", 0.07).argmax().item() == 0
    assert knn_class_scores(train, labels, q, 3, 3, "cosine", 1.0).argmax().item() == 1
    assert knn_class_scores(train, labels, q, 3, 3, "euclidean").argmax().item() == 1
    # Cosine ignores the scale of the features.
    assert torch.allclose(knn_class_scores(train * 7, labels, q * 0.1, 3, 3, "cosine"),
                          knn_class_scores(train, labels, q, 3, 3, "cosine"), rtol=1e-4)


def test_knn_metrics_and_top5_only_with_more_than_five_classes():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert topk_accuracy(scores, torch.tensor([1, 2]), "x") == {"x_top1": 50.0}
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 16, generator=g) * 10
    y = torch.arange(8).repeat(20)
    x = centers[y] + torch.randn(len(y), 16, generator=g)
    m = knn_metrics(x, y, x[:40] + 0.01, y[:40], 8)
    assert set(m) == {"knn_majority_top1", "knn_majority_top5", "knn_weighted_top1", "knn_weighted_top5"}
    assert m["knn_majority_top1"] == 100.0 and m["knn_weighted_top1"] == 100.0


# ---------------------------------------------------------------------------------------------
# Linear probe and few-shot


def blobs(n_per_class: int, classes: int = 4, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 4
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centers[y] + torch.randn(len(y), dim, generator=g)
    return x * 1000 + 50, y  # far from unit scale: the batch norm must handle it


def test_linear_probe_reaches_100_percent_on_separable_features():
    x, y = blobs(60)
    xt, yt = blobs(25, seed=0)
    metrics, details = linear_probe_metrics(x, y, xt + 10, yt, 4, LinearConfig(epochs=10, lrs=(1e-2, 1e-4)))
    assert metrics["linear_top1"] >= 99.0
    assert set(details["val_top1_by_lr"]) == {"0.01", "0.0001"}
    assert details["val_size"] == 24 and details["train_size"] == 216


def test_fewshot_support_has_n_per_class_and_differs_between_draws():
    labels = torch.tensor([0] * 12 + [1] * 7 + [2] * 9)
    draws = []
    for d in range(4):
        idx = sample_support(labels, 5, torch.Generator().manual_seed(d))
        assert len(idx) == 15 and len(set(idx.tolist())) == 15
        assert torch.bincount(labels[idx]).tolist() == [5, 5, 5]
        draws.append(frozenset(idx.tolist()))
    assert len(set(draws)) == 4
    with pytest.raises(ConfigError, match="class 1 has only 7"):
        sample_support(labels, 8, torch.Generator())


def test_fewshot_metrics_mean_and_std_over_draws():
    x, y = blobs(20)
    metrics, details = fewshot_metrics(x, y, x, y, 4, FewShotConfig(shots=(1, 3), draws=5, steps=50))
    assert set(metrics) == {"fewshot_1shot_top1", "fewshot_1shot_top1_std", "fewshot_3shot_top1",
                            "fewshot_3shot_top1_std"}
    per = details["top1_per_draw"]["3shot"]
    assert len(per) == 5 and metrics["fewshot_3shot_top1"] == pytest.approx(float(np.mean(per)))
    assert metrics["fewshot_3shot_top1_std"] == pytest.approx(float(np.std(per)))
    assert metrics["fewshot_3shot_top1"] > 90.0
    with pytest.raises(ConfigError, match="--shots: 21-shot"):
        fewshot_metrics(x, y, x, y, 4, FewShotConfig(shots=(21,)))


# ---------------------------------------------------------------------------------------------
# On a real (tiny) checkpoint


def test_cli_eval_knn_end_to_end(run_dir, tmp_path, capsys):
    out = tmp_path / "knn.json"
    rc = main(["eval", "knn", "--checkpoint", str(run_dir), "--data", "digits", "--output", str(out),
               "--no-progress", "--num-workers", "0"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["protocol"] == "knn" and report["data"]["train_size"] == 1437 and report["data"]["test_size"] == 360
    sha = hashlib.sha256((run_dir / "checkpoint-last.safetensors").read_bytes()).hexdigest()
    assert report["checkpoint_sha256"] == sha
    for role in ("pretrained", "random_init"):
        assert 10.0 < report["results"][role]["knn_majority_top1"] <= 100.0
        assert 0.0 <= report["results"][role]["knn_weighted_top5"] <= 100.0
    assert report["hyperparameters"]["k_majority"] == 5 and report["hyperparameters"]["k_weighted"] == 20
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("random init" in line for line in lines)
    assert any(line.split()[2] == "knn_majority_top1" for line in lines)

    # compare: the report plus a run folder holding a second one
    second = run_dir / "eval-knn-digits.json"
    second.write_text(json.dumps({**report, "label": "copy"}))
    md, png = tmp_path / "t.md", tmp_path / "t.png"
    assert main(["compare", str(out), str(run_dir), "--markdown", str(md), "--plot", str(png)]) == 0
    table = md.read_text()
    assert "knn_majority_top1" in table and "| copy |" in table
    assert table.count("random init (vit_micro_patch2_8, seed 0)") == 1  # one random encoder, one row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    second.unlink()


def test_features_are_extracted_once_and_random_reference_is_the_pretraining_start(run_dir):
    from clmae.models.mae import MaskedAutoencoderViT

    setup = prepare(run_dir, "digits", options=opts(max_train=300, max_test=100))
    assert len(setup.train) == 300 and len(setup.test) == 100
    enc = setup.encoders[1]
    assert enc.role == "random_init"
    torch.manual_seed(setup.run_config["seed"])  # the trainer builds its model right after this
    start = MaskedAutoencoderViT(setup.encoders[0].model.config)
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), enc.model.state_dict().values()))
    calls = []
    original = enc.model.forward_features
    enc.model.forward_features = lambda *a, **k: calls.append(1) or original(*a, **k)
    f1 = setup.features(enc, setup.train)
    n = len(calls)
    f2 = setup.features(enc, setup.train)
    assert n > 0 and len(calls) == n and f1[0] is f2[0]


def test_finetuning_improves_over_the_initial_head(run_dir):
    setup = prepare(run_dir, "digits", options=opts(random_reference=False))
    cfg = protocol_config("finetune", epochs=3, base_lr=4e-3, crop_scale=1.0, flip=False)
    report = run_protocol(setup, "finetune", cfg)
    after = report["results"]["pretrained"]["finetune_top1"]
    before = report["details"]["pretrained"]["before_top1"]
    assert before < 25.0  # a near-zero head: about chance
    assert after > before + 15.0
    assert report["hyperparameters"]["layer_decay"] == 0.75


def test_layer_decay_groups_scale_by_depth(run_dir):
    from clmae.evaluation.finetune import ViTClassifier, layer_decay_groups
    from clmae.io.checkpoint import load_pretrained

    mae, _, _ = load_pretrained(run_dir)
    clf = ViTClassifier(mae, 10, "cls", drop_path=0.2)
    assert not any(n.startswith("encoder.decoder") for n, _ in clf.named_parameters())
    assert clf.encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    groups = layer_decay_groups(clf, 0.05, 0.5)
    depth = len(mae.blocks)
    scales = {g["layer"]: g["lr_scale"] for g in groups}
    assert scales[depth + 1] == 1.0 and scales[1] == 0.5**depth and scales[0] == 0.5 ** (depth + 1)
    head_ids = {id(p) for p in clf.head.parameters()}
    assert all(g["lr_scale"] == 1.0 for g in groups if head_ids & {id(p) for p in g["params"]})


def test_folder_dataset_with_a_corrupt_file(run_dir, tmp_path):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    root = tmp_path / "folder"
    for split, rng in (("train", range(0, 300)), ("val", range(300, 360))):
        for i in rng:
            label = int(bunch.target[i])
            if label > 2:
                continue
            d = root / split / f"class{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((bunch.images[i] * 255 / 16).astype(np.uint8)).save(d / f"{i}.png")
    (root / "train" / "class0" / "broken.png").write_bytes(b"not an image")
    report = evaluate("knn", run_dir, str(root), options=opts(random_reference=False), write=False)
    n_train = sum(1 for p in (root / "train").rglob("*.png"))
    assert report["data"]["num_classes"] == 3 and report["data"]["train_size"] == n_train
    assert report["results"]["pretrained"]["knn_majority_top1"] > 60.0
    assert "knn_majority_top5" not in report["results"]["pretrained"]  # only 3 classes


def test_quick_knn_and_summary_for_make_run(run_dir):
    from clmae.data.datasets import load_dataset
    from clmae.io.checkpoint import load_pretrained

    mae, _, _ = load_pretrained(run_dir)
    train, test = load_dataset("digits", None, "train"), load_dataset("digits", None, "test")
    result = quick_knn(mae, train.subset(500), test, 8, "cpu")
    assert {"knn_top1", "knn_majority_top1", "knn_top5"} <= set(result)
    assert 10.0 < result["knn_top1"] <= 100.0


# ---------------------------------------------------------------------------------------------
# Bad inputs


class Evil:
    def __reduce__(self):
        return (print, ("should never run",))


def test_wrong_checkpoints_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a clmae"):
        prepare(plain, "digits", options=opts())
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        prepare(evil, "digits", options=opts())
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a clmae checkpoint"):
        prepare(foreign, "digits", options=opts())
    other = tmp_path / "model.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="not a clmae checkpoint"):
        prepare(other, "digits", options=opts())


def test_unlabeled_or_mismatched_data_is_refused(run_dir, tmp_path):
    x = np.zeros((20, 8, 8), np.uint8)
    npz = tmp_path / "nolabels.npz"
    np.savez(npz, x_train=x, x_test=x)
    with pytest.raises(DataError, match="has no labels"):
        prepare(run_dir, str(npz), options=opts())
    flat = tmp_path / "flat"
    for split in ("train", "val"):
        (flat / split).mkdir(parents=True)
        Image.fromarray(x[0]).save(flat / split / "a.png")
    with pytest.raises(DataError, match="has no labels"):
        prepare(run_dir, str(flat), options=opts())
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x_train=np.zeros((10, 8, 8, 3), np.uint8), y_train=np.arange(10) % 2,
             x_test=np.zeros((4, 8, 8, 3), np.uint8), y_test=np.arange(4) % 2)
    with pytest.raises(DataError, match="3 channel"):
        prepare(run_dir, str(rgb), options=opts())


def test_cli_errors_are_one_line_and_exit_2(run_dir, tmp_path, capsys):
    rc = main(["eval", "fewshot", "--checkpoint", str(run_dir), "--shots", "1,500", "--no-progress",
               "--output", str(tmp_path / "f.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--shots: 500-shot needs 500 training images per class" in err
    assert not (tmp_path / "f.json").exists()
    rc = main(["eval", "knn", "--checkpoint", str(tmp_path / "missing"), "--no-progress"])
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--k-majority"):
        protocol_config("knn", k_majority=0)
    with pytest.raises(DataError, match="no evaluation reports"):
        compare([tmp_path])
    assert format_markdown  # imported for the API surface


# ---------------------------------------------------------------------------------------------
# What evaluation says, and where (bars only in a terminal, a note below random init), the Python API


def _report(protocol: str, pretrained: dict, random_init: dict, epochs: int = 3) -> dict:
    return {"protocol": protocol, "results": {"pretrained": pretrained, "random_init": random_init},
            "pretrain": {"epochs_completed": epochs, "epochs_planned": 30}}


def test_below_random_init_is_said_in_one_line_with_the_reason_and_what_to_try():
    from clmae.evaluation.results import below_random_init

    knn = _report("knn", {"knn_majority_top1": 50.8, "knn_majority_top5": 99.0, "knn_weighted_top1": 51.0},
                  {"knn_majority_top1": 56.2, "knn_majority_top5": 90.0, "knn_weighted_top1": 55.0})
    linear = _report("linear", {"linear_top1": 70.4}, {"linear_top1": 75.2})
    better = _report("linear", {"linear_top1": 80.0}, {"linear_top1": 75.2})
    line = below_random_init([knn, linear])
    assert line == ("clmae: note: the pretrained encoder is below its own random initialisation (top-1, knn 50.90 vs "
                    "55.60; linear 70.40 vs 75.20): most likely pretraining was too short (3 epochs) to learn more "
                    "than the random features offer; train longer (--epochs, --resume), on more images, or check "
                    "that loss_mae fell (clmae report RUN)")
    assert below_random_init([better]) is None
    assert below_random_init([_report("knn", {"knn_majority_top1": 50.0}, {})]) is None  # no reference: no claim
    fewshot = _report("fewshot", {"fewshot_1shot_top1": 20.0, "fewshot_1shot_top1_std": 9.0},
                      {"fewshot_1shot_top1": 21.0, "fewshot_1shot_top1_std": 0.0})
    assert "fewshot 20.00 vs 21.00" in below_random_init([fewshot, better])


def test_eval_says_below_random_init_exactly_when_its_numbers_are(run_dir, tmp_path, capsys):
    out = tmp_path / "knn.json"
    assert main(["eval", "knn", "--checkpoint", str(run_dir), "--output", str(out), "--no-progress",
                 "--num-workers", "0", "--max-train", "400", "--max-test", "200"]) == 0
    err = capsys.readouterr().err
    res = json.loads(out.read_text())["results"]
    names = [n for n in res["pretrained"] if n.endswith("top1")]
    below = sum(res["pretrained"][n] for n in names) < sum(res["random_init"][n] for n in names)
    assert ("below its own random initialisation" in err) == below, (res, err)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_are_drawn_in_a_terminal_only_cli_and_python(run_dir, tmp_path, capsys, monkeypatch):
    """`eval knn` with its default --progress into a log file, and the Python API off a terminal, print no bar."""
    import clmae

    argv = ["eval", "knn", "--checkpoint", str(run_dir), "--num-workers", "0", "--max-train", "300",
            "--max-test", "100", "--no-feature-cache"]
    assert main([*argv, "--output", str(tmp_path / "a.json")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "features pretrained" not in err, err
    clmae.evaluate("knn", run_dir, max_train=300, max_test=100, num_workers=0, feature_cache=False, write=False)
    err = capsys.readouterr().err
    assert "\r" not in err and "features pretrained" not in err, err
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # the same call in a terminal draws its bars
    clmae.evaluate("knn", run_dir, max_train=300, max_test=100, num_workers=0, feature_cache=False, write=False)
    assert "features pretrained train" in terminal.getvalue()


def test_evaluate_all_through_evaluate_and_the_python_functions_of_every_command(run_dir, tmp_path):
    import clmae

    reports = clmae.evaluate("all", run_dir, protocols=("knn", "fewshot"), configs={"fewshot": {"shots": (1,)}},
                             max_train=300, max_test=100, num_workers=0, progress=False, feature_cache=False)
    assert set(reports) == {"knn", "fewshot"} and reports["fewshot"]["hyperparameters"]["shots"] == (1,)
    assert (run_dir / "eval-knn-digits.json").is_file() and (run_dir / "eval-summary-digits.md").is_file()
    with pytest.raises(ConfigError, match="writes one report per protocol"):
        clmae.evaluate("all", run_dir, output=tmp_path / "x.json")
    with pytest.raises(ConfigError, match="'knn', 'linear', 'fewshot', 'finetune' or 'all'"):
        clmae.evaluate("nearest", run_dir)
    html = clmae.report(run_dir, tmp_path / "report.html")
    assert html == tmp_path / "report.html" and "<html" in html.read_text()
    png = clmae.visualize(run_dir, num_images=2, output=tmp_path / "v.png", device="cpu")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    exported = clmae.export(run_dir, "timm", tmp_path / "timm")
    assert (tmp_path / "timm" / "model.safetensors") in exported.files and "timm" in exported.verified
    table = clmae.compare([run_dir / "eval-knn-digits.json"], markdown=tmp_path / "c.md")
    assert "knn_majority_top1" in (tmp_path / "c.md").read_text() and table is not None
    for name in ("eval-knn-digits.json", "eval-fewshot-digits.json", "eval-summary-digits.md"):
        (run_dir / name).unlink()
