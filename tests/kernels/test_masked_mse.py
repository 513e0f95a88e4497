"""masked_mse against masked_mse_ref: loss and grad of pred, norm-pix on and off."""

from __future__ import annotations

import math

import pytest
import torch

from fastmae.kernels import masked_mse, masked_mse_ref

# (N, H, W, P, mask_ratio): patch 8/14/16, L from 6 to 1024, ratio 0.5 to 0.95 (0.0: see below).
CASES = [
    (2, 32, 48, 16, 0.75),
    (3, 42, 56, 14, 0.75),
    (2, 64, 40, 8, 0.95),
    (1, 448, 448, 14, 0.75),
    (4, 32, 32, 8, 0.5),
    (2, 32, 32, 8, 0.95),  # K = 0: every patch scored
]


def _ids(case):
    N, H, W, P, ratio = case
    return f"N{N}-L{(H // P) * (W // P)}-H{H}xW{W}-P{P}-r{ratio}"


def _make(N, H, W, P, ratio, dtype, device, seed, img_dtype=None):
    g = torch.Generator().manual_seed(seed)
    L = (H // P) * (W // P)
    K = int(L * (1 - ratio))
    # An offset and a scale per image, so that norm-pix's mean and variance matter.
    imgs = 3 * torch.randn(N, 3, H, W, generator=g) + torch.randn(N, 1, 1, 1, generator=g)
    pred = torch.randn(N, L, P * P * 3, generator=g)
    ids_restore = torch.argsort(torch.argsort(torch.rand(N, L, generator=g), dim=1), dim=1)
    mask = torch.ones(N, L)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)  # MAE's own construction, 1 = removed
    return (
        pred.to(device=device, dtype=dtype),
        imgs.to(device=device, dtype=img_dtype or dtype),
        mask.to(device),
    )


def _run(fn, pred, imgs, mask, P, norm_pix):
    pred = pred.detach().requires_grad_()
    loss = fn(pred, imgs, mask, P, norm_pix)
    loss.backward()
    return loss, pred.grad


@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_masked_mse(case, dtype, norm_pix, device, seed, check, launched):
    P = case[3]
    pred, imgs, mask = _make(*case, dtype, device, seed)
    loss, grad = _run(masked_mse, pred, imgs, mask, P, norm_pix)
    assert launched["masked_mse"] == 2  # the kernels ran: forward and backward
    ref = _run(masked_mse_ref, pred.float(), imgs.float(), mask, P, norm_pix)
    low = _run(masked_mse_ref, pred, imgs, mask, P, norm_pix) if dtype != torch.float32 else (None, None)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and grad.dtype == dtype
    check(loss, ref[0], low[0], dtype, 2, "loss")
    check(grad, ref[1], low[1], dtype, 2, "grad pred")
    assert (grad[mask == 0] == 0).all(), "kept patches must get an exact zero grad"


@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES[:3], ids=_ids)
@pytest.mark.parametrize("order", ["pred", "gather"])
def test_masked_mse_tile_orders(order, case, dtype, norm_pix, device, seed, check):
    """The tile in pred's (p, q, c) order, with the image read in that order or in its own and the
    target moved over by tl.gather (launch knobs the kernel sweep times against the image order),
    with the GPU's rows per program, at patch 16, 14 and 8."""
    from benchmarks.sweep_kernels import launch_config

    P = case[3]
    pred, imgs, mask = _make(*case, dtype, device, seed)
    with launch_config("masked_mse", knob=order):
        loss, grad = _run(masked_mse, pred, imgs, mask, P, norm_pix)
    ref = _run(masked_mse_ref, pred.float(), imgs.float(), mask, P, norm_pix)
    low = _run(masked_mse_ref, pred, imgs, mask, P, norm_pix) if dtype != torch.float32 else (None, None)
    check(loss, ref[0], low[0], dtype, 2, "loss")
    check(grad, ref[1], low[1], dtype, 2, "grad pred")
    assert (grad[mask == 0] == 0).all(), "kept patches must get an exact zero grad"


@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm", "raw"])
def test_masked_mse_bf16_pred_fp32_images(norm_pix, device, seed, check):
    """The training mix: autocast's bf16 prediction against fp32 images."""
    case = (2, 32, 48, 16, 0.75)
    pred, imgs, mask = _make(*case, torch.bfloat16, device, seed, img_dtype=torch.float32)
    loss, grad = _run(masked_mse, pred, imgs, mask, 16, norm_pix)
    ref = _run(masked_mse_ref, pred.float(), imgs, mask, 16, norm_pix)
    low = _run(masked_mse_ref, pred, imgs, mask, 16, norm_pix)
    check(loss, ref[0], low[0], torch.bfloat16, 2, "loss")
    check(grad, ref[1], low[1], torch.bfloat16, 2, "grad pred")


def test_masked_mse_nothing_masked_is_nan(device, close, monkeypatch):
    """mask ratio 0: sum(mask) == 0 gives NaN loss and NaN grads in the reference; match, don't crash.
    The outputs start at 7.0 here, not NaN: NaN is the answer, so a NaN poison could not tell an
    unwritten element."""
    import importlib

    made = []

    def sevens(shape, dtype, device):
        made.append(shape)
        return torch.full(shape, 7.0, dtype=dtype, device=device)

    monkeypatch.setattr(importlib.import_module("fastmae.kernels.masked_mse"), "new_output", sevens)
    pred, imgs, mask = _make(2, 32, 48, 16, 0.0, torch.float32, device, seed=5)
    assert mask.sum() == 0
    loss, grad = _run(masked_mse, pred, imgs, mask, 16, True)
    ref_loss, ref_grad = _run(masked_mse_ref, pred, imgs, mask, 16, True)
    assert math.isnan(loss.item()) and math.isnan(ref_loss.item())
    close(grad, ref_grad, atol=0.0, name="grad pred")
    assert len(made) == 2  # the forward's partial sums and the grad


def test_masked_mse_scales_grad(device, close):
    """The incoming grad (e.g. a GradScaler's loss scale) multiplies the grad of pred."""
    pred, imgs, mask = _make(2, 32, 32, 8, 0.75, torch.float32, device, seed=6)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    (1024.0 * masked_mse(p1, imgs, mask, 8, True)).backward()
    (1024.0 * masked_mse_ref(p2, imgs, mask, 8, True)).backward()
    close(p1.grad, p2.grad, atol=1e-5 * p2.grad.abs().max().item(), name="scaled grad")


def test_masked_mse_channels_last(device, close):
    pred, imgs, mask = _make(2, 42, 28, 14, 0.75, torch.float32, device, seed=10)
    got = masked_mse(pred, imgs.to(memory_format=torch.channels_last), mask, 14, True)
    close(got, masked_mse_ref(pred, imgs, mask, 14, True), atol=1e-5 * got.abs().item(), name="loss")


def test_masked_mse_flat_patches(device, seed, check):
    """Near-constant patches (variance ~ 1e-6), where norm-pix's eps and the variance's rounding matter."""
    pred, imgs, mask = _make(2, 32, 48, 16, 0.75, torch.float32, device, seed)
    imgs = 0.5 + 1e-3 * imgs
    loss, grad = _run(masked_mse, pred, imgs, mask, 16, True)
    ref_loss, ref_grad = _run(masked_mse_ref, pred, imgs, mask, 16, True)
    check(loss, ref_loss, None, torch.float32, 2, "loss")
    check(grad, ref_grad, None, torch.float32, 2, "grad pred")


def test_masked_mse_pred_view(device, seed, check):
    """pred as the decoder output minus its cls row (a strided view) is read in place."""
    N, H, W, P = 2, 32, 48, 16
    pred, imgs, mask = _make(N, H, W, P, 0.75, torch.float32, device, seed)
    full = torch.randn(N, 1 + pred.shape[1], pred.shape[2], device=device)
    full[:, 1:] = pred
    full.requires_grad_()
    loss = masked_mse(full[:, 1:], imgs, mask, P, True)
    loss.backward()
    ref_loss, ref_grad = _run(masked_mse_ref, pred, imgs, mask, P, True)
    check(loss, ref_loss, None, torch.float32, 2, "loss")
    check(full.grad[:, 1:], ref_grad, None, torch.float32, 2, "grad pred")
    assert (full.grad[:, 0] == 0).all()
