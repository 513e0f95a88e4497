"""Other runs' weights as a starting point: the architecture a checkpoint implies, and loading it.

:func:`mae_architecture` reads the ``MaskedAutoencoderViT`` arguments a full checkpoint implies (a
fastmae config, a Hugging Face ``config.json``, else the weights' shapes and a head-count guess);
:func:`init_weights` starts a model from a checkpoint for continued pretraining
(``python -m fastmae.train --init-from``). The file formats themselves are :mod:`fastmae.convert`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fastmae.convert import (
    _abbrev,
    _is_decoder_key,
    fastmae_state_dict,
    hf_folder_config,
    load_checkpoint,
    read_state_dict,
)
from fastmae.model import MaskedAutoencoderViT, mlp_ratio_of


def _depth(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many blocks ``prefix`` (``blocks.`` / ``decoder_blocks.``) holds."""
    return len({k.split(".")[1] for k in sd if k.startswith(prefix)})


def weights_shape(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Patch size, width, depth and patch grid side of an encoder's weights (fastmae names)."""
    w = sd["patch_embed.proj.weight"]
    return dict(
        patch_size=w.shape[-1],
        embed_dim=w.shape[0],
        depth=_depth(sd, "blocks."),
        grid=round((sd["pos_embed"].shape[1] - 1) ** 0.5),
    )


# the official MAE models' encoder heads (the weights do not tell them): ViT-B, ViT-L, ViT-H
OFFICIAL_HEADS = {768: 12, 1024: 16, 1280: 16}
MAE_ARCH_KEYS = (
    "img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
    "decoder_num_heads", "mlp_ratio", "norm_pix_loss",
)  # fmt: skip


def mae_architecture(
    checkpoint: Any,
    sd: Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    hf_config: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """``MaskedAutoencoderViT`` arguments for a full (encoder + decoder) checkpoint, and the guesses made.

    Read from a fastmae checkpoint's saved config, else from a Hugging Face ``config.json``
    (``hf_config``), else off the weights (``sd``, fastmae names; no ``norm_pix_loss`` then). Head
    counts are not in the weights: ``num_heads`` / ``decoder_num_heads`` when given, else the
    config's, else a guess (64-d encoder heads as ViT-B/L, ViT-H's 16; 16 in the decoder as every
    reference model), returned as ``["num_heads=12", ...]``: a wrong guess is another function,
    silently, so callers print it.
    """
    c = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    c = c if isinstance(c, Mapping) else {}
    if all(n in c for n in MAE_ARCH_KEYS):
        arch = {n: c[n] for n in MAE_ARCH_KEYS}
    elif hf_config is not None:
        h = hf_config
        if h["intermediate_size"] * h["decoder_hidden_size"] != h["decoder_intermediate_size"] * h["hidden_size"]:
            raise ValueError(
                f"its config.json gives the encoder and the decoder other MLP ratios ({h['intermediate_size']} / "
                f"{h['hidden_size']}, {h['decoder_intermediate_size']} / {h['decoder_hidden_size']}); fastmae has one"
            )
        arch = dict(
            img_size=h["image_size"], patch_size=h["patch_size"], embed_dim=h["hidden_size"],
            depth=h["num_hidden_layers"], num_heads=h["num_attention_heads"],
            decoder_embed_dim=h["decoder_hidden_size"], decoder_depth=h["decoder_num_hidden_layers"],
            decoder_num_heads=h["decoder_num_attention_heads"], mlp_ratio=mlp_ratio_of(h["hidden_size"], h["intermediate_size"]),
            norm_pix_loss=bool(h.get("norm_pix_loss", False)),
        )  # fmt: skip
    elif "mask_token" not in sd:
        raise ValueError("an encoder-only checkpoint: no decoder")
    else:
        shape = weights_shape(sd)
        arch = dict(
            img_size=shape["grid"] * shape["patch_size"],
            patch_size=shape["patch_size"],
            embed_dim=shape["embed_dim"],
            depth=shape["depth"],
            num_heads=c.get("num_heads"),
            decoder_embed_dim=sd["mask_token"].shape[-1],
            decoder_depth=_depth(sd, "decoder_blocks."),
            decoder_num_heads=c.get("decoder_num_heads"),
            mlp_ratio=mlp_ratio_of(shape["embed_dim"], sd["blocks.0.mlp.fc1.weight"].shape[0]),
        )
    guessed = []
    for name, given, guess in (
        ("num_heads", num_heads, OFFICIAL_HEADS.get(arch["embed_dim"], max(1, arch["embed_dim"] // 64))),
        ("decoder_num_heads", decoder_num_heads, 16 if arch["decoder_embed_dim"] % 16 == 0 else 1),
    ):
        if given is not None:
            arch[name] = given
        elif arch[name] is None:
            arch[name] = guess
            guessed.append(f"{name}={guess}")
    return arch, guessed


def _decoder_shape(sd: Mapping[str, torch.Tensor], heads: int | None) -> str:
    depth = _depth(sd, "decoder_blocks.")
    width = sd["decoder_embed.weight"].shape[0] if "decoder_embed.weight" in sd else "?"
    mlp = sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] if "decoder_blocks.0.mlp.fc1.weight" in sd else "?"
    return f"width {width}, {depth} blocks, MLP {mlp}" + (f", {heads} heads" if heads is not None else "")


# the fixed sin-cos tables: a function of the patch grid, made by the model for its own
_POS_EMBEDS = ("pos_embed", "decoder_pos_embed")


@dataclass
class InitReport:
    """What :func:`init_weights` took from a checkpoint."""

    loaded: list[str]
    decoder: str  # "loaded" (and a note), or why the decoder keeps its init
    regenerated: list[str]  # pos embeds of another grid, left as the model made them
    ignored: list[str]  # keys a pretraining model has no use for (a classifier's head, fc_norm)

    @property
    def decoder_loaded(self) -> bool:
        return self.decoder.startswith("loaded")

    def __str__(self) -> str:
        parts = [f"{len(self.loaded)} tensors", f"decoder {self.decoder}"]
        if self.regenerated:
            parts.append(f"{', '.join(self.regenerated)} the model's own for its patch grid")
        if self.ignored:
            parts.append(f"ignored {_abbrev(self.ignored, 3)}")
        return "; ".join(parts)


def init_weights(
    model: MaskedAutoencoderViT,
    source: str | os.PathLike | Mapping[str, Any],
    num_heads: tuple[int, int] | None = None,
) -> InitReport:
    """Start ``model`` from another run's weights (continued pretraining): its encoder, and its decoder
    where the checkpoint has one of the same shape.

    ``source``: an official MAE checkpoint (full or encoder-only), an EasyCV / DDP-prefixed one, a
    Hugging Face ``ViTMAEForPreTraining`` file or folder, a safetensors file, or a fastmae checkpoint
    (training, or an export). The encoder must match the model (width, depth, patch size; the heads
    too where a fastmae checkpoint's config or a Hugging Face folder's says them): anything else
    raises a one-line ``ValueError`` naming both shapes. The decoder is often changed for a continued run (MAE's ablations vary it),
    so one of another shape, or none, leaves the model's own init, and the report says which. The
    fixed sin-cos pos embeds of another image size are not loaded: the model made its own for its
    grid.
    """
    obj = load_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    sd = fastmae_state_dict(read_state_dict(obj))
    expected = model.state_dict()
    have, want = weights_shape(sd), weights_shape(expected)
    mismatch = [k for k in ("embed_dim", "depth", "patch_size") if have[k] != want[k]]
    saved = obj.get("config") if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping) else {}
    if not saved and (hf := hf_folder_config(source)) is not None:  # a Hugging Face folder says its heads
        saved = {
            "num_heads": hf.get("num_attention_heads"),
            "decoder_num_heads": hf.get("decoder_num_attention_heads"),
            "norm_pix_loss": hf.get("norm_pix_loss"),
        }
    if num_heads is not None and isinstance(saved.get("num_heads"), int) and saved["num_heads"] != num_heads[0]:
        mismatch.append("num_heads")
        have["num_heads"], want["num_heads"] = saved["num_heads"], num_heads[0]
    if mismatch:
        raise ValueError(
            "its encoder has "
            + ", ".join(f"{k} {have[k]}" for k in mismatch)
            + " where this run's has "
            + ", ".join(f"{k} {want[k]}" for k in mismatch)
        )
    encoder = [k for k in expected if not _is_decoder_key(k)]
    lacking = [k for k in encoder if k not in sd]
    if lacking:
        why = ""
        if set(lacking) <= {"norm.weight", "norm.bias"} and "fc_norm.weight" in sd:
            why = (
                " (a classifier's or a timm global-pool export's: fc_norm replaced the MAE's final norm; "
                "start from the checkpoint it was made from)"
            )
        raise ValueError(f"it lacks encoder weights: {_abbrev(lacking, 3)}{why}")
    wrong = [k for k in encoder if k not in _POS_EMBEDS and sd[k].shape != expected[k].shape]
    if wrong:  # widths, depth and patch agree, so this is a variant (e.g. mlp_ratio)
        k = wrong[0]
        raise ValueError(f"{k} has shape {tuple(sd[k].shape)} where this run's has {tuple(expected[k].shape)}")

    take = list(encoder)
    decoder_model = [k for k in expected if _is_decoder_key(k)]
    decoder_ckpt = [k for k in sd if _is_decoder_key(k)]
    saved_heads = saved.get("decoder_num_heads") if isinstance(saved.get("decoder_num_heads"), int) else None
    if not decoder_ckpt:
        decoder = "kept its init (the checkpoint has no decoder)"
    elif (
        set(decoder_ckpt) != set(decoder_model)
        or any(sd[k].shape != expected[k].shape for k in decoder_model if k not in _POS_EMBEDS)
        or (num_heads is not None and saved_heads is not None and saved_heads != num_heads[1])
    ):
        theirs, ours = (
            (saved_heads, num_heads[1]) if num_heads is not None and saved_heads is not None else (None, None)
        )
        decoder = (
            f"kept its init (the checkpoint's, {_decoder_shape(sd, theirs)}, is not this run's, "
            f"{_decoder_shape(expected, ours)})"
        )
    else:
        decoder = "loaded"
        take += decoder_model
    if (
        decoder == "loaded"
        and isinstance(saved.get("norm_pix_loss"), bool)
        and saved["norm_pix_loss"] != model.norm_pix_loss
    ):
        # the decoder learnt the other target: allowed (a domain run may change it), but said
        decoder += f" (trained with norm_pix_loss={saved['norm_pix_loss']}, this run has {model.norm_pix_loss})"
    regenerated = [k for k in _POS_EMBEDS if k in take and sd[k].shape != expected[k].shape]
    take = [k for k in take if k not in regenerated]
    model.load_state_dict({k: sd[k] for k in take}, strict=False)
    ignored = [k for k in sd if k not in expected and not _is_decoder_key(k)]  # a decoder's: in `decoder`
    return InitReport(loaded=take, decoder=decoder, regenerated=regenerated, ignored=ignored)
