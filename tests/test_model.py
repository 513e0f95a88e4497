"""The model's own conventions: masking, pos-embeds, init, weight decay, shapes and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastmae.model import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    param_groups_weight_decay,
    random_masking_ids,
)
from fastmae.pos_embed import get_2d_sincos_pos_embed, sincos_pos_embed_tensor
from tests.helpers import TINY_MAE

TINY = TINY_MAE


def tiny(**kw) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**{**TINY, **kw})


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("L,ratio", [(16, 0.75), (196, 0.75), (49, 0.5), (64, 0.0), (100, 0.95)])
def test_masking_counts_and_inverse(L, ratio):
    g = torch.Generator().manual_seed(L)
    noise = torch.rand(5, L, generator=g)
    len_keep = int(L * (1 - ratio))
    ids_keep, ids_restore, mask = random_masking_ids(noise, len_keep)
    assert ids_keep.shape == (5, len_keep)
    # exactly L - len_keep removed patches per row, and the kept ones are exactly ids_keep
    assert torch.equal(mask.sum(1), torch.full((5,), float(L - len_keep)))
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(5, len_keep))
    # ids_restore inverts ids_shuffle
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(L).expand(5, L))
    assert torch.equal(ids_restore.gather(1, ids_shuffle), torch.arange(L).expand(5, L))
    # the smallest noise values are the kept ones
    kept_noise = noise.gather(1, ids_keep)
    removed = noise.masked_fill(mask == 0, float("inf")).min(1).values
    if len_keep and len_keep < L:
        assert (kept_noise.max(1).values < removed).all()


def test_same_noise_same_mask_and_output():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    loss1, pred1, mask1 = m(x, noise=noise)
    loss2, pred2, mask2 = m(x, noise=noise.clone())
    assert torch.equal(mask1, mask2) and torch.equal(pred1, pred2) and torch.equal(loss1, loss2)
    _, _, mask3 = m(x, noise=torch.rand(2, 16))
    assert not torch.equal(mask1, mask3)


def test_seeded_default_noise_is_torch_rand():
    """With noise=None the model draws ``torch.rand(N, L)``: the reference's own draw."""
    m = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(123)
    _, pred_a, mask_a = m(x)
    torch.manual_seed(123)
    noise = torch.rand(2, 16)
    _, pred_b, mask_b = m(x, noise=noise)
    assert torch.equal(mask_a, mask_b) and torch.equal(pred_a, pred_b)


def test_mask_ratio_zero_latent_is_a_permutation_of_features():
    """With nothing masked the encoder sees every patch, shuffled; attention is permutation-equivariant."""
    torch.manual_seed(0)
    m = tiny().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(2, 16, dtype=torch.float64)
    latent, mask, ids_restore = m.forward_encoder(x, 0.0, noise)
    feats = m.forward_features(x)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert mask.sum() == 0
    torch.testing.assert_close(latent[:, 0], feats[:, 0], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(
        latent[:, 1:],
        feats[:, 1:].gather(1, ids_shuffle[..., None].expand(-1, -1, 48)),
        rtol=1e-14,
        atol=1e-14,
    )


# ---------------------------------------------------------------- pos-embed


def _sincos_independent(dim: int, grid: int) -> np.ndarray:
    """Closed form per patch, written independently of the reference's meshgrid/einsum code.

    Patch ``l = hi * grid + wi``; the first half of the vector encodes the column ``wi`` and the
    second half the row ``hi`` (the reference's "w goes first" grid), each as ``[sin | cos]``.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)  # float64, as the release's np.float
    out = np.zeros((1 + grid * grid, dim), dtype=np.float64)
    for hi in range(grid):
        for wi in range(grid):
            a, b = wi * omega, hi * omega
            out[1 + hi * grid + wi] = np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)])
    return out


@pytest.mark.parametrize("dim,grid", [(48, 4), (768, 14), (512, 14), (1280, 16)])
def test_pos_embed_matches_independent_formula(dim, grid):
    ref = _sincos_independent(dim, grid)
    ours = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    assert ours.shape == (1 + grid * grid, dim)
    assert np.all(ours[0] == 0)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-15)  # float64 either way: a few ulps of sin/cos
    # and the float32 table a model holds is that, cast once (as the reference's .float())
    assert np.array_equal(sincos_pos_embed_tensor(dim, grid)[0].numpy(), ref.astype(np.float32))


def test_pos_embed_matches_hf_builder():
    """HF builds [sin_h|cos_h|sin_w|cos_w] in float64 and rotates the halves to the MAE layout."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    hf = build_2d_sinusoidal_position_embedding(14, 14, embed_dim=768, cls_token=True, dtype=torch.float64)
    half = hf.shape[-1] // 2
    hf = torch.cat([hf[..., half:], hf[..., :half]], dim=-1)
    m = mae_vit_base_patch16(norm_pix_loss=True)
    assert torch.equal(m.pos_embed[0], hf.float())  # bit for bit (a float32 table was up to 7e-7 off)
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad


# ---------------------------------------------------------------- init and optimizer groups


def test_init_statistics():
    torch.manual_seed(0)
    m = mae_vit_base_patch16()
    # xavier_uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)); std = a / sqrt(3)
    for name, lin in [
        ("qkv", m.blocks[3].attn.qkv),
        ("fc1", m.decoder_blocks[1].mlp.fc1),
        ("pred", m.decoder_pred),
    ]:
        a = math.sqrt(6 / (lin.in_features + lin.out_features))
        w = lin.weight
        assert w.abs().max() <= a, name
        assert abs(w.std().item() - a / math.sqrt(3)) < 0.02 * a, name
        assert torch.all(lin.bias == 0), name
    w = m.patch_embed.proj.weight.view(768, -1)
    a = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= a and abs(w.std().item() - a / math.sqrt(3)) < 0.02 * a
    # the reference's _init_weights touches Linear and LayerNorm only: the conv bias keeps
    # Conv2d's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), it is *not* zeroed
    b = m.patch_embed.proj.bias
    assert b.abs().max() <= 1 / math.sqrt(w.shape[1]) and b.abs().max() > 0.5 / math.sqrt(w.shape[1])
    for t in (m.cls_token, m.mask_token):
        assert abs(t.std().item() - 0.02) < 0.004 and abs(t.mean().item()) < 0.004
    for ln in (m.blocks[0].norm1, m.norm, m.decoder_norm):
        assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0) and ln.eps == 1e-6


def test_weight_decay_groups_like_reference():
    m = tiny()
    no_decay, decay = param_groups_weight_decay(m, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in m.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {
        "cls_token",
        "mask_token",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "decoder_pred.weight",
    } <= decay_names
    assert {
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.bias",
        "norm.weight",
        "decoder_embed.bias",
    } <= no_decay_names
    assert "pos_embed" not in decay_names | no_decay_names
    assert "decoder_pos_embed" not in decay_names | no_decay_names
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert decay_names | no_decay_names == trainable and not decay_names & no_decay_names


# ---------------------------------------------------------------- shapes, keys, errors


def test_patchify_order_and_roundtrip():
    m = tiny()
    x = torch.randn(2, 3, 32, 32)
    p = m.patchify(x)
    assert p.shape == (2, 16, 8 * 8 * 3)
    # patch l = hi * 4 + wi; element (p, q, c) at index p*P*C + q*C + c
    hi, wi, pp, qq, c = 2, 1, 5, 3, 1
    assert p[1, hi * 4 + wi, pp * 24 + qq * 3 + c] == x[1, c, hi * 8 + pp, wi * 8 + qq]
    assert torch.equal(m.unpatchify(p), x)


def test_factories_and_keys():
    for factory, depth, dim, patch in [
        (mae_vit_base_patch16, 12, 768, 16),
        (mae_vit_large_patch16, 24, 1024, 16),
        (mae_vit_huge_patch14, 32, 1280, 14),
    ]:
        with torch.device("meta"):
            m = factory()
        assert len(m.blocks) == depth and m.cls_token.shape[-1] == dim and m.patch_size == patch
        assert len(m.decoder_blocks) == 8 and m.mask_token.shape[-1] == 512
        assert m.decoder_blocks[0].attn.num_heads == 16
    keys = set(tiny().state_dict())
    expected = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}
    for sub in ("patch_embed.proj", "norm", "decoder_embed", "decoder_norm", "decoder_pred"):
        expected |= {f"{sub}.weight", f"{sub}.bias"}
    for i in range(2):
        for part in ("blocks", "decoder_blocks"):
            for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                expected |= {f"{part}.{i}.{sub}.weight", f"{part}.{i}.{sub}.bias"}
    assert keys == expected
    # the official models_mae.py's full names, and timm's (S, S) image size, as the reference takes them
    import fastmae.model as model_module

    for short in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"):
        assert getattr(model_module, f"{short}_dec512d8b") is getattr(model_module, short)
    torch.manual_seed(0)
    square = MaskedAutoencoderViT(img_size=(32, 32), patch_size=8, embed_dim=48, depth=1, num_heads=2)
    assert square.patch_embed.img_size == (32, 32) and square.num_patches == 16
    with pytest.raises(ValueError, match=r"img_size \(32, 48\): the MAE's patch grid is square"):
        MaskedAutoencoderViT(img_size=(32, 48), patch_size=8)


def test_forward_shapes():
    m = tiny(norm_pix_loss=True)
    loss, pred, mask = m(torch.randn(3, 3, 32, 32), mask_ratio=0.75)
    assert loss.dim() == 0 and pred.shape == (3, 16, 192) and mask.shape == (3, 16)
    assert torch.equal(mask.sum(1), torch.full((3,), 12.0))
    assert m.forward_features(torch.randn(3, 3, 32, 32)).shape == (3, 17, 48)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        MaskedAutoencoderViT(img_size=30, patch_size=8)
    m = tiny()
    x = torch.randn(1, 3, 32, 32)
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
            m(x, mask_ratio=ratio)
    with pytest.raises(ValueError, match="expected images of shape"):
        m(torch.randn(1, 3, 40, 40))
