"""Reduced-size JPEG decoding for training crops: the crop equals a full decode's within a stated tolerance.

:func:`clmae.data.images.open_for_crop` decodes a JPEG at 1/2, 1/4 or 1/8 scale when the crop that will be
taken still spans the output size there. These tests decode photo-like JPEGs (a real photograph with noise, so
the DCT coefficients are those of a camera image) of several sizes, RGB, grayscale, CMYK and EXIF-rotated, both
ways, and compare the same crops.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
import torch
from PIL import Image

from clmae.data.images import CropDecoder, crop_and_resize, dct_scale, open_for_crop, open_image, resample_crop

SIZE = 64
# uint8 levels, the tolerance open_for_crop documents. Measured on these noisy photos: 0.4-3.6; saving the same
# photos once more as JPEG at quality 90 changes them by 1.8-4.1 (the DCT's reduction is another low-pass filter).
MEAN_TOLERANCE = 4.0


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A camera-like image of any size: a real photograph resampled, plus sensor-like noise."""
    src = Image.open(Path(sklearn.datasets.__file__).parent / "images" / "china.jpg").convert("RGB")
    a = np.asarray(src.resize((width, height), Image.Resampling.BICUBIC)).astype(np.float32)
    a += np.random.default_rng(seed).normal(0, 3, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def both_ways(data: bytes, box, channels: int = 3):
    reduced, rbox = open_for_crop(io.BytesIO(data), channels, SIZE, box, reduce=True)
    full, fbox = open_for_crop(io.BytesIO(data), channels, SIZE, box, reduce=False)
    a = resample_crop(reduced, rbox, SIZE).numpy().astype(np.float64)
    b = resample_crop(full, fbox, SIZE).numpy().astype(np.float64)
    return reduced.size, full.size, np.abs(a - b)


CASES = [  # (width, height, mode): several sizes, the three JPEG colour spaces
    (500, 375, "RGB"), (1200, 800, "RGB"), (2400, 1800, "RGB"), (700, 900, "L"), (1000, 1000, "CMYK"),
]


@pytest.mark.parametrize("width,height,mode", CASES)
def test_reduced_decoding_gives_the_full_decodes_crop_within_tolerance(width, height, mode):
    data = jpeg(photo(width, height).convert(mode))
    channels = 1 if mode == "L" else 3
    short = min(width, height)
    boxes = [(0, 0, height, width), (10, 20, short // 2, short // 2), (height // 3, width // 4, short // 3, short // 4),
             (5, 7, 2 * SIZE + 3, 3 * SIZE), (1, 1, SIZE + 9, SIZE + 17)]
    reduced_any = False
    for box in boxes:
        scale = dct_scale(box[2], box[3], SIZE)
        rsize, fsize, diff = both_ways(data, box, channels)
        assert fsize == (width, height)
        assert rsize == (-(-width // scale), -(-height // scale))  # decoded at the scale the crop allows
        reduced_any |= scale > 1
        assert diff.mean() <= MEAN_TOLERANCE, (box, scale, diff.mean())
    assert reduced_any


def test_the_full_decode_path_is_open_image_and_the_same_crop_exactly_also_for_a_rotated_photo():
    """reduce=False is the reference the tolerance is stated against: the upright image, the box resampled."""
    img = photo(900, 600)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: seen as 600 wide, 900 high
    data = jpeg(img, exif=exif.tobytes())
    box = (100, 50, 500, 400)  # top, left, h, w in the upright image (900 high, 600 wide)
    full, fbox = open_for_crop(io.BytesIO(data), 3, SIZE, box, reduce=False)
    assert full.size == (600, 900) and fbox == box
    seen = open_image(io.BytesIO(data))
    want = resample_crop(seen, box, SIZE, flip=True)
    assert torch.equal(resample_crop(full, fbox, SIZE, flip=True), want)
    # torchvision's crop-then-resize: the same but at the edges, where resampling in place reads the filter's margin
    # beyond the box instead of repeating its border.
    cropped = torch.from_numpy(np.array(seen.crop((50, 100, 450, 600)).resize(
        (SIZE, SIZE), Image.Resampling.BICUBIC).transpose(Image.Transpose.FLIP_LEFT_RIGHT))).permute(2, 0, 1)
    edge = (want.float() - cropped.float()).abs()
    assert torch.equal(want[:, 2:-2, 2:-2], cropped[:, 2:-2, 2:-2]) and edge.mean() < 0.5, edge.mean()
    reduced, rbox = open_for_crop(io.BytesIO(data), 3, SIZE, box, reduce=True)
    assert reduced.size == (150, 225)  # 1/4 scale: the crop is still 100 x 125 px there
    diff = np.abs(resample_crop(reduced, rbox, SIZE).numpy().astype(float) - want.flip(-1).numpy())
    assert diff.mean() <= MEAN_TOLERANCE


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1), ("L", 3), ("RGB", 1)])
def test_a_jpeg_decoded_straight_into_a_tensor_gives_pillows_crop(mode, channels):
    """Where no reduced decode is needed, a worker decodes an upright YCbCr or grayscale JPEG with torchvision.io
    (libjpeg-turbo, as Pillow), without a Pillow image: the crop equals Pillow's decode + crop_and_resize."""
    from clmae.data.augment import sample_crop_box

    data = jpeg(photo(150, 110, seed=4).convert(mode))
    decoder = CropDecoder(SIZE, seed=5)  # crops of 150 x 110 px never span 2 x 64 px: no reduced decode
    g = torch.Generator().manual_seed(5)
    for _ in range(6):
        got = decoder(io.BytesIO(data), channels)
        box = sample_crop_box(110, 150, generator=g)
        flip = bool(torch.rand(1, generator=g) < 0.5)
        assert dct_scale(box[2], box[3], SIZE) == 1
        want = crop_and_resize(open_image(io.BytesIO(data), channels), box, SIZE, flip)
        assert got.shape == want.shape == (channels, SIZE, SIZE)
        if (mode, channels) == ("RGB", 1):  # libjpeg's luma from YCbCr vs Pillow's from RGB: measured 0.014, max 3
            diff = (got.float() - want.float()).abs()
            assert diff.mean() < 0.05 and diff.max() <= 3, (diff.mean(), diff.max())
        else:  # the same libjpeg-turbo decode, the same resize
            assert torch.equal(got, want), (mode, channels)


def test_one_images_crop_box_is_the_batched_samplers_for_one_image():
    from clmae.data.augment import sample_crop_box, sample_crop_boxes

    for seed in range(300):
        for height, width in ((375, 500), (500, 333), (64, 64), (900, 30)):
            torch.manual_seed(seed)
            batched = tuple(sample_crop_boxes(1, height, width, None)[0].tolist())
            torch.manual_seed(seed)
            assert tuple(float(v) for v in sample_crop_box(height, width)) == batched


def test_the_crop_decoder_draws_box_and_flip_from_its_own_seeded_generator():
    """Without workers the crops come from ``seed`` alone, never from (or into) torch's global generator."""
    from clmae.data.augment import sample_crop_box

    data = jpeg(photo(640, 480))
    decoder = CropDecoder(SIZE, scale=(0.2, 1.0), seed=3)
    state = torch.get_rng_state()
    got = [decoder(io.BytesIO(data)) for _ in range(4)]
    assert torch.equal(torch.get_rng_state(), state)
    g = torch.Generator().manual_seed(3)
    for x in got:
        box = sample_crop_box(480, 640, (0.2, 1.0), generator=g)
        flip = bool(torch.rand(1, generator=g) < 0.5)
        img, rbox = open_for_crop(io.BytesIO(data), 3, SIZE, box, reduce=True)
        assert x.dtype == torch.uint8 and x.shape == (3, SIZE, SIZE)
        assert torch.equal(x, crop_and_resize(img, rbox, SIZE, flip))
    assert not torch.equal(got[0], got[1])
    gray = CropDecoder(SIZE)(io.BytesIO(jpeg(photo(640, 480).convert("L"))), channels=1)
    assert gray.shape == (1, SIZE, SIZE)


@pytest.mark.parametrize("width,height,mode", [(500, 375, "RGB"), (256, 341, "RGB"), (300, 300, "L")])
def test_workers_crop_is_torchvisions_cut_then_resize_and_pillows_in_place_resample_inside_the_edges(width, height,
                                                                                                      mode):
    """crop_and_resize (torch's uint8 antialiased bicubic, the workers' fast path) against Pillow's bicubic of the cut
    box (what torchvision's RandomResizedCrop gives a PIL image) and against resample_crop, which also reads the
    filter's margin beyond the box: they differ by rounding inside, and at the edges only where that margin is."""
    from clmae.data.augment import sample_crop_box

    img, size, g = photo(width, height).convert(mode), 224, torch.Generator().manual_seed(0)
    cut, inside = [], []
    for i in range(12):
        box = sample_crop_box(height, width, generator=g)
        got = crop_and_resize(img, box, size, flip=i % 2 == 1).float()
        top, left, h, w = (int(v) for v in box)
        pil = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else pil
        pil = torch.from_numpy(np.array(pil)).float()
        pil = pil.unsqueeze(0) if pil.ndim == 2 else pil.permute(2, 0, 1)
        cut.append((got - pil).abs())
        inside.append((got - resample_crop(img, box, size, flip=i % 2 == 1).float()).abs()[:, 3:-3, 3:-3])
    cut, inside = torch.stack(cut), torch.stack(inside)
    assert got.shape == (1 if mode == "L" else 3, size, size)
    assert cut.mean() < 0.15 and cut.max() <= 8, (cut.mean(), cut.max())  # measured 0.06-0.09, at most 5
    assert inside.mean() < 0.3 and inside.max() <= 8, (inside.mean(), inside.max())  # measured 0.004-0.19, 5
    # A fractional box (a reduced decode's) is resampled in place by Pillow, as resample_crop does.
    assert torch.equal(crop_and_resize(img, (10.5, 3.25, 100.0, 90.5), 32), resample_crop(img, (10.5, 3.25, 100.0,
                                                                                             90.5), 32))


# ---------------------------------------------------------------------------------------------
# Crops resampled on the device (--augment-on device): workers only decode and cut the region a crop reads


def test_batched_resampling_of_regions_matches_pillows_crop_within_a_fraction_of_a_level():
    from clmae.data.augment import resample_regions
    from clmae.data.images import crop_region
    from clmae.data.loader import collate_regions

    img = photo(500, 375)
    boxes = [(0, 0, 375, 500), (10, 20, 187, 187), (200, 300, 175, 200), (0, 430, 40, 70), (300, 0, 75, 60),
             (12.5, 7.25, 140.5, 99.75)]  # whole image, edges, upscaled crops, a fractional (DCT-scaled) box
    want, regions = [], []
    for i, box in enumerate(boxes):
        flip = i % 2 == 1
        want.append(resample_crop(img, box, SIZE, flip).float())
        regions.append(crop_region(img, box, SIZE, flip))
    assert regions[1].pixels.shape[1:] < (375, 500)  # a region, not the image
    batch = collate_regions(regions)
    got = resample_regions(*batch, SIZE)
    assert got.shape == (len(boxes), 3, SIZE, SIZE) and got.dtype == torch.float32
    diff = (got - torch.stack(want)).abs()
    assert diff.mean() < 0.35 and diff.max() <= 2.0, (diff.mean(), diff.max())  # Pillow rounds between its passes


def test_device_augmentation_gives_the_workers_batches(tmp_path):
    """The same random numbers are drawn either way: --augment-on device trains on the crops workers would make."""
    from clmae.data.datasets import load_dataset
    from clmae.data.loader import ShardBatches, TrainBatches
    from clmae.data.shards import write_shards

    for i in range(12):
        (tmp_path / "photos").mkdir(exist_ok=True)
        photo(90 + 7 * i, 70 + 5 * i, seed=i).save(tmp_path / "photos" / f"{i:02d}.jpg", quality=90)
    write_shards(tmp_path / "photos", tmp_path / "shards", shard_size=4)
    for data, kind in ((tmp_path / "photos", TrainBatches), (tmp_path / "shards", ShardBatches)):
        out = {}
        for where in ("workers", "device"):
            batches = kind(load_dataset(str(data)), 4, 32, torch.device("cpu"), seed=1, num_workers=0,
                           augment_on=where)
            out[where] = torch.cat(list(batches.epoch(0)))
        assert out["device"].shape == out["workers"].shape == (12, 3, 32, 32)
        diff = (out["device"] - out["workers"]).abs() * 255 * 0.225  # normalised units back to ~uint8 levels
        assert diff.mean() < 0.35, (kind.__name__, diff.mean())


# ---------------------------------------------------------------------------------------------
# JPEGs decoded on the device (--decode-on device): workers only read the files. On the CPU this runs the same
# code with torchvision.io.decode_jpeg(device="cpu"), the path CUDA takes with nvJPEG.


def mixed_photos(folder: Path) -> Path:
    """JPEGs the device decodes (RGB, grayscale) and files that stay in the workers (PNG, CMYK, EXIF-rotated), all
    smaller than twice the crop size, so the workers decode them at full scale too."""
    folder.mkdir()
    for i in range(10):
        photo(100 + 2 * i, 90 + i, seed=i).save(folder / f"{i:02d}.jpg", quality=90)
    photo(110, 95, seed=10).convert("L").save(folder / "10.jpg", quality=90)
    photo(120, 90, seed=11).save(folder / "11.png")
    photo(100, 100, seed=12).convert("CMYK").save(folder / "12.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo(120, 80, seed=13).save(folder / "13.jpg", quality=90, exif=exif.tobytes())
    return folder


def test_jpegs_decoded_on_the_device_give_the_workers_batches_other_files_stay_in_the_workers(tmp_path):
    from clmae.data.datasets import load_dataset
    from clmae.data.images import EncodedCrop
    from clmae.data.loader import ShardBatches, TrainBatches
    from clmae.data.shards import write_shards

    photos = mixed_photos(tmp_path / "photos")
    write_shards(photos, tmp_path / "shards", shard_size=5)
    decoder = CropDecoder(64, decode_on_device=True)
    sent = {p.name: isinstance(decoder(p), EncodedCrop) for p in sorted(photos.iterdir())}
    assert sent == {**{f"{i:02d}.jpg": True for i in range(11)}, "11.png": False, "12.jpg": False, "13.jpg": False}
    for data, kind in ((photos, TrainBatches), (tmp_path / "shards", ShardBatches)):
        out = {}
        for where in ("workers", "device"):
            batches = kind(load_dataset(str(data)), 7, 64, torch.device("cpu"), seed=1, num_workers=0,
                           decode_on=where)
            out[where] = torch.cat(list(batches.epoch(0)))
            assert not batches.skipped
        assert out["device"].shape == out["workers"].shape == (14, 3, 64, 64)
        # The workers decode such JPEGs with the same function (torchvision.io) on the CPU: the same batches.
        assert torch.equal(out["device"], out["workers"]), kind.__name__
        assert "decoded and cropped on the device" in batches.describe()


def test_a_jpeg_the_device_cannot_decode_is_skipped_and_counted_and_the_batch_topped_up(tmp_path):
    from clmae.data.datasets import load_dataset
    from clmae.data.loader import TrainBatches

    photos = mixed_photos(tmp_path / "photos")
    whole = (photos / "03.jpg").read_bytes()
    (photos / "03.jpg").write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    out, bad = {}, {}
    for where in ("workers", "device"):  # Pillow in the workers refuses it too
        batches = TrainBatches(load_dataset(str(photos)), 4, 64, torch.device("cpu"), seed=1, num_workers=0,
                               decode_on=where)
        out[where], bad[where] = list(batches.epoch(0)), batches.bad_files
    assert 3 in batches.rank_indices(0).tolist()  # the epoch meets it
    assert [b.shape[0] for b in out["device"]] == [b.shape[0] for b in out["workers"]] == [4, 4]  # 11 of 12: topped up
    assert (torch.cat(out["device"]) - torch.cat(out["workers"])).abs().mean() * 255 * 0.225 < 0.35
    assert bad["device"] == {str(photos / "03.jpg"): "truncated or corrupt: torchvision.io.decode_jpeg failed"}
    assert list(bad["workers"]) == [str(photos / "03.jpg")]


def test_decoding_on_the_device_trains_from_the_command_line_with_workers_and_resumes_exactly(tmp_path, capsys):
    from clmae.cli.app import main as cli_main
    from clmae.train.trainer import pretrain
    from conftest import assert_same_weights, stopped_and_resumed

    photos = mixed_photos(tmp_path / "photos")
    tiny = ["--model", "vit_micro_patch2_8", "--img-size", "16", "--batch-size", "4", "--epochs", "2",
            "--method", "mae", "--no-progress", "--device", "cpu", "--seed", "1", "--decode-on", "device"]
    assert cli_main(["pretrain", "--data", str(photos), *tiny, "--num-workers", "1",
                     "--output-dir", str(tmp_path / "cli")]) == 0  # EncodedBatch crosses from a worker process
    assert "data: 1 worker, prefetch 4, JPEGs decoded and cropped on the device (torchvision.io)" in \
        capsys.readouterr().err
    common = dict(data=str(photos), model="vit_micro_patch2_8", img_size=16, batch_size=4, method="mae",
                  num_workers=0, progress=False, seed=1, device="cpu", decode_on="device")
    full = pretrain(epochs=2, output_dir=str(tmp_path / "full"), **common)
    resumed = stopped_and_resumed(common, 2, tmp_path / "part")
    assert_same_weights(full.checkpoint, resumed.checkpoint)
    with_worker = pretrain(epochs=2, output_dir=str(tmp_path / "worker"), **{**common, "num_workers": 1})
    assert_same_weights(with_worker.checkpoint, tmp_path / "cli" / "checkpoint-last.pt")  # the command line's run
