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

:data:`METHODS` is the one list of pretraining methods: config validation, the CLI's choices,
:func:`create_masker`, the study and the docs all read it; :func:`register_method` adds one from
outside the package. The index helpers in :mod:`clmae.maskers.indices` are pure functions, easy to
test and to reuse in new maskers.

This module imports no torch: the registry is read by config validation and the CLI (``--help``
answers at once), and each strategy's module is imported when its masker is built or one of its
names is first used (``from clmae.maskers import LearnedMasker`` works as before, PEP 562).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..lazy import lazy_attributes
from ..options import check_option, one_of
from .choices import ATTMASK_VARIANTS

if TYPE_CHECKING:
    from .attmask import AttentionMasker
    from .base import Masker, MaskingBatch
    from .block import BlockMasker
    from .hpm import HardPatchesMasker
    from .indices import keep_from_mask, mask_from_keep, random_keep_indices, topk_keep_indices
    from .learned import CurriculumObjective, LearnedMasker, MaskingModule
    from .random import RandomMasker


@dataclass(frozen=True)
class Method:
    """A pretraining method: its ``--method`` name, a one-line summary and how to build its masker.

    ``build(run_config, model_config)``: the run's :class:`~clmae.config.PretrainConfig` (None when
    the caller has none: use the strategy's defaults) and the model's
    :class:`~clmae.model.ModelConfig`.
    """

    name: str
    summary: str
    build: Callable[[Any, Any], Masker]


def _options(run, prefix: str, cls: type, shared: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword arguments of ``cls`` that the run configuration sets: ``{prefix}_{name}`` fields (and the
    ``shared`` ones by their own name, e.g. ``epochs``). Anything the run does not set (``run`` None: the
    Python API without a config) keeps the class's default, so each default lives on the class and the
    config field (tests/test_strategies.py checks the two agree)."""
    names = inspect.signature(cls).parameters
    fields = {name: (name if name in shared else f"{prefix}_{name}") for name in names}
    return {name: getattr(run, field) for name, field in fields.items() if hasattr(run, field)}


def _learned(run, c) -> LearnedMasker:
    from .learned import CurriculumObjective, LearnedMasker

    return LearnedMasker(c.num_patches, c.embed_dim, c.masker_dim, c.masker_depth, c.masker_num_heads,
                         CurriculumObjective.from_config(run))


def _random(run, c) -> RandomMasker:
    from .random import RandomMasker

    return RandomMasker()


def _block(run, c) -> BlockMasker:
    from .block import BlockMasker

    return BlockMasker(c.grid_size, **_options(run, "block", BlockMasker))


def _hpm(run, c) -> HardPatchesMasker:
    from .hpm import HardPatchesMasker

    return HardPatchesMasker(c, **_options(run, "hpm", HardPatchesMasker, shared=("epochs",)))


def _attmask(run, c) -> AttentionMasker:
    from .attmask import AttentionMasker

    return AttentionMasker(**_options(run, "attmask", AttentionMasker, shared=("epochs",)))


METHODS: dict[str, Method] = {
    "clmae": Method("clmae", "CL-MAE: a masking module learns the masks, easy to hard (curriculum)", _learned),
    "mae": Method("mae", "MAE: uniformly random masks", _random),
    "block": Method("block", "BEiT block masking: rectangles of patches, at the MAE's mask ratio", _block),
    "hpm": Method("hpm", "HPM: a loss predictor learns which patches are hard; hide those plus random ones", _hpm),
    "attmask": Method("attmask", "AttMask-High: hide the patches an EMA teacher's CLS attends to most", _attmask),
}


def register_method(name: str, summary: str, build: Callable[[Any, Any], Masker]) -> Method:
    """Make a strategy available as ``method=name`` (Python API; the CLI lists the built-in ones)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"method name {name!r}: use letters, digits, '-' and '_'")
    METHODS[name] = Method(name, summary, build)
    return METHODS[name]


def create_masker(method: str, model_config, run_config=None) -> Masker:
    """The masker a pretraining method uses (see :data:`METHODS`); ``run_config`` holds its options."""
    if method not in METHODS:
        check_option(False, "method", method, one_of(METHODS))
    return METHODS[method].build(run_config, model_config)


# Names the package offers from its strategy modules, imported on first use (PEP 562): module of each.
_LAZY = {"Masker": "base", "MaskingBatch": "base", "RandomMasker": "random", "LearnedMasker": "learned",
         "MaskingModule": "learned", "CurriculumObjective": "learned", "BlockMasker": "block",
         "HardPatchesMasker": "hpm", "AttentionMasker": "attmask", "keep_from_mask": "indices",
         "mask_from_keep": "indices", "random_keep_indices": "indices", "topk_keep_indices": "indices"}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


__all__ = ["METHODS", "Method", "Masker", "MaskingBatch", "RandomMasker", "LearnedMasker", "MaskingModule",
           "CurriculumObjective", "BlockMasker", "HardPatchesMasker", "AttentionMasker", "ATTMASK_VARIANTS",
           "create_masker", "register_method", "keep_from_mask", "mask_from_keep", "random_keep_indices",
           "topk_keep_indices"]
