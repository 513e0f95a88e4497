"""The trainer on CPU: a tiny run learns and leaves its files, exact resume after SIGKILL, failures.

Tiny model (32 px, patch 8, width 32, one block each) on 64 generated JPEGs, fp32, so every run
takes a second or two; the subprocess tests pay torch's import (~3 s) each.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmae import messages
from fastmae import train as train_mod
from fastmae.config import ConfigError, make_config
from fastmae.data import make_demo_dataset
from fastmae.log import read_metrics
from fastmae.rundir import release_run_dirs, resolve_run_dir
from fastmae.train import EXIT_NONFINITE, EXIT_OOM, EXIT_STOPPED, lr_at, main

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
    "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2",
    "--num-workers", "0", "--no-progress", "--log-every", "1", "--warmup-epochs", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and OpenMP threads spin badly on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """64 small JPEGs in an ImageFolder tree."""
    return make_demo_dataset(tmp_path_factory.mktemp("tiny_data"), n_images=64, size=40, seed=0)


def tiny_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, "--data-path", str(data), "--run-dir", str(run_dir), "--batch-size", "8", *extra]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen(
        [sys.executable, "-m", "fastmae.train", *args],
        cwd=kw.pop("cwd", REPO),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_lr_schedule_is_the_references():
    """Linear warm-up over fractional epochs, then half-cycle cosine down to min_lr."""
    cfg = make_config({"epochs": 10, "warmup_epochs": 2.0, "min_lr": 1e-6})
    peak = 1e-3
    assert lr_at(0.0, peak, cfg) == 0.0
    assert lr_at(1.0, peak, cfg) == pytest.approx(peak / 2)
    assert lr_at(2.0, peak, cfg) == pytest.approx(peak)
    assert lr_at(6.0, peak, cfg) == pytest.approx(1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(10.0, peak, cfg) == pytest.approx(1e-6)


def test_tiny_run_learns_and_leaves_its_files(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_args(tiny_data, run, "--epochs", "6", "--lr", "3e-3", "--vis-every-epochs", "3")) == 0
    out = capsys.readouterr().out
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 49))  # 64 images // 8 = 8 steps x 6 epochs
    assert {"step", "epoch", "loss", "lr", "img_s", "time"} <= set(records[0])
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-8:]) / 8
    assert last < 0.85 * first, f"loss did not fall: {first:.4f} -> {last:.4f}"
    ckpts = sorted(run.glob("ckpt-*.pt"))
    assert ckpts and ckpts[-1].name == "ckpt-step000000048.pt"
    assert sorted(p.name for p in run.glob("recon-*.png")) == ["recon-epoch0003.png", "recon-epoch0006.png"]
    assert '"lr": ' in (run / "config.json").read_text()
    for what in ("checkpoint", "metrics", "pictures", str(ckpts[-1])):
        assert what in out
    assert "data=torch (read in the main process); fresh run" in out


def test_the_start_line_says_how_many_workers_read_and_why_fewer():
    """--num-workers is cut to the CPUs the process may use (more only contend): say so, once."""
    note = messages.data_workers_note
    assert note(8, {"data_backend": "torch", "data_workers": 2}) == (
        " (2 workers: --num-workers 8 is more than the 2 CPUs this process may use)"
    )
    assert note(2, {"data_backend": "torch", "data_workers": 2}) == " (2 workers)"
    assert note(4, {"data_backend": "dali", "data_workers": 4}) == " (4 threads)"
    assert note(8, {"data_backend": "synthetic", "data_workers": 0}) == ""


@pytest.mark.parametrize("n_images", [64, 60])
def test_gradient_accumulation_changes_nothing(tiny_data, tmp_path, n_images):
    """batch 8 x accum 1 and batch 4 x accum 2 see the same images and masks: the same losses, and the
    same schedule. With 60 images the two loaders hold 7 and 15 micro-batches an epoch for the same 7
    steps: the schedule counts optimizer steps, so the learning rates agree exactly."""
    data = tiny_data
    if n_images != 64:
        data = tmp_path / "data"
        shutil.copytree(tiny_data, data)
        for p in sorted(data.rglob("*.jpg"))[n_images:]:
            p.unlink()
    main(tiny_args(data, tmp_path / "a", "--epochs", "2"))
    main(tiny_args(data, tmp_path / "b", "--epochs", "2", "--batch-size", "4", "--accum-iter", "2"))
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    steps_per_epoch = n_images // 8
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 2 * steps_per_epoch + 1))
    for ra, rb in zip(a, b, strict=True):
        s = ra["step"]
        assert ra["lr"] == rb["lr"], f"step {s}"
        assert ra["epoch"] == rb["epoch"] == round(s / steps_per_epoch, 4), f"step {s}"
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6), f"step {s}"  # measured 1e-7: the sums' order
    # the config records what ran: --accum-iter set the accumulation, the demo's effective_batch (0) did not
    resolved = json.loads((tmp_path / "b" / "config.json").read_text())["resolved"]
    assert (resolved["accum_iter"], resolved["effective_batch"]) == (2, 8)


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
def test_sigterm_stops_after_a_checkpoint_and_resumes_exactly(tiny_data, tmp_path, uninterrupted, to):
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


@pytest.mark.parametrize(
    "flags, hint",
    [
        ([], "--batch-size 8 (the effective batch 64 and so the recipe stay the same), or "
         "--activation-checkpointing full (results unchanged)"),  # auto: selective, compiled on CUDA
        (["--activation-checkpointing", "none"], "--batch-size 8 (the effective batch 64 and so the recipe "
         "stay the same), or --activation-checkpointing selective (recomputes norms and GELU) or full"),
        (["--activation-checkpointing", "selective", "--accum-iter", "2"],
         "--batch-size 8 --accum-iter 4 (the same effective batch 32), or --activation-checkpointing full"),
        (["--activation-checkpointing", "full", "--batch-size", "1"], "full activation checkpointing: this model"),
        # half of 5 does not divide 15: the largest batch that keeps it is 1; a fixed accumulation
        # of 2 at batch 3 becomes 6 at batch 1; no effective batch (the demo's): accumulate 2
        (["--batch-size", "5", "--effective-batch", "15"], "--batch-size 1 (the effective batch 15 and so"),
        (["--batch-size", "3", "--accum-iter", "2"], "--batch-size 1 --accum-iter 6 (the same effective batch 6)"),
        (["--effective-batch", "0"], "--batch-size 8 --accum-iter 2 (the same effective batch 16)"),
    ],
)  # fmt: skip
def test_out_of_memory_is_one_line_with_the_ways_to_fit(monkeypatch, capsys, flags, hint):
    def oom(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_mod, "train", oom)
    code = main(["--batch-size", "16", "--effective-batch", "64", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_OOM and len(err) == 1
    assert hint in err[0], err[0]


def test_nonfinite_loss_stops_the_run_with_a_hint(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(tiny_args(tiny_data, run, "--epochs", "2", "--lr", "1e30", "--warmup-epochs", "0", "--log-every", "4"))
    err = capsys.readouterr().err
    assert code == EXIT_NONFINITE
    assert "non-finite loss at step" in err and "--attn-backend math" in err and "lower --blr" in err
    assert len(err.strip().splitlines()) == 1
    step = int(err.split("non-finite loss at step ")[1].split()[0])
    assert 1 <= step <= 4  # found within the first log interval
    assert not any(run.glob("ckpt-*.pt"))  # nothing poisoned was saved


def test_nonfinite_loss_sets_the_checkpoint_that_caused_it_aside(tiny_data, tmp_path, capsys):
    """The checkpoint saved right before the non-finite loss holds the weights that gave it: it is
    renamed out of ``--resume auto``'s way, and the error names the newest verified one.

    Warm-up makes step 1's lr 0, so its checkpoint holds the initial weights; step 2's lr of ~1e29
    blows the weights up after step 2's (finite) loss, so step 3's loss is the first non-finite one.
    """
    run = tmp_path / "run"
    code = main(tiny_args(tiny_data, run, "--epochs", "2", "--lr", "1e30", "--ckpt-every-steps", "1"))
    err = capsys.readouterr().err
    assert code == EXIT_NONFINITE
    assert "non-finite loss at step 3 " in err and "ckpt-step000000001.pt (continue with --resume auto)" in err
    assert sorted(p.name for p in run.glob("ckpt-*")) == [
        "ckpt-step000000001.pt",
        "ckpt-step000000002.pt.nonfinite",
    ]
    from fastmae import checkpoint as ckpt

    path, state = ckpt.load_latest(run)
    assert path.name == "ckpt-step000000001.pt" and state["step"] == 1
    bad = ckpt.load_checkpoint(run / "ckpt-step000000002.pt.nonfinite")["model"]
    assert max(v.abs().max().item() for v in bad.values() if v.is_floating_point()) > 1e20


def test_nonfinite_loss_leaves_an_earlier_runs_checkpoints_alone(tiny_data, tmp_path, capsys):
    """A run reached step 6 (checkpoints 4 and 6 kept); resumed from step 2 with a huge lr, it
    blows up: what it wrote is set aside, the earlier timeline's 4 and 6 stay where they were."""
    run = tmp_path / "run"
    args = ["--epochs", "2", "--ckpt-every-steps", "2", "--keep-last", "3"]
    assert main(tiny_args(tiny_data, run, *args, "--max-steps", "6")) == 0
    assert [p.name for p in sorted(run.glob("ckpt-*"))] == [f"ckpt-step00000000{s}.pt" for s in (2, 4, 6)]
    capsys.readouterr()
    code = main(tiny_args(tiny_data, run, *args, "--resume", str(run / "ckpt-step000000002.pt"), "--lr", "1e30",
                          "--warmup-epochs", "0"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == EXIT_NONFINITE and "non-finite loss at step 4 " in err, err
    assert sorted(p.name for p in run.glob("ckpt-*")) == [f"ckpt-step00000000{s}.pt" for s in (2, 4, 6)]
    assert "ckpt-step000000006.pt (its weights are" not in err and "ckpt-step000000006.pt" in err


def test_bad_data_is_one_line_without_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(tiny_args(empty, tmp_path / "run"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("python -m fastmae.train: error:")


def test_bad_files_are_counted_and_a_fresh_run_drops_a_stale_report(tiny_data, tmp_path, capsys):
    """A run killed before its first checkpoint leaves its bad-file reports (here from two ranks and
    a file the new data does not have): a fresh run in that directory starts its report afresh,
    lists the files it met itself and counts them in its summary."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for i in range(8):  # 72 images, 9 batches of 8: every one read in the epoch
        (data / "stripes" / f"bad{i}.jpg").write_bytes(b"")
    run = tmp_path / "run"
    run.mkdir()
    (run / "bad_files.txt").write_text("/elsewhere/ghost.jpg\tempty file\n")
    (run / "bad_files.rank1.txt").write_text("/elsewhere/ghost2.jpg\tempty file\n")
    assert main(tiny_args(data, run, "--epochs", "1")) == 0
    assert sorted(p.name for p in run.glob("bad_files*")) == ["bad_files.txt"]
    listed = [line.split("\t")[0] for line in (run / "bad_files.txt").read_text().splitlines()]
    assert sorted(listed) == [str(data / "stripes" / f"bad{i}.jpg") for i in range(8)]
    assert f"bad files   8 unreadable, replaced by stand-ins: {run / 'bad_files.txt'}" in capsys.readouterr().out


def test_default_run_dirs_never_overwrite_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_run_dir(make_config()) == (Path("runs/demo"), None)
    (tmp_path / "runs/demo/ckpt-step000000010.pt").write_bytes(b"")
    assert resolve_run_dir(make_config()) == (Path("runs/demo-2"), None)  # a second `python -m fastmae.train`
    run_dir, path = resolve_run_dir(make_config({"resume": "auto"}))
    assert run_dir == Path("runs/demo") and path.name == "ckpt-step000000010.pt"
    assert resolve_run_dir(make_config({"resume": str(path)})) == (Path("runs/demo"), path)
    release_run_dirs()


def test_a_run_dir_in_use_is_not_shared(tmp_path, monkeypatch):
    """Two runs started in one directory replaced each other's metrics and config and deleted the
    checkpoint the other was writing. A run holds its directory (flock): a default one is passed
    over, a named one refused, and a killed holder holds nothing (the kernel drops its lock)."""
    import fcntl

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/demo").mkdir(parents=True)
    other = open(tmp_path / "runs/demo/.fastmae.lock", "a+")  # another open file: another holder
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    other.write("pid 4242 on elsewhere\n")
    other.flush()
    assert resolve_run_dir(make_config()) == (Path("runs/demo-2"), None)
    with pytest.raises(ConfigError, match=r"runs/demo is in use by another run \(pid 4242 on elsewhere\)"):
        resolve_run_dir(make_config({"run_dir": "runs/demo"}))
    other.close()
    assert resolve_run_dir(make_config({"run_dir": "runs/demo"})) == (Path("runs/demo"), None)
    release_run_dirs()


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


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_compiled_bf16_run_and_resume(tiny_data, tmp_path, fused):
    """The GPU defaults (compile, bf16, fused AdamW, the Triton path or not): learns, resumes exactly."""
    flag = "--fused" if fused else "--no-fused"
    args = ["--epochs", "4", "--lr", "3e-3", "--device", "cuda", flag, "--ckpt-every-steps", "4"]
    assert main(tiny_args(tiny_data, tmp_path / "ref", *args)) == 0
    reference = losses(tmp_path / "ref")
    assert all(math.isfinite(loss) for _, loss in reference)
    assert sum(loss for _, loss in reference[-8:]) / 8 < 0.9 * reference[0][1]
    config = (tmp_path / "ref" / "config.json").read_text()
    assert '"compile": true' in config and '"precision": "bf16"' in config
    rows = [r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]
    assert all(0 < r["max_mem_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30 for r in rows)
    run = tmp_path / "run"
    assert main(tiny_args(tiny_data, run, *args, "--max-steps", "13")) == 0
    assert main(tiny_args(tiny_data, run, *args, "--resume", "auto")) == 0
    for (s, a), (_, b) in zip(losses(run), reference, strict=True):
        # atomics in CUDA backward passes are not bitwise deterministic: compare at bf16-run noise, not 0
        assert a == pytest.approx(b, rel=2e-2), f"step {s}"


def test_compiled_bf16_run_resumes_exactly_cpu(tiny_data, tmp_path):
    """The CPU twin of the CUDA test above: compiled, bf16 autocast, killed-and-resumed (here by
    --max-steps) gives the uninterrupted run's losses. On CPU the compiled kernels are deterministic,
    so exactly; the fused path is CUDA's (its kernels are interpreted on CPU, not compiled)."""
    args = ["--epochs", "2", "--lr", "3e-3", "--device", "cpu", "--compile", "--precision", "bf16",
            "--ckpt-every-steps", "4"]  # fmt: skip
    assert main(tiny_args(tiny_data, tmp_path / "ref", *args)) == 0
    reference = losses(tmp_path / "ref")
    config = (tmp_path / "ref" / "config.json").read_text()
    assert '"compile": true' in config and '"precision": "bf16"' in config
    run = tmp_path / "run"
    assert main(tiny_args(tiny_data, run, *args, "--max-steps", "5")) == 0
    assert main(tiny_args(tiny_data, run, *args, "--resume", "auto")) == 0
    assert losses(run) == reference and len(reference) == 16


@pytest.mark.gpu
def test_cuda_fp32_precision_turns_tf32_off(tiny_data, tmp_path):
    """``--precision fp32`` (the non-finite hint's fallback) means fp32 matmuls, not TF32."""
    args = ["--max-steps", "1", "--device", "cuda", "--no-compile", "--no-fused"]
    assert main(tiny_args(tiny_data, tmp_path / "a", *args, "--precision", "fp32")) == 0
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert main(tiny_args(tiny_data, tmp_path / "b", *args, "--precision", "bf16")) == 0
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_selective_checkpoint_notice_is_dropped_and_nothing_else(caplog):
    """Dynamo's in-place notice would print on every compiled CUDA run (selective is the default there)."""
    import logging

    log = logging.getLogger("torch._higher_order_ops.wrap")
    before = list(log.filters)
    try:
        messages.quiet_selective_checkpoint_notice()
        messages.quiet_selective_checkpoint_notice()  # idempotent
        assert len(log.filters) == len(before) + 1
        with caplog.at_level(logging.WARNING, logger="torch._higher_order_ops.wrap"):
            log.warning("\nDetected that context_fn is passed to torch.utils.checkpoint under torch.compile.\n")
            log.warning("something else")
        assert [r.getMessage() for r in caplog.records] == ["something else"]
    finally:
        log.filters[:] = before


def test_compile_mode_reaches_torch_compile(tiny_data, tmp_path, monkeypatch, capsys):
    """--compile-mode is torch.compile's mode (None for default); the start line says which."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    run = tmp_path / "run"
    args = ["--epochs", "1", "--max-steps", "1", "--compile", "--compile-mode", "max-autotune-no-cudagraphs"]
    assert main(tiny_args(tiny_data, run, *args)) == 0
    assert seen == [{"mode": "max-autotune-no-cudagraphs"}]
    assert "compile=True (max-autotune-no-cudagraphs)" in capsys.readouterr().out
    assert main(tiny_args(tiny_data, tmp_path / "default", "--epochs", "1", "--max-steps", "1", "--compile")) == 0
    assert seen[1] == {"mode": None} and "compile=True, " in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_bf16_residual_stream_needs_bf16_autocast(tiny_data, tmp_path, capsys, precision):
    """--residual-dtype autocast is a one-line error unless the run is bf16: in fp32 it would do
    nothing, in fp16 the stream could overflow. Nothing is written before it."""
    run = tmp_path / "run"
    argv = tiny_args(tiny_data, run, "--epochs", "1", "--residual-dtype", "autocast", "--precision", precision)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"needs --precision bf16 (this run: {precision};" in err[0]
    assert not run.exists()


def test_triton_attention_on_cpu_runs_interpreted(monkeypatch):
    """``--attn-backend triton`` on a CPU machine switches the Triton interpreter on, as ``--fused`` does."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = make_config({"attn_backend": "triton", "decoder_attn_backend": "sdpa", "fused": False})
    model = train_mod.build_model(cfg, torch.device("cpu"))
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert model.blocks[0].attn.backend == "triton" and model.decoder_blocks[0].attn.backend == "sdpa"


def test_resume_from_the_run_dir_alone_continues_that_run(tiny_data, tmp_path, capsys):
    """`--run-dir R --resume auto` (what the stop messages print) takes R's saved config: the tiny
    model and its data, not the demo preset's; --max-steps of the first invocation is not carried."""
    main(tiny_args(tiny_data, tmp_path / "ref", "--epochs", "2"))
    run = tmp_path / "run"
    assert main(tiny_args(tiny_data, run, "--epochs", "2", "--max-steps", "5")) == 0
    assert main(["--run-dir", str(run), "--resume", "auto"]) == 0, capsys.readouterr().err
    assert [s for s, _ in losses(run)] == list(range(1, 17))
    assert losses(run) == losses(tmp_path / "ref")


def test_init_from_starts_a_fresh_run_from_another_runs_weights(tiny_data, tmp_path, capsys):
    """Continued pretraining: a new run starts from an earlier run's weights (with lr 0 its first
    checkpoint holds them unchanged), with its own optimizer and schedule from step 1; once it has a
    checkpoint of its own, resuming reads that instead; an encoder of another shape is a one-line error."""
    main(tiny_args(tiny_data, tmp_path / "a", "--epochs", "1", "--max-steps", "3", "--lr", "3e-3"))
    source = tmp_path / "a" / "ckpt-step000000003.pt"
    capsys.readouterr()
    run = tmp_path / "b"
    args = tiny_args(tiny_data, run, "--epochs", "1", "--init-from", str(source), "--lr", "0")
    assert main([*args, "--max-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert f"fresh run from {source} (" in out and "decoder loaded" in out
    a = torch.load(source, weights_only=True)["model"]
    b = torch.load(run / "ckpt-step000000001.pt", weights_only=True)
    assert b["step"] == 1 and a.keys() == b["model"].keys()
    assert all(torch.equal(a[k], b["model"][k]) for k in a)
    moved = source.rename(tmp_path / "moved.pt")  # a resumed run needs only its own checkpoints
    assert main([*args, "--max-steps", "2", "--resume", "auto"]) == 0
    assert "not read: resuming" in capsys.readouterr().out
    assert [s for s, _ in losses(run)] == [1, 2]
    moved.rename(source)

    assert main(tiny_args(tiny_data, tmp_path / "c", "--init-from", str(source), "--embed-dim", "64")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its encoder has embed_dim 32 where this run's has embed_dim 64" in err[0], err
    assert not (tmp_path / "c").exists()  # checked before the data is opened or anything is written
    assert main(tiny_args(tiny_data, tmp_path / "c", "--init-from", str(source), "--num-heads", "4")) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the heads are in the checkpoint's config
    assert len(err) == 1 and "its encoder has num_heads 2 where this run's has num_heads 4" in err[0], err
    with pytest.raises(SystemExit) as e:  # argparse's one-line usage error, before anything runs
        main(tiny_args(tiny_data, tmp_path / "d", "--init-from", str(tmp_path / "none.pt")))
    assert e.value.code == 2 and not (tmp_path / "d").exists()
    assert f"--init-from {tmp_path / 'none.pt'} does not exist" in capsys.readouterr().err.strip().splitlines()[-1]
    # with --resume auto the file is checked only where it is read: a run with no checkpoint yet
    assert main(tiny_args(tiny_data, tmp_path / "e", "--init-from", str(tmp_path / "none.pt"), "--resume", "auto")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--init-from {tmp_path / 'none.pt'}: cannot read" in err[0], err


def test_a_floor_above_the_peak_lr_and_the_continue_hint(tiny_data, tmp_path, capsys):
    """A --min-lr above the peak would make the cosine climb: a one-line error. A run stopped by
    --max-steps continues with --resume auto alone; one whose schedule ran out needs more --epochs."""
    assert main(tiny_args(tiny_data, tmp_path / "a", "--lr", "1e-3", "--min-lr", "1e-2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "min_lr 0.01 is above the peak lr 0.001" in err[0], err
    assert main(tiny_args(tiny_data, tmp_path / "b", "--epochs", "1", "--max-steps", "2")) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"--run-dir {tmp_path / 'b'} --resume auto")
    assert main(tiny_args(tiny_data, tmp_path / "b", "--epochs", "1", "--resume", "auto")) == 0
    assert "--resume auto --epochs N" in capsys.readouterr().out.strip().splitlines()[-1]


def test_ctrl_c_says_which_run_to_continue(tmp_path, monkeypatch, capsys):
    """The interrupt's message names the run directory, as the SIGTERM one does (a default run
    directory, runs/<preset>-N, is not something the user typed)."""
    import fastmae.train as train_module
    from fastmae.rundir import hold_run_dir

    def interrupted(cfg):
        hold_run_dir(tmp_path / "runs" / "demo-2")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    assert main([]) == 130  # before its first checkpoint: there is nothing to continue
    assert "interrupted before the run's first checkpoint: nothing to continue" in capsys.readouterr().err
    where = (tmp_path / "runs" / "demo-2").resolve()
    where.mkdir(parents=True, exist_ok=True)
    (where / "ckpt-step000000004.pt").write_bytes(b"")
    assert main([]) == 130
    err = capsys.readouterr().err
    assert f"continue from the last checkpoint with python -m fastmae.train --run-dir {where} --resume auto" in err


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


def test_a_collective_that_timed_out_is_one_line_with_the_hint(monkeypatch, capsys):
    """gloo raises a plain RuntimeError ("Timed out waiting 3000ms for recv operation") when another
    rank stopped or hangs: a traceback that did not mention --dist-timeout."""
    import fastmae.train as train_module

    def stuck(cfg):
        raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation")

    monkeypatch.setattr(train_module, "train", stuck)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["--dist-timeout", "0.05"]) == train_module.EXIT_DIST_TIMEOUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[rank 1] waited --dist-timeout (0.05 min) for the other processes" in err[0], err
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="Timed out"):  # one process: not a collective's, left as it is
        main([])


def test_demo_images_another_node_does_not_see_are_a_one_line_error(tmp_path, monkeypatch):
    """The demo's images are made by rank 0 alone: a node with its own FASTMAE_CACHE failed on a
    missing folder, with no word of why."""
    from fastmae import distributed
    from fastmae.config import make_config
    from fastmae.data import DataError
    from fastmae.train import open_data

    monkeypatch.setenv("FASTMAE_CACHE", str(tmp_path / "cache"))
    env = distributed.DistEnv(rank=1, world_size=2)  # not rank 0: nothing made here
    with pytest.raises(DataError, match="made once, by rank 0, in .*set FASTMAE_CACHE to a folder every node shares"):
        open_data(make_config({"demo_images": 32}), env, tmp_path / "run")
