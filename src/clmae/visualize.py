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

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_pretrained
from .data import load_dataset
from .errors import ConfigError, DataError
from .images import denormalize, normalize
from .losses import per_patch_error
from .maskers import MaskingBatch, mask_from_keep, random_keep_indices
from .model import patchify, unpatchify
from .runtime import eval_mode, resolve_device
from .splits import choose_indices, eval_images
from .tool_options import VISUALIZE_MAX_IMAGES as MAX_IMAGES

CELL = 1.5  # inches per panel
DPI = 100
HEADER = 0.5  # inches above the grid for column titles
NOTE = 0.2  # inches under each panel for its note
CAPTION_FONT = 7.5
HIDDEN_DIM = 0.25  # hidden patches keep this much of their content under the stripes
HIDDEN_STRIPES = (0.35, 0.7)  # grey levels of the stripes drawn over hidden patches
OVERLAY_MIN_SIZE = 64  # masks are drawn on images enlarged to at least this many pixels


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
# Masks and scores as pictures


def pixel_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(N, L)`` patch mask → ``(N, 1, H, W)`` pixel mask."""
    g = round(mask.shape[1] ** 0.5)
    m = mask.float().view(-1, 1, g, g)
    return m.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)


def upscale(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour enlargement by an integer factor, ``(N, C, H, W)``."""
    return images if factor == 1 else images.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def overlay_factor(size: int, min_size: int = OVERLAY_MIN_SIZE) -> int:
    return max(1, math.ceil(min_size / size))


def mask_overlay(images: torch.Tensor, mask: torch.Tensor, patch_size: int,
                 min_size: int = OVERLAY_MIN_SIZE) -> torch.Tensor:
    """RGB images in [0, 1] with their hidden patches (``mask`` 1) faded under grey diagonal stripes.

    Stripes rather than a flat colour, so hidden patches stand out on any background (black digits,
    grey sky) while a trace of their content stays visible. Small images are first enlarged
    (nearest) to at least ``min_size`` pixels so the stripes are finer than the image's pixels.
    """
    factor = overlay_factor(images.shape[-1], min_size)
    rgb = upscale(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images, factor)
    p = patch_size * factor
    m = pixel_mask(mask, p).to(rgb.dtype).to(rgb.device)
    h, w = rgb.shape[-2:]
    width = max(1, p // 4)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    stripes = torch.where(((xx + yy) // width) % 2 == 0, HIDDEN_STRIPES[0], HIDDEN_STRIPES[1])
    stripes = stripes.to(rgb.dtype).to(rgb.device).view(1, 1, h, w)
    faded = HIDDEN_DIM * rgb + (1 - HIDDEN_DIM) * stripes
    return rgb * (1 - m) + faded * m


def score_map(scores: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` scores → ``(N, g, g)`` grids."""
    g = round(scores.shape[1] ** 0.5)
    return scores.float().view(-1, g, g)


def scaled_scores(scores: torch.Tensor, score_range: Sequence[float] | None) -> torch.Tensor:
    """Scores mapped to [0, 1] for colour: by the fixed ``score_range``, else by each image's own min and max."""
    s = scores.float()
    if score_range is not None:
        lo, hi = float(score_range[0]), float(score_range[1])
        return ((s - lo) / (hi - lo)).clamp(0, 1)
    lo, hi = s.amin(dim=1, keepdim=True), s.amax(dim=1, keepdim=True)
    return (s - lo) / (hi - lo).clamp_min(1e-12)


def to_hwc(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in [0, 1] → ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` numpy."""
    arr = images.detach().float().cpu().clamp(0, 1).numpy()
    return arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)


def probe_mosaic(images: torch.Tensor, scores: torch.Tensor | None, mask: torch.Tensor, patch_size: int,
                 score_range: Sequence[float] | None = (0.0, 1.0)) -> np.ndarray:
    """One RGB ``uint8`` picture (H, W, 3) for TensorBoard: images, masks and (if any) scores, one row each."""
    from matplotlib import colormaps

    factor = overlay_factor(images.shape[-1])
    rgb = upscale(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images, factor)
    masked = mask_overlay(images, mask, patch_size)
    cell = patch_size * factor
    parts = [rgb.float(), masked.float()]
    if scores is not None:
        heat = score_map(scaled_scores(scores, score_range)).repeat_interleave(cell, 1).repeat_interleave(cell, 2)
        parts.append(torch.from_numpy(colormaps["viridis"](heat.numpy())[..., :3]).permute(0, 3, 1, 2).float())
    rows = [torch.cat(list(t), dim=2) for t in parts]  # each (3, H, N·W)
    mosaic = torch.cat(rows, dim=1)
    return (mosaic.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The grid figure


@dataclass
class Panel:
    """One cell of a grid: an image (H, W) or (H, W, 3) and a one-line note under it."""

    image: np.ndarray
    note: str = ""
    cmap: str | None = None  # None: grey for 2-D images; "viridis" for scores
    vmin: float = 0.0
    vmax: float = 1.0


def caption_lines(caption: str, cols: int, cell: float = CELL) -> list[str]:
    width = max(40, int(cols * cell * 72 / (CAPTION_FONT * 0.56)))  # characters per line at ~0.56 em each
    return textwrap.wrap(caption, width) if caption else []


def grid_figsize(rows: int, cols: int, caption: str = "", cell: float = CELL) -> tuple[float, float]:
    """Figure size in inches: ``cell`` per panel, plus the header and the caption's lines."""
    footer = 0.1 + 0.16 * len(caption_lines(caption, cols, cell)) if caption else 0.0
    return cols * cell, HEADER + rows * cell + footer


def draw_grid(rows: list[list[Panel]], columns: list[str], caption: str = "", title: str = "", cell: float = CELL):
    """A grid of panels, one list per row, titled columns, wrapped caption under it.

    Panel ``(r, c)`` is the axes labelled ``"r{r}c{c}"``; the figure is ``grid_figsize(...)`` inches.
    """
    from matplotlib.figure import Figure

    n_rows, n_cols = len(rows), len(columns)
    if any(len(r) != n_cols for r in rows):
        raise ValueError("every row needs one panel per column")
    fig_w, fig_h = grid_figsize(n_rows, n_cols, caption, cell)
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    pad = 0.06
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            left = c * cell + pad
            top = HEADER + r * cell + pad
            size_w, size_h = cell - 2 * pad, cell - 2 * pad - NOTE
            side = min(size_w, size_h)
            left += (size_w - side) / 2
            ax = fig.add_axes([left / fig_w, 1 - (top + side) / fig_h, side / fig_w, side / fig_h])
            cmap = panel.cmap or ("gray" if panel.image.ndim == 2 else None)
            ax.imshow(panel.image, cmap=cmap, vmin=panel.vmin, vmax=panel.vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_label(f"r{r}c{c}")
            if panel.note:
                fig.text((c * cell + cell / 2) / fig_w, 1 - (top + side + 0.03) / fig_h, panel.note,
                         ha="center", va="top", fontsize=7)
    for c, name in enumerate(columns):
        fig.text((c * cell + cell / 2) / fig_w, 1 - (HEADER - 0.05) / fig_h, name, ha="center", va="bottom",
                 fontsize=8, fontweight="bold")
    if title:
        fig.text(0.01, 1 - 0.04 / fig_h, title, ha="left", va="top", fontsize=8)
    lines = caption_lines(caption, n_cols, cell)
    for i, line in enumerate(lines):
        fig.text(0.01, 1 - (HEADER + n_rows * cell + 0.05 + 0.16 * i) / fig_h, line, ha="left", va="top",
                 fontsize=CAPTION_FONT)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """PNG through the Agg canvas (no pyplot, no display), size exactly ``figsize × DPI``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")
    return path


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
def strategy_masks(mae, masker, x: torch.Tensor, num_keep: int, generator: torch.Generator, progress: float,
                   epochs: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A strategy's scores (or None) and kept indices on the normalised images ``x``, at a point of its run."""
    batch = MaskingBatch(x, mae.embed(x), num_keep, generator, mae, progress, epochs)
    scores = masker.scores(batch)
    return (None if scores is None else scores.float()), masker.keep_indices(batch)


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
    random_keep = random_keep_indices(x.shape[0], cfg.num_patches, num_keep, g, device)
    pred_r, mask_r, loss_r = reconstruct(mae, x, random_keep)
    originals = to_hwc(images)
    random_masked = to_hwc(mask_overlay(images.cpu(), mask_r.cpu(), p))
    recon_r = to_hwc(prediction_to_pixels(pred_r, x, mask_r, p, cfg.norm_pix_loss, mean, std).cpu())
    rows = []
    if masker is None:
        for i in range(x.shape[0]):
            rows.append([Panel(originals[i]), Panel(random_masked[i]),
                         Panel(recon_r[i], note=f"loss {loss_r[i]:.3f}")])
        return rows, MAE_COLUMNS
    scores, keep = strategy_masks(mae, masker, x, num_keep, g, float(epochs), epochs)
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
            Panel(learned_masked[i], note=f"{ratio:.2f}× random loss"),
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
}


def figure_caption(norm_pix: bool, learned: bool | str | None, mask_ratio: float, seed: int, source: str = "") -> str:
    """The caption under the grid; ``learned``: the strategy's score label (True: CL-MAE's scores), or falsy."""
    parts = []
    if source:
        parts.append(source + ".")
    label = "scores" if learned is True else learned
    if label:
        parts.append(SCORE_CAPTIONS.get(label, f"{label}: the strategy's per-patch map, each image scaled to its "
                                               "own range."))
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
                             mask_ratio, seed, source)
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
