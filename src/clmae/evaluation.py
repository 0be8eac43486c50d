"""Downstream evaluation of a pretrained encoder: k-NN, linear probe, few-shot and fine-tuning.

All protocols use the dataset's *train* split to fit and its *test* split (``val/`` for image
folders) to score; images get the deterministic evaluation view (resize to the model's input size,
normalised with the pretraining data's mean/std stored in the checkpoint). Accuracies are in
percent. Every report also runs the same protocol on a **randomly initialised encoder** of the same
architecture, built with the pretraining run's seed (so it is exactly the weights pretraining
started from): the gap between the two lines is what pretraining bought.

Frozen-feature protocols (features: ``forward_features`` with ``cls`` or ``mean`` pooling, extracted
once under ``no_grad``, bf16 autocast on CUDA, cached in memory and optionally on disk):

* **k-NN, majority** (the CL-MAE authors' protocol): the ``k=5`` nearest training features in
  Euclidean distance vote, one vote each. Ties between classes go to the tied class whose nearest
  member ranks highest among the neighbours (i.e. is closest to the query). Neighbours at exactly
  equal distance are ordered as ``torch.topk`` returns them (unspecified).
* **k-NN, weighted** (the DINO protocol): ``k=20`` nearest by cosine similarity ``s``, each votes
  for its class with weight ``exp(s / T)``, ``T = 0.07``. The class with the largest sum wins.
  Both run as chunked matrix products plus ``topk`` on the device, never a loop per test image.
  Top-5 accuracy ranks classes by the same scores; it is reported only with more than 5 classes.
* **Linear probe** (as MAE): ``BatchNorm1d(affine=False)`` then one linear layer on the frozen
  features, AdamW with a cosine schedule. The learning rate is chosen from a small sweep on a
  validation split carved from train (never on test); the probe is then retrained on all of train.
* **Few-shot**: for each ``n`` in ``shots`` (1, 5, 10), ``draws`` random support sets of exactly
  ``n`` training images per class (seeded), a linear probe as above trained full-batch on each,
  scored on the whole test split; reported as mean ± std over the draws. Its hyper-parameters are
  fixed (lr 0.01, 300 full-batch steps): a support set of one image per class leaves nothing to
  validate on. ``n`` above the smallest class's count is an error, not a silent smaller set.

Fine-tuning (:mod:`clmae.finetune`) trains the whole encoder with a linear head: layer-wise lr
decay, stochastic depth, label smoothing, warmup + cosine, random-resized-crop + flip.

Entry points: :func:`evaluate` (one protocol, returns the JSON report), :func:`prepare` +
:func:`run_protocol` (several protocols on one checkpoint sharing the feature cache),
:func:`quick_knn` (the trainer's ``--eval-every``), :func:`knn_report_vs_random` (one summary
string) and the ``clmae eval`` command. The protocols themselves are pure functions on feature
tensors in :mod:`clmae.protocols`; :mod:`clmae.compare` tabulates and plots several reports.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from . import __version__
from .data import (
    FolderData,
    InMemoryImages,
    collate_skipping,
    load_dataset,
    normalize,
    resize_images,
)
from .errors import CheckpointError, ClmaeError, ConfigError, DataError
from .protocols import (
    FewShotConfig,
    KnnConfig,
    LinearConfig,
    check_option,
    fewshot_metrics,
    knn_metrics,
    linear_probe_metrics,
    sample_support,
)

REPORT_FORMAT = "clmae-eval-v1"
PROTOCOLS = ("knn", "linear", "fewshot", "finetune")
QUICK_KNN_MAX_TRAIN = 10_000
QUICK_KNN_MAX_TEST = 2_000


# ---------------------------------------------------------------------------------------------
# Protocol configurations


@dataclass
class EvalOptions:
    """What every protocol shares: features, data caps, device, seed, reference run."""

    pool: str = "cls"  # cls | mean
    extract_batch_size: int = 256  # images per feature-extraction batch
    device: str = "auto"
    seed: int = 0  # data caps, validation split, support sets, classifier init
    max_train: int | None = None  # evaluate on a random (seeded) subset of train
    max_test: int | None = None  # and of test
    num_workers: int = 2  # DataLoader workers for image folders
    progress: bool = True
    cache_dir: str | None = None  # also keep extracted features as .pt files here
    random_reference: bool = True  # run the protocol on a random-init encoder too

    def validate(self) -> "EvalOptions":
        check_option(self.pool in ("cls", "mean"), "pool", self.pool, "'cls' or 'mean'")
        check_option(self.extract_batch_size >= 1, "extract_batch_size", self.extract_batch_size, "an integer >= 1")
        for name in ("max_train", "max_test"):
            value = getattr(self, name)
            check_option(value is None or value >= 1, name, value, "an integer >= 1")
        check_option(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        return self


def protocol_config(protocol: str, **values) -> Any:
    """The default configuration of ``protocol`` with ``values`` applied and validated."""
    cls = _config_class(protocol)
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{protocol}: unknown options {sorted(unknown)}")
    return cls(**values).validate()


def _config_class(protocol: str) -> type:
    if protocol == "finetune":
        from .finetune import FinetuneConfig

        return FinetuneConfig
    classes = {"knn": KnnConfig, "linear": LinearConfig, "fewshot": FewShotConfig}
    if protocol not in classes:
        raise ConfigError(f"protocol: unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return classes[protocol]


# ---------------------------------------------------------------------------------------------
# Labeled data and the evaluation view


@dataclass
class LabeledSplit:
    """A labeled split of a dataset, optionally a seeded random subset (``indices`` into it)."""

    name: str
    split: str
    dataset: InMemoryImages | FolderData
    indices: torch.Tensor  # positions in ``dataset``, sorted
    labels: torch.Tensor  # labels of ``indices``
    identity: str  # what the data is, for cache keys

    def __len__(self) -> int:
        return int(self.indices.numel())


def _all_labels(dataset) -> torch.Tensor | None:
    if isinstance(dataset, FolderData):
        return None if dataset.files.labels is None else torch.tensor(dataset.files.labels, dtype=torch.long)
    return dataset.labels


def labeled_split(dataset, split: str, max_items: int | None, seed: int, identity: str = "") -> LabeledSplit:
    """Wrap a loaded dataset, refusing unlabeled ones; keep a seeded random subset if capped."""
    labels = _all_labels(dataset)
    if labels is None:
        raise DataError(
            f"{dataset.name}: the {split} split has no labels; evaluation needs labeled data (an image folder with one "
            "sub-folder per class, an .npz with y_train/y_test, digits or cifar10)"
        )
    n = labels.numel()
    if max_items is not None and max_items < n:
        g = torch.Generator().manual_seed(seed * 7919 + (1 if split == "test" else 0))
        indices = torch.randperm(n, generator=g)[:max_items].sort().values
    else:
        indices = torch.arange(n)
    if (labels < 0).any():
        raise DataError(f"{dataset.name}: the {split} labels contain negative values; labels must be 0..C-1")
    digest = hashlib.sha1(indices.numpy().tobytes()).hexdigest()[:12]
    return LabeledSplit(dataset.name, split, dataset, indices, labels[indices], f"{identity}|{split}|{n}|{digest}")


def _data_identity(data: str, data_dir: str | None) -> str:
    path = Path(data).expanduser()
    if data not in ("digits", "cifar10") and path.exists():
        st = path.stat()
        return f"{path.resolve()}:{st.st_mtime_ns}:{st.st_size}"
    return f"{data}:{data_dir or ''}"


def eval_batches(split: LabeledSplit, img_size: int, mean, std, device: torch.device, batch_size: int,
                 num_workers: int = 2, progress: bool = False, desc: str = "") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised evaluation views ``(x, y)`` on ``device``; unreadable folder images are dropped."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(split), desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        if isinstance(split.dataset, InMemoryImages):
            images = split.dataset.images
            for idx, y in zip(split.indices.split(batch_size), split.labels.split(batch_size)):
                x = resize_images(images.index_select(0, idx).to(device, non_blocking=True), img_size)
                bar.update(len(idx))
                yield normalize(x, mean, std), y
            return
        from .data import _eval_transform

        files = copy.copy(split.dataset.files)
        files.transform = _eval_transform(img_size)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(files, split.indices.tolist()), batch_size=batch_size, shuffle=False,
            num_workers=num_workers, collate_fn=collate_skipping, pin_memory=device.type == "cuda",
        )
        skipped = 0
        for images, labels, bad in loader:
            skipped += len(bad)
            bar.update((0 if images is None else images.shape[0]) + len(bad))
            if images is None:
                continue
            x = images.to(device, non_blocking=True).float().div_(255.0)
            yield normalize(x, mean, std), labels
        if skipped:
            print(f"clmae: skipped {skipped} unreadable image(s) in {split.name} ({split.split})", file=sys.stderr)
    finally:
        bar.close()



def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def extract_features(encoder: nn.Module, batches, pool: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features float32 (N, D), labels (N,))`` on the CPU from ``encoder.forward_features``."""
    feats, labels = [], []
    for x, y in batches:
        with _autocast(device):
            f = encoder.forward_features(x, pool=pool)
        feats.append(f.float().cpu())
        labels.append(y.cpu())
    if not feats:
        raise DataError("no readable images to extract features from")
    return torch.cat(feats), torch.cat(labels)


# ---------------------------------------------------------------------------------------------
# A prepared evaluation: checkpoint, reference encoder, data, feature cache

_FEATURE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_RESULT_CACHE: dict[tuple, tuple[dict, dict]] = {}
_DATASET_CACHE: dict[tuple, Any] = {}


def clear_caches() -> None:
    """Forget cached datasets, features and results (they are kept for the life of the process)."""
    _FEATURE_CACHE.clear()
    _RESULT_CACHE.clear()
    _DATASET_CACHE.clear()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_file(path: str | Path) -> Path:
    """The file :func:`clmae.checkpoint.load_pretrained` reads for ``path`` (folder, stem or file)."""
    from .checkpoint import resolve_checkpoint

    path = Path(path)
    if path.suffix == ".pt":
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found")
        return path
    if not path.exists() and path.suffix not in ("", ".safetensors"):
        raise CheckpointError(f"{path}: checkpoint not found (give a run folder or a .safetensors/.pt checkpoint)")
    if path.is_file() and path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: not a clmae checkpoint (expected a run folder, .safetensors or .pt file)")
    return resolve_checkpoint(path, ".safetensors")


def random_encoder(model_cfg, seed: int, device) -> nn.Module:
    """A freshly initialised model of the same architecture, built as the trainer builds it."""
    from .model import MaskedAutoencoderViT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskedAutoencoderViT(copy.deepcopy(model_cfg))
    return model.to(device).eval()


@dataclass
class Encoder:
    """An encoder under evaluation and the key its cached features live under."""

    role: str  # "pretrained" | "random_init"
    model: nn.Module
    key: str


@dataclass
class EvalSetup:
    """Everything the protocols share for one checkpoint and one dataset."""

    checkpoint: str
    checkpoint_sha256: str
    model_name: str
    run_config: dict
    data: str
    data_dir: str | None
    train: LabeledSplit
    test: LabeledSplit
    num_classes: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    options: EvalOptions
    encoders: list[Encoder] = field(default_factory=list)
    random_init_seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def features(self, encoder: Encoder, split: LabeledSplit) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features of ``split``, extracted once per (encoder, data, split, pool, view)."""
        o = self.options
        key = (encoder.key, split.identity, o.pool, self.img_size, tuple(self.mean), tuple(self.std))
        if key in _FEATURE_CACHE:
            return _FEATURE_CACHE[key]
        cache_file = None
        if o.cache_dir:
            digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
            cache_file = Path(o.cache_dir) / f"features-{encoder.role}-{split.split}-{o.pool}-{digest}.pt"
            if cache_file.is_file():
                try:
                    saved = torch.load(cache_file, map_location="cpu", weights_only=True)
                    if saved.get("key") == repr(key):
                        _FEATURE_CACHE[key] = (saved["features"], saved["labels"])
                        return _FEATURE_CACHE[key]
                except Exception:  # noqa: BLE001 — a broken cache file is simply recomputed
                    pass
        start = time.perf_counter()
        batches = eval_batches(split, self.img_size, self.mean, self.std, self.device, o.extract_batch_size, o.num_workers,
                               o.progress, desc=f"features {encoder.role} {split.split}")
        feats = extract_features(encoder.model, batches, o.pool, self.device)
        seconds = time.perf_counter() - start
        self.timings[f"features_{encoder.role}_{split.split}_s"] = round(seconds, 3)
        self.timings[f"features_{encoder.role}_{split.split}_img_per_s"] = round(len(split) / max(seconds, 1e-9), 1)
        _FEATURE_CACHE[key] = feats
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": repr(key), "features": feats[0], "labels": feats[1]}, cache_file)
        return feats


def _model_name(file: Path, run_config: dict) -> str:
    if file.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(file), "pt") as fh:
                name = (fh.metadata() or {}).get("model_name")
            if name:
                return json.loads(name)
        except Exception:  # noqa: BLE001 — the name is cosmetic
            pass
    from .trainer import DEFAULT_MODELS

    return run_config.get("model") or DEFAULT_MODELS.get(str(run_config.get("data")), "custom")


def _load_cached(data: str, data_dir: str | None, split: str, channels: int, identity: str):
    """``load_dataset`` once per process (decoding CIFAR-10 and its statistics takes seconds)."""
    key = (identity, split, channels)
    if key not in _DATASET_CACHE:
        _DATASET_CACHE[key] = load_dataset(data, data_dir, split, channels=channels)
    return _DATASET_CACHE[key]


def _num_classes(train: LabeledSplit, test: LabeledSplit) -> int:
    if isinstance(train.dataset, FolderData):
        train_classes, test_classes = train.dataset.files.classes, test.dataset.files.classes
        if train_classes != test_classes:
            raise DataError(
                f"{train.name}: the train and val/test folders have different class sub-folders "
                f"({len(train_classes)} vs {len(test_classes)}); give both the same classes"
            )
        return len(train_classes)
    return int(max(train.labels.max(), test.labels.max())) + 1


def prepare(checkpoint: str | Path, data: str | None = None, data_dir: str | None = None,
            options: EvalOptions | None = None) -> EvalSetup:
    """Load the checkpoint, its random-init twin and the labeled train/test splits of ``data``.

    ``data=None`` evaluates on the data the checkpoint was pretrained on.
    """
    from .checkpoint import load_pretrained
    from .trainer import resolve_device

    o = (options or EvalOptions()).validate()
    device = resolve_device(o.device)
    file = checkpoint_file(checkpoint)
    mae, _, run_cfg = load_pretrained(checkpoint, device)
    info = run_cfg.get("data_info") or {}
    cfg = mae.config
    data = data or run_cfg.get("data")
    if not data:
        raise ConfigError("--data: the checkpoint does not record its dataset; pass --data")
    if data_dir is None and data == run_cfg.get("data"):
        data_dir = run_cfg.get("data_dir")
    identity = _data_identity(data, data_dir)
    train_ds = _load_cached(data, data_dir, "train", cfg.in_chans, identity)
    train = labeled_split(train_ds, "train", o.max_train, o.seed, identity)
    test = labeled_split(_load_cached(data, data_dir, "test", cfg.in_chans, identity), "test", o.max_test, o.seed,
                         identity)
    channels = train_ds.channels
    if channels != cfg.in_chans:
        raise DataError(
            f"{train_ds.name}: images have {channels} channel(s) but the checkpoint's model takes {cfg.in_chans}; "
            "evaluate on data with the pretraining data's channels"
        )
    mean = tuple(info.get("mean") or train_ds.mean)
    std = tuple(info.get("std") or train_ds.std)
    if len(mean) != cfg.in_chans or len(std) != cfg.in_chans:
        raise CheckpointError(f"{file}: normalisation stats do not match the model's {cfg.in_chans} channel(s)")
    sha = file_sha256(file)
    setup = EvalSetup(
        checkpoint=str(checkpoint), checkpoint_sha256=sha, model_name=_model_name(file, run_cfg), run_config=run_cfg,
        data=data, data_dir=data_dir, train=train, test=test, num_classes=_num_classes(train, test),
        img_size=cfg.img_size, mean=mean, std=std, device=device, options=o,
    )
    setup.encoders.append(Encoder("pretrained", mae, f"ckpt:{sha}"))
    if o.random_reference:
        seed = int(run_cfg.get("seed", o.seed))
        arch = hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]
        setup.encoders.append(Encoder("random_init", random_encoder(cfg, seed, device), f"random:{arch}:{seed}"))
        setup.random_init_seed = seed
    return setup


# ---------------------------------------------------------------------------------------------
# Running protocols and writing reports


def _protocol_on(setup: EvalSetup, encoder: Encoder, protocol: str, config) -> tuple[dict, dict]:
    o = setup.options
    if protocol == "finetune":
        from .finetune import finetune_metrics

        return finetune_metrics(setup, encoder, config)
    xtr, ytr = setup.features(encoder, setup.train)
    xte, yte = setup.features(encoder, setup.test)
    if protocol == "knn":
        start = time.perf_counter()
        metrics = knn_metrics(xtr, ytr, xte, yte, setup.num_classes, config, setup.device)
        return metrics, {"knn_seconds": round(time.perf_counter() - start, 3)}
    if protocol == "linear":
        return linear_probe_metrics(xtr, ytr, xte, yte, setup.num_classes, config, o.seed, setup.device)
    if protocol == "fewshot":
        return fewshot_metrics(xtr, ytr, xte, yte, setup.num_classes, config, o.seed, setup.device)
    raise ConfigError(f"protocol: unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def run_protocol(setup: EvalSetup, protocol: str, config=None) -> dict[str, Any]:
    """Run one protocol on every encoder of ``setup``; return the JSON-ready report."""
    config = config if config is not None else protocol_config(protocol)
    config.validate()
    if protocol == "fewshot":  # refuse impossible shot counts before extracting anything
        for shots in config.shots:
            sample_support(setup.train.labels, shots, torch.Generator().manual_seed(0))
    results, details = {}, {}
    for enc in setup.encoders:
        key = (enc.key, protocol, repr(config), setup.train.identity, setup.test.identity, setup.options.pool,
               setup.options.seed)
        if key not in _RESULT_CACHE:
            _RESULT_CACHE[key] = _protocol_on(setup, enc, protocol, config)
        results[enc.role], details[enc.role] = copy.deepcopy(_RESULT_CACHE[key])
    o = setup.options
    rc = setup.run_config
    return {
        "format": REPORT_FORMAT,
        "protocol": protocol,
        "checkpoint": setup.checkpoint,
        "checkpoint_sha256": setup.checkpoint_sha256,
        "model": setup.model_name,
        "method": rc.get("method"),
        "pretrain_epochs": rc.get("epochs"),
        "data": {"name": setup.data, "data_dir": setup.data_dir, "train_size": len(setup.train),
                 "test_size": len(setup.test), "num_classes": setup.num_classes, "img_size": setup.img_size,
                 "mean": list(setup.mean), "std": list(setup.std)},
        "features": {"pool": o.pool},
        "hyperparameters": dataclasses.asdict(config),
        "options": {k: v for k, v in dataclasses.asdict(o).items() if k not in ("progress",)},
        "random_init_seed": setup.random_init_seed,
        "results": results,
        "details": details,
        "timings": dict(setup.timings),
        "device": str(setup.device),
        "torch": torch.__version__,
        "clmae_version": __version__,
        "command": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def evaluate(protocol: str, checkpoint: str | Path, data: str | None = None, data_dir: str | None = None,
             output: str | Path | None = None, options: EvalOptions | None = None, **config_values) -> dict[str, Any]:
    """Evaluate ``checkpoint`` with ``protocol`` (knn | linear | fewshot | finetune) on ``data``.

    ``config_values`` override the protocol's configuration (e.g. ``k_majority=10``). Writes the
    report to ``output`` when given and returns it.
    """
    config = protocol_config(protocol, **config_values)
    report = run_protocol(prepare(checkpoint, data, data_dir, options), protocol, config)
    if output is not None:
        write_report(report, output)
    return report


def knn_eval(checkpoint, data=None, data_dir=None, output=None, options=None, **config) -> dict[str, Any]:
    return evaluate("knn", checkpoint, data, data_dir, output, options, **config)


def linear_eval(checkpoint, data=None, data_dir=None, output=None, options=None, **config) -> dict[str, Any]:
    return evaluate("linear", checkpoint, data, data_dir, output, options, **config)


def fewshot_eval(checkpoint, data=None, data_dir=None, output=None, options=None, **config) -> dict[str, Any]:
    return evaluate("fewshot", checkpoint, data, data_dir, output, options, **config)


def finetune_eval(checkpoint, data=None, data_dir=None, output=None, options=None, **config) -> dict[str, Any]:
    return evaluate("finetune", checkpoint, data, data_dir, output, options, **config)


def write_report(report: dict[str, Any], output: str | Path) -> Path:
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    except OSError as exc:
        raise ConfigError(f"--output: cannot write {output}: {exc.strerror or exc}; choose another path") from None
    return output


def default_output(checkpoint: str | Path, protocol: str, data: str) -> Path:
    """``RUN/eval-PROTOCOL-DATA.json`` beside the checkpoint (the run folder for a folder)."""
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    name = Path(data).stem if data not in ("digits", "cifar10") else data
    return folder / f"eval-{protocol}-{name}.json"


def _fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One readable line per metric: pretrained value, then the random-init reference."""
    res = report["results"]
    pre, ref = res.get("pretrained", {}), res.get("random_init")
    lines = []
    for name, value in pre.items():
        if name.endswith("_std"):
            continue
        std = pre.get(name + "_std")
        text = f"{_fmt(value)}%" + (f" ± {std:5.2f}" if std is not None else "")
        line = f"{report['protocol']:<8} {report['data']['name']:<10} {name:<24} {text}"
        if ref is not None:
            rstd = ref.get(name + "_std")
            line += f"   (random init {_fmt(ref.get(name))}%" + (f" ± {rstd:5.2f}" if rstd is not None else "") + ")"
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------
# For the trainer and `make run`


def quick_knn(encoder: nn.Module, train_dataset, test_dataset, img_size: int, device) -> dict[str, float]:
    """Fast k-NN accuracy of ``encoder`` for ``--eval-every`` (both protocols, CLS features).

    At most 10,000 training and 2,000 test images (fixed random subsets, the same every call);
    normalised with the training set's stats, as pretraining does. ``knn_top1`` is the weighted
    (k=20, cosine) protocol's top-1; ``knn_majority_top1`` the authors' k=5 Euclidean one.
    """
    device = torch.device(device)
    train = labeled_split(train_dataset, "train", QUICK_KNN_MAX_TRAIN, 0)
    test = labeled_split(test_dataset, "test", QUICK_KNN_MAX_TEST, 0)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    feats = []
    for split in (train, test):
        batches = eval_batches(split, img_size, train_dataset.mean, train_dataset.std, device, 256, 2)
        feats.append(extract_features(encoder, batches, "cls", device))
    (xtr, ytr), (xte, yte) = feats
    m = knn_metrics(xtr, ytr, xte, yte, num_classes, KnnConfig(), device)
    out = {"knn_top1": m["knn_weighted_top1"], "knn_majority_top1": m["knn_majority_top1"]}
    if "knn_weighted_top5" in m:
        out["knn_top5"] = m["knn_weighted_top5"]
    return out


def knn_report_vs_random(checkpoint_path: str | Path, data: str | None = None, data_dir: str | None = None,
                         device: str = "auto", max_train: int | None = None, max_test: int | None = None) -> str:
    """A few lines comparing the checkpoint's k-NN accuracy with a random-init encoder's (for ``make run``)."""
    options = EvalOptions(device=device, max_train=max_train, max_test=max_test, progress=False)
    setup = prepare(checkpoint_path, data, data_dir, options)
    report = run_protocol(setup, "knn")
    pre, ref = report["results"]["pretrained"], report["results"]["random_init"]
    head = (f"k-NN on {setup.data} ({len(setup.train)} train / {len(setup.test)} test images, "
            f"{setup.options.pool} features of {setup.model_name}):")
    rows = [f"  {'protocol':<34} {'pretrained':>10} {'random init':>12}"]
    for name, label in (("knn_majority_top1", "k=5 Euclidean majority, top-1"),
                        ("knn_weighted_top1", "k=20 cosine weighted, top-1")):
        rows.append(f"  {label:<34} {pre[name]:>9.2f}% {ref[name]:>11.2f}%")
    return "\n".join([head, *rows])


# ---------------------------------------------------------------------------------------------
# Command line


FLAG_HELP = {
    "pool": "encoder features: cls token or mean of patch tokens",
    "extract_batch_size": "images per feature-extraction batch",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "seed": "seed of data caps, validation split, support sets and classifier init",
    "max_train": "use a random (seeded) subset of this many training images",
    "max_test": "use a random (seeded) subset of this many test images",
    "num_workers": "DataLoader workers for image folders",
    "progress": "show progress bars",
    "cache_dir": "also store extracted features as .pt files in this folder",
    "random_reference": "also run the protocol on a randomly initialised encoder",
    "k_majority": "neighbours of the majority-vote protocol (Euclidean)",
    "k_weighted": "neighbours of the weighted protocol (cosine)",
    "temperature": "temperature T of the weights exp(similarity / T)",
    "chunk_size": "test features per matrix product",
    "epochs": "training epochs",
    "batch_size": "training batch size",
    "lrs": "learning rates tried (the best on the validation split is kept)",
    "weight_decay": "AdamW weight decay",
    "val_fraction": "fraction of train held out to choose the learning rate",
    "shots": "images per class in each support set",
    "draws": "random support sets per shot count",
    "steps": "full-batch AdamW steps per classifier",
    "lr": "learning rate (fine-tuning: absolute, overrides --base-lr)",
    "base_lr": "learning rate per 256 images (absolute lr = base_lr * batch_size / 256)",
    "min_lr": "final learning rate of the cosine schedule",
    "warmup_epochs": "linear warmup epochs",
    "layer_decay": "layer-wise lr decay: block i of d trains at layer_decay^(d - i) of the head's lr",
    "drop_path": "stochastic depth rate of the last block (linear from 0)",
    "label_smoothing": "label smoothing of the cross-entropy",
    "crop_scale": "smallest area fraction of the random-resized-crop",
    "flip": "random horizontal flips",
}


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, dest_prefix: str, skip=()) -> None:
    """One ``--flag`` per dataclass field (tuples as comma-separated lists), stored as ``PREFIX__name``."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        default = f.default
        kw = {"dest": f"{dest_prefix}__{f.name}", "default": argparse.SUPPRESS}
        text = FLAG_HELP.get(f.name, "")
        if kind.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{text} (default {default})", **kw)
        elif kind.startswith("tuple"):
            conv = float if "float" in kind else int

            def parse_list(text: str, conv=conv, flag=flag):
                try:
                    return tuple(conv(v) for v in text.split(",") if v.strip())
                except ValueError:
                    raise argparse.ArgumentTypeError(f"{flag}: expected comma-separated numbers, got {text!r}")

            parser.add_argument(flag, type=parse_list, metavar="A,B,...",
                                help=f"{text} (default {','.join(str(v) for v in default)})", **kw)
        else:
            conv = float if kind.startswith("float") else int if kind.startswith("int") else str
            metavar = {float: "X", int: "N", str: "TEXT"}[conv]
            choices = ["cls", "mean"] if f.name == "pool" else None
            parser.add_argument(flag, type=conv, metavar=None if choices else metavar, choices=choices,
                                help=f"{text} (default {default})", **kw)


def _collect(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    p = prefix + "__"
    return {k[len(p):]: v for k, v in vars(args).items() if k.startswith(p)}


def add_cli(sub: argparse._SubParsersAction) -> None:
    """``clmae eval knn|linear|fewshot|finetune``."""
    p = sub.add_parser("eval", help="evaluate a pretrained encoder (k-NN, linear probe, few-shot, fine-tuning)",
                       description="Evaluate a checkpoint on a labeled dataset; every protocol also runs on a "
                                   "randomly initialised encoder of the same architecture as a reference.")
    protocols = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    helps = {"knn": "k-NN on frozen features (k=5 Euclidean majority and k=20 cosine weighted)",
             "linear": "linear probe on frozen features (lr chosen on a validation split of train)",
             "fewshot": "n-shot linear classifiers, mean ± std over random support sets",
             "finetune": "full fine-tuning with layer-wise lr decay, drop path, label smoothing"}
    for name in PROTOCOLS:
        q = protocols.add_parser(name, help=helps[name], description=helps[name])
        q.add_argument("--checkpoint", required=True, metavar="PATH", help="run folder, .safetensors or .pt")
        q.add_argument("--data", default=None,
                       help="digits, cifar10, an .npz with labels, or an image folder with train/ and val/ "
                            "(default: the checkpoint's pretraining data)")
        q.add_argument("--data-dir", default=None, help="where cifar10 etc. are looked for")
        q.add_argument("--output", default=None, metavar="FILE.json",
                       help="where to write the report (default: RUN/eval-PROTOCOL-DATA.json)")
        _add_dataclass_flags(q, EvalOptions, "opt")
        _add_dataclass_flags(q, _config_class(name), "cfg")
        q.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    options = EvalOptions(**_collect(args, "opt"))
    config = protocol_config(args.protocol, **_collect(args, "cfg"))
    setup = prepare(args.checkpoint, args.data, args.data_dir, options)
    print(f"clmae: {args.protocol} on {setup.data} ({len(setup.train)} train / {len(setup.test)} test, "
          f"{setup.num_classes} classes), {setup.model_name} from {checkpoint_file(args.checkpoint)}, "
          f"device {setup.device}", file=sys.stderr)
    report = run_protocol(setup, args.protocol, config)
    output = Path(args.output) if args.output else default_output(args.checkpoint, args.protocol, setup.data)
    try:
        write_report(report, output)
        where = f"report: {output}"
    except ClmaeError as exc:
        if args.output:
            raise
        where = f"report not saved ({exc}); pass --output FILE.json"
    for line in summary_lines(report):
        print(line)
    print(where, file=sys.stderr)
    return 0


