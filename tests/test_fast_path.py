"""The model's fused fast path (Triton kernels) against its reference path.

On CPU the kernels run under the Triton interpreter (the root conftest.py sets TRITON_INTERPRET);
on CUDA the same tests run the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

from fastmae.model import MaskedAutoencoderViT
from tests.helpers import assert_close_rel

CASES = {
    # id: (constructor kwargs, batch, mask ratio)
    "P8-L16-normpix": (
        dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, norm_pix_loss=True),
        3,
        0.75,
    ),
    "P8-L16-rawpix": (dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4, norm_pix_loss=False), 2, 0.5),
    "P14-L25-r0.9": (dict(img_size=70, patch_size=14, embed_dim=60, depth=1, num_heads=3, norm_pix_loss=True), 2, 0.9),
    "P16-L4-r0.0": (dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, norm_pix_loss=True), 2, 0.0),
}


def _pair(kwargs: dict, device: str) -> tuple[MaskedAutoencoderViT, MaskedAutoencoderViT]:
    dec = dict(decoder_embed_dim=40, decoder_depth=1, decoder_num_heads=4)
    torch.manual_seed(0)
    ref = MaskedAutoencoderViT(**kwargs, **dec).to(device)
    fast = MaskedAutoencoderViT(**kwargs, **dec, fused=True).to(device)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_matches_reference_path(case, device):
    kwargs, n, ratio = CASES[case]
    ref, fast = _pair(kwargs, device)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(n, 3, kwargs["img_size"], kwargs["img_size"], generator=g).to(device)
    noise = torch.rand(n, ref.num_patches, generator=g).to(device)
    out_ref = ref(imgs, mask_ratio=ratio, noise=noise)
    out_fast = fast(imgs, mask_ratio=ratio, noise=noise)
    assert torch.equal(out_fast[2], out_ref[2]), "masks differ"
    assert_close_rel(out_fast[1], out_ref[1], 1e-5, "pred")
    if ratio == 0.0:
        # nothing is masked: the reference's loss is 0/0 = nan, and so is the kernel's
        assert torch.isnan(out_ref[0]) and torch.isnan(out_fast[0])
        return
    assert_close_rel(out_fast[0], out_ref[0], 1e-5, "loss")
    out_ref[0].backward()
    out_fast[0].backward()
    for (name, p_fast), (_, p_ref) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        if p_ref.requires_grad:
            assert p_fast.grad is not None, name
            assert_close_rel(p_fast.grad, p_ref.grad, 1e-5, name)


def test_fast_path_default_noise_is_the_reference_draw(device):
    """noise=None draws torch.rand(N, L) on both paths, so a seeded run masks identically."""
    kwargs, n, _ = CASES["P8-L16-normpix"]
    ref, fast = _pair(kwargs, device)
    imgs = torch.randn(n, 3, 32, 32, device=device)
    torch.manual_seed(5)
    _, _, mask_ref = ref(imgs)
    torch.manual_seed(5)
    _, _, mask_fast = fast(imgs)
    assert torch.equal(mask_ref, mask_fast)


def test_fast_path_switch_at_runtime(device):
    """The one switch: flipping ``model.fused`` changes the path, not the function."""
    kwargs, n, _ = CASES["P8-L16-normpix"]
    _, model = _pair(kwargs, device)
    imgs, noise = torch.randn(n, 3, 32, 32, device=device), torch.rand(n, 16, device=device)
    loss_fast = model(imgs, noise=noise)[0]
    model.fused = False
    loss_ref = model(imgs, noise=noise)[0]
    assert_close_rel(loss_fast, loss_ref, 1e-5, "loss")


@pytest.mark.parametrize("ops", [("gather",), ("unshuffle",), ("loss",), ("gather", "loss")], ids="+".join)
def test_each_fused_op_alone_matches_reference(ops, device):
    """The ablation switches: any subset of the kernels gives the reference function."""
    kwargs, n, ratio = CASES["P8-L16-normpix"]
    ref, _ = _pair(kwargs, device)
    fast = MaskedAutoencoderViT(**kwargs, decoder_embed_dim=40, decoder_depth=1, decoder_num_heads=4, fused=ops)
    fast.to(device).load_state_dict(ref.state_dict())
    assert fast.fused == frozenset(ops)
    imgs, noise = torch.randn(n, 3, 32, 32, device=device), torch.rand(n, 16, device=device)
    loss_ref, loss_fast = ref(imgs, ratio, noise)[0], fast(imgs, ratio, noise)[0]
    assert_close_rel(loss_fast, loss_ref, 1e-5, "loss")
    loss_ref.backward()
    loss_fast.backward()
    assert_close_rel(fast.mask_token.grad, ref.mask_token.grad, 1e-5, "mask_token grad")
    assert_close_rel(fast.patch_embed.proj.weight.grad, ref.patch_embed.proj.weight.grad, 1e-5, "patch_embed grad")


def test_fused_switch_rejects_unknown_ops():
    with pytest.raises(ValueError, match="unknown fused ops"):
        MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, fused=("gather", "attn"))
    model = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, fused="loss")
    assert model.fused == {"loss"}  # one op by name (its letters were taken as three unknown ops)


def test_fused_path_refuses_float64():
    """The kernels compute in fp32: a float64 model or batch is an error, not fp32 results in disguise."""
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1)
    model = MaskedAutoencoderViT(**kw, decoder_num_heads=2, fused=True).double()
    imgs = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="compute in fp32: use fused=False for float64"):
        model(imgs)
    features = model.forward_features(imgs)  # runs no fused op: float64 is fine there
    model.fused = False
    assert features.dtype == torch.float64 and torch.equal(features, model.forward_features(imgs))
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64))[0].dtype == torch.float64
