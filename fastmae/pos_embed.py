"""Fixed 2-D sine-cosine position embeddings, computed exactly as the reference MAE does.

The reference (facebookresearch/mae ``util/pos_embed.py``) builds the grid with
``np.meshgrid(grid_w, grid_h)`` ("here w goes first"), so the first half of each vector encodes the
*column* (w) coordinate and the second half the row (h); every pretrained MAE checkpoint depends on
that orientation. Its frequencies are float64 (``np.arange(..., dtype=np.float)`` in the release
that trained the published checkpoints; Hugging Face's ViTMAE builds in float64 too), so the table
is computed in float64 and cast to float32 once, as the reference's ``.float()`` does: bit for bit
the same. (The repository's later numpy-2 edit, ``np.float32``, rounds in float32 and differs by up
to 2e-6.)
"""

from __future__ import annotations

import numpy as np
import torch


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Sin-cos encoding of positions.

    Args:
        embed_dim: output dimension (even).
        pos: positions of any shape (M values after flattening).

    Returns:
        ``(M, embed_dim)``: ``[sin(pos * omega) | cos(pos * omega)]``.
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64)  # the release's np.float (see the module docstring)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """2-D sin-cos position embedding of a square ``grid_size x grid_size`` patch grid.

    Returns:
        ``(grid_size**2, embed_dim)``, or ``(1 + grid_size**2, embed_dim)`` with a zero cls row first.
        Patches are in row-major order (index ``hi * grid_size + wi``).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}")
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w first, as the reference
    grid = grid.reshape([2, 1, grid_size, grid_size])
    emb_a = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # encodes w
    emb_b = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # encodes h
    pos_embed = np.concatenate([emb_a, emb_b], axis=1)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def sincos_pos_embed_tensor(embed_dim: int, grid_size: int) -> torch.Tensor:
    """``(1, 1 + grid_size**2, embed_dim)`` float32 tensor with the cls row, ready to copy into a model."""
    return torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True)).float().unsqueeze(0)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_size: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """``pos_embed`` (``(1, extra + g*g, D)``) resampled to a ``grid_size x grid_size`` patch grid.

    The official fine-tuning's ``interpolate_pos_embed`` (``util/pos_embed.py``, from DeiT): the extra
    (cls) tokens are kept, the patch tokens resized as a ``D``-channel image with
    ``F.interpolate(mode="bicubic", align_corners=False)`` (no antialiasing, also when shrinking), in
    float32 and cast back. The same grid returns ``pos_embed`` itself.
    """
    extra, tokens = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    old = round(tokens.shape[1] ** 0.5)
    if old * old != tokens.shape[1]:
        raise ValueError(f"pos_embed has {tokens.shape[1]} patch positions, not a square grid")
    if old == grid_size:
        return pos_embed
    dim = tokens.shape[-1]
    image = tokens.float().reshape(-1, old, old, dim).permute(0, 3, 1, 2)
    image = torch.nn.functional.interpolate(image, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    tokens = image.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat((extra, tokens), dim=1)
