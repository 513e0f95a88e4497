"""traffic_probe.py: the count is exact on a known kernel, leaves GEMMs out, and ranks a real change."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.traffic_probe import counting_fused_bytes


def _compiled(fn, *args):
    torch._dynamo.reset()
    with counting_fused_bytes() as counts:
        torch.compile(fn, dynamic=False)(*args)
    torch._dynamo.reset()
    return counts


def test_counts_one_fused_kernel_reads_and_writes():
    """(x + 1) * 2 on 4096 fp32 values: one kernel, 16 KiB read and 16 KiB written."""
    counts = _compiled(lambda x: (x + 1) * 2, torch.randn(4096))
    assert (counts["bytes"], counts["kernels"]) == (2 * 4096 * 4, 1)
    assert counts["per_kernel"] == [("fused_add_mul", 2 * 4096 * 4)]  # named by the aten ops it fuses


def test_gemms_are_left_out():
    """mm(a, b) + 1: the matrix multiply is an extern kernel; only the add's bytes count."""
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    counts = _compiled(lambda a, b: torch.mm(a, b) + 1, a, b)
    assert (counts["bytes"], counts["kernels"]) == (2 * 64 * 64 * 4, 1)


def test_per_image_and_fixed_bytes_from_two_batches(monkeypatch):
    """probe()'s arithmetic on a stand-in count (3 MB an image + 1 GB fixed): slope, rest, time, ratio."""
    from benchmarks import traffic_probe

    def fake_bytes(call):
        n = call()  # the stand-in step returns its batch
        return {"bytes": 3_000_000 * n + 1_000_000_000 * (2 if bf16[0] else 3), "kernels": 7}

    bf16 = [False]

    def variant_table(model_name):
        def build(low):
            return lambda: bf16.__setitem__(0, low) or torch.nn.Identity()

        table = {
            "fm_compile": ("compiled", build(False), "a"),
            "fm_compile_bf16res": ("compiled", build(True), "b"),
            "fm_ref": ("eager", build(False), "c"),
        }
        return None, table, lambda model, imgs, noise: lambda: imgs.shape[0], 8, 4

    monkeypatch.setattr(traffic_probe, "variant_table", variant_table)
    monkeypatch.setattr(traffic_probe, "step_bytes", fake_bytes)
    out = traffic_probe.probe("tiny", batch=100, gbps=2000.0, variants=["fm_compile", "fm_compile_bf16res"])
    ref, low = out["variants"]["fm_compile"], out["variants"]["fm_compile_bf16res"]
    assert ref["per_image_bytes"] == 3_000_000 and ref["fixed_bytes"] == 3_000_000_000
    assert ref["bytes_at_batch"] == 3.3e9 and ref["predicted_ms"] == pytest.approx(1.65)
    assert ref["bytes_at_batches"] == {"2": 3_006_000_000, "6": 3_018_000_000} and ref["kernels"] == 7
    assert low["bytes_vs_fm_compile"] == pytest.approx(2.3 / 3.3)
    with pytest.raises(ValueError, match="fm_ref is an eager variant"):
        traffic_probe.probe("tiny", batch=1, gbps=1.0, variants=["fm_ref"])


@pytest.mark.slow
def test_bf16_residual_stream_moves_fewer_bytes():
    """The tiny MAE's real compiled step (bf16 autocast, batch 2): the bf16 stream moves fewer bytes.
    (One batch: every kernel is a g++ build on a cold cache, ~30 s a variant.)"""
    from benchmarks.memory_probe import variant_table
    from benchmarks.traffic_probe import step_bytes

    _, table, step_fn, img, L = variant_table("tiny")
    gen = torch.Generator().manual_seed(0)
    imgs, noise = torch.randn(2, 3, img, img, generator=gen), torch.rand(2, L, generator=gen)
    ref = step_bytes(step_fn(table["fm_compile"][1](), imgs, noise))
    low = step_bytes(step_fn(table["fm_compile_bf16res"][1](), imgs, noise))
    assert ref["kernels"] > 50 and ref["bytes"] > 0
    assert low["bytes"] < 0.95 * ref["bytes"]


def test_top_kernels_by_fused_ops():
    """Per-name totals at the two batches, extrapolated like the step's; repeated names summed."""
    from benchmarks.traffic_probe import top_kernels

    def counts(n):  # batch n: a per-block norm (2 calls, 10 B an image each) and a fixed-size cast
        return {"per_kernel": [("fused_layer_norm", 10 * n), ("fused_layer_norm", 10 * n), ("fused_to_copy", 500)]}

    rows = top_kernels([counts(2), counts(6)], batch=100, top=5)
    assert [(r["kernel"], r["calls"]) for r in rows] == [("fused_layer_norm", 2), ("fused_to_copy", 1)]
    assert rows[0]["per_image_bytes"] == 20 and rows[0]["bytes_at_batch"] == 2000
    assert rows[1]["per_image_bytes"] == 0 and rows[1]["bytes_at_batch"] == 500
    assert len(top_kernels([counts(2), counts(6)], batch=100, top=1)) == 1


def test_variant_suffixes_in_either_order():
    from benchmarks.traffic_probe import parse_variant

    assert parse_variant("fm_compile_selective") == ("fm_compile_selective", False, False)
    assert parse_variant("fm_compile_selective_fused_tattn") == ("fm_compile_selective", True, True)
    assert parse_variant("fm_compile_tattn_fused") == ("fm_compile", True, True)
    assert parse_variant("fm_compile_bf16res_fused") == ("fm_compile_bf16res", False, True)


GLUE_SCRIPT = r"""
import contextlib, importlib, json

import torch

from benchmarks.memory_probe import variant_table
from benchmarks.traffic_probe import fastmae_ops_opaque, step_bytes

_, table, step_fn, img, L = variant_table("tiny")
gen = torch.Generator().manual_seed(0)
imgs, noise = torch.randn(2, 3, img, img, generator=gen), torch.rand(2, L, generator=gen)
report = {}
for fused in (False, True):
    model = table["fm_compile"][1]()
    model.fused = fused
    call, losses = step_fn(model, imgs, noise), []
    with fastmae_ops_opaque() if fused else contextlib.nullcontext():
        counts = step_bytes(lambda: losses.append(call()) or losses[-1])
    report[str(fused)] = {"loss": losses[0].item(), **counts}
mse = importlib.import_module("fastmae.kernels.masked_mse")
report["swapped_back"] = mse._masked_mse._backend_fns["cpu"] is mse._masked_mse._backend_fns[None]
print(json.dumps(report))
"""


@pytest.mark.slow
def test_fused_variant_counts_the_glue_around_fastmaes_ops():
    """The tiny MAE's compiled step with fastmae's ops on, each one opaque call: the same loss as
    the reference path's compiled step, and none of the kernels inductor generates computes what the
    ops compute (the norm-pix loss's pow / var, the unshuffle's cat + scatter grad), where the
    reference path's do; the CPU implementations are swapped back afterwards. In a subprocess: the
    test bed's TRITON_INTERPRET=1 builds interpreter kernels, which compile cannot trace."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", GLUE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ref, fast = report["False"], report["True"]
    replaced = ("pow", "var", "scatter", "cat")
    hits = {
        k: [n for n, _ in r["per_kernel"] if any(op in n for op in replaced)]
        for k, r in report.items()
        if k != "swapped_back"
    }
    assert fast["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert hits["False"] and not hits["True"], hits["True"]
    assert fast["kernels"] < ref["kernels"] and fast["bytes"] < ref["bytes"]
    assert report["swapped_back"]
