"""Activation checkpointing of the blocks: the same results, less held for the backward.

``activation_checkpointing`` repeats operations in the backward instead of keeping their outputs, so
every result must be *bitwise* the one of the plain model; what it changes is the memory autograd
holds between forward and backward, counted here with ``benchmarks.memory_probe.held_bytes``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

from benchmarks.memory_probe import held_bytes
from fastmae import activation_checkpointing as ac_mod
from fastmae import model as model_mod
from fastmae.model import ACTIVATION_CHECKPOINTING, MaskedAutoencoderViT
from tests.helpers import TINY_MAE


def _run(mode: str, state: dict, imgs, noise, amp: bool, fused: bool = False):
    model = MaskedAutoencoderViT(**TINY_MAE, norm_pix_loss=True, fused=fused, activation_checkpointing=mode)
    model.load_state_dict(state)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss, pred, mask = model(imgs, 0.75, noise)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss, pred, mask, grads


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("mode", ["gelu", "selective", "full"])
def test_results_are_bitwise_unchanged(mode, amp):
    torch.manual_seed(0)
    state = MaskedAutoencoderViT(**TINY_MAE, norm_pix_loss=True).state_dict()
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    loss, pred, mask, grads = _run("none", state, imgs, noise, amp)
    loss_c, pred_c, mask_c, grads_c = _run(mode, state, imgs, noise, amp)
    assert torch.equal(loss_c, loss) and torch.equal(pred_c, pred) and torch.equal(mask_c, mask)
    assert grads_c.keys() == grads.keys()
    for name, g in grads.items():
        assert g is not None and torch.equal(grads_c[name], g), name


@pytest.mark.parametrize("mode", ["gelu", "selective", "full"])
def test_fused_path_with_checkpointing_is_unchanged(mode):
    # The kernels sit outside the checkpointed regions; the two compose (Triton interpreter on CPU).
    torch.manual_seed(1)
    state = MaskedAutoencoderViT(**TINY_MAE, norm_pix_loss=True).state_dict()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss, pred, _, grads = _run("none", state, imgs, noise, amp=False, fused=True)
    loss_c, pred_c, _, grads_c = _run(mode, state, imgs, noise, amp=False, fused=True)
    assert torch.equal(loss_c, loss) and torch.equal(pred_c, pred)
    for name, g in grads.items():
        assert torch.equal(grads_c[name], g), name


def _held_per_image(mode: str, amp: bool) -> float:
    # Activations grow with the batch, the cached bf16 weight casts do not: the slope is per image.
    torch.manual_seed(0)
    kwargs = dict(TINY_MAE, img_size=64, embed_dim=64, decoder_embed_dim=64)  # L = 64 tokens
    model = MaskedAutoencoderViT(**kwargs, norm_pix_loss=True, activation_checkpointing=mode)
    held = []
    for n in (2, 4):
        imgs, noise = torch.randn(n, 3, 64, 64), torch.rand(n, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            nbytes, out = held_bytes(lambda imgs=imgs, noise=noise: model(imgs, 0.75, noise)[0])
        held.append(nbytes)
        del out
    return (held[1] - held[0]) / 2


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_checkpointing_holds_less_for_the_backward(amp):
    none, gelu, selective, full = (_held_per_image(m, amp) for m in ACTIVATION_CHECKPOINTING)
    # "gelu" drops the MLP's GELU output (eager, it caches fc2's output instead, 1/4 of that size):
    # 0.84 (fp32) / 0.88 (bf16) of "none" at this small shape. "selective" also drops the norm outputs
    # (and, under autocast, their bf16 casts) but keeps every GEMM and attention output: 0.74 / 0.75
    # here, where the head and the loss weigh more than at ViT-B's (0.69). Without the policies both
    # would be >= 1. "full" keeps one tensor per block: 0.28 / 0.46 of "selective" here.
    assert gelu < 0.9 * none, (gelu, none)
    assert selective < 0.8 * none and selective < 0.9 * gelu, (selective, gelu, none)
    assert full < 0.5 * selective, (full, selective)


@pytest.mark.parametrize("mode", ["gelu", "selective", "full"])
def test_no_checkpointing_without_grad(mode, monkeypatch):
    # Inference (no grad) runs the blocks plainly: checkpoint is never entered, nothing is held.
    def no_checkpoint(*args, **kwargs):
        raise AssertionError("checkpoint called without grad")

    monkeypatch.setattr(model_mod, "checkpoint", no_checkpoint)  # the MLP's GELU recompute
    monkeypatch.setattr(ac_mod, "checkpoint", no_checkpoint)  # run_blocks' per-block checkpoint
    model = MaskedAutoencoderViT(**TINY_MAE, activation_checkpointing=mode).eval()
    with torch.no_grad():
        nbytes, _ = held_bytes(lambda: model(torch.randn(2, 3, 32, 32), 0.75)[0])
    assert nbytes < 64  # the loss scalar


def test_mode_is_settable_after_construction():
    model = MaskedAutoencoderViT(**TINY_MAE)
    model.activation_checkpointing = "gelu"
    assert all(blk.mlp.recompute_act for blk in (*model.blocks, *model.decoder_blocks))
    model.activation_checkpointing = "selective"
    assert not any(blk.mlp.recompute_act for blk in (*model.blocks, *model.decoder_blocks))
    with pytest.raises(ValueError, match="unknown activation_checkpointing"):
        model.activation_checkpointing = "some"


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown activation_checkpointing 'some'"):
        MaskedAutoencoderViT(**TINY_MAE, activation_checkpointing="some")


@pytest.mark.parametrize(
    "op",
    [
        "mm.default",
        "addmm.default",
        "bmm.default",
        "convolution.default",
        "_softmax.default",
        "_scaled_dot_product_flash_attention.default",
        "_scaled_dot_product_efficient_attention.default",
        "_scaled_dot_product_cudnn_attention.default",
        "_scaled_dot_product_flash_attention_for_cpu.default",
    ],
)
def test_selective_policy_never_recomputes_a_matmul_or_attention(op):
    # The promise of "selective": no extra FLOPs beyond element-wise work. CUDA's attention ops are
    # checked by name here, since CPU runs only meet the CPU one.
    policy = ac_mod._recompute_memory_bound_ops
    overload = getattr(torch.ops.aten, op.split(".")[0]).default
    assert policy(None, overload) == CheckpointPolicy.MUST_SAVE


@pytest.mark.parametrize(
    "op", ["native_layer_norm.default", "gelu.default", "_to_copy.default", "add.Tensor", "mul.Tensor", "view.default"]
)
def test_selective_policy_recomputes_memory_bound_ops(op):
    name, overload = op.split(".")
    assert ac_mod._recompute_memory_bound_ops(None, getattr(getattr(torch.ops.aten, name), overload)) == (
        CheckpointPolicy.PREFER_RECOMPUTE
    )


def test_selective_policy_keeps_an_op_it_cannot_classify():
    # A higher-order op (e.g. a wrapped Triton kernel) has no tags: saved, never recomputed.
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional

    assert ac_mod._recompute_memory_bound_ops(None, triton_kernel_wrapper_functional) == CheckpointPolicy.MUST_SAVE


@pytest.mark.gpu
def test_cuda_step_memory_drops_with_checkpointing():
    """The GPU twin of the CPU count: the allocator's rise over a forward+backward, bf16 autocast."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kwargs = dict(TINY_MAE, img_size=64, embed_dim=64, decoder_embed_dim=64)
    imgs, noise = torch.randn(64, 3, 64, 64, device="cuda"), torch.rand(64, 64, device="cuda")
    rise, losses = {}, {}
    for mode in ACTIVATION_CHECKPOINTING:
        torch.manual_seed(0)
        model = MaskedAutoencoderViT(**kwargs, norm_pix_loss=True, fused=True, activation_checkpointing=mode).cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(imgs, 0.75, noise)[0]
        held = torch.cuda.memory_allocated() - base  # what the forward leaves for the backward
        loss.backward()
        rise[mode] = (held, torch.cuda.max_memory_allocated() - base)
        losses[mode] = loss.item()
        del model, loss
    assert losses["gelu"] == losses["selective"] == losses["none"] == losses["full"]
    assert rise["gelu"][0] < 0.9 * rise["none"][0], rise
    assert rise["selective"][0] < 0.8 * rise["none"][0], rise
    assert rise["full"][0] < 0.5 * rise["selective"][0], rise


def test_selective_policy_keeps_the_weights_casts():
    # autocast's cast of a weight or bias (rank <= 2) is kept, as without checkpointing: redone in the
    # backward it is a pass over the weights every step; an activation's cast (batch, tokens, ...) is
    # recomputed
    policy, cast = ac_mod._recompute_memory_bound_ops, torch.ops.aten._to_copy.default
    assert policy(None, cast, torch.zeros(8, 4), dtype=torch.bfloat16) == CheckpointPolicy.MUST_SAVE
    assert policy(None, cast, torch.zeros(8), dtype=torch.bfloat16) == CheckpointPolicy.MUST_SAVE
    assert policy(None, cast, torch.zeros(2, 5, 8), dtype=torch.bfloat16) == CheckpointPolicy.PREFER_RECOMPUTE
