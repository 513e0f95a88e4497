"""The step benchmark's parts: FLOP count, models, optimizer and the one training step.

The variants themselves (what each runs) are listed in ``step_catalogue.py``.

``bench_step.py`` builds a setting from these, checks each variant against HF eager, times them
interleaved and writes the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
from typing import Any

import torch

from benchmarks.step_catalogue import Variant
from fastmae.model import resolve_activation_checkpointing

MASK_RATIO = 0.75

# Loose bf16 tolerances against HF eager in the same precision, as norm-wise relative errors.
# Measured on CPU (bf16 autocast, batch 4, random init): bf16 against fp32 is ~0.6% in pred and
# <= 1% in these grads for ViT-B and ViT-L, so two correct bf16 paths differ by ~1-2%; a wrong
# gather or unshuffle pairs tokens with the wrong targets, an O(1) error.
CHECK_RTOL = {"loss": 1e-2, "pred": 3e-2, "grad": 5e-2}
CHECK_GRADS = ("patch_embed.proj.weight", "cls_token", "mask_token", "decoder_pred.weight")

SHAPES: dict[str, dict[str, Any]] = {
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
DECODER = dict(img_size=224, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0)
TINY = dict(
    img_size=32,
    patch_size=8,
    embed_dim=64,
    depth=2,
    num_heads=4,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=4,
    mlp_ratio=4.0,
)


# ---------------------------------------------------------------------- FLOPs


def train_flops_per_image(cfg: dict[str, Any], mask_ratio: float = MASK_RATIO) -> dict[str, Any]:
    """Training FLOPs per image counted from the model's shapes (a multiply-add is 2 FLOPs).

    Forward: patch embedding of the K kept patches; per encoder block on T = 1 + K tokens the qkv,
    proj, fc1, fc2 matmuls and attention's QK^T and AV; decoder_embed on 1 + K tokens; per decoder
    block the same on 1 + L tokens; decoder_pred on 1 + L tokens (the reference predicts every
    token, cls included, then drops cls). Training = 3 x forward (backward = 2 x forward: grads of
    inputs and of weights; the patch embedding needs no input grad, counted anyway by convention).
    LayerNorm, GELU, softmax, the loss and the optimizer are not counted.

    ``patch_embed_masked_extra`` is the forward patch-embedding work on the removed patches that HF
    and fastmae's reference path do as well (a conv over the whole image); it is not useful work and
    is left out of ``train`` for every variant.
    """
    C, P, img = cfg.get("in_chans", 3), cfg["patch_size"], cfg["img_size"]
    D, De = cfg["embed_dim"], cfg["decoder_embed_dim"]
    hid, hid_d = int(D * cfg["mlp_ratio"]), int(De * cfg["mlp_ratio"])
    L = (img // P) ** 2
    K = int(L * (1 - mask_ratio))
    Te, Td, patch = 1 + K, 1 + L, C * P * P

    def block(T: int, d: int, h: int) -> dict[str, int]:
        return {
            "qkv": 2 * T * d * 3 * d,
            "attn_qk": 2 * T * T * d,
            "attn_av": 2 * T * T * d,
            "proj": 2 * T * d * d,
            "mlp": 2 * T * d * h * 2,
        }

    enc = {k: v * cfg["depth"] for k, v in block(Te, D, hid).items()}
    dec = {k: v * cfg["decoder_depth"] for k, v in block(Td, De, hid_d).items()}
    parts = {
        "patch_embed_kept": 2 * K * patch * D,
        "encoder": sum(enc.values()),
        "decoder_embed": 2 * Te * D * De,
        "decoder": sum(dec.values()),
        "decoder_pred": 2 * Td * De * patch,
    }
    forward = sum(parts.values())
    return {
        "L": L,
        "K": K,
        "forward": forward,
        "train": 3 * forward,
        "parts_forward": parts,
        "encoder_blocks_forward": enc,
        "decoder_blocks_forward": dec,
        "patch_embed_masked_extra": 2 * (L - K) * patch * D,
        "definition": "useful work: patch-embed on kept patches, encoder on 1+K, decoder on 1+L tokens; x3",
    }


# ---------------------------------------------------------------------- models


def model_kwargs(model: str) -> dict[str, Any]:
    """Constructor arguments of a benchmark model (``tiny`` or a ``SHAPES`` name)."""
    if model == "tiny":
        return dict(TINY)
    return {**DECODER, **SHAPES[model]}


def build_base(model: str, device: torch.device, seed: int) -> torch.nn.Module:
    """The fastmae model all fastmae variants share parameters with (reference path, sdpa)."""
    from fastmae.model import MaskedAutoencoderViT

    torch.manual_seed(seed)
    with torch.device(device):
        return MaskedAutoencoderViT(**model_kwargs(model), norm_pix_loss=True, attn_backend="sdpa").train()


def fastmae_sharing(
    base: torch.nn.Module,
    fused: bool | frozenset[str],
    attn: str,
    activation_checkpointing: str = "none",
    decoder_attn: str | None = None,
    residual_dtype: str = "float32",
) -> torch.nn.Module:
    """A fastmae model with its own switches whose parameters *are* ``base``'s (one copy, one optimizer)."""
    from fastmae.model import MaskedAutoencoderViT

    kwargs: dict[str, Any] = {
        "fused": fused,
        "activation_checkpointing": activation_checkpointing,
        "decoder_attn_backend": decoder_attn,
        "residual_dtype": residual_dtype,
    }
    device = next(base.parameters()).device
    with torch.device(device):
        m = MaskedAutoencoderViT(
            **_config_of(base), norm_pix_loss=base.norm_pix_loss, attn_backend=attn, **kwargs
        ).train()
    m.load_state_dict(base.state_dict(keep_vars=True), assign=True)
    return m


def _config_of(model: torch.nn.Module) -> dict[str, Any]:
    from fastmae.convert import model_config

    cfg = model_config(model)
    cfg.pop("norm_pix_loss")
    return cfg


def make_optimizer(model: torch.nn.Module, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """Fused AdamW over the reference's weight-decay groups (no decay for biases and 1-D params)."""
    from fastmae.model import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay=0.05)
    try:
        return torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95), fused=True), "AdamW(fused=True)"
    except RuntimeError:  # a device without the fused kernel
        return torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95), foreach=True), "AdamW(foreach=True)"


def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Create the optimizer's state (Adam's moments) with one step on zero grads; grads left as None.

    AdamW on a zero grad changes a weight only by its decay (lr * wd, ~1e-5 relative): harmless for
    timing, and the correctness checks have already run.
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the parameters and the optimizer state (the memory a variant holds between steps)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        n += sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
    return n


# ---------------------------------------------------------------------- running a variant


class Runner:
    """A built variant: its (maybe compiled) module, optimizer and the one training step."""

    def __init__(
        self,
        variant: Variant,
        module: torch.nn.Module,
        eager: torch.nn.Module,
        opt: torch.optim.Optimizer,
        device: torch.device,
        amp: bool,
    ):
        self.variant, self.module, self.eager, self.opt = variant, module, eager, opt
        self.device, self.amp = device, amp
        # cudagraph trees need to know where a step begins (outputs of the last replay may be reused)
        self.mark_step = variant.cudagraphs and device.type == "cuda"

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and prediction ``(N, L, P*P*C)`` under bf16 autocast (when on)."""
        if self.mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.variant.impl == "hf":
                out = self.module(pixel_values=imgs, noise=noise)
                return out.loss, out.logits
            loss, pred, _ = self.module(imgs, MASK_RATIO, noise)
            return loss, pred

    def step(self, imgs: torch.Tensor, noise: torch.Tensor) -> None:
        """One training step: forward, backward, optimizer step, grads set to None. No host sync."""
        loss, _ = self.forward(imgs, noise)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def named_grad(self, name: str) -> torch.Tensor | None:
        """The gradient of a fastmae-named parameter (HF names mapped)."""
        if self.variant.impl == "hf":
            from fastmae.convert import hf_style_of, to_hf_state_dict

            params = dict(self.eager.named_parameters())
            (hf_name,) = to_hf_state_dict({name: torch.empty(0)}, hf_style_of(params)).keys()
            return params[hf_name].grad
        return dict(self.eager.named_parameters())[name].grad

    def grad_norm(self) -> float:
        """L2 norm of all gradients (the same for HF's split q/k/v as for the fused qkv)."""
        grads = [p.grad.float() for p in self.eager.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


class ForcedSdpaKernel(torch.nn.Module):
    """Runs ``inner`` with one SDPA kernel allowed (``torch.nn.attention.sdpa_kernel``).

    The context is entered *inside* the module, so a compiled variant traces it and its graph is
    keyed on it: with the context outside, dynamo could reuse another instance's graph (parameters
    are graph inputs, so same-shaped fastmae instances share compiled code) that chose another kernel.
    """

    def __init__(self, inner: torch.nn.Module, kernel: str):
        super().__init__()
        from torch.nn.attention import SDPBackend

        self.inner = inner
        self.backend = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
        }[kernel]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([self.backend]):
            return self.inner(*args, **kwargs)


# compile "modes" of the benchmark's own that are inductor options on the default mode
COMPILE_OPTIONS: dict[str, dict[str, Any]] = {
    # tunes each generated pointwise / reduction kernel's block sizes by coordinate descent at compile
    # time: inductor's fused and norm kernels were 29% of fm_fast's ViT-B step on the H200
    "coordinate-descent": {"coordinate_descent_tuning": True},
    # A LayerNorm backward's weight and bias grads: inductor's "mix-order reduction" folds them into
    # the kernel that reduces each row for the input grad, writing per-split partial sums [nsplit, D]
    # in fp32; the final sum over the splits is an ATen ``.sum(dim=0)`` its wrapper code calls, two a
    # LayerNorm: the 84 fp32 ``reduce_kernel`` calls (1.08 ms) of fm_fast's ViT-B step on the H200.
    # Inductor picks split sizes of 16 (encoder, 12800 rows) and 32 (decoder, 50432) from the SM
    # count: 128 means 4-8x fewer partial rows to sum, and fewer programs in the fused kernel.
    "mix-order-split-128": {"triton.mix_order_reduction_split_size": 128},
    # without it the weight and bias grads are separate reductions reading grad and input again
    "no-mix-order": {"triton.mix_order_reduction": False},
    # Inductor's horizontal fusion of independent kernels into one launch. The traffic probe counts
    # ~330 single-op casts a ViT-B step (autocast's fp32 -> bf16 weight casts, the weight grads'
    # bf16 -> fp32), ~0.5 ms of bytes but each also a launch: at a few us of fixed cost a kernel on
    # the GPU, one launch per group of them might take ~0.5 ms (~1%) off the step (a guess to test).
    "combo-kernels": {"combo_kernels": True},
}


def missing_compile_options(mode: str | None) -> list[str]:
    """The inductor options of a benchmark compile mode that this torch does not have."""
    if mode not in COMPILE_OPTIONS:
        return []
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    return [k for k in COMPILE_OPTIONS[mode] if k not in known]


def compile_module(module: torch.nn.Module, mode: str, fullgraph: bool, backend: str) -> torch.nn.Module:
    """``torch.compile`` with static shapes; ``mode`` (or one of :data:`COMPILE_OPTIONS`) applies to
    inductor only."""
    kwargs: dict[str, Any] = {"fullgraph": fullgraph, "dynamic": False}
    if backend == "inductor" and mode in COMPILE_OPTIONS:
        kwargs["options"] = dict(COMPILE_OPTIONS[mode])
    elif backend == "inductor":
        kwargs["mode"] = None if mode == "default" else mode
    else:
        kwargs["backend"] = backend
    return torch.compile(module, **kwargs)


def dynamo_settings() -> Any:
    """A context with a higher recompile limit that fails when hit (names differ across torch versions).

    Many module instances of one class compile here (and each batch size in a ``max`` search);
    silently falling back to eager past the limit would time the wrong thing. A context, so an
    in-process caller (the smoke test) gets its settings back.
    """
    cfg = torch._dynamo.config
    patch: dict[str, Any] = {}
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            patch[name] = max(getattr(cfg, name), 64)
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            patch[name] = True
    return cfg.patch(**patch)


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def unique_graphs() -> int:
    """Graphs dynamo has compiled so far; a variant adding none reused another instance's graph."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def why_skip(v: Variant, device: torch.device, args: argparse.Namespace) -> str | None:
    """Why a variant cannot run here, or None."""
    from fastmae.attention import xformers_available

    if device.type != "cuda":
        if v.compile and v.fused:
            return "fused + torch.compile needs CUDA (the Triton interpreter cannot trace fake tensors)"
        if v.compile and not args.cpu_compile:
            return "compile is off on CPU (pass --cpu-compile)"
        if v.sdpa_kernel or v.attn == "xformers":
            return "needs CUDA"
        if v.compile and args.compile_backend == "inductor" and v.compile != "default":
            return f"compile mode {v.compile!r} is for CUDA"
    if missing := missing_compile_options(v.compile):
        return f"this torch's inductor has no option {', '.join(missing)}"
    if v.attn == "xformers" and not xformers_available():
        return "xformers does not import"
    return None


@dataclasses.dataclass
class Family:
    """The models of one implementation: the eager module every variant of it shares, its optimizer."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    opt_name: str


def build_runner(
    v: Variant, families: dict[str, Family], base: torch.nn.Module, device: torch.device, args: argparse.Namespace
) -> Runner:
    fam = families[v.impl]
    if v.impl == "hf":
        eager = fam.model
    else:
        # "auto" as the trainer resolves it, so fm_fast is what `python -m fastmae.train` runs
        ac = resolve_activation_checkpointing(v.activation_checkpointing, device, v.compile is not None)
        eager = fastmae_sharing(base, v.fused, v.attn, ac, v.decoder_attn, v.residual_dtype)
    module = ForcedSdpaKernel(eager, v.sdpa_kernel) if v.sdpa_kernel else eager
    if v.compile:
        module = compile_module(module, v.compile, fullgraph=v.impl == "fastmae", backend=args.compile_backend)
    return Runner(v, module, eager, fam.opt, device, amp=device.type == "cuda" and not args.no_amp)


def make_inputs(
    batch: int, img: int, L: int, pool: int, device: torch.device, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``pool`` batches of (images ``(B, 3, S, S)`` fp32 N(0, 1), noise ``(B, L)`` uniform), on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, img, img, device=device, generator=g),
            torch.rand(batch, L, device=device, generator=g),
        )
        for _ in range(pool)
    ]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ``||a - b|| / ||b||`` in fp32 (inf when either is not finite)."""
    a, b = a.detach().float(), b.detach().float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()


def check_step(r: Runner, imgs: torch.Tensor, noise: torch.Tensor) -> dict[str, Any]:
    """The variant's first call (compiles it): forward + backward on the check batch, no optimizer step."""
    loss, pred = r.forward(imgs, noise)
    loss.backward()
    out = {
        "loss": loss.detach().float().clone(),
        "pred": pred.detach().float().clone(),
        "grads": {n: r.named_grad(n).detach().float().clone() for n in CHECK_GRADS},
        "grad_norm": r.grad_norm(),
    }
    r.opt.zero_grad(set_to_none=True)
    return out


def compare(out: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    loss_rel = abs(out["loss"].item() - ref["loss"].item()) / max(abs(ref["loss"].item()), 1e-30)
    pred_rel = rel_err(out["pred"], ref["pred"])
    grads = {n: rel_err(out["grads"][n], ref["grads"][n]) for n in CHECK_GRADS}
    gn_rel = abs(out["grad_norm"] - ref["grad_norm"]) / max(ref["grad_norm"], 1e-30)
    grads["global_norm"] = gn_rel
    ok = loss_rel <= CHECK_RTOL["loss"] and pred_rel <= CHECK_RTOL["pred"]
    ok = ok and all(e <= CHECK_RTOL["grad"] for e in grads.values())
    return {
        "ok": bool(ok),
        "loss": out["loss"].item(),
        "loss_hf_eager": ref["loss"].item(),
        "loss_rel_diff": loss_rel,
        "pred_rel_err": pred_rel,
        "grad_rel_err": grads,
        "tolerances": CHECK_RTOL,
        "against": "hf_eager in the same precision, same weights, batch and noise",
    }


def measure_step_memory(r: Runner, inputs: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> int:
    """Largest rise of allocated memory within one of ``steps`` training steps (bytes); CUDA only."""
    rise = 0
    for i in range(steps):
        imgs, noise = inputs[i % len(inputs)]
        if r.device.type == "cuda":
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        r.step(imgs, noise)
        if r.device.type == "cuda":
            torch.cuda.synchronize()
            rise = max(rise, torch.cuda.max_memory_allocated() - start)
    return rise


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
