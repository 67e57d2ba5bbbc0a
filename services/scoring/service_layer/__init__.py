"""Scoring use cases: policies, evaluation runs, online scoring."""
