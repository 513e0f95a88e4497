"""The batch schedule: order, sharding, determinism across workers, exact resume; synthetic backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmae.data import (
    DataError,
    EpochPlan,
    SyntheticLoader,
    TorchLoader,
    build_loader,
    dali_available,
    open_source,
)
from fastmae.data.sampling import candidates, sample_seed

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="needs DALI"))]


def test_plan_shards_cover_epoch_once_drop_last():
    n, b, world = 103, 4, 2
    plans = [EpochPlan(n, b, seed=7, rank=r, world_size=world) for r in range(world)]
    assert all(len(range(p.steps_per_epoch)) == 12 for p in plans)  # 103 // 8, drop-last
    for epoch in range(3):
        seen = np.concatenate([p.batch_indices(epoch, s) for p in plans for s in range(p.steps_per_epoch)])
        assert len(seen) == 96 and len(set(seen.tolist())) == 96  # each image at most once
        perm = plans[0].permutation(epoch)
        assert set(seen.tolist()) == set(perm[:96].tolist())  # exactly the first 96 of the order
    # rank r reads the r-th quarter... of each global batch
    np.testing.assert_array_equal(plans[1].batch_indices(1, 3), plans[1].permutation(1)[3 * 8 + 4 : 3 * 8 + 8])
    assert not np.array_equal(plans[0].permutation(0), plans[0].permutation(1))
    assert not np.array_equal(plans[0].permutation(0), EpochPlan(n, b, seed=8).permutation(0))


def test_plan_errors():
    with pytest.raises(DataError, match="fewer than one global batch"):
        EpochPlan(7, 4, world_size=2)
    with pytest.raises(DataError, match="rank 2 is outside"):
        EpochPlan(100, 4, rank=2, world_size=2)


def test_sample_seed_and_substitutes_are_pure():
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    assert len({sample_seed(0, e, i, a) for e in range(4) for i in range(50) for a in range(3)}) == 600
    assert 0 <= sample_seed(2**70, -1, 5) < 2**63
    c = list(candidates(3, 4, 5, 100))
    assert c[0] == (0, 5) and c == list(candidates(3, 4, 5, 100)) and len(c) == 16 and len({j for _, j in c}) > 10


def _collect(loader, n_steps=None):
    out = []
    for i, (x, y) in enumerate(loader):
        out.append((x.clone(), y.clone()))
        if n_steps is not None and i + 1 == n_steps:
            break
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)


def _loader(backend, src, workers=0, seed=0, **kw):
    return build_loader(backend, src, batch_size=4, image_size=32, seed=seed, num_workers=workers, **kw)


def test_torch_loader_independent_of_workers_and_seeded(demo_root):
    src = open_source(demo_root)
    a = _loader("torch", src, workers=0)
    b = _loader("torch", src, workers=2)
    a.set_epoch(1)
    b.set_epoch(0)
    _collect(b, 2)  # a pass abandoned mid-epoch: its prefetched batches must not leak into the next
    b.set_epoch(1)
    ra, rb = _collect(a), _collect(b)
    b.close()  # stops the persistent workers now rather than in interpreter-exit GC
    assert len(ra) == len(a) == 10
    _assert_same(ra, rb)
    assert ra[0][0].shape == (4, 3, 32, 32) and ra[0][1].dtype == torch.int64
    c = _loader("torch", src, seed=1)
    c.set_epoch(1)
    assert not torch.equal(_collect(c, 1)[0][0], ra[0][0])
    a.set_epoch(2)
    assert not torch.equal(_collect(a, 1)[0][0], ra[0][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_equals_uninterrupted(demo_root, backend):
    src = open_source(demo_root)
    full = _loader(backend, src)
    full.set_epoch(0)
    whole = _collect(full) + _collect(full)  # second pass: the loader moves on to epoch 1
    assert full.epoch == 1 and full.step == len(full)

    part = _loader(backend, src)
    part.set_epoch(0)
    first = _collect(part, 3)
    state = part.state_dict()
    assert (state["epoch"], state["step"]) == (0, 3)

    resumed = _loader(backend, src)
    resumed.load_state_dict(state)
    _assert_same(first + _collect(resumed) + _collect(resumed), whole)

    direct = _loader(backend, src)
    direct.set_epoch(1, start_step=7)
    _assert_same(_collect(direct), whole[17:])


def test_resume_across_batch_and_world_size(demo_root):
    """Same global position, other world size / per-rank batch: the same images with the same crops."""
    src = open_source(demo_root)
    one = build_loader("torch", src, batch_size=8, image_size=32, num_workers=0)
    one.set_epoch(3)
    ref = _collect(one)  # 5 global batches of 8
    small = build_loader("torch", src, batch_size=4, image_size=32, num_workers=0)
    small.set_epoch(3)
    _collect(small, 4)  # 16 images in
    ranks = [TorchLoader(src, 2, 32, rank=r, world_size=2, num_workers=0) for r in range(2)]
    for r in ranks:
        r.load_state_dict(small.state_dict())
        assert (r.epoch, r.step) == (3, 4)
    (a0, a1), (b0, b1) = [[x for x, _ in _collect(r, 2)] for r in ranks]  # 2 steps of 2 x 2 images
    torch.testing.assert_close(torch.cat([a0, b0, a1, b1]), ref[2][0], rtol=0, atol=0)
    big = build_loader("torch", src, batch_size=8, image_size=32, num_workers=0)
    big.load_state_dict(small.state_dict())  # 16 images = 2 global batches of 8
    _assert_same(_collect(big), ref[2:])
    small.set_epoch(3, start_step=3)  # 12 images: not a whole number of batches of 8
    with pytest.raises(DataError, match="not a whole number of global batches of 8"):
        big.load_state_dict(small.state_dict())
    with pytest.raises(DataError, match="saved seed=0, now 1"):
        build_loader("torch", src, batch_size=8, seed=1, num_workers=0).load_state_dict(one.state_dict())
    with pytest.raises(DataError, match="start step 6 outside"):
        big.set_epoch(0, start_step=len(big) + 1)


def test_two_ranks_partition_each_global_batch(demo_root):
    src = open_source(demo_root)
    labels = {p: y for p, y in src.samples}
    ranks = [TorchLoader(src, 4, 32, rank=r, world_size=2, num_workers=0) for r in range(2)]
    for r in ranks:
        r.set_epoch(0)
    assert len(ranks[0]) == 5  # 40 // 8
    one = build_loader("torch", src, batch_size=8, image_size=32, num_workers=0)
    one.set_epoch(0)
    for (x0, y0), (x1, y1), (x, y) in zip(*[_collect(r) for r in ranks], _collect(one), strict=True):
        torch.testing.assert_close(torch.cat([x0, x1]), x, rtol=0, atol=0)  # same images, same crops
        torch.testing.assert_close(torch.cat([y0, y1]), y, rtol=0, atol=0)
    assert set(labels.values()) == {0, 1, 2, 3}


def test_dtype_conversion(demo_root):
    ld = _loader("torch", open_source(demo_root), dtype=torch.bfloat16)
    x, y = next(iter(ld))
    assert x.dtype == torch.bfloat16 and y.dtype == torch.int64


def test_synthetic_loader_interface():
    ld = build_loader("synthetic", None, batch_size=2, image_size=16, steps_per_epoch=3, dtype=torch.float16)
    assert isinstance(ld, SyntheticLoader) and len(ld) == 3
    batches = _collect(ld)
    assert len(batches) == 3 and batches[0][0].shape == (2, 3, 16, 16) and batches[0][0].dtype == torch.float16
    assert not torch.equal(batches[0][0], batches[1][0])
    ld.set_epoch(0, start_step=1)
    _assert_same(_collect(ld), batches[1:])
    # each rank its own batches, the same on every run
    rank1 = build_loader("synthetic", None, batch_size=2, image_size=16, steps_per_epoch=3, rank=1, world_size=2)
    again = build_loader("synthetic", None, batch_size=2, image_size=16, steps_per_epoch=3, rank=1, world_size=2)
    mine = _collect(rank1)
    assert len(mine) == 3 and not torch.equal(mine[0][0].half(), batches[0][0])
    _assert_same(mine, _collect(again))
    with pytest.raises(DataError, match="unknown data backend"):
        build_loader("ffcv", None, batch_size=2)


@pytest.mark.gpu
def test_torch_loader_and_synthetic_on_cuda(demo_root):
    """Pinned host batches copied to the GPU and cast there: same values as the CPU loader."""
    src = open_source(demo_root)
    cpu = _loader("torch", src)
    gpu = _loader("torch", src, workers=2, device="cuda", dtype=torch.bfloat16)
    cpu.set_epoch(0)
    gpu.set_epoch(0)
    for (xc, yc), (xg, yg) in zip(_collect(cpu, 3), _collect(gpu, 3), strict=True):
        assert xg.is_cuda and yg.is_cuda and xg.dtype == torch.bfloat16
        torch.testing.assert_close(xg.cpu(), xc.to(torch.bfloat16), rtol=0, atol=0)
        torch.testing.assert_close(yg.cpu(), yc, rtol=0, atol=0)
    gpu.close()
    syn = build_loader("synthetic", None, batch_size=2, image_size=16, steps_per_epoch=2, device="cuda")
    x, y = next(iter(syn))
    assert x.is_cuda and y.is_cuda


def test_resume_step_of_a_used_up_epoch_under_another_global_batch():
    """A state saved at the end of an epoch (step == len) continues with the next epoch, whatever
    the new global batch; mid-epoch, a position off the new batches' grid is refused."""
    plan = EpochPlan(10, 4)
    assert plan.resume_step({"num_samples": 10, "seed": 0, "step": 5, "global_batch": 2}) == plan.steps_per_epoch
    assert plan.resume_step({"num_samples": 10, "seed": 0, "step": 2, "global_batch": 2}) == 1
    with pytest.raises(DataError, match="not a whole number of global batches of 4"):
        plan.resume_step({"num_samples": 10, "seed": 0, "step": 1, "global_batch": 2})


def test_workers_are_capped_at_the_usable_cpus(demo_root, monkeypatch):
    """More workers than CPUs only contend (DataLoader warns of a freeze, twice a fine-tune on 2
    cores with its default 4): capped."""
    import os

    from fastmae.data.eval import EvalLoader

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    src = open_source(demo_root)
    train, val = TorchLoader(src, 2, 32, num_workers=64), EvalLoader(src, 2, 32, num_workers=64)
    assert train._loader.num_workers == val._loader.num_workers == 2
    assert TorchLoader(src, 2, 32, num_workers=1)._loader.num_workers == 1


def test_a_worker_stuck_in_a_read_is_killed_at_close(demo_root, monkeypatch):
    """The workers ignore SIGTERM (a scheduler's, for the main process to handle), so DataLoader's
    last resort (terminate) no longer stops one blocked in a read (a stalled network mount), and the
    process would not exit: close() kills it."""
    import time

    import fastmae.data.torch_loader as torch_loader

    real = torch_loader.load_rgb
    reads = []

    def stalling(path, *a, **k):  # runs in the (forked) worker: its reads after the first batch stall
        reads.append(path)
        if len(reads) > 2:
            time.sleep(3600)
        return real(path, *a, **k)

    monkeypatch.setattr(torch_loader, "load_rgb", stalling)
    loader = TorchLoader(open_source(demo_root), 2, 32, num_workers=1)
    loader.set_epoch(0)
    next(iter(loader))
    workers = list(loader._loader._iterator._workers)
    loader.close()
    assert workers and not any(w.is_alive() for w in workers)


def test_a_state_from_before_the_splitmix_crops_is_told(demo_root, caplog):
    """A loader state saved before the crops moved from torch.Generator draws to splitmix64 (it has
    no ``crop_stream``) continues the same images in the same order, with other crops: said once."""
    src = open_source(demo_root)
    loader = _loader("torch", src)
    state = loader.state_dict()
    assert state["crop_stream"] == "splitmix64"
    loader.load_state_dict(state)
    assert "crops" not in caplog.text
    old = {k: v for k, v in state.items() if k != "crop_stream"}
    loader.load_state_dict(old)
    assert "does not say it drew its crops and flips from splitmix64" in caplog.text
    assert (loader.epoch, loader.step) == (state["epoch"], state["step"])
