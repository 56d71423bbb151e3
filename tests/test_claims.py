"""Claim checks: the bootstrap, the intervals and the one verdict rule, against direct computations."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from adlib.eval import claims, scorecard


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


def test_bootstrap_of_several_trainings_resamples_the_trainings_with_the_images() -> None:
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(30, int), np.ones(20, int)]
    runs, b = rng.normal(size=(3, 50)) + y, rng.normal(size=50) + 0.3 * y
    draws = claims.bootstrap_differences(y, runs, b, n_boot=40, seed=3)
    check = np.random.default_rng(3)
    normal, anomalous = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    for d in draws:  # a direct loop: images within each class, then the trainings, with replacement
        idx = np.concatenate([check.choice(normal, 30), check.choice(anomalous, 20)])
        rows = runs[check.integers(0, 3, size=3)]
        expected = np.mean([roc_auc_score(y[idx], r[idx]) for r in rows]) - roc_auc_score(y[idx], b[idx])
        assert d == pytest.approx(expected, abs=1e-12)
    # Resampling the trainings widens the interval over resampling the images alone (same images, mean of runs).
    spread = np.random.default_rng(5).normal(scale=[[0.0], [2.0], [4.0]], size=(3, 50)) + y
    both = claims.bootstrap_differences(y, spread, b, n_boot=400, seed=0)
    images_only = np.mean([claims.bootstrap_differences(y, r, b, n_boot=400, seed=0) for r in spread], axis=0)
    assert np.std(both) > np.std(images_only)
    with pytest.raises(ValueError, match="one entry per image"):
        claims.bootstrap_differences(y, runs[:, :-1], b)


def test_intervals() -> None:
    draws = np.arange(1001) / 1000.0
    assert claims.percentile_interval(draws) == pytest.approx((0.025, 0.975))
    d = np.array([0.02, 0.03, 0.05, 0.01, 0.04])
    mean, low, high = claims.spread_interval(d)
    expected = stats.t.interval(0.95, df=4, loc=d.mean(), scale=stats.sem(d))
    assert (low, high) == pytest.approx(expected) and mean == pytest.approx(d.mean())
    with pytest.raises(ValueError, match="at least 2"):
        claims.spread_interval([0.1])


@pytest.mark.parametrize("low, high, margin, expected", [
    (0.01, 0.05, 0.0, "holds"),              # wholly above 0
    (0.0, 0.05, 0.0, "inconclusive"),        # touches the margin: not wholly above
    (-0.05, -0.01, 0.0, "contradicted"),     # wholly below: the opposite is shown
    (-0.05, 0.0, 0.0, "inconclusive"),       # touches the margin from below
    (-0.01, 0.05, 0.0, "inconclusive"),      # straddles
    (0.15, 0.3, 0.1, "holds"),               # above a positive margin
    (0.02, 0.09, 0.1, "contradicted"),       # above 0 but wholly below the claimed margin
    (-0.005, 0.01, -0.01, "holds"),          # "no worse than by more than 0.01"
    (-0.03, -0.02, -0.01, "contradicted"),
    (-0.02, 0.01, -0.01, "inconclusive"),
    (0.0, 0.0, 0.0, "inconclusive"),         # a point on the margin
])
def test_the_verdict_rule_at_each_edge(low, high, margin, expected) -> None:
    assert claims.verdict(low, high, margin) == expected


def test_the_verdict_rule_refuses_a_reversed_interval() -> None:
    with pytest.raises(ValueError, match="low <= high"):
        claims.verdict(0.2, 0.1)


def test_units_needed_scales_with_the_square_of_the_half_width() -> None:
    # Half-width 0.04 around +0.02: the half-width must halve, so four times the units.
    assert claims.units_needed(50, 0.02, -0.02, 0.06) == 200
    assert claims.units_needed(5, 0.255, -0.101, 0.610) == 10  # chapter 10: ceil(5 (0.3555 / 0.255)^2)
    assert claims.units_needed(10, 0.1, 0.0, 0.2, margin=0.1) is None  # on the margin: no sample size decides
    assert claims.units_needed(10, 0.1, 0.09, 0.11) == 11  # already decided: at least one more


def test_a_claim_that_does_not_hold_needs_a_cause_from_the_list() -> None:
    args = ("1", "LOF beats the Gaussian", "AUROC", -0.01, -0.03, 0.01, "bootstrap")
    with pytest.raises(ValueError, match="names no cause"):
        claims.check(*args, n=40, unit="test images")
    with pytest.raises(ValueError, match="unknown cause"):
        claims.check(*args, n=40, unit="test images", cause="bad luck")
    with pytest.raises(ValueError, match="must say which"):
        claims.check(*args, n=40, unit="test images", cause="deviation")
    with pytest.raises(ValueError, match="unknown cause"):  # checked even when the claim holds
        claims.check("1", "A", "AUROC", 0.1, 0.05, 0.15, "b", n=40, unit="test images", cause="bad luck")
    c = claims.check(*args, n=40, unit="test images", cause="too little data to decide")
    assert c.verdict == "inconclusive"
    assert c.causes == ("too little data to decide (n = 40 test images, would need about 160)",)
    # A mapping picks the cause of the verdict found; a verdict without one in it is refused.
    by_verdict = {"contradicted": "contradicts the paper on this data", "inconclusive": "deviation: 8 px images"}
    assert claims.check(*args, n=40, unit="test images", cause=by_verdict).causes == ("deviation: 8 px images",)
    with pytest.raises(ValueError, match="names no cause"):
        claims.check(*args, n=40, unit="test images", cause={"contradicted": "deviation: x"})
    held = claims.check("1", "A", "AUROC", 0.1, 0.05, 0.15, "b", n=40, unit="test images", cause=by_verdict)
    assert held.holds and held.causes == ()


def test_convergence_is_one_rule_and_cannot_be_typed_away() -> None:
    flat = claims.TrainingRecord("flat", 1000, 1800, tuple([2.0] * 5 + [1.0] * 10))
    falling = claims.TrainingRecord("falling", 450, 1800, tuple(np.linspace(2.0, 1.0, 30)))
    assert flat.converged and flat.change == 0.0
    assert not falling.converged and falling.change < -0.01
    # Held-out loss decides where there is one.
    assert not claims.TrainingRecord("val", 10, None, (1.0,) * 10, tuple(np.linspace(2, 1, 10))).converged
    # A cosine decay to zero flattens any loss: flat at a learning rate under 10 % of the peak does not count.
    cosine = tuple(0.5 * (1 + np.cos(np.pi * np.arange(10) / 9)))
    assert not claims.TrainingRecord("cos", 10, None, (1.0,) * 10, lr=cosine).converged
    assert claims.TrainingRecord("const", 10, None, (1.0,) * 10, lr=(0.1,) * 10).converged
    args = ("7", "CFA beats PatchCore", "image AUROC", -0.2, -0.35, -0.08, "t")
    c = claims.check(*args, n=5, unit="categories", cause="contradicts the paper on this data",
                     records=[flat, falling])
    assert c.converged is False and c.causes[0].startswith("not converged: 1 of 2 training runs")
    assert c.causes[1] == "contradicts the paper on this data"
    # The run a claim discarded does not count; twice the training moving the difference < 1/4 half-width does.
    discarded = claims.TrainingRecord("falling", 450, 1800, falling.loss, discarded="diverged")
    assert claims.check(*args, n=5, unit="categories", cause="deviation: x", records=[flat, discarded]).converged
    stable = claims.check(*args, n=5, unit="categories", cause="deviation: x", records=[falling], doubled=-0.21)
    assert stable.converged and stable.causes == ("deviation: x",)
    # "not converged" alone is a cause: no other is needed.
    assert claims.check(*args, n=5, unit="categories", records=[falling]).causes[0].startswith("not converged")


def test_training_record_from_a_history() -> None:
    history = [{"epoch": i + 1, "loss": 1 / (i + 1), "val_loss": 2.0, "lr": 0.1} for i in range(10)]
    r = claims.training_record("AE", history, steps=100, official_steps=None, held_out="val_loss", lr="lr")
    assert r.loss[1] == 0.5 and r.held_out == (2.0,) * 10 and r.converged


def test_a_claim_renders_its_verdict_cause_and_numbers() -> None:
    held = claims.check("1", "kNN beats the Gaussian", "AUROC", 0.1, 0.05, 0.15, "bootstrap", n=60,
                        unit="test images", paper="X (2020), Table 1", paper_diff=0.04)
    failed = claims.check("1", "LOF beats the Gaussian", "AUROC", -0.05, -0.08, -0.03, "bootstrap", n=60,
                          unit="test images", cause="contradicts the paper on this data", why="it does not")
    assert held.holds and failed.verdict == "contradicted" and held.half_width == pytest.approx(0.05)
    box = scorecard.claim_html(held)
    assert "holds" in box and "+0.100" in box and "[+0.050, +0.150]" in box and "+0.040 (X (2020), Table 1)" in box
    assert "admonition tip" in box and "admonition danger" in scorecard.claim_html(failed)
    assert "Cause:</b> contradicts the paper" in scorecard.claim_html(failed)
    rows = scorecard.table([held, failed])
    assert list(rows.columns) == ["chapter", "claim", "paper", "ours", "verdict", "cause"]
    assert rows["verdict"].tolist() == ["holds", "contradicted"] and rows["cause"].tolist()[0] == "-"
    assert "color: #cf222e" in scorecard.table_html([held, failed])
    # An inconclusive claim always says how many test units would decide it, whatever its cause.
    moving = claims.TrainingRecord("r", 10, None, tuple(np.linspace(2, 1, 10)))
    open_ = claims.check("1", "A", "AUROC", 0.02, -0.02, 0.06, "b", n=50, unit="test images", records=[moving])
    assert "To decide:</b> about 200 test images instead of 50" in scorecard.claim_html(open_)
    by_data = claims.check("1", "A", "AUROC", 0.02, -0.02, 0.06, "b", n=50, unit="test images",
                           cause="too little data to decide")
    assert "To decide" not in scorecard.claim_html(by_data) and "would need about 200" in scorecard.claim_html(by_data)


def test_conclusions_list_every_claim_with_its_verdict() -> None:
    a = claims.check("9", "A beats B.", "AUROC", 0.1, 0.05, 0.15, "bootstrap", n=9, unit="seeds")
    b = claims.check("9", "C beats D.", "AUROC", -0.02, -0.08, 0.04, "bootstrap", n=9, unit="seeds",
                     cause="deviation: smaller images")
    assert scorecard.conclusions([a, b]).splitlines() == [
        "- holds: A beats B. (AUROC +0.100, [+0.050, +0.150])",
        "- inconclusive: C beats D. (AUROC -0.020, [-0.080, +0.040]); cause: deviation: smaller images",
    ]


def test_the_record_keeps_what_the_guard_checks() -> None:
    a = claims.check("9", "A beats B.", "AUROC", 0.1, 0.05, 0.15, "bootstrap", n=9, unit="seeds")
    rec = scorecard.record([a], {"A / AUROC": 0.9})
    assert rec["claims"]["A beats B."]["verdict"] == "holds" and rec["numbers"] == {"A / AUROC": 0.9}
    assert {"cpu", "packages", "threads", "python"} <= set(rec["environment"])


def test_mean_interval_formats_the_spread_interval():
    # 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653: half-width 4.302653 / sqrt(3) = 2.484138
    assert claims.mean_interval([1.0, 2.0, 3.0]) == "2.000 [-0.484, 4.484]"
    assert claims.mean_interval([1.0, 2.0, 3.0], digits=1) == "2.0 [-0.5, 4.5]"
