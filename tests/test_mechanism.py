"""CL-MAE's soft path: does a score hide its patch? The defining check of ``--soft-path hide``, and how far the
authors' token-scaling path is from it."""

from __future__ import annotations

import torch

from clmae.config import make_config
from clmae.maskers import MaskingBatch, create_masker, mask_from_keep, random_keep_indices
from clmae.maskers.clmae import hiding_soft_forward, scaled_soft_forward, soft_reconstruction_loss
from clmae.models.mae import create_model, per_patch_error
from clmae.train.trainer import pretrain


def _binary_case(seed: int = 0):
    torch.manual_seed(seed)
    mae = create_model("vit_micro_patch2_8").eval()
    imgs = torch.randn(12, 1, 8, 8)
    keep = random_keep_indices(12, mae.num_patches, mae.num_keep(0.75), torch.Generator().manual_seed(seed))
    scores = 1.0 - mask_from_keep(keep, mae.num_patches)  # 1 = visible, exactly K ones per image
    return mae, imgs, keep, scores


def soft_loss(forward, mae, imgs, scores) -> torch.Tensor:
    with torch.no_grad():
        pred = forward(mae, imgs, scores, mae.embed(imgs))
        return soft_reconstruction_loss(per_patch_error(pred, mae.target(imgs)), scores)


def test_hide_path_with_binary_scores_is_the_mae_loss_on_those_masks():
    for seed in range(3):
        mae, imgs, keep, scores = _binary_case(seed)
        with torch.no_grad():
            hard = mae(imgs, keep)["loss"]
        hide = soft_loss(hiding_soft_forward, mae, imgs, scores)
        torch.testing.assert_close(hide, hard, rtol=2e-6, atol=0)
        # per image too: every image's hidden patches get the hard path's prediction
        with torch.no_grad():
            pred = hiding_soft_forward(mae, imgs, scores, mae.embed(imgs))
            hard_pred = mae(imgs, keep)["pred"]
        hidden = scores < 0.5
        torch.testing.assert_close(pred[hidden], hard_pred[hidden], rtol=1e-5, atol=1e-6)


def test_scale_path_with_binary_scores_is_not_the_mae_loss():
    """The authors' path fails the same test: a hidden token is the zero vector, still attended, and the decoder
    gets no mask token. Even on an untrained model its loss is far from the hard-mask loss."""
    gaps = []
    for seed in range(3):
        mae, imgs, keep, scores = _binary_case(seed)
        with torch.no_grad():
            hard = mae(imgs, keep)["loss"]
        gaps.append(float((soft_loss(scaled_soft_forward, mae, imgs, scores) - hard).abs() / hard))
    assert min(gaps) > 0.05, gaps  # vs < 2e-6 for the hide path


def test_hide_path_trains_the_masking_module_and_is_one_flag_away():
    """``--soft-path hide`` is an option of ``--method clmae``; the default stays the authors' path."""
    assert make_config({}).options.soft_path == "scale"
    cfg = make_config({"soft_path": "hide", "model": "vit_micro_patch2_8"})
    masker = create_masker("clmae", create_model("vit_micro_patch2_8").config, cfg)
    assert masker.soft_forward is hiding_soft_forward
    mae = create_model("vit_micro_patch2_8")
    imgs = torch.randn(8, 1, 8, 8)
    batch = MaskingBatch(imgs, mae.embed(imgs).detach(), mae.num_keep(0.75), torch.Generator().manual_seed(0), mae,
                         0.0, 2)
    loss, logs = masker.own_step_terms(batch)
    loss.backward(inputs=masker.trainable_parameters())
    grads = [p.grad for p in masker.trainable_parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_a_hide_run_trains_and_records_its_soft_path(tmp_path):
    result = pretrain(data="digits", subset=64, batch_size=16, epochs=1, soft_path="hide", progress=False,
                      probe_every=0, snapshot_every=0, output_dir=str(tmp_path / "run"))
    assert result.epochs_done == 1 and torch.isfinite(torch.tensor(result.final["loss_masker"]))
    import json

    assert json.loads((tmp_path / "run" / "config.json").read_text())["run_config"]["soft_path"] == "hide"


def test_straight_through_path_runs_at_the_top_k_mask_and_its_loss_is_the_hard_loss():
    """``--soft-path hide_st``: whatever the scores, the forward is the MAE on the top-K mask the MAE will get."""
    from clmae.maskers.clmae import straight_through_soft_forward

    torch.manual_seed(0)
    mae = create_model("vit_micro_patch2_8").eval()
    imgs = torch.randn(6, 1, 8, 8)
    scores = torch.rand(6, mae.num_patches, requires_grad=True)
    k = mae.num_keep(0.75)
    pred, shown = straight_through_soft_forward(mae, imgs, scores, mae.embed(imgs), k)
    loss = soft_reconstruction_loss(per_patch_error(pred, mae.target(imgs)), shown)
    keep = scores.detach().topk(k, dim=1).indices
    with torch.no_grad():
        hard = mae(imgs, keep)["loss"]
    torch.testing.assert_close(loss.detach(), hard, rtol=2e-6, atol=0)
    assert torch.equal(shown.detach(), 1.0 - mask_from_keep(keep, mae.num_patches))
    loss.backward()
    hidden = shown.detach() < 0.5
    assert torch.isfinite(scores.grad).all() and (scores.grad[hidden].abs() > 0).float().mean() > 0.9


def test_straight_through_gradient_of_a_hidden_patch_is_the_effect_of_letting_it_in():
    """A hidden patch's gradient is the derivative of the hiding path's loss as its score leaves 0 (a finite
    difference in float64), so the module learns which patch would help or hurt if it were shown."""
    from clmae.maskers.clmae import straight_through_soft_forward

    torch.manual_seed(1)
    mae = create_model("vit_micro_patch2_8").double().eval()
    imgs = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    tokens = mae.embed(imgs)
    k = mae.num_keep(0.75)
    scores = torch.rand(4, mae.num_patches, dtype=torch.float64, requires_grad=True)

    def rec_loss(pred, s):  # the soft reconstruction term, kept in float64 (the library's is fp32)
        error = (pred - mae.target(imgs)).pow(2).mean(-1)
        return ((1 - s) * error).sum() / (1 - s).sum()

    pred, shown = straight_through_soft_forward(mae, imgs, scores, tokens, k)
    rec_loss(pred, shown).backward()
    binary = shown.detach()

    def hide_loss(s):
        with torch.no_grad():
            return rec_loss(hiding_soft_forward(mae, imgs, s, tokens), s)

    h = 1e-7
    for image, patch in ((0, int((binary[0] < 0.5).nonzero()[0])), (2, int((binary[2] < 0.5).nonzero()[-1]))):
        moved = binary.clone()
        moved[image, patch] = h
        finite_difference = float(hide_loss(moved) - hide_loss(binary)) / h
        assert abs(float(scores.grad[image, patch]) - finite_difference) <= 1e-4 * abs(finite_difference)
