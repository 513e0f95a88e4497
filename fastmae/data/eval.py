"""Evaluation data: a deterministic center crop, every image once, sharded over ranks.

The evaluation transform of the MAE fine-tuning recipe (``util/datasets.py``) is
``Resize(S / crop_pct, bicubic)`` + ``CenterCrop(S)`` with ``crop_pct = 224 / 256`` for ``S <= 224``
and ``1.0`` above: the central ``0.875`` of the shorter side (the whole of it above 224 px), scaled
to ``S``. Done here as torchvision does it to a PIL image, pixel for pixel (an interop test): the
shorter side resized to ``int(S / crop_pct)`` (the longer in proportion, truncated), bicubic, then
the ``S x S`` window at ``round((side - S) / 2)``. (Until 2026-11-28 the window was cut first and
resized once: the same field of view, ~1 grey level apart, enough to move a checkpoint's top-1 a
little from the official number.)

Rank ``r`` of ``w`` evaluates samples ``r, r + w, r + 2w, ...``: each image exactly once across the
ranks, so summing correct counts over ranks gives the exact accuracy. Unreadable images are left
out of the evaluation and reported (``report.count`` of them), never a crash.

Also :func:`split_source`, a deterministic train / val split of one labelled source, and
:func:`to_training_labels`, a separate validation source's labels in the training classes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fastmae.data.encoded import describe
from fastmae.data.sources import BadFileReport, DataError, PackedSamples, Source
from fastmae.data.torch_loader import stop_workers, usable_workers, worker_ignores_stop_signals
from fastmae.data.transforms import CropParams, augment, load_rgb

EVAL_CROP = 0.875  # 224 / 256


def eval_crop(size: int) -> float:
    """The reference's ``crop_pct`` for a ``size`` px evaluation: 224 / 256 up to 224, else 1.0."""
    return EVAL_CROP if size <= 224 else 1.0


def resize_center_crop(img: Image.Image, size: int, crop: float = EVAL_CROP) -> Image.Image:
    """torchvision's ``Resize(int(size / crop), bicubic)`` + ``CenterCrop(size)`` of a PIL image."""
    short = int(size / crop)
    w, h = img.size
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def eval_transform(path: str, size: int, crop: float | None = None) -> torch.Tensor:
    """``(3, size, size)`` float32, ImageNet-normalised center crop of the image at ``path``
    (``crop``: the share of the shorter side kept; None: the reference's for ``size``)."""
    img = resize_center_crop(load_rgb(path), size, eval_crop(size) if crop is None else crop)
    return augment(img, CropParams(top=0, left=0, height=size, width=size, flip=False), size)


class _EvalDataset(Dataset):
    def __init__(self, samples: list[tuple[str, int]], size: int, crop: float | None):
        self.samples, self.size, self.crop = samples, size, crop

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            return eval_transform(path, self.size, self.crop), label, None
        except Exception as exc:  # any decode failure: leave the image out, report it
            return torch.zeros(3, self.size, self.size), label, (path, describe(exc, path))


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
        crop: float | None = None,
        report_dir: str | os.PathLike | None = None,
    ):
        if len(source) == 0:
            raise DataError("the evaluation source has no images")
        self.samples = source.samples[rank::world_size]
        self.device, self.dtype = torch.device(device), dtype
        self.bad_files = BadFileReport(
            report_dir, rank=rank, world_size=world_size, outcome="left out of the evaluation"
        )
        self._loader = DataLoader(
            _EvalDataset(PackedSamples(self.samples), image_size, crop),  # read by forked workers
            batch_size=batch_size,
            shuffle=False,
            num_workers=usable_workers(num_workers),
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # not torch's global RNG, which training draws from (see TorchLoader)
            worker_init_fn=worker_ignores_stop_signals,
        )

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self._loader)
        try:
            for images, labels, bad in batches:
                for path, reason in bad:
                    self.bad_files.add(path, reason)
                if len(labels) == 0:
                    continue
                yield (
                    images.to(self.device, self.dtype, non_blocking=True),
                    labels.to(self.device, non_blocking=True),
                )
        finally:
            stop_workers(batches)  # also when the caller stops early or raises


def split_source(
    source: Source, val_fraction: float, seed: int = 0, empty_hint: str = "use a larger --val-fraction or a --val-path"
) -> tuple[Source, Source]:
    """A deterministic, per-class (stratified) train / val split of one labelled source.

    Each class keeps ``round(val_fraction * n_class)`` images for validation (at least one when the
    class has two or more), chosen by a permutation seeded with ``seed``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val fraction must be in (0, 1), got {val_fraction}")
    # split distinct files (a list that names one file twice must not put it on both sides)
    first: dict[str, int] = {}
    for i, (path, _) in enumerate(source.samples):
        first.setdefault(path, i)
    files = sorted(first.values())
    labels = np.array([source.samples[i][1] for i in files])
    rng = np.random.default_rng(seed)
    val_paths: set[str] = set()
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        n_val = min(len(idx) - 1, max(1, round(val_fraction * len(idx)))) if len(idx) > 1 else 0
        val_paths.update(source.samples[files[j]][0] for j in rng.permutation(idx)[:n_val])
    train = [s for s in source.samples if s[0] not in val_paths]
    val = [source.samples[i] for i in files if source.samples[i][0] in val_paths]
    if not val:
        raise DataError(f"the val split is empty: {empty_hint}")
    make = lambda samples, missing=(): Source(
        root=source.root, samples=samples, kind=source.kind, classes=source.classes, missing=list(missing)
    )
    # the listed-but-missing files go with the training half, whose loader reports them
    return make(train, source.missing), make(val)


def to_training_labels(val: Source, train: Source, num_classes: int) -> Source:
    """``val`` with its labels as indices into ``train``'s classes (``num_classes`` of them).

    An ImageFolder's label is the index of its class in *its own* sorted folder list: a validation
    tree with fewer classes than the training tree (cat, dog against bird, cat, dog) numbers them
    differently, and every image would be scored against another class. Named classes are matched
    by name (a validation class the training set lacks is an error); where either side has no names
    (a file list), the integer labels are the classes, and must be below ``num_classes``.
    """
    if val.classes is not None and train.classes is not None and val.classes != train.classes:
        index = {name: i for i, name in enumerate(train.classes)}
        used = sorted({val.classes[y] for _, y in val.samples})  # an empty class folder scores nothing
        unknown = [name for name in used if name not in index]
        if unknown:
            raise DataError(
                f"the validation class{'es' if len(unknown) > 1 else ''} {', '.join(unknown[:5])}"
                f"{', ...' if len(unknown) > 5 else ''} of {val.root} {'are' if len(unknown) > 1 else 'is'} not among "
                f"the {len(train.classes)} training classes of {train.root}"
            )
        samples = [(path, index[val.classes[y]]) for path, y in val.samples]
        return Source(root=val.root, samples=samples, kind=val.kind, classes=list(train.classes), missing=val.missing)
    top = max((y for _, y in val.samples), default=-1)
    if top >= num_classes:
        raise DataError(
            f"the validation labels go up to {top} but the training set has {num_classes} classes "
            f"(0 to {num_classes - 1}; --num-classes for classes the training images lack)"
        )
    return val
