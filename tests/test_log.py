"""metrics.jsonl and its TensorBoard mirror on resume."""

from __future__ import annotations

import sys
import types

from fastmae.log import MetricsLog, read_metrics


def test_resume_drops_the_interrupted_runs_later_records_in_both(tmp_path, monkeypatch):
    """A run killed after logging step 5 and resumed from its step-3 checkpoint: metrics.jsonl keeps
    steps 1-3, and TensorBoard (a stand-in SummaryWriter here; tensorboard is optional) is opened with
    ``purge_step=4``, which hides the killed run's events from step 4 on."""
    opened = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            opened.append(purge_step)

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)

    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.write(dict(step=step, loss=1.0 / step))
    log.close()
    log = MetricsLog(tmp_path, resume_step=3)
    log.write(dict(step=4, loss=0.2))
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert opened == [None, 4]


def test_a_resumed_runs_time_goes_on_from_the_kept_records(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    assert log.resumed_time == 0.0
    for step, t in ((2, 5.0), (4, 9.5), (6, 14.0)):
        log.write({"step": step, "loss": 1.0, "time": t})
    log.write({"step": 4, "knn_top1": 50.0})  # a record without a time
    log.close()
    assert MetricsLog(tmp_path, resume_step=4, tensorboard=False).resumed_time == 9.5
