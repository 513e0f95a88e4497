"""Resumable training checkpoints: atomic writes, retention, and RNG state as plain tensors.

A checkpoint is a dict of tensors and primitive containers only (config as a dict, RNG states as
tensors), so it loads with ``torch.load(weights_only=True)``. Files are named by the optimizer step,
``ckpt-step000001234.pt``; the epoch-end checkpoint of every K-th epoch is named
``ckpt-epoch0099-step000031200.pt`` (the 100th: 0-based, as the official ``checkpoint-799.pth`` ends
an 800-epoch run) and never pruned. Weight conversion (official, Hugging Face)
lives in :mod:`fastmae.convert`; ``checkpoint["model"]`` is an official-key state dict.

Atomicity: the bytes go to a temporary file in the same folder, are flushed and fsynced, then
``os.replace``-d over the final name and the folder is fsynced. A crash at any point leaves either
the old set of checkpoints or the old set plus the complete new one, never a partial ``.pt``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger("fastmae.checkpoint")

_NAME = re.compile(r"^ckpt-(?:epoch(\d+)-)?step(\d+)\.pt$")
TMP_PREFIX = ".tmp-ckpt-"


def checkpoint_name(step: int, keep_epoch: int | None = None) -> str:
    """``ckpt-step{step}.pt``, or ``ckpt-epoch{e}-step{step}.pt`` for one kept forever."""
    return f"ckpt-step{step:09d}.pt" if keep_epoch is None else f"ckpt-epoch{keep_epoch:04d}-step{step:09d}.pt"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` so that a crash never leaves a partial file under that name."""
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.pt"
    try:
        # inside the try: a Ctrl-C landing as os.open returns must not leave the empty file behind
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for torch.save
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(e, KeyboardInterrupt) and _interrupted(e):
            # Ctrl-C inside torch.save: its zip writer's clean-up then fails on the torn file ("unexpected
            # pos"), and that error, not the interrupt, reached the caller: a traceback, not "interrupted"
            raise KeyboardInterrupt from e
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    return path


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``path.write_text(text)`` that a crash never leaves torn (a run's ``config.json``, which
    ``--resume`` reads): a temporary file, fsynced, renamed over ``path``."""
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.txt"
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself durable
    return path


def _interrupted(error: BaseException) -> bool:
    """Whether ``error`` was raised while a KeyboardInterrupt was being handled."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__context__
    return False


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint's file name carries (``ckpt-[epochE-]stepS.pt``)."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"not a checkpoint name: {Path(path).name}")
    return int(m.group(2))


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path), ...]`` of the complete checkpoints in ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(2)), p))
    return sorted(found)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """A checkpoint dict, loaded with ``weights_only=True``; ``mmap``: its tensors mapped from the
    file, not read into memory (the processes of a node then share one copy in the page cache) where
    the file is torch's zip format (a legacy or damaged file is read as it is, and says what it is)."""
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))


def load_latest(
    run_dir: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``run_dir`` that loads, or None; an unreadable one is skipped with a warning."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location, mmap)
        except Exception as e:  # a damaged file (disk full, copied partially): fall back to the one before
            logger.warning("skipping unreadable checkpoint %s (%s: %s)", path, type(e).__name__, e)
    return None


def pick_latest(
    run_dir: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> tuple[Path, dict[str, Any] | None] | None:
    """Under torchrun: rank 0's :func:`load_latest` pick, on every rank, as (path, state), the state
    loaded on rank 0 only (None elsewhere: each rank loads that path itself); None on every rank
    when rank 0 found none. Each rank picking its own, a node that saw a newer file damaged resumed
    at another step, and the ranks drifted apart until a collective hung. One process: load_latest."""
    if not (dist.is_available() and dist.is_initialized()):
        return load_latest(run_dir, map_location, mmap)
    loaded = load_latest(run_dir, map_location, mmap) if dist.get_rank() == 0 else None
    box = [None if loaded is None else loaded[0]]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return None
    return loaded if loaded is not None else (box[0], None)


def save_checkpoint(
    state: dict[str, Any], run_dir: str | os.PathLike, step: int, keep_last: int, keep_epoch: int | None = None
) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``, then prune to the last ``keep_last``.

    Checkpoints named with an epoch (``keep_epoch``) are never pruned. Stale temporary files of a
    crashed earlier write are removed.
    """
    run_dir = Path(run_dir)
    path = atomic_save(state, run_dir / checkpoint_name(step, keep_epoch))
    rolling = [p for _, p in list_checkpoints(run_dir) if _NAME.match(p.name).group(1) is None and p != path]
    for p in rolling[: max(0, len(rolling) - (keep_last - (keep_epoch is None)))]:
        p.unlink(missing_ok=True)
    for p in run_dir.glob(TMP_PREFIX + "*"):
        p.unlink(missing_ok=True)
    return path


def set_aside_unverified(run_dir: str | os.PathLike, bad_step: int, written: list[Path]) -> Path | None:
    """After a non-finite loss at optimizer step ``bad_step``: set aside what this run wrote from
    the weights that gave it, and return the checkpoint ``--resume auto`` will now pick.

    The checkpoint of step s holds the weights that step s + 1's forward used, so it is verified once
    that loss came out finite. Those this invocation wrote (``written``) at step >= bad_step - 1 are
    not: they are renamed ``*.pt.nonfinite`` (kept for a look; an earlier one of the name is not
    overwritten). Checkpoints of earlier invocations are left alone: a run resumed from an older
    one, with other settings, must not erase the timeline it branched from.
    """
    run_dir = Path(run_dir)
    mine = {p.resolve() for p in written}
    for s, path in list_checkpoints(run_dir):
        if s >= bad_step - 1 and path.resolve() in mine:
            _rename_aside(path, "nonfinite")
    remaining = list_checkpoints(run_dir)
    return remaining[-1][1] if remaining else None


def set_aside_later(run_dir: str | os.PathLike, step: int) -> int:
    """A run resumed from the checkpoint of ``step`` while later ones exist branches off there. At
    the branch's first checkpoint the later ones (the timeline left behind) are renamed
    ``*.pt.superseded``: kept, but out of the way of ``--resume auto`` (which went back to them) and
    of the pruning (which deleted the branch's own checkpoints first, and a save of the same step
    replaced the old one). A branch that ends before its first checkpoint (a non-finite loss, a
    kill) leaves the old timeline as it was. Returns how many were renamed."""
    later = [path for s, path in list_checkpoints(run_dir) if s > step]
    for path in later:
        _rename_aside(path, "superseded")
    return len(later)


def _rename_aside(path: Path, suffix: str) -> None:
    """``path`` renamed ``<name>.<suffix>`` (``.<suffix>1``, ... where that exists: none is overwritten)."""
    target, n = path.with_name(f"{path.name}.{suffix}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.{suffix}{n}"), n + 1
    path.rename(target)


class RunCheckpoints:
    """A training run's checkpoints: rank 0 writes them (the other ranks only name them) and
    remembers the ones this invocation wrote, for :func:`set_aside_unverified`.

    Args:
        run_dir: the run directory.
        keep_last: rolling checkpoints kept.
        keep_every_epochs: keep the checkpoint at the end of every this many epochs too (0: none).
        main: whether this process writes (rank 0).
        resumed_from: the checkpoint this invocation started from, or None.
        branched_from: the step of ``resumed_from`` when later checkpoints lie beside it: they are
            set aside at the first save (:func:`set_aside_later`).
    """

    def __init__(
        self,
        run_dir: Path,
        keep_last: int,
        keep_every_epochs: int,
        main: bool,
        resumed_from: Path | None = None,
        branched_from: int | None = None,
    ):
        self.run_dir, self.keep_last, self.keep_every_epochs, self.main = run_dir, keep_last, keep_every_epochs, main
        self.resumed_from, self.branched_from = resumed_from, branched_from
        self.written: list[Path] = []

    def save(self, step: int, epoch: int, epoch_end: bool, state: Callable[[], dict[str, Any]]) -> Path:
        """Write ``state()`` (rank 0 only calls it) as the checkpoint of ``step`` in ``epoch`` (0-based);
        returns its path on every rank."""
        every = self.keep_every_epochs
        keep = epoch if every and epoch_end and (epoch + 1) % every == 0 else None
        if not self.main:
            return self.run_dir / checkpoint_name(step, keep)
        state_dict = state()
        if self.branched_from is not None:  # this branch's first checkpoint
            n = set_aside_later(self.run_dir, self.branched_from)
            print(
                f"branched at step {self.branched_from}: the {n} later checkpoint(s) renamed *.pt.superseded",
                flush=True,
            )
            self.branched_from = None
        path = save_checkpoint(state_dict, self.run_dir, step, self.keep_last, keep)
        self.written.append(path)
        return path

    def last_good(self, bad_step: int) -> str | None:
        """After a non-finite loss at ``bad_step``: set aside what this invocation wrote from the
        weights that gave it (rank 0), and name the checkpoint ``--resume auto`` now picks (None:
        none, or not rank 0)."""
        last = set_aside_unverified(self.run_dir, bad_step, self.written) if self.main else None
        if last is None:
            return None
        started_here = self.resumed_from is not None and last.resolve() == Path(self.resumed_from).resolve()
        if started_here and checkpoint_step(last) == bad_step - 1:  # this invocation started from those weights
            return f"{last} (its weights gave this loss: resume it with other settings)"
        return str(last)


# ---------------------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """torch, CUDA, numpy and python RNG states as tensors and primitives (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (CUDA only where it was saved and is available)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
