"""fastmae data: sources, the MAE augmentation and three loaders behind one interface.

Public API::

    source = open_source(root, list_file=None, kind="auto")      # -> Source, or DataError
    loader = build_loader("dali" | "torch" | "synthetic", source, batch_size=B, image_size=224,
                          seed=0, rank=r, world_size=w, device="cuda", dtype=torch.bfloat16,
                          num_workers=8, report_dir=run_dir)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)                 # or loader.load_state_dict(saved) to resume
        for images, labels in loader:           # [B, 3, S, S] dtype on device, [B] int64
            ...
        saved = loader.state_dict()             # {"epoch", "step", ...}: exact resume point
    loader.close()                              # stops workers / I/O threads (or `with loader:`)

Determinism: the batch a rank gets at (epoch, step) is a pure function of (seed, epoch, step,
rank, world_size) and the source: see :mod:`fastmae.data.sampling` for the order, sharding
(drop-last global batches), per-sample augmentation seeds and the stand-in rule for bad files.
Resuming with ``set_epoch(epoch, start_step=k)`` or ``load_state_dict`` continues the exact
sequence without decoding the skipped batches. ``len(loader)`` is the steps per epoch.
Unreadable files are skipped (substituted deterministically), counted in
``loader.bad_files`` (a :class:`BadFileReport`) and written to ``report_dir/bad_files.txt``.
"""

from __future__ import annotations

import os

import torch

from fastmae.data.dali import DaliLoader, dali_available
from fastmae.data.randaugment import RandAugment
from fastmae.data.sampling import EpochPlan, sample_seed
from fastmae.data.sources import (
    IMAGE_EXTENSIONS,
    BadFileReport,
    DataError,
    ShardDataError,
    Source,
    file_list_source,
    folder_scan_source,
    image_folder_source,
    open_source,
)
from fastmae.data.synthetic import SyntheticLoader
from fastmae.data.testdata import make_demo_dataset
from fastmae.data.torch_loader import TorchLoader, usable_workers
from fastmae.data.transforms import CROP_SCALE, IMAGENET_MEAN, IMAGENET_STD, CropParams, rrc_params, sample_params

BACKENDS = ("dali", "torch", "synthetic")

Loader = DaliLoader | TorchLoader | SyntheticLoader


def build_loader(
    backend: str,
    source: Source | None,
    *,
    batch_size: int,
    image_size: int = 224,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 8,
    report_dir: str | os.PathLike | None = None,
    steps_per_epoch: int = 1000,
    dali_options: dict | None = None,
    scale: tuple[float, float] = CROP_SCALE,
    auto_augment: RandAugment | None = None,
) -> Loader:
    """One loader by backend name; ``num_workers`` is DataLoader workers or DALI threads.

    ``scale``: RandomResizedCrop's area bounds (MAE pretraining's (0.2, 1.0) by default).

    ``source`` may be None only for ``"synthetic"`` (which uses ``steps_per_epoch``; the real
    backends derive it from the source). ``dali_options``: more :class:`DaliLoader` arguments
    (``hw_decoder_load``, ``jpeg_fancy_upsampling``, ...).
    """
    if backend not in BACKENDS:
        raise DataError(f"unknown data backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    if backend == "synthetic":
        n = len(source) // (batch_size * world_size) if source is not None else steps_per_epoch
        return SyntheticLoader(
            batch_size, image_size, steps_per_epoch=n, seed=seed, rank=rank, device=device, dtype=dtype
        )
    if source is None:
        raise DataError(f"the {backend!r} backend needs a data source")
    common = dict(
        seed=seed, rank=rank, world_size=world_size, device=device, dtype=dtype, report_dir=report_dir, scale=scale
    )
    if backend == "torch":
        return TorchLoader(source, batch_size, image_size, num_workers=num_workers, auto_augment=auto_augment, **common)
    if auto_augment is not None:
        raise DataError(f"RandAugment runs in the torch loader (PIL), not the {backend!r} one: --data-backend torch")
    # DALI's CPU threads, at most the CPUs this process may use, as the reference loader's workers
    threads = max(1, usable_workers(num_workers))
    return DaliLoader(source, batch_size, image_size, num_threads=threads, **common, **(dali_options or {}))


__all__ = [
    "BACKENDS",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadFileReport",
    "CropParams",
    "DaliLoader",
    "DataError",
    "ShardDataError",
    "EpochPlan",
    "Loader",
    "Source",
    "SyntheticLoader",
    "TorchLoader",
    "build_loader",
    "dali_available",
    "file_list_source",
    "folder_scan_source",
    "image_folder_source",
    "make_demo_dataset",
    "open_source",
    "rrc_params",
    "sample_params",
    "sample_seed",
]
