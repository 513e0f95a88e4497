"""Other runs' weights as a starting point: --init-from's loading, and the architecture a checkpoint implies."""

from __future__ import annotations

import pytest
import torch

from fastmae.convert import to_hf
from fastmae.model import MaskedAutoencoderViT
from fastmae.pretrained import init_weights, mae_architecture
from tests.helpers import TINY_MAE

TINY = TINY_MAE


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _mae(seed: int, **kw) -> MaskedAutoencoderViT:
    torch.manual_seed(seed)
    return MaskedAutoencoderViT(**{**TINY, **kw})


def _layouts(src: MaskedAutoencoderViT, tmp_path) -> dict:
    """The files a continued pretraining starts from, each holding ``src``'s weights."""
    from fastmae.convert import save_safetensors, to_hf_state_dict

    sd = src.state_dict()
    torch.save({"model": sd, "optimizer": {}, "config": {"num_heads": src.blocks[0].attn.num_heads}}, tmp_path / "c.pt")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    save_safetensors(to_hf_state_dict(sd), tmp_path / "hf.safetensors")
    to_hf(src).save_pretrained(tmp_path / "hf_folder")
    return {
        "fastmae": tmp_path / "c.pt",
        "official_ddp": tmp_path / "ddp.pth",
        "hf_file": tmp_path / "hf.safetensors",
        "hf_folder": tmp_path / "hf_folder",
        "in_memory": {"model": sd},
    }


def test_init_weights_reads_every_layout(tmp_path):
    pytest.importorskip("transformers")
    src = _mae(1)
    for name, source in _layouts(src, tmp_path).items():
        dst = _mae(2)
        report = init_weights(dst, source)
        assert _equal_state(src, dst), name
        assert report.decoder == "loaded" and not report.regenerated and not report.ignored, name
        assert sorted(report.loaded) == sorted(dst.state_dict()), name


def test_init_weights_keeps_the_decoders_init_where_the_checkpoint_has_none_or_another(tmp_path):
    src = _mae(1, decoder_depth=3)
    encoder_only = {k: v for k, v in src.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    for source, why in (
        ({"model": encoder_only}, "has no decoder"),
        (
            {"model": src.state_dict()},
            "the checkpoint's, width 32, 3 blocks, MLP 128, is not this run's, width 32, 2 blocks, MLP 128",
        ),
    ):
        dst, fresh = _mae(2), _mae(2)
        report = init_weights(dst, source)
        assert why in report.decoder and why in str(report)
        assert not report.ignored  # the other decoder's extra block is the decoder's business
        sd, own, theirs = dst.state_dict(), fresh.state_dict(), src.state_dict()
        for k in sd:
            expected = own[k] if k.startswith(("decoder", "mask_token")) else theirs[k]
            assert torch.equal(sd[k], expected), k


def test_init_weights_at_another_image_size_keeps_the_models_pos_embeds():
    """A continued run at 64 px from 32 px weights: all is loaded but the fixed sin-cos tables, which
    the model made for its 8 x 8 grid (the checkpoint's are 4 x 4)."""
    src, dst, fresh = _mae(1), _mae(2, img_size=64), _mae(2, img_size=64)
    report = init_weights(dst, {"model": src.state_dict()})
    assert report.regenerated == ["pos_embed", "decoder_pos_embed"] and report.decoder == "loaded"
    assert torch.equal(dst.pos_embed, fresh.pos_embed) and torch.equal(dst.decoder_pos_embed, fresh.decoder_pos_embed)
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert torch.equal(dst.decoder_pred.weight, src.decoder_pred.weight)
    loss, _, _ = dst(torch.randn(2, 3, 64, 64), mask_ratio=0.75)
    assert torch.isfinite(loss)


def test_init_weights_refuses_another_encoder_and_changes_nothing():
    from fastmae.convert import to_timm_state_dict

    src = _mae(1)
    heads = src.blocks[0].attn.num_heads
    cases = [
        (_mae(1, embed_dim=64).state_dict(), "its encoder has embed_dim 64 where this run's has embed_dim 48"),
        (_mae(1, depth=3).state_dict(), "depth 3 where this run's has depth 2"),
        (_mae(1, mlp_ratio=2.0).state_dict(), r"blocks.0.mlp.fc1.weight has shape \(96, 48\) where this run's has \(192, 48\)"),
        # a timm classifier with global pooling has fc_norm in place of the pretraining model's norm
        (to_timm_state_dict(src.state_dict(), global_pool=True), r"norm\.bias \(a classifier's or a timm global-pool"),
        ({"model": src.state_dict(), "config": {"num_heads": heads * 2}}, f"num_heads {heads * 2} where this run's has num_heads {heads}"),
    ]  # fmt: skip
    for source, match in cases:
        dst = _mae(2)
        before = {k: v.clone() for k, v in dst.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            init_weights(dst, source, num_heads=(heads, dst.decoder_blocks[0].attn.num_heads))
        assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    # a classifier without pooling: its head is of no use to pretraining, the rest loads
    classifier = {**to_timm_state_dict(src.state_dict(), global_pool=False), "head.weight": torch.zeros(10, 48),
                  "head.bias": torch.zeros(10)}  # fmt: skip
    dst = _mae(2)
    report = init_weights(dst, classifier)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert sorted(report.ignored) == ["head.bias", "head.weight"]
    assert "has no decoder" in report.decoder


def test_init_weights_reads_the_heads_where_the_checkpoint_says_them(tmp_path):
    """The weights do not fix the heads: a fastmae checkpoint's config and a Hugging Face folder's
    config.json do. Other encoder heads are an error; other decoder heads keep the decoder's init."""
    src = _mae(1)  # 4 heads in the encoder and the decoder
    with pytest.raises(ValueError, match="its encoder has num_heads 4 where this run's has num_heads 2"):
        init_weights(_mae(2, num_heads=2), {"model": src.state_dict(), "config": {"num_heads": 4}}, num_heads=(2, 4))
    config = {"model": src.state_dict(), "config": {"num_heads": 4, "decoder_num_heads": 4}}
    dst, fresh = _mae(2, decoder_num_heads=2), _mae(2, decoder_num_heads=2)
    report = init_weights(dst, config, num_heads=(4, 2))
    assert report.decoder == (
        "kept its init (the checkpoint's, width 32, 2 blocks, MLP 128, 4 heads, is not this run's, "
        "width 32, 2 blocks, MLP 128, 2 heads)"
    )
    assert torch.equal(dst.decoder_pred.weight, fresh.decoder_pred.weight)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)

    pytest.importorskip("transformers")
    to_hf(src).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="its encoder has num_heads 4 where this run's has num_heads 2"):
        init_weights(_mae(2, num_heads=2), tmp_path / "hf", num_heads=(2, 4))
    assert init_weights(_mae(2), tmp_path / "hf", num_heads=(4, 4)).decoder == "loaded"
    # the folder says its target too: a run with the other one is told (its decoder learnt the other)
    report = init_weights(_mae(2, norm_pix_loss=True), tmp_path / "hf", num_heads=(4, 4))
    assert report.decoder_loaded and report.decoder == "loaded (trained with norm_pix_loss=False, this run has True)"


def test_architecture_of_a_hugging_face_config_with_two_mlp_ratios_is_refused():
    pytest.importorskip("transformers")
    from fastmae.convert import hf_config

    config = hf_config(_mae(1)).to_dict()
    sd = _mae(1).state_dict()
    arch, guessed = mae_architecture({}, sd, hf_config=config)
    assert not guessed and arch["mlp_ratio"] == 4.0 and arch["num_heads"] == 4
    config["decoder_intermediate_size"] = 64
    with pytest.raises(ValueError, match=r"other MLP ratios \(192 / 48, 64 / 32\); fastmae has one"):
        mae_architecture({}, sd, hf_config=config)
