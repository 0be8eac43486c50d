"""The named model configurations and the rule that picks one for the data: plain Python, no torch.

:class:`ModelConfig` describes the autoencoder and the CL-MAE masking module; :data:`MODEL_CONFIGS`
names the configurations (``--model``, ``clmae models``); :func:`resolve_model` gives a run its model,
image size and patch size, by the rule in :func:`default_model_for` when no ``--model`` is given; and
:func:`param_count` counts parameters without building a model. They live apart from the network
(:mod:`clmae.models.mae`, which re-exports them) so the configuration and the command line can check and
list models without importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class ModelConfig:
    """Architecture of the autoencoder and of the masking module (CL-MAE only)."""

    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    decoder_embed_dim: int = 128
    decoder_depth: int = 4
    decoder_num_heads: int = 4
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = False
    # Masking module (CL-MAE). ``masker_dim=None`` means "same width as the encoder" (the authors').
    masker_dim: int | None = None
    masker_depth: int = 5
    masker_num_heads: int = 4
    # The patch grid the fixed sin-cos position embeddings were made for; ``None``: this config's own
    # grid. Another grid (a model run at a resolution it was not pretrained at) gets them resampled.
    pos_embed_grid: int | None = None

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    def validate(self) -> None:
        def need(cond: bool, option: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{option}: {msg}")

        need(self.img_size > 0, "img_size", f"must be positive, got {self.img_size}")
        need(self.patch_size > 0, "patch_size", f"must be positive, got {self.patch_size}")
        need(
            self.img_size % self.patch_size == 0,
            "img_size",
            f"image size {self.img_size} is not divisible by patch size {self.patch_size}; "
            f"choose --img-size as a multiple of {self.patch_size} or another --patch-size",
        )
        need(self.in_chans in (1, 3), "in_chans", f"must be 1 or 3, got {self.in_chans}")
        for name in ("embed_dim", "decoder_embed_dim"):
            need(getattr(self, name) > 0, name, "must be positive")
        need(self.embed_dim % self.num_heads == 0, "num_heads", "must divide embed_dim")
        need(
            self.decoder_embed_dim % self.decoder_num_heads == 0,
            "decoder_num_heads",
            "must divide decoder_embed_dim",
        )
        width = self.masker_dim or self.embed_dim
        need(width % self.masker_num_heads == 0, "masker_num_heads", "must divide the masker width")
        need(self.depth >= 1 and self.masker_depth >= 1, "depth", "must be at least 1")
        need(self.pos_embed_grid is None or self.pos_embed_grid >= 1, "pos_embed_grid", "must be at least 1")


# Registry of named configurations. Decoders of the ImageNet models follow the paper (512 wide,
# 8 deep, 16 heads); the small ones are ours, sized for CPU runs on small images.
def _tiny(img_size: int, patch_size: int) -> ModelConfig:
    """The ViT-Ti encoder (192 wide, 12 deep, 3 heads) with a 128-wide, 4-deep decoder."""
    return ModelConfig(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=192, depth=12, num_heads=3,
                       decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4)


MODEL_CONFIGS: dict[str, ModelConfig] = {
    "vit_micro_patch2_8": ModelConfig(
        img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, masker_depth=2,
    ),
    # A CPU-sized model on the tiny model's grid (studies and benchmarks on 2 cores).
    "vit_mini_patch4_32": ModelConfig(
        img_size=32, patch_size=4, in_chans=3, embed_dim=128, depth=6, num_heads=4,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, masker_depth=2,
    ),
    # ViT-Ti for small images: a patch size that gives a grid of about 8x8 at the size in the name.
    "vit_tiny_patch2_16": _tiny(16, 2),
    "vit_tiny_patch4_28": _tiny(28, 4),
    "vit_tiny_patch4_32": _tiny(32, 4),
    "vit_tiny_patch8_64": _tiny(64, 8),
    "vit_tiny_patch12_96": _tiny(96, 12),
    "vit_tiny_patch16_128": _tiny(128, 16),
    "vit_base_patch16_224": ModelConfig(
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
    ),
    "vit_large_patch16_224": ModelConfig(
        img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
    ),
    "vit_huge_patch14_224": ModelConfig(
        img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
    ),
}


# ---------------------------------------------------------------------------------------------
# The default model: chosen from the data's native size (shorter side, px) and channels.
#
# Small images train at about their own size, with a patch size that gives a grid of 6 to 12
# patches a side; from about 160 px on, images get the ImageNet model at 224 px. Each band:
# (smallest native size, largest native size, model). The image size is the multiple of the
# model's patch size nearest to the native size (never below the model's minimum grid).

DEFAULT_BANDS: tuple[tuple[int, int | None, str], ...] = (
    (1, 11, "vit_micro_patch2_8"),
    (12, 23, "vit_tiny_patch2_16"),
    (24, 29, "vit_tiny_patch4_28"),
    (30, 47, "vit_tiny_patch4_32"),
    (48, 79, "vit_tiny_patch8_64"),
    (80, 127, "vit_tiny_patch12_96"),
    (128, 159, "vit_tiny_patch16_128"),
    (160, None, "vit_base_patch16_224"),
)
LARGE_FROM = 160  # native size from which images are resized to the ImageNet models' 224 px
MIN_GRID = 2  # patches a side; below this a mask cannot hide some patches and show others
# Sizes each model suits, for `clmae models` (the default bands, plus the models no band picks).
SUITS: dict[str, tuple[int, int | None]] = {
    **{name: (lo, hi) for lo, hi, name in DEFAULT_BANDS},
    "vit_mini_patch4_32": (30, 47),
    "vit_large_patch16_224": (LARGE_FROM, None),
    "vit_huge_patch14_224": (LARGE_FROM, None),
}
# Runs recorded before the model was stored in the run config used these (evaluation of old runs).
LEGACY_DEFAULTS = {"digits": "vit_micro_patch2_8", "cifar10": "vit_tiny_patch4_32"}
LEGACY_FALLBACK = "vit_base_patch16_224"


@dataclass(frozen=True)
class ModelChoice:
    """A named model at an image and patch size, and why (for the run's header line)."""

    name: str
    img_size: int
    patch_size: int
    reason: str

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


def _nearest_multiple(size: float, step: int, min_grid: int = MIN_GRID) -> int:
    """The multiple of ``step`` nearest to ``size`` (halves round up), at least ``min_grid`` steps."""
    return step * max(min_grid, int(size / step + 0.5))


def default_model_for(native_size: int, channels: int) -> ModelChoice:
    """The model for data of ``native_size`` px (shorter side) and ``channels``: the pure default rule.

    28 px → vit_tiny_patch4_28 at 28 (7x7 patches of 4 px); 32 → vit_tiny_patch4_32; 50 → vit_tiny_patch8_64
    at 48; from 160 px on → vit_base_patch16_224 at 224. ``channels`` (1 or 3) never changes the name:
    the chosen model takes the data's channels.
    """
    if native_size < 1:
        raise ConfigError(f"image size must be positive, got {native_size}")
    if channels not in (1, 3):
        raise ConfigError(f"images must have 1 or 3 channels, got {channels}")
    name = next(n for lo, hi, n in DEFAULT_BANDS if native_size >= lo and (hi is None or native_size <= hi))
    base = MODEL_CONFIGS[name]
    if native_size >= LARGE_FROM:
        return ModelChoice(name, base.img_size, base.patch_size,
                           f"the data is {native_size} px: large images train at {base.img_size} px")
    # About the native size; the micro model keeps at least its 4x4 grid (8 px), the others 6x6.
    min_grid = base.grid_size if native_size < 12 else 6
    img = _nearest_multiple(native_size, base.patch_size, min_grid=min_grid)
    if img == native_size:
        why = "native size of the data"
    elif img == _nearest_multiple(native_size, base.patch_size, min_grid=1):
        why = f"the multiple of {base.patch_size} px patches nearest to the data's {native_size} px"
    else:  # the data is smaller than the model's smallest grid: upscaled to it
        why = (f"the data's {native_size} px upscaled to the smallest size of this model, {min_grid}x{min_grid} "
               f"patches of {base.patch_size} px")
    return ModelChoice(name, img, base.patch_size, why)


def default_model(data: str) -> str:
    """The model a run recorded without a ``model`` (older clmae versions) was trained with."""
    return LEGACY_DEFAULTS.get(data, LEGACY_FALLBACK)


def _patch_for(img_size: int, preferred: int) -> int | None:
    """``preferred`` when it divides ``img_size``, else the divisor giving a grid nearest to 8 a side (4..16)."""
    if img_size % preferred == 0 and img_size // preferred >= MIN_GRID:
        return preferred
    divisors = [p for p in range(1, img_size + 1) if img_size % p == 0 and 4 <= img_size // p <= 16]
    return min(divisors, key=lambda p: (abs(img_size // p - 8), -p)) if divisors else None


def resolve_model(model: str | None, img_size: int | None, patch_size: int | None, native_size: int | None,
                  channels: int, native_note: str = "") -> ModelChoice:
    """The model, image size and patch size a run trains with, from the options and the data.

    * nothing given: :func:`default_model_for` the native size;
    * ``--img-size`` alone: the model for that size, with a patch size that divides it;
    * ``--patch-size`` alone: the image size nearest to the native size (or the chosen model's) that it divides;
    * ``--model``: its own sizes, or ``--img-size`` / ``--patch-size`` (alone, the other follows).

    Every size error names the sizes in play: the data's, the image size and the patch size.
    ``native_size`` is None when the data was not scanned (tar shards); ``native_note`` says how it was measured.
    """
    note = f" ({native_note})" if native_note else ""
    data_says = f"the data is {native_size} px{note}" if native_size else f"the data's size is unknown{note}"
    if model is not None and model not in MODEL_CONFIGS:
        raise ConfigError(f"--model: got {model!r}, expected one of {', '.join(list_models())}")
    for option, value in (("--img-size", img_size), ("--patch-size", patch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{option}: got {value}, expected a positive integer")
    if model is None and img_size is None and patch_size is None:
        if native_size is None:
            base = MODEL_CONFIGS[LEGACY_FALLBACK]
            return ModelChoice(LEGACY_FALLBACK, base.img_size, base.patch_size, f"{data_says}: the ImageNet model")
        return default_model_for(native_size, channels)

    if model is None:  # the model for the size the images will have
        small_native = native_size is not None and native_size < LARGE_FROM
        if img_size is not None:
            chosen = default_model_for(img_size, channels)
        elif native_size is not None:
            chosen = default_model_for(native_size, channels)
        else:
            base = MODEL_CONFIGS[LEGACY_FALLBACK]
            chosen = ModelChoice(LEGACY_FALLBACK, base.img_size, base.patch_size, "")
        name, target = chosen.name, (native_size if small_native else chosen.img_size)
    else:
        base = MODEL_CONFIGS[model]
        chosen = ModelChoice(model, base.img_size, base.patch_size, "--model")
        name, target = model, base.img_size
    given = ", ".join(f"{flag} {v}" for flag, v in (("--model", model), ("--img-size", img_size),
                                                    ("--patch-size", patch_size)) if v is not None)
    why = given
    if img_size is not None and patch_size is None:
        img = img_size
        patch = _patch_for(img_size, chosen.patch_size) if model is None else chosen.patch_size
        if patch is None:
            raise ConfigError(f"--img-size {img_size}: no patch size divides it into a grid of 4 to 16 patches a side "
                              f"({data_says}); choose --img-size as a multiple of 4 or 8, or give --patch-size too")
        if patch != chosen.patch_size:
            why += f"; {patch} px patches divide it"
    elif patch_size is not None and img_size is None:
        patch = patch_size
        img = target if target % patch_size == 0 and target // patch_size >= MIN_GRID else (
            _nearest_multiple(target, patch_size))
        if img != target:
            why += f"; the multiple of it nearest to {target} px"
    else:
        img, patch = (img_size or chosen.img_size), (patch_size or chosen.patch_size)
    if img % patch:
        good = [p for p in range(1, img + 1) if img % p == 0 and img // p >= MIN_GRID][:8]
        raise ConfigError(
            f"--img-size/--patch-size: image size {img} is not divisible by patch size {patch} ({data_says}); "
            f"choose --img-size as a multiple of {patch} (e.g. {_nearest_multiple(img, patch)}) or a --patch-size "
            f"that divides {img} ({', '.join(map(str, good))})"
        )
    if img // patch < MIN_GRID:
        raise ConfigError(
            f"--img-size/--patch-size: patch size {patch} leaves a {img // patch}x{img // patch} grid at image size "
            f"{img} ({data_says}); masking needs at least {MIN_GRID}x{MIN_GRID} patches: choose a smaller "
            "--patch-size or a larger --img-size"
        )
    return ModelChoice(name, img, patch, why)


def param_count(cfg: ModelConfig) -> tuple[int, int]:
    """``(encoder, decoder)`` parameters of the autoencoder (:mod:`clmae.models.mae`) for ``cfg``, by formula."""

    def blocks(dim: int, depth: int) -> int:
        hidden = int(dim * cfg.mlp_ratio)
        return depth * (4 * dim * dim + 2 * dim * hidden + 9 * dim + hidden)  # qkv, proj, fc1, fc2, 2 norms

    d, dd, pix = cfg.embed_dim, cfg.decoder_embed_dim, cfg.patch_dim
    encoder = pix * d + d + d + blocks(d, cfg.depth) + 2 * d  # patch projection, CLS, blocks, norm
    decoder = d * dd + dd + dd + blocks(dd, cfg.decoder_depth) + 2 * dd + dd * pix + pix  # embed, mask token, …
    return encoder, decoder


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


def model_config(name: str, **overrides) -> ModelConfig:
    """The named configuration with ``overrides`` (e.g. ``img_size``, ``in_chans``) applied."""
    if name not in MODEL_CONFIGS:
        raise ConfigError(f"model: unknown model {name!r}; choose one of {', '.join(list_models())}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"model: unknown model options {sorted(unknown)}")
    cfg = dataclasses.replace(MODEL_CONFIGS[name], **overrides)
    cfg.validate()
    return cfg
