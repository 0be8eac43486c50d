"""Pretraining configuration: one dataclass, validated up front, loadable from YAML or presets.

Each field is a ``clmae pretrain`` flag (``batch_size`` → ``--batch-size``) and carries its help text,
so the CLI, the docs and the error messages read one definition. The config holds what the user
asked for; values resolved at run time (the model chosen for the data, the output folder, the
warmup length) live in :class:`clmae.run_folder.RunState`.
"""

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
from .maskers import ATTMASK_VARIANTS, METHODS
from .model_configs import MODEL_CONFIGS
from .options import DEVICE_CHOICES, check_option, flag, one_of, opt

KL_REDUCTIONS = ("sum", "mean")


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs. CLI flags map 1:1 to these fields (``--batch-size``)."""

    # data
    data: str = opt("digits", "digits (built in), cifar10, a .npz with x_train/y_train, or a folder of images")
    data_dir: str | None = opt(None, "where cifar10 etc. are looked for (default: $CLMAE_DATA, then ./data)")
    subset: int | None = opt(None, "train on the first N images only")
    img_size: int | None = opt(None, "input resolution in px (default: about the data's own, see `clmae models`); "
                                     "given alone, the model and patch size follow it")
    num_workers: int = opt(2, "DataLoader workers for image folders")
    # method and model
    method: str = opt("clmae", "masking strategy: clmae (learned curriculum masking), mae (random), block (BEiT), "
                               "hpm (hard patches mining) or attmask (attention-guided); see `clmae methods`")
    model: str | None = opt(None, "named configuration, see `clmae models` (default: chosen from the data's image "
                                  "size)")
    patch_size: int | None = opt(None, "patch size in px (default: the model's); given alone, the image size is the "
                                       "multiple of it nearest to the data's")
    norm_pix_loss: bool = opt(False, "reconstruct per-patch normalised pixels (MAE option)")
    mask_ratio: float = opt(0.75, "fraction of patches hidden from the encoder, in (0, 1)")
    init_from: str | None = opt(None, "start from an MAE checkpoint (facebookresearch/mae .pth, clmae run, or timm "
                                      "export)")
    # CL-MAE masking module
    curriculum: str = opt("official", "λ schedule: official (per epoch, +1→−1), linear (per step), constant, "
                                      "partner, neutral, adversary")
    curriculum_value: float = opt(1.0, "λ for --curriculum constant")
    lambda_gauss: float = opt(1.0, "weight of the binarization (Gaussian) loss")
    lambda_kl: float = opt(0.1, "weight of the mask-ratio KL loss")
    lambda_div: float = opt(2.0, "weight of the diversity loss")
    kl_reduction: str = opt("sum", "sum (authors') or mean of the KL loss over the batch")
    masker_every: int = opt(1, "update the masking module every K iterations (1 = authors')")
    masker_batch_fraction: float = opt(1.0, "masking-module step on this random fraction of the batch (1 = authors')")
    # block masking (BEiT), --method block
    block_min_patches: int | None = opt(None, "smallest block, in patches (default (grid//3)², BEiT's 16 on 14x14)")
    block_max_patches: int | None = opt(None, "largest block, in patches (default: no limit, BEiT's)")
    block_min_aspect: float = opt(0.3, "blocks' aspect ratios lie between this and its inverse (BEiT's 0.3)")
    # HPM, --method hpm
    hpm_hard_max: float = opt(0.5, "share of the hidden patches chosen by predicted loss in the last epoch; it grows "
                                   "linearly from 0 (HPM's 0.5)")
    hpm_loss_weight: float = opt(1.0, "weight of the loss predictor's ranking loss in the MAE step (HPM's 1)")
    hpm_ema_decay: float = opt(0.999, "EMA decay of the model that chooses the masks, at the start (HPM's 0.999)")
    hpm_ema_decay_end: float = opt(0.9999, "EMA decay reached after --hpm-ema-ramp-epochs (HPM's 0.9999)")
    hpm_ema_ramp_epochs: float = opt(100.0, "epochs over which the EMA decay rises (HPM's 100, however long the run; "
                                            "set it to --epochs to scale it to the run, 0: the end value throughout)")
    # AttMask, --method attmask
    attmask_prob: float = opt(0.5, "share of the images masked by the teacher's attention; the others get random "
                                   "masks (AttMask's 0.5)")
    attmask_momentum: float = opt(0.996, "teacher (EMA encoder) momentum at the start, rising to 1 on a cosine "
                                         "(AttMask's 0.996)")
    attmask_variant: str = opt("high", "high: hide the most attended patches (AttMask's); low: the least attended")
    # optimisation
    epochs: int = opt(30, "training epochs")
    batch_size: int = opt(64, "images per iteration (per device)")
    accum_iter: int = opt(1, "gradient accumulation iterations")
    base_lr: float = opt(1e-3, "lr = base_lr × effective batch / 256")
    lr: float | None = opt(None, "absolute learning rate (overrides --base-lr)")
    min_lr: float = opt(0.0, "lowest learning rate of the cosine schedule")
    warmup_epochs: float | None = opt(None, "linear warmup epochs")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on biases, norms, tokens)")
    # run
    seed: int = opt(0, "random seed")
    device: str = opt("auto", DEVICE_CHOICES)
    output_dir: str | None = opt(None, "run folder (default: runs/<method>-<data>-<time>)")
    resume: str | None = opt(None, "continue a run: its folder or checkpoint (alone: the --output-dir's)")
    save_every: int = opt(0, "also keep checkpoint-EPOCH every N epochs")
    log_every: int = opt(10, "iterations between metrics.jsonl lines")
    eval_every: int = opt(0, "quick k-NN evaluation every N epochs (0 = off)")
    max_nonfinite: int = opt(5, "stop after this many non-finite steps in a row")
    compile: bool = opt(False, "torch.compile the model and the masking module")
    # curriculum probe (clmae.probe): difficulty of the learned masks on a fixed batch
    probe_every: int = opt(50, "iterations between curriculum-probe measurements (mask_difficulty etc.; 0 = off)")
    probe_images: int = opt(16, "fixed training images the curriculum probe measures on")
    snapshot_every: int | None = opt(None, "save the probe images' scores and masks every N epochs (0 = off; "
                                           "default: about 10 per run)")
    progress: bool = opt(True, "show a progress bar")
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes stored with the run

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.accum_iter

    def absolute_lr(self, world_size: int = 1) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.effective_batch_size * world_size / 256

    def warmup(self) -> float:
        """Warmup epochs: ``--warmup-epochs``, by default a tenth of ``--epochs``."""
        return round(0.1 * self.epochs, 3) if self.warmup_epochs is None else self.warmup_epochs

    def snapshot_interval(self) -> int:
        """Epochs between probe snapshots: ``--snapshot-every``, by default about ten per run."""
        return max(1, math.ceil(self.epochs / 10)) if self.snapshot_every is None else self.snapshot_every

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> PretrainConfig:
        """Check every option; the error names the option and its allowed range."""

        def need(cond: bool, option: str, allowed: str) -> None:
            check_option(cond, option, getattr(self, option), allowed)

        need(self.method in METHODS, "method", one_of(METHODS))
        need(0.0 < self.mask_ratio < 1.0, "mask_ratio", "a number strictly between 0 and 1")
        need(self.curriculum in SCHEDULES, "curriculum", "one of " + ", ".join(SCHEDULES))
        need(math.isfinite(self.curriculum_value), "curriculum_value", "a finite number")
        for name in ("lambda_gauss", "lambda_kl", "lambda_div"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "a finite number >= 0")
        need(self.kl_reduction in KL_REDUCTIONS, "kl_reduction", "'sum' or 'mean'")
        need(self.masker_every >= 1, "masker_every", "an integer >= 1")
        need(0.0 < self.masker_batch_fraction <= 1.0, "masker_batch_fraction", "a number in (0, 1]")
        need(self.block_min_patches is None or self.block_min_patches >= 1, "block_min_patches", "an integer >= 1")
        need(self.block_max_patches is None or self.block_max_patches >= (self.block_min_patches or 1),
             "block_max_patches", "an integer >= --block-min-patches (and >= 1)")
        need(0.0 < self.block_min_aspect <= 1.0, "block_min_aspect", "a number in (0, 1]")
        need(0.0 <= self.hpm_hard_max <= 1.0, "hpm_hard_max", "a number in [0, 1]")
        need(math.isfinite(self.hpm_loss_weight) and self.hpm_loss_weight >= 0, "hpm_loss_weight",
             "a finite number >= 0")
        for name in ("hpm_ema_decay", "hpm_ema_decay_end", "attmask_momentum"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "a number in [0, 1]")
        need(math.isfinite(self.hpm_ema_ramp_epochs) and self.hpm_ema_ramp_epochs >= 0, "hpm_ema_ramp_epochs",
             "a finite number >= 0")
        need(0.0 <= self.attmask_prob <= 1.0, "attmask_prob", "a number in [0, 1]")
        need(self.attmask_variant in ATTMASK_VARIANTS, "attmask_variant", one_of(ATTMASK_VARIANTS))
        need(self.epochs >= 1, "epochs", "an integer >= 1")
        need(self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.accum_iter >= 1, "accum_iter", "an integer >= 1")
        need(math.isfinite(self.base_lr) and self.base_lr > 0, "base_lr", "a finite positive number")
        need(self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "lr", "a finite positive number")
        need(math.isfinite(self.min_lr) and self.min_lr >= 0, "min_lr", "a finite number >= 0")
        need(0 <= self.warmup() <= self.epochs, "warmup_epochs", f"a number between 0 and --epochs ({self.epochs})")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0")
        need(0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)")
        need(self.model is None or self.model in MODEL_CONFIGS, "model", "one of " + ", ".join(sorted(MODEL_CONFIGS)))
        need(self.subset is None or self.subset >= 1, "subset", "an integer >= 1")
        need(self.img_size is None or self.img_size >= 1, "img_size", "a positive integer")
        need(self.patch_size is None or self.patch_size >= 1, "patch_size", "a positive integer")
        need(self.num_workers >= 0, "num_workers", "an integer >= 0")
        need(self.save_every >= 0, "save_every", "an integer >= 0")
        need(self.log_every >= 1, "log_every", "an integer >= 1")
        need(self.eval_every >= 0, "eval_every", "an integer >= 0")
        need(self.probe_every >= 0, "probe_every", "an integer >= 0")
        need(self.probe_images >= 2, "probe_images", "an integer >= 2")
        need(self.snapshot_interval() >= 0, "snapshot_every", "an integer >= 0")
        need(self.max_nonfinite >= 1, "max_nonfinite", "an integer >= 1")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}
CHOICES = {"method": list(METHODS), "curriculum": list(SCHEDULES), "kl_reduction": list(KL_REDUCTIONS),
           "attmask_variant": list(ATTMASK_VARIANTS)}


def config_from_record(values: dict[str, Any]) -> PretrainConfig:
    """The configuration a checkpoint or ``config.json`` recorded, as it ran (not validated again).

    Options it lacks (an older version) take their defaults; options this version does not know
    are dropped.
    """
    return PretrainConfig(**{k: v for k, v in values.items() if k in FIELDS})


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
                f"--config: {path_or_preset!r} is neither a YAML file nor a preset; "
                f"presets: {', '.join(preset_names())}"
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
            raise ConfigError(f"{flag(name)}: got {value!r}, expected a value of type {kind}") from None
    return cfg.validate()
