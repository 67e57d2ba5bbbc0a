"""The risk service. See README.md beside this file."""
