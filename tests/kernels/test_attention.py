"""attention against attention_ref, forward and the grad of the packed qkv; the GPU's tilings too."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastmae.attention import attention_math
from fastmae.kernels import attention, attention_ref

# the module (the package's ``attention`` attribute is the function of the same name)
attention_module = importlib.import_module("fastmae.kernels.attention")

# (B, N, H, Dh): MAE's encoder (cls + 49 kept) and decoder (cls + 196) token counts at small
# widths, head dims 16 (the smallest tile), 32 (MAE's decoder), 64 and 80 (ViT-H: padded to 128).
CASES = [
    (2, 50, 3, 64),
    (2, 197, 2, 32),
    (3, 17, 2, 16),
    (1, 70, 2, 80),
    (2, 1, 2, 32),  # one token: softmax over a single key
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ids(case):
    return "B{}-N{}-H{}-D{}".format(*case)


def _make(B, N, H, Dh, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, Dh, generator=g).to(device=device, dtype=dtype)
    grad_out = torch.randn(B, N, H, Dh, generator=g).to(device=device, dtype=dtype)
    return qkv, grad_out


def _run(fn, qkv, grad_out):
    qkv = qkv.detach().requires_grad_()
    out = fn(qkv)
    out.backward(grad_out.to(out.dtype))
    return out, qkv.grad


def _math_low(qkv: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch in qkv's own dtype (the three-way rule's yardstick), in the kernel's layout."""
    B, N, _, H, Dh = qkv.shape
    return attention_math(qkv).reshape(B, N, H, Dh)


def _check(case, dtype, device, seed, check):
    qkv, grad_out = _make(*case, dtype, device, seed)
    out, grad = _run(attention, qkv, grad_out)
    ref = _run(attention_ref, qkv.float(), grad_out.float())
    low = (None, None) if dtype == torch.float32 else _run(_math_low, qkv, grad_out)
    assert out.dtype == dtype and grad.dtype == dtype
    check(out, ref[0], low[0], dtype, 2, "out")
    check(grad, ref[1], low[1], dtype, 2, "grad qkv")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_attention(case, dtype, device, seed, check, launched):
    _check(case, dtype, device, seed, check)
    assert launched["attention"] == 2  # the kernels ran: forward and backward


# (fwd BLOCK_M, fwd BLOCK_N, bwd BLOCK_M, bwd BLOCK_N, tails): the GPU's tiles, under the
# interpreter too. Several key blocks exercise the forward's online softmax; ragged ends, and
# unequal backward blocks (the grid covers the larger count, some programs own a key block and no
# query block); tail blocks (197 = 3 x 64 + a 16-row tail; with blocks of 16 and 32 only the
# 32-wide side has a tail, so a launch has a key tail and no query tail, or the other way round).
TILINGS = [
    (64, 64, 64, 64, False),
    (16, 32, 32, 16, False),
    (32, 16, 16, 32, False),
    (64, 64, 64, 64, True),
    (16, 32, 32, 16, True),
]


@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: "fwd{}x{}-bwd{}x{}{}".format(*t[:4], "-tails" * t[4]))
@pytest.mark.parametrize("case", [(1, 197, 2, 32), (2, 50, 1, 64)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_tilings(case, tiling, dtype, device, seed, check, monkeypatch):
    fbm, fbn, bbm, bbn, tails = tiling
    used = []
    monkeypatch.setattr(
        attention_module, "_launch_config", lambda N, Dh, dev: used.append(N) or (fbm, fbn, 4, bbm, bbn, 4, 2, tails)
    )
    _check(case, dtype, device, seed, check)
    assert used == [case[1], case[1]]  # forward and backward ran at this tiling


def test_tail_blocks():
    tail = attention_module._tail
    # 197 = 3 x 64 + 5 and 6 x 32 + 5: a 16-row tail; 1 x 128 + 69: a tail of 128 gains nothing
    assert [tail(197, 64, True), tail(197, 32, True), tail(197, 128, True)] == [16, 16, 0]
    # one block; 3 x 16 + 2 (a 16-row tail is a whole block); 32 + 18 (tail 32); tails off
    assert [tail(50, 64, True), tail(50, 16, True), tail(50, 32, True), tail(197, 64, False)] == [0, 0, 0, 0]
    assert tail(65, 64, True) == 16 and tail(100, 64, True) == 0  # 36 left: a 64-row block anyway


def test_attention_gpu_rule_covers_mae_shapes():
    """The GPU rule's tiles at MAE's shapes: what tests above run, and what the sm_90 build checks."""
    gpu = torch.device("cuda")
    assert attention_module._launch_config(50, 64, gpu) == (64, 64, 4, 64, 64, 8, 3, False)
    assert attention_module._launch_config(197, 32, gpu) == (64, 64, 4, 64, 64, 4, 3, False)
    assert (64, 64, 64, 64, False) in TILINGS


# the padded keys' weights do overflow where they are not used (the dK/dV pass never stores them);
# numpy, under the interpreter, says so
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("tiling", [(16, 16, 16, 16), None], ids=["ragged-tiles", "rule"])
def test_attention_far_negative_scores(tiling, device, close, monkeypatch):
    """A query whose every score is ~ -150 (lse ~ -216 in base 2): a padded key's score 0 would
    weigh 2^216 = inf unless masked, and inf times its zero k would make the query's grad NaN.

    Scores this large lose digits in fp32 (an ulp of 216 is 1.5e-5), and query 0's q of 37.5 carries
    that into the keys' grads: plain PyTorch in fp32 is 4.8e-5 off the fp64 truth there (1.3e-5 of
    the grads' scale), the interpreted kernel 5.8e-5, the H200's (exp2.approx) 6.6e-5 off PyTorch's
    fp32. So the kernel is held to the fp64 truth by the three-way rule, as low precision is."""
    if tiling:
        monkeypatch.setattr(
            attention_module, "_launch_config", lambda N, Dh, dev: (*tiling[:2], 4, *tiling[2:], 4, 2, False)
        )
    qkv, grad_out = _make(1, 20, 1, 16, torch.float32, device, seed=5)
    k0 = torch.full((16,), 1.0, device=device)
    qkv[:, :, 1, 0] = k0 + 0.01 * qkv[:, :, 1, 0]  # every key ~ k0
    qkv[:, 0, 0, 0] = -37.5 * k0  # q . k / sqrt(16) ~ -150 for query 0
    got = _run(attention, qkv, grad_out)
    truth = _run(_math_low, qkv.double(), grad_out.double())
    plain = _run(_math_low, qkv, grad_out)  # PyTorch's own fp32 error: the yardstick
    for a, t, p, factor, name in zip(got, truth, plain, (2, 3), ("out", "grad qkv"), strict=True):
        floor = torch.finfo(torch.float32).eps / 8 * t.abs().max().item()
        close(a, t, atol=max(factor * (p - t).abs().max().item(), floor), name=name)


def test_batch_head_pairs_past_the_grid_limit_launch_in_chunks(device, seed, check, monkeypatch):
    """CUDA's grid axis 1 holds at most 65535 (batch, head) pairs (batch 4096 at 16 heads); more are
    launched in chunks. Here the limit is lowered to 3 so that B x H = 8 takes three launches of
    each kernel, and the results must be the one launch's (with the GPU's tiling and tails: the
    chunks and the row / key launches combine)."""
    assert attention_module.MAX_GRID_Y == 65535
    assert attention_module._bh_chunks(65536 * 2) == [(0, 65535), (65535, 65535), (131070, 2)]
    monkeypatch.setattr(attention_module, "MAX_GRID_Y", 3)
    monkeypatch.setattr(attention_module, "_launch_config", lambda N, Dh, dev: (64, 64, 4, 64, 64, 4, 2, True))
    chunks = []
    bh_chunks = attention_module._bh_chunks
    monkeypatch.setattr(attention_module, "_bh_chunks", lambda bh: chunks.append(bh_chunks(bh)) or chunks[-1])
    _check((4, 70, 2, 16), torch.float32, device, seed, check)
    assert chunks == [[(0, 3), (3, 3), (6, 2)]] * 2  # forward and backward, in three launches each


def test_attention_sum_backward(device, close):
    """``.sum().backward()`` hands the op an expanded (stride-0) grad; it must not be read as dense."""
    qkv, _ = _make(2, 20, 2, 16, torch.float32, device, seed=3)
    got = _run(lambda t: attention(t).sum(), qkv, torch.tensor(1.0))
    want = _run(attention_ref, qkv, torch.ones(2, 20, 2, 16, device=device))
    close(got[1], want[1], atol=1e-5 * want[1].abs().max().item(), name="grad qkv")


def test_attention_reads_a_strided_projection(device, close):
    """The model hands over ``Linear``'s output reshaped; a non-contiguous qkv must give the same."""
    qkv, grad_out = _make(2, 20, 2, 16, torch.float32, device, seed=4)
    wide = torch.cat([qkv, qkv], dim=-1)[..., :16]  # same values, strides of a wider tensor
    assert not wide.is_contiguous()
    got, want = _run(attention, wide, grad_out), _run(attention_ref, qkv, grad_out)
    for a, b, name in zip(got, want, ("out", "grad qkv"), strict=True):
        close(a, b, atol=1e-5 * b.abs().max().item(), name=name)


def test_attention_rejects_bad_input(device):
    with pytest.raises(ValueError, match=r"expected qkv \(B, N, 3, H, Dh\), got \(2, 5, 2, 16\)"):
        attention(torch.randn(2, 5, 2, 16, device=device))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16, got torch.float64"):
        attention(torch.randn(1, 4, 3, 1, 16, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="head dims up to 128, got 160; use the sdpa backend"):
        attention(torch.randn(1, 4, 3, 1, 160, device=device))


def test_attention_lse_is_not_differentiable(device):
    """The op's second output (the row logsumexp, saved for the backward) takes no grad: marked
    differentiable, a loss through it got a silent zero grad."""
    qkv = torch.randn(1, 5, 3, 1, 16, device=device, requires_grad=True)
    out, lse = torch.ops.fastmae.attention(qkv)
    assert out.requires_grad and not lse.requires_grad


@pytest.mark.gpu
def test_cuda_tensors_under_the_interpreter_take_its_workarounds(tmp_path):
    """With TRITON_INTERPRET=1, CUDA tensors are run by the interpreter (copied to the host): keyed
    on the device, they took the GPU's branches (a raw bf16 tl.dot, which the interpreter multiplies
    as integers: errors of 1e9). The interpreter's workarounds follow the interpreter."""
    import os
    import subprocess
    import sys

    script = """
import torch
from fastmae.attention import attention_math
from fastmae.kernels import _utils, attention, attention_ref
assert _utils.is_interpreter()
qkv = torch.randn(1, 20, 3, 2, 16, device="cuda").bfloat16()
ref = attention_ref(qkv.float())
err = (attention(qkv).float() - ref).abs().max().item()
plain = (attention_math(qkv).reshape(ref.shape).float() - ref).abs().max().item()  # bf16 PyTorch's own
assert err <= 2 * plain, (err, plain)
print("ok", err, plain)
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
