"""Pretraining configuration: one dataclass, validated up front, loadable from YAML or presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .curriculum import SCHEDULES
from .errors import ConfigError


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs. CLI flags map 1:1 to these fields (``--batch-size``)."""

    # data
    data: str = "digits"  # digits | cifar10 | PATH.npz | PATH/to/images
    data_dir: str | None = None  # where cifar10 etc. are looked for (default: $CLMAE_DATA, ./data)
    subset: int | None = None  # use only the first N training images
    img_size: int | None = None  # default: the model's
    num_workers: int = 2  # DataLoader workers for image folders
    # method and model
    method: str = "clmae"  # clmae | mae
    model: str | None = None  # default: by dataset (digits → vit_micro_patch2_8, cifar10 → vit_tiny_patch4_32)
    patch_size: int | None = None  # override the model's
    norm_pix_loss: bool = False
    mask_ratio: float = 0.75
    init_from: str | None = None  # start from an MAE checkpoint (facebookresearch/mae .pth or clmae run)
    # CL-MAE masking module
    curriculum: str = "official"
    curriculum_value: float = 1.0  # λ for --curriculum constant
    lambda_gauss: float = 1.0
    lambda_kl: float = 0.1
    lambda_div: float = 2.0
    kl_reduction: str = "sum"  # the authors' sum over the batch, or mean
    masker_every: int = 1  # update the masking module every K iterations (authors: 1)
    masker_batch_fraction: float = 1.0  # masking-module step on this fraction of the batch (authors: 1)
    # optimisation
    epochs: int = 30
    batch_size: int = 64
    accum_iter: int = 1
    base_lr: float = 1e-3
    lr: float | None = None  # absolute lr; default base_lr * effective_batch / 256
    min_lr: float = 0.0
    warmup_epochs: float | None = None  # default: a tenth of --epochs
    weight_decay: float = 0.05
    # run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    output_dir: str | None = None  # default runs/<method>-<data>-<time>
    resume: str | None = None  # run dir or checkpoint file; "auto" = output_dir's last checkpoint
    save_every: int = 0  # also keep checkpoint-EPOCH every N epochs (0 = only checkpoint-last)
    log_every: int = 10  # steps between metrics.jsonl lines
    eval_every: int = 0  # quick k-NN every N epochs on held-out data (0 = only at the end)
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    compile: bool = False  # torch.compile the model and masker
    # curriculum probe (clmae.probe): difficulty of the learned masks on a fixed batch
    probe_every: int = 50  # iterations between probe measurements (0 = off)
    probe_images: int = 16  # size of the fixed probe batch
    snapshot_every: int | None = None  # save probe scores/masks every N epochs (0 = off; default: ~10 per run)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes stored with the run

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.accum_iter

    def absolute_lr(self, world_size: int = 1) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.effective_batch_size * world_size / 256

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "PretrainConfig":
        """Check every option; the error names the option and its allowed range."""

        def need(cond: bool, option: str, allowed: str) -> None:
            if not cond:
                value = getattr(self, option)
                raise ConfigError(f"--{option.replace('_', '-')}: got {value!r}, expected {allowed}")

        need(self.method in ("clmae", "mae"), "method", "'clmae' or 'mae'")
        need(0.0 < self.mask_ratio < 1.0, "mask_ratio", "a number strictly between 0 and 1")
        need(self.curriculum in SCHEDULES, "curriculum", "one of " + ", ".join(SCHEDULES))
        need(math.isfinite(self.curriculum_value), "curriculum_value", "a finite number")
        for name in ("lambda_gauss", "lambda_kl", "lambda_div"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "a finite number >= 0")
        need(self.kl_reduction in ("sum", "mean"), "kl_reduction", "'sum' or 'mean'")
        need(self.masker_every >= 1, "masker_every", "an integer >= 1")
        need(0.0 < self.masker_batch_fraction <= 1.0, "masker_batch_fraction", "a number in (0, 1]")
        need(self.epochs >= 1, "epochs", "an integer >= 1")
        need(self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.accum_iter >= 1, "accum_iter", "an integer >= 1")
        need(math.isfinite(self.base_lr) and self.base_lr > 0, "base_lr", "a finite positive number")
        need(self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "lr", "a finite positive number")
        need(math.isfinite(self.min_lr) and self.min_lr >= 0, "min_lr", "a finite number >= 0")
        if self.warmup_epochs is None:
            self.warmup_epochs = round(0.1 * self.epochs, 3)
        need(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", f"a number between 0 and --epochs ({self.epochs})")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0")
        need(0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)")
        if self.model is not None:
            from .model import MODEL_CONFIGS

            need(self.model in MODEL_CONFIGS, "model", "one of " + ", ".join(sorted(MODEL_CONFIGS)))
        need(self.subset is None or self.subset >= 1, "subset", "an integer >= 1")
        need(self.img_size is None or self.img_size >= 1, "img_size", "a positive integer")
        need(self.patch_size is None or self.patch_size >= 1, "patch_size", "a positive integer")
        need(self.num_workers >= 0, "num_workers", "an integer >= 0")
        need(self.save_every >= 0, "save_every", "an integer >= 0")
        need(self.log_every >= 1, "log_every", "an integer >= 1")
        need(self.eval_every >= 0, "eval_every", "an integer >= 0")
        need(self.probe_every >= 0, "probe_every", "an integer >= 0")
        need(self.probe_images >= 2, "probe_images", "an integer >= 2")
        if self.snapshot_every is None:
            self.snapshot_every = max(1, math.ceil(self.epochs / 10))  # about ten snapshots per run
        need(self.snapshot_every >= 0, "snapshot_every", "an integer >= 0")
        need(self.max_nonfinite >= 1, "max_nonfinite", "an integer >= 1")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}


def preset_names() -> list[str]:
    folder = resources.files("clmae") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config_file(path_or_preset: str) -> dict[str, Any]:
    """Read a YAML file of config values, or a shipped preset by name (``clmae pretrain --config cifar10``)."""
    path = Path(path_or_preset)
    if path.is_file():
        text = path.read_text()
        where = str(path)
    else:
        preset = resources.files("clmae") / "presets" / f"{path_or_preset}.yaml"
        if not preset.is_file():
            raise ConfigError(
                f"--config: {path_or_preset!r} is neither a YAML file nor a preset; presets: {', '.join(preset_names())}"
            )
        text = preset.read_text()
        where = f"preset {path_or_preset}"
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {where} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {where} must be a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"--config: {where} has unknown options {unknown}; see `clmae pretrain --help`")
    return values


def make_config(values: dict[str, Any]) -> PretrainConfig:
    """Build and validate a config from a dict (e.g. YAML values overridden by CLI flags)."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown options {unknown}")
    cfg = PretrainConfig(**values)
    for name, f in FIELDS.items():  # coerce YAML ints to floats etc. and reject wrong types
        value = getattr(cfg, name)
        if name == "extra" and not isinstance(value, dict):
            raise ConfigError(f"--extra: got {value!r}, expected a mapping of notes")
        if value is None or name == "extra":
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        try:
            if kind.startswith("float"):
                setattr(cfg, name, float(value))
            elif kind.startswith("int"):
                if isinstance(value, bool) or float(value) != int(value):
                    raise ValueError
                setattr(cfg, name, int(value))
            elif kind.startswith("bool") and not isinstance(value, bool):
                raise ValueError
            elif kind.startswith("str") and not isinstance(value, str):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"--{name.replace('_', '-')}: got {value!r}, expected a value of type {kind}") from None
    return cfg.validate()
