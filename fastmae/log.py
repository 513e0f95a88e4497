"""Run metrics: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard when it imports.

Written by rank 0 only. On resume the records after the checkpoint's step are dropped first, so the
file of an interrupted and resumed run reads like the file of a run that never stopped.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def _git(here: str, *args: str) -> str:
    return subprocess.run(
        ["git", "--no-optional-locks", "-C", here, *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def _source_commit() -> dict[str, Any] | None:
    """fastmae's commit where it runs from its own git checkout (``FASTMAE_COMMIT`` overrides: a copy
    without its ``.git``), with whether tracked files differ from it (None when that took too long);
    None otherwise, also for a copy installed inside another project's repository."""
    if os.environ.get("FASTMAE_COMMIT"):
        return {"commit": os.environ["FASTMAE_COMMIT"], "dirty": None}
    package = Path(__file__).resolve().parent
    here = str(package)
    try:
        if Path(_git(here, "rev-parse", "--show-toplevel")).resolve() != package.parent:
            return None  # not fastmae's checkout: a site-packages inside the user's own repository
        commit = _git(here, "rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        dirty: bool | None = bool(_git(here, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"commit": commit, "dirty": dirty}


def run_environment(device: torch.device) -> dict[str, Any]:
    """What a run ran on, for its ``config.json``: the command, versions, the device's name and
    fastmae's commit (where it runs from a git checkout), so its numbers can be traced and rerun."""
    from fastmae import __version__

    env: dict[str, Any] = {"fastmae": __version__}
    if Path(sys.argv[0]).parts[-2:] == ("fastmae", "train.py"):  # python -m fastmae.train (torchrun's workers too)
        env["command"] = shlex.join(["python", "-m", "fastmae.train", *sys.argv[1:]])
    env |= {
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or platform.machine()
    source = _source_commit()
    if source is not None:
        env["git"] = source
    return env


def _tensorboard_writer(log_dir: Path, purge_step: int | None = None) -> Any:
    """A SummaryWriter, or None without tensorboard; ``purge_step`` hides an interrupted run's events
    from that step on, as ``metrics.jsonl`` drops its records."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line, from a kill mid-write, is ignored)."""
    records = []
    p = Path(path)
    if not p.is_file():
        return records
    for line in p.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl`` (flushed per record) and to TensorBoard.

    Args:
        run_dir: the run directory.
        resume_step: keep the existing records up to this step (None: start the file afresh).
        tensorboard: also write ``run_dir/tb`` when ``torch.utils.tensorboard`` imports.
        superseded: a run branching off at ``resume_step`` from a timeline that went further (see
            ``checkpoint.set_aside_later``): the records past it are appended to ``metrics.jsonl.superseded``
            instead of dropped.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        resume_step: int | None = None,
        tensorboard: bool = True,
        superseded: bool = False,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        records = read_metrics(self.path) if resume_step else []
        kept = [r for r in records if r.get("step", 0) <= resume_step]
        # the kept records' last training time: a resumed run's "time" goes on from it (it restarted
        # at 0, and a plot of loss against time folded back)
        self.resumed_time = max(
            (float(r["time"]) for r in kept if isinstance(r.get("time"), (int, float))), default=0.0
        )
        later = [r for r in records if r.get("step", 0) > resume_step] if superseded else []
        if later:
            with open(self.path.with_name(self.path.name + ".superseded"), "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in later))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        purge = resume_step + 1 if resume_step else None  # the resumed run writes steps after resume_step
        self.tb = _tensorboard_writer(Path(run_dir) / "tb", purge) if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def record_line(record: dict[str, Any]) -> str:
    """A metrics record as the log line printed without a progress bar: ``step=8 loss=0.5123 ...``."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
