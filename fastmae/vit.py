"""The pretrained encoder as a classifier: full / partial fine-tuning and linear probing.

Follows the MAE fine-tuning recipe (facebookresearch/mae ``models_vit.py``, ``util/lr_decay.py``,
``main_linprobe.py``) with timm ``VisionTransformer`` key names, so a fine-tuned state dict loads
into ``timm.create_model('vit_base_patch16_224', global_pool='avg')`` as it is.

- ``global_pool=True``: mean of the patch tokens (cls excluded), then ``fc_norm``; the final
  ``norm`` is removed. The fine-tuning default.
- ``global_pool=False``: final ``norm``, then the cls token. The linear-probe default.
- ``linear_probe=True``: the head is ``BatchNorm1d(affine=False, eps=1e-6)`` + ``Linear`` and only
  the head trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from fastmae.attention import resolve_backend
from fastmae.model import LN_EPS, Block, MaskedAutoencoderViT, PatchEmbed, mlp_ratio_of
from fastmae.pos_embed import sincos_pos_embed_tensor


class VisionTransformer(nn.Module):
    """ViT encoder + classification head.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the encoder, as
            :class:`~fastmae.model.MaskedAutoencoderViT`.
        num_classes: head outputs; 0 gives no head (features only).
        global_pool: average-pool the patch tokens + ``fc_norm`` (True) or take the normed cls token.
        drop_path_rate: stochastic depth, linearly increasing over the blocks (0.1 for ViT-B in MAE).
        linear_probe: BatchNorm (no affine, eps 1e-6) before the linear head, as the MAE probe.
        attn_backend: see :mod:`fastmae.attention`.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        global_pool: bool = True,
        drop_path_rate: float = 0.0,
        linear_probe: bool = False,
        attn_backend: str = "sdpa",
    ):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=LN_EPS)
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.attn_backend = resolve_backend(attn_backend, head_dim=embed_dim // num_heads, part="encoder")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # learnable while fine-tuning (timm's ViT), initialised with the fixed sin-cos embedding;
        # a pretrained checkpoint overwrites it
        self.pos_embed = nn.Parameter(sincos_pos_embed_tensor(embed_dim, self.patch_embed.grid_size[0]))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # torch.linspace's values
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, norm_layer, self.attn_backend, drop_path=rate) for rate in rates]
        )
        if global_pool:
            self.fc_norm = norm_layer(embed_dim)
        else:
            self.norm = norm_layer(embed_dim)
        head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if linear_probe:
            head = nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), head)
        self.head = head
        self._init_head(std=0.01 if linear_probe else 2e-5)

    def _init_head(self, std: float) -> None:
        # MAE: trunc_normal_(head.weight, std=2e-5) to fine-tune, std=0.01 to probe; zero bias
        linear = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
        if isinstance(linear, nn.Linear):
            nn.init.trunc_normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """``imgs: (N, C, H, W)`` -> pooled features ``(N, D)`` (before the head)."""
        x = self.patch_embed(imgs)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))  # global pool without the cls token
        return self.norm(x)[:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """``imgs: (N, C, H, W)`` -> logits ``(N, num_classes)``."""
        return self.head(self.forward_features(imgs))

    def freeze_for(self, mode: str, trainable_blocks: int = 0) -> None:
        """``full``: everything trains; ``partial``: the last ``trainable_blocks`` blocks, the final
        norm and the head; ``linear``: the head only (BatchNorm statistics still update)."""
        if mode not in ("full", "partial", "linear"):
            raise ValueError(f"unknown fine-tuning mode {mode!r} (full | partial | linear)")
        if mode == "partial" and not 0 <= trainable_blocks <= len(self.blocks):
            raise ValueError(f"trainable_blocks must be in [0, {len(self.blocks)}], got {trainable_blocks}")
        for p in self.parameters():
            p.requires_grad = mode == "full"
        if mode == "full":
            return
        train = [self.head]
        if mode == "partial":
            train += list(self.blocks[len(self.blocks) - trainable_blocks :])
            train.append(self.fc_norm if self.global_pool else self.norm)
        for module in train:
            for p in module.parameters():
                p.requires_grad = True


def vit_from_mae(mae: MaskedAutoencoderViT, **kwargs: Any) -> VisionTransformer:
    """A :class:`VisionTransformer` with ``mae``'s encoder architecture (``kwargs`` to the constructor)."""
    blocks = mae.blocks
    arch = dict(
        img_size=mae.patch_embed.img_size[0],
        patch_size=mae.patch_size,
        in_chans=mae.in_chans,
        embed_dim=mae.cls_token.shape[-1],
        depth=len(blocks),
        num_heads=blocks[0].attn.num_heads,
        mlp_ratio=mlp_ratio_of(mae.cls_token.shape[-1], blocks[0].mlp.fc1.out_features),
    )
    return VisionTransformer(**{**arch, **kwargs})


def vit_base_patch16(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(patch_size=16, embed_dim=768, depth=12, num_heads=12, **kwargs)


def vit_large_patch16(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **kwargs)


def vit_huge_patch14(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **kwargs)


DECODER_KEYS = ("mask_token", "decoder_")


def encoder_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder part of a pretraining state dict, in timm ViT names.

    Strips the wrappers that checkpoints carry (``module.`` from DDP, ``encoder.`` from EasyCV,
    ``backbone.``) and drops the decoder.
    """
    from fastmae.convert import strip_prefixes

    return {k: v for k, v in strip_prefixes(state_dict).items() if not k.startswith(DECODER_KEYS)}


def load_pretrained_encoder(
    vit: VisionTransformer, state_dict: Mapping[str, torch.Tensor], pretrained_fc_norm: bool = False
) -> list[str]:
    """Load a pretraining checkpoint's encoder into ``vit``, as MAE's ``main_finetune`` does.

    The pretrained final ``norm`` goes to ``norm`` (cls-token model) and is dropped for a global
    pool model, whose fresh ``fc_norm`` and head keep their init. Returns the keys left at init;
    anything else missing, or a shape mismatch, is an error.

    ``pretrained_fc_norm=True`` (global pool): the pretrained ``norm`` becomes ``fc_norm`` instead,
    for frozen features with nothing trained after them (kNN): a fresh ``fc_norm`` would be an
    untrained identity, and these are the features of the trainer's kNN monitor and the timm export.

    A fine-tuned classifier's state dict loads too: its head is dropped (the head keeps its init), a
    global-pool one's trained ``fc_norm`` is kept, and it cannot make a cls-token model (no ``norm``).
    """
    sd = encoder_state_dict(state_dict)
    if vit.global_pool:
        norm = {k: v for k, v in sd.items() if k.startswith("norm.")}
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
        if pretrained_fc_norm and not any(k.startswith("fc_norm.") for k in sd):
            sd.update({"fc_norm." + k[len("norm.") :]: v for k, v in norm.items()})
    elif "fc_norm.weight" in sd and "norm.weight" not in sd:
        raise KeyError("a global-pool model's weights (fc_norm, no final norm) cannot make a cls-token model")
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    expected = vit.state_dict()
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise KeyError(f"checkpoint keys the ViT does not have: {unexpected[:6]}")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(expected[k].shape)}")
    missing = [k for k in expected if k not in sd]
    allowed = ("head.", "fc_norm.")
    bad = [k for k in missing if not k.startswith(allowed)]
    if bad:
        raise KeyError(f"checkpoint lacks encoder weights: {bad[:6]}")
    vit.load_state_dict(sd, strict=False)
    return missing


def param_groups_lrd(
    model: VisionTransformer,
    weight_decay: float = 0.05,
    layer_decay: float = 0.75,
    no_weight_decay_list: set[str] | None = None,
) -> list[dict]:
    """Layer-wise lr decay groups (BEiT / MAE ``param_groups_lrd``).

    Layer ids: cls_token, pos_embed and patch_embed 0; ``blocks.i`` i + 1; the rest (norms, head)
    ``depth + 1``. Each group's ``lr_scale`` is ``layer_decay ** (depth + 1 - layer_id)``. No weight
    decay for 1-D parameters and ``no_weight_decay_list``. Frozen parameters are left out.
    """
    no_wd = model.no_weight_decay() if no_weight_decay_list is None else no_weight_decay_list
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in no_wd
        layer_id = layer_id_for_vit(name, num_layers)
        key = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {
                "lr_scale": scales[layer_id],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "params": [],
                "names": [],
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """The layer a parameter belongs to for lr decay (BEiT's ``get_layer_id_for_vit``)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers
