"""docker-compose.yml cannot be run here (no Docker engine), so it is checked for completeness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from libs.settings import DEFAULT_PORTS, SERVICE_NAMES

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_every_service_has_build_command_environment_and_health_check() -> None:
    services = _compose()["services"]
    for name in SERVICE_NAMES:
        service = services[name]
        assert service["build"]["dockerfile"] == "Dockerfile"
        assert (ROOT / service["build"]["dockerfile"]).exists()
        assert service["command"] == ["python", "-m", f"services.{name}"]
        env = service["environment"]
        assert env["DATABASE_URL"].startswith("postgresql://")
        assert env["LOYALTY_PORT"] == str(DEFAULT_PORTS[name])
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        health = service["healthcheck"]["test"]
        assert health[:4] == ["CMD", "python", "-m", "tools.healthcheck"]
        assert health[4].endswith(f":{DEFAULT_PORTS[name]}")
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_postgres_and_tracing_backends_are_declared() -> None:
    services = _compose()["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "otel-collector" in services
    assert "jaeger" in services
    collector_config = services["otel-collector"]["volumes"][0].split(":")[0]
    assert (ROOT / collector_config).exists()
    config = yaml.safe_load((ROOT / collector_config).read_text())
    assert config["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]


def test_metrics_backends_mount_files_that_exist() -> None:
    services = _compose()["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            assert (ROOT / volume.split(":")[0]).exists(), volume
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert {t.split(":")[0] for t in targets} == set(SERVICE_NAMES)
    for name in SERVICE_NAMES:
        assert services[name]["environment"].get("LOYALTY_HOST") == "0.0.0.0"  # metrics reachable from prometheus


def test_services_import_nothing_from_each_other() -> None:
    """Services talk only through the contracts: no service imports another's code."""
    for name in SERVICE_NAMES:
        for path in (ROOT / "services" / name).rglob("*.py"):
            text = path.read_text()
            for other in SERVICE_NAMES:
                if other != name:
                    assert f"services.{other}" not in text, f"{path} imports services.{other}"
