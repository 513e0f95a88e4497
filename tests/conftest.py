"""Fixtures the trainer's test modules share (``tests/training.py`` has their helpers).

``one_thread`` is not autouse: a module of tiny runs asks for it with
``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastmae.data import make_demo_dataset


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and OpenMP threads spin badly on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """64 small JPEGs in an ImageFolder tree."""
    return make_demo_dataset(tmp_path_factory.mktemp("tiny_data"), n_images=64, size=40, seed=0)
