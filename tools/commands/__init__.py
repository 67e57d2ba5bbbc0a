"""Command groups of `loyalty` over the running services (members, cases, policies, evaluations,
events, demo), on the operator-command layer of tools/ops.py."""

from __future__ import annotations

import argparse

from tools.commands import cases, demo, evaluations, events, members, policies


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for module in (members, cases, policies, evaluations, events, demo):
        module.add_commands(sub)
