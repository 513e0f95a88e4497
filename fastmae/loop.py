"""What a training loop keeps between its log steps, shared by pretraining and fine-tuning.

:class:`LossWatch` holds the loss on the device and reads it back only at a log step (the loop's
one host sync, where the ranks also agree on stopping); :func:`stop_requests` turns a scheduler's
SIGTERM or SIGUSR1 into a stop at the next log step, after a checkpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fastmae import distributed


class LossWatch:
    """The loss statistics of the current log interval, kept on the device: the summed loss (NaN and
    inf propagate into it) and the first step whose loss was not finite.

    Args:
        device: where the loss lives.
        env: the processes (``sync`` averages over all of them).
    """

    def __init__(self, device: torch.device, env: distributed.DistEnv):
        self.env = env
        self.loss_sum = torch.zeros((), device=device)
        self.first_bad = torch.full((), 2**62, dtype=torch.int64, device=device)
        self.micro_steps = 0

    def add(self, loss: torch.Tensor, step: int) -> None:
        """Count one (micro-)step's loss, met during optimizer step ``step`` (0-based); no host sync."""
        loss = loss.detach().float()
        self.loss_sum += loss
        self.first_bad.copy_(torch.where(torch.isfinite(loss), self.first_bad, self.first_bad.clamp_max(step + 1)))
        self.micro_steps += 1

    def sync(self, stop_requested: bool) -> tuple[float, bool]:
        """(the interval's mean loss over every rank, whether any rank was asked to stop), and the
        next interval starts. One all-reduce: the ranks agree on both."""
        stop_flag = torch.tensor(float(stop_requested), device=self.loss_sum.device)
        stats = distributed.all_reduce_sum(torch.stack([self.loss_sum, stop_flag])).tolist()
        loss = stats[0] / (self.micro_steps * self.env.world_size)
        self.loss_sum.zero_()
        self.micro_steps = 0
        return loss, stats[1] > 0

    def first_bad_step(self, log_step: int) -> int:
        """The first optimizer step (1-based, as logged) whose loss was not finite, over every rank;
        ``log_step`` itself when each loss was finite but their sum is not."""
        if self.env.enabled:
            torch.distributed.all_reduce(self.first_bad, op=torch.distributed.ReduceOp.MIN)
        bad = int(self.first_bad.item())
        return bad if bad <= log_step else log_step


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """The signals received meanwhile (SIGTERM, SIGUSR1: a scheduler's preemption, or SLURM's
    ``--signal=USR1@90``); the loop stops at its next log step, after a checkpoint. Outside the main
    thread signals cannot be caught, and the list stays empty."""
    received: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            handlers[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
