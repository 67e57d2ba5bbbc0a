"""Erasure and merge through the member use cases, in process against the real database: what an
erasure does to the outbox (in the erase transaction), to members merged into the erased one, and
how a merge folds the member records (keys, empty fields, consents, joined_at)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from libs.errors import LoyaltyError
from loyalty.profile.v1 import member_pb2
from loyalty.profile.v1 import profile_service_pb2 as pb
from loyalty.rewards.v1 import earning_pb2
from services.profile.adapters import members_repo
from services.profile.adapters.pii_keys import KeyRingFile
from services.profile.domain.pii import LookupKind
from services.profile.entrypoints.members_api import member_fields
from services.profile.service_layer import members as members_layer
from services.profile.service_layer.members import MembersService, Reader
from services.profile.settings import PII_KEYS_FILE_NAME
from tests.profile.conftest import Events, uid
from tests.profile.test_record_events import record

ADMIN = Reader(principal="admin", can_read_pii=True)
STOREFRONT = Reader(principal="storefront", can_read_pii=False)
ACCRUAL, REVERSAL, MERGED, ERASED = (pb.OUTBOX_MESSAGE_KIND_ACCRUAL, pb.OUTBOX_MESSAGE_KIND_REVERSAL,
                                     pb.OUTBOX_MESSAGE_KIND_MEMBER_MERGED, pb.OUTBOX_MESSAGE_KIND_MEMBER_ERASED)


@pytest.fixture
def service(profile_pool: asyncpg.Pool, state_dir: Path) -> MembersService:
    # The session's key ring, the one the service processes use: the schema is shared, and a
    # rotation test re-wraps every member in it.
    return MembersService(lambda: profile_pool, KeyRingFile(state_dir / PII_KEYS_FILE_NAME, create_if_missing=True))


def _person(**overrides: Any) -> member_pb2.Member:
    tag = uid("p")
    member = member_pb2.Member(member_id=uid("m"), display_name=f"Ada {tag}", email=f"ada.{tag}@example.org",
                               phone=f"+86138{secrets.randbelow(10**8):08d}", birth_date="1990-04-02", channel=2)
    for name, value in overrides.items():
        if isinstance(value, member_pb2.Consents):
            member.consents.CopyFrom(value)
        else:
            setattr(member, name, value)
    return member


async def _create(service: MembersService, member: member_pb2.Member) -> str:
    request = pb.CreateMemberRequest(request_id=uid("r"), member=member)
    created = await service.create(request, member_fields(request.member), ADMIN)
    return created.member_id


def _erase_request(member_id: str) -> pb.EraseMemberRequest:
    return pb.EraseMemberRequest(request_id=uid("x"), member_id=member_id, reason=pb.ERASURE_REASON_MEMBER_REQUEST)


async def _outbox(pool: asyncpg.Pool, member_id: str) -> list[asyncpg.Record]:
    return list(await pool.fetch("SELECT id, kind, payload, delivered_at FROM outbox WHERE member_id = $1 ORDER BY id",
                                 member_id))


async def _earning_events(pool: asyncpg.Pool, member_id: str) -> list[str]:
    """A purchase, a browse and a refund with a device id and an IP address: three outbox rows."""
    ev = Events(member_id)
    purchase = ev.purchase(10_000, device_id="dev-42", ip_address="198.51.100.23")
    results = await record(pool, purchase, ev.browse(300, device_id="dev-42", ip_address="2001:db8::7"),
                           ev.refund(purchase.purchase.order_id, 2_000, device_id="dev-42", ip_address="198.51.100.23"),
                           create=False)
    assert results.accepted_count == 3, results
    return [r.event_id for r in results.results]


@contextlib.asynccontextmanager
async def relay_held_off(pool: asyncpg.Pool, member_id: str) -> AsyncIterator[None]:
    """Hold the member's relay lock (the one profile's relay tries per member), so the session's
    real relay leaves the member's rows undelivered while a test looks at them."""
    async with pool.acquire() as conn:
        key = "SELECT {}(hashtextextended('profile.outbox:' || $1, 0))"
        await conn.execute(key.format("pg_advisory_lock"), member_id)
        try:
            yield
        finally:
            await conn.execute(key.format("pg_advisory_unlock"), member_id)


async def test_erasure_scrubs_pending_accruals_and_empties_delivered_rows(
        service: MembersService, profile_pool: asyncpg.Pool) -> None:
    member_id = await _create(service, _person())
    async with relay_held_off(profile_pool, member_id):
        await _earning_events(profile_pool, member_id)
        rows = await _outbox(profile_pool, member_id)
        assert [r["kind"] for r in rows] == [ACCRUAL, ACCRUAL, REVERSAL]
        # The relay delivered the first one already.
        await profile_pool.execute("UPDATE outbox SET delivered_at = now() WHERE member_id = $1 AND id = $2",
                                   member_id, rows[0]["id"])
        before = {r["id"]: earning_pb2.Accrual.FromString(bytes(r["payload"])) for r in rows}
        assert all(a.device_id == "dev-42" and a.ip for a in before.values())

        await service.erase(_erase_request(member_id), ADMIN)

        after = await _outbox(profile_pool, member_id)
        assert bytes(after[0]["payload"]) == b""  # delivered: nothing left to send, nothing kept
        for row in after[1:3]:
            accrual = earning_pb2.Accrual.FromString(bytes(row["payload"]))
            assert (accrual.device_id, accrual.ip) == ("", "")
            # Everything rewards needs to credit or reverse stays.
            expected = before[row["id"]]
            expected.ClearField("device_id")
            expected.ClearField("ip")
            assert accrual == expected and accrual.source_event_id
        assert after[1]["delivered_at"] is None and after[2]["delivered_at"] is None  # still to be delivered
        assert [r["kind"] for r in after[3:]] == [ERASED]


async def test_a_failed_erasure_leaves_the_outbox_untouched(service: MembersService, profile_pool: asyncpg.Pool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    member_id = await _create(service, _person())
    await _earning_events(profile_pool, member_id)
    await profile_pool.execute("UPDATE outbox SET delivered_at = now() WHERE member_id = $1 AND kind = $2",
                               member_id, REVERSAL)
    before = [(r["id"], bytes(r["payload"])) for r in await _outbox(profile_pool, member_id)]

    async def broken(*args: Any) -> None:
        raise LoyaltyError(grpc.StatusCode.UNAVAILABLE, "TEST", "the erasure notice could not be written")

    # The last write of the erase transaction fails: the scrub before it must roll back with it.
    monkeypatch.setattr(members_layer.repo, "insert_outbox", broken)
    with pytest.raises(LoyaltyError):
        await service.erase(_erase_request(member_id), ADMIN)
    monkeypatch.undo()
    assert [(r["id"], bytes(r["payload"])) for r in await _outbox(profile_pool, member_id)] == before
    assert (await service.get(member_id, ADMIN)).status == member_pb2.MEMBER_STATUS_ACTIVE


async def test_erasing_a_survivor_erases_the_members_merged_into_it(
        service: MembersService, profile_pool: asyncpg.Pool) -> None:
    first, second, survivor = [await _create(service, _person()) for _ in range(3)]
    await _earning_events(profile_pool, first)
    # first → second → survivor: a chain of merges.
    await service.merge(pb.MergeMembersRequest(request_id=uid("g"), survivor_member_id=second,
                                               duplicate_member_id=first), ADMIN)
    await service.merge(pb.MergeMembersRequest(request_id=uid("g"), survivor_member_id=survivor,
                                               duplicate_member_id=second), ADMIN)
    assert not (await service.get(first, ADMIN)).pii.is_empty()  # merged, not erased: it keeps its PII
    with pytest.raises(LoyaltyError) as caught:
        await service.erase(_erase_request(first), ADMIN)
    assert (caught.value.reason, caught.value.metadata["merged_into_member_id"]) == ("MEMBER_MERGED", second)

    _, anonymised = await service.erase(_erase_request(survivor), ADMIN)
    assert anonymised == 3  # first's events, moved twice
    for member_id in (first, second):
        row = await profile_pool.fetchrow("SELECT * FROM members WHERE member_id = $1", member_id)
        assert row["status"] == member_pb2.MEMBER_STATUS_ERASED and row["erased_at"] is not None
        assert row["merged_into_member_id"] is not None  # where its history went stays known
        assert all(row[c] is None for c in ("pii_ciphertext", "dek_wrapped", "email_hash", "phone_hash"))
    assert await profile_pool.fetchval("SELECT count(*) FROM member_keys WHERE member_id = ANY($1)",
                                       [first, second, survivor]) == 0
    # first's own outbox rows (written before the merges) are scrubbed too.
    for row in await _outbox(profile_pool, first):
        if row["kind"] in (ACCRUAL, REVERSAL):
            accrual = earning_pb2.Accrual.FromString(bytes(row["payload"]))
            assert (accrual.device_id, accrual.ip) == ("", "")
    erased_notices = await profile_pool.fetchval(
        "SELECT count(*) FROM outbox WHERE member_id = ANY($1) AND kind = $2", [first, second, survivor], ERASED)
    assert erased_notices == 3


async def test_merge_folds_the_records_and_moves_the_keys(service: MembersService,
                                                          profile_pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    survivor_sent = _person(phone="", birth_date="", region="",
                            consents=member_pb2.Consents(marketing=True, profiling=True))
    survivor_sent.joined_at.FromDatetime(now - timedelta(days=10))
    duplicate_sent = _person(region="CN-BJ", external_id=uid("shop"),
                             consents=member_pb2.Consents(marketing=False, profiling=True))
    duplicate_sent.joined_at.FromDatetime(now - timedelta(days=400))
    survivor_id = await _create(service, survivor_sent)
    duplicate_id = await _create(service, duplicate_sent)
    request = pb.MergeMembersRequest(request_id=uid("g"), survivor_member_id=survivor_id,
                                     duplicate_member_id=duplicate_id)

    merged = await service.merge(request, ADMIN)

    survivor = merged.survivor
    # Survivor fields win; its empty ones come from the duplicate.
    assert (survivor.pii.email, survivor.pii.display_name) == (survivor_sent.email, survivor_sent.display_name)
    assert (survivor.pii.phone, survivor.pii.birth_date) == (duplicate_sent.phone, duplicate_sent.birth_date)
    assert (survivor.region, survivor.external_id) == ("CN-BJ", duplicate_sent.external_id)
    assert (survivor.consents.marketing, survivor.consents.profiling) == (False, True)  # the stricter one
    assert survivor.joined_at == duplicate_sent.joined_at.ToDatetime(tzinfo=UTC)
    assert survivor.etag == "2"
    # The duplicate is MERGED and keeps its own record.
    duplicate = merged.duplicate
    assert (duplicate.status, duplicate.merged_into_member_id) == (member_pb2.MEMBER_STATUS_MERGED, survivor_id)
    assert (duplicate.pii.email, duplicate.pii.phone) == (duplicate_sent.email, duplicate_sent.phone)

    # Every key the duplicate held now finds the survivor.
    for kind, value in ((LookupKind.EMAIL, duplicate_sent.email), (LookupKind.EMAIL, survivor_sent.email),
                        (LookupKind.PHONE, duplicate_sent.phone),
                        (LookupKind.EXTERNAL_ID, duplicate_sent.external_id)):
        assert (await service.lookup(kind, value, STOREFRONT)).member_id == survivor_id
    assert await profile_pool.fetchval("SELECT count(*) FROM member_keys WHERE member_id = $1", duplicate_id) == 0
    stored = await profile_pool.fetchrow("SELECT phone_hash, birth_year FROM members WHERE member_id = $1",
                                         survivor_id)
    assert stored["phone_hash"] is not None and stored["birth_year"] == int(duplicate_sent.birth_date[:4])

    # A replay answers the same, masked for a caller without pii.read; the record is folded once.
    replay = await service.merge(request, ADMIN)
    assert replay == merged
    other_request = pb.MergeMembersRequest(request_id=uid("g"), survivor_member_id=survivor_id,
                                           duplicate_member_id=duplicate_id)
    again = await service.merge(other_request, STOREFRONT)
    assert (again.events_moved, again.survivor.etag, again.survivor.pii_masked) == (0, "2", True)
    assert await profile_pool.fetchval("SELECT count(*) FROM outbox WHERE member_id = $1 AND kind = $2",
                                       survivor_id, MERGED) == 1


async def test_merge_refusals(service: MembersService, profile_pool: asyncpg.Pool) -> None:
    a, b, c, d = [await _create(service, _person()) for _ in range(4)]
    cases = [
        ((a, a), grpc.StatusCode.FAILED_PRECONDITION, "SAME_MEMBER"),
        ((a, uid("nobody")), grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND"),
    ]
    await service.merge(pb.MergeMembersRequest(request_id=uid("g"), survivor_member_id=a, duplicate_member_id=b),
                        ADMIN)
    cases += [
        ((c, b), grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_MERGED"),  # b is already merged into a
        ((b, c), grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_MERGED"),  # a merged survivor
    ]
    await service.erase(_erase_request(d), ADMIN)
    cases.append(((a, d), grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_ERASED"))
    async def state(*member_ids: str) -> Any:
        async with profile_pool.acquire() as connection:
            return (await members_repo.fetch_members(connection, member_ids),
                    await connection.fetch("SELECT * FROM member_keys WHERE member_id = ANY($1) ORDER BY key",
                                           list(member_ids)))

    for (survivor, duplicate), code, reason in cases:
        before = await state(survivor, duplicate)
        with pytest.raises(LoyaltyError) as caught:
            await service.merge(pb.MergeMembersRequest(request_id=uid("g"), survivor_member_id=survivor,
                                                       duplicate_member_id=duplicate), ADMIN)
        assert (caught.value.code, caught.value.reason) == (code, reason)
        assert await state(survivor, duplicate) == before
