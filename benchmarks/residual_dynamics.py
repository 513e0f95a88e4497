"""Training with the residual stream in bf16 against float32, on the demo preset (CPU).

``--residual-dtype autocast`` changes rounding, so before anyone uses it the question is whether the
loss curve moves. Three runs of the embedded demo (same seed, data and masks): float32 without
autocast, bf16 autocast with the reference's float32 stream, and bf16 autocast with a bf16 stream.
The record holds each run's logged losses and how far the bf16 stream's curve is from the float32
stream's, next to how far autocast's is from float32's (the three-way rule: the option should add
about as much as autocast itself does). A tiny model for a few hundred steps: evidence about the
first part of training, not about 800 ImageNet epochs.

    python benchmarks/residual_dynamics.py --out benchmarks/results/<date>_cpu_residual_dynamics.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as a script: the repo root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import common

RUNS = {
    "fp32": ["--precision", "fp32"],
    "bf16": ["--precision", "bf16"],
    "bf16_residual_bf16": ["--precision", "bf16", "--residual-dtype", "autocast"],
}


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]


def curve_gap(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> dict[str, float]:
    """Relative gaps |a - b| / b at the logged steps both runs have: the largest, the mean, the last."""
    bs = dict(b)
    gaps = [abs(la - bs[s]) / abs(bs[s]) for s, la in a if s in bs]
    return {"max": max(gaps), "mean": sum(gaps) / len(gaps), "last": gaps[-1], "points": len(gaps)}


def main(argv: list[str] | None = None) -> int:
    from fastmae.train import main as train_main

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=256, help="optimizer steps a run")
    p.add_argument("--out", type=Path, default=None, help="JSON file")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more trainer arguments for every run")
    args = p.parse_args(argv)
    record: dict[str, Any] = {
        "benchmark": "residual_dynamics",
        "env": common.environment(argv, script=__file__),
        "steps": args.steps,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in RUNS.items():
            run_dir = Path(tmp) / name
            argv_run = ["--max-steps", str(args.steps), "--run-dir", str(run_dir), "--no-progress"]
            argv_run += ["--vis-every-epochs", "0", *flags, *args.extra]
            t0 = time.perf_counter()
            rc = train_main(argv_run)
            if rc:
                raise SystemExit(f"{name}: the trainer exited with {rc}")
            record["runs"][name] = {
                "flags": flags,
                "seconds": round(time.perf_counter() - t0, 1),
                "losses": losses(run_dir),
            }
    runs = record["runs"]
    record["gaps"] = {
        "bf16_vs_fp32": curve_gap(runs["bf16"]["losses"], runs["fp32"]["losses"]),
        "bf16_residual_bf16_vs_bf16": curve_gap(runs["bf16_residual_bf16"]["losses"], runs["bf16"]["losses"]),
        "bf16_residual_bf16_vs_fp32": curve_gap(runs["bf16_residual_bf16"]["losses"], runs["fp32"]["losses"]),
    }
    for name, gap in record["gaps"].items():
        print(
            f"{name:28s} max {gap['max']:.2e}  mean {gap['mean']:.2e}  last {gap['last']:.2e}  ({gap['points']} points)"
        )
    if args.out:
        common.write_json(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
