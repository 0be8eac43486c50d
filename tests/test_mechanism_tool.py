"""The mechanism experiment (experiments/mechanism): it trains the library's masking module with the library's own
step, and on its quick profile the hiding path's partner masks are easier than its adversary's, while the binary
check tells the hiding path (equal to the hard-mask MAE) from the authors' scaling path (not)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from clmae.errors import ClmaeError
from clmae.models.mae import create_model

REPO = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("mechanism_tool", REPO / "experiments" / "mechanism" / "mechanism.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


M = load_tool()


def tiny_setup(seed: int = 0):
    torch.manual_seed(seed)
    mae = create_model("vit_micro_patch2_8").eval().requires_grad_(False)
    imgs = (torch.rand(24, 1, 8, 8) * 255).to(torch.uint8)
    return M.Setup(mae, (0.5,), (0.25,), imgs, torch.randn(16, 1, 8, 8), mae.num_keep(0.75), "tiny")


@pytest.mark.parametrize("path", ["scale", "hide", "hide_st"])
def test_term_gradients_measure_the_loss_the_library_step_minimises(path):
    setup = tiny_setup()
    run = M.MaskerRun(path=path, lam=-0.5, batch=8)
    masker = M.new_masker(setup.mae, run)
    assert masker.options.soft_path == path and masker.options.curriculum_value == -0.5
    x = M.train_batch(setup, 8, torch.Generator().manual_seed(1), augment=False)
    batch = M.masking_batch(setup, x)
    loss, _ = masker.objective(batch, masker(batch.tokens))
    terms = M.term_gradients(setup, masker, x)
    assert terms["total"] == pytest.approx(loss.item(), rel=1e-6)
    assert terms["lam_rec"] == pytest.approx(-0.5 * terms["rec_unweighted"], rel=1e-6)
    (grads,) = [torch.autograd.grad(loss, masker.trainable_parameters())]
    total = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    assert terms["grad_total"] == pytest.approx(total, rel=1e-5)
    assert terms["grad_lam_rec"] == pytest.approx(0.5 * terms["grad_rec_unweighted"], rel=1e-5)


def test_reference_masks_have_the_stated_shapes():
    lattice = M.lattice_keeps(2, 8, 16)  # 8x8 grid, K=16: every 2nd row and column, 4 offsets
    assert len(lattice) == 4 and lattice[0][0].tolist() == [r * 8 + c for r in (0, 2, 4, 6) for c in (0, 2, 4, 6)]
    block = M.centre_block(2, 8, 16)
    assert sorted(block[0].tolist()) == [r * 8 + c for r in range(2, 6) for c in range(2, 6)]
    assert M.hidden_to_visible(block, 64) > 1.5 > M.hidden_to_visible(lattice[0], 64)
    assert M.pairwise_overlap(block, 64) == 1.0


def test_a_malformed_run_spec_is_a_one_line_error(capsys):
    with pytest.raises(ClmaeError, match="PATH:LAM:SEED"):
        M.parse_runs(["hide_st:-1"])
    assert M.main(["sweep", "--mae", "nowhere", "--runs", "blur:1:0"]) == 2
    assert capsys.readouterr().err.startswith("mechanism: error: --runs: 'blur:1:0'")


def test_summary_gives_mean_and_spread_over_seeds(tmp_path):
    import json

    for seed, hard in ((0, 0.8), (1, 1.0)):
        rec = {"run": {"tag": "t", "path": "hide_st", "lam": 1.0, "seed": seed}, "wall_s": 1.0,
               "metrics": dict.fromkeys(M.TABLE_METRICS, hard), "terms_at_end": dict.fromkeys(M.TERM_METRICS, 0.0)}
        (tmp_path / f"t_{seed}.json").write_text(json.dumps(rec))
    text = M.summary(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| t | hide_st"))
    assert "| +1.0 | 0,1 | 0.900 ± 0.141 |" in row


@pytest.mark.slow
def test_quick_profile_partner_easier_than_adversary_on_the_hiding_path(tmp_path):
    res = M.quick(out_dir=str(tmp_path))
    r = res["hard_ratio"]
    assert r["hide_st+1"] < r["hide_st-1"], r
    assert res["mae_loss_first_last"][1] < 0.6 * res["mae_loss_first_last"][0]  # the frozen MAE has learned
    eq = res["equality"]
    assert eq["hide"]["rel_diff_batch_max"] < 1e-5  # binary scores: the hiding path is the hard-mask MAE
    assert eq["scale"]["rel_diff_batch_min"] > 0.05  # the authors' path is not


def test_a_flipping_run_trains_at_the_first_lambda_then_the_second_and_records_the_module_at_the_flip(tmp_path):
    setup = tiny_setup()
    flip = M.MaskerRun(path="hide_st", lam=-1.0, first_lam=1.0, first_steps=3, steps=2, batch=8, augment=False,
                       warmup=1, tag="flip")
    seen = []
    masker, history = M.train_masker(setup, flip, log_every=1,
                                     at_flip=lambda m: seen.append(m.options.curriculum_value))
    assert [h["lam"] for h in history] == [1.0, 1.0, 1.0, -1.0, -1.0]
    assert seen == [1.0] and masker.options.curriculum_value == -1.0  # handed over before the λ changed
    # The same λ in both phases is one plain run of first_steps + steps: the flip keeps module and optimiser.
    same = M.MaskerRun(path="hide_st", lam=1.0, first_lam=1.0, first_steps=3, steps=2, batch=8, augment=False,
                       warmup=1)
    plain = M.MaskerRun(path="hide_st", lam=1.0, steps=5, batch=8, augment=False, warmup=1)
    a, _ = M.train_masker(setup, same)
    b, _ = M.train_masker(setup, plain)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    baseline = M.random_baseline(setup, draws=2)
    grad_batch = M.train_batch(setup, 8, torch.Generator().manual_seed(2), augment=False)
    rec = M.run_one(setup, flip, baseline, grad_batch, out_dir=tmp_path, save_masker=False)
    assert rec["name"] == "flip_hide_st_from+1.0x3_lam-1.0_s0" and "metrics_at_flip" in rec
    assert "| flip | hide_st | +1.0 (3 steps) → -1.0 | 0 |" in M.summary(tmp_path)


def test_first_lambda_and_first_steps_go_together(capsys):
    assert M.main(["sweep", "--mae", "nowhere", "--first-steps", "300"]) == 2
    assert capsys.readouterr().err.startswith("mechanism: error: --first-lam and --first-steps go together")
