"""The profile service. See README.md beside this file."""
