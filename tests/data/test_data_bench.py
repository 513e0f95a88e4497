"""benchmarks/bench_data.py --smoke: the harness runs end to end and writes its JSON record."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_data.py"


def test_bench_data_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_data", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "data.json"
    bench.main(
        ["--smoke", "--root", str(tmp_path / "jpegs"), "--workers", "1", "--dali-threads", "1", "--out", str(out)]
    )
    record = json.loads(out.read_text())
    assert record["env"]["git"]["commit"] and record["env"]["command"]
    assert record["dataset"]["n_images"] == 48
    rates = {r["backend"]: r.get("img_per_s") for r in record["results"] if "skipped" not in r}
    assert rates.get("torch", 0) > 0 and rates.get("synthetic", 0) > 0, record["results"]
    assert all("error" not in r for r in record["results"]), record["results"]
