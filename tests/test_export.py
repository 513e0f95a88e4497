"""``python -m fastmae.export``: a run checkpoint to timm / MAE / HF files that load back."""

from __future__ import annotations

import pytest
import torch

from fastmae.convert import load_official, load_safetensors
from fastmae.export import main
from fastmae.model import MaskedAutoencoderViT
from fastmae.vit import VisionTransformer

ARCH = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=True)  # fmt: skip


@pytest.fixture
def run_checkpoint(tmp_path):
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(**ARCH)
    path = tmp_path / "ckpt-step000000010.pt"
    torch.save({"model": mae.state_dict(), "config": {**ARCH, "preset": "demo"}, "step": 10}, path)
    return mae, path


def test_timm_safetensors_export_loads_into_the_vit(run_checkpoint, tmp_path, capsys):
    mae, path = run_checkpoint
    out = tmp_path / "enc.safetensors"
    assert main([str(path), "--to", "timm", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    sd = load_safetensors(out)
    assert "fc_norm.weight" in sd and "norm.weight" not in sd and "mask_token" not in sd
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=0)
    vit.load_state_dict(sd, strict=True)  # the same keys timm's avg-pool ViT has
    x = torch.randn(2, 3, 32, 32)
    tokens = mae.eval().forward_features(x, norm=False)
    torch.testing.assert_close(vit.eval().forward_features(x), mae.norm(tokens[:, 1:].mean(1)))


def test_mae_export_is_an_official_checkpoint(run_checkpoint, tmp_path):
    mae, path = run_checkpoint
    out = tmp_path / "mae.pth"
    assert main([str(path), "--to", "mae", "--out", str(out)]) == 0
    fresh = MaskedAutoencoderViT(**ARCH)
    report = load_official(fresh, out)
    assert not report.missing and not report.unexpected
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), mae.state_dict().values(), strict=True))


def test_hf_export_round_trips(run_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    mae, path = run_checkpoint
    out = tmp_path / "hf"
    assert main([str(path), "--to", "hf", "--out", str(out)]) == 0
    hf = transformers.ViTMAEForPreTraining.from_pretrained(out)
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.decoder_num_attention_heads == 16
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    torch.testing.assert_close(hf(pixel_values=imgs, noise=noise).logits, mae(imgs, noise=noise)[1])


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.pth")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
