"""Kept-patch gather: patchify + MAE masking in one pass, straight from the NCHW image.

``out[n, k, c*P*P + p*P + q] = imgs[n, c, hi*P + p, wi*P + q]`` with ``l = ids_keep[n, k]``,
``hi, wi = divmod(l, W // P)``. The (c, p, q) order is the patch-embed Conv2d weight's, so
``F.linear(out, conv.weight.reshape(D, -1), conv.bias)`` equals the conv patch embedding of the kept
patches: the encoder embeds only the 25% of patches it keeps instead of all of them.

Only kept patches are read. There is no backward: the images are data, never a trained tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._utils import (
    check_input,
    check_patch_size,
    check_runs_here,
    cpu_tiles,
    launcher,
    new_output,
    next_pow2,
)


@triton.jit
def _patch_gather_kernel(
    imgs_ptr,
    ids_ptr,
    out_ptr,
    n_rows,  # N * K
    K,
    w,  # patches per image row, W // P
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    C: tl.constexpr,
    P: tl.constexpr,
    P_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_CP: tl.constexpr,
):
    # A patch row is C*P "lines" (one (c, p) pair each) of P pixels that are contiguous both in the
    # image (along W) and in the output. The tile is [BLOCK_R rows, BLOCK_CP lines * P_PAD pixels];
    # q = j % P_PAD with a power-of-two P_PAD keeps the pixel axis contiguous for the compiler, so
    # loads and stores vectorize along q.
    pid_r = tl.program_id(0)
    pid_cp = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    n = rows // K
    patch = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    hi = patch // w
    wi = patch % w

    j = tl.arange(0, BLOCK_CP * P_PAD)
    cp = pid_cp * BLOCK_CP + j // P_PAD
    q = j % P_PAD
    col_ok = cp < C * P
    if P_PAD != P:
        col_ok = col_ok & (q < P)
    c = (cp // P).to(tl.int64)  # c * stride_c passes 2**31 for a channel-major batch viewed as NCHW
    p = cp % P

    src = (
        n[:, None] * stride_n
        + c[None, :] * stride_c
        + (hi[:, None] * P + p[None, :]) * stride_h
        + (wi[:, None] * P + q[None, :]) * stride_w
    )
    ok = row_ok[:, None] & col_ok[None, :]
    v = tl.load(imgs_ptr + src, mask=ok)
    dst = rows[:, None] * (C * P * P) + (cp * P + q)[None, :]
    tl.store(out_ptr + dst, v, mask=ok)


def _launch_config(n_rows: int, C: int, P: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_CP, num_warps): ~4K elements a program on GPU, fewer bigger tiles on CPU."""
    p_pad = next_pow2(P)
    if cpu_tiles(device):
        # The interpreter's cost is per program: one program per many rows and the whole patch.
        return min(64, next_pow2(n_rows)), next_pow2(C * P), 1
    block_cp = max(1, 256 // p_pad)
    return 16, block_cp, 4


@triton_op("fastmae::patch_gather", mutates_args=())
def _patch_gather(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    N, C, H, W = imgs.shape
    P = patch_size
    K = ids_keep.shape[1]
    ids_keep = ids_keep.contiguous()
    out = new_output((N, K, C * P * P), imgs.dtype, imgs.device)
    n_rows = N * K
    if n_rows == 0:
        return out
    block_r, block_cp, num_warps = _launch_config(n_rows, C, P, imgs.device)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(C * P, block_cp))
    launcher(_patch_gather_kernel)[grid](
        imgs,
        ids_keep,
        out,
        n_rows,
        K,
        W // P,
        imgs.stride(0),
        imgs.stride(1),
        imgs.stride(2),
        imgs.stride(3),
        C=C,
        P=P,
        P_PAD=next_pow2(P),
        BLOCK_R=block_r,
        BLOCK_CP=block_cp,
        num_warps=num_warps,
    )
    return out


def patch_gather(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Gather the kept patches of NCHW images, flattened in (c, p, q) order.

    Args:
        imgs: (N, C, H, W), any strides (channels-last is read in place); H, W multiples of P.
        ids_keep: (N, K) int64 patch indices ``l = hi * (W // P) + wi``, as MAE's ``ids_shuffle[:, :K]``.
        patch_size: P.

    Returns:
        (N, K, C*P*P) in ``imgs.dtype``.
    """
    if imgs.requires_grad:
        raise ValueError(
            "patch_gather has no backward into imgs (MAE's images are data); pass imgs.detach() or use patch_gather_ref"
        )
    check_input(imgs, "imgs", "(N, C, H, W)", imgs.device)
    check_input(ids_keep, "ids_keep", "(N, K)", imgs.device, index=True)
    check_patch_size(patch_size)
    check_runs_here(imgs.device, _patch_gather_kernel, "patch_gather")
    N, C, H, W = imgs.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image {H}x{W} is not a multiple of patch_size {patch_size}")
    if ids_keep.shape[0] != N:
        raise ValueError(f"ids_keep must be (N={N}, K), got {tuple(ids_keep.shape)}")
    return _patch_gather(imgs, ids_keep, patch_size)


def patch_gather_ref(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Plain PyTorch: patchify in (c, p, q) order, then gather the kept rows."""
    N, C, H, W = imgs.shape
    P = patch_size
    h, w = H // P, W // P
    x = imgs.reshape(N, C, h, P, w, P).permute(0, 2, 4, 1, 3, 5).reshape(N, h * w, C * P * P)
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
