"""Downstream evaluation of a pretrained encoder: k-NN, linear probe, few-shot and fine-tuning.

All protocols use the dataset's *train* split to fit and its *test* split (``val/`` for image
folders) to score; images get the deterministic evaluation view (resize to the model's input size,
normalised with the pretraining data's mean/std stored in the checkpoint). Accuracies are in
percent. Every report also runs the same protocol on a **randomly initialised encoder** of the same
architecture, built with the pretraining run's seed (so it is exactly the weights pretraining
started from): the gap between the two lines is what pretraining bought.

Frozen-feature protocols (features: ``forward_features`` with ``cls`` or ``mean`` pooling, extracted
once under ``no_grad``, bf16 autocast on CUDA, cached in memory and on disk):

* **k-NN, majority** (the CL-MAE authors' protocol): the ``k=5`` nearest training features in
  Euclidean distance vote, one vote each. Ties between classes go to the tied class whose nearest
  member ranks highest among the neighbours (i.e. is closest to the query). Neighbours at exactly
  equal distance are ordered as ``torch.topk`` returns them (unspecified). Distances do not depend
  on where the features sit: candidates are found on features centred on the training mean, then
  ranked by exact distances.
* **k-NN, weighted** (the DINO protocol): ``k=20`` nearest by cosine similarity ``s``, each votes
  for its class with weight ``exp(s / T)``, ``T = 0.07``. The class with the largest sum wins.
  Both run as chunked matrix products plus ``topk`` on the device, never a loop per test image.
  Top-5 accuracy ranks classes by the same scores; it is reported only with more than 5 classes.
* **Linear probe** (as MAE): ``BatchNorm1d(affine=False)`` then one linear layer on the frozen
  features, AdamW with a cosine schedule. Its length is counted in optimizer steps, not epochs, so a
  small dataset is trained to convergence too (see :class:`~clmae.evaluation.protocols.LinearConfig`). The
  learning rate is chosen from a small sweep on a validation split carved from train (never on
  test); the probe is then retrained on all of train.
* **Few-shot**: for each ``n`` in ``shots`` (1, 5, 10), ``draws`` random support sets of exactly
  ``n`` training images per class (seeded), a linear probe as above trained full-batch on each,
  scored on the whole test split; reported as mean ± std over the draws. Its hyper-parameters are
  fixed (lr 0.01, 300 full-batch steps): a support set of one image per class leaves nothing to
  validate on. ``n`` above the smallest class's count is an error, not a silent smaller set.

Fine-tuning (:mod:`clmae.evaluation.finetune`) trains the whole encoder with a linear head: layer-wise lr
decay, stochastic depth, label smoothing, warmup + cosine, random-resized-crop + flip.

Any evaluation is possible at another input size than pretraining (``img_size``): the position
embeddings of the pretraining grid are resampled bicubically to the new grid, as timm does.

Entry points: :func:`evaluate` (one protocol, writes and returns the JSON report),
:func:`evaluate_all` (several protocols, one feature extraction per encoder), :func:`prepare` +
:func:`run_protocols` (the same, step by step), :func:`quick_knn` (the trainer's
``--eval-every``); the ``clmae eval`` command is :mod:`clmae.cli.eval`. Before any evaluation that
would take more than ten minutes, the estimate and how to shorten it are printed. The pieces:
:mod:`clmae.evaluation.splits` (labeled data and its evaluation view), :mod:`clmae.evaluation.features`
(extraction and cache), :mod:`clmae.evaluation.protocols` (pure functions on feature tensors),
:mod:`clmae.evaluation.results` (the JSON); :mod:`clmae.evaluation.compare` tabulates and plots several reports.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data.datasets import FolderData, InMemoryImages, NoHeldOutSplit, load_dataset
from ..errors import CheckpointError, ConfigError, DataError
from ..io.checkpoint import load_checkpoint
from ..models.configs import ModelConfig
from ..models.mae import MaskedAutoencoderViT
from ..options import check_option, one_of
from ..runtime import autocast, resolve_device
from ..version import __version__
from .features import FeatureCache, Features, extract_features
from .finetune import finetune_metrics
from .options import FROZEN_PROTOCOLS, PROTOCOLS, EvalOptions, KnnConfig, config_class, protocol_config
from .protocols import fewshot_metrics, knn_metrics, linear_probe_metrics, sample_support
from .results import (
    assemble_report,
    below_random_init,
    default_output,
    summary_output,
    summary_table,
    write_report,
    write_summary,
)
from .splits import (
    LabeledSplit,
    class_count,
    content_identity,
    data_identity,
    eval_batches,
    holdout_splits,
    labeled_split,
)

QUICK_KNN_MAX_TRAIN = 10_000
QUICK_KNN_MAX_TEST = 2_000
LONG_RUN_SECONDS = 600  # evaluations estimated to take longer say so before they start
# A throughput no machine clmae runs on falls below (10 GFLOP/s): work that takes under
# LONG_RUN_SECONDS even at this rate needs no timing to know it is short.
SLOWEST_FLOPS = 1e10


# ---------------------------------------------------------------------------------------------
# Options (the dataclasses are torch-free in clmae.evaluation.options and re-exported here)


def split_keywords(protocols: tuple[str, ...], values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(EvalOptions fields, protocol fields)`` of keyword options; an unknown name is an error naming it."""
    option_names = {f.name for f in dataclasses.fields(EvalOptions)}
    config_names = {f.name for p in protocols for f in dataclasses.fields(config_class(p))}
    unknown = sorted(set(values) - option_names - config_names)
    if unknown:
        raise ConfigError(f"evaluate: unknown option(s) {', '.join(unknown)}; the options are the `clmae eval` flags "
                          f"with _ for -: {', '.join(sorted(option_names | config_names))}")
    return ({k: v for k, v in values.items() if k in option_names},
            {k: v for k, v in values.items() if k not in option_names})


# ---------------------------------------------------------------------------------------------
# What one process keeps between evaluations


@dataclass
class EvalCaches:
    """Loaded datasets, extracted features and protocol results, for a caller to reuse between evaluations.

    Each :func:`prepare` gets a fresh one unless given one: a caller that evaluates many checkpoints
    on the same data (a study) owns one and passes it, so CIFAR-10 is decoded once.
    """

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


# ---------------------------------------------------------------------------------------------
# A prepared evaluation: checkpoint, reference encoder, data


def random_encoder(model_cfg, seed: int, device) -> nn.Module:
    """A freshly initialised model of the same architecture, built as the trainer builds it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskedAutoencoderViT(copy.deepcopy(model_cfg))
    return model.to(device).eval()


def architecture_id(model_cfg: ModelConfig) -> str:
    """A short hash of a model configuration: two encoders with equal ids and seeds start identical."""
    return hashlib.sha1(json.dumps(dataclasses.asdict(model_cfg), sort_keys=True).encode()).hexdigest()[:16]


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
    checkpoint_file: Path  # the file the weights, sha256 and model name all come from
    checkpoint_sha256: str
    model_name: str
    run_config: dict
    position: dict  # epoch (completed), step_in_epoch, iteration of the checkpoint
    pretrain_img_size: int
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
    cache_folder: Path | None = None
    encoders: list[Encoder] = field(default_factory=list)
    random_init_seed: int | None = None
    random_init_architecture: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    content_ids: dict[str, str] = field(default_factory=dict)
    caches: EvalCaches = field(default_factory=EvalCaches)
    notes: list[str] = field(default_factory=list)  # how the data was read, for the user (data_notes)

    def data_id(self, split: LabeledSplit) -> str:
        """What the split's data is: its identity, and with a cache on disk the state of every image file."""
        if self.cache_folder is None:
            return split.identity
        if split.split not in self.content_ids:
            self.content_ids[split.split] = content_identity(split)
        return self.content_ids[split.split]

    def feature_key(self, encoder: Encoder, split: LabeledSplit) -> tuple:
        """What determines the features: encoder weights, exact data and subset, pooling, view, code version."""
        return (encoder.key, self.data_id(split), self.options.pool, self.img_size, tuple(self.mean),
                tuple(self.std), __version__)

    def _cache(self, encoder: Encoder, split: LabeledSplit) -> tuple[tuple, Path | None, torch.Tensor | None]:
        key = self.feature_key(encoder, split)
        if self.cache_folder is None:
            return key, None, None
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
        file = self.cache_folder / f"{encoder.role}-{split.split}-{self.options.pool}-{self.img_size}px-{digest}.pt"
        # Image folders may drop unreadable files while extracting; their content id covers the files.
        labels = None if isinstance(split.dataset, FolderData) else split.labels
        return key, file, labels

    def has_features(self, encoder: Encoder, split: LabeledSplit) -> bool:
        return self.caches.features.has(*self._cache(encoder, split))

    def features(self, encoder: Encoder, split: LabeledSplit) -> Features:
        """Frozen features of ``split``, extracted once per (encoder, data, subset, pool, view)."""
        o = self.options

        def extract() -> Features:
            start = time.perf_counter()
            batches = eval_batches(split, self.img_size, self.mean, self.std, self.device, o.extract_batch_size,
                                   o.num_workers, o.progress, desc=f"features {encoder.role} {split.split}")
            feats = extract_features(encoder.model, batches, o.pool, self.device)
            seconds = time.perf_counter() - start
            self.timings[f"features_{encoder.role}_{split.split}_s"] = round(seconds, 3)
            self.timings[f"features_{encoder.role}_{split.split}_img_per_s"] = round(len(split) / max(seconds, 1e-9), 1)
            return feats

        key, file, labels = self._cache(encoder, split)
        feats = self.caches.features.get(key, extract, file, labels)
        if key in self.caches.features.read_from:
            self.timings[f"features_{encoder.role}_{split.split}_cached"] = str(self.caches.features.read_from[key])
        return feats


def prepare(checkpoint: str | Path, data: str | None = None, data_dir: str | None = None,
            options: EvalOptions | None = None, caches: EvalCaches | None = None) -> EvalSetup:
    """Load the checkpoint, its random-init twin and the labeled train/test splits of ``data``.

    ``data=None`` evaluates on the data the checkpoint was pretrained on. ``caches``: datasets, features and
    results from earlier evaluations of this caller (default: none, a fresh set).
    """
    o = (options or EvalOptions()).validate()
    caches = caches if caches is not None else EvalCaches()
    device = resolve_device(o.device)
    loaded = load_checkpoint(checkpoint, device, o.img_size)
    mae, run_cfg, file = loaded.mae, loaded.run_config, loaded.file
    info = run_cfg.get("data_info") or {}
    cfg = mae.config
    data = data or run_cfg.get("data")
    if not data:
        raise ConfigError("--data: the checkpoint does not record its dataset; pass --data")
    if data_dir is None and data == run_cfg.get("data"):
        data_dir = run_cfg.get("data_dir")
    identity = data_identity(data, data_dir)
    train_ds = caches.dataset(data, data_dir, "train", cfg.in_chans, identity)
    test_ds = _test_dataset(caches, data, data_dir, cfg.in_chans, identity, o.holdout)
    if test_ds is None:
        train, test = holdout_splits(train_ds, o.holdout, o.seed, o.max_train, o.max_test, identity)
    else:
        train = labeled_split(train_ds, "train", o.max_train, o.seed, identity)
        test = labeled_split(test_ds, "test", o.max_test, o.seed, identity)
    for ds in (train_ds, test_ds or train_ds):
        if ds.channels != cfg.in_chans:
            raise DataError(
                f"{ds.name}: images have {ds.channels} channel(s) but the checkpoint's model takes {cfg.in_chans}; "
                "evaluate on data with the pretraining data's channels"
            )
    mean = tuple(info.get("mean") or train_ds.mean)
    std = tuple(info.get("std") or train_ds.std)
    if len(mean) != cfg.in_chans or len(std) != cfg.in_chans:
        raise CheckpointError(f"{file}: normalisation stats do not match the model's {cfg.in_chans} channel(s)")
    cache_folder = None
    if o.feature_cache:
        cache_folder = Path(o.cache_dir).expanduser() if o.cache_dir else file.parent / "features"
    sha = loaded.sha256
    setup = EvalSetup(
        checkpoint=str(checkpoint), checkpoint_file=file, checkpoint_sha256=sha, model_name=loaded.model_name,
        run_config=run_cfg, position=loaded.position, pretrain_img_size=loaded.pretrain_img_size, data=data,
        data_dir=data_dir, train=train, test=test, num_classes=class_count(train, test), img_size=cfg.img_size,
        mean=mean, std=std, device=device, options=o, cache_folder=cache_folder, caches=caches,
    )
    setup.notes = data_notes(train_ds, test_ds, cfg.img_size)
    setup.encoders.append(Encoder("pretrained", mae, f"ckpt:{sha}:{cfg.img_size}px"))
    if o.random_reference:
        seed = int(run_cfg.get("seed", o.seed))
        arch = architecture_id(loaded.model_config)
        model = random_encoder(loaded.model_config, seed, device).at_img_size(cfg.img_size)
        key = f"random:{arch}:{seed}:{cfg.img_size}px:torch-{torch.__version__}"  # init code may change with torch
        setup.encoders.append(Encoder("random_init", model, key))
        setup.random_init_seed, setup.random_init_architecture = seed, arch
    return setup


def _test_dataset(caches: EvalCaches, data: str, data_dir: str | None, channels: int, identity: str,
                  holdout: float | None):
    """The data's own held-out split, or None with ``--holdout`` (a fraction of train is held out instead)."""
    try:
        test = caches.dataset(data, data_dir, "test", channels, identity)
    except NoHeldOutSplit as exc:
        if holdout is None:
            raise NoHeldOutSplit(f"{exc}; or pass --holdout 0.1 (Python: holdout=0.1) to hold out a seeded random "
                                 "10% of it") from None
        return None
    if holdout is not None:
        raise ConfigError(f"--holdout: {data} has a held-out split of its own (val/, x_test or a test split), which "
                          "evaluation uses; drop --holdout")
    return test


def data_notes(train, test, img_size: int) -> list[str]:
    """What the user should know about how the data was read: the datasets' notes (text labels, channels-first
    arrays), and in-memory test images of another size than the training images."""
    notes = list(dict.fromkeys([*getattr(train, "notes", []), *getattr(test, "notes", [])]))
    if isinstance(train, InMemoryImages) and isinstance(test, InMemoryImages):
        a, b = tuple(train.images.shape[-2:]), tuple(test.images.shape[-2:])
        if a != b:
            notes.append(f"{train.name}: the test images are {b[0]}x{b[1]} px, the training images {a[0]}x{a[1]} px; "
                         f"both are resized to the model's {img_size} px for evaluation")
    return notes


# ---------------------------------------------------------------------------------------------
# How long it will take


def encoder_flops(cfg: ModelConfig) -> float:
    """Multiply-adds x2 of one image through the encoder: patch embedding, blocks (linear layers and attention)."""
    tokens, d = 1 + cfg.num_patches, cfg.embed_dim
    embed = 2 * cfg.num_patches * cfg.patch_dim * d
    linear = 2 * tokens * (4 + 2 * cfg.mlp_ratio) * d * d
    attention = 4 * tokens * tokens * d
    return embed + cfg.depth * (linear + attention)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def measure_throughput(model: nn.Module, setup: EvalSetup) -> float:
    """Images per second of the encoder's forward pass, timed on a second batch after a warm-up one.

    A small batch on the CPU (cheap to time), a full batch on accelerators (whose throughput needs
    one). It times the model only: reading images from slow disks can make the real run slower.
    """
    cfg = model.config
    size = setup.options.extract_batch_size if setup.device.type != "cpu" else min(8, setup.options.extract_batch_size)
    x = torch.randn(size, cfg.in_chans, cfg.img_size, cfg.img_size, device=setup.device)
    seconds = 0.0
    for _ in range(2):
        _synchronize(setup.device)
        start = time.perf_counter()
        with autocast(setup.device):
            model.forward_features(x, pool="cls")
        _synchronize(setup.device)
        seconds = time.perf_counter() - start
    return size / max(seconds, 1e-9)


def estimate_seconds(setup: EvalSetup, configs: dict[str, Any]) -> tuple[float, int, float] | None:
    """``(seconds, image passes, images/s)`` the protocols will take, or ``None`` when surely short.

    Counts forward passes of images through the encoders: features not yet cached (memory or disk),
    and for fine-tuning ``epochs`` training passes (forward and backward, 3 forward passes' worth)
    plus the two test passes. Classifier training on features is cheap beside them and not counted.
    """
    passes = 0
    for enc in setup.encoders:
        if any(p in FROZEN_PROTOCOLS for p in configs):
            passes += sum(len(s) for s in (setup.train, setup.test) if not setup.has_features(enc, s))
        if "finetune" in configs:
            passes += 3 * configs["finetune"].epochs * len(setup.train) + 2 * len(setup.test)
    if passes == 0 or passes * encoder_flops(setup.encoders[0].model.config) < SLOWEST_FLOPS * LONG_RUN_SECONDS:
        return None
    rate = measure_throughput(setup.encoders[0].model, setup)
    return passes / rate, passes, rate


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def warn_if_long(setup: EvalSetup, configs: dict[str, Any]) -> float | None:
    """Print the estimate and how to shorten it when the evaluation will take over ten minutes."""
    estimate = estimate_seconds(setup, configs)
    if estimate is None or estimate[0] <= LONG_RUN_SECONDS:
        return None if estimate is None else estimate[0]
    seconds, passes, rate = estimate
    encoders = len(setup.encoders)
    print(f"clmae: this evaluation will take about {_duration(seconds)}: {passes:,} image passes through "
          f"{encoders} encoder{'s' if encoders > 1 else ''} ({len(setup.train):,} train / {len(setup.test):,} test "
          f"images) at ~{rate:,.0f} img/s, measured on {setup.device} (model time only). To limit it: --max-train N "
          "--max-test N (Python: max_train=N, max_test=N), --no-random-reference, or fewer --protocols",
          file=sys.stderr)
    return seconds


# ---------------------------------------------------------------------------------------------
# Running protocols


def _protocol_on(setup: EvalSetup, encoder: Encoder, protocol: str, config) -> tuple[dict, dict]:
    """``(metrics, details)`` of one protocol (one of ``PROTOCOLS``: :func:`run_protocols` checked it)."""
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
    return fewshot_metrics(xtr, ytr, xte, yte, setup.num_classes, config, o.seed, setup.device)


def run_protocols(setup: EvalSetup, configs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run several protocols (``{name: config or None}``) on every encoder of ``setup``; reports by name.

    Frozen-feature protocols share one feature extraction per encoder and split. Impossible settings
    are refused, and a long run announced, before any work.
    """
    configs = {p: (c if c is not None else protocol_config(p)) for p, c in configs.items()}
    for protocol, config in configs.items():
        config_class(protocol)
        config.validate()
        if protocol == "fewshot":  # refuse impossible shot counts before extracting anything
            for shots in config.shots:
                sample_support(setup.train.labels, shots, torch.Generator().manual_seed(0))
    warn_if_long(setup, configs)
    reports = {}
    for protocol, config in configs.items():
        results, details = {}, {}
        for enc in setup.encoders:
            key = (enc.key, protocol, repr(config), setup.train.identity, setup.test.identity,
                   setup.options.pool, setup.options.seed, setup.img_size, setup.mean, setup.std)
            if key not in setup.caches.results:
                setup.caches.results[key] = _protocol_on(setup, enc, protocol, config)
            results[enc.role], details[enc.role] = copy.deepcopy(setup.caches.results[key])
        reports[protocol] = assemble_report(setup, protocol, config, results, details)
    return reports


def run_protocol(setup: EvalSetup, protocol: str, config=None) -> dict[str, Any]:
    """Run one protocol on every encoder of ``setup``; return the JSON-ready report."""
    return run_protocols(setup, {protocol: config})[protocol]


def evaluate(protocol: str, checkpoint: str | Path, data: str | None = None, data_dir: str | None = None,
             output: str | Path | None = None, options: EvalOptions | None = None, write: bool = True,
             **keywords) -> dict[str, Any]:
    """Evaluate ``checkpoint`` with ``protocol`` (knn | linear | fewshot | finetune) on ``data``, like ``clmae eval``.

    ``protocol="all"`` is :func:`evaluate_all` (``clmae eval all``; ``protocols=``, ``configs=`` as there): it
    returns the reports by protocol.

    ``keywords`` are the command's flags with ``_`` for ``-``: evaluation options
    (``max_train=500``, ``pool="mean"``, ``img_size=64``, … see :class:`EvalOptions`, applied on
    top of ``options``) and the protocol's hyper-parameters (``k_majority=10``). The report is
    written to ``output``, by default ``RUN/eval-PROTOCOL-DATA.json`` as the command does
    (``write=False``: not written), and returned.
    """
    if protocol == "all":
        if output is not None:
            raise ConfigError("output: evaluate('all', ...) writes one report per protocol into the run folder, as "
                              "`clmae eval all` does; drop output (or evaluate one protocol)")
        return evaluate_all(checkpoint, data, data_dir, options=options, write=write, **keywords)
    check_option(protocol in PROTOCOLS, "protocol", protocol, one_of((*PROTOCOLS, "all")))
    option_values, config_values = split_keywords((protocol,), keywords)
    o = dataclasses.replace(options or EvalOptions(), **option_values)
    config = protocol_config(protocol, **config_values)
    setup = prepare(checkpoint, data, data_dir, o)
    say_notes(setup)
    report = run_protocol(setup, protocol, config)
    if write:
        write_report(report, output if output is not None else default_output(checkpoint, protocol, setup.data))
    say_if_below_random([report])
    return report


def say_notes(setup: EvalSetup) -> None:
    """How the data was read (:func:`data_notes`), on stderr, as ``clmae eval`` says it."""
    for note in setup.notes:
        print(f"clmae: note: {note}", file=sys.stderr)


def say_if_below_random(reports: list[dict[str, Any]]) -> None:
    """The line of :func:`~clmae.evaluation.results.below_random_init`, on stderr, when it applies."""
    line = below_random_init(reports)
    if line:
        print(line, file=sys.stderr)


def evaluate_all(checkpoint: str | Path, data: str | None = None, data_dir: str | None = None,
                 protocols: tuple[str, ...] | list[str] = FROZEN_PROTOCOLS, options: EvalOptions | None = None,
                 configs: dict[str, dict[str, Any]] | None = None, write: bool = True,
                 **keywords) -> dict[str, dict[str, Any]]:
    """Several protocols on one checkpoint (``clmae eval all``), one feature extraction per encoder.

    ``keywords`` are evaluation options (as :func:`evaluate`); ``configs`` maps a protocol to its
    hyper-parameters (``{"linear": {"lrs": (0.01,)}}``). Writes ``RUN/eval-PROTOCOL-DATA.json`` per
    protocol and the summary table ``RUN/eval-summary-DATA.md`` unless ``write=False``.
    """
    protocols = tuple(protocols)
    for p in protocols:
        check_option(p in PROTOCOLS, "protocols", p, one_of(PROTOCOLS))
    check_option(len(protocols) >= 1 and len(set(protocols)) == len(protocols), "protocols", ",".join(protocols),
                 "one or more distinct protocols")
    option_values, _ = split_keywords((), keywords)
    o = dataclasses.replace(options or EvalOptions(), **option_values)
    configs = configs or {}
    extra = sorted(set(configs) - set(protocols))
    if extra:
        raise ConfigError(f"evaluate_all: configs for protocols not run: {', '.join(extra)}")
    built = {p: protocol_config(p, **configs.get(p, {})) for p in protocols}
    setup = prepare(checkpoint, data, data_dir, o)
    say_notes(setup)
    reports = run_protocols(setup, built)
    if write:
        for p, report in reports.items():
            write_report(report, default_output(checkpoint, p, setup.data))
        write_summary(summary_table(list(reports.values())), summary_output(checkpoint, setup.data))
    say_if_below_random(list(reports.values()))
    return reports


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
    num_classes = class_count(train, test)
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
