"""Weight conversion between fastmae, the official MAE checkpoints and Hugging Face ViTMAE.

fastmae's state-dict keys *are* the official MAE keys (timm ViT names), so an official checkpoint
(``{'model': state_dict}``) loads as it is. Hugging Face's ``ViTMAEForPreTraining`` is the same
function with other names: separate q/k/v projections instead of one fused qkv, and a prefix per
module. Two HF key layouts exist (transformers 4.x ``vit.encoder.layer.N.attention.attention.query``
and 5.x ``vit.layers.N.attention.q_proj``); both are read and written, the style chosen from the
keys at hand.

Checkpoint files here are for weights; the trainer's resumable checkpoints live in
:mod:`fastmae.checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fastmae.model import MaskedAutoencoderViT, mlp_ratio_of

if TYPE_CHECKING:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

StateDict = dict[str, torch.Tensor]

# fastmae name -> HF name, outside the blocks
_GLOBAL = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}

# per-block names; "qkv" is split into three HF projections
_HF_STYLES = {
    "v5": {
        "encoder_prefix": "vit.layers.{i}.",
        "decoder_prefix": "decoder.decoder_layers.{i}.",
        "qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        "names": {
            "norm1": "layernorm_before",
            "attn.proj": "attention.o_proj",
            "norm2": "layernorm_after",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        },
    },
    "v4": {
        "encoder_prefix": "vit.encoder.layer.{i}.",
        "decoder_prefix": "decoder.decoder_layers.{i}.",
        # read as well: transformers 5.x save_pretrained writes the 4.x names, and its reverse of the
        # 'encoder.layer.' -> 'layers.' renaming turns decoder_layers into decoder_encoder.layer
        "decoder_aliases": ("decoder.decoder_encoder.layer.{i}.",),
        "qkv": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        "names": {
            "norm1": "layernorm_before",
            "attn.proj": "attention.output.dense",
            "norm2": "layernorm_after",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
        },
    },
}

_BLOCK_KEY = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$")


def hf_style_of(keys: Any) -> str:
    """``'v5'`` or ``'v4'``: which Hugging Face key layout ``keys`` use."""
    keys = list(keys)
    if any(k.startswith("vit.layers.") for k in keys):
        return "v5"
    if any(k.startswith("vit.encoder.layer.") for k in keys):
        return "v4"
    raise ValueError("not a Hugging Face ViTMAE state dict (no vit.layers.* or vit.encoder.layer.* keys)")


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], style: str = "v5") -> StateDict:
    """fastmae / official MAE keys -> Hugging Face ``ViTMAEForPreTraining`` keys."""
    spec = _HF_STYLES[style]
    out: StateDict = {}
    for key, value in state_dict.items():
        if key in _GLOBAL:
            out[_GLOBAL[key]] = value
            continue
        m = _BLOCK_KEY.match(key)
        if m is None:
            raise KeyError(f"no Hugging Face name for {key!r}")
        part, i, name, kind = m.groups()
        prefix = spec["encoder_prefix" if part == "blocks" else "decoder_prefix"].format(i=i)
        if name == "attn.qkv":
            for hf_name, chunk in zip(spec["qkv"], value.chunk(3, dim=0), strict=True):
                out[f"{prefix}{hf_name}.{kind}"] = chunk.clone()
        elif name in spec["names"]:
            out[f"{prefix}{spec['names'][name]}.{kind}"] = value
        else:
            raise KeyError(f"no Hugging Face name for {key!r}")
    return out


def from_hf_state_dict(hf_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Hugging Face ``ViTMAEForPreTraining`` keys (either layout) -> fastmae / official MAE keys."""
    spec = _HF_STYLES[hf_style_of(hf_state_dict.keys())]
    inverse_global = {v: k for k, v in _GLOBAL.items()}
    inverse_names = {v: k for k, v in spec["names"].items()}
    qkv_index = {name: j for j, name in enumerate(spec["qkv"])}
    decoder_prefixes = (spec["decoder_prefix"], *spec.get("decoder_aliases", ()))
    prefixes = [
        (part, re.compile("^" + re.escape(prefix).replace(r"\{i\}", r"(\d+)") + "(.+)$"))
        for part, prefix in [("blocks", spec["encoder_prefix"])] + [("decoder_blocks", p) for p in decoder_prefixes]
    ]
    out: StateDict = {}
    qkv_parts: dict[str, list[torch.Tensor | None]] = {}
    for key, value in hf_state_dict.items():
        if key in inverse_global:
            out[inverse_global[key]] = value
            continue
        for part, pattern in prefixes:
            m = pattern.match(key)
            if m is None:
                continue
            i, rest = m.groups()
            name, kind = rest.rsplit(".", 1)
            if name in qkv_index:
                parts = qkv_parts.setdefault(f"{part}.{i}.attn.qkv.{kind}", [None, None, None])
                parts[qkv_index[name]] = value
            elif name in inverse_names:
                out[f"{part}.{i}.{inverse_names[name]}.{kind}"] = value
            else:
                raise KeyError(f"no fastmae name for {key!r}")
            break
        else:
            raise KeyError(f"no fastmae name for {key!r}")
    for key, parts in qkv_parts.items():
        if any(p is None for p in parts):
            raise KeyError(f"incomplete q/k/v projections for {key!r}")
        out[key] = torch.cat(parts, dim=0)
    return out


def model_config(model: MaskedAutoencoderViT) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model``'s architecture."""
    blocks, dec = model.blocks, model.decoder_blocks
    return {
        "img_size": model.patch_embed.img_size[0],
        "patch_size": model.patch_size,
        "in_chans": model.in_chans,
        "embed_dim": model.cls_token.shape[-1],
        "depth": len(blocks),
        "num_heads": blocks[0].attn.num_heads,
        "decoder_embed_dim": model.mask_token.shape[-1],
        "decoder_depth": len(dec),
        "decoder_num_heads": dec[0].attn.num_heads,
        "mlp_ratio": mlp_ratio_of(model.cls_token.shape[-1], blocks[0].mlp.fc1.out_features),
        "norm_pix_loss": model.norm_pix_loss,
    }


def hf_config(model: MaskedAutoencoderViT, mask_ratio: float = 0.75) -> ViTMAEConfig:
    """A ``ViTMAEConfig`` for ``model``'s architecture (its LayerNorm eps, exact GELU, no dropout)."""
    from transformers import ViTMAEConfig

    c = model_config(model)
    eps = sorted({m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)})
    if len(eps) != 1:
        raise ValueError(f"Hugging Face ViTMAE has one layer_norm_eps; this model's LayerNorms have {eps}")
    return ViTMAEConfig(
        hidden_size=c["embed_dim"],
        num_hidden_layers=c["depth"],
        num_attention_heads=c["num_heads"],
        intermediate_size=model.blocks[0].mlp.fc1.out_features,
        decoder_hidden_size=c["decoder_embed_dim"],
        decoder_num_hidden_layers=c["decoder_depth"],
        decoder_num_attention_heads=c["decoder_num_heads"],
        decoder_intermediate_size=model.decoder_blocks[0].mlp.fc1.out_features,
        image_size=c["img_size"],
        patch_size=c["patch_size"],
        num_channels=c["in_chans"],
        qkv_bias=True,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=eps[0],
        mask_ratio=mask_ratio,
        norm_pix_loss=c["norm_pix_loss"],
    )


def to_hf(
    model: MaskedAutoencoderViT, mask_ratio: float = 0.75, attn_implementation: str = "sdpa"
) -> ViTMAEForPreTraining:
    """A Hugging Face ``ViTMAEForPreTraining`` with ``model``'s weights, dtype and device.

    ``attn_implementation="sdpa"`` by default: HF's eager attention runs its softmax in float32 even
    for float64 inputs, which would break float64 parity by ~3e-8.
    """
    from transformers import ViTMAEForPreTraining

    hf = ViTMAEForPreTraining(hf_config(model, mask_ratio))
    hf.config._attn_implementation = attn_implementation
    param = next(model.parameters())
    hf.to(device=param.device, dtype=param.dtype)
    sd = to_hf_state_dict(model.state_dict(), hf_style_of(hf.state_dict().keys()))
    hf.load_state_dict(sd, strict=True)
    return hf


def from_hf(hf: ViTMAEForPreTraining, **kwargs: Any) -> MaskedAutoencoderViT:
    """A fastmae model with ``hf``'s architecture, weights, dtype and device (``kwargs`` to the constructor)."""
    c = hf.config
    if c.hidden_act != "gelu" or not c.qkv_bias:
        raise ValueError(f"only exact-GELU, qkv-bias ViTMAE models convert (got {c.hidden_act}, qkv_bias={c.qkv_bias})")
    if c.intermediate_size / c.hidden_size != c.decoder_intermediate_size / c.decoder_hidden_size:
        raise ValueError("encoder and decoder MLP ratios differ; fastmae uses one mlp_ratio")
    image_size = c.image_size if isinstance(c.image_size, int) else c.image_size[0]
    patch_size = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
    from functools import partial

    model = MaskedAutoencoderViT(
        img_size=image_size,
        patch_size=patch_size,
        in_chans=c.num_channels,
        embed_dim=c.hidden_size,
        depth=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        decoder_embed_dim=c.decoder_hidden_size,
        decoder_depth=c.decoder_num_hidden_layers,
        decoder_num_heads=c.decoder_num_attention_heads,
        mlp_ratio=mlp_ratio_of(c.hidden_size, c.intermediate_size),
        norm_layer=partial(torch.nn.LayerNorm, eps=c.layer_norm_eps),
        norm_pix_loss=c.norm_pix_loss,
        **kwargs,
    )
    param = next(hf.parameters())
    model.to(device=param.device, dtype=param.dtype)
    model.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
    return model


# ---------------------------------------------------------------------- official checkpoints


@dataclass
class LoadReport:
    """What loading a checkpoint into a model did."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def encoder_only(self) -> bool:
        return bool(self.missing) and all(_is_decoder_key(k) for k in self.missing)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.missing:
            what = "the decoder (encoder-only checkpoint)" if self.encoder_only else "some weights"
            lines.append(f"missing {len(self.missing)} tensors, {what}; they keep their init: " + _abbrev(self.missing))
        if self.unexpected:
            lines.append(f"ignored {len(self.unexpected)} tensors the model does not have: " + _abbrev(self.unexpected))
        return "\n".join(lines)


def _is_decoder_key(key: str) -> bool:
    return key.startswith(("decoder_", "mask_token"))


def _abbrev(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_weights_file(folder: str | os.PathLike) -> str:
    """The weights file of a Hugging Face model folder; a one-line ``ValueError`` when it has none."""
    for name in HF_WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise ValueError(f"{os.fspath(folder)} is a folder without {' or '.join(HF_WEIGHT_FILES)}")


def hf_folder_config(path: Any) -> dict[str, Any] | None:
    """The ``config.json`` of a Hugging Face model folder (it says what the weights do not: the heads,
    ``norm_pix_loss``), or of the folder of its weights file (``model.safetensors`` or
    ``pytorch_model.bin`` given alone, when the config beside it is a ViTMAE one); None for anything else."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    is_weights_file = os.path.basename(os.fspath(path)) in HF_WEIGHT_FILES and os.path.isfile(path)
    config = os.path.join(os.path.dirname(path) if is_weights_file else path, "config.json")
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        loaded = json.load(f)
    if is_weights_file and loaded.get("model_type") != "vit_mae":  # e.g. a fastmae run's own config.json
        return None
    return loaded


def load_checkpoint(path: str | os.PathLike) -> Any:
    """The object in a checkpoint file: a ``.safetensors`` file's tensors, else ``torch.load`` with
    ``weights_only=True``. A folder is read as Hugging Face writes one: its ``model.safetensors``
    (else ``pytorch_model.bin``).

    A file that is neither (or a folder) raises a one-line ``ValueError`` naming it: torch's own
    errors run to several lines, and for a file that is not a checkpoint at all the weights-only one
    suggests ``weights_only=False``, which would not help and can run arbitrary code.
    """
    if os.path.isdir(path):  # a Hugging Face folder (save_pretrained, a hub snapshot)
        path = hf_weights_file(path)
    try:
        if os.fspath(path).endswith(".safetensors"):
            return load_safetensors(path)
        # the official MAE's training checkpoints (util/misc.save_model: checkpoint-N.pth) hold the run's
        # argparse.Namespace beside the weights: a plain record, safe to rebuild
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling, zip, safetensors-header and OS errors all mean: cannot read it
        if not isinstance(e, OSError) and not _torch_file_signature(path):
            why = "not a PyTorch or safetensors checkpoint (neither a zip nor a pickle file)"
        elif isinstance(e, pickle.UnpicklingError):
            unsupported = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
            why = (
                f"it holds more than tensors and plain containers ({unsupported[0]}; loaded with weights_only=True)"
                if unsupported
                else "not a torch checkpoint, or it holds more than tensors and plain containers (weights_only=True)"
            )
        else:
            lines = str(e).strip().splitlines()
            why = f"{type(e).__name__}: {lines[0] if lines else ''}"
        raise ValueError(f"cannot read {os.fspath(path)}: {why}") from e


def _torch_file_signature(path: str | os.PathLike) -> bool:
    """Whether the file starts as torch.save writes: a zip archive, or a pickle (protocol 2+)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return True  # cannot tell: the error as it came
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> StateDict:
    """The weights of a checkpoint: ``{'model': sd}``, ``{'state_dict': sd}`` or ``sd``; a ``.pth`` file
    (loaded with ``weights_only=True``), a ``.safetensors`` file, or an object in memory."""
    obj = load_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(obj, Mapping):
        raise ValueError(f"a checkpoint must be a dict of tensors, got {type(obj).__name__}")
    for wrapper in ("model", "state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError("the checkpoint holds no tensors")
    return sd


WRAPPER_PREFIXES = ("module.", "encoder.", "backbone.")


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> StateDict:
    """Keys without the wrapper prefixes that DDP (``module.``) and EasyCV (``encoder.``) add."""
    out: StateDict = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


# the keys of a fastmae / official MAE pretraining model and of its timm-named classifier
_FASTMAE_KEY = re.compile(
    r"^(cls_token|pos_embed|mask_token|decoder_pos_embed"
    r"|(patch_embed\.proj|norm|fc_norm|decoder_embed|decoder_norm|decoder_pred)\.(weight|bias)"
    r"|(blocks|decoder_blocks)\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|head\.(weight|bias|0\.(running_mean|running_var|num_batches_tracked)|1\.(weight|bias)))$"
)
_ENCODER_CORE = ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight")
ACCEPTED_LAYOUTS = (
    "fastmae / official MAE / timm ViT keys (also module.-, encoder.- or backbone.-prefixed) "
    "or Hugging Face ViTMAEForPreTraining keys"
)


def fastmae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """``state_dict`` in fastmae (= official MAE, timm ViT) names, whatever accepted layout it came in.

    Wrapper prefixes are stripped (DDP, EasyCV) and Hugging Face ViTMAE keys converted. Anything else
    raises a one-line ``ValueError``: writers that copy tensors as they are (timm, MAE exports) would
    otherwise produce a file under the wrong names that only fails, or worse, where it is loaded.
    """
    sd = strip_prefixes(state_dict)
    if any(k.startswith("vit.") for k in sd):
        try:
            sd = from_hf_state_dict(sd)
        except (KeyError, ValueError) as e:
            raise ValueError(f"a Hugging Face layout fastmae does not read ({e.args[0]})") from e
    unknown = [k for k in sd if not _FASTMAE_KEY.match(k)]
    if unknown:
        raise ValueError(f"unknown keys {_abbrev(unknown, 3)}: accepted are {ACCEPTED_LAYOUTS}")
    lacking = [k for k in _ENCODER_CORE if k not in sd]
    if lacking:
        raise ValueError(f"not a ViT / MAE state dict (no {', '.join(lacking)}): accepted are {ACCEPTED_LAYOUTS}")
    return sd


def load_official(
    model: MaskedAutoencoderViT, source: str | os.PathLike | Mapping[str, Any], strict: bool = True
) -> LoadReport:
    """Load an official MAE checkpoint (``{'model': state_dict}``) into ``model``.

    A full pretraining checkpoint (``mae_visualize_*``, ``*_full``) loads with ``strict=True``.
    Wrapper prefixes are stripped first: ``module.`` (DDP) and ``encoder.`` / ``backbone.`` (EasyCV's
    encoder-only exports).
    An encoder-only one (``mae_pretrain_vit_*``) loads into the encoder and the report names the
    decoder weights it lacks. Anything else missing, an unexpected key under ``strict``, or a shape
    mismatch is an error.
    """
    sd = strip_prefixes(read_state_dict(source))
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    report = LoadReport(loaded=[k for k in sd if k in expected], missing=missing, unexpected=unexpected)
    if missing and not report.encoder_only:
        raise KeyError(f"checkpoint lacks encoder weights: {_abbrev([k for k in missing if not _is_decoder_key(k)])}")
    if missing and any(_is_decoder_key(k) for k in report.loaded):  # not encoder-only: part of a decoder
        raise KeyError(
            f"checkpoint has part of a decoder: it lacks {_abbrev(missing)} (a full checkpoint has all of it, "
            "an encoder-only one none; a half-loaded decoder would be neither the checkpoint's nor a fresh one)"
        )
    if unexpected and strict:
        raise KeyError(f"checkpoint has keys the model does not: {_abbrev(unexpected)} (strict=True)")
    for k in report.loaded:
        if sd[k].shape != expected[k].shape:
            raise ValueError(f"{k}: checkpoint shape {tuple(sd[k].shape)} != model shape {tuple(expected[k].shape)}")
    model.load_state_dict({k: sd[k] for k in report.loaded}, strict=not missing)
    return report


# ---------------------------------------------------------------------- timm and safetensors


def to_timm_state_dict(state_dict: Mapping[str, torch.Tensor], global_pool: bool = True) -> StateDict:
    """An encoder for ``timm.create_model('vit_*_patch*_224', global_pool=...)``, loadable with ``strict=True``.

    ``state_dict``: a fastmae / official MAE pretraining state dict (the decoder is dropped; ``encoder.``,
    ``module.`` and ``backbone.`` prefixes are stripped), or a :class:`fastmae.vit.VisionTransformer`'s.

    - ``global_pool=True`` (timm ``global_pool='avg'``, which implies ``fc_norm``): the pretrained
      final ``norm`` becomes ``fc_norm``, applied after pooling the patch tokens.
    - ``global_pool=False`` (timm ``global_pool='token'``): ``norm`` stays; features are the cls token.

    A cls-token classifier (``norm`` and ``head``, no ``fc_norm``: a linear probe, or fine-tuned
    without global pool) is refused with ``global_pool=True``: as ``fc_norm`` under an average pool
    its head would read other features than it was trained on, with no error anywhere.

    A linear-probe head (``BatchNorm1d`` without affine + ``Linear``) is folded into one ``head``
    Linear, so timm's plain head computes the same logits. Load the result with ``num_classes=0``
    when it has no ``head.*`` keys.
    """
    from fastmae.vit import encoder_state_dict

    sd = encoder_state_dict(state_dict)
    if global_pool and any(k.startswith("head.") for k in sd) and "norm.weight" in sd and "fc_norm.weight" not in sd:
        raise ValueError(
            "a cls-token classifier (norm + head, no fc_norm) would be average-pooled as timm global_pool='avg', "
            "another function: export it with --to timm-cls (global_pool='token')"
        )
    out: StateDict = {}
    for key, value in sd.items():
        if global_pool and key.startswith("norm."):
            key = "fc_norm." + key[len("norm.") :]
        elif not global_pool and key.startswith("fc_norm."):
            raise ValueError("a global-pool model (fc_norm) cannot export as a cls-token model")
        out[key] = value
    if "head.1.weight" in out:  # linear probe: fold the affine-free BatchNorm into the Linear
        mean, var = out.pop("head.0.running_mean"), out.pop("head.0.running_var")
        out.pop("head.0.num_batches_tracked", None)
        inv_std = (var.double() + 1e-6).rsqrt()
        w, b = out.pop("head.1.weight"), out.pop("head.1.bias")
        out["head.weight"] = (w.double() * inv_std).to(w.dtype)
        out["head.bias"] = (b.double() - (w.double() * inv_std) @ mean.double()).to(b.dtype)
    return out


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, **metadata: str) -> None:
    """Write ``state_dict`` as a safetensors file (contiguous, unshared copies; string metadata)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt", **metadata})
    as_umask_says(path)


def as_umask_says(path: str | os.PathLike) -> None:
    """Give a written file the mode the umask gives new files (as ``torch.save``'s and ``open``'s
    get): safetensors (0.8) writes 0600, so an export on a shared machine was readable by its
    writer alone."""
    umask = os.umask(0o022)  # read it (there is no other way), then put it back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_safetensors(path: str | os.PathLike) -> StateDict:
    from safetensors.torch import load_file

    return load_file(os.fspath(path))
