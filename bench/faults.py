"""Fault runs: the mixed load of bench/load.py while each service is killed with SIGKILL and
restarted in turn, PostgreSQL is killed with SIGKILL once and restarted, and risk's answers to
rewards are first delayed past rewards' deadline, then dropped; then the books are checked.

Each fault happens at a random moment of its own slot of the run, and is printed as it happens.
Shoppers retry a failed BatchRecordEvents with the same events (as a shop's client does), so an
event is "acknowledged" once an answer said ACCEPTED or DUPLICATE. Afterwards (risk answering
again):
- every acknowledged event is stored in profile (no event lost) and profile's outbox is drained;
- no credit is held for want of an answer from risk: the gate retry job has re-assessed them all;
- every acknowledged order has its accrual entry and no source event was credited twice;
- rewards' Reconcile balances, with its issuance identity;
- no call got INTERNAL or UNKNOWN: a service that is down or restarting is UNAVAILABLE (or the
  caller's deadline passes), the database down is UNAVAILABLE (DATABASE_UNAVAILABLE).

    .venv/bin/python -m bench.faults [--rate 30] [--seconds 48] [--members 60] [--seed 1]

tests/reliability/test_faults.py runs one bounded fault run in CI (`run_faults`). PostgreSQL is
killed only when the run has a cluster of its own (not with DATABASE_URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc

from bench.load import HISTORY_DAYS, LoadRun, Report, load_arguments
from libs.auth import ensure_dev_tokens
from libs.db import pgserver_handle, stop_embedded_postgres, tune_embedded_postgres
from libs.settings import SERVICE_NAMES
from loyalty.profile.v1 import event_pb2, profile_service_pb2
from loyalty.rewards.v1 import ledger_pb2
from tests.support.database import sibling_database
from tests.support.processes import RunningProcess, free_port, start_module
from tools.demo import generate

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
RISK_DELAY_S = 1.5  # rewards waits LOYALTY_REWARDS_RISK_DEADLINE_MS = 500 ms
DOWN_S = 1.0  # how long a killed process stays down before its restart
SESSION_ATTEMPTS = 40
CREDITING = [ledger_pb2.LEDGER_ENTRY_TYPE_CREDIT, ledger_pb2.LEDGER_ENTRY_TYPE_PENDING,
             ledger_pb2.LEDGER_ENTRY_TYPE_HOLD, ledger_pb2.LEDGER_ENTRY_TYPE_RELEASE,
             ledger_pb2.LEDGER_ENTRY_TYPE_VOID]


class RiskProxy:
    """A TCP proxy between rewards and risk: passes bytes, delays risk's answers, or drops
    everything (connections cut, new ones black-holed)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = "pass"
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", port)
        self.port = port

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == "drop":
            for writer in list(self._writers):
                writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.mode == "drop":
                while await reader.read(65536):
                    pass  # black hole: the caller's deadline passes
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, answers: bool) -> None:
            try:
                while chunk := await source.read(65536):
                    if self.mode == "drop":
                        break
                    if answers and self.mode == "delay":
                        await asyncio.sleep(RISK_DELAY_S)
                    sink.write(chunk)
                    await sink.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                sink.close()

        try:
            await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))
        except asyncio.CancelledError:
            pass  # the proxy is closing
        finally:
            self._writers.discard(writer)
            self._writers.discard(up_writer)

    async def close(self) -> None:
        self.set_mode("drop")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Cluster:
    """The database of the run: a cluster of its own (which can be killed), or one on DATABASE_URL."""

    dsn: str
    pgdata: Path | None

    def kill(self) -> str:
        assert self.pgdata is not None
        postmaster = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        children = [int(p) for p in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()]
        for pid in [postmaster, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return f"PostgreSQL postmaster {postmaster} and its {len(children)} processes"

    def restart(self) -> None:
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        assert self.pgdata is not None
        deadline = time.monotonic() + 60
        while True:  # the killed backends must be gone before the shared memory can be taken again
            try:
                pg_ctl(["-w", "-l", str(self.pgdata / "restart.log"), "restart"], pgdata=self.pgdata.resolve(),
                       user=pgserver_handle(self.pgdata).system_user, timeout=60)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    external = os.environ.get("DATABASE_URL")
    if external:
        with sibling_database(external, f"loyalty_faults_{os.getpid()}") as dsn:
            yield Cluster(dsn, None)
        return
    pgdata = Path(tempfile.mkdtemp(prefix="loyalty-faults-pg-"))
    server = pgserver_handle(pgdata)
    tune_embedded_postgres(pgdata, server)
    try:
        server.psql("CREATE DATABASE loyalty_faults;")
        yield Cluster(str(server.get_uri("loyalty_faults")), pgdata)
    finally:
        stop_embedded_postgres(pgdata)
        shutil.rmtree(pgdata, ignore_errors=True)


@dataclass
class Suite:
    """The four services on `cluster`, rewards reaching risk through the proxy."""

    cluster: Cluster
    state_dir: Path
    ports: dict[str, int]
    proxy: RiskProxy
    processes: dict[str, RunningProcess] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {f"LOYALTY_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in self.ports.items()}
        return {**env, "DATABASE_URL": self.cluster.dsn, "LOYALTY_STATE_DIR": str(self.state_dir),
                "LOYALTY_LOG_LEVEL": "WARNING", "LOYALTY_GRACE_PERIOD_S": "2",
                "LOYALTY_REWARDS_RISK_DEADLINE_MS": "500", "LOYALTY_REWARDS_JOBS_INTERVAL_S": "0.5",
                "LOYALTY_REWARDS_GATE_RETRY_BACKOFF_MAX_S": "1", "LOYALTY_DB_WAIT_S_MAX": "120"}

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start(self, name: str) -> None:
        env = self.env()
        if name == "rewards":
            env["LOYALTY_RISK_ADDR"] = f"127.0.0.1:{self.proxy.port}"
        process = start_module(name, f"services.{name}", env, self.state_dir / "logs", port=self.ports[name])
        self.processes[name] = process

    async def wait_serving(self, name: str) -> None:
        await asyncio.to_thread(self.processes[name].wait_status, "SERVING", 120)

    async def kill(self, name: str) -> str:
        process = self.processes[name].process
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait)
        return f"{name} (pid {process.pid})"

    def stop(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(Exception):
                process.terminate(timeout_s=10)


@dataclass
class FaultReport:
    load: Report
    done: list[str] = field(default_factory=list)
    acknowledged: int = 0
    events_missing: int = 0
    held_for_gate: int = -1
    gate_retried: int = 0  # credits held while risk did not answer, settled by the gate retry job
    double_credits: int = -1
    unexpected: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (self.load.books_ok and self.events_missing == 0 and self.held_for_gate == 0
                and self.double_credits == 0 and not self.unexpected)

    def text(self) -> str:
        lines = ["faults:", *[f"  {line}" for line in self.done], self.load.text(),
                 f"  checked: {self.acknowledged} acknowledged events, {self.events_missing} not stored;"
                 f" credits held while risk did not answer, settled once it did: {self.gate_retried}, still held:"
                 f" {self.held_for_gate}; source events credited twice:"
                 f" {self.double_credits}; INTERNAL/UNKNOWN answers: {self.unexpected or 'none'}",
                 f"  verdict: {'books kept' if self.ok else 'FAILED'}"]
        return "\n".join(lines)


class FaultLoad(LoadRun):
    """The mixed load, with shoppers that retry their events through a fault."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.acknowledged: set[tuple[str, str]] = set()

    async def _send(self, report: Report, name: str, events: list[event_pb2.BehaviourEvent],
                    scheduled: float) -> None:
        """BatchRecordEvents for `events`, retried with the same events through a fault; an event
        answered ACCEPTED or DUPLICATE is acknowledged (stored)."""
        request = profile_service_pb2.BatchRecordEventsRequest(events=events)
        for _ in range(SESSION_ATTEMPTS):
            try:
                reply = await self.loader.profile.BatchRecordEvents(request, timeout=10)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    report.rpcs[name].errors[error.code().name] += 1
                    return
                report.rpcs[name].refusals[f"retried after {error.code().name}"] += 1
                await asyncio.sleep(0.25)
                continue
            report.rpcs[name].latencies_ms.append((time.perf_counter() - scheduled) * 1e3)
            stored = {event_pb2.EVENT_STATUS_ACCEPTED, event_pb2.EVENT_STATUS_DUPLICATE}
            self.acknowledged.update((e.member_id, e.event_id) for e in self._record(report, events, reply, stored))
            return
        report.rpcs[name].errors["gave up after retries"] += 1


async def _faults(suite: Suite, seconds: float, rng: random.Random, done: list[str]) -> None:
    """Each fault at a random moment of its own slot of the run."""
    started = time.monotonic()
    steps: list[tuple[str, str]] = [("kill", n) for n in ("profile", "rewards", "risk", "scoring")]
    if suite.cluster.pgdata is not None:
        steps.append(("postgres", ""))
    steps += [("delay", ""), ("drop", "")]
    slot = seconds / len(steps)

    def say(text: str) -> None:
        line = f"{time.monotonic() - started:5.1f} s  {text}"
        done.append(line)
        print(f"  {line}", flush=True)

    for k, (kind, name) in enumerate(steps):
        at = k * slot + rng.uniform(0.1, 0.4) * slot
        await asyncio.sleep(max(0.0, at - (time.monotonic() - started)))
        if kind == "kill":
            say(f"SIGKILL {await suite.kill(name)}")
            await asyncio.sleep(DOWN_S)
            suite.start(name)
            await suite.wait_serving(name)
            say(f"{name} restarted and SERVING")
        elif kind == "postgres":
            say(f"SIGKILL {await asyncio.to_thread(suite.cluster.kill)}")
            await asyncio.sleep(DOWN_S)
            await asyncio.to_thread(suite.cluster.restart)
            say("PostgreSQL restarted (crash recovery done)")
        else:
            suite.proxy.set_mode(kind)
            say(f"risk's answers to rewards delayed by {RISK_DELAY_S:.1f} s" if kind == "delay"
                else "risk's answers to rewards dropped")
            await asyncio.sleep(min(3.0, slot * 0.5))
            suite.proxy.set_mode("pass")
            say("risk answers rewards again")


async def _check(suite: Suite, load: FaultLoad, report: FaultReport) -> None:
    conn = await asyncpg.connect(suite.cluster.dsn)
    try:
        stored = await conn.fetch(
            "SELECT member_id, event_id FROM profile.events WHERE (member_id, event_id) IN"
            " (SELECT * FROM unnest($1::text[], $2::text[]))",
            [m for m, _ in load.acknowledged], [e for _, e in load.acknowledged])
        report.acknowledged = len(load.acknowledged)
        report.events_missing = len(load.acknowledged - {(r["member_id"], r["event_id"]) for r in stored})
        deadline = time.monotonic() + 90
        while True:
            report.held_for_gate = await conn.fetchval(
                "SELECT count(*) FROM rewards.accruals WHERE gate_request IS NOT NULL")
            if report.held_for_gate == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        report.gate_retried = await conn.fetchval(
            "SELECT count(*) FROM rewards.ledger_entries WHERE source = $1", ledger_pb2.LEDGER_SOURCE_GATE_RETRY)
        # A credit, pending credit, hold, release or void is written once per source event and
        # source: the same one twice is a double credit (or a hold settled twice).
        report.double_credits = await conn.fetchval(
            """SELECT count(*) FROM (SELECT 1 FROM rewards.ledger_entries
                WHERE source_event_id IS NOT NULL AND type = ANY($1::smallint[])
                GROUP BY member_id, source_event_id, type, source HAVING count(*) > 1) AS twice""", CREDITING)
    finally:
        await conn.close()


async def run_faults(state_dir: Path, rate: float, seconds: float, members: int, seed: int = 1) -> FaultReport:
    """One fault run on a cluster and suite of its own."""
    token = ensure_dev_tokens(state_dir)["admin"]
    rng = random.Random(seed)
    with cluster() as db:
        ports: dict[str, int] = {name: free_port() for name in SERVICE_NAMES}
        proxy = RiskProxy(ports["risk"])
        await proxy.start(free_port())
        suite = Suite(db, state_dir, ports, proxy)
        try:
            for name in ("risk", "rewards", "profile", "scoring"):
                suite.start(name)
            for name in ("risk", "rewards", "profile", "scoring"):
                await suite.wait_serving(name)
            population = generate(seed=seed, members=members, days=HISTORY_DAYS, rings=1)
            load = FaultLoad(suite.address, token, population, seed)
            try:
                await load.prepare()
                done: list[str] = []
                faults = asyncio.create_task(_faults(suite, seconds, rng, done))
                load_report = await load.run(rate, seconds)
                await faults
                report = FaultReport(load_report, done)
                for name, stats in load_report.rpcs.items():
                    for code in ("INTERNAL", "UNKNOWN"):
                        if stats.errors.get(code):
                            report.unexpected[f"{name} {code}"] = stats.errors[code]
                await _check(suite, load, report)
                return report
            finally:
                await load.close()
        finally:
            suite.stop()
            await proxy.close()


def main() -> None:
    parser = load_arguments(__doc__, rate=30.0, seconds=48.0, members=60)
    args = parser.parse_args()
    state_dir = Path(tempfile.mkdtemp(prefix="loyalty-faults-"))
    report = asyncio.run(run_faults(state_dir, args.rate, args.seconds, args.members, args.seed))
    print(report.text())
    print(f"service logs: {state_dir / 'logs'}")
    raise SystemExit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
