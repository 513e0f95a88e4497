"""DALI backend (CPU pipeline here; the mixed GPU pipeline where CUDA and DALI both exist).

The DALI and reference loaders share the schedule and every crop window and flip, so their
batches must agree up to decoder and resize-filter rounding: both decode JPEGs with
libjpeg-turbo (fancy upsampling on both sides), and PIL's bicubic resize (a = -0.5, 8-bit
fixed-point, antialiased support) differs from DALI's antialiased cubic resize by about a grey
level at most pixels. Seen on the demo set at 32 px: mean |diff| ~0.004, max ~0.15 in normalised
units (0.018 = one grey level); a crop shifted by one pixel or a missing flip gives a mean > 0.05.
"""

from __future__ import annotations

import pytest
import torch

from fastmae.data import DaliLoader, TorchLoader, dali_available, open_source

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
def test_dali_mixed_gpu_matches_cpu(demo_root):
    """nvJPEG vs libjpeg-turbo: different IDCT/upsampling rounding, so a looser tolerance."""
    src = open_source(demo_root)
    cpu = _batches(DaliLoader(src, 8, 32, seed=2, num_threads=2))
    gpu = _batches(DaliLoader(src, 8, 32, seed=2, num_threads=2, device="cuda", dtype=torch.bfloat16))
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and yg.is_cuda and xg.dtype == torch.bfloat16
        torch.testing.assert_close(yg.cpu(), yc, rtol=0, atol=0)
        assert (xg.float().cpu() - xc).abs().mean() < 0.03
