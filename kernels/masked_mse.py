"""MAE's loss: (norm-pix) per-patch mean squared error, averaged over the removed patches.

Targets are read straight from the NCHW image; the reference's patchify is
``target[n, l, p*P*C + q*C + c] = imgs[n, c, hi*P + p, wi*P + q]`` (``einsum('nchpwq->nhwpqc')``).
With ``norm_pix_loss`` each target patch is normalized by its mean and **unbiased** variance:
``(t - mean) / sqrt(var + 1e-6)``. ``loss = sum_l(mask * mean_j (pred - t)^2) / sum(mask)``.

Only removed patches (mask = 1) contribute, so only their rows of pred and of the image are read;
kept rows get an exact zero grad without being read (so, unlike the reference's ``0 * NaN``, a
non-finite value in a kept row of pred does not reach the loss). The backward recomputes the target from the
image instead of saving a pred-sized grad from the forward: the same bytes moved with an fp32
image (one more image read against one more grad write + read), fewer with a bf16 image, no
pred-sized buffer held from forward to backward, and the incoming grad scale applied in the same
pass. Both passes accumulate in fp32 and reduce deterministically (per-program partial sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._utils import (
    check_float,
    check_input,
    check_patch_size,
    check_runs_here,
    cpu_tiles,
    is_interpreter,
    launcher,
    new_output,
    next_pow2,
    to_output_dtype,
)

NORM_PIX_EPS = 1e-6


# The tile's column order (a launch knob, swept by benchmarks/sweep_kernels.py). Pred holds a patch in
# (p, q, c) order, the image in (c, p, q): with C = 3 one of the two is read with a stride of C
# elements unless the tile is reordered on chip.
ORDERS = ("image", "pred", "gather")
IMAGE_ORDER = tl.constexpr(0)  # P contiguous pixels per (c, p) line: image loads vectorize, pred strided
PRED_ORDER = tl.constexpr(1)  # pred (and its grad) contiguous, the image's C planes interleaved
GATHER_ORDER = tl.constexpr(2)  # both contiguous, the target moved to pred's order on chip (tl.gather)


@triton.jit
def _load_patch_rows(
    pred_ptr,
    imgs_ptr,
    mask_ptr,
    pid,
    n_rows,  # N * L
    L,
    w,  # patches per image row
    stride_pn,  # pred's batch and token strides (its last dim is contiguous)
    stride_pl,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    C: tl.constexpr,
    P: tl.constexpr,
    P_PAD: tl.constexpr,
    CP_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NORM_PIX: tl.constexpr,
    EPS: tl.constexpr,
    ORDER: tl.constexpr,
):
    """Rows [pid*BLOCK_R, ...) as fp32 tiles [BLOCK_R, CP_PAD*P_PAD]: in the image's (c, p, q) order
    (``IMAGE_ORDER``) or in pred's (p, q, c) order (``PRED_ORDER``, ``GATHER_ORDER``).

    Returns (diff = pred - target, mask); padding and kept rows hold 0 in diff.
    """
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    m = tl.load(mask_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    removed = row_ok & (m != 0.0)  # kept rows are neither read nor computed
    n = rows // L
    patch = rows % L
    hi = patch // w
    wi = patch % w

    # IMAGE_ORDER walks the image in its own order, P contiguous pixels q per (c, p) line, so image
    # loads vectorize; pred, stored in (p, q, c) order, is read with stride C along q, all of each
    # row in the same tile, so no byte is fetched twice from DRAM. PRED_ORDER walks pred's order
    # instead: pred (and, in the backward, its grad) contiguous, the image's C planes interleaved.
    j = tl.arange(0, CP_PAD * P_PAD)
    if ORDER == PRED_ORDER:
        c = (j % C).to(tl.int64)  # c * stride_c passes 2**31 for a channel-major batch viewed as NCHW
        q = (j // C) % P
        p = j // (C * P)
        in_row = j
        col_ok = j < C * P * P
    else:
        cp = j // P_PAD
        q = j % P_PAD
        c = (cp // P).to(tl.int64)
        p = cp % P
        in_row = p * (P * C) + q * C + c
        col_ok = (cp < C * P) & (q < P)
    ok = removed[:, None] & col_ok[None, :]
    img_off = (
        n[:, None] * stride_n
        + c[None, :] * stride_c
        + (hi[:, None] * P + p[None, :]) * stride_h
        + (wi[:, None] * P + q[None, :]) * stride_w
    )
    pred_off = n[:, None] * stride_pn + patch[:, None] * stride_pl + in_row[None, :]
    t = tl.load(imgs_ptr + img_off, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(pred_ptr + pred_off, mask=ok, other=0.0).to(tl.float32)
    if NORM_PIX:
        D: tl.constexpr = C * P * P
        mean = tl.sum(t, axis=1) / D
        t = tl.where(ok, t - mean[:, None], 0.0)
        var = tl.sum(t * t, axis=1) / (D - 1)  # unbiased, as torch.var's default
        t = t / tl.sqrt(var + EPS)[:, None]
    return x - t, m


@triton.jit
def _load_patch_rows_gathered(
    pred_ptr,
    imgs_ptr,
    mask_ptr,
    pid,
    n_rows,
    L,
    w,
    stride_pn,
    stride_pl,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    C: tl.constexpr,
    P: tl.constexpr,
    P_PAD: tl.constexpr,
    CP_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NORM_PIX: tl.constexpr,
    EPS: tl.constexpr,
):
    """``GATHER_ORDER``: rows [pid*BLOCK_R, ...) as fp32 tiles [BLOCK_R, P_PAD, CP_PAD], one line of
    pixels p a (row, p), both pred and image read contiguously in their own order.

    Along the last axis the image's tile holds u = c*P + q (P contiguous pixels per channel) and
    pred's v = q*C + c (its C*P contiguous values); the normalized target is moved from the one to
    the other by tl.gather within each line (C*P values, not the whole patch). Returns (diff =
    pred - target in pred's order, mask); padding and kept rows hold 0 in diff.
    """
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    m = tl.load(mask_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    removed = (row_ok & (m != 0.0))[:, None, None]  # kept rows are neither read nor computed
    n = (rows // L)[:, None, None]
    patch = (rows % L)[:, None, None]
    hi = patch // w
    wi = patch % w
    p = tl.arange(0, P_PAD)[None, :, None]
    k = tl.arange(0, CP_PAD)[None, None, :]
    line_ok = removed & (p < P) & (k < C * P)
    c = (k // P).to(tl.int64)
    q = k % P
    img_off = n * stride_n + c * stride_c + (hi * P + p) * stride_h + (wi * P + q) * stride_w
    t = tl.load(imgs_ptr + img_off, mask=line_ok, other=0.0).to(tl.float32)
    if NORM_PIX:  # the statistics do not depend on the order
        D: tl.constexpr = C * P * P
        mean = tl.sum(tl.sum(t, axis=2), axis=1) / D
        t = tl.where(line_ok, t - mean[:, None, None], 0.0)
        var = tl.sum(tl.sum(t * t, axis=2), axis=1) / (D - 1)  # unbiased, as torch.var's default
        t = t / tl.sqrt(var + EPS)[:, None, None]
    # pred's v = q*C + c holds the target the image's line keeps at u = c*P + q
    src = tl.where(k < C * P, (k % C) * P + k // C, 0)
    t = tl.gather(t, tl.broadcast_to(src, (BLOCK_R, P_PAD, CP_PAD)), axis=2)
    pred_off = n * stride_pn + patch * stride_pl + p * (C * P) + k
    x = tl.load(pred_ptr + pred_off, mask=line_ok, other=0.0).to(tl.float32)
    return tl.where(line_ok, x - t, 0.0), m


@triton.jit
def _masked_mse_fwd_kernel(
    pred_ptr,
    imgs_ptr,
    mask_ptr,
    partial_ptr,  # [num_programs] fp32: sum over this program's rows of mask * row mse
    n_rows,
    L,
    w,
    stride_pn,
    stride_pl,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    C: tl.constexpr,
    P: tl.constexpr,
    P_PAD: tl.constexpr,
    CP_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NORM_PIX: tl.constexpr,
    EPS: tl.constexpr,
    ORDER: tl.constexpr,
):
    pid = tl.program_id(0)
    if ORDER == GATHER_ORDER:
        diff, m = _load_patch_rows_gathered(
            pred_ptr, imgs_ptr, mask_ptr, pid, n_rows, L, w, stride_pn, stride_pl, stride_n, stride_c, stride_h,
            stride_w, C, P, P_PAD, CP_PAD, BLOCK_R, NORM_PIX, EPS,
        )  # fmt: skip
        row_mse = tl.sum(tl.sum(diff * diff, axis=2), axis=1) / (C * P * P)
    else:
        diff, m = _load_patch_rows(
            pred_ptr, imgs_ptr, mask_ptr, pid, n_rows, L, w, stride_pn, stride_pl, stride_n, stride_c, stride_h,
            stride_w, C, P, P_PAD, CP_PAD, BLOCK_R, NORM_PIX, EPS, ORDER,
        )  # fmt: skip
        row_mse = tl.sum(diff * diff, axis=1) / (C * P * P)
    tl.store(partial_ptr + pid, tl.sum(row_mse * m, axis=0))


@triton.jit
def _masked_mse_bwd_kernel(
    pred_ptr,
    imgs_ptr,
    mask_ptr,
    scale_ptr,  # [1] fp32: grad_loss / sum(mask), read on device (no host sync)
    grad_pred_ptr,
    n_rows,
    L,
    w,
    stride_pn,
    stride_pl,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    C: tl.constexpr,
    P: tl.constexpr,
    P_PAD: tl.constexpr,
    CP_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NORM_PIX: tl.constexpr,
    EPS: tl.constexpr,
    ORDER: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr) * (2.0 / (C * P * P))
    # Every element of every row is stored, kept rows included (their diff is 0: an exact zero grad).
    # The store's offsets are computed here, not taken from the load helpers: torch.compile's
    # mutation analysis follows a stored pointer's data flow, and through that call it would reach
    # pred, imgs and mask and count them as written (functionalization then clones them, and the
    # partitioner fails on pred, a view of the model's output).
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    if ORDER == GATHER_ORDER:
        diff, m = _load_patch_rows_gathered(
            pred_ptr, imgs_ptr, mask_ptr, pid, n_rows, L, w, stride_pn, stride_pl, stride_n, stride_c, stride_h,
            stride_w, C, P, P_PAD, CP_PAD, BLOCK_R, NORM_PIX, EPS,
        )  # fmt: skip
        g = diff * (m * scale)[:, None, None]
        p = tl.arange(0, P_PAD)[None, :, None]
        k = tl.arange(0, CP_PAD)[None, None, :]
        store_ok = (rows < n_rows)[:, None, None] & (p < P) & (k < C * P)
        grad_off = rows[:, None, None] * (C * P * P) + p * (C * P) + k  # grad_pred is contiguous
    else:
        diff, m = _load_patch_rows(
            pred_ptr, imgs_ptr, mask_ptr, pid, n_rows, L, w, stride_pn, stride_pl, stride_n, stride_c, stride_h,
            stride_w, C, P, P_PAD, CP_PAD, BLOCK_R, NORM_PIX, EPS, ORDER,
        )  # fmt: skip
        g = diff * (m * scale)[:, None]
        j = tl.arange(0, CP_PAD * P_PAD)
        if ORDER == IMAGE_ORDER:
            cp = j // P_PAD
            q = j % P_PAD
            in_row = (cp % P) * (P * C) + q * C + cp // P
            col_ok = (cp < C * P) & (q < P)
        else:
            in_row = j
            col_ok = j < C * P * P
        store_ok = (rows < n_rows)[:, None] & col_ok[None, :]
        grad_off = rows[:, None] * (C * P * P) + in_row[None, :]  # grad_pred is contiguous
    tl.store(grad_pred_ptr + grad_off, to_output_dtype(g, grad_pred_ptr.dtype.element_ty, EMULATE_RTNE), mask=store_ok)


def _launch_config(n_rows: int, C: int, P: int, device: torch.device) -> tuple[int, int, int, int, str]:
    """(P_PAD, CP_PAD, BLOCK_R, num_warps, order): a whole patch per row of the tile, ~4K elements a
    tile, in the image's order (the order, one of ``ORDERS``, is swept: benchmarks/sweep_kernels.py)."""
    p_pad, cp_pad = next_pow2(P), next_pow2(C * P)
    width = p_pad * cp_pad
    if cpu_tiles(device):
        return p_pad, cp_pad, min(64, next_pow2(n_rows)), 1, "image"
    return p_pad, cp_pad, max(1, 4096 // width), 8, "image"


def _rows_contiguous(pred: torch.Tensor) -> torch.Tensor:
    # A view such as the decoder output's ``[:, 1:]`` (dropping the cls row) is read in place.
    return pred if pred.stride(-1) == 1 else pred.contiguous()


def _launch(kernel, grid, pred, imgs, mask, extra, n_rows, L, C, P, norm_pix_loss, cfg, **constexprs) -> None:
    p_pad, cp_pad, block_r, num_warps, order = cfg
    launcher(kernel)[grid](
        pred,
        imgs,
        mask,
        *extra,
        n_rows,
        L,
        imgs.shape[3] // P,
        pred.stride(0),
        pred.stride(1),
        imgs.stride(0),
        imgs.stride(1),
        imgs.stride(2),
        imgs.stride(3),
        C=C,
        P=P,
        P_PAD=p_pad,
        CP_PAD=cp_pad,
        BLOCK_R=block_r,
        NORM_PIX=norm_pix_loss,
        EPS=NORM_PIX_EPS,
        ORDER=ORDERS.index(order),
        **constexprs,
        num_warps=num_warps,
    )


@triton_op("fastmae::masked_mse", mutates_args=())
def _masked_mse(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool
) -> torch.Tensor:
    N, L, _ = pred.shape
    C = imgs.shape[1]
    n_rows = N * L
    cfg = _launch_config(n_rows, C, patch_size, pred.device)
    n_programs = triton.cdiv(n_rows, cfg[2])
    partial = new_output((n_programs,), torch.float32, pred.device)
    if n_programs > 0:
        _launch(
            _masked_mse_fwd_kernel, (n_programs,), _rows_contiguous(pred), imgs, mask.contiguous(), (partial,),
            n_rows, L, C, patch_size, norm_pix_loss, cfg,
        )  # fmt: skip
    # 0 / 0 = NaN when nothing is masked, as the reference.
    return partial.sum() / mask.sum(dtype=torch.float32)


@triton_op("fastmae::masked_mse_backward", mutates_args=())
def _masked_mse_backward(
    grad_loss: torch.Tensor,
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool,
) -> torch.Tensor:
    N, L, _ = pred.shape
    C = imgs.shape[1]
    n_rows = N * L
    pred = _rows_contiguous(pred)
    grad_pred = new_output(pred.shape, pred.dtype, pred.device)
    scale = (grad_loss.to(torch.float32) / mask.sum(dtype=torch.float32)).reshape(1)
    cfg = _launch_config(n_rows, C, patch_size, pred.device)
    n_programs = triton.cdiv(n_rows, cfg[2])
    if n_programs > 0:
        _launch(
            _masked_mse_bwd_kernel, (n_programs,), pred, imgs, mask.contiguous(), (scale, grad_pred),
            n_rows, L, C, patch_size, norm_pix_loss, cfg, EMULATE_RTNE=is_interpreter(),
        )  # fmt: skip
    return grad_pred


def _setup_context(ctx, inputs, output) -> None:
    pred, imgs, mask, patch_size, norm_pix_loss = inputs
    ctx.save_for_backward(pred, imgs, mask)
    ctx.patch_size = patch_size
    ctx.norm_pix_loss = norm_pix_loss


def _backward(ctx, grad_loss: torch.Tensor):
    pred, imgs, mask = ctx.saved_tensors
    grad_pred = _masked_mse_backward(grad_loss, pred, imgs, mask, ctx.patch_size, ctx.norm_pix_loss)
    return grad_pred, None, None, None, None


_masked_mse.register_autograd(_backward, setup_context=_setup_context)


def masked_mse(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool
) -> torch.Tensor:
    """MAE's reconstruction loss on the removed patches, targets read from the image.

    Args:
        pred: (N, L, P*P*C) the decoder's prediction, (p, q, c) order within a patch; any strides
            with a contiguous last dim are read in place (e.g. ``decoder_out[:, 1:]``).
        imgs: (N, C, H, W), any strides; no grad flows into it.
        mask: (N, L) float, 1 = removed (these rows are scored), 0 = kept.
        patch_size: P.
        norm_pix_loss: normalize each target patch by its mean and unbiased variance (+1e-6).

    Returns:
        fp32 scalar; NaN when mask.sum() == 0, as the reference.
    """
    check_input(imgs, "imgs", "(N, C, H, W)", pred.device)
    check_input(pred, "pred", "(N, L, P*P*C)", pred.device)
    check_input(mask, "mask", "(N, L)", pred.device)
    check_float(pred, "pred")
    if imgs.dtype == torch.float64:  # integer pixels are fine: the kernels read them as fp32
        raise ValueError("imgs must not be float64 (the kernels compute in fp32); masked_mse_ref takes it")
    check_patch_size(patch_size)
    check_runs_here(pred.device, _masked_mse_fwd_kernel, "masked_mse")
    N, C, H, W = imgs.shape
    P = patch_size
    if H % P or W % P:
        raise ValueError(f"image {H}x{W} is not a multiple of patch_size {P}")
    L = (H // P) * (W // P)
    if pred.shape != (N, L, P * P * C) or mask.shape != (N, L):
        raise ValueError(
            f"expected pred ({N}, {L}, {P * P * C}) and mask ({N}, {L}), "
            f"got {tuple(pred.shape)} and {tuple(mask.shape)}"
        )
    if imgs.requires_grad:
        raise ValueError("masked_mse gives no grad to imgs (the target); pass imgs.detach()")
    if mask.requires_grad:
        raise ValueError(
            "masked_mse gives no grad to mask (MAE's is 0/1 data); pass mask.detach() or use masked_mse_ref"
        )
    return _masked_mse(pred, imgs, mask, patch_size, norm_pix_loss)


def masked_mse_ref(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool
) -> torch.Tensor:
    """Plain PyTorch, the reference MAE's ``patchify`` + ``forward_loss``."""
    N, C, H, W = imgs.shape
    P = patch_size
    h, w = H // P, W // P
    x = imgs.reshape(N, C, h, P, w, P)
    x = torch.einsum("nchpwq->nhwpqc", x)
    target = x.reshape(N, h * w, P * P * C)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()
