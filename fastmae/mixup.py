"""The official fine-tuning's batch regularisers: mixup / CutMix and random erasing.

MAE's ``main_finetune.py`` takes them from timm: ``Mixup(mixup_alpha=0.8, cutmix_alpha=1.0,
prob=1.0, switch_prob=0.5, mode="batch", label_smoothing=0.1)`` with ``SoftTargetCrossEntropy``,
and ``RandomErasing(0.25, mode="pixel", max_count=1)`` in the training transform. These are the
same operations, drawing as timm does (from numpy's and Python's generators, torch's for the erased
pixels: with timm's global ones and the same seeds, the same batches; an interop test holds them
together), applied to a whole batch on its device after the loader: erasing per image first, as the
transform did, then the batch's mix. Fine-tuning hands them generators of the step's own
(:func:`step_generators`, from the seed, the rank and the step): each rank mixes its own way, and a
resumed run, on any rank, mixes as the uninterrupted one. RandAugment, the recipe's fourth, runs in
the loader (:mod:`fastmae.data.randaugment`).
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def soft_targets(labels: torch.Tensor, num_classes: int, lam: float = 1.0, smoothing: float = 0.0) -> torch.Tensor:
    """``(N, num_classes)`` targets: each label smoothed (``smoothing / num_classes`` off, the rest on)
    and mixed with the reversed batch's, ``lam`` of its own (timm's ``mixup_target``)."""
    off = smoothing / num_classes
    y = torch.full((len(labels), num_classes), off, device=labels.device)
    y.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)
    return y * lam + y.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(target * log_softmax(logits))`` (timm's ``SoftTargetCrossEntropy``)."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def step_generators(
    seed: int, rank: int, step: int, device: torch.device
) -> tuple[np.random.RandomState, random.Random, torch.Generator]:
    """numpy's, Python's and torch's (on ``device``) generators for one training step of one rank:
    the step's mix and erasing depend on (seed, rank, step) alone, not on what drew before."""
    from fastmae.data.sampling import sample_seed

    s = sample_seed(seed, step, rank, 0x6D6978)  # a stream apart from the samples' crops
    return np.random.RandomState(s & 0xFFFFFFFF), random.Random(s), torch.Generator(device).manual_seed(s)


def cutmix_box(height: int, width: int, lam: float, rng: Any = np.random) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of CutMix's box for ``lam``: sides ``sqrt(1 - lam)`` of the image's,
    centred at a uniform pixel, clipped to the image (timm's ``rand_bbox``, no margin)."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.randint(0, height), rng.randint(0, width)
    top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + (cut_h + 1) // 2, 0, height)
    left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + (cut_w + 1) // 2, 0, width)
    return int(top), int(bottom), int(left), int(right)


class Mixup:
    """Mixup or CutMix of a whole batch with its reverse, and the soft targets that go with it.

    Per batch, with probability ``prob``: CutMix (probability ``switch_prob`` when both are on) pastes
    a box of the reversed batch in, its ``lam`` corrected to the area actually kept; mixup blends the
    images with ``lam ~ Beta(alpha, alpha)``. The batch size must be even (timm asserts it).
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("Mixup needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing

    def draw(self, rng: Any = np.random) -> tuple[float, bool]:
        """(lam, CutMix or not) for the next batch; lam 1 leaves it as it is. ``rng``: numpy's global
        generator (timm's) or a ``RandomState``."""
        if rng.rand() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = bool(rng.rand() < self.switch_prob)
        else:
            cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), cutmix

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, rng: Any = np.random
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` mixed in place, and their ``(N, num_classes)`` soft targets."""
        if len(images) % 2:
            raise ValueError(f"mixup / CutMix needs an even batch, got {len(images)}")
        lam, cutmix = self.draw(rng)
        if lam != 1.0:
            if cutmix:
                top, bottom, left, right = cutmix_box(images.shape[-2], images.shape[-1], lam, rng)
                images[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom, left:right]
                lam = 1.0 - (bottom - top) * (right - left) / float(images.shape[-2] * images.shape[-1])
            else:
                flipped = images.flip(0).mul_(1.0 - lam)  # before images is scaled
                images.mul_(lam).add_(flipped)
        return images, soft_targets(labels, self.num_classes, lam, self.label_smoothing)


def random_erase(
    images: torch.Tensor,
    prob: float,
    rng: Any = random,
    generator: torch.Generator | None = None,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
) -> torch.Tensor:
    """Each image of ``(N, C, H, W)`` (normalised) has, with probability ``prob``, one rectangle of
    ``[min_area, max_area]`` of its area and aspect ratio in [0.3, 1/0.3] (log-uniform) replaced by
    standard-normal noise per pixel; ten tries at a box that fits, else none (timm's
    ``RandomErasing(prob, mode="pixel")``). The boxes from ``rng`` (Python's global generator, timm's,
    or a ``random.Random``), the noise from ``generator`` (torch's global one when None). In place;
    returns ``images``."""
    _, chans, height, width = images.shape
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    for img in images:
        if rng.random() > prob:
            continue
        for _ in range(10):
            area = rng.uniform(min_area, max_area) * (height * width)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                img[:, top : top + h, left : left + w] = torch.empty(
                    (chans, h, w), dtype=images.dtype, device=images.device
                ).normal_(generator=generator)
                break
    return images
