"""Pretraining configuration: one dataclass, validated up front, loadable from YAML or presets.

Each field is a ``clmae pretrain`` flag (``batch_size`` → ``--batch-size``) and carries its help text,
so the CLI, the docs and the error messages read one definition. The config holds what the user
asked for; values resolved at run time (the model chosen for the data, the output folder, the
warmup length) live in :class:`clmae.train.run_folder.RunState`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .maskers import DEFAULT_METHOD, METHODS, option_owners
from .maskers.options import StrategyOptions
from .models.configs import MODEL_CONFIGS
from .options import AUGMENT_ON, DECODE_ON, DEVICE_CHOICES, PRECISIONS, check_option, flag, one_of, opt


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs. CLI flags map 1:1 to these fields (``--batch-size``)."""

    # data
    data: str = opt("digits", "digits (built in), cifar10, a .npz with x_train/y_train, or a folder of images")
    data_dir: str | None = opt(None, "where cifar10 etc. are looked for (default: $CLMAE_DATA, then ./data)")
    subset: int | None = opt(None, "train on the first N images only")
    img_size: int | None = opt(None, "input resolution in px (default: about the data's own, see `clmae models`); "
                                     "given alone, the model and patch size follow it")
    num_workers: int = opt(2, "DataLoader workers per process for image folders and shards; -1: the CPU cores this "
                              "process may use, shared by the ranks on its machine, less one for each training "
                              "process")
    prefetch: int = opt(4, "batches each DataLoader worker keeps decoded ahead (image folders and shards)")
    augment_on: str = opt("workers", "where image folders' and shards' crops are resized: workers (each image in its "
                                     "DataLoader worker) or device (batched on the training device; workers only "
                                     "decode)", choices=AUGMENT_ON)
    threads: int | None = opt(None, "CPU threads of each training process on a CPU run (default: torch's, one per "
                                    "core, lowered to the cores other processes leave free by the 1-minute load "
                                    "average: a busy machine's shared cores slow a run several-fold)")
    decode_on: str = opt("workers", "where image folders' and shards' JPEGs are decoded: workers (Pillow, at the "
                                    "crop's DCT scale) or device (torchvision.io.decode_jpeg in batches, nvJPEG on "
                                    "CUDA, then cropped there; workers only read the files; other formats, CMYK and "
                                    "EXIF-rotated JPEGs stay in the workers)", choices=DECODE_ON)
    # method and model
    method: str = opt(DEFAULT_METHOD, "masking strategy: clmae (learned curriculum masking), mae (random), block "
                                      "(BEiT), hpm (hard patches mining), attmask (attention-guided), colormae "
                                      "(coloured noise), sbam (salience, adaptive ratio) or automae (adversarial "
                                      "mask generator); see `clmae methods`")
    model: str | None = opt(None, "named configuration, see `clmae models` (default: chosen from the data's image "
                                  "size)")
    patch_size: int | None = opt(None, "patch size in px (default: the model's); given alone, the image size is the "
                                       "multiple of it nearest to the data's")
    norm_pix_loss: bool = opt(False, "reconstruct per-patch normalised pixels (MAE option)")
    mask_ratio: float = opt(0.75, "fraction of patches hidden from the encoder, in (0, 1)")
    init_from: str | None = opt(None, "start from an MAE checkpoint (facebookresearch/mae .pth, clmae run, or timm "
                                      "export)")
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
    precision: str = opt("auto", "what training computes in: auto (bf16 on GPUs that have it, fp16 with loss scaling "
                                 "on older GPUs, fp32 on CPU/MPS), fp32, bf16 (also on CPU: slow) or fp16 (loss "
                                 "scaled)", choices=PRECISIONS)
    output_dir: str | None = opt(None, "run folder (default: runs/<method>-<data>-<time>)")
    resume: str | None = opt(None, "continue a run: its folder or checkpoint (alone: the --output-dir's)")
    save_every: int = opt(0, "also keep checkpoint-EPOCH every N epochs")
    log_every: int = opt(10, "iterations between metrics.jsonl lines")
    eval_every: int = opt(0, "quick k-NN evaluation every N epochs (0 = off)")
    max_nonfinite: int = opt(5, "stop after this many non-finite steps in a row")
    compile: bool = opt(False, "torch.compile the model and the masking module")
    # curriculum probe (clmae.viz.probe): difficulty of the learned masks on a fixed batch
    probe_every: int = opt(50, "iterations between curriculum-probe measurements (mask_difficulty etc.; 0 = off)")
    probe_images: int = opt(16, "fixed training images the curriculum probe measures on")
    snapshot_every: int | None = opt(None, "save the probe images' scores and masks every N epochs (0 = off; "
                                           "default: about 10 per run)")
    progress: bool = opt(True, "show a progress bar")
    # The method's own options (clmae.maskers.options; the flags of its group in `clmae pretrain --help`);
    # None: the method's defaults.
    options: StrategyOptions | None = field(default=None, metadata={"help": "the masking strategy's options"})

    def __post_init__(self) -> None:
        if self.options is None and self.method in METHODS:
            self.options = METHODS[self.method].options()

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
        """Every option as one flat mapping of configuration keys (what config.json and checkpoints record)."""
        values = {name: getattr(self, name) for name in FIELDS}
        return {**values, **(self.options.to_values() if self.options is not None else {})}

    def validate(self) -> PretrainConfig:
        """Check every option; the error names the option and its allowed range."""

        def need(cond: bool, option: str, allowed: str) -> None:
            check_option(cond, option, getattr(self, option), allowed)

        need(self.method in METHODS, "method", one_of(METHODS))
        need(self.precision in PRECISIONS, "precision", one_of(PRECISIONS))
        need(0.0 < self.mask_ratio < 1.0, "mask_ratio", "a number strictly between 0 and 1")
        expected = METHODS[self.method].options
        if type(self.options) is not expected:
            raise ConfigError(f"options: --method {self.method} takes {expected.__name__}, got "
                              f"{type(self.options).__name__}")
        self.options.validate()
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
        need(self.num_workers >= -1, "num_workers", "an integer >= 0, or -1 for the cores per rank")
        need(self.prefetch >= 1, "prefetch", "an integer >= 1")
        need(self.augment_on in AUGMENT_ON, "augment_on", one_of(AUGMENT_ON))
        need(self.decode_on in DECODE_ON, "decode_on", one_of(DECODE_ON))
        need(self.threads is None or self.threads >= 1, "threads", "an integer >= 1")
        need(not (self.decode_on == "device" and self.augment_on == "device"), "decode_on",
             "'workers' with --augment-on device (--decode-on device crops on the device already; give one of them)")
        need(self.save_every >= 0, "save_every", "an integer >= 0")
        need(self.log_every >= 1, "log_every", "an integer >= 1")
        need(self.eval_every >= 0, "eval_every", "an integer >= 0")
        need(self.probe_every >= 0, "probe_every", "an integer >= 0")
        need(self.probe_images >= 2, "probe_images", "an integer >= 2")
        need(self.snapshot_interval() >= 0, "snapshot_every", "an integer >= 0")
        need(self.max_nonfinite >= 1, "max_nonfinite", "an integer >= 1")
        return self


# The run-wide options (each a flag); a method's own options are its StrategyOptions fields.
FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig) if f.name != "options"}
CHOICES = {"method": list(METHODS)}


def option_field(key: str, method: str) -> dataclasses.Field | None:
    """The dataclass field behind configuration ``key`` for ``method`` (a run-wide one or the method's own)."""
    if key in FIELDS:
        return FIELDS[key]
    if method in METHODS:
        cls = METHODS[method].options
        name = cls.keys().get(key)
        if name is not None:
            return next(f for f in dataclasses.fields(cls) if f.name == name)
    return None


def config_from_record(values: dict[str, Any]) -> PretrainConfig:
    """The configuration a checkpoint or ``config.json`` recorded, as it ran (not validated again).

    Options it lacks (an older version) take their defaults; options this version does not know and
    options of other methods (an older version recorded every method's) are dropped.
    """
    method = values.get("method", FIELDS["method"].default)
    options = METHODS[method].options.from_values(values) if method in METHODS else None
    return PretrainConfig(**{k: v for k, v in values.items() if k in FIELDS}, options=options)


def known_keys() -> set[str]:
    """Every configuration key some method of this clmae understands (stored records may hold any of them)."""
    return set(FIELDS) | set(option_owners())


def preset_names() -> list[str]:
    folder = resources.files(__package__) / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config_file(path_or_preset: str) -> dict[str, Any]:
    """Read a YAML file of config values, or a shipped preset by name (``clmae pretrain --config cifar10``)."""
    path = Path(path_or_preset)
    if path.is_file():
        text = path.read_text()
        where = str(path)
    else:
        preset = resources.files(__package__) / "presets" / f"{path_or_preset}.yaml"
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
    unknown = sorted(set(values) - known_keys())
    if unknown:
        raise ConfigError(f"--config: {where} has unknown options {unknown}; see `clmae pretrain --help`")
    return values


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """A YAML or keyword value as its field's type (YAML ints to floats, ...); a wrong type names the flag."""
    if value is None:
        return None
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    try:
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("int"):
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            return int(value)
        if kind.startswith("bool") and not isinstance(value, bool):
            raise ValueError
        if kind.startswith("str") and not isinstance(value, str):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{flag(key)}: got {value!r}, expected a value of type {kind}") from None
    return value


def make_config(values: dict[str, Any], defaults: dict[str, Any] | None = None) -> PretrainConfig:
    """Build and validate a config from flat configuration keys (CLI flags, keywords).

    ``defaults`` (a YAML file or preset) fill what ``values`` does not give. An option of another
    method than the one that runs is an error when given (``--lambda-kl applies to --method clmae,
    not mae``) and dropped when it only comes from ``defaults`` (a preset written for another method).
    """
    merged = {**(defaults or {}), **values}
    method = merged.get("method", FIELDS["method"].default)
    owners = option_owners()
    unknown = sorted(set(merged) - set(FIELDS) - set(owners))
    if unknown:
        raise ConfigError(f"unknown options {unknown}; see `clmae pretrain --help`")
    own = set(METHODS[method].options.keys()) if method in METHODS else set()
    for key in values:
        if key in owners and key not in own:
            raise ConfigError(f"{flag(key)} applies to --method {' or '.join(owners[key])}, not {method}")
    dropped = sorted(k for k in merged if k in owners and k not in own)
    if dropped:
        print(f"clmae: note: {', '.join(flag(k) for k in dropped)} from the configuration file apply to another "
              f"method than --method {method}; ignored", file=sys.stderr)
    merged = {k: _coerce(k, v, option_field(k, method)) for k, v in merged.items() if k in FIELDS or k in own}
    if method not in METHODS:
        check_option(False, "method", method, one_of(METHODS))
    options = METHODS[method].options.from_values(merged)
    return PretrainConfig(**{k: v for k, v in merged.items() if k in FIELDS}, options=options).validate()
