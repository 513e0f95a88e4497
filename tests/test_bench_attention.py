"""bench_attention.py's plumbing on CPU (a smoke run: every backend tried, timings meaningless)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_attention
from benchmarks import report as report_md
from fastmae.attention import attention_math
from tests.helpers import rel_err


def test_shapes_are_the_steps_two_calls():
    dec, enc = bench_attention.shapes("vit_base_patch16", bench_attention.MODELS["vit_base_patch16"], 256, 0.75)
    assert (enc["N"], enc["H"], enc["Dh"]) == (1 + 49, 12, 64)  # cls + the kept quarter of 196
    assert (dec["N"], dec["H"], dec["Dh"]) == (1 + 196, 16, 32)
    huge = bench_attention.shapes("vit_huge_patch14", bench_attention.MODELS["vit_huge_patch14"], 8, 0.75)
    assert (huge[1]["N"], huge[1]["Dh"], huge[0]["N"]) == (1 + 64, 80, 1 + 256)
    assert bench_attention.flops(enc, "fwd+bwd") == 3 * 4 * 256 * 12 * 50**2 * 64
    assert (enc["calls_per_step"], dec["calls_per_step"]) == (12, 8)
    t = 256 * 50 * 12 * 64 * 2  # one (B, N, H, Dh) bf16 tensor
    assert bench_attention.min_bytes(enc, "fwd", 2) == 4 * t + 256 * 12 * 50 * 4
    assert bench_attention.min_bytes(enc, "fwd+bwd", 2) == 12 * t + 2 * 256 * 12 * 50 * 4


def test_report_names_the_fastest_call_and_its_step_saving():
    def rec(ms):
        return {"status": "done", "fwd": {"ms": ms / 3}, "fwd+bwd": {"ms": ms, "tflops": 1.0}, "kernels": ["k"]}

    row = {"model": "m", "part": "decoder", "B": 2, "N": 197, "H": 16, "Dh": 32, "calls_per_step": 8}
    report = {
        "results": [
            {
                **row,
                "impls": {"sdpa": rec(0.5), "triton": rec(0.3), "math": rec(0.9), "xformers": {"status": "skipped"}},
            },
            {**row, "part": "encoder", "calls_per_step": 12, "impls": {"sdpa": rec(0.2)}},
        ]
    }
    best = report_md.attention_best(report)
    assert [(b["part"], b["impl"]) for b in best] == [("decoder", "triton"), ("encoder", "sdpa")]
    assert best[0]["step_ms_saved"] == pytest.approx(8 * 0.2) and best[1]["step_ms_saved"] == 0
    md = report_md.attention_markdown({**report, "env": {}})
    assert "- m decoder: `triton` 0.300 ms vs sdpa 0.500 ms; x 8 calls a step = +1.60 ms of the step" in md
    assert "| m | decoder | 2×16×197×32 | triton | 0.100 | 0.300 | 1 | – | 1.67 | k |" in md
    assert "†" not in md
    # a fwd+bwd that fell back to host timing (the H200's, 2026-11-27) is marked, and so is its verdict
    decoder = report["results"][0]["impls"]
    decoder["triton"]["fwd+bwd"]["timer"] = "do_bench"
    md = report_md.attention_markdown({**report, "env": {}})
    assert "| m | decoder | 2×16×197×32 | triton | 0.100 | 0.300† | 1 | – | 1.67 | k |" in md
    assert "launch overhead in" in md
    # the verdict compares only rows timed as sdpa's: the host-timed triton row is left out
    assert report_md.attention_best(report)[0]["impl"] == "sdpa"
    for impl in ("sdpa", "math"):
        decoder[impl]["fwd+bwd"]["timer"] = "do_bench"
    md = report_md.attention_markdown({**report, "env": {}})
    assert "+1.60 ms of the step († host-timed: not a GPU-time comparison)" in md
    assert md.count("host-timed") == 1  # the encoder's verdict is clean
    assert "not measurements" not in md
    assert "not measurements" in report_md.attention_markdown({**report, "env": {}, "smoke": True})


def test_smoke_run_records_every_backend(tmp_path):
    out = tmp_path / "attention.json"
    report = bench_attention.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["complete"] is True
    assert [r["part"] for r in report["results"]] == ["decoder", "encoder"]
    for row in report["results"]:
        impls = row["impls"]
        assert set(impls) == {
            "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "hf_layout", "sdpa_pad64",
            "math", "math_compiled", "xformers", "triton",
        }  # fmt: skip
        # these run on a CPU (the Triton kernel under the test bed's interpreter)
        for name in ("sdpa", "sdpa_math", "hf_layout", "sdpa_pad64", "math", "triton"):
            rec = impls[name]
            assert rec["status"] == "done", (name, rec)
            assert rec["max_abs_err_vs_fp32_math"] < 1e-5  # fp32 on CPU: the same attention
            assert rec["fwd+bwd"]["ms"] > 0 and rec["kernels"] and rec["fwd+bwd"]["pct_of_copy"] > 0
        assert impls["xformers"]["status"] == "skipped"
        # a kernel that cannot take these tensors on this device is a recorded result, not a crash
        assert impls["sdpa_cudnn"]["status"] in ("error", "done")
    assert "| smoke | decoder |" in report_md.markdown([report])


@pytest.mark.parametrize("config", bench_attention.TRITON_CONFIGS, ids=bench_attention.triton_config_name)
@pytest.mark.parametrize("N, Dh", [(197, 32), (50, 64)])
def test_each_timed_triton_tiling_is_right(config, N, Dh):
    """Every tiling the GPU run times, under the interpreter at MAE's two token counts: no
    configuration is timed that computes something else."""
    g = torch.Generator().manual_seed(N + Dh)
    qkv = torch.randn(1, N, 3, 1, Dh, generator=g).bfloat16().requires_grad_()
    grad_out = torch.randn(1, N, Dh, generator=g).bfloat16()
    fn = bench_attention.triton_with_config(config)
    with fn.launch_context():  # the backward reads the tiling when autograd runs it
        out = fn(qkv)
        (grad,) = torch.autograd.grad(out, qkv, grad_out)
    ref_in = qkv.detach().float().requires_grad_()
    ref = attention_math(ref_in)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, grad_out.float())
    low_in = qkv.detach().requires_grad_()
    low = attention_math(low_in)
    (low_grad,) = torch.autograd.grad(low, low_in, grad_out)
    assert rel_err(out, ref) <= 2 * rel_err(low, ref)
    assert rel_err(grad, ref_grad) <= 3 * rel_err(low_grad, ref_grad)


def test_a_tilings_backward_is_timed_with_it(monkeypatch):
    """run_shape times forward + backward inside the tiling's launch context: the backward, which
    reads the launch configuration when autograd runs it, gets the tiling's blocks (16 x 32 here),
    not the rule's 64 x 64."""
    import importlib

    module = importlib.import_module("fastmae.kernels.attention")
    blocks = []
    tail = module._tail
    monkeypatch.setattr(module, "_tail", lambda N, block, tails: blocks.append(block) or tail(N, block, tails))
    config = (None, None, None, 16, 32, None, None, None)
    shape = {"B": 1, "N": 20, "H": 1, "Dh": 16, "calls_per_step": 1}
    calls = {"t": bench_attention.triton_with_config(config)}
    row = bench_attention.run_shape(shape, calls, "cpu", torch.float32, smoke=True)
    assert row["impls"]["t"]["status"] == "done", row
    assert {16, 32} <= set(blocks) and set(blocks) <= {16, 32, 64}


def test_no_graph_is_alive_when_a_call_is_timed(monkeypatch):
    """Every output made before a timing is gone by then: one kept with its graph holds the leaves'
    AccumulateGrad nodes on the default stream, and on CUDA each fwd+bwd capture fails (the H200's
    did on 2026-11-27: its rows fell back to host timing, launch overhead included)."""
    import gc
    import weakref

    made: list[weakref.ref] = []
    alive = []

    def call(qkv):
        out = attention_math(qkv)
        made.append(weakref.ref(out))
        return out

    def timed(fn, device, smoke):
        gc.collect()
        alive.append(sum(r() is not None for r in made))
        fn()
        return {"ms": 1.0, "timer": "stand-in"}

    monkeypatch.setattr(bench_attention, "time_call", timed)
    shape = {"B": 1, "N": 8, "H": 2, "Dh": 16, "calls_per_step": 1}
    row = bench_attention.run_shape(shape, {"m": call}, "cpu", torch.float32, smoke=True)
    assert row["impls"]["m"]["status"] == "done", row
    assert alive == [0, 0]  # fwd and fwd+bwd


def test_triton_config_names():
    assert bench_attention.triton_config_name((64, 128, 4) + (None,) * 5) == "triton[fwd 64x128 w4]"
    assert bench_attention.triton_config_name((None,) * 6 + (3, None)) == "triton[stages 3]"
    assert bench_attention.triton_config_name((None,) * 3 + (64, 64, 8, None, True)) == "triton[bwd 64x64 w8, tails]"
    names = [bench_attention.triton_config_name(c) for c in bench_attention.TRITON_CONFIGS]
    assert len(set(names)) == len(names)
