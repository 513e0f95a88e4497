"""Checkpoint files: atomic writes survive a crash mid-write, retention, RNG state round trip."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmae import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]


def _state(step: int, n: int = 1000) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(n, generator=g)}, "step": step, "config": {"preset": "demo", "lr": None}}


def test_crash_during_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(_state(1), tmp_path, step=1, keep_last=3)

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(_state(2), tmp_path, step=2, keep_last=3)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-step000000001.pt"]  # the temporary file is gone
    path, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], _state(1)["model"]["w"])


def test_ctrl_c_during_write_is_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C inside torch.save: its zip writer's clean-up fails on the torn file, and that error
    reached the trainer instead of the KeyboardInterrupt (a traceback and exit 1, not exit 130 with
    the resume hint)."""
    ckpt.save_checkpoint(_state(1), tmp_path, step=1, keep_last=3)

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5194048")  # noqa: B904

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt) as info:
        ckpt.save_checkpoint(_state(2), tmp_path, step=2, keep_last=3)
    assert "unexpected pos" in str(info.value.__cause__)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-step000000001.pt"]
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not interrupted")))
    with pytest.raises(RuntimeError, match="not interrupted"):  # other errors stay what they are
        ckpt.save_checkpoint(_state(2), tmp_path, step=2, keep_last=3)


def test_ctrl_c_as_the_temp_file_opens_leaves_nothing(tmp_path, monkeypatch):
    """A Ctrl-C raised as os.open returns (2 of 9 Ctrl-C tries of a real run): the empty temp file
    it had just made stayed in the run directory."""
    real_open = os.open

    def open_then_interrupted(path, *args, **kwargs):
        os.close(real_open(path, *args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "open", open_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(_state(1), tmp_path, step=1, keep_last=3)
    assert os.listdir(tmp_path) == []


def test_sigkill_during_write_leaves_the_previous_checkpoint(tmp_path):
    """A process killed while it writes a (large) checkpoint: the previous one is still the latest."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from fastmae import checkpoint as ckpt
        ckpt.save_checkpoint({{"w": torch.ones(10), "step": 1}}, {str(tmp_path)!r}, step=1, keep_last=3)
        real_save = torch.save

        class KillMidway:  # a file that dies after 4 MB of a 40 MB checkpoint
            def __init__(self, f): self.f, self.n = f, 0
            def write(self, b):
                self.n += len(b)
                if self.n > 4_000_000:
                    self.f.write(bytes(b)[: len(b) // 2])
                    self.f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                return self.f.write(b)
            def __getattr__(self, name): return getattr(self.f, name)

        torch.save = lambda obj, f: real_save(obj, KillMidway(f))
        ckpt.save_checkpoint({{"w": torch.randn(10_000_000), "step": 2}}, {str(tmp_path)!r}, step=2, keep_last=3)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]
    assert leftovers and leftovers[0].stat().st_size > 1_000_000  # it really died mid-write
    path, state = ckpt.load_latest(tmp_path)
    assert path.name == "ckpt-step000000001.pt" and state["step"] == 1
    ckpt.save_checkpoint({"step": 3}, tmp_path, step=3, keep_last=3)  # the next save sweeps the debris
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]


def test_retention_keeps_the_last_n_and_every_kth_epoch(tmp_path):
    for step in range(1, 8):
        keep_epoch = step if step in (2, 4) else None  # epoch checkpoints are kept forever
        ckpt.save_checkpoint({"step": step}, tmp_path, step=step, keep_last=2, keep_epoch=keep_epoch)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "ckpt-epoch0002-step000000002.pt",
        "ckpt-epoch0004-step000000004.pt",
        "ckpt-step000000006.pt",
        "ckpt-step000000007.pt",
    ]
    assert ckpt.list_checkpoints(tmp_path)[-1][0] == 7


def test_damaged_newest_checkpoint_falls_back(tmp_path):
    ckpt.save_checkpoint({"step": 1}, tmp_path, step=1, keep_last=3)
    (tmp_path / ckpt.checkpoint_name(2)).write_bytes(b"not a checkpoint")
    path, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 1


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    # one gauss / randn each: both generators hold the pair's second normal back for the next call
    random.random(), random.gauss(0.0, 1.0), np.random.randn(), torch.rand(1)
    ckpt.atomic_save({"rng": ckpt.rng_state()}, tmp_path / "rng.pt")
    expected = (random.gauss(0.0, 1.0), random.random(), np.random.randn(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "rng.pt")["rng"])  # weights_only=True
    assert random.gauss(0.0, 1.0) == expected[0]  # the held-back normal (random's gauss_next)
    assert random.random() == expected[1]
    assert np.random.randn() == expected[2]
    assert torch.equal(torch.rand(3), expected[3])


class _FakeCuda:
    """torch.cuda's RNG-state calls on a machine with ``n`` GPUs, each state a distinct tensor."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int, offset: int = 0):
        self.states = [torch.arange(16, dtype=torch.uint8) + 16 * i + offset for i in range(n)]
        self.restored: list[list[torch.Tensor]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: self.restored.append(list(states)))


def test_cuda_rng_state_round_trips(tmp_path, monkeypatch):
    """The CPU twin of a GPU resume: every device's CUDA RNG state saved is the one restored (a
    saved state is only restored onto as many devices as it was saved from)."""
    saved = _FakeCuda(monkeypatch, n=2)
    ckpt.atomic_save({"rng": ckpt.rng_state()}, tmp_path / "rng.pt")
    state = ckpt.load_checkpoint(tmp_path / "rng.pt")["rng"]  # weights_only=True
    now = _FakeCuda(monkeypatch, n=2, offset=100)  # another process: other states, nothing restored yet
    ckpt.set_rng_state(state)
    assert len(now.restored) == 1 and len(now.restored[0]) == 2
    assert all(torch.equal(a, b) for a, b in zip(now.restored[0], saved.states, strict=True))
    other = _FakeCuda(monkeypatch, n=1)  # resumed on another GPU count: CUDA's RNG left alone
    ckpt.set_rng_state(state)
    assert other.restored == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # saved without CUDA: no "cuda" entry
    assert "cuda" not in ckpt.rng_state()


def test_run_checkpoints_names_keeps_and_branches(tmp_path, capsys):
    for step in (4, 6):  # an older timeline, past the step this run resumed from
        ckpt.save_checkpoint({"step": step}, tmp_path, step=step, keep_last=5)
    other = ckpt.RunCheckpoints(tmp_path, keep_last=2, keep_every_epochs=2, main=False, branched_from=2)
    assert other.save(3, epoch=1, epoch_end=True, state=lambda: pytest.fail("rank 0 alone builds the state"))
    assert other.save(3, epoch=1, epoch_end=True, state=dict).name == "ckpt-epoch0001-step000000003.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-step000000004.pt", "ckpt-step000000006.pt"]

    run = ckpt.RunCheckpoints(tmp_path, keep_last=2, keep_every_epochs=2, main=True, branched_from=2)
    assert run.save(3, epoch=0, epoch_end=True, state=lambda: {"step": 3}).name == "ckpt-step000000003.pt"
    assert "branched at step 2: the 2 later checkpoint(s)" in capsys.readouterr().out
    assert run.save(5, epoch=1, epoch_end=True, state=lambda: {"step": 5}).name == "ckpt-epoch0001-step000000005.pt"
    run.save(6, epoch=2, epoch_end=False, state=lambda: {"step": 6})  # once only: the branch's own 6 stays
    assert not capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-epoch0001-step000000005.pt",
        "ckpt-step000000003.pt",
        "ckpt-step000000004.pt.superseded",
        "ckpt-step000000006.pt",
        "ckpt-step000000006.pt.superseded",
    ]
    assert [p.name for p in run.written] == [
        "ckpt-step000000003.pt",
        "ckpt-epoch0001-step000000005.pt",
        "ckpt-step000000006.pt",
    ]


def test_run_checkpoints_last_good_after_a_non_finite_loss(tmp_path):
    first = ckpt.save_checkpoint({"step": 2}, tmp_path, step=2, keep_last=5)  # an earlier invocation's
    run = ckpt.RunCheckpoints(tmp_path, keep_last=5, keep_every_epochs=0, main=True, resumed_from=first)
    for step in (3, 4):
        run.save(step, epoch=0, epoch_end=False, state=lambda: {})
    assert run.last_good(bad_step=5) == str(tmp_path / "ckpt-step000000003.pt")  # 4 gave step 5's loss
    assert (tmp_path / "ckpt-step000000004.pt.nonfinite").is_file()
    # the weights this invocation started from gave the loss: say so
    assert run.last_good(bad_step=3) == f"{first} (its weights gave this loss: resume it with other settings)"
    assert ckpt.RunCheckpoints(tmp_path, 5, 0, main=False).last_good(bad_step=3) is None


def _pick_on_two_ranks(rank: int, run_dir: str, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        if rank == 1:  # this node sees the newest checkpoint damaged, and must not pick for itself
            ckpt.load_latest = lambda *a, **k: pytest.fail("rank 1 picked its own checkpoint")
        path, state = ckpt.pick_latest(run_dir)
        torch.save({"path": str(path), "state": state}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_from_rank_0s_pick(tmp_path):
    import torch.multiprocessing as mp

    for step in (2, 4):
        ckpt.save_checkpoint({"step": step}, tmp_path, step=step, keep_last=5)
    out = tmp_path / "picked"
    mp.spawn(_pick_on_two_ranks, args=(str(tmp_path), str(tmp_path / "init"), str(out)), nprocs=2)
    rank0, rank1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert rank0 == {"path": str(tmp_path / "ckpt-step000000004.pt"), "state": {"step": 4}}
    assert rank1 == {"path": rank0["path"], "state": None}  # loaded by the caller, from rank 0's path
    assert ckpt.pick_latest(tmp_path)[1] == {"step": 4}  # one process: load_latest


def test_config_text_is_written_atomically(tmp_path, monkeypatch):
    """A run's config.json (what --resume reads) is replaced whole or not at all: a write that fails
    half-way (here at the fsync) leaves the old text and no temporary file."""
    path = tmp_path / "config.json"
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.isdir(f"/proc/self/fd/{fd}")) or fsync(fd))
    ckpt.atomic_write_text(path, '{"seed": 1}\n')
    assert synced == [False, True]  # the file, then its folder (the rename durable)

    def fail(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk gone"):
        ckpt.atomic_write_text(path, '{"seed": 2, "much": "more"}\n')
    assert path.read_text() == '{"seed": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
