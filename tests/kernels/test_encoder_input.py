"""encoder_input against encoder_input_ref, forward and backward."""

from __future__ import annotations

import pytest
import torch

from fastmae.kernels import encoder_input, encoder_input_ref

# (N, L, D, mask_ratio)
CASES = [
    (2, 16, 500, 0.75),
    (3, 196, 60, 0.75),
    (2, 64, 192, 0.0),
    (4, 1024, 60, 0.95),
    (2, 16, 60, 0.95),  # K = 0: the cls row alone
]


def _ids(case):
    N, L, D, ratio = case
    return f"N{N}-L{L}-D{D}-r{ratio}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_encoder_input(case, dtype, device, seed, check, close, launched):
    N, L, D, ratio = case
    K = int(L * (1 - ratio))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, K, D, generator=g).to(device=device, dtype=dtype)
    cls = (0.02 * torch.randn(1, 1, D, generator=g)).to(device=device, dtype=dtype)
    pos = torch.randn(1, 1 + L, D, generator=g).to(device=device, dtype=dtype)
    ids_keep = torch.argsort(torch.rand(N, L, generator=g), dim=1)[:, :K].to(device)
    grad_out = torch.randn(N, 1 + K, D, generator=g).to(device=device, dtype=dtype)

    def run(fn, x, cls, pos):
        x, cls = x.detach().requires_grad_(), cls.detach().requires_grad_()
        out = fn(x, cls, pos, ids_keep)
        out.backward(grad_out.to(out.dtype))
        return out, x.grad, cls.grad

    out, gx, gcls = run(encoder_input, x, cls, pos)
    assert launched["encoder_input"] == 1  # the kernel ran (its backward is a gather in PyTorch)
    ref = run(encoder_input_ref, x.float(), cls.float(), pos.float())
    low = run(encoder_input_ref, x, cls, pos) if dtype != torch.float32 else (None, None, None)
    assert out.dtype == dtype and gx.dtype == dtype and gcls.dtype == dtype
    check(out, ref[0], low[0], dtype, 2, "out")
    # One add rounded once to nearest even, and a grad of x that is a copy of grad_out's rows:
    # PyTorch's exact results in every dtype (fp32 included, where check() allows 1e-5)
    same = ref if dtype == torch.float32 else low
    close(out, same[0], atol=0.0, name="out vs PyTorch in the same dtype")
    close(gx, same[1], atol=0.0, name="grad x vs PyTorch in the same dtype")
    check(gx, ref[1], low[1], dtype, 2, "grad x")
    check(gcls, ref[2], low[2], dtype, 2, "grad cls_token")


def test_encoder_input_promotes_like_reference(device, close):
    """bf16 tokens + fp32 buffer give fp32, as the reference's add (autocast leaves adds alone)."""
    N, L, K, D = 2, 16, 4, 60
    x = torch.randn(N, K, D, device=device, dtype=torch.bfloat16)
    cls = torch.randn(1, 1, D, device=device)
    pos = torch.randn(1, 1 + L, D, device=device)
    ids_keep = torch.argsort(torch.rand(N, L, device=device), dim=1)[:, :K]
    out = encoder_input(x, cls, pos, ids_keep)
    assert out.dtype == torch.float32
    close(out, encoder_input_ref(x, cls, pos, ids_keep), atol=0.0, name="mixed dtypes")


@pytest.mark.gpu
def test_encoder_input_int64_offsets(device, close):
    """N * (1 + K) * D > 2**31: the kernel's row offsets must be int64 (its CPU twin: the sm_90
    codegen test's check that every row program id is widened first)."""
    N, L, K, D = 42000, 196, 49, 1024
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(N, K, D, device=device, dtype=torch.bfloat16, generator=g)
    cls_token = torch.randn(1, 1, D, device=device, dtype=torch.bfloat16, generator=g)
    pos = torch.randn(1, 1 + L, D, device=device, dtype=torch.bfloat16, generator=g)
    ids_keep = torch.argsort(torch.rand(N, L, device=device, generator=g), dim=1)[:, :K]
    assert N * (1 + K) * D > 2**31
    out = encoder_input(x, cls_token, pos, ids_keep)
    tail = slice(N - 3, N)
    close(out[tail], encoder_input_ref(x[tail], cls_token, pos, ids_keep[tail]), atol=0.0, name="tail rows")
