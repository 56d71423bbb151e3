"""Evaluation: what a detector returns (``scores.Scores``), metrics, the one-class protocol, the claims' verdicts,
per-object tables and ablations, and the scorecard glue."""
