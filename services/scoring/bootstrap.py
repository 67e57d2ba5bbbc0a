"""Composition root of the scoring service: builds its dependencies and the process spec.

Until its issue lands, the service serves its full contract with every RPC answering UNIMPLEMENTED.
"""

from __future__ import annotations

from pathlib import Path

from libs.server import ServiceSpec, placeholder_spec

SERVICE_DIR = Path(__file__).resolve().parent


def build_spec() -> ServiceSpec:
    return placeholder_spec("scoring", SERVICE_DIR)
