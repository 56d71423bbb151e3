"""Claim checks: the bootstrap, the intervals and the one verdict rule, against direct computations."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from adlib import claims


def test_bootstrap_differences_match_a_direct_loop() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30, int), np.ones(20, int)]
    a, b = rng.normal(size=50) + y, rng.normal(size=50) + 0.3 * y
    draws = claims.bootstrap_differences(y, a, b, n_boot=50, seed=7)
    check = np.random.default_rng(7)
    normal, anomalous = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    for d in draws:
        idx = np.concatenate([check.choice(normal, 30), check.choice(anomalous, 20)])
        assert d == pytest.approx(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    assert draws.mean() > 0  # a separates the classes better than b
    with pytest.raises(ValueError, match="one entry per image"):
        claims.bootstrap_differences(y, a[:-1], b)


def test_bootstrap_of_several_trainings_is_the_mean_of_their_paired_draws() -> None:
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(30, int), np.ones(20, int)]
    runs, b = rng.normal(size=(3, 50)) + y, rng.normal(size=50) + 0.3 * y
    together = claims.bootstrap_differences(y, runs, b, n_boot=40, seed=3)
    one_by_one = np.mean([claims.bootstrap_differences(y, run, b, n_boot=40, seed=3) for run in runs], axis=0)
    np.testing.assert_allclose(together, one_by_one, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="one entry per image"):
        claims.bootstrap_differences(y, runs[:, :-1], b)


def test_intervals_and_the_verdict_rule() -> None:
    draws = np.arange(1001) / 1000.0
    assert claims.percentile_interval(draws) == pytest.approx((0.025, 0.975))
    d = np.array([0.02, 0.03, 0.05, 0.01, 0.04])
    mean, low, high = claims.spread_interval(d)
    expected = stats.t.interval(0.95, df=4, loc=d.mean(), scale=stats.sem(d))
    assert (low, high) == pytest.approx(expected) and mean == pytest.approx(d.mean())
    assert claims.verdict(0.01, 0.05) and not claims.verdict(-0.01, 0.05)
    assert claims.verdict(-0.005, 0.01, margin=-0.01) and not claims.verdict(-0.02, 0.01, margin=-0.01)
    with pytest.raises(ValueError, match="low <= high"):
        claims.verdict(0.2, 0.1)
    with pytest.raises(ValueError, match="at least 2"):
        claims.spread_interval([0.1])


def test_a_claim_renders_its_verdict_and_numbers() -> None:
    held = claims.check("1", "kNN beats the Gaussian", "AUROC", 0.1, 0.05, 0.15, "bootstrap", paper="0.9 (X 2020)")
    failed = claims.check("1", "LOF beats the Gaussian", "AUROC", -0.01, -0.03, 0.01, "bootstrap", why="it does not")
    assert held.holds and not failed.holds
    box = claims.claim_html(held)
    assert "holds" in box and "+0.100" in box and "[+0.050, +0.150]" in box and "0.9 (X 2020)" in box
    assert "does not hold" in claims.claim_html(failed) and "it does not" in claims.claim_html(failed)
    rows = claims.table([held, failed])
    assert list(rows.columns) == ["chapter", "claim", "paper", "ours", "holds"]
    assert rows["holds"].tolist() == ["yes", "no"] and rows["paper"].tolist() == ["0.9 (X 2020)", "-"]


def test_conclusions_list_every_claim_with_its_verdict() -> None:
    a = claims.check("9", "A beats B.", "AUROC", 0.1, 0.05, 0.15, "bootstrap")
    b = claims.check("9", "C beats D.", "AUROC", -0.02, -0.08, 0.04, "bootstrap")
    assert claims.conclusions([a, b]).splitlines() == [
        "- holds: A beats B. (AUROC +0.100, [+0.050, +0.150])",
        "- does not hold: C beats D. (AUROC -0.020, [-0.080, +0.040])",
    ]
