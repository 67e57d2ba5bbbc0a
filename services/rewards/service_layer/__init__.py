"""Rewards service layer."""
