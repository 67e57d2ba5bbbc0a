"""Use cases: the feature catalogue, the columnar feature stream, and features of a few members.

A chunk is one SQL statement: the members of the chunk in id order, their daily buckets grouped
per member, and every column returned as one array (PostgreSQL builds the arrays; Python copies
them into packed protobuf fields without a loop per member). The stream reads one consistent
snapshot (REPEATABLE READ), so a matrix never mixes two moments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc

from libs import errors
from loyalty.profile.v1 import feature_pb2, member_pb2, profile_service_pb2
from services.profile.domain import features as catalogue_rules
from services.profile.domain.features import Column, UnknownFeature
from services.profile.service_layer.portraits import timestamp

CHUNK_MEMBERS_DEFAULT = 10_000
MESSAGE_BYTES_MAX = 3_500_000  # under gRPC's 4 MiB default with room for ids and framing
MEMBER_ID_BYTES_EST = 40
ACTIVE = member_pb2.MEMBER_STATUS_ACTIVE
FEATURES_PAGE_DEFAULT = 200


def list_features(request: profile_service_pb2.ListFeaturesRequest) -> profile_service_pb2.ListFeaturesResponse:
    definitions = catalogue_rules.catalogue()
    start = int(request.page_token) if request.page_token.isdigit() else 0
    if request.page_token and not request.page_token.isdigit():
        raise errors.invalid_argument([errors.FieldViolation("page_token", "is not a token we issued")])
    size = request.page_size or FEATURES_PAGE_DEFAULT
    page = definitions[start:start + size]
    response = profile_service_pb2.ListFeaturesResponse(features=page,
                                                        catalogue_version=catalogue_rules.catalogue_version())
    if start + size < len(definitions):
        response.next_page_token = str(start + size)
    return response


def _resolve_columns(names: Sequence[str], field: str) -> tuple[list[Column], set[int]]:
    wanted = list(names) or [d.name for d in catalogue_rules.catalogue()]
    columns: list[Column] = []
    windows: set[int] = set()
    violations = []
    for index, name in enumerate(wanted):
        try:
            column, needed = catalogue_rules.resolve(name)
        except UnknownFeature as unknown:
            violations.append(errors.FieldViolation(f"{field}[{index}]", unknown.why))
            continue
        columns.append(column)
        windows |= needed
    if violations:
        raise errors.invalid_argument(violations, reason="UNKNOWN_FEATURE")
    return columns, windows


def _as_of(has: bool, value: Any) -> datetime:
    now = datetime.now(UTC)
    as_of = timestamp(value, "as_of") if has else now
    if as_of > now + timedelta(seconds=60):
        raise errors.invalid_argument([errors.FieldViolation("as_of", "must not be in the future")])
    return as_of


@dataclass(frozen=True)
class _Query:
    sql: str
    filter_args: list[Any]


def _chunk_query(columns: list[Column], windows: set[int], filters: list[str], filter_args: list[Any],
                 groups: bool) -> _Query:
    """$1 start-after id, $2 as-of day, $3 as-of time, $4 limit, then the filters' own parameters."""
    where = " AND ".join(["m.status = 1", "m.joined_at <= $3", "m.member_id > $1", *filters])
    selects = ["array_agg(m.member_id ORDER BY m.member_id) AS ids",
               "array_agg(coalesce((m.consents->>'profiling')::boolean, false) ORDER BY m.member_id) AS consent"]
    selects += [f"array_agg({c.sql} ORDER BY m.member_id) AS c{i}" for i, c in enumerate(columns)]
    if groups:
        selects += ["array_agg(m.channel ORDER BY m.member_id) AS g_channel",
                    "array_agg(m.region ORDER BY m.member_id) AS g_region",
                    "array_agg(m.gender ORDER BY m.member_id) AS g_gender",
                    "array_agg(m.birth_year ORDER BY m.member_id) AS g_birth_year",
                    "array_agg(greatest(0, $2::date - m.joined_at::date) ORDER BY m.member_id) AS g_tenure"]
    sql = f"""
        WITH m AS (SELECT * FROM members m WHERE {where} ORDER BY m.member_id LIMIT $4),
             d AS (SELECT member_id, {catalogue_rules.window_sums_sql(windows)}
                     FROM member_daily WHERE member_id IN (SELECT member_id FROM m) AND day <= $2::date
                    GROUP BY member_id)
        SELECT {", ".join(selects)} FROM m LEFT JOIN d USING (member_id)"""
    return _Query(sql, filter_args)


def age_band(birth_year: int | None, as_of_year: int) -> member_pb2.AgeBand.ValueType:
    """Coarse age band from the birth year (the date itself never leaves profile)."""
    if birth_year is None:
        return member_pb2.AGE_BAND_UNSPECIFIED
    age = as_of_year - birth_year
    for limit, band in ((18, member_pb2.AGE_BAND_UNDER_18), (25, member_pb2.AGE_BAND_18_TO_24),
                        (35, member_pb2.AGE_BAND_25_TO_34), (45, member_pb2.AGE_BAND_35_TO_44),
                        (55, member_pb2.AGE_BAND_45_TO_54), (65, member_pb2.AGE_BAND_55_TO_64)):
        if age < limit:
            return band
    return member_pb2.AGE_BAND_65_AND_OVER


def _chunk(row: Any, columns: list[Column], offset: int, groups: bool, as_of: datetime) -> feature_pb2.FeatureChunk:
    chunk = feature_pb2.FeatureChunk(offset=offset, member_ids=row["ids"], profiling_consent=row["consent"])
    for index, column in enumerate(columns):
        chunk.columns.add(feature_name=column.name, values=row[f"c{index}"])
    if groups:
        attributes = chunk.group_attributes
        attributes.channels.extend(row["g_channel"])
        attributes.regions.extend(row["g_region"])
        attributes.genders.extend(row["g_gender"])
        attributes.age_bands.extend(age_band(year, as_of.year) for year in row["g_birth_year"])
        attributes.tenure_days.extend(row["g_tenure"])
    return chunk


def _header(columns: list[Column], as_of: datetime, total: int, chunk_size: int) -> feature_pb2.FeatureMatrixHeader:
    header = feature_pb2.FeatureMatrixHeader(feature_names=[c.name for c in columns],
                                             features=[c.definition for c in columns], total_members=total,
                                             chunk_size=chunk_size)
    header.as_of.FromDatetime(as_of)
    return header


async def stream_features(pool: asyncpg.Pool, request: profile_service_pb2.StreamFeaturesRequest
                          ) -> AsyncIterator[profile_service_pb2.StreamFeaturesResponse]:
    as_of = _as_of(request.HasField("as_of"), request.as_of)
    columns, windows = _resolve_columns(request.feature_names, "feature_names")
    if request.category_measure:
        raise errors.LoyaltyError(grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED_YET",
                                  "the member x category matrix is not exported yet")
    bytes_per_member = 8 * len(columns) + MEMBER_ID_BYTES_EST + (40 if request.include_group_attributes else 0)
    chunk_size = max(1, min(request.chunk_size or CHUNK_MEMBERS_DEFAULT, MESSAGE_BYTES_MAX // bytes_per_member))
    filters: list[str] = []
    args: list[Any] = []
    for values, sql in ((list(request.regions), "m.region = ANY(${}::text[])"),
                        (list(request.channels), "m.channel = ANY(${}::smallint[])"),
                        (list(request.member_ids), "m.member_id = ANY(${}::text[])")):
        if values:
            args.append(values)
            filters.append(sql.format(4 + len(args)))
    if request.HasField("joined_before"):
        args.append(timestamp(request.joined_before, "joined_before"))
        filters.append(f"m.joined_at < ${4 + len(args)}")
    query = _chunk_query(columns, windows, filters, args, request.include_group_attributes)
    after = request.start_after_member_id
    async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
        count_where = " AND ".join(["m.status = 1", "m.joined_at <= $3", "m.member_id > $1", *filters])
        # The same parameter list as the chunk query, so the filters' $n keep their numbers ($2 and $4
        # are typed but unused here).
        total = await connection.fetchval(
            f"SELECT count(*) FROM members m WHERE {count_where} AND $2::date IS NOT NULL AND $4::int > 0",
            after, as_of.date(), as_of, 1, *args)
        yield profile_service_pb2.StreamFeaturesResponse(header=_header(columns, as_of, total, chunk_size))
        sent = 0
        while True:
            row = await connection.fetchrow(query.sql, after, as_of.date(), as_of, chunk_size, *query.filter_args)
            if row is None or not row["ids"]:
                break
            yield profile_service_pb2.StreamFeaturesResponse(
                chunk=_chunk(row, columns, sent, request.include_group_attributes, as_of))
            sent += len(row["ids"])
            after = row["ids"][-1]
            if len(row["ids"]) < chunk_size:
                break
    yield profile_service_pb2.StreamFeaturesResponse(last=True, members_sent=sent)


async def member_features(pool: asyncpg.Pool, request: profile_service_pb2.BatchGetMemberFeaturesRequest
                          ) -> profile_service_pb2.BatchGetMemberFeaturesResponse:
    as_of = _as_of(request.HasField("as_of"), request.as_of)
    columns, windows = _resolve_columns(request.feature_names, "feature_names")
    query = _chunk_query(columns, windows, ["m.member_id = ANY($5::text[])"], [list(request.member_ids)],
                         request.include_group_attributes)
    row = await pool.fetchrow(query.sql, "", as_of.date(), as_of, len(request.member_ids), *query.filter_args)
    response = profile_service_pb2.BatchGetMemberFeaturesResponse(
        header=_header(columns, as_of, len(row["ids"] or []) if row else 0, len(request.member_ids)))
    found: set[str] = set()
    if row is not None and row["ids"]:
        response.chunk.CopyFrom(_chunk(row, columns, 0, request.include_group_attributes, as_of))
        found = set(row["ids"])
    response.missing_member_ids.extend(m for m in request.member_ids if m not in found)
    return response
