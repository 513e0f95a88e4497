"""Fixtures for the data tests: small generated image sets in tmp folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastmae.data.testdata import make_demo_dataset, write_odd_files


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """40 structured 64 x 48 JPEGs in an ImageFolder tree (4 classes)."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_images=40, size=(64, 48), seed=0)


@pytest.fixture(scope="session")
def odd_files(tmp_path_factory) -> dict[str, Path]:
    return write_odd_files(tmp_path_factory.mktemp("odd"))
