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
SOFT_PATHS = ("scale", "hide", "hide_st")  # --soft-path: how a score hides a patch in the masking module's step
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
                                  "own loss) or hide_st (hide at the top-k mask, gradients through the scores: "
                                  "straight-through); see docs/method.md", SOFT_PATHS)

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


COLORS = ("white", "red", "blue", "green", "purple")  # --colormae-color: the noise's spectrum (white = MAE's)


@dataclass
class ColormaeOptions(StrategyOptions):
    """ColorMAE's noise: its colour, the filters that make it, the bank of textures the masks are cut from."""

    prefix: ClassVar[str] = "colormae_"
    color: str = opt("green", "the noise's colour: green (band-pass, the paper's best), red (low-pass: large "
                              "blobs), blue (high-pass: evenly spread), purple (band-stop) or white (random, a "
                              "control)", COLORS)
    sigma_red: float = opt(2.0, "red noise: std of the Gaussian low-pass filter, in patches")
    sigma_blue: float = opt(1.0, "blue noise: std of the Gaussian whose complement is the high-pass filter, in "
                                 "patches")
    sigma_green_inner: float = opt(0.6, "green/purple noise: std of the weaker Gaussian of the band-pass "
                                        "(difference of Gaussians), in patches")
    sigma_green_outer: float = opt(1.0, "green/purple noise: std of the stronger Gaussian of the band-pass, in "
                                        "patches")
    passes: int = opt(3, "filter passes: filter, rank-normalise, repeat (1: the filter once); more passes "
                         "sharpen the band")
    textures: int = opt(8, "noise textures in the bank the masks are cut from")
    texture_size: int = opt(0, "side of each texture, in patches (0: max(256, the power of two >= 8 x grid))")
    noise_seed: int | None = opt(None, "seed of the noise bank (default: the run's --seed)")

    def validate(self) -> ColormaeOptions:
        self.need(self.color in COLORS, "color", one_of(COLORS))
        for name in ("sigma_red", "sigma_blue", "sigma_green_inner", "sigma_green_outer"):
            self.need(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "a finite number > 0")
        self.need(self.sigma_green_outer > self.sigma_green_inner, "sigma_green_outer",
                  f"a number > --colormae-sigma-green-inner ({self.sigma_green_inner})")
        self.need(1 <= self.passes <= 16, "passes", "an integer in [1, 16]")
        self.need(1 <= self.textures <= 256, "textures", "an integer in [1, 256]")
        self.need(self.texture_size == 0 or 8 <= self.texture_size <= 4096, "texture_size",
                  "0 (automatic) or an integer in [8, 4096]")
        self.need(self.noise_seed is None or 0 <= self.noise_seed < 2**63, "noise_seed", "an integer >= 0")
        return self


@dataclass
class SbamOptions(StrategyOptions):
    """SBAM's salience-guided masks and its adaptive masking ratio (AMR)."""

    prefix: ClassVar[str] = "sbam_"
    ratio_var: float = opt(0.1, "AMR: the mask ratio varies in --mask-ratio ± this, with the share of salient "
                                "patches in the batch (0: SBM, the fixed ratio; 0.1 is not the paper's, which "
                                "could not be read)")
    delta: float = opt(0.5, "AMR: a patch is salient when its normalised salience exceeds this (unverified)")
    noise: float = opt(0.5, "range of the uniform noise added to the salience before ranking (SBAM's 0.5)")
    start_epoch: float = opt(0.0, "random masks before this epoch (the authors start from a warm-up checkpoint); "
                                  "0: SBAM from the first step")

    def validate(self) -> SbamOptions:
        self.need(0.0 <= self.ratio_var < 0.5, "ratio_var", "a number in [0, 0.5)")
        self.need(0.0 <= self.delta < 1.0, "delta", "a number in [0, 1)")
        self.need(math.isfinite(self.noise) and self.noise >= 0, "noise", "a finite number >= 0")
        self.need(math.isfinite(self.start_epoch) and self.start_epoch >= 0, "start_epoch", "a finite number >= 0")
        return self


AUTOMAE_SCORERS = ("ema", "init", "online")  # --automae-scorer: whose attention the mask generator reads
AUTOMAE_OBJECTIVES = ("official", "adversarial")  # --automae-objective: how the reconstruction trains the generator


@dataclass
class AutomaeOptions(StrategyOptions):
    """AutoMAE's mask generator, its discriminator and the attention it reads."""

    prefix: ClassVar[str] = "automae_"
    mask_factor: float = opt(0.5, "weight of the generator's selection added to the random ranking (AutoMAE's 0.5)")
    adv_weight: float = opt(0.2, "weight of the generator's adversarial loss in the MAE step (AutoMAE's 0.2)")
    tau: float = opt(1.0, "Gumbel-softmax temperature (AutoMAE's 1)")
    objective: str = opt("official", "official: the MAE loss reaches the generator through straight-through gates "
                                     "on the MAE's tokens (the authors'; it moves the masks towards harder ones "
                                     "slowly); adversarial: the generator ascends, explicitly, the reconstruction "
                                     "error of the hidden patches it favours (clmae's variant)", AUTOMAE_OBJECTIVES)
    rec_weight: float = opt(1.0, "--automae-objective adversarial: weight of the generator's term")
    scorer: str = opt("ema", "attention the generator reads: ema (an EMA of the encoder), init (the starting "
                             "weights, frozen: the authors' pretrained MAE with --init-from) or online (the MAE as "
                             "it trains)", AUTOMAE_SCORERS)
    scorer_momentum: float = opt(0.996, "--automae-scorer ema: momentum at the start, rising to 1 on a cosine")
    rect_value: float = opt(0.5, "height of the rectangle in the discriminator's object-centric prior (AutoMAE's "
                                 "0.5)")

    def validate(self) -> AutomaeOptions:
        self.need(math.isfinite(self.mask_factor) and self.mask_factor >= 0, "mask_factor", "a finite number >= 0")
        self.need(math.isfinite(self.adv_weight) and self.adv_weight >= 0, "adv_weight", "a finite number >= 0")
        self.need(math.isfinite(self.tau) and self.tau > 0, "tau", "a finite number > 0")
        self.need(self.objective in AUTOMAE_OBJECTIVES, "objective", one_of(AUTOMAE_OBJECTIVES))
        self.need(math.isfinite(self.rec_weight) and self.rec_weight >= 0, "rec_weight", "a finite number >= 0")
        self.need(self.scorer in AUTOMAE_SCORERS, "scorer", one_of(AUTOMAE_SCORERS))
        self.need(0.0 <= self.scorer_momentum <= 1.0, "scorer_momentum", "a number in [0, 1]")
        self.need(math.isfinite(self.rect_value) and self.rect_value >= 0, "rect_value", "a finite number >= 0")
        return self
