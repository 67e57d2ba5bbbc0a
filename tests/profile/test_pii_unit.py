"""Pure member and PII rules: envelope encryption, look-up hashes, masks, update masks, dates, page
tokens, and the key-ring file. No database, no server."""

from __future__ import annotations

import json
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.errors import LoyaltyError
from loyalty.profile.v1 import event_pb2, member_pb2
from loyalty.rewards.v1 import earning_pb2
from services.profile.adapters.members_repo import MemberFilter, StoredMember
from services.profile.adapters.pii_keys import KeyRingFile
from services.profile.domain import members as rules
from services.profile.domain.members import Consents, Member, MemberFields
from services.profile.domain.pii import (
    KeyRing,
    KeyRingError,
    LookupKind,
    Pii,
    PiiIntegrityError,
    UnknownKeyIdError,
    fingerprint,
    lookup_hash,
    mask_birth_date,
    mask_display_name,
    mask_email,
    mask_ip,
    mask_phone,
    new_data_key,
    open_pii,
    rewrap_data_key,
    seal_pii,
    unwrap_data_key,
    wrap_data_key,
)
from services.profile.service_layer.members import decode_page_token, encode_page_token

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
PII = Pii(display_name="Alice Zhang", email="Alice.Zhang@Example.com", phone="+8613800138000",
          birth_date="1990-04-02")


def _ring(*key_ids: str) -> KeyRing:
    ring = KeyRing.generate(key_ids[0])
    keks = dict(ring.keks) | {key_id: os.urandom(32) for key_id in key_ids[1:]}
    return KeyRing(active_key_id=key_ids[0], keks=keks, lookup_hash_key=ring.lookup_hash_key)


# ---- envelope encryption -----------------------------------------------------------------------


def test_sealed_pii_opens_with_its_member_key_and_hides_the_plaintext() -> None:
    ring = _ring("k1")
    dek = new_data_key()
    sealed = seal_pii(dek, PII, "m-1")
    wrapped = wrap_data_key(ring, dek, "m-1")
    assert wrapped.kek_id == "k1" and len(dek) == 32
    for secret in (PII.display_name, PII.email, PII.phone, PII.birth_date, "Alice"):
        assert secret.encode() not in sealed.ciphertext
        assert secret.encode() not in wrapped.wrapped
    assert open_pii(unwrap_data_key(ring, wrapped, "m-1"), sealed, "m-1") == PII


def test_blobs_are_bound_to_their_member() -> None:
    ring = _ring("k1")
    dek = new_data_key()
    sealed = seal_pii(dek, PII, "m-1")
    wrapped = wrap_data_key(ring, dek, "m-1")
    with pytest.raises(PiiIntegrityError):
        open_pii(dek, sealed, "m-2")  # a ciphertext copied onto another member does not open
    with pytest.raises(PiiIntegrityError):
        unwrap_data_key(ring, wrapped, "m-2")
    with pytest.raises(PiiIntegrityError):
        open_pii(new_data_key(), sealed, "m-1")


def test_rewrap_moves_the_same_data_key_to_another_kek() -> None:
    ring = _ring("k1", "k2")
    dek = new_data_key()
    sealed = seal_pii(dek, PII, "m-1")
    rewrapped = rewrap_data_key(ring, wrap_data_key(ring, dek, "m-1"), "m-1", "k2")
    assert rewrapped.kek_id == "k2"
    assert open_pii(unwrap_data_key(ring, rewrapped, "m-1"), sealed, "m-1") == PII
    without_k1 = KeyRing(active_key_id="k2", keks={"k2": ring.keks["k2"]}, lookup_hash_key=ring.lookup_hash_key)
    assert unwrap_data_key(without_k1, rewrapped, "m-1") == dek
    with pytest.raises(UnknownKeyIdError):
        unwrap_data_key(without_k1, wrap_data_key(ring, dek, "m-1", "k1"), "m-1")


@settings(max_examples=50, deadline=None)
@given(st.builds(Pii, display_name=st.text(max_size=40), email=st.text(max_size=40), phone=st.text(max_size=16),
                 birth_date=st.text(max_size=10)))
def test_any_pii_survives_a_seal_and_open(pii: Pii) -> None:
    dek = new_data_key()
    assert open_pii(dek, seal_pii(dek, pii, "m"), "m") == pii


# ---- key ring ----------------------------------------------------------------------------------


def test_key_ring_document_round_trips_and_never_prints_keys() -> None:
    ring = _ring("k1", "k2")
    again = KeyRing.from_document(json.loads(json.dumps(ring.to_document())))
    assert again == ring
    for key in (*ring.keks.values(), ring.lookup_hash_key):
        assert key.hex() not in repr(ring) and str(key) not in repr(ring)


@pytest.mark.parametrize(("document", "problem"), [
    ([], "JSON object"),
    ({"keys": {"k1": "AAAA"}}, '"active"'),
    ({"active": "k1", "keys": {}}, '"keys"'),
    ({"active": "k2", "keys": {"k1": "A" * 44}, "lookup_hash_key": "A" * 44}, "not among the keys"),
    ({"active": "k1", "keys": {"k1": "not base64!"}, "lookup_hash_key": "A" * 44}, "base64"),
    ({"active": "k1", "keys": {"k1": "AAAA"}, "lookup_hash_key": "A" * 44}, "32 bytes"),
    ({"active": "k1", "keys": {"k1": "A" * 44}}, "lookup_hash_key"),
])
def test_bad_key_ring_documents_are_refused_with_a_reason(document: object, problem: str) -> None:
    with pytest.raises(KeyRingError, match=problem):
        KeyRing.from_document(document)


def test_key_ring_file_is_created_private_and_rereads_for_an_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "state" / "pii-keys.json"
    keys = KeyRingFile(path, create_if_missing=True)
    keys.current()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    document["keys"]["k2"] = KeyRing.generate("k2").to_document()["keys"]["k2"]
    path.write_text(json.dumps(document))
    assert "k2" not in keys.current().keks  # read once...
    assert "k2" in keys.containing("k2").keks  # ...and again when asked for a key it lacks
    with pytest.raises(UnknownKeyIdError):
        keys.containing("k3")


def test_a_configured_key_file_is_never_invented(tmp_path: Path) -> None:
    keys = KeyRingFile(tmp_path / "missing.json", create_if_missing=False)
    with pytest.raises(LoyaltyError) as caught:
        keys.current()
    assert caught.value.reason == "PII_KEYS_UNAVAILABLE"
    assert not (tmp_path / "missing.json").exists()


def test_a_broken_file_keeps_the_last_good_ring(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = KeyRingFile(path, create_if_missing=True)
    ring = keys.current()
    path.write_text("{not json")
    with pytest.raises(LoyaltyError):
        keys.reload()
    assert keys.current() == ring


def test_starters_racing_for_the_key_file_create_one_key_ring(tmp_path: Path) -> None:
    # Threads rather than processes (forking a process that has loaded gRPC is unsafe): the race is
    # on the file system either way, O_EXCL on the lock file and an atomic rename of the key file.
    path = tmp_path / "pii-keys.json"
    starters = 8
    barrier = threading.Barrier(starters)

    def start() -> str:
        barrier.wait()
        ring = KeyRingFile(path, create_if_missing=True).current()
        return ring.keks[ring.active_key_id].hex()

    with ThreadPoolExecutor(starters) as pool:
        keys = list(pool.map(lambda _: start(), range(starters)))
    assert len(set(keys)) == 1
    assert not list(tmp_path.glob(".*"))  # no lock or temporary file left behind


# ---- look-up hashes and fingerprints -----------------------------------------------------------


def test_lookup_hashes_are_keyed_normalised_and_separated_by_kind() -> None:
    key, other_key = os.urandom(32), os.urandom(32)
    email = lookup_hash(key, LookupKind.EMAIL, "Alice@Example.COM ")
    assert email == lookup_hash(key, LookupKind.EMAIL, "alice@example.com")
    assert email != lookup_hash(other_key, LookupKind.EMAIL, "alice@example.com")
    assert lookup_hash(key, LookupKind.PHONE, "+86 138-0013-8000") == lookup_hash(key, LookupKind.PHONE,
                                                                                  "+8613800138000")
    assert lookup_hash(key, LookupKind.PHONE, "x") != lookup_hash(key, LookupKind.EMAIL, "x")
    assert b"alice" not in email and len(email) == 32


def test_fingerprints_depend_on_key_field_and_value() -> None:
    key = os.urandom(32)
    assert fingerprint(key, "email", "a@b.co") == fingerprint(key, "email", "a@b.co")
    assert fingerprint(key, "email", "a@b.co") != fingerprint(key, "phone", "a@b.co")
    assert fingerprint(key, "email", "a@b.co") != fingerprint(os.urandom(32), "email", "a@b.co")


# ---- masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("phone", "masked"), [
    ("+8613800138000", "+86*******8000"),  # the member.proto example
    ("+14155550123", "+1******0123"),  # one-digit code
    ("+447911123456", "+44******3456"),
    ("+35312345678", "+353****5678"),  # three-digit code
    ("+3531234567", "+353***4567"),
    ("+3541234", "+354***4"),  # so short that fewer digits stay visible
    ("", ""),
])
def test_phone_mask_keeps_country_code_and_last_digits(phone: str, masked: str) -> None:
    assert mask_phone(phone) == masked


def test_other_masks_follow_member_proto() -> None:
    assert mask_email("alice@example.com") == "a***@example.com"
    assert mask_email("") == "" and mask_email("broken") == "***"
    assert mask_display_name("张三丰") == "张**"
    assert mask_display_name("") == ""
    assert mask_birth_date("1990-04-02") == "1990-**-**"
    assert mask_birth_date("1990-04-02", keep_month=True) == "1990-04-**"
    assert mask_birth_date("", keep_month=True) == ""
    assert PII.masked() == Pii("A**", "A***@Example.com", "+86*******8000", "1990-**-**")


def test_presented_masks_without_pii_read_and_shows_nothing_for_the_erased() -> None:
    member = Member(member_id="m", status=member_pb2.MEMBER_STATUS_ACTIVE, created_at=NOW, updated_at=NOW,
                    joined_at=NOW, pii=PII)
    assert rules.presented(member, can_read_pii=True).pii == PII
    masked = rules.presented(member, can_read_pii=False)
    assert masked.pii_masked and masked.pii == PII.masked()
    month_only = rules.presented(member, can_read_pii=False, can_read_birth_month=True)
    assert month_only.pii_masked and month_only.pii == PII.masked(keep_birth_month=True)
    assert month_only.pii.birth_date == "1990-04-**"  # everything else masked as without any scope
    assert rules.presented(member, can_read_pii=True, can_read_birth_month=True).pii == PII
    erased = rules.presented(Member(member_id="m", status=member_pb2.MEMBER_STATUS_ERASED, created_at=NOW,
                                    updated_at=NOW, joined_at=NOW, pii=PII), can_read_pii=True)
    assert erased.pii_masked and erased.pii.is_empty()


# ---- update masks and changes ------------------------------------------------------------------


def test_update_mask_accepts_the_documented_paths_only() -> None:
    assert rules.check_update_mask(["email", "consents.marketing", "consents", "joined_at", "external_id"]) == []
    for bad in (["*"], ["member_id"], ["status"], ["etag"], ["consents.updated_at"], ["created_at"], ["nope"], []):
        violations = rules.check_update_mask(bad)
        assert violations and {v.field for v in violations} == {"update_mask"}, bad


def _member(**values: Any) -> Member:
    base = Member(member_id="m", status=member_pb2.MEMBER_STATUS_ACTIVE, created_at=NOW - timedelta(days=10),
                  updated_at=NOW - timedelta(days=10), joined_at=NOW - timedelta(days=400), pii=PII,
                  consents=Consents(marketing=True, updated_at=NOW - timedelta(days=10)), version=3)
    return replace(base, **values)


def test_apply_update_changes_only_the_masked_fields() -> None:
    before = _member()
    changes = MemberFields(region="CN-SH", external_id="shop-9", pii=Pii(email="new@example.com", display_name="X"),
                           consents=Consents(marketing=False, profiling=True))
    after = rules.apply_update(before, changes, ["email", "consents.profiling"], NOW)
    assert after.pii == PII.with_values(email="new@example.com")
    assert after.region == "" and after.external_id == ""
    assert after.consents.marketing and after.consents.profiling and after.consents.updated_at == NOW
    assert (after.version, after.updated_at) == (4, NOW)


def test_consent_time_moves_only_when_a_flag_changes_and_joined_at_clears_to_creation() -> None:
    before = _member()
    same = rules.apply_update(before, MemberFields(consents=Consents(marketing=True)), ["consents"], NOW)
    assert same.consents == before.consents
    cleared = rules.apply_update(before, MemberFields(), ["joined_at", "phone"], NOW)
    assert cleared.joined_at == before.created_at and cleared.pii.phone == ""


def test_dates_are_checked_against_now() -> None:
    def fields_at(joined: datetime | None = None, born: str = "") -> list[str]:
        found = rules.check_fields(MemberFields(joined_at=joined, pii=Pii(birth_date=born)), NOW)
        return [v.field for v in found]

    assert fields_at(NOW + timedelta(seconds=rules.JOINED_AT_SKEW_S_MAX)) == []
    assert fields_at(NOW + timedelta(seconds=rules.JOINED_AT_SKEW_S_MAX + 1)) == ["member.joined_at"]
    assert fields_at(datetime(1969, 12, 31, tzinfo=UTC)) == ["member.joined_at"]
    assert fields_at(born="2026-06-16") == ["member.birth_date"]
    assert fields_at(born="1899-12-31") == ["member.birth_date"]
    assert fields_at(NOW - timedelta(days=1), "1990-01-01") == []
    # An update checks only what it sets.
    assert rules.check_fields(MemberFields(joined_at=NOW + timedelta(days=1)), NOW, ["region"]) == []


def test_key_changes_release_what_moved_and_claim_what_is_new() -> None:
    key = os.urandom(32)
    before = rules.unique_keys(_member(external_id="shop-1"), key)
    assert set(before) == {LookupKind.EXTERNAL_ID, LookupKind.EMAIL, LookupKind.PHONE}
    after = rules.unique_keys(_member(external_id="shop-1", pii=PII.with_values(email="b@x.io", phone="")), key)
    moves = rules.key_changes(before, after)
    assert moves.release == {LookupKind.EMAIL, LookupKind.PHONE}
    assert dict(moves.claim) == {LookupKind.EMAIL: after[LookupKind.EMAIL]}


# ---- tenure and age ----------------------------------------------------------------------------


def test_tenure_counts_whole_days_and_never_goes_negative() -> None:
    assert rules.tenure_days(NOW - timedelta(days=3, hours=23), NOW) == 3
    assert rules.tenure_days(NOW + timedelta(minutes=2), NOW) == 0


@pytest.mark.parametrize(("born", "on", "band"), [
    ("2008-06-15", date(2026, 6, 14), member_pb2.AGE_BAND_UNDER_18),
    ("2008-06-15", date(2026, 6, 15), member_pb2.AGE_BAND_18_TO_24),  # 18th birthday
    ("2001-06-16", date(2026, 6, 15), member_pb2.AGE_BAND_18_TO_24),
    ("2001-06-15", date(2026, 6, 15), member_pb2.AGE_BAND_25_TO_34),
    ("1961-06-15", date(2026, 6, 15), member_pb2.AGE_BAND_65_AND_OVER),
    ("1961-06-16", date(2026, 6, 15), member_pb2.AGE_BAND_55_TO_64),
    ("2000-02-29", date(2018, 2, 28), member_pb2.AGE_BAND_UNDER_18),  # leap-day birthday: 18 on 1 March
    ("2000-02-29", date(2018, 3, 1), member_pb2.AGE_BAND_18_TO_24),
    ("", date(2026, 1, 1), member_pb2.AGE_BAND_UNSPECIFIED),
])
def test_age_bands(born: str, on: date, band: int) -> None:
    assert rules.age_band(born, on) == band


# ---- erasure -----------------------------------------------------------------------------------


def test_anonymised_event_keeps_behaviour_and_drops_device_and_ip() -> None:
    event = event_pb2.BehaviourEvent(event_id="e1", member_id="m", device_id="dev-1", ip_address="10.0.0.7",
                                     session_id="s1")
    event.purchase.order_id = "o1"
    scrubbed = event_pb2.BehaviourEvent.FromString(rules.anonymised_event_payload(event.SerializeToString()))
    assert (scrubbed.device_id, scrubbed.ip_address) == ("", "")
    assert (scrubbed.event_id, scrubbed.session_id, scrubbed.purchase.order_id) == ("e1", "s1", "o1")


def test_anonymised_accrual_keeps_what_rewards_credits_and_drops_device_ip_and_email_domain() -> None:
    accrual = earning_pb2.Accrual(source_event_id="e1", member_id="m", order_id="o1", device_id="dev-1",
                                  ip="10.0.0.7", email_domain="example.org", browse_seconds=60)
    accrual.amount.amount_minor = 1_000
    scrubbed = earning_pb2.Accrual.FromString(rules.anonymised_accrual_payload(accrual.SerializeToString()))
    assert (scrubbed.device_id, scrubbed.ip, scrubbed.email_domain) == ("", "", "")
    assert (scrubbed.source_event_id, scrubbed.order_id, scrubbed.amount.amount_minor) == ("e1", "o1", 1_000)


@pytest.mark.parametrize(("ip", "masked"), [
    ("203.0.113.77", "203.0.113.0"),
    ("2001:db8:1234:5678:9abc:def0:1234:5678", "2001:db8:1234::"),  # the last 80 bits zeroed
    ("", ""),
    ("not an address", "***"),
])
def test_ip_masks_keep_the_network_only(ip: str, masked: str) -> None:
    assert mask_ip(ip) == masked


def test_events_show_their_ip_masked_without_pii_read() -> None:
    event = event_pb2.BehaviourEvent(event_id="e1", ip_address="198.51.100.9", device_id="dev-1")
    assert rules.presented_event(event_pb2.BehaviourEvent(ip_address="198.51.100.9"), True).ip_address == (
        "198.51.100.9")
    shown = rules.presented_event(event, False)
    assert (shown.ip_address, shown.device_id) == ("198.51.100.0", "dev-1")


# ---- merge -------------------------------------------------------------------------------------


def test_merged_survivor_keeps_its_fields_fills_gaps_and_takes_the_stricter_consent() -> None:
    survivor = Member(member_id="s", status=1, created_at=NOW, updated_at=NOW, joined_at=NOW - timedelta(days=5),
                      region="CN-SH", pii=Pii(email="s@example.org"),
                      consents=Consents(marketing=True, profiling=True, updated_at=NOW))
    duplicate = Member(member_id="d", status=1, created_at=NOW, updated_at=NOW, joined_at=NOW - timedelta(days=50),
                       region="CN-BJ", locale="zh-CN", external_id="shop-d",
                       pii=Pii(email="d@example.org", phone="+8613800138000"),
                       consents=Consents(marketing=False, profiling=True, third_party_sharing=True))
    later = NOW + timedelta(hours=1)
    merged = rules.merged_survivor(survivor, duplicate, later)
    assert (merged.region, merged.locale, merged.external_id) == ("CN-SH", "zh-CN", "shop-d")
    assert (merged.pii.email, merged.pii.phone) == ("s@example.org", "+8613800138000")
    assert merged.consents.flags() == (False, True, False, False) and merged.consents.updated_at == later
    assert (merged.joined_at, merged.version, merged.updated_at) == (duplicate.joined_at, 2, later)
    assert rules.fills_pii(survivor, merged)
    # A duplicate that adds nothing leaves the survivor as it was (same version, no write).
    empty = Member(member_id="e", status=1, created_at=NOW, updated_at=NOW, joined_at=NOW, consents=merged.consents)
    assert rules.merged_survivor(merged, empty, later) is merged
    # Consent is never widened by a merge: a duplicate without it withdraws it.
    assert rules.merged_survivor(merged, replace(empty, consents=Consents()), later).consents.profiling is False


# ---- page tokens -------------------------------------------------------------------------------


def _stored_at(created_at: datetime, member_id: str) -> StoredMember:
    return StoredMember(member_id=member_id, external_id=None, status=1, merged_into_member_id=None, channel=0,
                        region="", locale="", gender=0, birth_year=None, consents={}, joined_at=created_at,
                        created_at=created_at, updated_at=created_at, erased_at=None, merged_at=None, version=1,
                        pii=None, dek=None, email_hash=None, phone_hash=None)


def test_page_tokens_round_trip_and_are_bound_to_their_filters() -> None:
    where = MemberFilter(region="CN-SH", channel=2)
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    token = encode_page_token(where, _stored_at(at, "m-7"))
    assert decode_page_token(token, where) == (at, "m-7")
    with pytest.raises(LoyaltyError) as caught:
        decode_page_token(token, MemberFilter(region="CN-BJ", channel=2))
    assert caught.value.reason == "PAGE_TOKEN_MISMATCH"
    assert [v.field for v in caught.value.violations] == ["page_token"]
    for garbage in ("x", "bm90IGpzb24", "e30", token[:-3]):
        with pytest.raises(LoyaltyError) as caught:
            decode_page_token(garbage, where)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"
