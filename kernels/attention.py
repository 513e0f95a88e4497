"""Self-attention on the packed qkv projection, for MAE's short sequences: forward and backward.

For ``qkv`` (B, N, 3, H, Dh), the fused projection's output reshaped, and ``s = Dh**-0.5``:
``out[b, n, h] = softmax_m(s * q[b, n, h] . k[b, m, h]) @ v[b, :, h]``, returned as (B, N, H, Dh),
the layout the output projection reads as (B, N, H * Dh). No mask, no dropout (MAE uses neither).

Why a kernel of our own: MAE's attention runs at 50 tokens (encoder: cls + 49 kept) and 197
(decoder), with the decoder's head dim 32. The first H200 profile timed SDPA's cuDNN kernels at
8.3 ms of the 49 ms ViT-B step, ~100 TFLOP/s on the decoder's call and ~35 on the encoder's, both
several times their memory floor; their names say 64x64x64 and 64x128x64 tiles, i.e. (our
reading, not verified) the head dim 32 and the token counts padded up to those. Here q, k and v
are read in place from the projection's (B, N, 3, H, Dh) layout and the grads written into one
(B, N, 3, H, Dh) tensor, so there are no head-major copies on either side (the traffic probe
counts 1.8 ms of them in the ViT-B step's backward on the sdpa path); the tiles follow the head
dim, and optionally (``tails``) the token count.

Forward: flash attention's online softmax over key blocks (for N <= BLOCK_N one pass), in fp32,
exp2 with the scale folded in; saves the per-row log-sum-exp (base 2) for the backward.
Backward (flash attention 2's split): each program owns one key block, for which it accumulates
dK and dV over all query blocks, and one query block, for which it accumulates dQ over all key
blocks; ``delta = rowsum(dO * O)`` is formed from O and dO in the loops (no third kernel). Every
grad element has one writer: no atomics, deterministic. Where the whole sequence is one tile
(the encoder's 50 tokens), one pass gives all three grads from one set of scores.

``attention_ref`` is the plain fp32 ``softmax(q k^T s) v`` it is tested against.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._utils import check_runs_here, cpu_tiles, is_interpreter, launcher, new_output, next_pow2, to_output_dtype

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """``tl.dot`` accumulating in fp32. The CPU interpreter (Triton 3.9) multiplies bf16 tiles as raw
    integers, so there both sides go to fp32 first: a product of two bf16 or fp16 values is exact in
    fp32, leaving only the fp32 accumulation, as in the GPU's tensor-core dot."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _fwd_step(
    q,
    k_base,
    v_base,
    stride_n,
    start_n,
    N,
    d,
    d_ok,
    m_i,
    l_i,
    acc,
    qk_scale,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """One key block of the forward's online softmax: the running max, sum and output, updated.

    The k / v loads here, in _dq_step and in the backward kernel are written out each time: behind
    a shared jit helper (a nested call), torch.compile's mutation analysis took the backward kernel
    for a writer of qkv and would clone it every step (tests/kernels/test_compile_trace.py)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + cols[:, None] * stride_n + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_n + d[None, :], mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), DOT_PRECISION, EMULATE_RTNE) * qk_scale
    s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(to_output_dtype(p, v.dtype, EMULATE_RTNE), v, DOT_PRECISION, EMULATE_RTNE)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    qkv_ptr,  # [B, N, 3, H, Dh] contiguous
    out_ptr,  # [B, N, H, Dh] contiguous
    lse_ptr,  # [B * H, N] fp32: log2-sum-exp2 of each query row's scaled scores
    N,
    H,
    Dh,
    qk_scale,  # Dh**-0.5 * log2(e)
    row0,  # the first query row of this launch's blocks
    bh0,  # the first (batch, head) pair of this launch (grid axis 1 holds at most 65535)
    BLOCK_M: tl.constexpr,  # query rows a program
    BLOCK_N: tl.constexpr,  # key rows a step
    TAIL_N: tl.constexpr,  # 0, or the last step's key rows (the keys past the last whole BLOCK_N)
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    # torch.compile passes a Python float argument as fp64 (inductor's _use_fp64_for_unbacked_floats):
    # an fp64 scale would make the scores, and the loop-carried row max, fp64 (a compile error)
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid_m = tl.program_id(0)
    pid_bh = bh0 + tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    stride_n = 3 * H * Dh  # one token's q, k, v
    q_base = qkv_ptr + b * N * stride_n + h * Dh
    k_base = q_base + H * Dh
    v_base = k_base + H * Dh

    rows = row0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = d < Dh
    q = tl.load(q_base + rows[:, None] * stride_n + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_main = N if TAIL_N == 0 else (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_main, BLOCK_N):
        m_i, l_i, acc = _fwd_step(
            q, k_base, v_base, stride_n, start_n, N, d, d_ok, m_i, l_i, acc, qk_scale,
            BLOCK_N, DOT_PRECISION, EMULATE_RTNE,
        )  # fmt: skip
    if TAIL_N > 0:  # the launcher sets it only where keys are left past n_main
        m_i, l_i, acc = _fwd_step(
            q, k_base, v_base, stride_n, n_main, N, d, d_ok, m_i, l_i, acc, qk_scale,
            TAIL_N, DOT_PRECISION, EMULATE_RTNE,
        )  # fmt: skip
    out = acc / l_i[:, None]
    out_base = out_ptr + b * N * H * Dh + h * Dh
    tl.store(
        out_base + rows[:, None] * (H * Dh) + d[None, :],
        to_output_dtype(out, out_ptr.dtype.element_ty, EMULATE_RTNE),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(lse_ptr + pid_bh * N + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _dkdv_step(
    k,
    v,
    dk,
    dv,
    cols,
    col_ok,
    start_m,
    q_base,
    do_base,
    o_base,
    lse_base,
    dq_base,
    stride_n,
    o_stride_n,
    N,
    d,
    d_ok,
    qk_scale,
    sm_scale,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    GRAD_TY: tl.constexpr,
):
    """One query block's share of a key block's dK and dV (scores transposed: [keys, queries]);
    with ONE_BLOCK also the query block's whole dQ, stored."""
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + rows[:, None] * stride_n + d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * o_stride_n + d[None, :], mask=q_mask, other=0.0)
    o = tl.load(o_base + rows[:, None] * o_stride_n + d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    s_t = _dot(k, tl.trans(q), DOT_PRECISION, EMULATE_RTNE) * qk_scale
    # No masking needed: padded query rows load q = dO = 0 (and lse = 0, so p_t = 1) and add
    # nothing to dK or dV; padded key rows (maybe inf in p_t) are never stored.
    p_t = tl.exp2(s_t - lse[None, :])
    if ONE_BLOCK:  # here the padded keys' rows feed dQ: they must be 0 (see the dQ pass)
        p_t = tl.where(col_ok[:, None], p_t, 0.0)
    dv += _dot(to_output_dtype(p_t, do.dtype, EMULATE_RTNE), do, DOT_PRECISION, EMULATE_RTNE)
    dp_t = _dot(v, tl.trans(do), DOT_PRECISION, EMULATE_RTNE)
    ds_t = to_output_dtype(p_t * (dp_t - delta[None, :]), q.dtype, EMULATE_RTNE)
    dk += _dot(ds_t, q, DOT_PRECISION, EMULATE_RTNE)
    if ONE_BLOCK:
        dq = _dot(tl.trans(ds_t), k, DOT_PRECISION, EMULATE_RTNE) * sm_scale
        tl.store(
            dq_base + rows[:, None] * stride_n + d[None, :], to_output_dtype(dq, GRAD_TY, EMULATE_RTNE), mask=q_mask
        )
    return dk, dv


@triton.jit
def _dq_step(
    q,
    do,
    lse,
    delta,
    dq,
    start_n,
    k_base,
    v_base,
    stride_n,
    N,
    d,
    d_ok,
    qk_scale,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
):
    """One key block's share of a query block's dQ."""
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + cols[:, None] * stride_n + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_n + d[None, :], mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), DOT_PRECISION, EMULATE_RTNE) * qk_scale
    # Padded keys (k = v = 0, score 0) must give p = 0: exp2(0 - lse) overflows to inf when a
    # row's real scores are all far below 0, and inf x k = 0 would put NaN into dQ.
    p = tl.where(col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), DOT_PRECISION, EMULATE_RTNE)
    ds = p * (dp - delta[:, None])
    dq += _dot(to_output_dtype(ds, k.dtype, EMULATE_RTNE), k, DOT_PRECISION, EMULATE_RTNE)
    return dq


@triton.jit
def _attn_bwd_kernel(
    qkv_ptr,  # [B, N, 3, H, Dh] contiguous
    out_ptr,  # [B, N, H, Dh] contiguous: the forward's output
    grad_out_ptr,  # [B, N, H, Dh] contiguous
    lse_ptr,  # [B * H, N] fp32, from the forward
    grad_qkv_ptr,  # [B, N, 3, H, Dh] contiguous
    N,
    H,
    Dh,
    qk_scale,  # Dh**-0.5 * log2(e)
    sm_scale,  # Dh**-0.5
    key0,  # this launch's first key row (its programs own key blocks from here ...)
    key_end,  # (... up to here)
    row0,  # and its first query row
    row_end,
    bh0,  # the first (batch, head) pair of this launch (grid axis 1 holds at most 65535)
    OWN_M: tl.constexpr,  # the query rows a program owns (dQ)
    OWN_N: tl.constexpr,  # the key rows a program owns (dK, dV)
    BLOCK_M: tl.constexpr,  # query rows a step of the dK, dV loop
    BLOCK_N: tl.constexpr,  # key rows a step of the dQ loop
    TAIL_M: tl.constexpr,  # 0, or the dK, dV loop's last step (the queries past the last whole BLOCK_M)
    TAIL_N: tl.constexpr,  # 0, or the dQ loop's last step
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # the whole sequence is one block: one pass gives dQ, dK and dV
):
    # Program j of a (b, h): dK, dV of key block j (OWN_N rows from key0), then dQ of query block
    # j (OWN_M rows from row0); the grid has enough programs for both. With ONE_BLOCK (MAE's
    # encoder: 50 tokens) the one program's scores serve all three grads, so the second pass,
    # which would recompute them, is left out.
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 under torch.compile, as in the forward
    sm_scale = tl.cast(sm_scale, tl.float32)
    pid = tl.program_id(0)
    pid_bh = bh0 + tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    stride_n = 3 * H * Dh
    q_base = qkv_ptr + b * N * stride_n + h * Dh
    k_base = q_base + H * Dh
    v_base = k_base + H * Dh
    o_stride_n = H * Dh
    o_base = out_ptr + b * N * o_stride_n + h * Dh
    do_base = grad_out_ptr + b * N * o_stride_n + h * Dh
    lse_base = lse_ptr + pid_bh * N
    dq_base = grad_qkv_ptr + b * N * stride_n + h * Dh
    dk_base = dq_base + H * Dh
    dv_base = dk_base + H * Dh
    d = tl.arange(0, BLOCK_D)
    d_ok = d < Dh
    ty = grad_qkv_ptr.dtype.element_ty

    # dK, dV of the key block this program owns
    n_start = key0 + pid * OWN_N
    cols = n_start + tl.arange(0, OWN_N)
    col_ok = cols < N
    if n_start < key_end:
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_n + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_n + d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros([OWN_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([OWN_N, BLOCK_D], dtype=tl.float32)
        m_main = N if TAIL_M == 0 else (N // BLOCK_M) * BLOCK_M
        for start_m in range(0, m_main, BLOCK_M):
            dk, dv = _dkdv_step(
                k, v, dk, dv, cols, col_ok, start_m, q_base, do_base, o_base, lse_base, dq_base, stride_n,
                o_stride_n, N, d, d_ok, qk_scale, sm_scale, BLOCK_M, DOT_PRECISION, EMULATE_RTNE, ONE_BLOCK, ty,
            )  # fmt: skip
        if TAIL_M > 0:
            dk, dv = _dkdv_step(
                k, v, dk, dv, cols, col_ok, m_main, q_base, do_base, o_base, lse_base, dq_base, stride_n,
                o_stride_n, N, d, d_ok, qk_scale, sm_scale, TAIL_M, DOT_PRECISION, EMULATE_RTNE, ONE_BLOCK, ty,
            )  # fmt: skip
        dk = dk * sm_scale
        tl.store(dk_base + cols[:, None] * stride_n + d[None, :], to_output_dtype(dk, ty, EMULATE_RTNE), mask=kv_mask)
        tl.store(dv_base + cols[:, None] * stride_n + d[None, :], to_output_dtype(dv, ty, EMULATE_RTNE), mask=kv_mask)

    # dQ of the query block this program owns
    m_start = row0 + pid * OWN_M
    rows = m_start + tl.arange(0, OWN_M)
    row_ok = rows < N
    if not ONE_BLOCK and m_start < row_end:
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_n + d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * o_stride_n + d[None, :], mask=q_mask, other=0.0)
        o = tl.load(o_base + rows[:, None] * o_stride_n + d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        dq = tl.zeros([OWN_M, BLOCK_D], dtype=tl.float32)
        n_main = N if TAIL_N == 0 else (N // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_main, BLOCK_N):
            dq = _dq_step(
                q, do, lse, delta, dq, start_n, k_base, v_base, stride_n, N, d, d_ok, qk_scale,
                BLOCK_N, DOT_PRECISION, EMULATE_RTNE,
            )  # fmt: skip
        if TAIL_N > 0:
            dq = _dq_step(
                q, do, lse, delta, dq, n_main, k_base, v_base, stride_n, N, d, d_ok, qk_scale,
                TAIL_N, DOT_PRECISION, EMULATE_RTNE,
            )  # fmt: skip
        dq = dq * sm_scale
        tl.store(dq_base + rows[:, None] * stride_n + d[None, :], to_output_dtype(dq, ty, EMULATE_RTNE), mask=q_mask)


def _launch_config(N: int, Dh: int, device: torch.device) -> tuple[int, int, int, int, int, int, int, bool]:
    """(fwd BLOCK_M, fwd BLOCK_N, fwd warps, bwd BLOCK_M, bwd BLOCK_N, bwd warps, stages, tails).

    GPU: 64 x 64 tiles (wgmma's M is 64 a warp group), which cover MAE's encoder (50 tokens) in one
    step and its decoder (197) in four. Compiled for sm_90 without a GPU
    (tests/kernels/test_sm90_codegen.py) these use wgmma and do not spill; the backward at head dim
    64 takes 8 warps (255 registers a thread with 4). CPU (the interpreter, whose cost is per
    program): one program per (b, h), the whole sequence one tile.

    ``tails``: the tokens past the last whole block get a block of their own, as small as holds
    them (at least 16), instead of a whole padded one: 197 tokens as 3 x 64 + 16 (208) instead of
    4 x 64 (256), about a third less work on the padded score tiles; a query tail block is a
    second launch. Off until measured. ``benchmarks/bench_attention.py`` times other tilings
    (``TRITON_CONFIGS``, this one included) beside this rule.

    ``stages`` 3 (the key loop's loads issued two blocks ahead): on the H200
    (benchmarks/results/2026-11-27-5ac384b_h200_attention.json, one run) the decoder's forward
    took 0.178 against 0.196 ms at 2 stages, CUDA-graph timed: the one clean comparison. The
    forward + backward rows (0.705 against 0.750 ms, the encoder's 0.596 against 0.687) fell back
    to event timing with the host's launch time in, where the same cuDNN kernels timed 0.33 and
    0.73 ms under two names: they decide nothing. The next attention benchmark settles the rule.
    """
    if cpu_tiles(device):
        block = max(16, min(next_pow2(N), 128))
        return block, block, 1, block, block, 1, 1, False
    return 64, 64, 4, 64, 64, 4 if Dh <= 32 else 8, 3, False


# CUDA's limit on grid axis 1, which holds the (batch, head) pairs: past it (batch 4096 at 16 heads)
# the launch would fail, so larger batches are launched in chunks of pairs
MAX_GRID_Y = 65535


def _bh_chunks(bh: int) -> list[tuple[int, int]]:
    """``[(first pair, pairs), ...]`` covering ``bh`` (batch, head) pairs, each within the grid's limit."""
    return [(start, min(MAX_GRID_Y, bh - start)) for start in range(0, bh, MAX_GRID_Y)]


def _tail(N: int, block: int, tails: bool) -> int:
    """The tail block for ``N`` tokens in blocks of ``block``: 0 where it would not be smaller than a
    whole block (or tails are off, or one block holds everything)."""
    rest = N % block
    if not tails or N <= block or rest == 0:
        return 0
    tail = max(16, next_pow2(rest))
    return tail if tail < block else 0


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full-precision products (the GPU's default for fp32 dots would be tf32)
    return "ieee" if dtype == torch.float32 else "tf32"


@triton_op("fastmae::attention", mutates_args=())
def _attention(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, _, H, Dh = qkv.shape
    qkv = qkv.contiguous()
    out = new_output((B, N, H, Dh), qkv.dtype, qkv.device)
    lse = new_output((B * H, N), torch.float32, qkv.device)
    if out.numel() == 0:
        return out, lse
    bm, bn, warps, _, _, _, stages, tails = _launch_config(N, Dh, qkv.device)
    tail_m, tail_n = _tail(N, bm, tails), _tail(N, bn, tails)
    # (first row, programs, rows a program): the whole blocks, then the query tail block
    launches = [(0, N // bm, bm), ((N // bm) * bm, 1, tail_m)] if tail_m else [(0, triton.cdiv(N, bm), bm)]
    for (row0, programs, rows), (bh0, bh) in itertools.product(launches, _bh_chunks(B * H)):
        launcher(_attn_fwd_kernel)[(programs, bh)](
            qkv,
            out,
            lse,
            N,
            H,
            Dh,
            Dh**-0.5 * LOG2E,
            row0,
            bh0,
            BLOCK_M=rows,
            BLOCK_N=bn,
            TAIL_N=tail_n,
            BLOCK_D=max(16, next_pow2(Dh)),
            DOT_PRECISION=_dot_precision(qkv.dtype),
            EMULATE_RTNE=is_interpreter(),
            num_warps=warps,
            num_stages=stages,
        )
    return out, lse


@triton_op("fastmae::attention_backward", mutates_args=())
def _attention_backward(
    grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> torch.Tensor:
    B, N, _, H, Dh = qkv.shape
    grad_out = grad_out.contiguous()  # e.g. the expanded ones of a .sum().backward()
    grad_qkv = new_output((B, N, 3, H, Dh), qkv.dtype, qkv.device)
    if grad_qkv.numel() == 0:
        return grad_qkv
    _, _, _, bm, bn, warps, stages, tails = _launch_config(N, Dh, qkv.device)
    tail_m, tail_n = _tail(N, bm, tails), _tail(N, bn, tails)
    key_main = (N // bn) * bn if tail_n else N  # keys in whole blocks (owned by the first launch)
    row_main = (N // bm) * bm if tail_m else N
    # (key0, key_end, row0, row_end, own key rows, own query rows): the whole blocks, then the tails
    launches = [(0, key_main, 0, row_main, bn, bm)]
    if tail_n or tail_m:
        launches.append((key_main, N, row_main, N, tail_n or bn, tail_m or bm))
    for (key0, key_end, row0, row_end, own_n, own_m), (bh0, bh) in itertools.product(launches, _bh_chunks(B * H)):
        programs = max(triton.cdiv(key_end - key0, own_n), triton.cdiv(row_end - row0, own_m))
        launcher(_attn_bwd_kernel)[(programs, bh)](
            qkv,
            out,
            grad_out,
            lse,
            grad_qkv,
            N,
            H,
            Dh,
            Dh**-0.5 * LOG2E,
            Dh**-0.5,
            key0,
            key_end,
            row0,
            row_end,
            bh0,
            OWN_M=own_m,
            OWN_N=own_n,
            BLOCK_M=bm,
            BLOCK_N=bn,
            TAIL_M=tail_m,
            TAIL_N=tail_n,
            BLOCK_D=max(16, next_pow2(Dh)),
            DOT_PRECISION=_dot_precision(qkv.dtype),
            EMULATE_RTNE=is_interpreter(),
            ONE_BLOCK=N <= bm and N <= bn,
            num_warps=warps,
            num_stages=stages,
        )
    return grad_qkv


def _setup_context(ctx, inputs, output) -> None:
    (qkv,) = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # saved for the backward; no grad flows through it
    ctx.save_for_backward(qkv.contiguous(), out, lse)


def _backward(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None):
    qkv, out, lse = ctx.saved_tensors
    return _attention_backward(grad_out.to(qkv.dtype), qkv, out, lse)


_attention.register_autograd(_backward, setup_context=_setup_context)


def attention(qkv: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention, no mask, scale ``Dh**-0.5``.

    Args:
        qkv: (B, N, 3, H, Dh), float32, bfloat16 or float16: the fused qkv projection's output
            reshaped (timm's and MAE's layout). The products accumulate in fp32.

    Returns:
        (B, N, H, Dh) in qkv's dtype.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"expected qkv (B, N, 3, H, Dh), got {tuple(qkv.shape)}")
    if qkv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"attention takes float32, bfloat16 or float16, got {qkv.dtype}")
    if qkv.shape[-1] > 128:  # compiled for sm_90 up to 128 without spills (fp32 included); ViT-H's is 80
        raise ValueError(f"attention supports head dims up to 128, got {qkv.shape[-1]}; use the sdpa backend")
    check_runs_here(qkv.device, _attn_fwd_kernel, "attention")
    return _attention(qkv)[0]


def attention_ref(qkv: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch in fp32: ``softmax(q k^T / sqrt(Dh)) v``, (B, N, 3, H, Dh) -> (B, N, H, Dh)."""
    q, k, v = qkv.float().permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) each
    attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).to(qkv.dtype)
