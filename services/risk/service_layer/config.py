"""The active configuration (rule set, model, lists, peer medians), cached per replica.

Every change to what decides (activating a rule set or a model, adding or removing list entries)
bumps `config_generation` and sends NOTIFY risk_config in the same transaction. Each replica keeps
an immutable `Snapshot` and swaps it when the generation moves: at once on the notification, and
within `POLL_S` by polling should a notification be lost. An assessment takes the snapshot once at
its start, so in-flight assessments finish with the rules and model they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from libs.db import DbConnection
from loyalty.risk.v1 import models_pb2
from services.risk.adapters.assessments_repo import peer_medians
from services.risk.domain.decision import ListKind, RuleSet
from services.risk.domain.forest import CompiledForest
from services.risk.domain.lists import Entry, ListIndex, Subject
from services.risk.service_layer import rulesets

log = logging.getLogger(__name__)

CHANNEL = "risk_config"
POLL_S = 2.0
PEER_REFRESH_S = 300.0
PEER_WINDOW = timedelta(days=30)
MODEL_ACTIVE = 3


@dataclass(frozen=True)
class ActiveModel:
    version: str
    forest: CompiledForest
    info: models_pb2.Model


@dataclass(frozen=True)
class Snapshot:
    generation: int
    rule_set: RuleSet
    model: ActiveModel | None
    lists: ListIndex
    peer_medians: dict[str, float] = field(default_factory=dict)


async def bump(conn: DbConnection) -> None:
    """Mark the configuration changed (call inside the changing transaction)."""
    generation = await conn.fetchval("UPDATE config_generation SET generation = generation + 1 RETURNING generation")
    await conn.execute(f"SELECT pg_notify('{CHANNEL}', $1)", str(generation))


class ConfigCache:
    def __init__(self, pool: Callable[[], asyncpg.Pool]) -> None:
        self._pool = pool
        self._snapshot: Snapshot | None = None
        self._lock = asyncio.Lock()
        self._models: dict[str, ActiveModel] = {}
        self._peer: dict[str, float] = {}
        self._peer_at = 0.0

    @property
    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            raise RuntimeError("configuration not loaded yet")
        return self._snapshot

    async def current(self) -> Snapshot:
        if self._snapshot is None:
            await self.reload()
        return self.snapshot

    async def reload(self) -> Snapshot:
        async with self._lock:
            async with self._pool().acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                generation = int(await conn.fetchval("SELECT generation FROM config_generation"))
                if self._snapshot is not None and generation == self._snapshot.generation:
                    return self._snapshot
                rule_set = rulesets.compile_rule_set(await rulesets.get(conn, 0))
                model = await self._active_model(conn)
                lists = await _load_lists(conn)
            self._snapshot = Snapshot(generation, rule_set, model, lists, self._peer)
            log.info("risk configuration loaded", extra={"generation": generation, "rule_set": rule_set.version,
                                                         "model": model.version if model else ""})
            return self._snapshot

    async def _active_model(self, conn: DbConnection) -> ActiveModel | None:
        row = await conn.fetchrow(f"SELECT model_version, info FROM models WHERE state = {MODEL_ACTIVE}")
        if row is None:
            return None
        version = row["model_version"]
        if version not in self._models:
            content = await conn.fetchval("SELECT content FROM models WHERE model_version = $1", version)
            info = models_pb2.Model.FromString(bytes(row["info"]))
            try:
                forest = CompiledForest.from_bytes(bytes(content or b""))
            except ValueError as exc:
                # Stored models were validated on the way in; one that no longer loads must not take
                # the gate down: assessments go on with rules and lists alone (model_skipped).
                log.error("active model %s does not load, assessing without it: %s", version, exc)
                return None
            self._models = {version: ActiveModel(version, forest, info)}
        return self._models[version]

    async def refresh_peers(self) -> None:
        async with self._pool().acquire() as conn:
            self._peer = await peer_medians(conn, datetime.now(UTC) - PEER_WINDOW)
        if self._snapshot is not None:
            s = self._snapshot
            self._snapshot = Snapshot(s.generation, s.rule_set, s.model, s.lists, self._peer)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow changes until `stop`: LISTEN for notifications, poll as a fallback, refresh peers."""
        wake = asyncio.Event()

        def notified(*_: object) -> None:
            wake.set()

        listener: DbConnection | None = None
        loop = asyncio.get_running_loop()
        next_peer = 0.0
        try:
            while not stop.is_set():
                try:
                    if listener is None:
                        listener = await self._pool().acquire()
                        await listener.add_listener(CHANNEL, notified)
                    await self.reload()
                    if loop.time() >= next_peer:
                        await self.refresh_peers()
                        next_peer = loop.time() + PEER_REFRESH_S
                except Exception as exc:  # the follower must outlive any one failure
                    log.warning("risk configuration refresh failed: %s", exc)
                    await self._release(listener, notified)
                    listener = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_first(wake, stop), POLL_S)
                wake.clear()
        finally:
            # On cancellation too: the pool cannot close while the listener is checked out.
            await self._release(listener, notified)

    async def _release(self, listener: DbConnection | None, callback: Callable[..., None]) -> None:
        if listener is not None:
            with contextlib.suppress(Exception):
                # The pool does not reset clean connections (libs.db): stop listening ourselves.
                await listener.remove_listener(CHANNEL, callback)
            with contextlib.suppress(Exception):
                await self._pool().release(listener)  # type: ignore[arg-type]


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def _load_lists(conn: DbConnection) -> ListIndex:
    rows = await conn.fetch(
        "SELECT entry_id, kind, subject_type, value, expires_at FROM list_entries"
        " WHERE removed_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
    )
    return ListIndex(Entry(r["entry_id"], ListKind(r["kind"]), Subject(r["subject_type"]), r["value"],
                           r["expires_at"]) for r in rows)
