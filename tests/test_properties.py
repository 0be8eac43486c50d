"""Property-based tests (hypothesis): patch layout, masking invariants, untrusted checkpoint bytes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clmae.errors import CheckpointError
from clmae.io.checkpoint import (
    FORMAT,
    load_pretrained,
    read_training_state,
    read_weights,
    save_training_state,
    save_weights,
)
from clmae.maskers import (
    LearnedMasker,
    MaskingBatch,
    keep_from_mask,
    mask_from_keep,
    random_keep_indices,
    topk_keep_indices,
)
from clmae.models.configs import model_config
from clmae.models.layers import patchify, unpatchify
from clmae.models.mae import MaskedAutoencoderViT

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ratios = st.floats(min_value=0.01, max_value=0.99, allow_nan=False, exclude_min=False)


# ---------------------------------------------------------------------------------------------
# patchify / unpatchify


@FAST
@given(n=st.integers(1, 3), c=st.sampled_from([1, 3]), p=st.integers(1, 5), g=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
def test_unpatchify_inverts_patchify(n, c, p, g, seed):
    imgs = torch.rand(n, c, g * p, g * p, generator=torch.Generator().manual_seed(seed))
    patches = patchify(imgs, p)
    assert patches.shape == (n, g * g, p * p * c)
    assert torch.equal(unpatchify(patches, p, c), imgs)


@FAST
@given(c=st.sampled_from([1, 3]), p=st.integers(1, 4), g=st.integers(1, 5), data=st.data())
def test_patch_layout_is_row_major_with_pixels_then_channels(c, p, g, data):
    """Patch ``r·g + col`` holds pixel block (r, col), flattened as (row, column, channel): MAE's layout."""
    imgs = torch.arange(c * (g * p) ** 2, dtype=torch.float32).reshape(1, c, g * p, g * p)
    r, col = data.draw(st.integers(0, g - 1)), data.draw(st.integers(0, g - 1))
    block = imgs[0, :, r * p:(r + 1) * p, col * p:(col + 1) * p]  # (c, p, p)
    assert torch.equal(patchify(imgs, p)[0, r * g + col], block.permute(1, 2, 0).reshape(-1))


@FAST
@given(p=st.integers(2, 5), g=st.integers(1, 4), extra=st.integers(1, 4))
def test_patchify_refuses_sizes_not_divisible_by_the_patch(p, g, extra):
    assume(extra % p)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 1, g * p + extra, g * p + extra), p)


# ---------------------------------------------------------------------------------------------
# masking invariants


@FAST
@given(g=st.integers(1, 8), ratio=ratios)
def test_num_keep_matches_the_ratio(g, ratio):
    mae = MaskedAutoencoderViT(model_config("vit_micro_patch2_8", img_size=2 * g, depth=1, decoder_depth=1))
    length = g * g
    k = mae.num_keep(ratio)
    assert k == max(1, int(length * (1 - ratio)))
    assert 1 <= k <= length


@FAST
@given(n=st.integers(1, 4), length=st.integers(1, 64), ratio=ratios, seed=st.integers(0, 2**31 - 1))
def test_random_keep_indices_exact_count_no_duplicates_in_range(n, length, ratio, seed):
    k = max(1, int(length * (1 - ratio)))
    ids = random_keep_indices(n, length, k, torch.Generator().manual_seed(seed))
    assert ids.shape == (n, k)
    assert ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < length
    for row in ids:
        assert len(set(row.tolist())) == k


@FAST
@given(n=st.integers(1, 4), length=st.integers(1, 64), ratio=ratios, seed=st.integers(0, 2**31 - 1))
def test_random_keep_indices_are_reproducible_from_the_generator(n, length, ratio, seed):
    k = max(1, int(length * (1 - ratio)))
    a = random_keep_indices(n, length, k, torch.Generator().manual_seed(seed))
    b = random_keep_indices(n, length, k, torch.Generator().manual_seed(seed))
    assert torch.equal(a, b)


@FAST
@given(n=st.integers(1, 4), length=st.integers(1, 64), ratio=ratios, seed=st.integers(0, 2**31 - 1))
def test_mask_from_keep_and_keep_from_mask_are_inverse(n, length, ratio, seed):
    k = max(1, int(length * (1 - ratio)))
    ids = random_keep_indices(n, length, k, torch.Generator().manual_seed(seed))
    mask = mask_from_keep(ids, length)
    assert mask.shape == (n, length)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask.sum(1), torch.full((n,), float(length - k)))  # exactly L − K hidden
    assert torch.equal(mask.gather(1, ids), torch.zeros(n, k))  # kept patches are visible
    back = keep_from_mask(mask)
    assert torch.equal(back, ids.sort(dim=1).values)  # same set, ascending
    assert torch.equal(mask_from_keep(back, length), mask)


@FAST
@given(rows=st.lists(st.lists(st.booleans(), min_size=2, max_size=24), min_size=2, max_size=4))
def test_keep_from_mask_refuses_rows_with_different_visible_counts(rows):
    length = len(rows[0])
    rows = [(r + [True] * length)[:length] for r in rows]
    counts = {sum(not v for v in r) for r in rows}
    mask = torch.tensor(rows, dtype=torch.float32)  # True → 1.0 = hidden
    if len(counts) > 1:
        with pytest.raises(ValueError, match="same number"):
            keep_from_mask(mask)
    else:
        assert torch.equal(mask_from_keep(keep_from_mask(mask), length), mask)


@FAST
@given(n=st.integers(1, 4), length=st.integers(1, 64), ratio=ratios, seed=st.integers(0, 2**31 - 1),
       ties=st.booleans())
def test_topk_keeps_exactly_the_highest_scores(n, length, ratio, seed, ties):
    g = torch.Generator().manual_seed(seed)
    k = max(1, int(length * (1 - ratio)))
    scores = torch.rand(n, length, generator=g)
    if ties:  # few distinct values: the rule must still hold at the boundary
        scores = (scores * 3).floor() / 3
    ids = topk_keep_indices(scores, k)
    assert ids.shape == (n, k)
    for i in range(n):
        kept = set(ids[i].tolist())
        assert len(kept) == k
        dropped = [j for j in range(length) if j not in kept]
        kept_scores = scores[i, ids[i]]
        assert torch.all(kept_scores[:-1] >= kept_scores[1:])  # highest first
        if dropped:
            assert float(kept_scores.min()) >= float(scores[i, dropped].max())
        if not ties:
            assert kept == set(torch.argsort(scores[i], descending=True)[:k].tolist())


def test_learned_masker_keeps_k_distinct_patches_across_ratios():
    cfg = model_config("vit_micro_patch2_8")
    torch.manual_seed(0)
    masker = LearnedMasker(cfg.num_patches, cfg.embed_dim, cfg.masker_dim, cfg.masker_depth, cfg.masker_num_heads)
    tokens = torch.randn(5, cfg.num_patches, cfg.embed_dim)
    with torch.no_grad():
        scores = masker(tokens)
    for k in sorted({1, cfg.num_patches // 4, cfg.num_patches // 2, cfg.num_patches - 1, cfg.num_patches}):
        ids = masker.keep_indices(MaskingBatch(torch.zeros(5, 1, 8, 8), tokens, k))
        assert ids.shape == (5, k)
        assert all(len(set(r.tolist())) == k for r in ids)
        assert torch.equal(ids, topk_keep_indices(scores, k))


# ---------------------------------------------------------------------------------------------
# untrusted checkpoint bytes: any cut or damaged file is a CheckpointError, never another exception


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[bytes, bytes]:
    """A real checkpoint pair of the micro model, as bytes (.pt, .safetensors)."""
    d = tmp_path_factory.mktemp("ckpt")
    cfg = model_config("vit_micro_patch2_8", depth=1, decoder_depth=1, masker_depth=1)
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(cfg)
    mc = dataclasses.asdict(cfg)
    weights = {f"mae.{k}": v.clone() for k, v in mae.state_dict().items()}
    state = {"format": FORMAT, "weights": weights, "opt_mae": {}, "opt_masker": None,
             "generator": torch.Generator().manual_seed(0).get_state(), "epoch": 1, "step_in_epoch": 0,
             "iteration": 4, "masker_updates": 4, "model_config": mc, "run_config": {"method": "mae"}, "data": {}}
    save_training_state(d / "c.pt", state)
    save_weights(d / "c.safetensors", {"mae": mae}, {"model_config": mc, "run_config": {"method": "mae"},
                                                     "data": {}, "epoch": 1, "step_in_epoch": 0, "iteration": 4})
    # sanity: the intact files load
    read_training_state(d / "c.pt")
    load_pretrained(d / "c.safetensors")
    return (d / "c.pt").read_bytes(), (d / "c.safetensors").read_bytes()


def _damage(blob: bytes, cut: float, flips: list[tuple[float, int]]) -> bytes:
    data = bytearray(blob[: int(len(blob) * cut)])
    for where, value in flips:
        if data:
            data[int(where * (len(data) - 1))] = value
    return bytes(data)


damage = dict(cut=st.floats(0.0, 0.999), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=3))


@pytest.mark.parametrize("which, suffix, loaders", [(0, ".pt", (read_training_state, load_pretrained)),
                                                    (1, ".safetensors", (read_weights, load_pretrained))],
                         ids=["resume-file", "weights-file"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**damage)
def test_cut_checkpoint_file_is_a_checkpoint_error(tiny_checkpoint, tmp_path, which, suffix, loaders, cut, flips):
    path = tmp_path / f"c{suffix}"
    path.write_bytes(_damage(tiny_checkpoint[which], cut, flips))
    for load in loaders:
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert str(path) in str(info.value)
