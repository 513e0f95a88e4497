"""bench_demo reads the trainer's summary line: the two stay in step."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_demo import DONE
from fastmae import messages
from fastmae.train import TrainResult


def test_the_summary_line_is_what_bench_demo_reads():
    result = TrainResult(run_dir=Path("runs/demo"), step=256, checkpoint=None, metrics=Path("m"), losses=[1.34, 0.4158])
    m = DONE.search(messages.summary(result, 42.0))
    assert m is not None and m.groups() == ("256", "0.7", "1.3400", "0.4158")
