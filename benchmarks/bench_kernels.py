"""Benchmark the MAE kernels against their PyTorch references, eager and compiled.

Each op (forward, backward, forward+backward) at ViT-B and ViT-L shapes, batch 256, bf16, against
the eager ``*_ref`` in bf16 (how the model's reference path runs it) and ``torch.compile`` of the
same ref. Reports the median GPU time (CUDA-graph replays: no launch overhead, L2 flushed before
each call) and the host's call time, GB/s from the minimum bytes each phase must move, and that as
a % of a device-to-device copy's bandwidth measured in the same run; writes JSON.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h100.json
    python benchmarks/bench_kernels.py --smoke --out /tmp/smoke.json   # CPU: harness only, times meaningless
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as a script: the repo root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import common

REPO = Path(__file__).resolve().parent.parent
IMPLS = ("triton", "eager", "compiled")
PHASES = ("fwd", "bwd", "fwd+bwd")

# name: (encoder dim, decoder dim, patch, image side). ViT-B and ViT-L share the decoder (512).
MODELS = {
    "vit_base_patch16": (768, 512, 16, 224),
    "vit_large_patch16": (1024, 512, 16, 224),
}
SMOKE_MODELS = {"smoke_patch8": (60, 48, 8, 32)}


@dataclass
class Bench:
    """One op at one shape: how to build each impl's call, and the bytes each phase must move."""

    op: str
    model: str
    shape: dict[str, int]
    run: dict[str, Callable[[], torch.Tensor]]  # impl -> forward call on fresh leaves
    leaves: dict[str, list[torch.Tensor]]  # impl -> the tensors that get grads
    grad_out: torch.Tensor | None  # None: no backward (patch_gather)
    min_bytes: dict[str, int] = field(default_factory=dict)  # phase -> bytes


def _nbytes(*tensors_or_counts: tuple[int, torch.dtype]) -> int:
    return sum(n * torch.empty((), dtype=dt).element_size() for n, dt in tensors_or_counts)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _mae_indices(N: int, L: int, ratio: float, device: str):
    ids_shuffle = torch.argsort(torch.rand(N, L, device=device), dim=1)
    K = int(L * (1 - ratio))
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(N, L, device=device)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :K].contiguous(), ids_restore, mask, K


def build_benches(
    model: str,
    dims: tuple[int, int, int, int],
    batch: int,
    ratio: float,
    dtype: torch.dtype,
    device: str,
    compile_ref: bool,
    imgs_dtype: torch.dtype | None = None,
) -> list[Bench]:
    from fastmae import kernels as K_

    enc_d, dec_d, P, side = dims
    N, C = batch, 3
    L = (side // P) ** 2
    CPP = C * P * P
    ids_keep, ids_restore, mask, K = _mae_indices(N, L, ratio, device)
    # The model feeds the loader's images (fp32 unless cast) to patch_gather and masked_mse.
    imgs_dtype = imgs_dtype or dtype
    imgs = torch.randn(N, C, side, side, device=device, dtype=imgs_dtype)
    i64 = torch.int64
    comp = (lambda f: torch.compile(f, fullgraph=True, dynamic=False)) if compile_ref else (lambda f: None)
    benches = []

    # Kept-patch gather (no backward: images get no grad).
    fns = {"triton": K_.patch_gather, "eager": K_.patch_gather_ref, "compiled": comp(K_.patch_gather_ref)}
    b = Bench("patch_gather", model, {"N": N, "K": K, "L": L, "P": P}, {}, {}, None)
    for impl, f in fns.items():
        if f is not None:
            b.run[impl] = lambda f=f: f(imgs, ids_keep, P)
            b.leaves[impl] = []
    b.min_bytes["fwd"] = _nbytes((2 * N * K * CPP, imgs_dtype), (N * K, i64))
    benches.append(b)

    # Encoder input: cls + pos gather-add of the kept tokens.
    D = enc_d
    x = torch.randn(N, K, D, device=device, dtype=dtype)
    cls = 0.02 * torch.randn(1, 1, D, device=device, dtype=dtype)
    pos = torch.randn(1, 1 + L, D, device=device, dtype=dtype)
    fns = {"triton": K_.encoder_input, "eager": K_.encoder_input_ref, "compiled": comp(K_.encoder_input_ref)}
    b = Bench("encoder_input", model, {"N": N, "K": K, "L": L, "D": D}, {}, {}, None)
    b.grad_out = torch.randn(N, 1 + K, D, device=device, dtype=dtype)
    for impl, f in fns.items():
        if f is not None:
            lv = [_leaf(x), _leaf(cls)]
            b.run[impl] = lambda f=f, lv=lv: f(lv[0], lv[1], pos, ids_keep)
            b.leaves[impl] = lv
    b.min_bytes["fwd"] = _nbytes((N * K * D + N * (1 + K) * D + (1 + L) * D, dtype), (N * K, i64))
    # grad_x is grad_out[:, 1:] itself (a view): only the cls column is read, grad_cls written.
    b.min_bytes["bwd"] = _nbytes((N * D + D, dtype))
    benches.append(b)

    # Decoder unshuffle.
    D = dec_d
    xd = torch.randn(N, 1 + K, D, device=device, dtype=dtype)
    mask_token = 0.02 * torch.randn(1, 1, D, device=device, dtype=dtype)
    dpos = torch.randn(1, 1 + L, D, device=device, dtype=dtype)
    fns = {"triton": K_.unshuffle, "eager": K_.unshuffle_ref, "compiled": comp(K_.unshuffle_ref)}
    b = Bench("unshuffle", model, {"N": N, "K": K, "L": L, "D": D}, {}, {}, None)
    b.grad_out = torch.randn(N, 1 + L, D, device=device, dtype=dtype)
    for impl, f in fns.items():
        if f is not None:
            lv = [_leaf(xd), _leaf(mask_token)]
            b.run[impl] = lambda f=f, lv=lv: f(lv[0], lv[1], ids_restore, dpos)
            b.leaves[impl] = lv
    tokens_in, tokens_out = N * (1 + K) * D, N * (1 + L) * D
    b.min_bytes["fwd"] = _nbytes((tokens_in + tokens_out + (1 + L) * D, dtype), (N * L, i64))
    b.min_bytes["bwd"] = _nbytes((tokens_out + tokens_in + D, dtype), (N * L, i64))
    benches.append(b)

    # Norm-pix masked MSE: only the removed rows of pred and image must be read.
    pred = torch.randn(N, L, CPP, device=device, dtype=dtype)
    fns = {"triton": K_.masked_mse, "eager": K_.masked_mse_ref, "compiled": comp(K_.masked_mse_ref)}
    b = Bench("masked_mse", model, {"N": N, "L": L, "P": P, "removed": L - K}, {}, {}, None)
    b.grad_out = torch.ones((), device=device, dtype=torch.float32)
    for impl, f in fns.items():
        if f is not None:
            lv = [_leaf(pred)]
            b.run[impl] = lambda f=f, lv=lv: f(lv[0], imgs, mask, P, True)
            b.leaves[impl] = lv
    removed = N * (L - K)
    b.min_bytes["fwd"] = _nbytes((removed * CPP, dtype), (removed * CPP, imgs_dtype), (N * L, torch.float32))
    b.min_bytes["bwd"] = b.min_bytes["fwd"] + _nbytes((N * L * CPP, dtype))
    benches.append(b)

    for b in benches:
        if "bwd" in b.min_bytes:
            b.min_bytes["fwd+bwd"] = b.min_bytes["fwd"] + b.min_bytes["bwd"]
        else:
            b.min_bytes["fwd+bwd"] = b.min_bytes["fwd"]
    return benches


def time_ms(fn: Callable[[], object], device: str, smoke: bool) -> float:
    """Median milliseconds of one call of ``fn`` as the host sees it, launch overhead included.

    After a warm-up call (compile and autotune stay out of the timing); on CUDA, Triton's
    ``do_bench`` (L2 flushed before each call).
    """
    fn()
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(1 if smoke else 5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_time_ms(fn: Callable[[], object], rep_ms: float = 20.0, replays: int = 5, flush_mib: int = 256) -> float:
    """Median GPU milliseconds of one call of ``fn``, without the host's launch overhead.

    An op that moves tens of MB takes tens of microseconds on an H100, about what Python spends
    launching it (a ``triton_op`` in eager mode, an autograd backward), so ``time_ms`` would time
    the host. Here ``n`` calls are captured in one CUDA graph, each after a write of ``flush_mib``
    MiB that evicts L2 (as ``do_bench`` does); a second graph holds the ``n`` flushes alone, and its
    time is subtracted. The graphs replay interleaved. Inside a compiled training step (inductor's
    own launcher, or CUDA graphs) this GPU time is what the op costs.
    """
    flush = torch.empty(flush_mib << 20, dtype=torch.int8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            flush.zero_()
            fn()
        end.record()
        end.synchronize()
        n = max(3, min(500, int(rep_ms / max(start.elapsed_time(end) / 5, 1e-3))))

        def with_op() -> None:
            flush.zero_()
            fn()

        graphs = {}
        for name, body in (("op", with_op), ("flush", flush.zero_)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(n):
                    body()
            graphs[name] = graph
        times: dict[str, list[float]] = {name: [] for name in graphs}
        for _ in range(replays):
            for name, graph in graphs.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / n)
    torch.cuda.current_stream().wait_stream(stream)
    return statistics.median(times["op"]) - statistics.median(times["flush"])


def measure(fn: Callable[[], object], device: str, smoke: bool, min_bytes: int, copy_gbps: float) -> dict:
    """``ms`` (GPU time, CUDA graphs; the host's call time where a graph cannot be captured) and
    ``call_ms`` (the host's call time, launch overhead included), GB/s and % of copy from ``ms``."""
    call_ms = time_ms(fn, device, smoke)
    out: dict[str, object] = {"call_ms": call_ms}
    if device == "cuda":
        try:
            out.update(ms=gpu_time_ms(fn), timer="cuda_graph")
        except Exception as e:  # noqa: BLE001  (a capture failure must not lose the row)
            torch.cuda.synchronize()
            out.update(ms=call_ms, timer="do_bench", graph_error=f"{type(e).__name__}: {e}"[:300])
    else:
        out.update(ms=call_ms, timer="perf_counter")
    gbps = min_bytes / out["ms"] / 1e6
    out.update(gbps=gbps, pct_of_copy=100 * gbps / copy_gbps)
    return out


def stream_of(t: torch.Tensor) -> object:
    """The stream work on ``t`` is queued on now (None on CPU)."""
    return torch.cuda.current_stream(t.device) if t.is_cuda else None


def phase_fn(b: Bench, impl: str, phase: str) -> Callable[[], object] | None:
    run, leaves, grad_out = b.run[impl], b.leaves[impl], b.grad_out
    if phase == "fwd" or (phase == "fwd+bwd" and grad_out is None):
        return run
    if grad_out is None:
        return None
    if phase == "bwd":
        # The backward alone, on a forward run once. Autograd runs each backward op on the stream
        # its forward op ran on, and a CUDA graph captures one stream: so the forward is run again
        # on the stream the caller is on when it changes (gpu_time_ms warms up on its capture
        # stream before capturing). Made on the default stream, the first H200 run's captures all
        # failed (cudaErrorStreamCaptureInvalidated) and its bwd rows fell back to host timing.
        # The old forward's graph is dropped before the new one is built: the leaves' AccumulateGrad
        # nodes live as long as a graph holds them, and keep the stream they were made on; the new
        # graph would take them over, and the capture would wait on the default stream
        # (cudaErrorStreamCaptureImplicit; every bwd row of the second H200 run fell back to host
        # timing so).
        made: dict[str, Any] = {}

        def bwd():
            stream = stream_of(grad_out)
            if "out" not in made or made["stream"] != stream:
                made.clear()
                made.update(out=run(), stream=stream)
            out = made["out"]
            return torch.autograd.grad(out, leaves, grad_out.to(out.dtype), retain_graph=True)

        return bwd

    def fwd_bwd():
        out = run()
        return torch.autograd.grad(out, leaves, grad_out.to(out.dtype))

    return fwd_bwd


def copy_bandwidth(device: str, smoke: bool) -> dict[str, object]:
    """The reachable memory bandwidth: a copy of a buffer far larger than L2, timed as the ops are.

    Two copies of the same bytes, the faster one the ceiling (``gbps``, ``kind``): cudaMemcpy
    (``dst.copy_``) and an elementwise kernel (``torch.neg(src, out=dst)``). Captured in a CUDA
    graph a device-to-device memcpy becomes a memcpy node, which may run on a copy engine: the
    first H200 run measured that at 2763 GB/s while the same copy eager ran at 4247 GB/s, and
    inductor's kernels then showed 117% "of copy". The ops timed here are SM kernels.
    Cross-checks on CUDA: bench_step's copy (``common.copy_bandwidth``: a memcpy of the same size
    timed eagerly by CUDA events, no flush), and an elementwise copy the size of the ops (~150 MiB
    each way).
    """
    numel = (1 << 16) if smoke else (1 << 28)  # 512 MiB of bf16 each way on GPU
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()

    def timed(fn: Callable[[], object]) -> float:
        return gpu_time_ms(fn) if device == "cuda" else time_ms(fn, device, smoke)

    kinds = {"memcpy": lambda: dst.copy_(src), "elementwise": lambda: torch.neg(src, out=dst)}
    measured = {}
    for kind, fn in kinds.items():
        ms = timed(fn)
        measured[kind] = {"ms": ms, "gbps": nbytes / ms / 1e6}
    best = max(measured, key=lambda k: measured[k]["gbps"])
    out: dict[str, object] = {"bytes": nbytes, "kind": best, **measured[best], "measured": measured}
    if device == "cuda":
        events = common.copy_bandwidth(device, nbytes=src.numel() * src.element_size())  # bench_step's
        event_ms = events["ms"]
        small_src, small_dst = src[: 75 << 20], dst[: 75 << 20]  # 150 MiB each way
        small_ms = gpu_time_ms(lambda: torch.neg(small_src, out=small_dst))
        small_bytes = 2 * small_src.numel() * small_src.element_size()
        out.update(
            event_timed_ms=event_ms,
            event_timed_gbps=events["gbps"],
            op_size_bytes=small_bytes,
            op_size_ms=small_ms,
            op_size_gbps=small_bytes / small_ms / 1e6,
        )
    return out


def environment(device: str, argv: list[str]) -> dict[str, object]:
    import triton

    git = common.git_info()  # FASTMAE_COMMIT / FASTMAE_DIRTY where set (the device copy), else git
    env: dict[str, object] = {
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "git": git,
        "command": shlex.join([sys.executable, str(Path(__file__).relative_to(REPO)), *argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    if device == "cuda":
        env["cuda"] = torch.version.cuda
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            env["nvidia_smi"] = "unavailable"
        env["driver"] = common.nvidia_smi()["query"].get("driver_version")
    return env


def kernel_device(parser: argparse.ArgumentParser, smoke: bool) -> str:
    """``cuda``; else ``cpu`` for a ``--smoke`` run under Triton's interpreter (timings need CUDA)."""
    if torch.cuda.is_available():
        return "cuda"
    if not smoke:
        parser.error("timings need CUDA; on CPU only --smoke runs (Triton's interpreter)")
    # Must precede the first @triton.jit, i.e. the kernels' import.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--imgs-dtype",
        default="float32",
        choices=["bfloat16", "float16", "float32"],
        help="images' dtype (default float32: what the trainer's loaders deliver and bench_step feeds)",
    )
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--ops", nargs="*", default=None, help="only these ops (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, CPU allowed (interpreter): exercises the harness only"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    device = kernel_device(parser, args.smoke)
    dtype = getattr(torch, args.dtype)
    imgs_dtype = getattr(torch, args.imgs_dtype) if args.imgs_dtype else None
    models = SMOKE_MODELS if args.smoke else {m: MODELS[m] for m in args.models}
    batch = min(args.batch, 2) if args.smoke else args.batch
    # Compiling the refs on CPU costs far more than the smoke run is worth.
    compile_ref = not args.no_compile and not (args.smoke and device == "cpu")
    torch.manual_seed(0)

    copy = copy_bandwidth(device, args.smoke)
    print(f"device-to-device copy: {copy['gbps']:.0f} GB/s ({copy['kind']})", end="")
    if "event_timed_gbps" in copy:
        print(
            f" (cross-checks: event-timed {copy['event_timed_gbps']:.0f} GB/s, {copy['op_size_bytes'] >> 20} MiB"
            f" copy {copy['op_size_gbps']:.0f} GB/s)",
            end="",
        )
    print()
    results: list[dict[str, object]] = []
    report = {
        "benchmark": "bench_kernels",
        "smoke": args.smoke,
        "config": {
            "batch": batch,
            "mask_ratio": args.mask_ratio,
            "dtype": args.dtype,
            "imgs_dtype": str(imgs_dtype or dtype).removeprefix("torch."),
            "models": models,
        },
        "env": environment(device, argv),
        "copy": copy,
        "results": results,
        "goal": "fwd+bwd >= 80% of copy bandwidth and >= 1.5x the compiled reference",
        "complete": False,  # True once every row ran; a timed-out run leaves False and the rows so far
    }
    for model, dims in models.items():
        torch.compiler.reset()
        for b in build_benches(model, dims, batch, args.mask_ratio, dtype, device, compile_ref, imgs_dtype):
            if args.ops and b.op not in args.ops:
                continue
            for phase in PHASES:
                if phase not in b.min_bytes:  # patch_gather has no backward
                    continue
                row: dict[str, object] = {"op": b.op, "model": model, "phase": phase, "shape": b.shape}
                row["min_bytes"] = b.min_bytes[phase]
                for impl in IMPLS:
                    fn = phase_fn(b, impl, phase) if impl in b.run else None
                    if fn is None:
                        row[impl] = None
                        continue
                    row[impl] = measure(fn, device, args.smoke, b.min_bytes[phase], copy["gbps"])
                t, c, e = row["triton"], row["compiled"], row["eager"]
                row["speedup_vs_compiled"] = c["ms"] / t["ms"] if t and c else None
                row["speedup_vs_eager"] = e["ms"] / t["ms"] if t and e else None
                results.append(row)
                print(_format_row(row))
                if args.out:  # after every row: a run stopped by a timeout keeps what it measured
                    _write_json(args.out, report)

    report["launch_alternatives"] = alternatives = []
    for row in launch_alternatives(
        results, models, batch, args.mask_ratio, dtype, device, args.smoke, copy["gbps"], imgs_dtype, args.ops
    ):
        alternatives.append(row)
        if args.out:
            _write_json(args.out, report)
    report["complete"] = True
    if args.out:
        _write_json(args.out, report)
        print(f"wrote {args.out}")
    return report


# Launch knobs whose effect the sweep would find but the main run should already show, each timed
# beside the rule's row (op, knob values as ``sweep_kernels.launch_config`` takes them, why):
ALTERNATIVES: list[tuple[str, object, str]] = [
    # With 3 channels, pred's (p, q, c) order and the image's (c, p, q) one put a stride of 3
    # elements on one of the loss's two reads unless its tile is reordered on chip; the H200's first
    # run had the op at a third of the copy's bandwidth.
    ("masked_mse", "pred", "the loss's tile in pred's order"),
    ("masked_mse", "gather", "both read in their own order, the target gathered on chip"),
    # the unshuffle backward at a quarter of the copy's bandwidth there: a loop of dependent tiles
    ("unshuffle", (None, 3), "the unshuffle backward's row loop pipelined, 3 stages"),
]


def detached_outputs(b: Bench, impl: str = "triton") -> list[torch.Tensor]:
    """The op's output and, where it has a backward, its input grads: fp32, detached. Kept with its
    graph, the output would keep the leaves' AccumulateGrad nodes on the default stream, and every
    later CUDA graph capture of the op's backward would fail (see ``phase_fn``)."""
    out = b.run[impl]()
    grads = () if b.grad_out is None else phase_fn(b, impl, "fwd+bwd")()
    return [t.detach().float() for t in (out, *grads)]


def launch_alternatives(
    results: list[dict[str, Any]],
    models: dict[str, tuple[int, int, int, int]],
    batch: int,
    ratio: float,
    dtype: torch.dtype,
    device: str,
    smoke: bool,
    copy_gbps: float,
    imgs_dtype: torch.dtype | None,
    ops: list[str] | None = None,
) -> Iterator[dict[str, object]]:
    """Each of :data:`ALTERNATIVES`, yielded row by row: the op's forward+backward at the first
    model's shapes with the knob set, against the main table's row of the launch rule, and its
    outputs and grads against the rule's (the same up to fp32 rounding: another order of the same
    sums). A few seconds here say which configuration wins before a launch rule changes
    (``sweep_kernels.py`` also varies rows and warps).
    """
    from benchmarks.sweep_kernels import KNOBS, launch_config  # here: sweep_kernels imports this module

    model, dims = next(iter(models.items()))
    benches = {b.op: b for b in build_benches(model, dims, batch, ratio, dtype, device, False, imgs_dtype)}
    for op, knob, about in ALTERNATIVES:
        if ops and op not in ops:
            continue
        b = benches[op]
        base = next((r for r in results if (r["op"], r["model"], r["phase"]) == (op, model, "fwd+bwd")), None)
        fn = phase_fn(b, "triton", "fwd+bwd")
        rule_out = detached_outputs(b)
        with launch_config(op, knob=knob) as chosen:
            out = detached_outputs(b)
            names = [name for _, name in KNOBS[op]]
            rule_knobs = dict(zip(names, chosen["rule"][2], strict=True))
            knobs = {
                n: v for n, v in zip(names, knob if isinstance(knob, tuple) else (knob,), strict=False) if v is not None
            }
            row: dict[str, object] = {"op": op, "model": model, "phase": "fwd+bwd", "about": about}
            row.update(knobs=knobs, rule_knobs=rule_knobs)
            row["rel_diff_vs_rule"] = max(
                ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
                for a, e in zip(out, rule_out, strict=True)
            )
            row["triton"] = measure(fn, device, smoke, b.min_bytes["fwd+bwd"], copy_gbps)
        base_ms = (base or {}).get("triton", {}).get("ms") if base else None
        row["speedup_vs_rule"] = base_ms / row["triton"]["ms"] if base_ms else None
        t = row["triton"]
        print(
            f"{model:>18} {op:>13} fwd+bwd {knobs} | triton {t['ms']:.4f} ms {t['gbps']:.1f} GB/s "
            f"({t['pct_of_copy']:.0f}%)"
            + (f" | {row['speedup_vs_rule']:.2f}x the rule's {rule_knobs}" if base_ms else "")
        )
        yield row


def _write_json(path: Path, obj: dict[str, object]) -> None:
    """Atomically: a kill mid-write leaves the previous version whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _format_row(row: dict[str, object]) -> str:
    def cell(impl: str) -> str:
        r = row[impl]
        return f"{impl} {r['ms']:.4f} ms {r['gbps']:.1f} GB/s ({r['pct_of_copy']:.0f}%)" if r else f"{impl} -"

    speed = row["speedup_vs_compiled"]
    tail = f" | {speed:.2f}x compiled" if speed else ""
    return f"{row['model']:>18} {row['op']:>13} {row['phase']:>7} | " + " | ".join(map(cell, IMPLS)) + tail


if __name__ == "__main__":
    main()
