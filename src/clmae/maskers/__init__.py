"""Masking strategies: which patches the MAE gets to see.

Every strategy is a :class:`Masker` (see :mod:`clmae.maskers.base` for the hooks) answering one
question, :meth:`Masker.keep_indices`: given a :class:`MaskingBatch` (images, patch tokens, how many
to keep ``K``, the shared random generator, the position in the run), return the indices ``(N, K)``
of the visible patches.

* ``mae`` → :class:`RandomMasker`: a uniformly random subset per image.
* ``clmae`` → :class:`LearnedMasker`: a small transformer scores every patch; the top-``K`` stay.
* ``block`` → :class:`BlockMasker`: BEiT's blockwise masking at the MAE's ratio.
* ``hpm`` → :class:`HardPatchesMasker`: HPM, predicted-hard patches plus random ones.
* ``attmask`` → :class:`AttentionMasker`: AttMask-High, the most attended patches (EMA teacher).
* ``colormae`` → :class:`ColorNoiseMasker`: ColorMAE, windows of filtered (coloured) noise, image-independent.
* ``sbam`` → :class:`SalienceMasker`: SBAM, the salient patches plus noise, at an adaptive ratio.
* ``automae`` → :class:`AutomaeMasker`: AutoMAE, an adversarially shaped Gumbel-softmax mask generator.

:data:`METHODS` is the one list of pretraining methods: config validation, the CLI's choices,
:func:`create_masker`, the study and the docs all read it; :func:`register_method` adds one from
outside the package. The index helpers in :mod:`clmae.maskers.indices` are pure functions, easy to
test and to reuse in new maskers.

This module imports no torch: the registry is read by config validation and the CLI (``--help``
answers at once), and each strategy's module is imported when its masker is built or one of its
names is first used (``from clmae.maskers import LearnedMasker`` works as before, PEP 562).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..lazy import lazy_attributes
from ..options import check_option, one_of
from .options import (
    AttmaskOptions,
    AutomaeOptions,
    BlockOptions,
    ClmaeOptions,
    ColormaeOptions,
    HpmOptions,
    SbamOptions,
    StrategyOptions,
)

if TYPE_CHECKING:
    from .attmask import AttentionMasker
    from .automae import AutomaeMasker
    from .base import Masker, MaskingBatch
    from .block import BlockMasker
    from .clmae import LearnedMasker, MaskingModule
    from .colormae import ColorNoiseMasker
    from .hpm import HardPatchesMasker
    from .indices import keep_from_mask, mask_from_keep, random_keep_indices, topk_keep_indices
    from .random import RandomMasker
    from .sbam import SalienceMasker


@dataclass(frozen=True)
class Method:
    """A pretraining method: its ``--method`` name, a one-line summary, its options and how to build its masker.

    ``build(options, model_config, run_config)``: an instance of ``options`` (the method's
    :class:`~clmae.maskers.options.StrategyOptions`), the model's :class:`~clmae.models.configs.ModelConfig`
    and the run's :class:`~clmae.config.PretrainConfig` (None from the Python API without one: the
    run-wide settings then take their defaults). ``cost``: what the strategy adds to MAE's training
    compute, as ``clmae methods`` lists it (measured in benchmarks/throughput.py).
    """

    name: str
    summary: str
    build: Callable[[Any, Any, Any], Masker]
    options: type[StrategyOptions] = StrategyOptions
    cost: str = ""


def _epochs(run) -> int:
    return 30 if run is None else run.epochs  # PretrainConfig's default


def _learned(options: ClmaeOptions, c, run) -> LearnedMasker:
    from .clmae import LearnedMasker

    return LearnedMasker(c.num_patches, c.embed_dim, c.masker_dim, c.masker_depth, c.masker_num_heads, options,
                         epochs=_epochs(run), mask_ratio=0.75 if run is None else run.mask_ratio)


def _random(options, c, run) -> RandomMasker:
    from .random import RandomMasker

    return RandomMasker()


def _block(options: BlockOptions, c, run) -> BlockMasker:
    from .block import BlockMasker

    return BlockMasker(c.grid_size, options)


def _hpm(options: HpmOptions, c, run) -> HardPatchesMasker:
    from .hpm import HardPatchesMasker

    return HardPatchesMasker(c, _epochs(run), options)


def _attmask(options: AttmaskOptions, c, run) -> AttentionMasker:
    from .attmask import AttentionMasker

    return AttentionMasker(_epochs(run), options)


def _colormae(options: ColormaeOptions, c, run) -> ColorNoiseMasker:
    from .colormae import ColorNoiseMasker

    return ColorNoiseMasker(c.grid_size, options, seed=0 if run is None else run.seed)


def _sbam(options: SbamOptions, c, run) -> SalienceMasker:
    from .sbam import SalienceMasker

    return SalienceMasker(c.num_patches, 0.75 if run is None else run.mask_ratio, options)


def _automae(options: AutomaeOptions, c, run) -> AutomaeMasker:
    from .automae import AutomaeMasker

    return AutomaeMasker(c, _epochs(run), options)


METHODS: dict[str, Method] = {
    "clmae": Method("clmae", "CL-MAE: a masking module learns the masks, easy to hard (curriculum)", _learned,
                    ClmaeOptions, "4.5x (a masking-module step through the whole MAE every iteration)"),
    "mae": Method("mae", "MAE: uniformly random masks", _random, StrategyOptions, "1x"),
    "block": Method("block", "BEiT block masking: rectangles of patches, at the MAE's mask ratio", _block,
                    BlockOptions, "1.0x"),
    "hpm": Method("hpm", "HPM: a loss predictor learns which patches are hard; hide those plus random ones", _hpm,
                  HpmOptions, "2.3x (loss predictor; an EMA model scores whole images)"),
    "attmask": Method("attmask", "AttMask-High: hide the patches an EMA teacher's CLS attends to most", _attmask,
                      AttmaskOptions, "1.8x (an EMA teacher reads whole images)"),
    "colormae": Method("colormae", "ColorMAE: masks cut from filtered (coloured) noise, the same for any image",
                       _colormae, ColormaeOptions, "1.0x (no network: a window of noise per image)"),
    "sbam": Method("sbam", "SBAM: hide the salient patches (patch-embedding affinity) plus noise, at an adaptive "
                           "ratio", _sbam, SbamOptions,
                   "0.96-1.25x (the adaptive ratio, 0.65-0.85, sets how many patches the encoder reads: 1.25x on "
                   "CIFAR-10 at the start, 0.96x on random images; the patch affinity itself ~0.5%)"),
    "automae": Method("automae", "AutoMAE: a Gumbel-softmax mask generator on attention maps, shaped by a "
                                 "discriminator", _automae, AutomaeOptions,
                      "1.8x (an EMA encoder reads whole images; generator and discriminator are tiny)"),
}


DEFAULT_METHOD = "clmae"  # the faithful CL-MAE: what `clmae pretrain` runs without --method
REFERENCE_METHOD = "mae"  # plain MAE: what every cost is relative to


def register_method(name: str, summary: str, build: Callable[[Any, Any, Any], Masker],
                    options: type[StrategyOptions] = StrategyOptions, cost: str = "") -> Method:
    """Make a strategy available as ``method=name`` (Python API; the CLI lists the built-in ones).

    ``build(options, model_config, run_config)`` returns the masker; ``options`` is its option
    dataclass (a :class:`~clmae.maskers.options.StrategyOptions` subclass; none by default).
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"method name {name!r}: use letters, digits, '-' and '_'")
    METHODS[name] = Method(name, summary, build, options, cost)
    return METHODS[name]


def option_owners() -> dict[str, list[str]]:
    """``{configuration key: methods that take it}`` over every registered method's options."""
    owners: dict[str, list[str]] = {}
    for method in METHODS.values():
        for key in method.options.keys():
            owners.setdefault(key, []).append(method.name)
    return owners


def create_masker(method: str, model_config, run_config=None, options: StrategyOptions | None = None) -> Masker:
    """The masker of a pretraining method (see :data:`METHODS`), with ``options`` (default: the run's, else
    the method's defaults)."""
    if method not in METHODS:
        check_option(False, "method", method, one_of(METHODS))
    entry = METHODS[method]
    if options is None:
        options = run_config.options if run_config is not None and run_config.options is not None else entry.options()
    return entry.build(options, model_config, run_config)


# Names the package offers from its strategy modules, imported on first use (PEP 562): module of each.
_LAZY = {"Masker": "base", "MaskingBatch": "base", "RandomMasker": "random", "LearnedMasker": "clmae",
         "MaskingModule": "clmae", "BlockMasker": "block",
         "HardPatchesMasker": "hpm", "AttentionMasker": "attmask", "ColorNoiseMasker": "colormae",
         "SalienceMasker": "sbam", "AutomaeMasker": "automae", "keep_from_mask": "indices",
         "mask_from_keep": "indices", "random_keep_indices": "indices", "topk_keep_indices": "indices"}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


__all__ = ["METHODS", "DEFAULT_METHOD", "REFERENCE_METHOD", "Method", "Masker", "MaskingBatch", "RandomMasker",
           "LearnedMasker",
           "MaskingModule",
           "BlockMasker", "HardPatchesMasker", "AttentionMasker", "ColorNoiseMasker", "SalienceMasker", "AutomaeMasker",
           "StrategyOptions", "ClmaeOptions", "BlockOptions", "HpmOptions", "AttmaskOptions", "ColormaeOptions",
           "SbamOptions", "AutomaeOptions", "option_owners",
           "create_masker", "register_method", "keep_from_mask", "mask_from_keep", "random_keep_indices",
           "topk_keep_indices"]
