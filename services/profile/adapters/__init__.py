"""Profile adapters (see services/profile/README.md)."""
