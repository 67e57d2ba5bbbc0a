"""The scoring service. See README.md beside this file."""
