"""Watching the masks: how hard are the strategy's masks, measured on a fixed batch during training.

CL-MAE's masking module is trained to make reconstruction easier (λ > 0) or harder (λ < 0); HPM
hides the patches it predicts to be hard, AttMask the most attended ones, block masking whole
blocks. The probe measures what each strategy's masks do, on a few fixed training images seen
through the deterministic evaluation view (every strategy whose masks are not uniformly random):

* ``mask_difficulty`` = MAE loss under the strategy's masks ÷ MAE loss under random masks of the
  same ratio (averaged over a few fixed random draws; as many patches as the strategy hid when it
  chooses its own count, SBAM's, logged as ``probe_num_keep``). Below 1 the strategy's masks are easier than
  random ones, above 1 harder; under CL-MAE's official schedule it should rise through 1 as λ crosses 0.
* ``mask_difficulty_shuffled`` = the same numerator ÷ the loss when each image gets the learned mask
  of another probe image. The MAE is trained on learned masks only, so it may simply be better at
  masks *like* them than at random ones; this ratio keeps the mask distribution and asks whether
  the masks are easy or hard *for their own image*.
* ``mask_overlap`` — fraction of kept patches shared with the previous probe (how fast masks move;
  random masks would share ``K/L``). ``mask_pairwise_overlap`` — the same between different images
  of the batch (high = every image gets the same mask).
* ``score_entropy`` — mean binary entropy of the scores in bits (1 = undecided 0.5, 0 = binary),
  for strategies whose scores are keep probabilities (CL-MAE).
* the strategy's schedule values at that iteration (λ for CL-MAE, the hard share for HPM, ...).

Snapshots (``OUTPUT/probe/epoch-EEEE.safetensors``: scores, kept indices, masks; the images once in
``probe/images.safetensors``) let :mod:`clmae.viz.report` draw the masks' evolution after the run.

The probe never changes training: it uses its own random generator, runs under ``no_grad`` in
eval mode on the uncompiled modules, and restores each module's mode afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..data.images import normalize
from ..evaluation.splits import choose_indices, eval_images
from ..io.checkpoint import write_run_file
from ..maskers import mask_from_keep, random_keep_indices
from ..maskers.base import strategy_masks
from ..models.mae import per_patch_error
from ..runtime import eval_mode
from .pictures import probe_mosaic

PROBE_SEED = 1234  # which images form the probe batch and which random masks they are compared with
RANDOM_DRAWS = 4  # random masks per image in the denominator of mask_difficulty
TENSORBOARD_IMAGES = 8  # probe images in the TensorBoard picture
PROBE_DIR = "probe"
IMAGES_FILE = "images.safetensors"


# ---------------------------------------------------------------------------------------------
# The probe batch


def probe_batch(dataset, n: int, size: int, seed: int = PROBE_SEED) -> tuple[list[int], torch.Tensor]:
    """``n`` fixed training images (chosen with ``seed``) in the evaluation view, floats in [0, 1]."""
    n = min(n, len(dataset))
    return eval_images(dataset, choose_indices(len(dataset), seed), size, limit=n)


def random_keep_sets(batch: int, length: int, num_keep: int, draws: int, seed: int = PROBE_SEED) -> torch.Tensor:
    """``draws`` fixed random masks per image, as kept indices ``(draws, N, K)``."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.stack([random_keep_indices(batch, length, num_keep, g) for _ in range(draws)])


# ---------------------------------------------------------------------------------------------
# Measurements (pure functions of a model, images and masks)


@torch.no_grad()
def per_image_loss(mae, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """The MAE loss of each image under ``ids_keep``, ``(N,)`` fp32 (mean error over its hidden patches)."""
    pred = mae(x, ids_keep)["pred"]
    mask = mask_from_keep(ids_keep, pred.shape[1])
    err = per_patch_error(pred, mae.target(x))
    return (err * mask).sum(1) / mask.sum(1)


@torch.no_grad()
def shuffled_mask_loss(mae, x: torch.Tensor, ids_keep: torch.Tensor, shifts: int = 3) -> torch.Tensor:
    """Per-image MAE loss under the masks chosen for *other* images of the batch (cyclic shifts 1..shifts).

    Same mask distribution as the learned one, but no longer fitted to the image: the denominator
    that tells image-specific choices apart from an MAE that has merely got used to its masks.
    """
    shifts = max(1, min(shifts, x.shape[0] - 1))
    keeps = torch.cat([ids_keep.roll(s, dims=0) for s in range(1, shifts + 1)])
    return per_image_loss(mae, x.repeat(shifts, 1, 1, 1), keeps).view(shifts, -1).mean(0)


@torch.no_grad()
def random_mask_loss(mae, x: torch.Tensor, keep_sets: torch.Tensor) -> torch.Tensor:
    """Per-image MAE loss averaged over the random masks ``keep_sets`` ``(draws, N, K)``: ``(N,)``."""
    draws = keep_sets.shape[0]
    losses = per_image_loss(mae, x.repeat(draws, 1, 1, 1), keep_sets.reshape(-1, keep_sets.shape[-1]))
    return losses.view(draws, -1).mean(0)


def keep_indicator(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """``(N, K)`` indices → ``(N, L)`` floats, 1 where the patch is kept."""
    return 1.0 - mask_from_keep(ids_keep, length)


def keep_overlap(previous: torch.Tensor, current: torch.Tensor, length: int) -> float:
    """Mean fraction of each image's kept patches that were kept before too (random: ``K/L``)."""
    a, b = keep_indicator(previous, length), keep_indicator(current, length)
    return float(((a * b).sum(1) / current.shape[1]).mean())


def pairwise_overlap(ids_keep: torch.Tensor, length: int) -> float:
    """Mean fraction of kept patches shared by two different images of the batch (random: ``K/L``)."""
    m = keep_indicator(ids_keep, length)
    n = m.shape[0]
    if n < 2:
        return float("nan")
    shared = (m @ m.T) / ids_keep.shape[1]
    return float((shared.sum() - shared.diagonal().sum()) / (n * (n - 1)))


def score_entropy(scores: torch.Tensor) -> float:
    """Mean binary entropy of the scores in bits: 1 when all are 0.5, 0 when all are 0 or 1."""
    s = scores.float().clamp(1e-7, 1 - 1e-7)
    h = -(s * torch.log2(s) + (1 - s) * torch.log2(1 - s))
    return float(h.mean())


# ---------------------------------------------------------------------------------------------
# The trainer callback


class CurriculumProbe:
    """Trainer callback (:class:`clmae.train.callbacks.Callback`): probe records every ``probe_every`` iterations,
    snapshots every ``snapshot_every`` epochs. It reads the run through a :class:`clmae.train.callbacks.RunView`."""

    def __init__(self, run, seed: int = PROBE_SEED, draws: int = RANDOM_DRAWS):
        cfg = run.cfg
        self.every = cfg.probe_every
        self.snapshot_every = run.snapshot_every
        self.informed = not run.masker.uniform  # masks that depend on the image or on the run
        self.length = run.model_config.num_patches
        self.num_keep = run.mae.num_keep(cfg.mask_ratio)
        self.indices, images = probe_batch(run.dataset, cfg.probe_images, run.model_config.img_size, seed)
        self.images_uint8 = images.mul(255).round().to(torch.uint8)
        self.x = normalize(images, run.dataset.mean, run.dataset.std).to(run.device)
        keeps = random_keep_sets(len(self.indices), self.length, self.num_keep, draws, seed)
        self.random_keeps = keeps.to(run.device)
        self.generator = torch.Generator().manual_seed(seed + 2)  # for maskers that draw at random; never the run's
        self.previous_keep: torch.Tensor | None = None
        self.last: dict[str, Any] = {}
        self.folder = Path(run.output_dir) / PROBE_DIR
        if self.snapshot_every and self.informed:
            self._save_images(run)
            if run.epoch == 0 and run.step_in_epoch == 0:
                self.snapshot(run)
        if self.every and run.iteration == 0:
            self.measure(run)

    # -- hooks -------------------------------------------------------------------------------

    def on_step(self, run, metrics: dict[str, float]) -> None:
        if self.every and run.iteration % self.every == 0:
            self.measure(run)

    def on_epoch_end(self, run) -> None:
        if not self.informed:
            return
        due = self.snapshot_every and (run.epoch % self.snapshot_every == 0 or run.epoch == run.cfg.epochs)
        if due:
            self.snapshot(run)
        if run.tensorboard is not None:
            self._tensorboard_images(run)

    # -- measurements ------------------------------------------------------------------------

    def _schedule(self, run) -> dict[str, float]:
        """The strategy's schedule values (λ, ...) of the iteration just done, the progress its masks are drawn at."""
        return run.schedule_done() if self.informed else {}

    @torch.no_grad()
    def masks(self, run) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The strategy's scores ``(N, L)`` (None if it has none) and kept indices ``(N, K)`` on the probe batch."""
        with eval_mode(run.mae, run.masker), run.autocast():
            return strategy_masks(run.mae, run.masker, self.x, self.num_keep, self.generator, run.progress_done,
                                  run.epochs)

    @torch.no_grad()
    def measure(self, run) -> dict[str, Any]:
        """Compute and log one probe record (``kind="probe"``) at the current iteration."""
        mae = run.mae
        record: dict[str, Any] = {"kind": "probe", "epoch": run.epoch, "step": run.iteration}
        with eval_mode(mae, run.masker), run.autocast():
            loss_random = float(random_mask_loss(mae, self.x, self.random_keeps).mean())
        record["probe_loss_random"] = loss_random
        if self.informed:
            scores, keep = self.masks(run)
            with eval_mode(mae, run.masker), run.autocast():
                loss_learned = float(per_image_loss(mae, self.x, keep).mean())
                loss_shuffled = float(shuffled_mask_loss(mae, self.x, keep).mean())
                if keep.shape[1] != self.num_keep:  # a strategy that chose its own count (SBAM): as many random ones
                    record["probe_num_keep"] = keep.shape[1]
                    same = random_keep_sets(len(self.indices), self.length, keep.shape[1], self.random_keeps.shape[0])
                    loss_random = float(random_mask_loss(mae, self.x, same.to(self.x.device)).mean())
                    record["probe_loss_random"] = loss_random
            record.update(
                probe_loss_learned=loss_learned,
                probe_loss_shuffled=loss_shuffled,
                mask_difficulty=loss_learned / loss_random if loss_random > 0 else float("nan"),
                mask_difficulty_shuffled=loss_learned / loss_shuffled if loss_shuffled > 0 else float("nan"),
            )
            if scores is not None and run.masker.score_range == (0.0, 1.0):
                record["score_entropy"] = score_entropy(scores)
            record["mask_pairwise_overlap"] = pairwise_overlap(keep, self.length)
            record.update(self._schedule(run))
            if self.previous_keep is not None:
                record["mask_overlap"] = keep_overlap(self.previous_keep, keep, self.length)
            self.previous_keep = keep
        run.log(record)
        self.last = record
        return record

    # -- snapshots ---------------------------------------------------------------------------

    def _save_images(self, run) -> None:
        path = self.folder / IMAGES_FILE
        meta = {
            "indices": self.indices, "mean": list(run.dataset.mean), "std": list(run.dataset.std),
            "patch_size": run.model_config.patch_size, "img_size": run.model_config.img_size,
            "num_keep": self.num_keep, "num_patches": self.length, "data": run.dataset.name,
            "mask_ratio": run.cfg.mask_ratio, "method": run.cfg.method, "mask_label": run.masker.mask_label,
            "score_label": run.masker.score_label, "score_range": run.masker.score_range,
        }
        tensors = {"images": self.images_uint8.contiguous()}
        write_run_file(path, lambda tmp: save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()}))

    def snapshot(self, run) -> Path:
        """Save the probe batch's scores (if the strategy has them) and masks after ``run.epoch`` epochs."""
        scores, keep = self.masks(run)
        epoch = run.epoch
        tensors = {
            "keep": keep.cpu().contiguous(),
            "mask": mask_from_keep(keep, self.length).to(torch.uint8).cpu().contiguous(),
        }
        if scores is not None:
            tensors["scores"] = scores.cpu().contiguous()
        # The schedule at the progress the masks were drawn at: after an epoch, its last step's.
        meta = {"epoch": epoch, "iteration": run.iteration, "progress": run.progress_done, **self._schedule(run)}
        if "mask_difficulty" in self.last:
            meta["mask_difficulty"] = self.last["mask_difficulty"]
            meta["difficulty_step"] = self.last["step"]
        path = self.folder / f"epoch-{epoch:04d}.safetensors"
        write_run_file(path, lambda tmp: save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()}))
        return path

    def _tensorboard_images(self, run) -> None:
        scores, keep = self.masks(run)
        n = TENSORBOARD_IMAGES
        mosaic = probe_mosaic(self.images_uint8[:n].float() / 255, None if scores is None else scores[:n].cpu(),
                              mask_from_keep(keep[:n], self.length).cpu(), run.model_config.patch_size,
                              run.masker.score_range)
        run.tensorboard.add_image("probe/masks", mosaic, run.iteration, dataformats="HWC")


# ---------------------------------------------------------------------------------------------
# Reading snapshots back


def _meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        raw = fh.metadata() or {}
    return {k: json.loads(v) for k, v in raw.items()}


def read_snapshots(run_dir: str | Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The probe images (``{"images", **metadata}``, or None) and the snapshots, oldest first.

    Each snapshot is ``{"epoch", "scores", "keep", "mask", **metadata}``.
    """
    folder = Path(run_dir) / PROBE_DIR
    images_path = folder / IMAGES_FILE
    if not images_path.is_file():
        return None, []
    images = {**_meta(images_path), **load_file(str(images_path))}
    snaps = []
    for path in sorted(folder.glob("epoch-*.safetensors")):
        try:
            snaps.append({**_meta(path), **load_file(str(path))})
        except Exception:  # noqa: BLE001 — a torn file (run killed mid-write) is left out
            continue
    snaps.sort(key=lambda s: s["epoch"])
    return images, snaps

