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
