"""The classifier ``python -m fastmae.finetune`` trains or scores, from what ``--pretrained`` holds.

A checkpoint's weights in fastmae names (:func:`pretrained_weights`), the encoder's architecture
(a fastmae checkpoint's config, ``--model``, or the weights' shapes: :func:`architecture`), its
position embedding resampled to another patch grid (:func:`fit_pos_embed`), the classifier built
around it (:func:`build_classifier`), and what a fine-tuned classifier's head says of itself
(:func:`classifier_head`). Every misfit is a one-line ``ConfigError`` before anything is built.
"""

from __future__ import annotations

from typing import Any

import torch

from fastmae import distributed
from fastmae.config import ConfigError
from fastmae.convert import fastmae_state_dict, hf_folder_config, load_checkpoint, read_state_dict
from fastmae.finetune_config import ARCHS, FinetuneConfig
from fastmae.pos_embed import interpolate_pos_embed
from fastmae.pretrained import OFFICIAL_HEADS, weights_shape
from fastmae.vit import VisionTransformer, load_pretrained_encoder

ARCH_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def load_pretrained(cfg: FinetuneConfig) -> Any:
    """``--pretrained``'s contents; a file that is not a checkpoint is a one-line ``ConfigError``."""
    try:
        return load_checkpoint(cfg.pretrained)
    except ValueError as e:  # as this node reads it
        raise distributed.rank_local(ConfigError(f"--pretrained: {e}")) from e


def pretrained_weights(cfg: FinetuneConfig, checkpoint: Any) -> dict[str, torch.Tensor]:
    """The checkpoint's weights in fastmae names: wrapper prefixes (DDP ``module.``, EasyCV
    ``encoder.``) stripped and Hugging Face keys converted, as every reader below expects."""
    try:
        return fastmae_state_dict(read_state_dict(checkpoint))
    except ValueError as e:
        raise ConfigError(f"--pretrained {cfg.pretrained}: {e}") from e


def architecture(cfg: FinetuneConfig, checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    """The encoder's constructor arguments: a fastmae checkpoint's config, else ``--model`` / the weights.

    A fastmae fine-tuning checkpoint carries its ``architecture``; its ``config`` is the fine-tuning
    one, without the encoder's, so older ones are read off the weights like any other. The result is
    checked here, before anything is built, so that a bad combination is a one-line error.
    """
    c, saved = (checkpoint.get("config"), checkpoint.get("architecture")) if isinstance(checkpoint, dict) else (0, 0)
    if cfg.model != "auto":
        patch, dim, depth, heads = ARCHS[cfg.model]
        arch = dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, img_size=224)
    elif isinstance(saved, dict):
        arch = dict(saved)
    elif isinstance(c, dict) and all(k in c for k in ARCH_KEYS):
        arch = {k: c[k] for k in ARCH_KEYS}
    elif checkpoint is not None:  # weights only: read the shapes
        shape = weights_shape(pretrained_weights(cfg, checkpoint))
        dim, patch = shape["embed_dim"], shape["patch_size"]
        hf = hf_folder_config(cfg.pretrained)  # a Hugging Face folder says its heads
        heads = hf["num_attention_heads"] if hf else OFFICIAL_HEADS.get(dim, max(1, dim // 64))
        if not hf and cfg.num_heads is None:  # a wrong guess is another function, silently: say it
            print(f"guessed num_heads={heads} (the checkpoint does not say; --num-heads if wrong)", flush=True)
        arch = dict(patch_size=patch, embed_dim=dim, depth=shape["depth"], num_heads=heads,
                    img_size=shape["grid"] * patch)  # fmt: skip
    else:
        raise ConfigError("no architecture: pass --model or a --pretrained checkpoint")
    if cfg.img_size:
        arch["img_size"] = cfg.img_size
    if cfg.num_heads:
        arch["num_heads"] = cfg.num_heads
    if arch["img_size"] % arch["patch_size"]:
        raise ConfigError(f"--img-size {arch['img_size']} is not a multiple of the patch size {arch['patch_size']}")
    if arch["embed_dim"] % arch["num_heads"]:
        raise ConfigError(f"{arch['num_heads']} heads do not divide the width {arch['embed_dim']} (--num-heads)")
    if cfg.mode == "partial" and not 0 <= cfg.trainable_blocks <= arch["depth"]:
        raise ConfigError(f"--trainable-blocks must be in [0, {arch['depth']}] (the depth), got {cfg.trainable_blocks}")
    return arch


def fit_pos_embed(
    sd: dict[str, torch.Tensor], grid: int, verbose: bool = True, name: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """``sd`` with its ``pos_embed`` resampled to a ``grid x grid`` patch grid when it has another
    (bicubic, the cls row kept: :func:`~fastmae.pos_embed.interpolate_pos_embed`), saying so. One
    that is not a cls row + a square grid is a one-line ``ConfigError`` (``name`` says whose)."""
    old = weights_shape(sd)["grid"]
    if sd["pos_embed"].shape[1] != 1 + old * old:
        raise ConfigError(f"{name}'s pos_embed has {sd['pos_embed'].shape[1]} rows: not a cls row and a square "
                          "patch grid, which fastmae's ViT has")  # fmt: skip
    if old == grid:
        return sd
    if verbose:
        print(f"position embedding interpolated from {old}x{old} to {grid}x{grid} patches (bicubic, as the "
              "official fine-tuning)", flush=True)  # fmt: skip
    return {**sd, "pos_embed": interpolate_pos_embed(sd["pos_embed"], grid)}


def build_classifier(
    cfg: FinetuneConfig, arch: dict[str, Any], num_classes: int, weights: Any, verbose: bool = True
) -> VisionTransformer:
    """The classifier, with ``weights``' encoder when given (checked to fit before the model is built).

    A checkpoint of another patch grid (``--img-size`` 384 from a 224 one) has its position
    embedding resampled as the official fine-tuning does (:func:`fit_pos_embed`).

    kNN reads frozen features with nothing trained after them, so its ``fc_norm`` is the pretrained
    final norm (the trainer's kNN monitor's features), not the fresh one that fine-tuning trains.
    """
    sd = None
    if weights is not None:
        sd = pretrained_weights(cfg, weights)
        have = weights_shape(sd)
        want = dict(arch, grid=arch["img_size"] // arch["patch_size"])
        for name in ("patch_size", "embed_dim", "depth"):
            if have[name] != want[name]:
                raise ConfigError(
                    f"--pretrained {cfg.pretrained} has {name} {have[name]} where the model"
                    + (f" (--model {cfg.model})" if cfg.model != "auto" else "")
                    + f" has {want[name]}"
                )
        sd = fit_pos_embed(sd, want["grid"], verbose, f"--pretrained {cfg.pretrained}")
    torch.manual_seed(cfg.seed)
    vit = VisionTransformer(
        **arch,
        num_classes=num_classes,
        global_pool=cfg.global_pool,
        drop_path_rate=cfg.drop_path,
        linear_probe=cfg.mode == "linear",
        attn_backend=cfg.attn_backend,
    )
    if sd is not None:
        try:
            load_pretrained_encoder(vit, sd, pretrained_fc_norm=cfg.mode == "knn")
        except (KeyError, ValueError) as e:
            raise ConfigError(f"--pretrained {cfg.pretrained} does not load: {e.args[0]}") from e
    vit.freeze_for("linear" if cfg.mode in ("linear", "knn") else cfg.mode, cfg.trainable_blocks)
    return vit


def classifier_head(sd: dict[str, torch.Tensor]) -> tuple[int, bool, bool]:
    """(classes, global pool, linear-probe head) of a classifier's weights (fastmae names)."""
    head = sd.get("head.1.weight", sd.get("head.weight"))
    if head is None:
        raise ConfigError("it has no classification head (head.weight): a pretrained encoder is fine-tuned "
                          "(--mode full / linear) or scored by its features (--mode knn)")  # fmt: skip
    return int(head.shape[0]), "fc_norm.weight" in sd, "head.1.weight" in sd
