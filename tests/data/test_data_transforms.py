"""The MAE augmentation: RandomResizedCrop parameters (torchvision's algorithm), flip, normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.data import IMAGENET_MEAN, IMAGENET_STD, rrc_params, sample_params
from fastmae.data.sampling import SampleRandom, sample_generator
from fastmae.data.transforms import CropParams, augment, to_rgb
from tests.data.conftest import translucent

try:
    import torchvision.transforms as T

    HAVE_TV = True
except Exception:  # missing, or a build that does not match torch
    HAVE_TV = False


def needs_tv(test):
    """Runs where torchvision imports: .ci/run's interop environment (``-m interop``) and GPU hosts."""
    return pytest.mark.interop(pytest.mark.skipif(not HAVE_TV, reason="torchvision does not import here")(test))


# the loaders' stream, and a torch.Generator (torchvision's draws)
STREAMS = {"splitmix": SampleRandom, "torch": lambda seed: torch.Generator().manual_seed(seed)}
stream_kinds = pytest.mark.parametrize("stream", list(STREAMS))


@stream_kinds
@pytest.mark.parametrize("hw", [(375, 500), (48, 64), (200, 37), (96, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_rrc_params_within_bounds(hw, stream):
    h, w = hw
    g = STREAMS[stream](0)
    for _ in range(300):
        top, left, ch, cw = rrc_params(h, w, g)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        if (ch, cw) != (h, w):  # fallback aside, area and ratio are within the bounds (+ rounding)
            area = ch * cw / (h * w)
            ratio = cw / ch
            assert 0.2 * 0.9 <= area <= 1.0 + 1e-9
            assert 3 / 4 * 0.85 <= ratio <= 4 / 3 / 0.85


@stream_kinds
def test_rrc_params_fallback_center_crop(stream):
    g = STREAMS[stream](0)
    # 1 x 100: no window of area >= 20 with ratio <= 4/3 fits; fallback clamps the ratio
    assert rrc_params(1, 100, g) == (0, 49, 1, 1)
    # 100 x 10: too tall; fallback keeps the width and takes a 4:3-ratio-bound height in the middle
    assert rrc_params(100, 10, g) == ((100 - 13) // 2, 0, 13, 10)
    # ratio range containing the image's own ratio: the full image
    assert rrc_params(10, 10, g, scale=(2.0, 3.0)) == (0, 0, 10, 10)


@stream_kinds
def test_rrc_params_deterministic_and_seed_dependent(stream):
    a = [rrc_params(375, 500, STREAMS[stream](s)) for s in range(20)]
    b = [rrc_params(375, 500, STREAMS[stream](s)) for s in range(20)]
    assert a == b and len(set(a)) == 20


@stream_kinds
def test_flip_rate_and_scale_spread(stream):
    flips, areas = [], []
    for s in range(2000):
        p = sample_params(100, 100, STREAMS[stream](s))
        flips.append(p.flip)
        areas.append(p.height * p.width / 1e4)
    assert 0.45 < np.mean(flips) < 0.55
    assert min(areas) < 0.25 and max(areas) > 0.95  # the whole (0.2, 1.0) range is used


def _crop_stats(params: list, h: int, w: int) -> np.ndarray:
    """Per crop: area fraction, log aspect ratio, centre x and y (fractions), flip."""
    return np.array(
        [
            (
                p.height * p.width / (h * w),
                math.log(p.width / p.height),
                (p.left + p.width / 2) / w,
                (p.top + p.height / 2) / h,
                p.flip,
            )
            for p in params
        ]
    )


@pytest.mark.parametrize("hw", [(375, 500), (64, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_splitmix_stream_draws_the_torchvision_distribution(hw):
    """The loaders' stream against torchvision's draws (a torch.Generator through the same
    algorithm): each statistic's mean agrees within 5 standard errors of the difference, over
    4000 samples each (a draw mapped wrongly, e.g. the aspect ratio not log-uniform or a biased
    offset, moves a mean by tens of them)."""
    h, w = hw
    n = 4000
    fast = _crop_stats([sample_params(h, w, sample_generator(0, 0, i)) for i in range(n)], h, w)
    ref = _crop_stats([sample_params(h, w, torch.Generator().manual_seed(10_000 + i)) for i in range(n)], h, w)
    se = np.sqrt(fast.var(0) / n + ref.var(0) / n)
    z = np.abs(fast.mean(0) - ref.mean(0)) / se
    assert (z < 5).all(), dict(zip(["area", "log_ratio", "cx", "cy", "flip"], z.round(2), strict=True))


def test_splitmix_reference_outputs():
    """splitmix64's published outputs for seed 1234567 (Vigna's splitmix64.c): the stream is the
    specified one, so a run's crops survive a torch or Python upgrade on resume."""
    r = SampleRandom(1234567)
    assert [r.next64() for _ in range(5)] == [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
        4593380528125082431,
        16408922859458223821,
    ]


def test_splitmix_draws_in_range_and_unbiased():
    r = SampleRandom(7)
    u = np.array([r.random() for _ in range(20_000)])
    assert u.min() >= 0 and u.max() < 1
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.abs(counts - 2000).max() < 5 * math.sqrt(2000 * 0.9)  # 5 sigma per bin
    k = np.array([r.randint(3, 6) for _ in range(9000)])
    assert set(k.tolist()) == {3, 4, 5}
    assert np.abs(np.bincount(k)[3:] - 3000).max() < 5 * math.sqrt(3000 * 2 / 3)
    assert all(r.randint(5, 6) == 5 for _ in range(10))
    assert all(0 <= r.randint(0, 2**40) < 2**40 for _ in range(1000))
    a = np.array([r.log_uniform(3 / 4, 4 / 3) for _ in range(10_000)])
    assert a.min() >= 3 / 4 and a.max() <= 4 / 3
    assert abs(np.log(a).mean()) < 5 * (math.log(4 / 3) / math.sqrt(3)) / 100  # log-uniform about 0


@needs_tv
def test_params_equal_torchvision():
    for s in range(200):
        h, w = 40 + s, 500 - s
        torch.manual_seed(s)
        i, j, ch, cw = T.RandomResizedCrop.get_params(torch.empty(3, h, w), (0.2, 1.0), (3 / 4, 4 / 3))
        flip = bool(torch.rand(1) < 0.5)
        assert sample_params(h, w, torch.Generator().manual_seed(s)) == CropParams(i, j, ch, cw, flip)


def _image(h: int = 48, w: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@needs_tv
def test_pil_path_equals_torchvision_path():
    img = _image()
    for s in range(10):
        p = sample_params(48, 64, torch.Generator().manual_seed(s))
        torch.testing.assert_close(
            augment(img, p, 32, use_torchvision=False), augment(img, p, 32, use_torchvision=True)
        )


def test_augment_crop_flip_normalize():
    """Identity-sized crop: output is exactly the normalised image, flipped or not."""
    img = _image(32, 32)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    want = (x - mean) / std
    out = augment(img, CropParams(0, 0, 32, 32, False), 32, use_torchvision=False)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(augment(img, CropParams(0, 0, 32, 32, True), 32, use_torchvision=False), want.flip(-1))
    # a crop window: the 16 x 8 block at (4, 2) upscaled keeps its mean colour (measured 1.1e-3 off:
    # the bicubic resize's over- and undershoot; the window one pixel over is 0.037 off)
    sub = augment(img, CropParams(4, 2, 16, 8, False), 16, use_torchvision=False)
    torch.testing.assert_close(sub.mean((1, 2)), want[:, 4:20, 2:10].mean((1, 2)), atol=3e-3, rtol=0)


@pytest.mark.parametrize("mode", ["CMYK", "L", "LA", "RGBA", "P", "I;16", "I", "1"])
def test_to_rgb_modes(mode):
    rgb = _image(8, 8)
    if mode in ("I;16", "I"):
        a = np.asarray(rgb.convert("L"), dtype=np.uint16) * 256
        img = Image.fromarray(a) if mode == "I;16" else Image.fromarray(a.astype(np.int32), mode="I")
        want = np.repeat(np.asarray(rgb.convert("L"))[..., None], 3, -1)
    elif mode in ("RGBA", "LA"):  # transparent to nearly opaque: alpha dropped, as torchvision's loader does
        img = translucent(rgb).convert(mode)
        want = np.asarray(rgb.convert(mode[:-1]).convert("RGB"))
        alpha = np.asarray(img)[..., -1]
        assert alpha.min() == 0 and len(np.unique(alpha)) == 64
    else:
        img = rgb.convert(mode)
        want = np.asarray(img.convert("RGB"))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 8)
    np.testing.assert_array_equal(np.asarray(out), want)
    if mode in ("I;16", "I"):
        assert math.isclose(np.asarray(out).mean(), np.asarray(rgb.convert("L")).mean())


@pytest.mark.parametrize("mode,progressive", [("RGB", False), ("RGB", True), ("L", False), ("CMYK", False)])
def test_jpeg_header_size_equals_pil(mode, progressive):
    """The DALI feeder reads JPEG sizes from the frame header itself; PIL is the reference."""
    import io

    from fastmae.data.encoded import encoded_size as _header_size

    img = _image(37, 53).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", progressive=progressive, optimize=True, exif=b"Exif\x00\x00" + b"\x00" * 40)
    assert _header_size(buf.getvalue()) == (37, 53)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    assert _header_size(buf.getvalue()) == (37, 53)
    with pytest.raises(OSError):
        _header_size(b"")
