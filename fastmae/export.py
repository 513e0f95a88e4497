"""Carry pretrained weights elsewhere: ``python -m fastmae.export CHECKPOINT --to FORMAT --out PATH``.

Formats:
    timm      the encoder for ``timm.create_model('vit_*_224', global_pool='avg')`` (fc_norm = the
              pretrained final norm), loadable with ``strict=True``
    timm-cls  the encoder for ``global_pool='token'`` (cls token after the final norm)
    mae       the official MAE layout ``{'model': state_dict}`` (encoder and decoder)
    hf        a Hugging Face ``ViTMAEForPreTraining`` folder (``save_pretrained``); needs transformers

``CHECKPOINT``: a fastmae run checkpoint, an official MAE, EasyCV or DDP checkpoint, a fine-tuned
classifier, or a ``.safetensors`` file (fastmae / timm names, or a Hugging Face ViTMAE
``model.safetensors``, converted); other layouts are refused. ``--out`` ending in ``.safetensors``
writes safetensors, else a torch file. A cls-token classifier (a linear probe) exports only as
``timm-cls``: ``timm``'s average pool would feed its head other features.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastmae.cli import ArgumentParser
from fastmae.convert import (
    as_umask_says,
    fastmae_state_dict,
    hf_folder_config,
    load_checkpoint,
    load_official,
    read_state_dict,
    save_safetensors,
    to_hf,
    to_timm_state_dict,
)
from fastmae.model import MaskedAutoencoderViT
from fastmae.pretrained import mae_architecture as read_architecture

FORMATS = ("timm", "timm-cls", "mae", "hf")


def mae_architecture(
    checkpoint: str | Path,
    sd: dict[str, torch.Tensor],
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
) -> dict:
    """:func:`fastmae.pretrained.mae_architecture` of a checkpoint file; a guess is printed (one line)."""
    obj = {} if str(checkpoint).endswith(".safetensors") else load_checkpoint(checkpoint)
    if "mask_token" not in sd:
        raise ValueError("an encoder-only checkpoint has no decoder to export to Hugging Face ViTMAE")
    arch, guessed = read_architecture(obj, sd, num_heads, decoder_num_heads, hf_folder_config(checkpoint))
    if guessed:
        print(
            f"guessed {', '.join(guessed)} (the checkpoint does not say; --num-heads / --decoder-num-heads if wrong)",
            flush=True,
        )
    return arch


def export(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
) -> Path:
    """Write ``checkpoint``'s weights in ``fmt`` to ``out``; returns the path written.

    ``num_heads`` / ``decoder_num_heads``: for ``hf``, where the checkpoint does not say them.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} ({', '.join(FORMATS)})")
    out = Path(out)
    if fmt != "hf" and out.is_dir():  # before anything is read: a one-line error
        raise ValueError(f"--out {out} is a folder; --to {fmt} writes a file (e.g. {out / 'encoder.safetensors'})")
    if fmt == "hf" and out.exists() and not out.is_dir():
        # save_pretrained would only log this and return: the export would seem to have worked
        raise ValueError(f"--out {out} exists and is not a folder (--to hf writes a save_pretrained folder)")
    raw = read_state_dict(checkpoint)  # a file that is no checkpoint: a one-line error naming it
    try:
        sd = fastmae_state_dict(raw)
    except ValueError as e:
        raise ValueError(f"{checkpoint}: {e}") from e
    if fmt in ("timm", "timm-cls"):
        sd = to_timm_state_dict(sd, global_pool=fmt == "timm")
    if fmt == "hf":
        mae = MaskedAutoencoderViT(**mae_architecture(checkpoint, sd, num_heads, decoder_num_heads))
        report = load_official(mae, sd)  # one-line errors for unexpected keys or shapes
        if report.missing:  # the whole model is exported: nothing may stay at its init
            raise KeyError(f"the checkpoint lacks {', '.join(report.missing[:6])}")
        to_hf(mae).save_pretrained(out)
        for written in out.glob("*.safetensors"):
            as_umask_says(written)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        save_safetensors(sd, out, source=str(checkpoint), format_name=fmt)
    else:
        torch.save({"model": sd} if fmt == "mae" else sd, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m fastmae.export", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument(
        "checkpoint", help="fastmae run checkpoint, official MAE / EasyCV .pth, .safetensors, or a Hugging Face folder"
    )
    parser.add_argument("--to", choices=FORMATS, default="timm", help="target format (default: timm)")
    parser.add_argument("--out", required=True, help="output file (.safetensors or .pth), or folder for hf")
    parser.add_argument("--num-heads", type=int, help="hf: encoder heads, where the checkpoint does not say")
    parser.add_argument("--decoder-num-heads", type=int, help="hf: decoder heads, where the checkpoint does not say")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).exists():
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    for name in ("num_heads", "decoder_num_heads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        path = export(args.checkpoint, args.to, args.out, args.num_heads, args.decoder_num_heads)
    except (KeyError, ValueError) as e:
        parser.error(str(e).strip("'\""))
    print(f"wrote {path} ({args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
