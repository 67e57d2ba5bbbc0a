"""The gateway is deployed beside the services: in docker-compose.yml and in `dev.py up`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from libs.settings import DEFAULT_GATEWAY_PORT, SERVICE_NAMES, Settings
from tests.support.processes import free_port
from tools.supervisor import GATEWAY, Supervisor, http_health_status

ROOT = Path(__file__).resolve().parents[2]


def test_compose_runs_the_gateway_after_the_services() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gateway = compose["services"]["gateway"]
    assert gateway["command"] == ["python", "-m", "services.gateway"]
    assert gateway["build"]["dockerfile"] == "Dockerfile"
    assert gateway["environment"]["LOYALTY_PORT"] == str(DEFAULT_GATEWAY_PORT)
    assert gateway["ports"] == [f"{DEFAULT_GATEWAY_PORT}:{DEFAULT_GATEWAY_PORT}"]
    for name in SERVICE_NAMES:
        assert gateway["depends_on"][name]["condition"] == "service_healthy"
        port = compose["services"][name]["environment"]["LOYALTY_PORT"]
        assert gateway["environment"][f"LOYALTY_{name.upper()}_ADDR"] == f"{name}:{port}"
    assert f"127.0.0.1:{DEFAULT_GATEWAY_PORT}/healthz" in " ".join(gateway["healthcheck"]["test"])
    assert str(DEFAULT_GATEWAY_PORT) in (ROOT / "Dockerfile").read_text().split("EXPOSE", 1)[1].splitlines()[0]


def test_supervisor_adds_the_gateway_as_an_optional_http_child(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(state_dir=tmp_path, gateway_addr=f"127.0.0.1:{port}")
    supervisor = Supervisor(settings)
    env = supervisor._child_env(GATEWAY)
    assert env["LOYALTY_PORT"] == str(port)
    assert all(env[f"LOYALTY_{name.upper()}_ADDR"] == settings.addr_for(name) for name in SERVICE_NAMES)
    assert http_health_status(f"127.0.0.1:{port}", timeout_s=0.2) == "UNREACHABLE"
    assert Settings().addr_for(GATEWAY) == f"127.0.0.1:{DEFAULT_GATEWAY_PORT}"
