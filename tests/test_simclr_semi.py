"""Chapter 4's semi-supervised protocol and shipped encoders: label subsets, fine-tuning, the paired interval over
runs and images against a direct bootstrap, the one-branch augmentation and the recipes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adlib.eval import claims
from adlib.methods import simclr, simclr_semi
from adlib.recipes import checkpoints, simclr_digits

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_label_subset_is_stratified_repeatable_and_has_every_class():
    y = np.repeat(np.arange(10), 30)
    idx = simclr_semi.label_subset(y, 0.1, seed=3)
    assert len(idx) == 30 and np.array_equal(np.bincount(y[idx]), [3] * 10)
    assert np.array_equal(idx, simclr_semi.label_subset(y, 0.1, seed=3))
    assert not np.array_equal(idx, simclr_semi.label_subset(y, 0.1, seed=4))
    assert set(y[simclr_semi.label_subset(y, 0.01, seed=0)]) == set(range(10))  # 3 images would miss classes


def test_paired_difference_is_the_accuracy_gap_and_with_one_run_the_plain_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    a = np.where(rng.random(200) < 0.8, y, (y + 1) % 3)
    b = np.where(rng.random(200) < 0.6, y, (y + 1) % 3)
    mean, low, high = simclr_semi.paired_accuracy_difference(y, a[None], b[None], seed=5)
    assert mean == pytest.approx((a == y).mean() - (b == y).mean())
    # the same draws as the book's bootstrap of two accuracies on the same resampled images
    draws = claims.bootstrap_differences(y, a, b, metric=lambda t, p: float((t == p).mean()), seed=5)
    assert (low, high) == pytest.approx(claims.percentile_interval(draws))
    same = simclr_semi.paired_accuracy_difference(y, np.stack([a, b]), np.stack([a, b]))
    assert same == (0.0, 0.0, 0.0)  # paired by run: identical runs never differ
    with pytest.raises(ValueError, match="prediction arrays"):
        simclr_semi.paired_accuracy_difference(y, a[None], np.stack([b, b]))


def test_fine_tune_fits_its_labels_repeats_and_leaves_the_encoder_alone():
    torch.manual_seed(0)
    images = torch.rand(20, 3, 8, 8)
    labels = np.arange(20) % 2
    images[labels == 1, 0] += 1.0  # class 1: a brighter red channel
    encoder = simclr.ConvEncoder(width=4)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    net, losses = simclr_semi.fine_tune(encoder, images, labels, n_classes=2, steps=60, augment=lambda x: x,
                                        batch_size=8, lr=1e-2, seed=1)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert (simclr_semi.predict(net, images) == labels).mean() >= 0.9
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())
    again, losses_again = simclr_semi.fine_tune(encoder, images, labels, n_classes=2, steps=60,
                                                augment=lambda x: x, batch_size=8, lr=1e-2, seed=1)
    assert losses == losses_again
    with pytest.raises(ValueError, match="one label per image"):
        simclr_semi.fine_tune(encoder, images, labels[:5], n_classes=2, steps=1, augment=lambda x: x)


def test_simclr_step_gives_the_second_view_its_own_augmentation():
    seen = []

    def first(x):
        seen.append("first")
        return x

    def second(x):
        seen.append("second")
        return x.flip(-1)

    torch.manual_seed(0)
    enc = simclr.ConvEncoder(width=4)
    head = simclr.ProjectionHead(enc.feature_dim, out_dim=8)
    opt = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.0)
    simclr.simclr_step(enc, head, opt, first, augment2=second)(torch.rand(4, 3, 8, 8))
    simclr.simclr_step(enc, head, opt, first)(torch.rand(4, 3, 8, 8))
    assert seen == ["first", "second", "first", "first"]


def test_the_recipes_policies_and_names():
    view1, view2 = simclr_digits.augmentations("colour")
    torch.manual_seed(0)
    flat = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1).expand(64, -1, 16, 16).contiguous()
    assert torch.allclose(view1(flat), flat, atol=1e-6)  # first branch: crop and flip only, a flat image stays
    changed = (view2(flat) - flat).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert 0.5 < changed.float().mean() < 1  # second branch: colour jitter (p 0.8) or grayscale (p 0.2) too
    recipes = checkpoints.all_recipes()
    for policy, seed in simclr_digits.RUNS:
        spec = recipes[simclr_digits.name(policy, seed)]
        assert spec.seed == seed and spec.card == "SIMCLR_DIGITS.md"
    a, b = simclr_digits.setup("crop", 1), simclr_digits.setup("crop", 1)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert len(a.loader) * a.epochs == 3000 and a.official_steps == simclr_digits.OFFICIAL_STEPS


def test_linear_predict_matches_sklearn():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    d = load_digits()
    xtr, ytr, xte = d.data[:1000], d.target[:1000], d.data[1000:]
    sc = StandardScaler().fit(xtr)
    ref = LogisticRegression(max_iter=2000).fit(sc.transform(xtr), ytr).predict(sc.transform(xte))
    assert np.array_equal(simclr.linear_predict(xtr, ytr, xte), ref)
    with pytest.raises(ValueError, match="one label per row"):
        simclr.linear_predict(xtr, ytr[:5], xte)
