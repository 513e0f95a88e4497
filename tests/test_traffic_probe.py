"""traffic_probe.py: the count is exact on a known kernel, leaves GEMMs out, and ranks a real change."""

from __future__ import annotations

import pytest
import torch

from benchmarks.traffic_probe import counting_fused_bytes, probe


def _compiled(fn, *args):
    torch._dynamo.reset()
    with counting_fused_bytes() as counts:
        torch.compile(fn, dynamic=False)(*args)
    torch._dynamo.reset()
    return counts


def test_counts_one_fused_kernel_reads_and_writes():
    """(x + 1) * 2 on 4096 fp32 values: one kernel, 16 KiB read and 16 KiB written."""
    counts = _compiled(lambda x: (x + 1) * 2, torch.randn(4096))
    assert counts == {"bytes": 2 * 4096 * 4, "kernels": 1}


def test_gemms_are_left_out():
    """mm(a, b) + 1: the matrix multiply is an extern kernel; only the add's bytes count."""
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    counts = _compiled(lambda a, b: torch.mm(a, b) + 1, a, b)
    assert counts == {"bytes": 2 * 64 * 64 * 4, "kernels": 1}


@pytest.mark.slow
def test_bf16_residual_stream_moves_fewer_bytes_per_image():
    """The tiny MAE, compiled under bf16 autocast: the bf16 stream moves fewer bytes per image."""
    out = probe("tiny", batch=64, gbps=1000.0, variants=["fm_compile", "fm_compile_bf16res"])["variants"]
    ref, low = out["fm_compile"], out["fm_compile_bf16res"]
    assert ref["per_image_bytes"] > 0 and ref["kernels"] > 10
    assert low["per_image_bytes"] < 0.95 * ref["per_image_bytes"]
    assert low["bytes_vs_fm_compile"] == low["bytes_at_batch"] / ref["bytes_at_batch"] < 1.0
    assert ref["predicted_ms"] == pytest.approx(ref["bytes_at_batch"] / 1e9)  # at 1000 GB/s
