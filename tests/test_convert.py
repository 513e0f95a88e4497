"""Weight conversion: HF round trips, official checkpoints strict and encoder-only."""

from __future__ import annotations

import json

import pytest
import torch

from fastmae.convert import (
    LoadReport,
    from_hf,
    from_hf_state_dict,
    load_official,
    load_safetensors,
    read_state_dict,
    to_hf,
)
from fastmae.model import MaskedAutoencoderViT

pytest.importorskip("transformers")

from tests.helpers import TINY_MAE

TINY = TINY_MAE


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_fastmae_to_hf_to_fastmae_is_identity(norm_pix_loss):
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(**TINY, norm_pix_loss=norm_pix_loss).double()
    hf = to_hf(m, mask_ratio=0.6)
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.norm_pix_loss == norm_pix_loss
    assert hf.config.mask_ratio == 0.6 and next(hf.parameters()).dtype == torch.float64
    back = from_hf(hf)
    assert _equal_state(m, back)
    assert back.norm_pix_loss == norm_pix_loss and back.blocks[0].norm1.eps == 1e-6
    imgs, noise = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 16, dtype=torch.float64)
    out = hf(pixel_values=imgs, noise=noise)
    loss, pred, _ = back(imgs, mask_ratio=0.6, noise=noise)
    torch.testing.assert_close(pred, out.logits, rtol=1e-14, atol=1e-14)


def test_a_model_with_another_layer_norm_eps_converts_with_it():
    """HF's ViTMAEConfig default eps is 1e-12 and the reference constructor's nn.LayerNorm is 1e-5:
    to_hf refused every eps but 1e-6, so from_hf's model of a default config did not go back."""
    pytest.importorskip("transformers")
    from functools import partial

    torch.manual_seed(0)
    for eps in (1e-5, 1e-12):
        m = MaskedAutoencoderViT(**TINY, norm_layer=partial(torch.nn.LayerNorm, eps=eps)).double()
        hf = to_hf(m)
        assert hf.config.layer_norm_eps == eps
        imgs, noise = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 16, dtype=torch.float64)
        torch.testing.assert_close(hf(pixel_values=imgs, noise=noise).logits, m(imgs, noise=noise)[1])
        assert to_hf(from_hf(hf)).config.layer_norm_eps == eps
    m.decoder_norm.eps = 1e-6
    with pytest.raises(ValueError, match=r"one layer_norm_eps; this model's LayerNorms have \[1e-12, 1e-06\]"):
        to_hf(m)


def test_an_mlp_width_that_is_no_whole_ratio_converts():
    """61 / 28 * 28 is 60.99...: int() of it made the converted model's MLP one unit narrower than
    HF's (a size-mismatch traceback); every width of 1 to 4x a few dims round-trips."""
    from fastmae.model import mlp_ratio_of

    for dim in (28, 48, 96, 100):
        for hidden in range(dim, 4 * dim + 1):
            assert int(dim * mlp_ratio_of(dim, hidden)) == hidden, (dim, hidden)
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTMAEConfig(
        hidden_size=28, num_hidden_layers=1, num_attention_heads=2, intermediate_size=61, image_size=16,
        patch_size=8, decoder_hidden_size=28, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=61, layer_norm_eps=1e-6,
    )  # fmt: skip
    hf = transformers.ViTMAEForPreTraining(config).double().eval()
    m = from_hf(hf)
    assert m.blocks[0].mlp.fc1.out_features == m.decoder_blocks[0].mlp.fc1.out_features == 61
    imgs, noise = torch.randn(1, 3, 16, 16, dtype=torch.float64), torch.rand(1, 4, dtype=torch.float64)
    torch.testing.assert_close(m(imgs, noise=noise)[1], hf(pixel_values=imgs, noise=noise).logits)


def test_official_full_checkpoint_loads_strict(tmp_path):
    torch.manual_seed(0)
    src = MaskedAutoencoderViT(**TINY)
    path = tmp_path / "mae_visualize.pth"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)  # the official file layout
    dst = MaskedAutoencoderViT(**TINY)
    report = load_official(dst, path)
    assert not report.missing and not report.unexpected and not report.encoder_only
    assert _equal_state(src, dst)


def test_encoder_only_checkpoint_reports_the_decoder(tmp_path):
    torch.manual_seed(0)
    src = MaskedAutoencoderViT(**TINY)
    enc = {k: v for k, v in src.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": enc}, path)
    dst = MaskedAutoencoderViT(**TINY)
    dec_before = dst.decoder_pred.weight.clone()
    report = load_official(dst, path)
    assert isinstance(report, LoadReport) and report.encoder_only
    assert "mask_token" in report.missing and "decoder_pred.weight" in report.missing
    assert "decoder (encoder-only checkpoint)" in str(report)
    assert torch.equal(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert torch.equal(dst.decoder_pred.weight, dec_before)


def test_bad_checkpoints_raise():
    src = MaskedAutoencoderViT(**TINY).state_dict()
    dst = MaskedAutoencoderViT(**TINY)
    no_block = {k: v for k, v in src.items() if not k.startswith("blocks.1.")}
    with pytest.raises(KeyError, match="lacks encoder weights"):
        load_official(dst, {"model": no_block})
    with pytest.raises(KeyError, match="does not"):
        load_official(dst, {"model": {**src, "head.weight": torch.zeros(2, 48)}})
    report = load_official(dst, {"model": {**src, "head.weight": torch.zeros(2, 48)}}, strict=False)
    assert report.unexpected == ["head.weight"]
    wrong = dict(src, cls_token=torch.zeros(1, 1, 64))
    with pytest.raises(ValueError, match="cls_token: checkpoint shape"):
        load_official(dst, wrong)
    with pytest.raises(ValueError, match="no tensors"):
        read_state_dict({"model": {"epoch": 1}})
    # part of a decoder (a full checkpoint with decoder tensors missing): not read as encoder-only
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    for gone in ("decoder_pred.", "mask_token", "decoder_blocks.0."):
        partial = {k: v for k, v in src.items() if not k.startswith(gone)}
        with pytest.raises(KeyError, match="checkpoint has part of a decoder: it lacks"):
            load_official(dst, {"model": partial})
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # nothing loaded


def test_an_official_training_checkpoint_loads(tmp_path):
    """The official main_pretrain's checkpoint-N.pth: the weights beside the optimizer, the epoch, the
    scaler and the run's argparse.Namespace (which weights_only=True refused: "not a torch checkpoint")."""
    import argparse
    import datetime

    torch.manual_seed(0)
    src = MaskedAutoencoderViT(**TINY)
    path = tmp_path / "checkpoint-399.pth"
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True)
    torch.save({"model": src.state_dict(), "optimizer": {}, "epoch": 399, "scaler": {}, "args": args}, path)
    dst = MaskedAutoencoderViT(**TINY)
    assert not load_official(dst, path).missing and _equal_state(src, dst)
    other = tmp_path / "other.pth"  # what is still refused says what it met
    torch.save({"model": src.state_dict(), "when": datetime.date(2021, 11, 11)}, other)
    with pytest.raises(ValueError, match=r"cannot read .*other.pth: it holds more than tensors .*Unsupported global"):
        load_official(dst, other)


def test_save_pretrained_file_reads_as_the_loaded_model(tmp_path):
    """The ``model.safetensors`` save_pretrained writes (transformers 5.x writes 4.x names, the decoder's
    as ``decoder.decoder_encoder.layer.N``) converts to the state dict that from_pretrained gives."""
    from transformers import ViTMAEForPreTraining

    torch.manual_seed(0)
    m = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                             decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    to_hf(m).save_pretrained(tmp_path)
    from_file = from_hf_state_dict(load_safetensors(tmp_path / "model.safetensors"))
    loaded = from_hf(ViTMAEForPreTraining.from_pretrained(tmp_path)).state_dict()
    expected = m.state_dict()
    assert from_file.keys() == loaded.keys() == expected.keys()
    assert all(torch.equal(from_file[k], expected[k]) and torch.equal(loaded[k], expected[k]) for k in expected)


def test_a_hugging_face_config_is_read_beside_its_weights_file(tmp_path):
    from fastmae.convert import hf_folder_config

    (tmp_path / "model.safetensors").write_bytes(b"")
    assert hf_folder_config(tmp_path) is None and hf_folder_config(tmp_path / "model.safetensors") is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit_mae", "norm_pix_loss": False}))
    assert hf_folder_config(tmp_path) == hf_folder_config(tmp_path / "model.safetensors")
    assert hf_folder_config(tmp_path / "model.safetensors")["norm_pix_loss"] is False
    # another tool's config.json beside a file of that name (a fastmae run's) is not read as one
    (tmp_path / "config.json").write_text(json.dumps({"preset": "demo", "norm_pix_loss": True}))
    assert hf_folder_config(tmp_path / "model.safetensors") is None
    assert hf_folder_config(tmp_path / "other.safetensors") is None


def test_a_folder_reads_as_hugging_face_writes_one(tmp_path):
    from fastmae.convert import load_checkpoint

    with pytest.raises(ValueError, match="is a folder without model.safetensors or pytorch_model.bin"):
        load_checkpoint(tmp_path)
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(load_checkpoint(tmp_path)["w"], torch.ones(2))
