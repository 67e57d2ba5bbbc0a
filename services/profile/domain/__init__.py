"""Profile domain (see services/profile/README.md)."""
