"""The evaluation data of fine-tuning and the kNN monitor: the stratified split, MAE's eval crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.data import make_demo_dataset
from fastmae.data.eval import split_source
from fastmae.data.sources import open_source


def test_split_is_stratified_and_deterministic(tmp_path):
    src = open_source(make_demo_dataset(tmp_path / "demo", n_images=64, size=32, seed=1))
    train, val = split_source(src, 0.25, seed=3)
    assert len(train) + len(val) == len(src) and not set(train.paths) & set(val.paths)
    for label in range(4):
        n = sum(1 for _, y in src.samples if y == label)
        assert sum(1 for _, y in val.samples if y == label) == round(0.25 * n)
    assert split_source(src, 0.25, seed=3)[1].paths == val.paths


def _picture(tmp_path, w=420, h=300):
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 0.6, yy * 0.8, (xx + yy) * 0.35], -1) % 256 + g.normal(0, 4, (h, w, 1))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / "a.png")
    return tmp_path / "a.png"


@pytest.mark.parametrize("size", [224, 384])
@pytest.mark.parametrize("shape", [(420, 300), (300, 421), (257, 257), (500, 375)])
def test_eval_transform_is_the_references(tmp_path, size, shape):
    """MAE's util/datasets.py: Resize(size / crop_pct, bicubic) + CenterCrop(size), crop_pct 224/256
    up to 224 px and 1.0 above, as torchvision computes them on a PIL image (written out here: the
    longer side truncated, the window's corner rounded): pixel for pixel."""
    from fastmae.data import IMAGENET_MEAN, IMAGENET_STD
    from fastmae.data.eval import eval_crop, eval_transform, resize_center_crop

    path = _picture(tmp_path, *shape)
    crop_pct = 224 / 256 if size <= 224 else 1.0
    assert eval_crop(size) == crop_pct
    with Image.open(path) as im:
        short = int(size / crop_pct)
        w, h = (short, int(short * im.height / im.width)) if im.width <= im.height else (
            int(short * im.width / im.height), short)  # fmt: skip
        im = im.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        ref = np.asarray(im.crop((left, top, left + size, top + size)))
        with Image.open(path) as again:
            assert np.array_equal(np.asarray(resize_center_crop(again.convert("RGB"), size, crop_pct)), ref)
    x = torch.from_numpy(ref.astype(np.float32) / 255).permute(2, 0, 1)
    want = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    got = eval_transform(str(path), size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    wrong = eval_transform(str(path), size, crop=1.0 if size <= 224 else 224 / 256)
    assert (wrong - want).abs().mean() > 0.05  # the check tells the two crops apart


@pytest.mark.interop
@pytest.mark.parametrize("size", [224, 384])
def test_eval_crop_is_torchvisions(tmp_path, size):
    """The official evaluation transform itself (torchvision's Resize + CenterCrop on PIL images), on
    odd and even sides: the same pixels."""
    tv = pytest.importorskip("torchvision.transforms")
    from fastmae.data.eval import eval_crop, resize_center_crop

    crop = eval_crop(size)
    official = tv.Compose([tv.Resize(int(size / crop), interpolation=tv.InterpolationMode.BICUBIC),
                           tv.CenterCrop(size)])  # fmt: skip
    for shape in ((420, 300), (300, 421), (257, 257), (500, 375), (333, 999)):
        with Image.open(_picture(tmp_path, *shape)) as im:
            im = im.convert("RGB")
            assert np.array_equal(np.asarray(resize_center_crop(im, size, crop)), np.asarray(official(im))), shape


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
