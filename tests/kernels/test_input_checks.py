"""The ops' input checks: one clear error for a wrong rank, a float index, another device, float64,
a patch size that is not positive, tensors where no kernel runs; int32 indices give what int64 ones
give; a channel stride past 2**31 is read right."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastmae.kernels import attention, encoder_input, masked_mse, patch_gather, unshuffle


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    N, P, D, L, K = 2, 8, 16, 16, 4
    imgs = torch.randn(N, 3, 32, 32, generator=g).to(device)
    ids_shuffle = torch.argsort(torch.rand(N, L, generator=g), dim=1).to(device)
    ids_keep, ids_restore = ids_shuffle[:, :K], torch.argsort(ids_shuffle, dim=1)
    x = torch.randn(N, K, D, generator=g).to(device)
    cls, pos = torch.randn(1, 1, D, generator=g).to(device), torch.randn(1, 1 + L, D, generator=g).to(device)
    pred = torch.randn(N, L, 3 * P * P, generator=g).to(device)
    mask = torch.ones(N, L, device=device)
    return dict(imgs=imgs, ids_keep=ids_keep, ids_restore=ids_restore, x=x, cls=cls, pos=pos, pred=pred, mask=mask)


CALLS = {
    "patch_gather": lambda t: patch_gather(t["imgs"], t["ids_keep"], 8),
    "encoder_input": lambda t: encoder_input(t["x"], t["cls"], t["pos"], t["ids_keep"]),
    "unshuffle": lambda t: unshuffle(torch.cat([t["x"][:, :1], t["x"]], 1), t["cls"], t["ids_restore"], t["pos"]),
    "masked_mse": lambda t: masked_mse(t["pred"], t["imgs"], t["mask"], 8, True),
}
# (op, input changed, how, message)
BAD = [
    ("patch_gather", "ids_keep", lambda v: v.float(), "ids_keep must be an int64 or int32 tensor, got torch.float32"),
    ("patch_gather", "imgs", lambda v: v[0], r"imgs must be \(N, C, H, W\), got shape \(3, 32, 32\)"),
    ("patch_gather", "ids_keep", lambda v: v.to("meta"), "ids_keep is on meta, the other inputs on cpu"),
    ("encoder_input", "ids_keep", lambda v: v.double(), "ids_keep must be an int64 or int32 tensor"),
    ("encoder_input", "x", lambda v: v[0], r"x must be \(N, K, D\), got shape \(4, 16\)"),
    ("unshuffle", "ids_restore", lambda v: v.float(), "ids_restore must be an int64 or int32 tensor"),
    ("unshuffle", "ids_restore", lambda v: v[0], r"ids_restore must be \(N, L\), got shape \(16,\)"),
    ("unshuffle", "pos", lambda v: v.to("meta"), "pos is on meta, the other inputs on cpu"),
    ("masked_mse", "pred", lambda v: v.flatten(1), r"pred must be \(N, L, P\*P\*C\), got shape \(2, 3072\)"),
    ("masked_mse", "mask", lambda v: v.to("meta"), "mask is on meta, the other inputs on cpu"),
    # float64: the kernels compute in fp32 and would hand back silently rounded values
    ("encoder_input", "cls", lambda v: v.double(), "cls_token must be float32, bfloat16 or float16, got torch.float64"),
    ("unshuffle", "x", lambda v: v.double(), "x must be float32, bfloat16 or float16, got torch.float64"),
    ("masked_mse", "pred", lambda v: v.double(), "pred must be float32, bfloat16 or float16, got torch.float64"),
    ("masked_mse", "imgs", lambda v: v.double(), "imgs must not be float64"),
    # the ops give no grad to data: a mask that asks for one is refused, not left without it
    ("masked_mse", "mask", lambda v: v.clone().requires_grad_(), "masked_mse gives no grad to mask"),
]


@pytest.mark.parametrize("op, name, how, message", BAD, ids=[f"{b[0]}-{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_are_clear_errors(op, name, how, message):
    t = _inputs("cpu")
    t[name] = how(t[name])
    with pytest.raises(ValueError, match=message):
        CALLS[op](t)


@pytest.mark.parametrize("op", ["patch_gather", "encoder_input", "unshuffle"])
def test_int32_ids_give_what_int64_ids_give(op, device):
    t = _inputs(device)
    want = CALLS[op](t)
    t32 = {k: v.int() if k.startswith("ids") else v for k, v in t.items()}
    assert torch.equal(CALLS[op](t32), want)


@pytest.mark.parametrize("patch_size", [0, -8, 8.0])
def test_patch_size_must_be_a_positive_int(patch_size):
    # -8 passes the shape checks ((-4) * (-4) = 16 patches) and gave meaningless values; 0 divided by zero
    t = _inputs("cpu")
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        patch_gather(t["imgs"], t["ids_keep"], patch_size)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        masked_mse(t["pred"], t["imgs"], t["mask"], patch_size, True)


def _a_kernel(x):
    pass


def test_cpu_tensors_without_the_interpreter_are_a_clear_error(monkeypatch):
    """Kernels compiled for a GPU (a ``JITFunction``, as without TRITON_INTERPRET=1) and CPU tensors:
    one RuntimeError that says what runs instead, not Triton's "0 active drivers"."""
    from triton.runtime.jit import JITFunction

    from fastmae.kernels import _utils

    t = _inputs("cpu")
    jit = JITFunction(_a_kernel)  # what @triton.jit makes without TRITON_INTERPRET=1
    for op in CALLS:
        module = importlib.import_module(f"fastmae.kernels.{op}")
        kernel = {"masked_mse": "_masked_mse_fwd_kernel", "unshuffle": "_unshuffle_fwd_kernel"}.get(op, f"_{op}_kernel")
        monkeypatch.setattr(module, kernel, jit)
        with pytest.raises(RuntimeError, match=f"fastmae.kernels.{op} runs on CUDA tensors, or on CPU tensors under"):
            CALLS[op](t)
    qkv = torch.randn(1, 4, 3, 2, 8)
    monkeypatch.setattr(importlib.import_module("fastmae.kernels.attention"), "_attn_fwd_kernel", jit)
    with pytest.raises(RuntimeError, match="fastmae.kernels.attention runs on CUDA tensors"):
        attention(qkv)
    _utils.check_runs_here(torch.device("cpu"), object(), "x")  # an interpreted kernel: no error


def test_channel_stride_past_int32(device):
    """A channel-major batch viewed as NCHW: stride_c = 2**30, so the channel offset c * stride_c of
    the last channel passes 2**31. It was computed in int32 and wrapped (a segfault on CPU).

    3 GiB of address space, uninitialised: only the two images read are ever written, so the pages
    of the rest are never touched."""
    base = torch.empty(3, 2**20, 32, 32, dtype=torch.uint8, device=device)
    imgs = base.permute(1, 0, 2, 3)[-2:]
    assert imgs.stride(1) == 2**30
    g = torch.Generator().manual_seed(0)
    imgs.copy_(torch.randint(0, 256, imgs.shape, dtype=torch.uint8, generator=g))
    ids_keep = torch.argsort(torch.rand(2, 16, generator=g), dim=1)[:, :4].to(device)
    from fastmae.kernels import masked_mse_ref, patch_gather_ref

    assert torch.equal(patch_gather(imgs, ids_keep, 8), patch_gather_ref(imgs, ids_keep, 8))
    pred, mask = (
        torch.randn(2, 16, 3 * 64, generator=g).to(device),
        (torch.rand(2, 16, generator=g) < 0.75).float().to(device),
    )
    for norm_pix in (False, True):
        want = masked_mse_ref(pred, imgs.float(), mask, 8, norm_pix)
        torch.testing.assert_close(masked_mse(pred, imgs, mask, 8, norm_pix), want, rtol=1e-5, atol=0)
