"""The step benchmark's harness, end to end on a tiny model (CPU: a smoke test, timings meaningless).

Also: its FLOP count against PyTorch's own FLOP counter on the model's real operations, and the
largest-batch search against a fake memory limit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common, report, step_catalogue, step_variants
from fastmae.model import MaskedAutoencoderViT

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *argv: str) -> tuple[dict, Path, Path]:
    """The harness as users run it, in a process of its own.

    (In-process, it once crashed inside torch's dispatcher on a fastmae:: op in about half of the
    runs: transformers' probe for the kernel hub imported ``kernels/`` a second time as a top-level
    package and re-registered the ops, freeing the first registration. Fixed in
    ``kernels/__init__.py``; ``tests/kernels/test_one_registration.py`` holds it.)
    """
    out, table, plot = tmp_path / "step.json", tmp_path / "step.md", tmp_path / "step.png"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_step.py"), "--tiny", *argv]
    cmd += ["--out", str(out), "--table", str(table), "--plot", str(plot)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), table, plot


def test_smoke_tiny_end_to_end(tmp_path: Path):
    rep, table, plot = _run(
        tmp_path, "--variants", "hf_eager", "fm_ref", "fm_fused_eager", "fm_fast", "--profile", "fm_ref", "fm_fast"
    )

    env = rep["env"]
    assert env["git"]["commit"] and env["command"].count("--tiny") == 1
    for pkg in ("torch", "triton", "transformers"):
        assert env["versions"][pkg]
    assert rep["ceilings"]["gemm"]["tflops"] > 0 and rep["ceilings"]["copy"]["gbps"] > 0
    assert rep["tiny"] is True and rep["timings_meaningful"] is False

    (setting,) = rep["settings"]
    assert setting["status"] == "done" and setting["model"] == "tiny" and setting["batch"] == 4
    assert setting["flops_per_image"]["train"] == 3 * setting["flops_per_image"]["forward"] > 0
    variants = setting["variants"]
    for name in ("hf_eager", "fm_ref", "fm_fused_eager"):
        v = variants[name]
        assert v["status"] == "ok", (name, v.get("reason"), v.get("traceback"))
        assert v["img_s"] > 0 and v["step_ms"]["n"] == rep["config"]["rounds"] * rep["config"]["steps"]
        assert v["step_ms"]["p10"] <= v["step_ms"]["median"] <= v["step_ms"]["p90"]
        assert v["check"]["ok"], (name, v["check"])
        assert v["mfu_vs_measured_gemm"] > 0 and v["speedup_vs_hf_eager"] > 0
    # fp32 on CPU: the same function to rounding, far inside the bf16 tolerances
    assert variants["fm_fused_eager"]["check"]["pred_rel_err"] < 1e-4
    assert variants["hf_eager"]["speedup_vs_hf_eager"] == 1.0
    if not torch.cuda.is_available():
        assert variants["fm_fast"]["status"] == "skipped" and "CUDA" in variants["fm_fast"]["reason"]

    # --profile: the variant that ran is profiled (CPU: aten ops), the one that did not is left alone
    prof = variants["fm_ref"]["profile"]
    assert prof["steps"] == 3 and prof["kernel_ms_per_step"] > 0 and prof["by_category_ms"]["gemm"] > 0
    assert 0 < prof["busy_fraction"] and prof["top"][0]["ms_per_step"] >= prof["top"][-1]["ms_per_step"]
    assert "profile" not in variants["fm_fast"] and "profile" not in variants["hf_eager"]

    md = table.read_text()
    assert "| `fm_fused_eager` |" in md and "not measurements" in md
    assert "- **fm_ref**: " in md and "aten ops (CPU) per step" in md
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(plot) as im:
        assert im.width > 500 and im.height > 100


def test_smoke_tiny_largest_batch(tmp_path: Path):
    """``--batch 2 max``: the search runs (to the tiny cap on CPU, where nothing runs out of memory)."""
    rep, table, _ = _run(
        tmp_path, "--variants", "fm_ref", "--batch", "2", "max", "--no-ceilings", "--rounds", "1", "--steps", "1"
    )
    fixed, largest = rep["settings"]
    assert fixed["batch"] == 2 and largest["batch"] == "max"
    for v in largest["variants"].values():
        assert v["status"] == "ok" and v["batch"] == 8 and v["max_batch_tries"][-1] == [8, True]
        assert v["compile_s"] is None and "check" not in v
    assert "batch max" in table.read_text()


def test_largest_batch_out_of_time_is_skipped_not_oom(tmp_path: Path):
    """A search the time budget left no room for tried nothing: "skipped", not "oom"."""
    rep, _, _ = _run(tmp_path, "--variants", "fm_ref", "--batch", "4", "max", "--no-ceilings",
                     "--time-budget", "3", "--timing-reserve", "2.9")  # fmt: skip
    (largest,) = [s for s in rep["settings"] if s["batch"] == "max"]
    v = largest["variants"]["fm_ref"]
    assert v["status"] == "skipped" and v["reason"] == "time budget (no batch size tried)", v


def test_flop_count_matches_the_model_ops():
    """The shape-derived count = PyTorch's FLOP counter on the reference path's forward (math attention).

    The reference path embeds every patch (a conv over the whole image), so the counter sees the
    useful forward work plus ``patch_embed_masked_extra``.
    """
    kw = step_variants.model_kwargs("tiny")
    model = MaskedAutoencoderViT(**kw, norm_pix_loss=True, attn_backend="math")
    flops = step_variants.train_flops_per_image(kw)
    n = 3
    imgs, noise = torch.randn(n, 3, kw["img_size"], kw["img_size"]), torch.rand(n, flops["L"])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(imgs, 0.75, noise)
    assert counter.get_total_flops() == n * (flops["forward"] + flops["patch_embed_masked_extra"])


def test_flop_count_vit_b_by_hand():
    f = step_variants.train_flops_per_image(step_variants.model_kwargs("vit_base_patch16"))
    assert (f["L"], f["K"]) == (196, 49)
    enc = 12 * (24 * 50 * 768**2 + 4 * 50**2 * 768)
    dec = 8 * (24 * 197 * 512**2 + 4 * 197**2 * 512)
    rest = 2 * 49 * 768 * 768 + 2 * 50 * 768 * 512 + 2 * 197 * 512 * 768
    assert f["forward"] == enc + dec + rest
    assert 55e9 < f["train"] < 60e9


@pytest.mark.parametrize("predicted", [None, 200, 400])
def test_find_max_batch(predicted):
    limit = 300
    batch, tries = common.find_max_batch(lambda b: b <= limit, 64, 4096, 32, float("inf"), predicted)
    assert batch == 288 and all(ok == (b <= limit) for b, ok in tries)
    assert len(tries) <= 8


def test_find_max_batch_nothing_fits_and_deadline():
    assert common.find_max_batch(lambda b: False, 64, 4096, 32, float("inf"))[0] is None
    clock = iter(range(100))
    batch, tries = common.find_max_batch(lambda b: True, 64, 4096, 32, 2.5, clock=lambda: next(clock))
    assert batch == 256 and len(tries) == 3  # 64, 128, 256, then the deadline


def test_variant_groups():
    names = [v.name for v in step_catalogue.resolve_variants(["main", "fm_fast_cg,hf_eager"])]
    assert names[0] == "hf_eager" and names.count("hf_eager") == 1 and names[-1] == "fm_fast_cg"
    assert set(step_catalogue.GROUPS["main"]) <= set(names)
    with pytest.raises(SystemExit):
        step_catalogue.resolve_variants(["no_such_variant"])


def test_report_survives_missing_and_foreign_files(tmp_path: Path):
    foreign = tmp_path / "data.json"
    foreign.write_text(json.dumps({"benchmark": "bench_other", "images_per_s": 1.0}))
    reps = report.load([foreign, tmp_path / "missing.json"])
    text = report.markdown(reps)
    assert "bench_other" in text and "unreadable" in text
    assert report.bar_chart(reps, tmp_path / "none.png") is None


@pytest.mark.gpu
@pytest.mark.slow
def test_smoke_tiny_cuda_compiled(tmp_path: Path):
    """On a GPU: the compiled, fused and CUDA-graph variants run, check and report memory."""
    rep, _, _ = _run(tmp_path, "--variants", "hf_eager", "fm_fast", "fm_fast_cg", "--no-ceilings")
    variants = rep["settings"][0]["variants"]
    for name in ("hf_eager", "fm_fast", "fm_fast_cg"):
        v = variants[name]
        assert v["status"] == "ok", (name, v.get("reason"), v.get("traceback"))
        assert v["check"]["ok"], (name, v["check"])
        assert v["memory"]["peak_bytes"] > v["memory"]["state_bytes"] > 0
    assert variants["fm_fast"]["graph_breaks"] == 0


def test_fastmae_variants_share_the_base_parameters():
    """One parameter set and one optimizer serve every fastmae variant (memory, and equal weights)."""
    base = step_variants.build_base("tiny", torch.device("cpu"), seed=0)
    other = step_variants.fastmae_sharing(base, True, "math", residual_dtype="autocast")
    assert other.fused and other.attn_backend == "math" and other.residual_dtype == "autocast"
    assert base.residual_dtype == "float32"
    pairs = list(zip(base.named_parameters(), other.named_parameters(), strict=True))
    assert all(n1 == n2 and p1 is p2 for (n1, p1), (n2, p2) in pairs)
    assert not other.pos_embed.requires_grad


def test_compile_options_reach_torch_compile(monkeypatch):
    """The benchmark's own compile "modes" are inductor options on the default mode; real modes pass."""
    from benchmarks import step_variants as sv

    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: seen.append(kw) or module)
    m = torch.nn.Linear(2, 2)
    sv.compile_module(m, "coordinate-descent", fullgraph=True, backend="inductor")
    sv.compile_module(m, "reduce-overhead", fullgraph=True, backend="inductor")
    sv.compile_module(m, "default", fullgraph=False, backend="inductor")
    assert seen[0] == {"fullgraph": True, "dynamic": False, "options": {"coordinate_descent_tuning": True}}
    assert seen[1] == {"fullgraph": True, "dynamic": False, "mode": "reduce-overhead"}
    assert seen[2] == {"fullgraph": False, "dynamic": False, "mode": None}
    assert step_catalogue.VARIANTS["fm_fast_cdt"].compile == "coordinate-descent"
    assert "fm_fast_cdt" in step_catalogue.GROUPS["ablations"]


def test_compile_options_exist_or_the_variant_is_skipped(monkeypatch):
    """Each benchmark compile mode names options this torch's inductor has (config.patch would raise
    mid-run otherwise); a torch without one skips the variant with the option's name."""
    import argparse

    import torch._inductor.config as inductor_config

    from benchmarks import step_variants as sv

    assert all(not sv.missing_compile_options(mode) for mode in sv.COMPILE_OPTIONS)
    for mode in sv.COMPILE_OPTIONS:  # the options patch inductor's config as torch.compile would
        with inductor_config.patch(sv.COMPILE_OPTIONS[mode]):
            pass
    v = step_catalogue.VARIANTS["fm_fast_mix128"]
    assert v.compile == "mix-order-split-128" and v.name in step_catalogue.GROUPS["main"]
    args = argparse.Namespace(cpu_compile=True, compile_backend="inductor")
    assert sv.why_skip(v, torch.device("cuda"), args) is None
    # as on a torch from before the option (the device image's torch is older than this machine's)
    monkeypatch.setitem(sv.COMPILE_OPTIONS, "older", {"triton.mix_order_reduction": False, "triton.not_yet": 128})
    reason = sv.why_skip(dataclasses.replace(v, compile="older"), torch.device("cuda"), args)
    assert reason == "this torch's inductor has no option triton.not_yet"


def test_fastmae_is_also_compared_with_the_fastest_hf_compiled_step():
    """HF compiled with an SDPA kernel forced may beat HF compiled as it picks: the fair ratio is
    against the fastest HF compiled variant whose check passed."""
    vs = {
        "hf_eager": {"img_s": 1000.0},
        "hf_compile": {"img_s": 1200.0},
        "hf_compile_cudnn": {"img_s": 1300.0},
        "hf_compile_flash": {"img_s": 1400.0, "check": {"ok": False}},
        "fm_fast": {"img_s": 1560.0},
    }
    step_catalogue.ratios(vs)
    fm = vs["fm_fast"]
    assert fm["speedup_vs_hf_compile"] == pytest.approx(1.3)
    assert fm["speedup_vs_best_hf_compile"] == pytest.approx(1.2) and fm["best_hf_compile"] == "hf_compile_cudnn"
    assert "hf_compile_cudnn" in step_catalogue.GROUPS["main"]
