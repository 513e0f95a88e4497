"""The Masked Autoencoder with a ViT backbone (He et al. 2021), exactly as the reference.

Matches facebookresearch/mae ``models_mae.py`` in constructor arguments, state-dict keys (timm
ViT names), initialisation, masking, pos-embeds and loss; the parity tests against Hugging Face's
``ViTMAEForPreTraining`` hold it there.

Two paths compute the same function, chosen by ``fused``:
    reference  the reference's own operations: conv patch-embed of every patch, gather of the kept
               tokens, cat + gather unshuffle, patchify + norm-pix MSE. The default on CPU.
    fused      the memory-bound steps as Triton kernels (``fastmae.kernels``): only the kept
               patches are read from the image and embedded (the patch embedding is per patch, so
               this is the same function with 75% fewer patch-embed FLOPs), the decoder unshuffle is
               one pass, and the loss reads its targets straight from the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastmae.activation_checkpointing import (  # noqa: F401  (re-exported: fastmae.model's API)
    ACTIVATION_CHECKPOINTING,
    SELECTIVE,
    resolve_activation_checkpointing,
    run_blocks,
)
from fastmae.attention import attention, resolve_backend
from fastmae.pos_embed import sincos_pos_embed_tensor

LN_EPS = 1e-6

# The fast path's steps: the kept-patch gather (+ pos-embed add), the decoder unshuffle, the loss.
FUSED_OPS = ("gather", "unshuffle", "loss")

# The dtype of the token stream the blocks add their outputs to. The reference's is float32 under
# autocast too: its fp32 position-embedding add promotes the embedding, and every residual add keeps
# it so. "autocast" casts the stream to the autocast dtype where it starts (encoder and decoder): the
# adds, the LayerNorms' inputs and what the backward keeps of them move half the bytes, the residual
# grads too, at the cost of rounding the stream to 8 mantissa bits after each add (Megatron-LM's
# default). Outside autocast it changes nothing.
RESIDUAL_DTYPES = ("float32", "autocast")


class PatchEmbed(nn.Module):
    """Image to patch embedding, a ``P x P`` stride-``P`` convolution (timm's ``PatchEmbed`` keys)."""

    def __init__(
        self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768
    ):
        if isinstance(img_size, (tuple, list)):  # timm's PatchEmbed, which the reference uses, takes (H, W)
            if len(img_size) != 2 or img_size[0] != img_size[1]:
                raise ValueError(f"img_size {tuple(img_size)}: the MAE's patch grid is square, give one side")
            img_size = int(img_size[0])
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (N, C, H, W)`` -> ``(N, L, D)``."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's ``Attention`` keys)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if backend == "triton" and dim // num_heads > 128:
            raise ValueError(f"attention backend 'triton' supports head dims up to 128, got {dim // num_heads}")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        return self.proj(attention(qkv, self.backend))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as the reference
        self.fc2 = nn.Linear(hidden_dim, dim)
        # Keep fc1's output but not the GELU's for the backward: fc2's weight grad gets the GELU
        # recomputed (selective policy: fc2's GEMM is never run again).
        self.recompute_act = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.recompute_act and torch.is_grad_enabled():
            return checkpoint(self._act_fc2, h, use_reentrant=False, context_fn=SELECTIVE)
        return self._act_fc2(h)

    def _act_fc2(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(h))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``); the identity when ``p == 0`` or in eval."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def mlp_ratio_of(dim: int, hidden: int) -> float:
    """The ``mlp_ratio`` whose MLP at width ``dim`` has ``hidden`` units (``int(dim * mlp_ratio)``, as
    timm's Block): ``hidden / dim`` can land a hair under it in floating point (61 / 28 * 28 is
    60.99...), and a converted checkpoint then met a layer one unit narrower than its weights."""
    ratio = hidden / dim
    while int(dim * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


class Block(nn.Module):
    """Pre-norm transformer block (timm's ``Block`` keys: norm1, attn, norm2, mlp).

    ``drop_path`` is for fine-tuning; pretraining uses none, as the reference.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        attn_backend: str = "sdpa",
        drop_path: float = 0.0,
    ):
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=LN_EPS)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True, backend=attn_backend)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def random_masking_ids(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise, as the reference.

    Args:
        noise: ``(N, L)``; small values are kept.
        len_keep: number of patches kept per sample.

    Returns:
        ids_keep ``(N, len_keep)``, ids_restore ``(N, L)`` (the inverse permutation of the shuffle),
        mask ``(N, L)`` float, 0 = kept, 1 = removed.
    """
    N, L = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones([N, L], device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a VisionTransformer backbone.

    Args:
        img_size: square input size (an int, or ``(S, S)`` as timm takes it); divisible by ``patch_size``.
        patch_size: patch side ``P``.
        in_chans: image channels ``C``.
        embed_dim, depth, num_heads: the encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the decoder.
        mlp_ratio: MLP hidden size over the width.
        norm_layer: normalisation factory; default LayerNorm with eps 1e-6, as the reference factories.
        norm_pix_loss: normalise each target patch by its mean and (unbiased) variance.
        attn_backend: ``sdpa`` | ``sdpa_pad64`` | ``triton`` | ``xformers`` | ``math`` | ``auto`` (see
            :mod:`fastmae.attention`).
        decoder_attn_backend: the decoder's, when it should differ (its head dim and token count
            are not the encoder's); None = ``attn_backend``, resolved at the decoder's head dim
            (``auto`` can differ between the two).
        fused: use the Triton kernels of :mod:`fastmae.kernels` for the memory-bound steps: True for
            all, False for none, or a subset of :data:`FUSED_OPS` (for ablations).
        activation_checkpointing: what the blocks keep for backward during training, one of
            :data:`ACTIVATION_CHECKPOINTING`; trades recomputation for activation memory, never
            changes results.
        residual_dtype: ``float32`` (the reference) or ``autocast``: the residual stream in the
            autocast dtype when autocast is on (see :data:`RESIDUAL_DTYPES`); changes rounding.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        norm_pix_loss: bool = False,
        attn_backend: str = "sdpa",
        fused: bool | Iterable[str] = False,
        activation_checkpointing: str = "none",
        decoder_attn_backend: str | None = None,
        residual_dtype: str = "float32",
    ):
        super().__init__()
        if residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"unknown residual_dtype {residual_dtype!r}; choose from {', '.join(RESIDUAL_DTYPES)}")
        self.residual_dtype = residual_dtype
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=LN_EPS)
        # each part on its own: ``auto`` may pick another kernel for the decoder (197 tokens, head
        # dim 32 at the ViT presets) than for the encoder (50 tokens, head dim 64 or 80)
        self.attn_backend = resolve_backend(attn_backend, head_dim=embed_dim // num_heads, part="encoder")
        self.decoder_attn_backend = resolve_backend(
            attn_backend if decoder_attn_backend is None else decoder_attn_backend,
            head_dim=decoder_embed_dim // decoder_num_heads,
            part="decoder",
        )
        self.fused = fused  # type: ignore[assignment]  # the setter normalises it
        self.norm_pix_loss = norm_pix_loss
        self.in_chans = in_chans

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos embedding; a Parameter (not a buffer) so the reference's keys and
        # ``model.parameters()`` match it, with requires_grad=False so it never trains
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        block = partial(Block, mlp_ratio=mlp_ratio, norm_layer=norm_layer, attn_backend=self.attn_backend)
        self.blocks = nn.ModuleList([block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        decoder_block = partial(block, attn_backend=self.decoder_attn_backend)
        self.decoder_blocks = nn.ModuleList(
            [decoder_block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.activation_checkpointing = activation_checkpointing  # the setter checks it, tells the MLPs
        self.initialize_weights()

    # ------------------------------------------------------------------ the fast-path switch

    @property
    def fused(self) -> frozenset[str]:
        """The steps running as Triton kernels, a subset of :data:`FUSED_OPS` (empty: the reference path)."""
        return self._fused

    @fused.setter
    def fused(self, value: bool | Iterable[str]) -> None:
        if isinstance(value, str):  # one op by name, not its letters
            value = (value,)
        ops = frozenset(FUSED_OPS if value is True else () if value is False else value)
        unknown = ops - set(FUSED_OPS)
        if unknown:
            raise ValueError(f"unknown fused ops {sorted(unknown)}; choose from {', '.join(FUSED_OPS)}")
        self._fused = ops

    @property
    def activation_checkpointing(self) -> str:
        """What the blocks keep for backward, one of :data:`ACTIVATION_CHECKPOINTING`; settable."""
        return self._activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: str) -> None:
        if value not in ACTIVATION_CHECKPOINTING:
            raise ValueError(
                f"unknown activation_checkpointing {value!r}; choose from {', '.join(ACTIVATION_CHECKPOINTING)}"
            )
        self._activation_checkpointing = value
        for blk in (*self.blocks, *self.decoder_blocks):
            blk.mlp.recompute_act = value == "gelu"

    def _residual_stream(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks' input in the residual dtype: cast to the autocast dtype under ``autocast``."""
        kind = x.device.type
        if self.residual_dtype == "autocast" and torch.is_autocast_enabled(kind):
            return x.to(torch.get_autocast_dtype(kind))
        return x

    # ------------------------------------------------------------------ init

    def initialize_weights(self) -> None:
        grid = self.patch_embed.grid_size[0]
        self.pos_embed.data.copy_(sincos_pos_embed_tensor(self.pos_embed.shape[-1], grid))
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_tensor(self.decoder_pos_embed.shape[-1], grid))
        # patch_embed like nn.Linear (instead of nn.Conv2d)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        # timm's trunc_normal_(std=.02) is effectively normal_(std=0.02): the cutoff (2.) is 100 std
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)  # as the official JAX ViT
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ shapes

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``imgs: (N, C, H, W)`` -> ``(N, L, P*P*C)`` in (p, q, c) order."""
        p = self.patch_size
        N, C, H, W = imgs.shape
        h, w = H // p, W // p
        x = imgs.reshape(N, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(N, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (N, L, P*P*C)`` -> ``(N, C, H, W)``; the inverse of :meth:`patchify`."""
        p, C = self.patch_size, self.in_chans
        h = w = int(x.shape[1] ** 0.5)
        if h * w != x.shape[1]:
            raise ValueError(f"{x.shape[1]} patches do not form a square grid")
        x = x.reshape(x.shape[0], h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], C, h * p, w * p)

    def _check_inputs(self, imgs: torch.Tensor, mask_ratio: float, runs_kernels: bool = True) -> None:
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        expected = (self.in_chans, *self.patch_embed.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, expected))}), got {tuple(imgs.shape)}")
        if runs_kernels and self._fused and torch.float64 in (imgs.dtype, self.cls_token.dtype):
            # the kernels compute in fp32: a float64 model would silently get fp32 results
            raise ValueError(
                f"the fused ops ({', '.join(sorted(self._fused))}) compute in fp32: use fused=False for float64"
            )

    # ------------------------------------------------------------------ encoder

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference masking of embedded tokens.

        Args:
            x: ``(N, L, D)``.
            noise: ``(N, L)`` uniform noise; drawn with ``torch.rand`` when None.

        Returns:
            x_masked ``(N, len_keep, D)``, mask ``(N, L)`` (1 = removed), ids_restore ``(N, L)``.
        """
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        ids_keep, ids_restore, mask = random_masking_ids(noise, len_keep)
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))
        return x_masked, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``imgs: (N, C, H, W)`` -> latent ``(N, 1+K, D)``, mask ``(N, L)``, ids_restore ``(N, L)``."""
        if "gather" in self._fused:
            x, mask, ids_restore = self._embed_kept_fused(imgs, mask_ratio, noise)
        else:
            x = self.patch_embed(imgs)
            x = x + self.pos_embed[:, 1:, :]
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
            cls_token = self.cls_token + self.pos_embed[:, :1, :]
            x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = run_blocks(self.blocks, self._residual_stream(x), self.activation_checkpointing)
        return self.norm(x), mask, ids_restore

    def _embed_kept_fused(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from fastmae import kernels

        N, L = imgs.shape[0], self.num_patches
        if noise is None:
            noise = torch.rand(N, L, device=imgs.device)
        ids_keep, ids_restore, mask = random_masking_ids(noise, int(L * (1 - mask_ratio)))
        patches = kernels.patch_gather(imgs, ids_keep, self.patch_size)  # (N, K, C*P*P), (c, p, q)
        w = self.patch_embed.proj.weight
        x = F.linear(patches, w.reshape(w.shape[0], -1), self.patch_embed.proj.bias)
        x = kernels.encoder_input(x, self.cls_token, self.pos_embed, ids_keep)
        return x, mask, ids_restore

    def forward_features(self, imgs: torch.Tensor, norm: bool = True) -> torch.Tensor:
        """Encoder on every patch, no masking: ``imgs: (N, C, H, W)`` -> ``(N, 1+L, D)`` (cls first).

        The feature path for fine-tuning and probing; ``norm=False`` skips the final LayerNorm (the
        MAE fine-tuning recipe's global pool applies its own ``fc_norm`` instead).
        """
        self._check_inputs(imgs, 0.0, runs_kernels=False)  # no fused op runs here: float64 is fine
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = self._residual_stream(torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) if norm else x

    # ------------------------------------------------------------------ decoder

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent ``(N, 1+K, D)`` + ids_restore ``(N, L)`` -> pred ``(N, L, P*P*C)``."""
        x = self.decoder_embed(x)
        if "unshuffle" in self._fused:
            from fastmae import kernels

            x = kernels.unshuffle(x, self.mask_token, ids_restore, self.decoder_pos_embed)
        else:
            N, L, D = x.shape[0], ids_restore.shape[1], x.shape[2]
            mask_tokens = self.mask_token.expand(N, L + 1 - x.shape[1], D)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
            x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, D))  # unshuffle
            x = torch.cat([x[:, :1, :], x_], dim=1)  # cls token back in front
            x = x + self.decoder_pos_embed
        x = run_blocks(self.decoder_blocks, self._residual_stream(x), self.activation_checkpointing)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]  # drop the cls token

    # ------------------------------------------------------------------ loss

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the removed patches.

        Args:
            imgs: ``(N, C, H, W)``.
            pred: ``(N, L, P*P*C)``.
            mask: ``(N, L)``, 0 = kept, 1 = removed.
        """
        if "loss" in self._fused:
            from fastmae import kernels

            return kernels.masked_mse(pred, imgs, mask, self.patch_size, self.norm_pix_loss)
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # (N, L): mean loss per patch
        return (loss * mask).sum() / mask.sum()  # mean over removed patches

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``imgs: (N, C, H, W)`` -> loss (scalar), pred ``(N, L, P*P*C)``, mask ``(N, L)`` (1 = removed).

        ``noise: (N, L)`` fixes the masking (same noise, same mask); drawn with ``torch.rand`` when None.
        """
        self._check_inputs(imgs, mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def _mae(patch_size: int, embed_dim: int, depth: int, num_heads: int, **kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=LN_EPS),
        **kwargs,
    )


def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-B/16 encoder, 512-d 8-block decoder."""
    return _mae(16, 768, 12, 12, **kwargs)


def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-L/16 encoder, 512-d 8-block decoder."""
    return _mae(16, 1024, 24, 16, **kwargs)


def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    """ViT-H/14 encoder, 512-d 8-block decoder."""
    return _mae(14, 1280, 32, 16, **kwargs)


# the official models_mae.py's names (its short ones above are aliases of these there): code that
# picks a model by name, ``models_mae.__dict__[args.model]``, finds them here too
mae_vit_base_patch16_dec512d8b = mae_vit_base_patch16
mae_vit_large_patch16_dec512d8b = mae_vit_large_patch16
mae_vit_huge_patch14_dec512d8b = mae_vit_huge_patch14

MODELS: dict[str, Callable[..., MaskedAutoencoderViT]] = {
    "mae_vit_base_patch16": mae_vit_base_patch16,
    "mae_vit_large_patch16": mae_vit_large_patch16,
    "mae_vit_huge_patch14": mae_vit_huge_patch14,
}


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float = 0.05, skip_list: tuple[str, ...] = ()
) -> list[dict]:
    """AdamW parameter groups as the reference builds them (timm's ``add_weight_decay``).

    No decay for 1-D parameters (norms) and biases; everything else, ``cls_token`` and
    ``mask_token`` included, decays. Frozen parameters (the fixed pos-embeds) are left out.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
