"""Shards written pre-resized (``write_shards(resize=...)``, ``python -m clmae.data.shards --resize``): smaller
upright JPEGs, the originals' statistics recorded, and a shard set that trains and resumes like any other."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clmae.cli.app import main as cli_main
from clmae.data.shards import RESIZED_FILE, write_shards
from clmae.data.shards import main as shards_main
from clmae.errors import DataError
from clmae.train.trainer import pretrain
from conftest import assert_same_weights, stopped_and_resumed

SIDE = 24


def photos(root: Path) -> Path:
    """30 noisy JPEGs in 3 classes (64x48, some 48x64, two gray), one small PNG, one rotated JPEG, one broken."""
    rng = np.random.default_rng(0)
    for i in range(30):
        folder = root / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        shape = (48, 64, 3) if i % 4 else (64, 48, 3)
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        (img.convert("L") if i in (5, 11) else img).save(folder / f"img{i:02d}.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(root / "class0" / "small.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64 wide x 48 high, seen 48 wide x 64 high
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / "class1" / "rotated.jpg",
                                                                            exif=exif.tobytes())
    (root / "class2" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def members(folder: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                out[m.name] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def resized(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("resized")
    src = photos(tmp / "photos")
    assert shards_main([str(src), str(tmp / "shards" / "train"), "--shard-size", "8", "--resize", str(SIDE),
                        "--quality", "90"]) == 0
    return src, tmp / "shards"


def test_images_are_stored_upright_at_the_shorter_side_with_the_originals_statistics(resized):
    src, shards = resized
    stored = members(shards / "train")
    images = {k: v for k, v in stored.items() if not k.endswith(".cls")}
    assert len(images) == 33
    seen = {"resized": 0, "kept": 0, "unreadable": 0}
    for name, data in images.items():
        if data == b"not a jpeg":
            seen["unreadable"] += 1
            continue
        with Image.open(io.BytesIO(data)) as img:
            if name.endswith(".png"):  # 16 px: already small, its bytes kept
                assert img.size == (16, 20)
                seen["kept"] += 1
                continue
            assert name.endswith(".jpg") and img.format == "JPEG" and min(img.size) == SIDE
            assert max(img.size) == 32 and img.getexif().get(0x0112, 1) == 1
            seen["resized"] += 1
    record = json.loads((shards / "train" / RESIZED_FILE).read_text())["shard"]
    assert {k: record[k] for k in seen} == seen == {"resized": 31, "kept": 1, "unreadable": 1}
    assert record["shorter_side"] == SIDE and record["quality"] == 90 and record["images"] == 33
    assert record["original"]["shorter_side_px"] == {"min": 16, "median": 48, "max": 48}
    assert record["original"]["height_px"]["max"] == 64
    assert record["original_bytes"] == sum(p.stat().st_size for p in src.rglob("*.*"))
    assert record["stored_bytes"] == sum(len(v) for v in images.values()) < record["original_bytes"]


def test_a_rotated_photo_is_stored_as_seen(resized):
    src, shards = resized
    with Image.open(src / "class1" / "rotated.jpg") as original:
        assert original.size == (64, 48)
    upright = [Image.open(io.BytesIO(v)).size for v in members(shards / "train").values() if v[:2] == b"\xff\xd8"]
    assert upright.count((32, 24)) + upright.count((24, 32)) == 31
    assert upright.count((24, 32)) == 8 + 1  # the 8 portrait photos and the rotated one


def test_bad_resize_options_are_one_line_errors(tmp_path):
    src = photos(tmp_path / "p")
    with pytest.raises(DataError, match="at least 8"):
        write_shards(src, tmp_path / "s", resize=4)
    with pytest.raises(DataError, match="quality"):
        write_shards(src, tmp_path / "s", resize=32, quality=0)


def test_a_preresized_shard_set_trains_from_the_command_line_and_resumes_exactly(resized, tmp_path, capsys):
    _, shards = resized
    tiny = ["--model", "vit_micro_patch2_8", "--img-size", "16", "--batch-size", "8", "--epochs", "2",
            "--method", "mae", "--num-workers", "0", "--no-progress", "--device", "cpu", "--seed", "1"]
    assert cli_main(["pretrain", "--data", str(shards), *tiny, "--output-dir", str(tmp_path / "cli")]) == 0
    err = capsys.readouterr().err
    assert "mae on" in err and "1 file skipped" in err, err  # the broken file, counted once
    assert "fp32, data: no workers (decoded in the training process), JPEGs decoded at the crop's scale" in err
    common = dict(data=str(shards), model="vit_micro_patch2_8", img_size=16, batch_size=8, method="mae",
                  num_workers=0, progress=False, seed=1, device="cpu")
    full = pretrain(epochs=2, output_dir=str(tmp_path / "full"), **common)
    resumed = stopped_and_resumed(common, 2, tmp_path / "part")
    assert_same_weights(full.checkpoint, resumed.checkpoint)
    assert_same_weights(full.checkpoint, tmp_path / "cli" / "checkpoint-last.pt")  # the command line: the same run


def test_parallel_preresizing_writes_the_same_shards(resized, tmp_path):
    src, shards = resized
    write_shards(src, tmp_path / "parallel", shard_size=8, resize=SIDE, quality=90, workers=2)
    assert members(tmp_path / "parallel") == members(shards / "train")
    assert (json.loads((tmp_path / "parallel" / RESIZED_FILE).read_text())
            == json.loads((shards / "train" / RESIZED_FILE).read_text()))
