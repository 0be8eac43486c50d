"""The CL-MAE iteration and the run: freezing, gradient paths, resume, datasets, learning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clmae.config import make_config
from clmae.io.records import read_metrics
from clmae.runtime import frozen
from clmae.train.trainer import Trainer, pretrain
from conftest import assert_same_weights, stopped_and_resumed


def tiny_trainer(tmp_path, **options) -> Trainer:
    values = dict(data="digits", subset=256, batch_size=32, epochs=2, progress=False, output_dir=str(tmp_path / "run"),
                  log_every=1)
    values.update(options)
    return Trainer(make_config(values))


def params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_each_step_updates_only_its_own_part(tmp_path):
    trainer = tiny_trainer(tmp_path)
    imgs = next(iter(trainer.batches.epoch(0)))
    seen = {}
    own_step_terms = trainer.masker.own_step_terms  # the strategy's public hook, observed

    def observed(batch):
        seen["mae_at_masker_step"] = params(trainer.mae)
        seen["masker_at_masker_step"] = params(trainer.masker)
        return own_step_terms(batch)

    trainer.masker.own_step_terms = observed
    mae0, masker0 = params(trainer.mae), params(trainer.masker)
    trainer.train_step([imgs], lr=1e-3)
    # MAE step first: the MAE moved, the masking module did not.
    assert not same(mae0, seen["mae_at_masker_step"])
    assert same(masker0, seen["masker_at_masker_step"])
    # Masking-module step: the MAE did not move; the masking module moved.
    assert same(seen["mae_at_masker_step"], params(trainer.mae))
    assert not same(masker0, params(trainer.masker))


def test_each_steps_backward_reaches_only_its_own_part(tmp_path):
    """The public steps, one at a time: the MAE step gives the masking module no gradient, and the masking
    module's step gives the MAE none (``backward(inputs=...)``, the MAE frozen)."""
    trainer = tiny_trainer(tmp_path)
    imgs = next(iter(trainer.batches.epoch(0)))
    assert "loss_mae" in trainer.mae_step(trainer.masking_batch(imgs, trainer.progress()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.mae.parameters())
    assert all(p.grad is None for p in trainer.masker.parameters())
    trainer.opt_mae.zero_grad(set_to_none=True)
    assert "loss_masker" in trainer.strategy_step(trainer.masking_batch(imgs, trainer.progress()))
    assert all(p.grad is None for p in trainer.mae.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.masker.parameters())


def test_masker_gradient_flows_only_through_the_scores(tmp_path):
    """d loss/d θ equals (d loss/d s)·(d s/d θ): the scores are the only path into the masking module."""
    trainer = tiny_trainer(tmp_path)
    masker = trainer.masker
    imgs = next(iter(trainer.batches.epoch(0)))
    batch = trainer.masking_batch(imgs, 0.5)
    theta = list(masker.parameters())

    def loss_of(scores):
        with frozen(trainer.mae):
            return masker.objective(batch, scores)[0]

    scores = masker(batch.tokens)
    direct = torch.autograd.grad(loss_of(scores), theta)
    scores = masker(batch.tokens)
    leaf = scores.detach().requires_grad_(True)
    g_scores = torch.autograd.grad(loss_of(leaf), leaf)[0]
    chained = torch.autograd.grad(scores, theta, grad_outputs=g_scores)
    for a, b in zip(direct, chained):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert any(float(g.abs().sum()) > 0 for g in direct)


def test_mae_method_has_no_masking_module(tmp_path):
    trainer = tiny_trainer(tmp_path, method="mae", epochs=1)
    assert not trainer.masker.learnable and trainer.opt_masker is None
    result = trainer.fit()
    record = [r for r in read_metrics(result.metrics) if r["kind"] == "train"][0]
    assert "loss_mae" in record and "loss_rec" not in record


def test_metrics_have_all_terms_and_checkpoints_exist(tmp_path):
    result = pretrain(data="digits", subset=256, batch_size=32, epochs=2, progress=False, log_every=2,
                      output_dir=str(tmp_path / "run"))
    records = [r for r in read_metrics(result.metrics) if r["kind"] == "train"]
    needed = {"epoch", "step", "lr", "loss_mae", "curriculum_factor", "loss_rec", "loss_gauss", "loss_kl", "loss_div",
              "score_mean", "score_low_frac", "score_high_frac", "img_per_s"}
    assert needed <= set(records[0])
    assert {r["curriculum_factor"] for r in records} == {1.0, -1.0}  # official schedule, E=2
    assert result.weights.is_file() and result.checkpoint.is_file()
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["run_config"]["method"] == "clmae" and config["model_config"]["in_chans"] == 1
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["epoch"] == 2 and set(state) >= {"opt_mae", "opt_masker", "generator", "iteration"}


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    common = dict(data="digits", subset=192, batch_size=32, progress=False, seed=3, warmup_epochs=1)
    full = pretrain(epochs=3, output_dir=str(tmp_path / "full"), **common)
    # The same 3-epoch run, stopped after its first epoch (as a graceful stop would), then resumed.
    resumed = stopped_and_resumed(common, 3, tmp_path / "part2")
    assert_same_weights(full.checkpoint, resumed.checkpoint)


def test_cifar10_slice_both_methods_learn(cifar_dir, tmp_path):
    """On a CIFAR-10 slice the MAE loss falls during the first epoch, for CL-MAE and for MAE."""
    for method in ("clmae", "mae"):
        result = pretrain(data="cifar10", data_dir=str(cifar_dir), method=method, subset=192, batch_size=16, epochs=1,
                          model="vit_tiny_patch4_32", progress=False, log_every=1, output_dir=str(tmp_path / method))
        losses = [r["loss_mae"] for r in read_metrics(result.metrics) if r["kind"] == "train"]
        assert len(losses) == 12
        assert np.mean(losses[-4:]) < np.mean(losses[:4]), (method, losses)


def test_image_folder_run_completes(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    result = pretrain(data=str(folder), model="vit_micro_patch2_8", img_size=16, batch_size=8, epochs=1,
                      num_workers=0, progress=False, output_dir=str(tmp_path / "run"))
    assert result.epochs_done == 1
    data_records = [r for r in read_metrics(result.metrics) if r["kind"] == "data"]
    assert data_records and data_records[0]["skipped_files"] >= 1
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["model_config"]["in_chans"] == 3 and state["model_config"]["img_size"] == 16


def test_every_strategy_of_a_seed_sees_the_same_crops_and_a_resumed_epoch_the_same_batches(tmp_path):
    """Augmentation has its own random stream per (seed, epoch, step): the masking never shifts it."""
    batches = {}
    for method, draws in (("mae", 3), ("clmae", 0), ("block", 7)):
        trainer = tiny_trainer(tmp_path / method, method=method, subset=128)
        torch.rand(draws, generator=trainer.generator)  # the strategies have used the trainer's generator differently
        batches[method] = list(trainer.batches.epoch(1))
        resumed = list(trainer.batches.epoch(1, start_step=2))
        assert all(torch.equal(a, b) for a, b in zip(batches[method][2:], resumed, strict=True))
    assert len(batches["mae"]) == 4
    for method in ("clmae", "block"):
        assert all(torch.equal(a, b) for a, b in zip(batches["mae"], batches[method], strict=True))
    assert not torch.equal(batches["mae"][0], batches["mae"][1])
    other_seed = tiny_trainer(tmp_path / "seed1", method="mae", subset=128, seed=1)
    assert not torch.equal(next(iter(other_seed.batches.epoch(1))), batches["mae"][0])


def test_a_signal_during_the_final_save_is_handled_gracefully(tmp_path):
    """SIGINT while a stopped run saves its checkpoint (twice, as SLURM and torchrun deliver it): the save
    finishes, fit returns, and the command's exit code says SIGINT."""
    import os
    import signal

    trainer = tiny_trainer(tmp_path, subset=64, epochs=2, method="mae")
    original = trainer.save_checkpoint

    def save_with_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same signal delivered again within 2 s counts once
        return original(*args, **kwargs)

    class StopAfterOneStep:
        def on_step(self, run, metrics):
            run.request_stop()

        def on_epoch_end(self, run):
            pass

    trainer.callbacks.append(StopAfterOneStep())
    trainer.save_checkpoint = save_with_signal
    result = trainer.fit()  # before the fix: KeyboardInterrupt from the default handler
    assert (result.stopped_by, result.exit_code) == ("request_stop", 128 + signal.SIGINT)
    assert trainer.position.iteration == 1 and (trainer.output_dir / "checkpoint-last.pt").is_file()


def _window_with_a_bad_second_micro_step(tmp_path, name, method, factor, in_masker_step):
    """Two micro-steps of one accumulation window; the second one's loss (MAE or masking module) times ``factor``."""
    trainer = tiny_trainer(tmp_path / name, method=method, subset=64, batch_size=16, accum_iter=2)
    calls = []
    if in_masker_step:
        inner = trainer.masker.own_step_terms

        def scaled(*args, **kwargs):
            loss, logs = inner(*args, **kwargs)
            calls.append(1)
            return (loss * factor, logs) if len(calls) == 2 else (loss, logs)

        trainer.masker.own_step_terms = scaled
    else:
        inner = trainer.mae_forward

        def scaled(*args, **kwargs):
            out = inner(*args, **kwargs)
            calls.append(1)
            return {**out, "loss": out["loss"] * factor} if len(calls) == 2 else out

        trainer.mae_forward = scaled
    batches = iter(trainer.batches.epoch(0))
    return trainer, trainer.train_step([next(batches), next(batches)], lr=1e-3)  # one iteration, two micro-steps


def test_a_non_finite_loss_late_in_an_accumulation_window_keeps_the_earlier_gradients(tmp_path):
    """A non-finite loss is never backpropagated, so the window's earlier gradients are clean: the window's
    update is the one a zero-gradient second micro-step gives (before: the first micro-step's gradient was dropped)."""
    for method, in_masker_step in (("mae", False), ("clmae", True)):
        bad, bad_metrics = _window_with_a_bad_second_micro_step(tmp_path, f"{method}-nan", method, float("nan"),
                                                                in_masker_step)
        ref, _ = _window_with_a_bad_second_micro_step(tmp_path, f"{method}-zero", method, 0.0, in_masker_step)
        assert bad_metrics.get("skipped") == 1.0 and bad.position.skipped_steps == 1  # the second micro-step only
        assert bad.position.masker_updates == ref.position.masker_updates == (1 if in_masker_step else 0)
        assert same(params(bad.mae), params(ref.mae)), method
        assert same(params(bad.masker), params(ref.masker)), method
        fresh = tiny_trainer(tmp_path / f"{method}-fresh", method=method, subset=64, batch_size=16, accum_iter=2)
        part = bad.masker if in_masker_step else bad.mae
        assert not same(params(part), params(fresh.masker if in_masker_step else fresh.mae))  # the update happened


def test_epoch_record_console_line_and_probe_snapshot_give_the_schedule_of_the_epochs_last_step(tmp_path, capsys):
    """One notion, the values the epoch's last training step used: λ moves every step under the linear curriculum."""
    import math

    from clmae.viz.probe import read_snapshots

    trainer = tiny_trainer(tmp_path, subset=64, batch_size=16, curriculum="linear", probe_every=1, snapshot_every=1,
                           probe_images=4)
    trainer.fit()
    records = read_metrics(trainer.output_dir)
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = len(trainer.batches)
    assert [r["step"] for r in epochs] == [steps, 2 * steps]
    _, snaps = read_snapshots(trainer.output_dir)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    for e, record in enumerate(epochs):
        lam = train[record["step"]]["curriculum_factor"]  # what the last step of the epoch trained with
        assert record["curriculum_factor"] == lam and math.isfinite(lam)
        assert f"λ {lam:+.2f}" in lines[e]
        snap = snaps[e + 1]  # snapshot 0 is before training
        assert snap["epoch"] == e + 1 and snap["curriculum_factor"] == lam
        assert snap["progress"] == e + (steps - 1) / steps
    assert snaps[0]["progress"] == 0.0 and snaps[0]["curriculum_factor"] == 1.0


def test_gradient_accumulation_of_two_halves_equals_one_batch_of_both(tmp_path):
    """``--accum-iter 2`` with batch B is one batch of 2B: the same images and masks give the same loss and the
    same gradient at the optimiser step (the mean over equal halves is the mean of their means)."""
    from clmae.maskers import topk_keep_indices
    from clmae.models.layers import patchify

    one = tiny_trainer(tmp_path / "one", method="mae", subset=64, batch_size=32)
    two = tiny_trainer(tmp_path / "two", method="mae", subset=64, batch_size=16, accum_iter=2)
    two.mae.load_state_dict(one.mae.state_dict())
    x = next(iter(one.batches.epoch(0)))
    grads = {}
    for name, t in (("one", one), ("two", two)):
        # masks from the images' content, so both runs hide the same patches of every image
        t.masker.keep_indices = lambda b: topk_keep_indices(patchify(b.imgs, 2).sum(-1), b.num_keep)
        step = t.opt_mae.step

        def captured(*a, name=name, t=t, step=step, **k):
            grads[name] = [p.grad.clone() for p in t.mae.parameters()]
            return step(*a, **k)

        t.opt_mae.step = captured
    out_one = one.train_step([x], lr=1e-3)
    out_two = two.train_step([x[:16], x[16:]], lr=1e-3)
    assert out_two["loss_mae"] == pytest.approx(out_one["loss_mae"], rel=1e-6)
    for a, b in zip(grads["one"], grads["two"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)
    assert any(float(g.abs().sum()) > 0 for g in grads["one"])


def test_a_signal_during_the_end_of_epoch_save_stops_before_the_next_epoch_starts_a_step(tmp_path):
    """Ctrl-C while epoch 1's checkpoint is written (the trial's 224 px run): no step of epoch 2 may start; the run
    stops at the epoch boundary with that checkpoint, exit code 130."""
    import os
    import signal

    from clmae.io.checkpoint import read_training_state

    trainer = tiny_trainer(tmp_path, subset=64, batch_size=16, epochs=3, method="mae", probe_every=0)
    original, saves = trainer.save_checkpoint, []

    def save_with_signal(*args, **kwargs):
        saves.append(trainer.position.iteration)
        if len(saves) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    trainer.save_checkpoint = save_with_signal
    result = trainer.fit()
    assert (result.stopped_by, result.exit_code) == ("SIGINT", 130)
    assert (trainer.position.epoch, trainer.position.iteration) == (1, 4)  # before the fix: iteration 5
    state = read_training_state(trainer.output_dir / "checkpoint-last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["iteration"]) == (1, 0, 4)


def test_a_signal_while_a_batch_is_loaded_stops_before_that_step(tmp_path):
    """A signal that arrives while the next batch is prepared (DataLoader workers starting, decoding) is honoured
    before the step it would feed."""
    import os
    import signal

    trainer = tiny_trainer(tmp_path, subset=64, batch_size=16, epochs=2, method="mae", probe_every=0)
    real = trainer.batches

    class SignalOnSecondBatch:
        def __len__(self):
            return len(real)

        def __getattr__(self, name):
            return getattr(real, name)

        def epoch(self, epoch, start_step=0):
            for i, batch in enumerate(real.epoch(epoch, start_step)):
                if i == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

    trainer.batches = SignalOnSecondBatch()
    result = trainer.fit()
    assert (result.stopped_by, result.exit_code) == ("SIGTERM", 143)
    assert trainer.position.iteration == 1 and trainer.position.step_in_epoch == 1


def test_resuming_with_more_epochs_says_how_lambda_and_lr_change_at_that_point(tmp_path, capsys,
                                                                                stop_after_first_epoch):
    """λ and the learning rate are functions of the planned epochs: the note's 'before' values are what the planned
    run used at that iteration, its 'after' values what the resumed run uses."""
    common = dict(data="digits", subset=64, batch_size=16, method="clmae", probe_every=0, snapshot_every=0,
                  progress=False, log_every=1, device="cpu")
    full = pretrain(**common, epochs=2, output_dir=str(tmp_path / "full"))
    part = Trainer(make_config({**common, "epochs": 2, "output_dir": str(tmp_path / "part")}))
    part.callbacks.append(stop_after_first_epoch)
    part.fit()
    capsys.readouterr()
    resumed = pretrain(resume=str(tmp_path / "part"), epochs=4, progress=False)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "instead of the 2 the run planned" in ln]

    def at_iteration_5(metrics):
        return next(r for r in read_metrics(metrics) if r["kind"] == "train" and r["step"] == 5)

    planned, now = at_iteration_5(full.metrics), at_iteration_5(resumed.metrics)
    assert notes == [f"clmae: note: --epochs 4 instead of the 2 the run planned: the learning rate and the masking "
                     f"schedules follow the new length from epoch 1.00 on (the old plan → the new): λ "
                     f"{planned['curriculum_factor']:+.3f} → {now['curriculum_factor']:+.3f}, lr {planned['lr']:.4g} "
                     f"→ {now['lr']:.4g}; resume with --epochs 2 to keep the plan"], notes
    assert planned["curriculum_factor"] != now["curriculum_factor"] and planned["lr"] != now["lr"]


def test_a_large_training_process_gets_workers_from_a_fork_server_and_the_same_batches(tmp_path, monkeypatch,
                                                                                       capsys):
    """Workers forked from a large training process keep copies of every page it rewrites (benchmarks/
    worker_memory.py): such a process starts them from a fork server instead, which changes no batch."""
    import sys
    import types

    from clmae.data import loader

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    trainer = tiny_trainer(tmp_path, data=str(folder), model="vit_micro_patch2_8", img_size=16, batch_size=8, epochs=1,
                           num_workers=2, method="mae")
    monkeypatch.setattr(loader, "anonymous_mib", lambda: 100)
    assert loader.worker_context() is None  # small: forked, as before
    forked = list(trainer.batches.epoch(0))
    monkeypatch.setattr(loader, "anonymous_mib", lambda: 4096)
    assert loader.worker_context().get_start_method() == "forkserver"  # pytest runs as `python -m`: importable
    served = list(trainer.batches.epoch(0))
    assert len(forked) == len(served) == 3 and all(torch.equal(a, b) for a, b in zip(forked, served))

    script = tmp_path / "train.py"  # a script without a main guard: each worker would import it and train again
    script.write_text("import clmae\nclmae.pretrain(data='photos')\n")
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__file__=str(script), __spec__=None))
    assert loader.worker_context() is None and loader.worker_context() is None
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "DataLoader workers are forked" in ln]
    assert len(notes) == 1 and "(4096 MiB) because" in notes[0] and "guard" in notes[0]  # said once
    script.write_text("import clmae\n\nif __name__ == '__main__':\n    clmae.pretrain(data='photos')\n")
    assert loader.worker_context().get_start_method() == "forkserver"
