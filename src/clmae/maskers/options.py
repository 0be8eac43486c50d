"""Each masking strategy's options: one dataclass per strategy, its defaults and its checks, no torch.

A strategy's flags are its dataclass's fields with the class's ``prefix`` (``BlockOptions.min_patches``
is ``--block-min-patches``; CL-MAE's have no prefix, as in the paper: ``--lambda-kl``). The
registry (:mod:`clmae.maskers`) names each method's class, the command line groups the flags by
method, and :func:`clmae.config.make_config` refuses a flag of a method that is not running. These
classes live apart from the strategies' modules so that ``--help`` and the configuration's checks
answer without importing torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..options import check_option, one_of, opt

CURRICULA = ("official", "linear", "constant", "partner", "neutral", "adversary")  # --curriculum (λ schedules)
KL_REDUCTIONS = ("sum", "mean")
SOFT_PATHS = ("scale", "hide")  # --soft-path: how a score hides a patch in the masking module's step
ATTMASK_VARIANTS = ("high", "low")  # --attmask-variant: hide the most (AttMask-High) or the least attended patches


@dataclass
class StrategyOptions:
    """Base of the option classes: flag names and per-field checks."""

    prefix: ClassVar[str] = ""

    @classmethod
    def keys(cls) -> dict[str, str]:
        """``{configuration key: field name}``, e.g. ``{"block_min_patches": "min_patches"}``."""
        return {cls.prefix + f.name: f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> StrategyOptions:
        """The options set in ``values`` (configuration keys); the rest keep their defaults."""
        return cls(**{name: values[key] for key, name in cls.keys().items() if key in values})

    def to_values(self) -> dict[str, Any]:
        """The options as configuration keys (what config.json and checkpoints record)."""
        return {key: getattr(self, name) for key, name in self.keys().items()}

    def need(self, cond: bool, name: str, allowed: str) -> None:
        check_option(cond, self.prefix + name, getattr(self, name), allowed)

    def validate(self) -> StrategyOptions:
        return self


@dataclass
class ClmaeOptions(StrategyOptions):
    """CL-MAE's masking module: its loss weights, the λ schedule and what its step costs."""

    curriculum: str = opt("official", "λ schedule: official (per epoch, +1→−1), linear (per step), constant, "
                                      "partner, neutral, adversary", CURRICULA)
    curriculum_value: float = opt(1.0, "λ for --curriculum constant")
    lambda_gauss: float = opt(1.0, "weight of the binarization (Gaussian) loss")
    lambda_kl: float = opt(0.1, "weight of the mask-ratio KL loss")
    lambda_div: float = opt(2.0, "weight of the diversity loss")
    kl_reduction: str = opt("sum", "sum (authors') or mean of the KL loss over the batch", KL_REDUCTIONS)
    masker_every: int = opt(1, "masking-module step every K iterations (optimiser steps; 1 = authors')")
    masker_batch_fraction: float = opt(1.0, "masking-module step on this random fraction of the batch (1 = authors')")
    soft_path: str = opt("scale", "how a score hides its patch in the masking module's step: scale (the authors': "
                                  "tokens x scores; LayerNorm undoes it, nothing is hidden) or hide (keys biased by "
                                  "log score, decoder input blended to the mask token: binary scores = the MAE's "
                                  "own loss); see docs/method.md", SOFT_PATHS)

    def validate(self) -> ClmaeOptions:
        self.need(self.curriculum in CURRICULA, "curriculum", one_of(CURRICULA))
        self.need(math.isfinite(self.curriculum_value), "curriculum_value", "a finite number")
        for name in ("lambda_gauss", "lambda_kl", "lambda_div"):
            self.need(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "a finite number >= 0")
        self.need(self.kl_reduction in KL_REDUCTIONS, "kl_reduction", one_of(KL_REDUCTIONS))
        self.need(self.masker_every >= 1, "masker_every", "an integer >= 1")
        self.need(0.0 < self.masker_batch_fraction <= 1.0, "masker_batch_fraction", "a number in (0, 1]")
        self.need(self.soft_path in SOFT_PATHS, "soft_path", one_of(SOFT_PATHS))
        return self


@dataclass
class BlockOptions(StrategyOptions):
    """BEiT's block masking."""

    prefix: ClassVar[str] = "block_"
    min_patches: int | None = opt(None, "smallest block, in patches (default (grid//3)², BEiT's 16 on 14x14)")
    max_patches: int | None = opt(None, "largest block, in patches (default: no limit, BEiT's)")
    min_aspect: float = opt(0.3, "blocks' aspect ratios lie between this and its inverse (BEiT's 0.3)")

    def validate(self) -> BlockOptions:
        self.need(self.min_patches is None or self.min_patches >= 1, "min_patches", "an integer >= 1")
        self.need(self.max_patches is None or self.max_patches >= (self.min_patches or 1), "max_patches",
                  "an integer >= --block-min-patches (and >= 1)")
        self.need(0.0 < self.min_aspect <= 1.0, "min_aspect", "a number in (0, 1]")
        return self


@dataclass
class HpmOptions(StrategyOptions):
    """HPM's loss predictor and the EMA model that chooses its masks."""

    prefix: ClassVar[str] = "hpm_"
    hard_max: float = opt(0.5, "share of the hidden patches chosen by predicted loss in the last epoch; it grows "
                               "linearly from 0 (HPM's 0.5)")
    loss_weight: float = opt(1.0, "weight of the loss predictor's ranking loss in the MAE step (HPM's 1)")
    ema_decay: float = opt(0.999, "EMA decay of the model that chooses the masks, at the start (HPM's 0.999)")
    ema_decay_end: float = opt(0.9999, "EMA decay reached after --hpm-ema-ramp-epochs (HPM's 0.9999)")
    ema_ramp_epochs: float = opt(100.0, "epochs over which the EMA decay rises (HPM's 100, however long the run; "
                                        "set it to --epochs to scale it to the run, 0: the end value throughout)")

    def validate(self) -> HpmOptions:
        self.need(0.0 <= self.hard_max <= 1.0, "hard_max", "a number in [0, 1]")
        self.need(math.isfinite(self.loss_weight) and self.loss_weight >= 0, "loss_weight", "a finite number >= 0")
        for name in ("ema_decay", "ema_decay_end"):
            self.need(0.0 <= getattr(self, name) <= 1.0, name, "a number in [0, 1]")
        self.need(math.isfinite(self.ema_ramp_epochs) and self.ema_ramp_epochs >= 0, "ema_ramp_epochs",
                  "a finite number >= 0")
        return self


@dataclass
class AttmaskOptions(StrategyOptions):
    """AttMask's EMA teacher and the share of images it masks."""

    prefix: ClassVar[str] = "attmask_"
    prob: float = opt(0.5, "share of the images masked by the teacher's attention; the others get random masks "
                           "(AttMask's 0.5)")
    momentum: float = opt(0.996, "teacher (EMA encoder) momentum at the start, rising to 1 on a cosine (AttMask's "
                                 "0.996)")
    variant: str = opt("high", "high: hide the most attended patches (AttMask's); low: the least attended",
                       ATTMASK_VARIANTS)

    def validate(self) -> AttmaskOptions:
        self.need(0.0 <= self.prob <= 1.0, "prob", "a number in [0, 1]")
        self.need(0.0 <= self.momentum <= 1.0, "momentum", "a number in [0, 1]")
        self.need(self.variant in ATTMASK_VARIANTS, "variant", one_of(ATTMASK_VARIANTS))
        return self
