"""Assertion helpers shared by the tests."""

from __future__ import annotations

import torch

# A tiny MAE for fast CPU tests: 32 px, patch 8 (L = 16), two blocks each side.
TINY_MAE = dict(
    img_size=32,
    patch_size=8,
    embed_dim=48,
    depth=2,
    num_heads=4,
    decoder_embed_dim=32,
    decoder_depth=2,
    decoder_num_heads=4,
)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the tensor-wise relative error), in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().item()
    return (a - e).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "") -> None:
    """Tensor-wise relative error ``<= rtol``; NaN/inf are checked apart and the worst index is named."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    bad_a, bad_e = ~torch.isfinite(a), ~torch.isfinite(e)
    assert torch.equal(bad_a, bad_e), f"{name}: non-finite values differ at {bad_a.ne(bad_e).nonzero()[:5].tolist()}"
    a, e = a.masked_fill(bad_a, 0), e.masked_fill(bad_e, 0)
    err = rel_err(a, e)
    if err > rtol:
        diff = (a - e).abs()
        idx = torch.unravel_index(diff.argmax(), diff.shape)
        where = tuple(int(i) for i in idx)
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {rtol:.1e}; worst at {where}: "
            f"{a[where].item():.10g} vs {e[where].item():.10g}"
        )
