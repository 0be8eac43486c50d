"""ColorMAE (Hinojosa, Liu, Ghanem, "ColorMAE: Exploring data-independent masking strategies in Masked
AutoEncoders", ECCV 2024): masks cut from filtered ("coloured") random noise.

The masks never look at the image. Each is a ``g × g`` window of a noise texture, one texel per
patch, randomly placed and flipped; the K patches with the *largest* noise values stay visible (a
top-K, so the count is exact). The noise's spectrum shapes the masks: red noise (low-pass) gives
large holes, blue (high-pass) evenly spread single patches, green (band-pass, the paper's best)
medium blobs at a regular spacing, purple (band-stop) clumps mixed with speckle. White noise is
plain MAE and serves as a control. No network, no loss: masks cost a gather and a top-K.

The authors ship the noise as pre-generated files. clmae makes its own, at any grid size: white
Gaussian noise filtered in the Fourier domain (exact circular filtering, so the textures tile and
any crop offset is valid) with Gaussian filters whose widths are options, in patches, then
standardised. The bank depends only on its options and seed; it is built once per process
(cached) and never saved: a resume rebuilds the same bank. Deviations from the authors' code are
listed in docs/masking-strategies.md.
"""

from __future__ import annotations

import functools
import math

import torch

from ..errors import ConfigError
from .base import Masker, MaskingBatch
from .indices import topk_keep_indices
from .options import ColormaeOptions

MIN_TEXTURE = 256  # the smallest automatic texture side, in patches


def gaussian_transfer(freq: torch.Tensor, sigma: float) -> torch.Tensor:
    """The spectrum of a Gaussian blur of std ``sigma`` (patches) at radial frequency ``freq`` (cycles/patch)."""
    return torch.exp(-2.0 * math.pi**2 * sigma**2 * freq.pow(2))


def noise_transfer(color: str, freq: torch.Tensor, o: ColormaeOptions) -> torch.Tensor:
    """The filter of each colour at radial frequency ``freq``: what it keeps of white noise's flat spectrum."""
    if color == "white":
        return torch.ones_like(freq)
    if color == "red":  # low-pass
        return gaussian_transfer(freq, o.sigma_red)
    if color == "blue":  # high-pass: the complement of a blur
        return 1.0 - gaussian_transfer(freq, o.sigma_blue)
    band = gaussian_transfer(freq, o.sigma_green_inner) - gaussian_transfer(freq, o.sigma_green_outer)
    if color == "green":  # band-pass: a weak blur minus a strong one (difference of Gaussians)
        return band
    if color == "purple":  # band-stop: the complement of the (peak-normalised) band-pass
        return 1.0 - band / band.max()
    raise ValueError(f"unknown noise colour {color!r}")


def default_texture_size(grid: int) -> int:
    """``max(256, the power of two >= 8·grid)``: many independent windows per texture at any grid."""
    return max(MIN_TEXTURE, 1 << max(0, math.ceil(math.log2(8 * grid))))


def rank_normalise(x: torch.Tensor) -> torch.Tensor:
    """Each texture's values replaced by their ranks, mapped to [-1/2, 1/2) (a uniform histogram)."""
    flat = x.flatten(1)
    ranks = flat.argsort(dim=1).argsort(dim=1).to(x.dtype)
    return ((ranks + 0.5) / flat.shape[1] - 0.5).view_as(x)


@functools.lru_cache(maxsize=8)
def noise_bank(color: str, count: int, size: int, sigmas: tuple[float, float, float, float], passes: int,
               seed: int) -> torch.Tensor:
    """``count`` standardised ``size × size`` textures of coloured noise ``(T, S, S)``, fp32 on the CPU.

    White Gaussian noise, filtered ``passes`` times with the colour's filter, rank-normalised between
    passes (filter, renormalise, repeat: each pass sharpens the band the masks' ranking sees).
    Cached per process (the same arguments give the same tensor; callers must not modify it).
    ``sigmas``: red, blue, green inner, green outer, in patches.
    """
    o = ColormaeOptions(color=color, sigma_red=sigmas[0], sigma_blue=sigmas[1], sigma_green_inner=sigmas[2],
                        sigma_green_outer=sigmas[3])
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, size, size, generator=g, dtype=torch.float64)
    f = torch.fft.fftfreq(size, dtype=torch.float64)
    transfer = noise_transfer(color, (f.view(-1, 1).pow(2) + f.view(1, -1).pow(2)).sqrt(), o)
    for i in range(passes):
        if i:
            noise = rank_normalise(noise)
        noise = torch.fft.ifft2(torch.fft.fft2(noise) * transfer).real
    noise = noise - noise.mean(dim=(1, 2), keepdim=True)
    noise = noise / noise.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return noise.float()


class ColorNoiseMasker(Masker):
    """ColorMAE's masking: each image keeps the patches where a random window of coloured noise is highest.

    Options (``--colormae-*``): the colour (green by default, as the paper), the filters' widths in
    patches, the bank's size and seed (default: the run's ``--seed``).
    """

    mask_label = "ColorMAE mask"
    score_label = "noise"

    def __init__(self, grid: int, options: ColormaeOptions | None = None, seed: int = 0):
        super().__init__()
        o = (options or ColormaeOptions()).validate()
        self.grid, self.color = grid, o.color
        size = o.texture_size or default_texture_size(grid)
        if size < grid:
            raise ConfigError(f"--colormae-texture-size: got {size}, expected at least the patch grid's side {grid}")
        sigmas = (o.sigma_red, o.sigma_blue, o.sigma_green_inner, o.sigma_green_outer)
        seed = seed if o.noise_seed is None else o.noise_seed
        # Derived from the options alone: rebuilt identically on resume, so not saved (persistent=False).
        self.register_buffer("bank", noise_bank(o.color, o.textures, size, sigmas, o.passes, seed), persistent=False)

    def windows(self, batch: MaskingBatch) -> torch.Tensor:
        """One ``g × g`` window of the bank per image, flattened ``(N, L)``: texture, offset and flips drawn
        for the global batch (5 numbers per image), crops wrapping around the periodic texture."""
        count, size = self.bank.shape[0], self.bank.shape[1]
        u = batch.global_rand(5).to(self.bank.device)
        texture = (u[:, 0] * count).long().clamp_max(count - 1)
        top = (u[:, 1] * size).long().clamp_max(size - 1)
        left = (u[:, 2] * size).long().clamp_max(size - 1)
        steps = torch.arange(self.grid, device=self.bank.device)
        rows = (top.unsqueeze(1) + steps) % size  # (N, g)
        cols = (left.unsqueeze(1) + steps) % size
        cols = torch.where((u[:, 3] < 0.5).unsqueeze(1), cols.flip(1), cols)  # horizontal flip
        rows = torch.where((u[:, 4] < 0.5).unsqueeze(1), rows.flip(1), rows)  # vertical flip
        window = self.bank[texture.view(-1, 1, 1), rows.unsqueeze(2), cols.unsqueeze(1)]
        return window.flatten(1).to(batch.device)

    def keep_indices(self, batch: MaskingBatch) -> torch.Tensor:
        return topk_keep_indices(self.windows(batch), batch.num_keep)  # the highest noise stays visible

    def scores(self, batch: MaskingBatch) -> torch.Tensor:
        """The noise windows the next :meth:`keep_indices` call will cut (the generator is restored)."""
        g = batch.generator
        state = g.get_state() if g is not None else torch.get_rng_state()
        try:
            return self.windows(batch)
        finally:
            if g is not None:
                g.set_state(state)
            else:
                torch.set_rng_state(state)
