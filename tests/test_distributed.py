"""torchrun on CPU: 2 gloo processes give the losses of 1 process with the same effective batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastmae.log import read_metrics
from fastmae.train import main
from tests.test_train import REPO, losses, one_thread, tiny_args, tiny_data  # noqa: F401 (fixtures)


def test_two_processes_match_one(tiny_data, tmp_path):  # noqa: F811
    """1 process x 16 images vs 2 gloo processes x 4 images x accum 2: same images, masks, losses.

    The masking noise of a step is drawn for the whole effective batch from (seed, step) and sliced
    per rank and micro-step, so it does not depend on the world size.
    """
    assert main(tiny_args(tiny_data, tmp_path / "one", "--epochs", "2", "--batch-size", "16")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    cmd += ["fastmae.train", *tiny_args(tiny_data, tmp_path / "two", "--epochs", "2")]
    cmd += ["--batch-size", "4", "--accum-iter", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("done: step 8") == 1  # rank 0 reports
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 9))
    for (s, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=1e-5), f"step {s}"
    assert (
        read_metrics(tmp_path / "two" / "metrics.jsonl")[0]["lr"]
        == read_metrics(tmp_path / "one" / "metrics.jsonl")[0]["lr"]
    )
    assert (tmp_path / "two" / "ckpt-step000000008.pt").is_file()
