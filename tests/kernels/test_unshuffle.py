"""unshuffle against unshuffle_ref, forward and backward (grads of x and mask_token)."""

from __future__ import annotations

import pytest
import torch

from fastmae.kernels import unshuffle, unshuffle_ref

# (N, L, D, mask_ratio): D not a power of two, ratio 0 (no mask tokens) to 0.95, L 16 to 1024.
CASES = [
    (2, 16, 500, 0.75),
    (3, 196, 60, 0.75),
    (2, 49, 192, 0.0),
    (2, 64, 60, 0.95),
    (2, 1024, 60, 0.95),
    (5, 16, 192, 0.5),
    (3, 16, 60, 0.95),  # K = 0: every patch is a mask token
]


def _ids(case):
    N, L, D, ratio = case
    return f"N{N}-L{L}-D{D}-r{ratio}"


def _make(N: int, L: int, D: int, ratio: float, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    K = int(L * (1 - ratio))
    x = torch.randn(N, 1 + K, D, generator=g).to(device=device, dtype=dtype)
    mask_token = torch.randn(1, 1, D, generator=g).to(device=device, dtype=dtype)
    pos = torch.randn(1, 1 + L, D, generator=g).to(device=device, dtype=dtype)
    ids_shuffle = torch.argsort(torch.rand(N, L, generator=g), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1).to(device)
    grad_out = torch.randn(N, 1 + L, D, generator=g).to(device=device, dtype=dtype)
    return x, mask_token, pos, ids_restore, grad_out


def _run(fn, x, mask_token, pos, ids_restore, grad_out):
    x, mask_token = x.detach().requires_grad_(), mask_token.detach().requires_grad_()
    out = fn(x, mask_token, ids_restore, pos)
    out.backward(grad_out.to(out.dtype))
    return out, x.grad, mask_token.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_unshuffle(case, dtype, device, seed, check, close, launched):
    x, mask_token, pos, ids_restore, grad_out = _make(*case, dtype, device, seed)
    out, gx, gmask = _run(unshuffle, x, mask_token, pos, ids_restore, grad_out)
    assert launched["unshuffle"] == 2  # the kernels ran: forward and backward
    ref = _run(unshuffle_ref, x.float(), mask_token.float(), pos.float(), ids_restore, grad_out.float())
    low = [None] * 3
    if dtype != torch.float32:
        low = _run(unshuffle_ref, x, mask_token, pos, ids_restore, grad_out)
    assert out.dtype == dtype and gx.dtype == dtype and gmask.dtype == dtype
    check(out, ref[0], low[0], dtype, 2, "out")
    # One add rounded once to nearest even, and a grad of x that is a copy of grad_out's rows:
    # PyTorch's exact results in every dtype (fp32 included, where check() allows 1e-5)
    same = ref if dtype == torch.float32 else low
    close(out, same[0], atol=0.0, name="out vs PyTorch in the same dtype")
    close(gx, same[1], atol=0.0, name="grad x vs PyTorch in the same dtype")
    check(gx, ref[1], low[1], dtype, 2, "grad x")
    check(gmask, ref[2], low[2], dtype, 2, "grad mask_token")


def test_unshuffle_sum_backward(device, close):
    """``.sum().backward()`` hands the op an expanded (stride-0) grad; it must not be read as dense."""
    x, mask_token, pos, ids_restore, _ = _make(2, 16, 60, 0.75, torch.float32, device, seed=7)
    ones = torch.ones(2, 17, 60, device=device)
    got = _run(lambda *a: unshuffle(*a).sum(), x, mask_token, pos, ids_restore, torch.tensor(1.0))
    want = _run(unshuffle_ref, x, mask_token, pos, ids_restore, ones)
    close(got[1], want[1], atol=0.0, name="grad x")
    close(got[2], want[2], atol=1e-5, name="grad mask_token")


def test_unshuffle_promotes_like_reference(device, close):
    """bf16 tokens with an fp32 mask_token and pos give fp32, as the reference's cat + add."""
    x, mask_token, pos, ids_restore, _ = _make(2, 16, 60, 0.75, torch.float32, device, seed=8)
    x = x.bfloat16()
    out = unshuffle(x, mask_token, ids_restore, pos)
    assert out.dtype == torch.float32
    close(out, unshuffle_ref(x, mask_token, ids_restore, pos), atol=0.0, name="mixed dtypes")


@pytest.mark.gpu
def test_unshuffle_int64_offsets(device, close):
    """N * (1 + L) * D > 2**31: element offsets must be computed in int64."""
    N, L, K, D = 2100, 1024, 51, 1000
    g = torch.Generator(device=device).manual_seed(9)
    x = torch.randn(N, 1 + K, D, device=device, dtype=torch.bfloat16, generator=g)
    mask_token = torch.randn(1, 1, D, device=device, dtype=torch.bfloat16, generator=g)
    pos = torch.randn(1, 1 + L, D, device=device, dtype=torch.bfloat16, generator=g)
    ids_restore = torch.argsort(torch.argsort(torch.rand(N, L, device=device, generator=g), dim=1), dim=1)
    assert N * (1 + L) * D > 2**31
    x.requires_grad_()
    out = unshuffle(x, mask_token, ids_restore, pos)
    tail = slice(N - 3, N)  # the rows past 2**31 elements
    close(out[tail], unshuffle_ref(x[tail], mask_token, ids_restore[tail], pos), atol=0.0, name="tail rows")
    # the backward's offsets too: its grad of x is a copy of grad_out's rows (exact)
    grad_out = torch.randn(out.shape, device=device, dtype=out.dtype, generator=g)
    out.backward(grad_out)
    x_tail = x[tail].detach().requires_grad_()
    unshuffle_ref(x_tail, mask_token, ids_restore[tail], pos).backward(grad_out[tail])
    close(x.grad[tail], x_tail.grad, atol=0.0, name="tail rows' grad")
