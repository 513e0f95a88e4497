"""Helpers shared by the op modules: output allocation (NaN-poisoned under test) and launch sizing."""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# Tests flip this on (tests/kernels/conftest.py) so that every launcher allocates its outputs filled
# with NaN: an element a kernel forgot to write then fails the comparison instead of passing by luck
# with whatever the allocator left there. Off by default because the fill is an extra memory pass.
POISON_OUTPUTS: bool = False


def new_output(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled tensor while ``POISON_OUTPUTS`` is set."""
    if POISON_OUTPUTS:
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_input(t: torch.Tensor, name: str, layout: str, device: torch.device, index: bool = False) -> None:
    """A clear ValueError for an input of the wrong rank (``layout`` names its dims, one letter or
    word each), on another device, or, for indices, not an integer tensor (a float would be cast
    in the kernel where ``torch.gather`` refuses it). Index values are not checked: that would
    sync with the device every call; like ``gather`` on CUDA, ids outside their range are an error
    of the caller's."""
    rank = len(layout.strip("()").split(","))
    if t.dim() != rank:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other inputs on {device}")
    if index and t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an int64 or int32 tensor, got {t.dtype}")


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(t: torch.Tensor, name: str) -> None:
    """A clear ValueError unless ``t`` is float32, bfloat16 or float16: the kernels compute in fp32,
    so a float64 input would come back silently rounded (its ``*_ref`` takes float64)."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype} (the *_ref ops take any float)")


def check_patch_size(patch_size: int) -> None:
    """A clear ValueError for a patch size that is not a positive int (a negative one would pass the
    shape checks, -8 squared being 64, and return meaningless values)."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")


def check_runs_here(device: torch.device, kernel: Any, op: str) -> None:
    """A clear RuntimeError for tensors on a device the kernels cannot run on (instead of Triton's
    "0 active drivers"): CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before the
    kernels were imported (``@triton.jit`` then makes an interpreted function, not a ``JITFunction``).
    A ``torch.compile`` trace with fake CPU tensors runs no kernel and passes."""
    if device.type == "cuda" or not isinstance(kernel, (JITFunction, Autotuner)) or torch.compiler.is_compiling():
        return
    raise RuntimeError(
        f"fastmae.kernels.{op} runs on CUDA tensors, or on CPU tensors under Triton's interpreter "
        f"(TRITON_INTERPRET=1 set before fastmae is imported); got {device.type} tensors. "
        "Use the *_ref op, or the model with fused=False"
    )


def is_interpreter() -> bool:
    """True when the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before they
    were made): it decides the interpreter's numerics workarounds (``EMULATE_RTNE``, fp32 dots),
    whatever the tensors' device. (Keyed on the device, CUDA tensors under the interpreter, which
    Triton runs by copying them to the host, skipped them: a raw bf16 ``tl.dot``, which the
    interpreter multiplies as integers, gave attention errors of 1e9.)"""
    return not isinstance(to_output_dtype, JITFunction)


def cpu_tiles(device: torch.device) -> bool:
    """Whether the launch rules take their small CPU shapes (the interpreter's cost is per program,
    so few programs of many rows each) for tensors on ``device``: for CPU tensors; CUDA tensors get
    the GPU's rule, interpreted or not (which is how the tests read the GPU rules on CPU)."""
    return device.type != "cuda"


def launcher(kernel: Any) -> Any:
    """``wrap_triton(kernel)``: the launch ``torch.compile`` can trace. Under ``TRITON_INTERPRET=1``
    ``@triton.jit`` makes an ``InterpretedFunction``, which runs eagerly and is never traced (the fast
    path compiles on CUDA only): torch 2.12+'s ``wrap_triton`` hands it back as it is, torch 2.11's
    refuses it, so it is handed back here."""
    if not isinstance(kernel, (JITFunction, Autotuner)):
        return kernel
    return wrap_triton(kernel)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; a small stand-in for the CPU interpreter."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index)
    return 4


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@triton.jit
def to_output_dtype(x, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype``, rounding to nearest even as the GPU's ``cvt.rn`` does.

    Triton's CPU interpreter (3.7) truncates fp32 -> bf16 instead of rounding, a one-ulp bias the
    low-precision tests see. With ``EMULATE_RTNE`` (the launchers set it on CPU only) the rounding
    is done on the bits first, so the truncation is exact; on GPU the plain cast is already right.
    """
    if EMULATE_RTNE and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.uint32).to(tl.float32, bitcast=True)
    return x.to(dtype)
