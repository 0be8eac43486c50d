"""Every command's inputs, swept: what cannot work is one line ``clmae: error: …`` and exit code 2 (no
traceback, nothing half-written); what can work runs and is checked.

One table, :data:`CASES`, covers pretrain, eval, visualize, export, compare and report across npz keys, dtypes,
shapes and label kinds, folder layouts, checkpoint files and report files. The behaviours of issue 24 that
need more than one line to check (text labels, channels-first arrays, a flat folder evaluated with
``--holdout``, CIFAR-10 from either of its formats and without a local copy) have tests of their own below.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clmae import cli
from clmae.data.datasets import load_dataset
from clmae.errors import DataError

QUIET = ["--device", "cpu", "--no-progress", "--num-workers", "0"]
TINY = ["--model", "vit_micro_patch2_8", "--epochs", "1", "--batch-size", "16", "--subset", "32", "--probe-every", "0",
        "--snapshot-every", "0", *QUIET]
EVAL = ["--max-train", "48", "--max-test", "16", *QUIET]


def digits(n: int, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` gray images of a bright square at one of 4 places (label = the place), with noise: learnable, tiny."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    h = size // 2
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, r * h:(r + 1) * h, c * h:(c + 1) * h] += 180
    return x, y


def save_images(folder: Path, images: np.ndarray, labels: np.ndarray | None = None, names=None) -> Path:
    """PNG files: one sub-folder per class when ``labels`` are given (named ``names[label]``), else flat."""
    for i, x in enumerate(images):
        target = folder if labels is None else folder / (names or "abcd")[int(labels[i])]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(target / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The files the cases name: npz archives of every kind, folders, a finished run, reports, broken files."""
    d = tmp_path_factory.mktemp("inputs")
    x, y = digits(96)
    xt, yt = digits(32, seed=1)
    np.savez(d / "good.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    np.savez(d / "train_only.npz", x_train=x, y_train=y)
    names = np.array(["circle", "square", "star", "wave"])
    np.savez(d / "text_labels.npz", x_train=x, y_train=names[y], x_test=xt, y_test=names[yt])
    np.savez(d / "channels_first.npz", x_train=np.repeat(x[:, None], 3, 1), y_train=y)
    np.savez(d / "floats.npz", x_train=x / 255.0, y_train=y.astype(np.float32))
    np.savez(d / "bools.npz", x_train=x > 128)
    np.savez(d / "onehot.npz", x_train=x, y_train=np.eye(4, dtype=np.uint8)[y])
    np.savez(d / "other_test_size.npz", x_train=x, y_train=y, x_test=digits(32, size=12, seed=1)[0], y_test=yt)
    np.savez(d / "rgb.npz", x_train=np.repeat(x[..., None], 3, -1), y_train=y, x_test=np.repeat(xt[..., None], 3, -1),
             y_test=yt)
    np.savez(d / "no_x_train.npz", images=x)
    np.savez(d / "flat_pixels.npz", x_train=x.reshape(len(x), -1))
    np.savez(d / "empty.npz", x_train=x[:0])
    np.savez(d / "rgba.npz", x_train=np.zeros((8, 8, 8, 4), np.uint8))
    np.savez(d / "text_pixels.npz", x_train=np.full((8, 8, 8), "a"))
    np.savez(d / "objects.npz", x_train=np.array([x[0], None], dtype=object))
    np.savez(d / "nan.npz", x_train=np.full((8, 8, 8), np.nan, np.float32))
    np.savez(d / "normalised.npz", x_train=(x.astype(np.float32) - 128) / 64)
    np.savez(d / "sixteen_bit.npz", x_train=x.astype(np.uint16) * 16)
    np.savez(d / "label_count.npz", x_train=x, y_train=y[:10])
    np.savez(d / "fractional_labels.npz", x_train=x, y_train=y + 0.5)
    np.savez(d / "mixed_labels.npz", x_train=x, y_train=names[y], x_test=xt, y_test=yt)
    good = (d / "good.npz").read_bytes()
    (d / "truncated.npz").write_bytes(good[: len(good) // 2])
    (d / "not_a_zip.npz").write_text("x_train = [1, 2, 3]\n")
    (d / "notes.txt").write_text("not data")
    (d / "empty_folder").mkdir()
    save_images(d / "flat", x[:40])
    save_images(d / "classes", x[:40], y[:40])
    save_images(d / "split" / "train", x[:40], y[:40])
    save_images(d / "split" / "val", xt[:16], np.where(yt[:16] == 3, 0, yt[:16]))  # no image of class 'd'
    (d / "junk").mkdir()
    for i in range(3):
        (d / "junk" / f"{i}.png").write_bytes(b"\x89PNG but not really" if i else b"")
    run = d / "run"
    assert cli.main(["pretrain", "--data", str(d / "good.npz"), *TINY, "--output-dir", str(run)]) == 0
    assert cli.main(["eval", "knn", "--checkpoint", str(run), *EVAL, "--output", str(d / "knn.json")]) == 0
    assert cli.main(["eval", "knn", "--checkpoint", str(run), *EVAL, "--max-test", "8",
                     "--output", str(d / "knn-8.json")]) == 0
    weights = (run / "checkpoint-last.safetensors").read_bytes()
    (d / "cut.safetensors").write_bytes(weights[: len(weights) // 3])
    (d / "text.safetensors").write_text("not weights")
    (d / "cut.pt").write_bytes((run / "checkpoint-last.pt").read_bytes()[:1000])
    (d / "not_report.json").write_text(json.dumps({"hello": "world"}))
    (d / "broken.json").write_text("{not json")
    (d / "exports").mkdir()
    (d / "exports" / "occupied").mkdir()
    (d / "exports" / "occupied" / "model.safetensors").write_text("an earlier export")
    return d


def out(name: str) -> list[str]:
    return ["--output-dir", f"{{d}}/out-{name}"]


# name: (argv with {d} for the world folder, "ok" or the fragment the one error line must hold)
CASES: dict[str, tuple[list[str], str]] = {
    # pretrain: npz keys, shapes, dtypes, label kinds
    "pretrain npz": (["pretrain", "--data", "{d}/good.npz", *out("good")], "ok"),
    "pretrain npz text labels": (["pretrain", "--data", "{d}/text_labels.npz", *out("text")], "ok"),
    "pretrain npz channels-first": (["pretrain", "--data", "{d}/channels_first.npz", *out("chw")], "ok"),
    "pretrain npz floats 0..1": (["pretrain", "--data", "{d}/floats.npz", *out("floats")], "ok"),
    "pretrain npz bool images": (["pretrain", "--data", "{d}/bools.npz", *out("bools")], "ok"),
    "pretrain npz one-hot labels": (["pretrain", "--data", "{d}/onehot.npz", *out("onehot")], "ok"),
    "pretrain npz no x_train": (["pretrain", "--data", "{d}/no_x_train.npz", *out("e1")], "missing key 'x_train'"),
    "pretrain npz 2-d pixels": (["pretrain", "--data", "{d}/flat_pixels.npz", *out("e2")], "images must have shape"),
    "pretrain npz empty": (["pretrain", "--data", "{d}/empty.npz", *out("e3")], "the image array is empty"),
    "pretrain npz 4 channels": (["pretrain", "--data", "{d}/rgba.npz", *out("e4")], "got (8, 8, 8, 4)"),
    "pretrain npz text pixels": (["pretrain", "--data", "{d}/text_pixels.npz", *out("e5")], "images must be numbers"),
    "pretrain npz pickled objects": (["pretrain", "--data", "{d}/objects.npz", *out("e6")], "pickled Python objects"),
    "pretrain npz NaN": (["pretrain", "--data", "{d}/nan.npz", *out("e7")], "NaN or infinite"),
    "pretrain npz normalised": (["pretrain", "--data", "{d}/normalised.npz", *out("e8")], "outside 0..255"),
    "pretrain npz 16-bit": (["pretrain", "--data", "{d}/sixteen_bit.npz", *out("e9")], "outside 0..255"),
    "pretrain npz label count": (["pretrain", "--data", "{d}/label_count.npz", *out("e10")], "96 images but 10 labels"),
    "pretrain npz fractional labels": (["pretrain", "--data", "{d}/fractional_labels.npz", *out("e11")],
                                       "labels must be whole numbers"),
    "pretrain npz text and number labels": (["pretrain", "--data", "{d}/mixed_labels.npz", *out("e12")],
                                            "'y_test' holds numbers but another split's labels are text"),
    "pretrain npz truncated": (["pretrain", "--data", "{d}/truncated.npz", *out("e13")],
                               "not a readable .npz archive (not a zip file"),
    "pretrain npz not a zip": (["pretrain", "--data", "{d}/not_a_zip.npz", *out("e14")],
                               "not a readable .npz archive (not a zip file"),
    "pretrain npz missing": (["pretrain", "--data", "{d}/missing.npz", *out("e15")], "file not found"),
    # pretrain: paths and folder layouts
    "pretrain no such data": (["pretrain", "--data", "{d}/nothing", *out("e16")], "is not a built-in dataset"),
    "pretrain a text file": (["pretrain", "--data", "{d}/notes.txt", *out("e17")], "is a file"),
    "pretrain empty folder": (["pretrain", "--data", "{d}/empty_folder", *out("e18")], "no images found"),
    "pretrain folder of junk": (["pretrain", "--data", "{d}/junk", *out("e19")], "no readable image among 3 files"),
    "pretrain flat folder": (["pretrain", "--data", "{d}/flat", *out("flat")], "ok"),
    "pretrain class folders": (["pretrain", "--data", "{d}/classes", *out("classes")], "ok"),
    # pretrain: checkpoint files
    "pretrain init-from text": (["pretrain", "--data", "{d}/good.npz", "--init-from", "{d}/notes.txt", *out("e20")],
                                "notes.txt: not a PyTorch checkpoint (neither a zip archive nor a pickle)"),
    "pretrain resume cut .pt": (["pretrain", "--resume", "{d}/cut.pt"],
                                "cut.pt: truncated or corrupt checkpoint (RuntimeError: PytorchStreamReader failed "
                                "reading zip archive: failed finding central directory)"),
    "pretrain one patch": (["pretrain", "--data", "{d}/good.npz", "--img-size", "8", "--patch-size", "8", *out("e21")],
                           "masking needs at least 2x2 patches"),
    # eval: checkpoint files, data kinds, held-out splits
    "eval knn": (["eval", "knn", "--checkpoint", "{d}/run", *EVAL, "--output", "{d}/ok-knn.json"], "ok"),
    "eval knn text labels": (["eval", "knn", "--checkpoint", "{d}/run", "--data", "{d}/text_labels.npz", *EVAL,
                              "--output", "{d}/ok-text.json"], "ok"),
    "eval knn other test size": (["eval", "knn", "--checkpoint", "{d}/run", "--data", "{d}/other_test_size.npz",
                                  *EVAL, "--output", "{d}/ok-size.json"], "ok"),
    "eval knn holdout npz": (["eval", "knn", "--checkpoint", "{d}/run", "--data", "{d}/train_only.npz",
                              "--holdout", "0.25", *EVAL, "--output", "{d}/ok-holdout.json"], "ok"),
    "eval knn holdout folder": (["eval", "knn", "--checkpoint", "{d}/run", "--data", "{d}/classes", "--holdout", "0.2",
                                 *EVAL, "--output", "{d}/ok-folder.json"], "ok"),
    "eval knn no held-out split": (["eval", "knn", "--checkpoint", "{d}/run", "--data", "{d}/classes", *EVAL,
                                    "--output", "{d}/e1.json"], "no held-out split; or pass --holdout 0.1"),
    "eval knn npz without x_test": (["eval", "knn", "--checkpoint", "{d}/run", "--data", "{d}/train_only.npz", *EVAL,
                                     "--output", "{d}/e2.json"], "or pass --holdout 0.1"),
    "eval knn holdout with a test split": (["eval", "knn", "--checkpoint", "{d}/run", "--holdout", "0.1", *EVAL,
                                            "--output", "{d}/e3.json"], "has a held-out split of its own"),
    "eval knn holdout out of range": (["eval", "knn", "--checkpoint", "{d}/run", "--data", "{d}/classes",
                                       "--holdout", "1.5", *EVAL, "--output", "{d}/e4.json"],
                                      "strictly between 0 and 1"),
    "eval knn val missing a class": (["eval", "knn", "--checkpoint", "{d}/run", "--data", "{d}/split", *EVAL,
                                      "--output", "{d}/e5.json"], "the held-out folder lacks 'd'"),
    "eval knn unlabeled folder": (["eval", "knn", "--checkpoint", "{d}/run", "--data", "{d}/flat", "--holdout", "0.2",
                                   *EVAL, "--output", "{d}/e6.json"], "has no labels"),
    "eval knn wrong channels": (["eval", "knn", "--checkpoint", "{d}/run", "--data", "{d}/rgb.npz", *EVAL,
                                 "--output", "{d}/e7.json"], "3 channel(s) but the checkpoint's model takes 1"),
    "eval knn missing checkpoint": (["eval", "knn", "--checkpoint", "{d}/nothing", *EVAL, "--output", "{d}/e8.json"],
                                    "checkpoint not found"),
    "eval knn cut safetensors": (["eval", "knn", "--checkpoint", "{d}/cut.safetensors", *EVAL,
                                  "--output", "{d}/e9.json"], "cut.safetensors"),
    "eval knn text as safetensors": (["eval", "knn", "--checkpoint", "{d}/text.safetensors", *EVAL,
                                      "--output", "{d}/e10.json"], "text.safetensors"),
    # visualize
    "visualize": (["visualize", "--checkpoint", "{d}/run", "--num-images", "2", "--device", "cpu",
                   "--output", "{d}/vis.png"], "ok"),
    "visualize no images": (["visualize", "--checkpoint", "{d}/run", "--num-images", "0", "--output", "{d}/v1.png"],
                            "--num-images: got 0"),
    "visualize no test split": (["visualize", "--checkpoint", "{d}/run", "--data", "{d}/train_only.npz",
                                 "--output", "{d}/v2.png"], "(or pass --split train)"),
    "visualize cut checkpoint": (["visualize", "--checkpoint", "{d}/cut.safetensors", "--output", "{d}/v3.png"],
                                 "cut.safetensors"),
    # export
    "export timm": (["export", "--checkpoint", "{d}/run", "--format", "timm", "--output", "{d}/exports/timm"], "ok"),
    "export occupied folder": (["export", "--checkpoint", "{d}/run", "--format", "hf",
                                "--output", "{d}/exports/occupied"], "--overwrite"),
    "export cut checkpoint": (["export", "--checkpoint", "{d}/cut.safetensors", "--format", "timm",
                               "--output", "{d}/exports/x1"], "cut.safetensors"),
    "export indivisible size": (["export", "--checkpoint", "{d}/run", "--format", "timm", "--img-size", "7",
                                 "--output", "{d}/exports/x2"], "7"),
    # compare and report
    "compare": (["compare", "{d}/knn.json", "{d}/ok-knn.json", "--output-dir", "{d}/cmp"], "ok"),
    "compare evaluated differently": (["compare", "{d}/knn.json", "{d}/knn-8.json", "--output-dir", "{d}/c1"],
                                      "test size"),
    "compare not a report": (["compare", "{d}/not_report.json", "--output-dir", "{d}/c2"], "not_report.json"),
    "compare broken json": (["compare", "{d}/broken.json", "--output-dir", "{d}/c3"], "broken.json"),
    "compare folder without reports": (["compare", "{d}/empty_folder", "--output-dir", "{d}/c4"],
                                       "no evaluation reports"),
    "report": (["report", "{d}/run", "--output", "{d}/report/report.html"], "ok"),
    "report not a run": (["report", "{d}/empty_folder", "--output", "{d}/r1/report.html"], "empty_folder"),
}
# What an "ok" case must have produced (besides exit code 0).
PRODUCED = {"eval knn": "ok-knn.json", "eval knn text labels": "ok-text.json",
            "eval knn other test size": "ok-size.json",
            "eval knn holdout npz": "ok-holdout.json", "eval knn holdout folder": "ok-folder.json",
            "visualize": "vis.png", "export timm": "exports/timm/model.safetensors", "compare": "cmp/compare.md",
            "report": "report/report.html"}


def test_the_sweep_covers_every_command_and_at_least_30_cases():
    commands = {argv[0] for argv, _ in CASES.values()}
    assert {"pretrain", "eval", "visualize", "export", "compare", "report"} <= commands
    assert len(CASES) >= 30 and sum(expect != "ok" for _, expect in CASES.values()) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_each_input_runs_or_is_one_line_and_exit_2(world, name, capsys):
    argv, expect = CASES[name]
    argv = [a.format(d=world) for a in argv]
    if argv[0] == "pretrain" and "--resume" not in argv:
        argv += TINY
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if expect == "ok":
        assert rc == 0, err[-2000:]
        if argv[0] == "pretrain":
            assert (Path(argv[argv.index("--output-dir") + 1]) / "checkpoint-last.safetensors").is_file()
        else:
            assert (world / PRODUCED[name]).is_file(), name
        return
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("clmae: error: ")]
    assert rc == 2 and len(errors) == 1 and errors[0] == lines[-1], err
    assert expect in errors[0], errors[0]
    flag = next((f for f in ("--output-dir", "--output") if f in argv), None)
    if name == "export occupied folder":
        assert [p.name for p in (world / "exports" / "occupied").iterdir()] == ["model.safetensors"]
        assert (world / "exports" / "occupied" / "model.safetensors").read_text() == "an earlier export"
    elif flag is not None:  # nothing half-written
        target = Path(argv[argv.index(flag) + 1])
        assert not target.exists(), f"{name}: {target} was left behind"


# ---------------------------------------------------------------------------------------------
# Item 2 of issue 24, one by one


def test_text_labels_become_sorted_classes_in_both_splits_and_the_mapping_is_said(world, capsys):
    train = load_dataset(str(world / "text_labels.npz"), split="train")
    test = load_dataset(str(world / "text_labels.npz"), split="test")
    assert train.classes == test.classes == ["circle", "square", "star", "wave"]
    assert torch.equal(train.labels, torch.from_numpy(np.load(world / "good.npz")["y_train"]).long())
    assert torch.equal(test.labels, torch.from_numpy(np.load(world / "good.npz")["y_test"]).long())
    assert train.notes == ["text_labels.npz: text labels read as 4 classes in sorted order (circle=0, square=1, "
                           "star=2, wave=3)"]
    # The same encoder scores the same on text labels as on the integer labels they name (Python API).
    import clmae

    reports = [clmae.evaluate("knn", world / "run", str(world / name), write=False, progress=False, num_workers=0,
                              feature_cache=False, device="cpu") for name in ("text_labels.npz", "good.npz")]
    assert reports[0]["results"] == reports[1]["results"]
    assert reports[0]["data"]["num_classes"] == 4


def test_channels_first_arrays_are_transposed_with_a_note(world, capsys):
    ds = load_dataset(str(world / "channels_first.npz"))
    x = np.load(world / "good.npz")["x_train"]
    assert ds.images.shape == (96, 3, 8, 8) and torch.equal(ds.images[:, 1], torch.from_numpy(x))
    assert ds.notes == ["channels_first.npz: images are channels-first (96, 3, 8, 8); read as (N, H, W, C) = "
                        "(96, 8, 8, 3)"]
    assert cli.main(["pretrain", "--data", str(world / "channels_first.npz"), *TINY,
                     "--output-dir", str(world / "chw-note")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("clmae: clmae on channels_first.npz (32 images, 8 px, RGB)")
    assert err[1] == f"clmae: note: {ds.notes[0]}"


def test_a_flat_class_folder_is_evaluated_on_a_seeded_holdout_recorded_in_the_report(world, capsys):
    argv = ["eval", "knn", "--checkpoint", str(world / "run"), "--data", str(world / "classes"), "--holdout", "0.25",
            *QUIET, "--no-feature-cache"]
    assert cli.main([*argv, "--output", str(world / "h1.json")]) == 0
    err = capsys.readouterr().err
    assert "clmae: note: 10 images of the training split held out at random (--holdout 0.25, seed 0)" in err
    first = json.loads((world / "h1.json").read_text())
    assert first["data"]["holdout"] == {"fraction": 0.25, "seed": 0}
    assert (first["data"]["train_size"], first["data"]["test_size"]) == (30, 10)
    assert cli.main([*argv, "--output", str(world / "h2.json")]) == 0  # seeded: the same split again
    assert json.loads((world / "h2.json").read_text())["results"] == first["results"]
    assert cli.main([*argv, "--seed", "1", "--output", str(world / "h3.json")]) == 0
    other = json.loads((world / "h3.json").read_text())["data"]
    assert other["test_subset_digest"] != first["data"]["test_subset_digest"]


def test_test_images_of_another_size_are_resized_with_a_note(world, capsys):
    assert cli.main(["eval", "knn", "--checkpoint", str(world / "run"), "--data", str(world / "other_test_size.npz"),
                     *EVAL, "--output", str(world / "size.json")]) == 0
    err = capsys.readouterr().err
    assert ("clmae: note: other_test_size.npz: the test images are 12x12 px, the training images 8x8 px; both are "
            "resized to the model's 8 px for evaluation") in err


def test_cifar10_reads_the_same_from_npz_and_from_cifar_10_batches_py(cifar_dir, cifar_batches_dir, cifar_arrays):
    for split, (x, y) in (("train", cifar_arrays[:2]), ("test", cifar_arrays[2:])):
        a = load_dataset("cifar10", str(cifar_dir), split)
        b = load_dataset("cifar10", str(cifar_batches_dir), split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert (a.mean, a.std) == (b.mean, b.std)
        assert torch.equal(a.images, torch.from_numpy(x).permute(0, 3, 1, 2))
        assert torch.equal(a.labels, torch.from_numpy(y).long())


def test_a_cifar_batch_file_that_would_run_code_is_refused_and_never_runs(tmp_path, cifar_arrays):
    import pickle

    from conftest import write_cifar10_batches

    folder = write_cifar10_batches(tmp_path, cifar_arrays)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DataError, match=r"data_batch_3: not a readable CIFAR-10 batch file .*refused to load "
                                        r"pathlib.*touch"):
        load_dataset("cifar10", str(tmp_path))
    assert not marker.exists()


def test_cifar10_without_a_local_copy_downloads_nothing_and_says_how_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLMAE_DATA", raising=False)
    rc = cli.main(["pretrain", "--data", "cifar10", *QUIET])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1, err
    assert re.match(r"clmae: error: cifar10: not found in data \(looked for cifar10.npz or cifar-10-batches-py/\); "
                    r"clmae downloads nothing: fetch it with `python -c .*torchvision.datasets.CIFAR10\('data', "
                    r"download=True\)", err[0]), err[0]
    assert list(tmp_path.iterdir()) == [], "nothing may be left behind (no empty data/, no runs/)"


def test_images_smaller_than_the_smallest_grid_say_they_are_upscaled(tmp_path, capsys):
    np.savez(tmp_path / "tiny.npz", x_train=digits(32, size=4)[0])
    assert cli.main(["pretrain", "--data", str(tmp_path / "tiny.npz"), *TINY[2:],
                     "--output-dir", str(tmp_path / "run")]) == 0
    header = capsys.readouterr().err.splitlines()[0]
    assert ("model vit_micro_patch2_8 at 8 px (the data's 4 px upscaled to the smallest size of this model, 4x4 "
            "patches of 2 px; --model/--img-size to override)") in header, header


# ---------------------------------------------------------------------------------------------
# Item 3: EXIF orientation, in training, evaluation and pictures alike


def test_exif_orientation_is_applied_in_training_evaluation_and_pictures(tmp_path):
    """A phone's portrait: 48x32 stored pixels with orientation 6 are seen (PIL.ImageOps.exif_transpose) as 32x48."""
    from PIL import ImageOps

    from clmae.data.images import eval_transform
    from clmae.evaluation.splits import eval_batches, eval_images, labeled_split

    rng = np.random.default_rng(0)
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:, :12] = 255  # a bright band on the stored image's left: at the top once turned upright
    stored += rng.integers(0, 40, stored.shape, dtype=np.uint8)
    folder = tmp_path / "photos" / "train" / "portraits"
    folder.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    for i in range(2):
        Image.fromarray(stored).save(folder / f"p{i}.jpg", quality=95, exif=exif.tobytes())
    (tmp_path / "photos" / "val").mkdir()
    shutil.copytree(folder, tmp_path / "photos" / "val" / "portraits")
    with Image.open(folder / "p0.jpg") as raw:
        assert raw.size == (48, 32)
        upright = ImageOps.exif_transpose(raw).convert("RGB")
        sideways = raw.convert("RGB")
    assert upright.size == (32, 48)

    train = load_dataset(str(tmp_path / "photos"), split="train")
    image, label, reason = train.files[0]  # what the training DataLoader's workers decode
    assert reason is None and image.size == (32, 48)
    assert np.array_equal(np.asarray(image), np.asarray(upright))

    view = eval_transform(16)
    want, wrong = view(upright).float().div(255), view(sideways).float().div(255)
    test = load_dataset(str(tmp_path / "photos"), split="test")
    split = labeled_split(test, "test", None, 0)
    x, _ = next(eval_batches(split, 16, (0.0,) * 3, (1.0,) * 3, torch.device("cpu"), 2, num_workers=0))
    assert torch.allclose(x[0], want, atol=1e-6) and not torch.allclose(x[0], wrong, atol=0.1)  # evaluation
    _, pictures = eval_images(test, [0, 1], 16)  # what clmae visualize and the curriculum probe draw
    assert torch.allclose(pictures[0], want, atol=1e-6)
