"""Triton ops for MAE's memory-bound steps, each with its fp32 ``*_ref`` beside it.

Installed as ``fastmae.kernels``; imports only torch and triton.

One package, one name. This directory is also importable as a top-level ``kernels`` wherever the
repository root is on ``sys.path`` (pytest, ``python -m`` from the checkout), and transformers
imports ``kernels`` to probe for Hugging Face's kernel hub. Executed a second time under that name,
each op module would register its ``fastmae::`` ops again; torch.library then drops the first
registration, and ``fastmae.kernels``' ops call freed dispatcher entries (a heap use-after-free:
crashes, ``bad_alloc`` or ``vector::reserve`` errors, at random, long after the import). So under
any other name this package hands over to ``fastmae.kernels``, submodules included, and nothing is
registered twice.
"""

import importlib
import sys

_SUBMODULES = ("_utils", "attention", "encoder_input", "masked_mse", "patch_gather", "unshuffle")
_CANONICAL = "fastmae.kernels"

if __name__ != _CANONICAL:
    try:
        _package = importlib.import_module(_CANONICAL)
    except ModuleNotFoundError as e:  # not installed: this copy is the only one, nothing to hand over to
        if e.name not in ("fastmae", _CANONICAL):
            raise
        _package = None
    if _package is not None:
        sys.modules[__name__] = _package
        for _name in _SUBMODULES:
            sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"{_CANONICAL}.{_name}")

from .attention import attention, attention_ref  # noqa: E402
from .encoder_input import encoder_input, encoder_input_ref  # noqa: E402
from .masked_mse import masked_mse, masked_mse_ref  # noqa: E402
from .patch_gather import patch_gather, patch_gather_ref  # noqa: E402
from .unshuffle import unshuffle, unshuffle_ref  # noqa: E402

__all__ = [
    "attention",
    "attention_ref",
    "encoder_input",
    "encoder_input_ref",
    "masked_mse",
    "masked_mse_ref",
    "patch_gather",
    "patch_gather_ref",
    "unshuffle",
    "unshuffle_ref",
]
