"""Member use cases: each opens one transaction, applies the domain rules, and commits.

PII is sealed on the way in and opened on the way out; what a caller sees is decided here (masked
without `pii.read`). Every response that carries unmasked PII (or, for `pii.birth_month`, a birth
month) is written to the audit trail (libs.audit): one `pii.read` record per member disclosed, with
the RPC and the names of the fields shown, never their values. A mutation's own response is recorded
in the mutation's transaction; a read opens a short transaction for its records, before the answer
leaves. Erasure, merges, key rotation and consent or PII changes (UpdateMember) are recorded inside
the request-id callback, so a replay adds no second record of the change.

Request ids (AIP-155) never store PII: libs.idempotency keeps the first response of a request id,
so the mutations record a receipt (the member id) and the response is rebuilt from the database for
the caller at hand. A replay by a caller without `pii.read` thus sees masked data even when the first
call was made by one with it, and the table of stored responses holds no personal data. The payload
digest is taken over the request with its PII replaced by keyed fingerprints, so the stored digest
cannot confirm a guessed e-mail address either.

Erasure reaches everything that still ties behaviour to a person: the member's PII and unique keys,
the device ids and IP addresses of its events, the payloads of its outbox rows (pending accruals
lose their device id and IP address, delivered rows are emptied), and the members merged into it
(their PII is shredded too: a merged member is erased through its survivor).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf.message import Message
from opentelemetry import propagate

from libs import audit, errors
from libs.db import DbConnection
from libs.errors import FieldViolation
from libs.idempotency import run_once, stored_response
from loyalty.profile.v1 import member_pb2, profile_service_pb2
from services.profile.adapters import members_repo as repo
from services.profile.adapters.members_repo import MemberFilter, StoredMember
from services.profile.adapters.pii_keys import KeyRingFile
from services.profile.domain import members as rules
from services.profile.domain.members import Consents, Member, MemberFields
from services.profile.domain.pii import (
    PII_FIELDS,
    KeyRing,
    LookupKind,
    Pii,
    PiiIntegrityError,
    SealedPii,
    UnknownKeyIdError,
    WrappedKey,
    fingerprint,
    new_data_key,
    open_pii,
    rewrap_data_key,
    seal_pii,
    unwrap_data_key,
    wrap_data_key,
)
from services.profile.service_layer.merge import merge_members

log = logging.getLogger(__name__)
# The trail (libs.audit) is the record; the `loyalty.audit` log lines of disclosures stay for log
# pipelines (ids only, never values).
audit_log = logging.getLogger("loyalty.audit")
AUDIT_SERVICE = "profile"

SERVICE = "/loyalty.profile.v1.ProfileService"
STATUS = member_pb2.MemberStatus
OUTBOX_KIND_MEMBER_ERASED = profile_service_pb2.OUTBOX_MESSAGE_KIND_MEMBER_ERASED
# Outbox rows whose payload is a rewards Accrual (which carries the event's device id and IP address).
OUTBOX_ACCRUAL_KINDS = (profile_service_pb2.OUTBOX_MESSAGE_KIND_ACCRUAL,
                        profile_service_pb2.OUTBOX_MESSAGE_KIND_REVERSAL)

# Limits, units last.
PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1_000
ROTATE_MEMBERS_DEFAULT = 10_000
# Members re-wrapped per transaction: short transactions, locks released often, progress kept.
ROTATE_BATCH_MAX = 1_000
# Events anonymised per statement during an erasure: bounded memory for members with long histories.
ERASE_EVENTS_BATCH_MAX = 5_000
# Pending outbox rows scrubbed per statement during an erasure.
ERASE_OUTBOX_BATCH_MAX = 5_000

RequestT = TypeVar("RequestT", bound=Message)


@dataclass(frozen=True, slots=True)
class Reader:
    """Who is asking, and whether they may see PII in clear."""

    principal: str
    can_read_pii: bool
    can_read_birth_month: bool = False  # `pii.birth_month`: the month of the birth date, nothing else


@dataclass(frozen=True, slots=True)
class MergeResult:
    survivor: Member
    duplicate: Member
    events_moved: int
    conflicting_orders: int


def utc_now() -> datetime:
    return datetime.now(UTC)


class MembersService:
    def __init__(self, pool: Callable[[], asyncpg.Pool], keys: KeyRingFile,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self._pool = pool
        self.keys = keys
        self.clock = clock

    # ---- reading -------------------------------------------------------------------------------

    async def get(self, member_id: str, reader: Reader) -> Member:
        async with self._pool().acquire() as connection:
            stored = await repo.fetch_member(connection, member_id)
        if stored is None:
            raise _member_not_found(member_id)
        return (await self._present([self._open(stored)], reader, "GetMember"))[0]

    async def get_unmerged(self, member_id: str, reader: Reader, rpc: str) -> Member:
        """A member that still holds its own behaviour. A merged member's events and aggregates live
        on its survivor: FAILED_PRECONDITION (MEMBER_MERGED) naming the survivor, so the caller asks
        for it rather than reading an empty history under the old id."""
        async with self._pool().acquire() as connection:
            stored = await repo.fetch_member(connection, member_id)
        if stored is None:
            raise _member_not_found(member_id)
        if stored.status == STATUS.MEMBER_STATUS_MERGED:
            raise errors.failed_precondition(
                f"the member was merged into {stored.merged_into_member_id!r}: ask for the survivor",
                reason="MEMBER_MERGED", member_id=member_id,
                merged_into_member_id=stored.merged_into_member_id or "")
        return (await self._present([self._open(stored)], reader, rpc))[0]

    async def batch_get(self, member_ids: Sequence[str], reader: Reader) -> tuple[list[Member], list[str]]:
        """Found members in request order, and the ids that do not exist."""
        async with self._pool().acquire() as connection:
            found = await repo.fetch_members(connection, member_ids)
        members = [self._open(found[member_id]) for member_id in member_ids if member_id in found]
        missing = [member_id for member_id in member_ids if member_id not in found]
        return await self._present(members, reader, "BatchGetMembers"), missing

    async def list_page(self, where: MemberFilter, page_size: int, page_token: str, reader: Reader
                        ) -> tuple[list[Member], str]:
        """One page, oldest first, and the token of the next page ("" on the last one)."""
        if (where.created_after is not None and where.created_before is not None
                and where.created_before <= where.created_after):
            raise errors.invalid_argument([FieldViolation("created_before", "must be later than created_after")])
        after = decode_page_token(page_token, where) if page_token else None
        limit = min(page_size or PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX)
        async with self._pool().acquire() as connection:
            # One row more than the page tells whether another page follows, without a count.
            rows = await repo.list_members(connection, where, after, limit + 1)
        page = rows[:limit]
        next_token = encode_page_token(where, page[-1]) if len(rows) > limit else ""
        return await self._present([self._open(stored) for stored in page], reader, "ListMembers"), next_token

    async def lookup(self, kind: LookupKind, value: str, reader: Reader) -> Member:
        ring = self.keys.current()
        key = rules.lookup_key(kind, value, ring.lookup_hash_key)
        async with self._pool().acquire() as connection:
            stored = await repo.find_key_holder(connection, kind, key)
        if stored is None:
            # Name the kind of key, never an e-mail or a phone number: error messages reach logs.
            what = kind.name.lower()
            metadata = {"key": what} | ({"external_id": value} if kind is LookupKind.EXTERNAL_ID else {})
            raise errors.LoyaltyError(grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND",
                                      f"no member holds this {what.replace('_', ' ')}", metadata=metadata)
        return (await self._present([self._open(stored)], reader, "LookupMember"))[0]

    # ---- writing -------------------------------------------------------------------------------

    async def create(self, request: profile_service_pb2.CreateMemberRequest, fields: MemberFields,
                     reader: Reader) -> Member:
        now = self.clock()
        violations = rules.check_fields(fields, now)
        if violations:
            raise errors.invalid_argument(violations)
        ring = self.keys.current()
        created: list[Member] = []
        async with self._pool().acquire() as connection, connection.transaction():
            async def mutate() -> profile_service_pb2.CreateMemberResponse:
                member = rules.new_member(request.member.member_id or str(uuid.uuid4()), fields, now)
                keys = rules.unique_keys(member, ring.lookup_hash_key)
                sealed, dek = _seal_new(ring, member)
                if not await repo.insert_member(connection, _stored(member, sealed, dek, keys)):
                    raise errors.already_exists("member_id is taken by another member", reason="MEMBER_ID_TAKEN",
                                                member_id=member.member_id)
                await _claim(connection, member.member_id, keys)
                created.append(member)
                return _receipt(profile_service_pb2.CreateMemberResponse, member.member_id)

            receipt = await run_once(connection, self._method("CreateMember", reader), request.request_id,
                                     _without_pii(request, ring), profile_service_pb2.CreateMemberResponse, mutate)
            member = created[0] if created else await self._reread(connection, receipt.member.member_id)
            return (await self._present([member], reader, "CreateMember", connection))[0]

    async def update(self, request: profile_service_pb2.UpdateMemberRequest, changes: MemberFields,
                     paths: Sequence[str], reader: Reader) -> Member:
        member_id, etag = request.member.member_id, request.member.etag
        now = self.clock()
        violations = rules.check_update_mask(paths) + rules.check_fields(changes, now, paths)
        if not member_id:
            violations.insert(0, FieldViolation("member.member_id", "is required"))
        if violations:
            raise errors.invalid_argument(violations)
        ring = self.keys.current()
        updated: list[Member] = []
        async with self._pool().acquire() as connection, connection.transaction():
            async def mutate() -> profile_service_pb2.UpdateMemberResponse:
                # NO KEY UPDATE: event batches reading the member (KEY SHARE) are not held up.
                stored = await repo.fetch_member(connection, member_id, lock="FOR NO KEY UPDATE")
                _require_changeable(stored, member_id)
                assert stored is not None
                if etag and etag != str(stored.version):
                    raise errors.failed_precondition("the member changed since it was read (stale etag)",
                                                     reason="ETAG_MISMATCH", member_id=member_id)
                before = self._open(stored)
                after = rules.apply_update(before, changes, paths, now)
                keys_before = rules.unique_keys(before, ring.lookup_hash_key)
                keys_after = rules.unique_keys(after, ring.lookup_hash_key)
                moves = rules.key_changes(keys_before, keys_after)
                await repo.release_keys(connection, member_id, sorted(moves.release))
                await _claim(connection, member_id, moves.claim)
                sealed, dek = (self._reseal(ring, stored, after) if rules.touches_pii(paths)
                               else (stored.pii, stored.dek))
                await repo.update_member(connection, _stored(after, sealed, dek, keys_after), stored.version)
                updated.append(after)
                if rules.touches_pii(paths) or any(p == "consents" or p.startswith("consents.") for p in paths):
                    await audit.record(connection, AUDIT_SERVICE, audit.Change(
                        action="member.update", resource_type="member", resource_id=member_id, member_id=member_id,
                        request_id=request.request_id, before=_update_summary(before, paths),
                        after=_update_summary(after, paths)))
                return _receipt(profile_service_pb2.UpdateMemberResponse, member_id)

            receipt = await run_once(connection, self._method("UpdateMember", reader), request.request_id,
                                     _without_pii(request, ring), profile_service_pb2.UpdateMemberResponse, mutate)
            member = updated[0] if updated else await self._reread(connection, receipt.member.member_id)
            return (await self._present([member], reader, "UpdateMember", connection))[0]

    async def erase(self, request: profile_service_pb2.EraseMemberRequest, reader: Reader) -> tuple[Member, int]:
        """Crypto-shred a member's PII; returns the erased member and how many events lost their
        device id and IP address."""
        member_id = request.member_id
        now = self.clock()
        scrubbed: list[int] = []
        merged_erased: list[int] = []
        async with self._pool().acquire() as connection, connection.transaction():
            async def mutate() -> profile_service_pb2.EraseMemberResponse:
                # FOR UPDATE (not NO KEY): waits for event batches holding the member, so no event with
                # a device id or IP address can commit for it after the scrub below.
                stored = await repo.fetch_member(connection, member_id, lock="FOR UPDATE")
                if stored is None:
                    raise _member_not_found(member_id)
                if stored.status == STATUS.MEMBER_STATUS_MERGED:
                    raise errors.failed_precondition("a merged member is erased through its survivor",
                                                     reason="MEMBER_MERGED", member_id=member_id,
                                                     merged_into_member_id=stored.merged_into_member_id or "")
                # The person's merged accounts are erased with it (they cannot be erased on their own).
                merged = await repo.merged_into(connection, member_id)
                to_shred = ([member_id] if stored.status != STATUS.MEMBER_STATUS_ERASED else []) + [
                    other for other, status in merged if status != STATUS.MEMBER_STATUS_ERASED]
                for shredded in to_shred:
                    await repo.shred_member(connection, shredded, now)
                # Scrubbed on a repeat as well: cheap when there is nothing left, and it heals anything
                # that slipped in. Events all live on this member (merges moved them here).
                anonymised = await _anonymise_events(connection, member_id)
                scrubbed.append(await _scrub_outbox(connection, [member_id, *(other for other, _ in merged)]))
                for shredded in to_shred:
                    await repo.insert_outbox(connection, shredded, OUTBOX_KIND_MEMBER_ERASED, b"",
                                             _trace_context())
                merged_erased.append(len(to_shred) - (member_id in to_shred))
                response = _receipt(profile_service_pb2.EraseMemberResponse, member_id)
                response.events_anonymised = anonymised
                await audit.record(connection, AUDIT_SERVICE, audit.Change(
                    action="member.erase", resource_type="member", resource_id=member_id, member_id=member_id,
                    request_id=request.request_id,
                    before={"status": _status_name(stored.status), "version": stored.version},
                    after={"status": STATUS.Name(STATUS.MEMBER_STATUS_ERASED),
                           "reason": profile_service_pb2.ErasureReason.Name(request.reason),
                           "events_anonymised": anonymised, "outbox_rows_scrubbed": scrubbed[-1],
                           "merged_members_erased": sorted(other for other in to_shred if other != member_id)}))
                return response

            receipt = await run_once(connection, self._method("EraseMember", reader), request.request_id, request,
                                     profile_service_pb2.EraseMemberResponse, mutate)
            member = await self._reread(connection, member_id)
            shown = (await self._present([member], reader, "EraseMember", connection))[0]
        log.info("member erased", extra={"member_id": member_id, "erasure_reason": request.reason,
                                         "events_anonymised": receipt.events_anonymised,
                                         "outbox_rows_scrubbed": sum(scrubbed),
                                         "merged_members_erased": sum(merged_erased)})
        return shown, receipt.events_anonymised

    async def merge(self, request: profile_service_pb2.MergeMembersRequest, reader: Reader) -> MergeResult:
        """Fold the duplicate into the survivor in one transaction (service_layer.merge moves the
        behaviour; the member records are folded here), recorded under the request id. Only ids and
        counts are recorded: a replay re-reads both members for the caller at hand."""
        survivor_id, duplicate_id = request.survivor_member_id, request.duplicate_member_id
        if survivor_id == duplicate_id:
            raise errors.failed_precondition("a member cannot be merged into itself", reason="SAME_MEMBER",
                                             member_id=survivor_id)
        now = self.clock()
        async with self._pool().acquire() as connection, connection.transaction():
            async def mutate() -> profile_service_pb2.MergeMembersResponse:
                # Locked in member_id order, as merge_members locks them: both calls agree on the order.
                before = await repo.fetch_members(connection, [survivor_id, duplicate_id], lock="FOR UPDATE")
                outcome = await merge_members(connection, survivor_id, duplicate_id, request.request_id,
                                              reader.principal)
                # Both exist (merge_members refused otherwise); a duplicate already merged into this
                # survivor (by another request id) was folded then.
                if before[duplicate_id].status != STATUS.MEMBER_STATUS_MERGED:
                    await self._fold_records(connection, before[survivor_id], before[duplicate_id], now)
                await audit.record(connection, AUDIT_SERVICE, audit.Change(
                    action="member.merge", resource_type="member", resource_id=duplicate_id, member_id=survivor_id,
                    request_id=request.request_id,
                    before={"survivor_member_id": survivor_id, "duplicate_member_id": duplicate_id,
                            "duplicate_status": _status_name(before[duplicate_id].status),
                            "duplicate_merged_into": before[duplicate_id].merged_into_member_id or ""},
                    after={"survivor_member_id": survivor_id, "duplicate_member_id": duplicate_id,
                           "duplicate_status": STATUS.Name(STATUS.MEMBER_STATUS_MERGED),
                           "events_moved": outcome.events_moved, "conflicting_orders": outcome.conflicting_orders}))
                return profile_service_pb2.MergeMembersResponse(
                    survivor=member_pb2.Member(member_id=survivor_id),
                    duplicate=member_pb2.Member(member_id=duplicate_id),
                    events_moved=outcome.events_moved, conflicting_orders=outcome.conflicting_orders)

            receipt = await run_once(connection, self._method("MergeMembers", reader), request.request_id, request,
                                      profile_service_pb2.MergeMembersResponse, mutate)
            survivor = await self._reread(connection, receipt.survivor.member_id)
            duplicate = await self._reread(connection, receipt.duplicate.member_id)
            shown = await self._present([survivor, duplicate], reader, "MergeMembers", connection)
        log.info("members merged", extra={"survivor_member_id": survivor_id, "duplicate_member_id": duplicate_id,
                                          "events_moved": receipt.events_moved,
                                          "conflicting_orders": receipt.conflicting_orders})
        return MergeResult(shown[0], shown[1], receipt.events_moved, receipt.conflicting_orders)

    async def _fold_records(self, connection: DbConnection, survivor: StoredMember, duplicate: StoredMember,
                            now: datetime) -> None:
        """The member-record half of a merge (profile_service.proto MergeMembers): the duplicate's
        unique keys pass to the survivor, whose empty fields are filled from the duplicate. The
        duplicate keeps its own record and PII (it is MERGED, not erased)."""
        await repo.move_keys(connection, duplicate.member_id, survivor.member_id)
        before = self._open(survivor)
        after = rules.merged_survivor(before, self._open(duplicate), now)
        if after is before:
            return
        ring = self.keys.current()
        sealed, dek = (self._reseal(ring, survivor, after) if rules.fills_pii(before, after)
                       else (survivor.pii, survivor.dek))
        # Its own keys (a filled e-mail or phone is the duplicate's, just moved to it) name the columns.
        keys = rules.unique_keys(after, ring.lookup_hash_key)
        await repo.update_member(connection, _stored(after, sealed, dek, keys), survivor.version)

    async def rotate(self, request: profile_service_pb2.RotateEncryptionKeysRequest, reader: Reader
                     ) -> profile_service_pb2.RotateEncryptionKeysResponse:
        """Re-wrap data keys under the target KEK in short transactions (SKIP LOCKED), then record
        the result under the request id. Concurrent duplicates may both work, harmlessly: a member
        already under the target key is never touched again, and the first recorded result wins."""
        ring = self.keys.reload()  # an operator adds a key to the file, then rotates: no restart
        target = request.new_key_id or ring.active_key_id
        if target not in ring.keks:
            raise errors.failed_precondition(f"key id {target!r} is not configured in the PII key ring",
                                             reason="UNKNOWN_KEY_ID", key_id=target)
        method = self._method("RotateEncryptionKeys", reader)
        response_type = profile_service_pb2.RotateEncryptionKeysResponse
        async with self._pool().acquire() as connection:
            previous = await stored_response(connection, method, request.request_id, request)
            if previous is not None:
                return response_type.FromString(previous)
            budget = request.max_members or ROTATE_MEMBERS_DEFAULT
            started = time.perf_counter()
            rewrapped = 0
            while not request.dry_run and rewrapped < budget:
                async with connection.transaction():
                    batch = await repo.lock_keys_not_under(connection, target, min(ROTATE_BATCH_MAX,
                                                                                   budget - rewrapped))
                    if not batch:
                        break
                    moved = [(member_id, _rewrap(ring, key, member_id, target), key.kek_id)
                             for member_id, key in batch]
                    rewrapped += await repo.store_wrapped_keys(connection, moved)
            elapsed_s = time.perf_counter() - started
            async with connection.transaction():
                usage = await repo.key_usage(connection)
                usage.setdefault(target, 0)
                response = response_type(
                    key_id=target, members_reencrypted=rewrapped,
                    members_remaining=sum(count for key_id, count in usage.items() if key_id != target),
                    key_usage=[profile_service_pb2.KeyUsage(key_id=key_id, members=usage[key_id])
                               for key_id in sorted(usage)],
                )
                response.elapsed.FromNanoseconds(int(elapsed_s * 1e9))

                async def record() -> profile_service_pb2.RotateEncryptionKeysResponse:
                    if not request.dry_run:  # a dry run changes nothing: no record
                        await audit.record(connection, AUDIT_SERVICE, audit.Change(
                            action="pii_keys.rotate", resource_type="pii_key", resource_id=target,
                            request_id=request.request_id,
                            before={"members_not_under_key": response.members_remaining + rewrapped},
                            after={"key_id": target, "members_reencrypted": rewrapped,
                                   "members_remaining": response.members_remaining,
                                   "key_usage": {u.key_id: u.members for u in response.key_usage}}))
                    return response

                result = await run_once(connection, method, request.request_id, request, response_type, record)
        log.info("PII keys rotated", extra={"key_id": target, "members_reencrypted": rewrapped,
                                            "members_remaining": result.members_remaining,
                                            "dry_run": request.dry_run})
        return result

    # ---- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _method(rpc: str, reader: Reader) -> str:
        # Request ids are scoped to the RPC and the calling service (profile_service.proto).
        return f"{SERVICE}/{rpc}#{reader.principal}"

    def _open(self, stored: StoredMember) -> Member:
        pii = Pii()
        if stored.pii is not None and stored.dek is not None:
            with _pii_failures(stored.member_id):
                ring = self.keys.containing(stored.dek.kek_id)
                dek = unwrap_data_key(ring, stored.dek, stored.member_id)
                pii = open_pii(dek, stored.pii, stored.member_id)
        return Member(
            member_id=stored.member_id, status=stored.status, created_at=stored.created_at,
            updated_at=stored.updated_at, joined_at=stored.joined_at, external_id=stored.external_id or "",
            merged_into_member_id=stored.merged_into_member_id or "", channel=stored.channel, region=stored.region,
            locale=stored.locale, gender=stored.gender, pii=pii, consents=Consents.from_document(stored.consents),
            erased_at=stored.erased_at, merged_at=stored.merged_at, version=stored.version,
        )

    async def _reread(self, connection: DbConnection, member_id: str) -> Member:
        stored = await repo.fetch_member(connection, member_id)
        if stored is None:
            raise _member_not_found(member_id)
        return self._open(stored)

    def _reseal(self, ring: KeyRing, stored: StoredMember, member: Member
                ) -> tuple[SealedPii | None, WrappedKey | None]:
        """Encrypt changed PII under the member's own data key (a new one if it never had PII)."""
        if stored.dek is None:
            return _seal_new(ring, member)
        with _pii_failures(member.member_id):
            dek = unwrap_data_key(self.keys.containing(stored.dek.kek_id), stored.dek, member.member_id)
        return seal_pii(dek, member.pii, member.member_id), stored.dek

    async def _present(self, members: list[Member], reader: Reader, rpc: str,
                       connection: DbConnection | None = None) -> list[Member]:
        """Members as `reader` may see them. Each member whose unmasked PII (or birth month) the
        answer carries gets one audit record, in `connection`'s transaction when the answer is a
        mutation's, else in a short one of its own: the answer never leaves unrecorded."""
        shown = [rules.presented(member, reader.can_read_pii, reader.can_read_birth_month) for member in members]
        disclosures = [_disclosure(member, rpc, "pii.read", [name for name in PII_FIELDS if getattr(member.pii, name)])
                       for member in shown if not member.pii_masked and not member.pii.is_empty()]
        if not reader.can_read_pii and reader.can_read_birth_month:
            disclosures += [_disclosure(member, rpc, "pii.birth_month", ["birth_month"])
                            for member in shown if member.pii.birth_date]
        if disclosures:
            for action, line in (("pii.read", "pii disclosed"), ("pii.birth_month", "birth month disclosed")):
                ids = [change.member_id for change in disclosures if change.action == action]
                if ids:
                    audit_log.info(line, extra={"audit_action": action, "principal": reader.principal, "rpc": rpc,
                                                "member_ids": ids})
            if connection is not None:
                await audit.record_many(connection, AUDIT_SERVICE, disclosures)
            else:
                async with self._pool().acquire() as own, own.transaction():
                    await audit.record_many(own, AUDIT_SERVICE, disclosures)
        return shown


# ---- module helpers ----------------------------------------------------------------------------


def _status_name(status: int) -> str:
    return STATUS.Name(status)  # type: ignore[arg-type]


def _update_summary(member: Member, paths: Sequence[str]) -> dict[str, Any]:
    """An UpdateMember's side of the audit record: the version, the consent flags, and which PII
    fields hold a value (names only: the trail never holds PII)."""
    return {"version": member.version, "paths": sorted(paths),
            "consents": {flag: getattr(member.consents, flag) for flag in rules.CONSENT_FLAGS},
            "pii_fields_set": [name for name in PII_FIELDS if getattr(member.pii, name)]}


def _disclosure(member: Member, rpc: str, action: str, fields: list[str]) -> audit.Change:
    """What the trail keeps of one member's PII in an answer: who, which RPC, which fields (names)."""
    return audit.Change(action=action, resource_type="member", resource_id=member.member_id,
                        member_id=member.member_id, after={"rpc": rpc, "fields": fields})


def _member_not_found(member_id: str) -> errors.LoyaltyError:
    return errors.not_found("member", member_id, reason="MEMBER_NOT_FOUND")


def _require_changeable(stored: StoredMember | None, member_id: str) -> None:
    if stored is None:
        raise _member_not_found(member_id)
    if stored.status == STATUS.MEMBER_STATUS_ERASED:
        raise errors.failed_precondition("an erased member cannot change", reason="MEMBER_ERASED",
                                         member_id=member_id)
    if stored.status == STATUS.MEMBER_STATUS_MERGED:
        raise errors.failed_precondition("a merged member cannot change: update its survivor",
                                         reason="MEMBER_MERGED", member_id=member_id,
                                         merged_into_member_id=stored.merged_into_member_id or "")


@contextlib.contextmanager
def _pii_failures(member_id: str) -> Iterator[None]:
    """Key-ring and integrity failures as errors a caller (and an operator) can act on."""
    try:
        yield
    except UnknownKeyIdError as error:
        raise errors.failed_precondition(
            f"the key that protects this member's PII ({error.key_id!r}) is not configured",
            reason="UNKNOWN_KEY_ID", key_id=error.key_id, member_id=member_id) from None
    except PiiIntegrityError:
        log.error("PII does not authenticate", extra={"member_id": member_id})
        raise errors.LoyaltyError(grpc.StatusCode.DATA_LOSS, "PII_INTEGRITY",
                                  "stored personal data does not authenticate", metadata={"member_id": member_id}
                                  ) from None


def _seal_new(ring: KeyRing, member: Member) -> tuple[SealedPii | None, WrappedKey | None]:
    """A fresh data key for a member with PII; a member without any gets neither key nor blob."""
    if member.pii.is_empty():
        return None, None
    dek = new_data_key()
    return seal_pii(dek, member.pii, member.member_id), wrap_data_key(ring, dek, member.member_id)


def _rewrap(ring: KeyRing, key: WrappedKey, member_id: str, target: str) -> WrappedKey:
    with _pii_failures(member_id):
        return rewrap_data_key(ring, key, member_id, target)


def _stored(member: Member, sealed: SealedPii | None, dek: WrappedKey | None,
            keys: dict[LookupKind, bytes]) -> StoredMember:
    return StoredMember(
        member_id=member.member_id, external_id=member.external_id or None, status=member.status,
        merged_into_member_id=member.merged_into_member_id or None, channel=member.channel, region=member.region,
        locale=member.locale, gender=member.gender, birth_year=member.birth_year,
        consents=member.consents.to_document(), joined_at=member.joined_at, created_at=member.created_at,
        updated_at=member.updated_at, erased_at=member.erased_at, merged_at=member.merged_at,
        version=member.version, pii=sealed, dek=dek, email_hash=keys.get(LookupKind.EMAIL),
        phone_hash=keys.get(LookupKind.PHONE),
    )


async def _claim(connection: DbConnection, member_id: str, keys: Mapping[LookupKind, bytes]) -> None:
    taken = await repo.claim_keys(connection, member_id, keys)
    if taken:
        kind = min(taken)
        what = kind.name.lower()
        # The message names the field, never its value (an e-mail must not reach a log line).
        raise errors.already_exists(f"{what.replace('_', ' ')} is held by another member",
                                    reason=rules.TAKEN_REASONS[kind], field=f"member.{what}")


async def _anonymise_events(connection: DbConnection, member_id: str) -> int:
    anonymised = 0
    after = ""
    while True:
        batch = await repo.events_to_anonymise(connection, member_id, after, ERASE_EVENTS_BATCH_MAX)
        if not batch:
            return anonymised
        payloads = [rules.anonymised_event_payload(payload) for _, payload in batch]
        anonymised += await repo.store_anonymised_events(connection, member_id, [i for i, _ in batch], payloads)
        after = batch[-1][0]


async def _scrub_outbox(connection: DbConnection, member_ids: Sequence[str]) -> int:
    """Pending accruals lose their device id and IP address (rewards still credits them); then
    delivered rows, whatever their kind, lose their payload. Pending first: a row the relay
    delivers meanwhile is skipped by the first step and emptied by the second."""
    scrubbed = 0
    after = 0
    while True:
        batch = await repo.pending_outbox_to_scrub(connection, member_ids, OUTBOX_ACCRUAL_KINDS, after,
                                                   ERASE_OUTBOX_BATCH_MAX)
        if not batch:
            break
        changed = [(owner, row_id, clean) for owner, row_id, payload in batch
                   if (clean := rules.anonymised_accrual_payload(payload)) != payload]
        scrubbed += await repo.store_outbox_payloads(connection, changed)
        after = batch[-1][1]
    return scrubbed + await repo.blank_delivered_outbox(connection, member_ids)


def _trace_context() -> str:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return json.dumps(carrier)


ReceiptT = TypeVar("ReceiptT", profile_service_pb2.CreateMemberResponse, profile_service_pb2.UpdateMemberResponse,
                   profile_service_pb2.EraseMemberResponse)


def _receipt(response_type: type[ReceiptT], member_id: str) -> ReceiptT:
    """What a request id records: the member id, never its PII (see the module docstring)."""
    return response_type(member=member_pb2.Member(member_id=member_id))


def _without_pii(request: RequestT, ring: KeyRing) -> RequestT:
    """The request as its payload digest sees it: PII values replaced by keyed fingerprints."""
    copy = type(request)()
    copy.CopyFrom(request)
    member: Any = copy.member  # type: ignore[attr-defined]
    for name in PII_FIELDS:
        value = getattr(member, name)
        if value:
            setattr(member, name, fingerprint(ring.lookup_hash_key, name, value))
    return copy


# ---- page tokens -------------------------------------------------------------------------------

_PAGE_TOKEN_VERSION = 1


def _filter_digest(where: MemberFilter) -> str:
    shape = [where.region, where.channel, where.status,
             where.created_after.isoformat() if where.created_after else None,
             where.created_before.isoformat() if where.created_before else None]
    return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]


def encode_page_token(where: MemberFilter, last: StoredMember) -> str:
    """Opaque to callers: the keyset position after `last`, bound to the filters it was made for."""
    document = {"v": _PAGE_TOKEN_VERSION, "f": _filter_digest(where), "t": last.created_at.isoformat(),
                "m": last.member_id}
    return base64.urlsafe_b64encode(json.dumps(document, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_page_token(token: str, where: MemberFilter) -> tuple[datetime, str]:
    try:
        document = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if document["v"] != _PAGE_TOKEN_VERSION:
            raise ValueError("version")
        position = (datetime.fromisoformat(document["t"]), str(document["m"]))
        digest = str(document["f"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise errors.invalid_argument([FieldViolation("page_token", "is not a page token of ListMembers")],
                                      reason="INVALID_PAGE_TOKEN") from None
    if position[0].tzinfo is None:
        raise errors.invalid_argument([FieldViolation("page_token", "is not a page token of ListMembers")],
                                      reason="INVALID_PAGE_TOKEN")
    if digest != _filter_digest(where):
        raise errors.invalid_argument(
            [FieldViolation("page_token", "was issued for other filters: send the same filters, or no token")],
            reason="PAGE_TOKEN_MISMATCH")
    return position
