"""The trainer resumes exactly: after SIGTERM or SIGKILL, on another world size or accumulation,
from an older checkpoint (a branch), from the run directory alone, past the schedule's end."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fastmae.log import read_metrics
from fastmae.train import EXIT_STOPPED, main
from tests.training import losses, run_cli, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

RESUME_ARGS = ["--epochs", "4", "--ckpt-every-steps", "3"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory) -> list[tuple[int, float]]:
    """Per-step losses of the run the interrupted ones must reproduce."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests that compare with it (one_thread)
    run = tmp_path_factory.mktemp("uninterrupted")
    try:
        assert main(tiny_args(tiny_data, run, *RESUME_ARGS)) == 0
    finally:
        torch.set_num_threads(n)
    return losses(run)


def _run_until(args: list[str], run: Path, steps: int, sig: signal.Signals, group: bool = False) -> subprocess.Popen:
    """Start the CLI, send ``sig`` once ``steps`` metrics records are written, wait for the end;
    ``group``: to its whole process group (its own session), as torchrun and SLURM signal."""
    proc = run_cli(args, start_new_session=group)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if len(read_metrics(run / "metrics.jsonl")) >= steps:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            break
        time.sleep(0.002)
    proc.wait()
    return proc


@pytest.mark.parametrize("to", ["process", "group"])
def test_sigterm_stops_after_a_checkpoint_and_resumes_exactly(tiny_data, tmp_path, uninterrupted, to, capsys):
    """A scheduler's SIGTERM: the run saves at the next log step, exits 143, and resumes exactly.
    Sent to the process group, it reaches the DataLoader workers too: they died of it, and the run
    with them ("DataLoader worker ... killed by signal: Terminated", no checkpoint) until they
    ignored it."""
    run = tmp_path / "run"
    workers = ["--num-workers", "2"] if to == "group" else []  # (the loader's batches do not depend on it)
    args = tiny_args(tiny_data, run, *RESUME_ARGS, "--ckpt-every-steps", "1000", *workers)
    proc = _run_until(args, run, 5, signal.SIGTERM, group=to == "group")
    err = proc.stderr.read()
    assert proc.returncode == EXIT_STOPPED, err
    stopped_at = len(read_metrics(run / "metrics.jsonl"))
    assert f"stopped by a signal at step {stopped_at}" in err and "--resume auto" in err
    assert (run / f"ckpt-step{stopped_at:09d}.pt").is_file()  # saved where it stopped, not at an epoch end
    assert main(tiny_args(tiny_data, run, *RESUME_ARGS, "--resume", "auto")) == 0
    for (s, a), (_, b) in zip(losses(run), uninterrupted, strict=True):
        assert a == b, f"step {s} (stopped after {stopped_at})"  # bitwise: the same ops in the same order
    # the summary's time and loss range are the resumed invocation's: it says where that began
    assert f"done: step {len(uninterrupted)} (resumed at step {stopped_at}) in " in capsys.readouterr().out


def test_sigkill_then_resume_gives_the_same_losses(tiny_data, tmp_path, uninterrupted):
    """SIGKILL at a random step, ``--resume auto``: the metrics equal an uninterrupted run's."""
    args = RESUME_ARGS
    reference = uninterrupted
    assert len(reference) == 32

    run = tmp_path / "killed"
    kill_at = random.Random(os.getpid()).randint(5, 24)
    for _ in range(3):  # a machine too busy to poll in time can let the run finish first: kill earlier
        shutil.rmtree(run, ignore_errors=True)
        proc = _run_until(tiny_args(tiny_data, run, *args), run, kill_at, signal.SIGKILL)
        if proc.returncode == -signal.SIGKILL:
            break
        kill_at = max(4, kill_at // 2)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill at step {kill_at}: {proc.stderr.read()}"
    seen = len(read_metrics(run / "metrics.jsonl"))
    assert seen < 32 and any(run.glob("ckpt-*.pt")), f"killed at {seen} steps"

    assert main(tiny_args(tiny_data, run, *args, "--resume", "auto")) == 0
    resumed = losses(run)
    assert [s for s, _ in resumed] == [s for s, _ in reference]
    for (s, la), (_, lb) in zip(resumed, reference, strict=True):
        assert la == lb, f"step {s} (killed after {seen} steps)"  # bitwise: the same ops in the same order


def test_resume_on_another_world_size_or_accumulation(tiny_data, tmp_path, capsys):
    """A run stopped after 8 steps continues as batch 4 x accum 2 with selective activation
    checkpointing (what the out-of-memory hint offers): the losses of batch 8 throughout. The run's
    effective batch (8: batch x processes) is kept, so --batch-size 4 alone accumulates 2; asking
    for another effective batch is refused."""
    main(tiny_args(tiny_data, tmp_path / "ref", "--epochs", "2"))
    run = tmp_path / "run"
    assert main(tiny_args(tiny_data, run, "--epochs", "2", "--max-steps", "8")) == 0
    assert main(tiny_args(tiny_data, run, "--epochs", "2")) == 2  # holds a run: refuses to overwrite it
    assert "--resume auto" in capsys.readouterr().err
    smaller = tiny_args(tiny_data, run, "--epochs", "2", "--batch-size", "4", "--resume", "auto")
    assert main([*smaller, "--effective-batch", "4"]) == 2  # another effective batch would be another run
    assert "--effective-batch 8" in capsys.readouterr().err
    assert main([*smaller, "--activation-checkpointing", "selective"]) == 0
    assert json.loads((run / "config.json").read_text())["resolved"]["accum_iter"] == 2
    times = [r["time"] for r in read_metrics(run / "metrics.jsonl")]
    assert times == sorted(times) and times[8] > times[7]  # the resumed run's time goes on (it restarted at 0)
    resumed, reference = losses(run), losses(tmp_path / "ref")
    assert [s for s, _ in resumed] == [s for s, _ in reference] == list(range(1, 17))
    for (s, a), (_, b) in zip(resumed, reference, strict=True):
        assert a == pytest.approx(b, rel=1e-6), f"step {s}"  # measured 1e-7: accumulation sums in another order


def test_resume_errors_are_one_line_and_fp16_can_follow_fp32(tiny_data, tmp_path, capsys):
    """A file that is no checkpoint, or one of another model, is a one-line error naming it; a run
    saved without a GradScaler (fp32) continues in fp16 with a fresh one."""
    run = tmp_path / "run"
    assert main(tiny_args(tiny_data, run, "--epochs", "2", "--max-steps", "2")) == 0
    capsys.readouterr()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(tiny_args(tiny_data, tmp_path / "other", "--resume", str(garbage))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot load the checkpoint {garbage}: UnpicklingError" in err[0], err
    assert main(tiny_args(tiny_data, run, "--resume", "auto", "--embed-dim", "64")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another model: --embed-dim 32 (this run: 64)" in err[0], err
    assert (
        main(tiny_args(tiny_data, run, "--epochs", "2", "--max-steps", "3", "--resume", "auto", "--precision", "fp16"))
        == 0
    )
    assert [s for s, _ in losses(run)] == [1, 2, 3]


def test_a_run_resumed_from_an_older_checkpoint_branches_off(tiny_data, tmp_path, capsys):
    """Resumed from step 2 of a run that reached 6: at the branch's first checkpoint the old 4 and 6
    are renamed *.superseded (kept), so --resume auto continues the branch, not the old timeline."""
    run = tmp_path / "run"
    args = ["--epochs", "2", "--ckpt-every-steps", "2", "--keep-last", "3"]
    assert main(tiny_args(tiny_data, run, *args, "--max-steps", "6")) == 0
    assert (
        main(tiny_args(tiny_data, run, *args, "--resume", str(run / "ckpt-step000000002.pt"), "--max-steps", "4")) == 0
    )
    names = sorted(p.name for p in run.glob("ckpt-*"))
    assert names == [
        "ckpt-step000000002.pt", "ckpt-step000000004.pt", "ckpt-step000000004.pt.superseded",
        "ckpt-step000000006.pt.superseded",
    ]  # fmt: skip
    assert "branched at step 2: the 2 later checkpoint(s) renamed *.pt.superseded" in capsys.readouterr().out
    # the old timeline's metrics past the branch point are kept beside the branch's
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl.superseded")] == [3, 4, 5, 6]
    assert main(tiny_args(tiny_data, run, *args, "--resume", "auto", "--max-steps", "5")) == 0
    assert "resuming" in capsys.readouterr().out and losses(run)[-1][0] == 5
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5]


def test_resume_from_the_run_dir_alone_continues_that_run(tiny_data, tmp_path, capsys):
    """`--run-dir R --resume auto` (what the stop messages print) takes R's saved config: the tiny
    model and its data, not the demo preset's; --max-steps of the first invocation is not carried."""
    main(tiny_args(tiny_data, tmp_path / "ref", "--epochs", "2"))
    run = tmp_path / "run"
    assert main(tiny_args(tiny_data, run, "--epochs", "2", "--max-steps", "5")) == 0
    assert main(["--run-dir", str(run), "--resume", "auto"]) == 0, capsys.readouterr().err
    assert [s for s, _ in losses(run)] == list(range(1, 17))
    assert losses(run) == losses(tmp_path / "ref")


def test_resuming_a_run_past_the_schedule_trains_nothing_and_keeps_its_config(tiny_data, tmp_path, capsys):
    """`--resume auto --epochs 1` on a run already 2 epochs in: nothing to train, said so, and the
    run's config.json keeps the schedule it ran (it was rewritten with epochs 1, which the next bare
    `--resume auto` then took)."""
    run = tmp_path / "run"
    assert main(tiny_args(tiny_data, run, "--epochs", "2", "--ckpt-every-steps", "4", "--keep-last", "4")) == 0
    before = (run / "config.json").read_text(), (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(tiny_args(tiny_data, run, "--epochs", "1", "--resume", "auto")) == 0
    assert "the run is at step 16, the end of this schedule (8 steps): nothing to train" in capsys.readouterr().out
    # from an older checkpoint too: its metrics were cut to that step, with the checkpoints after it kept
    assert main(tiny_args(tiny_data, run, "--epochs", "1", "--resume", str(run / "ckpt-step000000008.pt"))) == 0
    assert ((run / "config.json").read_text(), (run / "metrics.jsonl").read_text()) == before
    assert [s for s, _ in losses(run)] == list(range(1, 17))


def test_resuming_on_other_images_of_the_same_count_is_refused(tiny_data, tmp_path, capsys):
    """A file renamed between the kill and the resume: the same count, another data order (every later
    loss differed from the uninterrupted run's, with no word). Refused in one line; the count alone
    was compared."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    run = tmp_path / "run"
    assert main(tiny_args(data, run, "--epochs", "2", "--max-steps", "4")) == 0
    first = sorted(data.rglob("*.jpg"))[0]
    first.rename(first.with_name("renamed.jpg"))
    capsys.readouterr()
    assert main(tiny_args(data, run, "--epochs", "2", "--resume", "auto")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on other images (64 as here, but a file renamed" in err[0], err
    first.with_name("renamed.jpg").rename(first)
    assert main(tiny_args(data, run, "--epochs", "2", "--resume", "auto", "--max-steps", "5")) == 0
