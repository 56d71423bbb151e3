"""Evaluation: metrics, the claims' verdicts and the scorecard glue, and the one-class protocol."""
