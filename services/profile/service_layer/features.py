"""Use cases: the feature catalogue, the columnar feature stream, and features of a few members.

A chunk is one SQL statement: the members of the chunk in id order, their daily buckets grouped
per member, and every column returned as one array (PostgreSQL builds the arrays; Python copies
them into packed protobuf fields without a loop per member). The stream reads one consistent
snapshot (REPEATABLE READ), so a matrix never mixes two moments.

The optional member × category matrix (CSR per chunk) is one more statement per chunk over the
chunk's ids, returning its non-zero cells as three arrays; Python turns them into CSR with C-level
list operations (a dict look-up per cell, a binary search per member).
"""

from __future__ import annotations

import bisect
import math
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
from services.profile.service_layer.portraits import AFFINITY_SPEND_WEIGHT, timestamp

CHUNK_MEMBERS_DEFAULT = 10_000
MESSAGE_BYTES_MAX = 3_500_000  # under gRPC's 4 MiB default with room for ids and framing
GRPC_MESSAGE_BYTES_MAX = 4 * 1024 * 1024  # the receivers' default limit: a chunk above it cannot be delivered
MEMBER_ID_BYTES_EST = 40
# The category part of a chunk: per member, the varint end offset of its CSR row; per non-zero entry,
# a float64 and a varint category index. Non-zeros per member come from the table statistics
# (rows of member_categories per member) times a safety factor, since a filtered chunk may hold
# heavier members than the average; never more than the vocabulary has.
CATEGORY_ROW_OFFSET_BYTES_EST = 4
CATEGORY_VALUE_BYTES = 8
CATEGORY_NONZEROS_SAFETY = 4
CATEGORY_NONZEROS_PER_MEMBER_MIN = 16
CATEGORY_NONZEROS_PER_MEMBER_UNKNOWN = 64  # statistics not gathered yet
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


def _header(columns: list[Column], as_of: datetime, total: int, chunk_size: int,
            category_vocabulary: Sequence[str] = (),
            category_measure: feature_pb2.CategoryMeasure.ValueType = feature_pb2.CATEGORY_MEASURE_UNSPECIFIED,
            ) -> feature_pb2.FeatureMatrixHeader:
    header = feature_pb2.FeatureMatrixHeader(feature_names=[c.name for c in columns],
                                             features=[c.definition for c in columns], total_members=total,
                                             chunk_size=chunk_size, category_vocabulary=category_vocabulary,
                                             category_measure=category_measure)
    header.as_of.FromDatetime(as_of)
    return header


# The value of one (member, category) cell per measure, over member_categories `c`. Affinity is the
# portrait's CategoryAffinity formula (portraits.category_affinities) term for term in float8: the
# member's positive spend and its views summed over all its categories (window `member`: the
# member's own rows), a share of 0 when the total is 0, and the weights written as Python's own
# doubles (repr round-trips), so both paths give the same bits.
_CATEGORY_VALUE_SQL: dict[int, str] = {
    feature_pb2.CATEGORY_MEASURE_SPEND: "c.spend_minor::float8",
    feature_pb2.CATEGORY_MEASURE_ITEMS_PURCHASED: "c.items_purchased::float8",
    feature_pb2.CATEGORY_MEASURE_VIEWS: "c.view_count::float8",
    feature_pb2.CATEGORY_MEASURE_AFFINITY: (
        f"{AFFINITY_SPEND_WEIGHT!r}::float8 * coalesce(greatest(0, c.spend_minor)::float8"
        " / nullif(sum(greatest(0, c.spend_minor)) OVER member, 0)::float8, 0)"
        f" + {1 - AFFINITY_SPEND_WEIGHT!r}::float8 * coalesce(c.view_count::float8"
        " / nullif(sum(c.view_count) OVER member, 0)::float8, 0)"),
}

# Every category, sorted by code point (COLLATE "C", the order of Python's sorted()), as a loose
# index scan: one probe of member_categories_category per distinct category instead of reading
# every member's rows.
_CATEGORY_VOCABULARY_SQL = """
    WITH RECURSIVE v(category) AS (
        (SELECT category COLLATE "C" FROM member_categories ORDER BY category COLLATE "C" LIMIT 1)
        UNION ALL
        SELECT (SELECT c.category COLLATE "C" FROM member_categories c
                 WHERE c.category COLLATE "C" > v.category ORDER BY c.category COLLATE "C" LIMIT 1)
          FROM v WHERE v.category IS NOT NULL)
    SELECT coalesce(array_agg(category ORDER BY category), '{}') FROM v WHERE category IS NOT NULL"""

# Rows of member_categories per member, from the planner's statistics (no scan); NULL before the
# first ANALYZE of either table.
_CATEGORY_NONZEROS_PER_MEMBER_SQL = """
    SELECT c.reltuples::float8 / m.reltuples::float8 FROM pg_class c, pg_class m
     WHERE c.oid = 'member_categories'::regclass AND m.oid = 'members'::regclass
       AND c.reltuples >= 0 AND m.reltuples > 0"""


def _category_matrix_sql(measure: feature_pb2.CategoryMeasure.ValueType) -> str:
    """$1 the chunk's member ids in chunk order. The non-zero cells as three parallel arrays, ordered
    by row (slot, 1-based) then category in vocabulary order.

    Each member's rows are one probe of the primary key (member_id, category): a LATERAL join fixes
    that plan, where `member_id = ANY($1)` joined back to the chunk's order left the planner free to
    pick a nested loop over misestimated arrays once the prepared statement went generic (minutes for
    a 10,000-member chunk)."""
    return f"""
        SELECT array_agg(slot ORDER BY slot, category) AS slots,
               array_agg(category ORDER BY slot, category) AS categories,
               array_agg(cell ORDER BY slot, category) AS cells
          FROM unnest($1::text[]) WITH ORDINALITY AS chunk(member_id, slot)
         CROSS JOIN LATERAL (
                SELECT c.category COLLATE "C" AS category, {_CATEGORY_VALUE_SQL[measure]} AS cell
                  FROM member_categories c WHERE c.member_id = chunk.member_id
                WINDOW member AS ()) member_cells
         WHERE cell <> 0"""


def category_bytes_per_member(vocabulary_size: int, nonzeros_per_member: float | None) -> int:
    """Wire bytes one member's CSR row is expected to take (see CATEGORY_NONZEROS_SAFETY)."""
    if nonzeros_per_member is None:
        nonzeros = CATEGORY_NONZEROS_PER_MEMBER_UNKNOWN
    else:
        nonzeros = max(CATEGORY_NONZEROS_PER_MEMBER_MIN, math.ceil(CATEGORY_NONZEROS_SAFETY * nonzeros_per_member))
    nonzeros = min(nonzeros, vocabulary_size)
    index_bytes = max(1, (max(0, vocabulary_size - 1).bit_length() + 6) // 7)  # varint length
    return CATEGORY_ROW_OFFSET_BYTES_EST + nonzeros * (CATEGORY_VALUE_BYTES + index_bytes)


def _fill_category_matrix(matrix: feature_pb2.CategoryMatrixChunk, row: Any, members: int,
                          vocabulary: dict[str, int]) -> None:
    """CSR from the cells of _category_matrix_sql: row i ends after the cells whose slot is ≤ i + 1
    (a binary search per member over the sorted slots, in C), and categories become vocabulary
    indices through one dict look-up each."""
    slots: list[int] = row["slots"] or []
    values: list[float] = row["cells"] or []
    # Every category of the snapshot is in its vocabulary (KeyError otherwise: a broken invariant).
    indices = [vocabulary[category] for category in row["categories"] or []]
    assert len(slots) == len(indices) == len(values)
    assert not slots or (slots[0] >= 1 and slots[-1] <= members)
    matrix.row_offsets.extend([bisect.bisect_left(slots, slot) for slot in range(1, members + 2)])
    matrix.category_indices.extend(indices)
    matrix.values.extend(values)


def _category_measure(request: profile_service_pb2.StreamFeaturesRequest) -> feature_pb2.CategoryMeasure.ValueType:
    """The requested measure; the declarative `defined_only` rejects unknown values before us, this
    is for in-process callers."""
    measure = request.category_measure
    if measure and measure not in _CATEGORY_VALUE_SQL:
        raise errors.invalid_argument([errors.FieldViolation("category_measure", "is not a defined measure")])
    return measure


async def stream_features(pool: asyncpg.Pool, request: profile_service_pb2.StreamFeaturesRequest
                          ) -> AsyncIterator[profile_service_pb2.StreamFeaturesResponse]:
    as_of = _as_of(request.HasField("as_of"), request.as_of)
    columns, windows = _resolve_columns(request.feature_names, "feature_names")
    measure = _category_measure(request)
    bytes_per_member = 8 * len(columns) + MEMBER_ID_BYTES_EST + (40 if request.include_group_attributes else 0)
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
    category_sql = _category_matrix_sql(measure) if measure else ""
    after = request.start_after_member_id
    async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
        vocabulary: list[str] = []
        vocabulary_index: dict[str, int] = {}
        if measure:
            vocabulary = list(await connection.fetchval(_CATEGORY_VOCABULARY_SQL))
            vocabulary_index = {category: index for index, category in enumerate(vocabulary)}
            nonzeros = await connection.fetchval(_CATEGORY_NONZEROS_PER_MEMBER_SQL)
            bytes_per_member += category_bytes_per_member(len(vocabulary), nonzeros)
        chunk_size = max(1, min(request.chunk_size or CHUNK_MEMBERS_DEFAULT, MESSAGE_BYTES_MAX // bytes_per_member))
        count_where = " AND ".join(["m.status = 1", "m.joined_at <= $3", "m.member_id > $1", *filters])
        # The same parameter list as the chunk query, so the filters' $n keep their numbers ($2 and $4
        # are typed but unused here).
        total = await connection.fetchval(
            f"SELECT count(*) FROM members m WHERE {count_where} AND $2::date IS NOT NULL AND $4::int > 0",
            after, as_of.date(), as_of, 1, *args)
        header = _header(columns, as_of, total, chunk_size, vocabulary, measure)
        if header.ByteSize() > GRPC_MESSAGE_BYTES_MAX:
            raise errors.failed_precondition("the category vocabulary does not fit one message",
                                             "CATEGORY_VOCABULARY_TOO_LARGE", categories=str(len(vocabulary)))
        yield profile_service_pb2.StreamFeaturesResponse(header=header)
        sent = 0
        while True:
            row = await connection.fetchrow(query.sql, after, as_of.date(), as_of, chunk_size, *query.filter_args)
            if row is None or not row["ids"]:
                break
            chunk = _chunk(row, columns, sent, request.include_group_attributes, as_of)
            if measure:
                cells = await connection.fetchrow(category_sql, row["ids"])
                _fill_category_matrix(chunk.category_matrix, cells, len(row["ids"]), vocabulary_index)
                if chunk.ByteSize() > GRPC_MESSAGE_BYTES_MAX:  # far heavier members than the statistics said
                    raise errors.LoyaltyError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED, "CHUNK_TOO_LARGE",
                        "these members' category rows exceed one message: resume after the last member "
                        "received with a smaller chunk_size", {"chunk_size": str(chunk_size)})
            yield profile_service_pb2.StreamFeaturesResponse(chunk=chunk)
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
