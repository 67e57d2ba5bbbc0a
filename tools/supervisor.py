"""`loyalty up`: one process that runs the whole suite on this machine.

It starts the embedded PostgreSQL (unless DATABASE_URL points elsewhere), creates development
tokens, starts the four services on their loopback ports and the HTTP gateway beside them, waits
until every health check says SERVING, prints what runs where, restarts a process that dies (with
back-off, bounded), and on Ctrl-C or SIGTERM stops them (each drains its in-flight calls) and then
PostgreSQL. The gateway is an edge, not a dependency: if it cannot start (its port is taken), the
services stay up and the summary says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.auth import ensure_dev_tokens
from libs.clients import GRPC_SCHEMES, channel_credentials
from libs.db import EMBEDDED_DATABASE, embedded_pgdata, start_embedded_postgres, stop_embedded_postgres
from libs.settings import SERVICE_NAMES, Settings

READY_TIMEOUT_S = 90.0
RESTARTS_MAX = 5
RESTART_BACKOFF_S_MAX = 10.0
STOP_TIMEOUT_S_EXTRA = 5.0
GATEWAY = "gateway"


@dataclass
class Child:
    name: str
    address: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    restarts: int = 0
    next_restart_at: float = 0.0
    started_at: float = field(default=0.0)
    http: bool = False  # probed with GET /healthz instead of grpc.health.v1
    required: bool = True  # start-up fails without it
    credentials: grpc.ChannelCredentials | None = None  # TLS / mTLS for the gRPC health check

    def status(self) -> str:
        return (http_health_status(self.address) if self.http
                else health_status(self.address, credentials=self.credentials))


def replica_addresses(address: str) -> list[str]:
    """The replicas a configured address lists ("ip:port,ip:port" or "ipv4:ip:port,ip:port"); one
    address (or a DNS name, whose records gRPC resolves itself) is a list of one."""
    listed = address.removeprefix("ipv4:").removeprefix("ipv6:")
    if "," not in listed or listed.startswith(GRPC_SCHEMES):
        return [address]
    return [part.strip() for part in listed.split(",")]


def health_status(address: str, timeout_s: float = 1.0, credentials: grpc.ChannelCredentials | None = None) -> str:
    """The overall health at `address`: SERVING, NOT_SERVING or UNREACHABLE; for a list of replicas
    each is asked, and some but not all serving is "DEGRADED (k/n replicas serving)". Over TLS with
    `credentials` (libs.clients.channel_credentials: the servers require client certificates when
    they have a CA); a refused handshake is UNREACHABLE."""
    replicas = replica_addresses(address)
    if len(replicas) == 1:
        return _health_of_one(replicas[0], timeout_s, credentials)
    found = [_health_of_one(replica, timeout_s, credentials) for replica in replicas]
    serving = found.count("SERVING")
    if serving == len(found):
        return "SERVING"
    if serving == 0:
        return "UNREACHABLE" if set(found) == {"UNREACHABLE"} else "NOT_SERVING"
    return f"DEGRADED ({serving}/{len(found)} replicas serving)"


def _health_of_one(address: str, timeout_s: float, credentials: grpc.ChannelCredentials | None) -> str:
    with (grpc.insecure_channel(address) if credentials is None
          else grpc.secure_channel(address, credentials)) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout_s)
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def http_health_status(address: str, timeout_s: float = 1.0) -> str:
    """The gateway's health: SERVING when GET /healthz answers 200, else UNREACHABLE."""
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=timeout_s) as reply:
            return "SERVING" if reply.status == 200 else "NOT_SERVING"
    except (urllib.error.URLError, OSError):
        return "UNREACHABLE"


class Supervisor:
    def __init__(self, settings: Settings, services: Sequence[str] = SERVICE_NAMES, gateway: bool = True) -> None:
        self.settings = settings
        self.services = list(services)
        self.gateway = gateway
        self.embedded = settings.database_url is None
        self.database_url = settings.database_url or ""
        self.children: list[Child] = []
        self.stopping = False
        self.tokens: dict[str, str] = {}

    # -- start-up ---------------------------------------------------------------------------------
    def start_database(self) -> None:
        if not self.embedded:
            print("database      external (DATABASE_URL)", flush=True)
            return
        pgdata = embedded_pgdata(self.settings)
        started = time.monotonic()
        server = start_embedded_postgres(pgdata)
        self.database_url = str(server.get_uri(EMBEDDED_DATABASE))
        print(f"database      embedded PostgreSQL in {pgdata} ({time.monotonic() - started:.1f}s)", flush=True)

    def _child_env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        env["DATABASE_URL"] = self.database_url
        env["LOYALTY_STATE_DIR"] = str(self.settings.state_dir)
        env["LOYALTY_PORT"] = self.settings.addr_for(name).rsplit(":", 1)[1]
        if self.tokens and name in self.tokens:
            env.setdefault("LOYALTY_CLIENT_TOKEN", self.tokens[name])
        for other in SERVICE_NAMES:
            env[f"LOYALTY_{other.upper()}_ADDR"] = self.settings.addr_for(other)
        return env

    def spawn(self, child: Child) -> None:
        if child.log_file is None:
            child.log_path.parent.mkdir(parents=True, exist_ok=True)
            child.log_file = child.log_path.open("ab")
        child.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{child.name}"],
            env=self._child_env(child.name),
            stdout=child.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
        )
        child.started_at = time.monotonic()

    def start_services(self) -> None:
        if self.settings.auth_tokens_file is None:
            self.tokens = ensure_dev_tokens(self.settings.state_dir)
        logs = self.settings.state_dir / "logs"
        credentials = channel_credentials(self.settings)
        for name in self.services:
            child = Child(name=name, address=self.settings.addr_for(name), log_path=logs / f"{name}.log",
                          credentials=credentials)
            self.spawn(child)
            self.children.append(child)
        if self.gateway:
            child = Child(name=GATEWAY, address=self.settings.addr_for(GATEWAY), log_path=logs / "gateway.log",
                          http=True, required=False)
            self.spawn(child)
            self.children.append(child)

    def wait_until_serving(self, timeout_s: float = READY_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout_s
        pending = {child.name for child in self.children}
        while pending and time.monotonic() < deadline and not self.stopping:
            for child in self.children:
                if child.name not in pending:
                    continue
                if child.process is not None and child.process.poll() is not None:
                    print(f"{child.name:13} exited with {child.process.returncode} during start-up; "
                          f"see {child.log_path}", file=sys.stderr, flush=True)
                    _print_tail(child.log_path)
                    if child.required:
                        return False
                    pending.discard(child.name)
                elif child.status() == "SERVING":
                    pending.discard(child.name)
            time.sleep(0.2)
        required = sorted(c.name for c in self.children if c.name in pending and c.required)
        if pending:
            print(f"not SERVING after {timeout_s:.0f}s: {', '.join(sorted(pending))}", file=sys.stderr, flush=True)
        return not required

    # -- running ----------------------------------------------------------------------------------
    def watch(self) -> None:
        """Restart a service that died, with back-off; give up after RESTARTS_MAX restarts."""
        while not self.stopping:
            now = time.monotonic()
            for child in self.children:
                process = child.process
                if process is None or process.poll() is None:
                    continue
                if child.restarts >= RESTARTS_MAX:
                    print(f"{child.name} keeps dying (exit {process.returncode}); not restarting. "
                          f"See {child.log_path}", file=sys.stderr, flush=True)
                    child.process = None
                    continue
                if child.next_restart_at == 0.0:
                    backoff = min(2.0 ** child.restarts, RESTART_BACKOFF_S_MAX)
                    child.next_restart_at = now + backoff
                    print(f"{child.name} exited with {process.returncode}; restarting in {backoff:.0f}s",
                          file=sys.stderr, flush=True)
                elif now >= child.next_restart_at:
                    child.restarts += 1
                    child.next_restart_at = 0.0
                    self.spawn(child)
            time.sleep(0.5)

    # -- shutdown ---------------------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping = True
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace_period_s + STOP_TIMEOUT_S_EXTRA
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{child.name} did not stop in time; killing it", file=sys.stderr, flush=True)
                child.process.kill()
                child.process.wait()
            if child.log_file is not None:
                child.log_file.close()
        if self.embedded:
            stop_embedded_postgres(embedded_pgdata(self.settings))

    def summary(self) -> str:
        lines = ["", "Loyalty is up:"]
        for child in self.children:
            if not child.http:
                lines.append(f"  {child.name:9} grpc://{child.address}   log {child.log_path}")
            elif child.status() == "SERVING":
                lines.append(f"  {child.name:9} http://{child.address}   docs http://{child.address}/docs   "
                             f"log {child.log_path}")
            else:
                lines.append(f"  {child.name:9} NOT RUNNING (port {child.address} taken? set LOYALTY_GATEWAY_ADDR)   "
                             f"log {child.log_path}")
        where = f"embedded, data in {embedded_pgdata(self.settings)}" if self.embedded else "DATABASE_URL"
        lines.append(f"  database  {where}")
        if self.tokens:
            tokens_path = self.settings.state_dir / "dev-tokens.json"
            lines += [
                "",
                f"Development tokens (bearer, per caller with its scopes): {tokens_path}",
                f"  admin token: {self.tokens['admin']}",
                "  e.g. metadata=[('authorization', 'Bearer ' + token)] on any stub call",
            ]
            if self.gateway:
                lines.append(f"  over HTTP: curl -H 'Authorization: Bearer <token>' "
                             f"http://{self.settings.addr_for(GATEWAY)}/v1/features")
        lines += [
            "",
            "Try:",
            "  .venv/bin/loyalty status",
            "  .venv/bin/python -m tools.cli services      # lists services through server reflection",
            "",
            "Ctrl-C stops everything.",
        ]
        return "\n".join(lines)


def _print_tail(path: Path, lines: int = 30) -> None:
    try:
        content = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return
    for line in content:
        print(f"    {line}", file=sys.stderr)


def run_up(settings: Settings, services: Sequence[str] = SERVICE_NAMES, gateway: bool = True,
           when_ready: Callable[[], None] | None = None) -> int:
    """Run the suite until a signal; `when_ready` runs in a thread of its own once everything
    serves (the demo load), while the supervisor goes on restarting services that die."""
    supervisor = Supervisor(settings, services, gateway)

    def on_signal(signum: int, _frame: object) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        supervisor.start_database()
        supervisor.start_services()
        if not supervisor.wait_until_serving():
            return 1
        print(supervisor.summary(), flush=True)
        grpc_children = {c.name: c.address for c in supervisor.children if not c.http}
        http_children = {c.name: f"http://{c.address}" for c in supervisor.children if c.http}
        (settings.state_dir / "up.json").write_text(json.dumps(
            {"pid": os.getpid(), "services": grpc_children, **http_children}, indent=2))
        if when_ready is not None:  # in the background: the supervisor keeps watching meanwhile
            threading.Thread(target=when_ready, name="when-ready", daemon=True).start()
        supervisor.watch()
        return 0
    finally:
        print("stopping...", flush=True)
        supervisor.stop()
        (settings.state_dir / "up.json").unlink(missing_ok=True)
        print("stopped", flush=True)
