"""Members: the rules a product owner would recognise, without I/O.

What a caller may set and change, which dates are plausible, which unique keys a member holds,
how long it has been a member, which age band it falls in, and what a caller sees of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from libs.errors import FieldViolation
from loyalty.profile.v1 import event_pb2, member_pb2
from loyalty.rewards.v1 import earning_pb2
from services.profile.domain.pii import PII_FIELDS, LookupKind, Pii, lookup_hash, mask_ip

STATUS = member_pb2.MemberStatus
AGE_BAND = member_pb2.AgeBand

# Limits, units last.
JOINED_AT_SKEW_S_MAX = 300  # a caller's clock may run up to 5 minutes ahead of ours
JOINED_AT_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)  # before this, a backfilled date is a data error
BIRTH_DATE_EARLIEST = date(1900, 1, 1)
SECONDS_PER_DAY = 86_400

CONSENT_FLAGS: tuple[str, ...] = ("marketing", "profiling", "third_party_sharing", "personalised_offers")
PII_PATHS = frozenset({"display_name", "email", "phone", "birth_date"})
# AIP-134: the paths UpdateMember accepts. Identity, status and timestamps are the service's.
UPDATABLE_PATHS = frozenset(
    {"external_id", "channel", "region", "locale", "gender", "joined_at", "consents"}
    | PII_PATHS
    | {f"consents.{flag}" for flag in CONSENT_FLAGS}
)


@dataclass(frozen=True, slots=True)
class Consents:
    marketing: bool = False
    profiling: bool = False
    third_party_sharing: bool = False
    personalised_offers: bool = False
    updated_at: datetime | None = None

    def flags(self) -> tuple[bool, ...]:
        return tuple(getattr(self, flag) for flag in CONSENT_FLAGS)

    def to_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {flag: getattr(self, flag) for flag in CONSENT_FLAGS}
        if self.updated_at is not None:
            document["updated_at"] = self.updated_at.isoformat()
        return document

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Consents:
        updated = document.get("updated_at")
        return cls(**{flag: bool(document.get(flag, False)) for flag in CONSENT_FLAGS},
                   updated_at=datetime.fromisoformat(updated) if updated else None)


@dataclass(frozen=True, slots=True)
class MemberFields:
    """What a caller may set on a member (CreateMember, UpdateMember), already type-converted."""

    external_id: str = ""
    channel: int = 0
    region: str = ""
    locale: str = ""
    gender: int = 0
    pii: Pii = field(default_factory=Pii)
    consents: Consents = field(default_factory=Consents)
    joined_at: datetime | None = None  # None: not sent


@dataclass(frozen=True, slots=True)
class Member:
    member_id: str
    status: int
    created_at: datetime
    updated_at: datetime
    joined_at: datetime
    external_id: str = ""
    merged_into_member_id: str = ""
    channel: int = 0
    region: str = ""
    locale: str = ""
    gender: int = 0
    pii: Pii = field(default_factory=Pii)
    consents: Consents = field(default_factory=Consents)
    erased_at: datetime | None = None
    merged_at: datetime | None = None
    version: int = 1
    pii_masked: bool = False

    @property
    def etag(self) -> str:
        return str(self.version)

    @property
    def birth_year(self) -> int | None:
        return int(self.pii.birth_date[:4]) if self.pii.birth_date else None


# ---- Creation and update -----------------------------------------------------------------------


def new_member(member_id: str, fields_: MemberFields, now: datetime) -> Member:
    """A member as CreateMember stores it (checked by check_fields first)."""
    return Member(
        member_id=member_id, status=STATUS.MEMBER_STATUS_ACTIVE, created_at=now, updated_at=now,
        joined_at=fields_.joined_at or now, external_id=fields_.external_id, channel=fields_.channel,
        region=fields_.region, locale=fields_.locale, gender=fields_.gender, pii=fields_.pii,
        # The consent state is recorded now, whatever its flags: that is when it last changed.
        consents=replace(fields_.consents, updated_at=now),
    )


def check_fields(fields_: MemberFields, now: datetime, paths: Iterable[str] | None = None,
                 prefix: str = "member.") -> list[FieldViolation]:
    """Rules the declarative validation cannot express: dates relative to now. `paths`: only the
    fields being set (an update), None for all of them (a create)."""
    checked = set(UPDATABLE_PATHS if paths is None else paths)
    violations: list[FieldViolation] = []
    if "joined_at" in checked and fields_.joined_at is not None:
        if fields_.joined_at > now + timedelta(seconds=JOINED_AT_SKEW_S_MAX):
            violations.append(FieldViolation(f"{prefix}joined_at", "must not be in the future"))
        elif fields_.joined_at < JOINED_AT_EARLIEST:
            violations.append(FieldViolation(f"{prefix}joined_at",
                                             f"must not be before {JOINED_AT_EARLIEST.date().isoformat()}"))
    if "birth_date" in checked and fields_.pii.birth_date:
        born = date.fromisoformat(fields_.pii.birth_date)  # the format was validated at the edge
        if born > now.date():
            violations.append(FieldViolation(f"{prefix}birth_date", "must not be in the future"))
        elif born < BIRTH_DATE_EARLIEST:
            violations.append(FieldViolation(f"{prefix}birth_date",
                                             f"must not be before {BIRTH_DATE_EARLIEST.isoformat()}"))
    return violations


def check_update_mask(paths: Iterable[str]) -> list[FieldViolation]:
    paths = list(paths)
    if not paths:
        return [FieldViolation("update_mask", "must name at least one field")]
    violations = []
    for path in paths:
        if path == "*":
            violations.append(FieldViolation("update_mask", '"*" is not accepted: name the fields to change'))
        elif path not in UPDATABLE_PATHS:
            violations.append(FieldViolation(
                "update_mask", f"{path!r} cannot be updated; updatable: {', '.join(sorted(UPDATABLE_PATHS))}"))
    return violations


def apply_update(member: Member, changes: MemberFields, paths: Iterable[str], now: datetime) -> Member:
    """The member after UpdateMember set the fields named by `paths` (checked by check_update_mask)."""
    paths = set(paths)
    values: dict[str, Any] = {}
    for name in ("external_id", "channel", "region", "locale", "gender"):
        if name in paths:
            values[name] = getattr(changes, name)
    if "joined_at" in paths:
        # Clearing joined_at restores the default: membership starts at creation.
        values["joined_at"] = changes.joined_at or member.created_at
    pii_values = {name: getattr(changes.pii, name) for name in PII_PATHS if name in paths}
    if pii_values:
        values["pii"] = member.pii.with_values(**pii_values)
    flags = CONSENT_FLAGS if "consents" in paths else [f for f in CONSENT_FLAGS if f"consents.{f}" in paths]
    consents = replace(member.consents, **{flag: getattr(changes.consents, flag) for flag in flags})
    if consents.flags() != member.consents.flags():
        values["consents"] = replace(consents, updated_at=now)
    return replace(member, **values, updated_at=now, version=member.version + 1)


def touches_pii(paths: Iterable[str]) -> bool:
    return not PII_PATHS.isdisjoint(paths)


# ---- Merge -------------------------------------------------------------------------------------

_FILLED_FROM_DUPLICATE = ("external_id", "channel", "region", "locale", "gender")


def merged_survivor(survivor: Member, duplicate: Member, now: datetime) -> Member:
    """The survivor's record after MergeMembers (profile_service.proto): survivor fields win, its
    empty fields (PII included) are filled from the duplicate, each consent takes the more
    restrictive value of the two (no consent wins), `joined_at` the earlier. Unchanged (same
    version) when the duplicate adds nothing."""
    values: dict[str, Any] = {
        name: getattr(duplicate, name) for name in _FILLED_FROM_DUPLICATE
        if not getattr(survivor, name) and getattr(duplicate, name)
    }
    filled_pii = {name: getattr(duplicate.pii, name) for name in PII_FIELDS
                  if not getattr(survivor.pii, name) and getattr(duplicate.pii, name)}
    if filled_pii:
        values["pii"] = survivor.pii.with_values(**filled_pii)
    both = {flag: getattr(survivor.consents, flag) and getattr(duplicate.consents, flag) for flag in CONSENT_FLAGS}
    consents = replace(survivor.consents, **both)
    if consents.flags() != survivor.consents.flags():
        values["consents"] = replace(consents, updated_at=now)
    if duplicate.joined_at < survivor.joined_at:
        values["joined_at"] = duplicate.joined_at
    if not values:
        return survivor
    return replace(survivor, **values, updated_at=now, version=survivor.version + 1)


def fills_pii(before: Member, after: Member) -> bool:
    return before.pii != after.pii


# ---- Unique keys -------------------------------------------------------------------------------


def unique_keys(member: Member, hash_key: bytes) -> dict[LookupKind, bytes]:
    """The member_keys rows a member holds: its external id as is, e-mail and phone as keyed hashes."""
    keys: dict[LookupKind, bytes] = {}
    if member.external_id:
        keys[LookupKind.EXTERNAL_ID] = member.external_id.encode()
    if member.pii.email:
        keys[LookupKind.EMAIL] = lookup_hash(hash_key, LookupKind.EMAIL, member.pii.email)
    if member.pii.phone:
        keys[LookupKind.PHONE] = lookup_hash(hash_key, LookupKind.PHONE, member.pii.phone)
    return keys


def lookup_key(kind: LookupKind, value: str, hash_key: bytes) -> bytes:
    return value.encode() if kind is LookupKind.EXTERNAL_ID else lookup_hash(hash_key, kind, value)


TAKEN_REASONS: dict[LookupKind, str] = {
    LookupKind.EXTERNAL_ID: "EXTERNAL_ID_TAKEN",
    LookupKind.EMAIL: "EMAIL_TAKEN",
    LookupKind.PHONE: "PHONE_TAKEN",
}


@dataclass(frozen=True, slots=True)
class KeyChanges:
    release: frozenset[LookupKind]
    claim: Mapping[LookupKind, bytes]


def key_changes(before: Mapping[LookupKind, bytes], after: Mapping[LookupKind, bytes]) -> KeyChanges:
    release = frozenset(kind for kind, key in before.items() if after.get(kind) != key)
    claim = {kind: key for kind, key in after.items() if before.get(kind) != key}
    return KeyChanges(release, claim)


# ---- What callers see --------------------------------------------------------------------------


def presented(member: Member, can_read_pii: bool, can_read_birth_month: bool = False) -> Member:
    """The member as a caller sees it: PII masked without `pii.read` (the birth month kept with
    `pii.birth_month`); an erased member has none."""
    if member.status == STATUS.MEMBER_STATUS_ERASED:
        return replace(member, pii=Pii(), pii_masked=True)
    if can_read_pii:
        return replace(member, pii_masked=False)
    return replace(member, pii=member.pii.masked(keep_birth_month=can_read_birth_month), pii_masked=True)


def tenure_days(joined_at: datetime, now: datetime) -> int:
    """Whole days from joining to now; 0 for a join date up to the allowed skew ahead."""
    return max(0, int((now - joined_at).total_seconds()) // SECONDS_PER_DAY)


_AGE_BANDS: tuple[tuple[int, int], ...] = (
    (18, AGE_BAND.AGE_BAND_UNDER_18),
    (25, AGE_BAND.AGE_BAND_18_TO_24),
    (35, AGE_BAND.AGE_BAND_25_TO_34),
    (45, AGE_BAND.AGE_BAND_35_TO_44),
    (55, AGE_BAND.AGE_BAND_45_TO_54),
    (65, AGE_BAND.AGE_BAND_55_TO_64),
)


def age_years(born: date, on: date) -> int:
    """Completed years of age on a date (a 29 February birthday counts on 1 March in other years)."""
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def age_band(birth_date: str, on: date) -> int:
    """The only form in which age leaves profile (member.proto AgeBand)."""
    if not birth_date:
        return AGE_BAND.AGE_BAND_UNSPECIFIED
    age = age_years(date.fromisoformat(birth_date), on)
    for upper, band in _AGE_BANDS:
        if age < upper:
            return band
    return AGE_BAND.AGE_BAND_65_AND_OVER


# ---- Erasure -----------------------------------------------------------------------------------


def anonymised_event_payload(payload: bytes) -> bytes:
    """A stored event (a serialized BehaviourEvent) without its device id and IP address: erasure
    keeps the behaviour and drops what points at a device or a network."""
    event = event_pb2.BehaviourEvent.FromString(payload)
    event.ClearField("device_id")
    event.ClearField("ip_address")
    return event.SerializeToString()


def anonymised_accrual_payload(payload: bytes) -> bytes:
    """A pending outbox accrual (a serialized rewards Accrual) without what points at a device, a
    network or an e-mail address: rewards still credits it, risk assesses it without them."""
    accrual = earning_pb2.Accrual.FromString(payload)
    for name in ("device_id", "ip", "email_domain"):
        accrual.ClearField(name)
    return accrual.SerializeToString()


def presented_event(event: event_pb2.BehaviourEvent, can_read_pii: bool) -> event_pb2.BehaviourEvent:
    """A stored event as a caller sees it: the IP address masked without `pii.read` (event.proto)."""
    if not can_read_pii and event.ip_address:
        event.ip_address = mask_ip(event.ip_address)
    return event
