"""BEiT's blockwise masking (Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022), at the
MAE's mask ratio.

Rectangles of random area (at least ``min_patches``) and log-uniform aspect ratio are hidden one
after another until the target count is reached; a block is accepted only if it hides at least
one new patch and no more than are still needed, so the count never overshoots. BEiT stops when
ten tries in a row fail, which can leave a mask a few patches short; clmae needs exactly
``M = L − K`` hidden patches per image, so it then goes on with smaller blocks (``min_patches =
1``) and, if even those fail, hides the last few patches uniformly at random among the visible
ones (listed in docs/masking-strategies.md as a deviation).

Every image's mask comes from its own seed, drawn for the global batch from the run's shared
generator, so N ranks mask exactly like one process and resume repeats the same masks.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ..runtime import to_device
from .base import Masker, MaskingBatch
from .indices import keep_from_mask
from .options import BlockOptions

ATTEMPTS = 10  # tries per block before giving up (BEiT's)


def default_min_patches(grid: int) -> int:
    """Smallest block area: ``(grid // 3)²`` (16 on BEiT's 14×14 grid, as its scripts use), at least 1."""
    return max(1, (grid // 3) ** 2)


@dataclass
class BlockMask:
    """One image's mask: ``hidden`` cells as a row-major flat list of bools, the blocks placed
    ``(top, left, height, width)`` and how many cells the uniform top-up had to add."""

    hidden: list[bool]
    blocks: list[tuple[int, int, int, int]]
    topped_up: int


def block_mask(height: int, width: int, num_hidden: int, rng: random.Random, min_patches: int,
               max_patches: int | None = None, min_aspect: float = 0.3) -> BlockMask:
    """A mask of exactly ``num_hidden`` hidden cells on a ``height × width`` grid, made of blocks."""
    rows = [0] * height  # one bit per hidden cell of each row (bit c = column c)
    blocks: list[tuple[int, int, int, int]] = []
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)

    def place(budget: int, smallest: int) -> int:
        """One block hiding between 1 and ``budget`` new cells; the number hidden (0: all tries failed)."""
        for _ in range(ATTEMPTS):
            area = rng.uniform(smallest, budget)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < height and 0 < w < width):  # BEiT: strictly smaller than the grid
                continue
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            bits = ((1 << w) - 1) << left
            new = sum((bits & ~rows[r]).bit_count() for r in range(top, top + h))
            if 0 < new <= budget:
                for r in range(top, top + h):
                    rows[r] |= bits
                blocks.append((top, left, h, w))
                return new
        return 0

    count = 0
    for smallest, cap in ((min_patches, max_patches), (1, None)):  # BEiT's blocks, then smaller ones
        while count < num_hidden:
            added = place(min(num_hidden - count, cap or num_hidden), smallest)
            if added == 0:
                break
            count += added
    hidden = [bool(rows[r] >> c & 1) for r in range(height) for c in range(width)]
    topped_up = num_hidden - count
    if topped_up:  # rare: no block fits any more
        for i in rng.sample([i for i, h in enumerate(hidden) if not h], topped_up):
            hidden[i] = True
    return BlockMask(hidden, blocks, topped_up)


class BlockMasker(Masker):
    """BEiT blockwise masking: each image hides rectangular blocks of patches, exactly ``L − K`` in all.

    Options (``--block-min-patches``, ``--block-max-patches``, ``--block-min-aspect``) are BEiT's
    ``min_num_patches`` (default ``(grid // 3)²``, BEiT's 16 on 14×14), ``max_num_patches`` (None:
    no limit) and ``min_aspect`` (0.3; aspect ratios between it and its inverse).
    """

    mask_label = "block mask"

    def __init__(self, grid: int, options: BlockOptions | None = None):
        super().__init__()
        o = (options or BlockOptions()).validate()
        self.grid = grid
        self.min_patches = o.min_patches or default_min_patches(grid)
        self.max_patches = o.max_patches
        self.min_aspect = o.min_aspect

    def masks(self, seeds: list[int], num_hidden: int) -> list[BlockMask]:
        return [block_mask(self.grid, self.grid, num_hidden, random.Random(s), self.min_patches, self.max_patches,
                           self.min_aspect) for s in seeds]

    def keep_indices(self, batch: MaskingBatch) -> torch.Tensor:
        n = batch.size
        seeds = torch.randint(0, 2**62, (n * batch.dist.world_size,), generator=batch.generator)
        masks = self.masks(seeds[batch.dist.rows(n)].tolist(), batch.num_hidden)
        hidden = torch.tensor([m.hidden for m in masks], dtype=torch.float32)
        return to_device(keep_from_mask(hidden), batch.device)
