"""The kernels compile for an H100 (sm_90) without a GPU, vectorize and don't spill.

The interpreter accepts code the GPU compiler rejects, and says nothing about performance. Triton
ships ptxas, so the CUDA code generation runs here too: each kernel is compiled ahead of time with
the specialization the runtime applies at the benchmark's shapes (pointers and multiple-of-16 ints
marked divisible by 16, stride 1 folded to a constant), then its cubin's resource usage and its
PTX's global loads and stores are checked. In a subprocess: under TRITON_INTERPRET=1 (set by the
test bed) ``@triton.jit`` builds interpreter functions that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import collections, importlib, json, os, re, subprocess, tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BF = "*bf16"
I32 = "i32"
STRIDES = {"stride_n": I32, "stride_c": I32, "stride_h": I32}
MSE = {
    "n_rows": I32, "L": I32, "w": I32, "stride_pn": I32, "stride_pl": I32, **STRIDES, "stride_w": "constexpr", "C": "constexpr",
    "P": "constexpr", "P_PAD": "constexpr", "CP_PAD": "constexpr", "BLOCK_R": "constexpr",
    "NORM_PIX": "constexpr", "EPS": "constexpr", "ORDER": "constexpr",
}
MSE_C = {
    "stride_w": 1, "C": 3, "P": 16, "P_PAD": 16, "CP_PAD": 64, "BLOCK_R": 4, "NORM_PIX": True, "EPS": 1e-6,
    "ORDER": 0,
}
# module, kernel, signature, constexprs, ints divisible by 16 at ViT-B shapes, num_warps
KERNELS = [
    ("patch_gather", "_patch_gather_kernel",
     {"imgs_ptr": BF, "ids_ptr": "*i64", "out_ptr": BF, "n_rows": I32, "K": I32, "w": I32, **STRIDES,
      "stride_w": "constexpr", "C": "constexpr", "P": "constexpr", "P_PAD": "constexpr",
      "BLOCK_R": "constexpr", "BLOCK_CP": "constexpr"},
     {"stride_w": 1, "C": 3, "P": 16, "P_PAD": 16, "BLOCK_R": 16, "BLOCK_CP": 16}, set(STRIDES), 4),
    ("encoder_input", "_encoder_input_kernel",
     {"x_ptr": BF, "cls_ptr": BF, "pos_ptr": BF, "ids_ptr": "*i64", "out_ptr": BF, "n_rows": I32,
      "K": I32, "D": I32, "BLOCK_R": "constexpr", "BLOCK_D": "constexpr",
      "EMULATE_RTNE": "constexpr"},
     {"BLOCK_R": 4, "BLOCK_D": 1024, "EMULATE_RTNE": False}, {"D"}, 4),
    ("unshuffle", "_unshuffle_fwd_kernel",
     {"x_ptr": BF, "mask_token_ptr": BF, "ids_restore_ptr": "*i64", "pos_ptr": BF, "out_ptr": BF,
      "n_rows": I32, "K": I32, "L": I32, "D": I32, "BLOCK_R": "constexpr", "BLOCK_D": "constexpr",
      "EMULATE_RTNE": "constexpr"},
     {"BLOCK_R": 8, "BLOCK_D": 512, "EMULATE_RTNE": False}, {"D"}, 4),
    ("unshuffle", "_unshuffle_bwd_kernel",
     {"grad_out_ptr": BF, "ids_restore_ptr": "*i64", "grad_x_ptr": BF, "partial_ptr": "*fp32",
      "n_rows": I32, "rows_per_program": I32, "K": I32, "L": I32, "D": I32,
      "BLOCK_R": "constexpr", "BLOCK_D": "constexpr", "STAGES": "constexpr",
      "EMULATE_RTNE": "constexpr"},
     {"BLOCK_R": 8, "BLOCK_D": 512, "STAGES": 1, "EMULATE_RTNE": False}, {"D", "rows_per_program"}, 4),
    ("masked_mse", "_masked_mse_fwd_kernel",
     {"pred_ptr": BF, "imgs_ptr": BF, "mask_ptr": "*fp32", "partial_ptr": "*fp32", **MSE},
     MSE_C, {"stride_pn", "stride_pl", *STRIDES}, 8),
    ("masked_mse", "_masked_mse_bwd_kernel",
     {"pred_ptr": BF, "imgs_ptr": BF, "mask_ptr": "*fp32", "scale_ptr": "*fp32", "grad_pred_ptr": BF, **MSE,
      "EMULATE_RTNE": "constexpr"},
     {**MSE_C, "EMULATE_RTNE": False}, {"stride_pn", "stride_pl", *STRIDES}, 8),
]
# the loss's tile in pred's order too, and with the target gathered on chip (launch knobs,
# benchmarks/sweep_kernels.py; kernels.masked_mse.ORDERS)
KERNELS += [
    (m, n, sig, {**c, "ORDER": order}, div, w)
    for order in (1, 2)
    for m, n, sig, c, div, w in KERNELS
    if m == "masked_mse"
]
# the unshuffle backward's row loop pipelined (a launch knob): its tiles' loads become cp.async
KERNELS += [
    (m, n, sig, {**c, "STAGES": 3}, div, w) for m, n, sig, c, div, w in KERNELS if n == "_unshuffle_bwd_kernel"
]
# attention at MAE's shapes with the launcher's GPU tiles (64 x 64): the decoder's head dim 32
# (4 warps) and the encoder's 64 (8 warps in the backward); then the decoder with tail blocks
# (3 x 64 + 16 tokens): its forward, its backward's whole-block launch and its tail launch
ATTN_FWD = {"qkv_ptr": BF, "out_ptr": BF, "lse_ptr": "*fp32", "N": I32, "H": I32, "Dh": I32, "qk_scale": "fp32",
            "row0": I32, "bh0": I32, "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "TAIL_N": "constexpr",
            "BLOCK_D": "constexpr", "DOT_PRECISION": "constexpr", "EMULATE_RTNE": "constexpr"}
ATTN_BWD = {"qkv_ptr": BF, "out_ptr": BF, "grad_out_ptr": BF, "lse_ptr": "*fp32", "grad_qkv_ptr": BF, "N": I32,
            "H": I32, "Dh": I32, "qk_scale": "fp32", "sm_scale": "fp32", "key0": I32, "key_end": I32, "row0": I32,
            "row_end": I32, "bh0": I32, "OWN_M": "constexpr", "OWN_N": "constexpr", "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr", "TAIL_M": "constexpr", "TAIL_N": "constexpr", "BLOCK_D": "constexpr",
            "DOT_PRECISION": "constexpr", "EMULATE_RTNE": "constexpr", "ONE_BLOCK": "constexpr"}
ATTN_C = {"BLOCK_M": 64, "BLOCK_N": 64, "DOT_PRECISION": "tf32", "EMULATE_RTNE": False}
for d, bwd_warps, one_block in ((32, 4, False), (64, 8, True)):  # decoder: 197 tokens; encoder: 50
    KERNELS += [
        ("attention", "_attn_fwd_kernel", ATTN_FWD, {**ATTN_C, "BLOCK_D": d, "TAIL_N": 0}, {"Dh"}, 4),
        ("attention", "_attn_bwd_kernel", ATTN_BWD,
         {**ATTN_C, "BLOCK_D": d, "ONE_BLOCK": one_block, "OWN_M": 64, "OWN_N": 64, "TAIL_M": 0, "TAIL_N": 0},
         {"Dh"}, bwd_warps),
    ]
TAILS = {**ATTN_C, "BLOCK_D": 32, "TAIL_N": 16}
KERNELS += [
    ("attention", "_attn_fwd_kernel", ATTN_FWD, TAILS, {"Dh"}, 4),
    ("attention", "_attn_bwd_kernel", ATTN_BWD, {**TAILS, "ONE_BLOCK": False, "OWN_M": 64, "OWN_N": 64, "TAIL_M": 16},
     {"Dh"}, 4),
    ("attention", "_attn_bwd_kernel", ATTN_BWD, {**TAILS, "ONE_BLOCK": False, "OWN_M": 16, "OWN_N": 16, "TAIL_M": 16},
     {"Dh"}, 4),
]  # fmt: skip
# torch.compile's launches: inductor passes the scales (Python floats) as fp64 arguments
FP64_SCALES = {"qk_scale": "fp64", "sm_scale": "fp64"}
KERNELS += [
    (m, n, {a: FP64_SCALES.get(a, t) for a, t in sig.items()}, c, div, w)
    for m, n, sig, c, div, w in KERNELS
    if m == "attention" and c["BLOCK_D"] == 64
]
cuobjdump = os.path.join(os.path.dirname(importlib.import_module("triton.backends.nvidia").__file__), "bin", "cuobjdump")
report = {}
for module, kname, sig, constexprs, div16, num_warps in KERNELS:
    name = kname + {0: "", 1: "[pred_order]", 2: "[gather_order]"}[constexprs.get("ORDER", 0)]
    name += f"[stages{constexprs['STAGES']}]" if constexprs.get("STAGES", 1) > 1 else ""
    if module == "attention":
        name += f"[d{constexprs['BLOCK_D']}]" + ("[tails]" if constexprs["TAIL_N"] else "")
        name += f"[own{constexprs['OWN_M']}]" if constexprs.get("OWN_M") == 16 else ""
        name += "[fp64 scale]" if sig["qk_scale"] == "fp64" else ""
    fn = getattr(importlib.import_module("fastmae.kernels." + module), kname)
    assert list(sig) == fn.arg_names, (name, fn.arg_names)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(sig) if sig[a].startswith("*") or a in div16}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    ptx = k.asm["ptx"]
    ttir = k.asm["ttir"].splitlines()
    pid_uses = {}  # program-id axis -> the ops that take its value (TTIR's SSA names are the source's)
    for line in ttir:
        m = re.match(r"\s*(%[\w.]+) = tt\.get_program_id (\w)", line)
        if m:
            use = re.compile(re.escape(m.group(1)) + r"(?![\w.])")
            pid_uses[m.group(2)] = sorted({re.match(r"\s*(?:%\S+ = )?([\w.]+)", other).group(1)
                                           for other in ttir if other is not line and use.search(other)})
    report[name] = {
        "pid_uses": pid_uses,
        "local_bytes": int(re.search(r"LOCAL:(\d+)", usage).group(1)),
        "regs": int(re.search(r"REG:(\d+)", usage).group(1)),
        "loads": collections.Counter(re.findall(r"ld\.global[.\w]*", ptx)),
        "stores": collections.Counter(re.findall(r"st\.global[.\w]*", ptx)),
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "cp_async": len(re.findall(r"cp\.async\.", ptx)),
    }
print(json.dumps(report))
"""


def _nvidia_backend_available() -> bool:
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"))


@pytest.fixture(scope="module")
def codegen() -> dict[str, dict]:
    if not _nvidia_backend_available():
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Registers a thread at most: the memory-bound kernels keep 4 CTAs of 128 threads an SM; attention
# holds a 64 x 64 fp32 score tile and its accumulators (the backward two of them) and may use all
# 255 a thread may address, as long as nothing spills.
MAX_REGS = {"_attn_fwd_kernel": 160, "_attn_bwd_kernel": 255}


def test_no_spills(codegen):
    for name, r in codegen.items():
        assert r["local_bytes"] == 0, f"{name} spills {r['local_bytes']} bytes to local memory"
        limit = MAX_REGS.get(name.split("[")[0], 128)
        assert r["regs"] <= limit, f"{name} uses {r['regs']} registers"


@pytest.mark.parametrize("kernel", [f"{k}[d{d}]" for k in ("_attn_fwd_kernel", "_attn_bwd_kernel") for d in (32, 64)])
def test_attention_uses_hopper_tensor_cores(codegen, kernel):
    # the forward's two matmuls a key block and the backward's five are wgmma (sm_90's warp-group
    # MMA), not the older mma.sync at a fraction of the throughput
    assert codegen[kernel]["wgmma"] > 0, f"{kernel}: no wgmma.mma_async in the PTX"


@pytest.mark.parametrize(
    "kernel, vector_loads, vector_stores",
    [
        # The image is read 16 bytes at a time along q (patch 16 in bf16), the output written so.
        ("_patch_gather_kernel", True, True),
        ("_encoder_input_kernel", True, True),
        ("_unshuffle_fwd_kernel", True, True),
        ("_unshuffle_bwd_kernel", True, True),
        # pred is stored in (p, q, c) order with C = 3: its accesses cannot be 16-byte vectors,
        # but the image's can (the bulk of the bytes when images are fp32).
        ("_masked_mse_fwd_kernel", True, False),
        ("_masked_mse_bwd_kernel", True, False),
        # In pred's order the other way round: pred read and its grad written 16 bytes at a time
        # (the bwd's 16 two-byte stores a thread become 2 vector stores), the image gathered.
        ("_masked_mse_fwd_kernel[pred_order]", True, False),
        ("_masked_mse_bwd_kernel[pred_order]", True, True),
        # Both in their own order, the target gathered on chip: every load and store 16 bytes wide.
        ("_masked_mse_fwd_kernel[gather_order]", True, False),
        ("_masked_mse_bwd_kernel[gather_order]", True, True),
    ],
)
def test_vectorized(codegen, kernel, vector_loads, vector_stores):
    r = codegen[kernel]
    if vector_loads:
        assert any(".v4" in op for op in r["loads"]), f"{kernel}: no 16-byte loads: {r['loads']}"
    if vector_stores:
        assert any(".v4" in op for op in r["stores"]), f"{kernel}: no 16-byte stores: {r['stores']}"


# the program-id axis that walks the rows (of N * (1 + L) and the like: past 2**31 elements for big
# batches), and, for attention, the (batch, head) axis
ROW_AXIS = {"_attn_fwd_kernel": "y", "_attn_bwd_kernel": "y"}


def test_row_offsets_are_int64(codegen):
    """Every kernel widens its row program id to int64 before any arithmetic (``pid.to(tl.int64)``):
    in int32, ``rows * D`` wraps once a tensor passes 2**31 elements (a GPU test checks one op at
    such a size). Used as it is, it may only index one element per program (``partial_ptr + pid``)."""
    for name, r in codegen.items():
        axis = ROW_AXIS.get(name.split("[")[0], "x")
        uses = set(r["pid_uses"][axis])
        assert uses and uses <= {"arith.extsi", "tt.addptr"}, f"{name}: its row program id feeds {sorted(uses)}"


def test_unshuffle_backward_pipelines_its_loop(codegen):
    # stages 3: the tiles' loads are issued as cp.async ahead of their use; one stage: plain loads
    assert codegen["_unshuffle_bwd_kernel[stages3]"]["cp_async"] > 0
    assert codegen["_unshuffle_bwd_kernel"]["cp_async"] == 0
