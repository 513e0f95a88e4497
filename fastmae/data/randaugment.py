"""RandAugment as the official MAE fine-tuning applies it (timm's ``rand-m9-mstd0.5-inc1``).

``main_finetune.py`` builds its training transform with timm's ``create_transform(auto_augment=
"rand-m9-mstd0.5-inc1", interpolation="bicubic")``: after the random-resized crop and the flip, two
of fifteen PIL operations, each applied with probability 0.5 at a magnitude drawn from N(9, 0.5)
clipped to [0, 10] (``inc1``: the variants whose strength grows with the magnitude), filling with
the ImageNet mean (124, 116, 104), resampling bicubic. These are timm's operations and draws
(an interop test gives the same images as timm for the same seeds), from generators of the
sample's own: a Python ``random.Random`` and a numpy ``RandomState``, seeded from the sample's
crop stream, so that the images do not depend on the workers and a resumed run sees the same ones.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0  # magnitudes are on timm's 0..10 scale
FILL = (124, 116, 104)  # round(255 * ImageNet mean), timm's img_mean for the ImageNet transform
RESAMPLE = Image.Resampling.BICUBIC


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=RESAMPLE, fillcolor=FILL)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * 3)  # RGB


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    if bits <= 0:  # magnitude 10 of PosterizeIncreasing: black, as PIL < 11 made it (11 refuses 0 bits)
        return img.point([0] * 768)
    return img if bits >= 8 else ImageOps.posterize(img, bits)


OPS: dict[str, Callable[..., Image.Image]] = {
    "AutoContrast": lambda img: ImageOps.autocontrast(img),
    "Equalize": lambda img: ImageOps.equalize(img),
    "Invert": lambda img: ImageOps.invert(img),
    "Rotate": lambda img, deg: img.rotate(deg, resample=RESAMPLE, fillcolor=FILL),
    "Posterize": _posterize,
    "Solarize": lambda img, thresh: ImageOps.solarize(img, thresh),
    "SolarizeAdd": _solarize_add,
    "Color": lambda img, f: ImageEnhance.Color(img).enhance(f),
    "Contrast": lambda img, f: ImageEnhance.Contrast(img).enhance(f),
    "Brightness": lambda img, f: ImageEnhance.Brightness(img).enhance(f),
    "Sharpness": lambda img, f: ImageEnhance.Sharpness(img).enhance(f),
    "ShearX": lambda img, f: _affine(img, (1, f, 0, 0, 1, 0)),
    "ShearY": lambda img, f: _affine(img, (1, 0, 0, f, 1, 0)),
    "TranslateXRel": lambda img, pct: _affine(img, (1, 0, pct * img.size[0], 0, 1, 0)),
    "TranslateYRel": lambda img, pct: _affine(img, (1, 0, 0, 0, 1, pct * img.size[1])),
}


def _negate(v: float, rng: random.Random) -> float:
    return -v if rng.random() > 0.5 else v


def _enhance(m: float, rng: random.Random) -> tuple:
    return ((m / LEVEL_DENOM) * 1.8 + 0.1,)


def _enhance_increasing(m: float, rng: random.Random) -> tuple:
    return (max(0.1, 1.0 + _negate((m / LEVEL_DENOM) * 0.9, rng)),)


def _posterize_level(m: float, rng: random.Random) -> tuple:
    return (int((m / LEVEL_DENOM) * 4),)


def _solarize_level(m: float, rng: random.Random) -> tuple:
    return (min(256, int((m / LEVEL_DENOM) * 256)),)


# name -> (operation, magnitude -> its arguments): timm's LEVEL_TO_ARG
LEVELS: dict[str, tuple[str, Callable[[float, random.Random], tuple]]] = {
    "AutoContrast": ("AutoContrast", lambda m, rng: ()),
    "Equalize": ("Equalize", lambda m, rng: ()),
    "Invert": ("Invert", lambda m, rng: ()),
    "Rotate": ("Rotate", lambda m, rng: (_negate((m / LEVEL_DENOM) * 30.0, rng),)),
    "Posterize": ("Posterize", _posterize_level),
    "PosterizeIncreasing": ("Posterize", lambda m, rng: (4 - _posterize_level(m, rng)[0],)),
    "Solarize": ("Solarize", _solarize_level),
    "SolarizeIncreasing": ("Solarize", lambda m, rng: (256 - _solarize_level(m, rng)[0],)),
    "SolarizeAdd": ("SolarizeAdd", lambda m, rng: (min(128, int((m / LEVEL_DENOM) * 110)),)),
    **{name: (name, _enhance) for name in ("Color", "Contrast", "Brightness", "Sharpness")},
    **{name + "Increasing": (name, _enhance_increasing) for name in ("Color", "Contrast", "Brightness", "Sharpness")},
    "ShearX": ("ShearX", lambda m, rng: (_negate((m / LEVEL_DENOM) * 0.3, rng),)),
    "ShearY": ("ShearY", lambda m, rng: (_negate((m / LEVEL_DENOM) * 0.3, rng),)),
    "TranslateXRel": ("TranslateXRel", lambda m, rng: (_negate((m / LEVEL_DENOM) * 0.45, rng),)),
    "TranslateYRel": ("TranslateYRel", lambda m, rng: (_negate((m / LEVEL_DENOM) * 0.45, rng),)),
}
_COMMON = ["ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in their order (the draws index them)
TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
              "Contrast", "Brightness", "Sharpness", *_COMMON]  # fmt: skip
INCREASING = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
              "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
              *_COMMON]  # fmt: skip


@dataclass(frozen=True)
class RandAugment:
    """A policy: ``num_layers`` operations a picture, each with probability ``prob`` at a magnitude
    of N(``magnitude``, ``magnitude_std``) clipped to [0, 10]; ``increasing``: the variants that
    grow with the magnitude."""

    magnitude: float = 10.0  # timm's defaults, for the sections a policy string leaves out
    num_layers: int = 2
    magnitude_std: float = 0.0
    prob: float = 0.5
    increasing: bool = False

    @classmethod
    def parse(cls, spec: str) -> RandAugment:
        """timm's config string: ``rand`` then dash-separated ``m<M>``, ``n<N>``, ``mstd<S>``, ``p<P>``,
        ``inc<0|1>`` (``rand-m9-mstd0.5-inc1``, the official fine-tuning's), what it leaves out at
        timm's defaults (m10, n2, mstd0, p0.5, inc0). A ValueError says what is wrong; timm's other
        keys (``mmax``, ``t``) are not taken."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"a RandAugment policy starts with 'rand' (rand-m9-mstd0.5-inc1), got {spec!r}")
        values: dict = {}
        for part in parts[1:]:
            m = re.fullmatch(r"(mstd|m|n|p|inc)(\d+(?:\.\d*)?)", part)
            if m is None:
                raise ValueError(f"unknown RandAugment section {part!r} in {spec!r} (m, n, mstd, p, inc)")
            key, val = m.groups()
            if key in ("m", "n", "inc") and not val.isdigit():  # timm's int() refuses these too
                raise ValueError(f"RandAugment section {part!r} of {spec!r} takes an integer")
            if key == "mstd":
                values["magnitude_std"] = math.inf if float(val) > 100 else float(val)
            elif key == "m":
                values["magnitude"] = float(val)
            elif key == "n":
                values["num_layers"] = int(val)
            elif key == "p":
                values["prob"] = float(val)
            else:
                values["increasing"] = bool(int(val))
        return cls(**values)

    def __call__(self, img: Image.Image, rng: random.Random, np_rng: np.random.RandomState) -> Image.Image:
        """``img`` (RGB) through ``num_layers`` operations picked with replacement, drawing as timm's
        ``RandAugment`` does from the global generators (here ``rng`` and ``np_rng``)."""
        names = INCREASING if self.increasing else TRANSFORMS
        for k in np_rng.choice(len(names), self.num_layers, replace=True):
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            magnitude = self.magnitude
            if self.magnitude_std == math.inf:
                magnitude = rng.uniform(0, magnitude)
            elif self.magnitude_std > 0:
                magnitude = rng.gauss(magnitude, self.magnitude_std)
            magnitude = max(0.0, min(magnitude, LEVEL_DENOM))
            op, level = LEVELS[names[k]]
            img = OPS[op](img, *level(magnitude, rng))
        return img


def sample_rngs(seed64: int) -> tuple[random.Random, np.random.RandomState]:
    """A sample's two generators for :class:`RandAugment`, from a 64-bit seed."""
    return random.Random(seed64), np.random.RandomState(seed64 & 0xFFFFFFFF)
