"""Composition root of the profile service: builds its dependencies and the process spec."""

from __future__ import annotations

from pathlib import Path

from libs.contracts import package_modules
from libs.server import ServiceSpec
from services.profile.entrypoints import grpc_api

SERVICE_DIR = Path(__file__).resolve().parent


def build_spec() -> ServiceSpec:
    return ServiceSpec(
        name="profile",
        schema="profile",
        migrations_dir=SERVICE_DIR / "migrations",
        pb2_modules=package_modules(grpc_api.PACKAGE),
        register=grpc_api.register,
    )
