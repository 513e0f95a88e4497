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


def test_knn_monitor_during_pretraining(tmp_path):
    """``--knn-every 1``: a kNN record per epoch in metrics.jsonl, from the labelled training set,
    and one at the run's last step, mid-epoch here (its epoch counted as the loss records count it;
    it said 2 at step 9, with 6 steps an epoch)."""
    from fastmae.data import make_demo_dataset
    from fastmae.log import read_metrics
    from fastmae.train import main

    data = make_demo_dataset(tmp_path / "data", n_images=48, size=40, seed=0)
    args = ["--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
            "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2", "--num-workers", "0",
            "--no-progress", "--log-every", "1", "--warmup-epochs", "1", "--epochs", "2", "--batch-size", "8",
            "--data-path", str(data), "--run-dir", str(tmp_path / "run"), "--knn-every", "1",
            "--max-steps", "9"]  # fmt: skip
    assert main(args) == 0
    knn = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "knn_top1" in r]
    assert [(r["step"], r["epoch"]) for r in knn] == [(6, 1.0), (9, 1.5)]
    assert all(0.0 <= r["knn_top1"] <= 100.0 and r["knn_top5"] == 100.0 for r in knn)  # 4 classes


def test_knn_monitor_needs_labels(tmp_path):
    from PIL import Image

    from fastmae.data import DataError
    from fastmae.data.sources import open_source
    from fastmae.knn import KnnMonitor

    for i in range(10):
        Image.new("RGB", (40, 40), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match="labelled"):
        KnnMonitor(open_source(tmp_path), 32, torch.device("cpu"))


def test_knn_monitor_with_nothing_readable_logs_nan_and_restores_the_mode(tmp_path, caplog):
    """The monitor never stops a pretraining run: a split with no readable image left gives NaN
    accuracies and a warning, and the model goes back to training mode."""
    from PIL import Image

    from fastmae.data.sources import open_source
    from fastmae.knn import KnnMonitor
    from fastmae.model import MaskedAutoencoderViT

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * c, 30 * i, 0)).save(tmp_path / f"c{c}" / f"{i}.png")
    monitor = KnnMonitor(open_source(tmp_path), 32, torch.device("cpu"), num_workers=0)
    for path, _ in monitor.val.samples:
        open(path, "wb").close()  # every val image unreadable from now on
    model = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2).train()  # fmt: skip
    acc = monitor.evaluate(model)
    assert math.isnan(acc["top1"]) and math.isnan(acc["top5"]) and model.training
    assert "kNN monitor skipped" in caplog.text


def test_candidates_from_shards_vote_as_the_whole_set():
    """Fine-tuning's kNN under torchrun: each rank's nearest neighbours in its own share of the
    training set, joined, vote exactly as the neighbours in the whole set (a shard smaller than k,
    and an empty one, included)."""
    from fastmae.knn import knn_neighbours, knn_vote

    g = torch.Generator().manual_seed(1)
    train, train_y = torch.randn(203, 24, generator=g), torch.randint(0, 7, (203,), generator=g)
    test = torch.randn(37, 24, generator=g)
    whole = knn_classify(train, train_y, test, num_classes=7, k=20, temperature=0.07)
    shards = [slice(0, 90), slice(90, 95), slice(95, 95), slice(95, 203)]
    parts = [knn_neighbours(train[s], train_y[s], test, k=20) for s in shards]
    assert [p[0].shape[1] for p in parts] == [20, 5, 0, 20]
    sims, labels = (torch.cat([p[i] for p in parts], dim=1) for i in (0, 1))
    torch.testing.assert_close(knn_vote(sims, labels, 7, k=20, temperature=0.07), whole, rtol=1e-6, atol=0)
