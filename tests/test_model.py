"""The autoencoder, the maskers and the pure helpers."""

import numpy as np
import pytest
import torch

from clmae.errors import ConfigError
from clmae.maskers import LearnedMasker, MaskingBatch, RandomMasker, create_masker, mask_from_keep, topk_keep_indices
from clmae.maskers.clmae import scaled_soft_forward
from clmae.models.configs import MODEL_CONFIGS, model_config
from clmae.models.layers import gather_tokens, patchify, sincos_pos_embed_2d, unpatchify
from clmae.models.mae import create_model


def test_patchify_unpatchify_inverse_and_layout():
    imgs = torch.randn(2, 3, 8, 12)
    x = torch.randn(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    assert torch.equal(unpatchify(p, 4, 3), x)
    # patch 1 is the top-right block, channels last inside a patch
    assert torch.equal(p[0, 1].reshape(4, 4, 3).permute(2, 0, 1), x[0, :, 0:4, 4:8])
    with pytest.raises(ValueError):
        patchify(imgs[..., :7], 4)


def test_sincos_position_embedding_structure():
    emb = sincos_pos_embed_2d(16, 3)
    assert emb.shape == (10, 16)
    assert torch.all(emb[0] == 0)  # CLS slot
    grid = emb[1:].reshape(3, 3, 16)
    # first half depends on the column only, second half on the row only
    assert torch.allclose(grid[0, :, :8], grid[2, :, :8])
    assert torch.allclose(grid[:, 0, 8:], grid[:, 2, 8:])
    # column 0 → sin(0)=0 for the sine part, cos(0)=1 for the cosine part
    assert torch.allclose(grid[0, 0, :4], torch.zeros(4)) and torch.allclose(grid[0, 0, 4:8], torch.ones(4))
    assert torch.allclose(grid[0, 1, 0], torch.tensor(np.sin(1.0), dtype=torch.float32))


def test_registry_has_paper_configs_and_overrides():
    expected = {"vit_tiny_patch4_32", "vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"}
    assert expected <= set(MODEL_CONFIGS)
    for name in ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"):
        c = MODEL_CONFIGS[name]
        assert (c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads) == (512, 8, 16)
    tiny = MODEL_CONFIGS["vit_tiny_patch4_32"]
    assert (tiny.patch_size, tiny.embed_dim, tiny.depth, tiny.num_heads) == (4, 192, 12, 3)
    c = model_config("vit_tiny_patch4_32", in_chans=1, img_size=16)
    assert (c.in_chans, c.num_patches, c.patch_dim) == (1, 16, 16)
    with pytest.raises(ConfigError, match="not divisible"):
        model_config("vit_tiny_patch4_32", img_size=30)
    with pytest.raises(ConfigError, match="unknown model"):
        model_config("vit_giant")


def test_topk_keeps_exactly_the_highest_scores():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [0.5, 0.4, 0.6, 0.0, 0.7]])
    ids = topk_keep_indices(scores, 2)
    assert [sorted(r) for r in ids.tolist()] == [[1, 3], [2, 4]]
    mask = mask_from_keep(ids, 5)
    assert mask.tolist() == [[1, 0, 1, 0, 1], [1, 1, 0, 1, 0]]


def test_random_masker_keeps_distinct_patches_and_varies():
    tokens = torch.zeros(4, 16, 8)
    g = torch.Generator().manual_seed(0)
    a = RandomMasker().keep_indices(MaskingBatch(torch.zeros(4, 1, 8, 8), tokens, 4, g))
    b = RandomMasker().keep_indices(MaskingBatch(torch.zeros(4, 1, 8, 8), tokens, 4, g))
    assert a.shape == (4, 4)
    assert all(len(set(r)) == 4 for r in a.tolist())
    assert not torch.equal(a, b)


def test_mae_loss_is_mse_over_hidden_patches():
    torch.manual_seed(0)
    model = create_model("vit_micro_patch2_8").eval()
    x = torch.randn(3, 1, 8, 8)
    ids = RandomMasker().keep_indices(MaskingBatch(x, model.embed(x), model.num_keep(0.75),
                                                   torch.Generator().manual_seed(1)))
    out = model(x, ids)
    assert model.num_keep(0.75) == 4 and out["mask"].sum(1).tolist() == [12, 12, 12]
    per_patch = ((out["pred"] - patchify(x, 2)) ** 2).mean(-1)
    hidden = out["mask"].bool()
    assert out["loss"].item() == pytest.approx(per_patch[hidden].mean().item(), rel=1e-5)


def test_encoder_sees_only_visible_patches():
    """Changing a hidden patch's pixels must not change the encoding of the visible ones."""
    torch.manual_seed(0)
    model = create_model("vit_micro_patch2_8").eval()
    x = torch.randn(1, 1, 8, 8)
    ids = torch.tensor([[0, 5, 10, 15]])
    y = x.clone()
    y[..., 0:2, 2:4] += 5.0  # patch 1: hidden
    with torch.no_grad():
        a = model.encode_tokens(gather_tokens(model.embed(x), ids))
        b = model.encode_tokens(gather_tokens(model.embed(y), ids))
    assert torch.allclose(a, b)


def test_norm_pix_target_is_normalised_per_patch():
    model = create_model("vit_micro_patch2_8", norm_pix_loss=True)
    t = model.target(torch.rand(2, 1, 8, 8) * 3)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-5)


def test_soft_forward_with_all_ones_equals_full_encode_decode():
    torch.manual_seed(0)
    model = create_model("vit_micro_patch2_8").eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        full = model.decode(model.encode_tokens(model.embed(x)))
        soft = scaled_soft_forward(model, x, torch.ones(2, 16), model.embed(x))
    assert torch.allclose(full, soft, atol=1e-6)


def test_masking_module_architecture_and_detached_input():
    c = model_config("vit_tiny_patch4_32")
    masker = create_masker("clmae", c)
    assert isinstance(masker, LearnedMasker)
    net = masker.network
    assert len(net.blocks) == 5 and net.blocks[0].attn.num_heads == 4
    assert net.head.out_features == c.num_patches and net.cls_token.shape[-1] == c.embed_dim
    tokens = torch.randn(2, c.num_patches, c.embed_dim, requires_grad=True)
    scores = masker(tokens)
    assert scores.shape == (2, 64) and bool(((scores > 0) & (scores < 1)).all())
    assert torch.autograd.grad(scores.sum(), tokens, allow_unused=True)[0] is None
