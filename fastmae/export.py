"""Carry pretrained weights elsewhere: ``python -m fastmae.export CHECKPOINT --to FORMAT --out PATH``.

Formats:
    timm      the encoder for ``timm.create_model('vit_*_224', global_pool='avg')`` (fc_norm = the
              pretrained final norm), loadable with ``strict=True``
    timm-cls  the encoder for ``global_pool='token'`` (cls token after the final norm)
    mae       the official MAE layout ``{'model': state_dict}`` (encoder and decoder)
    hf        a Hugging Face ``ViTMAEForPreTraining`` folder (``save_pretrained``); needs transformers

``CHECKPOINT``: a fastmae run checkpoint, an official MAE or EasyCV checkpoint, or a
``.safetensors`` file. ``--out`` ending in ``.safetensors`` writes safetensors, else a torch file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastmae.convert import read_state_dict, save_safetensors, strip_prefixes, to_hf, to_timm_state_dict
from fastmae.model import MaskedAutoencoderViT

FORMATS = ("timm", "timm-cls", "mae", "hf")


def mae_architecture(checkpoint: str | Path, sd: dict[str, torch.Tensor]) -> dict:
    """Constructor arguments: a fastmae run checkpoint's config, else read off the weights' shapes
    (heads: 64-d for the encoder as ViT-B/L, 16 in the decoder as every reference model)."""
    obj = (
        {}
        if str(checkpoint).endswith(".safetensors")
        else torch.load(checkpoint, map_location="cpu", weights_only=True)
    )
    c = obj.get("config") if isinstance(obj, dict) else None
    names = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
             "decoder_num_heads", "mlp_ratio", "norm_pix_loss")  # fmt: skip
    if isinstance(c, dict) and all(n in c for n in names):
        return {n: c[n] for n in names}
    if "mask_token" not in sd:
        raise ValueError("an encoder-only checkpoint has no decoder to export to Hugging Face ViTMAE")
    w = sd["patch_embed.proj.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    dec = sd["mask_token"].shape[-1]
    return dict(
        img_size=round((sd["pos_embed"].shape[1] - 1) ** 0.5) * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
        num_heads={1280: 16}.get(dim, max(1, dim // 64)),
        decoder_embed_dim=dec,
        decoder_depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks.")),
        decoder_num_heads=16 if dec % 16 == 0 else 1,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
    )


def export(checkpoint: str | Path, fmt: str, out: str | Path) -> Path:
    """Write ``checkpoint``'s weights in ``fmt`` to ``out``; returns the path written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} ({', '.join(FORMATS)})")
    out = Path(out)
    raw = read_state_dict(checkpoint)
    if fmt in ("timm", "timm-cls"):
        sd = to_timm_state_dict(raw, global_pool=fmt == "timm")
    else:
        sd = strip_prefixes(raw)
    if fmt == "hf":
        mae = MaskedAutoencoderViT(**mae_architecture(checkpoint, sd))
        mae.load_state_dict(sd, strict=True)
        to_hf(mae).save_pretrained(out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        save_safetensors(sd, out, source=str(checkpoint), format_name=fmt)
    else:
        torch.save({"model": sd} if fmt == "mae" else sd, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastmae.export", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("checkpoint", help="fastmae run checkpoint, official MAE / EasyCV .pth, or .safetensors")
    parser.add_argument("--to", choices=FORMATS, default="timm", help="target format (default: timm)")
    parser.add_argument("--out", required=True, help="output file (.safetensors or .pth), or folder for hf")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    try:
        path = export(args.checkpoint, args.to, args.out)
    except (KeyError, ValueError) as e:
        parser.error(str(e).strip("'\""))
    print(f"wrote {path} ({args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
