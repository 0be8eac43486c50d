"""Data-parallel training: 2 gloo processes on the CPU train exactly like 1 process with the global batch."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import socket
import tarfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import v2

from clmae.config import load_config_file, make_config, preset_names
from clmae.data.augment import random_resized_crop_flip
from clmae.data.datasets import load_dataset
from clmae.data.loader import ShardBatches, TrainBatches, augmentation_seed, map_position
from clmae.data.shards import ShardData, ShardStream, write_shards
from clmae.distributed import DistContext, split_mean
from clmae.errors import DataError
from clmae.models.configs import MODEL_CONFIGS, model_config
from clmae.train.trainer import Trainer

TINY = dict(data="digits", model="vit_micro_patch2_8", subset=64, epochs=2, warmup_epochs=0, log_every=1,
            progress=False, probe_every=0, snapshot_every=0, device="cpu", seed=3, save_every=1, num_workers=0)
LOCAL_BATCH, WORLD = 16, 2



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, runs: list[tuple[dict, int]], errors) -> None:
    """One rank: join each run's process group through the torchrun environment variables, train."""
    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
        for options, port in runs:
            os.environ["MASTER_PORT"] = str(port)
            Trainer(make_config(options)).fit()
        errors.put((rank, None))
    except BaseException:  # noqa: BLE001 — report everything to the test process
        errors.put((rank, traceback.format_exc()))


def run_two_ranks(runs: list[dict]) -> None:
    """Run each config with 2 forked processes (gloo), one after the other, like torchrun would."""
    ctx = mp.get_context("fork")  # no re-import of torch per process: keeps the test fast
    errors = ctx.Queue()
    with_ports = [(options, _free_port()) for options in runs]
    procs = [ctx.Process(target=_rank_main, args=(r, with_ports, errors)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    reports = [errors.get(timeout=5) for _ in range(WORLD - len(hung))]
    failures = [f"rank {r}:\n{tb}" for r, tb in reports if tb]
    assert not hung and not failures, ("ranks hung" if hung else "") + "\n".join(failures)


def train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def weights(run: Path, stem: str = "checkpoint-last") -> dict[str, torch.Tensor]:
    return load_file(str(run / f"{stem}.safetensors"))


def assert_same_run(a: Path, b: Path, keys: tuple[str, ...]) -> None:
    ra, rb = train_records(a), train_records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4]  # one line per step: rank 0 alone logs
    for x, y in zip(ra, rb):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (k, x["step"], x[k], y[k])
    assert_same_weights(weights(a), weights(b))


LR = 1e-3 * LOCAL_BATCH * WORLD / 256


def assert_same_weights(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor], steps: int = 4) -> None:
    """Equal to float tolerance. Exception: biases whose gradient is exactly zero in exact arithmetic,
    so Adam turns summation-order noise into steps of up to ``lr``; they are held to ``steps * lr``
    instead: attention key biases (softmax ignores a per-query constant) and the biases of HPM's
    loss-predictor head and of the LayerNorm before it (its ranking loss sees only differences between
    patches' predictions, and each of these biases shifts every patch's prediction alike)."""
    assert wa.keys() == wb.keys()
    for k in wa:
        a, b = wa[k].clone(), wb[k].clone()
        if k.endswith(("predictor.head.bias", "predictor.norm.bias")):
            assert float((a - b).abs().max()) <= steps * LR, k
            continue
        if k.endswith("attn.qkv.bias"):
            d = a.shape[0] // 3
            assert float((a[d:2 * d] - b[d:2 * d]).abs().max()) <= steps * LR, k
            a[d:2 * d] = b[d:2 * d] = 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def single(options: dict, out: Path, groups: int = 1) -> Path:
    trainer = Trainer(make_config({**options, "batch_size": LOCAL_BATCH * WORLD, "output_dir": str(out)}))
    trainer.loss_groups = groups
    trainer.fit()
    return out


FRACTION = {"masker_batch_fraction": 0.5}
MASKER_KEYS = ("loss_mae", "loss_masker", "loss_rec", "loss_gauss", "loss_kl", "loss_div", "score_mean")
STRATEGIES = ("block", "hpm", "attmask", "colormae", "sbam", "automae")
# Schedules that move within 2 epochs: HPM hides predicted-hard patches from the first epoch and its EMA
# follows closely; AttMask's teacher too. So the EMA copies, the masks and the predictor all matter.
STRATEGY_OPTIONS = {"block": {}, "hpm": {"hpm_ema_decay": 0.5, "hpm_ema_decay_end": 0.9, "hpm_ema_ramp_epochs": 2.0},
                    "attmask": {"attmask_momentum": 0.5}, "colormae": {}, "sbam": {},
                    "automae": {"automae_scorer_momentum": 0.5}}
STRATEGY_KEYS = {"block": ("loss_mae", "grad_norm"), "attmask": ("loss_mae", "grad_norm"),
                 "hpm": ("loss_mae", "loss_hpm", "grad_norm", "masker_grad_norm"),
                 "colormae": ("loss_mae", "grad_norm"),
                 "sbam": ("loss_mae", "grad_norm", "sbam_mask_ratio"),  # one adaptive K for the global batch
                 "automae": ("loss_mae", "loss_automae_g", "loss_automae_d", "grad_norm", "masker_grad_norm")}
STATELESS = ("block", "colormae", "sbam")  # strategies whose checkpoints carry no masker


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    out = {name: root / name for name in ("mae2", "clmae2", "clmae_fraction2", *(f"{m}2" for m in STRATEGIES))}
    run_two_ranks([
        {**TINY, "method": "mae", "batch_size": LOCAL_BATCH, "output_dir": str(out["mae2"])},
        {**TINY, "method": "clmae", "batch_size": LOCAL_BATCH, "output_dir": str(out["clmae2"])},
        {**TINY, **FRACTION, "method": "clmae", "batch_size": LOCAL_BATCH, "output_dir": str(out["clmae_fraction2"])},
        *({**TINY, **STRATEGY_OPTIONS[m], "method": m, "batch_size": LOCAL_BATCH, "output_dir": str(out[f"{m}2"])}
          for m in STRATEGIES),
    ])
    return out


def test_two_ranks_equal_one_process_mae(runs, tmp_path):
    one = single({**TINY, "method": "mae"}, tmp_path / "mae1")
    assert_same_run(runs["mae2"], one, ("loss_mae", "grad_norm"))
    info = json.loads((runs["mae2"] / "config.json").read_text())
    assert info["world_size"] == 2 and info["global_batch"] == 32
    assert info["lr"] == pytest.approx(LR)  # base_lr x batch x world / 256


def test_two_ranks_equal_one_process_clmae_per_device_losses(runs, tmp_path):
    # KL, diversity and the soft reconstruction ratio are computed per rank (the authors' per-GPU
    # semantics), so the single process must average the same two half-batch losses.
    one = single({**TINY, "method": "clmae"}, tmp_path / "cl1", groups=WORLD)
    assert_same_run(runs["clmae2"], one, MASKER_KEYS)
    # ... and the global-batch loss is a different objective: the masking module ends elsewhere.
    whole = single({**TINY, "method": "clmae"}, tmp_path / "cl1g", groups=1)
    differ = [k for k, v in weights(whole).items() if k.startswith("masker.")
              and not torch.allclose(v, weights(one)[k], rtol=1e-4, atol=1e-5)]
    assert differ


def test_two_ranks_equal_one_process_clmae_masker_batch_fraction(runs, tmp_path):
    # The masking-module step on half of each loss group's rows: each rank's half-batch is one group,
    # so 2 ranks choose the rows that 1 process with 2 loss groups chooses (one shared generator).
    one = single({**TINY, **FRACTION, "method": "clmae"}, tmp_path / "cl1f", groups=WORLD)
    assert_same_run(runs["clmae_fraction2"], one, MASKER_KEYS)


@pytest.mark.parametrize("method", STRATEGIES)
def test_two_ranks_equal_one_process_for_every_strategy(runs, tmp_path, method):
    # Masks drawn for the global batch, EMA copies updated from the averaged weights, HPM's predictor
    # gradients averaged over the ranks and its ranking loss per rank (as DDP's per-GPU loss).
    one = single({**TINY, **STRATEGY_OPTIONS[method], "method": method}, tmp_path / method, groups=WORLD)
    assert_same_run(runs[f"{method}2"], one, STRATEGY_KEYS[method])
    saved = weights(runs[f"{method}2"])
    assert any(k.startswith("masker.") for k in saved) == (method not in STATELESS)  # EMA copies, networks saved


def test_resume_with_other_world_size(runs, tmp_path):
    # The 2-rank run's epoch-1 checkpoint, continued by 1 process with the same global batch,
    # ends where the uninterrupted 2-rank run ended.
    resumed = Trainer(make_config({**TINY, "method": "mae", "batch_size": LOCAL_BATCH * WORLD,
                                   "resume": str(runs["mae2"] / "checkpoint-0001.pt"),
                                   "output_dir": str(tmp_path / "resumed")}),
                      overrides={"batch_size": LOCAL_BATCH * WORLD, "output_dir": str(tmp_path / "resumed")})
    assert resumed.position.epoch == 1 and resumed.lr == pytest.approx(LR)
    resumed.fit()
    assert_same_weights(weights(tmp_path / "resumed"), weights(runs["mae2"]), steps=2)


def test_rank_batches_split_the_global_batch():
    ds = load_dataset("digits").subset(96)
    one = list(TrainBatches(ds, 32, 8, torch.device("cpu"), 0, 0).epoch(1))
    # World size 1: the epoch's permutation in batches, each cropped with its step's own generator.
    order = torch.randperm(96, generator=torch.Generator().manual_seed(0 * 100_003 + 1))
    mean, std = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)
    ref = [(random_resized_crop_flip(ds.images[order[32 * s:32 * (s + 1)]], 8,
                                     torch.Generator().manual_seed(augmentation_seed(0, 1, s))) - mean) / std
           for s in range(3)]
    assert len(one) == len(ref) == 3
    for a, b in zip(one, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # Two ranks with 16 each see the rows 0-15 and 16-31 of the same global batches.
    halves = []
    for rank in range(2):
        ctx = DistContext(rank=rank, world_size=2)
        batches = TrainBatches(ds, 16, 8, torch.device("cpu"), 0, 0, ctx)
        halves.append(list(batches.epoch(1)))
    for step, whole in enumerate(one):
        torch.testing.assert_close(torch.cat([halves[0][step], halves[1][step]]), whole, rtol=0, atol=1e-6)
    # Resuming at step 2 gives the last global batch.
    late = list(TrainBatches(ds, 32, 8, torch.device("cpu"), 0, 0).rank_indices(1, start_step=2))
    assert late == TrainBatches(ds, 32, 8, torch.device("cpu"), 0, 0).rank_indices(1).tolist()[64:]


def test_map_position_keeps_images_seen():
    assert map_position(5, 64, 64) == 5
    assert map_position(3, 64, 32) == 6  # 192 images seen → 6 batches of 32
    assert map_position(3, 32, 64) == 1  # 96 images → 1 whole batch of 64, the next 32 are seen again
    assert map_position(0, 256, 512) == 0


def test_split_mean_is_the_mean_of_group_losses():
    x = torch.arange(8.0)
    out = split_mean(lambda t: {"s": t.sum() ** 2}, 2, x)
    assert float(out["s"]) == pytest.approx(((0 + 1 + 2 + 3) ** 2 + (4 + 5 + 6 + 7) ** 2) / 2)


# ---------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name", preset_names())
def test_preset_loads_and_validates(name):
    cfg = make_config(load_config_file(name))
    assert cfg.model in MODEL_CONFIGS
    model_config(cfg.model)  # the named model builds


def test_imagenet_presets_carry_the_authors_defaults():
    for name, model in (("imagenet_vit_base", "vit_base_patch16_224"), ("imagenet_vit_large", "vit_large_patch16_224")):
        cfg = make_config(load_config_file(name))
        assert (cfg.model, cfg.batch_size, cfg.epochs, cfg.warmup_epochs, cfg.base_lr, cfg.mask_ratio) == \
            (model, 256, 200, 40, 1e-3, 0.75)
        o = cfg.options
        assert (o.lambda_kl, o.lambda_div, o.lambda_gauss, cfg.weight_decay) == (0.1, 2.0, 1.0, 0.05)
        assert cfg.absolute_lr(8) == pytest.approx(1e-3 * 256 * 8 / 256)


# ---------------------------------------------------------------------------------------------
# Tar shards


def image_folder(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"img{i}.png")
    return root


def pixels_of_folder(root: Path) -> set[bytes]:
    return {np.asarray(Image.open(p).convert("RGB")).tobytes() for p in sorted(root.rglob("*.png"))}


def stream_items(ds, rank: int = 0, world: int = 1, n: int | None = None):
    to_tensor = v2.PILToTensor()
    it = iter(ShardStream(ds.shards, rank, world, seed=5, transform=to_tensor))
    return [next(it) for _ in range(n if n is not None else len(ds))]


def as_bytes(items) -> list[bytes]:
    return [x.permute(1, 2, 0).contiguous().numpy().tobytes() for x, _, err in items if err is None]


def test_shards_written_found_and_streamed(tmp_path):
    src = image_folder(tmp_path / "images")
    shards = write_shards(src, tmp_path / "shards" / "train", shard_size=4)
    assert len(shards) == 6
    assert sum(json.loads((tmp_path / "shards" / "train" / "sizes.json").read_text()).values()) == 24
    folder = tmp_path / "shards"
    for spec in (str(folder), str(folder / "train" / "shard-{0000..0005}.tar"), str(folder / "train" / "*.tar")):
        ds = load_dataset(spec)
        assert isinstance(ds, ShardData) and len(ds) == 24 and ds.channels == 3
    assert len(load_dataset(str(shards[0]))) == 4
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(folder / "train" / "shard-{0000..0009}.tar"))

    ds = load_dataset(str(folder))
    one_pass = stream_items(ds)
    assert sorted(label for _, label, _ in one_pass) == sorted([0] * 8 + [1] * 8 + [2] * 8)
    assert sorted(as_bytes(one_pass)) == sorted(pixels_of_folder(src))  # every image exactly once
    # Two ranks read disjoint halves of the same shuffled shard order.
    halves = [as_bytes(stream_items(ds, rank, 2, n=12)) for rank in range(2)]
    assert not set(halves[0]) & set(halves[1])
    assert set(halves[0]) | set(halves[1]) == pixels_of_folder(src)


def test_shard_batches_skip_bad_samples_and_keep_epoch_length(tmp_path):
    src = image_folder(tmp_path / "images")
    folder = tmp_path / "shards"
    shards = write_shards(src, folder, shard_size=6)
    with tarfile.open(folder / "zz-broken.tar", "w") as tar:  # one undecodable image
        data = b"not a png at all"
        info = tarfile.TarInfo("bad.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    cut = shards[0].read_bytes()
    (folder / "zz-truncated.tar").write_bytes(cut[: len(cut) // 2])  # a shard cut short
    ds = load_dataset(str(folder))
    batches = ShardBatches(ds, 4, 8, torch.device("cpu"), seed=0, num_workers=2)
    out = list(batches.epoch(0))
    assert len(out) == len(batches) == len(ds) // 4
    assert all(b.shape == (4, 3, 8, 8) and torch.isfinite(b).all() for b in out)
    assert batches.skipped  # the broken image and the truncated shard are counted, not fatal


def test_pretrain_streams_shards(tmp_path):
    write_shards(image_folder(tmp_path / "images"), tmp_path / "shards", shard_size=8)
    cfg = make_config({**TINY, "data": str(tmp_path / "shards"), "img_size": 8, "batch_size": 8, "epochs": 1,
                       "save_every": 0, "output_dir": str(tmp_path / "run")})
    trainer = Trainer(cfg)
    assert isinstance(trainer.batches, ShardBatches) and trainer.model_config.in_chans == 3
    result = trainer.fit()
    assert result.epochs_done == 1 and len(train_records(tmp_path / "run")) == 3


def test_image_folder_beside_a_raw_tar_is_not_taken_for_shards(tmp_path):
    src = image_folder(tmp_path / "imagenet")
    (src / "ILSVRC2012_img_train.tar").write_bytes(b"")  # the download, next to the class folders
    ds = load_dataset(str(src))
    assert not isinstance(ds, ShardData) and len(ds) == 24
