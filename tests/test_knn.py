"""Patch kNN, the per-pixel Gaussian and patch features against brute-force computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from adlib.features import cnn
from adlib.methods import base, baselines, knn


def test_patch_knn_matches_brute_force_distances():
    g = torch.Generator().manual_seed(0)
    bank, test = torch.randn(3, 8, 4, 5, generator=g), torch.randn(2, 8, 4, 5, generator=g)
    rows_bank = bank.permute(0, 2, 3, 1).reshape(-1, 8).double()
    rows_test = test.permute(0, 2, 3, 1).reshape(-1, 8).double()
    d = torch.cdist(rows_test, rows_bank)
    for k in (1, 3):
        expected = d.topk(k, largest=False).values.mean(1).reshape(2, 4, 5).numpy()
        got = knn.PatchKNN(k=k).fit(bank).score_maps(test)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_patch_knn_scores_a_training_patch_zero():
    f = torch.randn(2, 4, 3, 3)
    assert np.allclose(knn.PatchKNN().fit(f).score_maps(f), 0.0, atol=1e-3)


def test_patch_knn_errors():
    with pytest.raises(RuntimeError, match="Call fit"):
        knn.PatchKNN().score_maps(torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        knn.PatchKNN().fit(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="channels"):
        knn.PatchKNN().fit(torch.zeros(1, 2, 2, 2)).score_maps(torch.zeros(1, 3, 2, 2))


def test_to_pixel_maps_upsamples_and_blurs():
    maps = np.zeros((1, 4, 4))
    maps[0, 1, 1] = 1.0
    up = base.to_pixel_maps(maps, 16, sigma=0)
    assert up.shape == (1, 16, 16)
    row, col = np.unravel_index(up[0].argmax(), (16, 16))
    assert 4 <= row <= 7 and 4 <= col <= 7  # inside the upsampled cell (1, 1)
    blurred = base.to_pixel_maps(maps, 16, sigma=2)
    np.testing.assert_allclose(blurred[0], ndimage.gaussian_filter(up[0], 2))


def test_pixel_gaussian_is_the_summed_z_score():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(20, 3, 5, 5)), rng.normal(size=(4, 3, 5, 5))
    model = baselines.PixelGaussian(eps=0.0).fit(train)
    expected = np.zeros((4, 5, 5))
    for c in range(3):
        expected += (test[:, c] - train[:, c].mean(0)) ** 2 / train[:, c].var(0)
    np.testing.assert_allclose(model.score_maps(test), expected)
    with pytest.raises(ValueError, match="fitted on"):
        model.score_maps(rng.normal(size=(1, 3, 4, 4)))


def test_patch_features_shape_and_determinism():
    images = torch.rand(3, 3, 64, 64)
    a = cnn.patch_features(cnn.feature_extractor("resnet18", (1, 2), seed=0), images)
    b = cnn.patch_features(cnn.feature_extractor("resnet18", (1, 2), seed=0), images, grid=8)
    assert a.shape == (3, 64 + 128, 16, 16) and b.shape == (3, 192, 8, 8)
    again = cnn.patch_features(cnn.feature_extractor("resnet18", (1, 2), seed=0), images)
    assert torch.equal(a, again)
