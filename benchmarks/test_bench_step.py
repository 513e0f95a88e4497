"""pytest-benchmark entries: CPU-side pieces of the step, and the kernels on a GPU when there is one.

    pytest benchmarks/ --benchmark-json=out.json

The step benchmark proper (interleaved variants, compile, MFU) is ``bench_step.py``; pytest-benchmark
times with a host clock, so the CUDA entries synchronise inside the timed call and are indicative only.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_step, step_catalogue, step_variants
from fastmae.model import MaskedAutoencoderViT, random_masking_ids

VIT_B = dict(img_size=224, patch_size=16, embed_dim=768, num_heads=12)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def test_reference_loss_cpu(benchmark):
    """The reference path's patchify + norm-pix masked MSE at ViT-B/16 shapes, batch 8, fp32, CPU."""
    model = MaskedAutoencoderViT(**VIT_B, depth=1, decoder_depth=1, norm_pix_loss=True)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(8, 3, 224, 224, generator=g)
    pred = torch.randn(8, 196, 768, generator=g)
    _, _, mask = random_masking_ids(torch.rand(8, 196, generator=g), 49)
    loss = benchmark(model.forward_loss, imgs, pred, mask)
    assert torch.isfinite(loss)


def test_random_masking_cpu(benchmark):
    """argsort masking for batch 256, L = 196 (the host-independent part of every variant's step)."""
    noise = torch.rand(256, 196, generator=torch.Generator().manual_seed(0))
    ids_keep, ids_restore, mask = benchmark(random_masking_ids, noise, 49)
    assert ids_keep.shape == (256, 49) and mask.sum().item() == 256 * 147


@pytest.mark.parametrize("variant", ["hf_eager", "fm_ref"])
def test_tiny_train_step_cpu(benchmark, variant):
    """One training step (forward, backward, fused AdamW) of the tiny model, eager, on CPU."""
    device = torch.device("cpu")
    base = step_variants.build_base("tiny", device, seed=0)
    if variant == "hf_eager":
        from fastmae.convert import to_hf

        model = to_hf(base).train()
    else:
        model = base
    opt, name = step_variants.make_optimizer(model, device)
    families = {"hf": step_variants.Family(model, opt, name), "fastmae": step_variants.Family(model, opt, name)}
    args = bench_step.parse_args(["--tiny"])
    runner = step_variants.build_runner(step_catalogue.VARIANTS[variant], families, base, device, args)
    (imgs, noise), *_ = step_variants.make_inputs(4, 32, 16, 1, device, seed=0)
    benchmark(runner.step, imgs, noise)


def _kernel_inputs(device: str, batch: int, dim: int, dec_dim: int, P: int, side: int):
    g = torch.Generator(device=device).manual_seed(0)
    L = (side // P) ** 2
    K = L // 4
    ids_keep, ids_restore, mask = random_masking_ids(torch.rand(batch, L, device=device, generator=g), K)
    bf16 = torch.bfloat16
    return {
        "imgs": torch.randn(batch, 3, side, side, device=device, generator=g),
        "ids_keep": ids_keep,
        "ids_restore": ids_restore,
        "mask": mask,
        "x_enc": torch.randn(batch, K, dim, device=device, generator=g).to(bf16).requires_grad_(),
        "cls": (0.02 * torch.randn(1, 1, dim, device=device, generator=g)).requires_grad_(),
        "pos": torch.randn(1, 1 + L, dim, device=device, generator=g),
        "x_dec": torch.randn(batch, 1 + K, dec_dim, device=device, generator=g).to(bf16).requires_grad_(),
        "mask_token": (0.02 * torch.randn(1, 1, dec_dim, device=device, generator=g)).requires_grad_(),
        "dec_pos": torch.randn(1, 1 + L, dec_dim, device=device, generator=g),
        "pred": torch.randn(batch, L, 3 * P * P, device=device, generator=g).to(bf16).requires_grad_(),
        "P": P,
    }


def _op_call(op: str, impl: str, t: dict):
    """The op's forward + backward (patch_gather: forward only; images take no grad)."""
    from fastmae import kernels

    fn = getattr(kernels, op if impl == "triton" else f"{op}_ref")
    if op == "patch_gather":
        return lambda: fn(t["imgs"], t["ids_keep"], t["P"])
    if op == "encoder_input":
        args, leaves = (t["x_enc"], t["cls"], t["pos"], t["ids_keep"]), (t["x_enc"], t["cls"])
    elif op == "unshuffle":
        args, leaves = (t["x_dec"], t["mask_token"], t["ids_restore"], t["dec_pos"]), (t["x_dec"], t["mask_token"])
    else:
        args, leaves = (t["pred"], t["imgs"], t["mask"], t["P"], True), (t["pred"],)

    def fwd_bwd():
        out = fn(*args)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    return fwd_bwd


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("op", ["patch_gather", "encoder_input", "unshuffle", "masked_mse"])  # fastmae.kernels
def test_kernel_fwd_bwd(benchmark, op, impl, device):
    """Each kernel's forward + backward timed beside its eager ref (one pytest-benchmark row each; their
    agreement is the kernel tests'), bf16 activations, fp32 params and images.

    On CUDA at ViT-B/16 shapes, batch 256; on CPU (Triton's interpreter) at tiny shapes, which
    checks the entry runs, not the speed.
    """
    if device == "cuda":
        t = _kernel_inputs(device, batch=256, dim=768, dec_dim=512, P=16, side=224)
        rounds, iterations = 20, 5
    else:
        t = _kernel_inputs(device, batch=2, dim=32, dec_dim=16, P=8, side=32)
        rounds, iterations = 3, 1
    call = _op_call(op, impl, t)
    call()  # compile / autotune outside the timing

    def timed():
        out = call()
        _sync(device)
        return out

    benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=1)
