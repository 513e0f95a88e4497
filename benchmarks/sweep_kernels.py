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

# op: (index of rows-per-program, index of num_warps in its _launch_config tuple, candidates).
SWEEP: dict[str, tuple[int, int, list[tuple[int, int]]]] = {
    "patch_gather": (0, 2, [(4, 4), (8, 4), (16, 4), (32, 4), (16, 8), (32, 8), (64, 8)]),
    "encoder_input": (0, 2, [(1, 4), (2, 4), (4, 4), (8, 4), (4, 8), (8, 8), (16, 8)]),
    "unshuffle": (0, 2, [(2, 4), (4, 4), (8, 4), (16, 4), (8, 8), (16, 8), (32, 8)]),
    "masked_mse": (2, 3, [(1, 4), (2, 4), (4, 4), (2, 8), (4, 8), (8, 8), (16, 16)]),
}


@contextlib.contextmanager
def launch_config(op: str, block_r: int | None = None, num_warps: int | None = None) -> Iterator[dict]:
    """Within: ``op`` launches with its GPU configuration (on any device), rows / warps replaced.

    Yields a dict that holds, once the op has launched, the (rows, warps) its own rule chose.
    """
    module = importlib.import_module(f"fastmae.kernels.{op}")
    r_at, w_at, _ = SWEEP[op]
    original = module._launch_config
    seen: dict[str, tuple[int, int]] = {}

    def gpu_config(*args):  # every _launch_config takes the device last
        cfg = list(original(*args[:-1], torch.device("cuda")))
        seen.setdefault("rule", (cfg[r_at], cfg[w_at]))
        if block_r is not None:
            cfg[r_at] = block_r
        if num_warps is not None:
            cfg[w_at] = num_warps
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
    benches = bk.build_benches(name, dims, batch, 0.75, torch.bfloat16, device, compile_ref=False)
    rows = []
    for b in benches:
        if ops and b.op not in ops:
            continue
        rule = None
        for block_r, num_warps in [(None, None), *SWEEP[b.op][2]]:  # the launcher's own rule first
            if rule == (block_r, num_warps):
                continue
            row: dict[str, object] = {"op": b.op, "model": name, "shape": b.shape}
            with launch_config(b.op, block_r, num_warps) as chosen:
                row["rel_err_vs_eager"] = _rel_err(b.run["triton"](), b.run["eager"]())
                rule = rule or chosen["rule"]
                block_r, num_warps = (block_r, num_warps) if block_r else rule
                row.update(rows=block_r, warps=num_warps, default=rule == (block_r, num_warps))
                # fwd+bwd only (the goal's phase; patch_gather's is its forward), GPU time only:
                # ~30 configurations, each compiled once, fit a minute.
                fn = bk.phase_fn(b, "triton", "fwd+bwd")
                ms = bk.gpu_time_ms(fn) if device == "cuda" else bk.time_ms(fn, device, smoke)
                gbps = b.min_bytes["fwd+bwd"] / ms / 1e6
                row["fwd+bwd"] = {"ms": ms, "gbps": gbps, "pct_of_copy": 100 * gbps / copy_gbps}
            rows.append(row)
            t = row.get("fwd+bwd") or {}
            print(
                f"{b.op:14s} rows {block_r:3d} warps {num_warps:2d}{' (rule)' if row['default'] else '       '}  "
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
        "rows": sweep(device, args.smoke, copy["gbps"], args.ops),
    }
    if args.out:
        common.write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
