"""Batched augmentation of in-memory images on the training device: random-resized-crop and flip.

The same crop distribution as torchvision's ``RandomResizedCrop``, drawn for a whole batch and
applied in one bicubic ``grid_sample``, so data never holds up a small run. All random numbers
come from a CPU generator, so runs are reproducible on any device and distributed runs can draw
for the global batch and apply each rank's rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_crop_boxes(
    n: int, height: int, width: int, generator: torch.Generator | None, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
    tries: int = 10
) -> torch.Tensor:
    """RandomResizedCrop boxes for a batch, ``(N, 4)`` as ``(top, left, h, w)`` in pixels.

    ``generator=None`` draws from torch's global generator (a DataLoader worker's, seeded per worker).

    Same distribution as torchvision's RandomResizedCrop: area fraction uniform in ``scale``,
    log-aspect uniform in ``ratio``, up to ``tries`` attempts, else the whole image.
    """
    area = height * width * torch.empty(n, tries).uniform_(*scale, generator=generator)
    log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    h = torch.where(first >= 0, h[rows, first.clamp_min(0)], torch.full((n,), float(height)))
    w = torch.where(first >= 0, w[rows, first.clamp_min(0)], torch.full((n,), float(width)))
    top = torch.floor(torch.rand(n, generator=generator) * (height - h + 1))
    left = torch.floor(torch.rand(n, generator=generator) * (width - w + 1))
    return torch.stack([top, left, h, w], dim=1)


def sample_crop_box(height: int, width: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), tries: int = 10,
                    generator: torch.Generator | None = None) -> tuple[float, float, float, float]:
    """One image's RandomResizedCrop box ``(top, left, h, w)``: :func:`sample_crop_boxes` for ``n = 1``.

    The same random numbers, in the same order, turned into the box with plain arithmetic: a worker draws one box
    per image, where two dozen tensor operations on one element would cost as much as a tenth of its decode.
    """
    area = torch.empty(1, tries).uniform_(*scale, generator=generator)[0].tolist()
    log_r = torch.empty(1, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)[0].tolist()
    h, w = float(height), float(width)
    for a, lr in zip(area, log_r):
        aspect = math.exp(lr)
        cw, ch = round(math.sqrt(height * width * a * aspect)), round(math.sqrt(height * width * a / aspect))
        if 0 < cw <= width and 0 < ch <= height:
            h, w = float(ch), float(cw)
            break
    top_u, left_u = torch.rand(2, generator=generator).tolist()
    return math.floor(top_u * (height - h + 1)), math.floor(left_u * (width - w + 1)), h, w


def random_resized_crop_flip(
    images: torch.Tensor, size: int, generator: torch.Generator, scale=(0.2, 1.0), flip: bool = True
) -> torch.Tensor:
    """Batched random-resized-crop (bicubic) and horizontal flip of ``uint8 (N, C, H, W)`` images.

    Returns floats in [0, 1] of shape ``(N, C, size, size)``. Every image gets its own crop; all
    random numbers come from ``generator`` (on the CPU), so runs are reproducible on any device.
    """
    n, _, height, width = images.shape
    boxes = sample_crop_boxes(n, height, width, generator, scale)
    flips = (torch.rand(n, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    return crop_flip(images, boxes, flips, size)


def crop_flip(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Resample given crop boxes ``(N, 4)`` (top, left, h, w) and flips ``(N,)`` to ``size``×``size``.

    One bicubic ``grid_sample`` for the whole batch. Split from the sampling so that distributed
    runs can draw the random numbers for the global batch and apply each rank's rows.
    """
    n, _, height, width = images.shape
    top, left, h, w = boxes.unbind(1)
    # Affine map from output coords in [-1, 1] to input coords (align_corners=False convention).
    sx, sy = w / width, h / height
    cx = (left + w / 2) / width * 2 - 1
    cy = (top + h / 2) / height * 2 - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flips, -sx, sx)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    theta = theta.to(images.device)
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    x = images.float().div_(255.0)
    out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Crops of decoded images resampled on the device (workers only decode)


def _bicubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """The bicubic convolution kernel with Pillow's ``a = -0.5`` (zero beyond ±2)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, valid: torch.Tensor, in_len: int,
                     size: int) -> torch.Tensor:
    """``(N, size, in_len)`` weights that resample the span ``[start, start + length)`` of each row to ``size``.

    Antialiased bicubic as Pillow computes it: output pixel ``i`` is centred at ``start + (i + ½)·scale``, the
    kernel is widened by the downscale factor (``max(scale, 1)``), pixels past ``valid`` (the image's edge, where
    Pillow stops) get no weight, and each output's weights sum to one.
    """
    scale = (length / size).to(torch.float32)
    widen = scale.clamp_min(1.0)
    steps = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    center = start.to(torch.float32)[:, None] + steps[None] * scale[:, None]
    pixels = torch.arange(in_len, device=start.device, dtype=torch.float32)
    w = _bicubic((pixels[None, None] + 0.5 - center[:, :, None]) / widen[:, None, None])
    w = w * (pixels[None, None] < valid.to(torch.float32)[:, None, None])
    return w / w.sum(-1, keepdim=True).clamp_min(1e-12)


def resample_regions(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, sizes: torch.Tensor,
                     size: int) -> torch.Tensor:
    """Batched :func:`clmae.data.images.resample_crop` on the device: floats in [0, 255], ``(N, C, size, size)``.

    ``images`` ``uint8 (N, C, H, W)`` holds each image's region (padded to the batch's largest), ``sizes`` the
    valid ``(h, w)`` of each, ``boxes`` ``(top, left, h, w)`` the crop in it, ``flips`` which to mirror. Two
    batched matrix products per batch (rows, then columns) instead of one Pillow call per image in a worker.
    Matches Pillow's result within a fraction of a uint8 level (tested); Pillow rounds to 8 bits between passes.
    """
    _, _, height, width = images.shape
    boxes = boxes.to(images.device, torch.float32)
    sizes = sizes.to(images.device)
    rows = resample_weights(boxes[:, 0], boxes[:, 2], sizes[:, 0], height, size)  # (N, size, H)
    cols = resample_weights(boxes[:, 1], boxes[:, 3], sizes[:, 1], width, size)  # (N, size, W)
    cols = torch.where(flips.to(images.device)[:, None, None], cols.flip(1), cols)
    x = torch.matmul(images.float(), cols.transpose(1, 2).unsqueeze(1))  # (N, C, H, size)
    return torch.matmul(rows.unsqueeze(1), x).clamp_(0.0, 255.0)
