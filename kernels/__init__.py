"""Triton ops for MAE's memory-bound steps, each with its fp32 ``*_ref`` beside it.

Installed as ``fastmae.kernels``; imports only torch and triton.
"""
