"""Two replicas of each service on one database, each service's peers named by one address that
lists both replicas (gRPC client-side round-robin, libs.clients): every background job runs twice
and the books still hold, with no work done twice.

- Events recorded through both profile replicas, relayed by both outbox relays to both rewards
  replicas (which ask both risk replicas): every purchase credited exactly once, every outbox row
  delivered and marked once.
- Lots already past their expiry when credited: both rewards replicas' expiry jobs and RunExpiry
  called on both at once expire each lot once, and a RunExpiry returns only once every lot due
  when it started is expired.
- Evaluation runs started through either scoring replica, both workers polling: each run is
  executed by one worker (never resumed), its tier changes applied in rewards once.
- One replica of profile and of rewards killed mid-flow, and the scoring worker holding a run
  killed mid-run: the other replicas finish the work (SKIP LOCKED claims, an expired lease), still
  exactly once.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import asyncpg
import grpc
import pytest

from libs.clients import open_channel
from libs.settings import SERVICE_NAMES, Settings
from loyalty.profile.v1 import event_pb2
from loyalty.profile.v1 import profile_service_pb2 as P
from loyalty.profile.v1.profile_service_pb2_grpc import ProfileServiceStub
from loyalty.rewards.v1 import rewards_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from loyalty.scoring.v1 import evaluation_pb2 as E
from loyalty.scoring.v1 import scoring_service_pb2 as S
from loyalty.scoring.v1.scoring_service_pb2_grpc import ScoringServiceStub
from tests.scoring.conftest import policy, purchase
from tests.support.database import sibling_database
from tests.support.processes import RunningProcess, free_port, start_module, stop_all

pytestmark = pytest.mark.e2e

REPLICAS = ("a", "b")
SETTLE_S = 45.0       # longest wait for relays and jobs to settle a flow
RUN_WAIT_S = 45.0     # longest wait for an evaluation run
POLL_S = 0.1
LEASE_S = 3           # scoring's run lease: a killed worker's run is taken over after this

# Accrual outcomes (loyalty.rewards.v1.AccrualOutcome) a credit settles in; 4 (held: gate
# unavailable) and 2 (pending) are on their way.
POSTED, HELD_REVIEW, VOIDED = 1, 3, 5
SETTLED = (POSTED, HELD_REVIEW, VOIDED)
CREDIT, EXPIRY = 1, 8          # LedgerEntryType
LOT_OPEN, LOT_EXPIRED = 1, 3   # LotState
APPLIED = 1                    # TierChangeOutcome
UNCHANGED = 2                  # scoring TierChange

T = TypeVar("T")


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class Replicas:
    dsn: str
    processes: dict[str, RunningProcess]   # "rewards-a" -> process
    lists: dict[str, str]                  # "rewards" -> "127.0.0.1:p1,127.0.0.1:p2"
    metrics_ports: dict[str, int]

    def served(self, name: str) -> dict[str, float]:
        """RPCs the process `name` answered, by method (its loyalty_rpc_requests counters)."""
        url = f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        counts: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("loyalty_rpc_requests_total{"):
                labels, _, value = line.rpartition(" ")
                method = labels.split('method="', 1)[1].split('"', 1)[0]
                counts[method] = counts.get(method, 0.0) + float(value)
        return counts

    def address(self, service: str, replica: str) -> str:
        return self.processes[f"{service}-{replica}"].address

    def kill(self, name: str) -> None:
        process = self.processes[name].process
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def replicas(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[Replicas]:
    ports = {f"{s}-{r}": free_port() for s in SERVICE_NAMES for r in REPLICAS}
    lists = {s: ",".join(f"127.0.0.1:{ports[f'{s}-{r}']}" for r in REPLICAS) for s in SERVICE_NAMES}
    metrics = {name: free_port() for name in ports}
    with sibling_database(pg_dsn, f"loyalty_replicas_{secrets.token_hex(4)}") as dsn:
        env = dict(service_env, DATABASE_URL=dsn,
                   LOYALTY_REWARDS_JOBS_INTERVAL_S="0.2", LOYALTY_REWARDS_EXPIRY_INTERVAL_S="0.5",
                   LOYALTY_SCORING_WORKER_INTERVAL_S="0.2", LOYALTY_SCORING_LEASE_S=str(LEASE_S),
                   LOYALTY_SCORING_SCHEDULER_INTERVAL_S="0.5", LOYALTY_SCORING_CALL_DEADLINE_S="10",
                   LOYALTY_SCORING_APPLY_CHUNK_SIZE="25", LOYALTY_SCORING_APPLY_CONCURRENCY="1",
                   **{f"LOYALTY_{s.upper()}_ADDR": lists[s] for s in SERVICE_NAMES})
        # All eight start at once: two processes of a service migrate and seed the same schema
        # together (an advisory lock, ON CONFLICT DO NOTHING).
        # Each process serves /metrics on a port of its own: what each replica served is read there.
        processes = {name: start_module(f"{name}-replicas", f"services.{name.rsplit('-', 1)[0]}",
                                        dict(env, LOYALTY_METRICS_ADDR=f"127.0.0.1:{metrics[name]}"),
                                        state_dir / "logs", port=port) for name, port in ports.items()}
        try:
            for process in processes.values():
                process.wait_status("SERVING")
            yield Replicas(dsn, processes, lists, metrics)
        finally:
            stop_all(list(processes.values()))


@dataclass
class Stubs:
    """Stubs through the round-robin address of each service, and to each replica alone."""

    profile: ProfileServiceStub
    rewards: RewardsServiceStub
    scoring: ScoringServiceStub
    rewards_at: dict[str, RewardsServiceStub]
    scoring_at: dict[str, ScoringServiceStub]


@pytest.fixture(scope="module")
async def stubs(replicas: Replicas, dev_tokens: dict[str, str], state_dir: Path) -> AsyncIterator[Stubs]:
    settings = Settings(state_dir=state_dir, client_deadline_ms=30_000)
    token = dev_tokens["admin"]

    def channel(service: str, address: str) -> grpc.aio.Channel:
        module = {"profile": P, "rewards": rewards_pb2, "scoring": S}[service]
        return open_channel(address, settings, module.DESCRIPTOR.services_by_name.values(), token=token)

    channels = {s: channel(s, replicas.lists[s]) for s in ("profile", "rewards", "scoring")}
    single = {(s, r): channel(s, replicas.address(s, r)) for s in ("rewards", "scoring") for r in REPLICAS}
    try:
        yield Stubs(ProfileServiceStub(channels["profile"]), RewardsServiceStub(channels["rewards"]),
                    ScoringServiceStub(channels["scoring"]),
                    {r: RewardsServiceStub(single["rewards", r]) for r in REPLICAS},
                    {r: ScoringServiceStub(single["scoring", r]) for r in REPLICAS})
    finally:
        for c in [*channels.values(), *single.values()]:
            await c.close()


@pytest.fixture(scope="module")
async def db(replicas: Replicas) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(replicas.dsn, min_size=1, max_size=4)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


async def eventually(what: str, check: Callable[[], Awaitable[T | None]], timeout_s: float = SETTLE_S,
                     poll_s: float = POLL_S) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        await asyncio.sleep(poll_s)


async def record(stubs: Stubs, events: list[event_pb2.BehaviourEvent], batch: int = 250) -> list[int]:
    """Record in concurrent batches through the round-robin address (both profile replicas)."""
    replies = await asyncio.gather(*(stubs.profile.BatchRecordEvents(
        P.BatchRecordEventsRequest(events=events[i:i + batch], create_unknown_members=True))
        for i in range(0, len(events), batch)))
    return [r.status for reply in replies for r in reply.results]


async def settled_accruals(db: asyncpg.Pool, events: list[event_pb2.BehaviourEvent]) -> list[asyncpg.Record] | None:
    """The events' accruals once every one is settled (credited, held for review or voided) and the
    outbox rows that carried them are marked delivered."""
    rows = await db.fetch("SELECT source_event_id, member_id, status, points FROM rewards.accruals"
                          " WHERE source_event_id = ANY($1)", [e.event_id for e in events])
    if len(rows) != len(events) or any(r["status"] not in SETTLED for r in rows):
        return None
    # The relay marks its outbox rows delivered after rewards answered: wait for that too, or the
    # check of the outbox races the relay's last UPDATE.
    undelivered = await db.fetchval("SELECT count(*) FROM profile.outbox WHERE source_event_id = ANY($1)"
                                    " AND delivered_at IS NULL", [e.event_id for e in events])
    return rows if undelivered == 0 else None


async def assert_books(db: asyncpg.Pool, members: list[str]) -> None:
    """Every balance equals the sum of its entries, and no source event was credited, held, released
    or voided twice, nor given two lots."""
    drift = await db.fetch(
        """SELECT a.member_id FROM rewards.accounts a
             LEFT JOIN (SELECT member_id, sum(posted_delta) AS posted, sum(held_delta) AS held,
                               sum(pending_delta) AS pending
                          FROM rewards.ledger_entries GROUP BY member_id) e USING (member_id)
            WHERE a.member_id = ANY($1)
              AND (a.posted, a.held, a.pending) IS DISTINCT FROM
                  (coalesce(e.posted, 0), coalesce(e.held, 0), coalesce(e.pending, 0))""", members)
    assert drift == [], drift
    twice = await db.fetch(
        """SELECT member_id, source_event_id, type, count(*) FROM rewards.ledger_entries
            WHERE member_id = ANY($1) AND source_event_id IS NOT NULL
            GROUP BY 1, 2, 3 HAVING count(*) > 1""", members)
    assert twice == [], twice
    lots_twice = await db.fetch("SELECT source_event_id FROM rewards.lots WHERE member_id = ANY($1)"
                                " GROUP BY 1 HAVING count(*) > 1", members)
    assert lots_twice == [], lots_twice


async def assert_credited_once(db: asyncpg.Pool, events: list[event_pb2.BehaviourEvent], accruals: list[asyncpg.Record],
                               outbox_attempts_max: int | None) -> None:
    members = sorted({e.member_id for e in events})
    await assert_books(db, members)
    # Every purchase's points are in the member's posted balance exactly once (none was redeemed
    # or expired: these lots expire in a year).
    posted = {r["member_id"]: 0 for r in accruals}
    for r in accruals:
        posted[r["member_id"]] += r["points"] if r["status"] == POSTED else 0
    balances = dict(await db.fetch("SELECT member_id, posted FROM rewards.accounts WHERE member_id = ANY($1)", members))
    assert {m: balances.get(m, 0) for m in posted} == posted
    credits = await db.fetchval("SELECT count(*) FROM rewards.ledger_entries WHERE source_event_id = ANY($1)"
                                " AND type = $2", [e.event_id for e in events], CREDIT)
    assert credits == sum(r["status"] == POSTED for r in accruals)
    assert sum(r["status"] == POSTED for r in accruals) >= len(events) // 2, "risk let too few through to test"
    # Profile's outbox: one row per purchase, each delivered (and marked) once.
    rows = await db.fetch("SELECT source_event_id, attempts, delivered_at FROM profile.outbox"
                          " WHERE source_event_id = ANY($1)", [e.event_id for e in events])
    assert sorted(r["source_event_id"] for r in rows) == sorted(e.event_id for e in events)
    assert all(r["delivered_at"] is not None for r in rows)
    if outbox_attempts_max is not None:
        assert max(r["attempts"] for r in rows) <= outbox_attempts_max, "a row was sent more than once"


async def test_events_through_both_replicas_are_credited_exactly_once(stubs: Stubs, db: asyncpg.Pool) -> None:
    members = [uid("rm") for _ in range(150)]
    now = datetime.now(UTC)
    # Two purchases per member, in different batches that both profile replicas take at once.
    events = [purchase(m, 1_000 + 100 * k, now - timedelta(days=3, minutes=k)) for k in range(2) for m in members]
    statuses = await record(stubs, events, batch=100)
    assert statuses == [event_pb2.EVENT_STATUS_ACCEPTED] * len(events)
    # The same batch again, through the other replica as much as this one: duplicates, nothing new.
    again = await record(stubs, events[:100], batch=50)
    assert set(again) == {event_pb2.EVENT_STATUS_DUPLICATE}

    accruals = await eventually("every purchase settled in rewards", lambda: settled_accruals(db, events))
    # Nothing failed on the way: a row sent twice would show two attempts.
    await assert_credited_once(db, events, accruals, outbox_attempts_max=1)


async def test_expiry_jobs_and_runs_on_both_replicas_expire_each_lot_once(stubs: Stubs, db: asyncpg.Pool) -> None:
    # Purchases 14 months old credit lots already past their expiry: both replicas' expiry jobs
    # (every 0.5 s) and RunExpiry called on both replicas at once race for them as they arrive.
    # More members than one expiry batch (500), so a run takes several rounds.
    members = [uid("xm") for _ in range(1_100)]
    events = [purchase(m, 2_000, datetime.now(UTC) - timedelta(days=425)) for m in members]
    recording = asyncio.ensure_future(record(stubs, events, batch=300))
    runs: list[rewards_pb2.ExpiryRun] = []
    deadline = time.monotonic() + SETTLE_S
    early: list[str] = []

    async def run_on(replica: str) -> None:
        due = {r["lot_id"] for r in await db.fetch(
            "SELECT lot_id FROM rewards.lots WHERE member_id = ANY($1) AND state = $2 AND expires_at <= now()",
            members, LOT_OPEN)}
        as_of = datetime.now(UTC)
        request = rewards_pb2.RunExpiryRequest(request_id=uid("exp"))
        request.as_of.FromDatetime(as_of)
        reply = await stubs.rewards_at[replica].RunExpiry(request)
        runs.append(reply.run)
        # A run returns once every lot due when it started is expired (by it or by another).
        still_open = await db.fetchval("SELECT count(*) FROM rewards.lots WHERE lot_id = ANY($1) AND state = $2",
                                       list(due), LOT_OPEN)
        if still_open:
            early.append(f"run on {replica} returned with {still_open} of {len(due)} due lots open")

    while True:
        await asyncio.gather(*(run_on(r) for r in REPLICAS))
        if recording.done() and await settled_accruals(db, events) and not await db.fetchval(
                "SELECT count(*) FROM rewards.lots WHERE member_id = ANY($1) AND state = $2", members, LOT_OPEN):
            break
        assert time.monotonic() < deadline, "lots still open after the wait"
        await asyncio.sleep(0.2)
    assert set(await recording) == {event_pb2.EVENT_STATUS_ACCEPTED}
    assert early == []

    accruals = await settled_accruals(db, events)
    assert accruals is not None
    lots = await db.fetch("SELECT member_id, lot_id, original_points, remaining_points, state FROM rewards.lots"
                          " WHERE member_id = ANY($1)", members)
    assert len(lots) == sum(r["status"] == POSTED for r in accruals) > 0
    assert {r["state"] for r in lots} == {LOT_EXPIRED} and {r["remaining_points"] for r in lots} == {0}
    # Exactly one expiry entry per lot, for the lot's points.
    expired = await db.fetch(
        """SELECT lot, sum(p) AS points, count(*) AS entries
             FROM rewards.ledger_entries, unnest(lot_ids, lot_points) AS u(lot, p)
            WHERE member_id = ANY($1) AND type = $2 GROUP BY lot""", members, EXPIRY)
    assert {r["lot"]: (r["points"], r["entries"]) for r in expired} == {
        r["lot_id"]: (-r["original_points"], 1) for r in lots}
    await assert_books(db, members)
    assert await db.fetchval("SELECT coalesce(sum(posted), 0) FROM rewards.accounts WHERE member_id = ANY($1)",
                             members) == 0
    # The runs counted only what they expired themselves: together at most every lot once.
    assert sum(run.lots_expired for run in runs) <= len(lots)


async def _population(db: asyncpg.Pool) -> int:
    return int(await db.fetchval("SELECT count(*) FROM profile.members"))


async def _wait_run(stubs: Stubs, run_id: str) -> E.EvaluationRun:
    async def finished() -> E.EvaluationRun | None:
        run = (await stubs.scoring.GetEvaluation(S.GetEvaluationRequest(run_id=run_id))).run
        return run if run.state not in (E.EVALUATION_STATE_PENDING, E.EVALUATION_STATE_RUNNING) else None

    return await eventually(f"run {run_id} finished", finished, RUN_WAIT_S)


async def _assert_applied_once(db: asyncpg.Pool, run: E.EvaluationRun) -> None:
    """The run's tier changes reached rewards once each, and rewards holds the tiers it scored."""
    assert run.state == E.EVALUATION_STATE_SUCCEEDED, (run.error_reason, run.error_message)
    assert run.members_scored == run.members_total
    scores = await db.fetch("SELECT member_id, tier_id, change FROM scoring.evaluation_scores WHERE run_id = $1",
                            run.run_id)
    assert len(scores) == run.members_total
    changed = {r["member_id"]: r["tier_id"] for r in scores if r["change"] != UNCHANGED}
    assert run.tier_changes_applied == len(changed) and run.tier_changes_pending == 0
    applied = await db.fetch("SELECT member_id, to_tier_id, outcome FROM rewards.tier_changes"
                             " WHERE evaluation_run_id = $1", run.run_id)
    assert {r["member_id"]: r["to_tier_id"] for r in applied} == changed
    assert {r["outcome"] for r in applied} <= {APPLIED}
    tiers = dict(await db.fetch("SELECT member_id, tier_id FROM rewards.member_status WHERE member_id = ANY($1)",
                                list(changed)))
    assert tiers == changed


async def test_each_evaluation_run_is_executed_by_one_worker(stubs: Stubs, db: asyncpg.Pool) -> None:
    created = await stubs.scoring.CreatePolicy(S.CreatePolicyRequest(request_id=uid("r"),
                                                                     policy=policy(uid("pol"))))
    await stubs.scoring.ActivatePolicy(S.ActivatePolicyRequest(request_id=uid("r"),
                                                               policy_id=created.policy.policy_id,
                                                               version=created.policy.version))
    # Two dry runs and one applying run, each started through another replica; both workers poll.
    started = await asyncio.gather(*(
        stubs.scoring_at[replica].RunEvaluation(S.RunEvaluationRequest(request_id=uid("run"), dry_run=dry))
        for replica, dry in (("a", True), ("b", True), ("a", False))))
    runs = [await _wait_run(stubs, reply.run.run_id) for reply in started]
    population = await _population(db)
    for run in runs:
        assert run.state == E.EVALUATION_STATE_SUCCEEDED, (run.error_reason, run.error_message)
        assert run.resumed_count == 0, "a run was claimed by a second worker"
        assert run.members_total == population
    assert all(run.tier_changes_applied == 0 for run in runs[:2])
    assert await db.fetchval("SELECT count(*) FROM rewards.tier_changes WHERE evaluation_run_id = ANY($1)",
                             [run.run_id for run in runs[:2]]) == 0
    assert runs[2].tier_changes_applied > 0
    await _assert_applied_once(db, runs[2])


def test_both_replicas_of_every_service_took_calls(replicas: Replicas) -> None:
    """The flows above went through both replicas of each service: the test's calls to profile, and
    the services' own calls to each other (the relays' Accrue, rewards' assessments, scoring's tier
    changes), were spread round-robin over the address listing both. Scoring's feature streams are
    too few to be sure of a spread (three runs, one stream each, from two processes whose channels
    each start the rotation at a replica of their own choosing): they are counted, not placed."""
    served = {name: replicas.served(name) for name in replicas.processes}
    for service, method in (("profile", "BatchRecordEvents"), ("rewards", "Accrue"),
                            ("risk", "BatchAssessAccruals"), ("rewards", "ApplyTierChanges")):
        calls = {r: served[f"{service}-{r}"].get(method, 0) for r in REPLICAS}
        assert all(calls.values()), f"{service} {method}: {calls} (not spread over the replicas)"
    streams = sum(served[f"profile-{r}"].get("StreamFeatures", 0) for r in REPLICAS)
    assert streams >= 3, f"profile StreamFeatures served {streams} streams for three runs"


async def test_killed_replicas_leave_the_others_to_finish(replicas: Replicas, stubs: Stubs, db: asyncpg.Pool) -> None:
    # Accruals: profile-a and rewards-a are killed (SIGKILL) while the first batches are being
    # relayed; profile-b's relay and rewards-b credit every event, each once.
    members = [uid("km") for _ in range(300)]
    events = [purchase(m, 5_000 + 100 * k, datetime.now(UTC) - timedelta(days=2, minutes=k))
              for k in range(2) for m in members]
    statuses: list[int] = []
    for i, start in enumerate(range(0, len(events), 100)):
        if i == 2:  # two batches in: their relaying and Accrue calls are under way
            replicas.kill("profile-a")
            replicas.kill("rewards-a")
        # The round-robin address goes on with profile-b (a call that meets the dead replica is
        # retried on UNAVAILABLE: BatchRecordEvents is idempotent, events dedupe on their id).
        statuses += await record(stubs, events[start:start + 100])
    assert set(statuses) <= {event_pb2.EVENT_STATUS_ACCEPTED, event_pb2.EVENT_STATUS_DUPLICATE}
    accruals = await eventually("every purchase settled after the kills", lambda: settled_accruals(db, events))
    await assert_credited_once(db, events, accruals, outbox_attempts_max=None)

    # Evaluation: the worker holding an applying run is killed; the other takes the run over once
    # the lease lapses and applies every change once (rewards dedupes a chunk sent twice).
    started = await stubs.scoring.RunEvaluation(S.RunEvaluationRequest(request_id=uid("run")))
    run_id = started.run.run_id
    pids = {replicas.processes[f"scoring-{r}"].process.pid: f"scoring-{r}" for r in REPLICAS}

    async def holder() -> str | None:
        row = await db.fetchrow("SELECT state, lease_owner FROM scoring.evaluation_runs WHERE run_id = $1", run_id)
        assert row["state"] in (E.EVALUATION_STATE_PENDING, E.EVALUATION_STATE_RUNNING), "finished before the kill"
        return pids.get(int(row["lease_owner"].split(":")[1])) if row["lease_owner"] else None

    victim = await eventually("a worker claimed the run", holder, 10.0, poll_s=0.01)
    replicas.kill(victim)
    run = await _wait_run(stubs, run_id)
    assert run.resumed_count == 1, "the surviving worker did not take the run over"
    await _assert_applied_once(db, run)
