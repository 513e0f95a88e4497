"""Where a training run lives, and whether a checkpoint may continue it.

``resolve_run_dir`` picks the run directory and the checkpoint ``--resume`` means, and holds the
directory for this process (two runs writing one directory replaced each other's metrics and
config and deleted each other's checkpoint being written); ``check_resumable`` refuses a checkpoint
whose data order or step size differs from this run's; ``resume`` loads the one that continues it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from fastmae import checkpoint as ckpt
from fastmae.cli import flag
from fastmae.config import Config, ConfigError
from fastmae.data import DataError
from fastmae.data.sources import samples_digest
from fastmae.distributed import rank_local

LOCK_NAME = ".fastmae.lock"
_held: dict[Path, tuple[IO[str], bool]] = {}  # held run directories (resolved): lock file, made here


def hold_run_dir(run_dir: Path) -> str | None:
    """Hold ``run_dir`` for this process (an exclusive ``flock`` on its ``.fastmae.lock``, which the
    kernel releases when the process ends, killed or not); None when held, else who holds it.

    A directory this process holds already (an earlier run in the same process that raised) is
    held again. On a file system without locks the run goes on unguarded.
    """
    key = run_dir.resolve()
    if key in _held:
        return None
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 (held until release_run_dirs or exit)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        return holder
    except OSError:  # no locks on this file system (some network mounts)
        pass
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held[key] = (f, made)
    return None


def _not_held_in_child() -> None:
    """A forked child (a DataLoader worker) does not hold its parent's run directories. An flock
    belongs to the open file, which a fork shares: a worker outliving a SIGKILLed trainer (torch's
    workers notice their parent's death within ~5 s) held the lock, and the immediate ``--resume
    auto`` was refused as "in use". The child closes its copies; the parent's lock stands."""
    for f, _ in _held.values():
        f.close()
    _held.clear()


os.register_at_fork(after_in_child=_not_held_in_child)


def held_run_dir() -> Path | None:
    """The run directory this process holds (the last it took), or None."""
    return next(reversed(_held), None)


def release_run_dirs() -> None:
    """Let go of every run directory this process holds (a run's end; the process's exit does it too).

    A directory made for a run that stopped before writing anything (a one-line error at start-up)
    is removed again, lock file and all: the error leaves nothing behind.
    """
    for key, (f, made) in _held.items():
        f.close()
        if made and [p.name for p in key.iterdir()] == [LOCK_NAME]:
            (key / LOCK_NAME).unlink(missing_ok=True)
            key.rmdir()
    _held.clear()


def in_use(run_dir: Path, holder: str) -> ConfigError:
    """The one-line error for a run directory another run holds (``holder``: what its lock file says)."""
    return ConfigError(f"{run_dir} is in use by another run ({holder}): wait for it to end, or pass another --run-dir")


def _claim(run_dir: Path) -> Path:
    holder = hold_run_dir(run_dir)
    if holder is not None:
        raise in_use(run_dir, holder)
    return run_dir


def resolve_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from or None); the directory is held for this process.

    The run directory is ``cfg.run_dir``; else the folder of a ``--resume PATH`` checkpoint; else
    ``runs/<preset>``, or the first ``runs/<preset>-N`` that holds no run yet and that no other run
    is using (with ``--resume auto``: the one whose newest checkpoint is the most recent).
    """
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        if not cfg.resume and ckpt.list_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} already holds a run: pass --resume auto to continue it, or another --run-dir")
        _claim(run_dir)
    elif cfg.resume not in ("", "auto"):
        run_dir = _claim(Path(cfg.resume).parent)
    else:
        base = Path("runs") / cfg.preset
        runs = [p for p in [base, *base.parent.glob(f"{base.name}-*")] if ckpt.list_checkpoints(p)]
        if cfg.resume == "auto" and runs:
            run_dir = _claim(max(runs, key=lambda p: ckpt.list_checkpoints(p)[-1][1].stat().st_mtime))
        else:  # a second `python -m fastmae.train` started beside the first takes the next one
            n = 1
            while ckpt.list_checkpoints(run_dir := base if n == 1 else Path(f"{base}-{n}")) or hold_run_dir(run_dir):
                n += 1
    if cfg.resume == "auto":
        found = ckpt.list_checkpoints(run_dir)
        return run_dir, (found[-1][1] if found else None)
    return run_dir, Path(cfg.resume) if cfg.resume else None


def check_resumable(state: dict[str, Any], cfg: Config, eff_batch: int, loader: Any) -> None:
    """Refuse a checkpoint whose data order or step size differs from this run's.

    The world size and the accumulation may change (a step's images and noise depend only on the
    seed, the step and the effective batch), so 8 GPUs can resume on 4 with ``accum_iter`` doubled.
    """
    shapes = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth")
    shapes += ("decoder_num_heads", "mlp_ratio")
    saved_cfg = state.get("config", {})
    differ = [
        f"{flag(k)} {saved_cfg[k]} (this run: {getattr(cfg, k)})"
        for k in shapes
        if k in saved_cfg and saved_cfg[k] != getattr(cfg, k)
    ]
    if differ:
        raise ConfigError(f"the checkpoint holds another model: {', '.join(differ)}")
    saved = state["loader"]
    if saved["seed"] != cfg.seed or saved["num_samples"] != loader.plan.num_samples:
        raise DataError(
            f"the checkpoint was trained on {saved['num_samples']} images with seed {saved['seed']}; "
            f"this run has {loader.plan.num_samples} with seed {cfg.seed}: the data order would differ"
        )
    source = getattr(loader, "source", None)
    if "samples_digest" in saved and source is not None and saved["samples_digest"] != samples_digest(source):
        raise DataError(
            f"the checkpoint was trained on other images ({saved['num_samples']} as here, but a file renamed, "
            "replaced or relabelled since): the data order would differ; resume on the data it ran on, or "
            "start a new run from its weights with --init-from"
        )
    if state["effective_batch"] != eff_batch:
        raise ConfigError(
            f"the checkpoint was trained with effective batch {state['effective_batch']}, this run's is "
            f"{eff_batch}: set --effective-batch {state['effective_batch']} (or --batch-size / --accum-iter)"
        )


@dataclass
class Resumed:
    """Where a resumed run starts."""

    step: int
    checkpoint: Path
    branched_from: int | None  # resumed from a checkpoint with later ones beside it (ckpt.set_aside_later)


def resume(
    cfg: Config,
    run_dir: Path,
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    eff_batch: int,
    loader: Any,
) -> Resumed:
    """Load the checkpoint at ``path`` (with ``--resume auto``, the newest that loads) into the model,
    optimizer, scaler and RNGs, after checking that it continues this run.

    Memory-mapped on the host (the ranks of a node share its pages; load_state_dict copies to the
    device). With auto, rank 0 picks the newest that loads (a damaged one is skipped with a warning)
    and every rank loads that one: each picking its own, a node that saw a newer file damaged
    resumed at another step, and the ranks drifted apart.
    """
    state = None
    if cfg.resume == "auto":
        picked = ckpt.pick_latest(run_dir, mmap=True)
        if picked is None:
            raise ConfigError(f"no loadable checkpoint in {run_dir}")
        path, state = picked
    if state is None:  # --resume PATH, or a rank other than 0
        try:
            state = ckpt.load_checkpoint(path, mmap=True)
        except Exception as e:  # not a checkpoint, damaged, or from an incompatible version
            first = (str(e).strip().splitlines() or [""])[0]  # torch's load errors run to many lines
            raise rank_local(ConfigError(f"cannot load the checkpoint {path}: {type(e).__name__}: {first}")) from None
    check_resumable(state, cfg, eff_batch, loader)  # before loading: a clear error, not a size mismatch
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:  # empty when saved without fp16; a new fp16 run's scaler starts fresh then
        scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(state["rng"])
    step = int(state["step"])
    later = any(s > step for s, _ in ckpt.list_checkpoints(run_dir))
    return Resumed(step=step, checkpoint=path, branched_from=step if later else None)
