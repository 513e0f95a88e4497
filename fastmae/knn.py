"""Weighted k-nearest-neighbour classification on frozen features, as in DINO.

Cosine similarity between L2-normalised features, the ``k`` nearest training samples vote with
weight ``exp(similarity / T)`` (k = 20, T = 0.07 in DINO). A cheap signal of representation quality
during pretraining, with no training of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from fastmae.data.sources import DataError
from fastmae.distributed import all_gather_object

logger = logging.getLogger("fastmae.knn")


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_batches: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encode`` over ``(images, labels)`` batches: features ``(M, D)`` float32 on CPU, labels ``(M,)``."""
    feats, labels = [], []
    for i, (images, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        feats.append(encode(images).float().cpu())
        labels.append(y.cpu())
    if not feats:
        raise ValueError("no batches to extract features from")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_neighbours(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, k: int = 20, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and labels of each test sample's ``k`` nearest training samples:
    ``(M_test, k')`` each, ``k' = min(k, M_train)``. Candidates from several shards of the training
    set merge by :func:`knn_vote` as if found in one."""
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    sims, labels = [], []
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T  # (B, M_train)
        top_sim, top_idx = sim.topk(k, dim=1)
        sims.append(top_sim)
        labels.append(train_labels[top_idx])
    if not sims:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(sims), torch.cat(labels)


def knn_vote(
    sims: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07
) -> torch.Tensor:
    """Class scores ``(M_test, num_classes)``: the ``k`` most similar candidates vote, weighted by
    ``exp(sim / temperature)``. ``sims`` / ``labels``: ``(M_test, C)`` candidates (C >= 1)."""
    top_sim, at = sims.topk(min(k, sims.shape[1]), dim=1)
    votes = torch.zeros(sims.shape[0], num_classes)
    votes.scatter_add_(1, labels.gather(1, at), (top_sim / temperature).exp())
    return votes


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 256,
) -> torch.Tensor:
    """Class scores ``(M_test, num_classes)`` from a weighted vote of the ``k`` nearest training samples.

    Args:
        train_features: ``(M_train, D)``; train_labels ``(M_train,)`` in ``[0, num_classes)``.
        test_features: ``(M_test, D)``.
    """
    check_labels(train_labels, num_classes)
    sims, labels = knn_neighbours(train_features, train_labels, test_features, k, chunk)
    return knn_vote(sims, labels, num_classes, k, temperature)


def check_labels(train_labels: torch.Tensor, num_classes: int) -> None:
    """Refuse labels outside ``[0, num_classes)`` (an unlabelled source's -1)."""
    if len(train_labels) and (train_labels.min() < 0 or train_labels.max() >= num_classes):
        raise ValueError("kNN needs labels in [0, num_classes); the source has unlabelled images")


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent for each ``k`` (``k`` larger than the number of classes counts all)."""
    out = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (scores.topk(k_eff, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of :func:`knn_classify`."""
    scores = knn_classify(train_features, train_labels, test_features, num_classes, k, temperature)
    return topk_accuracy(scores, test_labels)


# ---- fine-tuning's kNN over torchrun ranks ----------------------------------------------------


def own_features(
    encode: Callable[[torch.Tensor], torch.Tensor], loader: Iterable
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Features and labels of this rank's share (None where it has none: fewer images than processes)."""
    try:
        return extract_features(encode, loader)
    except ValueError:  # no batches in this rank's share
        return None


def all_features(encode: Callable[[torch.Tensor], torch.Tensor], loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of the whole set on every rank (each encodes its share)."""
    parts = all_gather_object(own_features(encode, loader))
    parts = [p for p in parts if p is not None]
    if not parts:
        raise DataError("no images to extract features from")
    return torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts])


def knn_result(
    encode: Callable[[torch.Tensor], torch.Tensor],
    train: Iterable,
    val: Iterable,
    num_classes: int,
    k: int,
    temperature: float,
) -> dict[str, float]:
    """kNN top-1 / top-5 over the whole sets, split across the ranks: every rank gets all the
    validation features, takes each one's ``k`` nearest in its own share of the training set, and
    the candidates of all ranks vote. Each rank holds its own share of the training features only
    (every share on every rank: several GB each for ImageNet), and every rank votes (on rank 0
    alone, ImageNet's CPU vote outlasted NCCL's 10-minute wait of the others)."""
    val_f, val_y = all_features(encode, val)
    own = own_features(encode, train)
    if own is not None:
        check_labels(own[1], num_classes)
        candidates = knn_neighbours(*own, val_f, k)
    else:
        candidates = (torch.zeros(len(val_f), 0), torch.zeros(len(val_f), 0, dtype=torch.long))
    parts = all_gather_object(candidates)  # [candidates] in a world of one
    sims, labels = (torch.cat([p[i] for p in parts], dim=1) for i in (0, 1))
    if sims.shape[1] == 0:
        raise DataError("no training images to extract features from")
    return topk_accuracy(knn_vote(sims, labels, num_classes, k, temperature), val_y)


class KnnMonitor:
    """kNN accuracy of a pretraining model's frozen features: a cheap signal every few epochs.

    Features are the mean of the encoder's patch tokens through its final norm (the global-pool
    features that fine-tuning starts from), on center crops of a labelled source split into a
    train and a val part. ``max_images`` caps the cost.

    Args:
        source: a labelled :class:`fastmae.data.Source`.
        image_size: the model's input side.
    """

    def __init__(
        self,
        source,
        image_size: int,
        device: torch.device,
        *,
        val_fraction: float = 0.2,
        k: int = 20,
        temperature: float = 0.07,
        max_images: int = 10_000,
        batch_size: int = 128,
        num_workers: int = 2,
        seed: int = 0,
    ):
        from fastmae.data import DataError
        from fastmae.data.eval import EvalLoader, split_source

        if min(y for _, y in source.samples) < 0:
            raise DataError("--knn-every needs labelled images (an ImageFolder tree or a file list with labels)")
        if len(source) > max_images:
            step = len(source) / max_images
            source = type(source)(
                root=source.root,
                samples=[source.samples[int(i * step)] for i in range(max_images)],
                kind=source.kind,
                classes=source.classes,
            )
        hint = "every class has one image: use a larger --knn-max-images, or a --knn-data-path with more"
        train, val = split_source(source, val_fraction, seed, empty_hint=hint)
        self.num_classes = 1 + max(y for _, y in source.samples)
        self.k, self.temperature = k, temperature
        kw = dict(device=device, num_workers=num_workers)
        self.train = EvalLoader(train, batch_size, image_size, **kw)
        self.val = EvalLoader(val, batch_size, image_size, **kw)

    @staticmethod
    def features(model, images: torch.Tensor) -> torch.Tensor:
        """``(N, D)``: the final norm of the mean patch token (the cls token left out)."""
        tokens = model.forward_features(images, norm=False)
        return model.norm(tokens[:, 1:].mean(dim=1))

    @torch.no_grad()
    def evaluate(self, model, autocast=None) -> dict[str, float]:
        """Top-1 / top-5 (%) of the weighted kNN; the model is put back in its previous mode.

        A monitor, not the run: when a split has no readable image left (the loaders skip and
        report unreadable files), the accuracies are NaN, logged, and training goes on.
        """
        from contextlib import nullcontext

        was_training = model.training
        model.eval()
        try:
            with autocast if autocast is not None else nullcontext():
                train_f, train_y = extract_features(lambda x: self.features(model, x), self.train)
                val_f, val_y = extract_features(lambda x: self.features(model, x), self.val)
        except ValueError as e:  # no batches: every image of a split unreadable
            logger.warning("kNN monitor skipped: %s (see the bad-file report)", e)
            return {"top1": float("nan"), "top5": float("nan")}
        finally:
            model.train(was_training)
        return knn_accuracy(train_f, train_y, val_f, val_y, self.num_classes, self.k, self.temperature)
