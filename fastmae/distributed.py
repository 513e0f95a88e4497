"""torchrun plumbing: process group from torchrun's environment, NCCL on GPUs and gloo on CPU.

A plain ``python -m fastmae.train`` is a world of one and creates no process group. Under
``torchrun`` the variables ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` are set, and ``init_process_group(init_method="env://")`` reads them, single node or
multi-node alike.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from fastmae.cli import ArgumentParser
from fastmae.config import ConfigError

T = TypeVar("T")


@dataclass
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; ``cuda`` gets the local rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} but CUDA is not available (torch {torch.__version__})")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto", timeout_min: float | None = None) -> DistEnv:
    """Join the torchrun job if there is one (env:// init); set the CUDA device of this process.

    ``timeout_min``: how long a collective waits for the other ranks (None: the backend's default,
    10 minutes for NCCL), past which the job is aborted.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and torch.device(device if device != "auto" else "cpu").index is not None:
        raise ConfigError(f"--device {device} under torchrun would put every process on one GPU: pass --device cuda")
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        if timeout_min is not None:
            kwargs["timeout"] = datetime.timedelta(minutes=timeout_min)
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def parse_together(parse: Callable[[list[str] | None], T], argv: list[str] | None) -> T:
    """``parse(argv)``; under torchrun, a rank whose command line is refused (a data path or a config
    file missing on its node) first tells the others before it exits. Refused before the process group
    formed, it left the others waiting for it in their first collective for --dist-timeout (30 min)."""
    try:
        return parse(argv)
    except SystemExit as e:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and e.code == 2:
            _join_to_fail(ArgumentParser.last_error or "its command line was refused", argv)
        raise


def _join_to_fail(error: str, argv: list[str] | None) -> None:
    """Join the process group for :func:`start_together` alone, with ``error``, and leave."""
    device = "auto"
    args = list(argv if argv is not None else sys.argv[1:])
    for i, arg in enumerate(args):  # the backend the others chose follows the device
        name, _, value = arg.partition("=")
        if name == "--config" and (value or i + 1 < len(args)):
            device = _config_device(value or args[i + 1], device)
        elif len(name) >= 5 and "--device".startswith(name):  # argparse takes --dev for --device
            device = value or (args[i + 1] if i + 1 < len(args) else device)
    if device not in ("auto", "cpu", "cuda"):  # cuda:N: the others refuse it before joining
        return
    try:
        init_distributed(device, timeout_min=2.0)  # bounded: a rank that never comes must not hold this one
        start_together(None, error)
    except Exception:  # noqa: BLE001  (its own error is what this rank reports)
        pass
    finally:
        cleanup()


def _config_device(path: str, default: str) -> str:
    """The ``device`` a JSON config file sets, if it can be read here, else ``default``."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("device", default)
    except (OSError, ValueError, AttributeError):
        return default
    return value if isinstance(value, str) else default


def start_together(settings: dict[str, Any] | None, error: str | None = None) -> None:
    """Under torchrun, the ranks' first collective: whether each could start, and with which settings.

    Raises (on the ranks that started) when one could not (its error was refused before the group
    formed, see :func:`parse_together`), or when the ranks run different settings: each node reads
    its own config files, and a node with another --blr or --log-every trained a diverging copy of
    the model without a word (or hung, at a log step the others did not take).
    """
    if not dist.is_initialized():
        return
    views = all_gather_object((error, settings))
    if error is not None:
        return
    failed = [f"rank {r}: {e}" for r, (e, _) in enumerate(views) if e is not None]
    if failed:
        raise ConfigError(f"a process could not start ({'; '.join(failed)})")
    differ = sorted({k for _, s in views for k in s if any(v.get(k) != s.get(k) for _, v in views)})
    if differ:
        shown = ", ".join(
            f"{k} ({', '.join(f'rank {r}: {s.get(k)!r}' for r, (_, s) in enumerate(views))})" for k in differ[:3]
        )
        raise ConfigError(
            f"the processes run different settings: {shown}; every node must get the same flags and files"
        )


def end_together() -> None:
    """A run's normal end under torchrun: release DDP, then meet the other ranks.

    DDP's reducer holds the process group; left in a reference cycle, it was collected only at
    interpreter exit, after ``cleanup()``, and a gloo rank then aborted ("terminate called without an
    active exception"): about 1 run in 10 of the 2-process tests, in fine-tuning and in training
    alike. Collecting it first and leaving at the same time ends every rank cleanly. Only on the
    normal path: after an error the other ranks may never reach the barrier.
    """
    if dist.is_initialized():
        gc.collect()
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the processes in place (no-op for a world of one)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, by rank (``[obj]`` for a world of one)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (no-op for a world of one)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank_local(error: Exception) -> Exception:
    """``error``, marked as this rank's own: met reading its node's files (the data, a checkpoint),
    it may be no other rank's, so under torchrun the rank says it itself (see ``main``)."""
    error.rank_local = True  # type: ignore[attr-defined]
    return error
