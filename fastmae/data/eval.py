"""Evaluation data: a deterministic center crop, every image once, sharded over ranks.

The evaluation transform of the MAE fine-tuning recipe is ``Resize(S / 0.875, bicubic)`` +
``CenterCrop(S)``: the central ``0.875`` of the shorter side, scaled to ``S``. Here the same window
is cut first and then resized (one bicubic resample instead of two), the same field of view.

Rank ``r`` of ``w`` evaluates samples ``r, r + w, r + 2w, ...``: each image exactly once across the
ranks, so summing correct counts over ranks gives the exact accuracy. Unreadable images are left
out of the evaluation and reported (``report.count`` of them), never a crash.

Also :func:`split_source`, a deterministic train / val split of one labelled source.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastmae.data.sources import BadFileReport, DataError, Source
from fastmae.data.transforms import CropParams, augment, load_rgb

EVAL_CROP = 0.875  # 224 / 256


def center_crop_params(height: int, width: int, crop: float = EVAL_CROP) -> CropParams:
    """The square window of side ``crop * min(height, width)`` at the image's center, unflipped."""
    side = max(1, round(min(height, width) * crop))
    return CropParams(top=(height - side) // 2, left=(width - side) // 2, height=side, width=side, flip=False)


def eval_transform(path: str, size: int, crop: float = EVAL_CROP) -> torch.Tensor:
    """``(3, size, size)`` float32, ImageNet-normalised center crop of the image at ``path``."""
    img = load_rgb(path)
    return augment(img, center_crop_params(img.height, img.width, crop), size)


class _EvalDataset(Dataset):
    def __init__(self, samples: list[tuple[str, int]], size: int, crop: float):
        self.samples, self.size, self.crop = samples, size, crop

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            return eval_transform(path, self.size, self.crop), label, None
        except Exception as exc:  # any decode failure: leave the image out, report it
            return torch.zeros(3, self.size, self.size), label, (path, f"{type(exc).__name__}: {exc}")


def _collate(items):
    keep = [(x, y) for x, y, bad in items if bad is None]
    bad = [bad for _, _, bad in items if bad is not None]
    if not keep:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64), bad
    return torch.stack([x for x, _ in keep]), torch.tensor([y for _, y in keep], dtype=torch.int64), bad


class EvalLoader:
    """``(images [b, 3, S, S], labels [b])`` batches of this rank's share, each image once.

    The last batch may be smaller, and a batch shrinks by the unreadable images it met; those are
    counted in :attr:`bad_files` (and written to ``report_dir/bad_files.txt`` when given).
    """

    def __init__(
        self,
        source: Source,
        batch_size: int,
        image_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        num_workers: int = 2,
        crop: float = EVAL_CROP,
        report_dir: str | os.PathLike | None = None,
    ):
        if len(source) == 0:
            raise DataError("the evaluation source has no images")
        self.samples = source.samples[rank::world_size]
        self.device, self.dtype = torch.device(device), dtype
        self.bad_files = BadFileReport(report_dir, rank=rank, world_size=world_size)
        self._loader = DataLoader(
            _EvalDataset(self.samples, image_size, crop),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, bad in self._loader:
            for path, reason in bad:
                self.bad_files.add(path, reason)
            if len(labels) == 0:
                continue
            yield (
                images.to(self.device, self.dtype, non_blocking=True),
                labels.to(self.device, non_blocking=True),
            )


def split_source(source: Source, val_fraction: float, seed: int = 0) -> tuple[Source, Source]:
    """A deterministic, per-class (stratified) train / val split of one labelled source.

    Each class keeps ``round(val_fraction * n_class)`` images for validation (at least one when the
    class has two or more), chosen by a permutation seeded with ``seed``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val fraction must be in (0, 1), got {val_fraction}")
    labels = np.array([y for _, y in source.samples])
    rng = np.random.default_rng(seed)
    val_idx: list[int] = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        n_val = min(len(idx) - 1, max(1, round(val_fraction * len(idx)))) if len(idx) > 1 else 0
        val_idx.extend(rng.permutation(idx)[:n_val].tolist())
    val_set = set(val_idx)
    train = [s for i, s in enumerate(source.samples) if i not in val_set]
    val = [s for i, s in enumerate(source.samples) if i in val_set]
    if not val:
        raise DataError("the val split is empty: use a larger --val-fraction or a --val-path")
    make = lambda samples: Source(root=source.root, samples=samples, kind=source.kind, classes=source.classes)
    return make(train), make(val)
