"""torch.compile(fullgraph=True) traces through all four ops, forward and backward (a GPU test:
on CPU, compile's fake tensors have no data for the Triton interpreter)."""

from __future__ import annotations

import pytest
import torch

from fastmae.kernels import encoder_input, masked_mse, patch_gather, unshuffle


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_compile_fullgraph(dtype, device, close):
    torch._dynamo.reset()
    N, H, P, D, ratio = 4, 64, 16, 96, 0.75
    L = (H // P) ** 2
    K = int(L * (1 - ratio))
    g = torch.Generator(device=device).manual_seed(0)
    imgs = torch.randn(N, 3, H, H, device=device, generator=g)
    ids_shuffle = torch.argsort(torch.rand(N, L, device=device, generator=g), dim=1)
    ids_keep, ids_restore = ids_shuffle[:, :K], torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(N, L, device=device)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)
    pos = torch.randn(1, 1 + L, D, device=device, dtype=dtype)
    params = {
        "w_embed": torch.randn(D, 3 * P * P, device=device, dtype=dtype) * 0.02,
        "cls": torch.randn(1, 1, D, device=device, dtype=dtype),
        "mask_token": torch.randn(1, 1, D, device=device, dtype=dtype),
        "w_pred": torch.randn(3 * P * P, D, device=device, dtype=dtype) * 0.02,
    }

    def step(imgs, w_embed, cls, mask_token, w_pred):
        x = patch_gather(imgs.to(dtype), ids_keep, P) @ w_embed.t()
        x = encoder_input(x, cls, pos, ids_keep)
        x = unshuffle(x, mask_token, ids_restore, pos)
        pred = (x @ w_pred.t())[:, 1:]
        return masked_mse(pred, imgs, mask, P, True)

    def run(fn):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        loss = fn(imgs, **leaves)
        loss.backward()
        return [loss] + [leaves[k].grad for k in params]

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))
    # Same kernels and GEMMs either way; bf16 leaves room for inductor's own choices around them.
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(["loss", *params], compiled, eager, strict=True):
        close(a, b, atol=rtol * max(b.abs().max().item(), 1e-30), name=name)
