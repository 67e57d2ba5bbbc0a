"""Evaluation runs: accepting a run, and the worker that carries it out.

A run goes PENDING → RUNNING (STREAMING → SCORING → WRITING → APPLYING) → SUCCEEDED. The worker
holds a lease on it, renewed while it works; a worker that dies lets the lease lapse and the next
one resumes the run (`resumed_count`):
- before its scores are stored, a resumed run starts over (the features as of `as_of` are the same,
  so the result is too);
- once they are, it only sends the tier changes not yet acknowledged. Changes go out in member-id
  order and `applied_through` records the acknowledged prefix; rewards applies each change once
  per (run, member), so the chunk that was in flight at the crash is harmless to resend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import repeat
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import numpy as np

from libs import errors
from libs.db import DbConnection
from libs.errors import FieldViolation, LoyaltyError
from loyalty.rewards.v1 import tiers_pb2
from loyalty.scoring.v1 import evaluation_pb2 as E
from loyalty.scoring.v1 import policy_pb2
from loyalty.scoring.v1 import scoring_service_pb2 as S
from services.scoring.adapters import policies_repo, runs_repo
from services.scoring.adapters.peers import Change, Matrix, Profile, Rewards
from services.scoring.adapters.runs_repo import (
    APPLYING,
    CANCELLED,
    DONE,
    FAILED,
    SCORING,
    STREAMING,
    SUCCEEDED,
    WRITING,
)
from services.scoring.domain import kernel
from services.scoring.domain import policy as rules
from services.scoring.service_layer import audit_trail
from services.scoring.settings import ScoringSettings, get_scoring_settings
from services.scoring.spark import results
from services.scoring.telemetry import record_evaluation

log = logging.getLogger(__name__)
AS_OF_SKEW = timedelta(seconds=5)
TENURE = "tenure_days"
ONLINE_IDS_MAX = 1000  # a smaller population is asked for by id
DAYS_PER_YEAR = 365
ANNIVERSARY_CALLS_IN_FLIGHT = 8
W = policy_pb2
DIRECTIONS = {E.TIER_CHANGE_NEW: tiers_pb2.TIER_CHANGE_DIRECTION_INITIAL,
              E.TIER_CHANGE_UPGRADE: tiers_pb2.TIER_CHANGE_DIRECTION_UPGRADE,
              E.TIER_CHANGE_DOWNGRADE: tiers_pb2.TIER_CHANGE_DIRECTION_DOWNGRADE}


class Cancelled(Exception):
    """The run was cancelled (or taken over) while this worker held it."""


def as_of_of(request: Any, field: str, now: datetime) -> datetime:
    """The request's time, or now; INVALID_ARGUMENT (FUTURE_AS_OF) beyond the clock skew."""
    if not request.HasField(field):
        return now
    as_of: datetime = getattr(request, field).ToDatetime(tzinfo=UTC)
    if as_of > now + AS_OF_SKEW:
        raise errors.invalid_argument([FieldViolation(field, "is in the future")], reason="FUTURE_AS_OF")
    return as_of


async def resolve_policy(conn: DbConnection | asyncpg.Pool, policy_id: str, version: int) -> policy_pb2.Policy:
    """The named version (0 = latest), or the active policy when no id is given."""
    if policy_id:
        return await policies_repo.get(conn, policy_id, version)
    active = await policies_repo.active(conn)
    if active is None:
        raise errors.failed_precondition("no policy is active: activate one first", reason="NO_ACTIVE_POLICY")
    return active


def needs_tenure(policy: policy_pb2.Policy) -> bool:
    """Anniversary windows are the member's own: placing members needs their tenure."""
    return policy.qualification_window.kind == W.QUALIFICATION_WINDOW_KIND_ANNIVERSARY


async def _points_in(rewards: Rewards, start: datetime, end: datetime, member_ids: Sequence[str]) -> np.ndarray:
    """Points of `member_ids` (aligned, 0 for none) in [start, end): asked by id up to 1,000 members,
    else the population's stream is read and picked from."""
    if start >= end or not member_ids:
        return np.zeros(len(member_ids), dtype=np.int64)
    ids, points = await rewards.qualifying_points(start, end, member_ids if len(member_ids) <= ONLINE_IDS_MAX else ())
    index = dict(zip(ids, points.tolist(), strict=True))
    return np.fromiter((index.get(m, 0) for m in member_ids), dtype=np.int64, count=len(member_ids))


async def _anniversary_points(rewards: Rewards, member_ids: Sequence[str], as_of: datetime, tenure: np.ndarray
                              ) -> np.ndarray:
    """Each member's qualifying points under an anniversary window: the better of its current
    membership year so far, [last anniversary, as_of), and its last complete one, [anniversary a
    year before, last anniversary). Status earned in a membership year holds through the next: a
    member is judged on the year that just closed when its year turns (when downgrade_mask lets it
    move down), and its points so far can lift it in the meantime. Years are 365 days from the
    joining date (tenure_days as of as_of), as downgrade_mask counts them. Tenure is whole days, so a
    year is taken to start at the beginning of its first day: up to a day early, never late (a
    point earned in the year is never missed).

    Members whose anniversaries fall on the same day share both windows: one rewards call per
    window and day (by id up to 1,000 members), a bounded number in flight."""
    n = len(member_ids)
    days = np.maximum(np.nan_to_num(np.asarray(tenure, dtype=np.float64)), 0).astype(np.int64)
    into_year = days % DAYS_PER_YEAR
    has_past_year = days >= DAYS_PER_YEAR
    ids = np.array(member_ids, dtype=object)
    best = np.zeros(n, dtype=np.int64)
    gate = asyncio.Semaphore(ANNIVERSARY_CALLS_IN_FLIGHT)

    async def window(rows: np.ndarray, start: datetime, end: datetime) -> None:
        for first in range(0, rows.size, ONLINE_IDS_MAX):
            part = rows[first:first + ONLINE_IDS_MAX]
            async with gate:
                points = await _points_in(rewards, start, end, ids[part].tolist())
            np.maximum.at(best, part, points)

    calls = []
    for offset in np.unique(into_year).tolist():
        rows = np.flatnonzero(into_year == offset)
        turned = as_of - timedelta(days=offset + 1)
        calls.append(window(rows, turned, as_of))
        past = rows[has_past_year[rows]]
        if past.size:
            calls.append(window(past, turned - timedelta(days=DAYS_PER_YEAR), turned))
    await asyncio.gather(*calls)
    return best


async def qualifying_points(rewards: Rewards, policy: policy_pb2.Policy, member_ids: Sequence[str], as_of: datetime,
                            zone: Any, tenure: np.ndarray | None = None) -> np.ndarray | None:
    """For the QUALIFYING POINTS rule: each member's points in the policy's window (int64, aligned
    with `member_ids`, 0 for members with none); None for the score rules. Anniversary windows need
    the members' `tenure` (days, aligned) as of `as_of`."""
    if policy.WhichOneof("threshold_rule") != "qualifying_points":
        return None
    if needs_tenure(policy):
        if tenure is None or np.shape(tenure) != (len(member_ids),):
            raise ValueError("anniversary windows need one tenure per member")
        return await _anniversary_points(rewards, member_ids, as_of, tenure)
    return await _points_in(rewards, rules.window_start(policy, as_of, zone), as_of, member_ids)


def results_directory(uri: str, imports: Path) -> Path:
    """The result set directory a run names: a path (or file:// URI) inside the import directory;
    a relative one is taken from there. ResultsError for anything else."""
    try:
        resolved = (imports / uri.removeprefix("file://")).resolve()
        if not resolved.is_relative_to(imports):
            raise results.ResultsError(f"{uri} is not inside the import directory {imports}")
        if not resolved.is_dir():
            raise results.ResultsError(f"{resolved} is not a directory")
    except results.ResultsError:
        raise
    except (OSError, ValueError) as error:  # a NUL byte, a name too long, a loop of links
        raise results.ResultsError(f"{uri!r} is not a usable path: {error}") from None
    return resolved


def checked_manifest(directory: Path, spec: kernel.PolicySpec, policy: policy_pb2.Policy) -> results.Manifest:
    """The result set's manifest, if it is of this policy version and carries what the policy needs
    beside the scores; ResultsError otherwise. Checked when a run is accepted and again when it runs."""
    manifest = results.read_manifest(directory)
    manifest.check_against(spec, policy.policy_id, policy.version)
    if needs_tenure(policy) and TENURE not in manifest.extra:
        raise results.ResultsError(f"the policy's anniversary window needs {TENURE} in the results")
    return manifest


def _results_refused(field: str, error: results.ResultsError) -> LoyaltyError:
    return errors.invalid_argument([FieldViolation(field, str(error))], reason="RESULTS_INVALID")


async def start(conn: DbConnection, request: S.RunEvaluationRequest, actor: str, now: datetime,
                imports: Path | None = None) -> S.RunEvaluationResponse:
    """Accept a run (inside the request-id transaction); the worker picks it up. A run importing a
    result set has it checked here (manifest, policy version, as of); its files when it runs."""
    as_of = as_of_of(request, "as_of", now)
    policy = await resolve_policy(conn, request.policy_id, request.version)
    results_uri = ""
    if request.results_uri:
        try:
            directory = results_directory(request.results_uri, imports or get_scoring_settings().imports)
            manifest = checked_manifest(directory, rules.spec_of(policy), policy)
        except results.ResultsError as error:
            raise _results_refused("results_uri", error) from None
        if request.HasField("as_of") and as_of != manifest.as_of:
            raise _results_refused("as_of", results.ResultsError(
                f"the result set was computed as of {manifest.as_of.isoformat()}, not {as_of.isoformat()}"))
        if manifest.as_of > now + AS_OF_SKEW:
            raise _results_refused("results_uri", results.ResultsError("the result set's as_of is in the future"))
        as_of, results_uri = manifest.as_of, str(directory)
    if not request.dry_run:
        if policy.state != policies_repo.ACTIVE:
            raise errors.failed_precondition(
                f"policy {policy.policy_id} v{policy.version} is not the active one: only a dry run is possible",
                reason="POLICY_NOT_ACTIVE")
        last = await runs_repo.last_applied(conn)
        if last is not None and as_of < last["as_of"]:
            raise errors.failed_precondition(
                f"run {last['run_id']} already applied tiers as of {last['as_of'].isoformat()}",
                reason="AS_OF_BEFORE_LAST_RUN", run_id=last["run_id"])
    row = await runs_repo.insert_run(conn, f"run-{uuid.uuid4().hex}", policy.policy_id, policy.version, as_of,
                                     request.dry_run, E.EVALUATION_TRIGGER_REQUEST, request.request_id, actor,
                                     results_uri)
    if not request.dry_run:  # a dry run changes nothing for members: no record
        await audit_trail.record(conn, "evaluation.run", "evaluation_run", row["run_id"],
                                 request_id=request.request_id, after=audit_trail.run_summary(row))
    return S.RunEvaluationResponse(run=runs_repo.run_message(row))


async def cancel(conn: DbConnection, request: S.CancelEvaluationRequest) -> S.CancelEvaluationResponse:
    """Cancel a run that is not applying yet (inside the request-id transaction); cancelling an
    applied run is recorded in the audit trail, a dry run's or a repeat is not."""
    before = await conn.fetchrow("SELECT * FROM evaluation_runs WHERE run_id = $1 FOR UPDATE", request.run_id)
    row = await runs_repo.cancel(conn, request.run_id)
    if before is not None and not before["dry_run"] and before["state"] != CANCELLED:
        await audit_trail.record(conn, "evaluation.cancel", "evaluation_run", request.run_id,
                                 request_id=request.request_id, before=audit_trail.run_summary(before),
                                 after=audit_trail.run_summary(row))
    return S.CancelEvaluationResponse(run=runs_repo.run_message(row))


async def wait_finished(pool: asyncpg.Pool, run_id: str, time_remaining: Callable[[], float | None]) -> E.EvaluationRun:
    """Poll until the run finished, or fail with DEADLINE_EXCEEDED just before the caller's deadline."""
    while True:
        run = runs_repo.run_message(await runs_repo.get_run(pool, run_id))
        if run.state in (SUCCEEDED, FAILED, CANCELLED):
            return run
        remaining = time_remaining()
        if remaining is not None and remaining < 0.5:
            raise LoyaltyError(grpc.StatusCode.DEADLINE_EXCEEDED, "EVALUATION_NOT_FINISHED",
                               f"run {run_id} is still going on: poll GetEvaluation", metadata={"run_id": run_id})
        await asyncio.sleep(0.2)


# ---- the kernel's inputs beside the matrix -------------------------------------------------------


def align_previous(member_ids: Sequence[str], previous: runs_repo.PreviousTiers, ladder: Sequence[str]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Previous tier index in the ladder (-1 none or not in it), grace counters and raw previous tier
    ids, aligned with `member_ids`. A dict, not searchsorted: both sides are in PostgreSQL's collation
    order, which Python's string order need not match."""
    n = len(member_ids)
    index = dict(zip(previous.member_ids.tolist(), range(len(previous.member_ids)), strict=True))
    pos = np.fromiter((index.get(m, -1) for m in member_ids), dtype=np.int64, count=n)
    found = pos >= 0
    tiers = np.full(n, -1, dtype=np.int8)
    grace = np.zeros(n, dtype=np.int16)
    raw = np.full(n, "", dtype=object)
    if previous.tier_ids:
        unique, inverse = np.unique(np.array(previous.tier_ids, dtype=object), return_inverse=True)
        lut = np.array([ladder.index(t) if t in ladder else -1 for t in unique.tolist()], dtype=np.int8)
        tiers[found] = lut[inverse[pos[found]]]
        grace[found] = previous.grace[pos[found]]
        raw[found] = unique[inverse[pos[found]]]
    return tiers, grace, raw


def downgrade_mask(policy: policy_pb2.Policy, matrix: Matrix, baseline_as_of: datetime | None, as_of: datetime,
                   zone: Any) -> np.ndarray | None:
    """Who may be downgraded now: everyone for a rolling window; for a calendar-year window only at
    the first evaluation of a new year; for an anniversary window the members whose membership year
    turned since the previous run (365-day years)."""
    kind = policy.qualification_window.kind
    if baseline_as_of is None or kind in (W.QUALIFICATION_WINDOW_KIND_UNSPECIFIED,
                                          W.QUALIFICATION_WINDOW_KIND_ROLLING_MONTHS):
        return None
    if kind == W.QUALIFICATION_WINDOW_KIND_CALENDAR_YEAR:
        turned = as_of.astimezone(zone).year > baseline_as_of.astimezone(zone).year
        return np.full(matrix.size, turned, dtype=bool)
    tenure = matrix.extra[TENURE].astype(np.int64)
    elapsed = (as_of - baseline_as_of).days
    return np.asarray(tenure // DAYS_PER_YEAR > np.maximum(tenure - elapsed, 0) // DAYS_PER_YEAR)


@dataclass
class Imported:
    manifest: results.Manifest
    scores: np.ndarray
    matrix: Matrix  # the members (and tenure, when the policy needs it), without feature columns


def load_results(directory: Path, spec: kernel.PolicySpec, policy: policy_pb2.Policy, as_of: datetime) -> Imported:
    """A run's result set, read and checked again (files may have changed since the run was
    accepted); FAILED_PRECONDITION (RESULTS_INVALID) fails the run with the reason."""
    try:
        manifest = checked_manifest(directory, spec, policy)
        if manifest.as_of != as_of:
            raise results.ResultsError(f"the result set is now as of {manifest.as_of.isoformat()}")
        scores = results.read_scores(directory, manifest, spec)
    except results.ResultsError as error:
        raise errors.failed_precondition(str(error), reason="RESULTS_INVALID") from None
    matrix = Matrix(member_ids=scores.member_ids, values=np.empty((scores.size, 0)), definitions=[], as_of=as_of,
                    extra=scores.extra)
    return Imported(manifest=manifest, scores=scores.scores, matrix=matrix)


def change_kinds(previous: np.ndarray, tier: np.ndarray) -> np.ndarray:
    return np.where(previous < 0, E.TIER_CHANGE_NEW,
                    np.where(tier > previous, E.TIER_CHANGE_UPGRADE,
                             np.where(tier < previous, E.TIER_CHANGE_DOWNGRADE, E.TIER_CHANGE_UNCHANGED))
                    ).astype(np.int16)


# ---- the report ---------------------------------------------------------------------------------


def tier_thresholds(policy: policy_pb2.Policy, thresholds: np.ndarray) -> list[E.TierThreshold]:
    margin = policy.hysteresis.downgrade_margin
    points = policy.WhichOneof("threshold_rule") == "qualifying_points"
    result = [E.TierThreshold(tier_id=policy.tiers[0].tier_id)]
    for i, tier in enumerate(policy.tiers[1:]):
        value = float(thresholds[i])
        if points:
            result.append(E.TierThreshold(tier_id=tier.tier_id, min_points=int(value),
                                          keep_points=int(max(value - margin, 0))))
        else:
            result.append(E.TierThreshold(tier_id=tier.tier_id, min_score=value, keep_score=value - margin))
    return result


def feature_statistics(stats: kernel.Statistics) -> list[E.FeatureStatistics]:
    return [E.FeatureStatistics(feature_name=f.name, mean=f.mean, std_dev=f.std_dev, min=f.min, max=f.max, p50=f.p50,
                                p90=f.p90, p99=f.p99, winsorize_cap=f.winsorize_cap, members_capped=f.members_capped)
            for f in stats.features]


def tier_counts(ladder: Sequence[str], tier: np.ndarray) -> list[E.TierCount]:
    counts = np.bincount(tier.astype(np.int64), minlength=len(ladder)) if tier.size else np.zeros(len(ladder), int)
    total = max(int(tier.size), 1)
    return [E.TierCount(tier_id=t, count=int(c), share=int(c) / total) for t, c in zip(ladder, counts, strict=True)]


def migration_cells(previous: np.ndarray, tier: np.ndarray, ladder: Sequence[str]) -> list[E.MigrationCell]:
    matrix = kernel.migration(previous, tier, len(ladder))
    labels = ["", *ladder]
    return [E.MigrationCell(from_tier_id=labels[i], to_tier_id=ladder[j], count=int(matrix[i, j]))
            for i, j in zip(*np.nonzero(matrix), strict=True)]


def build_report(policy: policy_pb2.Policy, result: kernel.Evaluation, previous: np.ndarray, changes: np.ndarray
                 ) -> E.EvaluationRun:
    ladder = rules.tier_ids(policy)
    tier = result.placement.tier
    report = E.EvaluationRun(
        tier_counts=tier_counts(ladder, tier), migration=migration_cells(previous, tier, ladder),
        upgrades=int(np.count_nonzero(changes == E.TIER_CHANGE_UPGRADE)),
        downgrades=int(np.count_nonzero(changes == E.TIER_CHANGE_DOWNGRADE)),
        unchanged=int(np.count_nonzero(changes == E.TIER_CHANGE_UNCHANGED)),
        new_members=int(np.count_nonzero(changes == E.TIER_CHANGE_NEW)),
        held_by_hysteresis=int(np.count_nonzero(result.placement.held)),
        thresholds=tier_thresholds(policy, result.thresholds), feature_statistics=feature_statistics(result.stats))
    for name, value in kernel.score_distribution(result.raw_scores).items():
        setattr(report.score_distribution, name, value)
    return report


def change_reason(row: asyncpg.Record, thresholds: Sequence[E.TierThreshold], points: bool) -> str:
    by_id = {t.tier_id: t for t in thresholds}
    value = f"{row['qualifying_points']} points" if points else f"score {row['score']:.4g}"
    if row["change"] == E.TIER_CHANGE_NEW:
        return f"first placement: {value} qualifies for {row['qualifying_tier_id']}"
    if row["change"] == E.TIER_CHANGE_UPGRADE:
        level = by_id[row["tier_id"]]
        return f"{value} >= {row['tier_id']} threshold {level.min_points if points else f'{level.min_score:.4g}'}"
    level = by_id.get(row["previous_tier_id"], E.TierThreshold())
    keep = level.keep_points if points else f"{level.keep_score:.4g}"
    return f"{value} below the {row['previous_tier_id']} keep level {keep}"


# ---- the worker ---------------------------------------------------------------------------------


@dataclass
class _Held:
    run_id: str
    lost: bool = False


class RunWorker:
    """Claims open runs one at a time and carries them out."""

    def __init__(self, pool: Callable[[], asyncpg.Pool], profile: Profile, rewards: Rewards,
                 settings: ScoringSettings) -> None:
        self._pool = pool
        self._profile = profile
        self._rewards = rewards
        self._settings = settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            try:
                done = await self.run_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("evaluation worker round failed", extra={"error": type(error).__name__})
                done = 0
            if not done:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._settings.worker_interval_s)

    async def run_once(self) -> int:
        row = await runs_repo.claim(self._pool(), self.owner, self._settings.lease_s)
        if row is None:
            return 0
        await self.execute(row)
        return 1

    async def _keep_lease(self, held: _Held) -> None:
        while not held.lost:
            await asyncio.sleep(self._settings.lease_s / 3)
            held.lost = not await runs_repo.renew(self._pool(), held.run_id, self.owner, self._settings.lease_s)

    async def _stage(self, held: _Held, stage: int) -> None:
        if held.lost or not await runs_repo.set_stage(self._pool(), held.run_id, self.owner, stage):
            raise Cancelled

    async def execute(self, row: asyncpg.Record) -> None:
        held = _Held(row["run_id"])
        lease = asyncio.create_task(self._keep_lease(held))
        pool = self._pool()
        started = time.perf_counter()
        outcome = "failed"
        try:
            policy = await policies_repo.get(pool, row["policy_id"], row["policy_version"])
            if row["stage"] < APPLYING:
                await self._score(held, row, policy)
                if row["dry_run"]:
                    await runs_repo.finish(pool, held.run_id, SUCCEEDED, DONE, owner=self.owner)
                    outcome = "dry_run"
                    return
                await self._stage(held, APPLYING)
            applying = time.perf_counter()
            await self._apply(held, policy, row["as_of"])
            await self._add_apply_time(held.run_id, time.perf_counter() - applying)
            await runs_repo.finish(pool, held.run_id, SUCCEEDED, DONE, owner=self.owner)
            outcome = "succeeded"
        except Cancelled:
            outcome = "cancelled"
            log.info("evaluation run stopped: cancelled or taken over", extra={"run_id": held.run_id})
        except LoyaltyError as error:
            if error.reason == "EVALUATION_CANCELLED":
                outcome = "cancelled"
                return
            log.warning("evaluation run failed", extra={"run_id": held.run_id, "reason": error.reason})
            await runs_repo.finish(pool, held.run_id, FAILED, (await runs_repo.get_run(pool, held.run_id))["stage"],
                                   error.reason, error.message, owner=self.owner)
        except Exception:
            log.exception("evaluation run failed", extra={"run_id": held.run_id})
            await runs_repo.finish(pool, held.run_id, FAILED, (await runs_repo.get_run(pool, held.run_id))["stage"],
                                   "INTERNAL", "the run failed on an internal error; see the scoring logs",
                                   owner=self.owner)
        finally:
            record_evaluation(outcome, time.perf_counter() - started)
            lease.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease

    async def _score(self, held: _Held, row: asyncpg.Record, policy: policy_pb2.Policy) -> None:
        pool = self._pool()
        spec = rules.spec_of(policy)
        ladder = rules.tier_ids(policy)
        started = time.perf_counter()
        await self._stage(held, STREAMING)
        extra = [TENURE] if needs_tenure(policy) else []
        imported: Imported | None = None
        if row["results_uri"]:
            imported = await asyncio.to_thread(load_results, Path(row["results_uri"]), spec, policy, row["as_of"])
            matrix = imported.matrix
        else:
            matrix = await self._profile.stream([f.name for f in spec.features], row["as_of"],
                                                self._settings.stream_chunk_size, extra, cancelled=lambda: held.lost)
        streamed = time.perf_counter()
        await self._stage(held, SCORING)
        baseline = await runs_repo.last_applied(pool)
        previous_rows = (await runs_repo.previous_tiers(pool, baseline["run_id"]) if baseline is not None
                         else runs_repo.PreviousTiers(np.empty(0, dtype=object), [], np.empty(0, dtype=np.int16)))
        previous, grace, raw_previous = align_previous(matrix.member_ids, previous_rows, ladder)
        allowed = downgrade_mask(policy, matrix, baseline["as_of"] if baseline is not None else None, row["as_of"],
                                 self._settings.zone)
        points = await qualifying_points(self._rewards, policy, matrix.member_ids, row["as_of"], self._settings.zone,
                                         matrix.extra.get(TENURE))
        if imported is None:
            result = kernel.evaluate(matrix.values, spec, previous, grace, points, allowed)
        else:
            result = kernel.place(imported.scores, np.array(imported.manifest.thresholds, dtype=np.float64),
                                  imported.manifest.statistics, spec, previous, grace, points, allowed)
        percentiles = kernel.percentiles(result.raw_scores)
        changes = change_kinds(previous, result.placement.tier)
        scored = time.perf_counter()
        await self._stage(held, WRITING)
        report = build_report(policy, result, previous, changes)
        report.engine = "numpy" if imported is None else imported.manifest.engine
        report.quantile_relative_error = 0.0 if imported is None else imported.manifest.relative_error
        report.timings.stream.FromTimedelta(timedelta(seconds=streamed - started))
        report.timings.score.FromTimedelta(timedelta(seconds=scored - streamed))
        changed = int(np.count_nonzero(changes != E.TIER_CHANGE_UNCHANGED))
        labels = np.array(ladder, dtype=object)
        placement = result.placement
        remaining = np.where(placement.held & (placement.grace_counter > 0),
                             spec.grace_cycles - placement.grace_counter, 0)
        records = zip(repeat(held.run_id), matrix.member_ids, result.raw_scores.tolist(), percentiles.tolist(),
                      labels[result.qualifying].tolist(), labels[placement.tier].tolist(), raw_previous.tolist(),
                      changes.tolist(), placement.held.tolist(), placement.grace_counter.tolist(), remaining.tolist(),
                      points.tolist() if points is not None else repeat(0), strict=False)
        async with pool.acquire() as conn, conn.transaction():
            await runs_repo.clear_scores(conn, held.run_id)
            await runs_repo.copy_scores(conn, records)
            written = time.perf_counter()
            report.timings.write.FromTimedelta(timedelta(seconds=written - scored))
            report.timings.total.FromTimedelta(timedelta(seconds=written - started))
            await runs_repo.store_report(conn, held.run_id, report, result.stats.to_json(),
                                         baseline["run_id"] if baseline is not None else "", matrix.size, changed)

    async def _add_apply_time(self, run_id: str, seconds: float) -> None:
        """Record the apply stage in the stored timings (a resumed run counts this worker's part)."""
        pool = self._pool()
        row = await runs_repo.get_run(pool, run_id)
        report = E.EvaluationRun.FromString(bytes(row["report"]))
        report.timings.apply.FromTimedelta(timedelta(seconds=seconds))
        report.timings.total.FromTimedelta(report.timings.total.ToTimedelta() + timedelta(seconds=seconds))
        await runs_repo.update_report(pool, run_id, report)

    async def _apply(self, held: _Held, policy: policy_pb2.Policy, as_of: datetime) -> None:
        pool = self._pool()
        row = await runs_repo.get_run(pool, held.run_id)
        thresholds = list(runs_repo.run_message(row).thresholds)
        points = policy.WhichOneof("threshold_rule") == "qualifying_points"
        after = row["applied_through"]
        size = self._settings.apply_chunk_size
        while True:
            if held.lost:
                raise Cancelled  # another worker holds the run now; it goes on from the acknowledged prefix
            rows = await runs_repo.pending_changes(pool, held.run_id, after, size * self._settings.apply_concurrency)
            if not rows:
                return
            chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
            await asyncio.gather(*(self._send(held.run_id, as_of, [
                Change(r["member_id"], r["previous_tier_id"], r["tier_id"], DIRECTIONS[r["change"]],
                       change_reason(r, thresholds, points)) for r in chunk]) for chunk in chunks))
            after = rows[-1]["member_id"]
            await runs_repo.mark_applied(pool, held.run_id, after, len(rows))

    async def _send(self, run_id: str, as_of: datetime, changes: list[Change]) -> None:
        """One chunk, retried with back-off while rewards is unavailable (up to apply_retry_s_max)."""
        deadline = time.monotonic() + self._settings.apply_retry_s_max
        delay = 0.2
        while True:
            try:
                await self._rewards.apply(run_id, as_of, changes)
                return
            except LoyaltyError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
