"""Claim checks: a paper's claim stated as a computed comparison, with an uncertainty, a verdict and a cause.

A chapter measures a difference (ours: method A minus method B, in a metric) and its 95 % interval, from a paired
bootstrap over test images (:func:`bootstrap_differences`, which resamples trainings too when there are several) or
from the spread over seeds, tasks, categories or objects (:func:`spread_interval`). One rule, :func:`verdict`, gives
one of three verdicts against the claim's margin (fixed in code before the claim's first run):

- *holds*: the whole interval lies above the margin;
- *contradicted*: the whole interval lies below it (the opposite is shown);
- *inconclusive*: the interval straddles it (:func:`units_needed` estimates how many test units would decide it).

A claim that does not hold names its cause from :data:`CAUSES`. Every trained model a claim rests on brings its
:class:`TrainingRecord`; one rule (:meth:`TrainingRecord.converged`) decides convergence, and a non-holding claim
that rests on an unconverged model is marked ``not converged`` whatever else it says. :func:`show` renders the
claims as boxes and :func:`gather` glues them for the scorecard page and for the guard on the book's numbers
(``tools/check_expected.py``).

Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import stats

from adlib.eval import metrics

LEVEL = 0.95  # every interval of the book is a 95 % interval
VERDICTS = ("holds", "contradicted", "inconclusive")
# Why a claim does not hold. "deviation" and "offline stand-in" must say which (after a colon); "offline stand-in"
# is only for what cannot be had on the build machines (data, pretrained weights, compute), a choice we could
# change is a deviation.
CAUSES = ("contradicts the paper on this data", "too little data to decide", "not converged", "deviation",
          "offline stand-in", "the paper's number is test-selected; ours is not")
CONVERGED_CHANGE = 0.01   # held-out (else training) loss moves < 1 % from the second-last to the last fifth ...
CONVERGED_LR = 0.10       # ... while the learning rate is still >= 10 % of its peak
DOUBLING_SHARE = 0.25     # or: twice the training moves the claim's difference < 1/4 of its half-width


def bootstrap_differences(labels: Any, scores_a: Any, scores_b: Any,
                          metric: Callable[[Any, Any], float] = metrics.image_auroc, n_boot: int = 1000,
                          seed: int = 0) -> np.ndarray:
    """``n_boot`` bootstrap draws (n_boot,) of ``metric(labels, scores_a) - metric(labels, scores_b)``.

    Paired: each draw resamples the same test images (with replacement) for both methods, within each class
    (normal and anomalous separately), so every draw keeps the test set's class counts and both metrics are
    defined. ``scores_a`` may be (K, N), K trainings of method A (seeds): a draw then also resamples the K
    trainings with replacement and takes the mean over them of ``metric(A_k) - metric(B)``, so the interval
    holds both sources of noise, the test images and the training seed.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    y = np.asarray(labels)
    a, b = np.atleast_2d(np.asarray(scores_a, dtype=np.float64)), np.asarray(scores_b, dtype=np.float64)
    if a.ndim != 2 or not len(y) == a.shape[1] == len(b):
        raise ValueError(f"labels and both score arrays need one entry per image, got {len(y)}, "
                         f"{np.shape(scores_a)}, {len(b)}.")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    k = len(a)
    out = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        rows = a if k == 1 else a[rng.integers(0, k, size=k)]
        out[i] = np.mean([metric(y[idx], row[idx]) for row in rows]) - metric(y[idx], b[idx])
    return out


def percentile_interval(draws: Any, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap ``draws`` (percentile method).

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    d = np.asarray(draws, dtype=np.float64)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(d, tail)), float(np.percentile(d, 100 - tail))


def spread_interval(differences: Any, level: float = LEVEL) -> tuple[float, float, float]:
    """Mean and Student-t ``level`` interval of paired differences over seeds or tasks: (mean, low, high).

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    d = np.asarray(differences, dtype=np.float64)
    if len(d) < 2:
        raise ValueError(f"need at least 2 seeds or tasks for an interval, got {len(d)}.")
    half = stats.t.ppf(0.5 + level / 2, df=len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def mean_interval(values: Any, digits: int = 3, level: float = LEVEL) -> str:
    """``"mean [low, high]"``: :func:`spread_interval` of ``values`` as a table cell, ``digits`` decimals.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    mean, low, high = spread_interval(values, level)
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def verdict(low: float, high: float, margin: float = 0.0) -> str:
    """The book's one rule for a claim "A beats B by more than ``margin``", from the 95 % interval of A - B:
    ``"holds"`` when the whole interval lies above ``margin``, ``"contradicted"`` when it lies below,
    ``"inconclusive"`` otherwise. With ``margin < 0`` the claim reads "A is no worse than B by more than
    ``-margin``".

    Used by: ``adlib.eval.claims.Claim``, ``adlib.eval.claims.check``.
    """
    if not low <= high:
        raise ValueError(f"an interval needs low <= high, got [{low}, {high}].")
    return "holds" if low > margin else "contradicted" if high < margin else "inconclusive"


def units_needed(n: int, ours: float, low: float, high: float, margin: float = 0.0) -> int | None:
    """About how many test units (images, seeds, objects) would shrink the interval enough to decide the claim.

    A half-width shrinks as 1 / sqrt(n), so deciding needs n (half-width / |ours - margin|)^2 units; None when the
    difference sits on the margin (no sample size decides it).

    Used by: ``adlib.eval.scorecard.claim_html``.
    """
    distance = abs(ours - margin)
    if distance == 0:
        return None
    return max(n + 1, math.ceil(n * ((high - low) / 2 / distance) ** 2))


@dataclass(frozen=True)
class TrainingRecord:
    """One training run a claim rests on: optimiser ``steps`` taken, the official schedule's steps
    (``official_steps``, None where there is no official run to match), the training ``loss`` per epoch, the
    ``held_out`` loss per epoch where there is a held-out set, the learning rate per epoch (``lr``; empty when
    constant), and ``discarded`` (why the run was not used; "" when it was).

    Defined in: "All methods, one benchmark" (``notebooks/11_benchmark.ipynb``).
    """

    name: str
    steps: int
    official_steps: int | None
    loss: tuple[float, ...]
    held_out: tuple[float, ...] = ()
    lr: tuple[float, ...] = ()
    discarded: str = ""

    @property
    def change(self) -> float:
        """Relative change of the held-out (else training) loss from the second-last to the last fifth."""
        from adlib.training.loop import loss_change

        curve = self.held_out or self.loss
        return loss_change([{"loss": v} for v in curve]) if len(curve) > 1 else float("nan")

    @property
    def lr_share(self) -> float:
        """The smallest learning rate over the last two fifths, as a share of the peak (1 when constant)."""
        if not self.lr:
            return 1.0
        k = max(1, len(self.lr) // 5)
        return float(min(self.lr[-2 * k:]) / max(self.lr))

    @property
    def converged(self) -> bool:
        """The book's one convergence rule (see :data:`CONVERGED_CHANGE`, :data:`CONVERGED_LR`)."""
        return bool(abs(self.change) < CONVERGED_CHANGE and self.lr_share >= CONVERGED_LR)


def training_record(name: str, history: Sequence[Mapping[str, float]], *, steps: int,
                    official_steps: int | None, loss: str = "loss", held_out: str | None = None,
                    lr: str | None = None, discarded: str = "") -> TrainingRecord:
    """A :class:`TrainingRecord` from a history (one dict per epoch, as :func:`adlib.training.loop.fit` returns): the
    columns ``loss``, ``held_out`` and ``lr`` name the training loss, held-out loss and learning rate.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    def column(key: str | None) -> tuple[float, ...]:
        return () if key is None else tuple(float(row[key]) for row in history)

    return TrainingRecord(name, int(steps), official_steps, column(loss), column(held_out), column(lr), discarded)


@dataclass(frozen=True)
class Claim:
    """One checked claim: ``statement``; the measured difference ``ours`` in ``metric`` with its 95 % interval
    [``low``, ``high``] over ``n`` test ``unit`` s (how: ``uncertainty``); the paper's own comparison as a
    difference in the same units (``paper_diff``, None where it prints none) and its source (``paper``); the
    ``margin``; the ``verdict``; the ``causes`` of a verdict other than "holds"; ``why`` (one sentence from the
    numbers); the training ``records`` it rests on and ``doubled`` (the difference after twice the training).

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """

    chapter: str
    statement: str
    metric: str
    ours: float
    low: float
    high: float
    uncertainty: str
    n: int
    unit: str
    paper: str
    paper_diff: float | None
    margin: float
    verdict: str
    causes: tuple[str, ...]
    why: str
    records: tuple[TrainingRecord, ...] = field(default_factory=tuple)
    doubled: float | None = None

    @property
    def holds(self) -> bool:
        return self.verdict == "holds"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def converged(self) -> bool | None:
        """Whether the models behind the claim converged (None: nothing trained): every used run passes
        :meth:`TrainingRecord.converged`, or twice the training moved the difference < 1/4 half-width."""
        if self.doubled is not None and abs(self.doubled - self.ours) < DOUBLING_SHARE * self.half_width:
            return True
        used = [r for r in self.records if not r.discarded]
        return None if not used else all(r.converged for r in used)


def _cause_text(cause: str, n: int, unit: str, ours: float, low: float, high: float, margin: float) -> str:
    name = next((c for c in CAUSES if cause == c or cause.startswith(c + ":")), None)
    if name is None:
        raise ValueError(f"unknown cause {cause!r}: a cause starts with one of {CAUSES}.")
    if name in ("deviation", "offline stand-in") and not cause[len(name) + 1:].strip():
        raise ValueError(f"the cause {name!r} must say which, e.g. '{name}: <which>'.")
    if name == "too little data to decide":
        need = units_needed(n, ours, low, high, margin)
        need_text = "no sample size would: the difference sits on the margin" if need is None else \
            f"would need about {need}"
        cause = f"{name} (n = {n} {unit}, {need_text})" + cause[len(name):]
    return cause


def check(chapter: str, statement: str, metric: str, ours: float, low: float, high: float, uncertainty: str,
          *, n: int, unit: str, paper: str = "", paper_diff: float | None = None, margin: float = 0.0,
          why: str = "", cause: str | Mapping[str, str] | None = None,
          records: Sequence[TrainingRecord] = (), doubled: float | None = None) -> Claim:
    """A :class:`Claim` with :func:`verdict` of its interval and, unless it holds, its causes.

    ``cause`` is one entry of :data:`CAUSES` (for either verdict that is not "holds"), or a mapping
    ``{"contradicted": ..., "inconclusive": ...}``; it is checked even when the claim holds, so a misspelt cause
    fails in every run. A claim that does not hold and names no cause is refused, unless the models it rests on
    did not converge: "not converged" is added from ``records`` and cannot be typed away.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    ours, low, high = float(ours), float(low), float(high)
    v = verdict(low, high, margin)
    given = dict(cause) if isinstance(cause, Mapping) else {} if cause is None else \
        {"contradicted": cause, "inconclusive": cause}
    if set(given) - {"contradicted", "inconclusive"}:
        raise ValueError(f"cause keys are 'contradicted' and 'inconclusive', got {sorted(given)}.")
    texts = {k: _cause_text(c, n, unit, ours, low, high, margin) for k, c in given.items()}
    claim = Claim(chapter, statement, metric, ours, low, high, uncertainty, int(n), unit, paper,
                  None if paper_diff is None else float(paper_diff), float(margin), v, (), why, tuple(records),
                  None if doubled is None else float(doubled))
    if v == "holds":
        return claim
    causes = []
    if claim.converged is False:
        moving = [r for r in claim.records if not r.discarded and not r.converged]
        causes.append(f"not converged: {len(moving)} of {sum(not r.discarded for r in claim.records)} training "
                      f"runs fail the rule ({_failures(moving)})")
    if v in texts and not texts[v].startswith("not converged"):
        causes.append(texts[v])
    if not causes:
        raise ValueError(f"chapter {chapter}: the claim {statement!r} is {v} and names no cause; pass cause= one of "
                         f"{CAUSES} (for this verdict).")
    return Claim(**{**claim.__dict__, "causes": tuple(causes)})


def _failures(records: Sequence[TrainingRecord]) -> str:
    """Why ``records`` fail the rule: their loss change over the last fifth, and a learning rate decayed too far."""
    def span(values: list[float], fmt: str) -> str:
        lo, hi = min(values), max(values)
        return format(lo, fmt) if lo == hi else f"{format(lo, fmt)} to {format(hi, fmt)}"

    changes = [r.change for r in records if not math.isnan(r.change)]
    parts = [f"loss change over the last fifth {span(changes, '+.1%')}" if changes else
             "loss change not measurable: a single epoch"]
    low_lr = [r.lr_share for r in records if r.lr_share < CONVERGED_LR]
    if low_lr:
        parts.append(f"{len(low_lr)} with the learning rate at {span(low_lr, '.0%')} of its peak (under "
                     f"{CONVERGED_LR:.0%}: a decayed schedule flattens any loss)")
    return "; ".join(parts)
