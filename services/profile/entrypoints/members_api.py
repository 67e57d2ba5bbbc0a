"""Member RPCs of ProfileService (create, read, update, list, look up, erase, merge, rotate keys):
protobuf in, use case, protobuf out. Requests reach these handlers already authenticated and validated."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from libs import errors
from libs.auth import current_principal
from libs.errors import FieldViolation
from libs.server import Runtime
from loyalty.profile.v1 import member_pb2
from loyalty.profile.v1 import profile_service_pb2 as pb
from services.profile.adapters.members_repo import MemberFilter
from services.profile.adapters.pii_keys import KeyRingFile
from services.profile.domain.members import CONSENT_FLAGS, Consents, Member, MemberFields, tenure_days
from services.profile.domain.pii import LookupKind, Pii
from services.profile.service_layer.members import MembersService, Reader, utc_now
from services.profile.settings import get_profile_settings

PII_SCOPE = "pii.read"
BIRTH_MONTH_SCOPE = "pii.birth_month"
_LOOKUP_KINDS = {"external_id": LookupKind.EXTERNAL_ID, "email": LookupKind.EMAIL, "phone": LookupKind.PHONE}


class MembersApi:
    runtime: Runtime
    _members: MembersService | None = None

    @property
    def members(self) -> MembersService:
        """The member use cases, built on first use (the key ring is read then, created if missing)."""
        if self._members is None:
            settings = get_profile_settings()
            keys = KeyRingFile(settings.pii_keys_path(self.runtime.settings.state_dir), settings.creates_pii_keys)
            self._members = MembersService(lambda: self.runtime.pool, keys)
        return self._members

    async def CreateMember(self, request: pb.CreateMemberRequest, context: Any) -> pb.CreateMemberResponse:
        member = await self.members.create(request, member_fields(request.member), current_reader())
        return pb.CreateMemberResponse(member=member_message(member))

    async def GetMember(self, request: pb.GetMemberRequest, context: Any) -> pb.GetMemberResponse:
        member = await self.members.get(request.member_id, current_reader())
        return pb.GetMemberResponse(member=member_message(member))

    async def BatchGetMembers(self, request: pb.BatchGetMembersRequest, context: Any) -> pb.BatchGetMembersResponse:
        found, missing = await self.members.batch_get(list(request.member_ids), current_reader())
        now = utc_now()
        return pb.BatchGetMembersResponse(members=[member_message(m, now) for m in found], missing_member_ids=missing)

    async def UpdateMember(self, request: pb.UpdateMemberRequest, context: Any) -> pb.UpdateMemberResponse:
        paths = list(request.update_mask.paths)
        member = await self.members.update(request, member_fields(request.member), paths, current_reader())
        return pb.UpdateMemberResponse(member=member_message(member))

    async def ListMembers(self, request: pb.ListMembersRequest, context: Any) -> pb.ListMembersResponse:
        where = MemberFilter(
            region=request.region, channel=request.channel, status=request.status,
            created_after=(_datetime(request.created_after, "created_after")
                           if request.HasField("created_after") else None),
            created_before=(_datetime(request.created_before, "created_before")
                            if request.HasField("created_before") else None),
        )
        members, next_token = await self.members.list_page(where, request.page_size, request.page_token,
                                                           current_reader())
        now = utc_now()
        return pb.ListMembersResponse(members=[member_message(m, now) for m in members], next_page_token=next_token)

    async def LookupMember(self, request: pb.LookupMemberRequest, context: Any) -> pb.LookupMemberResponse:
        key = request.WhichOneof("key")
        assert key is not None  # the oneof is required: validated before the handler runs
        member = await self.members.lookup(_LOOKUP_KINDS[key], getattr(request, key), current_reader())
        return pb.LookupMemberResponse(member=member_message(member))

    async def EraseMember(self, request: pb.EraseMemberRequest, context: Any) -> pb.EraseMemberResponse:
        member, anonymised = await self.members.erase(request, current_reader())
        return pb.EraseMemberResponse(member=member_message(member), events_anonymised=anonymised)

    async def MergeMembers(self, request: pb.MergeMembersRequest, context: Any) -> pb.MergeMembersResponse:
        merged = await self.members.merge(request, current_reader())
        now = utc_now()
        return pb.MergeMembersResponse(survivor=member_message(merged.survivor, now),
                                       duplicate=member_message(merged.duplicate, now),
                                       events_moved=merged.events_moved, conflicting_orders=merged.conflicting_orders)

    async def RotateEncryptionKeys(self, request: pb.RotateEncryptionKeysRequest, context: Any
                                   ) -> pb.RotateEncryptionKeysResponse:
        return await self.members.rotate(request, current_reader())


def current_reader() -> Reader:
    """The caller of the RPC being served, as the member use cases need it."""
    principal = current_principal.get()
    if principal is None:
        return Reader(principal="", can_read_pii=False)
    return Reader(principal=principal.name, can_read_pii=principal.allows(PII_SCOPE),
                  can_read_birth_month=principal.allows(BIRTH_MONTH_SCOPE))


def member_fields(message: member_pb2.Member, prefix: str = "member.") -> MemberFields:
    return MemberFields(
        external_id=message.external_id, channel=message.channel, region=message.region, locale=message.locale,
        gender=message.gender,
        pii=Pii(display_name=message.display_name, email=message.email, phone=message.phone,
                birth_date=message.birth_date),
        consents=Consents(**{flag: getattr(message.consents, flag) for flag in CONSENT_FLAGS}),
        joined_at=_datetime(message.joined_at, f"{prefix}joined_at") if message.HasField("joined_at") else None,
    )


def member_message(member: Member, now: datetime | None = None) -> member_pb2.Member:
    """The protobuf form of a member as presented (masking is decided by the use case)."""
    message = member_pb2.Member(
        member_id=member.member_id, external_id=member.external_id, status=member.status,  # type: ignore[arg-type]
        merged_into_member_id=member.merged_into_member_id, channel=member.channel,  # type: ignore[arg-type]
        region=member.region, locale=member.locale, gender=member.gender,  # type: ignore[arg-type]
        birth_date=member.pii.birth_date, display_name=member.pii.display_name, email=member.pii.email,
        phone=member.pii.phone, tenure_days=tenure_days(member.joined_at, now or utc_now()),
        pii_masked=member.pii_masked, etag=member.etag,
    )
    for flag in CONSENT_FLAGS:
        setattr(message.consents, flag, getattr(member.consents, flag))
    if member.consents.updated_at is not None:
        message.consents.updated_at.FromDatetime(member.consents.updated_at)
    message.joined_at.FromDatetime(member.joined_at)
    message.created_at.FromDatetime(member.created_at)
    message.updated_at.FromDatetime(member.updated_at)
    if member.erased_at is not None:
        message.erased_at.FromDatetime(member.erased_at)
    if member.merged_at is not None:
        message.merged_at.FromDatetime(member.merged_at)
    return message


def _datetime(timestamp: timestamp_pb2.Timestamp, field: str) -> datetime:
    try:
        return timestamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise errors.invalid_argument([FieldViolation(field, "must be a valid timestamp")]) from None
