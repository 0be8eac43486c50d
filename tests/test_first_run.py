"""A user's first run on their own data: a model that fits it, live feedback, and no traps.

The default model follows the data's native size; every size error names the sizes in play; a run
prints a line per epoch (no ``\\r`` outside a terminal) and a summary; failed set-ups leave no folder;
a start killed before its first checkpoint is started over by the same command; usage errors are one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clmae.data import load_dataset, scan_data
from clmae.errors import ConfigError
from clmae.model import (
    MODEL_CONFIGS,
    MaskedAutoencoderViT,
    default_model_for,
    param_count,
    resolve_model,
)

# Native size → (model, image size, patch size) without --model.
EXPECTED = {
    8: ("vit_micro_patch2_8", 8, 2),
    28: ("vit_tiny_patch4_28", 28, 4),
    32: ("vit_tiny_patch4_32", 32, 4),
    64: ("vit_tiny_patch8_64", 64, 8),
    96: ("vit_tiny_patch12_96", 96, 12),
    224: ("vit_base_patch16_224", 224, 16),
    500: ("vit_base_patch16_224", 224, 16),
}


# =============================================================================================
# The default model


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", sorted(EXPECTED))
def test_default_model_rule(size, channels):
    choice = default_model_for(size, channels)
    assert (choice.name, choice.img_size, choice.patch_size) == EXPECTED[size]


def test_default_model_rule_keeps_small_images_near_native_size_on_a_grid_a_patch_divides():
    for size in range(1, 600):
        c = default_model_for(size, 3)
        assert c.img_size % c.patch_size == 0 and c.name in MODEL_CONFIGS, size
        assert 4 <= c.grid_size <= 14, (size, c)
        if 8 <= size < 160:  # about its own size: within half a patch
            assert abs(c.img_size - size) <= c.patch_size / 2, (size, c)
        if size >= 160:
            assert (c.name, c.img_size) == ("vit_base_patch16_224", 224)
    assert (default_model_for(50, 3).img_size, default_model_for(60, 3).img_size) == (48, 64)  # odd sizes


def _write_images(folder: Path, size: int, gray: bool, n: int = 3) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(size)
    for i in range(n):
        pixels = rng.integers(0, 255, (size, size + i) if gray else (size, size + i, 3), dtype=np.uint8)
        Image.fromarray(pixels, "L" if gray else "RGB").save(folder / f"x{i}.png")


@pytest.mark.parametrize("kind", ["npz", "folder"])
@pytest.mark.parametrize("gray", [True, False], ids=["gray", "rgb"])
@pytest.mark.parametrize("size", sorted(EXPECTED))
def test_default_model_from_the_data(tmp_path, size, gray, kind):
    """The data's native size and channels, read from the array shape or from file headers, pick the model."""
    if kind == "npz":
        shape = (3, size, size) if gray else (3, size, size, 3)
        np.savez(tmp_path / "x.npz", x_train=np.zeros(shape, np.uint8))
        data = str(tmp_path / "x.npz")
    else:
        _write_images(tmp_path / "imgs", size, gray)
        data = str(tmp_path / "imgs")
    dataset = load_dataset(data)
    scan = scan_data(dataset)
    assert (scan.size, scan.channels) == (size, 1 if gray else 3)
    choice = resolve_model(None, None, None, scan.size, scan.channels, scan.note)
    assert (choice.name, choice.img_size, choice.patch_size) == EXPECTED[size]


def test_a_folder_is_scanned_from_a_sample_of_headers_median_shorter_side(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sides = [40, 50, 60, 70, 80] * 8  # median 60
    for i, side in enumerate(sides):
        mode = "L" if i == 3 else "RGB"  # one grayscale photo: still an RGB folder
        pixels = rng.integers(0, 255, (side, side + 7, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").convert(mode).save(folder / f"p{i:02d}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    scan = scan_data(load_dataset(str(folder)), sample=20)
    assert len(opened) == 20  # a sample of headers, not every file
    assert scan.channels == 3 and 40 <= scan.size <= 80 and "sampled images, 40-80 px" in scan.note
    full = scan_data(load_dataset(str(folder)), sample=1000)
    assert full.size == 60 and full.skipped == {"not an image": 1}
    assert resolve_model(None, None, None, full.size, 3).name == "vit_tiny_patch8_64"


# =============================================================================================
# --img-size / --patch-size alone adjust the rest; size errors name the sizes in play


def test_img_size_or_patch_size_alone_adjusts_the_other():
    c = resolve_model(None, 64, None, 28, 1)  # --img-size alone: that size's model and patch
    assert (c.name, c.img_size, c.patch_size) == ("vit_tiny_patch8_64", 64, 8)
    c = resolve_model(None, 50, None, 28, 1)  # no preferred patch divides 50: one that does, ~8x8 grid
    assert (c.img_size, c.patch_size) == (50, 5)
    c = resolve_model(None, None, 3, 28, 1)  # --patch-size alone: the multiple of it nearest the data's size
    assert (c.name, c.img_size, c.patch_size) == ("vit_tiny_patch4_28", 27, 3)
    assert "--patch-size 3" in c.reason and "28 px" in c.reason
    c = resolve_model("vit_base_patch16_224", None, 14, 500, 3)  # --model with --patch-size: 224 is 16x14
    assert (c.img_size, c.patch_size) == (224, 14)
    c = resolve_model("vit_tiny_patch4_32", None, None, 28, 3)  # --model alone: its own sizes
    assert (c.img_size, c.patch_size) == (32, 4)


@pytest.mark.parametrize("args, fragments", [
    ((None, 28, 3, 28), ["image size 28 is not divisible by patch size 3", "the data is 28 px", "e.g. 27", "2, 4, 7"]),
    (("vit_tiny_patch4_32", 30, None, 28), ["image size 30 is not divisible by patch size 4", "the data is 28 px"]),
    ((None, 16, 16, 28), ["patch size 16 leaves a 1x1 grid at image size 16", "the data is 28 px"]),
    ((None, 29, None, 28), ["--img-size 29: no patch size divides it", "the data is 28 px"]),
])
def test_size_errors_speak_of_the_sizes_in_play(args, fragments):
    with pytest.raises(ConfigError) as err:
        resolve_model(*args, 1)
    message = str(err.value)
    assert "224" not in message  # never a size that is not in play
    for fragment in fragments:
        assert fragment in message, message


def test_parameter_counts_match_the_built_models():
    for name, cfg in MODEL_CONFIGS.items():
        with torch.device("meta"):  # shapes only: the huge model costs nothing
            model = MaskedAutoencoderViT(cfg)
        encoder = sum(p.numel() for k, p in model.named_parameters() if not k.startswith(("decoder_", "mask_token")))
        total = sum(p.numel() for p in model.parameters())
        assert param_count(cfg) == (encoder, total - encoder), name
