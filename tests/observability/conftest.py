"""An observed stack for this folder's end-to-end tests: the four services and the HTTP gateway on a
database of their own, exporting spans to an OTLP receiver inside the test, each with /metrics on a free port and its
logs in a folder of its own (so a scan reads this stack's lines only)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from libs.settings import SERVICE_NAMES
from tests.gateway.conftest import wait_http_ready
from tests.support.database import sibling_database
from tests.support.otlp_receiver import OtlpReceiver, otlp_receiver
from tests.support.processes import RunningProcess, free_port, start_module


@dataclass
class ObservedStack:
    receiver: OtlpReceiver
    log_dir: Path
    ports: dict[str, int]
    metrics_ports: dict[str, int]
    running: dict[str, RunningProcess] = field(default_factory=dict)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.address('gateway')}"

    def logs(self) -> dict[str, str]:
        return {path.name: path.read_text(errors="replace") for path in sorted(self.log_dir.glob("*.log"))}


@pytest.fixture(scope="module")
def observed(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[ObservedStack]:
    name = f"loyalty_observed_{secrets.token_hex(4)}"
    ports = {service: free_port() for service in SERVICE_NAMES}
    metrics_ports = {service: free_port() for service in SERVICE_NAMES}
    log_dir = state_dir / "logs" / name
    with sibling_database(pg_dsn, name) as dsn, otlp_receiver() as receiver:
        env = dict(service_env, DATABASE_URL=dsn,
                   OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                   OTEL_BSP_SCHEDULE_DELAY="100",  # milliseconds: spans arrive soon after they end
                   **{f"LOYALTY_{s.upper()}_ADDR": f"127.0.0.1:{p}" for s, p in ports.items()},
                   **{f"LOYALTY_{s.upper()}_METRICS_ADDR": f"127.0.0.1:{p}" for s, p in metrics_ports.items()})
        stack = ObservedStack(receiver, log_dir, ports, metrics_ports)
        try:
            for service in SERVICE_NAMES:
                stack.running[service] = start_module(f"{service}-observed", f"services.{service}", env, log_dir,
                                                      port=ports[service])
            for process in stack.running.values():
                process.wait_status("SERVING")
            ports["gateway"] = free_port()
            stack.running["gateway"] = start_module("gateway-observed", "services.gateway", env, log_dir,
                                                    port=ports["gateway"])
            wait_http_ready(stack.gateway_url, stack.running["gateway"])
            yield stack
        finally:
            for process in stack.running.values():
                process.terminate()
