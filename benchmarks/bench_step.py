"""Training-step throughput of MAE pretraining: Hugging Face against fastmae, same process, interleaved.

A training step is forward + backward + one fused AdamW step (the same optimizer settings for every
variant: the reference's weight-decay groups, lr 1.5e-4, betas (0.9, 0.95), wd 0.05), under bf16
autocast on CUDA, on synthetic images already on the device (fp32 N(0, 1), the loader's dtype),
mask ratio 0.75, norm-pix loss. Explicit noise is passed to every variant, so all mask alike.

Variants (``--variants`` takes names or the groups ``main``, ``ablations``, ``all``) are listed,
each with what it runs, in ``step_catalogue.py``; ``--list-variants`` prints them. The reference is
``hf_eager`` (HF ViTMAEForPreTraining, eager, sdpa); ``hf_compile`` is the same under torch.compile;
``fm_fast`` is fastmae as the trainer runs it on CUDA (kernels, compile, ``auto`` attention and
activation checkpointing); ``fm_*`` ablations change one thing each.

Measured per variant: img/s (batch / median step time, and total images / total time), step time
median and p10/p25/p75/p90, peak memory, compile time (first call, outside the timed region), MFU
against a bf16 GEMM measured in the same run and against the datasheet peak.

Interleaving: after every variant is built, checked and warmed up, the timing runs in rounds; each
round runs ``--steps`` steps of every variant, the order rotated each round, so drift (clocks,
temperature) falls on all variants alike. Only CUDA events are recorded in the timed steps; the host
synchronises once per variant per round. The fastmae variants share one parameter set and one
optimizer (and same-switch instances share compiled graphs: ``new_graphs`` 0 in the JSON).

FLOPs (see :func:`train_flops_per_image`): every variant is credited with the same *useful* work:
the patch embedding of the kept patches only (HF and the reference path embed all patches, 4x that
GEMM; the fused path embeds only the kept ones), the encoder on 1 + K tokens, the decoder (and
decoder_pred) on 1 + L tokens; matmuls and attention QK^T / AV; x3 for forward + backward.
img/s and MFU are therefore comparable across variants.

Peak memory (see :func:`measure_step_memory`): what the variant would need alone: its parameters and
optimizer state, the input pool, plus the largest rise in allocated memory within one of its
warm-up steps (activations, grads, workspaces; a CUDA-graph variant's recording step included).
Other variants' state, resident in the same process, is not counted.

Correctness guard: before timing, each variant's first step (its compile) runs on a fixed batch and
noise with the weights identical across variants; its loss, prediction and gradients are compared
with HF eager's in the same precision (tolerances in :data:`CHECK_RTOL`). A fast-but-wrong variant is
flagged ``check.ok = false`` in the JSON and the table.

    python -m benchmarks.bench_step --models vit_base_patch16 --batch 256 --out step_b.json
    python benchmarks/bench_step.py --tiny --out /tmp/step_tiny.json      # CPU harness smoke test
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as a script: the repo root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import common
from benchmarks import report as report_mod  # noqa: E402  (after the sys.path fallback above)
from benchmarks.step_catalogue import GROUPS, VARIANTS, Variant, ratios, resolve_variants  # noqa: E402
from benchmarks.step_variants import (  # noqa: E402  (after the sys.path fallback above)
    MASK_RATIO,
    SHAPES,
    Family,
    Runner,
    build_base,
    build_runner,
    check_step,
    compare,
    dynamo_settings,
    free_memory,
    graph_breaks,
    init_optimizer_state,
    make_inputs,
    make_optimizer,
    measure_step_memory,
    model_kwargs,
    state_bytes,
    train_flops_per_image,
    unique_graphs,
    why_skip,
)

# ---------------------------------------------------------------------- one setting


class Setting:
    """One model at one batch setting: builds the variants, checks, warms up, times interleaved."""

    def __init__(
        self,
        model: str,
        batch: int | str,
        variants: list[Variant],
        args: argparse.Namespace,
        device: torch.device,
        report: dict[str, Any],
        save: Callable[[], None],
        deadline: float,
        mem_per_image: dict[str, float] | None = None,
    ):
        self.model, self.batch, self.variants, self.args = model, batch, variants, args
        self.device, self.save, self.deadline = device, save, deadline
        self.mem_per_image = mem_per_image or {}
        kw = model_kwargs(model)
        self.flops = train_flops_per_image(kw)
        self.rec: dict[str, Any] = {
            "model": model,
            "batch": batch,
            "model_kwargs": kw,
            "flops_per_image": self.flops,
            "variants": {},
            "status": "running",
        }
        report["settings"].append(self.rec)
        self.runners: dict[str, Runner] = {}
        self.inputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.shared_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.families: dict[str, Family] = {}

    # -- build + check

    def _vrec(self, v: Variant) -> dict[str, Any]:
        return self.rec["variants"].setdefault(v.name, {"spec": v.record(), "status": "pending"})

    def setup(self) -> None:
        args, device = self.args, self.device
        base = build_base(self.model, device, args.seed)
        from fastmae.convert import to_hf

        with torch.device(device):  # built where it runs (a ViT-L initialised on the host costs seconds)
            hf = to_hf(base, mask_ratio=MASK_RATIO, attn_implementation="sdpa").train()
        self.families = {}
        for impl, m in (("hf", hf), ("fastmae", base)):
            opt, name = make_optimizer(m, device)
            self.families[impl] = Family(m, opt, name)
        self.base = base
        self.rec["optimizer"] = self.families["fastmae"].opt_name
        self.rec["params"] = sum(p.numel() for p in base.parameters() if p.requires_grad)
        numeric_batch = self.batch if isinstance(self.batch, int) else None

        # The check reference: HF eager on the check batch, before any optimizer step.
        ref = None
        if numeric_batch is not None:
            self.shared_inputs = make_inputs(numeric_batch, self._img, self.flops["L"], args.pool, device, args.seed)
            hf_ref = Runner(VARIANTS["hf_eager"], hf, hf, self.families["hf"].opt, device, amp=self._amp)
            ref = check_step(hf_ref, *self.shared_inputs[0])
            self.rec["check_reference"] = {"loss": ref["loss"].item(), "grad_norm": ref["grad_norm"]}

        compile_estimates: list[float] = []
        for v in self.variants:
            vr = self._vrec(v)
            reason = why_skip(v, device, args)
            if reason:
                vr.update(status="skipped", reason=reason)
                continue
            if v.compile:
                # The first compile is tried whenever time is left before the timing reserve (the
                # stage's own timeout guards it); later ones only when the longest compile measured
                # so far in this setting would still fit.
                est = max(compile_estimates, default=0.0)
                if time.monotonic() + est > self.deadline - self._timing_reserve:
                    vr.update(status="skipped", reason=f"time budget (compile estimated {est:.0f} s)")
                    continue
            try:
                self._setup_variant(v, vr, ref)
            except torch.OutOfMemoryError as e:
                vr.update(status="oom", reason=str(e).splitlines()[0])
                self._drop(v)
            except Exception as e:  # a variant that breaks is recorded, the others still run
                vr.update(status="failed", reason=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc())
                self._drop(v)
            else:
                if v.compile and vr.get("compile_s"):
                    compile_estimates.append(vr["compile_s"])
            self.save()
        del ref
        free_memory()

    @property
    def _img(self) -> int:
        return model_kwargs(self.model)["img_size"]

    @property
    def _amp(self) -> bool:
        return self.device.type == "cuda" and not self.args.no_amp

    @property
    def _timing_reserve(self) -> float:
        if not self.args.time_budget:
            return 0.0
        if self.args.timing_reserve is not None:
            return self.args.timing_reserve
        return 0.2 * self.args.time_budget

    def _drop(self, v: Variant) -> None:
        self.runners.pop(v.name, None)
        self.inputs.pop(v.name, None)
        for fam in getattr(self, "families", {}).values():
            fam.opt.zero_grad(set_to_none=True)
        free_memory()

    def _setup_variant(self, v: Variant, vr: dict[str, Any], ref: dict[str, Any] | None) -> None:
        args, device = self.args, self.device
        gb0, ug0 = graph_breaks(), unique_graphs()
        r = build_runner(v, self.families, self.base, device, args)
        vr["attn_backend"] = getattr(r.eager, "attn_backend", "sdpa (HF)")
        if getattr(r.eager, "decoder_attn_backend", vr["attn_backend"]) != vr["attn_backend"]:
            vr["decoder_attn_backend"] = r.eager.decoder_attn_backend
        if v.impl == "fastmae":  # what "auto" became: the memory check compares with that count
            vr["activation_checkpointing"] = r.eager.activation_checkpointing
            vr["residual_dtype"] = r.eager.residual_dtype
        if v.compile:
            vr["compile_backend"] = args.compile_backend
        vr["optimizer"] = self.families[v.impl].opt_name
        if isinstance(self.batch, int):
            batch, inputs = self.batch, self.shared_inputs
        else:
            batch, inputs = self._search_batch(v, r, vr)
            if batch is None:  # every try ran out of memory, or the time ran out before any
                if vr.get("max_batch_tries"):
                    vr.update(status="oom", reason="no batch size fit")
                else:
                    vr.update(status="skipped", reason="time budget (no batch size tried)")
                return
        vr["batch"] = batch

        common.synchronize(device)
        t0 = time.perf_counter()
        out = check_step(r, *inputs[0])
        common.synchronize(device)
        vr["first_step_s"] = time.perf_counter() - t0
        if ref is not None:
            vr["check"] = compare(out, ref)
        del out
        if v.compile:
            vr["graph_breaks"] = graph_breaks() - gb0
            # 0: same-shaped, same-switch instance's graph reused (parameters are graph inputs)
            vr["new_graphs"] = unique_graphs() - ug0

        self.runners[v.name] = r
        self.inputs[v.name] = inputs
        vr["status"] = "checked"
        if isinstance(self.batch, int):
            vr["compile_s"] = vr["first_step_s"] if v.compile else 0.0  # refined once a steady step is timed
        else:
            vr["compile_s"] = None  # the search compiled it at every batch it tried

    def warm_up(self) -> None:
        """Warm-up steps of every built variant (a CUDA-graph variant records here); memory measured on them.

        Runs after every variant's check, since the optimizer steps here change the shared weights.
        The optimizer state is created first, outside the measured steps, so that the first variant
        of each family is not charged for it twice (as state and as a rise within its step).
        """
        for fam in self.families.values():
            init_optimizer_state(fam.opt)
        for name in list(self.runners):
            r, v = self.runners[name], self.runners[name].variant
            vr = self.rec["variants"][name]
            try:
                rise = measure_step_memory(r, self.inputs[name], max(self.args.warmup, 3 if v.cudagraphs else 1))
            except Exception as e:
                status = "oom" if isinstance(e, torch.OutOfMemoryError) else "failed"
                vr.update(status=status, reason=f"in warm-up: {type(e).__name__}: {e}"[:2000])
                self._drop(v)
                continue
            fam = self.families[v.impl]
            input_bytes = sum(t.numel() * t.element_size() for pair in self.inputs[name] for t in pair)
            if self.device.type == "cuda":
                state = state_bytes(fam.model, fam.opt)
                peak = state + input_bytes + rise
                vr["memory"] = {
                    "peak_bytes": peak,
                    "peak_gib": peak / 2**30,
                    "step_rise_bytes": rise,
                    "state_bytes": state,
                    "input_bytes": input_bytes,
                    "definition": "params + optimizer state + input pool + largest in-step rise of allocated memory",
                }
            vr["status"] = "ready"
            self.save()

    def _search_batch(self, v: Variant, r: Runner, vr: dict[str, Any]) -> tuple[int | None, list]:
        """The largest batch that fits this variant (``--batch max``); its inputs at that batch."""
        args, device = self.args, self.device
        L = self.flops["L"]

        def fits(b: int) -> bool:
            inputs = None
            try:
                inputs = make_inputs(b, self._img, L, args.pool, device, args.seed)
                for i in range(2):
                    r.step(*inputs[i % len(inputs)])
                common.synchronize(device)
                return True
            except torch.OutOfMemoryError:
                return False
            finally:
                del inputs
                r.opt.zero_grad(set_to_none=True)
                free_memory()

        predicted = None
        per_image = self.mem_per_image.get(v.name)
        if per_image and device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            free = total * args.max_batch_memory_fraction - torch.cuda.memory_allocated()
            predicted = int(free / per_image)
            vr["max_batch_predicted"] = predicted
        deadline = min(self.deadline - self._timing_reserve, time.monotonic() + args.max_batch_seconds)
        batch, tries = common.find_max_batch(
            fits, args.max_batch_start, args.max_batch_cap, args.max_batch_granularity, deadline, predicted
        )
        vr["max_batch_tries"] = tries
        if batch is None:
            return None, []
        return batch, make_inputs(batch, self._img, L, args.pool, device, args.seed)

    # -- timing

    def time_rounds(self) -> None:
        names = [n for n in self.runners]
        if not names:
            self.rec["status"] = "no variant ran"
            return
        times: dict[str, list[float]] = {n: [] for n in names}
        timer = common.StepTimer(self.device)
        rounds_done = 0
        for rnd in range(self.args.rounds):
            t_round = time.monotonic()
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            failed: list[str] = []
            for n in order:
                r, inputs = self.runners[n], self.inputs[n]
                try:
                    for s in range(self.args.steps):
                        imgs, noise = inputs[s % len(inputs)]
                        t = timer.start()
                        r.step(imgs, noise)
                        timer.stop(t)
                    times[n].extend(timer.elapsed_ms())
                except torch.OutOfMemoryError as e:
                    timer.elapsed_ms()
                    self.rec["variants"][n].update(status="oom", reason=f"in timing: {str(e).splitlines()[0]}")
                    failed.append(n)
                except Exception as e:
                    timer.elapsed_ms()
                    self.rec["variants"][n].update(
                        status="failed",
                        reason=f"in timing: {type(e).__name__}: {e}"[:2000],
                        traceback=traceback.format_exc(),
                    )
                    failed.append(n)
            for n in failed:
                names.remove(n)
                self.runners.pop(n)
                free_memory()
            rounds_done += 1
            self._fill(times, rounds_done)
            self.save()
            elapsed = time.monotonic() - t_round
            if time.monotonic() + elapsed > self.deadline:
                self.rec["timing_note"] = f"stopped after {rounds_done} rounds: time budget"
                break
        self.rec["status"] = "done"
        self.save()

    def _fill(self, times: dict[str, list[float]], rounds_done: int) -> None:
        gemm = self.rec.get("_gemm_tflops")
        for n, ts in times.items():
            if not ts:
                continue
            vr = self.rec["variants"][n]
            batch = vr["batch"]
            s = common.summarize_ms(ts)
            img_s = batch / (s["median"] / 1e3)
            tflops = img_s * self.flops["train"] / 1e12
            vr.update(
                status="ok",
                rounds=rounds_done,
                step_ms=s,
                img_s=img_s,
                img_s_mean=batch * len(ts) / (sum(ts) / 1e3),
                achieved_tflops=tflops,
                mfu_vs_measured_gemm=tflops / gemm if gemm else None,
                mfu_vs_datasheet=tflops / self.rec["_datasheet"] if self.rec.get("_datasheet") else None,
                mfu_vs_h100_sxm_datasheet=tflops / common.H100_SXM_BF16_TFLOPS,
            )
            if vr.get("first_step_s") is not None and vr["spec"]["compile"] and isinstance(self.batch, int):
                vr["compile_s"] = max(vr["first_step_s"] - s["median"] / 1e3, 0.0)
        self._ratios()

    def _ratios(self) -> None:
        ratios(self.rec["variants"])

    def profile(self) -> None:
        """``--profile``: a few profiled steps of the named variants that ran, after the timing."""
        from benchmarks import profile_step

        for name in self.args.profile or []:
            r, vr = self.runners.get(name), self.rec["variants"].get(name, {})
            if r is None or self.args.profile_steps <= 0:
                continue
            if time.monotonic() + 10 > self.deadline:
                vr["profile"] = {"skipped": "time budget"}
                break
            inputs = self.inputs[name]
            it = iter(range(1 << 30))

            def one_step(r: Runner = r, inputs: list = inputs, it=it) -> None:
                r.step(*inputs[next(it) % len(inputs)])

            try:
                median = (vr.get("step_ms") or {}).get("median")
                vr["profile"] = profile_step.profile_steps(one_step, self.args.profile_steps, self.device, median)
                print("  " + profile_step.markdown(name, vr["profile"]), flush=True)
            except Exception as e:  # a profiler failure must not lose the timings
                vr["profile"] = {"failed": f"{type(e).__name__}: {e}"[:500]}
            self.save()

    def close(self) -> None:
        self.runners.clear()
        self.inputs.clear()
        self.families.clear()
        self.base = None
        self.shared_inputs = []
        torch._dynamo.reset()
        free_memory()

    def mem_per_image_estimates(self) -> dict[str, float]:
        """Bytes per image of each variant (step rise + inputs over its batch, +5%): the linear model for ``--batch max``."""
        out = {}
        for n, vr in self.rec["variants"].items():
            mem = vr.get("memory")
            if mem and vr.get("batch"):
                out[n] = (mem["step_rise_bytes"] + mem["input_bytes"]) / vr["batch"] * 1.05
        return out


# ---------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_base_patch16", "vit_large_patch16"], choices=[*SHAPES, "tiny"])
    p.add_argument("--batch", nargs="+", default=["256"], help="batch sizes; 'max' searches each variant's largest")
    p.add_argument("--variants", nargs="+", default=["main"], help="names or groups (main, ablations, all)")
    p.add_argument("--list-variants", action="store_true", help="print every variant and group, then exit")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps per variant after its first (compile) step")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--pool", type=int, default=2, help="distinct input batches cycled")
    p.add_argument("--out", type=Path, help="results JSON (written after every variant and round)")
    p.add_argument("--table", type=Path, help="also write the markdown table here")
    p.add_argument("--plot", type=Path, help="also write the PNG bar chart here")
    p.add_argument("--tiny", action="store_true", help="tiny model, few steps: a harness smoke test (CPU ok)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast (always off on CPU)")
    p.add_argument("--cpu-compile", action="store_true", help="run the compiled variants on CPU too")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (e.g. aot_eager for a smoke)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later variants and rounds are dropped")
    p.add_argument(
        "--timing-reserve", type=float, default=None, help="seconds of the budget kept for timing (default 20%%)"
    )
    p.add_argument("--no-ceilings", action="store_true", help="skip the GEMM / copy ceilings")
    p.add_argument(
        "--profile",
        nargs="*",
        default=[],
        metavar="VARIANT",
        help="after the timing, profile these variants' steps: device time by kernel category, top kernels",
    )
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps per variant")
    p.add_argument("--max-batch-start", type=int, default=256)
    p.add_argument("--max-batch-cap", type=int, default=4096)
    p.add_argument("--max-batch-granularity", type=int, default=32)
    p.add_argument("--max-batch-seconds", type=float, default=120.0, help="search time per variant")
    p.add_argument("--max-batch-memory-fraction", type=float, default=0.92)
    args = p.parse_args(argv)
    if args.tiny:
        args.models = ["tiny"]
        if args.batch == ["256"]:
            args.batch = ["4"]
        args.steps = min(args.steps, 2)
        args.warmup = min(args.warmup, 1)
        args.rounds = min(args.rounds, 2)
        args.max_batch_start, args.max_batch_cap, args.max_batch_granularity = 2, 8, 2
    return args


def ceilings(device: torch.device, tiny: bool) -> dict[str, Any]:
    if device.type == "cuda" and not tiny:
        gemm, copy = common.gemm_peak(device), common.copy_bandwidth(device)
    else:  # harness check only: sizes a CPU finishes at once
        gemm = common.gemm_peak(device, n=256, dtype=torch.float32, reps=3)
        copy = common.copy_bandwidth(device, nbytes=1 << 22, reps=3)
    return {"gemm": gemm, "copy": copy}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list_variants:
        print("\n".join(f"{v.name:26s} {v.about}" for v in VARIANTS.values()))
        print("\n".join(f"group {g}: {' '.join(names)}" for g, names in GROUPS.items()))
        raise SystemExit(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # before the first @triton.jit: fastmae.kernels imports lazily, at the first fused forward
        os.environ.setdefault("TRITON_INTERPRET", "1")
    with dynamo_settings():
        return _main(args, argv, device)


def _main(args: argparse.Namespace, argv: list[str], device: torch.device) -> dict[str, Any]:
    t_start = time.monotonic()
    deadline = t_start + args.time_budget if args.time_budget else math.inf
    variants = resolve_variants(args.variants)

    report: dict[str, Any] = {
        "benchmark": "bench_step",
        "schema": 1,
        "tiny": args.tiny,
        "timings_meaningful": device.type == "cuda" and not args.tiny,
        "env": common.environment(argv, script=__file__),
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("table", "plot")
        },
        "step": "forward + backward + fused AdamW step; bf16 autocast on CUDA; synthetic fp32 images on device",
        "mask_ratio": MASK_RATIO,
        "norm_pix_loss": True,
        "settings": [],
    }

    def save() -> None:
        if args.out:
            common.write_json(args.out, report_mod.public(report))

    if not args.no_ceilings:
        report["ceilings"] = ceilings(device, args.tiny)
        report["ceilings"]["datasheet_bf16_tflops"] = report["env"]["device"].get("datasheet_bf16_tflops")
        report["ceilings"]["h100_sxm_bf16_tflops"] = common.H100_SXM_BF16_TFLOPS
        g = report["ceilings"]["gemm"]
        print(
            f"ceilings: {g['dtype']} GEMM {g['n']}^3 {g['tflops']:.1f} TFLOP/s, copy {report['ceilings']['copy']['gbps']:.0f} GB/s"
        )
    save()

    for model in args.models:
        mem_model: dict[str, float] = {}
        for b in args.batch:
            batch: int | str = b if b == "max" else int(b)
            setting = Setting(model, batch, variants, args, device, report, save, deadline, mem_model)
            ceil = report.get("ceilings", {})
            setting.rec["_gemm_tflops"] = ceil.get("gemm", {}).get("tflops")
            setting.rec["_datasheet"] = ceil.get("datasheet_bf16_tflops")
            try:
                setting.setup()
                setting.warm_up()
                setting.time_rounds()
                setting.profile()
                mem_model = setting.mem_per_image_estimates()
            finally:
                setting.close()
            save()
            print(report_mod.console_summary(setting.rec))

    report["wall_s"] = time.monotonic() - t_start
    save()
    if args.table or args.plot:
        if args.table:
            args.table.write_text(report_mod.markdown([report_mod.public(report)]) + "\n")
        if args.plot:
            report_mod.bar_chart([report_mod.public(report)], args.plot)
    return report_mod.public(report)


if __name__ == "__main__":
    main()
