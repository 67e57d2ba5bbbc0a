"""Rewards adapters."""
