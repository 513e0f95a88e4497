"""The fine-tuning ViT: features equal the MAE encoder's, lr-decay groups as the recipe, freezing."""

from __future__ import annotations

import pytest
import torch

from fastmae.convert import to_timm_state_dict
from fastmae.model import MaskedAutoencoderViT
from fastmae.vit import (
    VisionTransformer,
    layer_id_for_vit,
    load_pretrained_encoder,
    param_groups_lrd,
    vit_base_patch16,
    vit_from_mae,
)
from tests.helpers import assert_close_rel

MAE = dict(
    img_size=32,
    patch_size=8,
    embed_dim=48,
    depth=3,
    num_heads=4,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=4,
)


def _mae_and_input():
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(**MAE).eval()
    # non-trivial final norm, so a norm / fc_norm mix-up shows
    with torch.no_grad():
        mae.norm.weight.uniform_(0.5, 1.5)
        mae.norm.bias.uniform_(-0.5, 0.5)
    return mae, torch.randn(4, 3, 32, 32)


def test_cls_features_equal_mae_encoder():
    mae, x = _mae_and_input()
    vit = vit_from_mae(mae, num_classes=0, global_pool=False).eval()
    missing = load_pretrained_encoder(vit, mae.state_dict())
    assert missing == []
    assert torch.equal(vit.forward_features(x), mae.forward_features(x)[:, 0])  # the same ops on the same values


def test_global_pool_features_are_fc_norm_of_mean_patch_tokens():
    mae, x = _mae_and_input()
    vit = vit_from_mae(mae, num_classes=5, global_pool=True).eval()
    missing = load_pretrained_encoder(vit, mae.state_dict())
    # the recipe: fc_norm and the head are new, the pretrained final norm is dropped
    assert set(missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    tokens = mae.forward_features(x, norm=False)
    expected = torch.nn.functional.layer_norm(tokens[:, 1:].mean(1), (48,), eps=1e-6)
    assert torch.equal(vit.forward_features(x), expected)  # the same ops on the same values
    assert vit(x).shape == (4, 5)


def test_pretrained_fc_norm_is_the_pretrained_final_norm():
    """For frozen features (kNN): the global-pool model's fc_norm is the pretrained norm, not a fresh one;
    a global-pool model's weights (fc_norm, no norm) cannot make a cls-token model."""
    mae, x = _mae_and_input()
    vit = vit_from_mae(mae, num_classes=0, global_pool=True).eval()
    assert load_pretrained_encoder(vit, mae.state_dict(), pretrained_fc_norm=True) == []
    tokens = mae.forward_features(x, norm=False)
    assert torch.equal(vit.forward_features(x), mae.norm(tokens[:, 1:].mean(1)))  # the same ops on the same values
    cls_model = vit_from_mae(mae, num_classes=0, global_pool=False)
    with pytest.raises(KeyError, match="cannot make a cls-token model"):
        load_pretrained_encoder(cls_model, vit.state_dict())


def test_easycv_prefixed_encoder_loads():
    mae, x = _mae_and_input()
    easycv = {"encoder." + k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    vit = vit_from_mae(mae, num_classes=0, global_pool=False).eval()
    assert load_pretrained_encoder(vit, easycv) == []
    assert torch.equal(vit.forward_features(x), mae.forward_features(x)[:, 0])  # the same ops on the same values
    with pytest.raises(KeyError, match="lacks encoder weights"):
        load_pretrained_encoder(vit, {k: v for k, v in easycv.items() if "blocks.2" not in k})
    with pytest.raises(ValueError, match="shape"):
        load_pretrained_encoder(vit_from_mae(mae, embed_dim=64, num_heads=4, num_classes=0), easycv)


def test_lr_decay_groups_match_the_recipe():
    """ViT-B, layer decay 0.65 (the MAE fine-tuning value for ViT-B): 14 layer ids, scales 0.65**(13 - id)."""
    with torch.device("meta"):
        vit = vit_base_patch16(num_classes=10, global_pool=True)
    groups = param_groups_lrd(vit, weight_decay=0.05, layer_decay=0.65)
    by_name = {n: g for g in groups for n in g["names"]}
    assert len(by_name) == sum(1 for _ in vit.parameters())
    num_layers = 13
    for name, layer in [("cls_token", 0), ("pos_embed", 0), ("patch_embed.proj.weight", 0), ("blocks.0.attn.qkv.weight", 1),
                        ("blocks.11.mlp.fc2.bias", 12), ("fc_norm.weight", 13), ("head.weight", 13)]:  # fmt: skip
        assert layer_id_for_vit(name, num_layers) == layer
        assert by_name[name]["lr_scale"] == pytest.approx(0.65 ** (num_layers - layer))
    assert by_name["head.weight"]["lr_scale"] == 1.0
    assert by_name["blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65**12)
    # no weight decay: 1-D parameters, cls_token and pos_embed
    for name in ("cls_token", "pos_embed", "blocks.3.norm1.weight", "blocks.3.attn.qkv.bias", "head.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name
    for name in ("patch_embed.proj.weight", "blocks.3.attn.qkv.weight", "head.weight"):
        assert by_name[name]["weight_decay"] == 0.05, name
    assert len(groups) == 2 * 14  # a decay and a no-decay group per layer id


@pytest.mark.parametrize("mode,k", [("full", 0), ("partial", 2), ("linear", 0)])
def test_freeze_modes(mode, k):
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=4, num_classes=3,
                            global_pool=mode != "linear", linear_probe=mode == "linear")  # fmt: skip
    vit.freeze_for(mode, trainable_blocks=k)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    if mode == "full":
        assert trainable == {n for n, _ in vit.named_parameters()}
    elif mode == "partial":
        assert {n.split(".")[1] for n in trainable if n.startswith("blocks.")} == {"2", "3"}
        assert "fc_norm.weight" in trainable and "head.weight" in trainable
        assert "patch_embed.proj.weight" not in trainable and "cls_token" not in trainable
    else:
        assert trainable == {"head.1.weight", "head.1.bias"}
        assert isinstance(vit.head[0], torch.nn.BatchNorm1d) and not vit.head[0].affine and vit.head[0].eps == 1e-6
    with pytest.raises(ValueError):
        vit.freeze_for("partial", trainable_blocks=9)


def test_linear_probe_head_folds_into_one_linear():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4, num_classes=3,
                            global_pool=False, linear_probe=True)  # fmt: skip
    vit.train()
    for _ in range(3):  # give the BatchNorm running statistics something to hold
        vit(torch.randn(8, 3, 32, 32) * 2 + 1)
    vit.eval()
    sd = to_timm_state_dict(vit.state_dict(), global_pool=False)
    head = torch.nn.Linear(48, 3)
    head.load_state_dict({"weight": sd["head.weight"], "bias": sd["head.bias"]})
    x = torch.randn(5, 3, 32, 32)
    feats = vit.forward_features(x)
    assert_close_rel(head(feats), vit.head(feats), 1e-5, "folded head")
