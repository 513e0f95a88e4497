"""Synthetic backend: random batches already on the device, for benchmarks that must not wait on data.

Same interface as the real loaders (``set_epoch``, ``len``, ``iter``, ``state_dict``). A small
pool of batches is drawn once, on the device, from ``seed`` and cycled, so a step costs no host
work and no copy; the values are N(0, 1), the scale of normalised images.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastmae.data.sampling import EpochPlan, ScheduledLoader, sample_seed
from fastmae.data.sources import BadFileReport


class SyntheticLoader(ScheduledLoader):
    """Yields ``(images [B, 3, S, S] dtype on device, labels [B] int64 on device)``.

    Args:
        batch_size: per-rank batch B.
        image_size: side S.
        steps_per_epoch: batches per epoch.
        seed: seed of the pool.
        rank: this process's rank: each rank's pool is its own (under torchrun identical batches on
            every rank would make the ranks' gradients equal, a data-parallel run that is not one).
        device, dtype: where and how the batches live.
        num_classes: labels are drawn from ``[0, num_classes)``.
        pool: distinct batches kept and cycled.
    """

    def __init__(
        self,
        batch_size: int,
        image_size: int = 224,
        *,
        steps_per_epoch: int = 1000,
        seed: int = 0,
        rank: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        num_classes: int = 1000,
        pool: int = 4,
    ):
        super().__init__(EpochPlan(steps_per_epoch * batch_size, batch_size, seed))
        self.device = torch.device(device)
        self.dtype = dtype
        self.bad_files = BadFileReport()
        g = torch.Generator(device=self.device)
        g.manual_seed(sample_seed(seed, rank, 0))
        shape = (pool, batch_size, 3, image_size, image_size)
        self._images = torch.randn(shape, generator=g, device=self.device).to(dtype)
        self._labels = torch.randint(0, num_classes, (pool, batch_size), generator=g, device=self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pool = self._images.shape[0]
        for step in self._steps():
            k = (self.epoch * len(self) + step) % pool
            self.step += 1
            yield self._images[k], self._labels[k]

    def close(self) -> None:
        pass
