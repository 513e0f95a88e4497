"""memory_probe.py on the tiny model: both counts run, and the table renders (a smoke test, CPU)."""

from __future__ import annotations

from benchmarks.memory_probe import markdown, probe


def test_probe_counts_eager_and_compiled_and_renders():
    variants = ["hf_eager", "fm_ref", "fm_compile", "fm_compile_selective"]
    out = probe("tiny", batch=64, variants=variants)
    v = out["variants"]
    assert list(v) == variants
    for r in v.values():
        assert r["per_image_bytes"] > 0 and r["predicted_peak_bytes"] > out["state_bytes"]
    # every ratio is against HF eager's predicted peak (not, say, each variant's own)
    ref = v["hf_eager"]["predicted_peak_bytes"]
    assert all(r["peak_vs_hf_eager"] == r["predicted_peak_bytes"] / ref for r in v.values())
    assert v["fm_ref"]["peak_vs_hf_eager"] < 1.0
    # the compiled partition honours selective checkpointing (it saves less per image)
    assert v["fm_compile_selective"]["per_image_bytes"] < 0.8 * v["fm_compile"]["per_image_bytes"]
    table = markdown({"batch": 64, "models": {"tiny": out}})
    assert table.count("\n") == 1 + len(variants) and "`fm_compile_selective`" in table
