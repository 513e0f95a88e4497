"""pytest for ``benchmarks/`` (run only when named: ``pytest benchmarks/ --benchmark-json=out.json``).

The repository's ``testpaths`` is ``tests``, so ``python -m pytest`` never collects these. As in
``tests/conftest.py``: without CUDA the Triton kernels run under the interpreter (set before any
``@triton.jit`` is created) and ``gpu``-marked benchmarks are skipped.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    return DEVICE
