"""Profiles, seeding, device choice, show_versions and the classic detectors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import adlib
from adlib.data import oneclass
from adlib.methods import classic


def test_unknown_profile_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown profile 'fast'.*'smoke'.*'book'.*'paper'"):
        adlib.check_profile("fast")


def test_by_profile_picks_the_value():
    assert [adlib.by_profile(p, smoke=1, book=2, paper=3) for p in ("smoke", "book", "paper")] == [1, 2, 3]
    with pytest.raises(ValueError, match="Unknown profile"):
        adlib.by_profile("Book", smoke=1, book=2, paper=3)


def test_seed_everything_repeats_random_draws():
    adlib.seed_everything(7)
    a = (np.random.rand(3), torch.rand(3))
    adlib.seed_everything(7)
    b = (np.random.rand(3), torch.rand(3))
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_choose_device(monkeypatch):
    monkeypatch.delenv("ADLIB_DEVICE", raising=False)
    assert adlib.choose_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert adlib.choose_device().type == expected
    monkeypatch.setenv("ADLIB_DEVICE", "cpu")
    assert adlib.choose_device().type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            adlib.choose_device("cuda")


def test_show_versions_reports_profile_and_seed(capsys):
    info = adlib.versions(profile="smoke", seed=3)
    assert info["profile"] == "smoke" and info["seed"] == "3" and torch.__version__.startswith(info["torch"])
    assert adlib.show_versions(profile="smoke", seed=3) is None
    out = capsys.readouterr().out
    assert "profile" in out and "smoke" in out


def test_one_class_digits_protocol():
    sp = oneclass.one_class_digits(3, seed=0)
    assert sp.x_train.shape[1] == 64 and sp.x_train.dtype == np.float32
    assert 0.0 <= sp.x_train.min() and sp.x_train.max() <= 1.0
    assert set(np.unique(sp.y_test)) == {0, 1}
    assert np.array_equal(sp.y_test, (sp.classes_test != 3).astype(int))
    assert len(np.unique(sp.classes_test)) == 10
    with pytest.raises(ValueError, match="digit 0-9"):
        oneclass.one_class_digits(10)


def test_mnist_sample_is_real_mnist_offline_padded_to_32_px():
    images, labels = oneclass.mnist_sample()
    assert images.shape == (5000, 32, 32) and images.dtype == np.float32
    assert np.bincount(labels).tolist() == [500] * 10
    assert images[:, :2].max() == 0 and images[:, :, 30:].max() == 0 and images.max() == 1.0
    sp = oneclass.one_class_digits([d for d in range(10) if d != 7], dataset="mnist", seed=0)
    assert sp.x_train.shape == (2250, 1024) and len(sp.x_test) == 2500
    assert np.array_equal(sp.y_test, (sp.classes_test == 7).astype(int))
    with pytest.raises(ValueError, match="dataset must be one of"):
        oneclass.one_class_digits(3, dataset="cifar")


def _brute_force_knn(x_train, x, k):
    d = np.sqrt(((x[:, None, :] - x_train[None, :, :]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, :k].mean(axis=1)


def test_knn_score_matches_a_brute_force_loop():
    rng = np.random.default_rng(0)
    x_train, x = rng.normal(size=(40, 5)), rng.normal(size=(7, 5))
    np.testing.assert_allclose(classic.fit_detector("kNN", x_train, k=3)(x), _brute_force_knn(x_train, x, 3))


def test_gaussian_score_matches_mahalanobis_by_hand():
    rng = np.random.default_rng(1)
    x_train, x = rng.normal(size=(500, 3)) * [1, 2, 3], rng.normal(size=(5, 3))
    from sklearn.covariance import LedoitWolf
    lw = LedoitWolf().fit(x_train)
    diff = x - lw.location_
    expected = np.sqrt(np.einsum("nd,de,ne->n", diff, np.linalg.inv(lw.covariance_), diff))
    np.testing.assert_allclose(classic.fit_detector("Gaussian", x_train)(x), expected, rtol=1e-6)


@pytest.mark.parametrize("name", list(classic.DETECTORS))
def test_every_detector_separates_an_obvious_outlier_cluster(name):
    rng = np.random.default_rng(2)
    x_train = rng.normal(size=(200, 4))
    x = np.vstack([rng.normal(size=(50, 4)), rng.normal(size=(50, 4)) + 6])
    y = np.r_[np.zeros(50), np.ones(50)]
    assert roc_auc_score(y, classic.fit_detector(name, x_train)(x)) > 0.95


def test_unknown_detector_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="Unknown detector 'SVDD'"):
        classic.fit_detector("SVDD", np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"\(n >= 2, d\)"):
        classic.fit_detector("kNN", np.zeros(5))


def test_global_statistics_by_hand() -> None:
    import numpy as np

    from adlib.methods import baselines

    img = np.zeros((1, 2, 2, 2))
    img[0, 0] = [[0.0, 0.25], [0.5, 0.75]]
    img[0, 1] = 1.0
    f = baselines.global_statistics(img, bins=4)
    assert f.shape == (1, 2 * (2 + 4))
    assert np.allclose(f[0, :2], [0.375, 1.0]) and np.allclose(f[0, 2:4], [np.std([0, 0.25, 0.5, 0.75]), 0.0])
    assert np.allclose(f[0, 4:8], [0.25, 0.25, 0.25, 0.25]) and np.allclose(f[0, 8:12], [0, 0, 0, 1])
