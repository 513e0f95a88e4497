"""Reconstruction grids: layout, and norm-pix un-normalisation from the visible patches only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.model import MaskedAutoencoderViT
from fastmae.visualize import (
    _patchify,
    _unpatchify,
    load_images,
    reconstruction_grid,
    save_reconstruction_grid,
    unnormalize_pred,
    visible_patch_stats,
)


def _tiny(norm_pix: bool = True) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
        decoder_num_heads=2, norm_pix_loss=norm_pix,
    )  # fmt: skip


def _weighted_stats(target: torch.Tensor, visible: list[int], side: int, sigma: float = 1.0):
    """The Gaussian-weighted visible statistics, patch by patch, in float64 (the test's own sums)."""
    mean, std = target.double().mean(-1), (target.double().var(-1) + 1e-6).sqrt()
    est_mean = torch.empty(target.shape[0], side * side, dtype=torch.float64)
    est_std = torch.empty_like(est_mean)
    for i in range(side * side):
        d2 = torch.tensor([float((i // side - j // side) ** 2 + (i % side - j % side) ** 2) for j in visible])
        w = torch.softmax(-d2.double() / (2 * sigma**2), 0)  # exp(-d2/2) / sum, as stable sums
        est_mean[:, i], est_std[:, i] = mean[:, visible] @ w, std[:, visible] @ w
    return est_mean, est_std


def test_visible_patches_keep_their_own_statistics_and_removed_ones_borrow_their_neighbours():
    torch.manual_seed(0)
    # each patch its own mean and scale, so a wrong weighting (or none) moves the estimates
    patches = torch.randn(2, 16, 192) * torch.rand(2, 16, 1).mul(3) + torch.randn(2, 16, 1).mul(2)
    imgs = _unpatchify(patches, 8)
    mask = torch.zeros(2, 16)
    removed = [5, 6, 10, 15]
    mask[:, removed] = 1
    mean, std = visible_patch_stats(imgs, mask, 8)
    target = _patchify(imgs, 8)
    torch.testing.assert_close(target, patches, rtol=0, atol=0)
    visible = [j for j in range(16) if j not in removed]
    torch.testing.assert_close(mean[:, visible, 0], target[:, visible].mean(-1))
    torch.testing.assert_close(std[:, visible, 0], (target[:, visible].var(-1) + 1e-6).sqrt())
    est_mean, est_std = _weighted_stats(target, visible, 4)
    torch.testing.assert_close(mean[:, removed, 0].double(), est_mean[:, removed], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std[:, removed, 0].double(), est_std[:, removed], rtol=1e-5, atol=1e-6)


def test_a_patch_far_from_every_visible_one_takes_their_statistics():
    """exp(-d^2/2) underflows past ~7 patches: the far corner once came out with mean and std ~0."""
    imgs = torch.randn(1, 3, 224, 224) * 0.5 + 2.0
    mask = torch.ones(1, 196)
    mask[0, 0] = 0  # only the top-left patch is visible
    mean, std = visible_patch_stats(imgs, mask, 16)
    target = _patchify(imgs, 16)[0, 0]
    torch.testing.assert_close(mean[0, :, 0], target.mean().expand(196))
    torch.testing.assert_close(std[0, :, 0], (target.var() + 1e-6).sqrt().expand(196))
    # none visible: the prediction as it is (mean 0, std 1), not NaN
    mean, std = visible_patch_stats(imgs, torch.ones(1, 196), 16)
    assert (mean == 0).all() and (std == 1).all()


def test_unnormalisation_never_reads_the_removed_pixels():
    """Changing what is under the mask changes nothing in the un-normalised prediction."""
    imgs = torch.randn(1, 3, 32, 32)
    mask = (torch.rand(1, 16, generator=torch.Generator().manual_seed(0)) < 0.75).float()
    pred = torch.randn(1, 16, 192)
    a = unnormalize_pred(pred, imgs, mask, 8)
    hidden = _patchify(torch.ones_like(imgs), 8) * mask.unsqueeze(-1)
    other = imgs + 100 * hidden.reshape(1, 4, 4, 8, 8, 3).permute(0, 5, 1, 3, 2, 4).reshape(1, 3, 32, 32)
    torch.testing.assert_close(unnormalize_pred(pred, other, mask, 8), a)
    # and the removed patches take the visible ones' scale, not the (huge) removed ones'
    assert a[mask.bool()].abs().max() < 20


def test_grid_has_four_columns_and_a_row_per_image(tmp_path):
    model = _tiny()
    imgs = torch.randn(3, 3, 32, 32)
    grid = reconstruction_grid(model, imgs, 0.75, min_side=64)
    cell, gap = 64, 4
    assert grid.size == (4 * cell + 5 * gap, 22 + 3 * (cell + gap) + gap)
    path = save_reconstruction_grid(model, imgs, tmp_path / "g.png", title="step 1")
    assert Image.open(path).format == "PNG" and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="does not end in .png"):  # PNG bytes under another name mislead
        save_reconstruction_grid(model, imgs, tmp_path / "g.jpg")
    assert not (tmp_path / "g.jpg").exists()
    # the visible patches of column 4 are the original's pixels
    arr = torch.tensor(np.array(grid), dtype=torch.float32)
    orig, pasted = (
        arr[22 : 22 + cell, gap : gap + cell],
        arr[22 : 22 + cell, gap + 3 * (cell + gap) : gap + 3 * (cell + gap) + cell],
    )
    assert (orig == pasted).float().mean() > 0.2  # 25% of the patches are visible


def test_grid_restores_the_model_mode_and_loads_images(tmp_path):
    model = _tiny(norm_pix=False)
    model.train()
    Image.new("RGB", (50, 40), (200, 10, 10)).save(tmp_path / "a.jpg")
    imgs = load_images([tmp_path / "a.jpg"], 32)
    assert imgs.shape == (1, 3, 32, 32)
    assert imgs[0, 0].mean() > 1.0 and imgs[0, 2].mean() < -1.0  # red, ImageNet-normalised
    reconstruction_grid(model, imgs)
    assert model.training


def test_pick_images_skips_unreadable_files_and_decodes_like_the_loaders(tmp_path):
    """The grid's rows come from readable files only (the loaders skip the others), spread over the
    source, and odd modes decode as the loaders decode them: a 16-bit grayscale PNG is mid-gray,
    not white."""
    from fastmae.data import IMAGENET_MEAN, IMAGENET_STD
    from fastmae.visualize import pick_images

    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        if i in (0, 3):
            p.write_bytes(b"")  # unreadable: replaced by the next path
        elif i == 4:
            Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)).save(p)  # I;16, half of full scale
        else:
            Image.new("RGB", (40, 40), (10 * i, 0, 0)).save(p)
        paths.append(str(p))
    imgs, picked = pick_images(paths, 3, 32)
    assert [Path(p).name for p in picked] == ["1.png", "2.png", "4.png"]  # 0 -> 1, 2, 4 (3 is empty)
    gray = imgs[2] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert gray.min().item() == pytest.approx(128 / 255, abs=1 / 255) and gray.max() - gray.min() < 1e-5
    assert pick_images([paths[0], paths[3]], 2, 32) == (None, [])


# ---------------------------------------------------------------------- python -m fastmae.visualize


@pytest.fixture
def some_images(tmp_path) -> list[Path]:
    from fastmae.data import make_demo_dataset

    root = make_demo_dataset(tmp_path / "imgs", n_images=6, size=40, seed=0)
    return sorted(root.rglob("*.jpg"))


def _expected_grid(model: MaskedAutoencoderViT, paths: list[Path], checkpoint: Path) -> np.ndarray:
    """The grid the CLI should draw: the same model weights, images and masks (seed 0), drawn directly."""
    imgs = load_images(paths, 32)
    noise = torch.rand(len(paths), model.num_patches, generator=torch.Generator().manual_seed(0))
    title = f"{checkpoint.name}, mask ratio 0.75, seed 0"
    return np.asarray(reconstruction_grid(model, imgs, 0.75, noise, title=title))


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_cli_draws_a_fastmae_runs_checkpoint(tmp_path, some_images, capsys, monkeypatch):
    from fastmae.config import make_config
    from fastmae.convert import model_config
    from fastmae.visualize import main

    model = _tiny()
    ckpt = tmp_path / "ckpt-step000000010.pt"
    torch.save({"model": model.state_dict(), "config": {**make_config({}).to_dict(), **model_config(model)}}, ckpt)
    out = tmp_path / "new" / "grid.png"  # its folder is made
    assert main([str(ckpt), str(some_images[0]), str(some_images[1]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "assumed" not in printed and f"wrote {out} (2 images" in printed
    np.testing.assert_array_equal(_png(out), _expected_grid(model, some_images[:2], ckpt))
    # a folder: its images spread over --max-images rows; the default name is the checkpoint's
    monkeypatch.chdir(tmp_path / "imgs")
    assert main([str(ckpt), str(some_images[0].parents[1]), "--max-images", "3"]) == 0
    default = tmp_path / "imgs" / f"{ckpt.stem}_recon.png"
    assert Image.open(default).size[0] == Image.open(out).size[0]  # four columns of the same width
    assert "(3 images" in capsys.readouterr().out


def test_cli_reads_official_and_hugging_face_layouts(tmp_path, some_images, capsys):
    from fastmae.convert import to_hf
    from fastmae.visualize import main

    model = _tiny()
    official = tmp_path / "mae_visualize_tiny.pth"
    torch.save({"model": model.state_dict()}, official)  # no config: the heads are not in the weights
    out = tmp_path / "official.png"
    args = [str(official), *map(str, some_images[:2]), "--out", str(out)]
    assert main([*args, "--num-heads", "2", "--decoder-num-heads", "2"]) == 0
    assert "assumed norm_pix_loss=True" in capsys.readouterr().out
    expected = _expected_grid(model, some_images[:2], official)
    np.testing.assert_array_equal(_png(out), expected)
    assert main(args) == 0  # guessed heads: another function, and the guess is printed
    assert "num_heads=1" in capsys.readouterr().out
    assert not np.array_equal(_png(out), expected)

    pytest.importorskip("transformers")
    to_hf(model).save_pretrained(tmp_path / "hf")  # its config.json says everything
    assert main([str(tmp_path / "hf"), *map(str, some_images[:2]), "--out", str(out)]) == 0
    assert "assumed" not in capsys.readouterr().out
    np.testing.assert_array_equal(_png(out), _expected_grid(model, some_images[:2], tmp_path / "hf"))


@pytest.mark.parametrize("layout", ["fastmae", "hugging_face", "hugging_face_file"])
def test_cli_draws_a_plain_pixel_model_as_one(tmp_path, some_images, capsys, layout):
    """A model trained on plain pixels (norm_pix_loss off, as the official mae_visualize_* ones) is
    drawn as one where its checkpoint says so: its predictions are pixels, not un-normalised."""
    from fastmae.config import make_config
    from fastmae.convert import model_config
    from fastmae.visualize import main

    model = _tiny(norm_pix=False)
    if layout == "fastmae":
        ckpt = tmp_path / "plain.pt"
        torch.save({"model": model.state_dict(), "config": {**make_config({}).to_dict(), **model_config(model)}}, ckpt)
    else:
        pytest.importorskip("transformers")
        from fastmae.convert import to_hf

        ckpt = tmp_path / "hf"
        to_hf(model).save_pretrained(ckpt)
        if layout == "hugging_face_file":  # the weights file alone: the config.json beside it still counts
            ckpt = ckpt / "model.safetensors"
    out = tmp_path / "grid.png"
    assert main([str(ckpt), *map(str, some_images[:2]), "--out", str(out)]) == 0
    assert "assumed" not in capsys.readouterr().out
    np.testing.assert_array_equal(_png(out), _expected_grid(model, some_images[:2], ckpt))
    assert not np.array_equal(_png(out), _expected_grid(_tiny(norm_pix=True), some_images[:2], ckpt))


def test_cli_errors_are_one_line(tmp_path, some_images, capsys):
    from fastmae.visualize import main

    model = _tiny()
    encoder_only = {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": encoder_only}, tmp_path / "enc.pth")
    torch.save({"model": model.state_dict()}, tmp_path / "full.pth")
    from fastmae.config import make_config
    from fastmae.convert import model_config

    torch.save(
        {"model": model.state_dict(), "config": {**make_config({}).to_dict(), **model_config(model)}},
        tmp_path / "run.pt",
    )
    for args, message in (
        ([str(tmp_path / "enc.pth"), str(some_images[0])], "is encoder-only"),
        ([str(tmp_path / "full.pth"), str(tmp_path / "nothing.jpg")], "nothing.jpg does not exist"),
        ([str(tmp_path / "none.pth"), str(some_images[0])], "none.pth does not exist"),
        ([str(tmp_path / "full.pth"), str(some_images[0]), "--mask-ratio", "1"], "--mask-ratio must be in [0, 1)"),
        ([str(tmp_path / "full.pth"), str(some_images[0]), "--out", str(tmp_path)], "is a folder; name the PNG"),
        ([str(tmp_path / "full.pth"), str(some_images[0]), "--out", str(tmp_path / "pic.jpg")], "name a .png file"),
        (
            [str(tmp_path / "full.pth"), str(some_images[0]), "--out", str(tmp_path / "full.pth" / "a.png")],
            "full.pth is not a folder",
        ),
        ([str(tmp_path / "full.pth"), str(some_images[0]), "--img-size", "-16"], "--img-size must be >= 1"),
        ([str(tmp_path / "full.pth"), str(some_images[0]), "--img-size", "20"], "not divisible"),
        # heads given that differ from the checkpoint's: its decoder would be another function
        ([str(tmp_path / "run.pt"), str(some_images[0]), "--decoder-num-heads", "1"], "the decoder was not loaded"),
    ):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and message in err[-1], err
    assert not (tmp_path / "pic.jpg").exists()
