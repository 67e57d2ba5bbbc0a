"""Distributed PostgreSQL readiness: every service schema, migrated, would distribute by member_id
(libs/distribution.py reads its catalogue); the checker catches a table that would not;
docs/scale.md lists exactly the global tables the registry declares; and the shard helpers agree
between Python and SQL."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import pytest

from libs.distribution import (
    GLOBAL_TABLES,
    SHARED_TABLES,
    GlobalTable,
    anchors,
    by_shard,
    global_tables,
    problems,
    shard_anchor,
    shard_of,
    shard_of_sql,
)
from libs.migrations import migrate
from libs.settings import SERVICE_NAMES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_every_service_schema_distributes_by_member(db: asyncpg.Connection, service: str) -> None:
    # A schema of its own (not the one the service processes of the session use), from every
    # migration, so the check sees exactly what a fresh deploy has.
    schema = f"dist_{service}"
    await migrate(db, schema, ROOT / "services" / service / "migrations")
    assert await problems(db, schema, global_tables(service)) == []


_BAD = """
CREATE TABLE things (id text PRIMARY KEY, note text);
CREATE TABLE ok (member_id text NOT NULL, k text NOT NULL, PRIMARY KEY (member_id, k));
CREATE TABLE unique_without_member (member_id text NOT NULL, id text NOT NULL, code text NOT NULL,
                                    PRIMARY KEY (member_id, id));
CREATE UNIQUE INDEX unique_without_member_code ON unique_without_member (code) WHERE code <> '';
CREATE TABLE pk_without_member (member_id text NOT NULL, id bigserial PRIMARY KEY);
CREATE TABLE nullable (member_id text, id text, UNIQUE (member_id, id));
CREATE TABLE not_colocated (member_id text NOT NULL, other_member text NOT NULL, k text NOT NULL,
                            PRIMARY KEY (member_id, k),
                            FOREIGN KEY (other_member, k) REFERENCES ok (member_id, k));
CREATE TABLE colocated (member_id text NOT NULL, k text NOT NULL, PRIMARY KEY (k, member_id),
                        FOREIGN KEY (member_id, k) REFERENCES ok (member_id, k));
CREATE TABLE catalogue (item text PRIMARY KEY);
CREATE TABLE uses_catalogue (member_id text NOT NULL, item text NOT NULL REFERENCES catalogue,
                             PRIMARY KEY (member_id, item));
CREATE TABLE members (member_id text PRIMARY KEY);
CREATE TABLE codes (code text PRIMARY KEY, member_id text NOT NULL REFERENCES members);
CREATE TABLE runs (run_id text PRIMARY KEY);
CREATE TABLE run_members (member_id text NOT NULL, run_id text NOT NULL REFERENCES runs,
                          PRIMARY KEY (member_id, run_id));
CREATE TABLE by_month (member_id text NOT NULL, id text NOT NULL, at date NOT NULL,
                       PRIMARY KEY (member_id, id, at)) PARTITION BY RANGE (at);
CREATE TABLE by_month_2025_01 PARTITION OF by_month FOR VALUES FROM ('2025-01-01') TO ('2025-02-01');
CREATE TABLE by_month_bad (member_id text NOT NULL, id text NOT NULL, at date NOT NULL,
                           PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
"""


async def test_the_checker_reports_each_table_that_would_not_distribute(db: asyncpg.Connection,
                                                                        tmp_path: Path) -> None:
    schema = "dist_bad"
    (tmp_path / "0001_bad.sql").write_text(_BAD)
    await migrate(db, schema, tmp_path)
    registry = {**SHARED_TABLES,
                "catalogue": GlobalTable("reference", "a small catalogue"),
                "codes": GlobalTable("lookup", "codes are unique programme-wide", column="code"),
                "runs": GlobalTable("local-global", "run bookkeeping"),
                "gone": GlobalTable("reference", "dropped long ago")}
    found = await problems(db, schema, registry)
    expected = [
        "dist_bad.things: no member_id column",
        "dist_bad.unique_without_member: unique key unique_without_member_code does not include member_id",
        "dist_bad.pk_without_member: unique key pk_without_member_pkey does not include member_id",
        "dist_bad.nullable: member_id may be NULL",
        "dist_bad.not_colocated: foreign key not_colocated_other_member_k_fkey to dist_bad.ok does not pair",
        "dist_bad.codes: foreign key codes_member_id_fkey to dist_bad.members: a lookup table may not"
        " reference a distributed table",
        "dist_bad.run_members: foreign key run_members_run_id_fkey to dist_bad.runs: a distributed table may not"
        " reference a local-global table",
        "dist_bad.by_month_bad: unique key by_month_bad_pkey does not include member_id",
        "dist_bad.gone: declared a global table in libs/distribution.py but does not exist",
    ]
    for sentence in expected:
        assert [f for f in found if f.startswith(sentence)], (sentence, found)
    assert len(found) == len(expected), found
    # Fine as they are: member keys, a co-located reference, a reference table used by a member
    # table, a partitioned table keyed by member (its partitions follow it), the declared tables.
    for table in ("ok", "members", "colocated", "uses_catalogue", "catalogue", "by_month.", "by_month_2025_01",
                  "runs:"):
        assert not [f for f in found if f.startswith(f"{schema}.{table}")], (table, found)


async def test_a_new_table_without_member_id_fails_the_service_check(db: asyncpg.Connection) -> None:
    schema = "dist_risk_new_table"
    await migrate(db, schema, ROOT / "services" / "risk" / "migrations")
    await db.execute(f"CREATE TABLE {schema}.device_counts (device_id text PRIMARY KEY, n bigint NOT NULL)")
    assert await problems(db, schema, global_tables("risk")) == [
        f"{schema}.device_counts: no member_id column and not declared as a global table in libs/distribution.py"]


def _documented_global_tables() -> dict[str, str]:
    """`schema.table` -> kind, from the table under "Global tables" in docs/scale.md."""
    text = (ROOT / "docs" / "scale.md").read_text()
    section = text.split("### Global tables", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([a-z_*]+)\.([a-z_]+)` \| ([a-z-]+)", section, flags=re.MULTILINE)
    return {f"{schema}.{table}": kind for schema, table, kind in rows}


def test_docs_list_exactly_the_registered_global_tables() -> None:
    registered = {f"*.{table}": entry.kind for table, entry in SHARED_TABLES.items()}
    registered |= {f"{schema}.{table}": entry.kind
                   for schema, tables in GLOBAL_TABLES.items() for table, entry in tables.items()}
    assert _documented_global_tables() == registered


@pytest.mark.parametrize("shards", [1, 2, 4, 32])
async def test_shard_of_is_the_same_in_python_and_sql_and_anchors_live_in_their_shard(
        db: asyncpg.Connection, shards: int) -> None:
    keys = [f"m-{i}" for i in range(500)] + ["", "é-ü", "x" * 128] + anchors(shards)
    rows = await db.fetch(f"SELECT k, {shard_of_sql('k', '$2')} AS s FROM unnest($1::text[]) AS k", keys, shards)
    assert [r["s"] for r in rows] == [shard_of(k, shards) for k in keys]
    assert {shard_of(k, shards) for k in keys[:500]} == set(range(shards))  # every shard is used
    assert [shard_of(shard_anchor(s, shards), shards) for s in range(shards)] == list(range(shards))
    assert len(set(anchors(shards))) == shards and all(a.startswith("~") for a in anchors(shards))


def test_by_shard_keeps_order_within_and_across_groups() -> None:
    keys = [f"m-{i}" for i in range(40)]
    groups = by_shard(keys, lambda k: k, 4)
    assert sorted(k for g in groups for k in g) == sorted(keys)
    assert all(len({shard_of(k, 4) for k in g}) == 1 for g in groups)
    assert all(g == sorted(g, key=keys.index) for g in groups)
    assert [g[0] for g in groups] == sorted((g[0] for g in groups), key=keys.index)
    assert by_shard(keys, lambda k: k, 1) == [keys]
    with pytest.raises(ValueError, match="shard 4 of 4"):
        shard_anchor(4, 4)
