"""The step profiler's summary: kernel names to categories, per-step totals, the busy fraction."""

from __future__ import annotations

import pytest
import torch

from benchmarks import profile_step
from benchmarks.profile_step import category, summarize

# Names as torch.profiler reports them on an H100 (cuBLAS, inductor, SDPA backends, the optimizer)
# and as aten ops on CPU.
NAMES = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel__5x_cublas": "gemm",
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN": "gemm",
    "triton_tem_fused_addmm_0": "gemm",
    "aten::addmm": "gemm",
    "aten::mm": "gemm",
    "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, cutlass::bfloat16_t>>": (
        "attention"
    ),
    "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_cga1x1x1_kernel0_0": (
        "attention"
    ),
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "_masked_mse_bwd_kernel": "fastmae kernels",
    "_unshuffle_fwd_kernel": "fastmae kernels",
    "_patch_gather_kernel": "fastmae kernels",
    "_attn_bwd_kernel": "attention",
    "_attn_fwd_kernel": "attention",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimizer",
    "triton_per_fused_native_layer_norm_7": "norm",
    "aten::native_layer_norm": "norm",
    "triton_poi_fused_add_gelu_3": "inductor fused",
    "Memcpy DtoD (Device -> Device)": "copy / memset",
    "aten::copy_": "copy / memset",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "other",
    "aten::gelu": "other",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_category(name):
    assert category(name) == NAMES[name]


def test_summarize_per_step_and_busy_fraction():
    rows = [("aten::mm", 6000.0, 6), ("_masked_mse_fwd_kernel", 300.0, 3), ("aten::gelu", 700.0, 30), ("idle", 0.0, 1)]
    s = summarize(rows, steps=3, step_ms=4.0, top=2)
    assert s["kernel_ms_per_step"] == pytest.approx(7000 / 1e3 / 3)
    assert s["by_category_ms"] == pytest.approx({"gemm": 2.0, "other": 0.7 / 3, "fastmae kernels": 0.1})
    assert list(s["by_category_ms"]) == ["gemm", "other", "fastmae kernels"]  # largest first
    assert sum(s["by_category_share"].values()) == pytest.approx(1.0)
    assert s["busy_fraction"] == pytest.approx(7.0 / 3 / 4.0)
    assert [t["name"] for t in s["top"]] == ["aten::mm", "aten::gelu"]
    assert s["top"][0]["calls_per_step"] == 2 and s["kernels_per_step"] == pytest.approx(13)
    assert "busy_fraction" not in summarize(rows, steps=3, step_ms=None)


def test_profile_steps_on_cpu_sees_the_matmuls():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    calls = []

    def step():
        calls.append(1)
        (a @ b).relu_()

    s = profile_step.profile_steps(step, steps=4, device=torch.device("cpu"), step_ms=10.0)
    assert len(calls) == 5  # one unprofiled warm-up step, then the profiled ones
    assert s["source"].startswith("aten ops") and s["steps"] == 4
    assert s["by_category_ms"]["gemm"] > 0
    assert {t["name"] for t in s["top"]} >= {"aten::mm"}
    assert "aten ops (CPU) per step" in profile_step.markdown("x", s)


def test_device_rows_leave_out_user_ranges():
    """A range on the device timeline (the optimizer's ``Optimizer.step#AdamW.step``) spans kernels that
    are counted themselves: it is not a kernel (it put 1 ms of nothing in "other" on the H200)."""
    from types import SimpleNamespace

    cuda = torch.autograd.DeviceType.CUDA

    def evt(key, us, annotation=None):
        e = SimpleNamespace(key=key, device_type=cuda, self_device_time_total=us, count=1)
        if annotation is not None:
            e.is_user_annotation = annotation
        return e

    events = [
        evt("nvjet_sm90_tst_256x128", 300.0),
        evt("Optimizer.step#AdamW.step", 1000.0),  # no flag (an older profiler): the name says it
        evt("my_range", 500.0, annotation=True),
        evt("multi_tensor_apply_kernel", 900.0, annotation=False),
    ]
    prof = SimpleNamespace(key_averages=lambda: events)
    rows = profile_step.device_rows(prof, torch.device("cuda"))
    assert [r[0] for r in rows] == ["nvjet_sm90_tst_256x128", "multi_tensor_apply_kernel"]


def test_aten_calls_name_what_the_host_dispatched():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)

    def step():
        lin(x).sum().backward()

    s = profile_step.profile_steps(step, steps=2, device=torch.device("cpu"))
    calls = {r["op"]: r for r in s["aten_calls"]}
    assert calls["aten::addmm"]["calls_per_step"] == 1
    assert "[4, 8]" in calls["aten::addmm"]["input_shapes"]
    assert not any(profile_step._QUIET_OPS.match(op) for op in calls)
