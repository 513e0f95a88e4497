"""Helpers the fine-tuning test modules share (their fixtures are in ``tests/conftest.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmae import finetune as ft

REPO = Path(__file__).resolve().parents[1]
ARCH = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=4.0)
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=4.0)


def color_classes(root, per_class: int = 24, size: int = 40):
    """An ImageFolder of 4 classes told apart by colour (noisy), learnable in a few dozen steps."""
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    for k, c in enumerate(colours):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(c) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{k}" / f"{i}.png")
    return root


def run_finetune(tmp_path, data, pre, mode, *extra):
    run_dir = tmp_path / f"run-{mode}"
    argv = ["--mode", mode, "--pretrained", str(pre), "--train-path", str(data), "--run-dir", str(run_dir),
            "--batch-size", "16", "--num-workers", "0", "--no-progress", "--log-every", "2", *extra]  # fmt: skip
    result = ft.finetune(ft.parse_args(argv))
    assert json.loads((run_dir / "results.json").read_text()) == pytest.approx(result)
    return result, run_dir
