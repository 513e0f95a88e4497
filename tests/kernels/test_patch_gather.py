"""patch_gather against patch_gather_ref: a pure copy, so it must be exact in every dtype."""

from __future__ import annotations

import pytest
import torch

from fastmae.kernels import patch_gather, patch_gather_ref

# (N, H, W, P, mask_ratio): patch 8/14/16, non-square images, L from 4 to 1024, ratio 0 to 0.95.
CASES = [
    (2, 32, 32, 16, 0.75),
    (3, 42, 56, 14, 0.0),
    (2, 64, 40, 8, 0.95),
    (1, 448, 448, 14, 0.75),
    (5, 224, 32, 16, 0.5),
    (2, 32, 32, 8, 0.95),  # K = int(16 * 0.05) = 0: nothing kept
]


def _ids(case):
    N, H, W, P, ratio = case
    return f"N{N}-L{(H // P) * (W // P)}-H{H}xW{W}-P{P}-r{ratio}"


def _make(N: int, H: int, W: int, P: int, ratio: float, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    L = (H // P) * (W // P)
    K = int(L * (1 - ratio))
    imgs = torch.randn(N, 3, H, W, generator=g).to(device=device, dtype=dtype)
    ids_keep = torch.argsort(torch.rand(N, L, generator=g), dim=1)[:, :K].to(device)
    return imgs, ids_keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_patch_gather(case, dtype, device, seed, close, launched):
    N, H, W, P, ratio = case
    imgs, ids_keep = _make(N, H, W, P, ratio, dtype, device, seed=seed)
    out = patch_gather(imgs, ids_keep, P)
    assert launched["patch_gather"] == (1 if out.numel() else 0)  # the kernel ran
    assert out.dtype == dtype
    close(out, patch_gather_ref(imgs, ids_keep, P), atol=0.0, name="patch_gather")


def test_patch_gather_channels_last(device, close):
    imgs, ids_keep = _make(3, 48, 32, 16, 0.5, torch.float32, device, seed=1)
    out = patch_gather(imgs.to(memory_format=torch.channels_last), ids_keep, 16)
    close(out, patch_gather_ref(imgs, ids_keep, 16), atol=0.0, name="patch_gather channels_last")


def test_patch_gather_embeds_like_conv(device, close):
    """The (c, p, q) order is the conv weight's: linear on the gathered pixels == conv patch-embed."""
    N, H, W, P, D = 2, 32, 48, 16, 60
    # float64: on CUDA, cuDNN convolutions default to TF32, which would blur the comparison.
    imgs, ids_keep = _make(N, H, W, P, 0.5, torch.float64, device, seed=2)
    conv = torch.nn.Conv2d(3, D, P, stride=P).to(device=device, dtype=torch.float64)
    emb = conv(imgs).flatten(2).transpose(1, 2)  # [N, L, D], l = hi * w + wi
    want = torch.gather(emb, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    with torch.no_grad():
        got = torch.nn.functional.linear(patch_gather(imgs, ids_keep, P), conv.weight.reshape(D, -1), conv.bias)
    close(got, want, atol=1e-14, name="linear(patch_gather) vs conv")


def test_patch_gather_rejects_grad(device):
    imgs, ids_keep = _make(1, 32, 32, 16, 0.5, torch.float32, device, seed=3)
    with pytest.raises(ValueError, match="no backward"):
        patch_gather(imgs.requires_grad_(), ids_keep, 16)
