"""Tests of adlib.eval.probes: a feature that carries the label reads out perfectly, noise reads out at chance."""
from __future__ import annotations

import numpy as np
import pytest

from adlib.eval.probes import probe_aurocs


def _scenes(n: int = 80, side: int = 4, k: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, side * k, side * k), bool)
    for i in range(0, n, 2):  # every other image has one defective patch (fully covered)
        r, c = rng.integers(side, size=2)
        masks[i, r * k:(r + 1) * k, c * k:(c + 1) * k] = True
    patch_label = masks.reshape(n, side, k, side, k).mean(axis=(2, 4)).reshape(n, -1) > 0.25
    return masks, patch_label, rng


def test_features_that_carry_the_label_read_out_perfectly_and_noise_at_chance():
    masks, patch_label, rng = _scenes()
    tokens = rng.normal(size=(*patch_label.shape, 6))
    tokens[..., 0] += 8 * patch_label  # one channel says "defect here", far above the noise
    glob = np.c_[masks.any(axis=(1, 2)).astype(float), rng.normal(size=(len(masks), 5))]
    out = probe_aurocs(glob, tokens, masks)
    assert out == pytest.approx({k: 1.0 for k in out}, abs=0.01)
    noise = probe_aurocs(rng.normal(size=glob.shape), rng.normal(size=tokens.shape), masks)
    assert all(0.25 < v < 0.75 for v in noise.values())


def test_a_patch_grid_that_does_not_fit_the_masks_is_refused():
    masks, patch_label, rng = _scenes()
    with pytest.raises(ValueError, match="square grid"):
        probe_aurocs(rng.normal(size=(80, 3)), rng.normal(size=(80, 15, 3)), masks)
