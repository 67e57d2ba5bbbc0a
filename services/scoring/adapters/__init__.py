"""Scoring adapters: storage and the clients of profile and rewards."""
