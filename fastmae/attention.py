"""One attention call, several backends.

Backends:
    ``sdpa``      ``F.scaled_dot_product_attention``: PyTorch dispatches to its flash, cuDNN or
                  memory-efficient kernel (or a math fallback on CPU). The default.
    ``sdpa_pad64`` ``sdpa`` with a head dim under 64 zero-padded to 64 (the scale kept at the true
                  head dim's): the same scores and output, twice the matmul work, at the head dim
                  the fused kernels are tuned for. A candidate for the MAE decoder's head dim 32,
                  where the first H200 profile saw ~90 TFLOP/s; ``sdpa`` itself for 64 and up.
    ``triton``    fastmae's own kernel (:mod:`fastmae.kernels.attention`): q, k, v read in place from
                  the packed projection, tiles sized for MAE's short sequences (50 and 197 tokens)
                  and the decoder's head dim 32. CUDA, or CPU tensors under ``TRITON_INTERPRET=1``.
    ``xformers``  ``xformers.ops.memory_efficient_attention``; only when xformers is installed and
                  the tensors are on CUDA. Asking for it where it cannot run is an error.
    ``math``      plain ``softmax(q k^T / sqrt(d)) v``, written as the reference MAE's timm ``Attention``
                  does it. The reference every other backend is tested against.
    ``auto``      ``triton`` where it was measured faster in the training step (:data:`TRITON_AUTO`:
                  MAE's decoder, head dim 32, at compute capability 9.0, measured on an H200), else
                  ``xformers`` when it works on the tensors' device, else ``sdpa``.

All take the packed projection ``qkv: (B, N, 3, H, Dh)`` (the layout ``Linear(dim, 3 * dim)``
produces) and return ``(B, N, H * Dh)``, so each backend picks its own best memory layout.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "sdpa_pad64", "triton", "xformers", "math")


class AttentionBackendError(RuntimeError):
    """An attention backend was asked for where it cannot run."""


@functools.cache
def xformers_available() -> bool:
    """True when ``xformers.ops.memory_efficient_attention`` imports."""
    try:
        from xformers.ops import memory_efficient_attention  # noqa: F401
    except Exception:  # a broken build raises more than ImportError
        return False
    return True


@functools.cache
def xformers_runs(device: str) -> str | None:
    """None when xformers' attention runs on ``device`` (a tiny forward and backward), else why not.

    An import is not enough: a wheel built for another CUDA or torch imports and then fails at its
    first kernel (e.g. a missing ``libcudart.so.12``, an undefined torch symbol on first use).
    """
    if not xformers_available():
        return "xformers is not installed or does not import"
    try:
        from xformers.ops import memory_efficient_attention

        # bf16, the dtype --precision auto trains in on every GPU (xformers refuses it below compute
        # capability 8.0, where sdpa then runs; an fp16 probe there let xformers be picked for bf16)
        q = torch.randn(1, 8, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        memory_efficient_attention(q, q, q).sum().backward()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # any failure of a foreign extension means: not usable here
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return None


# Where ``auto`` takes fastmae's Triton kernel: (compute capability, part, head dim), each a call at
# which it made the whole training step faster. The MAE decoder's (197 tokens, head dim 32) on an
# H200: the ViT-B step at batch 256 1.55x HF eager with it in the decoder against 1.49x without
# (5370 / 5181 img/s in two calls a minute apart, benchmarks/results/2026-11-27-e01e201_h200_step_
# tattn_dec*.json); the call alone 0.20 ms forward against cuDNN's 0.23 (CUDA-graph timed; 0.18 at
# the 3 pipeline stages its launch rule has taken since;
# ...-5ac384b_h200_attention.json). No encoder is listed: MAE's (50 tokens, head dim 64) took
# 0.03 against 0.06 ms forward, but its forward + backward was timed with the host's launch
# overhead in (its capture failed, fixed since) and the step with it (fm_fast_tattn) is not timed;
# a ViT's full 197-token sequence, or another part with head dim 32 (the demo's encoder), never was.
TRITON_AUTO = frozenset({((9, 0), "decoder", 32)})
PARTS = ("encoder", "decoder")


def triton_auto(device: torch.device, part: str | None, head_dim: int | None) -> bool:
    """Whether ``auto`` picks ``triton`` for ``part``'s attention at ``head_dim`` on ``device`` (an
    NVIDIA GPU listed in :data:`TRITON_AUTO`)."""
    if part is None or head_dim is None or device.type != "cuda" or torch.version.hip is not None:
        return False
    if not torch.cuda.is_available():
        return False
    return (tuple(torch.cuda.get_device_capability(device)), part, head_dim) in TRITON_AUTO


def resolve_backend(
    backend: str,
    device: torch.device | str | None = None,
    head_dim: int | None = None,
    part: str | None = None,
) -> str:
    """The concrete backend ``backend`` means on ``device``; raises if it cannot run there.

    ``device=None`` means where training will run: CUDA when it is available, else CPU. ``part``
    (``encoder`` | ``decoder``) and ``head_dim``, where known, let ``auto`` pick the kernel measured
    fastest for that call. Models resolve their backends once, at construction, so nothing in the
    (compiled) forward probes imports.
    """
    if part is not None and part not in PARTS:
        raise ValueError(f"unknown part {part!r}; one of {', '.join(PARTS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if backend == "auto":
        if triton_auto(device, part, head_dim):
            return "triton"
        if device.type != "cuda" or not xformers_available():
            return "sdpa"
        why = xformers_runs(str(device))
        if why is not None:
            warnings.warn(f"xformers imports but does not run here ({why}); attention falls back to sdpa", stacklevel=2)
            return "sdpa"
        return "xformers"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise AttentionBackendError(
            f"attention backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 on {device.type}; use 'sdpa'"
        )
    if backend == "xformers":
        if not xformers_available():
            raise AttentionBackendError(
                "attention backend 'xformers' requested but xformers is not installed or does not import; "
                "use 'sdpa' (default) or install fastmae[xformers]"
            )
        if device.type != "cuda":
            raise AttentionBackendError(f"attention backend 'xformers' needs CUDA tensors, got {device.type}")
        why = xformers_runs(str(device))
        if why is not None:
            raise AttentionBackendError(f"attention backend 'xformers' imports but does not run on {device}: {why}")
    return backend


def attention_math(qkv: torch.Tensor) -> torch.Tensor:
    """Reference attention. ``qkv: (B, N, 3, H, Dh)`` -> ``(B, N, H * Dh)``."""
    B, N, _, H, Dh = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) each
    attn = (q @ k.transpose(-2, -1)) * Dh**-0.5
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, N, H * Dh)


def attention_sdpa(qkv: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention``. ``qkv: (B, N, 3, H, Dh)`` -> ``(B, N, H * Dh)``."""
    B, N, _, H, Dh = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, N, H * Dh)


def attention_sdpa_pad64(qkv: torch.Tensor) -> torch.Tensor:
    """``attention_sdpa`` with the head dim zero-padded to 64 when smaller. Zero columns of q and k add
    nothing to the scores, v's give zero columns of the output, sliced off; the grads of the padding
    are dropped by the pad's backward."""
    B, N, _, H, Dh = qkv.shape
    if Dh >= 64:
        return attention_sdpa(qkv)
    q, k, v = F.pad(qkv, (0, 64 - Dh)).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, scale=Dh**-0.5)[..., :Dh]
    return out.transpose(1, 2).reshape(B, N, H * Dh)


def attention_triton(qkv: torch.Tensor) -> torch.Tensor:
    """fastmae's Triton kernel: reads q, k, v in place and writes ``(B, N, H, Dh)``, no copies."""
    if not qkv.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" and not torch.compiler.is_compiling():
        # e.g. a model built with ``auto`` where a Hopper GPU is (the decoder then takes this
        # kernel), then run on CPU. Before the import: @triton.jit decides at import whether the
        # kernels are interpreted. (A trace on CPU, tests/kernels/test_compile_trace.py, runs no kernel.)
        raise AttentionBackendError(
            f"attention backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 on {qkv.device.type}; "
            "build the model with attn_backend='sdpa' (and decoder_attn_backend='sdpa') to run it there"
        )
    from fastmae.kernels.attention import attention as triton_attention

    B, N, _, H, Dh = qkv.shape
    return triton_attention(qkv).reshape(B, N, H * Dh)


def attention_xformers(qkv: torch.Tensor) -> torch.Tensor:
    """xformers' memory-efficient attention, which wants ``(B, N, H, Dh)`` as the projection lays it out."""
    from xformers.ops import memory_efficient_attention

    if not qkv.is_cuda:
        raise AttentionBackendError(f"attention backend 'xformers' needs CUDA tensors, got {qkv.device.type}")
    B, N, _, H, Dh = qkv.shape
    q, k, v = qkv.unbind(2)
    return memory_efficient_attention(q, k, v).reshape(B, N, H * Dh)


_IMPLS = {
    "math": attention_math,
    "sdpa": attention_sdpa,
    "sdpa_pad64": attention_sdpa_pad64,
    "triton": attention_triton,
    "xformers": attention_xformers,
}


def attention(qkv: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Multi-head self-attention without masking or dropout (MAE uses neither).

    Args:
        qkv: ``(B, N, 3, H, Dh)``, the reshaped output of the fused qkv projection.
        backend: one of :data:`BACKENDS`.

    Returns:
        ``(B, N, H * Dh)``.
    """
    if backend not in _IMPLS:
        backend = resolve_backend(backend, qkv.device)
    return _IMPLS[backend](qkv)
