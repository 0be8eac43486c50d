"""Images: decoding any common file, the evaluation view, normalisation and the per-image transforms.

One place for the facts about pixels: the ImageNet mean/std used for folders and shards, the file
extensions read as images, how odd modes (16-bit, RGBA, palette) become RGB or L, and the torchvision
transforms applied to decoded images (random-resized-crop + flip for training, resize + centre crop
for evaluation). Batched augmentation of in-memory tensors lives in :mod:`clmae.data.augment`.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..errors import DataError
from .augment import sample_crop_box

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)
ORIENTATION = 0x0112  # the EXIF tag: how the stored pixels must be turned to be seen upright
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})  # decoded to one channel
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def default_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation for data whose statistics are not computed (folders, shards): ImageNet's for RGB."""
    return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GRAY_MEAN, GRAY_STD)


# ---------------------------------------------------------------------------------------------
# Pixels


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Deterministic evaluation view: ``uint8 (N, C, H, W)`` → floats in [0, 1] at ``size``×``size``."""
    x = images.float().div(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp_(0.0, 1.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x − mean) / std`` per channel of ``(N, C, H, W)`` images."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``x · std + mean`` per channel."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x * s + m


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of a uint8 image tensor, computed in chunks."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for chunk in images.split(4096):
        x = chunk.double().div(255.0).transpose(0, 1).reshape(c, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(max(v, 1e-3), 4) for v in std.tolist())


# ---------------------------------------------------------------------------------------------
# Finding and decoding files


def _scan(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def list_image_folder(root: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """``(files, labels, classes)`` of an ImageFolder layout (one sub-folder per class) or a flat folder.

    A flat folder (images directly in ``root``) is unlabeled: ``labels`` is None, ``classes`` empty.
    """
    if not root.exists():
        raise DataError(f"{root}: folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: is not a folder or a known dataset (digits, cifar10, *.npz)")
    direct = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels: list[int] | None = None
    classes: list[str] = []
    if subdirs and not direct:
        classes, labels = [d.name for d in subdirs], []
        for label, d in enumerate(subdirs):
            found = _scan(d)
            files += found
            labels += [label] * len(found)
    else:
        files = _scan(root)
    if not files:
        raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}); put images in the folder "
                        "or in one sub-folder per class")
    return files, labels, classes


class ImageTooLarge(ValueError):
    """More pixels than ``PIL.Image.MAX_IMAGE_PIXELS``: Pillow's decompression-bomb guard."""


def skip_reason(exc: BaseException) -> str:
    """``"category: detail"`` for a file that could not be used; the category is what gets counted."""
    from PIL import UnidentifiedImageError

    detail = f"{exc.__class__.__name__}: {str(exc)[:120]}"
    if isinstance(exc, (ImageTooLarge, Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too large: {detail} (Pillow's decompression-bomb guard; raise PIL.Image.MAX_IMAGE_PIXELS to allow)"
    if isinstance(exc, UnidentifiedImageError):
        return f"not an image: {detail}"
    if isinstance(exc, (OSError, SyntaxError, EOFError, ValueError, IndexError)):
        return f"truncated or corrupt: {detail}"
    return f"{exc.__class__.__name__}: {str(exc)[:120]}"


def _draft_size(width: int, height: int, min_side: int) -> tuple[int, int]:
    """The smallest size of the same aspect whose shorter side is at least ``min_side``."""
    short = min(width, height)
    return max(1, math.ceil(width * min_side / short)), max(1, math.ceil(height * min_side / short))


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: cameras store a portrait photo sideways with an EXIF orientation tag,
    which viewers apply (``ImageOps.exif_transpose``); images without one are returned as they are, uncopied."""
    if img.getexif().get(ORIENTATION, 1) in (0, 1):
        return img
    return ImageOps.exif_transpose(img)


@contextlib.contextmanager
def _opened(source, max_pixels: int | None) -> Iterator[Image.Image]:
    """The image file opened (header read, pixels not decoded), refused before decoding when over ``max_pixels``."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's harmless format warnings (EXIF, palette transparency, …)
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # …but never the size guard
        with Image.open(source) as img:
            if limit and img.width * img.height > limit:
                raise ImageTooLarge(f"{img.width}x{img.height} = {img.width * img.height} pixels > {limit}")
            yield img


def _as_mode(img: Image.Image, channels: int) -> Image.Image:
    """A decoded, upright image as RGB (or L): 16-bit and float scaled to 0..255, transparency on white."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if mode.startswith("I;16") or peak > 255:
            hi = 65535.0
        elif mode == "F" and peak <= 1.0:
            hi = 1.0  # float images in [0, 1]
        else:
            hi = 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    want = "RGB" if channels == 3 else "L"
    return img if img.mode == want else img.convert(want)


def open_image(path, channels: int = 3, min_side: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode any common image and convert it to RGB (or L): grayscale, RGBA, palette, 16-bit.

    The EXIF orientation is applied (:func:`upright`), so training, evaluation and pictures all see a
    phone's portrait upright. ``min_side``: images whose shorter side is over twice that are decoded at reduced scale
    (JPEG ``draft``, free) or box-reduced right after decoding, so a huge photo costs little memory
    downstream. ``max_pixels`` (default: ``PIL.Image.MAX_IMAGE_PIXELS``) refuses bigger images
    before decoding them; Pillow's own decompression-bomb error is never silenced.
    """
    with _opened(path, max_pixels) as img:
        if min_side and min(img.size) > 2 * min_side and img.format == "JPEG":
            img.draft(None, _draft_size(img.width, img.height, min_side))  # decode at 1/2, 1/4 or 1/8 scale
        img.load()
        out = _as_mode(upright(img), channels)
        if out is img:
            out = img.copy()  # the file closes on leaving; the pixels stay
    if min_side and min(out.size) >= 2 * min_side:
        out = out.reduce(min(out.size) // min_side)  # box filter: anti-aliased, shorter side stays >= min_side
    return out


# ---------------------------------------------------------------------------------------------
# The training view of a file: crop chosen first, JPEG decoded only as large as the crop needs

SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the stored image by 90 degrees
DCT_SCALES = (8, 4, 2)  # the reduced scales a JPEG decoder offers (1/8, 1/4, 1/2 in each direction)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of the image as seen (EXIF orientation applied), from the header alone."""
    turned = img.getexif().get(ORIENTATION, 1) in SWAPS_SIDES
    return (img.height, img.width) if turned else (img.width, img.height)


def dct_scale(crop_h: float, crop_w: float, size: int) -> int:
    """The largest JPEG reduction (8, 4, 2 or 1) at which the crop still spans at least ``size`` pixels each way.

    The crop is then only ever shrunk by the antialiased bicubic resampling, never enlarged, so the result matches
    the full decode within the tolerance :func:`open_for_crop` documents.
    """
    return next((s for s in DCT_SCALES if min(crop_h, crop_w) >= s * size), 1)


Box = tuple[float, float, float, float]  # top, left, height, width in pixels of the upright image


def open_for_crop(source, channels: int, size: int, box: Box | Callable[[int, int], Box], reduce: bool = True,
                  max_pixels: int | None = None) -> tuple[Image.Image, Box]:
    """Decode an image for one crop: ``(image, the crop's box in its pixels)``.

    ``box`` is the crop in the upright image's pixels, or a function of its ``(height, width)`` drawing one (the
    size is read from the header, before decoding). With ``reduce``, a JPEG is decoded at the smallest DCT scale
    (PIL ``draft``: 1/2, 1/4, 1/8) that keeps the crop at least ``size`` pixels on each side (:func:`dct_scale`),
    which costs a fraction of a full decode. Tolerance, tested on noisy photo-like JPEGs of several sizes, RGB,
    grayscale, CMYK and EXIF-rotated: the ``size``-pixel result differs from full decode + the same crop by at
    most 4 uint8 levels in mean absolute value (measured 0.4-3.6; saving those photos once more as JPEG at quality
    90 changes them by 1.8-4.1): the DCT's reduction is another low-pass filter than bicubic antialiasing.
    """
    with _opened(source, max_pixels) as img:
        return _decode_for_crop(img, channels, size, box, reduce)


def _decode_for_crop(img: Image.Image, channels: int, size: int, box: Box | Callable[[int, int], Box],
                     reduce: bool) -> tuple[Image.Image, Box]:
    """:func:`open_for_crop` on a file :func:`_opened` opened (header read, pixels not decoded yet)."""
    width, height = upright_size(img)
    top, left, h, w = box(height, width) if callable(box) else box
    scale = dct_scale(h, w, size) if reduce and img.format == "JPEG" else 1
    if scale > 1:
        img.draft(None, (img.width // scale, img.height // scale))
    img.load()
    out = _as_mode(upright(img), channels)
    if out is img:
        out = img.copy()
    fy, fx = out.height / height, out.width / width
    return out, (top * fy, left * fx, h * fy, w * fx)


def resample_crop(img: Image.Image, box: Box, size: int, flip: bool = False) -> torch.Tensor:
    """The box of ``img`` resampled (bicubic, antialiased) to ``size``×``size``, flipped if asked: ``uint8 (C, H, W)``.

    One Pillow call crops and resizes, reading only the box's pixels (and the filter's margin around it).
    """
    top, left, h, w = box
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(out))
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)


def crop_and_resize(img: Image.Image, box: Box, size: int, flip: bool = False) -> torch.Tensor:
    """The training crop a worker makes: the box cut out, then resized to ``size``×``size``: ``uint8 (C, H, W)``.

    torchvision's RandomResizedCrop does the same (cut, then resize); here the resize is torch's antialiased
    bicubic on ``uint8`` (Pillow's kernel, ``a = -0.5``), which costs less than half of Pillow's resampling of the
    same box (``benchmarks/loader.py``). Differs from :func:`resample_crop`, which reads the filter's margin
    beyond the box, only in the outermost rows and columns (tested). A box in fractions of a pixel (a JPEG
    decoded at reduced DCT scale, :func:`open_for_crop`) goes through :func:`resample_crop`.
    """
    if not all(float(v).is_integer() for v in box):
        return resample_crop(img, box, size, flip)
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w = (int(v) for v in box)
    x = torch.from_numpy(np.array(img.crop((left, top, left + w, top + h))))
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # channels-last strides: torch's fast uint8 kernel
    out = TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return (out.flip(-1) if flip else out).contiguous()


class Region(NamedTuple):
    """What a worker hands over when crops are resampled on the device: the pixels the crop's resampling reads."""

    pixels: torch.Tensor  # uint8 (C, h, w): the box plus the filter's reach around it, clipped to the image
    box: Box  # the crop in the region's pixels
    flip: bool


def crop_region(img: Image.Image, box: Box, size: int, flip: bool = False) -> Region:
    """The part of ``img`` that resampling ``box`` to ``size`` reads (:func:`resample_crop`): the box widened by
    the antialiased bicubic kernel's reach (2 output pixels' worth each side), clipped to the image."""
    top, left, h, w = box
    reach_y, reach_x = 2 * max(h / size, 1.0) + 1, 2 * max(w / size, 1.0) + 1
    y0, x0 = max(0, math.floor(top - reach_y)), max(0, math.floor(left - reach_x))
    y1, x1 = min(img.height, math.ceil(top + h + reach_y)), min(img.width, math.ceil(left + w + reach_x))
    x = torch.from_numpy(np.array(img.crop((x0, y0, x1, y1))))
    pixels = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    return Region(pixels, (top - y0, left - x0, h, w), flip)


class EncodedCrop(NamedTuple):
    """What a worker hands over when JPEGs are decoded on the device (``--decode-on device``): the file, unread,
    and the crop to take from it once decoded."""

    data: torch.Tensor  # uint8 (bytes,): the JPEG file as stored
    box: Box  # the crop in the decoded image's pixels
    flip: bool
    name: str  # the file's path (empty for a shard's sample), to report it if it does not decode


def decodable_on_device(img: Image.Image) -> bool:
    """Whether ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA) reads this opened file as Pillow would: a JPEG in
    YCbCr or grayscale (not CMYK), stored upright (no EXIF rotation to apply)."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(ORIENTATION, 1) in (0, 1)


def as_tensor(data: bytes) -> torch.Tensor:
    """A file's bytes as the ``uint8`` tensor torchvision.io decodes (a writable copy: frombuffer needs one)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def jpeg_decoder() -> Callable | None:
    """``torchvision.io.decode_jpeg`` where this torchvision has it (0.19 and later; 0.29 deprecates it in favour
    of TorchCodec), else None: then every file is decoded by Pillow."""
    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        return None
    return decode_jpeg


def decode_crops(files: Sequence[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int, channels: int,
                 device: torch.device) -> list[torch.Tensor | None]:
    """JPEG files decoded on ``device`` in one batched call (nvJPEG on CUDA, libjpeg-turbo on the CPU), each box
    cut and resized to ``size`` there (antialiased bicubic, as :func:`crop_and_resize`): ``uint8 (C, size, size)``
    per file, None for a file that would not decode (the others are decoded one by one then)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec (docs/training-…)
        try:
            decoded: list[torch.Tensor | None] = list(decode_jpeg(list(files), mode=mode, device=device))
        except RuntimeError:  # one corrupt file fails the batch: find it
            decoded = []
            for data in files:
                try:
                    decoded.append(decode_jpeg(data, mode=mode, device=device))
                except RuntimeError:
                    decoded.append(None)
    out: list[torch.Tensor | None] = []
    for img, (top, left, h, w), flip in zip(decoded, boxes.tolist(), flips.tolist()):
        if img is None:
            out.append(None)
            continue
        crop = TF.resized_crop(img, int(top), int(left), int(h), int(w), [size, size],
                               interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        out.append(crop.flip(-1) if flip else crop)
    return out


@dataclass(frozen=True)
class CropDecoder:
    """The training view of an image file in one pass, for DataLoader workers: RandomResizedCrop + flip.

    The crop is drawn from the size in the file's header (the distribution of torchvision's RandomResizedCrop,
    :func:`clmae.data.augment.sample_crop_box`). An upright YCbCr or grayscale JPEG whose crop needs no reduced
    decode goes straight into a tensor (:func:`decode_crops` on the CPU: libjpeg-turbo through torchvision.io,
    the box cut and resized there; no Pillow image, no copies); any other file is decoded by Pillow only as large
    as the crop needs (:func:`open_for_crop`), the box cut and resized to ``size`` (:func:`crop_and_resize`).
    Returns ``uint8 (C, size, size)``, or with ``on_device`` the :class:`Region` the crop needs, for
    :func:`clmae.data.augment.resample_regions` to resample a whole batch on the training device (the same random
    numbers are drawn either way, so the two give the same crops), or with ``decode_on_device`` an
    :class:`EncodedCrop` (the file's bytes and the box: :func:`decode_crops` decodes a batch of them on the training
    device, exactly as a worker would on the CPU) for every JPEG :func:`decodable_on_device` accepts. Random
    numbers come from a generator of its own per process: in a DataLoader worker seeded with the worker's seed
    (which the DataLoader derives from its generator), in the training process itself (no workers) with ``seed``,
    so an epoch's crops never depend on what else drew random numbers.
    """

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    flip: bool = True
    reduce: bool = True
    seed: int = 0
    on_device: bool = False
    decode_on_device: bool = False

    def generator(self) -> torch.Generator:
        """This process's generator, made on first use (a worker's copy of the decoder makes its own)."""
        own = self.__dict__.get("_generator")
        if own is None or own[0] != os.getpid():
            info = torch.utils.data.get_worker_info()
            own = (os.getpid(), torch.Generator().manual_seed(self.seed if info is None else info.seed))
            object.__setattr__(self, "_generator", own)
        return own[1]

    def draw_box(self, height: int, width: int) -> Box:
        """A RandomResizedCrop box ``(top, left, h, w)`` for an upright image of ``height`` x ``width``."""
        return sample_crop_box(height, width, self.scale, generator=self.generator())

    def __call__(self, source, channels: int = 3, max_pixels: int | None = None
                 ) -> torch.Tensor | Region | EncodedCrop:
        data = source.getvalue() if isinstance(source, io.BytesIO) else Path(source).read_bytes()
        with _opened(io.BytesIO(data), max_pixels) as img:  # the header is read once, whichever path decodes
            direct = decodable_on_device(img) and jpeg_decoder() is not None
            width, height = upright_size(img)
            # Box and flip before decoding, in this order on every path: a file that fails takes both.
            box = self.draw_box(height, width)
            flip = self.flip and bool(torch.rand(1, generator=self.generator()) < 0.5)
            if direct and self.decode_on_device:
                name = "" if isinstance(source, io.BytesIO) else str(source)
                return EncodedCrop(as_tensor(data), box, flip, name)
            if direct and not self.on_device and (not self.reduce or dct_scale(box[2], box[3], self.size) == 1):
                # Straight into a tensor (libjpeg-turbo through torchvision.io), the decode --decode-on device moves
                # to the GPU: no Pillow image, no copies between Pillow, numpy and torch.
                x = decode_crops([as_tensor(data)], torch.tensor([box]),
                                 torch.tensor([flip]), self.size, channels, torch.device("cpu"))[0]
                if x is None:
                    raise OSError("truncated or corrupt JPEG (torchvision.io.decode_jpeg failed)")
                return x
            img, box = _decode_for_crop(img, channels, self.size, box, self.reduce)
        if self.on_device:
            return crop_region(img, box, self.size, flip)
        return crop_and_resize(img, box, self.size, flip)

    def __getstate__(self) -> dict:  # a worker starts without the parent's generator
        return {k: v for k, v in self.__dict__.items() if k != "_generator"}


# ---------------------------------------------------------------------------------------------
# Per-image transforms (DataLoader workers)


def train_transform(size: int, scale: tuple[float, float] = (0.2, 1.0), flip: bool = True):
    """Random-resized-crop (bicubic) and horizontal flip of a PIL image to a ``uint8 (C, size, size)`` tensor."""
    from torchvision.transforms import v2

    steps = [v2.PILToTensor(),
             v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def eval_transform(size: int):
    """The deterministic evaluation view of a PIL image: shorter side to ``size`` (bicubic), centre crop."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(size),
    ])
