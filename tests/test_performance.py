"""The fast CL-MAE path computes what a straightforward (authors'-style) path computes, and its knobs work.

Each optimisation is checked against a slow reference written the obvious way:

* the masking-module step (no sort of the tokens, ``backward(inputs=masker)``, vectorised
  diversity) against the authors' recipe: MAE frozen with ``requires_grad=False``, tokens sorted
  by score and un-sorted in the decoder, a full ``loss.backward()`` and the O(N²) pair loop;
* the MAE step (top-k + scatter) against argsort / gather / un-shuffle masking;
* "no weight gradients for the frozen MAE" by counting FLOPs against a full backward.
"""

from __future__ import annotations

import copy
import json
import mmap
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch.overrides import TorchFunctionMode

from clmae.config import make_config
from clmae.maskers.clmae import binarization_loss, diversity_loss, mask_ratio_kl_loss, soft_reconstruction_loss
from clmae.models.mae import create_model, per_patch_error, reconstruction_loss
from clmae.train.trainer import Trainer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import throughput  # noqa: E402 — a script in benchmarks/, importable only after the path insert


def make_trainer(tmp_path, **options) -> Trainer:
    values = {"data": "digits", "subset": 64, "batch_size": 16, "epochs": 1, "progress": False, "device": "cpu",
                  "output_dir": str(tmp_path / "run")}
    values.update(options)
    return Trainer(make_config(values))


def first_batch(trainer: Trainer) -> torch.Tensor:
    return next(iter(trainer.batches.epoch(0)))


# ---------------------------------------------------------------------------------------------
# Slow reference paths, written the obvious way


def diversity_loop(scores: torch.Tensor, scale: float = 0.1) -> torch.Tensor:
    """The authors' diversity loss: a Python loop over every pair i < j."""
    n = scores.shape[0]
    total = scores.new_zeros(())
    for i in range(n):
        for j in range(i + 1, n):
            total = total + torch.exp(-scale * torch.linalg.vector_norm(scores[i] - scores[j]))
    return total / (n * (n - 1) / 2)


def sorted_soft_forward(mae, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The authors' masking-module forward: sort tokens by score, encode, un-sort before decoding."""
    ids_shuffle = torch.argsort(scores, dim=1, descending=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    d = tokens.shape[-1]
    x = torch.gather(tokens * scores.unsqueeze(-1), 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, d))
    latent = mae.encode_tokens(x)
    y = mae.decoder_embed(latent)
    rest = torch.gather(y[:, 1:], 1, ids_restore.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
    y = torch.cat([y[:, :1], rest], dim=1) + mae.decoder_pos_embed
    for blk in mae.decoder_blocks:
        y = blk(y)
    return mae.decoder_pred(mae.decoder_norm(y))[:, 1:]


def reference_masking_step(trainer: Trainer, imgs: torch.Tensor, lam: float, freeze: bool = True):
    """Loss and masking-module gradients of the authors' recipe, on copies of the current modules.

    ``freeze=True``: the MAE's parameters get ``requires_grad=False`` (the authors' freeze_backbone);
    ``freeze=False``: nothing is frozen, so a plain ``loss.backward()`` also computes every MAE
    weight gradient (the naive path the trainer avoids).
    """
    cfg = trainer.cfg
    mae, masker = copy.deepcopy(trainer.mae), copy.deepcopy(trainer.masker)
    for p in mae.parameters():
        p.requires_grad_(not freeze)
    with torch.no_grad():
        tokens = mae.embed(imgs)
    scores = masker.network(tokens)
    pred = sorted_soft_forward(mae, tokens, scores)
    keep = 1.0 - cfg.mask_ratio
    loss = (lam * soft_reconstruction_loss(per_patch_error(pred, mae.target(imgs)), scores)
            + cfg.options.lambda_gauss * binarization_loss(scores)
            + cfg.options.lambda_kl * mask_ratio_kl_loss(scores, keep, cfg.options.kl_reduction)
            + cfg.options.lambda_div * diversity_loop(scores))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in masker.parameters()], mae


# ---------------------------------------------------------------------------------------------
# Losses


def test_vectorised_diversity_equals_pair_loop_values_and_gradients():
    torch.manual_seed(0)
    s = torch.rand(40, 16)  # > 25 rows: where cdist's default would switch to the matmul shortcut
    s[1] = s[0]  # an identical pair
    s[3] = s[2] + 1e-4  # a very close pair: its gradient is the whole point of the loss
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    fast, slow = diversity_loss(a), diversity_loop(b)
    fast.backward()
    slow.backward()
    assert fast.item() == pytest.approx(slow.item(), rel=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9)
    assert a.grad[2].abs().max() > 1e-5  # the close pair does push apart


# ---------------------------------------------------------------------------------------------
# The two steps against their references


def test_mae_forward_equals_argsort_shuffle_reference():
    """Top-k + scatter (ours) and argsort + gather + un-shuffle (authors') give the same loss and grads."""
    torch.manual_seed(0)
    mae = create_model("vit_micro_patch2_8")
    ref = copy.deepcopy(mae)
    imgs = torch.randn(6, 1, 8, 8)
    scores = torch.rand(6, mae.num_patches)
    k = mae.num_keep(0.75)

    ids_keep = torch.topk(scores, k, dim=1).indices
    loss = mae(imgs, ids_keep)["loss"]
    loss.backward()

    ids_shuffle = torch.argsort(scores, dim=1, descending=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    tokens = ref.embed(imgs)
    d = tokens.shape[-1]
    visible = torch.gather(tokens, 1, ids_shuffle[:, :k].unsqueeze(-1).expand(-1, -1, d))
    y = ref.decoder_embed(ref.encode_tokens(visible))
    dd = y.shape[-1]
    filled = torch.cat([y[:, 1:], ref.mask_token.expand(6, mae.num_patches - k, dd)], dim=1)
    filled = torch.gather(filled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))
    y = torch.cat([y[:, :1], filled], dim=1) + ref.decoder_pos_embed
    for blk in ref.decoder_blocks:
        y = blk(y)
    pred = ref.decoder_pred(ref.decoder_norm(y))[:, 1:]
    mask = torch.ones(6, mae.num_patches)
    mask[:, :k] = 0
    mask = torch.gather(mask, 1, ids_restore)
    ref_loss = reconstruction_loss(pred, ref.target(imgs), mask)
    ref_loss.backward()

    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for (name, p), q in zip(mae.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_masking_step_equals_authors_recipe(tmp_path):
    """Same loss and the same masking-module gradients as the frozen-backbone, full-backward recipe."""
    trainer = make_trainer(tmp_path, curriculum="constant", curriculum_value=0.7)  # λ = 0.7
    batch = trainer.masking_batch(first_batch(trainer), trainer.progress())
    ref_loss, ref_grads, _ = reference_masking_step(trainer, batch.imgs, 0.7)
    out = trainer.strategy_step(batch)
    assert out["loss_masker"] == pytest.approx(ref_loss.item(), rel=1e-5)
    names = [n for n, _ in trainer.masker.named_parameters()]
    grads = [p.grad for p in trainer.masker.parameters()]
    assert len(grads) == len(ref_grads) == len(names)
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7, msg=name)
    assert all(p.grad is None for p in trainer.mae.parameters())


def test_masking_step_computes_no_mae_weight_gradients(tmp_path):
    """FLOPs of the trainer's masking step = the frozen recipe's; a full backward costs exactly the weight
    grads more."""
    trainer = make_trainer(tmp_path, batch_size=8)
    imgs = first_batch(trainer)
    counted = {}
    with throughput.flop_counter() as fc:  # the step as the trainer runs it: embedding the images included
        trainer.strategy_step(trainer.masking_batch(imgs, trainer.progress()))
    counted["fast"] = fc.get_total_flops()
    for freeze, key in ((True, "frozen"), (False, "full")):
        with throughput.flop_counter() as fc:
            _, _, mae = reference_masking_step(trainer, imgs, 1.0, freeze=freeze)
        counted[key] = fc.get_total_flops()
        if not freeze:  # the naive path did fill every MAE weight gradient
            assert all(p.grad is not None for n, p in mae.named_parameters() if n.endswith("weight")
                       and "patch_embed" not in n)

    rows = imgs.shape[0] * (trainer.mae.num_patches + 1)  # every MAE linear sees CLS + all patches
    weight_grad_flops = sum(2 * rows * m.in_features * m.out_features
                            for m in trainer.mae.modules() if isinstance(m, torch.nn.Linear))
    assert counted["fast"] == counted["frozen"]
    assert counted["full"] - counted["fast"] == weight_grad_flops
    assert all(p.grad is None for p in trainer.mae.parameters())


def test_mae_step_scores_patches_without_building_a_graph(tmp_path):
    trainer = make_trainer(tmp_path, masker_every=2)
    batches = trainer.batches.epoch(0)
    trainer.train_step([next(batches)], lr=1e-3)  # iteration 0: both steps
    trainer.position.iteration += 1
    saved = []
    original = trainer.masker.keep_indices

    def spy(*a, **kw):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            ids = original(*a, **kw)
        assert not torch.is_grad_enabled()  # the trainer calls it under no_grad
        return ids

    trainer.masker.keep_indices = spy
    out = trainer.train_step([next(batches)], lr=1e-3)  # iteration 1: MAE step only
    assert "loss_masker" not in out
    assert saved == []  # the masking module's forward saved nothing for a backward
    assert all(p.grad is None for p in trainer.masker.parameters())


def test_attention_is_fused_everywhere(tmp_path):
    trainer = make_trainer(tmp_path)
    attns = [m for mod in (trainer.mae, trainer.masker) for m in mod.modules() if isinstance(m, Attention)]
    mc = trainer.model_config
    assert len(attns) == mc.depth + mc.decoder_depth + mc.masker_depth
    assert all(a.fused_attn for a in attns)

    class CountSDPA(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                CountSDPA.calls += 1
            return func(*args, **(kwargs or {}))

    with CountSDPA():
        trainer.train_step([first_batch(trainer)], lr=1e-3)
    # MAE step: masker scoring + encoder + decoder; masking step: masker + encoder + decoder.
    assert CountSDPA.calls == 2 * (mc.masker_depth + mc.depth + mc.decoder_depth)


# ---------------------------------------------------------------------------------------------
# Knobs


def test_masker_every_updates_the_masker_every_k_iterations(tmp_path):
    trainer = make_trainer(tmp_path, masker_every=3, subset=128)
    batches = trainer.batches.epoch(0)
    updated = []
    for _ in range(7):
        before = [p.detach().clone() for p in trainer.masker.parameters()]
        mae_before = trainer.mae.decoder_pred.weight.detach().clone()
        out = trainer.train_step([next(batches)], lr=1e-3)
        trainer.position.iteration += 1
        changed = any(not torch.equal(b, p) for b, p in zip(before, trainer.masker.parameters()))
        updated.append(changed)
        assert changed == ("loss_masker" in out)
        assert not torch.equal(mae_before, trainer.mae.decoder_pred.weight)  # the MAE trains every iteration
    assert updated == [True, False, False, True, False, False, True]
    assert trainer.position.masker_updates == 3


def test_masker_batch_fraction_runs_the_masking_step_on_a_sub_batch(tmp_path):
    trainer = make_trainer(tmp_path, masker_batch_fraction=0.25)
    imgs = first_batch(trainer)
    masker_batches, soft_imgs = [], []
    trainer.masker.network.register_forward_hook(lambda m, inp, out: masker_batches.append(inp[0].shape[0]))
    original_soft = trainer.masker.soft_forward  # the masker's public soft path, observed

    def spy_soft(mae, x, scores, tokens):
        soft_imgs.append(x.detach().clone())
        return original_soft(mae, x, scores, tokens)

    trainer.masker.soft_forward = spy_soft
    trainer.train_step([imgs], lr=1e-3)
    assert masker_batches == [16, 4]  # scoring for the MAE step on the batch, then the masking step on 1/4
    (sub,) = soft_imgs
    assert sub.shape[0] == 4
    # the sub-batch is 4 different images of this batch
    rows = [int(torch.nonzero((imgs == x).flatten(1).all(1)).flatten()[0]) for x in sub]
    assert len(set(rows)) == 4


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.fixture
def compile_without_codegen(monkeypatch):
    """``torch.compile`` with the ``aot_eager`` backend: Dynamo's graphs and AOTAutograd's joint forward and backward,
    where ``--compile``'s pitfalls live (frozen parameters, gradients computed and dropped, graph breaks on our
    code), without Inductor's C++ build (~4.5 min cold on a fresh 2-core machine, most of a CI run). Inductor itself
    runs in ``benchmarks/gpu.py`` (``--compile`` rows)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: real(*args, **{**kwargs, "backend": "aot_eager"}))


@pytest.mark.slow
def test_compile_gives_the_same_losses_as_eager(tmp_path, compile_without_codegen):
    """Two iterations, micro model, every loss term of both steps."""
    results = {}
    for compiled in (False, True):
        trainer = make_trainer(tmp_path / str(compiled), compile=compiled)
        batches = trainer.batches.epoch(0)
        outs = []
        for _ in range(2):
            outs.append(trainer.train_step([next(batches)], lr=1e-3))
            trainer.position.iteration += 1
        results[compiled] = outs
    for eager, comp in zip(results[False], results[True]):
        for key in ("loss_mae", "loss_masker", "loss_rec", "loss_gauss", "loss_kl", "loss_div"):
            assert comp[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key


def matmuls_in_masking_step(trainer: Trainer, imgs: torch.Tensor) -> int:
    """How many matmul kernels (eager or Inductor's extern calls) one masking-module step runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.strategy_step(trainer.masking_batch(imgs, trainer.progress()))
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))


@pytest.mark.slow
def test_compiled_masking_step_runs_no_more_matmuls_than_eager(tmp_path, compile_without_codegen):
    """A compiled backward returns gradients for every input that requires grad, so unless the MAE is
    frozen during the masking forward, --compile silently computes (and drops) every MAE weight gradient."""
    counts = {}
    for compiled in (False, True):
        trainer = make_trainer(tmp_path / str(compiled), compile=compiled)
        batches = trainer.batches.epoch(0)
        trainer.train_step([next(batches)], lr=1e-3)  # compiles
        trainer.position.iteration += 1
        counts[compiled] = matmuls_in_masking_step(trainer, next(batches))
    assert counts[True] == counts[False]


# ---------------------------------------------------------------------------------------------
# The benchmark itself


def test_throughput_benchmark_writes_the_promised_numbers(tmp_path):
    out = tmp_path / "bench.json"
    assert throughput.main(["--model", "vit_micro_patch2_8", "--batch-size", "8", "--reps", "1", "--warmup", "0",
                            "--masker-every", "2", "--no-memory", "--matmul-size", "256",
                            "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("img_per_s_mae", "img_per_s_clmae", "ratio_clmae_to_mae", "device", "torch", "threads", "commit",
                "flops_per_iteration_mae", "frac_of_peak_mae_model_fwd_bwd", "data_fraction_mae"):
        assert key in res, key
    assert res["masker_every"] == 2 and res["iterations_per_rep"] == 2
    # FLOPs: CL-MAE adds the masker's scoring every iteration and a masking step every 2nd one
    assert res["flops_per_iteration_clmae"] > res["flops_per_iteration_mae"] > 0
    assert res["flops_clmae_masker_step"] > 0
    assert res["seconds"]["clmae_masker_step"]["median"] > 0
    assert 0 < res["data_fraction_mae"] < 1


def test_throughput_benchmark_times_several_strategies_against_mae_in_one_run(tmp_path):
    out = tmp_path / "strategies.json"
    assert throughput.main(["--method", "block", "hpm", "--model", "vit_micro_patch2_8", "--batch-size", "8",
                            "--reps", "2", "--warmup", "0", "--no-memory", "--matmul-size", "256",
                            "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["methods"] == ["block", "hpm"] and set(res["per_method"]) == {"block", "hpm"}
    assert all({"mae", "block", "hpm"} <= set(rep) for rep in res["raw_reps"])  # interleaved in the same reps
    for method in ("block", "hpm"):
        row = res["per_method"][method]
        assert row["img_per_s"] == res[f"img_per_s_{method}"] > 0 and row["ratio_to_mae"] > 0
        assert row["masks_seconds"] > 0 and row["own_step_seconds"] == 0  # the masks' choice is timed; no own step
    assert res["per_method"]["block"]["ratio_flops_to_mae"] == 1.0  # masks from rectangles: no model work
    assert res["per_method"]["hpm"]["ratio_flops_to_mae"] > 1.5  # the loss predictor and the EMA model's forward


def test_memory_probe_reports_a_high_water_mark(tmp_path):
    args = throughput.parse_args(["--model", "vit_micro_patch2_8", "--batch-size", "8", "--memory-probe", "clmae",
                                  "--output", str(tmp_path / "x.json")])
    res = throughput.memory_probe(args)
    assert res["peak_bytes"] >= res["rss_after_setup_bytes"] > 0
    assert res["increment_bytes"] == res["peak_bytes"] - res["rss_after_setup_bytes"]


def test_peak_rss_is_this_process_high_water_mark():
    """A child must not report its parent's RSS as its own peak (ru_maxrss does, through fork)."""
    if not throughput.reset_peak_rss():
        pytest.fail("/proc/self/clear_refs is not writable here; the CPU memory numbers need Linux >= 4.0")
    before = throughput.peak_rss_bytes()
    # Fresh anonymous pages (an allocator could reuse pages freed by earlier tests): touch 64 MiB.
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"x" * (64 * 2**20))
    after = throughput.peak_rss_bytes()
    block.close()
    assert after - before >= 60 * 2**20
    assert throughput.reset_peak_rss() and throughput.peak_rss_bytes() < after
