"""Distributed PostgreSQL readiness: which tables are not distributed by member, and a catalogue
check that every other table would distribute (e.g. on Citus) with `member_id` as its column.

A service schema distributes by member when every table either
- has a NOT NULL text `member_id` that is part of every primary key, unique constraint, unique
  index and exclusion constraint (the rule Citus enforces on a distributed table), and references
  other member tables only through keys that pair `member_id` with `member_id` (co-location), or
- is named in GLOBAL_TABLES below, with its kind and the reason.

The kinds, and how each is handled on Citus (docs/scale.md, "global tables", lists the same):
- "reference": small, read on every node, written at operator rate: `create_reference_table`
  replicates it to every node.
- "lookup": a global uniqueness that is not the member's (an e-mail hash, a coupon code, a request
  id): distributed on its own `column` in a co-location group of its own, read and written by that
  key. It may reference only reference tables, and no member table may reference it.
- "local-global": one row set for the whole service at operator or job rate (audit chain, migration
  records, run bookkeeping): kept on the coordinator (`citus_add_local_table_to_metadata`).

`problems(conn, schema)` reads pg_catalog and returns one sentence per table that would not
distribute; tests/test_distribution.py runs it on every service schema after migrating it.

Shards (`LOYALTY_SHARDS`, 1 on one database): `shard_of` places a member in one of them (the same
function in SQL, `shard_of_sql`), `shard_anchor` is a key that lives in a given shard (the key of
rows that belong to a shard rather than to a member: campaign budget slices), and `by_shard`
splits a batch so that each of its transactions writes one shard. On Citus these three are the
seam: `shard_of` becomes the shard whose hash range holds the key's `worker_hash`, and the anchors
are values found in each shard (`get_shard_id_for_distribution_column`), searched for as here.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Literal, TypeVar

import asyncpg

DISTRIBUTION_COLUMN = "member_id"

Kind = Literal["reference", "lookup", "local-global"]


@dataclass(frozen=True)
class GlobalTable:
    kind: Kind
    reason: str
    column: str = ""  # the distribution column of a "lookup" table


# Tables every service schema gets from libs/sql and libs/migrations.py.
SHARED_TABLES: dict[str, GlobalTable] = {
    "schema_migrations": GlobalTable("local-global", "the schema's applied migrations, written once per deploy"),
    "audit_events": GlobalTable("local-global", "one hash chain per service, appended at operator rate"),
    "audit_chain_head": GlobalTable("local-global", "the single head row of that chain"),
    "message_texts": GlobalTable("reference", "operators' overrides of member-facing texts, read by every node"),
}

# Per service schema: its own tables that are not distributed by member.
GLOBAL_TABLES: dict[str, dict[str, GlobalTable]] = {
    "profile": {
        "member_keys": GlobalTable(
            "lookup", "external id and e-mail/phone hashes are unique among all members", column="key"),
    },
    "scoring": {
        "policies": GlobalTable("reference", "versioned tier policies, read by every online score"),
        "segmentations": GlobalTable("reference", "stored segmentations, at most one current"),
        "segments": GlobalTable("reference", "the segments of a segmentation (k of them)"),
        "models": GlobalTable("reference", "trained models, read when scoring a member"),
        "evaluation_runs": GlobalTable("local-global", "one row per run, one applying run at a time"),
        "weight_fits": GlobalTable("local-global", "results of FitWeights, read by operators"),
    },
    "rewards": {
        "earning_rule_sets": GlobalTable("reference", "versioned earning rules, read by every accrual"),
        "benefits": GlobalTable("reference", "the benefit catalogue, read by every tier"),
        "coupon_codes": GlobalTable("lookup", "a coupon code is unique programme-wide", column="code"),
        "campaign_budgets": GlobalTable(
            "local-global", "what each campaign handed out to its per-shard slices; written by top-ups, not credits"),
        "expiry_runs": GlobalTable("local-global", "one row per expiry run (a daily job)"),
    },
    "risk": {
        "rule_sets": GlobalTable("reference", "versioned rule sets, read by every assessment"),
        "models": GlobalTable("reference", "anomaly models (metadata and compiled forest), read by every node"),
        "list_entries": GlobalTable("reference", "allow and deny lists, matched by every assessment"),
        "config_generation": GlobalTable("reference", "one row bumped when rules, model or lists change"),
    },
}


T = TypeVar("T")


def shard_of(key: str, shards: int) -> int:
    """The shard `key` (a member id) lives in, of `shards`: the first 32 bits of its MD5, modulo."""
    if shards <= 1:
        return 0
    return int.from_bytes(hashlib.md5(key.encode(), usedforsecurity=False).digest()[:4], "big") % shards


def shard_of_sql(column: str, shards: str) -> str:
    """`shard_of` as a SQL expression of a text column (or parameter) and a shard count."""
    return f"(('x' || substr(md5({column}), 1, 8))::bit(32)::bigint % greatest({shards}, 1))::int"


@cache
def shard_anchor(shard: int, shards: int) -> str:
    """A member-typed key that lives in `shard`: the first of `~shard-0`, `~shard-1`, ... that
    shard_of places there (member ids never start with '~'; see libs.validation)."""
    if not 0 <= shard < max(shards, 1):
        raise ValueError(f"shard {shard} of {shards}")
    return next(key for key in (f"~shard-{k}" for k in itertools.count()) if shard_of(key, shards) == shard)


def anchors(shards: int) -> list[str]:
    """The anchor of every shard, in shard order."""
    return [shard_anchor(s, shards) for s in range(max(shards, 1))]


def by_shard(items: Iterable[T], key: Callable[[T], str], shards: int) -> list[list[T]]:
    """`items` grouped by the shard of `key(item)`, groups in order of their first item, items in
    their order (one group on one database)."""
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(shard_of(key(item), shards), []).append(item)
    return list(groups.values())


def global_tables(schema: str) -> dict[str, GlobalTable]:
    """The registry for one schema: the shared tables and the service's own."""
    return {**SHARED_TABLES, **GLOBAL_TABLES.get(schema, {})}


_TABLES_SQL = """
SELECT c.oid, c.relname,
       (SELECT a.attnum FROM pg_attribute a
         WHERE a.attrelid = c.oid AND a.attname = $2 AND NOT a.attisdropped) AS dist_attnum,
       (SELECT a.attnotnull FROM pg_attribute a
         WHERE a.attrelid = c.oid AND a.attname = $2 AND NOT a.attisdropped) AS dist_notnull,
       (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
         WHERE a.attrelid = c.oid AND a.attname = $2 AND NOT a.attisdropped) AS dist_type
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
 ORDER BY c.relname
"""

# Every key that enforces uniqueness: primary keys, unique and exclusion constraints (through their
# indexes) and unique indexes of no constraint, partial or on expressions included. An expression
# column is attnum 0 in indkey, so it never counts as the distribution column.
_UNIQUE_SQL = """
SELECT i.indrelid AS table_oid, ic.relname AS name, i.indkey::int2[] AS columns
  FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
       JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
 WHERE n.nspname = $1 AND (i.indisunique OR i.indisexclusion)
"""

_FOREIGN_KEYS_SQL = """
SELECT f.conname AS name, f.conrelid AS table_oid, f.confrelid AS referenced_oid,
       rn.nspname AS referenced_schema, r.relname AS referenced_name,
       f.conkey::int2[] AS columns, f.confkey::int2[] AS referenced_columns
  FROM pg_constraint f JOIN pg_class t ON t.oid = f.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
       JOIN pg_class r ON r.oid = f.confrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace
 WHERE n.nspname = $1 AND f.contype = 'f'
"""


@dataclass(frozen=True)
class _Table:
    name: str
    kind: str  # "distributed" or a GlobalTable kind
    column: int | None  # attnum of the distribution column (distributed and lookup tables)


async def problems(conn: asyncpg.Connection, schema: str,
                   registry: dict[str, GlobalTable] | None = None) -> list[str]:
    """Why `schema` would not distribute by member, one sentence per finding ([] when it would).
    `registry` defaults to global_tables(schema)."""
    declared = global_tables(schema) if registry is None else registry
    found: list[str] = []
    tables: dict[int, _Table] = {}
    present: set[str] = set()
    for row in await conn.fetch(_TABLES_SQL, schema, DISTRIBUTION_COLUMN):
        name: str = row["relname"]
        present.add(name)
        entry = declared.get(name)
        if entry is None:
            if row["dist_attnum"] is None:
                found.append(f"{schema}.{name}: no {DISTRIBUTION_COLUMN} column and not declared as a global table"
                             " in libs/distribution.py")
                continue
            if not row["dist_notnull"]:
                found.append(f"{schema}.{name}: {DISTRIBUTION_COLUMN} may be NULL")
            if row["dist_type"] != "text":
                found.append(f"{schema}.{name}: {DISTRIBUTION_COLUMN} is {row['dist_type']}, not text"
                             " (co-located tables share the column's type)")
            tables[row["oid"]] = _Table(name, "distributed", row["dist_attnum"])
            continue
        column: int | None = None
        if entry.kind == "lookup":
            column = await conn.fetchval(
                "SELECT attnum FROM pg_attribute WHERE attrelid = $1 AND attname = $2 AND NOT attisdropped",
                row["oid"], entry.column)
            if column is None:
                found.append(f"{schema}.{name}: declared a lookup table on {entry.column!r}, which it has not")
        tables[row["oid"]] = _Table(name, entry.kind, column)
    found.extend(f"{schema}.{name}: declared a global table in libs/distribution.py but does not exist"
                 for name in sorted(set(declared) - present))

    for row in await conn.fetch(_UNIQUE_SQL, schema):
        table = tables.get(row["table_oid"])
        if table is None or table.column is None:
            continue
        if table.column not in row["columns"]:
            column_name = DISTRIBUTION_COLUMN if table.kind == "distributed" else declared[table.name].column
            found.append(f"{schema}.{table.name}: unique key {row['name']} does not include {column_name}")

    for row in await conn.fetch(_FOREIGN_KEYS_SQL, schema):
        table = tables.get(row["table_oid"])
        if table is None:
            continue
        referenced = tables.get(row["referenced_oid"]) if row["referenced_schema"] == schema else None
        target = f"{row['referenced_schema']}.{row['referenced_name']}"
        where = f"{schema}.{table.name}: foreign key {row['name']} to {target}"
        if referenced is None:
            found.append(f"{where} leaves the schema")
            continue
        if referenced.kind == "reference":
            continue  # a reference table is on every node: any table may reference it
        if table.kind == "distributed" and referenced.kind == "distributed":
            pairs = set(zip(row["columns"], row["referenced_columns"], strict=True))
            if (table.column, referenced.column) not in pairs:
                found.append(f"{where} does not pair {DISTRIBUTION_COLUMN} with {DISTRIBUTION_COLUMN}"
                             " (the rows would not be co-located)")
            continue
        if table.kind == "local-global" and referenced.kind == "local-global":
            continue  # both on the coordinator
        found.append(f"{where}: a {table.kind} table may not reference a {referenced.kind} table")
    return found
