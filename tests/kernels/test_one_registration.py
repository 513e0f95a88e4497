"""The ops are registered once, whatever name the kernels package is imported under.

From the repository root, ``kernels/`` is also a top-level package ``kernels``, and transformers
imports ``kernels`` when it probes for Hugging Face's kernel hub (``is_kernels_available``). Before
``kernels/__init__.py`` handed that name over to ``fastmae.kernels``, the probe re-ran every
``triton_op`` registration; torch.library dropped the first ones, and ``fastmae.kernels``' ops then
called freed dispatcher entries. AddressSanitizer showed the heap use-after-free (freed in
``c10::Dispatcher::cleanup``); without it, an op call crashed at random much later (``bad_alloc``,
``vector::reserve``, a segfault), in about one test run in ten.

In a subprocess started in the repository root, as pytest and ``python -m`` run: the test bed's
process has imported the kernels already, and a second registration here would break the tests
that follow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys

import torch

import fastmae.kernels as fk
from fastmae.kernels import patch_gather, patch_gather_ref

from transformers.utils.import_utils import is_kernels_available  # the probe that imports `kernels`

hub = is_kernels_available()
import kernels
import kernels.masked_mse

dev = "cuda" if torch.cuda.is_available() else "cpu"
imgs = torch.randn(2, 3, 16, 16, device=dev)
ids = torch.tensor([[0, 3], [2, 1]], device=dev)
out = [torch.equal(patch_gather(imgs, ids, 8), patch_gather_ref(imgs, ids, 8)) for _ in range(20)]
json.dump({
    "top_level_is_canonical": kernels is fk and sys.modules["kernels"] is fk,
    "submodule_is_canonical": kernels.masked_mse is fk.masked_mse,
    "kernels_modules": sorted(m for m in sys.modules if m == "kernels" or m.startswith("kernels.")),
    "hub_kernels_available": hub,
    "op_results_equal": all(out),
}, sys.stdout)
"""


def test_kernels_imported_under_two_names_register_once():
    # the interpreter for CPU tensors only: on a GPU machine the subprocess runs the compiled kernels
    interpret = "0" if torch.cuda.is_available() else "1"
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", interpret)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rep = json.loads(proc.stdout)
    assert rep["top_level_is_canonical"], rep
    assert rep["submodule_is_canonical"], rep
    # transformers still finds no kernel hub: our package has no version, as before
    assert rep["hub_kernels_available"] is False
    assert rep["op_results_equal"]
