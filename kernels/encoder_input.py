"""Encoder input: cls token + pos-embed gather-add of the kept tokens, written in one pass.

``out[n, 0] = cls_token + pos[0, 0]``; ``out[n, 1 + k] = x[n, k] + pos[0, 1 + ids_keep[n, k]]``.

Why a separate op and not part of ``patch_gather``: the patch-embed GEMM sits between the pixel
gather and the pos-embed add, so the add belongs in the GEMM's epilogue or right after it. Doing it
here also replaces the reference's ``torch.cat`` with the cls row (one read of x, one write of the
output, instead of an add pass plus a cat pass).

Backward needs no kernel: ``grad_x = grad_out[:, 1:]`` is a view (no copy; the consumer, the
patch-embed linear's backward, takes it as is) and ``grad_cls = grad_out[:, 0].sum(0)`` reads
N*D elements. ``pos_embed`` is MAE's fixed sin-cos buffer and gets no grad.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._utils import (
    check_float,
    check_input,
    check_runs_here,
    cpu_tiles,
    is_interpreter,
    launcher,
    new_output,
    next_pow2,
    to_output_dtype,
)


@triton.jit
def _encoder_input_kernel(
    x_ptr,  # [N, K, D] contiguous
    cls_ptr,  # [D]
    pos_ptr,  # [1 + L, D] contiguous
    ids_ptr,  # [N, K] contiguous
    out_ptr,  # [N, 1 + K, D] contiguous
    n_rows,  # N * (1 + K)
    K,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    n = rows // (K + 1)
    t = rows % (K + 1)  # token: 0 = cls, 1 + k = kept patch k
    is_patch = row_ok & (t > 0)
    patch = tl.load(ids_ptr + n * K + (t - 1), mask=is_patch, other=-1).to(tl.int64)
    pos_row = patch + 1  # the cls row reads pos row 0 (patch = -1)

    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + (n * K + t - 1)[:, None] * D + cols[None, :], mask=is_patch[:, None] & col_ok[None, :])
    cls = tl.load(cls_ptr + cols, mask=col_ok)
    pos = tl.load(pos_ptr + pos_row[:, None] * D + cols[None, :], mask=ok)
    # Arithmetic in fp32 whatever the storage dtype (the interpreter also has no bf16 scalar ops).
    src = tl.where(is_patch[:, None], x.to(tl.float32), cls.to(tl.float32)[None, :])
    y = src + pos.to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * D + cols[None, :], to_output_dtype(y, out_ptr.dtype.element_ty, EMULATE_RTNE), mask=ok
    )


def _launch_config(n_rows: int, D: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps)."""
    block_d = min(next_pow2(D), 1024)
    if cpu_tiles(device):
        return min(128, next_pow2(n_rows)), next_pow2(D), 1
    return max(1, 4096 // block_d), block_d, 4


@triton_op("fastmae::encoder_input", mutates_args=())
def _encoder_input(
    x: torch.Tensor, cls_token: torch.Tensor, pos_embed: torch.Tensor, ids_keep: torch.Tensor
) -> torch.Tensor:
    N, K, D = x.shape
    dtype = torch.promote_types(torch.promote_types(x.dtype, cls_token.dtype), pos_embed.dtype)
    out = new_output((N, 1 + K, D), dtype, x.device)
    n_rows = N * (1 + K)
    if n_rows == 0 or D == 0:
        return out
    block_r, block_d, num_warps = _launch_config(n_rows, D, x.device)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(D, block_d))
    launcher(_encoder_input_kernel)[grid](
        x.contiguous(),
        cls_token.contiguous(),
        pos_embed.contiguous(),
        ids_keep.contiguous(),
        out,
        n_rows,
        K,
        D,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        EMULATE_RTNE=is_interpreter(),
        num_warps=num_warps,
    )
    return out


def _setup_context(ctx, inputs, output) -> None:
    x, cls_token, _pos_embed, _ids_keep = inputs
    ctx.x_dtype = x.dtype
    ctx.cls_dtype = cls_token.dtype


def _backward(ctx, grad_out: torch.Tensor):
    grad_x = grad_out[:, 1:].to(ctx.x_dtype)
    grad_cls = grad_out[:, :1].sum(0, keepdim=True, dtype=torch.float32).to(ctx.cls_dtype)
    return grad_x, grad_cls, None, None


_encoder_input.register_autograd(_backward, setup_context=_setup_context)


def encoder_input(
    x: torch.Tensor, cls_token: torch.Tensor, pos_embed: torch.Tensor, ids_keep: torch.Tensor
) -> torch.Tensor:
    """Prepend the cls token and add the kept tokens' pos-embeds.

    Args:
        x: (N, K, D) patch embeddings of the kept patches (the patch-embed GEMM's output).
        cls_token: (1, 1, D).
        pos_embed: (1, 1 + L, D) fixed buffer (no grad flows into it).
        ids_keep: (N, K) int64 patch indices in [0, L).

    Returns:
        (N, 1 + K, D) in the promoted dtype of x, cls_token and pos_embed (as the reference's adds).
    """
    check_input(x, "x", "(N, K, D)", x.device)
    for t, name, layout in ((cls_token, "cls_token", "(1, 1, D)"), (pos_embed, "pos_embed", "(1, 1+L, D)")):
        check_input(t, name, layout, x.device)
    check_input(ids_keep, "ids_keep", "(N, K)", x.device, index=True)
    for t, name in ((x, "x"), (cls_token, "cls_token"), (pos_embed, "pos_embed")):
        check_float(t, name)
    check_runs_here(x.device, _encoder_input_kernel, "encoder_input")
    N, K, D = x.shape
    if cls_token.shape != (1, 1, D) or pos_embed.dim() != 3 or pos_embed.shape[::2] != (1, D):
        raise ValueError(
            f"expected cls_token (1, 1, {D}) and pos_embed (1, 1+L, {D}), "
            f"got {tuple(cls_token.shape)} and {tuple(pos_embed.shape)}"
        )
    if ids_keep.shape != (N, K):
        raise ValueError(f"ids_keep must be ({N}, {K}), got {tuple(ids_keep.shape)}")
    if pos_embed.requires_grad:
        raise ValueError("encoder_input treats pos_embed as MAE's fixed buffer; it must not require grad")
    return _encoder_input(x, cls_token, pos_embed, ids_keep)


def encoder_input_ref(
    x: torch.Tensor, cls_token: torch.Tensor, pos_embed: torch.Tensor, ids_keep: torch.Tensor
) -> torch.Tensor:
    """Plain PyTorch, the reference's order: add pos to all kept tokens, then cat the cls row."""
    D = x.shape[-1]
    pos = pos_embed[:, 1:, :].expand(x.shape[0], -1, -1)
    x = x + torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    cls = (cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)
