"""Masks, scores and images as pictures: tensor drawings and matplotlib grids, shared by every picture clmae makes.

The array helpers are pure and matplotlib-free; figures are drawn with the Agg backend through
:class:`matplotlib.figure.Figure`, never pyplot, so nothing global changes.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CELL = 1.5  # inches per panel
DPI = 100
HEADER = 0.5  # inches above the grid for column titles
NOTE = 0.2  # inches under each panel for its note
CAPTION_FONT = 7.5
HIDDEN_DIM = 0.25  # hidden patches keep this much of their content under the stripes
HIDDEN_STRIPES = (0.35, 0.7)  # grey levels of the stripes drawn over hidden patches
OVERLAY_MIN_SIZE = 64  # masks are drawn on images enlarged to at least this many pixels


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


