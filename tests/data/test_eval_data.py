"""The evaluation data of fine-tuning and the kNN monitor: the stratified split, MAE's eval crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.data import make_demo_dataset
from fastmae.data.eval import center_crop_params, split_source
from fastmae.data.sources import open_source


def test_split_is_stratified_and_deterministic(tmp_path):
    src = open_source(make_demo_dataset(tmp_path / "demo", n_images=64, size=32, seed=1))
    train, val = split_source(src, 0.25, seed=3)
    assert len(train) + len(val) == len(src) and not set(train.paths) & set(val.paths)
    for label in range(4):
        n = sum(1 for _, y in src.samples if y == label)
        assert sum(1 for _, y in val.samples if y == label) == round(0.25 * n)
    assert split_source(src, 0.25, seed=3)[1].paths == val.paths


def test_center_crop_window():
    p = center_crop_params(375, 500)
    assert (p.height, p.width) == (328, 328) and (p.top, p.left) == (23, 86) and not p.flip


@pytest.mark.parametrize("size", [224, 384])
def test_eval_transform_is_the_references(tmp_path, size):
    """MAE's util/datasets.py: Resize(size / crop_pct, bicubic) + CenterCrop(size), crop_pct 224/256
    up to 224 px and 1.0 above (written here with PIL). Crop-then-resize is the same field of view:
    ~1 grey level apart at 224, where a wrong crop_pct at 384 is ~0.1 apart on average."""
    from fastmae.data import IMAGENET_MEAN, IMAGENET_STD
    from fastmae.data.eval import eval_crop, eval_transform

    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:420]
    img = np.stack([xx * 0.6, yy * 0.8, (xx + yy) * 0.35], -1) % 256 + g.normal(0, 4, (300, 420, 1))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / "a.png")
    crop_pct = 224 / 256 if size <= 224 else 1.0
    assert eval_crop(size) == crop_pct
    with Image.open(tmp_path / "a.png") as im:
        short = int(size / crop_pct)  # torchvision's Resize(int): the shorter side
        w, h = round(im.width * short / im.height), short
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        ref = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    got = eval_transform(str(tmp_path / "a.png"), size)
    assert (got - ref).abs().mean() < 0.02
    wrong = eval_transform(str(tmp_path / "a.png"), size, crop=1.0 if size <= 224 else 224 / 256)
    assert (wrong - ref).abs().mean() > 0.05  # the check tells the two crops apart


def test_split_keeps_missing_files_and_puts_a_file_on_one_side(tmp_path):
    """A list's missing files go with the training half (its loader reports them); a file listed
    twice lands on one side only."""
    for i in range(8):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{i}.png {i % 2}\n" for i in range(8)) + "0.png 0\n2.png 0\ngone.png 1\n")
    src = open_source(tmp_path, lst)
    assert src.missing == [str(tmp_path / "gone.png")]
    train, val = split_source(src, 0.5, seed=0)
    assert train.missing == src.missing and val.missing == []
    assert not set(train.paths) & set(val.paths)
    assert len(set(train.paths)) + len(set(val.paths)) == 8
