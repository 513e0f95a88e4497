"""The kernel benchmark's harness runs end to end (tiny shapes; on CPU under the interpreter)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


def test_bench_kernels_smoke(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    out = tmp_path / "kernels.json"
    bench.main(["--smoke", "--no-compile", "--out", str(out)])

    report = json.loads(out.read_text())
    assert report["smoke"] is True
    for key in ("git_commit", "command", "torch", "triton", "device"):
        assert report["env"][key]
    assert report["copy"]["gbps"] > 0
    rows = {(r["op"], r["phase"]) for r in report["results"]}
    for op in ("patch_gather", "encoder_input", "unshuffle", "masked_mse"):
        assert (op, "fwd") in rows and (op, "fwd+bwd") in rows
    for op in ("encoder_input", "unshuffle", "masked_mse"):
        assert (op, "bwd") in rows
    for r in report["results"]:
        assert r["triton"]["ms"] > 0 and r["eager"]["ms"] > 0 and r["min_bytes"] > 0
        for impl in ("triton", "eager"):
            assert r[impl]["call_ms"] > 0 and r[impl]["timer"] == "perf_counter"  # CPU: the host's time
