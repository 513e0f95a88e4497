"""Test bed for tests/ and benchmarks/ (pytest-benchmark entries): CPU-first. Without CUDA, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is created, so it is set here,
before anything imports ``fastmae.kernels``.
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
