"""Reconstruction grids: what the MAE sees and what it fills in, as a PNG (PIL only).

``python -m fastmae.visualize CHECKPOINT IMAGE_OR_FOLDER ...`` draws the grid for any full MAE
checkpoint (a fastmae run's, an official MAE one, a Hugging Face ViTMAE folder) on your images.

One row per image, four columns: original | masked (the visible patches) | reconstruction (the
prediction at every patch) | reconstruction with the visible patches pasted in.

With ``norm_pix_loss`` the model predicts each patch normalised by that patch's own mean and std,
which it cannot know for a removed patch. The official MAE demo draws the raw predictions of its
``mae_visualize_*`` checkpoints, which were trained on plain pixels; other tools un-normalise with
the target patch's own statistics (MAE-pytorch's ``run_mae_vis.py``), which leaks the hidden
patch's mean colour and contrast into the picture. Here each removed patch is un-normalised with statistics of the *visible* patches only: the mean and std of
the visible patches around it, weighted by a Gaussian of the distance in patches
(:func:`visible_patch_stats`). The picture then shows only what the model can infer from what it
sees. Visible patches keep their own statistics (the model sees them).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from fastmae.cli import ArgumentParser
from fastmae.data import IMAGENET_MEAN, IMAGENET_STD
from fastmae.data.transforms import load_rgb

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """One image center-cropped, resized (bicubic) and ImageNet-normalised, ``(3, size, size)`` float32.

    Decoded as the loaders decode it (:func:`fastmae.data.transforms.load_rgb`: odd modes such as
    16-bit grayscale or CMYK to RGB); raises on an unreadable file.
    """
    im = ImageOps.fit(load_rgb(path), (size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def load_images(paths: Sequence[str | os.PathLike], size: int) -> torch.Tensor:
    """:func:`load_image` of each path, stacked ``(N, 3, size, size)``."""
    return torch.stack([load_image(p, size) for p in paths])


def pick_images(paths: Sequence[str], n: int, size: int) -> tuple[torch.Tensor | None, list[str]]:
    """Up to ``n`` readable images spread evenly over ``paths`` (the pictures' rows), with their paths.

    An unreadable file (the loaders skip and report it) is replaced by the next readable path after
    it; None when no path reads.
    """
    n = min(n, len(paths))
    chosen: dict[int, torch.Tensor] = {}
    tried: set[int] = set()
    for k in range(n):
        i = k * len(paths) // n
        while len(tried) < len(paths):
            if i not in tried:
                tried.add(i)
                try:
                    chosen[i] = load_image(paths[i], size)
                    break
                except Exception:  # any decode failure: PIL raises many kinds
                    pass
            i = (i + 1) % len(paths)
    if not chosen:
        return None, []
    order = sorted(chosen)
    return torch.stack([chosen[i] for i in order]), [paths[i] for i in order]


def _patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    N, C, H, W = imgs.shape
    x = imgs.reshape(N, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(N, (H // p) * (W // p), p * p * C)


def _unpatchify(x: torch.Tensor, p: int, C: int = 3) -> torch.Tensor:
    N, L, _ = x.shape
    h = int(L**0.5)
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(N, h, h, p, p, C))
    return x.reshape(N, C, h * p, h * p)


def visible_patch_stats(
    imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, sigma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std estimated from the visible patches only.

    Args:
        imgs: ``(N, C, H, W)``.
        mask: ``(N, L)``, 1 = removed.
        patch_size: ``P``.
        sigma: width of the Gaussian distance weighting, in patches.

    Returns:
        mean, std ``(N, L, 1)``: a visible patch's own statistics; for a removed patch the
        Gaussian-weighted average of the visible patches' (the norm-pix loss's unbiased variance),
        however far they are; with no visible patch, mean 0 and std 1 (the prediction as it is).
    """
    target = _patchify(imgs.float(), patch_size)
    mean = target.mean(-1)
    std = (target.var(-1) + 1e-6).sqrt()
    h = int(mask.shape[1] ** 0.5)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(h), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], -1).float().to(imgs.device)
    # the weights of visible patches j for patch l, normalised in the log domain: exp(-d^2 / 2) alone
    # underflows past ~7 patches, and a patch that far from every visible one (a high mask ratio, a
    # structured mask) came out with mean and std ~0, a flat grey whatever the model predicted
    log_w = -(torch.cdist(pos, pos) ** 2) / (2 * sigma**2)  # (j, l)
    keep = ~mask.bool()
    w = log_w.unsqueeze(0).masked_fill(~keep.unsqueeze(-1), float("-inf")).softmax(dim=1)  # (N, j, l)
    # no visible patch at all: NaN weights; the ImageNet mean and unit std show the raw prediction
    est_mean = torch.einsum("njl,nj->nl", w, mean).nan_to_num(0.0)
    est_std = torch.einsum("njl,nj->nl", w, std).nan_to_num(1.0)
    return torch.where(keep, mean, est_mean).unsqueeze(-1), torch.where(keep, std, est_std).unsqueeze(-1)


def unnormalize_pred(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Norm-pix predictions ``(N, L, P*P*C)`` back to image space with :func:`visible_patch_stats`."""
    mean, std = visible_patch_stats(imgs, mask, patch_size)
    return pred.float() * std + mean


def _to_uint8(imgs: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (imgs.float().cpu() * std + mean).clamp(0, 1)
    return (x * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def reconstruction_grid(
    model: torch.nn.Module,
    imgs: torch.Tensor,
    mask_ratio: float = 0.75,
    noise: torch.Tensor | None = None,
    min_side: int = 160,
    title: str = "",
) -> Image.Image:
    """The four-column grid for ``imgs`` ``(N, 3, S, S)`` (ImageNet-normalised) as a PIL image.

    ``model`` is a :class:`~fastmae.model.MaskedAutoencoderViT` (unwrapped); it runs in fp32 on the
    images' device. Small images are scaled up by an integer factor (nearest) to ``min_side``.
    """
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    finally:
        model.train(was_training)
    p = model.patch_size
    pred = unnormalize_pred(pred, imgs, mask, p) if model.norm_pix_loss else pred.float()
    recon = _unpatchify(pred, p)
    mask_px = _unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, p * p * 3), p)
    grey = torch.zeros_like(imgs)  # 0 in normalised space: the data set's mean colour
    masked = imgs * (1 - mask_px) + grey * mask_px
    pasted = imgs * (1 - mask_px) + recon * mask_px
    columns = [_to_uint8(x) for x in (imgs, masked, recon, pasted)]

    n, s = imgs.shape[0], imgs.shape[-1]
    scale = max(1, -(-min_side // s))
    cell, gap, head = s * scale, 4, 22 + (18 if title else 0)
    grid = Image.new("RGB", (4 * cell + 5 * gap, head + n * (cell + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((gap, 4), title, fill=(0, 0, 0))
    for c, name in enumerate(COLUMNS):
        draw.text((gap + c * (cell + gap) + 2, head - 16), name, fill=(0, 0, 0))
    for r in range(n):
        for c, col in enumerate(columns):
            tile = Image.fromarray(col[r]).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (gap + c * (cell + gap), head + r * (cell + gap)))
    return grid


def save_reconstruction_grid(
    model: torch.nn.Module,
    imgs: torch.Tensor,
    path: str | os.PathLike,
    mask_ratio: float = 0.75,
    noise: torch.Tensor | None = None,
    title: str = "",
) -> Path:
    """Write :func:`reconstruction_grid` as a PNG (via a temporary file, so a reader never sees half).

    ``path`` must name a ``.png``: the format is not taken from the name, and PNG bytes under
    another extension would mislead every viewer; a lossy format would blur the patch edges.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path} does not end in .png: the grid is written as a PNG")
    tmp = path.with_name(path.name + ".tmp")
    reconstruction_grid(model, imgs, mask_ratio, noise, title=title).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


class TrainingPictures:
    """A training run's reconstruction grids: the same few training images under the same masks,
    each time, so that grids of successive epochs compare (drawn by rank 0).

    Args:
        model: the MAE (not a compiled or DDP wrapper: it is run in eval mode, then put back).
        paths: image files to pick from (unreadable ones are skipped).
        n: rows of a grid.
        img_size: the model's input size.
        mask_ratio: the training's.
        seed: seeds the masks (which images are picked does not depend on it).
        run_dir: where ``recon-<tag>.png`` is written.
        title: the grids' title, before the tag.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        paths: Sequence[str],
        n: int,
        img_size: int,
        mask_ratio: float,
        seed: int,
        run_dir: Path,
        title: str = "",
    ):
        self.model, self.mask_ratio, self.run_dir, self.title = model, mask_ratio, Path(run_dir), title
        self.images, picked = pick_images(paths, n, img_size)
        self.noise = None
        if self.images is not None:
            device = next(model.parameters()).device
            self.images = self.images.to(device)
            gen = torch.Generator().manual_seed(seed)
            self.noise = torch.rand(len(picked), model.num_patches, generator=gen).to(device)

    def save(self, tag: str, step: int) -> Path | None:
        """Write ``recon-<tag>.png`` for the model as it is at ``step``; None when no image was readable."""
        if self.images is None:
            return None
        path = self.run_dir / f"recon-{tag}.png"
        title = f"{self.title}, {tag}, step {step}" if self.title else f"{tag}, step {step}"
        return save_reconstruction_grid(self.model, self.images, path, self.mask_ratio, self.noise, title=title)


# ---------------------------------------------------------------------- python -m fastmae.visualize


def image_paths(inputs: Sequence[str]) -> list[str]:
    """Image files: each input a file, or a folder scanned recursively (sorted), as the loaders scan."""
    from fastmae.data.sources import folder_scan_source

    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            paths += [p for p, _ in folder_scan_source(item).samples]
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise ValueError(f"{item} does not exist")
    return paths


def load_mae(
    checkpoint: str,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    norm_pix_loss: bool | None = None,
    img_size: int | None = None,
) -> tuple[torch.nn.Module, list[str]]:
    """A full MAE from ``checkpoint`` (reference path, eval mode) and the notes on what was assumed."""
    from fastmae.convert import fastmae_state_dict, hf_folder_config, load_checkpoint, read_state_dict
    from fastmae.model import MaskedAutoencoderViT
    from fastmae.pretrained import init_weights, mae_architecture

    obj = load_checkpoint(checkpoint)
    sd = fastmae_state_dict(read_state_dict(obj))
    if "mask_token" not in sd:
        raise ValueError(
            f"{checkpoint} is encoder-only: a reconstruction needs the decoder (a full checkpoint, e.g. the "
            "official mae_visualize_* ones, or a fastmae run's)"
        )
    arch, notes = mae_architecture(obj, sd, num_heads, decoder_num_heads, hf_folder_config(checkpoint))
    if norm_pix_loss is not None:
        arch["norm_pix_loss"] = norm_pix_loss
    elif "norm_pix_loss" not in arch:
        arch["norm_pix_loss"] = True
        notes.append("norm_pix_loss=True (--no-norm-pix-loss for a model trained on plain pixels, as mae_visualize_*)")
    if img_size:
        arch["img_size"] = img_size
    model = MaskedAutoencoderViT(**arch, fused=False)
    report = init_weights(model, obj, num_heads=(arch["num_heads"], arch["decoder_num_heads"]))
    if not report.decoder_loaded:
        raise ValueError(f"the decoder was not loaded: {report.decoder}")
    return model.eval(), notes


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m fastmae.visualize",
        description="Reconstructions of your images by a pretrained MAE, as a PNG grid: original | masked | "
        "reconstruction | reconstruction + visible patches (one row per image).",
    )
    parser.add_argument("checkpoint", help="a full MAE checkpoint: fastmae run, official MAE .pth, HF folder/file")
    parser.add_argument("images", nargs="+", help="image files or folders (scanned recursively)")
    parser.add_argument("--out", default="", help="the .png to write (default: <checkpoint name>_recon.png here)")
    parser.add_argument("--max-images", type=int, default=8, help="rows, spread over the images (default: 8)")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed (default: 0.75)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks (default: 0)")
    parser.add_argument("--img-size", type=int, default=0, help="input side (default: the checkpoint's)")
    parser.add_argument("--num-heads", type=int, help="encoder heads, where the checkpoint does not say")
    parser.add_argument("--decoder-num-heads", type=int, help="decoder heads, where the checkpoint does not say")
    parser.add_argument(
        "--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
        help="whether the model predicts normalised patches (default: the checkpoint's, else on)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not os.path.exists(args.checkpoint):
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    if args.out and os.path.isdir(args.out):
        parser.error(
            f"--out {args.out} is a folder; name the PNG to write (e.g. {os.path.join(args.out, 'recon.png')})"
        )
    if args.out and Path(args.out).suffix.lower() != ".png":  # before the checkpoint is read
        parser.error(f"--out {args.out}: the grid is written as a PNG (lossless); name a .png file")
    if not 0.0 <= args.mask_ratio < 1.0:
        parser.error(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    for name in ("max_images", "num_heads", "decoder_num_heads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.img_size < 0:
        parser.error(f"--img-size must be >= 1 (or 0, the checkpoint's), got {args.img_size}")
    name = Path(args.checkpoint.rstrip("/")).name
    out = Path(args.out or f"{Path(name).stem}_recon.png")
    # before the model runs: the nearest existing folder above the PNG must take it
    existing = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"cannot write {out}: {existing} is {'not a folder' if not existing.is_dir() else 'not writable'}")
    try:
        paths = image_paths(args.images)
        model, notes = load_mae(
            args.checkpoint, args.num_heads, args.decoder_num_heads, args.norm_pix_loss, args.img_size or None
        )
    except Exception as e:  # unreadable checkpoint, another layout, no images: one line
        parser.error(str(e).strip("'\""))
    if notes:
        print(f"assumed {', '.join(notes)} (the checkpoint does not say)", flush=True)
    size = model.patch_embed.img_size[0]
    imgs, used = pick_images(paths, args.max_images, size)
    if imgs is None:
        parser.error(f"none of the {len(paths)} images decodes")
    noise = torch.rand(len(used), model.num_patches, generator=torch.Generator().manual_seed(args.seed))
    title = f"{name}, mask ratio {args.mask_ratio}, seed {args.seed}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_reconstruction_grid(model, imgs, out, args.mask_ratio, noise, title=title)
    except OSError as e:  # a full disk, a folder made read-only meanwhile
        parser.error(f"cannot write {out}: {e.strerror or e}")
    print(
        f"wrote {out} ({len(used)} image{'s' if len(used) > 1 else ''}: "
        f"{', '.join(os.path.basename(p) for p in used[:4])}{', ...' if len(used) > 4 else ''})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
