"""benchmarks/bench_data.py --smoke: the harness runs end to end and writes its JSON record."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks import report

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_data.py"


def test_bench_data_smoke(tmp_path):
    bench = _load_bench()
    out = tmp_path / "data.json"
    argv = ["--smoke", "--root", str(tmp_path / "jpegs"), "--workers", "1", "--dali-threads", "1", "--out", str(out)]
    bench.main([*argv, "--dali-decoders", "fancy,plain:0.9"])
    record = json.loads(out.read_text())
    assert record["env"]["git"]["commit"] and record["env"]["command"]
    assert record["dataset"]["n_images"] == 48
    rates = {r["backend"]: r.get("img_per_s") for r in record["results"] if "skipped" not in r}
    assert rates.get("torch", 0) > 0 and rates.get("synthetic", 0) > 0, record["results"]
    assert all("error" not in r for r in record["results"]), record["results"]
    # the torch loader's ready batches (1 worker x prefetch 2) are drained before timing
    assert [r["drained_batches"] for r in record["results"] if r["backend"] == "torch"] == [2]
    if bench.dali_available():  # one row per decoder setting, each named in the table
        dali = [r for r in record["results"] if r["backend"] == "dali"]
        assert [r["dali_options"] for r in dali] == [
            {"jpeg_fancy_upsampling": True},
            {"jpeg_fancy_upsampling": False, "hw_decoder_load": 0.9},
        ]
        assert all(r["img_per_s"] > 0 for r in dali)
        # the host's share of DALI's feed, timed alone: finite, and not slower than the whole loader
        assert all(r["host_feed_img_per_s"] > r["img_per_s"] for r in dali), dali
        # the feeding thread's CPU time is part of the feed's wall time
        assert all(0 < r["host_feed_thread_cpu_us_per_img"] <= r["host_feed_us_per_img"] for r in dali), dali
        assert "host feed alone" in report.data_markdown(record)
        assert [bench.data_row_name(r) for r in dali] == ["dali (fancy)", "dali (plain, hw 0.9)"]


@pytest.mark.parametrize("spec", ["fast", "plain:x", "fancy:1.5"])
def test_bad_dali_decoder_settings_are_named(spec):
    with pytest.raises(ValueError, match=f"DALI decoder setting '{spec}'"):
        _load_bench().dali_decoder_options(spec)


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_data", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_ready_batches_are_not_timed(monkeypatch):
    """Workers that decoded during the warm-up leave batches ready at once; draining them keeps
    them out of the windows. A fake clock: the first 5 batches take 1 ms (ready), then 1 s each."""
    import torch

    bench = _load_bench()
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def batches():
        for i in range(100):
            clock[0] += 1.0 if i >= 5 else 1e-3  # the warm-up batch and 4 ready ones: no decoding left
            yield torch.zeros(1, 3, 1, 1), None

    cpu = torch.device("cpu")
    steady = bench.measure(batches(), 8, cpu, warmup=1, steps=4, repeats=2, drain=4)
    assert steady["windows_img_per_s"] == pytest.approx([8.0, 8.0])  # the producers' own rate
    assert steady["drained_batches"] == 4
    burst = bench.measure(batches(), 8, cpu, warmup=1, steps=4, repeats=2, drain=0)
    assert burst["windows_img_per_s"] == pytest.approx([8000.0, 8.0])  # without: 4 ready batches in 4 ms
