"""report.py's trainer line: the loop's steady img/s against the step harness's fm_fast."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import report


def test_trainer_against_the_harness(tmp_path: Path):
    metrics = tmp_path / "train_metrics.jsonl"
    rows = [{"step": 10 * (i + 1), "loss": 1.0, "img_s": s} for i, s in enumerate([150.0, 3900.0, 4100.0, 4000.0])]
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
    assert "median 4000 img/s over 3 log intervals" in text
    assert "1.000x the harness's `fm_fast` (vit_base_patch16, batch 256: 4000 img/s)" in text


def test_trainer_with_too_few_intervals(tmp_path: Path):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text(json.dumps({"step": 10, "img_s": 12.0}) + "\n")
    (rep,) = report.load([metrics])
    assert "nothing to compare" in report.train_markdown(rep, [rep])
