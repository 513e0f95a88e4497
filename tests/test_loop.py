"""The loop's device-side loss watch and its stop requests (shared by train and finetune)."""

from __future__ import annotations

import math
import os
import signal
import threading

import torch

from fastmae.distributed import DistEnv
from fastmae.loop import LossWatch, stop_requests


def test_loss_watch_means_each_interval_and_starts_the_next():
    watch = LossWatch(torch.device("cpu"), DistEnv())
    for step, loss in enumerate([1.0, 2.0, 6.0]):
        watch.add(torch.tensor(loss, requires_grad=True) * 1, step)  # a graph's output: detached
    assert watch.sync(stop_requested=False) == (3.0, False)
    watch.add(torch.tensor(5.0, dtype=torch.bfloat16), 3)
    assert watch.sync(stop_requested=True) == (5.0, True)
    assert watch.micro_steps == 0 and watch.loss_sum.item() == 0.0


def test_loss_watch_names_the_first_non_finite_step():
    watch = LossWatch(torch.device("cpu"), DistEnv())
    for step, loss in enumerate([1.0, 2.0, math.inf, math.nan, 1.0]):  # step 2 (0-based) is the 3rd logged
        watch.add(torch.tensor(loss), step)
    mean, _ = watch.sync(False)
    assert not math.isfinite(mean)
    assert watch.first_bad_step(log_step=5) == 3


def test_loss_watch_blames_the_log_step_when_only_the_sum_overflows():
    watch = LossWatch(torch.device("cpu"), DistEnv())
    for step in range(2):
        watch.add(torch.tensor(3e38), step)  # each finite in fp32, their sum is inf
    assert watch.sync(False)[0] == math.inf
    assert watch.first_bad_step(log_step=2) == 2


def test_stop_requests_records_signals_and_restores_the_handlers():
    seen = []
    term = signal.getsignal(signal.SIGTERM)
    before = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with stop_requests() as received:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGUSR1, signal.SIGTERM] and not seen
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler from before is back
        assert seen == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_stop_requests_outside_the_main_thread_catches_nothing():
    out = {}
    term = signal.getsignal(signal.SIGTERM)

    def run():
        with stop_requests() as received:
            out["received"] = received
            out["handler"] = signal.getsignal(signal.SIGTERM)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert out == {"received": [], "handler": term}
