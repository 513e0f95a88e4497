"""Weighted kNN on frozen features (DINO's rule)."""

from __future__ import annotations

import math

import pytest
import torch

from fastmae.knn import knn_accuracy, knn_classify, topk_accuracy


def test_weighted_vote_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.1]])
    scores = knn_classify(train, labels, test, num_classes=2, k=2, temperature=0.5)
    t = torch.nn.functional.normalize(test, dim=1)[0]
    s0, s1 = (t @ train[0]).item(), (t @ train[1]).item()  # the two nearest, already unit norm
    assert scores[0, 0].item() == pytest.approx(math.exp(s0 / 0.5), rel=1e-6)
    assert scores[0, 1].item() == pytest.approx(math.exp(s1 / 0.5), rel=1e-6)


def test_separable_clusters_are_classified():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 4
    train_y = torch.arange(5).repeat_interleave(30)
    test_y = torch.arange(5).repeat_interleave(10)
    train = centers[train_y] + torch.randn(150, 16, generator=g)
    test = centers[test_y] + torch.randn(50, 16, generator=g)
    acc = knn_accuracy(train, train_y, test, test_y, num_classes=5)
    assert acc["top1"] == 100.0 and acc["top5"] == 100.0
    noise = knn_accuracy(torch.randn(150, 16, generator=g), train_y, test, test_y, num_classes=5)
    assert noise["top1"] < 60.0


def test_topk_and_label_checks():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]])
    acc = topk_accuracy(scores, torch.tensor([1, 2]), ks=(1, 2))
    assert acc == {"top1": 50.0, "top2": 100.0}
    with pytest.raises(ValueError, match="labels"):
        knn_classify(torch.randn(3, 4), torch.tensor([0, -1, 1]), torch.randn(1, 4), num_classes=2)
