"""SimCLR's semi-supervised protocol (Chen et al., 2020, Table 7): fine-tune the pretrained encoder with a linear
classifier on a small labelled subset, against the same network trained from scratch on it; and paired accuracy
differences over training runs and test images.

Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
"""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlib.eval import claims


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a class-stratified random ``fraction`` of ``labels`` (n,), at least one per class.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels)
    n = max(len(np.unique(y)), round(fraction * len(y)))
    return np.sort(train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)[0])


def fine_tune(encoder: nn.Module, images: Tensor, labels: np.ndarray, *, n_classes: int, steps: int,
              augment: Callable[[Tensor], Tensor], batch_size: int = 64, lr: float = 1e-3,
              seed: int = 0) -> tuple[nn.Module, list[float]]:
    """A copy of ``encoder`` (its ``feature_dim`` outputs) with a new linear layer, trained end to end with
    cross-entropy on ``images`` (n, 3, S, S) and ``labels`` (n,): ``steps`` Adam steps at a constant ``lr`` on
    random batches of ``batch_size`` (all n when fewer), every batch through ``augment``. The paper fine-tunes with
    crop and flip only. Returns the classifier, in eval mode, and the loss of every step.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    if len(images) != len(labels):
        raise ValueError(f"need one label per image, got {len(labels)} labels for {len(images)} images.")
    torch.manual_seed(seed)
    net = nn.Sequential(copy.deepcopy(encoder), nn.Linear(encoder.feature_dim, n_classes))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    losses = []
    for _ in range(steps):
        idx = torch.randperm(len(images), generator=generator)[:batch_size]
        loss = F.cross_entropy(net(augment(images[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return net.eval(), losses


@torch.no_grad()
def predict(net: nn.Module, images: Tensor, batch_size: int = 512) -> np.ndarray:
    """Predicted classes (n,) of a classifier on ``images`` (n, 3, S, S).

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    net.eval()
    return torch.cat([net(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]).numpy()


def paired_accuracy_difference(labels: np.ndarray, predictions_a: np.ndarray, predictions_b: np.ndarray,
                               seed: int = 0) -> tuple[float, float, float]:
    """Mean accuracy of A minus B and its 95 % interval: (mean, low, high). ``predictions_a`` and ``predictions_b``
    are (K, n): K paired runs (seeds, label draws) of both on the same n test images; the bootstrap
    (:func:`adlib.eval.claims.bootstrap_differences`) resamples the runs and the images together.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    y = np.asarray(labels)
    a, b = np.atleast_2d(predictions_a), np.atleast_2d(predictions_b)
    if a.shape != b.shape or a.shape[1] != len(y):
        raise ValueError(f"need two (K, n) prediction arrays for {len(y)} labels, got {a.shape} and {b.shape}.")
    # the per-run difference of correctness, paired: B's runs move with A's when the bootstrap resamples runs
    gap = (a == y).astype(float) - (b == y).astype(float)
    draws = claims.bootstrap_differences(y, gap, np.zeros(len(y)), metric=lambda _, s: float(np.mean(s)), seed=seed)
    return (float(gap.mean()), *claims.percentile_interval(draws))
