"""Pictures of a trained model: which patches its masking strategy hides, and what the MAE makes of them.

``clmae visualize --checkpoint RUN`` draws one row per image: the original, the strategy's score
map when it has one (CL-MAE's scores, HPM's predicted loss, AttMask's CLS attention), the
strategy's mask, the MAE's reconstruction under it, a random mask of the same ratio and the
reconstruction under that. MAE checkpoints (random masks) get the random columns only.

Images are shown in pixel space: the dataset normalisation stored in the checkpoint is undone.
For ``norm_pix_loss`` models the MAE predicts each patch normalised by its own mean and std,
which a hidden patch does not reveal; we un-normalise with statistics estimated from nearby
*visible* patches only, so the picture uses no information the model did not see.

The array helpers here are pure and matplotlib-free; figures are drawn with the Agg backend
through :class:`matplotlib.figure.Figure`, never pyplot, so nothing global changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.datasets import load_dataset
from ..data.images import denormalize, normalize
from ..errors import ConfigError, DataError
from ..evaluation.splits import choose_indices, eval_images
from ..io.checkpoint import load_pretrained
from ..maskers import mask_from_keep, random_keep_indices
from ..maskers.base import strategy_masks
from ..models.layers import patchify, unpatchify
from ..models.mae import per_patch_error
from ..runtime import eval_mode, resolve_device
from . import VISUALIZE_MAX_IMAGES as MAX_IMAGES
from .pictures import Panel, draw_grid, mask_overlay, save_figure, scaled_scores, score_map, to_hwc

# ---------------------------------------------------------------------------------------------
# Normalisation, undone


def patch_stats(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and std exactly as ``norm_pix_loss`` computes them: ``(N, L, 1)`` each."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps) ** 0.5
    return mean, std


def unnormalize_patches(normed: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Inverse of the per-patch normalisation of ``norm_pix_loss``."""
    return normed * std + mean


def visible_patch_stats(patches: torch.Tensor, mask: torch.Tensor, grid: int, sigma: float = 1.5
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std estimated from the *visible* patches only (``mask`` 1 = hidden).

    A visible patch gets its own statistics; a hidden one a Gaussian-weighted average (``sigma``
    in patches) of its visible neighbours', so the estimate never reads a hidden pixel.
    """
    mean, std = patch_stats(patches)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], 1).to(patches.device, torch.float32)
    logits = -torch.cdist(pos, pos).pow(2) / (2 * sigma**2)  # (L, L): weight of patch j for patch i
    visible = mask < 0.5
    logits = logits.unsqueeze(0).masked_fill(~visible.unsqueeze(1), float("-inf"))  # only visible sources
    weights = torch.softmax(logits, dim=-1).to(patches.dtype)  # (N, L, L)
    est_mean, est_std = weights @ mean, weights @ std
    keep = visible.unsqueeze(-1)
    return torch.where(keep, mean, est_mean), torch.where(keep, std, est_std)


def prediction_to_pixels(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
                         mean: Sequence[float], std: Sequence[float], paste_visible: bool = True) -> torch.Tensor:
    """The MAE's prediction ``(N, L, p²C)`` as images in [0, 1], ``(N, C, H, W)``.

    ``x`` is the normalised input, ``mask`` ``(N, L)`` 1 = hidden. With ``paste_visible`` the
    visible patches show the input itself (as in the MAE paper's figures).
    """
    channels = x.shape[1]
    patches = patchify(x, patch_size)
    pred = pred.to(patches.dtype)
    if norm_pix:
        grid = x.shape[-1] // patch_size
        pred = unnormalize_patches(pred, *visible_patch_stats(patches, mask, grid))
    if paste_visible:
        pred = torch.where(mask.unsqueeze(-1) > 0.5, pred, patches)
    return denormalize(unpatchify(pred, patch_size, channels), mean, std).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# A model's picture


CLMAE_COLUMNS = ["original", "scores", "learned mask", "reconstruction\n(learned mask)", "random mask",
                 "reconstruction\n(random mask)"]
MAE_COLUMNS = ["original", "random mask", "reconstruction\n(random mask)"]


def strategy_columns(masker) -> list[str]:
    """The columns for a strategy: its score map (if it has one), its mask and the reconstruction under it."""
    label = masker.mask_label
    scores = [masker.score_label] if masker.score_label else []
    return ["original", *scores, label, f"reconstruction\n({label})", *MAE_COLUMNS[1:]]


@torch.no_grad()
def reconstruct(mae, x: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE prediction, mask (1 = hidden) and per-image loss (over hidden patches) for ``ids_keep``."""
    pred = mae(x, ids_keep)["pred"].float()
    mask = mask_from_keep(ids_keep, pred.shape[1])
    loss = (per_patch_error(pred, mae.target(x)) * mask).sum(1) / mask.sum(1)
    return pred, mask, loss


@torch.no_grad()
def model_panels(mae, masker, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 mask_ratio: float = 0.75, seed: int = 0, epochs: int = 1) -> tuple[list[list[Panel]], list[str]]:
    """The panels of :func:`visualize_model`: rows of panels and the column titles.

    The strategy's masks are those at the end of a run of ``epochs`` epochs (its schedules' last values).
    """
    device = next(mae.parameters()).device
    cfg = mae.config
    p = cfg.patch_size
    x = normalize(images.to(device), mean, std)
    num_keep = mae.num_keep(mask_ratio)
    g = torch.Generator().manual_seed(seed)

    def random_panels(keep_count: int, generator: torch.Generator):
        random_keep = random_keep_indices(x.shape[0], cfg.num_patches, keep_count, generator, device)
        pred_r, mask_r, loss_r = reconstruct(mae, x, random_keep)
        return (loss_r, to_hwc(mask_overlay(images.cpu(), mask_r.cpu(), p)),
                to_hwc(prediction_to_pixels(pred_r, x, mask_r, p, cfg.norm_pix_loss, mean, std).cpu()))

    loss_r, random_masked, recon_r = random_panels(num_keep, g)
    originals = to_hwc(images)
    rows = []
    if masker is None:
        for i in range(x.shape[0]):
            rows.append([Panel(originals[i]), Panel(random_masked[i]),
                         Panel(recon_r[i], note=f"loss {loss_r[i]:.3f}")])
        return rows, MAE_COLUMNS
    scores, keep = strategy_masks(mae, masker, x, num_keep, g, float(epochs), epochs)
    if keep.shape[1] != num_keep:  # the strategy chose its own count (SBAM): random masks hide as many
        loss_r, random_masked, recon_r = random_panels(keep.shape[1], torch.Generator().manual_seed(seed))
    count = f"{cfg.num_patches - keep.shape[1]}/{cfg.num_patches} hidden, " if masker.adaptive_count else ""
    pred_l, mask_l, loss_l = reconstruct(mae, x, keep)
    learned_masked = to_hwc(mask_overlay(images.cpu(), mask_l.cpu(), p))
    recon_l = to_hwc(prediction_to_pixels(pred_l, x, mask_l, p, cfg.norm_pix_loss, mean, std).cpu())
    heat = None if scores is None else score_map(scaled_scores(scores, masker.score_range)).cpu().numpy()
    raw = None if scores is None else score_map(scores).cpu().numpy()
    for i in range(x.shape[0]):
        ratio = float(loss_l[i] / loss_r[i]) if loss_r[i] > 0 else float("nan")
        score_panel = [] if heat is None else [Panel(heat[i], note=f"mean {raw[i].mean():.3g}", cmap="viridis")]
        rows.append([
            Panel(originals[i]),
            *score_panel,
            Panel(learned_masked[i], note=f"{count}{ratio:.2f}× random loss"),
            Panel(recon_l[i], note=f"loss {loss_l[i]:.3f}"),
            Panel(random_masked[i]),
            Panel(recon_r[i], note=f"loss {loss_r[i]:.3f}"),
        ])
    return rows, strategy_columns(masker)


SCORE_CAPTIONS = {
    "scores": "Scores: the masking module's output per patch (bright = kept visible, 0 to 1).",
    "predicted loss": ("Predicted loss: HPM's loss predictor (EMA copy) per patch, each image scaled to its own "
                       "range (bright = predicted hard; the hardest are hidden)."),
    "CLS attention": ("CLS attention: the EMA encoder's last-block attention from the CLS token, each image scaled "
                      "to its own range (bright = most attended; AttMask-High hides those)."),
    "noise": ("Noise: ColorMAE's window of coloured noise per patch, each image scaled to its own range (bright = "
              "high; the highest stay visible)."),
    "token salience": ("Token salience: SBAM's attention each patch receives from the others, 0 to 1 (bright = "
                       "salient; salience plus noise decides which are hidden)."),
    "generator prob.": ("Generator prob.: AutoMAE's mask generator's probability per patch, each image scaled to its "
                        "own range (bright = likely selected, and then hidden)."),
}


def figure_caption(norm_pix: bool, learned: bool | str | None, mask_ratio: float, seed: int, source: str = "",
                   adaptive: bool = False) -> str:
    """The caption under the grid; ``learned``: the strategy's score label (True: CL-MAE's scores), or falsy;
    ``adaptive``: the strategy chooses how many patches to hide (SBAM)."""
    parts = []
    if source:
        parts.append(source + ".")
    label = "scores" if learned is True else learned
    if label:
        parts.append(SCORE_CAPTIONS.get(label, f"{label}: the strategy's per-patch map, each image scaled to its "
                                               "own range."))
    if adaptive:
        parts.append(f"The strategy chooses how many patches to hide for the batch shown (around {mask_ratio:.0%}; "
                     "the count is on its mask panels) and the random masks hide as many (hidden patches under grey "
                     f"stripes); random masks use seed {seed}.")
    else:
        parts.append(f"Masks hide {mask_ratio:.0%} of the patches (hidden patches under grey stripes); "
                     f"random masks use seed {seed}.")
    parts.append("Reconstructions show the MAE's prediction for hidden patches with the visible patches pasted "
                 "back; loss = mean squared error over hidden patches, in the model's target space.")
    if norm_pix:
        parts.append("norm_pix_loss model: predicted patches are un-normalised with mean/std estimated from nearby "
                     "visible patches only (hidden pixels are never used).")
    return " ".join(parts)


def visualize_model(mae, masker, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    mask_ratio: float = 0.75, seed: int = 0, title: str = "", source: str = "", epochs: int = 1):
    """A grid figure for ``images`` (floats in [0, 1], ``(N, C, H, W)``) — see the module docstring."""
    with eval_mode(mae, masker):
        rows, columns = model_panels(mae, masker, images, mean, std, mask_ratio, seed, epochs)
    caption = figure_caption(mae.config.norm_pix_loss, masker.score_label if masker is not None else None,
                             mask_ratio, seed, source, adaptive=masker is not None and masker.adaptive_count)
    return draw_grid(rows, columns, caption, title)


def default_output(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    if path.is_dir():
        return path / "visualize.png"
    return path.with_name(path.name.split(".")[0] + "-visualize.png")


def visualize_checkpoint(checkpoint: str | Path, data: str | None = None, data_dir: str | None = None,
                         num_images: int = 8, output: str | Path | None = None, split: str = "test", seed: int = 0,
                         device: str = "auto") -> Path:
    """Draw :func:`visualize_model` for a checkpoint on ``num_images`` images of ``data`` and save a PNG."""
    if not 1 <= num_images <= MAX_IMAGES:
        raise ConfigError(f"--num-images: got {num_images}, expected an integer between 1 and {MAX_IMAGES}")
    if split not in ("train", "test"):
        raise ConfigError(f"--split: got {split!r}, expected 'train' or 'test'")
    mae, masker, run = load_pretrained(checkpoint, resolve_device(device))
    info = run.get("data_info") or {}
    if "mean" not in info or "std" not in info:
        raise DataError(f"{checkpoint}: the checkpoint holds no normalisation statistics (data mean/std)")
    data = data or run.get("data")
    if not data:
        raise ConfigError("--data: the checkpoint does not name its dataset; pass --data")
    data_dir = data_dir or run.get("data_dir")
    try:
        dataset = load_dataset(data, data_dir, split, channels=mae.config.in_chans)
    except DataError as exc:
        if split == "test":
            raise DataError(f"{exc} (or pass --split train)") from None
        raise
    if dataset.channels != mae.config.in_chans:
        raise DataError(f"{data}: images have {dataset.channels} channel(s) but the model expects "
                        f"{mae.config.in_chans}; use the data the model was trained on")
    _, images = eval_images(dataset, choose_indices(len(dataset), seed), mae.config.img_size, limit=num_images)
    mask_ratio = float(run.get("mask_ratio", 0.75))
    name = Path(checkpoint).name
    source = f"{len(images)} {split} images of {dataset.name}, checkpoint {name}"
    fig = visualize_model(mae, masker, images, info["mean"], info["std"], mask_ratio, seed, source=source,
                          epochs=int(run.get("epochs", 1)))
    return save_figure(fig, Path(output) if output else default_output(checkpoint))
