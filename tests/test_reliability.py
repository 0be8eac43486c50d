"""Reliability: crash safety, graceful stop, full disk, untrusted files, bad data, numerical faults, config.

The subprocess tests run the real CLI (``python -m clmae pretrain``); the long fault-injection
soak over 10+ random kill points is ``make soak`` (scripts/soak_kill_resume.py), of which
:func:`test_sigkill_in_a_step_and_in_checkpoint_writes_resumes_to_identical_weights` is the short version.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clmae.io.checkpoint as ckpt
from clmae import cli
from clmae.config import FIELDS, PretrainConfig, load_config_file, make_config
from clmae.data.datasets import ImageFiles, load_dataset
from clmae.data.images import open_image
from clmae.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from clmae.io.checkpoint import (
    checkpoint_pair_complete,
    load_pretrained,
    load_state_checked,
    read_training_state,
    read_weights,
    weights_file,
    write_run_file,
)
from clmae.io.records import read_metrics
from clmae.maskers import option_owners
from clmae.models.mae import create_model
from clmae.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("soak_kill_resume", REPO / "scripts" / "soak_kill_resume.py")
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak_kill_resume"] = soak  # dataclasses look their module up
_spec.loader.exec_module(soak)

# The subprocess runs: digits, micro ViT, 3 epochs of 8 steps, CPU, one thread (a few seconds each,
# mostly imports; 24 steps leave a signal sent after step 2 plenty of time to land mid-run).
EPOCHS, SUBSET, BATCH = 3, 256, 32
STEPS_PER_EPOCH = SUBSET // BATCH
ARGS = soak.train_args(EPOCHS, SUBSET, BATCH)
TIMEOUT = 300


def tiny_config(out: Path, **options) -> PretrainConfig:
    """An in-process run of a few seconds: 64 digits, batches of 16, two epochs."""
    values = dict(data="digits", model="vit_micro_patch2_8", subset=64, batch_size=16, epochs=2, device="cpu",
                  num_workers=0, progress=False, probe_every=0, snapshot_every=0, log_every=1, output_dir=str(out))
    values.update(options)
    return make_config(values)


def tiny_cli_args(out: Path, epochs: int = 2) -> list[str]:
    return ["pretrain", "--data", "digits", "--model", "vit_micro_patch2_8", "--subset", "64", "--batch-size", "16",
            "--epochs", str(epochs), "--device", "cpu", "--num-workers", "0", "--no-progress", "--probe-every", "0",
            "--snapshot-every", "0", "--log-every", "1", "--output-dir", str(out)]


def weights_of(*modules) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file in a run folder: proves nothing was overwritten."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir()) if p.is_file()}


class Evil:
    """A pickle that runs a shell command when loaded with plain ``pickle``/``torch.load``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))



@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted subprocess run, started in the background at first use."""
    d = tmp_path_factory.mktemp("reference")
    proc = soak.run_reference(d / "run", ARGS, d / "log")

    class Reference:
        _state = None

        def state(self) -> dict:
            if self._state is None:
                rc = proc.wait(timeout=TIMEOUT)
                assert rc == 0, (d / "log").read_text()[-3000:]
                self._state = soak.final_state(d / "run")
            return self._state

    yield Reference()
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished in-process run (2 epochs), used read-only or copied."""
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(tiny_config(out)).fit()
    return out


# =============================================================================================
# Crash safety: SIGKILL at chosen points; the resumed run ends bit-identical to an uninterrupted one


@pytest.mark.slow
def test_sigkill_in_a_step_and_in_checkpoint_writes_resumes_to_identical_weights(reference, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    seen: dict[str, object] = {}
    S = STEPS_PER_EPOCH

    def inspect(event, run_dir):
        pt, st = run_dir / "checkpoint-last.pt", run_dir / "checkpoint-last.safetensors"
        if event.fault == "save-gap":
            # Killed between the two renames: the .pt is new, the .safetensors the previous one.
            assert read_weights(st)[1]["iteration"] == S and read_training_state(pt)["iteration"] == 2 * S
            assert not checkpoint_pair_complete(run_dir / "checkpoint-last")
            assert weights_file(run_dir) == pt  # users loading the folder get the newest weights
            mae, masker, _ = load_pretrained(run_dir)
            state = read_training_state(pt)["weights"]
            assert all(torch.equal(v, state[f"mae.{k}"]) for k, v in mae.state_dict().items())
            seen["gap"] = True
        if event.fault == "finish":
            assert checkpoint_pair_complete(run_dir / "checkpoint-last")
            assert weights_file(run_dir) == st

    events = soak.chaos_run(run, ARGS, [("step", S + 2), ("write-mid", 1), ("save-gap", 1)], S, EPOCHS, log,
                            timeout=TIMEOUT, progress=lambda *_: None, inspect=inspect)
    assert [e.fault for e in events] == ["step", "write-mid", "save-gap", "finish"], log.read_text()[-3000:]
    assert [e.rc for e in events] == [-signal.SIGKILL] * 3 + [0]
    # Checkpoint after each process: killed in iteration S+2 → epoch 1's (S); killed writing epoch 2's
    # .pt → still S, a half-written temp file beside it; killed between epoch 2's files → 2S; then done.
    assert [e.after.iteration for e in events] == [S, S, 2 * S, 3 * S]
    assert [e.lost_steps for e in events[:3]] == [1, S, 0]  # never more than the work since the last save
    assert [e.temp_files for e in events] == [0, 1, 0, 0]  # the next write of that file removes it
    assert seen.get("gap")
    diffs = soak.differences(reference.state(), soak.final_state(run))
    assert diffs == [], f"resumed run differs from the uninterrupted one in {diffs[:10]}"


# =============================================================================================
# Graceful stop: SIGINT / SIGTERM finish the step, save, say how to resume, exit 130 / 143 (shell chains stop)


@pytest.mark.slow
def test_sigint_and_sigterm_stop_cleanly_and_the_printed_resume_command_finishes_identically(reference, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    metrics = run / "metrics.jsonl"
    cmd = [*ARGS, "--output-dir", str(run)]
    last = 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        offset = metrics.stat().st_size if metrics.exists() else 0
        log_offset = log.stat().st_size if log.exists() else 0
        proc = soak.launch(cmd, None, 0, log)
        assert soak.wait_for_steps(proc, metrics, offset, 2, TIMEOUT), log.read_text()[-3000:]
        proc.send_signal(sig)
        assert proc.wait(timeout=TIMEOUT) == 128 + sig, log.read_text()[-3000:]  # 130 for SIGINT, 143 for SIGTERM
        text = log.read_text()[log_offset:]
        assert f"received {sig.name}" in text
        m = re.search(r"Resume with: clmae (pretrain --resume (\S+))", text)
        assert m and Path(m.group(2)) == run, text[-2000:]
        state = read_training_state(run / "checkpoint-last.pt")
        steps = soak.logged_steps(metrics, offset)
        # The step in progress was finished and saved: no work lost.
        assert state["iteration"] == max(steps) > last
        assert state["iteration"] < EPOCHS * STEPS_PER_EPOCH
        assert checkpoint_pair_complete(run / "checkpoint-last")
        last = state["iteration"]
        cmd = m.group(1).split()  # exactly what the message says (the run's options come from the checkpoint)
    proc = soak.launch(cmd, None, 0, log)
    assert proc.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
    diffs = soak.differences(reference.state(), soak.final_state(run))
    assert diffs == [], f"stopped-and-resumed run differs from the uninterrupted one in {diffs[:10]}"


# =============================================================================================
# Bad input through the CLI: one line `clmae: error: ...`, exit code 2, no traceback, nothing overwritten


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, finished_run):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty").mkdir()
    evil_run = d / "evil_run"
    evil_run.mkdir()
    marker = d / "pwned"
    torch.save({"format": ckpt.FORMAT, "payload": Evil(marker)}, evil_run / "checkpoint-last.pt")
    return d, marker, finished_run


def _cli_cases(d: Path, existing: Path) -> dict[str, tuple[list[str], list[str]]]:
    fresh = lambda name: ["--output-dir", str(d / f"out-{name}")]
    return {
        "empty folder": (["--data", str(d / "empty"), *fresh("empty")], ["no images found"]),
        "mask ratio": (["--mask-ratio", "1.0", *fresh("ratio")], ["--mask-ratio", "strictly between 0 and 1"]),
        "size not divisible": (["--img-size", "9", "--patch-size", "2", *fresh("size")],
                               ["image size 9 is not divisible by patch size 2", "the data is 8 px"]),
        "existing run": (["--output-dir", str(existing)],
                         ["already holds a run", "--resume", "nothing was overwritten"]),
        "untrusted resume": (["--resume", str(d / "evil_run")], ["refused to load", "could run code"]),
    }


@pytest.fixture(scope="module")
def cli_results(bad_inputs):
    """One `python -m clmae pretrain` process per kind of error (data, option, model, run folder,
    checkpoint), all started at once; the other cases go through ``cli.main`` in-process below."""
    d, marker, existing = bad_inputs
    before = fingerprint(existing)
    cases = _cli_cases(d, existing)
    env = soak.child_env()
    base = ["--device", "cpu", "--subset", "64", "--batch-size", "16", "--epochs", "1", "--no-progress",
            "--probe-every", "0", "--snapshot-every", "0"]
    procs = {name: subprocess.Popen([sys.executable, "-m", "clmae", "pretrain", *argv,
                                     *(base if "--resume" not in argv else [])],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, (argv, _) in cases.items()}
    results = {name: (p.wait(timeout=TIMEOUT), *p.communicate()) for name, p in procs.items()}
    return results, cases, before, fingerprint(existing), marker, d


@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty folder", "mask ratio", "size not divisible", "existing run",
                                  "untrusted resume"])
def test_bad_input_gives_one_line_error_and_exit_code_2(cli_results, case):
    results, cases, before, after, marker, d = cli_results
    rc, out, err = results[case]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("clmae: error: "), err
    for fragment in cases[case][1]:
        assert fragment in lines[0], lines[0]
    assert after == before, "the existing run folder was modified"
    assert not marker.exists(), "loading the untrusted checkpoint ran its code"
    assert not list(d.glob("out-*/checkpoint-last.*")), "a failed run wrote a checkpoint"


@pytest.mark.parametrize("argv, fragment", [
    (["--mask-ratio", "0"], "--mask-ratio: got 0.0, expected a number strictly between 0 and 1"),
    (["--mask-ratio", "-0.5"], "strictly between 0 and 1"),
    (["--epochs", "0"], "--epochs: got 0, expected an integer >= 1"),
    (["--model", "vit_nope"], "--model: got 'vit_nope', expected one of"),
    (["--model", "vit_micro_patch2_8", "--img-size", "9"], "image size 9 is not divisible by patch size 2"),
    (["--data", "MISSING.npz"], "MISSING.npz: file not found"),
    (["--data", "/nonexistent/folder"], "is not a built-in dataset"),
    (["--data", "NOKEYS.npz"], "missing key 'x_train' (found ['images'])"),
    (["--data", "PICKLED.npz"], "pickled Python objects"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    (["--config", "EVIL_YAML"], "not valid YAML"),
    (["--resume", "EXISTING", "--mask-ratio", "0.5"], "--mask-ratio: the run was started with 0.75"),
    (["--resume", "CUT"], "truncated or corrupt checkpoint"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_more_bad_input_through_cli_main(tmp_path, capsys, finished_run, argv, fragment):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.yaml").write_text(f"epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    np.savez(tmp_path / "nokeys.npz", images=np.zeros((4, 8, 8), np.uint8))
    np.savez(tmp_path / "pickled.npz", x_train=np.array([Evil(marker)], dtype=object))
    cut = tmp_path / "cut"
    cut.mkdir()
    blob = (finished_run / "checkpoint-last.pt").read_bytes()
    (cut / "checkpoint-last.pt").write_bytes(blob[: len(blob) // 2])
    names = {"EVIL_YAML": tmp_path / "evil.yaml", "MISSING.npz": tmp_path / "missing.npz",
             "NOKEYS.npz": tmp_path / "nokeys.npz", "PICKLED.npz": tmp_path / "pickled.npz",
             "EXISTING": finished_run, "CUT": cut}
    argv = [str(names.get(a, a)) for a in argv]
    fragment = fragment.replace("MISSING.npz", str(tmp_path / "missing.npz"))
    before = fingerprint(finished_run)
    base = ["pretrain"] if "--resume" in argv else tiny_cli_args(tmp_path / "out")  # a resume takes the run's options
    rc = cli.main([*base, *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("clmae: error: ") and fragment in lines[0], err
    assert not (tmp_path / "out" / "checkpoint-last.pt").exists()
    assert fingerprint(finished_run) == before
    assert not marker.exists()


# =============================================================================================
# Full disk / unwritable output


def _fail_nth_torch_save(monkeypatch, n: int, err: int = errno.ENOSPC) -> dict:
    """Make the n-th ``torch.save`` write half its bytes, then fail like a full disk."""
    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        real(obj, f, *args, **kwargs)
        if calls["n"] == n:
            size = os.path.getsize(f)
            with open(f, "r+b") as fh:
                fh.truncate(size // 2)
            raise OSError(err, os.strerror(err), str(f))

    monkeypatch.setattr(torch, "save", save)
    return calls


def test_disk_full_stops_with_one_line_error_keeps_the_previous_checkpoint_and_resumes(tmp_path, monkeypatch, capsys):
    """Decision: a failed checkpoint write ends the run (exit 2) instead of training on unsaved:
    the previous checkpoint is intact, the message says how to continue, and --resume loses at most
    the epoch whose save failed."""
    run = tmp_path / "run"
    _fail_nth_torch_save(monkeypatch, 2)  # epoch 2's .pt
    rc = cli.main(tiny_cli_args(run, epochs=2))
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("clmae: error:")]
    assert rc == 2 and "Traceback" not in err
    assert len(errors) == 1
    assert "No space left on device" in errors[0] and "previous checkpoint is intact" in errors[0]
    assert f"clmae pretrain --resume {run}" in errors[0]
    state = read_training_state(run / "checkpoint-last.pt")
    assert (state["epoch"], state["iteration"]) == (1, 4)
    assert checkpoint_pair_complete(run / "checkpoint-last")  # the .safetensors was not touched either
    load_pretrained(run)
    assert not list(run.glob(".*.tmp")), "the failed write left its temporary file"
    monkeypatch.undo()

    assert cli.main(["pretrain", "--resume", str(run)]) == 0
    capsys.readouterr()
    resumed = read_training_state(run / "checkpoint-last.pt")
    assert resumed["epoch"] == 2
    Trainer(tiny_config(tmp_path / "straight", epochs=2)).fit()
    straight = read_training_state(tmp_path / "straight" / "checkpoint-last.pt")
    assert equal(resumed["weights"], straight["weights"])


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_atomic_write_failure_keeps_the_old_file_and_names_the_cause(tmp_path, err):
    target = tmp_path / "checkpoint-last.pt"
    target.write_bytes(b"previous checkpoint")

    def write(tmp):
        Path(tmp).write_bytes(b"half a new chec")
        raise OSError(err, os.strerror(err))

    with pytest.raises(CheckpointError) as info:
        write_run_file(target, write)
    msg = str(info.value)
    assert os.strerror(err) in msg and str(target) in msg and "\n" not in msg
    assert target.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pt"]


def test_stale_temp_files_from_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "checkpoint-last.pt"
    stale = tmp_path / ".checkpoint-last.pt.abc123.tmp"
    other = tmp_path / ".checkpoint-last.safetensors.abc123.tmp"  # another file's: left alone
    stale.write_bytes(b"x")
    other.write_bytes(b"y")
    write_run_file(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert not stale.exists() and other.exists()
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_unwritable_output_dir_is_a_config_error_before_anything_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="--output-dir: cannot create"):
        Trainer(tiny_config(blocker / "run"))


def test_resume_after_a_kill_between_the_final_files_rewrites_the_weights_file(tmp_path, monkeypatch):
    """A kill after the last .pt but before the last .safetensors: the resumed (already finished)
    run must leave a consistent pair, not a stale weights file."""
    run = tmp_path / "run"

    class Killed(BaseException):
        pass

    import clmae.train.run_folder as run_folder_module

    real = run_folder_module.save_weights
    calls = {"n": 0}

    def save_weights(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the final epoch's .safetensors
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(run_folder_module, "save_weights", save_weights)
    with pytest.raises(Killed):
        Trainer(tiny_config(run)).fit()
    monkeypatch.undo()
    assert not checkpoint_pair_complete(run / "checkpoint-last")
    assert weights_file(run) == run / "checkpoint-last.pt"
    Trainer(tiny_config(run, resume=str(run)), overrides={"resume": str(run)}).fit()
    assert checkpoint_pair_complete(run / "checkpoint-last")
    st = read_weights(run / "checkpoint-last.safetensors")[0]
    pt = read_training_state(run / "checkpoint-last.pt")["weights"]
    assert equal(st, pt)


# =============================================================================================
# Untrusted files: loading never runs code; cut and mismatching checkpoints name the problem


@pytest.mark.parametrize("kind", ["torch zip", "raw pickle"])
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    pt = run / "checkpoint-last.pt"
    payload = {"format": ckpt.FORMAT, "weights": {}, "x": Evil(marker)}
    if kind == "torch zip":
        torch.save(payload, pt)
    else:
        pt.write_bytes(pickle.dumps(payload))
    pickle.loads(pickle.dumps(Evil(marker)))  # the payload is real: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    for attempt in (lambda: read_training_state(pt), lambda: load_pretrained(pt), lambda: load_pretrained(run),
                    lambda: Trainer(tiny_config(tmp_path / "o", resume=str(run)))):
        with pytest.raises(CheckpointError, match="refused to load: it contains Python objects that could run code"):
            attempt()
        assert not marker.exists()
    msg = ""
    try:
        read_training_state(pt)
    except CheckpointError as exc:
        msg = str(exc)
    assert "weights_only" not in msg and "\n" not in msg  # not PyTorch's advice to turn the protection off


def test_pickle_disguised_as_safetensors_npz_or_yaml_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    st = tmp_path / "checkpoint-last.safetensors"
    st.write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(st)
    with pytest.raises(CheckpointError):
        load_pretrained(tmp_path)
    npz = tmp_path / "evil.npz"
    np.savez(npz, x_train=np.array([Evil(marker)], dtype=object))
    with pytest.raises(DataError, match="pickled Python objects"):
        load_dataset(str(npz))
    yml = tmp_path / "evil.yaml"
    yml.write_text(f"epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(str(yml))
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_checkpoint_names_the_file_and_the_problem(finished_run, tmp_path, suffix):
    run = tmp_path / "run"
    run.mkdir()
    for s in (".pt", ".safetensors"):
        (run / f"checkpoint-last{s}").write_bytes((finished_run / f"checkpoint-last{s}").read_bytes())
    cut = run / f"checkpoint-last{suffix}"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(cut)) + ".*(truncated|corrupt)"):
        load_pretrained(cut)
    if suffix == ".pt":
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            Trainer(tiny_config(tmp_path / "o", resume=str(run)))
    else:  # the folder still loads, from the intact .pt
        assert weights_file(run) == run / "checkpoint-last.pt"
        load_pretrained(run)


def test_incomplete_resume_file_names_what_is_missing(finished_run, tmp_path):
    state = read_training_state(finished_run / "checkpoint-last.pt")
    del state["opt_mae"]
    state["epoch"] = "two"
    bad = tmp_path / "checkpoint-last.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"missing \['opt_mae'\], wrong type \['epoch'\]"):
        read_training_state(bad)


def test_wrong_architecture_names_the_difference(finished_run):
    tiny = create_model("vit_tiny_patch4_32")
    flat, _ = read_weights(finished_run / "checkpoint-last.safetensors")
    micro = ckpt.split_prefix(flat, "mae")
    with pytest.raises(CheckpointError) as info:
        load_state_checked(tiny, micro, "autoencoder", "micro.safetensors")
    msg = str(info.value)
    for part in ("micro.safetensors", "patch size 2 in the checkpoint vs 4 in the model",
                 "1 input channels in the checkpoint vs 3", "embedding width 64 in the checkpoint vs 192",
                 "encoder depth 4 in the checkpoint vs 12", "--model"):
        assert part in msg, msg
    # The masking module scores every patch: another image size is another patch count.
    from clmae.maskers import create_masker
    from clmae.models.configs import model_config

    bigger = create_masker("clmae", model_config("vit_micro_patch2_8", img_size=16))
    with pytest.raises(CheckpointError, match="16 patches in the checkpoint vs 64 in the model"):
        load_state_checked(bigger, ckpt.split_prefix(flat, "masker"), "masking module", "micro.safetensors")


def test_edited_patch_size_in_metadata_is_caught_before_building_the_model(finished_run, tmp_path):
    tensors, meta = read_weights(finished_run / "checkpoint-last.safetensors")
    from safetensors.torch import save_file

    def write(model_cfg_changes):
        mc = {**meta["model_config"], **model_cfg_changes}
        out = tmp_path / "edited.safetensors"
        save_file(tensors, str(out), metadata={"format": ckpt.FORMAT, "model_config": json.dumps(mc),
                                                "run_config": json.dumps(meta["run_config"])})
        return out

    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight: weights \(64, 1, 2, 2\) vs configuration "
                                              r"\(64, 1, 4, 4\)"):
        load_pretrained(write({"patch_size": 4}))
    # A 16x16 image with patch 2 → 64 patches; the masking module was trained for 16.
    with pytest.raises(CheckpointError, match=r"network\.head\.weight: weights \(16, 64\) vs configuration \(64, 64\)"):
        load_pretrained(write({"img_size": 16}))
    # A crafted giant configuration is refused from the weights' shapes, without allocating it.
    with pytest.raises(CheckpointError, match="does not match its weights"):
        load_pretrained(write({"embed_dim": 65536, "depth": 4096}))


def test_resume_with_a_different_patch_size_is_refused(finished_run):
    # The resolved value the run trained with, not "None" for an option left to its default.
    with pytest.raises(ConfigError, match="--patch-size: the run was started with 2;"):
        Trainer(tiny_config(finished_run, resume=str(finished_run), patch_size=4),
                overrides={"resume": str(finished_run), "patch_size": 4})


# =============================================================================================
# Bad data at scale: skipped, counted once, never stalls; Pillow's bomb guard stays on


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """48 readable images of every mode, and 8 bad files whose expected skip reason is known.

    The "huge" files are huge relative to a test limit of 10,000 pixels (set while the folder is read).
    """
    d = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)

    def rgb(w=12, h=10):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")

    good = []
    for i in range(6):
        good += [
            _save(rgb(), d / f"rgb{i}.png"),
            _save(rgb(), d / f"photo{i}.jpg", quality=90),
            _save(rgb().convert("L"), d / f"gray{i}.png"),
            _save(rgb().convert("RGBA"), d / f"rgba{i}.png"),
            _save(rgb().convert("LA"), d / f"la{i}.png"),
            _save(rgb().convert("P"), d / f"palette{i}.gif"),
            _save(Image.fromarray(rng.integers(0, 65535, (10, 12), dtype=np.uint16)), d / f"deep{i}.png"),
            _save(rgb().convert("CMYK"), d / f"cmyk{i}.jpg"),
        ]
    _save(rgb(96, 80), d / "big_but_allowed.jpg", quality=90)  # 7,680 px: decoded at reduced scale
    bad = {}
    for i in range(2):
        (d / f"empty{i}.png").write_bytes(b"")
        bad[f"empty{i}.png"] = "empty file"
        blob = (d / f"photo{i}.jpg").read_bytes()
        (d / f"cut{i}.jpg").write_bytes(blob[: len(blob) // 2])
        bad[f"cut{i}.jpg"] = "truncated or corrupt"
        (d / f"notes{i}.jpg").write_text("these are not pixels\n" * 20)
        bad[f"notes{i}.jpg"] = "not an image"
    _save(rgb(150, 150), d / "bomb.png")  # 22,500 px > 2 x limit: Pillow's DecompressionBombError
    _save(rgb(110, 110), d / "almost_bomb.png")  # 12,100 px > limit: Pillow's warning, refused too
    bad["bomb.png"] = bad["almost_bomb.png"] = "too large"
    assert len(good) + 1 == 49
    return d, bad


PIXEL_LIMIT = 10_000


def test_each_bad_file_is_skipped_with_its_reason_and_good_ones_decode(messy_folder, monkeypatch):
    d, bad = messy_folder
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIXEL_LIMIT)
    files = ImageFiles(d, channels=3, min_side=24)
    from clmae.data.images import train_transform

    files.transform = train_transform(8)
    reasons = {}
    for i in range(len(files)):
        x, label, reason = files[i]
        name = files.files[i].name
        if x is None:
            reasons[name] = reason
        else:
            assert x.shape == (3, 8, 8) and x.dtype == torch.uint8, name
    assert {k: v.split(":")[0] for k, v in reasons.items()} == bad
    assert "DecompressionBombError" in reasons["bomb.png"]  # Pillow's own guard, not silenced
    assert "DecompressionBombWarning" in reasons["almost_bomb.png"]  # the warning level is not "ok" either


def test_modes_convert_sensibly_and_huge_images_decode_small(messy_folder, tmp_path):
    d, _ = messy_folder
    gray = open_image(d / "gray0.png")
    assert gray.mode == "RGB" and np.array_equal(np.asarray(gray)[..., 0], np.asarray(gray)[..., 2])
    deep = np.asarray(open_image(d / "deep0.png", channels=1))
    raw = np.asarray(Image.open(d / "deep0.png"), dtype=np.float64)
    assert deep.dtype == np.uint8 and np.abs(deep - raw / 65535 * 255).max() <= 1  # 16-bit scaled, not clipped
    transparent = Image.new("RGBA", (12, 10), (0, 0, 0, 0))
    assert np.asarray(open_image(_save(transparent, tmp_path / "t.png"))).min() == 255  # on white, not black
    big = open_image(d / "big_but_allowed.jpg", min_side=24)
    assert min(big.size) >= 24 and big.size[0] < 96  # JPEG draft: decoded at 1/2 scale
    png = open_image(_save(Image.new("RGB", (200, 100), (10, 20, 30)), tmp_path / "big.png"), min_side=24)
    assert png.size == (50, 25)  # box-reduced right after decoding
    assert open_image(d / "big_but_allowed.jpg").size == (96, 80)  # no reduction unless asked


@pytest.mark.parametrize("workers", [0, 2])
def test_run_on_a_messy_folder_completes_and_reports_skips_once(messy_folder, tmp_path, monkeypatch, capfd, workers):
    d, bad = messy_folder
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIXEL_LIMIT)

    def stalled(signum, frame):
        raise TimeoutError("the data pipeline stalled")

    previous = signal.signal(signal.SIGALRM, stalled)
    signal.alarm(240)
    try:
        cfg = tiny_config(tmp_path / "run", data=str(d), img_size=8, batch_size=8, subset=None, epochs=2,
                          num_workers=workers, method="mae")
        result = Trainer(cfg).fit()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.epochs_done == 2
    err = capfd.readouterr().err
    assert f"{len(bad)} files skipped: " in err  # once per file, not once per epoch
    for reason in set(bad.values()):
        assert f"{reason} × 2" in err  # every reason counted
    data = [r for r in read_metrics(result.metrics) if r.get("kind") == "data"]
    assert len(data) == 1 and data[0]["skipped_files"] == len(bad)
    assert data[0]["skipped_empty file"] == 2 and data[0]["skipped_not an image"] == 2
    assert data[0]["skipped_truncated or corrupt"] == 2
    train = [r for r in read_metrics(result.metrics) if r.get("kind") == "train"]
    assert data[0]["skipped_too large"] == 2
    assert len(train) == 2 * (49 // 8)  # full batches of the 49 good images: skipped files were topped up


def test_a_folder_of_only_bad_files_is_a_clear_error(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for i in range(8):
        (d / f"x{i}.png").write_bytes(b"" if i % 2 else b"not a png at all")
    cfg = tiny_config(tmp_path / "run", data=str(d), img_size=8, batch_size=4, subset=None, epochs=1, method="mae")
    # The same "N files skipped: reason × count" report as partial skips, never a batch-size message,
    # and before the run folder exists.
    with pytest.raises(DataError, match=r"no readable image among 8 files \(8 files skipped: "
                                         r"(empty file × 4, not an image × 4|not an image × 4, empty file × 4)\)"):
        Trainer(cfg).fit()
    assert not (tmp_path / "run").exists()


# =============================================================================================
# Numerical faults: a non-finite batch or loss skips the step for both parts, logged; repeats stop the run


class Recorder:
    """A trainer callback that keeps the weights and the optimiser state after every iteration."""

    def __init__(self, trainer):
        self.trainer = trainer  # the run view passed to callbacks has no optimisers
        self.after = {0: self.snapshot(trainer)}
        self.metrics = {}

    @staticmethod
    def snapshot(t):
        opt = {f"mae/{k}": v.clone() for k, v in _opt_tensors(t.opt_mae).items()}
        if t.opt_masker is not None:
            opt.update({f"masker/{k}": v.clone() for k, v in _opt_tensors(t.opt_masker).items()})
        return {"mae": weights_of(t.mae), "masker": weights_of(t.masker), "opt": opt}

    def on_step(self, run, metrics):
        self.after[run.iteration] = self.snapshot(self.trainer)
        self.metrics[run.iteration] = dict(metrics)

    def on_epoch_end(self, trainer):
        pass


def _opt_tensors(opt) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items() if torch.is_tensor(v)}


def poison_batches(trainer, at: set[int], value: float) -> None:
    """Replace the batches of the given (1-based) iterations with ones holding a NaN or Inf."""
    real = trainer.batches.epoch

    def epoch(*args, **kwargs):
        for imgs in real(*args, **kwargs):
            if trainer.position.iteration + 1 in at:
                imgs = imgs.clone()
                imgs[0, 0, 0, 0] = value
            yield imgs

    trainer.batches.epoch = epoch


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_batch_skips_the_step_for_both_parts_and_is_logged(tmp_path, value):
    trainer = Trainer(tiny_config(tmp_path / "run", epochs=1))
    rec = Recorder(trainer)
    trainer.callbacks.append(rec)
    poison_batches(trainer, {2}, value)
    trainer.fit()
    assert rec.metrics[2].get("skipped") == 1.0 and "loss_mae" not in rec.metrics[2]
    assert equal(rec.after[2]["mae"], rec.after[1]["mae"]) and equal(rec.after[2]["masker"], rec.after[1]["masker"])
    assert equal(rec.after[2]["opt"], rec.after[1]["opt"])  # no moment, no weight decay either
    for i in (3, 4):  # ordinary steps after the warmup's lr=0 first step move both parts
        assert not equal(rec.after[i]["mae"], rec.after[i - 1]["mae"])
        assert not equal(rec.after[i]["masker"], rec.after[i - 1]["masker"])
    skips = [r for r in read_metrics(trainer.output_dir) if r.get("kind") == "skip"]
    assert len(skips) == 1 and skips[0]["what"] == "loss_mae" and skips[0]["step"] == 1
    assert read_training_state(trainer.output_dir / "checkpoint-last.pt")["skipped_steps"] == 1


def test_nonfinite_gradient_skips_the_step(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path / "run", epochs=1))
    rec = Recorder(trainer)
    trainer.callbacks.append(rec)
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, *a, **k: (torch.tensor(float("inf")) if trainer.position.iteration == 2
                                                 else real(params, *a, **k)))
    trainer.fit()
    assert rec.metrics[3].get("skipped") == 1.0
    assert equal(rec.after[3]["mae"], rec.after[2]["mae"]) and equal(rec.after[3]["masker"], rec.after[2]["masker"])
    assert [r["what"] for r in read_metrics(trainer.output_dir) if r.get("kind") == "skip"] == ["grad_norm"]


def test_nonfinite_masker_loss_skips_the_masker_update(tmp_path, monkeypatch):
    """The MAE step came first with a finite loss and stays; the masking module's update is dropped."""
    import clmae.maskers.clmae as trainer_module  # where the masking module's loss terms are assembled

    trainer = Trainer(tiny_config(tmp_path / "run", epochs=1))
    rec = Recorder(trainer)
    trainer.callbacks.append(rec)
    real = trainer_module.masker_loss_terms

    def terms(*args, **kwargs):
        out = real(*args, **kwargs)
        if trainer.position.iteration == 1:
            out["loss_div"] = out["loss_div"] * float("nan")
        return out

    monkeypatch.setattr(trainer_module, "masker_loss_terms", terms)
    trainer.fit()
    assert rec.metrics[2].get("skipped") == 1.0
    assert equal(rec.after[2]["masker"], rec.after[1]["masker"])
    assert not equal(rec.after[2]["mae"], rec.after[1]["mae"])
    assert [r["what"] for r in read_metrics(trainer.output_dir) if r.get("kind") == "skip"] == ["loss_masker"]


def test_repeated_bad_batches_stop_the_run_with_the_last_good_state_saved(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", epochs=2, max_nonfinite=3))
    rec = Recorder(trainer)
    trainer.callbacks.append(rec)
    poison_batches(trainer, set(range(6, 100)), float("nan"))
    with pytest.raises(TrainingDiverged, match=r"3 non-finite steps in a row.*--resume"):
        trainer.fit()
    state = read_training_state(trainer.output_dir / "checkpoint-last.pt")
    saved = read_weights(trainer.output_dir / "checkpoint-last.safetensors")[0]
    # Iterations 1-5 trained, 6-8 were skipped: the checkpoint holds the weights after iteration 5.
    assert equal({f"0.{k[4:]}": v for k, v in saved.items() if k.startswith("mae.")}, rec.after[5]["mae"])
    assert equal({f"0.{k[7:]}": v for k, v in saved.items() if k.startswith("masker.")}, rec.after[5]["masker"])
    assert equal({f"0.{k[4:]}": v for k, v in state["weights"].items() if k.startswith("mae.")}, rec.after[5]["mae"])
    assert state["skipped_steps"] == 3 and state["iteration"] == 7
    skips = [r for r in read_metrics(trainer.output_dir) if r.get("kind") == "skip"]
    assert [(s["step"], s["in_a_row"]) for s in skips] == [(5, 1), (6, 2), (7, 3)]


def test_repeated_masker_faults_also_stop_the_run(tmp_path, monkeypatch):
    """A masking module that keeps producing non-finite losses must not be trained around forever."""
    import clmae.maskers.clmae as trainer_module  # where the masking module's loss terms are assembled

    trainer = Trainer(tiny_config(tmp_path / "run", epochs=2, max_nonfinite=3))
    rec = Recorder(trainer)
    trainer.callbacks.append(rec)
    real = trainer_module.masker_loss_terms

    def terms(*args, **kwargs):
        out = real(*args, **kwargs)
        if trainer.position.iteration >= 5:
            out["loss_rec"] = out["loss_rec"] * float("nan")
        return out

    monkeypatch.setattr(trainer_module, "masker_loss_terms", terms)
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
        trainer.fit()
    saved = read_weights(trainer.output_dir / "checkpoint-last.safetensors")[0]
    assert equal({f"0.{k[7:]}": v for k, v in saved.items() if k.startswith("masker.")}, rec.after[5]["masker"])
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert [r["in_a_row"] for r in read_metrics(trainer.output_dir) if r.get("kind") == "skip"] == [1, 2, 3]


# =============================================================================================
# Config validation: every option checked up front, the message names the option and the range


BAD_VALUES = [
    ("data", 3, "a value of type str"), ("data_dir", 3, "a value of type str"), ("subset", 0, ">= 1"),
    ("img_size", 0, "a positive integer"), ("num_workers", -2, ">= 0, or -1"),
    ("prefetch", 0, "an integer >= 1"), ("augment_on", "gpu", "'workers' or 'device'"),
    ("decode_on", "gpu", "'workers' or 'device'"), ("threads", 0, "an integer >= 1"),
    ("method", "bert", "'clmae', 'mae', 'block', 'hpm', 'attmask', 'colormae', 'sbam' or 'automae'"),
    ("model", "vit_nope", "one of vit_base_patch16_224"), ("patch_size", 0, "a positive integer"),
    ("norm_pix_loss", "yes", "type bool"), ("mask_ratio", 0.0, "strictly between 0 and 1"),
    ("mask_ratio", 1.0, "strictly between 0 and 1"), ("mask_ratio", float("nan"), "strictly between 0 and 1"),
    ("init_from", 5, "a value of type str"), ("curriculum", "random", "'official', 'linear'"),
    ("curriculum_value", float("inf"), "a finite number"), ("lambda_gauss", -1.0, "a finite number >= 0"),
    ("lambda_kl", float("nan"), "a finite number >= 0"), ("lambda_div", float("inf"), "a finite number >= 0"),
    ("kl_reduction", "max", "'sum' or 'mean'"), ("masker_every", 0, ">= 1"),
    ("masker_batch_fraction", 0.0, "in (0, 1]"), ("masker_batch_fraction", 1.5, "in (0, 1]"),
    ("soft_path", "drop", "'scale', 'hide' or 'hide_st'"),
    ("block_min_patches", 0, "an integer >= 1"), ("block_max_patches", 0, ">= --block-min-patches"),
    ("block_min_aspect", 0.0, "in (0, 1]"), ("block_min_aspect", 3.0, "in (0, 1]"), ("hpm_hard_max", 1.5, "in [0, 1]"),
    ("hpm_loss_weight", -1.0, "a finite number >= 0"), ("hpm_ema_decay", 1.5, "in [0, 1]"),
    ("hpm_ema_decay_end", float("nan"), "in [0, 1]"), ("hpm_ema_ramp_epochs", -1.0, "a finite number >= 0"),
    ("attmask_prob", 2.0, "in [0, 1]"), ("attmask_momentum", -0.1, "in [0, 1]"),
    ("attmask_variant", "hint", "'high' or 'low'"),
    ("colormae_color", "pink", "'white', 'red', 'blue', 'green' or 'purple'"),
    ("colormae_sigma_red", 0.0, "a finite number > 0"), ("colormae_sigma_blue", float("inf"), "a finite number > 0"),
    ("colormae_sigma_green_inner", -1.0, "a finite number > 0"),
    ("colormae_sigma_green_outer", 0.5, "a number > --colormae-sigma-green-inner (0.6)"),
    ("colormae_passes", 0, "an integer in [1, 16]"), ("colormae_textures", 300, "an integer in [1, 256]"),
    ("colormae_texture_size", 4, "0 (automatic) or an integer in [8, 4096]"),
    ("colormae_noise_seed", -1, "an integer >= 0"),
    ("sbam_ratio_var", 0.5, "a number in [0, 0.5)"), ("sbam_delta", 1.0, "a number in [0, 1)"),
    ("sbam_noise", float("nan"), "a finite number >= 0"), ("sbam_start_epoch", -1.0, "a finite number >= 0"),
    ("automae_mask_factor", -0.5, "a finite number >= 0"), ("automae_adv_weight", float("inf"), "a finite number >= 0"),
    ("automae_tau", 0.0, "a finite number > 0"), ("automae_objective", "gan", "'official' or 'adversarial'"),
    ("automae_rec_weight", -1.0, "a finite number >= 0"), ("automae_scorer", "teacher", "'ema', 'init' or 'online'"),
    ("automae_scorer_momentum", 1.5, "a number in [0, 1]"),
    ("automae_rect_value", float("nan"), "a finite number >= 0"),
    ("epochs", 0, ">= 1"), ("epochs", 2.5, "type int"), ("epochs", True, "type int"),
    ("epochs", float("inf"), "type int"),
    ("batch_size", 0, ">= 1"), ("accum_iter", 0, ">= 1"), ("base_lr", 0.0, "a finite positive number"),
    ("base_lr", float("inf"), "a finite positive number"), ("lr", -1e-3, "a finite positive number"),
    ("lr", float("nan"), "a finite positive number"), ("min_lr", -1.0, "a finite number >= 0"),
    ("warmup_epochs", 99.0, "between 0 and --epochs (30)"), ("weight_decay", float("inf"), "a finite number >= 0"),
    ("seed", -1, "[0, 2**32)"), ("seed", 2**40, "[0, 2**32)"), ("device", 0, "a value of type str"),
    ("precision", "fp8", "'auto', 'fp32', 'bf16' or 'fp16'"),
    ("output_dir", 1, "a value of type str"), ("resume", 1, "a value of type str"), ("save_every", -1, ">= 0"),
    ("log_every", 0, ">= 1"), ("eval_every", -1, ">= 0"), ("max_nonfinite", 0, ">= 1"), ("compile", 1, "type bool"),
    ("probe_every", -5, ">= 0"), ("probe_images", 1, ">= 2"), ("snapshot_every", -1, ">= 0"),
    ("progress", "no", "type bool"),
]


@pytest.mark.parametrize("option, value, allowed", BAD_VALUES, ids=[f"{o}={v!r}" for o, v, _ in BAD_VALUES])
def test_bad_option_value_is_rejected_naming_the_option_and_range(option, value, allowed):
    method = {"method": option_owners()[option][0]} if option in option_owners() else {}  # a strategy's own option
    with pytest.raises(ConfigError) as info:
        make_config({**method, option: value})
    msg = str(info.value)
    assert msg.startswith(f"--{option.replace('_', '-')}: got "), msg
    assert allowed in msg and "\n" not in msg, msg


def test_every_option_has_a_bad_value_in_the_table():
    covered = {o for o, _, _ in BAD_VALUES}
    missing = sorted((set(FIELDS) | set(option_owners())) - covered)
    assert not missing, f"options without a validation test (add a row to BAD_VALUES): {missing}"


def test_unknown_option_and_good_defaults():
    with pytest.raises(ConfigError, match=r"unknown options \['mask_ration'\]"):
        make_config({"mask_ration": 0.5})
    cfg = make_config({"epochs": "3", "mask_ratio": 1 / 2, "seed": 2**32 - 1})  # YAML-ish values are coerced
    assert cfg.epochs == 3 and cfg.mask_ratio == 0.5
