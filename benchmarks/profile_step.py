"""Where a training step's time goes: its kernels by category, from ``torch.profiler``.

``bench_step.py --profile fm_fast hf_compile`` profiles a few steps of those variants after the
timing and records, per variant: device time per step by category (GEMM, attention, Triton code
inductor generated, fastmae's kernels, norms, the optimizer, copies, other), the top kernels, and
how much of the step the device was busy. A step whose kernels add up to much less than its wall
time waits on the host (launch overhead: what CUDA graphs remove); a step that is all GEMM is as
fast as its matrix multiplies.

On CPU there are no kernels; the same summary is made from the aten ops' self CPU time (a smoke
test of the plumbing, not a measurement).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

# (category, pattern on a CUDA kernel's or an aten op's name); the first match wins, so the order
# matters: fastmae's own Triton kernels before inductor's, attention before GEMM (xformers' and
# PyTorch's memory-efficient kernels are CUTLASS), inductor's GEMM templates before its fused code.
CATEGORIES: tuple[tuple[str, str], ...] = (
    (
        "fastmae kernels",
        r"_patch_gather_kernel|_encoder_input_kernel|_unshuffle_(fwd|bwd)_kernel|_masked_mse_(fwd|bwd)_kernel",
    ),
    # fastmae's own attention kernels count as attention, beside the SDPA kernels they replace
    (
        "attention",
        r"flash|fmha|attention|sdpa|_efficient_attention|cudnn.*mha|cutlassF|cutlassB|_attn_(fwd|bwd)_kernel",
    ),
    ("gemm", r"gemm|xmma|cutlass|nvjet|cublas|wgmma|triton_tem|^aten::(mm|addmm|bmm|baddbmm)$|matmul"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("norm", r"layer_norm|layernorm|LayerNorm"),
    ("inductor fused", r"^triton_"),
    ("copy / memset", r"copy|memcpy|memset|Memcpy|Memset|^aten::(fill_|zero_|cat|clone|contiguous)$"),
)
OTHER = "other"
# Ranges torch and the optimizers record (the fallback where the profiler does not flag them).
_ANNOTATION = re.compile(r"^(Optimizer\.|ProfilerStep#|## )")
_COMPILED = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]


def category(name: str) -> str:
    """The category of one kernel or op name (``other`` when nothing matches)."""
    for cat, pattern in _COMPILED:
        if pattern.search(name):
            return cat
    return OTHER


def summarize(events: Iterable[tuple[str, float, int]], steps: int, step_ms: float | None, top: int = 40) -> dict:
    """Per-step device time by category and the top kernels, from ``(name, total_us, count)`` rows.

    ``step_ms`` (the timed median step, when known) gives ``busy_fraction``: the share of the step
    the device spent in kernels (1.0 = never idle).
    """
    rows = [(n, us, c) for n, us, c in events if us > 0]
    total_ms = sum(us for _, us, _ in rows) / 1e3 / steps
    by_cat: dict[str, float] = {}
    for n, us, _ in rows:
        cat = category(n)
        by_cat[cat] = by_cat.get(cat, 0.0) + us / 1e3 / steps
    ordered = dict(sorted(by_cat.items(), key=lambda kv: -kv[1]))
    out: dict[str, Any] = {
        "steps": steps,
        "kernel_ms_per_step": total_ms,
        "by_category_ms": ordered,
        "by_category_share": {k: v / total_ms for k, v in ordered.items()} if total_ms else {},
        "top": [
            {"name": n[:160], "category": category(n), "ms_per_step": us / 1e3 / steps, "calls_per_step": c / steps}
            for n, us, c in sorted(rows, key=lambda r: -r[1])[:top]
        ],
        "kernels_per_step": sum(c for _, _, c in rows) / steps,
    }
    if step_ms:
        out["step_ms"] = step_ms
        out["busy_fraction"] = total_ms / step_ms
    return out


def device_rows(prof: Any, device: torch.device) -> list[tuple[str, float, int]]:
    """``(name, self device/CPU time in us, count)`` for every kernel (CUDA) or aten op (CPU)."""
    rows = []
    for evt in prof.key_averages():
        if device.type == "cuda":
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            # A user range drawn on the device timeline (``Optimizer.step#AdamW.step``) spans kernels
            # that are counted on their own: counting it too put 1 ms of nothing in "other" (the
            # first H200 run).
            if getattr(evt, "is_user_annotation", False) or _ANNOTATION.match(evt.key):
                continue
            us = getattr(evt, "self_device_time_total", None)
            if us is None:  # older torch
                us = evt.self_cuda_time_total
        else:
            if not evt.key.startswith("aten::"):
                continue
            us = evt.self_cpu_time_total
        rows.append((evt.key, float(us), int(evt.count)))
    return rows


# aten ops that launch nothing worth attributing
_QUIET_OPS = re.compile(
    r"^aten::(empty|empty_strided|view|_unsafe_view|as_strided|reshape|expand|t|transpose|permute|"
    r"select|slice|unsqueeze|squeeze|detach|alias|lift_fresh|resolve_conj|resolve_neg|set_|"
    r"result_type|is_nonzero|item|_local_scalar_dense|to|_to_copy)$"
)


def aten_calls(prof: Any, steps: int, top: int = 20) -> list[dict[str, Any]]:
    """The aten ops the host dispatched, by calls per step, with their input shapes.

    In a compiled step these are what inductor left to ATen (extern GEMMs, attention, fallbacks):
    the first H200 profile had 84 fp32 ``reduce_kernel`` sums a step from somewhere, and the kernel
    names alone could not say where.
    """
    rows = []
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.device_type != torch.autograd.DeviceType.CPU or not evt.key.startswith("aten::"):
            continue
        if _QUIET_OPS.match(evt.key):
            continue
        rows.append(
            {
                "op": evt.key,
                "input_shapes": str(getattr(evt, "input_shapes", ""))[:200],
                "calls_per_step": evt.count / steps,
            }
        )
    return sorted(rows, key=lambda r: -r["calls_per_step"])[:top]


def profile_steps(step: Callable[[], None], steps: int, device: torch.device, step_ms: float | None = None) -> dict:
    """Run ``step`` ``steps`` times under ``torch.profiler`` (after one unprofiled step) and summarize."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = summarize(device_rows(prof, device), steps, step_ms)
    out["source"] = "CUDA kernels (self device time)" if device.type == "cuda" else "aten ops (self CPU time)"
    out["aten_calls"] = aten_calls(prof, steps)
    return out


def markdown(name: str, prof: dict) -> str:
    """A few lines for the run's table: where one variant's step goes."""
    busy = prof.get("busy_fraction")
    what = "kernels" if prof.get("source", "").startswith("CUDA") else "aten ops (CPU)"
    head = f"**{name}**: {prof['kernel_ms_per_step']:.2f} ms of {what} per step"
    if busy is not None:
        head += f" in a {prof['step_ms']:.2f} ms step (device busy {100 * busy:.0f}%)"
    head += f", {prof['kernels_per_step']:.0f} {'launches' if what == 'kernels' else 'op calls'}"
    cats = ", ".join(
        f"{k} {v:.2f} ms ({100 * prof['by_category_share'][k]:.0f}%)" for k, v in prof["by_category_ms"].items()
    )
    return f"{head}: {cats}"
