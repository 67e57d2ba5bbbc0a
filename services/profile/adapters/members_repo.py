"""SQL for members and their unique keys (tables `members`, `member_keys`), plus what erasure does
to other tables of the schema. Rows come back as stored: PII stays sealed here; the use cases open it.

Every statement handles a whole batch (`= ANY`, `unnest`): no statement per member.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from libs import errors
from libs.db import DbConnection
from services.profile.domain.pii import LookupKind, SealedPii, WrappedKey

_COLUMNS = """member_id, external_id, status, merged_into_member_id, channel, region, locale, gender, birth_year,
    consents::text AS consents, joined_at, created_at, updated_at, erased_at, merged_at, version,
    pii_ciphertext, pii_nonce, dek_wrapped, dek_nonce, kek_id, email_hash, phone_hash"""


@dataclass(frozen=True, slots=True)
class StoredMember:
    member_id: str
    external_id: str | None
    status: int
    merged_into_member_id: str | None
    channel: int
    region: str
    locale: str
    gender: int
    birth_year: int | None
    consents: dict[str, Any]
    joined_at: datetime
    created_at: datetime
    updated_at: datetime
    erased_at: datetime | None
    merged_at: datetime | None
    version: int
    pii: SealedPii | None
    dek: WrappedKey | None
    email_hash: bytes | None
    phone_hash: bytes | None


def _stored(row: asyncpg.Record) -> StoredMember:
    pii = SealedPii(bytes(row["pii_ciphertext"]), bytes(row["pii_nonce"])) if row["pii_ciphertext"] else None
    dek = (WrappedKey(bytes(row["dek_wrapped"]), bytes(row["dek_nonce"]), row["kek_id"])
           if row["dek_wrapped"] else None)
    return StoredMember(
        member_id=row["member_id"], external_id=row["external_id"], status=row["status"],
        merged_into_member_id=row["merged_into_member_id"], channel=row["channel"], region=row["region"],
        locale=row["locale"], gender=row["gender"], birth_year=row["birth_year"],
        consents=json.loads(row["consents"]), joined_at=row["joined_at"], created_at=row["created_at"],
        updated_at=row["updated_at"], erased_at=row["erased_at"], merged_at=row["merged_at"],
        version=row["version"], pii=pii, dek=dek,
        email_hash=bytes(row["email_hash"]) if row["email_hash"] else None,
        phone_hash=bytes(row["phone_hash"]) if row["phone_hash"] else None,
    )


# ---- Members -----------------------------------------------------------------------------------


async def insert_member(connection: DbConnection, member: StoredMember) -> bool:
    """Insert a new member with its empty aggregates row. False when the member id is taken."""
    inserted = await connection.fetchval(
        """INSERT INTO members (member_id, external_id, status, channel, region, locale, gender, birth_year,
                                consents, joined_at, created_at, updated_at, version, pii_ciphertext, pii_nonce,
                                dek_wrapped, dek_nonce, kek_id, email_hash, phone_hash)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)
           ON CONFLICT (member_id) DO NOTHING RETURNING true""",
        *_member_values(member),
    )
    if not inserted:
        return False
    # The portrait exists from the first moment, so readers never special-case "no events yet".
    await connection.execute(
        "INSERT INTO member_aggregates (member_id) VALUES ($1) ON CONFLICT (member_id) DO NOTHING", member.member_id)
    return True


def _member_values(member: StoredMember) -> tuple[Any, ...]:
    return (
        member.member_id, member.external_id, member.status, member.channel, member.region, member.locale,
        member.gender, member.birth_year, json.dumps(member.consents), member.joined_at, member.created_at,
        member.updated_at, member.version,
        member.pii.ciphertext if member.pii else None, member.pii.nonce if member.pii else None,
        member.dek.wrapped if member.dek else None, member.dek.nonce if member.dek else None,
        member.dek.kek_id if member.dek else None, member.email_hash, member.phone_hash,
    )


async def update_member(connection: DbConnection, member: StoredMember, expected_version: int) -> None:
    """Write every mutable column; the caller holds the row lock, the version check is a last guard."""
    values = _member_values(member)
    status = await connection.execute(
        """UPDATE members SET external_id = $2, status = $3, channel = $4, region = $5, locale = $6, gender = $7,
                              birth_year = $8, consents = $9::jsonb, joined_at = $10, updated_at = $11,
                              version = $12, pii_ciphertext = $13, pii_nonce = $14, dek_wrapped = $15,
                              dek_nonce = $16, kek_id = $17, email_hash = $18, phone_hash = $19
            WHERE member_id = $1 AND version = $20""",
        *values[:10], *values[11:], expected_version,  # created_at (values[10]) never changes
    )
    if status != "UPDATE 1":
        raise errors.failed_precondition("the member changed during the update", reason="ETAG_MISMATCH",
                                         member_id=member.member_id)


async def fetch_member(connection: DbConnection, member_id: str, lock: str = "") -> StoredMember | None:
    """One member; `lock` is "" or a row-lock clause ("FOR NO KEY UPDATE", "FOR UPDATE")."""
    assert lock in ("", "FOR NO KEY UPDATE", "FOR UPDATE")
    row = await connection.fetchrow(f"SELECT {_COLUMNS} FROM members WHERE member_id = $1 {lock}", member_id)
    return _stored(row) if row is not None else None


async def fetch_members(connection: DbConnection, member_ids: Sequence[str], lock: str = "") -> dict[str, StoredMember]:
    """Members by id; with a lock clause the rows are locked in member_id order (the order every
    multi-member transaction uses, so two of them never deadlock on each other)."""
    assert lock in ("", "FOR NO KEY UPDATE", "FOR UPDATE")
    order = " ORDER BY member_id" if lock else ""
    rows = await connection.fetch(f"SELECT {_COLUMNS} FROM members WHERE member_id = ANY($1::text[]){order} {lock}",
                                  list(member_ids))
    return {row["member_id"]: _stored(row) for row in rows}


@dataclass(frozen=True, slots=True)
class MemberFilter:
    region: str = ""
    channel: int = 0
    status: int = 0
    created_after: datetime | None = None  # inclusive
    created_before: datetime | None = None  # exclusive


async def list_members(connection: DbConnection, where: MemberFilter, after: tuple[datetime, str] | None,
                       limit: int) -> list[StoredMember]:
    """Members in (created_at, member_id) order after the keyset position `after`. Only the filters
    in use become conditions, so each shape of query gets its own plan on the (created_at, member_id)
    index rather than one generic plan full of `$n IS NULL OR ...`."""
    conditions: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if where.region:
        conditions.append(f"region = {arg(where.region)}")
    if where.channel:
        conditions.append(f"channel = {arg(where.channel)}")
    if where.status:
        conditions.append(f"status = {arg(where.status)}")
    if where.created_after is not None:
        conditions.append(f"created_at >= {arg(where.created_after)}")
    if where.created_before is not None:
        conditions.append(f"created_at < {arg(where.created_before)}")
    if after is not None:
        conditions.append(f"(created_at, member_id) > ({arg(after[0])}::timestamptz, {arg(after[1])}::text)")
    sql = (f"SELECT {_COLUMNS} FROM members WHERE {' AND '.join(conditions) or 'true'}"
           f" ORDER BY created_at, member_id LIMIT {arg(limit)}")
    return [_stored(row) for row in await connection.fetch(sql, *args)]


# ---- Unique keys -------------------------------------------------------------------------------


async def claim_keys(connection: DbConnection, member_id: str, keys: Mapping[LookupKind, bytes]
                     ) -> set[LookupKind]:
    """Claim unique keys for a member; returns the kinds another member already holds (nothing is
    claimed for them; the caller fails the transaction). A concurrent claim of the same key waits
    for the other transaction and then sees it taken."""
    if not keys:
        return set()
    kinds = list(keys)
    claimed = await connection.fetch(
        """INSERT INTO member_keys (kind, key, member_id)
           SELECT k, v, $3 FROM unnest($1::smallint[], $2::bytea[]) AS u(k, v)
           ON CONFLICT (kind, key) DO NOTHING RETURNING kind""",
        [int(kind) for kind in kinds], [keys[kind] for kind in kinds], member_id,
    )
    return set(kinds) - {LookupKind(row["kind"]) for row in claimed}


async def release_keys(connection: DbConnection, member_id: str, kinds: Sequence[LookupKind]) -> None:
    if kinds:
        await connection.execute("DELETE FROM member_keys WHERE member_id = $1 AND kind = ANY($2::smallint[])",
                                 member_id, [int(kind) for kind in kinds])


async def move_keys(connection: DbConnection, from_member_id: str, to_member_id: str) -> int:
    """Every unique key a member holds passes to another (a merge: look-ups find the survivor)."""
    status = await connection.execute("UPDATE member_keys SET member_id = $2 WHERE member_id = $1",
                                      from_member_id, to_member_id)
    return int(status.split()[-1])


async def find_key_holder(connection: DbConnection, kind: LookupKind, key: bytes) -> StoredMember | None:
    row = await connection.fetchrow(
        f"SELECT {_COLUMNS} FROM members WHERE member_id = (SELECT member_id FROM member_keys"
        " WHERE kind = $1 AND key = $2)",
        int(kind), key,
    )
    return _stored(row) if row is not None else None


# ---- Erasure -----------------------------------------------------------------------------------


async def shred_member(connection: DbConnection, member_id: str, now: datetime) -> None:
    """Crypto-shred: the wrapped data key goes, and with it any way to open the PII; the ciphertext,
    look-up hashes and unique keys go too. The external id goes as well: it is the shop's handle on a
    named customer, so keeping it would tie the anonymous history back to a person."""
    await connection.execute(
        """UPDATE members SET status = 2, erased_at = $2, updated_at = $2, version = version + 1,
                              external_id = NULL, birth_year = NULL, pii_ciphertext = NULL, pii_nonce = NULL,
                              dek_wrapped = NULL, dek_nonce = NULL, kek_id = NULL, email_hash = NULL,
                              phone_hash = NULL
            WHERE member_id = $1""",
        member_id, now,
    )
    await connection.execute("DELETE FROM member_keys WHERE member_id = $1", member_id)


async def merged_into(connection: DbConnection, member_id: str) -> list[tuple[str, int]]:
    """(member id, status) of the members merged into this one, directly or through a chain of
    merges. Not locked: events sent for them are recorded on the survivor, so the caller's lock on
    the survivor is what holds event batches back (and a row lock here would order against the
    batches' KEY SHARE locks the other way round)."""
    rows = await connection.fetch(
        """WITH RECURSIVE merged AS (
               SELECT member_id FROM members WHERE merged_into_member_id = $1
               UNION
               SELECT m.member_id FROM members m JOIN merged ON m.merged_into_member_id = merged.member_id)
           SELECT m.member_id, m.status FROM members m JOIN merged USING (member_id) ORDER BY m.member_id""",
        member_id,
    )
    return [(row["member_id"], row["status"]) for row in rows]


async def events_to_anonymise(connection: DbConnection, member_id: str, after_event_id: str, limit: int
                              ) -> list[tuple[str, bytes]]:
    """(event id, stored payload) of a member's events still carrying a device id or an IP address."""
    rows = await connection.fetch(
        """SELECT event_id, payload FROM events
            WHERE member_id = $1 AND event_id > $2 AND (device_id IS NOT NULL OR ip_address IS NOT NULL)
            ORDER BY event_id LIMIT $3""",
        member_id, after_event_id, limit,
    )
    return [(row["event_id"], bytes(row["payload"])) for row in rows]


async def store_anonymised_events(connection: DbConnection, member_id: str, event_ids: Sequence[str],
                                  payloads: Sequence[bytes]) -> int:
    status = await connection.execute(
        """UPDATE events e SET device_id = NULL, ip_address = NULL, payload = u.p
             FROM unnest($2::text[], $3::bytea[]) AS u(i, p)
            WHERE e.member_id = $1 AND e.event_id = u.i""",
        member_id, list(event_ids), list(payloads),
    )
    return int(status.split()[-1])


async def insert_outbox(connection: DbConnection, member_id: str, kind: int, payload: bytes,
                        trace_context: str) -> None:
    await connection.execute(
        "INSERT INTO outbox (member_id, kind, source_event_id, payload, trace_context)"
        " VALUES ($1, $2, NULL, $3, $4::jsonb)",
        member_id, kind, payload, trace_context,
    )


async def pending_outbox_to_scrub(connection: DbConnection, member_ids: Sequence[str], kinds: Sequence[int],
                                  after_id: int, limit: int) -> list[tuple[str, int, bytes]]:
    """(member id, row id, payload) of undelivered outbox rows of these kinds, locked. A row the relay
    is delivering right now is waited for and then skipped if it was delivered meanwhile (the
    delivered rows are blanked after this, see blank_delivered_outbox)."""
    rows = await connection.fetch(
        """SELECT member_id, id, payload FROM outbox
            WHERE member_id = ANY($1::text[]) AND kind = ANY($2::smallint[]) AND delivered_at IS NULL AND id > $3
            ORDER BY id LIMIT $4 FOR UPDATE""",
        list(member_ids), [int(kind) for kind in kinds], after_id, limit,
    )
    return [(row["member_id"], row["id"], bytes(row["payload"])) for row in rows]


async def store_outbox_payloads(connection: DbConnection, rows: Sequence[tuple[str, int, bytes]]) -> int:
    if not rows:
        return 0
    status = await connection.execute(
        """UPDATE outbox o SET payload = u.p
             FROM unnest($1::text[], $2::bigint[], $3::bytea[]) AS u(m, i, p)
            WHERE o.member_id = u.m AND o.id = u.i""",
        [row[0] for row in rows], [row[1] for row in rows], [row[2] for row in rows],
    )
    return int(status.split()[-1])


async def blank_delivered_outbox(connection: DbConnection, member_ids: Sequence[str]) -> int:
    """Delivered messages have done their work: their payloads are emptied, the rows (and the
    delivery counts they feed) stay."""
    status = await connection.execute(
        "UPDATE outbox SET payload = ''::bytea"
        " WHERE member_id = ANY($1::text[]) AND delivered_at IS NOT NULL AND payload <> ''::bytea",
        list(member_ids),
    )
    return int(status.split()[-1])


# ---- Key rotation ------------------------------------------------------------------------------


async def lock_keys_not_under(connection: DbConnection, kek_id: str, limit: int) -> list[tuple[str, WrappedKey]]:
    """Up to `limit` members whose data key is wrapped by another KEK, locked; rows other
    transactions hold are skipped (the next call gets them), so rotation never waits on traffic."""
    rows = await connection.fetch(
        """SELECT member_id, dek_wrapped, dek_nonce, kek_id FROM members
            WHERE dek_wrapped IS NOT NULL AND kek_id <> $1
            LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED""",
        kek_id, limit,
    )
    return [(row["member_id"], WrappedKey(bytes(row["dek_wrapped"]), bytes(row["dek_nonce"]), row["kek_id"]))
            for row in rows]


async def store_wrapped_keys(connection: DbConnection, keys: Sequence[tuple[str, WrappedKey, str]]) -> int:
    """(member id, new wrapped key, previous kek id). The etag does not move: the member is unchanged."""
    status = await connection.execute(
        """UPDATE members m SET dek_wrapped = u.w, dek_nonce = u.n, kek_id = u.k
             FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::text[], $5::text[]) AS u(i, w, n, k, old)
            WHERE m.member_id = u.i AND m.kek_id = u.old""",
        [k[0] for k in keys], [k[1].wrapped for k in keys], [k[1].nonce for k in keys],
        [k[1].kek_id for k in keys], [k[2] for k in keys],
    )
    return int(status.split()[-1])


async def key_usage(connection: DbConnection) -> dict[str, int]:
    rows = await connection.fetch(
        "SELECT kek_id, count(*) AS members FROM members WHERE dek_wrapped IS NOT NULL GROUP BY kek_id")
    return {row["kek_id"]: row["members"] for row in rows}
