"""metrics.jsonl and its TensorBoard mirror on resume."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import fastmae
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


def test_the_commit_is_fastmaes_own_not_an_enclosing_repositorys(tmp_path):
    """Installed (copied) inside another project's git repository, fastmae must not record that
    project's commit as its own: git -C walks up to whatever repository encloses the package."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    project = tmp_path / "project"
    site = project / "venv" / "site-packages"
    shutil.copytree(Path(fastmae.__file__).parent, site / "fastmae", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "u", "GIT_AUTHOR_EMAIL": "u@x",
           "GIT_COMMITTER_NAME": "u", "GIT_COMMITTER_EMAIL": "u@x"}  # fmt: skip
    env.pop("FASTMAE_COMMIT", None)
    subprocess.run(["git", "init", "-q", str(project)], check=True, env=env)
    (project / "a.txt").write_text("x")
    subprocess.run(["git", "-C", str(project), "add", "a.txt"], check=True, env=env)
    subprocess.run(["git", "-C", str(project), "commit", "-qm", "x"], check=True, env=env)
    code = "from fastmae.log import _source_commit; print(_source_commit())"
    out = subprocess.run([sys.executable, "-c", code], cwd=site, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None", out
    repo = Path(fastmae.__file__).resolve().parents[1]
    if (repo / ".git").exists():  # its own checkout: its own commit
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, check=True
        )
        assert head.strip() in out.stdout
