"""Masking strategies (block, HPM, AttMask, and the interface every strategy shares): each would fail if wrong.

* every strategy keeps exactly K distinct patches per image;
* BEiT block masks are unions of rectangles and far more contiguous than random masks;
* AttMask hides the patches with the highest CLS attention, computed here independently through
  timm's own (unfused) attention;
* HPM's ranking loss equals the authors' pair loop, its masks hide the predicted-hard patches, and
  its loss predictor learns: after a short run its ranking correlates with the true per-patch loss
  on held-out images;
* every strategy trains through the CLI-equivalent API, resumes bit-identically, and its masks,
  scores and checkpoints reach load_pretrained, visualize, report and export.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from clmae.config import make_config
from clmae.data.datasets import load_dataset
from clmae.data.images import normalize
from clmae.evaluation.splits import choose_indices, eval_images
from clmae.io.checkpoint import load_pretrained
from clmae.io.records import read_metrics
from clmae.maskers import METHODS, MaskingBatch, create_masker, random_keep_indices
from clmae.maskers.attmask import cls_attention
from clmae.maskers.block import block_mask, default_min_patches
from clmae.maskers.clmae import per_patch_error
from clmae.maskers.hpm import relative_loss
from clmae.models.configs import model_config
from clmae.models.mae import MaskedAutoencoderViT
from clmae.train.trainer import Trainer, pretrain
from conftest import assert_same_weights, stopped_and_resumed

STRATEGIES = ("block", "hpm", "attmask", "colormae", "sbam", "automae")


def batch_for(mae: MaskedAutoencoderViT, n: int, num_keep: int, seed: int = 0, progress: float = 0.0,
              epochs: int = 1) -> MaskingBatch:
    g = torch.Generator().manual_seed(seed)
    c = mae.config
    imgs = torch.randn(n, c.in_chans, c.img_size, c.img_size, generator=g)
    with torch.no_grad():
        tokens = mae.embed(imgs)
    return MaskingBatch(imgs, tokens, num_keep, g, mae, progress, epochs)


def built(method: str, model: str = "vit_micro_patch2_8", **options):
    torch.manual_seed(0)
    mc = model_config(model)
    mae = MaskedAutoencoderViT(mc)
    cfg = make_config({"method": method, "epochs": 4, **options})
    masker = create_masker(method, mc, cfg)
    masker.attach(mae)
    return mae, masker


# ---------------------------------------------------------------------------------------------
# The contract every strategy keeps


@pytest.mark.parametrize("method", list(METHODS))
def test_every_strategy_keeps_exactly_k_distinct_patches(method):
    mae, masker = built(method)
    length = mae.num_patches
    for k in sorted({1, length // 4, length // 2, length - 1}):
        # the last epoch: HPM's hard share is at its largest, so both of its parts are exercised
        batch = batch_for(mae, 24, k, seed=k, progress=3.0, epochs=4)
        with torch.no_grad():
            keep = masker.keep_indices(batch)
        width = keep.shape[1] if masker.adaptive_count else k  # SBAM chooses its own count, the same in every row
        assert keep.shape == (24, width) and 1 <= width < length and keep.dtype == torch.int64, method
        assert int(keep.min()) >= 0 and int(keep.max()) < length
        assert all(len(set(row)) == width for row in keep.tolist()), (method, k)


# SBAM's adaptive count is a statistic of the global batch, averaged over a real process group: its two-rank
# equality is tested by tests/test_distributed.py; here its masks at the fixed ratio.
MASK_OPTIONS = {"sbam": {"sbam_ratio_var": 0.0}}


@pytest.mark.parametrize("method", STRATEGIES)
def test_masks_are_drawn_for_the_global_batch(method):
    """Rank r of N draws exactly rows r·B…(r+1)·B of what one process draws for the N·B images."""
    from clmae.distributed import DistContext

    mae, masker = built(method, **MASK_OPTIONS.get(method, {}))
    whole = batch_for(mae, 16, 4, seed=1, progress=3.0, epochs=4)
    with torch.no_grad():
        one = masker.keep_indices(whole)
        parts = []
        for rank in range(2):
            rows = torch.arange(rank * 8, (rank + 1) * 8)
            part = whole.rows(rows)
            part.generator = torch.Generator().manual_seed(1)
            torch.rand(16, 1, 8, 8, generator=part.generator)  # the images batch_for drew first
            part.dist = DistContext(rank=rank, world_size=2)
            parts.append(masker.keep_indices(part))
    assert torch.equal(torch.cat(parts).sort(1).values, one.sort(1).values)


# ---------------------------------------------------------------------------------------------
# BEiT block masking


def boundary(hidden: list[bool], grid: int) -> int:
    """Number of 4-neighbour pairs of cells of which one is hidden and the other visible."""
    pairs = 0
    for r in range(grid):
        for c in range(grid):
            i = r * grid + c
            pairs += (c + 1 < grid and hidden[i] != hidden[i + 1]) + (r + 1 < grid and hidden[i] != hidden[i + grid])
    return pairs


@pytest.mark.parametrize("grid, num_hidden, contiguity", [(14, 147, 0.4), (14, 75, 0.4), (8, 48, 0.6)])
def test_block_masks_are_unions_of_blocks_with_exact_counts(grid, num_hidden, contiguity):
    rng = random.Random(0)
    smallest = default_min_patches(grid)
    topped, block_boundary, random_boundary = 0, 0, 0
    draws = 200
    for _ in range(draws):
        m = block_mask(grid, grid, num_hidden, rng, smallest)
        assert sum(m.hidden) == num_hidden
        covered = set()
        for top, left, h, w in m.blocks:
            assert 0 < h < grid and 0 < w < grid and top + h <= grid and left + w <= grid
            covered |= {(top + r) * grid + left + c for r in range(h) for c in range(w)}
        hidden = {i for i, v in enumerate(m.hidden) if v}
        assert covered <= hidden and len(hidden - covered) == m.topped_up  # blocks + the rare uniform top-up
        topped += m.topped_up
        block_boundary += boundary(m.hidden, grid)
        cells = set(rng.sample(range(grid * grid), num_hidden))
        random_boundary += boundary([i in cells for i in range(grid * grid)], grid)
    assert topped / (draws * num_hidden) < 0.01
    # contiguous: far less border between hidden and visible than a random mask of the same count
    # (measured: 0.28, 0.24 and 0.44 of it)
    assert block_boundary < contiguity * random_boundary, (block_boundary, random_boundary)


def test_block_mask_first_blocks_respect_the_minimum_area():
    rng = random.Random(1)
    areas = []
    for _ in range(100):
        m = block_mask(14, 14, 75, rng, 16)
        areas.append(m.blocks[0][2] * m.blocks[0][3])  # the first block always has the whole budget
    # area ~ U(16, 75) before rounding h and w: rounding can shave a few cells, never most of them
    assert min(areas) >= 12 and sum(areas) / len(areas) > 30


def test_block_masker_keeps_the_complement_of_its_masks():
    mae, masker = built("block")
    batch = batch_for(mae, 6, 4)
    state = batch.generator.get_state()
    keep = masker.keep_indices(batch)
    batch.generator.set_state(state)
    seeds = torch.randint(0, 2**62, (6,), generator=batch.generator).tolist()
    for row, m in zip(keep.tolist(), masker.masks(seeds, 12)):
        assert row == [i for i, h in enumerate(m.hidden) if not h]


# ---------------------------------------------------------------------------------------------
# AttMask


def timm_cls_attention(encoder, imgs):
    """CLS attention through timm's own unfused attention: the softmax weights as its Dropout sees them."""
    enc = copy.deepcopy(encoder)
    last = enc.blocks[-1].attn
    last.fused_attn = False
    seen = []
    last.attn_drop.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    with torch.no_grad():
        enc.encode_tokens(enc.embed(imgs))
    return seen[0][:, :, 0, 1:].mean(dim=1)  # CLS row, patch columns, mean over heads


@pytest.mark.parametrize("model", ["vit_micro_patch2_8", "vit_mini_patch4_32"])
def test_attmask_hides_the_patches_with_the_highest_cls_attention(model):
    mae, masker = built("attmask", model, attmask_prob=1.0)
    for p in masker.teacher.parameters():  # a teacher that is not the freshly initialised MAE
        p.data.add_(0.05 * torch.randn_like(p))
    batch = batch_for(mae, 8, mae.num_keep(0.75))
    reference = timm_cls_attention(masker.teacher, batch.imgs)
    torch.testing.assert_close(cls_attention(masker.teacher, batch.imgs), reference, rtol=1e-5, atol=1e-7)
    keep = masker.keep_indices(batch)
    hidden_count = mae.num_patches - keep.shape[1]
    for row, att in zip(keep.tolist(), reference):
        hidden = set(range(mae.num_patches)) - set(row)
        assert hidden == set(att.topk(hidden_count).indices.tolist())


def test_attmask_random_share_and_low_variant():
    mae, masker = built("attmask", attmask_prob=0.5)
    batch = batch_for(mae, 400, 4)
    att = cls_attention(masker.teacher, batch.imgs)
    keep = masker.keep_indices(batch)
    hidden_count = mae.num_patches - 4
    guided = [set(range(16)) - set(k) == set(a.topk(hidden_count).indices.tolist()) for k, a in zip(keep.tolist(), att)]
    share = sum(guided) / len(guided)
    assert 0.42 < share < 0.62  # half the images, plus the few random masks that happen to coincide
    low = built("attmask", attmask_prob=1.0, attmask_variant="low")[1]
    low.teacher.load_state_dict(masker.teacher.state_dict())
    keep_low = low.keep_indices(batch_for(mae, 400, 4))
    assert all(set(k) == set(a.topk(4).indices.tolist()) for k, a in zip(keep_low.tolist(), att))


def test_attmask_teacher_is_an_ema_with_the_cosine_momentum():
    mae, masker = built("attmask", attmask_momentum=0.9)
    assert masker.schedule(0.0)["attmask_momentum"] == pytest.approx(0.9)
    assert masker.schedule(2.0)["attmask_momentum"] == pytest.approx(1 - 0.1 * (1 + math.cos(math.pi / 2)) / 2)
    assert masker.schedule(4.0)["attmask_momentum"] == pytest.approx(1.0)
    before = {k: v.clone() for k, v in masker.teacher.state_dict().items()}
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(1.0)
    masker.after_optimizer_step(batch_for(mae, 2, 4, progress=0.0, epochs=4))
    for k, v in masker.teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * mae.state_dict()[k])
    assert not any(p.requires_grad for p in masker.teacher.parameters()) and not masker.learnable


# ---------------------------------------------------------------------------------------------
# HPM


def relative_loss_loop(predicted, error, hidden):
    """The authors' objective written out: every ordered pair of hidden patches, ties left out."""
    total, count = 0.0, 0
    for s, e, h in zip(predicted.tolist(), error.tolist(), hidden.tolist()):
        ids = [i for i, v in enumerate(h) if v]
        for i in ids:
            for j in ids:
                if i == j or e[i] == e[j]:
                    continue
                y = 1.0 if e[j] > e[i] else 0.0
                p = 1 / (1 + math.exp(-(s[j] - s[i])))
                total += -(y * math.log(p + 1e-6) + (1 - y) * math.log(1 - p + 1e-6))
                count += 1
    return total / count


def test_hpm_relative_loss_equals_the_pair_loop():
    g = torch.Generator().manual_seed(0)
    predicted, error = torch.randn(5, 16, generator=g), torch.rand(5, 16, generator=g)
    error[0, 3] = error[0, 7]  # a tie: left out
    hidden = torch.zeros(5, 16)
    for row in hidden:
        row[torch.randperm(16, generator=g)[:12]] = 1
    assert float(relative_loss(predicted, error, hidden)) == pytest.approx(relative_loss_loop(predicted, error, hidden),
                                                                           rel=1e-5)
    # a perfect ranking scores far better than a reversed one
    assert float(relative_loss(1000 * error, error, hidden)) < 0.05
    assert float(relative_loss(-1000 * error, error, hidden)) > 5.0


def test_hpm_masks_hide_the_predicted_hardest_patches_plus_random_ones():
    mae, masker = built("hpm")  # 4 epochs, hard share 0.5·(e+1)/4
    assert [masker.schedule(e)["hpm_hard_share"] for e in range(4)] == [0.125, 0.25, 0.375, 0.5]
    assert masker.schedule(0)["hpm_ema_decay"] == pytest.approx(0.999)
    assert masker.schedule(50)["hpm_ema_decay"] == pytest.approx(0.99945)
    assert masker.schedule(300)["hpm_ema_decay"] == pytest.approx(0.9999)
    batch = batch_for(mae, 300, 4, progress=3.5, epochs=4)
    predicted = masker.predicted_loss(batch.imgs)
    keep = masker.keep_indices(batch)
    num_hard = int(12 * 0.5)
    hard = predicted.topk(num_hard, dim=1).indices
    visits = torch.zeros(16)
    for k, h, order in zip(keep.tolist(), hard.tolist(), predicted.argsort(1, descending=True).tolist()):
        assert not set(k) & set(h)  # every predicted-hard patch is hidden
        visits[order[num_hard:]] += torch.tensor([1.0 if i in k else 0.0 for i in order[num_hard:]])
    # the visible ones are a uniform choice among the other 10: each kept with probability 4/10
    assert abs(float(visits.sum()) / (300 * 10) - 0.4) < 1e-6
    assert float((visits / 300).std()) < 0.1


def test_hpm_ranking_loss_trains_the_predictor_and_reaches_the_encoder():
    mae, masker = built("hpm")
    batch = batch_for(mae, 8, 4)
    keep = random_keep_indices(8, 16, 4, torch.Generator().manual_seed(2))
    out = mae(batch.imgs, keep)
    terms = masker.mae_step_terms(batch, out)
    assert set(terms) == {"loss_hpm"} and 0.5 < float(terms["loss_hpm"].detach()) < 1.0  # ~log 2 untrained
    terms["loss_hpm"].backward()
    assert all(p.grad is not None for p in masker.predictor.parameters())
    assert mae.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # the authors' predictor input is not detached
    assert mae.decoder_pred.weight.grad is None  # ... but the pixel head plays no part
    assert all(p.grad is None for p in masker.ema_predictor.parameters())


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra, rb = a.argsort(1).argsort(1).float(), b.argsort(1).argsort(1).float()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def held_out_rank_correlation(trainer: Trainer, x: torch.Tensor) -> float:
    """Mean Spearman correlation, over held-out images, of predicted and true loss of the hidden patches."""
    mae = trainer.mae.eval()
    keep = random_keep_indices(x.shape[0], mae.num_patches, mae.num_keep(0.75), torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = mae(x, keep)
        predicted = trainer.masker(out["decoder_tokens"])
        error = per_patch_error(out["pred"], mae.target(x))
    idx = torch.argsort(1 - out["mask"], dim=1, stable=True)[:, : int(out["mask"][0].sum())]
    mae.train()
    return float(spearman_rows(predicted.gather(1, idx), error.gather(1, idx)).mean())


def test_hpm_predictor_learns_to_rank_held_out_patches(tmp_path):
    trainer = Trainer(make_config(dict(data="digits", method="hpm", epochs=4, batch_size=32, progress=False,
                                       probe_every=0, snapshot_every=0, seed=0, output_dir=str(tmp_path / "run"))))
    test = load_dataset("digits", split="test")
    _, imgs = eval_images(test, choose_indices(len(test), 0), 8, limit=200)
    x = normalize(imgs, trainer.dataset.mean, trainer.dataset.std)
    before = held_out_rank_correlation(trainer, x)
    trainer.fit()
    after = held_out_rank_correlation(trainer, x)
    # chance (a random ranking) is 0 ± 0.02 over 200 images of 12 hidden patches
    assert after > 0.2 and after > before + 0.2, (before, after)


# ---------------------------------------------------------------------------------------------
# Every strategy through the run: training, resume, checkpoints, pictures, report, export


COMMON = dict(data="digits", subset=192, batch_size=32, progress=False, seed=3, warmup_epochs=1, log_every=1,
              probe_every=3, snapshot_every=1)
OWN = {"hpm": {"hpm_ema_ramp_epochs": 3.0}}  # a strategy's own options: given to that method only


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategies")
    return {m: pretrain(method=m, epochs=3, output_dir=str(root / m), **COMMON, **OWN.get(m, {})) for m in STRATEGIES}


@pytest.mark.parametrize("method", STRATEGIES)
def test_strategy_trains_and_resumes_bit_identically(method, full_runs, tmp_path):
    full = full_runs[method]
    losses = [r["loss_mae"] for r in read_metrics(full.metrics) if r["kind"] == "epoch"]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    resumed = stopped_and_resumed(dict(method=method, **COMMON, **OWN.get(method, {})), 3, tmp_path / "part")
    assert_same_weights(full.checkpoint, resumed.checkpoint)
    a = torch.load(full.checkpoint, weights_only=True)
    b = torch.load(resumed.checkpoint, weights_only=True)
    assert torch.equal(a["generator"], b["generator"])
    if method in ("hpm", "attmask"):  # the EMA copies travel with the checkpoint
        assert any(k.startswith("masker.ema_") or k.startswith("masker.teacher.") for k in a["weights"])
    if method == "automae":  # generator, discriminator (with its spectral-norm vectors) and the EMA scorer
        assert {k.split(".")[1] for k in a["weights"] if k.startswith("masker.")} == {
            "mask_generator", "discriminator", "scorer"}
        assert any(k.endswith("._u") for k in a["weights"])


@pytest.mark.parametrize("method", STRATEGIES)
def test_strategy_checkpoint_reaches_load_pretrained_visualize_report_and_export(method, full_runs, tmp_path):
    from clmae.io.export import export_timm
    from clmae.viz import report, visualize

    run = full_runs[method]
    mae, masker, cfg = load_pretrained(run.output_dir)
    assert cfg["method"] == method and type(masker) is type(create_masker(method, mae.config))
    saved = torch.load(run.checkpoint, weights_only=True)["weights"]
    for k, v in masker.state_dict().items():
        assert torch.equal(v, saved[f"masker.{k}"])
    # the probe measured the strategy's masks and saved them, with its score map when it has one
    probes = [r for r in read_metrics(run.metrics) if r["kind"] == "probe"]
    assert probes and all("mask_difficulty" in r for r in probes)
    snap = run.output_dir / "probe" / "epoch-0003.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(snap))
    assert ("scores" in tensors) == (masker.score_label is not None)
    figure = visualize.visualize_checkpoint(run.output_dir, num_images=2, output=tmp_path / "v.png")
    assert figure.is_file()
    columns = visualize.strategy_columns(masker)
    assert masker.mask_label in columns and (masker.score_label in columns) == (masker.score_label is not None)
    page = report.build_report(run.output_dir, tmp_path / "report.html")
    text = page.read_text()
    assert "report-masks.png" in text and ("report-scores.png" in text) == (masker.score_label is not None)
    exported = export_timm(run.output_dir, tmp_path / "timm")  # verifies the round trip through timm
    assert (exported.output / "model.safetensors").is_file() and "max" in exported.verified
    config = json.loads((run.output_dir / "config.json").read_text())
    assert config["method"] == method


# ---------------------------------------------------------------------------------------------
# The custom masker of docs/masking-strategies.md, run as written


def test_the_documented_custom_masker_trains_for_two_epochs(tmp_path, monkeypatch):
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "masking-strategies.md").read_text()
    code = doc.split("<!-- custom-masker -->\n```python\n", 1)[1].split("```", 1)[0]
    assert 25 <= len([ln for ln in code.splitlines() if ln.strip()]) <= 45  # "about 30 lines"
    monkeypatch.chdir(tmp_path)  # the example writes runs/hardpos
    namespace: dict = {}
    try:
        exec(compile(code, "docs/masking-strategies.md", "exec"), namespace)  # our own doc, run as written
        result = namespace["result"]
        assert result.epochs_done == 2
        losses = [r["loss_mae"] for r in read_metrics(result.metrics) if r["kind"] == "epoch"]
        assert losses[1] < losses[0]
        saved = torch.load(result.checkpoint, weights_only=True)["weights"]["masker.error"]
        assert saved.shape == (16,) and float(saved.min()) > 0  # every position was watched and saved
        mae, masker, _ = load_pretrained(result.output_dir)
        assert torch.equal(masker.error, saved)
        keep = masker.keep_indices(batch_for(mae, 8, 4))
        hardest = set(saved.topk(6).indices.tolist())  # int(12 hidden · 0.5)
        assert all(not hardest & set(row) for row in keep.tolist())
    finally:
        METHODS.pop("hardpos", None)


def test_strategy_options_are_declared_once_and_reach_the_strategy():
    """A strategy's options live on its options dataclass alone (defaults, checks, help); each field is a flag of
    its method's group, refused for another method, and a configuration that sets one reaches the strategy."""
    import dataclasses

    from clmae.cli import build_parser
    from clmae.errors import ConfigError

    pretrain_help = build_parser()._subparsers._group_actions[0].choices["pretrain"].format_help()
    for method in METHODS.values():
        for key in method.options.keys():
            assert f"--{key.replace('_', '-')}" in pretrain_help, key
        assert dataclasses.fields(method.options) == () or f"--method {method.name} options" in pretrain_help
        defaults = method.options()
        assert make_config({"method": method.name}).options == defaults  # the one place the defaults are
    with pytest.raises(ConfigError, match="--hpm-hard-max applies to --method hpm, not block"):
        make_config({"method": "block", "hpm_hard_max": 0.3})

    c = model_config("vit_micro_patch2_8")
    cfg = make_config({"method": "hpm", "hpm_hard_max": 0.25, "epochs": 7, "model": "vit_micro_patch2_8"})
    hpm = create_masker("hpm", c, cfg)
    assert (hpm.hard_max, hpm.epochs) == (0.25, 7)
    attmask = create_masker("attmask", c, make_config({"method": "attmask", "attmask_variant": "low", "epochs": 3,
                                                       "model": "vit_micro_patch2_8"}))
    assert (attmask.variant, attmask.epochs) == ("low", 3)
    assert create_masker("block", c, make_config({"method": "block", "block_min_aspect": 0.5,
                                                  "model": "vit_micro_patch2_8"})).min_aspect == 0.5
