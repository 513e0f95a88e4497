"""Data-loading throughput: DALI vs the PIL reference loader (vs torchvision's CUDA decoder).

Generates an ImageNet-like JPEG set (500 x 375, quality 90, ~105 kB per file, structured content
with grain; generated, never downloaded), then measures images per second delivered to the
training device by each backend with the full MAE augmentation (RandomResizedCrop 224, flip,
normalise, training dtype), after warm-up (pipeline build, worker start, first epoch pass) and after
the batches the loader holds ready (workers x prefetch) are drained untimed:

- ``dali``: DALI, ``device="mixed"`` decode on CUDA, CPU decode otherwise, with T threads, for
  each ``--dali-decoders`` setting: ``fancy`` (chroma interpolated as PIL does: the reference's
  rounding, the loader's default) or ``plain`` (nvJPEG's nearest chroma upsampling), each with an
  optional ``:share`` of JPEGs for the hardware decoder (A100/H100/H200; default 0.65);
- ``torch``: the DataLoader + PIL reference with N workers;
- ``tv_cuda``: ``torchvision.io.decode_jpeg(device="cuda")`` on batches of file bytes read on the
  host, then per-image resized crop + flip + normalise on the GPU (only with torchvision + CUDA);
- ``synthetic``: random batches already on the device (the ceiling of the harness itself).

Each configuration runs ``--repeats`` timed windows of ``--steps`` batches; the median img/s is
reported with all windows. JSON to ``--out``: git commit, machine, versions, exact command.

    python benchmarks/bench_data.py --out benchmarks/results/data_h100.json
    python benchmarks/bench_data.py --smoke --out /tmp/data_smoke.json   # tiny harness check
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

import torch

from fastmae.data import build_loader, dali_available, open_source
from fastmae.data.testdata import make_demo_dataset
from fastmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD, sample_params

REPO = Path(__file__).resolve().parent.parent
try:
    from benchmarks.report import data_row_name
except ModuleNotFoundError:  # run as a script: the repo root is not on sys.path
    sys.path.insert(0, str(REPO))
    from benchmarks.report import data_row_name


def _environment() -> dict[str, Any]:
    """The shared benchmark environment record when ``benchmarks/common.py`` exists, else a minimal one."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import environment  # type: ignore[import-not-found]

        env = environment()
    except Exception:

        def run(cmd: list[str]) -> str | None:
            try:
                return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return None

        env = {
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            # the sender's commit first, as common.git_info: the device copy's .git may be older
            "git": {"commit": os.environ.get("FASTMAE_COMMIT") or run(["git", "rev-parse", "HEAD"]) or "unknown"},
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "nvidia_smi": run(["nvidia-smi"]),
        }
        if torch.cuda.is_available():
            env["device"] = {"type": "cuda", "name": torch.cuda.get_device_name()}
        else:
            env["device"] = {"type": "cpu", "name": platform.processor() or platform.machine()}
    versions = env.setdefault("versions", {})
    for name in ("torch", "torchvision", "nvidia-dali-cuda130", "pillow", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    env["cpu_affinity"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _endless(loader):
    """Batches across epoch boundaries (each pass moves the loader to the next epoch)."""
    while True:
        yield from loader


def measure(
    batches, batch_size: int, device: torch.device, warmup: int, steps: int, repeats: int, drain: int = 0
) -> dict:
    """img/s of an iterator of ``(images, labels)``: warm-up, then ``repeats`` windows of ``steps``.

    ``drain`` batches are taken untimed after the warm-up: what the loader can hold ready
    (``buffered_batches``: workers x prefetch). While the warm-up waits for the first batch, every
    worker decodes in parallel, so that many batches are ready at once; a window that started on
    them would count images decoded before it began (16 workers hold 32 batches, more than a
    window of 8 or 10).
    """
    t0 = time.perf_counter()
    for _ in range(warmup):
        x, _ = next(batches)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    for _ in range(drain):
        x, _ = next(batches)
    windows = []
    checksum = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            x, _ = next(batches)
        _sync(device)
        windows.append(steps * batch_size / (time.perf_counter() - t))
        checksum += float(x[0, :, 0, 0].float().sum())  # touch the data, outside the window
    return {
        "img_per_s": statistics.median(windows),
        "windows_img_per_s": windows,
        "warmup_s": warmup_s,
        "drained_batches": drain,
        "checksum": checksum,
    }


def dali_host_feed(loader, batches: int = 4) -> dict[str, float]:
    """What DALI's feed costs the host per image, alone: reading the bytes (the loader's I/O
    threads, one batch ahead), parsing the header and drawing the crop window and flip. It runs on
    the thread that calls the pipeline (the training loop's), so a rate near the model's img/s
    would limit training whatever the decoders do. Timed on a scratch feeder (another epoch):
    wall time back to back (the feed's own ceiling, reads included) and the feeding thread's CPU
    time (what the training thread pays per image while the reads run ahead)."""
    from fastmae.data.dali import _Feeder

    feeder = _Feeder(loader, epoch=10_000, step=0)
    feeder()  # starts the I/O pool and the read-ahead
    t, cpu = time.perf_counter(), time.thread_time()
    for _ in range(batches):
        feeder()
    dt, dcpu = time.perf_counter() - t, time.thread_time() - cpu
    n = batches * loader.plan.batch_size
    return {
        "host_feed_us_per_img": 1e6 * dt / n,
        "host_feed_img_per_s": n / dt,
        "host_feed_thread_cpu_us_per_img": 1e6 * dcpu / n,
    }


def tv_cuda_batches(source, batch_size: int, image_size: int, dtype: torch.dtype, seed: int = 0):
    """torchvision's nvJPEG path: host file reads, batched ``decode_jpeg(device="cuda")``, GPU crop/resize."""
    import torchvision.transforms.v2.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import InterpolationMode

    from fastmae.data.sampling import EpochPlan, sample_generator

    plan = EpochPlan(len(source), batch_size, seed)
    mean = torch.tensor(IMAGENET_MEAN, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device="cuda").view(1, 3, 1, 1)
    for epoch in itertools.count():
        for step in range(plan.steps_per_epoch):
            idx = plan.batch_indices(epoch, step)
            data = [
                torch.frombuffer(bytearray(Path(source.samples[i][0]).read_bytes()), dtype=torch.uint8) for i in idx
            ]
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
            out = []
            for i, img in zip(idx, images, strict=True):
                p = sample_params(img.shape[1], img.shape[2], sample_generator(seed, epoch, int(i)))
                crop = F.resized_crop(
                    img,
                    p.top,
                    p.left,
                    p.height,
                    p.width,
                    [image_size, image_size],
                    antialias=True,
                    interpolation=InterpolationMode.BICUBIC,
                )
                out.append(crop.flip(-1) if p.flip else crop)
            x = (torch.stack(out).float().div_(255) - mean).div_(std)
            yield x.to(dtype), torch.tensor([source.samples[i][1] for i in idx], device="cuda")


def _have_tv_cuda() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import torchvision.io  # noqa: F401
    except Exception:
        return False
    return True


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "fastmae_bench_jpegs"))
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default="dali,torch,tv_cuda,synthetic")
    ap.add_argument("--workers", default=None, help="comma list of reference-loader workers (default: cpus, cpus/2)")
    ap.add_argument("--dali-threads", default=None, help="comma list of DALI CPU threads (default: cpus)")
    ap.add_argument(
        "--dali-decoders",
        default="fancy",
        help="comma list of DALI decoder settings: fancy | plain, optionally :HW_SHARE (e.g. fancy,plain,plain:0.9)",
    )
    ap.add_argument("--warmup", type=int, default=5, help="batches before timing")
    ap.add_argument("--steps", type=int, default=20, help="batches per timed window")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny set and batches: checks the harness only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.n_images, args.width, args.height = 48, 160, 120
        args.batch_size, args.image_size, args.warmup, args.steps, args.repeats = 8, 64, 1, 2, 1
        args.root = args.root + "_smoke"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = [int(w) for w in args.workers.split(",")] if args.workers else sorted({cpus, max(1, cpus // 2)})
    threads = [int(t) for t in args.dali_threads.split(",")] if args.dali_threads else [cpus]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    t = time.perf_counter()
    root = make_demo_dataset(
        args.root, args.n_images, (args.width, args.height), seed=0, quality=args.quality, noise=22, processes=cpus
    )
    gen_s = time.perf_counter() - t
    source = open_source(root)
    sizes = [os.path.getsize(p) for p in source.paths]
    result: dict[str, Any] = {
        "benchmark": "bench_data",
        "env": _environment(),
        "dataset": {
            "root": str(root),
            "n_images": len(source),
            "width": args.width,
            "height": args.height,
            "quality": args.quality,
            "mean_file_kB": sum(sizes) / len(sizes) / 1e3,
            "generate_s": gen_s,
        },
        "config": {k: v for k, v in vars(args).items() if k not in ("root", "out")},
        "results": [],
    }
    common = dict(batch_size=args.batch_size, image_size=args.image_size, device=device, dtype=dtype)
    try:
        decoders = [dali_decoder_options(d) for d in args.dali_decoders.split(",")]
    except ValueError as e:
        ap.error(str(e))
    runs: list[tuple[str, int | None, dict[str, Any]]] = []
    for backend in args.backends.split(","):
        if backend == "dali":
            if not dali_available():
                result["results"].append({"backend": "dali", "skipped": "DALI not installed"})
                continue
            runs += [("dali", n, d) for d in decoders for n in threads]
        elif backend == "torch":
            runs += [("torch", n, {}) for n in workers]
        elif backend == "tv_cuda":
            if not _have_tv_cuda():
                result["results"].append({"backend": "tv_cuda", "skipped": "needs torchvision and CUDA"})
                continue
            runs.append(("tv_cuda", None, {}))
        elif backend == "synthetic":
            runs.append(("synthetic", None, {}))
        else:
            ap.error(f"unknown backend {backend}")

    for backend, n, options in runs:
        row: dict[str, Any] = {"backend": backend, "workers": n, "device": str(device), "dtype": args.dtype}
        if options:
            row["dali_options"] = options
        loader = None
        try:
            if backend == "tv_cuda":
                batches = tv_cuda_batches(source, args.batch_size, args.image_size, dtype)
                loader = None
            else:
                loader = build_loader(backend, source, num_workers=n or 0, dali_options=options or None, **common)
                batches = _endless(loader)
            if backend == "dali":
                row["decode"] = "mixed (GPU)" if device.type == "cuda" else "cpu"
            drain = loader.buffered_batches if loader is not None else 0
            if backend == "dali":
                row.update(dali_host_feed(loader))
            row.update(measure(batches, args.batch_size, device, args.warmup, args.steps, args.repeats, drain))
        except Exception as exc:  # one backend failing must not lose the others' numbers
            row["error"] = f"{type(exc).__name__}: {exc}"
        finally:  # a failed backend's workers or pipeline must not hold the next one's CPUs and memory
            if loader is not None:
                loader.close()
        result["results"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "windows_img_per_s"}), flush=True)
        if args.out:
            _write(args.out, result)

    best = {}
    for row in result["results"]:
        if "img_per_s" in row:
            best[row["backend"]] = max(best.get(row["backend"], 0.0), row["img_per_s"])
    result["best_img_per_s"] = best
    if "dali" in best and "torch" in best:
        result["dali_over_best_torch"] = best["dali"] / best["torch"]
    if args.out:
        _write(args.out, result)
    print(f"\n{'backend':<24} {'workers':>7} {'img/s':>10}   (batch {args.batch_size}, {args.image_size} px, {device})")
    for row in result["results"]:
        rate = f"{row['img_per_s']:10.1f}" if "img_per_s" in row else row.get("skipped", row.get("error", ""))
        print(f"{data_row_name(row):<24} {row.get('workers') or '-':>7} {rate}")
    if "dali_over_best_torch" in result:
        print(f"DALI / best reference: {result['dali_over_best_torch']:.2f}x")
    return result


def dali_decoder_options(spec: str) -> dict[str, Any]:
    """``fancy`` | ``plain``, optionally ``:share`` -> DaliLoader arguments."""
    kind, _, share = spec.strip().partition(":")
    if kind not in ("fancy", "plain"):
        raise ValueError(f"DALI decoder setting {spec!r}: expected fancy or plain, optionally :HW_SHARE")
    options: dict[str, Any] = {"jpeg_fancy_upsampling": kind == "fancy"}
    if share:
        try:
            options["hw_decoder_load"] = float(share)
        except ValueError:
            raise ValueError(f"DALI decoder setting {spec!r}: the hardware share must be a number") from None
        if not 0.0 <= options["hw_decoder_load"] <= 1.0:
            raise ValueError(f"DALI decoder setting {spec!r}: the hardware share must be in [0, 1]")
    return options


def _write(path: str, obj: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, p)


if __name__ == "__main__":
    main()
