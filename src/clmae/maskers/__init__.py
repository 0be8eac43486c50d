"""Masking strategies: which patches the MAE gets to see.

Every masker answers one question, :meth:`Masker.keep_indices`: given the patch tokens of a batch
``(N, L, D)`` and how many to keep ``K``, return the indices ``(N, K)`` of the visible patches.

* ``mae`` → :class:`RandomMasker`: a uniformly random subset per image.
* ``clmae`` → :class:`LearnedMasker`: a small transformer scores every patch; the top-``K`` stay.

:data:`METHODS` is the one list of pretraining methods: config validation, the CLI's choices,
:func:`create_masker`, the study and the docs all read it. The index helpers in
:mod:`clmae.maskers.indices` are pure functions, easy to test and to reuse in new maskers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..options import check_option, one_of
from .base import Masker
from .indices import keep_from_mask, mask_from_keep, random_keep_indices, topk_keep_indices
from .learned import LearnedMasker, MaskingModule
from .random import RandomMasker, global_random_keep


@dataclass(frozen=True)
class Method:
    """A pretraining method: its ``--method`` name, a one-line summary and how to build its masker."""

    name: str
    summary: str
    build: Callable[[Any], Masker]  # model configuration → masker


def _learned(c) -> LearnedMasker:
    return LearnedMasker(c.num_patches, c.embed_dim, c.masker_dim, c.masker_depth, c.masker_num_heads)


METHODS: dict[str, Method] = {
    "clmae": Method("clmae", "CL-MAE: a masking module learns the masks, easy to hard (curriculum)", _learned),
    "mae": Method("mae", "MAE: uniformly random masks", lambda c: RandomMasker()),
}


def create_masker(method: str, model_config) -> Masker:
    """The masker a pretraining method uses (see :data:`METHODS`)."""
    if method not in METHODS:
        check_option(False, "method", method, one_of(METHODS))
    return METHODS[method].build(model_config)


__all__ = ["METHODS", "Method", "Masker", "RandomMasker", "LearnedMasker", "MaskingModule", "create_masker",
           "global_random_keep", "keep_from_mask", "mask_from_keep", "random_keep_indices", "topk_keep_indices"]
