"""How a chapter shows its claims and glues them (and its headline numbers) for the scorecard and the guard."""
from __future__ import annotations

import html
import json
import os
import platform
from typing import Any, Mapping, Sequence

from adlib.core.versions import cpu_model
from adlib.eval.claims import CAUSES, DOUBLING_SHARE, Claim, units_needed

COLOURS = {"holds": "#1a7f37", "contradicted": "#cf222e", "inconclusive": "#9a6700"}
_BOX = {"holds": "tip", "contradicted": "danger", "inconclusive": "warning"}


def _paper_text(claim: Claim) -> str:
    if claim.paper_diff is None:
        return claim.paper or "-"
    return f"{claim.paper_diff:+.3f} ({claim.paper})" if claim.paper else f"{claim.paper_diff:+.3f}"


def _ours_text(claim: Claim) -> str:
    return (f"{claim.metric}: {claim.ours:+.3f} [{claim.low:+.3f}, {claim.high:+.3f}], ±{claim.half_width:.3f} "
            f"over {claim.n} {claim.unit}")


def _training_text(claim: Claim) -> str:
    used = [r for r in claim.records if not r.discarded]
    if not claim.records:
        return ""
    steps = sorted({r.steps for r in used})
    official = sorted({r.official_steps for r in used if r.official_steps is not None})
    text = (f"{len(used)} training run(s) ({len(claim.records) - len(used)} discarded), "
            f"{sum(r.converged for r in used)} converged by the book's rule; steps "
            f"{'/'.join(map(str, steps))}" + (f" (official schedule: {'/'.join(map(str, official))})"
                                              if official else ""))
    if claim.doubled is not None:
        moved, allowed = claim.doubled - claim.ours, DOUBLING_SHARE * claim.half_width
        text += (f"; twice the training moves the difference by {moved:+.3f} ("
                 + (f"under {allowed:.3f}, a quarter of the half-width: converged by the doubling check)"
                    if abs(moved) < allowed else f"not under {allowed:.3f}, a quarter of the half-width)"))
    return text


def claim_html(claim: Claim) -> str:
    """The claim as an HTML admonition box: green when it holds, red when contradicted, amber when inconclusive.

    Used by: ``adlib.eval.scorecard.show``.
    """
    e = html.escape
    rule = f"holds when the interval lies above {claim.margin:+g}, contradicted when it lies below"
    rows = [("Claim", claim.statement), ("Paper", _paper_text(claim)),
            ("Ours", f"{_ours_text(claim)} ({claim.uncertainty}). Rule: {rule}.")]
    if claim.causes:
        rows.append(("Cause", "; ".join(claim.causes)))
    if claim.verdict == "inconclusive" and not any(c.startswith(CAUSES[1]) for c in claim.causes):
        need = units_needed(claim.n, claim.ours, claim.low, claim.high, claim.margin)
        rows.append(("To decide", f"about {need} {claim.unit} instead of {claim.n}" if need else
                     "no sample size: the difference sits on the margin"))
    if claim.why:
        rows.append(("Numbers", claim.why))
    if claim.records:
        rows.append(("Training", _training_text(claim)))
    body = "".join(f"<p><b>{e(k)}:</b> {e(v)}</p>" for k, v in rows)
    return (f'<div class="admonition {_BOX[claim.verdict]}"><p class="admonition-title">Claim check (chapter '
            f"{e(claim.chapter)}): {claim.verdict}</p>{body}</div>")


def table(claims: Sequence[Claim]) -> Any:
    """The scorecard rows of ``claims``: chapter, claim, paper, ours, verdict, cause.

    Used by: ``adlib.eval.scorecard.table_html``.
    """
    import pandas as pd

    return pd.DataFrame([{"chapter": c.chapter, "claim": c.statement, "paper": _paper_text(c), "ours": _ours_text(c),
                          "verdict": c.verdict, "cause": "; ".join(c.causes) or "-"} for c in claims])


def table_html(claims: Sequence[Claim]) -> str:
    """:func:`table` as HTML with the verdicts coloured (a DataFrame's own HTML cuts long claims).

    Used by: ``adlib.eval.scorecard.gather``.
    """
    rows = table(claims)
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in rows.columns)
    body = "".join("<tr>" + "".join(
        f'<td style="color: {COLOURS[v]}; font-weight: bold">{e(v)}</td>' if col == "verdict" else f"<td>{e(v)}</td>"
        for col, v in row.items()) + "</tr>" for _, row in rows.iterrows())
    return f'<table class="dataframe"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def conclusions(claims: Sequence[Claim]) -> str:
    """One line per claim, "- <verdict>: <statement> (<metric> <difference>, [<low>, <high>]) [cause]".

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    return "\n".join(f"- {c.verdict}: {c.statement} ({c.metric} {c.ours:+.3f}, [{c.low:+.3f}, {c.high:+.3f}])"
                     + (f"; cause: {'; '.join(c.causes)}" if c.causes else "") for c in claims)


def environment() -> dict[str, Any]:
    """What made a run's numbers: CPU model, a digest of the installed package versions, threads, Python.

    Used by: ``adlib.eval.scorecard.record``.
    """
    import hashlib
    from importlib import metadata

    import torch

    versions = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                      if d.metadata["Name"] and d.metadata["Name"].lower() != "adlib")
    return {"cpu": cpu_model(), "packages": hashlib.sha256("\n".join(versions).encode()).hexdigest()[:16],
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
            "python": platform.python_version()}


def record(claims: Sequence[Claim], numbers: Mapping[str, float] | None = None) -> dict[str, Any]:
    """What ``book/expected.json`` keeps of a chapter: every claim's difference, interval, verdict and causes,
    the chapter's headline ``numbers`` and the :func:`environment`.

    Used by: ``adlib.eval.scorecard.gather``.
    """
    return {"claims": {c.statement: {"ours": c.ours, "low": c.low, "high": c.high, "verdict": c.verdict,
                                     "causes": list(c.causes), "half_width": c.half_width, "n": c.n,
                                     "converged": c.converged} for c in claims},
            "numbers": {k: float(v) for k, v in (numbers or {}).items()}, "environment": environment()}


def gather(claims: Sequence[Claim], key: str = "claims", numbers: Mapping[str, float] | None = None) -> None:
    """Glue the chapter's claim table under ``key`` for the scorecard page, and its :func:`record` (claims and
    headline ``numbers``) as JSON under ``key + "_record"`` for ``tools/check_expected.py``.

    Without ``myst_nb`` (e.g. on Colab) this does nothing: the scorecard is the built book's.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    from IPython.display import HTML

    try:
        from myst_nb import glue
    except ImportError:  # e.g. on Colab: the boxes are the result, the scorecard is the book's
        return
    glue(key, HTML(table_html(claims)), display=False)
    glue(key + "_record", json.dumps(record(claims, numbers)), display=False)


def show(claims: Sequence[Claim], key: str | None = "claims", numbers: Mapping[str, float] | None = None) -> None:
    """Display each claim's box and, unless ``key`` is None, :func:`gather` them (and ``numbers``) under ``key``.

    A chapter that checks its claims in several places shows each group with ``key=None`` and gathers all of
    them once at the end.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    from IPython.display import HTML, display

    for claim in claims:
        display(HTML(claim_html(claim)))
    if key is not None:
        gather(claims, key, numbers)
