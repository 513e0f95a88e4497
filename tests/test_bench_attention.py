"""bench_attention.py's plumbing on CPU (a smoke run: every backend tried, timings meaningless)."""

from __future__ import annotations

import json

from benchmarks import bench_attention
from benchmarks import report as report_md


def test_shapes_are_the_steps_two_calls():
    dec, enc = bench_attention.shapes("vit_base_patch16", bench_attention.MODELS["vit_base_patch16"], 256, 0.75)
    assert (enc["N"], enc["H"], enc["Dh"]) == (1 + 49, 12, 64)  # cls + the kept quarter of 196
    assert (dec["N"], dec["H"], dec["Dh"]) == (1 + 196, 16, 32)
    huge = bench_attention.shapes("vit_huge_patch14", bench_attention.MODELS["vit_huge_patch14"], 8, 0.75)
    assert (huge[1]["N"], huge[1]["Dh"], huge[0]["N"]) == (1 + 64, 80, 1 + 256)
    assert bench_attention.flops(enc, "fwd+bwd") == 3 * 4 * 256 * 12 * 50**2 * 64


def test_smoke_run_records_every_backend(tmp_path):
    out = tmp_path / "attention.json"
    report = bench_attention.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["complete"] is True
    assert [r["part"] for r in report["results"]] == ["decoder", "encoder"]
    for row in report["results"]:
        impls = row["impls"]
        assert set(impls) == {
            "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "hf_layout", "sdpa_pad64",
            "math", "math_compiled", "xformers",
        }  # fmt: skip
        for name in ("sdpa", "sdpa_math", "hf_layout", "sdpa_pad64", "math"):  # these run on a CPU
            rec = impls[name]
            assert rec["status"] == "done", (name, rec)
            assert rec["max_abs_err_vs_fp32_math"] < 1e-5  # fp32 on CPU: the same attention
            assert rec["fwd+bwd"]["ms"] > 0 and rec["kernels"]
        assert impls["xformers"]["status"] == "skipped"
        # a kernel that cannot take these tensors on this device is a recorded result, not a crash
        assert impls["sdpa_cudnn"]["status"] in ("error", "done")
    assert "| smoke | decoder |" in report_md.markdown([report])
