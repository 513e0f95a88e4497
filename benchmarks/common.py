"""Helpers the benchmarks share: the environment record, same-run ceilings, timing, JSON output.

Every results file should carry :func:`environment` (code version, versions, GPU, driver,
``nvidia-smi``, the exact command) and the ceilings measured in the same process
(:func:`gemm_peak`, :func:`copy_bandwidth`), so a number can be rerun and judged against the card.

Timing on CUDA uses events (no host clock around asynchronous work); on CPU a host clock, and CPU
numbers are only a harness check, never a result.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s. Matched on the
# device name in this order; the first hit wins. H200 has the H100 SXM's compute.
DATASHEET_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5 (HBM3), the card the project's goal names
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("A100", 312.0),
)
H100_SXM_BF16_TFLOPS = 989.4


def datasheet_bf16_tflops(device_name: str) -> float | None:
    """The datasheet dense bf16 peak for a device name, or None when it is not in the table."""
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


# ---------------------------------------------------------------------- environment


def _run(cmd: Sequence[str], timeout: float = 30.0) -> str | None:
    try:
        done = subprocess.run(list(cmd), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def git_info() -> dict[str, Any]:
    """Commit and dirty flag of the checkout.

    ``FASTMAE_COMMIT`` (and the dirty flag from ``FASTMAE_DIRTY``: ``0``/``1``), set by whoever sent
    the tree to the device machine, wins over the copy's own ``.git``: that copy may have none, or
    one older than the tree (on 2026-11-27 the H200's said 5ac384b + 8 changed files of a tree that
    was e01e201 exactly). What git saw there is kept as ``git_seen``; ``source`` says which counts.
    """
    commit = (_run(["git", "rev-parse", "HEAD"]) or "").strip()
    seen = None
    if commit:
        status = _run(["git", "status", "--porcelain", "--untracked-files=no"]) or ""
        changed = [line[3:] for line in status.splitlines() if line.strip()]  # "XY path"
        seen = {"commit": commit, "dirty": bool(changed), "changed": changed[:50], "source": "git"}
    env_commit = os.environ.get("FASTMAE_COMMIT")
    if not env_commit:
        return seen or {"commit": "unknown", "dirty": None, "changed": [], "source": "none"}
    dirty_env = os.environ.get("FASTMAE_DIRTY")
    out = {
        "commit": env_commit,
        "dirty": None if dirty_env is None else dirty_env not in ("0", "", "false"),
        "changed": [],
        "source": "FASTMAE_COMMIT",
    }
    if seen is not None:
        out["git_seen"] = seen
    return out


def package_versions(
    names: Sequence[str] = (
        "torch",
        "triton",
        "transformers",
        "timm",
        "torchvision",
        "xformers",
        "nvidia-dali-cuda130",
    ),
) -> dict:
    """Installed distribution versions (None when not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["torch_runtime"] = torch.__version__
    return out


def nvidia_smi() -> dict[str, Any]:
    """``nvidia-smi``'s text and a few queried fields (read-only queries; nothing is changed)."""
    text = _run(["nvidia-smi"])
    text = text.strip() if text else None
    fields = "name,driver_version,memory.total,power.limit,clocks.max.sm,clocks.sm,temperature.gpu,pstate"
    query = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"])
    parsed = dict(zip(fields.split(","), [v.strip() for v in query.split(",")], strict=False)) if query else {}
    return {"text": text, "query": parsed}


def environment(argv: Sequence[str] | None = None, script: str | None = None) -> dict[str, Any]:
    """What produced a result: code version, versions, device and the exact command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script = script or sys.argv[0]
    try:
        script = str(Path(script).resolve().relative_to(REPO))
    except ValueError:
        pass
    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, script, *argv]),
        "git": git_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": package_versions(),
        "env_vars": {
            k: os.environ[k]
            for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_CACHE_DIR", "PYTORCH_CUDA_ALLOC_CONF")
            if k in os.environ
        },
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["device"] = {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "total_memory_bytes": props.total_memory,
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "datasheet_bf16_tflops": datasheet_bf16_tflops(props.name),
        }
        smi = nvidia_smi()
        env["device"]["driver"] = smi["query"].get("driver_version")
        env["nvidia_smi"] = smi["text"]
        env["nvidia_smi_query"] = smi["query"]
    else:
        env["device"] = {"type": "cpu", "name": platform.processor() or platform.machine()}
    return env


# ---------------------------------------------------------------------- timing


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class StepTimer:
    """Times a sequence of steps without a host sync between them.

    On CUDA each step is bracketed by events and the times are read once, after
    :meth:`elapsed_ms` synchronises; on CPU a host clock is used.
    """

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._marks: list[tuple[Any, Any]] = []

    def start(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start: Any) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append((start, ev))
        else:
            self._marks.append((start, time.perf_counter()))

    def elapsed_ms(self) -> list[float]:
        """Milliseconds of each recorded step (synchronises once); clears the record."""
        if self.cuda:
            torch.cuda.synchronize()
            out = [a.elapsed_time(b) for a, b in self._marks]
        else:
            out = [(b - a) * 1e3 for a, b in self._marks]
        self._marks.clear()
        return out


def time_fn_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, reps: int = 20) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    timer = StepTimer(device)
    for _ in range(reps):
        t = timer.start()
        fn()
        timer.stop(t)
    return timer.elapsed_ms()


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_ms(times_ms: Sequence[float]) -> dict[str, float | int]:
    """Median, p10/p25/p75/p90, mean, min, max and count of a list of step times."""
    return {
        "n": len(times_ms),
        "median": statistics.median(times_ms),
        "p10": percentile(times_ms, 10),
        "p25": percentile(times_ms, 25),
        "p75": percentile(times_ms, 75),
        "p90": percentile(times_ms, 90),
        "mean": statistics.fmean(times_ms),
        "min": min(times_ms),
        "max": max(times_ms),
    }


# ---------------------------------------------------------------------- ceilings


def gemm_peak(
    device: torch.device | str, n: int = 8192, dtype: torch.dtype = torch.bfloat16, reps: int = 20
) -> dict[str, Any]:
    """A large square matmul's rate: the reachable tensor-core peak, in TFLOP/s.

    Random operands (never zeros: they run faster than real data), two input sets alternated so
    the timing is not of a cache-resident repeat. ``2 n^3`` FLOPs per product.
    """
    g = torch.Generator(device=device).manual_seed(0)
    sets = [
        (
            torch.randn(n, n, device=device, generator=g).to(dtype),
            torch.randn(n, n, device=device, generator=g).to(dtype),
        )
        for _ in range(2)
    ]
    out = torch.empty(n, n, device=device, dtype=dtype)
    pairs = itertools.cycle(sets)

    def run() -> None:
        a, b = next(pairs)
        torch.matmul(a, b, out=out)

    times = time_fn_ms(run, device, warmup=3, reps=reps)
    ms = statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "ms": ms, "tflops": 2 * n**3 / ms / 1e9, "reps": reps}


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, reps: int = 20) -> dict[str, Any]:
    """A device-to-device copy of a buffer far larger than L2; GB/s counts bytes read plus written."""
    numel = nbytes // 2
    src = torch.randn(numel, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    times = time_fn_ms(lambda: dst.copy_(src), device, warmup=3, reps=reps)
    ms = statistics.median(times)
    moved = 2 * src.numel() * src.element_size()
    return {"bytes_moved": moved, "ms": ms, "gbps": moved / ms / 1e6, "reps": reps}


# ---------------------------------------------------------------------- memory


def find_max_batch(
    fits: Callable[[int], bool],
    start: int,
    cap: int,
    granularity: int,
    deadline: float,
    predicted: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[int | None, list[tuple[int, bool]]]:
    """Largest batch (a multiple of ``granularity``) for which ``fits(batch)`` holds, within ``deadline``.

    From ``start``, doubling while it fits (up to ``cap``) and halving while it does not; or from
    ``predicted`` (a linear memory model's estimate) in steps of +12.5% / -10%. Then bisection between
    the largest batch that fit and the smallest that did not. Returns the batch (None when nothing
    fit) and the tries.
    """
    tries: list[tuple[int, bool]] = []

    def attempt(b: int) -> bool:
        ok = fits(b)
        tries.append((b, ok))
        return ok

    def snap(b: float) -> int:
        return max(granularity, int(b) // granularity * granularity)

    # a good prediction needs small steps; a blind start, doubling and halving
    grow, shrink = (1.125, 0.9) if predicted else (2.0, 0.5)
    b = snap(min(predicted or start, cap))
    lo: int | None = None
    hi: int | None = None
    while clock() < deadline:
        if attempt(b):
            lo = b
            nxt = snap(min(max(b * grow, b + granularity), cap))
            if hi is not None or nxt <= b:
                break
        else:
            hi = b
            nxt = snap(min(b * shrink, b - granularity))
            if lo is not None or b <= granularity:
                break
        b = nxt
    while lo is not None and hi is not None and hi - lo > granularity and clock() < deadline:
        mid = snap((lo + hi) // 2)
        if mid <= lo:
            break
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    return lo, tries


# ---------------------------------------------------------------------- output


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (a killed run leaves the previous file whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return sorted(obj) if isinstance(obj, (set, frozenset)) else list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.common --env-out env.json [NOTE ...]``: write and print the environment report."""
    import argparse

    p = argparse.ArgumentParser(description="Write the environment report (versions, GPU, commit) as JSON.")
    p.add_argument("--env-out", type=Path, required=True)
    p.add_argument("notes", nargs="*", help="recorded as the command's arguments")
    args = p.parse_args(argv)
    env = environment([str(a) for a in (argv if argv is not None else sys.argv[1:])], script=__file__)
    env["notes"] = args.notes
    write_json(args.env_out, env)
    print(env.get("nvidia_smi") or "no nvidia-smi")
    print(json.dumps({k: env[k] for k in ("git", "versions", "device", "python")}, indent=1))


if __name__ == "__main__":
    main()
