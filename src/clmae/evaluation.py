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
:func:`quick_knn` (the trainer's ``--eval-every``); the ``clmae eval`` command is
:mod:`clmae.eval_cli`. The pieces: :mod:`clmae.splits` (labeled data and its evaluation view),
:mod:`clmae.features` (extraction and cache), :mod:`clmae.protocols` (pure functions on feature
tensors), :mod:`clmae.reports` (the JSON); :mod:`clmae.compare` tabulates and plots several reports.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import checkpoint_file, file_sha256, load_pretrained
from .data import load_dataset
from .errors import CheckpointError, ConfigError, DataError
from .features import FeatureCache, Features, extract_features
from .finetune import FinetuneConfig, finetune_metrics
from .model import MaskedAutoencoderViT, default_model
from .options import check_option, opt
from .protocols import (
    FewShotConfig,
    KnnConfig,
    LinearConfig,
    fewshot_metrics,
    knn_metrics,
    linear_probe_metrics,
    sample_support,
)
from .reports import assemble_report, write_report
from .runtime import DEVICE_CHOICES, resolve_device
from .splits import LabeledSplit, class_count, data_identity, eval_batches, labeled_split

PROTOCOLS = ("knn", "linear", "fewshot", "finetune")
POOLS = ("cls", "mean")
QUICK_KNN_MAX_TRAIN = 10_000
QUICK_KNN_MAX_TEST = 2_000


# ---------------------------------------------------------------------------------------------
# Options and protocol configurations


@dataclass
class EvalOptions:
    """What every protocol shares: features, data caps, device, seed, reference run."""

    pool: str = opt("cls", "encoder features: cls token or mean of patch tokens")
    extract_batch_size: int = opt(256, "images per feature-extraction batch")
    device: str = opt("auto", DEVICE_CHOICES)
    seed: int = opt(0, "seed of data caps, validation split, support sets and classifier init")
    max_train: int | None = opt(None, "use a random (seeded) subset of this many training images")
    max_test: int | None = opt(None, "use a random (seeded) subset of this many test images")
    num_workers: int = opt(2, "DataLoader workers for image folders")
    progress: bool = opt(True, "show progress bars")
    cache_dir: str | None = opt(None, "also store extracted features as .pt files in this folder")
    random_reference: bool = opt(True, "also run the protocol on a randomly initialised encoder")

    def validate(self) -> EvalOptions:
        check_option(self.pool in POOLS, "pool", self.pool, "'cls' or 'mean'")
        check_option(self.extract_batch_size >= 1, "extract_batch_size", self.extract_batch_size, "an integer >= 1")
        for name in ("max_train", "max_test"):
            value = getattr(self, name)
            check_option(value is None or value >= 1, name, value, "an integer >= 1")
        check_option(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        return self


def protocol_config(protocol: str, **values) -> Any:
    """The default configuration of ``protocol`` with ``values`` applied and validated."""
    cls = config_class(protocol)
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{protocol}: unknown options {sorted(unknown)}")
    return cls(**values).validate()


def config_class(protocol: str) -> type:
    """The hyper-parameter dataclass of ``protocol``."""
    classes = {"knn": KnnConfig, "linear": LinearConfig, "fewshot": FewShotConfig, "finetune": FinetuneConfig}
    if protocol not in classes:
        raise ConfigError(f"protocol: unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return classes[protocol]


# ---------------------------------------------------------------------------------------------
# What one process keeps between evaluations


@dataclass
class EvalCaches:
    """Loaded datasets, extracted features and protocol results, kept for the life of the process."""

    features: FeatureCache = field(default_factory=FeatureCache)
    datasets: dict[tuple, Any] = field(default_factory=dict)
    results: dict[tuple, tuple[dict, dict]] = field(default_factory=dict)

    def dataset(self, data: str, data_dir: str | None, split: str, channels: int, identity: str):
        """``load_dataset`` once per process (decoding CIFAR-10 and its statistics takes seconds)."""
        key = (identity, split, channels)
        if key not in self.datasets:
            self.datasets[key] = load_dataset(data, data_dir, split, channels=channels)
        return self.datasets[key]

    def clear(self) -> None:
        self.features.clear()
        self.datasets.clear()
        self.results.clear()


CACHES = EvalCaches()


def clear_caches() -> None:
    """Forget cached datasets, features and results."""
    CACHES.clear()


# ---------------------------------------------------------------------------------------------
# A prepared evaluation: checkpoint, reference encoder, data


def random_encoder(model_cfg, seed: int, device) -> nn.Module:
    """A freshly initialised model of the same architecture, built as the trainer builds it."""
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

    def features(self, encoder: Encoder, split: LabeledSplit) -> Features:
        """Frozen features of ``split``, extracted once per (encoder, data, split, pool, view)."""
        o = self.options
        key = (encoder.key, split.identity, o.pool, self.img_size, tuple(self.mean), tuple(self.std))

        def extract() -> Features:
            start = time.perf_counter()
            batches = eval_batches(split, self.img_size, self.mean, self.std, self.device, o.extract_batch_size,
                                   o.num_workers, o.progress, desc=f"features {encoder.role} {split.split}")
            feats = extract_features(encoder.model, batches, o.pool, self.device)
            seconds = time.perf_counter() - start
            self.timings[f"features_{encoder.role}_{split.split}_s"] = round(seconds, 3)
            self.timings[f"features_{encoder.role}_{split.split}_img_per_s"] = round(len(split) / max(seconds, 1e-9), 1)
            return feats

        return CACHES.features.get(key, extract, o.cache_dir, f"features-{encoder.role}-{split.split}-{o.pool}")


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
    return run_config.get("model") or default_model(str(run_config.get("data")))


def prepare(checkpoint: str | Path, data: str | None = None, data_dir: str | None = None,
            options: EvalOptions | None = None) -> EvalSetup:
    """Load the checkpoint, its random-init twin and the labeled train/test splits of ``data``.

    ``data=None`` evaluates on the data the checkpoint was pretrained on.
    """
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
    identity = data_identity(data, data_dir)
    train_ds = CACHES.dataset(data, data_dir, "train", cfg.in_chans, identity)
    train = labeled_split(train_ds, "train", o.max_train, o.seed, identity)
    test = labeled_split(CACHES.dataset(data, data_dir, "test", cfg.in_chans, identity), "test", o.max_test,
                         o.seed, identity)
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
        data=data, data_dir=data_dir, train=train, test=test, num_classes=class_count(train, test),
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
# Running protocols


def _protocol_on(setup: EvalSetup, encoder: Encoder, protocol: str, config) -> tuple[dict, dict]:
    o = setup.options
    if protocol == "finetune":
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
        if key not in CACHES.results:
            CACHES.results[key] = _protocol_on(setup, enc, protocol, config)
        results[enc.role], details[enc.role] = copy.deepcopy(CACHES.results[key])
    return assemble_report(setup, protocol, config, results, details)


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


# ---------------------------------------------------------------------------------------------
# For the trainer


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
