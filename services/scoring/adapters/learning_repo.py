"""Storage of what scoring learns: weight fits, segmentations (segments and members), models and
their fitted arrays (np.savez archives, loaded with allow_pickle=False: never pickle)."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import numpy as np

from libs import errors
from libs.db import DbConnection
from loyalty.scoring.v1 import learning_pb2 as L

SEGMENT_MEMBER_COLUMNS = ("segmentation_id", "member_id", "segment_index", "distance", "pca_x", "pca_y")


# ---- arrays ---------------------------------------------------------------------------------------


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """An np.savez archive of plain numeric (or unicode) arrays; object arrays are refused, since
    they could only be read back with pickle."""
    for name, array in arrays.items():
        if array.dtype.hasobject:
            raise ValueError(f"array {name!r} holds Python objects: store numbers or fixed-width strings")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


# ---- weight fits ----------------------------------------------------------------------------------


async def insert_fit(conn: DbConnection, fit: L.WeightFit, created_at: datetime) -> None:
    await conn.execute(
        "INSERT INTO weight_fits (fit_id, base_policy_id, base_policy_version, proposed_policy_id,"
        " proposed_policy_version, body, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        fit.fit_id, fit.base_policy.policy_id, fit.base_policy.version, fit.proposed_policy.policy_id,
        fit.proposed_policy.version, fit.SerializeToString(), created_at)


# ---- segmentations --------------------------------------------------------------------------------


def segmentation_message(row: asyncpg.Record) -> L.Segmentation:
    message = L.Segmentation.FromString(bytes(row["body"]))
    message.current = row["current"]
    return message


async def insert_segmentation(conn: DbConnection, segmentation: L.Segmentation, segments: Sequence[L.Segment],
                              members: Iterable[Sequence[Any]]) -> None:
    """Store a segmentation with its segments and members and make it the current one."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('scoring.segmentation.current', 0))")
    await conn.execute("UPDATE segmentations SET current = false WHERE current")
    body = L.Segmentation()
    body.CopyFrom(segmentation)
    body.ClearField("current")
    await conn.execute(
        "INSERT INTO segmentations (segmentation_id, current, body, created_at) VALUES ($1, true, $2, $3)",
        segmentation.segmentation_id, body.SerializeToString(), segmentation.created_at.ToDatetime(tzinfo=UTC))
    await conn.executemany(
        "INSERT INTO segments (segmentation_id, segment_index, body) VALUES ($1, $2, $3)",
        [(segmentation.segmentation_id, s.index, s.SerializeToString()) for s in segments])
    await conn.copy_records_to_table("segment_members", records=members, columns=SEGMENT_MEMBER_COLUMNS)


async def segmentation(conn: DbConnection | asyncpg.Pool, segmentation_id: str) -> asyncpg.Record:
    """The named segmentation, or the current one for ""; NOT_FOUND SEGMENTATION_NOT_FOUND /
    NO_SEGMENTATION."""
    if segmentation_id:
        row = await conn.fetchrow("SELECT * FROM segmentations WHERE segmentation_id = $1", segmentation_id)
        if row is None:
            raise errors.not_found("segmentation", segmentation_id, reason="SEGMENTATION_NOT_FOUND")
        return row
    row = await conn.fetchrow("SELECT * FROM segmentations WHERE current")
    if row is None:
        raise errors.not_found("segmentation", "current", reason="NO_SEGMENTATION")
    return row


async def segments(conn: DbConnection | asyncpg.Pool, segmentation_id: str, after_index: int, limit: int
                   ) -> list[L.Segment]:
    rows = await conn.fetch(
        "SELECT body FROM segments WHERE segmentation_id = $1 AND segment_index > $2 ORDER BY segment_index LIMIT $3",
        segmentation_id, after_index, limit)
    return [L.Segment.FromString(bytes(r["body"])) for r in rows]


async def segment(conn: DbConnection | asyncpg.Pool, segmentation_id: str, index: int) -> L.Segment | None:
    body = await conn.fetchval("SELECT body FROM segments WHERE segmentation_id = $1 AND segment_index = $2",
                               segmentation_id, index)
    return L.Segment.FromString(bytes(body)) if body is not None else None


async def segment_members(conn: DbConnection | asyncpg.Pool, segmentation_id: str, index: int, after: str,
                          limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM segment_members WHERE segmentation_id = $1 AND segment_index = $2 AND member_id > $3"
        " ORDER BY member_id LIMIT $4", segmentation_id, index, after, limit)


async def member_segment(conn: DbConnection | asyncpg.Pool, segmentation_id: str, member_id: str
                         ) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM segment_members WHERE segmentation_id = $1 AND member_id = $2",
                               segmentation_id, member_id)


# ---- models ---------------------------------------------------------------------------------------


def model_message(row: asyncpg.Record) -> L.Model:
    message = L.Model.FromString(bytes(row["body"]))
    message.latest = row["latest"]
    return message


async def insert_model(conn: DbConnection, model: L.Model, arrays: bytes) -> None:
    """Store a model and make it the latest of its kind."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('scoring.model.latest:' || $1::smallint::text, 0))", model.kind)
    await conn.execute("UPDATE models SET latest = false WHERE kind = $1 AND latest", model.kind)
    body = L.Model()
    body.CopyFrom(model)
    body.ClearField("latest")
    await conn.execute(
        "INSERT INTO models (model_id, kind, latest, body, arrays, created_at) VALUES ($1, $2, true, $3, $4, $5)",
        model.model_id, model.kind, body.SerializeToString(), arrays, model.created_at.ToDatetime(tzinfo=UTC))


async def model(conn: DbConnection | asyncpg.Pool, model_id: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM models WHERE model_id = $1", model_id)
    if row is None:
        raise errors.not_found("model", model_id, reason="MODEL_NOT_FOUND")
    return row


async def latest_model(conn: DbConnection | asyncpg.Pool, kind: int) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM models WHERE kind = $1 AND latest", kind)


async def models_page(conn: DbConnection | asyncpg.Pool, kind: int, after: tuple[datetime, str] | None, limit: int
                      ) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT model_id, kind, latest, body, created_at FROM models"
        " WHERE ($1 = 0 OR kind = $1) AND ($2::timestamptz IS NULL OR (created_at, model_id) < ($2, $3))"
        " ORDER BY created_at DESC, model_id DESC LIMIT $4",
        kind, after[0] if after else None, after[1] if after else "", limit)
