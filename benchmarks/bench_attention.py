"""MAE's attention calls alone, every backend, at the shapes a training step makes: which one to use.

The first H200 profile (benchmarks/results/2026-11-27_h200_step_*.json) put attention at 17% of
fastmae's ViT-B step and 14% of ViT-L's, most of it the decoder's (head dim 32, 197 tokens, the
same cuDNN kernels in HF and fastmae), at about 90 TFLOP/s. This times each way of running the two
calls a step makes, forward and forward + backward, on the layout the model hands over (the fused
qkv projection's ``(B, N, 3, H, Dh)``):

    sdpa             F.scaled_dot_product_attention, PyTorch's own pick (what fastmae runs now)
    sdpa_cudnn / sdpa_flash / sdpa_efficient / sdpa_math   one SDPA kernel forced
    hf_layout        sdpa on separate q, k, v projections' views (Hugging Face's layout)
    sdpa_pad64       sdpa with a head dim under 64 zero-padded to 64 (same result, 2x the matmuls;
                     the model's ``sdpa_pad64`` backend)
    math             fastmae's plain reference attention, eager
    math_compiled    the same under torch.compile (inductor fuses scale + softmax)
    xformers         where it imports and runs
    triton           fastmae's kernel (kernels/attention.py) with its launch rule; on CUDA also each
                     tiling of ``TRITON_CONFIGS`` as ``triton[...]``, to check the rule

Each row records the kernels the call launched (one profiled call), the median GPU time (CUDA
graphs, L2 flushed; the host's call time where a graph cannot be captured) and TFLOP/s of the
attention matmuls (forward 4·B·H·N²·Dh, forward + backward 3x that). JSON out.

    python benchmarks/bench_attention.py --out attention.json          # CUDA
    python benchmarks/bench_attention.py --smoke                        # CPU: the plumbing only
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --smoke     # ... with fastmae's kernel interpreted
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import common
from benchmarks import bench_kernels, profile_step  # noqa: E402  (after the sys.path fallback above)
from benchmarks import report as report_md  # noqa: E402
from benchmarks.bench_kernels import gpu_time_ms, time_ms  # noqa: E402
from fastmae.attention import (  # noqa: E402
    AttentionBackendError,
    attention_math,
    attention_sdpa,
    attention_sdpa_pad64,
    attention_triton,
    resolve_backend,
    xformers_runs,
)

# (encoder width, encoder heads, decoder width, decoder heads, patch, image, encoder depth, decoder
# depth): the presets' shapes, and how many of each call a training step makes
MODELS = {
    "vit_base_patch16": (768, 12, 512, 16, 16, 224, 12, 8),
    "vit_large_patch16": (1024, 16, 512, 16, 16, 224, 24, 8),
    "vit_huge_patch14": (1280, 16, 512, 16, 14, 224, 32, 8),
}
SMOKE_MODELS = {"smoke": (64, 4, 32, 4, 8, 32, 2, 1)}
SDPA_KERNELS = ("cudnn", "flash", "efficient", "math")
# The Triton kernel's tilings timed beside its launch rule: (fwd BLOCK_M, fwd BLOCK_N, fwd warps,
# bwd BLOCK_M, bwd BLOCK_N, bwd warps, stages, tails), None = the rule's value at that shape; in
# the order they are tried (a short time budget keeps the first): tail blocks (the decoder's 197
# tokens as 3 x 64 + 16 instead of 4 x 64: a third less padded score work); 8 warps split the
# backward's 64 x 64 tiles over two warp groups (the rule's choice at head dim 64 already); key
# tiles of 128 take the decoder's tokens in 2 forward steps instead of 4; 128-row query tiles read k
# and v half as often; then pipelining depth, larger backward tiles, and 32-wide tiles (a 32-row
# operand runs as mma.sync instead of wgmma, which wants 64 rows).
TRITON_CONFIGS: list[tuple[int | bool | None, ...]] = [
    (None, None, None, None, None, None, None, True),
    (None, None, None, 64, 64, 8, None, None),
    (None, None, None, 64, 64, 8, None, True),
    (64, 128, 4, None, None, None, None, None),
    (128, 64, 8, None, None, None, None, None),
    (None, None, None, None, None, None, 2, None),
    (None, None, None, None, None, None, 1, None),
    (64, 128, 8, None, None, None, None, None),
    (None, None, None, 64, 128, 8, None, None),
    (None, None, None, 128, 64, 8, None, None),
    (64, 32, 4, None, None, None, None, None),
    (None, None, None, 64, 32, 4, None, None),
    (None, None, None, 32, 64, 4, None, None),
]


def triton_config_name(config: tuple[int | bool | None, ...]) -> str:
    """``triton[fwd 64x128 w4]``-style: only the knobs the config sets."""
    parts = []
    if any(c is not None for c in config[:3]):
        parts.append("fwd {}x{} w{}".format(*("rule" if c is None else c for c in config[:3])))
    if any(c is not None for c in config[3:6]):
        parts.append("bwd {}x{} w{}".format(*("rule" if c is None else c for c in config[3:6])))
    if config[6] is not None:
        parts.append(f"stages {config[6]}")
    if config[7] is not None:
        parts.append("tails" if config[7] else "no tails")
    return f"triton[{', '.join(parts)}]"


def triton_with_config(config: tuple[int | bool | None, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``attention_triton`` launched with ``config``'s knobs in place of its rule's.

    The backward reads the launch configuration again when autograd runs it, after the forward
    call has returned: the callable's ``launch_context`` holds the knobs in place across both, and
    ``run_shape`` times forward + backward within it.
    """
    import importlib

    module = importlib.import_module("fastmae.kernels.attention")

    @contextlib.contextmanager
    def launch_context() -> Iterator[None]:
        original = module._launch_config

        def patched(N: int, Dh: int, device: torch.device) -> tuple[int, ...]:
            rule = original(N, Dh, torch.device("cuda"))  # the GPU rule, on any device
            return tuple(r if c is None else c for r, c in zip(rule, config, strict=True))

        module._launch_config = patched
        try:
            yield
        finally:
            module._launch_config = original

    def run(qkv: torch.Tensor) -> torch.Tensor:
        with launch_context():
            return attention_triton(qkv)

    run.launch_context = launch_context
    return run


def shapes(model: str, dims: tuple[int, ...], batch: int, mask_ratio: float) -> list[dict[str, Any]]:
    """The decoder's call (cls + all tokens; the costly one, first) and the encoder's (cls + kept tokens)."""
    enc_dim, enc_heads, dec_dim, dec_heads, patch, img, enc_depth, dec_depth = dims
    L = (img // patch) ** 2
    kept = int(L * (1 - mask_ratio))
    dec = {"B": batch, "N": 1 + L, "H": dec_heads, "Dh": dec_dim // dec_heads, "calls_per_step": dec_depth}
    enc = {"B": batch, "N": 1 + kept, "H": enc_heads, "Dh": enc_dim // enc_heads, "calls_per_step": enc_depth}
    return [{"model": model, "part": "decoder", **dec}, {"model": model, "part": "encoder", **enc}]


def _sdpa_forced(kernel: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[kernel]

    def run(qkv: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return attention_sdpa(qkv)

    return run


def _hf_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """HF ViTMAE's call: q, k, v from separate projections, each ``(B, N, H*Dh)`` contiguous, viewed
    ``(B, N, H, Dh).transpose(1, 2)``."""
    B, N, HD = q.shape
    q, k, v = (t.view(B, N, heads, HD // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, HD)


def impls(device: str, with_compile: bool) -> dict[str, Callable[[torch.Tensor], torch.Tensor] | str]:
    """name -> the call, or why it does not run here; the candidates the step ablations test first
    (each row is saved as it lands, so a stage that runs out of time keeps them)."""
    out: dict[str, Callable[[torch.Tensor], torch.Tensor] | str] = {
        "sdpa": attention_sdpa,
        "triton": _triton_or_why(device),
        "sdpa_pad64": attention_sdpa_pad64,
        # static shapes: one compile per call shape, no dynamic-shape recompile on the second
        "math_compiled": (
            torch.compile(attention_math, dynamic=False) if with_compile else "compile off (--no-compile)"
        ),
    }
    for kernel in SDPA_KERNELS:
        out[f"sdpa_{kernel}"] = _sdpa_forced(kernel)
    out["hf_layout"] = _hf_layout
    out["math"] = attention_math
    why = xformers_runs(device) if device == "cuda" else "xformers needs CUDA"
    if why is None:
        from fastmae.attention import attention_xformers

        out["xformers"] = attention_xformers
    else:
        out["xformers"] = why
    return out


def _triton_or_why(device: str) -> Callable[[torch.Tensor], torch.Tensor] | str:
    try:
        resolve_backend("triton", device)
    except AttentionBackendError as e:
        return str(e)
    return attention_triton


def tiling_impls(device: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The Triton kernel at each of ``TRITON_CONFIGS`` (CUDA only: under the interpreter a tiling
    changes nothing but the time); a second pass, after every shape's backends."""
    if device != "cuda":
        return {}
    return {triton_config_name(c): triton_with_config(c) for c in TRITON_CONFIGS}


def flops(shape: dict[str, Any], phase: str) -> float:
    fwd = 4.0 * shape["B"] * shape["H"] * shape["N"] ** 2 * shape["Dh"]
    return fwd if phase == "fwd" else 3 * fwd


def min_bytes(shape: dict[str, Any], phase: str, elem_bytes: int) -> int:
    """The bytes the call must move at least: forward q, k, v read and the output and its fp32
    log-sum-exp written; the backward also reads q, k, v, the output, its grad and the log-sum-exp
    and writes the three grads."""
    t = shape["B"] * shape["N"] * shape["H"] * shape["Dh"] * elem_bytes
    lse = shape["B"] * shape["H"] * shape["N"] * 4
    fwd = 4 * t + lse
    return fwd if phase == "fwd" else fwd + 8 * t + lse


def kernels_launched(fn: Callable[[], object], device: str) -> list[str]:
    """The device kernels (CUDA) or aten ops (CPU) one call launches, by total time, names cut short."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = profile_step.device_rows(prof, torch.device(device))
    return [name[:120] for name, _, _ in sorted(rows, key=lambda r: -r[1])[:6]]


def time_call(fn: Callable[[], object], device: str, smoke: bool) -> dict[str, Any]:
    """GPU time (CUDA graphs, L2 flushed) as bench_kernels times its ops; the host's where a graph
    cannot be captured, or on CPU."""
    if device != "cuda":
        return {"ms": time_ms(fn, device, smoke), "timer": "perf_counter"}
    fn()  # compile / autotune outside the timing
    try:
        return {"ms": gpu_time_ms(fn), "timer": "cuda_graph"}
    except Exception as e:  # noqa: BLE001  (a capture failure must not lose the row)
        torch.cuda.synchronize()
        return {"ms": time_ms(fn, device, smoke), "timer": "do_bench", "graph_error": f"{e}"[:200]}


def run_shape(
    shape: dict[str, Any],
    calls: dict[str, Any],
    device: str,
    dtype: torch.dtype,
    smoke: bool,
    row: dict[str, Any] | None = None,
    saved: Callable[[], None] = lambda: None,
    deadline: float = float("inf"),
    copy_gbps: float | None = None,
) -> dict:
    """Every impl at ``shape``, into ``row`` (made when None); ``saved()`` after each impl, so a
    timeout keeps what finished. Impls not started by ``deadline`` (``time.monotonic()``) are
    recorded as skipped. With ``copy_gbps`` (a copy's bandwidth in the same run), each timing also
    says how near the memory floor it is: ``min_bytes`` / time as a % of the copy's."""
    B, N, H, Dh = shape["B"], shape["N"], shape["H"], shape["Dh"]
    g = torch.Generator(device=device).manual_seed(0)
    # the qkv projection's output: (B, N, 3*H*Dh) viewed (B, N, 3, H, Dh), a leaf for the grads
    qkv = torch.randn(B, N, 3, H, Dh, device=device, dtype=dtype, generator=g).requires_grad_()
    grad_out = torch.randn(B, N, H * Dh, device=device, dtype=dtype, generator=g)
    # HF's layout: three separate projections' outputs, the same values
    sep = [t.detach().reshape(B, N, H * Dh).contiguous().requires_grad_() for t in qkv.unbind(2)]
    with torch.no_grad():
        ref = attention_math(qkv.float()).to(dtype)
    row = {**shape, "impls": {}} if row is None else row
    row.setdefault("impls", {})
    for name, call in calls.items():
        if isinstance(call, str):
            row["impls"][name] = {"status": "skipped", "reason": call}
            continue
        if time.monotonic() > deadline:
            row["impls"][name] = {"status": "skipped", "reason": "time budget"}
            continue
        leaves = [qkv]
        context = getattr(call, "launch_context", contextlib.nullcontext)  # a tiling's, over fwd and bwd
        if call is _hf_layout:
            call, leaves = functools.partial(_hf_layout, heads=H), sep
        rec: dict[str, Any] = {}
        try:
            # detached: kept with its graph, it would hold the leaves' AccumulateGrad nodes on the
            # default stream, and every fwd+bwd capture would fail (as all did on the H200, 2026-11-27)
            out = call(*leaves).detach()
            rec["max_abs_err_vs_fp32_math"] = (out.float() - ref.float()).abs().max().item()

            def fwd(call=call, leaves=leaves, context=context):
                with context():
                    return call(*leaves)

            def fwd_bwd(call=call, leaves=leaves, context=context):
                with context():
                    return torch.autograd.grad(call(*leaves), leaves, grad_out)

            rec["kernels"] = kernels_launched(fwd_bwd, device)
            for phase, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                t = time_call(fn, device, smoke)
                t["tflops"] = flops(shape, phase) / t["ms"] / 1e9
                if copy_gbps:
                    gbps = min_bytes(shape, phase, qkv.element_size()) / t["ms"] / 1e6
                    t["pct_of_copy"] = 100 * gbps / copy_gbps
                rec[phase] = t
            rec["status"] = "done"
        except Exception as e:  # noqa: BLE001  (a backend that cannot take this shape is a result)
            if device == "cuda":
                torch.cuda.synchronize()
            rec = {"status": "error", "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        row["impls"][name] = rec
        saved()
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vit_base_patch16", "vit_large_patch16"], choices=list(MODELS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-compile", action="store_true", help="leave out math_compiled")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; the only mode without CUDA")
    p.add_argument(
        "--time-budget", type=float, default=None, help="seconds; impls not started by then are recorded as skipped"
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        p.error("timings need CUDA; on CPU only --smoke runs")
    dtype = getattr(torch, args.dtype) if device == "cuda" else torch.float32
    models = SMOKE_MODELS if args.smoke else {m: MODELS[m] for m in args.models}
    batch = 2 if args.smoke else args.batch
    calls = impls(device, with_compile=not args.no_compile and not (args.smoke and device == "cpu"))
    report: dict[str, Any] = {
        "benchmark": "bench_attention",
        "smoke": args.smoke,
        "config": {"batch": batch, "mask_ratio": args.mask_ratio, "dtype": str(dtype).removeprefix("torch.")},
        "env": common.environment(argv, __file__),
        "results": [],
        "complete": False,
    }
    # the memory floor's speed, measured as bench_kernels measures it (a few seconds)
    report["copy"] = copy = bench_kernels.copy_bandwidth(device, args.smoke)
    deadline = time.monotonic() + (args.time_budget if args.time_budget is not None else float("inf"))
    rows: list[dict[str, Any]] = []
    for model, dims in models.items():
        for shape in shapes(model, dims, batch, args.mask_ratio):
            rows.append({**shape, "impls": {}})
    report["results"] = rows
    # written after each impl: a timeout keeps what finished
    save = (lambda: common.write_json(args.out, report)) if args.out else (lambda: None)
    # every shape's backends first, then the kernel's tilings: a short budget still compares both calls
    for pass_calls in (calls, tiling_impls(device)):
        for row in rows:
            shape = {k: v for k, v in row.items() if k != "impls"}
            run_shape(shape, pass_calls, device, dtype, args.smoke, row, save, deadline, copy["gbps"])
    for row in rows:
        done = {k: v["fwd+bwd"]["ms"] for k, v in row["impls"].items() if v.get("status") == "done"}
        print(f"{row['model']} {row['part']}: " + ", ".join(f"{k} {ms:.3f}" for k, ms in done.items()) + " ms fwd+bwd")
    report["complete"] = True
    if args.out:
        common.write_json(args.out, report)
    print(report_md.attention_markdown(report))
    return report


if __name__ == "__main__":
    main()
