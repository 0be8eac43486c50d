"""A user's first run on their own data: a model that fits it, live feedback, and no traps.

The default model follows the data's native size; every size error names the sizes in play; a run
prints a line per epoch (no ``\\r`` outside a terminal) and a summary; failed set-ups leave no folder;
a start killed before its first checkpoint is started over by the same command; usage errors are one line.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clmae import cli
from clmae.config import make_config
from clmae.data.datasets import load_dataset, scan_data
from clmae.errors import ConfigError
from clmae.io.records import read_metrics
from clmae.models.configs import MODEL_CONFIGS, default_model_for, param_count, resolve_model
from clmae.models.mae import MaskedAutoencoderViT
from clmae.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
# Native size → (model, image size, patch size) without --model.
EXPECTED = {
    8: ("vit_micro_patch2_8", 8, 2),
    28: ("vit_tiny_patch4_28", 28, 4),
    32: ("vit_tiny_patch4_32", 32, 4),
    64: ("vit_tiny_patch8_64", 64, 8),
    96: ("vit_tiny_patch12_96", 96, 12),
    224: ("vit_base_patch16_224", 224, 16),
    500: ("vit_base_patch16_224", 224, 16),
}
QUIET = ["--probe-every", "0", "--snapshot-every", "0", "--num-workers", "0", "--device", "cpu", "--no-progress"]


# =============================================================================================
# The default model


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", sorted(EXPECTED))
def test_default_model_rule(size, channels):
    choice = default_model_for(size, channels)
    assert (choice.name, choice.img_size, choice.patch_size) == EXPECTED[size]


def test_default_model_rule_keeps_small_images_near_native_size_on_a_grid_a_patch_divides():
    for size in range(1, 600):
        c = default_model_for(size, 3)
        assert c.img_size % c.patch_size == 0 and c.name in MODEL_CONFIGS, size
        assert 4 <= c.grid_size <= 14, (size, c)
        if 8 <= size < 160:  # about its own size: within half a patch
            assert abs(c.img_size - size) <= c.patch_size / 2, (size, c)
        if size >= 160:
            assert (c.name, c.img_size) == ("vit_base_patch16_224", 224)
    assert (default_model_for(50, 3).img_size, default_model_for(60, 3).img_size) == (48, 64)  # odd sizes


def _write_images(folder: Path, size: int, gray: bool, n: int = 3) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(size)
    for i in range(n):
        pixels = rng.integers(0, 255, (size, size + i) if gray else (size, size + i, 3), dtype=np.uint8)
        Image.fromarray(pixels, "L" if gray else "RGB").save(folder / f"x{i}.png")


@pytest.mark.parametrize("kind", ["npz", "folder"])
@pytest.mark.parametrize("gray", [True, False], ids=["gray", "rgb"])
@pytest.mark.parametrize("size", sorted(EXPECTED))
def test_default_model_from_the_data(tmp_path, size, gray, kind):
    """The data's native size and channels, read from the array shape or from file headers, pick the model."""
    if kind == "npz":
        shape = (3, size, size) if gray else (3, size, size, 3)
        np.savez(tmp_path / "x.npz", x_train=np.zeros(shape, np.uint8))
        data = str(tmp_path / "x.npz")
    else:
        _write_images(tmp_path / "imgs", size, gray)
        data = str(tmp_path / "imgs")
    dataset = load_dataset(data)
    scan = scan_data(dataset)
    assert (scan.size, scan.channels) == (size, 1 if gray else 3)
    choice = resolve_model(None, None, None, scan.size, scan.channels, scan.note)
    assert (choice.name, choice.img_size, choice.patch_size) == EXPECTED[size]


def test_a_folder_is_scanned_from_a_sample_of_headers_median_shorter_side(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sides = [40, 50, 60, 70, 80] * 8  # median 60
    for i, side in enumerate(sides):
        mode = "L" if i == 3 else "RGB"  # one grayscale photo: still an RGB folder
        pixels = rng.integers(0, 255, (side, side + 7, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").convert(mode).save(folder / f"p{i:02d}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    scan = scan_data(load_dataset(str(folder)), sample=20)
    assert len(opened) == 20  # a sample of headers, not every file
    assert scan.channels == 3 and 40 <= scan.size <= 80 and "sampled images, 40-80 px" in scan.note
    full = scan_data(load_dataset(str(folder)), sample=1000)
    assert full.size == 60 and full.skipped == {"not an image": 1}
    assert resolve_model(None, None, None, full.size, 3).name == "vit_tiny_patch8_64"


# =============================================================================================
# --img-size / --patch-size alone adjust the rest; size errors name the sizes in play


def test_img_size_or_patch_size_alone_adjusts_the_other():
    c = resolve_model(None, 64, None, 28, 1)  # --img-size alone: that size's model and patch
    assert (c.name, c.img_size, c.patch_size) == ("vit_tiny_patch8_64", 64, 8)
    c = resolve_model(None, 50, None, 28, 1)  # no preferred patch divides 50: one that does, ~8x8 grid
    assert (c.img_size, c.patch_size) == (50, 5)
    c = resolve_model(None, None, 3, 28, 1)  # --patch-size alone: the multiple of it nearest the data's size
    assert (c.name, c.img_size, c.patch_size) == ("vit_tiny_patch4_28", 27, 3)
    assert "--patch-size 3" in c.reason and "28 px" in c.reason
    c = resolve_model("vit_base_patch16_224", None, 14, 500, 3)  # --model with --patch-size: 224 is 16x14
    assert (c.img_size, c.patch_size) == (224, 14)
    c = resolve_model("vit_tiny_patch4_32", None, None, 28, 3)  # --model alone: its own sizes
    assert (c.img_size, c.patch_size) == (32, 4)


@pytest.mark.parametrize("args, fragments", [
    ((None, 28, 3, 28), ["image size 28 is not divisible by patch size 3", "the data is 28 px", "e.g. 27", "2, 4, 7"]),
    (("vit_tiny_patch4_32", 30, None, 28), ["image size 30 is not divisible by patch size 4", "the data is 28 px"]),
    ((None, 16, 16, 28), ["patch size 16 leaves a 1x1 grid at image size 16", "the data is 28 px"]),
    ((None, 29, None, 28), ["--img-size 29: no patch size divides it", "the data is 28 px"]),
])
def test_size_errors_speak_of_the_sizes_in_play(args, fragments):
    with pytest.raises(ConfigError) as err:
        resolve_model(*args, 1)
    message = str(err.value)
    assert "224" not in message  # never a size that is not in play
    for fragment in fragments:
        assert fragment in message, message


def test_parameter_counts_match_the_built_models():
    for name, cfg in MODEL_CONFIGS.items():
        with torch.device("meta"):  # shapes only: the huge model costs nothing
            model = MaskedAutoencoderViT(cfg)
        encoder = sum(p.numel() for k, p in model.named_parameters() if not k.startswith(("decoder_", "mask_token")))
        total = sum(p.numel() for p in model.parameters())
        assert param_count(cfg) == (encoder, total - encoder), name


def test_models_command_shows_parameters_and_sizes(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("vit_tiny_patch4_28 "))
    assert "5.3M" in line and "24-29 px" in line
    assert ">= 160 px " in next(ln for ln in out.splitlines() if ln.startswith("vit_base_patch16_224 "))
    # Models the default rule never picks are marked: the column must not claim `pretrain` would choose them.
    for name in ("vit_mini_patch4_32", "vit_large_patch16_224", "vit_huge_patch14_224"):
        assert "px* " in next(ln for ln in out.splitlines() if ln.startswith(name + " ")), name
    assert "px*" not in line


# =============================================================================================
# What a run prints


def test_a_no_progress_run_prints_a_line_per_epoch_and_a_summary(tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc = cli.main(["pretrain", "--data", "digits", "--subset", "128", "--batch-size", "32", "--epochs", "2",
                   "--eval-every", "1", "--probe-every", "2", "--snapshot-every", "0", "--num-workers", "0",
                   "--device", "cpu", "--no-progress", "--output-dir", str(out_dir)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "\r" not in captured.out + captured.err  # no bar redraws outside a terminal
    header = captured.err.splitlines()[0]
    assert header.startswith("clmae: clmae on digits (128 images, 8 px, gray), model vit_micro_patch2_8 at 8 px "
                             "(native size of the data; --model/--img-size to override), 4x4 patches of 2 px"), header
    assert "for the whole run (8 iterations)" in captured.err  # the early ETA
    lines = captured.out.splitlines()
    epochs = [ln for ln in lines if ln.startswith("epoch ")]
    assert len(epochs) == 2, captured.out
    for n, line in enumerate(epochs, 1):
        for field in (f"epoch {n}/2", "loss_mae ", "λ ", "loss_masker ", "mask_difficulty ", "knn_top1 ", " img/s",
                      "elapsed "):
            assert field in line, (field, line)
    assert "λ +1.00" in epochs[0] and "λ -1.00" in epochs[1]  # the official schedule over 2 epochs
    assert "ETA " in epochs[0] and "ETA " not in epochs[1]
    knn = [r["knn_top1"] for r in read_metrics(out_dir) if r["kind"] == "eval"]
    assert f"knn_top1 {knn[-1]:.2f}" in epochs[1]
    summary = "\n".join(lines[lines.index(epochs[1]) + 1:])
    assert summary.startswith("done: 2 epochs in ")
    for fragment in ("loss_mae", "mask_difficulty", "knn_top1", str(out_dir / "checkpoint-last.safetensors"),
                     str(out_dir / "metrics.jsonl"), str(out_dir / "config.json"), f"clmae report {out_dir}"):
        assert fragment in summary, fragment
    recorded = json.loads((out_dir / "config.json").read_text())["run_config"]
    assert (recorded["model"], recorded["img_size"], recorded["patch_size"]) == ("vit_micro_patch2_8", 8, 2)


def test_the_python_api_says_which_model_it_chose_and_why_as_the_command_does(tmp_path, capsys):
    import clmae

    clmae.pretrain(data="digits", subset=32, batch_size=16, epochs=1, probe_every=0, snapshot_every=0, num_workers=0,
                   progress=False, device="cpu", output_dir=str(tmp_path / "run"))
    header = capsys.readouterr().err.splitlines()[0]
    assert header == ("clmae: clmae on digits (32 images, 8 px, gray), model vit_micro_patch2_8 at 8 px (native size "
                      f"of the data; --model/--img-size to override), 4x4 patches of 2 px, device cpu, fp32, "
                      f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}, output "
                      f"{tmp_path / 'run'}"), header


def test_a_run_estimated_at_hours_on_cpu_gets_a_warning_saying_how_to_make_it_smaller():
    from types import SimpleNamespace

    from clmae.train.console import Console

    def run_on(device: str):
        return SimpleNamespace(iteration=5, epochs=30, steps_per_epoch=1000, global_batch=64,
                               device=torch.device(device), dataset=range(64_000),
                               model_config=SimpleNamespace(img_size=224), cfg=SimpleNamespace(method="clmae"))

    for device, warned in (("cpu", True), ("meta", False)):
        out, err = io.StringIO(), io.StringIO()
        console = Console(run_on(device), progress=False, out=out, err=err)
        console._say_eta(run_on(device), per_iteration=90.0)  # 30,000 iterations of 90 s: 31 days
        lines = err.getvalue().splitlines()
        assert lines[0].startswith("clmae: 90 s per iteration (0.71 img/s): about 31d05h for the whole run (30000 "
                                   "iterations), 31d05h to go (29995 iterations left)"), lines[0]
        assert (len(lines) == 2) == warned, lines
        if warned:
            for hint in ("--epochs (now 30)", "--subset N (now 64000 images)", "--img-size (now 224 px)",
                         "--method mae", "--device cuda"):
                assert hint in lines[1], hint


def test_a_run_of_a_few_slow_iterations_says_its_eta_after_the_first_with_the_iterations_left(monkeypatch):
    """The trial's 160 photos at 224 px: 2 iterations of 142 s. The estimate comes after the first iteration
    (there is no second to time before the end), counts the one left, and speeds under 1 img/s keep decimals."""
    from types import SimpleNamespace

    from clmae.models.configs import ModelChoice
    from clmae.train import console as console_module

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(console_module, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    mc = SimpleNamespace(img_size=224, grid_size=14, patch_size=16)
    photos = type("Photos", (), {"name": "photos", "channels": 3, "notes": [], "__len__": lambda self: 160})()
    run = SimpleNamespace(iteration=0, epoch=0, epochs=1, steps_per_epoch=2, global_batch=64,
                          device=torch.device("cpu"), precision="fp32", input_pipeline="", cpu_threads=2,
                          dataset=photos, model_config=mc,
                          cfg=SimpleNamespace(method="clmae", model=None), data_scan=SimpleNamespace(size=200),
                          resumed=False, output_dir=Path("runs/photos"), last_records={}, schedule_done=lambda: {},
                          model_choice=ModelChoice("vit_base_patch16_224", 224, 16, "the data is 200 px"))
    out, err = io.StringIO(), io.StringIO()
    console = console_module.Console(run, progress=False, out=out, err=err)
    console.begin()
    for step in (1, 2):
        clock.now, run.iteration = 142.0 * step, step
        console.on_step(run, {"loss_mae": 1.0})
    run.epoch = 1
    console.on_epoch_end(run)
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("clmae: clmae on photos (160 images, 200 px, RGB), model vit_base_patch16_224 at 224 px")
    eta = [ln for ln in lines if "per iteration" in ln]
    assert eta == ["clmae: 142 s per iteration (0.45 img/s, from the first iteration): about 4m44s for the whole run "
                   "(2 iterations), 2m22s to go (1 iteration left)"], lines
    assert "  0.45 img/s  " in out.getvalue() and " 0 img/s" not in out.getvalue(), out.getvalue()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_terminal_the_bar_shows_the_epoch_and_a_loss_from_the_first_iterations(tmp_path, monkeypatch):
    out, err = Terminal(), Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    cfg = make_config(dict(data="digits", subset=64, batch_size=16, epochs=1, progress=True, probe_every=0,
                           snapshot_every=0, device="cpu", output_dir=str(tmp_path / "run")))
    Trainer(cfg).fit()
    bar = err.getvalue()
    assert "\r" in bar and re.search(r"epoch 1/1: .*\| [1-3]/4 .*loss \d+\.\d{4}\]", bar), bar
    assert "epoch 1/1  loss_mae" in out.getvalue()  # the epoch line too


# =============================================================================================
# Failed set-ups leave no folder; a start killed before its first checkpoint is started over


def test_every_kind_of_validation_failure_leaves_no_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for i in range(4):
        (unreadable / f"x{i}.png").write_bytes(b"" if i % 2 else b"not an image")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    cases = {
        "missing npz": (["--data", str(tmp_path / "missing.npz")], "file not found"),
        "no images": (["--data", str(empty)], "no images found"),
        "no readable image": (["--data", str(unreadable)], "4 files skipped: "),
        "sizes": (["--img-size", "9", "--patch-size", "2"], "image size 9 is not divisible by patch size 2"),
        "batch": (["--subset", "100", "--batch-size", "500"], "fewer than --batch-size 500"),
        "init-from": (["--init-from", str(tmp_path / "notes.txt")], "notes.txt: "),  # fails after the folder exists
    }
    for name, (argv, fragment) in cases.items():
        top = tmp_path / f"new-{name.replace(' ', '-')}"
        rc = cli.main(["pretrain", "--epochs", "1", "--subset", "64", "--batch-size", "16", *QUIET, *argv,
                       "--output-dir", str(top / "deeper" / "run")])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("clmae: error: "), (name, err)
        assert fragment in lines[0], (name, lines[0])
        assert not top.exists(), f"{name}: the run folder (or its parents) was left behind"


def test_a_failed_set_up_removes_only_its_own_folder_not_a_run_that_appeared_beside_it(tmp_path, capsys,
                                                                                        monkeypatch):
    """Another run may write into a parent folder this run created: the clean-up keeps it."""
    import clmae.train.build

    parent = tmp_path / "runs"
    real = clmae.train.build.load_mae_checkpoint

    def meanwhile_another_run_starts(path, model):  # runs after this run created runs/ and runs/mine
        (parent / "theirs").mkdir()
        (parent / "theirs" / "metrics.jsonl").write_text("{}\n")
        return real(path, model)

    monkeypatch.setattr(clmae.train.build, "load_mae_checkpoint", meanwhile_another_run_starts)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    rc = cli.main(["pretrain", "--epochs", "1", "--subset", "64", "--batch-size", "16", *QUIET,
                   "--init-from", str(tmp_path / "notes.txt"), "--output-dir", str(parent / "mine")])
    assert rc == 2 and "notes.txt" in capsys.readouterr().err
    assert not (parent / "mine").exists()
    assert (parent / "theirs" / "metrics.jsonl").read_text() == "{}\n"


def test_two_runs_started_at_once_without_output_dir_get_a_folder_each(tmp_path, monkeypatch):
    """Both chose the default name before either created it: creating the folder is the choice, so the
    second takes ``-2`` instead of sharing the first's folder; a failed set-up removes only what it claimed."""
    from clmae.train import run_folder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_folder.time, "strftime", lambda fmt: "20260101-120000")
    cfg = make_config({"data": "digits"})
    first, second = run_folder.default_output_dir(cfg), run_folder.default_output_dir(cfg)
    assert not (tmp_path / "runs").exists(), "choosing the name must not create anything (validation comes first)"
    a = run_folder.prepare_output_dir(first, resuming=False, claim_new=True)
    b = run_folder.prepare_output_dir(second, resuming=False, claim_new=True)
    assert a.path.name == "clmae-digits-20260101-120000" and b.path.name == a.path.name + "-2"
    assert a.created == [Path("runs"), a.path] and b.created == [b.path]
    assert run_folder.discard_unsaved(b) and not b.path.exists() and a.path.is_dir()


def test_a_failed_set_up_without_output_dir_leaves_no_runs_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for argv in (["--img-size", "9", "--patch-size", "2"], ["--init-from", "notes.txt"]):  # before / after creating
        assert cli.main(["pretrain", "--epochs", "1", "--subset", "64", "--batch-size", "16", *QUIET, *argv]) == 2
        assert "clmae: error: " in capsys.readouterr().err
        assert not (tmp_path / "runs").exists(), argv


def test_a_run_killed_before_its_first_checkpoint_restarts_with_the_same_command(tmp_path, capsys):
    """SIGKILL in the first epoch; then the same command, with --resume and without, starts the run over there."""
    run = tmp_path / "run"
    argv = ["pretrain", "--data", "digits", "--subset", "256", "--batch-size", "16", "--epochs", "1", "--log-every",
            "1", *QUIET, "--output-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "clmae", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().count('"train"'):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert not (run / "checkpoint-last.pt").exists() and (run / "config.json").exists()
    killed = {p.name for p in run.iterdir()}
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in killed - {"tensorboard", "probe"}:
        (copy / name).write_bytes((run / name).read_bytes())

    for folder, extra in ((run, ["--resume"]), (copy, [])):
        command = [a if a != str(run) else str(folder) for a in argv] + extra
        assert cli.main(command) == 0
        err = capsys.readouterr().err
        assert "clmae: note: " in err and "starting" in err and "error" not in err, err
        steps = [r["step"] for r in read_metrics(folder) if r["kind"] == "train"]
        assert steps == list(range(1, 17)), "the stale metrics of the killed start were not cleared"
        assert (folder / "checkpoint-last.pt").exists()


def test_resume_with_a_changed_option_names_the_stored_value(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["pretrain", "--subset", "64", "--batch-size", "32", "--epochs", "1", *QUIET, "--output-dir", str(run)]
    assert cli.main(base) == 0  # no --model: the default model is recorded
    capsys.readouterr()
    for argv, fragment in ((["--model", "vit_tiny_patch4_32"], "--model: the run was started with "
                                                               "'vit_micro_patch2_8'"),
                           (["--img-size", "16"], "--img-size: the run was started with 8;")):
        assert cli.main(["pretrain", "--resume", str(run), *argv]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "None" not in err, err


@pytest.mark.parametrize("pretrain_exit", [0, 130, 143])
def test_make_run_evaluates_only_after_a_completed_pretraining(tmp_path, pretrain_exit):
    """`make run` chains pretraining and k-NN with `&&`: a run stopped by a signal (exit 130/143) is never evaluated.

    The Makefile runs as is, against a stand-in virtual environment whose `clmae` records its calls.
    """
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (venv / ".installed").touch()  # newer than pyproject.toml: `setup` has nothing to do
    calls = tmp_path / "calls"
    fake = venv / "bin" / "clmae"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" = pretrain ] && exit {pretrain_exit}\nexit 0\n')
    fake.chmod(0o755)
    proc = subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "run", f"VENV={venv}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    made = calls.read_text().splitlines()
    assert re.fullmatch(r"pretrain --output-dir runs/default-\d{8}-\d{6}", made[0]), made
    if pretrain_exit == 0:
        assert proc.returncode == 0 and made[1:] == [f"eval knn --checkpoint {made[0].split()[-1]} --no-progress"]
    else:
        assert proc.returncode != 0 and made[1:] == [], "make run evaluated a run that did not finish"


def test_a_run_recorded_without_its_model_by_an_older_clmae_resumes_with_the_model_it_used(tmp_path, capsys):
    from clmae.io.checkpoint import read_training_state, save_training_state

    run = tmp_path / "run"
    argv = ["pretrain", "--subset", "64", "--batch-size", "32", "--epochs", "1", *QUIET, "--output-dir", str(run)]
    assert cli.main(argv) == 0
    state = read_training_state(run / "checkpoint-last.pt")
    state["run_config"].update(model=None, img_size=None, patch_size=None)  # what clmae recorded before
    save_training_state(run / "checkpoint-last.pt", state)
    capsys.readouterr()
    assert cli.main(["pretrain", "--resume", str(run), "--epochs", "2"]) == 0
    assert "model vit_micro_patch2_8 at 8 px (as the run started)" in capsys.readouterr().err
    assert cli.main(["pretrain", "--resume", str(run), "--model", "vit_tiny_patch4_32"]) == 2
    assert "the run was started with 'vit_micro_patch2_8'" in capsys.readouterr().err


def test_a_resumed_run_may_change_its_cpu_threads(tmp_path, capsys):
    """Threads are the machine's, like --device: a run started on 1 core continues with 2 (and says so)."""
    run = tmp_path / "run"
    argv = ["pretrain", "--subset", "64", "--batch-size", "32", "--epochs", "1", "--threads", "1", *QUIET,
            "--output-dir", str(run)]
    assert cli.main(argv) == 0
    assert "fp32, 1 thread," in capsys.readouterr().err
    assert cli.main(["pretrain", "--resume", str(run), "--epochs", "2", "--threads", "2"]) == 0
    assert "fp32, 2 threads," in capsys.readouterr().err


def test_an_option_an_older_clmae_did_not_record_is_checked_against_its_default_on_resume(tmp_path, capsys):
    """It used to be ignored without a word: the resumed run silently kept the default."""
    from clmae.io.checkpoint import read_training_state, save_training_state

    run = tmp_path / "run"
    argv = ["pretrain", "--subset", "64", "--batch-size", "32", "--epochs", "1", *QUIET, "--output-dir", str(run)]
    assert cli.main(argv) == 0
    state = read_training_state(run / "checkpoint-last.pt")
    del state["run_config"]["mask_ratio"]  # as if recorded before the option existed: the run used 0.75
    save_training_state(run / "checkpoint-last.pt", state)
    capsys.readouterr()
    assert cli.main(["pretrain", "--resume", str(run), "--mask-ratio", "0.5"]) == 2
    assert "--mask-ratio: the run was started with 0.75; a resumed run cannot change it" in capsys.readouterr().err
    assert cli.main(["pretrain", "--resume", str(run), "--mask-ratio", "0.75", "--epochs", "2"]) == 0
    assert read_training_state(run / "checkpoint-last.pt")["run_config"]["mask_ratio"] == 0.75


# =============================================================================================
# Usage errors and help


@pytest.mark.parametrize("argv, fragment", [
    (["pretrain", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    (["pretrain", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["pretrian"], "invalid choice: 'pretrian'"),
    (["pretrain", "--method", "bert"], "argument --method: invalid choice: 'bert'"),
    (["eval", "knn"], "the following arguments are required: --checkpoint"),
])
def test_usage_errors_are_one_line_with_exit_code_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("clmae: error: ") and fragment in err, err
    assert "usage:" not in err


def test_pretrain_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("training epochs (default: 30)", "(default: 0.75)", "(default: 64)", "(default: clmae)",
                     "show a progress bar (default: on)", "see `clmae models`"):
        assert fragment in text, fragment


def test_a_cpu_run_takes_the_cores_other_processes_leave_free_unless_told(monkeypatch):
    """A busy machine's shared cores slow a parallel matmul several-fold (34 vs 279 img/s for make run's default on
    2 busy cores): by default a CPU run lowers torch's thread count to the free cores; --threads decides."""
    from clmae import runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    for load, want in ((0.0, 8), (0.4, 8), (2.6, 5), (7.9, 1), (30.0, 1)):
        monkeypatch.setattr(runtime.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert runtime.training_threads(None, cpu) == want, load
    assert runtime.training_threads(None, cpu, local_ranks=2) == 1  # 1 free core shared by two processes: 1 each
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert runtime.training_threads(None, cpu, local_ranks=2) == 4
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # OMP_NUM_THREADS=2: never raised
    assert runtime.training_threads(None, cpu) == 2
    assert runtime.training_threads(3, cpu) == 3  # --threads 3
    assert runtime.training_threads(None, cuda) is None and runtime.training_threads(4, cuda) == 4


def test_threads_flag_sets_the_run_and_the_header_says_it(tmp_path, capsys):
    from clmae.cli.app import main as cli_main

    before = torch.get_num_threads()
    try:
        assert cli_main(["pretrain", "--data", "digits", "--subset", "32", "--batch-size", "16", "--epochs", "1",
                         "--probe-every", "0", "--no-progress", "--device", "cpu", "--threads", "2",
                         "--output-dir", str(tmp_path / "run")]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert ", fp32, 2 threads, output " in capsys.readouterr().err
