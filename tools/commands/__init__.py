"""Command groups of `loyalty` over the running services (members, cases, disputes, policies,
evaluations, events, features, texts, audit, demo), on the operator-command layer of tools/ops.py."""

from __future__ import annotations

import argparse

from tools.commands import audit, cases, demo, disputes, evaluations, events, features, members, policies, texts


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for module in (members, cases, disputes, policies, evaluations, events, features, texts, audit, demo):
        module.add_commands(sub)
