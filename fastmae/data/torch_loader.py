"""Reference backend: ``torch.utils.data.DataLoader`` + PIL (torchvision's ops when they import).

The DataLoader's batch sampler yields, per step, the keys ``(epoch, dataset_index)`` of the
batch chosen by :class:`~fastmae.data.sampling.EpochPlan`; each worker decodes and augments a
sample from its own ``(seed, epoch, index)`` generator, so the batches are the same for any
``num_workers`` and a resumed run needs no decoding of the skipped steps.

An unreadable file (truncated, corrupt, empty, not an image, vanished) is replaced by the
deterministic stand-ins of :func:`~fastmae.data.sampling.candidates`; the batch keeps its shape.
The workers send the bad paths back with the batch and the main process records them in a
:class:`~fastmae.data.sources.BadFileReport` (log + ``report_dir/bad_files.txt``). A slot whose
candidates are all unreadable comes back the same way, as a message with its bad paths: the main
process records them and raises a one-line :class:`~fastmae.data.sources.DataError`.
"""

from __future__ import annotations

import atexit
import os
import signal
import weakref
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fastmae.data.encoded import describe
from fastmae.data.randaugment import RandAugment, sample_rngs
from fastmae.data.sampling import EpochPlan, ScheduledLoader, candidates, sample_generator, tried_indices
from fastmae.data.sources import BadFileReport, DataError, PackedSamples, ShardDataError, Source
from fastmae.data.transforms import CROP_RATIO, CROP_SCALE, augment, load_rgb, sample_params

Batch = tuple[torch.Tensor, torch.Tensor]

# Persistent workers left to interpreter-exit garbage collection can stall the exit for ~5 s per
# worker (seen under pytest); closing the live loaders from atexit avoids that.
_LIVE_LOADERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_loaders() -> None:
    for loader in list(_LIVE_LOADERS):
        loader.close()


def read_sample(
    samples: Sequence[tuple[str, int]],
    seed: int,
    epoch: int,
    index: int,
    size: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    known_bad: set[int] | None = None,
    auto_augment: RandAugment | None = None,
) -> tuple[torch.Tensor, int, list[tuple[str, str]]]:
    """Decode and augment the sample for slot ``index`` of ``epoch``, standing in for bad files
    (``auto_augment`` after the crop and flip, drawing from the sample's stream).

    Returns:
        image ``(3, S, S)`` float32, its label, and ``[(path, reason), ...]`` of the bad files met.

    Raises:
        DataError: every candidate is unreadable; its ``bad_files`` attribute holds the
            ``[(path, reason), ...]`` met, for the report.
    """
    bad: list[tuple[str, str]] = []
    known_bad = set() if known_bad is None else known_bad
    for attempt, j in candidates(seed, epoch, index, len(samples)):
        if j in known_bad:
            continue
        path, label = samples[j]
        try:
            img = load_rgb(path)
        except Exception as exc:  # any decode failure means: skip this file
            known_bad.add(j)
            bad.append((path, describe(exc, path)))
            continue
        stream = sample_generator(seed, epoch, index, attempt)
        params = sample_params(img.height, img.width, stream, scale, ratio)
        then = None
        if auto_augment is not None:
            rng, np_rng = sample_rngs(stream.next64())
            then = partial(auto_augment, rng=rng, np_rng=np_rng)
        return augment(img, params, size, then=then), label, bad
    err = DataError(
        f"{len(tried_indices(seed, epoch, index, len(samples)))} unreadable images in a row standing in for "
        f"{samples[index][0]}; the data set looks broken (see the bad-file report)"
    )
    err.bad_files = bad
    raise err


class _SampleDataset(Dataset):
    def __init__(self, samples, seed, size, scale, ratio, auto_augment=None):
        self.samples = samples
        self.auto_augment = auto_augment
        self.seed = seed
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.known_bad: set[int] = set()  # per worker process; only saves re-reading bad files

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        """``(image, label, bad files, None)``, or ``(None, None, bad files, message)`` when the slot
        cannot be filled: raised in a worker, the DataError would reach the main process as a
        multi-line traceback without its bad files, so it travels as data and is raised there."""
        epoch, index = key
        try:
            img, label, bad = read_sample(
                self.samples, self.seed, epoch, index, self.size, self.scale, self.ratio, self.known_bad,
                self.auto_augment,
            )  # fmt: skip
        except DataError as exc:
            return None, None, getattr(exc, "bad_files", []), str(exc)
        return img, label, bad, None


class _PlanBatchSampler(Sampler):
    """Yields ``[(epoch, index), ...]`` for each step of the owner's current pass."""

    def __init__(self, owner: TorchLoader):
        self.owner = owner

    def __iter__(self):
        o = self.owner
        for step in o._pass_steps:
            yield [(o.epoch, int(i)) for i in o.plan.batch_indices(o.epoch, step)]

    def __len__(self) -> int:
        return len(self.owner._pass_steps)


def _collate(items):
    """``(images, labels, bad files, error message or None)``; empty tensors when a slot failed."""
    bad = [b for it in items for b in it[2]]
    error = next((it[3] for it in items if it[3] is not None), None)
    if error is not None:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), bad, error
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    return images, labels, bad, None


def worker_ignores_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: the stop signals are the main process's to handle.

    A scheduler signals the whole process group (torchrun's ``killpg``, SLURM, ``kill -- -PGID``):
    the workers' own SIGTERM handler (PyTorch's) killed them, and the main process raised "DataLoader
    worker ... killed by signal: Terminated" before it could save and stop. Ignored here, the main
    process takes its stop at the next log step and shuts the workers down as usual (``stop_workers``
    kills one stuck in a read; an idle one also exits when the main process dies). SIGINT likewise: Ctrl-C interrupts the main process, not every worker with a
    traceback of its own.
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def stop_workers(iterator: Any) -> None:
    """Shut a DataLoader iterator's workers down, then kill any still alive. DataLoader's own last
    resort, SIGTERM, is ignored by them (``worker_ignores_stop_signals``): a worker blocked in a read
    (a stalled network mount) would keep the process from exiting, as multiprocessing joins it then."""
    if iterator is None or not hasattr(iterator, "_shutdown_workers"):
        return
    iterator._shutdown_workers()
    for worker in getattr(iterator, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def usable_workers(num_workers: int) -> int:
    """``num_workers``, at most the CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call (macOS)
        cpus = os.cpu_count() or 1
    return min(num_workers, cpus)


class TorchLoader(ScheduledLoader):
    """PIL/torchvision reference loader.

    Args:
        source: the samples.
        batch_size: per-rank batch B.
        image_size: output side S.
        seed: data seed (order and augmentation).
        rank, world_size: shard of this process.
        device: where batches are delivered (``"cuda"`` pins host memory and copies async).
        dtype: dtype of the delivered images (cast on the device).
        num_workers: DataLoader workers (0 = in the main process), at most the CPUs this process
            may run on (more only contend; DataLoader warns of a freeze); persistent when > 0.
        report_dir: folder for ``bad_files.txt`` (None: log only).
        prefetch_factor: batches each worker prepares ahead.
        scale, ratio: RandomResizedCrop bounds.
        auto_augment: RandAugment after the crop and flip (fine-tuning's), or None.

    Iterating yields ``(images [B, 3, S, S] dtype on device, labels [B] int64 on device)``.
    """

    def __init__(
        self,
        source: Source,
        batch_size: int,
        image_size: int = 224,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        num_workers: int = 4,
        report_dir: str | os.PathLike | None = None,
        prefetch_factor: int = 2,
        scale: tuple[float, float] = CROP_SCALE,
        ratio: tuple[float, float] = CROP_RATIO,
        auto_augment: RandAugment | None = None,
    ):
        super().__init__(EpochPlan(len(source), batch_size, seed, rank, world_size))
        self.source = source
        self.image_size = image_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.scale, self.ratio = scale, ratio
        self.bad_files = BadFileReport(report_dir, rank, world_size)
        self.bad_files.extend((p, "missing") for p in source.missing)
        self._pass_steps: range = range(0)
        dataset = _SampleDataset(PackedSamples(source.samples), seed, image_size, scale, ratio, auto_augment)
        num_workers = usable_workers(num_workers)
        self._loader = DataLoader(
            dataset,
            batch_sampler=_PlanBatchSampler(self),
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            # its own generator: an iterator draws its workers' base seed from it, and from torch's
            # global RNG without one, which a resumed run restores (fine-tuning's drop path draws
            # from it: a resume's new iterator moved its masks)
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=worker_ignores_stop_signals,
        )
        _LIVE_LOADERS.add(self)

    @property
    def buffered_batches(self) -> int:
        return self._loader.num_workers * (self._loader.prefetch_factor or 0)

    @property
    def workers(self) -> int:
        return self._loader.num_workers

    def __iter__(self) -> Iterator[Batch]:
        self._pass_steps = self._steps()
        non_blocking = self.device.type == "cuda"
        for images, labels, bad, error in self._loader:
            if bad:
                self.bad_files.extend(bad)
            if error is not None:  # recorded first: the message points to the report
                raise ShardDataError(error)
            images = images.to(self.device, non_blocking=non_blocking).to(self.dtype)
            labels = labels.to(self.device, non_blocking=non_blocking)
            self.step += 1
            yield images, labels

    def close(self) -> None:
        """Stop the persistent workers (the loader can be iterated again: they restart)."""
        stop_workers(getattr(self._loader, "_iterator", None))
        self._loader._iterator = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> TorchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
