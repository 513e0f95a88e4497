"""torch.compile(fullgraph=True) of the model.

The reference path compiles on CPU (inductor's C++ backend). The fused path's Triton ops cannot
run compiled on CPU (the interpreter needs data, compile traces fake tensors), so its compile and
numerics are a GPU test here; its trace and forward/backward partition are checked on CPU by
``tests/kernels/test_compile_trace.py``.
"""

from __future__ import annotations

import pytest
import torch

from fastmae.model import MaskedAutoencoderViT
from tests.helpers import assert_close_rel

TINY = dict(
    img_size=32,
    patch_size=8,
    embed_dim=32,
    depth=1,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
    norm_pix_loss=True,
)


def _compiled_vs_eager(
    fused: bool,
    device: str,
    rtol: float,
    activation_checkpointing: str = "none",
    decoder_attn: str | None = None,
    attn: str = "sdpa",
) -> None:
    torch.manual_seed(0)
    eager = MaskedAutoencoderViT(**TINY, fused=fused).to(device)
    model = MaskedAutoencoderViT(
        **TINY,
        fused=fused,
        activation_checkpointing=activation_checkpointing,
        attn_backend=attn,
        decoder_attn_backend=decoder_attn,
    ).to(device)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    imgs, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 16, device=device)
    loss_c, pred_c, mask_c = compiled(imgs, 0.75, noise)
    loss_e, pred_e, mask_e = eager(imgs, 0.75, noise)
    loss_c.backward()
    loss_e.backward()
    assert torch.equal(mask_c, mask_e)
    assert_close_rel(pred_c, pred_e, rtol, "pred")
    assert_close_rel(loss_c, loss_e, rtol, "loss")
    for (name, pc), (_, pe) in zip(model.named_parameters(), eager.named_parameters(), strict=True):
        if pe.requires_grad:
            assert_close_rel(pc.grad, pe.grad, rtol, name)


def test_padded_head_dim_attention_compiles_fullgraph_cpu():
    """The decoder's sdpa_pad64 (pad, sdpa with an explicit scale, slice) traces as one graph and
    gives the eager sdpa model's results."""
    torch._dynamo.reset()
    _compiled_vs_eager(fused=False, device="cpu", rtol=1e-5, decoder_attn="sdpa_pad64")


# Checkpointed blocks compile to one graph too (the policy becomes the partitioner's recompute tags),
# with the eager, un-checkpointed model's results.
@pytest.mark.parametrize("activation_checkpointing", ["none", "gelu", "selective", "full"])
def test_reference_path_compiles_fullgraph_cpu(activation_checkpointing):
    torch._dynamo.reset()
    _compiled_vs_eager(fused=False, device="cpu", rtol=1e-5, activation_checkpointing=activation_checkpointing)


@pytest.mark.gpu
@pytest.mark.parametrize("activation_checkpointing", ["none", "selective"])
def test_fused_path_compiles_fullgraph_cuda(activation_checkpointing):
    torch._dynamo.reset()
    _compiled_vs_eager(fused=True, device="cuda", rtol=1e-5, activation_checkpointing=activation_checkpointing)


@pytest.mark.gpu
def test_triton_attention_compiles_fullgraph_cuda():
    """The fast path with fastmae's attention kernel in every block, compiled with the trainer's
    selective checkpointing, against the eager sdpa model (one compile: the device stage is short)."""
    torch._dynamo.reset()
    _compiled_vs_eager(fused=True, device="cuda", rtol=1e-5, activation_checkpointing="selective", attn="triton")
