"""Seeing the curriculum: de-normalisation, the picture grid, the probe metrics, snapshots and the report."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from clmae import cli
from clmae.config import make_config
from clmae.data.datasets import load_dataset
from clmae.data.images import normalize, resize_images
from clmae.errors import ClmaeError
from clmae.io.records import read_metrics
from clmae.maskers import Masker, create_masker, topk_keep_indices
from clmae.models.layers import patchify, per_patch_target
from clmae.models.mae import create_model
from clmae.train.callbacks import RunView
from clmae.train.trainer import Trainer
from clmae.viz import pictures
from clmae.viz import report as report_mod
from clmae.viz import visualize as vis
from clmae.viz.probe import (
    CurriculumProbe,
    keep_overlap,
    pairwise_overlap,
    probe_batch,
    read_snapshots,
    score_entropy,
)

RUN = dict(data="digits", subset=64, batch_size=32, epochs=2, progress=False, log_every=1, seed=3)


class RecordingWriter:
    """Stands in for TensorBoard's SummaryWriter and records what it is given."""

    def __init__(self):
        self.images, self.scalars = [], []

    def add_image(self, tag, img, step, dataformats="CHW"):
        self.images.append((tag, np.asarray(img), step, dataformats))

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        pass


def weights(trainer):
    state = {f"mae.{k}": v.clone() for k, v in trainer.mae.state_dict().items()}
    state.update({f"masker.{k}": v.clone() for k, v in trainer.masker.state_dict().items()})
    return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same short CL-MAE run (2 epochs of 2 steps) twice: with the probe (every 2 steps, snapshot every
    epoch, a TensorBoard writer) and without any probe. Returns both trainers."""
    root = tmp_path_factory.mktemp("runs")
    probed = Trainer(make_config({**RUN, "output_dir": str(root / "probed"), "probe_every": 2, "snapshot_every": 1,
                                  "probe_images": 8}))
    probed.logger.tb = RecordingWriter()
    probed.fit()
    plain = Trainer(make_config({**RUN, "output_dir": str(root / "plain"), "probe_every": 0, "snapshot_every": 0}))
    assert not [cb for cb in plain.callbacks if isinstance(cb, CurriculumProbe)]  # (the console is one too)
    plain.fit()
    return probed, plain


# ---------------------------------------------------------------------------------------------
# De-normalisation


@pytest.mark.parametrize("channels", [1, 3])
def test_denormalize_inverts_normalize(channels):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, channels, 8, 8, generator=g)
    mean = torch.rand(channels, generator=g).tolist()
    std = (torch.rand(channels, generator=g) + 0.1).tolist()
    z = normalize(x, mean, std)
    assert not torch.allclose(z, x)
    assert torch.allclose(vis.denormalize(z, mean, std), x, atol=1e-6)


def test_norm_pix_unnormalisation_inverts_the_per_patch_normalisation():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    target = per_patch_target(x, 2, norm_pix=True)
    patches = patchify(x, 2)
    assert not torch.allclose(target, patches)
    assert torch.allclose(vis.unnormalize_patches(target, *vis.patch_stats(patches)), patches, atol=1e-5)


def test_visible_patch_statistics_never_read_hidden_pixels():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 8, 8, generator=g)
    mask = torch.zeros(1, 16)
    mask[0, [0, 5, 6, 15]] = 1  # hidden
    mean, std = vis.visible_patch_stats(patchify(x, 2), mask, grid=4)
    own_mean, own_std = vis.patch_stats(patchify(x, 2))
    visible = mask[0] == 0
    # Visible patches keep their own statistics ...
    assert torch.allclose(mean[0, visible], own_mean[0, visible])
    assert torch.allclose(std[0, visible], own_std[0, visible])
    # ... and changing the hidden pixels changes nothing at all.
    y = x.clone()
    hidden_pixels = pictures.pixel_mask(mask, 2).bool()
    y[hidden_pixels] = torch.randn(int(hidden_pixels.sum()), generator=g) * 10
    mean2, std2 = vis.visible_patch_stats(patchify(y, 2), mask, grid=4)
    assert torch.equal(mean, mean2) and torch.equal(std, std2)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_a_perfect_prediction_shows_the_original_image(norm_pix):
    """prediction → pixels undoes the dataset normalisation (and norm_pix's per-patch normalisation)."""
    mean, std = [0.3, 0.5, 0.4], [0.2, 0.25, 0.3]
    if norm_pix:
        # Every patch alike (a tiled pattern): statistics of the visible patches are exact for hidden ones.
        tile = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(3))
        images = tile.repeat(2, 1, 4, 4)
    else:
        images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    x = normalize(images, mean, std)
    pred = per_patch_target(x, 2, norm_pix)
    mask = torch.ones(2, 16)
    mask[:, [1, 7, 12, 14]] = 0
    out = vis.prediction_to_pixels(pred, x, mask, 2, norm_pix, mean, std, paste_visible=False)
    assert torch.allclose(out, images, atol=1e-4)
    # A wrong normalisation would not do: the test can tell.
    wrong = vis.prediction_to_pixels(pred, x, mask, 2, norm_pix, [0.0] * 3, [1.0] * 3, paste_visible=False)
    assert not torch.allclose(wrong, images, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# The grid


def _digits(n):
    ds = load_dataset("digits", split="test")
    return ds, resize_images(ds.images[:n], 8)


def _axes(fig):
    return {ax.get_label(): ax for ax in fig.axes}


@pytest.mark.parametrize("method,norm_pix", [("clmae", False), ("mae", False), ("clmae", True)])
def test_grid_layout_and_size(tmp_path, method, norm_pix):
    torch.manual_seed(0)
    mae = create_model("vit_micro_patch2_8", norm_pix_loss=norm_pix).eval()
    masker = create_masker("clmae", mae.config).eval() if method == "clmae" else None
    ds, images = _digits(3)
    fig = vis.visualize_model(mae, masker, images, ds.mean, ds.std, 0.75, seed=0, source="test")
    columns = vis.CLMAE_COLUMNS if method == "clmae" else vis.MAE_COLUMNS
    assert len(columns) == (6 if method == "clmae" else 3)
    axes = _axes(fig)
    assert set(axes) == {f"r{r}c{c}" for r in range(3) for c in range(len(columns))}
    # Rows go down, columns go right.
    for r in range(3):
        xs = [axes[f"r{r}c{c}"].get_position().x0 for c in range(len(columns))]
        assert xs == sorted(xs) and len(set(xs)) == len(xs)
    for c in range(len(columns)):
        ys = [axes[f"r{r}c{c}"].get_position().y0 for r in range(3)]
        assert ys == sorted(ys, reverse=True) and len(set(ys)) == 3
    # Column 0 is the original image of that row; column titles are on the figure.
    for r in range(3):
        shown = np.asarray(axes[f"r{r}c0"].images[0].get_array())
        assert np.allclose(shown, images[r, 0].numpy(), atol=1e-6)
    texts = {t.get_text() for t in fig.texts}
    assert set(columns) <= texts
    assert any("norm_pix_loss" in t for t in texts) == norm_pix  # the caption says how it was un-normalised
    recon = np.asarray(axes[f"r0c{len(columns) - 1}"].images[0].get_array())
    assert recon.shape == (8, 8) and 0 <= recon.min() and recon.max() <= 1
    if method == "clmae":
        assert np.asarray(axes["r0c1"].images[0].get_array()).shape == (4, 4)  # the 4×4 score grid
    # Size in pixels: CELL inches per panel, header and caption above/below.
    path = pictures.save_figure(fig, tmp_path / "grid.png")
    width, height = Image.open(path).size
    assert width == round(len(columns) * pictures.CELL * pictures.DPI)
    cell, dpi, header = pictures.CELL, pictures.DPI, pictures.HEADER
    assert 3 * cell * dpi + header * dpi < height < (3 * cell + header + 1.5) * dpi
    assert (width, height) == tuple(round(v * pictures.DPI) for v in fig.get_size_inches())


# ---------------------------------------------------------------------------------------------
# The probe


class RandomScoreMasker(Masker):
    """A 'masking module' whose scores are noise: its masks are random masks."""

    def __init__(self, seed: int):
        super().__init__()
        self.g = torch.Generator().manual_seed(seed)

    def forward(self, tokens):
        return torch.rand(tokens.shape[:2], generator=self.g)

    def scores(self, batch):
        return self(batch.tokens)

    def keep_indices(self, batch):
        return topk_keep_indices(self(batch.tokens), batch.num_keep)


class EnergyMasker(Masker):
    """Keeps the patches whose reconstruction target has the most (or least) energy."""

    def __init__(self, target, keep_high: bool):
        super().__init__()
        self.score = target.pow(2).mean(-1) * (1 if keep_high else -1)

    def scores(self, batch):
        return torch.sigmoid(self.score)

    def keep_indices(self, batch):
        return topk_keep_indices(self.score, batch.num_keep)


class ZeroMAE(torch.nn.Module):
    """An MAE that predicts 0 everywhere: a hidden patch costs exactly the energy of its target."""

    def __init__(self, mae):
        super().__init__()
        self.mae = mae

    def forward(self, imgs, ids_keep):
        return {"pred": torch.zeros_like(self.mae.target(imgs))}

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.mae, name)


def test_mask_difficulty_is_one_for_random_masks_and_sees_easy_and_hard_ones(runs):
    trainer = runs[0]
    original_masker, original_mae, original_data, cfg = trainer.masker, trainer.mae, trainer.dataset, trainer.cfg
    saved = (cfg.probe_images, trainer.run.snapshot_every)
    trainer.dataset = load_dataset("digits")  # more probe images than the run's subset: a steadier ratio
    cfg.probe_images, trainer.run.snapshot_every = 128, 0  # no snapshot files
    trainer.logger.enabled = False  # keep the run's metrics.jsonl as the run left it
    try:
        for seed in (0, 1, 2):
            trainer.masker = RandomScoreMasker(seed)
            view = RunView(trainer)
            record = CurriculumProbe(view).measure(view)
            assert abs(record["mask_difficulty"] - 1) < 0.03, record
            assert abs(record["mask_difficulty_shuffled"] - 1) < 0.03, record
            assert record["probe_loss_learned"] != record["probe_loss_random"]
        # With a known per-patch cost, hiding the cheap patches is easy and hiding the dear ones hard.
        trainer.mae = ZeroMAE(original_mae)
        view = RunView(trainer)
        probe = CurriculumProbe(view)
        target = original_mae.target(probe.x)
        trainer.masker = EnergyMasker(target, keep_high=True)
        easy = probe.measure(view)
        trainer.masker = EnergyMasker(target, keep_high=False)
        hard = probe.measure(view)
        assert easy["mask_difficulty"] < 0.9 and hard["mask_difficulty"] > 1.1, (easy, hard)
        # Given to other images, the same masks are no longer fitted to them.
        assert easy["mask_difficulty_shuffled"] < 0.95 and hard["mask_difficulty_shuffled"] > 1.05, (easy, hard)
        # The ratio's parts are the plain MAE losses (mean error over hidden patches).
        cost = target.pow(2).mean(-1)
        cheap = cost.sort(dim=1).values[:, : cost.shape[1] - probe.num_keep]
        assert easy["probe_loss_learned"] == pytest.approx(float(cheap.mean()), rel=1e-5)
    finally:
        trainer.masker, trainer.mae, trainer.dataset = original_masker, original_mae, original_data
        cfg.probe_images, trainer.run.snapshot_every = saved
        trainer.logger.enabled = True


def test_probe_does_not_change_training(runs):
    probed, plain = runs
    a, b = weights(probed), weights(plain)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(probed.generator.get_state(), plain.generator.get_state())
    assert probed.mae.training and probed.masker.training  # modes given back

    def train_values(trainer):
        keep = ("loss_mae", "loss_masker", "loss_rec", "step")
        return [{k: r[k] for k in keep if k in r} for r in read_metrics(trainer.output_dir) if r["kind"] == "train"]

    assert train_values(probed) == train_values(plain)


def test_probe_records_and_snapshots(runs):
    probed, _ = runs
    records = [r for r in read_metrics(probed.output_dir) if r["kind"] == "probe"]
    steps = len(probed.batches) * probed.cfg.epochs
    assert [r["step"] for r in records] == list(range(0, steps + 1, 2))  # step 0, then every 2 iterations
    for r in records:
        assert r["mask_difficulty"] == pytest.approx(r["probe_loss_learned"] / r["probe_loss_random"])
        assert r["mask_difficulty_shuffled"] == pytest.approx(r["probe_loss_learned"] / r["probe_loss_shuffled"])
        assert 0 <= r["score_entropy"] <= 1 and 0 <= r["mask_pairwise_overlap"] <= 1
        assert r["curriculum_factor"] in (1.0, -1.0)  # official schedule over 2 epochs
    assert "mask_overlap" not in records[0] and all(0 <= r["mask_overlap"] <= 1 for r in records[1:])
    images, snaps = read_snapshots(probed.output_dir)
    assert [s["epoch"] for s in snaps] == [0, 1, 2]
    n, length = 8, probed.model_config.num_patches
    assert images["images"].shape == (n, 1, 8, 8) and images["images"].dtype == torch.uint8
    keep = probed.mae.num_keep(probed.cfg.mask_ratio)
    for s in snaps:
        assert s["scores"].shape == (n, length) and s["keep"].shape == (n, keep)
        assert torch.equal(s["mask"].sum(1), torch.full((n,), length - keep, dtype=s["mask"].sum(1).dtype))
    # The last snapshot is the final masking module's top-k on the probe images.
    scores, ids = probed.callbacks[0].masks(probed.view)
    assert torch.allclose(snaps[-1]["scores"], scores) and torch.equal(snaps[-1]["keep"], ids)


def test_tensorboard_gets_the_probe_masks_each_epoch(runs):
    probed, _ = runs
    writer = probed.logger.tb
    assert [(tag, step) for tag, _, step, _ in writer.images] == [("probe/masks", 2), ("probe/masks", 4)]
    _, img, _, fmt = writer.images[-1]
    assert fmt == "HWC" and img.dtype == np.uint8 and img.shape == (3 * 64, 8 * 64, 3)  # 8px images drawn 8× larger
    assert any(tag == "probe/mask_difficulty" for tag, _, _ in writer.scalars)


def test_probe_batch_from_an_image_folder_passes_over_unreadable_files(tmp_path):
    rng = np.random.default_rng(0)
    for i, size in enumerate([(12, 10), (8, 8), (20, 16), (9, 11)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    (tmp_path / "img4.png").write_bytes(b"not a png")
    ds = load_dataset(str(tmp_path))
    used, images = probe_batch(ds, 5, 8)  # asks for all five: the broken one must be passed over
    bad = [i for i, f in enumerate(ds.files.files) if f.name == "img4.png"]
    assert len(used) == 4 and bad[0] not in used
    assert images.shape == (4, 3, 8, 8) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert probe_batch(ds, 5, 8)[0] == used  # the same images every time


def test_small_metric_helpers():
    a = torch.tensor([[0, 1, 2, 3]])
    assert keep_overlap(a, torch.tensor([[0, 1, 8, 9]]), 16) == 0.5
    assert pairwise_overlap(torch.tensor([[0, 1], [0, 1]]), 4) == 1.0
    assert pairwise_overlap(torch.tensor([[0, 1], [2, 3]]), 4) == 0.0
    assert score_entropy(torch.full((2, 3), 0.5)) == pytest.approx(1.0)
    assert score_entropy(torch.tensor([[0.0, 1.0]])) < 1e-5


# ---------------------------------------------------------------------------------------------
# The report


def test_report_embeds_every_figure(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[0].output_dir, run)
    (run / "eval_knn.json").write_text(json.dumps({"knn": {"top1": 0.4321, "k": 20}}))
    with open(run / "metrics.jsonl", "a") as fh:
        for epoch, acc in ((0, 0.25), (1, 0.375)):
            fh.write(json.dumps({"kind": "eval", "epoch": epoch, "step": 2 * (epoch + 1), "knn_top1": acc}) + "\n")
    page = report_mod.build_report(run)
    text = page.read_text()
    embedded = re.findall(r"<img alt='([a-z]+)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", text)
    names = [name for name, _ in embedded]
    assert names == ["curriculum", "masks", "scores", "losses", "eval"]
    assert text.count("<img") == len(embedded)  # no image refers to anything outside the page
    for name, b64 in embedded:
        data = base64.b64decode(b64)
        assert data == (run / f"report-{name}.png").read_bytes()
        Image.open(io.BytesIO(data)).verify()
    assert sorted(p.name for p in run.glob("report-*.png")) == sorted(f"report-{n}.png" for n in names)
    assert "0.4321" in text and "eval_knn.json" in text  # evaluation results
    assert "lambda_div" in text and "probe_every" in text  # the config


def test_report_of_a_plain_run_says_what_is_missing(runs, tmp_path):
    page = report_mod.build_report(runs[1].output_dir, tmp_path / "r.html")
    text = page.read_text()
    assert "--probe-every 0" in text and "--snapshot-every 0" in text
    assert re.findall(r"<img alt='([a-z]+)'", text) == ["losses"]


# ---------------------------------------------------------------------------------------------
# Command lines


def _parse(argv):
    return cli.build_parser().parse_args(argv)


def test_visualize_and_report_commands(runs, tmp_path):
    run = runs[0].output_dir
    args = _parse(["visualize", "--checkpoint", str(run / "checkpoint-last.safetensors"), "--num-images", "2",
                        "--output", str(tmp_path / "v.png"), "--device", "cpu"])
    assert args.func(args) == 0
    width, height = Image.open(tmp_path / "v.png").size
    assert width == round(6 * pictures.CELL * pictures.DPI) and height > 2 * pictures.CELL * pictures.DPI
    args = _parse(["report", str(run), "--output", str(tmp_path / "rep" / "r.html")])
    assert args.func(args) == 0
    assert (tmp_path / "rep" / "r.html").is_file() and (tmp_path / "rep" / "r-curriculum.png").is_file()


def test_commands_reject_bad_input(runs, tmp_path):
    run = str(runs[0].output_dir)
    for argv in (["visualize", "--checkpoint", run, "--num-images", "0"],
                 ["visualize", "--checkpoint", str(tmp_path / "nothing")]):
        args = _parse(argv)
        with pytest.raises(ClmaeError):
            args.func(args)
    for target in (tmp_path / "missing", tmp_path):
        args = _parse(["report", str(target)])
        with pytest.raises(ClmaeError, match="RUN_DIR"):
            args.func(args)
