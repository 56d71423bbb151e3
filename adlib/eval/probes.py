"""Linear probes: how much defect information frozen features hold, read out with labels (a ceiling on what a
linear zero-shot read-out of the same features could reach, not a detector).

Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_score


def probe_aurocs(glob: np.ndarray, tokens: np.ndarray, masks: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Supervised linear read-outs (logistic regression) of frozen features of probe scenes: (N, C) global and
    (N, P, C) patch features on a square grid, (N, H, W) defect masks -> AUROCs. Image level: 5-fold
    cross-validated on the global feature, and the maximum over an image's patches of a patch probe fitted on the
    first half of the scenes (scored on the second). Patch level: a patch is "in a defect" when more than a
    quarter of its pixels are (5-fold cross-validated on at most 20,000 patches drawn with ``seed``).

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    n, side = len(masks), int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1] or masks.shape[-1] % side or len(glob) != n or len(tokens) != n:
        raise ValueError(f"need (N, C) global, (N, P, C) patch features on a square grid and (N, H, W) masks whose "
                         f"side the grid divides; got {glob.shape}, {tokens.shape}, {masks.shape}.")
    k = masks.shape[-1] // side
    in_defect = masks.reshape(n, side, k, side, k).mean(axis=(2, 4)).reshape(n, -1) > 0.25
    defective = masks.any(axis=(1, 2))
    keep = np.random.default_rng(seed).choice(in_defect.size, min(in_defect.size, 20_000), replace=False)
    half = n // 2
    flat = tokens.reshape(-1, tokens.shape[-1])
    patch_probe = LogisticRegression(max_iter=2000).fit(flat[: half * side * side], in_defect[:half].ravel())
    p = patch_probe.predict_proba(flat[half * side * side:])[:, 1].reshape(n - half, -1)
    return {
        "image: global feature": float(cross_val_score(LogisticRegression(max_iter=2000), glob, defective, cv=5,
                                                       scoring="roc_auc").mean()),
        "image: max of a patch probe": float(roc_auc_score(defective[half:], p.max(1))),
        "patch: inside a defect?": float(cross_val_score(LogisticRegression(max_iter=2000), flat[keep],
                                                         in_defect.ravel()[keep], cv=5, scoring="roc_auc").mean()),
    }
