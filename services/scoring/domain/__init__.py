"""Scoring domain: pure functions over numpy arrays, no I/O."""
