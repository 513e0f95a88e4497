"""Whether ``python -m fastmae.finetune --resume auto`` may continue a run directory's checkpoint.

The run's mode (:func:`saved_mode`), the checkpoint's settings against this run's
(:func:`check_resumable`), its schedule of steps (:func:`check_same_schedule`), and the per-process
batch that keeps its effective batch on another number of processes (:func:`batch_for_processes`).
Each refusal is one line, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fastmae.config import ConfigError
from fastmae.finetune_config import FinetuneConfig, optimizer_name


def saved_mode(run_dir: Path) -> str | None:
    """The mode of the run ``run_dir`` holds (its ``config.json``, else ``results.json``), or None."""
    for name in ("config.json", "results.json"):
        try:
            mode = json.loads((run_dir / name).read_text()).get("mode")
        except (OSError, ValueError, AttributeError):  # absent, or not a run's file: the next one says
            continue
        if isinstance(mode, str):
            return mode
    return None


def check_resumable(
    cfg: FinetuneConfig, arch: dict[str, Any], num_classes: int, path: Path, state: dict[str, Any]
) -> None:
    """Refuse, in one line naming both, a checkpoint that another kind of run saved, before loading it.

    Another number of classes or architecture would be a size-mismatch traceback, another mode or
    pooling missing / unexpected keys, and another optimizer's state (LARS's into AdamW) or another
    set of trainable blocks would not fit the optimizer: none of it is this run to continue.
    """
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    head = state.get("model", {}).get("head.weight")
    checks = [  # (the checkpoint's, this run's, how to say it); None: the checkpoint does not say
        (saved.get("mode"), cfg.mode, lambda v: f"--mode {v}"),
        (None if head is None else int(head.shape[0]), num_classes, lambda v: f"{v} classes"),
        (saved.get("global_pool"), cfg.global_pool, lambda v: "--global-pool" if v else "--no-global-pool"),
    ]
    if "mode" in saved:
        was = optimizer_name(saved["mode"], saved.get("optimizer", "auto"))
        checks.append((was, optimizer_name(cfg.mode, cfg.optimizer), lambda v: f"--optimizer {v}"))
    if cfg.mode == "partial":
        checks.append((saved.get("trainable_blocks"), cfg.trainable_blocks, lambda v: f"--trainable-blocks {v}"))
    saved_arch = state.get("architecture")
    if isinstance(saved_arch, dict):  # keys both have: an older one may lack mlp_ratio (the default)
        differ = [k for k in arch if k in saved_arch and saved_arch[k] != arch[k]]
        was, now = ({k: d[k] for k in differ} for d in (saved_arch, arch))
        checks.append((was, now, lambda v: ", ".join(f"{k} {x}" for k, x in v.items())))
    for was, now, say in checks:
        if was is not None and was != now:
            raise ConfigError(
                f"cannot resume {path}: it was saved with {say(was)}, this run has {say(now)} "
                "(the same settings to continue it, or another --run-dir)"
            )


def batch_for_processes(cfg: FinetuneConfig, state: dict[str, Any], world_size: int, main: bool) -> FinetuneConfig:
    """``cfg`` resumed on another number of processes: the per-process batch that keeps the run's
    effective batch, when the run's own ``--batch-size`` is asked for and the processes divide it
    (a --batch-size of another value is the user's, and :func:`check_same_schedule` judges it)."""
    was, saved = state.get("effective_batch"), state.get("config") or {}
    if was is None or cfg.batch_size * world_size == int(was) or cfg.batch_size != saved.get("batch_size"):
        return cfg
    if int(was) % world_size:
        return cfg  # no per-process batch keeps it: check_same_schedule says what would
    if main:
        print(f"resumed on {world_size} process(es): --batch-size {int(was) // world_size} keeps the run's effective "
              f"batch {was} (it ran {cfg.batch_size} a process)", flush=True)  # fmt: skip
    return dataclasses.replace(cfg, batch_size=int(was) // world_size)


def check_same_schedule(
    path: Path, state: dict[str, Any], eff_batch: int, steps_per_epoch: int, batch_size: int, world_size: int
) -> None:
    """Refuse, in one line, to continue a checkpoint whose step counted other batches: its step
    would land in another epoch, at another lr (the epoch is step / steps an epoch, the lr scales
    with the effective batch). A checkpoint that does not say (an older one) is taken as is."""
    was = state.get("effective_batch")
    if was is not None and int(was) != eff_batch:
        raise ConfigError(
            f"cannot resume {path}: it trained at an effective batch of {was} (--batch-size x processes), this run "
            f"has {eff_batch} ({batch_size} x {world_size}): continue it with a --batch-size and process count "
            f"whose product is {was}"
        )
    was = state.get("steps_per_epoch")
    if was is not None and int(was) != steps_per_epoch:
        raise ConfigError(
            f"cannot resume {path}: its epochs were {was} steps, this run's training data gives {steps_per_epoch}: "
            "the training images changed (continue it on the same data, or start another --run-dir)"
        )
