"""timm loads fastmae's encoder export with strict=True and computes the same features.

timm needs torchvision, and PyPI's torchvision does not import beside the CPU torch wheel of the
main test environment, so these tests skip there; .ci/run runs them for real in a second
environment with a matching torch + torchvision pair (``-m interop``).
"""

from __future__ import annotations

import pytest
import torch

from fastmae.convert import load_safetensors, save_safetensors, to_timm_state_dict
from fastmae.model import mae_vit_base_patch16
from fastmae.vit import load_pretrained_encoder, vit_from_mae
from tests.helpers import assert_close_rel

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def mae_and_images():
    torch.manual_seed(0)
    mae = mae_vit_base_patch16().eval()
    with torch.no_grad():  # a non-trivial final norm, so norm / fc_norm mix-ups show
        mae.norm.weight.uniform_(0.5, 1.5)
        mae.norm.bias.uniform_(-0.5, 0.5)
    return mae, torch.randn(2, 3, 224, 224)


def test_cls_token_export_loads_strict_and_matches(mae_and_images, tmp_path):
    mae, x = mae_and_images
    path = tmp_path / "vit_b_cls.safetensors"
    save_safetensors(to_timm_state_dict(mae.state_dict(), global_pool=False), path)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="token").eval()
    model.load_state_dict(load_safetensors(path), strict=True)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert_close_rel(tokens, mae.forward_features(x), 1e-5, "tokens")
        assert_close_rel(model(x), mae.forward_features(x)[:, 0], 1e-5, "cls features")


def test_global_pool_export_loads_strict_and_matches(mae_and_images):
    mae, x = mae_and_images
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="avg").eval()
    model.load_state_dict(to_timm_state_dict(mae.state_dict(), global_pool=True), strict=True)
    with torch.no_grad():
        pooled = mae.forward_features(x, norm=False)[:, 1:].mean(1)
        assert_close_rel(model(x), mae.norm(pooled), 1e-5, "avg features")


def test_fine_tuned_classifier_exports_with_its_head(mae_and_images):
    mae, x = mae_and_images
    vit = vit_from_mae(mae, num_classes=10, global_pool=True).eval()
    load_pretrained_encoder(vit, mae.state_dict())
    torch.nn.init.normal_(vit.head.weight, std=0.02)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, global_pool="avg").eval()
    model.load_state_dict(to_timm_state_dict(vit.state_dict()), strict=True)
    with torch.no_grad():
        assert_close_rel(model(x), vit(x), 1e-5, "logits")
