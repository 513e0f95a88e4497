"""Fixtures the trainer's and fine-tuning's test modules share (``tests/training.py`` and
``tests/finetuning.py`` have their helpers).

``one_thread`` is not autouse: a module of tiny runs asks for it with
``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastmae import finetune as ft
from fastmae.data import make_demo_dataset
from fastmae.model import MaskedAutoencoderViT
from fastmae.vit import VisionTransformer
from tests.finetuning import ARCH, SMALL, color_classes


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and OpenMP threads spin badly on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """64 small JPEGs in an ImageFolder tree."""
    return make_demo_dataset(tmp_path_factory.mktemp("tiny_data"), n_images=64, size=40, seed=0)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    data = color_classes(root / "data")
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(**{k: v for k, v in ARCH.items() if k != "mlp_ratio"}, decoder_embed_dim=32,
                               decoder_depth=1, decoder_num_heads=4)  # fmt: skip
    pre = root / "ckpt.pt"
    torch.save({"model": mae.state_dict(), "config": ARCH, "step": 1}, pre)  # a fastmae run checkpoint's layout
    return data, pre


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A width-32, 1-block MAE with a non-trivial final norm, in the layouts ``--pretrained`` takes,
    and files it refuses."""
    root = tmp_path_factory.mktemp("small")
    data = color_classes(root / "data", per_class=8, size=32)
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(**{k: v for k, v in SMALL.items() if k != "mlp_ratio"}, decoder_embed_dim=32,
                               decoder_depth=1, decoder_num_heads=2).eval()  # fmt: skip
    with torch.no_grad():
        mae.norm.weight.uniform_(0.5, 1.5)
        mae.norm.bias.uniform_(-0.5, 0.5)
    sd = mae.state_dict()
    enc = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    paths = {name: root / f"{name}.pt" for name in ("run", "easycv", "ddp", "wide224", "finetuned_gp", "junk")}
    torch.save({"model": sd, "config": SMALL, "step": 1}, paths["run"])
    torch.save({"state_dict": {"encoder." + k: v for k, v in enc.items()}}, paths["easycv"])
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, paths["ddp"])
    # ViT-B/16's patch grid at 224 px, but 32 wide
    wide = MaskedAutoencoderViT(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                                decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    torch.save({"model": wide.state_dict()}, paths["wide224"])
    classifier = VisionTransformer(**SMALL, num_classes=4, global_pool=True)  # a fine-tuned global-pool model
    torch.save({"model": classifier.state_dict(), "config": ft.to_dict(ft.FinetuneConfig())}, paths["finetuned_gp"])
    paths["junk"].write_text("not a checkpoint\n")
    return mae, data, paths
