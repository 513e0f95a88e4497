"""The batch schedule: which images a rank reads at (epoch, step), and each sample's random stream.

Everything here is a pure function of ``(seed, epoch, step, rank, world_size)`` and the source
length, which is what makes the loaders' output independent of worker count and lets a run
restart at any (epoch, step) without decoding the skipped images:

- Epoch order: ``perm = numpy.random.default_rng([seed, epoch]).permutation(n)``.
- Global batch ``G = batch_size * world_size``; ``steps_per_epoch = n // G`` (drop-last: the
  ``n % G`` images at the end of the permutation are not seen that epoch; a new permutation
  next epoch drops different ones).
- Rank ``r`` at step ``s`` reads ``perm[s*G + r*B : s*G + (r+1)*B]``: the ranks tile each global
  batch, so across ranks every image is read at most once per epoch, and exactly once except the
  dropped tail.
- Sample randomness (crop, flip) comes from a :class:`SampleRandom` stream seeded with
  ``sample_seed(seed, epoch, index, attempt)``, never from process or worker RNG state. It is
  splitmix64 in plain Python, fully specified here (so a torch upgrade cannot change a run's crops
  on resume) and cheap: one sample's crop and flip cost 24-39 us of one-element torch ops from a
  ``torch.Generator``, 7-10 us from this stream (2-core dev VM), on the thread that feeds DALI.
- An unreadable image at ``index`` is replaced by the candidates
  ``substitute_index(seed, epoch, index, k, n)`` for k = 1, 2, ...: the first that reads is used,
  with the random stream of ``(seed, epoch, index, k)``. The sequence does not depend on what a
  worker has seen before, so substitution is deterministic too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np

from fastmae.data.sources import DataError, samples_digest

logger = logging.getLogger("fastmae.data")

_MASK64 = (1 << 64) - 1
# the stream each sample's crop and flip come from, in the loaders' state: a state saved before
# (a torch.Generator's draws) continues the same images in the same order, with other crops
CROP_STREAM = "splitmix64"
MAX_ATTEMPTS = 16  # candidates tried for one slot before giving up (all unreadable = broken data set)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int, attempt: int = 0) -> int:
    """A 63-bit seed for one sample's augmentation, mixed from its coordinates (splitmix64 chain)."""
    h = 0
    for v in (seed, epoch, index, attempt):
        h = _splitmix64(h ^ (v & _MASK64))
    return h >> 1


class SampleRandom:
    """One sample's random stream: splitmix64 (Steele, Lea & Flood 2014) from a 64-bit seed.

    The draw methods are those :func:`~fastmae.data.transforms.rrc_params` and
    :func:`~fastmae.data.transforms.sample_params` ask of a stream (a ``torch.Generator`` is the
    other kind they take, drawing torchvision's way).
    """

    __slots__ = ("state",)

    def __init__(self, seed: int):
        self.state = seed & _MASK64

    def next64(self) -> int:
        """The next 64-bit output."""
        out = _splitmix64(self.state)
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        return out

    def random(self) -> float:
        """Uniform in [0, 1), 53 bits."""
        return (self.next64() >> 11) * (1.0 / (1 << 53))

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def log_uniform(self, low: float, high: float) -> float:
        """``exp(uniform(log(low), log(high)))``: RandomResizedCrop's aspect-ratio draw."""
        return math.exp(self.uniform(math.log(low), math.log(high)))

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high) (multiply-shift: bias below (high - low) / 2**64)."""
        return low + ((self.next64() * (high - low)) >> 64)


def sample_generator(seed: int, epoch: int, index: int, attempt: int = 0) -> SampleRandom:
    """The stream that draws one sample's crop and flip."""
    return SampleRandom(sample_seed(seed, epoch, index, attempt))


def substitute_index(seed: int, epoch: int, index: int, attempt: int, n: int) -> int:
    """The ``attempt``-th stand-in for an unreadable image at ``index`` (attempt >= 1)."""
    return sample_seed(seed ^ 0x5EED, epoch, index, attempt) % n


def candidates(seed: int, epoch: int, index: int, n: int) -> Iterator[tuple[int, int]]:
    """``(attempt, dataset_index)``: the image itself, then its stand-ins, in order (lazily)."""
    yield 0, index
    for k in range(1, MAX_ATTEMPTS):
        yield k, substitute_index(seed, epoch, index, k, n)


def tried_indices(seed: int, epoch: int, index: int, n: int) -> set[int]:
    """The distinct dataset indices among a slot's candidates (fewer than ``MAX_ATTEMPTS`` when
    the stand-ins repeat, as they do in a small source): the count a "data set looks broken"
    error reports."""
    return {j for _, j in candidates(seed, epoch, index, n)}


class EpochPlan:
    """Which dataset indices rank ``rank`` reads at each (epoch, step).

    Args:
        num_samples: length of the source.
        batch_size: per-rank batch size B.
        seed: data seed.
        rank, world_size: this process's shard.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the source has {num_samples} images, fewer than one global batch "
                f"({batch_size} x {world_size} ranks = {self.global_batch})"
            )
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order of all ``num_samples`` indices (cached for the last epoch asked)."""
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """Dataset indices ``[B]`` (int64) of this rank's batch at (epoch, step)."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside [0, {self.steps_per_epoch})")
        start = step * self.global_batch + self.rank * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size]

    def resume_step(self, state: dict) -> int:
        """The step of this plan that continues a saved loader state exactly.

        The image sequence and each image's crop depend only on (seed, epoch, position in the
        epoch's permutation), so a state saved under another world size or per-rank batch
        resumes exactly when the global batches line up: the saved position
        (``step * global_batch``) must be a multiple of this plan's global batch.
        """
        for key in ("num_samples", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume the data order exactly: saved {key}={state[key]}, now {getattr(self, key)}"
                )
        saved_global = int(state.get("global_batch", state.get("batch_size", 0) * state.get("world_size", 1)))
        position = int(state["step"]) * (saved_global or self.global_batch)
        if position + (saved_global or self.global_batch) > self.num_samples:
            return self.steps_per_epoch  # the saved epoch was used up: the next pass starts the next one
        if position % self.global_batch:
            raise DataError(
                f"cannot resume the data order exactly: {position} images into the epoch is not a whole "
                f"number of global batches of {self.global_batch}"
            )
        return position // self.global_batch


class ScheduledLoader:
    """Epoch/step bookkeeping shared by the backends (the resume contract lives here).

    ``set_epoch(e, start_step=k)`` makes the next ``iter(loader)`` yield batches ``k .. len-1``
    of epoch ``e``. ``state_dict()`` is ``{"epoch", "step", ...}`` where ``step`` counts batches
    the caller has received this epoch; ``load_state_dict`` of it continues with the next batch.
    A pass that starts with the epoch used up (``step == len``) moves on to epoch + 1, step 0, so
    a loop that never calls ``set_epoch`` still walks through successive epochs.
    """

    plan: EpochPlan

    def __init__(self, plan: EpochPlan):
        self.plan = plan
        self.epoch = 0
        self.step = 0  # next batch this epoch to hand out

    def __len__(self) -> int:
        """Steps (batches per rank) per epoch."""
        return self.plan.steps_per_epoch

    @property
    def buffered_batches(self) -> int:
        """Batches the loader prepares ahead of the consumer (workers x prefetch, a DALI queue)."""
        return 0

    @property
    def workers(self) -> int:
        """Processes or threads preparing batches (DataLoader workers, DALI CPU threads; 0: none)."""
        return 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= len(self):
            raise DataError(f"start step {start_step} outside [0, {len(self)}]")
        self.epoch = epoch
        self.step = start_step

    def state_dict(self) -> dict:
        p = self.plan
        state = {
            "epoch": self.epoch,
            "step": self.step,
            "seed": p.seed,
            "num_samples": p.num_samples,
            "batch_size": p.batch_size,
            "world_size": p.world_size,
            "global_batch": p.global_batch,
            "crop_stream": CROP_STREAM,
        }
        source = getattr(self, "source", None)
        if source is not None:  # which images: a resume on other data of the same count is refused
            state["samples_digest"] = samples_digest(source)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved state, also across world sizes / batch sizes (see ``EpochPlan.resume_step``)."""
        self.set_epoch(int(state["epoch"]), self.plan.resume_step(state))
        if getattr(self, "source", None) is not None and state.get("crop_stream") != CROP_STREAM:
            logger.warning(
                "the checkpoint's loader state does not say it drew its crops and flips from %s (fastmae "
                "before the state recorded it drew them from a torch.Generator): the run continues with the "
                "same images in the same order, maybe cropped otherwise than an uninterrupted run",
                CROP_STREAM,
            )

    def _steps(self) -> range:
        """The steps the next pass covers; the pass then advances ``self.step`` as it yields."""
        if self.step >= len(self):
            self.set_epoch(self.epoch + 1)
        return range(self.step, len(self))
