"""Training in bf16 and fp16 on the CPU: the dtype paths a GPU takes, for every strategy and every tool after it.

bf16 autocast runs on the CPU (slowly), so every strategy is checked here the way it would run on an A100/H100;
fp16 autocast and ``torch.amp.GradScaler("cpu")`` exercise the loss scaling of older GPUs. Tolerances against
fp32, on the same weights, batch and masks: bf16 keeps 8 bits of mantissa (a relative rounding of 2^-9 per
value), fp16 11 bits; a loss of a few hundred such operations stays within :data:`TOLERANCE` (measured: bf16
at most 0.6%, fp16 0.06%, on vit_micro and digits).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from clmae import cli
from clmae.config import make_config
from clmae.errors import ConfigError
from clmae.io.checkpoint import read_training_state
from clmae.io.records import read_metrics
from clmae.maskers.attmask import cls_attention
from clmae.maskers.clmae import masker_loss_terms
from clmae.maskers.hpm import relative_loss
from clmae.models.mae import create_model, per_patch_error
from clmae.optim import make_optimizer
from clmae.runtime import autocast, resolve_precision
from clmae.train.trainer import Trainer

METHODS = ("mae", "block", "clmae", "hpm", "attmask")
TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3}  # relative, first step against fp32 (see the module docstring)
TINY = dict(data="digits", model="vit_micro_patch2_8", subset=32, batch_size=16, epochs=2, device="cpu",
            num_workers=0, progress=False, probe_every=0, snapshot_every=0, log_every=1)


def tiny_trainer(out, **options) -> Trainer:
    return Trainer(make_config({**TINY, "output_dir": str(out), **options}))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{p}.{k}": v.detach().clone() for p, m in (("mae", trainer.mae), ("masker", trainer.masker))
            for k, v in m.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resume(folder) -> Trainer:
    options = {"resume": str(folder), "progress": False}
    return Trainer(make_config(options), overrides=options)


class StopAfterFirstEpoch:
    def on_step(self, run, metrics) -> None:
        pass

    def on_epoch_end(self, run) -> None:
        run.request_stop()


# ---------------------------------------------------------------------------------------------
# The rule


def test_auto_precision_follows_the_device(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    for capability, expected in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((6, 0), "fp16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_precision("auto", torch.device("cuda")) == expected, capability
    with pytest.raises(ConfigError, match=r"--precision: got 'fp8'"):
        resolve_precision("fp8", cpu)
    assert isinstance(autocast(cpu), type(autocast(cpu, "fp32")))  # the CPU default: no autocast
    with autocast(cpu, "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_fp16_where_torch_cannot_is_one_clear_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import clmae.runtime

    monkeypatch.setattr(clmae.runtime, "_fp16_works", lambda device_type: False)
    out = tmp_path / "run"
    rc = cli.main(["pretrain", "--precision", "fp16", "--device", "cpu", "--epochs", "1", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("clmae: error: --precision fp16: this PyTorch"), err
    assert "use --precision bf16 or fp32" in err[0] and not out.exists()


# ---------------------------------------------------------------------------------------------
# Every strategy: the first step against fp32, a run, a resume


def first_step(trainer: Trainer) -> tuple[dict[str, float], torch.Tensor]:
    """The losses of the MAE step and of the strategy's own step on the run's first batch, at the starting
    weights, and the kept indices the strategy chose (the generator rewound, so the steps draw the same)."""
    imgs = next(iter(trainer.batches.epoch(0)))
    batch = trainer.masking_batch(imgs, trainer.progress())
    state = trainer.generator.get_state()
    with trainer.autocast_context(), torch.no_grad():
        keep = trainer.masker.keep_indices(batch)
    trainer.generator.set_state(state)
    losses = dict(trainer.mae_step(batch))
    if trainer.masker.has_own_step:
        losses.update(trainer.strategy_step(trainer.masking_batch(imgs, trainer.progress())))
    return losses, keep


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_first_step_losses_are_close_to_fp32_with_the_right_masks(tmp_path, method, precision):
    reference, keep32 = first_step(tiny_trainer(tmp_path / "fp32", method=method, precision="fp32"))
    trainer = tiny_trainer(tmp_path / precision, method=method, precision=precision)
    assert trainer.precision == precision
    losses, keep = first_step(trainer)
    assert losses.keys() == reference.keys() and "loss_mae" in losses
    for key, value in reference.items():
        assert math.isfinite(losses[key]), key
        assert abs(losses[key] - value) <= TOLERANCE[precision] * max(abs(value), 1e-3), (key, losses[key], value)
    n, num_keep = keep32.shape
    assert keep.shape == (n, num_keep) == (16, trainer.mae.num_keep(trainer.cfg.mask_ratio))
    assert all(len(set(row.tolist())) == num_keep for row in keep)  # distinct patches, each row
    assert int(keep.min()) >= 0 and int(keep.max()) < trainer.mae.num_patches


@pytest.mark.parametrize("method", METHODS)
def test_bf16_runs_every_strategy_with_finite_losses_and_resumes_exactly(tmp_path, method):
    full = tiny_trainer(tmp_path / "full", method=method, precision="bf16")
    full.fit()
    records = [r for r in read_metrics(full.output_dir) if r["kind"] == "train"]
    assert len(records) == 4 and all(math.isfinite(r["loss_mae"]) and "skipped" not in r for r in records)
    assert json.loads((full.output_dir / "config.json").read_text())["precision"] == "bf16"
    part = tiny_trainer(tmp_path / "part", method=method, precision="bf16")
    part.callbacks.append(StopAfterFirstEpoch())
    part.fit()
    assert part.position.epoch == 1
    resumed = resume(tmp_path / "part")
    assert resumed.precision == "bf16"
    resumed.fit()
    assert resumed.position.iteration == full.position.iteration == 4
    assert same(weights(resumed), weights(full))


@pytest.mark.parametrize("method", ["mae", "clmae", "hpm"])
def test_fp16_keeps_both_loss_scales_in_the_checkpoint_and_resumes_exactly(tmp_path, method):
    full = tiny_trainer(tmp_path / "full", method=method, precision="fp16")
    full.fit()
    state = read_training_state(full.output_dir / "checkpoint-last.pt")
    own = method == "clmae"  # a strategy with a step of its own has a scaler of its own
    assert ("scaler_masker" in state) == own and state["scaler_mae"]["scale"] == full.scaler_mae.get_scale()
    records = [r for r in read_metrics(full.output_dir) if r["kind"] == "train"]
    assert all(math.isfinite(r["loss_mae"]) for r in records) and "loss_scale_mae" in records[0]
    part = tiny_trainer(tmp_path / "part", method=method, precision="fp16")
    part.callbacks.append(StopAfterFirstEpoch())
    part.fit()
    resumed = resume(tmp_path / "part")
    saved = read_training_state(tmp_path / "part" / "checkpoint-last.pt")["scaler_mae"]
    assert resumed.scaler_mae.get_scale() == saved["scale"]
    resumed.fit()
    assert same(weights(resumed), weights(full))
    assert resumed.scaler_mae.state_dict() == full.scaler_mae.state_dict()
    if own:
        assert resumed.scaler_masker.state_dict() == full.scaler_masker.state_dict()


# ---------------------------------------------------------------------------------------------
# Loss scaling: an overflow is skipped and logged, never counted as non-finite


def fused(trainer: Trainer) -> Trainer:
    """The CUDA optimisers (fused AdamW, which skips on the device) on the CPU: the GPU's code path."""
    trainer.opt_mae = make_optimizer(trainer.mae, trainer.lr, trainer.cfg.weight_decay, trainer.device, fused=True)
    trainer.opt_masker = make_optimizer(trainer.masker, trainer.lr, trainer.cfg.weight_decay, trainer.device,
                                        fused=True)
    assert trainer.decides_on_device
    return trainer


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("part", ["mae", "masker"])
def test_an_fp16_overflow_is_skipped_logged_and_never_counted_as_nonfinite(tmp_path, path, part):
    trainer = tiny_trainer(tmp_path / "run", method="clmae", precision="fp16", max_nonfinite=1, epochs=1, subset=48)
    if path == "device":
        fused(trainer)
    scaler = trainer.scaler_mae if part == "mae" else trainer.scaler_masker
    other = trainer.scaler_masker if part == "mae" else trainer.scaler_mae
    for s in (scaler, other):  # no overflow at a modest scale, an injected one at 2^60 (inf in fp16 gradients)
        s.load_state_dict({**s.state_dict(), "scale": 2.0**60 if s is scaler else 2.0**8})
    before = weights(trainer)
    batches = iter(trainer.batches.epoch(0))
    metrics = trainer.train_step([next(batches)], lr=1e-3)
    trainer.position.iteration += 1
    assert metrics["skipped"] == 1.0 and math.isfinite(metrics["loss_mae"])
    after = weights(trainer)
    moved = {p: not same({k: v for k, v in after.items() if k.startswith(p)},
                         {k: v for k, v in before.items() if k.startswith(p)}) for p in ("mae.", "masker.")}
    # The MAE's overflow skips its update and leaves the batch trusted for the masking step; the masking
    # module's overflow skips only its own update.
    assert moved == {"mae.": part == "masker", "masker.": part == "mae"}
    assert scaler.get_scale() == 2.0**59 and other.get_scale() == 2.0**8  # only the overflowing scale backs off
    trainer.train_step([next(batches)], lr=1e-3)  # a second overflow in a row: max_nonfinite=1 does not stop it
    trainer.position.iteration += 1
    trainer.checks.flush()
    skips = [r for r in read_metrics(trainer.output_dir) if r.get("kind") == "skip"]
    assert [(r["what"], r["part"], r["step"]) for r in skips] == [("overflow", part, 0), ("overflow", part, 1)]
    assert trainer.position.skipped_steps == 0 and trainer.checks.in_a_row == 0 and scaler.get_scale() == 2.0**58
    scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**8})
    stuck = weights(trainer)
    metrics = trainer.train_step([next(batches)], lr=1e-3)  # a scale that fits: the part trains again
    assert "skipped" not in metrics
    prefix = f"{part}."
    assert not same({k: v for k, v in weights(trainer).items() if k.startswith(prefix)},
                    {k: v for k, v in stuck.items() if k.startswith(prefix)})


# ---------------------------------------------------------------------------------------------
# What the papers compute in fp32 stays fp32 under autocast


def test_losses_the_papers_compute_in_fp32_stay_fp32_under_bf16_autocast(tmp_path):
    trainer = tiny_trainer(tmp_path / "run", method="clmae", precision="bf16", norm_pix_loss=True)
    masker, mae = trainer.masker, trainer.mae
    imgs = next(iter(trainer.batches.epoch(0)))
    batch = trainer.masking_batch(imgs, trainer.progress())
    dtypes = {}

    def seen(name):
        def hook(module, inputs, output) -> None:
            dtypes.setdefault(name, output.dtype)
        return hook

    masker.network.blocks[0].mlp.fc1.register_forward_hook(seen("block"))
    masker.network.head.register_forward_hook(seen("head"))
    with trainer.autocast_context():
        scores = masker(batch.tokens)
        target = mae.target(batch.imgs)
        out = mae(batch.imgs, masker.keep_indices(batch))
        error = per_patch_error(out["pred"], target)
        terms = masker_loss_terms(error, scores, masker.options, trainer.cfg.mask_ratio)
        _, logs = masker.own_step_terms(batch)
        hidden = out["mask"]
        ranking = relative_loss(out["pred"].mean(-1), error.detach(), hidden, batch.num_hidden)
        attention = cls_attention(mae, batch.imgs)
    assert dtypes == {"block": torch.bfloat16, "head": torch.float32}  # autocast is on; the scoring head is not
    assert out["pred"].dtype == torch.bfloat16  # the decoder ran in bf16 ...
    for name, t in {"scores": scores, "target (per-patch normalised)": target, "mae loss": out["loss"],
                    "per-patch error": error, "ranking loss": ranking, "attention": attention,
                    **terms, **logs}.items():
        assert t.dtype == torch.float32, name  # ... and these are fp32
    assert relative_loss(out["pred"].mean(-1), error.detach(), hidden) == ranking  # the count passed = the one read


# ---------------------------------------------------------------------------------------------
# The tools after training, on a bf16-trained checkpoint


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "run"
    tiny_trainer(out, method="clmae", precision="bf16", epochs=1, subset=64, probe_every=2, snapshot_every=1,
                 probe_images=4).fit()
    return out


EVAL_ALL = ["eval", "all", "--protocols", "knn,linear,fewshot,finetune", "--max-train", "64", "--max-test", "32",
            "--linear-epochs", "2", "--linear-min-steps", "10", "--fewshot-shots", "1", "--fewshot-draws", "1",
            "--fewshot-steps", "10", "--finetune-epochs", "1", "--finetune-batch-size", "16", "--num-workers", "0",
            "--device", "cpu", "--no-progress", "--no-random-reference", "--no-feature-cache"]


@pytest.mark.parametrize("evaluated_in", ["fp32", "bf16"])
def test_every_evaluation_protocol_runs_on_a_bf16_trained_checkpoint(bf16_run, tmp_path, monkeypatch, evaluated_in):
    """Evaluation computes in the device's default (fp32 on the CPU, bf16 on GPUs that have it); ``bf16``
    forces that default on the CPU, so feature extraction and fine-tuning take the GPU's dtype path."""
    import clmae.runtime

    run = tmp_path / "run"
    shutil.copytree(bf16_run, run)  # eval all writes its reports into the run folder
    monkeypatch.setattr(clmae.runtime, "default_precision", lambda device: evaluated_in)
    assert cli.main([*EVAL_ALL, "--checkpoint", str(run)]) == 0
    reports = {p: json.loads(next(run.glob(f"eval-{p}-*.json")).read_text())
               for p in ("knn", "linear", "fewshot", "finetune")}
    for protocol, report in reports.items():
        values = [v for v in report["results"]["pretrained"].values() if isinstance(v, float)]
        assert values and all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in values), (protocol, values)


def test_visualize_report_and_export_run_on_a_bf16_trained_checkpoint(bf16_run, tmp_path):
    picture, html, export = tmp_path / "masks.png", tmp_path / "report.html", tmp_path / "timm"
    assert cli.main(["visualize", "--checkpoint", str(bf16_run), "--num-images", "2", "--device", "cpu",
                     "--output", str(picture)]) == 0
    assert cli.main(["report", str(bf16_run), "--output", str(html)]) == 0
    assert cli.main(["export", "--checkpoint", str(bf16_run), "--format", "timm", "--output", str(export)]) == 0
    assert picture.stat().st_size > 0 and "<html" in html.read_text().lower() and any(export.iterdir())


# ---------------------------------------------------------------------------------------------
# The command, on a 28 px grayscale npz


@pytest.fixture(scope="module")
def npz28(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("npz") / "small28.npz"
    np.savez(path, x_train=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, 16))
    return path


@pytest.mark.parametrize("method", METHODS)
def test_pretrain_in_bf16_on_a_28px_npz_for_every_method(npz28, tmp_path, method, capsys):
    """The npz path (grayscale 28 px, resized) in bf16. The micro model at 16 px keeps it to seconds: this CPU
    emulates bf16, and the model the data would choose (vit_tiny_patch4_28) takes 40 s for two CL-MAE iterations."""
    out = tmp_path / "run"
    rc = cli.main(["pretrain", "--data", str(npz28), "--method", method, "--precision", "bf16", "--device", "cpu",
                   "--model", "vit_micro_patch2_8", "--img-size", "16", "--epochs", "1", "--batch-size", "8",
                   "--no-progress", "--probe-every", "0", "--snapshot-every", "0", "--num-workers", "0",
                   "--output-dir", str(out)])
    assert rc == 0
    header = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"clmae: {method} on")]
    assert header and "28 px, gray" in header[0] and "device cpu, bf16" in header[0], header
    info = json.loads((out / "config.json").read_text())
    assert info["precision"] == "bf16" and info["run_config"]["precision"] == "bf16"
    assert all(math.isfinite(r["loss_mae"]) for r in read_metrics(out) if r["kind"] == "epoch")


def test_fp16_pretrain_runs_on_the_cpu(tmp_path):
    """``--precision fp16 --device cpu`` runs where torch has fp16 autocast and GradScaler('cpu') (torch >= 2.4 on
    x86: it does here); the other case is the one-line error tested above."""
    out = tmp_path / "run"
    assert cli.main(["pretrain", "--precision", "fp16", "--device", "cpu", "--epochs", "1", "--subset", "32",
                     "--batch-size", "16", "--no-progress", "--probe-every", "0", "--output-dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["precision"] == "fp16"


def test_a_model_built_under_autocast_keeps_fp32_weights():
    """Autocast changes what the operations compute in, never the parameters (fp32 master weights)."""
    model = create_model("vit_micro_patch2_8")
    with autocast(torch.device("cpu"), "bf16"):
        model(torch.randn(2, model.config.in_chans, 8, 8), torch.arange(4).expand(2, 4))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
