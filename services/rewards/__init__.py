"""The rewards service. See README.md beside this file."""
