"""Mixup / CutMix and random erasing (fastmae.mixup): what each does to a batch, and, where timm
imports (``-m interop``), the same batches as timm's for the same seeds."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fastmae.mixup import Mixup, random_erase, soft_target_cross_entropy, soft_targets, step_generators


def _batch(n=8, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_soft_targets_smooth_and_mix_with_the_reversed_batch():
    labels = torch.tensor([0, 3, 1, 3])
    y = soft_targets(labels, 5, lam=0.7, smoothing=0.1)
    torch.testing.assert_close(y.sum(1), torch.ones(4))
    one = torch.full((4, 5), 0.02).scatter_(1, labels.view(-1, 1), 0.92)  # 0.1 / 5 off, 1 - 0.1 + 0.02 on
    torch.testing.assert_close(y, 0.7 * one + 0.3 * one.flip(0))
    logits = torch.randn(4, 5)
    want = -(one * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(soft_target_cross_entropy(logits, one), want)
    torch.testing.assert_close(  # unmixed one-hot targets: plain cross-entropy with its smoothing
        soft_target_cross_entropy(logits, soft_targets(labels, 5, smoothing=0.1)),
        torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1),
    )


def test_mixup_blends_each_image_with_its_mirror_by_the_targets_lam():
    np.random.seed(1)
    mix = Mixup(5, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
    lams = []
    for seed in range(5):
        x, _ = _batch(seed=seed)
        y = torch.arange(8) % 5  # the first and last differ: lam reads off the first row
        out, target = mix(x.clone(), y)
        lam = target[0, y[0]].item()
        lams.append(lam)
        torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0), rtol=0, atol=1e-5)
    assert len(set(lams)) == 5 and all(0 < lam < 1 for lam in lams)


def test_cutmix_pastes_one_box_of_the_mirror_and_lam_is_the_area_kept():
    np.random.seed(2)
    mix = Mixup(5, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    boxes = 0
    for seed in range(8):
        x, y = _batch(seed=seed)
        y = torch.arange(8) % 5  # first and last differ: lam reads off the first row
        out, target = mix(x.clone(), y)
        changed = (out != x).any(1)  # (N, H, W)
        rows, cols = changed.any(0).any(1).nonzero(), changed.any(0).any(0).nonzero()
        if len(rows) == 0:
            assert target[0, y[0]] == 1.0
            continue
        boxes += 1
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        torch.testing.assert_close(out[:, :, top:bottom, left:right], x.flip(0)[:, :, top:bottom, left:right])
        outside = torch.ones(24, 24, dtype=torch.bool)
        outside[top:bottom, left:right] = False
        assert torch.equal(out[:, :, outside], x[:, :, outside])
        kept = 1 - (bottom - top) * (right - left) / 24**2
        assert target[0, y[0]].item() == pytest.approx(kept.item())
    assert boxes >= 6


def test_mixup_prob_zero_and_an_odd_batch():
    x, y = _batch()
    out, target = Mixup(5, prob=0.0)(x.clone(), y)
    assert torch.equal(out, x) and torch.equal(target, soft_targets(y, 5, smoothing=0.1))
    with pytest.raises(ValueError, match="needs an even batch, got 7"):
        Mixup(5)(x[:7], y[:7])


def test_random_erasing_one_box_of_noise_per_chosen_image():
    random.seed(0)
    torch.manual_seed(0)
    x = torch.zeros(400, 3, 32, 32)
    random_erase(x, 0.25)
    erased = (x != 0).flatten(1).any(1)
    assert 65 <= erased.sum() <= 135  # 100 expected, 4 sigma
    for img in x[erased]:
        mask = (img != 0).any(0)
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == h * w  # one rectangle, every channel's pixel drawn
        assert 0.015 <= h * w / 1024 <= 0.36  # [0.02, 1/3] of the area, up to the rounding of its sides
    x = torch.zeros(10, 3, 32, 32)
    assert torch.equal(random_erase(x, 0.0), torch.zeros(10, 3, 32, 32))


@pytest.mark.interop
@pytest.mark.parametrize(
    "kw",
    [
        dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5),  # the official recipe
        dict(mixup_alpha=0.8, cutmix_alpha=0.0, prob=0.6, switch_prob=0.5),
        dict(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5),
    ],
)
def test_mixup_draws_as_timm(kw):
    timm_mixup = pytest.importorskip("timm.data.mixup")
    theirs = timm_mixup.Mixup(**kw, mode="batch", label_smoothing=0.1, num_classes=5)
    ours = Mixup(5, **kw, label_smoothing=0.1)
    for seed in range(20):
        x, y = _batch(seed=seed)
        np.random.seed(seed)
        want = theirs(x.clone(), y)
        np.random.seed(seed)
        got = ours(x.clone(), y)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), seed


@pytest.mark.interop
def test_random_erasing_draws_as_timm():
    timm_erasing = pytest.importorskip("timm.data.random_erasing")
    theirs = timm_erasing.RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")
    x, _ = _batch(n=64, size=32)
    random.seed(3)
    torch.manual_seed(3)
    want = theirs(x.clone())
    random.seed(3)
    torch.manual_seed(3)
    got = random_erase(x.clone(), 0.25)
    assert not torch.equal(want, x) and torch.equal(got, want)


def test_a_steps_generators_depend_on_seed_rank_and_step_alone():
    """Fine-tuning mixes and erases with generators of the step's own: the same (seed, rank, step)
    gives the same batch whatever drew before (a resumed run, on any rank), another rank or step
    another one."""

    def step_batch(seed, rank, step):
        np_rng, py_rng, gen = step_generators(seed, rank, step, torch.device("cpu"))
        x, y = _batch(n=16, size=16)
        random_erase(x, 0.5, py_rng, gen)
        return Mixup(5)(x, y, np_rng)

    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    a = step_batch(0, 1, 7)
    np.random.rand(3), random.random(), torch.rand(2)  # other draws in between change nothing
    b = step_batch(0, 1, 7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in ((0, 0, 7), (0, 1, 8), (1, 1, 7)):
        assert not torch.equal(step_batch(*other)[0], a[0]), other
