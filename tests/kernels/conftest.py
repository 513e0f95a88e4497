"""Kernel test helpers: NaN-poisoned outputs, the three-way tolerance rule, a readable assertion."""

from __future__ import annotations

import collections
import importlib
import zlib
from collections.abc import Callable

import pytest
import torch

from fastmae.kernels import _utils

LOW_DTYPES = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every launcher allocates its outputs filled with NaN, so an unwritten element fails."""
    monkeypatch.setattr(_utils, "POISON_OUTPUTS", True)


def _first_indices(bad: torch.Tensor, limit: int = 5) -> list[tuple[int, ...]]:
    return [tuple(i.tolist()) for i in bad.nonzero()[:limit]]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, name: str = "") -> None:
    """max |actual - expected| <= atol, non-finite values checked apart; prints the first misses."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    # NaN/inf must sit exactly where the reference has them (e.g. an unwritten, NaN-poisoned element).
    a_bad, e_bad = ~torch.isfinite(a), ~torch.isfinite(e)
    wrong_nonfinite = a_bad != e_bad
    if wrong_nonfinite.any():
        idx = _first_indices(wrong_nonfinite)
        raise AssertionError(
            f"{name}: {int(wrong_nonfinite.sum())} non-finite mismatches, first at {idx}: "
            f"actual {[a[i].item() for i in idx]} expected {[e[i].item() for i in idx]}"
        )
    err = (a - e).abs().masked_fill(e_bad, 0.0)
    if err.numel() and err.max() > atol:
        bad = err > atol
        idx = _first_indices(bad)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} elements off by more than {atol:.3g} "
            f"(max {err.max().item():.3g}), first at {idx}: "
            f"actual {[a[i].item() for i in idx]} expected {[e[i].item() for i in idx]}"
        )


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    finite = torch.isfinite(e)
    return (a - e).abs()[finite].max().item() if finite.any() else 0.0


def scale_of(t: torch.Tensor) -> float:
    t = t.detach().float()
    t = t[torch.isfinite(t)]
    return t.abs().max().item() if t.numel() else 0.0


def check_against_ref(
    actual: torch.Tensor,
    ref_fp32: torch.Tensor,
    ref_low: torch.Tensor | None,
    dtype: torch.dtype,
    factor: float,
    name: str,
) -> None:
    """fp32: within 1e-5 of the reference's scale. Low precision: the three-way rule.

    The kernel's error against the fp32 reference may be at most ``factor`` (2, the issue's rule,
    for outputs and grads) times plain PyTorch's own error in that dtype. When PyTorch is exact there
    (a pure copy, or an add it rounds just once), 2 x 0 would demand bit-equality even of an op that
    rounds the same value differently, yet anything larger than a small fraction of one ulp would let
    a real bug through; the floor is 1/8 ulp of the output's dtype at the output's scale (an fp32
    loss from bf16 inputs: fp32's ulp).
    """
    scale = max(scale_of(ref_fp32), 1e-30)
    if dtype == torch.float32:
        assert_close(actual, ref_fp32, atol=1e-5 * scale, name=name)
        return
    assert ref_low is not None
    floor = torch.finfo(actual.dtype if actual.is_floating_point() else dtype).eps / 8 * scale
    atol = max(factor * max_err(ref_low, ref_fp32), floor)
    assert_close(actual, ref_fp32, atol=atol, name=f"{name} [{dtype}]")


@pytest.fixture
def check() -> Callable[..., None]:
    return check_against_ref


@pytest.fixture
def close() -> Callable[..., None]:
    return assert_close


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A seed of its own for every test case, reproducible across runs (unlike ``hash`` of a str)."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Launches per op (``counts["masked_mse"]``), counted where each launcher reads its launch
    configuration: a test that asserts them fails if the op handed back its reference instead of
    running its kernel. Not autouse: a counter in a compiled region would break its graph."""
    counts: collections.Counter = collections.Counter()
    for op in ("patch_gather", "encoder_input", "unshuffle", "masked_mse", "attention"):
        module = importlib.import_module(f"fastmae.kernels.{op}")

        def counting(*args, _op=op, _rule=module._launch_config):
            counts[_op] += 1
            return _rule(*args)

        monkeypatch.setattr(module, "_launch_config", counting)
    return counts
