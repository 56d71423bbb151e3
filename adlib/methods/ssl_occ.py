"""SSL-OCC (Sohn et al., ICLR 2021): rotation prediction, and one-class heads on learned features."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlib.methods.classic import Scorer
from adlib.methods.simclr import rotate
from adlib.training.loop import StepFn, batch_images, model_device


def rotation_step(
    encoder: nn.Module,
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    augment: Callable[[Tensor], Tensor] | None = None,
) -> StepFn:
    """A step function for :func:`adlib.training.loop.fit`: 4-way rotation prediction (0, 90, 180, 270 degrees).

    Every image of the batch (optionally ``augment``-ed first) appears in its four rotations; the
    ``classifier`` (features -> 4 logits) learns which one it sees. Returns ``step(batch) ->
    {"loss": float, "acc": float}``.

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    device = model_device(encoder)

    def step(batch: Any) -> dict[str, float]:
        x = batch_images(batch)
        if augment is not None:
            x = augment(x)
        k = torch.arange(4).repeat_interleave(len(x))
        x4 = rotate(x.repeat(4, 1, 1, 1), k).to(device)
        k = k.to(device)
        encoder.train()
        classifier.train()
        logits = classifier(encoder(x4))
        loss = F.cross_entropy(logits, k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "acc": (logits.argmax(1) == k).float().mean().item()}

    return step


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows of ``features`` (n, d) scaled to unit length (float64), as SSL-OCC before every head.

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"Expected features as an (n, d) array, got shape {f.shape}.")
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def _paper_gamma(f: np.ndarray) -> float:
    # official code: "10 times larger value of gamma" than sklearn's 'scale' (1 / (var * d))
    return 10.0 / (f.var() * f.shape[1])


def ocsvm_head(features: np.ndarray, nu: float = 0.5, gamma: float | None = None) -> Scorer:
    """OC-SVM (RBF) on L2-normalised features (n, d) -> ``score(x) -> (m,)``, higher = more anomalous.

    As the official code: ``gamma = 10 / (var(f) * d)`` over the normalised training features (ten
    times sklearn's ``"scale"``), sklearn's default ``nu`` 0.5, score = minus ``score_samples``.

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    from sklearn.svm import OneClassSVM

    f = l2_normalize(features)
    svm = OneClassSVM(kernel="rbf", nu=nu, gamma=_paper_gamma(f) if gamma is None else gamma).fit(f)
    return lambda x: -svm.score_samples(l2_normalize(x))


def kde_head(features: np.ndarray, gamma: float | None = None) -> Scorer:
    """Gaussian KDE on L2-normalised features (n, d) -> ``score(x) -> (m,)``, higher = more anomalous.

    As the official code: with unit vectors ``|x - f|^2 = 2 - 2 x.f``, so the score is
    ``-logsumexp(2 gamma x.f) / gamma`` over the training features ``f``, a monotone transform of the
    negative log-density with kernel ``exp(-gamma |x - f|^2)``; ``gamma`` as :func:`ocsvm_head`.

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    from scipy.special import logsumexp

    f = l2_normalize(features)
    g = _paper_gamma(f) if gamma is None else gamma

    def score(x: np.ndarray) -> np.ndarray:
        return -logsumexp(2 * g * (l2_normalize(x) @ f.T), axis=1) / g

    return score


def gaussian_head(features: np.ndarray, reg_covar: float = 1e-6) -> Scorer:
    """Gaussian density (full covariance) on L2-normalised features (n, d) -> ``score(x) -> (m,)``.

    As the official code: a one-component ``GaussianMixture`` (``reg_covar`` added to the diagonal);
    score = minus the log-likelihood, i.e. half the squared Mahalanobis distance plus a constant.

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(n_components=1, covariance_type="full", reg_covar=reg_covar, random_state=0)
    gmm.fit(l2_normalize(features))
    return lambda x: -gmm.score_samples(l2_normalize(x))


ONE_CLASS_HEADS: dict[str, Callable[..., Scorer]] = {"OC-SVM": ocsvm_head, "KDE": kde_head, "Gaussian": gaussian_head}
