"""Members end to end: the real profile process over real stubs, and the raw tables behind it.

Every test makes its own members (uuid suffixes): the service and the database are shared by the
whole session. The PII strings used here are collected so the last test can prove the service log
holds none of them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from libs.errors import details_from_rpc_error
from libs.files import atomic_write
from loyalty.profile.v1 import event_pb2, member_pb2
from loyalty.profile.v1 import profile_service_pb2 as pb
from loyalty.profile.v1.profile_service_pb2_grpc import ProfileServiceStub
from services.profile.domain.pii import KeyRing, Pii, WrappedKey, open_pii, unwrap_data_key
from services.profile.domain.pii import SealedPii as Sealed
from tests.support.processes import RunningProcess

pytestmark = pytest.mark.e2e

CALL_TIMEOUT_S = 10
PII_USED: list[str] = []  # every PII value sent in this module, for the log scan at the end
BIRTH_MONTH_READS: list[str] = []  # members whose birth month was shown to rewards


def _uid() -> str:
    return uuid.uuid4().hex[:12]


def _person(**overrides: Any) -> member_pb2.Member:
    """A member with fresh, unique PII (recorded for the log scan)."""
    tag = _uid()
    member = member_pb2.Member(
        member_id=f"m-{tag}", external_id=f"shop-{tag}", display_name=f"Zoë Quill {tag}",
        email=f"Zoe.Quill.{tag}@Example.com", phone=f"+86139{secrets.randbelow(10**8):08d}",
        birth_date=f"19{secrets.randbelow(90) + 10}-0{secrets.randbelow(9) + 1}-1{secrets.randbelow(9)}",
        region="CN-SH", locale="zh-CN", channel=2, gender=member_pb2.GENDER_FEMALE,
    )
    member.consents.marketing = True
    for name, value in overrides.items():
        if isinstance(value, member_pb2.Consents):
            member.consents.CopyFrom(value)
        else:
            setattr(member, name, value)
    PII_USED.extend([member.display_name, member.email, member.email.lower(), member.phone])
    return member


async def _create(stub: ProfileServiceStub, metadata: Any, member: member_pb2.Member,
                  request_id: str | None = None) -> member_pb2.Member:
    reply = await stub.CreateMember(pb.CreateMemberRequest(request_id=request_id or f"r-{_uid()}", member=member),
                                    metadata=metadata, timeout=CALL_TIMEOUT_S)
    return reply.member


async def _fails(call: Any, code: grpc.StatusCode, reason: str | None = None) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    details = details_from_rpc_error(caught.value)
    if reason is not None:
        assert details.reason == reason
    return details


def _update(member_id: str, paths: list[str], etag: str = "", request_id: str | None = None,
            **values: Any) -> pb.UpdateMemberRequest:
    member = member_pb2.Member(member_id=member_id, etag=etag)
    for name, value in values.items():
        if name == "consents":
            member.consents.CopyFrom(value)
        else:
            setattr(member, name, value)
    return pb.UpdateMemberRequest(request_id=request_id or f"u-{_uid()}", member=member,
                                  update_mask=field_mask_pb2.FieldMask(paths=paths))


async def _raw_row(db: asyncpg.Connection, member_id: str) -> str:
    """Every column of the stored member as text (bytea as hex)."""
    text: str = await db.fetchval("SELECT to_jsonb(m)::text FROM profile.members m WHERE member_id = $1", member_id)
    return text


def _assert_absent(haystack: str, secrets_: list[str]) -> None:
    lowered = haystack.lower()
    for secret in secrets_:
        assert secret.lower() not in lowered, "plaintext PII found"
        assert secret.encode().hex() not in lowered, "plaintext PII found (as bytes)"


def _pii_of(member: member_pb2.Member) -> list[str]:
    return [member.display_name, member.email, member.phone, member.birth_date]


# ---- create, read, mask ------------------------------------------------------------------------


async def test_create_then_get_unmasked_for_pii_read_and_masked_without(
        stub: ProfileServiceStub, admin: Any, storefront: Any, db: asyncpg.Connection) -> None:
    sent = _person()
    created = await _create(stub, admin, sent)
    assert (created.member_id, created.status, created.etag, created.pii_masked) == (
        sent.member_id, member_pb2.MEMBER_STATUS_ACTIVE, "1", False)
    assert (created.display_name, created.email, created.phone, created.birth_date) == (
        sent.display_name, sent.email, sent.phone, sent.birth_date)
    assert created.joined_at == created.created_at and created.tenure_days == 0
    assert created.consents.marketing and created.consents.HasField("updated_at")

    full = (await stub.GetMember(pb.GetMemberRequest(member_id=sent.member_id), metadata=admin,
                                 timeout=CALL_TIMEOUT_S)).member
    assert full == created

    masked = (await stub.GetMember(pb.GetMemberRequest(member_id=sent.member_id), metadata=storefront,
                                   timeout=CALL_TIMEOUT_S)).member
    tag = sent.member_id.removeprefix("m-")
    assert masked.pii_masked
    assert masked.display_name == "Z**"
    assert masked.email == "Z***@Example.com"
    assert masked.phone == f"+86*******{sent.phone[-4:]}"
    assert masked.birth_date == f"{sent.birth_date[:4]}-**-**"
    assert (masked.external_id, masked.region, masked.etag) == (f"shop-{tag}", "CN-SH", "1")

    # The portrait starts with the member: an empty aggregates row in the same transaction.
    assert await db.fetchval("SELECT purchase_count FROM profile.member_aggregates WHERE member_id = $1",
                             sent.member_id) == 0


async def test_a_caller_with_pii_birth_month_sees_the_month_only_and_it_is_audited(
        stub: ProfileServiceStub, admin: Any, dev_tokens: dict[str, str]) -> None:
    """Rewards holds `pii.birth_month` (the birthday bonus window): the month of the birth date
    and nothing else of the PII."""
    sent = _person(birth_date="1991-07-23")
    await _create(stub, admin, sent)
    rewards_caller = (("authorization", f"Bearer {dev_tokens['rewards']}"),)
    seen = (await stub.GetMember(pb.GetMemberRequest(member_id=sent.member_id), metadata=rewards_caller,
                                 timeout=CALL_TIMEOUT_S)).member
    assert seen.pii_masked
    assert seen.birth_date == "1991-07-**"
    assert (seen.display_name, seen.email, seen.phone) == (
        "Z**", f"Z***@{sent.email.split('@')[1]}", f"+86*******{sent.phone[-4:]}")
    BIRTH_MONTH_READS.append(sent.member_id)


async def test_server_generates_a_uuid_and_backfilled_joined_at_gives_tenure(
        stub: ProfileServiceStub, admin: Any) -> None:
    sent = _person(member_id="")
    sent.joined_at.FromDatetime(datetime.now(UTC) - timedelta(days=40, hours=1))
    created = await _create(stub, admin, sent)
    assert str(uuid.UUID(created.member_id)) == created.member_id
    assert created.tenure_days == 40


async def test_pii_is_unreadable_in_the_raw_tables(stub: ProfileServiceStub, admin: Any,
                                                   db: asyncpg.Connection) -> None:
    sent = _person()
    request_id = f"r-{_uid()}"
    await _create(stub, admin, sent, request_id)
    raw = await _raw_row(db, sent.member_id)
    assert '"kek_id": "' in raw and '"dek_wrapped": "\\\\x' in raw  # sealed, with its wrapped key
    _assert_absent(raw, [*_pii_of(sent), sent.phone.lstrip("+")])
    keys = await db.fetch("SELECT kind, key FROM profile.member_keys WHERE member_id = $1", sent.member_id)
    assert sorted(k["kind"] for k in keys) == [1, 2, 3]
    _assert_absent(" ".join(bytes(k["key"]).hex() + bytes(k["key"]).decode("latin-1") for k in keys),
                   _pii_of(sent))
    # The request-id record keeps a receipt, not the response with its PII.
    stored = await db.fetchrow("SELECT response FROM profile.idempotency_keys WHERE request_id = $1", request_id)
    assert stored is not None
    receipt = pb.CreateMemberResponse.FromString(bytes(stored["response"]))
    assert receipt.member == member_pb2.Member(member_id=sent.member_id)


async def test_bad_input_is_invalid_argument_naming_the_field_and_writes_nothing(
        stub: ProfileServiceStub, admin: Any, db: asyncpg.Connection) -> None:
    future = _person()
    future.joined_at.FromDatetime(datetime.now(UTC) + timedelta(days=2))
    details = await _fails(_create(stub, admin, future), grpc.StatusCode.INVALID_ARGUMENT)
    assert [v.field for v in details.violations] == ["member.joined_at"]
    unborn = _person(birth_date="2999-01-01")
    details = await _fails(_create(stub, admin, unborn), grpc.StatusCode.INVALID_ARGUMENT)
    assert [v.field for v in details.violations] == ["member.birth_date"]
    malformed = _person(email="not-an-email", phone="12345")
    details = await _fails(_create(stub, admin, malformed), grpc.StatusCode.INVALID_ARGUMENT)
    assert {v.field for v in details.violations} == {"member.email", "member.phone"}
    ids = [future.member_id, unborn.member_id, malformed.member_id]
    assert await db.fetchval("SELECT count(*) FROM profile.members WHERE member_id = ANY($1)", ids) == 0


# ---- uniqueness --------------------------------------------------------------------------------


async def test_unique_keys_conflict_with_the_documented_reasons(stub: ProfileServiceStub, admin: Any,
                                                                db: asyncpg.Connection) -> None:
    first = await _create(stub, admin, _person())
    clashes = {
        "MEMBER_ID_TAKEN": _person(member_id=first.member_id),
        "EXTERNAL_ID_TAKEN": _person(external_id=first.external_id),
        "EMAIL_TAKEN": _person(email=first.email.upper()),  # e-mail is matched case-insensitively
        "PHONE_TAKEN": _person(phone=first.phone),
    }
    for reason, member in clashes.items():
        await _fails(_create(stub, admin, member), grpc.StatusCode.ALREADY_EXISTS, reason)
    losers = [m.member_id for m in clashes.values() if m.member_id != first.member_id]
    assert await db.fetchval("SELECT count(*) FROM profile.members WHERE member_id = ANY($1)", losers) == 0

    other = await _create(stub, admin, _person())
    await _fails(stub.UpdateMember(_update(other.member_id, ["email"], email=first.email), metadata=admin,
                                   timeout=CALL_TIMEOUT_S), grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN")
    still = (await stub.GetMember(pb.GetMemberRequest(member_id=other.member_id), metadata=admin,
                                  timeout=CALL_TIMEOUT_S)).member
    assert (still.email, still.etag) == (other.email, "1")


async def test_eight_concurrent_creates_with_one_email_make_one_member(stub: ProfileServiceStub,
                                                                       admin: Any) -> None:
    email = _person().email
    attempts = [_person(email=email) for _ in range(8)]
    results = await asyncio.gather(*(_create(stub, admin, m) for m in attempts), return_exceptions=True)
    winners = [r for r in results if isinstance(r, member_pb2.Member)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 7
    assert {details_from_rpc_error(e).reason for e in losers} == {"EMAIL_TAKEN"}


# ---- request ids -------------------------------------------------------------------------------


async def test_retry_returns_the_same_member_masked_for_its_caller_and_reuse_is_refused(
        stub: ProfileServiceStub, storefront: Any, db: asyncpg.Connection) -> None:
    sent = _person(member_id="")  # server-generated: a second create would make a second member
    request_id = f"r-{_uid()}"
    first = await _create(stub, storefront, sent, request_id)
    again = await _create(stub, storefront, sent, request_id)
    assert first == again and first.pii_masked and first.email.startswith("Z***@")
    assert await db.fetchval("SELECT count(*) FROM profile.member_keys WHERE key = $1",
                             sent.external_id.encode()) == 1
    other = member_pb2.Member()
    other.CopyFrom(sent)
    other.region = "CN-BJ"
    await _fails(_create(stub, storefront, other, request_id), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")


# ---- update ------------------------------------------------------------------------------------


async def test_update_changes_masked_fields_moves_keys_and_checks_the_etag(
        stub: ProfileServiceStub, admin: Any, db: asyncpg.Connection) -> None:
    created = await _create(stub, admin, _person())
    new_email = _person().email
    consents = member_pb2.Consents(profiling=True, marketing=False)
    request = _update(created.member_id, ["email", "display_name", "consents.profiling", "region"], etag="1",
                      email=new_email, display_name="", consents=consents, region="CN-GD")
    updated = (await stub.UpdateMember(request, metadata=admin, timeout=CALL_TIMEOUT_S)).member
    assert (updated.email, updated.display_name, updated.region, updated.etag) == (new_email, "", "CN-GD", "2")
    assert updated.consents.profiling and updated.consents.marketing  # only the named flag changed
    assert (updated.phone, updated.birth_date) == (created.phone, created.birth_date)
    assert updated.consents.updated_at.ToDatetime() > created.consents.updated_at.ToDatetime()
    _assert_absent(await _raw_row(db, created.member_id), [new_email])

    # The replay answers like the first call; the old e-mail is free, the new one found.
    replay = (await stub.UpdateMember(request, metadata=admin, timeout=CALL_TIMEOUT_S)).member
    assert replay == updated
    await _fails(stub.LookupMember(pb.LookupMemberRequest(email=created.email), metadata=admin,
                                   timeout=CALL_TIMEOUT_S), grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")
    found = await stub.LookupMember(pb.LookupMemberRequest(email=new_email.lower()), metadata=admin,
                                    timeout=CALL_TIMEOUT_S)
    assert found.member.member_id == created.member_id

    await _fails(stub.UpdateMember(_update(created.member_id, ["region"], etag="1", region="X"), metadata=admin,
                                   timeout=CALL_TIMEOUT_S), grpc.StatusCode.FAILED_PRECONDITION, "ETAG_MISMATCH")
    unconditional = await stub.UpdateMember(_update(created.member_id, ["gender"], gender=2), metadata=admin,
                                            timeout=CALL_TIMEOUT_S)
    assert unconditional.member.etag == "3"


async def test_update_refuses_bad_masks_unknown_members_and_future_dates(stub: ProfileServiceStub,
                                                                          admin: Any) -> None:
    created = await _create(stub, admin, _person())
    for paths in (["status"], ["member_id"], ["*"], ["consents.updated_at"], ["nickname"], []):
        details = await _fails(stub.UpdateMember(_update(created.member_id, paths), metadata=admin,
                                                 timeout=CALL_TIMEOUT_S), grpc.StatusCode.INVALID_ARGUMENT)
        assert "update_mask" in {v.field for v in details.violations}, paths
    future = _update(created.member_id, ["joined_at"])
    future.member.joined_at.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    details = await _fails(stub.UpdateMember(future, metadata=admin, timeout=CALL_TIMEOUT_S),
                           grpc.StatusCode.INVALID_ARGUMENT)
    assert [v.field for v in details.violations] == ["member.joined_at"]
    await _fails(stub.UpdateMember(_update(f"m-{_uid()}", ["region"], region="X"), metadata=admin,
                                   timeout=CALL_TIMEOUT_S), grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")
    details = await _fails(stub.UpdateMember(_update("", ["region"]), metadata=admin, timeout=CALL_TIMEOUT_S),
                           grpc.StatusCode.INVALID_ARGUMENT)
    assert "member.member_id" in {v.field for v in details.violations}


# ---- list, batch get, look up -------------------------------------------------------------------


async def test_list_pages_through_a_filter_in_creation_order(stub: ProfileServiceStub, admin: Any,
                                                             storefront: Any) -> None:
    region = f"R-{_uid()}"
    made = [await _create(stub, admin, _person(region=region)) for _ in range(5)]
    seen: list[member_pb2.Member] = []
    token = ""
    pages = 0
    while True:
        reply = await stub.ListMembers(pb.ListMembersRequest(region=region, page_size=2, page_token=token),
                                       metadata=storefront, timeout=CALL_TIMEOUT_S)
        seen.extend(reply.members)
        pages += 1
        token = reply.next_page_token
        if not token:
            break
        assert len(reply.members) == 2
    assert pages == 3
    assert [m.member_id for m in seen] == [m.member_id for m in made]
    assert all(m.pii_masked and m.display_name == "Z**" for m in seen)

    first = await stub.ListMembers(pb.ListMembersRequest(region=region, page_size=2), metadata=admin,
                                   timeout=CALL_TIMEOUT_S)
    assert [m.email for m in first.members] == [m.email for m in made[:2]]
    details = await _fails(stub.ListMembers(pb.ListMembersRequest(region="elsewhere",
                                                                  page_token=first.next_page_token),
                                            metadata=admin, timeout=CALL_TIMEOUT_S),
                           grpc.StatusCode.INVALID_ARGUMENT, "PAGE_TOKEN_MISMATCH")
    assert [v.field for v in details.violations] == ["page_token"]
    await _fails(stub.ListMembers(pb.ListMembersRequest(page_token="garbage"), metadata=admin,
                                  timeout=CALL_TIMEOUT_S), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")

    # Time and channel filters narrow the same keyset walk.
    window = pb.ListMembersRequest(region=region, channel=2, page_size=10)
    window.created_after.CopyFrom(made[1].created_at)
    window.created_before.CopyFrom(made[4].created_at)
    reply = await stub.ListMembers(window, metadata=admin, timeout=CALL_TIMEOUT_S)
    assert [m.member_id for m in reply.members] == [m.member_id for m in made[1:4]]


async def test_batch_get_keeps_request_order_and_lists_missing_ids(stub: ProfileServiceStub, admin: Any,
                                                                    storefront: Any) -> None:
    a = await _create(stub, admin, _person())
    b = await _create(stub, admin, _person())
    missing = f"m-{_uid()}"
    reply = await stub.BatchGetMembers(pb.BatchGetMembersRequest(member_ids=[b.member_id, missing, a.member_id]),
                                       metadata=storefront, timeout=CALL_TIMEOUT_S)
    assert [m.member_id for m in reply.members] == [b.member_id, a.member_id]
    assert list(reply.missing_member_ids) == [missing]
    assert all(m.pii_masked for m in reply.members)


async def test_lookup_by_each_key(stub: ProfileServiceStub, admin: Any, storefront: Any) -> None:
    created = await _create(stub, admin, _person())
    for request in (pb.LookupMemberRequest(external_id=created.external_id),
                    pb.LookupMemberRequest(email=created.email.lower()),
                    pb.LookupMemberRequest(phone=created.phone)):
        reply = await stub.LookupMember(request, metadata=storefront, timeout=CALL_TIMEOUT_S)
        assert reply.member.member_id == created.member_id and reply.member.pii_masked
    for request in (pb.LookupMemberRequest(external_id=f"shop-{_uid()}"),
                    pb.LookupMemberRequest(email=_person().email),
                    pb.LookupMemberRequest(phone=_person().phone)):
        await _fails(stub.LookupMember(request, metadata=admin, timeout=CALL_TIMEOUT_S), grpc.StatusCode.NOT_FOUND,
                     "MEMBER_NOT_FOUND")
    await _fails(stub.GetMember(pb.GetMemberRequest(member_id=f"m-{_uid()}"), metadata=admin,
                                timeout=CALL_TIMEOUT_S), grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")


# ---- erasure -----------------------------------------------------------------------------------


async def _add_events(db: asyncpg.Connection, member_id: str, count: int) -> None:
    """Stored events as the event pipeline writes them (columns plus the serialized event)."""
    for index in range(count):
        event = event_pb2.BehaviourEvent(event_id=f"e-{index}", member_id=member_id, channel=2,
                                         device_id=f"dev-{member_id}", ip_address="203.0.113.9")
        event.occurred_at.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
        event.view.product_id = "p-1"
        await db.execute(
            """INSERT INTO profile.events (member_id, event_id, event_type, occurred_at, channel, device_id,
                                           ip_address, payload_sha256, payload)
               VALUES ($1, $2, 1, now() - interval '1 hour', 2, $3, '203.0.113.9', '\\x00', $4)""",
            member_id, event.event_id, event.device_id, event.SerializeToString())
    await db.execute("UPDATE profile.member_aggregates SET view_count = $2 WHERE member_id = $1", member_id, count)


def _key_ring(state_dir: Path) -> KeyRing:
    return KeyRing.from_document(json.loads((state_dir / "pii-keys.json").read_text()))


def _open_raw(row: asyncpg.Record, ring: KeyRing) -> Pii:
    dek = unwrap_data_key(ring, WrappedKey(bytes(row["dek_wrapped"]), bytes(row["dek_nonce"]), row["kek_id"]),
                          row["member_id"])
    return open_pii(dek, Sealed(bytes(row["pii_ciphertext"]), bytes(row["pii_nonce"])), row["member_id"])


async def test_erasure_shreds_pii_keeps_behaviour_and_is_idempotent(
        stub: ProfileServiceStub, admin: Any, storefront: Any, db: asyncpg.Connection, state_dir: Path) -> None:
    sent = _person()
    await _create(stub, admin, sent)
    await _add_events(db, sent.member_id, 3)
    before = await db.fetchrow("SELECT * FROM profile.members WHERE member_id = $1", sent.member_id)
    # With the key file, the stored row opens: the test below decrypts for real.
    assert _open_raw(before, _key_ring(state_dir)).email == sent.email

    await _fails(stub.EraseMember(pb.EraseMemberRequest(request_id=f"x-{_uid()}", member_id=sent.member_id,
                                                        reason=pb.ERASURE_REASON_MEMBER_REQUEST),
                                  metadata=storefront, timeout=CALL_TIMEOUT_S),
                 grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")
    request = pb.EraseMemberRequest(request_id=f"x-{_uid()}", member_id=sent.member_id,
                                    reason=pb.ERASURE_REASON_MEMBER_REQUEST)
    reply = await stub.EraseMember(request, metadata=admin, timeout=CALL_TIMEOUT_S)
    erased = reply.member
    assert reply.events_anonymised == 3
    assert (erased.status, erased.pii_masked, erased.external_id) == (member_pb2.MEMBER_STATUS_ERASED, True, "")
    assert erased.HasField("erased_at") and not any(_pii_of(erased))

    # Crypto-shredded: no wrapped key, no ciphertext, no hashes, no unique keys; even the key file
    # has nothing left to open, and the old ciphertext appears nowhere in the row.
    after = await db.fetchrow("SELECT * FROM profile.members WHERE member_id = $1", sent.member_id)
    for column in ("dek_wrapped", "dek_nonce", "kek_id", "pii_ciphertext", "pii_nonce", "email_hash", "phone_hash",
                   "external_id", "birth_year"):
        assert after[column] is None, column
    raw = await _raw_row(db, sent.member_id)
    assert bytes(before["pii_ciphertext"]).hex() not in raw and bytes(before["dek_wrapped"]).hex() not in raw
    _assert_absent(raw, _pii_of(sent))
    assert await db.fetchval("SELECT count(*) FROM profile.member_keys WHERE member_id = $1", sent.member_id) == 0

    # Behaviour stays, anonymised; aggregates stay; rewards and scoring are told through the outbox.
    events = await db.fetch("SELECT device_id, ip_address, payload FROM profile.events WHERE member_id = $1",
                            sent.member_id)
    assert len(events) == 3
    for row in events:
        assert row["device_id"] is None and row["ip_address"] is None
        stored = event_pb2.BehaviourEvent.FromString(bytes(row["payload"]))
        assert (stored.device_id, stored.ip_address, stored.view.product_id) == ("", "", "p-1")
    assert await db.fetchval("SELECT view_count FROM profile.member_aggregates WHERE member_id = $1",
                             sent.member_id) == 3
    assert await db.fetchval("SELECT count(*) FROM profile.outbox WHERE member_id = $1 AND kind = 4",
                             sent.member_id) == 1

    # Idempotent: the same request id answers the same; a new one returns the erased member unchanged.
    again = await stub.EraseMember(request, metadata=admin, timeout=CALL_TIMEOUT_S)
    assert again == reply
    repeat = await stub.EraseMember(pb.EraseMemberRequest(request_id=f"x-{_uid()}", member_id=sent.member_id,
                                                          reason=pb.ERASURE_REASON_LEGAL_ORDER),
                                    metadata=admin, timeout=CALL_TIMEOUT_S)
    assert repeat.member == erased and repeat.events_anonymised == 0
    assert await db.fetchval("SELECT count(*) FROM profile.outbox WHERE member_id = $1 AND kind = 4",
                             sent.member_id) == 1

    # An erased member is read with its status, cannot change, and frees its keys for someone new.
    got = await stub.GetMember(pb.GetMemberRequest(member_id=sent.member_id), metadata=admin, timeout=CALL_TIMEOUT_S)
    assert got.member == erased
    await _fails(stub.UpdateMember(_update(sent.member_id, ["region"], region="X"), metadata=admin,
                                   timeout=CALL_TIMEOUT_S), grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_ERASED")
    await _fails(stub.LookupMember(pb.LookupMemberRequest(email=sent.email), metadata=admin, timeout=CALL_TIMEOUT_S),
                 grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")
    reborn = await _create(stub, admin, _person(email=sent.email, phone=sent.phone, external_id=sent.external_id))
    assert reborn.email == sent.email
    await _fails(stub.EraseMember(pb.EraseMemberRequest(request_id=f"x-{_uid()}", member_id=f"m-{_uid()}",
                                                        reason=pb.ERASURE_REASON_MEMBER_REQUEST),
                                  metadata=admin, timeout=CALL_TIMEOUT_S),
                 grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")


# ---- key rotation ------------------------------------------------------------------------------


async def test_rotation_moves_every_member_to_a_new_key(stub: ProfileServiceStub, admin: Any,
                                                        db: asyncpg.Connection, state_dir: Path) -> None:
    made = [await _create(stub, admin, _person()) for _ in range(3)]
    path = state_dir / "pii-keys.json"
    await _fails(stub.RotateEncryptionKeys(pb.RotateEncryptionKeysRequest(request_id=f"k-{_uid()}",
                                                                          new_key_id=f"missing-{_uid()}"),
                                           metadata=admin, timeout=CALL_TIMEOUT_S),
                 grpc.StatusCode.FAILED_PRECONDITION, "UNKNOWN_KEY_ID")

    # The operator adds a key to the file and makes it the active one; the service re-reads it.
    document = json.loads(path.read_text())
    new_key = f"k-{_uid()}"
    document["keys"][new_key] = KeyRing.generate(new_key).to_document()["keys"][new_key]
    document["active"] = new_key
    atomic_write(path, json.dumps(document), 0o600)

    dry = await stub.RotateEncryptionKeys(pb.RotateEncryptionKeysRequest(request_id=f"k-{_uid()}",
                                                                         new_key_id=new_key, dry_run=True),
                                          metadata=admin, timeout=CALL_TIMEOUT_S)
    assert dry.key_id == new_key and dry.members_reencrypted == 0 and dry.members_remaining >= 3
    assert {u.key_id: u.members for u in dry.key_usage}[new_key] == 0

    calls = 0
    remaining = dry.members_remaining
    moved = 0
    while remaining:
        calls += 1
        assert calls <= 1_000, "rotation does not converge"
        request = pb.RotateEncryptionKeysRequest(request_id=f"k-{_uid()}", max_members=50)
        reply = await stub.RotateEncryptionKeys(request, metadata=admin, timeout=CALL_TIMEOUT_S)
        assert reply.key_id == new_key and reply.members_reencrypted <= 50
        moved += reply.members_reencrypted
        remaining = reply.members_remaining
        assert await stub.RotateEncryptionKeys(request, metadata=admin, timeout=CALL_TIMEOUT_S) == reply
    assert moved >= 3
    usage = {u.key_id: u.members for u in reply.key_usage}
    assert usage[new_key] >= 3 and sum(usage.values()) == usage[new_key]
    rows = await db.fetch("SELECT member_id, kek_id FROM profile.members WHERE member_id = ANY($1)",
                          [m.member_id for m in made])
    assert {r["kek_id"] for r in rows} == {new_key}

    # Re-wrapped data keys still open the untouched PII blobs, through the service and by hand.
    ring = _key_ring(state_dir)
    for member in made:
        got = await stub.GetMember(pb.GetMemberRequest(member_id=member.member_id), metadata=admin,
                                   timeout=CALL_TIMEOUT_S)
        assert got.member == member
        row = await db.fetchrow("SELECT * FROM profile.members WHERE member_id = $1", member.member_id)
        assert _open_raw(row, ring).phone == member.phone
    # New members are sealed under the new active key.
    fresh = await _create(stub, admin, _person())
    assert await db.fetchval("SELECT kek_id FROM profile.members WHERE member_id = $1", fresh.member_id) == new_key


# ---- logs --------------------------------------------------------------------------------------


def test_the_service_log_holds_no_pii_but_audits_disclosures(services: dict[str, RunningProcess]) -> None:
    assert len(PII_USED) > 40, "runs after the tests above, which record their PII"
    log = services["profile"].log()
    lowered = log.lower()
    leaked = [value for value in PII_USED if value and value.lower() in lowered]
    assert leaked == [], f"{len(leaked)} PII values found in the service log"
    audits = [json.loads(line) for line in log.splitlines() if '"pii disclosed"' in line]
    assert audits and all(a["principal"] == "admin" and a["member_ids"] for a in audits)
    months = [json.loads(line) for line in log.splitlines() if '"birth month disclosed"' in line]
    assert BIRTH_MONTH_READS and all(a["principal"] == "rewards" for a in months)
    assert set(BIRTH_MONTH_READS) <= {m for a in months for m in a["member_ids"]}
