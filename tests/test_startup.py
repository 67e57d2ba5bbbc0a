"""Start-up: SERVING only once the database is reachable and migrated; the supervisor brings the
whole suite up from nothing and stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from libs.migrations import advisory_lock_key
from libs.settings import SERVICE_NAMES
from tests.support.processes import REPO_ROOT, free_port, start_module
from tools.supervisor import health_status

pytestmark = pytest.mark.e2e


async def test_health_is_not_serving_until_migrations_have_run(
    service_env: dict[str, str], state_dir: Path, pg_dsn: str
) -> None:
    holder = await asyncpg.connect(pg_dsn)
    # Holding the schema's migration lock keeps the new process inside migrate().
    await holder.execute("SELECT pg_advisory_lock($1)", advisory_lock_key("risk"))
    process = start_module("risk-blocked", "services.risk", service_env, state_dir / "logs")
    try:
        deadline = time.monotonic() + 30
        while health_status(process.address) == "UNREACHABLE" and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(10):  # about a second of NOT_SERVING while migrations wait for the lock
            assert health_status(process.address) == "NOT_SERVING"
            time.sleep(0.1)
        await holder.execute("SELECT pg_advisory_unlock($1)", advisory_lock_key("risk"))
        process.wait_status("SERVING", timeout_s=30)
    finally:
        await holder.close()
        assert process.terminate() == 0


def test_unreachable_database_never_serves_and_exits_non_zero(service_env: dict[str, str], state_dir: Path) -> None:
    env = dict(service_env)
    env["DATABASE_URL"] = "postgresql://nobody@/loyalty?host=/nonexistent-socket-dir"
    env["LOYALTY_DB_WAIT_S_MAX"] = "1.5"
    process = start_module("profile-nodb", "services.profile", env, state_dir / "logs")
    seen: set[str] = set()
    while process.process.poll() is None:
        seen.add(health_status(process.address, timeout_s=0.3))
        time.sleep(0.05)
    assert "SERVING" not in seen
    assert process.process.returncode == 1
    assert "start-up failed" in process.log()


def test_supervisor_starts_everything_from_nothing_and_stops_cleanly(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["LOYALTY_STATE_DIR"] = str(tmp_path / "state")  # nothing there yet: no database, no tokens
    env["LOYALTY_GRACE_PERIOD_S"] = "3"
    addresses = {name: f"127.0.0.1:{free_port()}" for name in SERVICE_NAMES}
    for name, address in addresses.items():
        env[f"LOYALTY_{name.upper()}_ADDR"] = address
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "tools.cli", "up", "--no-demo"], env=env, cwd=REPO_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if "Loyalty is up" in log_path.read_text():
                break
            time.sleep(0.2)
        output = log_path.read_text()
        assert "Loyalty is up" in output, output
        for name, address in addresses.items():
            assert health_status(address) == "SERVING", name
        up = json.loads((tmp_path / "state" / "up.json").read_text())
        assert up["services"] == addresses
        assert (tmp_path / "state" / "dev-tokens.json").exists()
        assert (tmp_path / "state" / "pgdata" / "postmaster.pid").exists()

        # A service that dies is restarted by the supervisor.
        risk_pid = _pid_listening(addresses["risk"])
        os.kill(risk_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if health_status(addresses["risk"]) == "SERVING" and _pid_listening(addresses["risk"]) != risk_pid:
                break
            time.sleep(0.2)
        assert health_status(addresses["risk"]) == "SERVING", log_path.read_text()
        assert "risk exited with -9; restarting" in log_path.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0, log_path.read_text()
    for address in addresses.values():
        assert health_status(address) == "UNREACHABLE"
    assert "stopped" in log_path.read_text()
    assert not (tmp_path / "state" / "up.json").exists()
    assert not (tmp_path / "state" / "pgdata" / "postmaster.pid").exists()  # PostgreSQL stopped too


def _pid_listening(address: str) -> int:
    """The pid of the process listening on a loopback TCP port (from /proc, no extra tools)."""
    port = int(address.rsplit(":", 1)[1])
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(proc.name)
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            continue
    raise AssertionError(f"nobody listens on {address}")
