"""torch.compile's view of the kernels, checked on CPU: what each kernel writes, and the partition.

When ``torch.compile`` traces a ``triton_op``, it asks Triton for the kernel's TTIR and follows
every stored pointer back to the kernel's arguments; whatever it reaches counts as written, and
functionalization clones it before the launch. A kernel that seems to write its inputs therefore
costs a copy of each, and on the full model it broke compile outright (H100, torch 2.11: "Node
slice_5 was invalid, but is output" in the min-cut partitioner, from masked_mse's backward seeming
to write ``pred``, a view of the model's output).

Neither step needs a GPU: the TTIR is generated for an sm_90 target (a stand-in driver answers
Triton's "which target?"), and the joint graph is traced with fake tensors and split by the
partitioner inductor uses, stopping before code generation. In a subprocess, because the test bed's
TRITON_INTERPRET=1 makes ``@triton.jit`` build interpreter functions, which compile cannot trace.
The run on a GPU, code generation and numerics included, is ``tests/test_compile.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys

import torch
import torch._higher_order_ops.triton_kernel_wrap as tkw
import triton
from functorch.compile import min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd
from triton.backends.compiler import GPUTarget


class Sm90Target:
    # All the TTIR generation asks of a driver; nothing is launched.
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


if not torch.cuda.is_available():  # on a GPU machine, its own driver answers
    triton.runtime.driver.set_active(Sm90Target())

from fastmae.model import MaskedAutoencoderViT  # noqa: E402  (after the driver)

written = {}
real_get_mutated = tkw.get_mutated_tensors


def get_mutated(kernel_idx, constant_args_idx, kwargs, tma):
    names = real_get_mutated(kernel_idx, constant_args_idx, kwargs, tma)
    kernel = tkw.kernel_side_table.get_kernel(kernel_idx)
    written.setdefault(kernel.fn.__name__, set()).update(names)
    return names


tkw.get_mutated_tensors = get_mutated


class Partitioned(Exception):
    pass


graphs = {}


def partition(joint, joint_inputs, **kwargs):
    fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
    graphs["fw"], graphs["bw"] = fw, bw
    raise Partitioned  # stop before code generation: there is no GPU to run it on


def never(gm, example_inputs):
    raise AssertionError("unreachable: the partition stops the compile")


def saved_bytes(bw):
    # What the forward hands the backward, parameters and inputs aside: the activations kept.
    return sum(
        n.meta["val"].numel() * n.meta["val"].element_size()
        for n in bw.graph.nodes
        if n.op == "placeholder" and not n.name.startswith(("tangents", "primals"))
        and isinstance(n.meta.get("val"), torch.Tensor)
    )


report = {}
for norm_pix, ac, attn in (
    (True, "none", "sdpa"), (False, "none", "sdpa"), (True, "gelu", "sdpa"), (True, "selective", "sdpa"),
    (True, "none", "triton"), (True, "selective", "triton"),
):
    torch._dynamo.reset()
    graphs.clear()
    model = MaskedAutoencoderViT(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
        decoder_depth=2, decoder_num_heads=2, norm_pix_loss=norm_pix, fused=True, activation_checkpointing=ac,
    )
    for block in (*model.blocks, *model.decoder_blocks):  # set after construction: the CPU has no
        block.attn.backend = attn  # interpreter here (TRITON_INTERPRET=0), so "triton" would not resolve
    backend = aot_autograd(fw_compiler=never, bw_compiler=never, partition_fn=partition)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    try:
        compiled(torch.randn(2, 3, 32, 32), 0.75)
        error = "the compile did not reach the partitioner"
    except Exception as e:  # the partitioner's own failure arrives wrapped in BackendCompilerFailed
        error = None if isinstance(getattr(e, "inner_exception", e), Partitioned) else repr(e)
    kernels = {
        name: sorted(n.kwargs["tensors_to_clone"])
        for name in ("fw", "bw") if name in graphs
        for n in graphs[name].graph.nodes
        if n.target is tkw.triton_kernel_wrapper_functional
    }
    report[f"norm_pix={norm_pix},ac={ac}" + ("" if attn == "sdpa" else f",attn={attn}")] = {
        "error": error,
        "saved_bytes": saved_bytes(graphs["bw"]) if "bw" in graphs else None,
        "graphs": sorted(graphs),
        "kernel_nodes": {
            name: len([n for n in graphs[name].graph.nodes if n.target is tkw.triton_kernel_wrapper_functional])
            for name in graphs
        },
    }
report["written"] = {k: sorted(v) for k, v in written.items()}

# The loss alone in each of its tile orders (a launch knob): what its kernels write.
import importlib  # noqa: E402

mse = importlib.import_module("fastmae.kernels.masked_mse")
rule = mse._launch_config
report["loss_orders"] = {}
for order in mse.ORDERS:
    for name in ("_masked_mse_fwd_kernel", "_masked_mse_bwd_kernel"):
        written.pop(name, None)
    mse._launch_config = lambda *args, order=order: (*rule(*args)[:4], order)
    torch._dynamo.reset()
    graphs.clear()
    backend = aot_autograd(fw_compiler=never, bw_compiler=never, partition_fn=partition)
    loss = torch.compile(lambda p, i, m: mse.masked_mse(p, i, m, 8, True), backend=backend, fullgraph=True)
    try:
        loss(torch.randn(2, 16, 192, requires_grad=True), torch.randn(2, 3, 32, 32), torch.ones(2, 16))
        error = "the compile did not reach the partitioner"
    except Exception as e:
        error = None if isinstance(getattr(e, "inner_exception", e), Partitioned) else repr(e)
    report["loss_orders"][order] = {"error": error, "written": {k: sorted(v) for k, v in written.items() if "mse" in k}}
mse._launch_config = rule
json.dump(report, sys.stdout)
"""

# Each kernel's outputs: exactly what it may write.
OUTPUTS = {
    "_patch_gather_kernel": ["out_ptr"],
    "_encoder_input_kernel": ["out_ptr"],
    "_unshuffle_fwd_kernel": ["out_ptr"],
    "_unshuffle_bwd_kernel": ["grad_x_ptr", "partial_ptr"],
    "_masked_mse_fwd_kernel": ["partial_ptr"],
    "_masked_mse_bwd_kernel": ["grad_pred_ptr"],
    "_attn_fwd_kernel": ["lse_ptr", "out_ptr"],
    "_attn_bwd_kernel": ["grad_qkv_ptr"],
}


@pytest.fixture(scope="module")
def trace_report() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_each_kernel_writes_only_its_outputs(trace_report):
    assert trace_report["written"] == OUTPUTS


@pytest.mark.parametrize("order", ["image", "pred", "gather"])
def test_each_loss_tile_order_writes_only_its_outputs(trace_report, order):
    run = trace_report["loss_orders"][order]
    assert run["error"] is None, run["error"]
    assert run["written"] == {k: v for k, v in OUTPUTS.items() if "mse" in k}


@pytest.mark.parametrize("norm_pix, ac", [(True, "none"), (False, "none"), (True, "gelu"), (True, "selective")])
def test_fused_model_partitions_into_forward_and_backward(trace_report, norm_pix, ac):
    run = trace_report[f"norm_pix={norm_pix},ac={ac}"]
    assert run["error"] is None, run["error"]
    assert run["graphs"] == ["bw", "fw"]
    # forward: gather, encoder_input, unshuffle, loss; backward: unshuffle's and the loss's (the
    # gather and encoder_input backwards are plain PyTorch: a GEMM's input needs no grad, a view).
    assert run["kernel_nodes"] == {"fw": 4, "bw": 2}


@pytest.mark.parametrize("ac", ["none", "selective"])
def test_triton_attention_partitions(trace_report, ac):
    """With the Triton attention in all 4 blocks: one more kernel a block in each direction, and
    selective checkpointing keeps the attention's output and log-sum-exp (an op it never recomputes)."""
    run = trace_report[f"norm_pix=True,ac={ac},attn=triton"]
    assert run["error"] is None, run["error"]
    assert run["kernel_nodes"] == {"fw": 4 + 4, "bw": 2 + 4}


def test_checkpointing_keeps_less_for_backward(trace_report):
    # The compiled fast path honours the policy: the GELU and norm outputs are recomputed, not saved
    # (the partitioner alone saves them: a GEMM's weight grad needs them materialised in the
    # backward anyway). At this fp32 shape "selective" keeps 0.65 of what "none" does.
    none = trace_report["norm_pix=True,ac=none"]["saved_bytes"]
    gelu = trace_report["norm_pix=True,ac=gelu"]["saved_bytes"]
    selective = trace_report["norm_pix=True,ac=selective"]["saved_bytes"]
    assert selective < 0.7 * none, (selective, none)
    # compiled, "gelu" saves exactly "none" less the GELU outputs: one (tokens, 4 x width) tensor a block
    gelu_outputs = 2 * (2 * (1 + 4) * 4 * 64 + 2 * (1 + 16) * 4 * 32) * 4  # batch 2, fp32, 2 blocks each side
    assert none - gelu == gelu_outputs, (none, gelu, gelu_outputs)
