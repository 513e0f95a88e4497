"""Memory traffic of the training step's fused (non-GEMM) kernels, counted on CPU: a GPU-time prediction.

On a GPU the step is GEMMs and attention (compute-bound, untouched by most of the performance
push's candidates) plus the element-wise, normalisation and reduction kernels inductor generates,
which are bound by memory bandwidth. How many bytes those kernels move is decided by inductor's
scheduler (what it fuses, in which dtype each buffer lives), so it can be counted on a CPU:

- the step (forward, backward; bf16 autocast) is compiled with inductor on CPU, its graph caches
  off (a cache hit would skip the scheduler; compiled kernels are still reused);
- after the scheduler has fused the graphs, each generated kernel's read + write buffer bytes are
  summed (inductor's own ``get_read_write_buffers_sizes``); extern kernels (GEMMs, attention,
  convolution) are left out;
- at batch 2 and 6: the slope is the bytes per image, the rest is fixed per step (the weights'
  bf16 casts and their grads);
- predicted milliseconds = bytes at ``--batch`` / ``--gbps`` (default: the H200's device copy,
  4247 GB/s, measured 2026-11-27).

A prediction, not a measurement: CPU inductor fuses differently from CUDA inductor in places (no
mix-order reduction, other reduction splits), a buffer a kernel reads twice counts once, and
fastmae's Triton kernels are not counted: the fastmae variants run the reference path, as in
``memory_probe.py``, unless named with ``_fused``: then each of fastmae's ops is one opaque call
and what is counted is the glue around them (the ops themselves moved ~0.4 ms of bytes on the
H200; ``bench_kernels.py`` times them). Its use is to rank
candidates before a lease. Against the H200's profile of 2026-11-27 (ViT-B, batch 256): fastmae's
compiled step is predicted at 14.1 ms, where inductor's fused + norm kernels took 14.3 ms; HF
compiled at 13.0 ms, where they took 16.6 ms. HF's compiled encoder attention ran on the GPU as
decomposed fp32 math (24 fp32 GEMMs and their softmax kernels), on the CPU as one extern kernel:
probably the bytes this count misses there.

    python benchmarks/traffic_probe.py --out benchmarks/results/<date>_cpu_traffic.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as a script: the repo root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import common
from benchmarks.memory_probe import (  # noqa: E402  (after the sys.path fallback)
    TATTN,
    standin_triton_attention,
    variant_table,
)

BATCHES = (2, 6)
H200_COPY_GBPS = 4247.0  # benchmarks/results/2026-11-27_h200_step_vit_base.json, ceilings
DEFAULT_VARIANTS = [
    "hf_compile",
    "fm_compile",
    "fm_compile_selective",
    "fm_compile_bf16res",
    "fm_compile_selective_bf16res",
]


@contextlib.contextmanager
def counting_fused_bytes() -> Iterator[dict[str, int]]:
    """Counts, while active, the read + write bytes of every kernel inductor's scheduler generates
    (extern and no-op nodes aside): ``{"bytes": ..., "kernels": ...}``."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    import torch._inductor.scheduler as sched
    from torch._inductor.utils import get_fused_kernel_name

    counts: dict[str, Any] = {"bytes": 0, "kernels": 0, "per_kernel": []}
    codegen = sched.Scheduler.codegen

    def counting_codegen(self: Any) -> Any:
        for node in self.nodes:
            if isinstance(node, (sched.ExternKernelSchedulerNode, sched.NopKernelSchedulerNode)):
                continue
            nbytes = int(node.get_read_write_buffers_sizes())
            counts["bytes"] += nbytes
            counts["kernels"] += 1
            # what the kernel computes, as inductor names its kernels (the aten ops fused into it)
            counts["per_kernel"].append((get_fused_kernel_name(node.get_nodes(), "original_aten"), nbytes))
        return codegen(self)

    sched.Scheduler.codegen = counting_codegen
    try:
        # a graph-cache hit would skip the scheduler; the compiled-kernel caches stay (a g++ build a kernel)
        with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
            yield counts
    finally:
        sched.Scheduler.codegen = codegen


FUSED = "_fused"  # variant-name suffix: fastmae's Triton ops on (the fast path), each one opaque call


def _ops_in_plain_pytorch() -> dict[Any, Any]:
    """fastmae's Triton ops (``torch.library`` ops) -> what each computes, in plain PyTorch, with the
    op's output dtypes and layouts: the ops' CPU implementations while :func:`fastmae_ops_opaque` is on."""
    import importlib

    from fastmae import kernels as K

    mod = {n: importlib.import_module(f"fastmae.kernels.{n}") for n in ("patch_gather", "encoder_input", "unshuffle")}
    mse = importlib.import_module("fastmae.kernels.masked_mse")

    def promoted(*ts: torch.Tensor) -> torch.dtype:
        return functools.reduce(torch.promote_types, (t.dtype for t in ts))

    # The backwards as the references' vector-Jacobian products (autograd itself is off in an op's
    # kernel; torch.func is not).
    def masked_mse_backward(grad_loss, pred, imgs, mask, P, norm_pix):
        ref = functools.partial(
            K.masked_mse_ref, imgs=imgs.float(), mask=mask.float(), patch_size=P, norm_pix_loss=norm_pix
        )
        return torch.func.vjp(ref, pred.float())[1](grad_loss.float())[0].to(pred.dtype)

    def unshuffle_backward(grad_out, ids_restore, K_, x_dtype, mask_token_dtype):
        N, L1, D = grad_out.shape  # the op is linear in x and mask_token: its vjp at zeros is its vjp
        x, mask_token = grad_out.new_zeros(N, 1 + K_, D), grad_out.new_zeros(1, 1, D)
        ref = functools.partial(K.unshuffle_ref, ids_restore=ids_restore, pos=grad_out.new_zeros(1, L1, D))
        grad_x, grad_mask_token = torch.func.vjp(ref, x, mask_token)[1](grad_out)
        return grad_x.to(x_dtype), grad_mask_token.to(mask_token_dtype)

    return {
        mod["patch_gather"]._patch_gather: lambda imgs, ids, P: K.patch_gather_ref(imgs, ids, P).contiguous(),
        mod["encoder_input"]._encoder_input: lambda x, cls, pos, ids: K.encoder_input_ref(x, cls, pos, ids).to(
            promoted(x, cls, pos)
        ),
        mod["unshuffle"]._unshuffle: lambda x, mt, ids, pos: K.unshuffle_ref(x, mt, ids, pos).to(promoted(x, mt, pos)),
        mod["unshuffle"]._unshuffle_backward: unshuffle_backward,
        mse._masked_mse: lambda pred, imgs, mask, P, norm_pix: K.masked_mse_ref(
            pred.float(), imgs.float(), mask.float(), P, norm_pix
        ),
        mse._masked_mse_backward: masked_mse_backward,
    }


@contextlib.contextmanager
def fastmae_ops_opaque() -> Iterator[None]:
    """Within: torch.compile keeps each of fastmae's Triton ops as one extern call, as inductor keeps
    a user Triton kernel on the GPU (nothing fuses into it), instead of decomposing it into its
    kernels (which CPU inductor cannot build); on CPU tensors each op computes its result in plain
    PyTorch. So the count is the fast path's own: the glue inductor generates around the ops, not
    the reference path's kernels in their place. Needs ``TRITON_INTERPRET`` off (compile cannot
    trace interpreter kernels); the CPU implementations are swapped back on exit."""
    import os

    import torch._functorch.config as functorch_config

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the fused variants need TRITON_INTERPRET unset: compile cannot trace interpreter kernels")
    impls = _ops_in_plain_pytorch()
    saved = {op: op._backend_fns.get("cpu") for op in impls}
    for op, fn in impls.items():
        op.register_kernel("cpu")(fn)
    try:
        with functorch_config.patch(decompose_custom_triton_ops=False):
            yield
    finally:
        for op, fn in saved.items():  # the dispatcher entry stays; it calls the op's own function again
            op._backend_fns["cpu"] = fn if fn is not None else op._backend_fns[None]


def parse_variant(name: str) -> tuple[str, bool, bool]:
    """``name`` -> (memory_probe's table entry, Triton attention stand-in?, fastmae's ops on?); the
    suffixes ``_fused`` and ``_tattn`` in either order."""
    tattn = fused = False
    while True:
        if name.endswith(TATTN):
            name, tattn = name.removesuffix(TATTN), True
        elif name.endswith(FUSED):
            name, fused = name.removesuffix(FUSED), True
        else:
            return name, tattn, fused


def step_bytes(call: Any) -> dict[str, Any]:
    """Fused-kernel bytes of one compiled forward + backward of ``call`` (bf16 autocast, CPU)."""

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = call()
        loss.backward()
        return loss

    torch._dynamo.reset()
    with counting_fused_bytes() as counts:
        torch.compile(step, dynamic=False)()
    torch._dynamo.reset()
    return dict(counts)


def top_kernels(counts: list[dict[str, Any]], batch: int, top: int) -> list[dict[str, Any]]:
    """The kernels that move the most bytes at ``batch``, by what they fuse: per-name totals at the two
    probe batches, extrapolated as the step's are (a name that appears several times a step, e.g. one
    per block, is summed)."""
    totals = []
    for c in counts:
        t: dict[str, int] = {}
        n_calls: dict[str, int] = {}
        for name, nbytes in c["per_kernel"]:
            t[name] = t.get(name, 0) + nbytes
            n_calls[name] = n_calls.get(name, 0) + 1
        totals.append((t, n_calls))
    (t0, calls0), (t1, _) = totals
    rows = []
    for name in t0.keys() & t1.keys():
        per_image = (t1[name] - t0[name]) / (BATCHES[1] - BATCHES[0])
        fixed = t0[name] - per_image * BATCHES[0]
        rows.append(
            {
                "kernel": name,
                "calls": calls0[name],
                "per_image_bytes": per_image,
                "bytes_at_batch": per_image * batch + fixed,
            }
        )
    return sorted(rows, key=lambda r: -r["bytes_at_batch"])[:top]


def probe(model_name: str, batch: int, gbps: float, variants: list[str], top: int = 0) -> dict[str, Any]:
    base, table, step_fn, img, L = variant_table(model_name)
    out: dict[str, Any] = {"variants": {}}
    for name in variants:
        entry, tattn, fused = parse_variant(name)
        kind, build, about = table[entry]
        if kind != "compiled":
            raise ValueError(f"{name} is an eager variant: only compiled ones have inductor kernels to count")
        if tattn:
            about += ", the Triton attention op's layouts (q, k, v read in place, one qkv grad)"
        t0 = time.perf_counter()
        model = build()
        if fused:
            if not hasattr(model, "fused"):
                raise ValueError(f"{name}: only fastmae's model has the fused path")
            model.fused = True
            about += ", fastmae's Triton ops on (each one opaque call: the glue around them counted)"
        counts = []
        for n in BATCHES:
            gen = torch.Generator().manual_seed(n)
            imgs, noise = torch.randn(n, 3, img, img, generator=gen), torch.rand(n, L, generator=gen)
            with contextlib.ExitStack() as stack:
                if tattn:
                    stack.enter_context(standin_triton_attention(model))
                if fused:
                    stack.enter_context(fastmae_ops_opaque())
                counts.append(step_bytes(step_fn(model, imgs, noise)))
            model.zero_grad(set_to_none=True)
        per_image = (counts[1]["bytes"] - counts[0]["bytes"]) / (BATCHES[1] - BATCHES[0])
        fixed = counts[0]["bytes"] - per_image * BATCHES[0]
        at_batch = per_image * batch + fixed
        out["variants"][name] = {
            "about": about,
            "bytes_at_batches": {str(b): c["bytes"] for b, c in zip(BATCHES, counts, strict=True)},
            "kernels": counts[0]["kernels"],
            "per_image_bytes": per_image,
            "fixed_bytes": fixed,
            "bytes_at_batch": at_batch,
            "predicted_ms": at_batch / gbps / 1e6,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if top:
            out["variants"][name]["top_kernels"] = top_kernels(counts, batch, top)
            for k in out["variants"][name]["top_kernels"]:
                print(
                    f"    {k['bytes_at_batch'] / gbps / 1e6:6.2f} ms {k['calls']:3d}x {k['kernel'][:100]}",
                    flush=True,
                )
        print(
            f"{model_name} {name:30s} {per_image / 1e6:7.1f} MB/img + {fixed / 1e9:5.2f} GB fixed "
            f"-> {at_batch / 1e9:6.1f} GB at batch {batch}, {at_batch / gbps / 1e6:5.1f} ms at {gbps:.0f} GB/s",
            flush=True,
        )
        del model
    ref = out["variants"].get("fm_compile")
    if ref:
        for v in out["variants"].values():
            v["bytes_vs_fm_compile"] = v["bytes_at_batch"] / ref["bytes_at_batch"]
    return out


def markdown(record: dict[str, Any]) -> str:
    models = list(record["models"])
    head = "| variant | " + " | ".join(f"{m}: MB/img | GB at {record['batch']} | ms predicted" for m in models)
    lines = [head + " |", "|---|" + "---:|" * (3 * len(models))]
    names = list(dict.fromkeys(n for m in models for n in record["models"][m]["variants"]))
    for n in names:
        cells = []
        for m in models:
            v = record["models"][m]["variants"].get(n)
            cells += (
                ["–"] * 3
                if v is None
                else [
                    f"{v['per_image_bytes'] / 1e6:.0f}",
                    f"{v['bytes_at_batch'] / 1e9:.1f}",
                    f"{v['predicted_ms']:.1f}",
                ]
            )
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["vit_base_patch16"], help="tiny or SHAPES names")
    p.add_argument("--batch", type=int, default=256, help="the batch the bytes and times are predicted for")
    p.add_argument("--gbps", type=float, default=H200_COPY_GBPS, help="bandwidth for the predicted ms")
    p.add_argument(
        "--variants",
        nargs="+",
        default=DEFAULT_VARIANTS,
        help=f"compiled variants of memory_probe's table; a name + {TATTN} with the Triton attention's layouts, "
        f"+ {FUSED} with fastmae's Triton ops (the fast path)",
    )
    p.add_argument("--top", type=int, default=0, help="also list the K kernels (by fused ops) moving the most bytes")
    p.add_argument("--out", type=Path, default=None, help="JSON file")
    p.add_argument("--md", type=Path, default=None, metavar="JSON", help="print the markdown table of a result file")
    args = p.parse_args(argv)
    if args.md:
        print(markdown(json.loads(args.md.read_text())))
        return 0
    record: dict[str, Any] = {
        "benchmark": "traffic_probe",
        "env": common.environment(argv, script=__file__),
        "method": __doc__.split("\n\n")[1:4],
        "batch": args.batch,
        "gbps": args.gbps,
        "autocast": "bf16",
        "models": {},
    }
    for name in args.model:
        record["models"][name] = probe(name, args.batch, args.gbps, args.variants, args.top)
        if args.out:
            common.write_json(args.out, record)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
