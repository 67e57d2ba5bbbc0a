"""Risk domain (see services/risk/README.md)."""
