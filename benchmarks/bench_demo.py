"""The README's first command, timed: ``python -m fastmae.train`` with no arguments, as a new user runs it.

Twice, each in a fresh working directory: first with an empty cache (the demo image set is
generated, as on first use), then with the set cached (every later run). The wall time of each
process (interpreter start and imports included), its summary's loss line, and the machine. JSON out.

    python benchmarks/bench_demo.py --out benchmarks/results/<date>_cpu_demo.json
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as a script: the repo root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import common

DONE = re.compile(r"done: step (\d+) in ([\d.]+) min; loss ([\d.]+) -> ([\d.]+)")


def run_demo(cwd: Path, cache: Path, extra: list[str], timeout: float) -> dict:
    """One ``python -m fastmae.train [extra]`` in ``cwd`` with ``FASTMAE_CACHE=cache``: wall time and summary."""
    env = {**os.environ, "FASTMAE_CACHE": str(cache), "PYTHONPATH": str(common.REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fastmae.train", *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the demo exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    m = DONE.search(proc.stdout)
    if m is None:
        raise RuntimeError(f"no summary line in the demo's output: {proc.stdout.strip()[-2000:]}")
    return {
        "wall_s": wall,
        "steps": int(m.group(1)),
        "train_min_reported": float(m.group(2)),
        "loss_first": float(m.group(3)),
        "loss_last": float(m.group(4)),
        "generated_images": "generating" in proc.stdout,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a run may take")
    p.add_argument("--smoke", action="store_true", help="a few steps only (the plumbing, for tests)")
    args = p.parse_args(argv)
    extra = (
        ["--max-steps", "2", "--log-every", "1", "--vis-every-epochs", "0", "--demo-images", "64"] if args.smoke else []
    )
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for name in ("first_use", "cached"):
            cwd = Path(tmp) / name
            cwd.mkdir()
            runs[name] = run_demo(cwd, cache, extra, args.timeout)
            print(f"{name}: {runs[name]['wall_s'] / 60:.2f} min, loss {runs[name]['loss_first']:.4f} -> "
                  f"{runs[name]['loss_last']:.4f}", flush=True)  # fmt: skip
    record = {
        "benchmark": "bench_demo",
        "env": common.environment(argv, script=__file__),
        "smoke": args.smoke,
        "runs": runs,
    }
    if args.out:
        common.write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
