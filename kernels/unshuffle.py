"""Decoder unshuffle: put the kept tokens back in place, fill the rest with the mask token, add pos.

For ``x`` (N, 1+K, D) and ``ids_restore`` (N, L):
``out[n, 0] = x[n, 0] + pos[0, 0]``; for each patch l with ``j = ids_restore[n, l]``:
``out[n, 1+l] = (x[n, 1+j] if j < K else mask_token) + pos[0, 1+l]``.

This is the reference's cat + gather + cat + add in one read of x and one write of the output.
Backward: ``ids_restore`` is a permutation (MAE's ``argsort(ids_shuffle)``), so every kept token
j < K is hit by exactly one l and its grad is a row copy (``grad_x[n, 1+j] = g[n, 1+l]``, no
accumulation needed); the rows with j >= K all sum into mask_token's grad, which each program
reduces in registers over its rows and writes once as a partial sum (no per-element atomics).
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
    num_sms,
    to_output_dtype,
)


@triton.jit
def _unshuffle_fwd_kernel(
    x_ptr,  # [N, 1 + K, D] contiguous
    mask_token_ptr,  # [D]
    ids_restore_ptr,  # [N, L] contiguous
    pos_ptr,  # [1 + L, D] contiguous
    out_ptr,  # [N, 1 + L, D] contiguous
    n_rows,  # N * (1 + L)
    K,
    L,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    n = rows // (L + 1)
    t = rows % (L + 1)  # output token: 0 = cls, 1 + l = patch l
    is_patch = row_ok & (t > 0)
    j = tl.load(ids_restore_ptr + n * L + (t - 1), mask=is_patch, other=-1).to(tl.int64)
    src_tok = tl.where(t == 0, 0, j + 1)  # source token in x; cls comes from x[n, 0]
    from_x = row_ok & (src_tok <= K)  # src_tok > K: a removed patch, takes the mask token

    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + (n * (K + 1) + src_tok)[:, None] * D + cols[None, :], mask=from_x[:, None] & col_ok[None, :])
    mask_token = tl.load(mask_token_ptr + cols, mask=col_ok)
    pos = tl.load(pos_ptr + t[:, None] * D + cols[None, :], mask=ok)
    src = tl.where(from_x[:, None], x.to(tl.float32), mask_token.to(tl.float32)[None, :])
    y = src + pos.to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * D + cols[None, :], to_output_dtype(y, out_ptr.dtype.element_ty, EMULATE_RTNE), mask=ok
    )


@triton.jit
def _unshuffle_bwd_kernel(
    grad_out_ptr,  # [N, 1 + L, D] contiguous
    ids_restore_ptr,  # [N, L] contiguous
    grad_x_ptr,  # [N, 1 + K, D] contiguous
    partial_ptr,  # [num_programs, D] fp32: this program's share of mask_token's grad
    n_rows,  # N * (1 + L)
    rows_per_program,  # a multiple of BLOCK_R
    K,
    L,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    # Each program owns a contiguous range of grad_out rows (not one tile) so that the number of
    # mask-token partial sums, and the second reduction over them, stays ~ a few per SM. With
    # STAGES > 1 the loop is software-pipelined: the loads of the next STAGES - 1 tiles are in
    # flight (cp.async into shared memory at sm_90) while this one is stored, where a plain loop
    # waits for each tile's loads in turn with ~a tile a warp in flight.
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = pid_r.to(tl.int64) * rows_per_program
    for r0 in tl.range(0, rows_per_program, BLOCK_R, num_stages=STAGES):
        rows = start + r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        n = rows // (L + 1)
        t = rows % (L + 1)
        is_patch = row_ok & (t > 0)
        j = tl.load(ids_restore_ptr + n * L + (t - 1), mask=is_patch, other=-1).to(tl.int64)
        src_tok = tl.where(t == 0, 0, j + 1)
        to_x = row_ok & (src_tok <= K)
        to_mask = is_patch & (src_tok > K)
        g = tl.load(grad_out_ptr + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :])
        tl.store(
            grad_x_ptr + (n * (K + 1) + src_tok)[:, None] * D + cols[None, :],
            to_output_dtype(g.to(tl.float32), grad_x_ptr.dtype.element_ty, EMULATE_RTNE),
            mask=to_x[:, None] & col_ok[None, :],
        )
        acc += tl.sum(tl.where(to_mask[:, None], g.to(tl.float32), 0.0), axis=0)
    tl.store(partial_ptr + pid_r.to(tl.int64) * D + cols, acc, mask=col_ok)


def _launch_config(n_rows: int, D: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps, the backward loop's pipeline stages): ~4K elements a tile on
    GPU, fewer bigger tiles on CPU; one stage (a plain loop) until the sweep
    (benchmarks/sweep_kernels.py) has timed more."""
    if cpu_tiles(device):
        return min(128, next_pow2(n_rows)), next_pow2(D), 1, 1
    block_d = min(next_pow2(D), 1024)
    return max(1, 4096 // block_d), block_d, 4, 1


@triton_op("fastmae::unshuffle", mutates_args=())
def _unshuffle(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    N, K1, D = x.shape
    L = ids_restore.shape[1]
    dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos.dtype)
    out = new_output((N, 1 + L, D), dtype, x.device)
    n_rows = N * (1 + L)
    if n_rows == 0 or D == 0:
        return out
    block_r, block_d, num_warps, _ = _launch_config(n_rows, D, x.device)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(D, block_d))
    launcher(_unshuffle_fwd_kernel)[grid](
        x.contiguous(),
        mask_token.contiguous(),
        ids_restore.contiguous(),
        pos.contiguous(),
        out,
        n_rows,
        K1 - 1,
        L,
        D,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        EMULATE_RTNE=is_interpreter(),
        num_warps=num_warps,
    )
    return out


@triton_op("fastmae::unshuffle_backward", mutates_args=())
def _unshuffle_backward(
    grad_out: torch.Tensor,
    ids_restore: torch.Tensor,
    K: int,
    x_dtype: torch.dtype,
    mask_token_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    N, L1, D = grad_out.shape
    grad_out = grad_out.contiguous()  # e.g. the expanded ones of a .sum().backward()
    grad_x = new_output((N, 1 + K, D), x_dtype, grad_out.device)
    n_rows = N * L1
    block_r, block_d, num_warps, stages = _launch_config(n_rows, D, grad_out.device)
    # A few row ranges per SM: enough programs to fill the GPU, few partial sums to reduce.
    target_programs = max(1, 4 * num_sms(grad_out.device) // triton.cdiv(D, block_d))
    rows_per_program = block_r * max(1, triton.cdiv(triton.cdiv(n_rows, block_r), target_programs))
    n_programs = max(1, triton.cdiv(n_rows, rows_per_program))
    partial = new_output((n_programs, D), torch.float32, grad_out.device)
    if n_rows > 0 and D > 0:
        grid = (n_programs, triton.cdiv(D, block_d))
        launcher(_unshuffle_bwd_kernel)[grid](
            grad_out,
            ids_restore.contiguous(),
            grad_x,
            partial,
            n_rows,
            rows_per_program,
            K,
            L1 - 1,
            D,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            STAGES=stages,
            EMULATE_RTNE=is_interpreter(),
            num_warps=num_warps,
        )
    else:
        partial.zero_()
    grad_mask_token = partial.sum(0).to(mask_token_dtype).reshape(1, 1, D)
    return grad_x, grad_mask_token


def _setup_context(ctx, inputs, output) -> None:
    x, mask_token, ids_restore, _pos = inputs
    ctx.save_for_backward(ids_restore)
    ctx.K = x.shape[1] - 1
    ctx.x_dtype = x.dtype
    ctx.mask_token_dtype = mask_token.dtype


def _backward(ctx, grad_out: torch.Tensor):
    (ids_restore,) = ctx.saved_tensors
    grad_x, grad_mask_token = _unshuffle_backward(grad_out, ids_restore, ctx.K, ctx.x_dtype, ctx.mask_token_dtype)
    return grad_x, grad_mask_token, None, None


_unshuffle.register_autograd(_backward, setup_context=_setup_context)


def unshuffle(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Restore the full token sequence for the decoder and add its pos-embed.

    Args:
        x: (N, 1 + K, D) decoder-embedded tokens, cls first, then the K kept patches in shuffled order.
        mask_token: (1, 1, D).
        ids_restore: (N, L) int64 (or int32), a permutation of [0, L) per sample (MAE's
            ``argsort(ids_shuffle)``); not checked (a device sync): any other ids give wrong grads.
        pos: (1, 1 + L, D) the decoder's fixed pos-embed (no grad flows into it).

    Returns:
        (N, 1 + L, D) in the promoted dtype of x, mask_token and pos (as the reference's cat + add).
    """
    check_input(x, "x", "(N, 1+K, D)", x.device)
    for t, name, layout in ((mask_token, "mask_token", "(1, 1, D)"), (pos, "pos", "(1, 1+L, D)")):
        check_input(t, name, layout, x.device)
    check_input(ids_restore, "ids_restore", "(N, L)", x.device, index=True)
    for t, name in ((x, "x"), (mask_token, "mask_token"), (pos, "pos")):
        check_float(t, name)
    check_runs_here(x.device, _unshuffle_fwd_kernel, "unshuffle")
    N, K1, D = x.shape
    L = ids_restore.shape[1]
    if K1 < 1 or ids_restore.shape != (N, L) or K1 - 1 > L:
        raise ValueError(
            f"expected x (N, 1+K, D) and ids_restore (N, L >= K), got {tuple(x.shape)}, {tuple(ids_restore.shape)}"
        )
    if mask_token.shape != (1, 1, D) or pos.shape != (1, 1 + L, D):
        raise ValueError(
            f"expected mask_token (1, 1, {D}) and pos (1, {1 + L}, {D}), "
            f"got {tuple(mask_token.shape)} and {tuple(pos.shape)}"
        )
    if pos.requires_grad:
        raise ValueError("unshuffle treats pos as MAE's fixed decoder pos-embed; it must not require grad")
    return _unshuffle(x, mask_token, ids_restore, pos)


def unshuffle_ref(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Plain PyTorch, the reference MAE decoder's lines."""
    N, _, D = x.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.repeat(N, L + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    return torch.cat([x[:, :1, :], x_], dim=1) + pos
