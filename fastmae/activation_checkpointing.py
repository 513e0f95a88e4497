"""What the transformer blocks keep for the backward pass: the ``activation_checkpointing`` choices,
selective checkpointing's policy, and the loop that runs the blocks under them.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

# What the transformer blocks keep for the backward pass (``activation_checkpointing``):
#   none       everything autograd saves (the reference's behaviour);
#   gelu       all of that but the MLP's GELU output, recomputed from its input in the backward (the
#              cheapest saving: one element-wise pass for the largest activation);
#   selective  the outputs of the matrix multiplies and attention, each block's input and the
#              weights' bf16 casts; the norms, GELU, activation casts, residual adds and copies are
#              recomputed in the backward (memory passes, no FLOPs);
#   full       only each block's input: the whole block runs again in the backward (~1/3 more FLOPs).
# Recomputation repeats the same operations on the same inputs, so results do not change.
ACTIVATION_CHECKPOINTING = ("none", "gelu", "selective", "full")
_aten = torch.ops.aten
_RECOMPUTED_NON_POINTWISE = {
    _aten.native_layer_norm.default,
    _aten.gelu.default,
    _aten._to_copy.default,
    _aten.clone.default,
    _aten.copy_.default,
    _aten._unsafe_view.default,
}


def _recompute_memory_bound_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's policy: recompute element-wise, normalisation and view/copy ops,
    but keep autocast's casts of the weights and biases."""
    if op is _aten._to_copy.default and args and isinstance(args[0], torch.Tensor) and args[0].dim() <= 2:
        # A parameter's cast (in a block every activation is (batch, tokens, ...)): kept, as without
        # checkpointing, 2 bytes a parameter once; redone in the backward it is a pass over the
        # weights, 6 bytes a parameter every step (traffic_probe: 0.66 GB a step on ViT-B, 1.97 GB
        # on ViT-L, ~0.16 / 0.46 ms at the H200's copy bandwidth).
        return CheckpointPolicy.MUST_SAVE
    # getattr: a higher-order op (a wrapped kernel, say) has neither tags nor is_view, and is kept
    cheap = (
        op in _RECOMPUTED_NON_POINTWISE
        or torch.Tag.pointwise in getattr(op, "tags", ())
        or getattr(op, "is_view", False)
    )
    return CheckpointPolicy.PREFER_RECOMPUTE if cheap else CheckpointPolicy.MUST_SAVE


# the selective policy as a checkpoint context_fn (also the GELU recompute of model.Mlp)
SELECTIVE = partial(create_selective_checkpoint_contexts, _recompute_memory_bound_ops)


def resolve_activation_checkpointing(value: str, device: torch.device | str, compiled: bool) -> str:
    """``auto`` -> ``selective`` for a compiled model on CUDA, else ``none``; other values unchanged.

    Compiled, inductor fuses the recomputation into the backward kernels that read the same inputs
    anyway: on an H200 (benchmarks/results/2026-11-27_h200_*) selective cost 0.9% of ViT-L/16's step
    and took its peak from 0.87x to 0.60x HF eager's (gelu: 0.6% and 0.85x -> 0.70x on ViT-B). Eager,
    torch's selective checkpointing dispatches every op through its policy: 1.5x the step (ViT-B), so
    ``auto`` leaves an eager model alone.
    """
    if value != "auto":
        return value
    return "selective" if compiled and torch.device(device).type == "cuda" else "none"


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, activation_checkpointing: str = "none") -> torch.Tensor:
    """``x = blk(x)`` for each block, checkpointed as :data:`ACTIVATION_CHECKPOINTING` says.

    ("gelu" is the blocks' own business: each :class:`Mlp` checkpoints its GELU and fc2.)
    """
    if activation_checkpointing in ("none", "gelu") or not torch.is_grad_enabled():
        for blk in blocks:
            x = blk(x)
        return x
    kwargs = {}
    if activation_checkpointing == "selective":
        kwargs["context_fn"] = SELECTIVE
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False, **kwargs)
    return x
