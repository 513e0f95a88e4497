"""report.py: the trainer line (the loop's steady img/s against the step harness's fm_fast), the
memory check, the launch sweep's tables."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import chart, report


def test_trainer_against_the_harness(tmp_path: Path):
    metrics = tmp_path / "train_metrics.jsonl"
    rows = [
        {"step": 10 * (i + 1), "loss": 1.0, "img_s": s, "max_mem_gib": 10.0 + i}
        for i, s in enumerate([150.0, 3900.0, 4100.0, 4000.0])
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    step = tmp_path / "step.json"
    fm_fast = {"img_s": 4000.0, "batch": 256}
    step.write_text(
        json.dumps(
            {"benchmark": "bench_step", "settings": [{"model": "vit_base_patch16", "variants": {"fm_fast": fm_fast}}]}
        )
    )

    text = report.markdown(report.load([step, metrics])).split("\n\n")[-1]
    # the first interval (compile) is left out: the median of 3900, 4000, 4100
    assert (
        "median 4000 img/s over 3 log intervals (the first, with the compile, left out), peak allocated 13.00 GiB"
        in text
    )
    assert "1.000x the harness's `fm_fast` (vit_base_patch16, batch 256: 4000 img/s)" in text


def test_trainer_compared_with_its_own_model_only(tmp_path: Path):
    """Two harness settings (ViT-B and ViT-L): the config line device.sh writes first picks the one the
    trainer ran; without it, no ratio is given rather than one against the wrong model."""
    rows = [{"step": 10 * (i + 1), "img_s": s} for i, s in enumerate([100.0, 5000.0, 5000.0])]
    config = {"config": {"preset": "mae_vit_base_patch16", "batch_size": 256}}
    step = {
        "benchmark": "bench_step",
        "settings": [
            {"model": m, "variants": {"fm_fast": {"img_s": s, "batch": 256}}}
            for m, s in (("vit_base_patch16", 5000.0), ("vit_large_patch16", 2500.0))
        ],
    }
    with_config = tmp_path / "with.jsonl"
    with_config.write_text("".join(json.dumps(r) + "\n" for r in [config, *rows]))
    (rep,) = report.load([with_config])
    text = report.train_markdown(rep, [step])
    assert "1.000x the harness's `fm_fast` (vit_base_patch16, batch 256" in text
    assert "vit_large_patch16" not in text
    # a config.json that says what ran (fastmae writes it since 2026-11-28): named in the heading
    ran = {"device_name": "NVIDIA H200", "torch": "2.11.0", "git": {"commit": "abcdef1234567", "dirty": False}}
    config["config"]["resolved"] = {"environment": ran}
    with_config.write_text("".join(json.dumps(r) + "\n" for r in [config, *rows]))
    (rep,) = report.load([with_config])
    text = report.train_markdown(rep, [step])
    assert "mae_vit_base_patch16, batch 256; NVIDIA H200, torch 2.11.0; commit abcdef123456)" in text
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (rep,) = report.load([bare])
    text = report.train_markdown(rep, [step])
    assert "median 5000 img/s" in text and "x the harness" not in text and "not compared" in text


def test_trainer_with_too_few_intervals(tmp_path: Path):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text(json.dumps({"step": 10, "img_s": 12.0}) + "\n")
    (rep,) = report.load([metrics])
    assert "nothing to compare" in report.train_markdown(rep, [rep])


PROBE_PATH = Path(report.__file__).parent / "results" / "2026-11-27_cpu_activation_memory.json"


def _vit_b_step(variants: dict) -> dict:
    """A step report as a GPU run writes it (ViT-B, batch 256), with these variants' records."""
    return {
        "benchmark": "bench_step",
        "settings": [{"model": "vit_base_patch16", "batch": 256, "params": 111907840, "variants": variants}],
    }


def test_measured_memory_against_the_cpu_count():
    probe = json.loads(PROBE_PATH.read_text())
    vb = probe["models"]["vit_base_patch16"]
    # A step report as a GPU run writes it: each variant's largest in-step rise of allocated memory.
    fm_fast_counted = (
        vb["variants"]["fm_compile"]["per_image_bytes"] * 256 + vb["variants"]["fm_compile"]["const_bytes"]
    )
    step = _vit_b_step(
        {
            "fm_fast": {"memory": {"step_rise_bytes": 1.1 * (fm_fast_counted + 4 * 111907840)}},
            "fm_fast_cg": {"memory": {"step_rise_bytes": 1.0}},  # any fast variant maps to fm_compile
            "hf_eager": {"status": "oom"},  # no measurement: no row
        }
    )
    md = report.markdown([step, {**probe, "_path": str(PROBE_PATH)}])
    rows = [line for line in md.splitlines() if line.startswith("| `vit_base_patch16`")]
    assert len(rows) == 2
    assert rows[0].startswith("| `vit_base_patch16` | `fm_fast` | `fm_compile` | 256 |") and rows[0].endswith(
        "| 1.10 |"
    )
    assert "`fm_fast_cg` | `fm_compile`" in rows[1]


def test_memory_check_follows_the_checkpointing_the_run_recorded():
    """fm_fast runs auto checkpointing: selective on CUDA. The run records what auto became, and the
    check compares with that count, not with the name's old meaning (none)."""
    probe = json.loads(PROBE_PATH.read_text())
    variants = probe["models"]["vit_base_patch16"]["variants"]
    step = _vit_b_step(
        {
            "fm_fast": {"activation_checkpointing": "selective", "memory": {"step_rise_bytes": 1.0}},
            "fm_fast_no_ac": {"activation_checkpointing": "none", "memory": {"step_rise_bytes": 1.0}},
            "fm_fast_gelu": {"memory": {"step_rise_bytes": 1.0}},  # an older run: the name says it
            "fm_fast_bf16res": {
                "activation_checkpointing": "selective",
                "residual_dtype": "autocast",
                "memory": {"step_rise_bytes": 1.0},
            },
        }
    )
    assert {"fm_compile_selective", "fm_compile", "fm_compile_gelu", "fm_compile_selective_bf16res"} <= set(variants)
    md = report.markdown([step, {**probe, "_path": str(PROBE_PATH)}])
    assert "| `fm_fast` | `fm_compile_selective` |" in md
    assert "| `fm_fast_no_ac` | `fm_compile` |" in md
    assert "| `fm_fast_gelu` | `fm_compile_gelu` |" in md
    assert "| `fm_fast_bf16res` | `fm_compile_selective_bf16res` |" in md


def test_sweep_table_per_pass():
    """The sweep's rule against its fastest configuration, then each pass's fastest: a configuration
    per pass pays when their sum beats the fastest single configuration's fwd+bwd."""

    def row(rows, order, fwd, bwd, default=False):
        t = lambda ms: {"ms": ms, "gbps": 1.0, "pct_of_copy": 10 / ms}  # noqa: E731
        return {"op": "masked_mse", "rows": rows, "warps": 8, "order": order, "default": default,
                "fwd+bwd": t(fwd + bwd), "fwd": t(fwd), "bwd": t(bwd)}  # fmt: skip

    rows = [row(4, "image", 0.05, 0.14, default=True), row(4, "gather", 0.08, 0.06), row(2, "image", 0.04, 0.16)]
    lines = report.sweep_markdown({"rows": rows}).splitlines()
    assert "| masked_mse | 4x8 | 0.1900 | 53% | 4x8, gather order | 0.1400 | 71% | 1.36 |" in lines
    # fwd: 2x8 image (0.04); bwd: 4x8 gather (0.06); sum 0.10 against the fastest single 0.14
    assert lines[-1] == "| masked_mse | 2x8 | 0.0400 | 250% | 4x8, gather order | 0.0600 | 167% | 0.1000 | 1.40 |"
    # an op swept without its passes alone (patch_gather: no backward) has no per-pass row
    only = [{"op": "patch_gather", "rows": 8, "warps": 4, "default": True, "fwd+bwd": rows[0]["fwd+bwd"]}]
    assert "Each pass" not in report.sweep_markdown({"rows": only})


def _step_report(when: str, variants: dict[str, float]) -> dict:
    return {
        "benchmark": "bench_step",
        "timings_meaningful": True,
        "env": {"device": {"name": "GPU"}, "git": {"commit": "abc1234", "dirty": False}, "date_utc": when},
        "settings": [{"model": "vit", "batch": 8, "variants": {n: {"img_s": v} for n, v in variants.items()}}],
    }


def test_bar_chart_panels_share_one_axis(tmp_path: Path):
    """The same img/s is the same bar length in every panel (each panel was scaled to its own
    maximum: HF eager at 3473 img/s drew 474 px in one panel and 457 in the next)."""
    from PIL import Image

    reports = [
        _step_report("2026-11-27T20:58:00", {"hf_eager": 1000.0, "fm_fast": 2000.0}),
        _step_report("2026-11-27T21:00:00", {"hf_eager": 1000.0, "fm_fast_x": 1500.0}),
    ]
    png = report.bar_chart(reports, tmp_path / "chart.png")
    img = Image.open(png).convert("RGB")
    grey = (150, 150, 150)  # hf_ bars

    def longest_grey_run(y: int) -> int:
        best = run = 0
        for x in range(img.width):
            run = run + 1 if img.getpixel((x, y)) == grey else 0
            best = max(best, run)
        return best

    rows = [(y, longest_grey_run(y)) for y in range(img.height)]
    lengths = []  # (last row, bar length) per bar: rows of a run of >= 20 px, contiguous in y
    for y, run in rows:
        if run >= 20:
            if lengths and lengths[-1][0] == y - 1:
                lengths[-1] = (y, run)
            else:
                lengths.append((y, run))
    assert len(lengths) == 2 and lengths[0][1] == lengths[1][1] > 0
    assert chart.ticks(5370) == [0, 1000, 2000, 3000, 4000, 5000, 6000]
    assert chart.run_label(reports[0]) != chart.run_label(reports[1])  # two runs of one commit told apart
