"""The data a training run reads: the loader its config names (the demo's generated image set when no
``--data-path`` is given), the labelled source behind it (the kNN monitor's), and, under torchrun,
the check that every rank sees the same images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fastmae import distributed
from fastmae.config import Config, ConfigError
from fastmae.data import DataError, build_loader, dali_available, make_demo_dataset, open_source
from fastmae.data.sources import samples_digest


def loader_source(loader: Any) -> Any:
    """The labelled source behind a real loader, or None (synthetic data, unlabelled images)."""
    source = getattr(loader, "source", None)
    if source is None or not source.samples or min(y for _, y in source.samples) < 0:
        return None
    return source


def knn_images(cfg: Config, loader: Any) -> Any:
    """The kNN monitor's labelled source: ``--knn-data-path``, else the training source if it has labels."""
    if cfg.knn_data_path:
        return open_source(cfg.knn_data_path, cfg.knn_data_list or None)
    if loader_source(loader) is not None:
        return loader_source(loader)
    raise ConfigError("--knn-every needs labelled images: --knn-data-path, or a labelled --data-path")


def cache_dir() -> Path:
    """``$FASTMAE_CACHE``, else ``$XDG_CACHE_HOME/fastmae``, else ``~/.cache/fastmae``."""
    if os.environ.get("FASTMAE_CACHE"):
        return Path(os.environ["FASTMAE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastmae"


def open_data(cfg: Config, env: distributed.DistEnv, run_dir: Path) -> tuple[Any, str, list[str]]:
    """(loader, backend name, the source's paths on rank 0: the reconstruction grids pick from them)."""
    backend = cfg.data_backend
    if backend == "auto":
        backend = "dali" if env.device.type == "cuda" and dali_available() else "torch"
    if backend == "synthetic":
        source = None
    elif cfg.data_path:
        source = open_source(cfg.data_path, cfg.data_list or None)
    else:  # the demo builds its own image set once, in the user's cache
        root = cache_dir() / f"demo-{cfg.demo_images}"
        if env.is_main:
            if not (root / "fastmae_demo.json").is_file():
                print(f"generating {cfg.demo_images} demo images in {root} (once)", flush=True)
            make_demo_dataset(root, n_images=cfg.demo_images, size=96, seed=0)
        distributed.barrier()
        if not (root / "fastmae_demo.json").is_file():  # another node: rank 0 made it on its own
            raise DataError(
                f"the demo's images are made once, by rank 0, in {root}, which this node does not see: "
                "on several nodes set FASTMAE_CACHE to a folder every node shares"
            )
        source = open_source(root)
    loader = build_loader(
        backend,
        source,
        batch_size=cfg.batch_size,
        image_size=cfg.img_size,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
        device=env.device,
        # fp32 under bf16 autocast too: the norm-pix targets are read from the images, as the
        # reference reads them (a bf16 image would round each target by ~0.4%); the patch GEMM casts
        # its own input, and a batch is ~0.6 MB an image
        dtype=torch.float32,
        num_workers=cfg.num_workers,
        report_dir=run_dir,  # every rank: each reads its own shard (bad_files.rank<r>.txt)
    )
    vis_paths = [path for path, _ in source.samples] if source is not None and env.is_main else []
    return loader, backend, vis_paths


def check_same_data(loader: Any) -> None:
    """Under torchrun every rank scans the data itself: refuse to train when they do not see the
    same images (a node with a partly copied tree, or a stat that failed there). Each rank's epoch
    order is a permutation of what it sees, so a rank that saw one image fewer would read about a
    tenth of its images twice in an epoch and miss as many, with no error."""
    source = getattr(loader, "source", None)  # unlabelled images too (loader_source leaves them out)
    if source is None:  # synthetic batches
        return
    # relative to the root: nodes may mount the same data at different paths
    views = distributed.all_gather_object((len(source.samples), samples_digest(source)))
    if len(set(views)) > 1:
        seen = ", ".join(f"rank {r}: {n}" for r, (n, _) in enumerate(views))
        raise DataError(
            f"the processes see different data sets (images {seen}; or the same count, other files): "
            "every node must see the same --data-path"
        )
