"""Classic one-class detectors on feature vectors, all with the same interface.

``fit_detector(name, x_train)`` returns a function ``score(x) -> (n,)`` where a higher score means
"more anomalous". The five detectors are the baselines every later chapter is compared with.

Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors
from sklearn.svm import OneClassSVM

Scorer = Callable[[np.ndarray], np.ndarray]


def gaussian(x_train: np.ndarray) -> Scorer:
    """Mahalanobis distance to a Gaussian fitted to ``x_train`` (n, d).

    The covariance is Ledoit-Wolf shrunk: with fewer samples than dimensions (or constant pixels) the
    sample covariance is singular and its inverse does not exist.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    cov = LedoitWolf().fit(x_train)
    return lambda x: np.sqrt(cov.mahalanobis(np.asarray(x, dtype=np.float64)))


def knn_distance(x_train: np.ndarray, k: int = 5) -> Scorer:
    """Mean Euclidean distance from each sample to its ``k`` nearest training samples.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    nn = NearestNeighbors(n_neighbors=k).fit(x_train)
    return lambda x: nn.kneighbors(np.asarray(x))[0].mean(axis=1)


def ocsvm(x_train: np.ndarray, nu: float = 0.1, gamma: str | float = "scale") -> Scorer:
    """One-class SVM with an RBF kernel; score = minus the signed distance to the learned boundary.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    svm = OneClassSVM(kernel="rbf", nu=nu, gamma=gamma).fit(x_train)
    return lambda x: -svm.decision_function(np.asarray(x))


def isolation_forest(x_train: np.ndarray, n_estimators: int = 200, seed: int = 0) -> Scorer:
    """Isolation Forest: anomalies are isolated by fewer random splits; score = minus sklearn's score.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    forest = IsolationForest(n_estimators=n_estimators, random_state=seed).fit(x_train)
    return lambda x: -forest.score_samples(np.asarray(x))


def lof(x_train: np.ndarray, k: int = 20) -> Scorer:
    """Local Outlier Factor in novelty mode: density of a sample relative to its neighbours' density.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    model = LocalOutlierFactor(n_neighbors=min(k, len(x_train) - 1), novelty=True).fit(x_train)
    return lambda x: -model.score_samples(np.asarray(x))


DETECTORS: dict[str, Callable[..., Scorer]] = {
    "Gaussian": gaussian,
    "kNN": knn_distance,
    "OC-SVM": ocsvm,
    "Isolation Forest": isolation_forest,
    "LOF": lof,
}


def fit_detector(name: str, x_train: np.ndarray, **kwargs) -> Scorer:
    """Fit the detector called ``name`` (a key of ``DETECTORS``) on normal samples ``x_train`` (n, d).

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    if name not in DETECTORS:
        raise ValueError(f"Unknown detector {name!r}; choose one of {sorted(DETECTORS)}.")
    x_train = np.asarray(x_train)
    if x_train.ndim != 2 or len(x_train) < 2:
        raise ValueError(f"x_train must be (n >= 2, d) feature vectors, got shape {x_train.shape}.")
    return DETECTORS[name](x_train, **kwargs)
