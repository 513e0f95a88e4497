"""What the trainer's tests share: a tiny model's flags, its 64-JPEG data set, the run helpers.

Tiny model (32 px, patch 8, width 32, one block each) on 64 generated JPEGs, fp32, so every run
takes a second or two; the subprocess tests pay torch's import (~3 s) each. Test modules import
what they use; the fixtures (``tiny_data``, ``one_thread``) are in ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from fastmae.log import read_metrics

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
    "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2",
    "--num-workers", "0", "--no-progress", "--log-every", "1", "--warmup-epochs", "1",
]  # fmt: skip


def tiny_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, "--data-path", str(data), "--run-dir", str(run_dir), "--batch-size", "8", *extra]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen(
        [sys.executable, "-m", "fastmae.train", *args],
        cwd=kw.pop("cwd", REPO),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )
