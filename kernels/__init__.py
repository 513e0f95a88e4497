"""Triton ops for MAE's memory-bound steps, each with its fp32 ``*_ref`` beside it.

Installed as ``fastmae.kernels``; imports only torch and triton.
"""

from .encoder_input import encoder_input, encoder_input_ref
from .masked_mse import masked_mse, masked_mse_ref
from .patch_gather import patch_gather, patch_gather_ref
from .unshuffle import unshuffle, unshuffle_ref

__all__ = [
    "encoder_input",
    "encoder_input_ref",
    "masked_mse",
    "masked_mse_ref",
    "patch_gather",
    "patch_gather_ref",
    "unshuffle",
    "unshuffle_ref",
]
