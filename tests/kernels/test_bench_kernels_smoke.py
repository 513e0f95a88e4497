"""The kernel benchmark's harness runs end to end (tiny shapes; on CPU under the interpreter)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

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
            assert r[impl]["call_ms"] > 0
            # CPU: the host's time; CUDA: graph replays, or do_bench where a capture fails
            assert r[impl]["timer"] in (("cuda_graph", "do_bench") if torch.cuda.is_available() else ("perf_counter",))
    # other launch configurations beside the rule's rows: the same results, timed
    alt = {(r["op"], tuple(r["knobs"].items())): r for r in report["launch_alternatives"]}
    assert set(alt) == {
        ("masked_mse", (("order", "pred"),)),
        ("masked_mse", (("order", "gather"),)),
        ("unshuffle", (("stages", 3),)),
    }
    for r in alt.values():
        assert r["triton"]["ms"] > 0 and r["speedup_vs_rule"] > 0
        # the grads are bf16: another order of the same fp32 sums may move one by an ulp, 2^-7 at most
        # against the largest (a wrong result is off by the order of 1)
        assert r["rel_diff_vs_rule"] <= 2**-7
    assert alt["masked_mse", (("order", "gather"),)]["rule_knobs"] == {"order": "image"}
    assert alt["unshuffle", (("stages", 3),)]["rule_knobs"]["stages"] == 1


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    return bench


def test_backward_phase_runs_its_forward_once_per_stream():
    """The bwd phase times the backward alone: its forward runs once (again only on another stream)."""
    import torch

    bench = _load()
    (b,) = [b for b in bench.build_benches("t", (32, 32, 4, 16), 2, 0.75, torch.float32, "cpu", False)
            if b.op == "unshuffle"]  # fmt: skip
    calls = []
    run = b.run["eager"]
    b.run["eager"] = lambda: calls.append(1) or run()
    fn = bench.phase_fn(b, "eager", "bwd")
    grads = [fn() for _ in range(3)]
    assert len(calls) == 1 and all(g[0].shape == b.leaves["eager"][0].shape for g in grads)


def test_backward_phase_drops_the_old_forward_before_the_new_stream_runs_it(monkeypatch):
    """On another stream the forward runs again, and the old forward's graph is gone by then: it held
    the leaves' AccumulateGrad nodes, which keep the stream they were made on (the default one), and
    a graph built beside it takes them over; its capture then fails (every bwd row of the second
    H200 run fell back to host timing so). Here a stand-in stream changes on every call."""
    import weakref

    import torch

    bench = _load()
    (b,) = [b for b in bench.build_benches("t", (32, 32, 4, 16), 2, 0.75, torch.float32, "cpu", False)
            if b.op == "masked_mse"]  # fmt: skip
    streams = iter(range(100))
    monkeypatch.setattr(bench, "stream_of", lambda t: next(streams))
    previous: list[weakref.ref] = []
    alive_when_rerun = []
    run = b.run["eager"]

    def tracked():
        alive_when_rerun.append(any(r() is not None for r in previous))
        out = run()
        previous.append(weakref.ref(out))  # the output holds its graph
        return out

    b.run["eager"] = tracked
    fn = bench.phase_fn(b, "eager", "bwd")
    for _ in range(3):
        fn()
    assert alive_when_rerun == [False, False, False]


def test_detached_outputs_hold_no_graph():
    """What the sweep and the launch alternatives keep to compare with: no graph (see above)."""
    import torch

    bench = _load()
    for b in bench.build_benches("t", (32, 32, 4, 16), 2, 0.75, torch.bfloat16, "cpu", False):
        outs = bench.detached_outputs(b, "eager")
        assert len(outs) == 1 + (0 if b.grad_out is None else len(b.leaves["eager"]))
        assert all(t.grad_fn is None and not t.requires_grad and t.dtype == torch.float32 for t in outs), b.op


@pytest.mark.gpu
def test_backward_phase_is_captured_in_a_cuda_graph():
    """On CUDA the bwd rows are GPU time from a CUDA graph, not the host's call time (the first
    H200 run's captures of them failed: the forward had run on another stream)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    bench = _load()
    for b in bench.build_benches("t", (64, 64, 8, 64), 4, 0.75, torch.bfloat16, "cuda", False):
        if b.grad_out is None:
            continue
        fn = bench.phase_fn(b, "triton", "bwd")
        row = bench.measure(fn, "cuda", False, b.min_bytes["bwd"], 1000.0)
        assert row["timer"] == "cuda_graph", (b.op, row.get("graph_error"))
