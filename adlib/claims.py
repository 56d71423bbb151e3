"""Claim checks: a paper's claim stated as a computed comparison, with an uncertainty and a verdict.

A chapter measures a difference (ours: method A minus method B, in a metric) and its uncertainty, either a
paired bootstrap over test images (:func:`bootstrap_differences`) or the spread over seeds or tasks
(:func:`spread_interval`). One rule, written once in :func:`verdict`, decides whether the claim holds: the
95 % interval of the difference must lie above ``margin`` (0 by default, i.e. the interval excludes zero in the
claimed direction). :func:`show` renders the claim as a box in the chapter and glues it for the book's
scorecard page, which gathers the claims of every chapter.

Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats

from adlib import metrics

LEVEL = 0.95  # every interval of the book is a 95 % interval


def bootstrap_differences(labels: Any, scores_a: Any, scores_b: Any,
                          metric: Callable[[Any, Any], float] = metrics.image_auroc, n_boot: int = 1000,
                          seed: int = 0) -> np.ndarray:
    """``n_boot`` bootstrap draws (n_boot,) of ``metric(labels, scores_a) - metric(labels, scores_b)``.

    Paired: each draw resamples the same test images (with replacement) for both methods, within each class
    (normal and anomalous separately), so every draw keeps the test set's class counts and both metrics are
    defined. ``scores_a`` may be (K, N), K trainings of method A: a draw is then the mean over them of
    ``metric(A_k) - metric(B)``, with B's metric computed once.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    y = np.asarray(labels)
    a, b = np.atleast_2d(np.asarray(scores_a, dtype=np.float64)), np.asarray(scores_b, dtype=np.float64)
    if a.ndim != 2 or not len(y) == a.shape[1] == len(b):
        raise ValueError(f"labels and both score arrays need one entry per image, got {len(y)}, "
                         f"{np.shape(scores_a)}, {len(b)}.")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    out = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        out[i] = np.mean([metric(y[idx], row[idx]) for row in a]) - metric(y[idx], b[idx])
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

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    d = np.asarray(differences, dtype=np.float64)
    if len(d) < 2:
        raise ValueError(f"need at least 2 seeds or tasks for an interval, got {len(d)}.")
    half = stats.t.ppf(0.5 + level / 2, df=len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def verdict(low: float, high: float, margin: float = 0.0) -> bool:
    """The book's one rule: a claim "A beats B by more than ``margin``" holds when the whole 95 % interval of
    A - B lies above ``margin``. With ``margin < 0`` the claim reads "A is no worse than B by more than
    ``-margin``".

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    if low > high:
        raise ValueError(f"an interval needs low <= high, got [{low}, {high}].")
    return bool(low > margin)


@dataclass(frozen=True)
class Claim:
    """One checked claim: ``statement``, the measured difference ``ours`` with its interval [``low``, ``high``],
    how the interval was obtained (``uncertainty``), the paper's number as cited text (``paper``, "" where the
    paper has none), the verdict ``holds`` and ``why`` (what the numbers say, or why a claim fails).

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """

    chapter: str
    statement: str
    metric: str
    ours: float
    low: float
    high: float
    uncertainty: str
    paper: str
    margin: float
    holds: bool
    why: str


def check(chapter: str, statement: str, metric: str, ours: float, low: float, high: float, uncertainty: str,
          *, paper: str = "", margin: float = 0.0, why: str = "") -> Claim:
    """A :class:`Claim` whose verdict is :func:`verdict` of its interval.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    return Claim(chapter, statement, metric, float(ours), float(low), float(high), uncertainty, paper, margin,
                 verdict(low, high, margin), why)


def claim_html(claim: Claim) -> str:
    """The claim as an HTML admonition box (green when it holds, red when it does not).

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    e = html.escape
    kind, word = ("tip", "holds") if claim.holds else ("danger", "does not hold")
    rule = "above 0" if claim.margin == 0 else f"above {claim.margin:+g}"
    paper = f"<p><b>Paper:</b> {e(claim.paper)}</p>" if claim.paper else ""
    why = f"<p>{e(claim.why)}</p>" if claim.why else ""
    return (f'<div class="admonition {kind}"><p class="admonition-title">Claim check (chapter {e(claim.chapter)}): '
            f"{word}</p><p><b>Claim:</b> {e(claim.statement)}</p>{paper}"
            f"<p><b>Ours:</b> {e(claim.metric)} difference {claim.ours:+.3f}, 95 % interval "
            f"[{claim.low:+.3f}, {claim.high:+.3f}] ({e(claim.uncertainty)}). Rule: the interval must lie {rule}."
            f"</p>{why}</div>")


def table(claims: Sequence[Claim]) -> Any:
    """The scorecard rows of ``claims``: chapter, claim, paper, ours (difference and interval), holds.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    import pandas as pd

    return pd.DataFrame([{"chapter": c.chapter, "claim": c.statement, "paper": c.paper or "-",
                          "ours": f"{c.metric}: {c.ours:+.3f} [{c.low:+.3f}, {c.high:+.3f}]",
                          "holds": "yes" if c.holds else "no"} for c in claims])


def conclusions(claims: Sequence[Claim]) -> str:
    """One line per claim, "- holds: <statement> (<metric> <difference>, [<low>, <high>])", for a summary.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    return "\n".join(f"- {'holds' if c.holds else 'does not hold'}: {c.statement} ({c.metric} {c.ours:+.3f}, "
                     f"[{c.low:+.3f}, {c.high:+.3f}])" for c in claims)


def gather(claims: Sequence[Claim], key: str = "claims") -> None:
    """Glue the chapter's claim table (every claim of the chapter, once) under ``key`` for the scorecard page.

    Without ``myst_nb`` (e.g. on Colab) this does nothing: the scorecard is the built book's.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    from IPython.display import HTML

    try:
        from myst_nb import glue
    except ImportError:  # e.g. on Colab: the boxes are the result, the scorecard is the book's
        return
    # Glued as plain HTML: a DataFrame's own HTML cuts long claims to 50 characters.
    glue(key, HTML(table(claims).to_html(index=False, escape=True)), display=False)


def show(claims: Sequence[Claim], key: str | None = "claims") -> None:
    """Display each claim's box and, unless ``key`` is None, :func:`gather` them under ``key``.

    A chapter that checks its claims in several places shows each group with ``key=None`` and gathers all of
    them once at the end.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    from IPython.display import HTML, display

    for claim in claims:
        display(HTML(claim_html(claim)))
    if key is not None:
        gather(claims, key)
