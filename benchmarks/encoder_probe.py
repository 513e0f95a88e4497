"""Does a short fastmae pretraining give a better encoder than random init? Measured on CPU.

The data are real: scikit-learn's handwritten digits (1,797 8x8 scans in 10 classes, shipped inside
the package, no download), upsampled to 32x32 RGB PNGs in an ImageFolder tree. The steps:

1. pretrain a tiny MAE on all the images, labels unused (``python -m fastmae.train``);
2. evaluate its encoder and the same architecture at random init on a stratified 80 / 20 split:
   kNN (k = 20, cosine, as DINO) on global-pool and on cls-token features, and a linear probe
   (frozen encoder, BatchNorm + linear head, cls token).

Results go to a JSON file with the commands, commit, machine and versions. Needs scikit-learn
(``pip install scikit-learn``), which fastmae itself does not depend on.

    python benchmarks/encoder_probe.py --out benchmarks/results/<date>_cpu_encoder_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = [
    "--preset", "demo", "--img-size", "32", "--patch-size", "4", "--epochs", "30", "--warmup-epochs", "2",
    "--no-progress", "--log-every", "100",
]  # fmt: skip
EVALS = {
    "knn_avg": ["--mode", "knn", "--global-pool"],
    "knn_cls": ["--mode", "knn", "--no-global-pool"],
    "linear_cls": [
        "--mode",
        "linear",
        "--optimizer",
        "adamw",
        "--lr",
        "3e-3",
        "--epochs",
        "30",
        "--warmup-epochs",
        "3",
    ],
}


def write_digits(root: Path) -> Path:
    """scikit-learn's digits as ``root/<digit>/<index>.png``, 32x32 RGB (bicubic upsampling)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("encoder_probe.py needs scikit-learn for its data set: pip install scikit-learn")
    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (img / 16 * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.Resampling.BICUBIC).convert("RGB").save(folder / f"{i}.png")
    return root


def run(cmd: list[str], cwd: Path) -> str:
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode:
        sys.exit(f"failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--workdir", default="", help="where data and runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fastmae-probe-"))
    data = write_digits(work / "digits")
    py = sys.executable

    t0 = time.time()
    pre_cmd = [py, "-m", "fastmae.train", *PRETRAIN, "--data-path", str(data), "--run-dir", str(work / "pretrain")]
    run(pre_cmd, work)
    pretrain_minutes = (time.time() - t0) / 60
    metrics = [json.loads(line) for line in (work / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    ckpt = sorted((work / "pretrain").glob("ckpt-*.pt"))[-1]

    results: dict[str, dict[str, float]] = {}
    commands = {"pretrain": " ".join(pre_cmd[1:])}
    for name, extra in EVALS.items():
        for init in ("pretrained", "random"):
            cmd = [py, "-m", "fastmae.finetune", *extra, "--init", init, "--pretrained", str(ckpt),
                   "--train-path", str(data), "--run-dir", str(work / f"{name}-{init}"), "--batch-size", "128",
                   "--num-workers", "2", "--no-progress"]  # fmt: skip
            run(cmd, work)
            out = json.loads((work / f"{name}-{init}" / "results.json").read_text())
            results.setdefault(name, {})[init] = out["top1"]
            commands[f"{name}-{init}"] = " ".join(cmd[1:])

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    import torch

    record = {
        "what": "top-1 % on a stratified 20% split of scikit-learn digits (32x32), pretrained vs random init",
        "results_top1": results,
        "pretrain": {
            "minutes": round(pretrain_minutes, 2),
            "steps": metrics[-1]["step"],
            "loss_first": metrics[0]["loss"],
            "loss_last": metrics[-1]["loss"],
        },  # fmt: skip
        "commands": commands,
        "commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{'evaluation':<12} {'pretrained':>11} {'random':>8}")
    for name, r in results.items():
        print(f"{name:<12} {r['pretrained']:>10.2f}% {r['random']:>7.2f}%")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
