"""DALI backend (CPU pipeline here; the mixed GPU pipeline where CUDA and DALI both exist).

The DALI and reference loaders share the schedule and every crop window and flip, so their
batches must agree up to decoder and resize-filter rounding: both decode JPEGs with
libjpeg-turbo (fancy upsampling on both sides), and PIL's bicubic resize (a = -0.5, 8-bit
fixed-point, antialiased support) differs from DALI's antialiased cubic resize by about a grey
level at most pixels. Seen on the demo set at 32 px: mean |diff| ~0.004, max ~0.15 in normalised
units (0.018 = one grey level); a crop shifted by one pixel or a missing flip gives a mean > 0.05.
"""

from __future__ import annotations

import gc
import os
import shutil
import weakref

import pytest
import torch

from fastmae.data import DaliLoader, TorchLoader, build_loader, dali_available, open_source
from fastmae.data.sources import ShardDataError

pytestmark = pytest.mark.skipif(not dali_available(), reason="needs NVIDIA DALI")

MEAN_TOL = 0.015
MAX_TOL = 0.5


def _batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("size", [32, 40])
def test_dali_cpu_matches_reference(demo_root, size):
    src = open_source(demo_root)
    ref = _batches(TorchLoader(src, 8, size, seed=5, num_workers=0), epoch=2)
    dali = _batches(DaliLoader(src, 8, size, seed=5, num_threads=2), epoch=2)
    assert len(ref) == len(dali) == 5
    for (xr, yr), (xd, yd) in zip(ref, dali, strict=True):
        assert xd.shape == xr.shape == (8, 3, size, size) and xd.dtype == torch.float32
        torch.testing.assert_close(yd, yr, rtol=0, atol=0)
        diff = (xd - xr).abs()
        assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL, (diff.mean().item(), diff.max().item())


def test_dali_shards_as_the_reference_on_every_rank(demo_root):
    """Each rank of two gets its own share, the one the reference loader gives it (only rank 0 was
    compared before): the same images, crops and flips, batch by batch."""
    src = open_source(demo_root)
    shares = []
    for rank in (0, 1):
        ref = _batches(TorchLoader(src, 4, 32, seed=3, rank=rank, world_size=2, num_workers=0), epoch=1)
        dali = _batches(DaliLoader(src, 4, 32, seed=3, rank=rank, world_size=2, num_threads=1), epoch=1)
        assert len(ref) == len(dali) == 5  # 40 images, 20 a rank
        for (xr, yr), (xd, yd) in zip(ref, dali, strict=True):
            torch.testing.assert_close(yd, yr, rtol=0, atol=0)
            diff = (xd - xr).abs()
            assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL, (rank, diff.mean().item(), diff.max().item())
        shares.append(torch.cat([x for x, _ in dali]))
    assert (shares[0] - shares[1]).abs().mean() > 0.1  # two different shares, not one twice


def test_dali_cpu_deterministic_across_runs_and_threads(demo_root):
    src = open_source(demo_root)
    a = _batches(DaliLoader(src, 4, 32, seed=1, num_threads=1, io_threads=0))
    b = _batches(DaliLoader(src, 4, 32, seed=1, num_threads=2, prefetch=3))
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)


def test_dali_fancy_upsampling_switch_is_for_the_mixed_decoder(demo_root):
    """``jpeg_fancy_upsampling=False`` (the benchmark's ``plain`` decoder) changes nothing on CPU:
    libjpeg-turbo interpolates chroma either way; on CUDA it selects nvJPEG's nearest upsampling."""
    src = open_source(demo_root)
    fancy = _batches(DaliLoader(src, 8, 32, seed=3, num_threads=2))
    plain = _batches(DaliLoader(src, 8, 32, seed=3, num_threads=2, jpeg_fancy_upsampling=False, hw_decoder_load=0.9))
    for (xf, yf), (xp, yp) in zip(fancy, plain, strict=True):
        torch.testing.assert_close(xp, xf, rtol=0, atol=0)
        torch.testing.assert_close(yp, yf, rtol=0, atol=0)


def test_dali_one_pipeline_runs_on_across_epochs(demo_root):
    """A mixed pipeline costs seconds to build (3.5 s per epoch on an H200 when each epoch built
    its own), so successive passes share one, its prefetch running on into the next epoch; it is
    rebuilt only when asked for another position. Every batch is still the plan's."""
    src = open_source(demo_root)
    loader = DaliLoader(src, 8, 32, seed=4, num_threads=2, prefetch=3)
    loader.set_epoch(1, start_step=3)
    run_on = [(x.clone(), y.clone()) for _ in range(3) for x, y in loader]  # epochs 1 (from step 3), 2, 3
    assert loader.builds == 1 and (loader.epoch, loader.step) == (3, 5)
    fresh = []
    for epoch, start in ((1, 3), (2, 0), (3, 0)):
        other = DaliLoader(src, 8, 32, seed=4, num_threads=2)
        other.set_epoch(epoch, start_step=start)
        fresh += [(x.clone(), y.clone()) for x, y in other]
    assert len(run_on) == len(fresh) == 2 + 5 + 5
    for (xa, ya), (xb, yb) in zip(run_on, fresh, strict=True):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    # elsewhere (a resume): rebuilt there; a pass cut short continues where it stopped
    loader.set_epoch(2, start_step=1)
    x, _ = next(iter(loader))
    assert loader.builds == 2 and torch.equal(x, fresh[2 + 1][0])
    x, _ = next(iter(loader))
    assert loader.builds == 2 and torch.equal(x, fresh[2 + 2][0])
    loader.close()
    x, _ = next(iter(loader))
    assert loader.builds == 3 and torch.equal(x, fresh[2 + 3][0])


def _fresh(src, epoch, step, **kw):
    loader = DaliLoader(src, 8, 32, num_threads=2, **kw)
    loader.set_epoch(epoch, start_step=step)
    x, y = next(iter(loader))
    loader.close()
    return x, y


def test_dali_pass_cut_short_runs_off_what_is_in_flight(demo_root):
    """Gradient accumulation leaves an epoch's last micro-batches unused (the paper's recipe on
    ImageNet: 20018 batches, accumulation 64): the next epoch is asked for while the pipeline's
    next batch is still this one's. It runs those off instead of building a new pipeline."""
    src = open_source(demo_root)
    loader = DaliLoader(src, 8, 32, seed=4, num_threads=2, prefetch=3)
    for epoch in range(3):
        loader.set_epoch(epoch)
        used = []
        for step, (x, _) in enumerate(loader):
            used.append(x)
            if step == 2:
                break  # 3 of 5 batches used
        assert torch.equal(used[-1], _fresh(src, epoch, 2, seed=4)[0])
    loader.set_epoch(3, start_step=1)  # forward by more than the prefetch depth
    x, _ = next(iter(loader))
    assert loader.builds == 1 and torch.equal(x, _fresh(src, 3, 1, seed=4)[0])


def test_dali_an_error_fed_ahead_waits_for_its_batch(demo_root, monkeypatch):
    """Feeding runs ahead into the next epoch; a data error there (no readable stand-in) must not
    end the epoch being trained (a run with --epochs 1 lost its last step and its checkpoint)."""
    src = open_source(demo_root)
    loader = DaliLoader(src, 8, 32, seed=4, num_threads=2, prefetch=3)
    real = loader._prepare

    def broken_next_epoch(epoch, index, first=None, bad=None):
        if epoch == 1:
            raise ShardDataError(f"16 unreadable images in a row standing in for slot {index}")
        return real(epoch, index, first, bad)

    monkeypatch.setattr(loader, "_prepare", broken_next_epoch)
    assert len(list(loader)) == 5  # epoch 0, whole
    with pytest.raises(ShardDataError, match="16 unreadable images in a row"):
        next(iter(loader))
    assert (loader.epoch, loader.step) == (1, 0)


def test_dali_reports_only_the_bad_files_of_batches_delivered(demo_root, tmp_path):
    """A file skipped while feeding ahead is reported when its batch is delivered: an epoch the
    run never reaches leaves nothing in bad_files.txt (the reference loader reports none either)."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    (root / sorted(p.name for p in root.iterdir() if p.is_dir())[0] / "zz_empty.jpg").write_bytes(b"")
    src = open_source(root)
    bad = next(i for i, (path, _) in enumerate(src.samples) if path.endswith("zz_empty.jpg"))
    # a seed where the empty file is in epoch 0's dropped remainder and in epoch 1's first batch
    seed = next(
        s
        for s in range(1000)
        if bad not in DaliLoader(src, 8, 32, seed=s).plan.permutation(0)[:40]
        and bad in DaliLoader(src, 8, 32, seed=s).plan.batch_indices(1, 0)
    )
    loader = DaliLoader(src, 8, 32, seed=seed, num_threads=2, prefetch=3, report_dir=tmp_path / "run")
    assert len(list(loader)) == 5 and loader.bad_files.paths == []
    next(iter(loader))
    assert loader.bad_files.paths == [src.samples[bad][0]]


def test_dali_an_interrupt_inside_run_does_not_shift_the_batches(demo_root, monkeypatch):
    """Ctrl-C can land in the pipeline's run() after DALI handed a batch out and before the loader
    booked it: a later pass must not take the next batch for that one (it did, reusing the pipeline)."""
    src = open_source(demo_root)
    loader = DaliLoader(src, 8, 32, seed=4, num_threads=2)
    it = iter(loader)
    next(it)
    real_run = loader._pipe.run

    def interrupted():
        out = real_run()
        if not hits:
            hits.append(1)
            raise KeyboardInterrupt
        return out

    hits = []

    monkeypatch.setattr(loader._pipe, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        next(it)
    assert (loader.epoch, loader.step) == (0, 1)
    x, _ = next(iter(loader))
    assert torch.equal(x, _fresh(src, 0, 1, seed=4)[0])


def test_dali_a_loader_dropped_without_close_is_freed_at_once(demo_root):
    """The pipeline holds the feeder, which must not hold the loader: a loader dropped without
    close() kept its pipeline (threads, GPU memory) until a garbage-collector pass."""
    loader = DaliLoader(open_source(demo_root), 8, 32, num_threads=2)
    next(iter(loader))
    ref = weakref.ref(loader)
    gc.disable()
    try:
        del loader
        assert ref() is None
    finally:
        gc.enable()


def test_dali_whole_decode_then_window_equals_region_decode(demo_root):
    """The mixed pipeline with fancy upsampling decodes whole images and cuts the crop window
    after (nvJPEG < 13.2 has no region decode with it); the same graph on CPU gives the region
    decode's batches bit for bit, so the window's anchor and shape mean the same in both."""
    src = open_source(demo_root)
    region = _batches(DaliLoader(src, 8, 40, seed=6, num_threads=2), epoch=1)
    whole = DaliLoader(src, 8, 40, seed=6, num_threads=2)
    whole._roi_decode = False
    for (xa, ya), (xb, yb) in zip(region, _batches(whole, epoch=1), strict=True):
        torch.testing.assert_close(xb, xa, rtol=0, atol=0)
        torch.testing.assert_close(yb, ya, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dali_output_dtype(demo_root, dtype):
    src = open_source(demo_root)
    loader = DaliLoader(src, 4, 32, dtype=dtype, num_threads=1)
    x, y = next(iter(loader))
    assert x.dtype == dtype and y.dtype == torch.int64
    loader.set_epoch(0)
    x32, _ = next(iter(DaliLoader(src, 4, 32, num_threads=1)))
    assert torch.equal(x, x32.to(dtype))  # the fp32 pipeline's output rounded once, as torch rounds it


@pytest.mark.gpu
@pytest.mark.parametrize("fancy", [True, False])
def test_dali_mixed_gpu_matches_cpu(demo_root, fancy):
    """nvJPEG vs libjpeg-turbo: different IDCT/upsampling rounding, so a looser tolerance.
    Fancy upsampling decodes whole images and cuts the window; plain decodes the window only."""
    src = open_source(demo_root)
    cpu = _batches(DaliLoader(src, 8, 32, seed=2, num_threads=2))
    gpu = _batches(
        DaliLoader(src, 8, 32, seed=2, num_threads=2, device="cuda", dtype=torch.bfloat16, jpeg_fancy_upsampling=fancy)
    )
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and yg.is_cuda and xg.dtype == torch.bfloat16
        torch.testing.assert_close(yg.cpu(), yc, rtol=0, atol=0)
        assert (xg.float().cpu() - xc).abs().mean() < 0.03


def test_dali_threads_are_capped_at_the_usable_cpus(demo_root):
    """As the reference loader's workers: more CPU threads than CPUs only contend (the start line
    says when --num-workers was cut)."""
    loader = build_loader("dali", open_source(demo_root), batch_size=4, image_size=32, num_workers=10_000)
    assert loader.workers == len(os.sched_getaffinity(0))
    assert build_loader("dali", open_source(demo_root), batch_size=4, image_size=32, num_workers=0).workers == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_forked_children_freeze_what_they_inherit_once_dali_ran(demo_root):
    """Once a DALI pipeline was built here, a forked child (a DataLoader worker) freezes the objects
    it inherits: its collector must not tear down a pipeline the parent dropped and had not yet
    collected, whose Shutdown waits there for threads the child does not have. A torch loader's
    worker forked after DALI tests hung so at its first allocation (3 runs in 4 of this test file's
    neighbours; 0 in 4 with the freeze)."""
    loader = DaliLoader(open_source(demo_root), 4, 32, num_threads=1)
    next(iter(loader))
    loader.close()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, str(gc.get_freeze_count()).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    frozen = int(os.read(read, 32))
    os.close(read), os.close(write)
    assert frozen > 0
    assert gc.get_freeze_count() == 0  # the parent's collector is untouched
