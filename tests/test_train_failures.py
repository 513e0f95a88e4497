"""The trainer's failures: out of memory, a non-finite loss, bad data and bad files, Ctrl-C, a
collective's timeout; each one line with what to do, and nothing lost."""

from __future__ import annotations

import shutil

import pytest
import torch

from fastmae import train as train_mod
from fastmae.config import make_config
from fastmae.train import EXIT_NONFINITE, EXIT_OOM, main
from tests.training import run_cli, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert f"bad files   8 skipped (unreadable or missing): {run / 'bad_files.txt'}" in capsys.readouterr().out


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
    from fastmae.data import DataError
    from fastmae.train import open_data

    monkeypatch.setenv("FASTMAE_CACHE", str(tmp_path / "cache"))
    env = distributed.DistEnv(rank=1, world_size=2)  # not rank 0: nothing made here
    with pytest.raises(DataError, match="made once, by rank 0, in .*set FASTMAE_CACHE to a folder every node shares"):
        open_data(make_config({"demo_images": 32}), env, tmp_path / "run")
