"""Each kernel's launch configuration, timed on the GPU: what its launch heuristic should pick.

The launchers size their tiles by a fixed rule (``_launch_config`` in each op module: rows per
program and warps). Whether those are the fast choices is a measurement: here each op runs at
ViT-B shapes (batch 256, bf16) with its GPU configuration and the rows-per-program / warps of
``SWEEP`` in its place, checked against the eager reference, then its forward+backward timed as
``bench_kernels.py`` times GPU work (CUDA-graph replays, L2 flushed; GB/s and % of a copy measured
in the same run). Writes JSON.

    python benchmarks/sweep_kernels.py --out sweep.json
    python benchmarks/sweep_kernels.py --smoke          # CPU (interpreter): the harness only

``launch_config`` is also what the CPU tests use to run every configuration here under the
interpreter (``tests/kernels/test_launch_configs.py``), so no configuration is timed that is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

try:
    from benchmarks import bench_kernels as bk
except ModuleNotFoundError:  # run as a script: the repo root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import bench_kernels as bk
from benchmarks import common  # noqa: E402  (after the sys.path fallback above)

# op: (index of rows-per-program, index of num_warps in its _launch_config tuple, candidates:
# (rows, warps) or (rows, warps, *knobs): the op's further knobs (KNOBS) in order, None = the rule's).
SWEEP: dict[str, tuple[int, int, list[tuple[object, ...]]]] = {
    "patch_gather": (0, 2, [(4, 4), (8, 4), (16, 4), (32, 4), (16, 8), (32, 8), (64, 8)]),
    # The rule's one column block pads ViT-B's 768 to 1024 (a quarter of the lanes idle); 256-wide
    # blocks tile 512, 768 and 1024 exactly. The H200 run timed this op at 0.66x inductor's forward.
    "encoder_input": (
        0, 2, [(1, 4), (2, 4), (4, 4), (8, 4), (4, 8), (8, 8), (16, 8), (8, 2, 256), (16, 4, 256), (32, 8, 256)],
    ),
    # The backward's row loop pipelined (stages > 1): the H200 run put its backward near a quarter
    # of the copy's bandwidth, each program waiting for one tile's loads at a time.
    "unshuffle": (
        0, 2, [(2, 4), (4, 4), (8, 4), (16, 4), (8, 8), (16, 8), (32, 8), (16, 4, 256), (32, 8, 256),
               (8, 4, None, 2), (8, 4, None, 3), (16, 4, None, 3), (16, 8, None, 3), (32, 8, None, 2)],
    ),
    # the tile in pred's (p, q, c) order instead of the image's: pred and its grad contiguous; or
    # both read in their own order, the target moved to pred's on chip (tl.gather)
    "masked_mse": (
        2, 3, [(1, 4), (2, 4), (4, 4), (2, 8), (4, 8), (8, 8), (16, 16), (2, 4, "pred"), (4, 4, "pred"),
               (4, 8, "pred"), (8, 8, "pred"), (2, 4, "gather"), (4, 4, "gather"), (4, 8, "gather"),
               (8, 8, "gather")],
    ),
}  # fmt: skip
# Further knobs of some ops' _launch_config tuple: (its index, its name in the results) each.
KNOBS: dict[str, tuple[tuple[int, str], ...]] = {
    "encoder_input": ((1, "columns"),),
    "unshuffle": ((1, "columns"), (3, "stages")),
    "masked_mse": ((4, "order"),),
}


def candidates(op: str) -> list[tuple[int, int, tuple[object, ...]]]:
    """``op``'s swept configurations as (rows, warps, a value or None (the rule's) per knob)."""
    n = len(KNOBS.get(op, ()))
    return [(c[0], c[1], tuple(c[2:]) + (None,) * (n - len(c) + 2)) for c in SWEEP[op][2]]


def _knob_values(op: str, knob: object) -> tuple[object, ...]:
    """``knob`` as a value per knob of ``op``: a tuple as is, a single value for the first knob."""
    n = len(KNOBS.get(op, ()))
    if knob is None:
        return (None,) * n
    values = tuple(knob) if isinstance(knob, tuple) else (knob, *(None,) * (n - 1))
    if len(values) != n or (n == 0 and not isinstance(knob, tuple)):
        raise ValueError(f"{op} has {n} launch knob(s) ({', '.join(k for _, k in KNOBS.get(op, ()))}), got {knob!r}")
    return values


@contextlib.contextmanager
def launch_config(
    op: str, block_r: int | None = None, num_warps: int | None = None, knob: object = None
) -> Iterator[dict]:
    """Within: ``op`` launches with its GPU configuration (on any device), rows / warps / its further
    knobs (:data:`KNOBS`; ``knob``: a tuple with a value or None per knob, or the first knob's value)
    replaced where given.

    Yields a dict that holds, once the op has launched, the (rows, warps, knob values) its own rule
    chose.
    """
    module = importlib.import_module(f"fastmae.kernels.{op}")
    r_at, w_at, _ = SWEEP[op]
    knobs = KNOBS.get(op, ())
    values = _knob_values(op, knob)
    original = module._launch_config
    seen: dict[str, tuple[int, int, tuple[object, ...]]] = {}

    def gpu_config(*args):  # every _launch_config takes the device last
        cfg = list(original(*args[:-1], torch.device("cuda")))
        seen.setdefault("rule", (cfg[r_at], cfg[w_at], tuple(cfg[at] for at, _ in knobs)))
        if block_r is not None:
            cfg[r_at] = block_r
        if num_warps is not None:
            cfg[w_at] = num_warps
        for (at, _), value in zip(knobs, values, strict=True):
            if value is not None:
                cfg[at] = value
        return tuple(cfg)

    module._launch_config = gpu_config
    try:
        yield seen
    finally:
        module._launch_config = original


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def sweep(device: str, smoke: bool, copy_gbps: float, ops: list[str] | None = None) -> list[dict]:
    """Rows of (op, rows, warps, default?, error vs eager, fwd / bwd / fwd+bwd timings)."""
    name, dims = next(iter((bk.SMOKE_MODELS if smoke else {"vit_base_patch16": bk.MODELS["vit_base_patch16"]}).items()))
    batch = 2 if smoke else 256
    # bf16 activations, fp32 images: the trainer's step (its loaders deliver fp32 under autocast)
    benches = bk.build_benches(
        name, dims, batch, 0.75, torch.bfloat16, device, compile_ref=False, imgs_dtype=torch.float32
    )
    rows = []
    for b in benches:
        if ops and b.op not in ops:
            continue
        rule = None
        names = [name for _, name in KNOBS.get(b.op, ())]
        want = bk.detached_outputs(b, "eager")
        for cand in [(None, None, None), *candidates(b.op)]:  # the launcher's own rule first
            block_r, num_warps, knob = cand
            if rule is not None:  # the candidate in full, the rule's values where it has None
                knob = tuple(r if k is None else k for k, r in zip(knob, rule[2], strict=True))
                if (block_r, num_warps, knob) == rule:
                    continue
            row: dict[str, object] = {"op": b.op, "model": name, "shape": b.shape}
            with launch_config(b.op, block_r, num_warps, knob) as chosen:
                # forward output and grads: the interpreter does not pipeline, so a backward at
                # several stages is checked here, on the GPU, or nowhere
                got = bk.detached_outputs(b, "triton")
                row["rel_err_vs_eager"] = max(_rel_err(a, e) for a, e in zip(got, want, strict=True))
                rule = rule or chosen["rule"]
                if block_r is None:
                    block_r, num_warps, knob = rule
                row.update(rows=block_r, warps=num_warps, default=rule == (block_r, num_warps, knob))
                row.update(zip(names, knob, strict=True))
                # fwd+bwd (the goal's phase; patch_gather's is its forward), then the forward and
                # the backward alone where the op has one: the launchers take one configuration
                # for both passes, and the phases' fastest say whether one each would pay (the
                # loss's forward reads, its backward also writes a pred-sized grad). GPU time
                # only: ~50 configurations, each compiled once, fit two and a half minutes.
                for phase in ("fwd+bwd", "fwd", "bwd") if b.grad_out is not None else ("fwd+bwd",):
                    fn = bk.phase_fn(b, "triton", phase)
                    ms = bk.gpu_time_ms(fn) if device == "cuda" else bk.time_ms(fn, device, smoke)
                    gbps = b.min_bytes[phase] / ms / 1e6
                    row[phase] = {"ms": ms, "gbps": gbps, "pct_of_copy": 100 * gbps / copy_gbps}
            rows.append(row)
            t = row.get("fwd+bwd") or {}
            print(
                f"{b.op:14s} rows {block_r:3d} warps {num_warps:2d} "
                + " ".join(f"{n} {v}" for n, v in zip(names, knob, strict=True))
                + f"{' (rule)' if row['default'] else '       '}  "
                f"err {row['rel_err_vs_eager']:.1e}  "
                f"fwd+bwd {t.get('ms', float('nan')):8.4f} ms {t.get('pct_of_copy', float('nan')):5.1f}% of copy",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--ops", nargs="*", default=None, choices=sorted(SWEEP))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter): the harness only")
    args = p.parse_args(argv)
    device = bk.kernel_device(p, args.smoke)
    copy = bk.copy_bandwidth(device, args.smoke)
    record = {
        "benchmark": "sweep_kernels",
        "env": common.environment(argv, script=__file__),
        "copy": copy,
        "smoke": args.smoke,
        "rows": [],
    }
    for op in args.ops or list(SWEEP):  # written after each op: a run cut short keeps the ops it finished
        record["rows"] += sweep(device, args.smoke, copy["gbps"], [op])
        if args.out:
            common.write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
