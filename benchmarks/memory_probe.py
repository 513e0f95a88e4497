"""Activation memory of the training step, counted on CPU: what the forward leaves for the backward.

A training step's peak memory is the parameters, gradients and AdamW's two moments (16 bytes a
parameter), plus the activations autograd keeps from the forward for the backward, plus short-lived
buffers. The activations are a property of the computation, not of the GPU, so they can be counted
exactly on a CPU, for each way of running the step:

- **eager**: bytes of the storages the forward creates that are still held when it returns
  (autograd's saved tensors, checkpointing caches, the outputs), under bf16 autocast (``held_bytes``);
- **compiled**: bytes the min-cut partitioner, the one inductor uses, passes from the forward graph to
  the backward graph, with inductor's decompositions (``compiled_saved_bytes``); the graphs run
  uncompiled, so no code is generated.

Each count is taken at batch 2 and 4: the slope is the bytes per image, the rest the part that does
not grow with the batch (bf16 copies of the weights). The prediction for a batch is state + slope x
batch + rest; on the GPU the allocator's rounding and the backward's transient buffers come on top.
The fastmae variants run the reference path (kernels off) when compiled: the fused path's kernels
run only under the Triton interpreter here, which compile cannot trace; eager, they run so.

    python benchmarks/memory_probe.py --out benchmarks/results/<date>_cpu_activation_memory.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as a script: the repo root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import common
from benchmarks.step_variants import MASK_RATIO, model_kwargs  # noqa: E402  (after the sys.path fallback)

BATCHES = (2, 4)


class _NewStorages(TorchDispatchMode):
    """Keeps a reference to the storage of every tensor an op returns, views of older tensors aside.

    Holding them keeps every address unique for the mode's lifetime (nothing is freed and reused).
    """

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, torch.UntypedStorage] = {}
        self.older: set[int] = set()  # storages that existed before (parameters, inputs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.storages:
                self.older.add(t.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st.data_ptr() not in self.older:
                    self.storages.setdefault(st.data_ptr(), st)
        return out


def held_bytes(call: Callable[[], Any]) -> tuple[int, Any]:
    """``(bytes, call())``: the bytes of storages created inside ``call`` still held by others after it.

    The mode's own reference is one use of each storage; any other (a saved tensor, a cache, the
    returned outputs) means the memory is still allocated.
    """
    mode = _NewStorages()
    with mode:
        out = call()
    gc.collect()
    held = [st for st in mode.storages.values() if torch._C._storage_Use_Count(st._cdata) > 1]
    return sum(st.nbytes() for st in held), out


def compiled_saved_bytes(call: Callable[[], Any]) -> int:
    """Bytes the compiled ``call``'s forward graphs save for their backward graphs (inputs and parameters aside)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    saved: list[int] = []

    def partition(joint, joint_inputs, **kwargs):
        fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
        saved.append(
            sum(
                int(n.meta["val"].numel()) * n.meta["val"].element_size()
                for n in bw.graph.nodes
                if n.op == "placeholder"
                and not n.name.startswith(("tangents", "primals"))
                and isinstance(n.meta.get("val"), torch.Tensor)
            )
        )
        return fw, bw

    def run_uncompiled(gm, example_inputs):
        return make_boxed_func(gm.forward)

    backend = aot_autograd(
        fw_compiler=run_uncompiled,
        bw_compiler=run_uncompiled,
        partition_fn=partition,
        decompositions=select_decomp_table(),
    )
    torch._dynamo.reset()
    torch.compile(call, backend=backend, dynamic=False)()
    torch._dynamo.reset()
    return sum(saved)


TATTN = "_tattn"  # variant-name suffix: the blocks' attention as fastmae's Triton op (a stand-in here)


@functools.cache
def _standin_attention() -> Any:
    """A custom op with the Triton attention's signature and layouts (qkv ``(B, N, 3, H, Dh)`` in,
    ``(B, N, H, Dh)`` + log-sum-exp out; one ``(B, N, 3, H, Dh)`` grad back), computed by plain math:
    inductor keeps a custom op as an extern kernel and the partitioner saves its inputs and outputs,
    so what traffic_probe counts is the traffic around it, and what this probe counts is what it
    keeps for the backward, as the Triton op does on the GPU (whose own time ``bench_attention.py``
    measures)."""
    from fastmae.attention import attention_math

    @torch.library.custom_op("fastmae_traffic::attention", mutates_args=())
    def attention(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _, H, Dh = qkv.shape
        return attention_math(qkv).reshape(B, N, H, Dh), qkv.new_zeros(B * H, N, dtype=torch.float32)

    @attention.register_fake
    def _(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _, H, Dh = qkv.shape
        return qkv.new_empty(B, N, H, Dh), qkv.new_empty(B * H, N, dtype=torch.float32)

    @torch.library.custom_op("fastmae_traffic::attention_backward", mutates_args=())
    def attention_backward(
        grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
    ) -> torch.Tensor:
        # the math backward written out (autograd is off inside a custom op's implementation)
        B, N, _, H, Dh = qkv.shape
        q, k, v = qkv.float().permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh)
        do = grad_out.float().reshape(B, N, H, Dh).transpose(1, 2)
        p = ((q @ k.transpose(-2, -1)) * Dh**-0.5).softmax(-1)
        dp = do @ v.transpose(-2, -1)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * Dh**-0.5
        grads = (ds @ k, ds.transpose(-2, -1) @ q, p.transpose(-2, -1) @ do)
        return torch.stack(grads, 0).permute(1, 3, 0, 2, 4).to(qkv.dtype).contiguous()

    @attention_backward.register_fake
    def _(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(qkv)

    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.save_for_backward(inputs[0], *output)

    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: Any) -> torch.Tensor:
        return attention_backward(grad_out, *ctx.saved_tensors)

    attention.register_autograd(backward, setup_context=setup_context)

    def call(qkv: torch.Tensor) -> torch.Tensor:
        B, N, _, H, Dh = qkv.shape
        return attention(qkv)[0].reshape(B, N, H * Dh)

    return call


@contextlib.contextmanager
def standin_triton_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within: every block of ``model`` runs the stand-in for the Triton attention op."""
    from fastmae import attention as attention_mod

    blocks = [m for m in model.modules() if hasattr(m, "backend") and hasattr(m, "qkv")]
    saved = [b.backend for b in blocks]
    impl = attention_mod._IMPLS["triton"]
    attention_mod._IMPLS["triton"] = _standin_attention()
    for b in blocks:
        b.backend = "triton"
    try:
        yield
    finally:
        attention_mod._IMPLS["triton"] = impl
        for b, backend in zip(blocks, saved, strict=True):
            b.backend = backend


def _state_bytes(model: torch.nn.Module) -> int:
    """Parameters (fp32) + grads + AdamW's exp_avg and exp_avg_sq for the trainable ones."""
    return sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in model.parameters())


Build = Callable[[], torch.nn.Module]


def variant_table(
    model_name: str,
) -> tuple[torch.nn.Module, dict[str, tuple[str, Build, str]], Callable[..., Callable[[], torch.Tensor]], int, int]:
    """``(base, {name: (eager | compiled, build, about)}, step_fn, image side, L)`` for a benchmark model.

    ``step_fn(model, imgs, noise)`` is a call returning the loss; every fastmae variant loads the
    base's weights, HF's are converted from them.
    """
    from fastmae.convert import to_hf
    from fastmae.model import MaskedAutoencoderViT

    kwargs = model_kwargs(model_name)
    img, L = kwargs["img_size"], (kwargs["img_size"] // kwargs["patch_size"]) ** 2
    torch.manual_seed(0)
    base = MaskedAutoencoderViT(**kwargs, norm_pix_loss=True).train()
    hf = to_hf(base, mask_ratio=MASK_RATIO, attn_implementation="sdpa").train()

    def fm(fused: bool, ac: str, residual: str = "float32") -> torch.nn.Module:
        m = MaskedAutoencoderViT(
            **kwargs, norm_pix_loss=True, fused=fused, activation_checkpointing=ac, residual_dtype=residual
        ).train()
        m.load_state_dict(base.state_dict())
        return m

    def step_fn(model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor) -> Callable[[], torch.Tensor]:
        if model is hf:
            return lambda: hf(pixel_values=imgs, noise=noise).loss
        return lambda: model(imgs, MASK_RATIO, noise)[0]

    table: dict[str, tuple[str, Build, str]] = {
        "hf_eager": ("eager", lambda: hf, "HF ViTMAEForPreTraining, eager, sdpa (the reference)"),
        "hf_compile": ("compiled", lambda: hf, "HF under torch.compile"),
        "fm_ref": ("eager", lambda: fm(False, "none"), "fastmae reference path, eager"),
        "fm_fused_eager": ("eager", lambda: fm(True, "none"), "fastmae fused path, eager"),
        "fm_fused_eager_gelu": ("eager", lambda: fm(True, "gelu"), "fused, eager, GELU recomputed"),
        "fm_fused_eager_selective": ("eager", lambda: fm(True, "selective"), "fused, eager, selective checkpointing"),
        "fm_fused_eager_full": ("eager", lambda: fm(True, "full"), "fused, eager, full checkpointing"),
        "fm_compile": ("compiled", lambda: fm(False, "none"), "fastmae compiled (reference path)"),
        "fm_compile_gelu": ("compiled", lambda: fm(False, "gelu"), "compiled, GELU recomputed"),
        "fm_compile_selective": ("compiled", lambda: fm(False, "selective"), "compiled, selective checkpointing"),
        "fm_compile_full": ("compiled", lambda: fm(False, "full"), "compiled, full checkpointing"),
        "fm_compile_bf16res": ("compiled", lambda: fm(False, "none", "autocast"), "compiled, bf16 residual stream"),
        "fm_compile_selective_bf16res": (
            "compiled",
            lambda: fm(False, "selective", "autocast"),
            "compiled, selective checkpointing, bf16 residual stream",
        ),
    }
    return base, table, step_fn, img, L


def probe(model_name: str, batch: int, variants: list[str] | None = None) -> dict[str, Any]:
    """Per-image and constant activation bytes of each variant, and the predicted peak at ``batch``."""
    base, table, step_fn, img, L = variant_table(model_name)
    out: dict[str, Any] = {"params": sum(p.numel() for p in base.parameters()), "state_bytes": _state_bytes(base)}
    out["variants"] = {}
    for name in variants or list(table):
        tattn = name.endswith(TATTN)
        kind, build, about = table[name.removesuffix(TATTN)]
        if tattn:
            about += ", the Triton attention op's saved tensors (qkv, output, log-sum-exp)"
        t0 = time.perf_counter()
        model = build()
        counts = []
        for n in BATCHES:
            gen = torch.Generator().manual_seed(n)
            imgs, noise = torch.randn(n, 3, img, img, generator=gen), torch.rand(n, L, generator=gen)
            call = step_fn(model, imgs, noise)
            swap = standin_triton_attention(model) if tattn else contextlib.nullcontext()
            with swap, torch.autocast("cpu", dtype=torch.bfloat16):
                if kind == "eager":
                    nbytes, loss = held_bytes(call)
                    del loss
                else:
                    nbytes = compiled_saved_bytes(call)
            counts.append(nbytes)
        per_image = (counts[1] - counts[0]) / (BATCHES[1] - BATCHES[0])
        const = counts[0] - per_image * BATCHES[0]
        activations = per_image * batch + const
        out["variants"][name] = {
            "kind": kind,
            "about": about,
            "bytes_at_batches": dict(zip(map(str, BATCHES), counts, strict=True)),
            "per_image_bytes": per_image,
            "const_bytes": const,
            "activation_bytes": activations,
            "predicted_peak_bytes": out["state_bytes"] + activations,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(
            f"{model_name} {name:26s} {per_image / 2**20:8.2f} MiB/img  "
            f"-> {activations / 2**30:6.2f} GiB at batch {batch}, predicted peak "
            f"{(out['state_bytes'] + activations) / 2**30:6.2f} GiB",
            flush=True,
        )
        del model
        gc.collect()
    ref = out["variants"].get("hf_eager")
    if ref:
        for v in out["variants"].values():
            v["peak_vs_hf_eager"] = v["predicted_peak_bytes"] / ref["predicted_peak_bytes"]
    return out


def markdown(record: dict[str, Any]) -> str:
    """The README's table: per variant and model, MiB per image and the predicted peak against HF eager."""
    models = list(record["models"])
    names = list(dict.fromkeys(n for m in models for n in record["models"][m]["variants"]))
    head = "| variant | " + " | ".join(f"{m}: MiB/img | peak GiB at {record['batch']} | × HF eager" for m in models)
    lines = [head + " |", "|---|" + "---:|" * (3 * len(models))]
    for n in names:
        cells = []
        for m in models:
            v = record["models"][m]["variants"].get(n)
            if v is None:
                cells += ["–"] * 3
                continue
            ratio = v.get("peak_vs_hf_eager")
            cells += [
                f"{v['per_image_bytes'] / 2**20:.1f}",
                f"{v['predicted_peak_bytes'] / 2**30:.1f}",
                f"{ratio:.2f}" if ratio is not None else "–",
            ]
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["vit_base_patch16", "vit_large_patch16"], help="tiny or SHAPES names")
    p.add_argument("--batch", type=int, default=256, help="the batch the peak is predicted for")
    p.add_argument("--variants", nargs="+", default=None, help="a subset (default: all)")
    p.add_argument("--out", type=Path, default=None, help="JSON file")
    p.add_argument("--md", type=Path, default=None, metavar="JSON", help="print the markdown table of a result file")
    args = p.parse_args(argv)
    if args.md:
        print(markdown(json.loads(args.md.read_text())))
        return 0
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused variants' kernels on CPU tensors
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    record: dict[str, Any] = {
        "benchmark": "memory_probe",
        "env": common.environment(argv, script=__file__),
        "method": __doc__.split("\n\n")[1:4],
        "batch": args.batch,
        "mask_ratio": MASK_RATIO,
        "autocast": "bf16",
        "models": {},
    }
    for name in args.model:
        record["models"][name] = probe(name, args.batch, args.variants)
        if args.out:
            common.write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
