"""Where a training run lives, and whether a checkpoint may continue it.

``resolve_run_dir`` picks the run directory and the checkpoint ``--resume`` means;
``check_resumable`` refuses a checkpoint whose data order or step size differs from this run's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastmae import checkpoint as ckpt
from fastmae.cli import flag
from fastmae.config import Config, ConfigError
from fastmae.data import DataError


def resolve_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from or None).

    The run directory is ``cfg.run_dir``; else the folder of a ``--resume PATH`` checkpoint; else
    ``runs/<preset>``, or the first ``runs/<preset>-N`` that holds no run yet (with ``--resume
    auto``: the one whose newest checkpoint is the most recent).
    """
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        if not cfg.resume and ckpt.list_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} already holds a run: pass --resume auto to continue it, or another --run-dir")
    elif cfg.resume not in ("", "auto"):
        run_dir = Path(cfg.resume).parent
    else:
        base = Path("runs") / cfg.preset
        runs = [p for p in [base, *base.parent.glob(f"{base.name}-*")] if ckpt.list_checkpoints(p)]
        if cfg.resume == "auto" and runs:
            run_dir = max(runs, key=lambda p: ckpt.list_checkpoints(p)[-1][1].stat().st_mtime)
        else:
            n = 1
            while ckpt.list_checkpoints(base if n == 1 else Path(f"{base}-{n}")):
                n += 1
            run_dir = base if n == 1 else Path(f"{base}-{n}")
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
    if state["effective_batch"] != eff_batch:
        raise ConfigError(
            f"the checkpoint was trained with effective batch {state['effective_batch']}, this run's is "
            f"{eff_batch}: set --effective-batch {state['effective_batch']} (or --batch-size / --accum-iter)"
        )
