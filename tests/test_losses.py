"""Each CL-MAE loss term against a value computed by hand on a small example."""

import math

import pytest
import torch

from clmae.maskers.clmae import binarization_loss, diversity_loss, mask_ratio_kl_loss, soft_reconstruction_loss
from clmae.models.mae import per_patch_error, reconstruction_loss


def test_reconstruction_loss_averages_hidden_patches_only():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [3.0, 3.0]]])  # per-patch errors 1, 2, 9
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    assert reconstruction_loss(pred, target, mask).item() == pytest.approx((1 + 9) / 2)


def test_soft_reconstruction_weights_by_one_minus_score():
    pred = torch.zeros(1, 2, 1)
    target = torch.tensor([[[1.0], [2.0]]])  # errors 1 and 4
    scores = torch.tensor([[0.25, 0.5]])  # weights 0.75 and 0.5
    expected = (0.75 * 1 + 0.5 * 4) / (0.75 + 0.5)
    assert soft_reconstruction_loss(per_patch_error(pred, target), scores).item() == pytest.approx(expected)


def test_binarization_loss_uses_authors_scale():
    sigma = 0.12
    peak = sigma * math.sqrt(2 * math.pi)  # the authors divide by the normalising constant
    scores = torch.tensor([[0.5, 0.5 + sigma, 0.0, 1.0]])
    expected = peak * (1 + math.exp(-0.5) + 2 * math.exp(-(0.5**2) / (2 * sigma**2))) / 4
    assert binarization_loss(scores).item() == pytest.approx(expected, rel=1e-6)
    assert binarization_loss(torch.full((3, 5), 0.5)).item() == pytest.approx(peak, rel=1e-6)


def test_mask_ratio_kl_sum_and_mean():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]])
    k = 0.25

    def kl(p):
        return p * math.log(p / k) + (1 - p) * math.log((1 - p) / (1 - k))

    total = kl(0.5) + kl(0.1)
    assert mask_ratio_kl_loss(scores, k, "sum").item() == pytest.approx(total, rel=1e-5)
    assert mask_ratio_kl_loss(scores, k, "mean").item() == pytest.approx(total / 2, rel=1e-5)
    assert mask_ratio_kl_loss(torch.full((2, 8), k), k).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        mask_ratio_kl_loss(scores, k, "max")


def test_diversity_loss_hand_computed_pairs():
    s = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])  # distances 5, 0, 5
    expected = (math.exp(-0.5) + 1.0 + math.exp(-0.5)) / 3
    assert diversity_loss(s, scale=0.1).item() == pytest.approx(expected, rel=1e-6)
    assert diversity_loss(s[:1]).item() == 0.0


def test_diversity_loss_matches_pairwise_loop():
    torch.manual_seed(0)
    s = torch.rand(7, 10)
    loop = sum(torch.exp(-0.1 * torch.linalg.norm(s[i] - s[j])) for i in range(7) for j in range(i + 1, 7)) / 21
    assert diversity_loss(s).item() == pytest.approx(loop.item(), rel=1e-5)
