"""The MAE pretraining augmentation, shared by every backend.

``RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic)`` + horizontal flip
(p = 0.5) + ImageNet mean/std normalisation, CHW float. The crop parameters follow torchvision's
``RandomResizedCrop.get_params`` (10 tries, then the centre-crop fallback) and the flip is
torchvision's ``rand < p``, both drawn from an explicit stream, so both backends (the DALI one
gets its parameters from here) crop the same window. The loaders' stream is
:class:`~fastmae.data.sampling.SampleRandom`; given a ``torch.Generator`` instead, the draws are
torchvision's own, one-element torch ops in its order and float32 rounding, so with the same
generator state this module and torchvision crop the same window (tested).

Images are read with PIL and converted to RGB: CMYK, grayscale, palette and RGBA (alpha dropped,
as torchvision's loader does) via ``Image.convert``; 16-bit grayscale by keeping the top 8 bits
(``Image.convert`` would clip it to white).

No EXIF rotation: images are used as stored, whatever their Orientation tag says (PIL's loader
and DALI's decoder with ``adjust_orientation=False`` agree on that for JPEG, PNG and WebP).
PIL's TIFF plugin is the exception: it reports the rotated size of an Orientation 5-8 TIFF and
transposes every Orientation 2-8 TIFF when loading it, so :func:`load_rgb` undoes that transpose
and :func:`header_size` gives the stored size.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image

from fastmae.data.sampling import SampleRandom

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP_P = 0.5


def _torchvision_functional():
    try:  # torchvision is optional; a mismatched build raises at import (e.g. missing torchvision::nms)
        import torchvision.transforms.functional as tf
        from torchvision.transforms import InterpolationMode

        return tf, InterpolationMode
    except Exception:
        return None


_TV = _torchvision_functional()


@dataclass(frozen=True)
class CropParams:
    """One sample's augmentation: crop window ``[top:top+height, left:left+width]`` and flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


@functools.lru_cache(maxsize=8)
def _log_ratio(ratio: tuple[float, float]) -> torch.Tensor:
    return torch.log(torch.tensor(ratio))


class _TorchDraws:
    """A ``torch.Generator`` drawing as torchvision's ``RandomResizedCrop`` and flip do."""

    __slots__ = ("g",)

    def __init__(self, generator: torch.Generator):
        self.g = generator

    def uniform(self, low: float, high: float) -> float:
        return torch.empty(1).uniform_(low, high, generator=self.g).item()

    def log_uniform(self, low: float, high: float) -> float:
        # log bounds and exp in float32 as torchvision does: a float64 exp can round a boundary
        # case differently
        log_ratio = _log_ratio((low, high))
        return torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=self.g)).item()

    def randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, size=(1,), generator=self.g).item())

    def random(self) -> float:
        return torch.rand(1, generator=self.g).item()


def _draws(generator: torch.Generator | SampleRandom) -> _TorchDraws | SampleRandom:
    return _TorchDraws(generator) if isinstance(generator, torch.Generator) else generator


def rrc_params(
    height: int,
    width: int,
    generator: torch.Generator | SampleRandom,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``, drawing from ``generator``.

    ``generator``: a :class:`~fastmae.data.sampling.SampleRandom` (the loaders' stream) or a
    ``torch.Generator`` (torchvision's draws, value for value).

    Returns ``(top, left, crop_height, crop_width)``.
    """
    draws = _draws(generator)
    area = height * width
    for _ in range(10):
        target_area = area * draws.uniform(scale[0], scale[1])
        aspect_ratio = draws.log_uniform(ratio[0], ratio[1])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = draws.randint(0, height - h + 1)
            j = draws.randint(0, width - w + 1)
            return i, j, h, w
    # Fallback to central crop
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(
    height: int,
    width: int,
    generator: torch.Generator | SampleRandom,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    flip_p: float = FLIP_P,
) -> CropParams:
    """Crop window then flip, drawn in torchvision's order from one stream (see :func:`rrc_params`)."""
    draws = _draws(generator)
    top, left, h, w = rrc_params(height, width, draws, scale, ratio)
    flip = draws.random() < flip_p
    return CropParams(top, left, h, w, flip)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB (see the module docstring for the odd modes)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img)
        if a.dtype != np.uint8:
            a = (a.astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        img = Image.fromarray(a, mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


_ORIENTATION = ExifTags.Base.Orientation
# the transpose that undoes what ImageOps.exif_transpose does for each Orientation value
_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Read and fully decode an image file as RGB, as stored (no EXIF rotation); raises on
    anything unreadable or truncated."""
    with Image.open(path) as img:
        orientation = img.getexif().get(_ORIENTATION) if img.format == "TIFF" else None
        img.load()
        # PIL's TIFF plugin transposes on load and then drops the tag (the Exif object is cached,
        # so this reads the state after load); undo only a transpose that happened
        undo = _UNDO_ORIENTATION.get(orientation) if _ORIENTATION not in img.getexif() else None
        rgb = to_rgb(img)
    return rgb.transpose(undo) if undo is not None else rgb


def header_size(img: Image.Image) -> tuple[int, int]:
    """``(height, width)`` of an opened, not yet loaded image as stored (no EXIF rotation)."""
    w, h = img.size
    if img.format == "TIFF" and img.tag_v2.get(_ORIENTATION) in (5, 6, 7, 8):
        w, h = h, w  # PIL's TIFF plugin reports the size after its rotation on load
    return h, w


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` from the header only (no EXIF rotation, like :func:`load_rgb`)."""
    with Image.open(path) as img:
        return header_size(img)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def augment(
    img: Image.Image,
    params: CropParams,
    size: int,
    use_torchvision: bool | None = None,
    then: Callable[[Image.Image], Image.Image] | None = None,
) -> torch.Tensor:
    """Crop, resize (bicubic, PIL), flip, normalise one RGB image (``then``, e.g. RandAugment, on the
    flipped picture before it is normalised, as timm's transform).

    Args:
        img: RGB PIL image.
        params: from :func:`sample_params` on this image's size.
        size: output side S.
        use_torchvision: run torchvision's functional ops (default: when they import). The PIL
            path is the same arithmetic; tests check they agree.

    Returns:
        ``(3, S, S)`` float32, ImageNet-normalised.
    """
    if use_torchvision is None:
        use_torchvision = _TV is not None
    p = params
    if use_torchvision:
        if _TV is None:
            raise RuntimeError("torchvision is not importable here")
        tf, mode = _TV
        img = tf.resized_crop(img, p.top, p.left, p.height, p.width, [size, size], mode.BICUBIC)
        if p.flip:
            img = tf.hflip(img)
        if then is not None:
            img = then(img)
        return tf.normalize(tf.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)
    img = img.crop((p.left, p.top, p.left + p.width, p.top + p.height)).resize((size, size), Image.Resampling.BICUBIC)
    if p.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if then is not None:
        img = then(img)
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return _normalize(x)
