"""Options of the evaluation: what every protocol shares (:class:`EvalOptions`), each protocol's hyper-parameters.

Plain dataclasses and constants, no torch: the command line builds its flags and checks its
choices from them without importing torch, so ``clmae eval knn --help`` answers at once. The
modules that run the tools re-export what they take (``clmae.evaluation.runner.EvalOptions``,
``clmae.evaluation.protocols.KnnConfig``, ``clmae.evaluation.finetune.FinetuneConfig``, …).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..options import DEVICE_CHOICES, check_option, opt

PROTOCOLS = ("knn", "linear", "fewshot", "finetune")
FROZEN_PROTOCOLS = ("knn", "linear", "fewshot")  # the ones that share extracted features
POOLS = ("cls", "mean")


# ---------------------------------------------------------------------------------------------
# Evaluation: what every protocol shares


@dataclass
class EvalOptions:
    """What every protocol shares: features, data caps, device, seed, reference run."""

    pool: str = opt("cls", "encoder features: cls token or mean of patch tokens", POOLS)
    img_size: int | None = opt(None, "input size to evaluate at; another size than pretraining resamples the "
                                     "position embeddings (default: the pretraining size)")
    extract_batch_size: int = opt(256, "images per feature-extraction batch")
    device: str = opt("auto", DEVICE_CHOICES)
    seed: int = opt(0, "seed of data caps, validation split, support sets and classifier init")
    max_train: int | None = opt(None, "use a random (seeded) subset of this many training images")
    max_test: int | None = opt(None, "use a random (seeded) subset of this many test images")
    holdout: float | None = opt(None, "for data without a held-out split (an image folder without val/, an .npz "
                                      "without x_test): hold out this seeded random fraction of it, e.g. 0.1")
    num_workers: int = opt(2, "DataLoader workers for image folders")
    progress: bool = opt(True, "show progress bars")
    feature_cache: bool = opt(True, "keep extracted features on disk and reuse them when checkpoint, data, "
                                    "subset, pooling and image size match")
    cache_dir: str | None = opt(None, "folder of the feature cache (default: features/ in the run folder)")
    random_reference: bool = opt(True, "also run the protocol on a randomly initialised encoder")

    def validate(self) -> EvalOptions:
        check_option(self.pool in POOLS, "pool", self.pool, "'cls' or 'mean'")
        check_option(self.img_size is None or self.img_size >= 1, "img_size", self.img_size, "an integer >= 1")
        check_option(self.extract_batch_size >= 1, "extract_batch_size", self.extract_batch_size, "an integer >= 1")
        for name in ("max_train", "max_test"):
            value = getattr(self, name)
            check_option(value is None or value >= 1, name, value, "an integer >= 1")
        check_option(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        check_option(self.holdout is None or 0 < self.holdout < 1, "holdout", self.holdout,
                     "a fraction strictly between 0 and 1 (e.g. 0.1)")
        return self


def show_progress(progress: bool) -> bool:
    """Whether to draw a progress bar: when asked and stderr is a terminal (or a notebook shows it); a log
    file or a pipe gets no bars, whatever ``progress`` says."""
    import sys

    stream = sys.stderr
    return bool(progress) and (getattr(stream, "isatty", lambda: False)() or "ipykernel" in sys.modules)


# ---------------------------------------------------------------------------------------------
# Protocols on frozen features


@dataclass
class KnnConfig:
    k_majority: int = opt(5, "neighbours of the majority-vote protocol (Euclidean; the CL-MAE authors')")
    k_weighted: int = opt(20, "neighbours of the weighted protocol (cosine; DINO's)")
    temperature: float = opt(0.07, "temperature T of the weights exp(similarity / T)")
    chunk_size: int = opt(1024, "test features per matrix product")

    def validate(self) -> KnnConfig:
        check_option(self.k_majority >= 1, "k_majority", self.k_majority, "an integer >= 1")
        check_option(self.k_weighted >= 1, "k_weighted", self.k_weighted, "an integer >= 1")
        check_option(self.temperature > 0, "temperature", self.temperature, "a positive number")
        check_option(self.chunk_size >= 1, "chunk_size", self.chunk_size, "an integer >= 1")
        return self


@dataclass
class LinearConfig:
    """The probe trains for ``max(min_steps, epochs × batches per epoch)`` optimizer steps.

    Counting steps, not epochs, lets the length follow the dataset: large sets get their ``epochs``
    passes, small ones (digits: 6 batches per epoch) still get enough steps to converge.
    """

    epochs: int = opt(30, "passes over the training features (the length on large datasets)")
    min_steps: int = opt(1000, "at least this many optimizer steps (the length on small datasets)")
    batch_size: int = opt(256, "training batch size")
    lrs: tuple[float, ...] = opt((1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
                                 "learning rates tried (the best on the validation split is kept)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    val_fraction: float = opt(0.1, "fraction of train held out to choose the learning rate")

    def validate(self) -> LinearConfig:
        check_option(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check_option(self.min_steps >= 0, "min_steps", self.min_steps, "an integer >= 0")
        check_option(self.batch_size >= 2, "batch_size", self.batch_size, "an integer >= 2")
        check_option(len(self.lrs) >= 1 and all(lr > 0 for lr in self.lrs), "lrs", self.lrs, "positive numbers")
        check_option(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check_option(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a number in (0, 1)")
        return self

    def steps(self, n: int) -> int:
        """Optimizer steps on ``n`` training samples."""
        return max(self.min_steps, self.epochs * max(1, math.ceil(n / self.batch_size)))


@dataclass
class FewShotConfig:
    shots: tuple[int, ...] = opt((1, 5, 10), "images per class in each support set")
    draws: int = opt(5, "random support sets per shot count")
    steps: int = opt(300, "full-batch AdamW steps per classifier")
    lr: float = opt(1e-2, "learning rate")
    weight_decay: float = opt(1e-4, "AdamW weight decay")

    def validate(self) -> FewShotConfig:
        check_option(len(self.shots) >= 1 and all(n >= 1 for n in self.shots), "shots", self.shots, "integers >= 1")
        check_option(self.draws >= 1, "draws", self.draws, "an integer >= 1")
        check_option(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        check_option(self.lr > 0, "lr", self.lr, "a positive number")
        check_option(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        return self


# ---------------------------------------------------------------------------------------------
# Fine-tuning


@dataclass
class FinetuneConfig:
    epochs: int = opt(5, "training epochs")
    batch_size: int = opt(64, "training batch size")
    base_lr: float = opt(4e-3, "learning rate per 256 images (absolute lr = base_lr * batch_size / 256, MAE's rule)")
    lr: float | None = opt(None, "absolute learning rate, overrides --base-lr")
    min_lr: float = opt(1e-6, "final learning rate of the cosine schedule")
    warmup_epochs: float = opt(1.0, "linear warmup epochs")
    weight_decay: float = opt(0.05, "AdamW weight decay")
    layer_decay: float = opt(0.75, "layer-wise lr decay: block i of d trains at layer_decay^(d - i) of the head's lr")
    drop_path: float = opt(0.1, "stochastic depth rate of the last block (linear from 0)")
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy")
    crop_scale: float = opt(0.5, "smallest area fraction of the random-resized-crop")
    flip: bool = opt(True, "random horizontal flips")

    def absolute_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    def validate(self) -> FinetuneConfig:
        def need(cond: bool, option: str, allowed: str) -> None:
            check_option(cond, option, getattr(self, option), allowed)

        need(self.epochs >= 1, "epochs", "an integer >= 1")
        need(self.batch_size >= 2, "batch_size", "an integer >= 2")
        need(self.base_lr > 0, "base_lr", "a positive number")
        need(self.lr is None or self.lr > 0, "lr", "a positive number")
        need(self.min_lr >= 0, "min_lr", "a number >= 0")
        need(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs",
             f"a number between 0 and --epochs ({self.epochs})")
        need(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(0 < self.layer_decay <= 1, "layer_decay", "a number in (0, 1]")
        need(0 <= self.drop_path < 1, "drop_path", "a number in [0, 1)")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "a number in [0, 1)")
        need(0 < self.crop_scale <= 1, "crop_scale", "a number in (0, 1]")
        return self


# ---------------------------------------------------------------------------------------------
# By protocol name


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
