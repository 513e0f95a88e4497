"""Fixtures for the data tests: small generated image sets in tmp folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmae.data.testdata import make_demo_dataset, write_odd_files


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """40 structured 64 x 48 JPEGs in an ImageFolder tree (4 classes)."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_images=40, size=(64, 48), seed=0)


def translucent(rgb: Image.Image) -> Image.Image:
    """``rgb`` with an alpha channel that takes every value 0..255 (transparent to opaque): loaders
    that drop alpha, as documented, give back ``rgb``; compositing over any background would not."""
    a = np.asarray(rgb)
    h, w, _ = a.shape
    alpha = (np.arange(h * w, dtype=np.int64).reshape(h, w) * 37 % 256).astype(np.uint8)
    return Image.fromarray(np.dstack([a, alpha]), "RGBA")


@pytest.fixture(scope="session")
def odd_files(tmp_path_factory) -> dict[str, Path]:
    """The bad-input matrix; its ``rgba`` PNG made semi-transparent (``write_odd_files`` writes an
    opaque one, where dropping alpha and compositing agree)."""
    files = write_odd_files(tmp_path_factory.mktemp("odd"))
    with Image.open(files["reference"]) as ref:
        translucent(ref.convert("RGB")).save(files["rgba"], format="PNG")
    return files
