"""torchrun on CPU: 2 gloo processes give the losses of 1 process with the same effective batch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastmae.log import read_metrics
from fastmae.train import main
from tests.training import REPO, losses, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_processes_match_one(tiny_data, tmp_path):  # noqa: F811
    """1 process x 16 images vs 2 gloo processes x 4 images x accum 2: same images, masks, losses.

    The masking noise of a step is drawn for the whole effective batch from (seed, step) and sliced
    per rank and micro-step, so it does not depend on the world size.
    """
    assert main(tiny_args(tiny_data, tmp_path / "one", "--epochs", "2", "--batch-size", "16")) == 0
    proc = _torchrun(*tiny_args(tiny_data, tmp_path / "two", "--epochs", "2"), "--batch-size", "4", "--accum-iter", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("done: step 8") == 1  # rank 0 reports
    assert f"continue:     torchrun --standalone --nproc_per_node 2 -m fastmae.train --run-dir {tmp_path / 'two'}" in (
        proc.stdout
    )
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 9))
    for (s, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=1e-6), f"step {s}"  # measured 1e-7: the all-reduce's order
    assert (
        read_metrics(tmp_path / "two" / "metrics.jsonl")[0]["lr"]
        == read_metrics(tmp_path / "one" / "metrics.jsonl")[0]["lr"]
    )
    assert (tmp_path / "two" / "ckpt-step000000008.pt").is_file()


def test_a_bad_knn_source_is_every_ranks_one_line_error(tiny_data, tmp_path):  # noqa: F811
    """``--knn-every`` on unlabelled images: rank 0 finds it, every rank exits 2 with the one line
    (not rank 1 with a lost-peer traceback), before the run directory gets a config or metrics."""
    flat = _flat_copy(tiny_data, tmp_path / "flat", 32)
    run = tmp_path / "run"
    proc = _torchrun(*tiny_args(flat, run, "--epochs", "1", "--batch-size", "4", "--knn-every", "1"))
    err = proc.stderr
    assert proc.returncode != 0
    assert err.count("error: --knn-every needs labelled images") == 1  # rank 0 prints it
    _ranks_exit_2(err)
    assert "Connection closed" not in err and err.count("Traceback") == 1  # torchrun's own only
    assert not (run / "config.json").exists() and not (run / "metrics.jsonl").exists()


def test_every_rank_reports_its_bad_files(tiny_data, tmp_path):  # noqa: F811
    """Each rank reads its own shard, so each writes the bad files it met to the run directory; the
    run's end joins them into one report and counts them once."""
    data = _flat_copy(tiny_data, tmp_path / "data", 30)
    (data / "bad_a.jpg").write_bytes(b"")
    (data / "bad_b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    run = tmp_path / "run"
    proc = _torchrun(*tiny_args(data, run, "--epochs", "2", "--batch-size", "4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reported = {}
    for rank in (0, 1):
        for line in (run / f"bad_files.rank{rank}.txt").read_text().splitlines():
            reported[line.split("\t")[0]] = rank
    assert {os.path.basename(p) for p in reported} == {"bad_a.jpg", "bad_b.jpg"}
    # at the end, rank 0 joins them: each file once, counted in its summary
    merged = (run / "bad_files.txt").read_text().splitlines()
    assert sorted(os.path.basename(line.split("\t")[0]) for line in merged) == ["bad_a.jpg", "bad_b.jpg"]
    assert proc.stdout.count(f"bad files   2 skipped (unreadable or missing): {run / 'bad_files.txt'}") == 1


def test_a_knn_path_without_labels_is_every_ranks_one_line_error(tiny_data, tmp_path):  # noqa: F811
    """The same with --knn-data-path naming unlabelled images: the monitor itself (its label and
    split checks) is built by rank 0 before the broadcast, so rank 1 does not run into DDP alone."""
    flat = _flat_copy(tiny_data, tmp_path / "flat", 12)
    run = tmp_path / "run"
    train_args = tiny_args(tiny_data, run, "--epochs", "1", "--batch-size", "4")
    proc = _torchrun(*train_args, "--knn-every", "1", "--knn-data-path", str(flat))
    err = proc.stderr
    assert proc.returncode != 0
    _ranks_exit_2(err)
    assert "labelled" in err and "Connection closed" not in err and err.count("Traceback") == 1
    assert not (run / "config.json").exists()


def test_a_shards_data_error_is_told_by_its_rank(tiny_data, tmp_path):  # noqa: F811
    """Every file rank 1's first image and its 15 stand-ins would read is empty, each of rank 0's
    slots has a readable one: rank 1 alone stops with "the data set looks broken". It says so itself, with its rank
    (rank 0 only sees a lost peer; the one line was printed by rank 0 alone, so never)."""
    from fastmae.data.sampling import EpochPlan, tried_indices

    data = _flat_copy(tiny_data, tmp_path / "data", 64)  # sorted: file i is index i
    first = int(EpochPlan(64, 4, seed=0, rank=1, world_size=2).batch_indices(0, 0)[0])
    bad = tried_indices(0, 0, first, 64)
    for j in EpochPlan(64, 4, seed=0, rank=0, world_size=2).batch_indices(0, 0).tolist():
        assert tried_indices(0, 0, j, 64) - bad  # each of rank 0's slots has a readable candidate
    for i in bad:
        (data / f"{i:02d}.jpg").write_bytes(b"")
    proc = _torchrun(*tiny_args(data, tmp_path / "run", "--epochs", "1", "--batch-size", "4"))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("python -m fastmae.train: error:")]
    assert len(lines) == 1 and lines[0].startswith("python -m fastmae.train: error: [rank 1] "), proc.stderr[-3000:]
    assert lines[0].endswith("the data set looks broken (see the bad-file report)")


def _ranks_exit_2(err: str) -> None:
    """torchrun's failure summary: each rank exited 2 (the one-line error), or was stopped by
    torchrun's SIGTERM once the other had (which of the two exits first is a race)."""
    codes = re.findall(r"exitcode\s*: (-?\d+)", err)
    assert codes and set(codes) <= {"2", "-15"} and "2" in codes, err[-3000:]


def _torchrun(*train_args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m fastmae.train ARGS`` on CPU (gloo), one thread a process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, "fastmae.train", *train_args], env=env, capture_output=True, text=True,
                          timeout=240, cwd=REPO)  # fmt: skip


def _flat_copy(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` JPEGs under ``src`` in one folder, unlabelled."""
    dst.mkdir()
    for i, p in enumerate(sorted(src.rglob("*.jpg"))[:n]):
        (dst / f"{i:02d}.jpg").write_bytes(p.read_bytes())
    return dst


def test_ranks_that_see_different_data_are_refused(monkeypatch):
    """Each rank scans the data itself; a rank seeing other files would read a permutation of another
    set (a tenth of its images twice an epoch, as many never) with no error: refused, said once."""
    from fastmae import distributed
    from fastmae.data import DataError, Source
    from fastmae.data.sources import samples_digest
    from fastmae.train import check_same_data

    class Loader:  # unlabelled images are checked too (they were left out)
        source = Source(root="/d", samples=[("/d/a.jpg", -1), ("/d/b.jpg", -1)], kind="scan")

    mine = []
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: mine.append(obj) or [obj, obj])
    check_same_data(Loader())  # the same view on both ranks
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [obj, (1, "0" * 16)])
    with pytest.raises(DataError, match="the processes see different data sets \\(images rank 0: 2, rank 1: 1") as e:
        check_same_data(Loader())
    assert mine[0][0] == 2 and not getattr(e.value, "rank_local", False)  # every rank's: rank 0 says it
    # the same files mounted elsewhere on another node are the same data set
    elsewhere = Source(root="/mnt/e", samples=[("/mnt/e/a.jpg", -1), ("/mnt/e/b.jpg", -1)], kind="scan")
    assert samples_digest(elsewhere) == samples_digest(Loader.source)


def test_a_gpu_index_under_torchrun_is_refused(monkeypatch):
    """--device cuda:1 under torchrun would put every process on that one GPU."""
    from fastmae.config import ConfigError
    from fastmae.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--device cuda:1 under torchrun would put every process on one GPU"):
        init_distributed("cuda:1")


def test_an_error_every_rank_meets_is_said_once(tiny_data, tmp_path):  # noqa: F811
    """A set-up error (here the lr floor above the peak) is every rank's: rank 0 alone says it."""
    proc = _torchrun(*tiny_args(tiny_data, tmp_path / "run", "--epochs", "1", "--batch-size", "4", "--min-lr", "1"))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("python -m fastmae.train: error:")]
    assert len(lines) == 1 and "min_lr 1 is above the peak lr" in lines[0], proc.stderr[-3000:]
    _ranks_exit_2(proc.stderr)


RANKED = """
import os, sys
from fastmae.train import main
sys.exit(main([a.replace("{rank}", os.environ["RANK"]) for a in sys.argv[1:]]))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_ranks_with_other_settings_are_refused(tiny_data, tmp_path):  # noqa: F811
    """Each node reads its own config files: a node with another --blr trained a diverging copy of
    the model without a word. Every rank's settings are compared at the start."""
    script = tmp_path / "ranked.py"
    script.write_text(RANKED)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    args = tiny_args(tiny_data, tmp_path / "run", "--epochs", "1", "--batch-size", "4", "--blr", "1{rank}e-3")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("python -m fastmae.train: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "the processes run different settings: blr (rank 0: 0.01, rank 1: 0.011)" in lines[0]
    _ranks_exit_2(proc.stderr)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_rank_refused_before_the_group_forms_does_not_leave_the_others_waiting(tiny_data, tmp_path):  # noqa: F811
    """Two nodes (two torchrun agents, one process each); node 1's --data-path does not exist there.
    Refused before the process group formed, its process left, and node 0's waited for it in its
    first collective for --dist-timeout (30 min): now it joins to say so, and both end at once."""
    script = tmp_path / "ranked.py"
    script.write_text(RANKED)
    (tmp_path / "data0").symlink_to(tiny_data)  # data{rank}: node 0 has it, node 1 not
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = tiny_args(tmp_path / "data{rank}", tmp_path / "run", "--epochs", "1", "--batch-size", "4")
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"localhost:{port}",
                "--rdzv_id",
                "t",
                str(script),
                *args,
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    try:
        outs = [a.communicate(timeout=120) for a in agents]  # the old behaviour: --dist-timeout, 30 min
    finally:
        for a in agents:
            a.kill()
    err = "".join(e for _, e in outs)
    assert all(a.returncode != 0 for a in agents), err[-3000:]
    assert "--data-path" in err and "does not exist" in err
    assert "error: a process could not start (rank 1: --data-path" in err  # said by rank 0


def test_a_refused_rank_joins_with_the_others_device_or_not_at_all(tmp_path, monkeypatch):
    """The refused rank guesses the backend the others chose from its device: from the flag (argparse's
    --dev abbreviation too) or a --config file; with --device cuda:N (which the others refuse before
    joining) it does not join at all, where it would wait for them."""
    from fastmae import distributed

    joined = []
    monkeypatch.setattr(distributed, "init_distributed", lambda device, timeout_min=None: joined.append(device))
    monkeypatch.setattr(distributed, "start_together", lambda settings, error=None: None)
    config = tmp_path / "c.json"
    config.write_text('{"device": "cpu", "blr": 1e-3}')
    for argv, device in (
        (["--device", "cpu"], "cpu"),
        (["--dev", "cuda"], "cuda"),
        (["--device=cpu"], "cpu"),
        (["--config", str(config)], "cpu"),
        (["--config", str(tmp_path / "missing.json")], "auto"),
        (["--depth", "2"], "auto"),
        (["--device", "cuda:1"], None),
    ):
        joined.clear()
        distributed._join_to_fail("refused", argv)
        assert joined == ([device] if device else []), argv
