"""The benefit catalogue per tier and benefit uses.

A use is verified and recorded in one transaction that holds the member's status row lock: the
member's tier cannot change under it, and concurrent uses of one member count their period's uses
one after the other, so a usage limit is never exceeded. A points benefit credits the ledger
(a BENEFIT_GRANT entry and its lot) and a coupon benefit issues its coupon in that same
transaction; every use is recorded with the value granted then, whatever the catalogue says later.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import asyncpg
import grpc

from libs import errors, paging
from libs.db import DbConnection
from libs.errors import FieldViolation
from loyalty.rewards.v1 import benefits_pb2, earning_pb2, ledger_pb2, rewards_pb2
from services.rewards.adapters import benefits_repo, coupons_repo, tiers_repo
from services.rewards.adapters.benefits_birthdays import BirthMonths
from services.rewards.adapters.benefits_repo import UseRow
from services.rewards.adapters.coupons_repo import Origin
from services.rewards.adapters.ledger import LedgerTx
from services.rewards.domain import benefits_rules, coupons_rules
from services.rewards.domain.benefits_calendar import period_bounds, to_datetime, window_violations
from services.rewards.domain.benefits_rules import BENEFIT_NOT_FOUND, BENEFIT_NOT_IN_TIER, K
from services.rewards.domain.expiry import expires_at
from services.rewards.service_layer import coupons
from services.rewards.service_layer.coupons import to_coupon

BENEFIT_REVISION_MISMATCH = "BENEFIT_REVISION_MISMATCH"
MEMBER_MERGED = "MEMBER_MERGED"
Period = tuple[datetime | None, datetime | None]


def _raise_if(violations: Sequence[FieldViolation], reason: str = "INVALID_ARGUMENT") -> None:
    if violations:
        raise errors.invalid_argument(violations, reason=reason)


def _not_found(benefit_id: str) -> errors.LoyaltyError:
    return errors.not_found("benefit", benefit_id, reason=BENEFIT_NOT_FOUND)


def _value(entry: benefits_pb2.Benefit) -> int:
    return benefits_rules.benefit_value(entry.value_rule) if entry.kind in benefits_rules.VALUED_KINDS else 0


# ---- catalogue -------------------------------------------------------------------------------


def check_create(request: rewards_pb2.CreateBenefitRequest, now: datetime) -> None:
    _raise_if(benefits_rules.benefit_violations(request.benefit, now))


async def create_benefit(conn: DbConnection, request: rewards_pb2.CreateBenefitRequest, actor: str, now: datetime
                         ) -> benefits_pb2.Benefit:
    """Store a checked entry as revision 1, ACTIVE, inside the caller's transaction."""
    entry = benefits_rules.catalogue_entry(request.benefit)
    entry.state = benefits_rules.ACTIVE
    return await benefits_repo.insert_benefit(conn, str(uuid.uuid4()), entry, _value(entry), actor, now)


def check_update(request: rewards_pb2.UpdateBenefitRequest) -> None:
    _raise_if(benefits_rules.mask_violations(request.update_mask.paths))


async def update_benefit(conn: DbConnection, request: rewards_pb2.UpdateBenefitRequest, actor: str, now: datetime
                         ) -> tuple[benefits_pb2.Benefit, benefits_pb2.Benefit]:
    """(before, after) of an update inside the caller's transaction, the entry locked meanwhile."""
    stored = await benefits_repo.load_benefit(conn, request.benefit_id, lock=True)
    if stored is None:
        raise _not_found(request.benefit_id)
    if request.expected_revision and request.expected_revision != stored.revision:
        raise errors.LoyaltyError(grpc.StatusCode.ABORTED, BENEFIT_REVISION_MISMATCH,
                                  f"benefit {request.benefit_id!r} is at revision {stored.revision}, not "
                                  f"{request.expected_revision}: read it again",
                                  metadata={"revision": str(stored.revision)})
    update = benefits_rules.apply_update(stored, request.benefit, request.update_mask.paths, now)
    _raise_if(update.immutable, reason=benefits_rules.BENEFIT_FIELD_IMMUTABLE)
    _raise_if(update.violations)
    entry = benefits_rules.catalogue_entry(update.benefit)
    entry.benefit_id = stored.benefit_id
    return stored, await benefits_repo.update_benefit(conn, entry, _value(entry), actor, now)


async def get_benefit(pool: asyncpg.Pool, benefit_id: str) -> benefits_pb2.Benefit:
    benefit = await benefits_repo.load_benefit(pool, benefit_id)
    if benefit is None:
        raise _not_found(benefit_id)
    return benefit


def _after_created(request: rewards_pb2.ListBenefitsRequest | rewards_pb2.ListMemberBenefitsRequest
                   ) -> tuple[datetime, str] | None:
    key = paging.decode(request, 2)
    return (datetime.fromisoformat(key[0]), str(key[1])) if key else None


def _created_token(page: Sequence[benefits_pb2.Benefit], more: bool,
                   request: rewards_pb2.ListBenefitsRequest | rewards_pb2.ListMemberBenefitsRequest) -> str:
    if not more:
        return ""
    last = page[-1]
    return paging.encode([last.created_at.ToDatetime(tzinfo=UTC).isoformat(), last.benefit_id], request)


async def list_benefits(pool: asyncpg.Pool, request: rewards_pb2.ListBenefitsRequest
                        ) -> rewards_pb2.ListBenefitsResponse:
    """Oldest first; keyset-paged on (created_at, benefit_id)."""
    size = paging.page_size(request.page_size)
    rows = await benefits_repo.list_benefits(pool, request.tier_id, request.kind, request.include_retired,
                                             _after_created(request), size + 1)
    page, more = paging.split([benefits_repo.to_benefit(r) for r in rows], size)
    return rewards_pb2.ListBenefitsResponse(benefits=page, next_page_token=_created_token(page, more, request))


# ---- eligibility ------------------------------------------------------------------------------


def _period(benefit: benefits_pb2.Benefit, now: datetime, zone: ZoneInfo) -> Period:
    """The usage-limit period holding `now`; the whole membership without a limit."""
    return period_bounds(benefit.usage_limit.period, now, zone) if benefit.HasField("usage_limit") else (None, None)


async def _uses_in_period(conn: DbConnection | asyncpg.Pool, member_id: str, benefits: Sequence[benefits_pb2.Benefit],
                          now: datetime, zone: ZoneInfo) -> dict[str, int]:
    return await benefits_repo.count_uses(
        conn, member_id, [(b.benefit_id, *_period(b, now, zone)) for b in benefits])


async def birth_month_if_needed(birth_months: BirthMonths, member_id: str,
                                benefits: Sequence[benefits_pb2.Benefit]) -> int | None:
    """Profile is asked only when a birthday bonus is at stake."""
    if any(b.kind == K.BENEFIT_KIND_BIRTHDAY_BONUS for b in benefits):
        return await birth_months.birth_month(member_id)
    return None


async def list_member_benefits(pool: asyncpg.Pool, request: rewards_pb2.ListMemberBenefitsRequest,
                               birth_months: BirthMonths, zone: ZoneInfo, now: datetime
                               ) -> rewards_pb2.ListMemberBenefitsResponse:
    """The current tier's benefits with eligibility, keyset-paged on (created_at, benefit_id).

    Without include_ineligible the benefits the member cannot use now are left out of each page, so
    a page may hold fewer than page_size; next_page_token still says whether more follow."""
    status = await tiers_repo.load_status(pool, request.member_id)
    response = rewards_pb2.ListMemberBenefitsResponse(tier_id=status.tier_id if status else "")
    if not response.tier_id:
        return response
    size = paging.page_size(request.page_size)
    rows = await benefits_repo.list_benefits(pool, response.tier_id, 0, request.include_ineligible,
                                             _after_created(request), size + 1)
    page, more = paging.split([benefits_repo.to_benefit(r) for r in rows], size)
    uses = await _uses_in_period(pool, request.member_id, page, now, zone)
    birth_month = await birth_month_if_needed(birth_months, request.member_id, page)
    for benefit in page:
        used = uses[benefit.benefit_id]
        ineligible = benefits_rules.ineligibility(benefit, now, zone, used, birth_month)
        if ineligible is not None and not request.include_ineligible:
            continue
        name, description = benefits_rules.display_texts(benefit, request.language_tag)
        listed = response.member_benefits.add(
            benefit=benefit, display_name=name, display_description=description, eligible=ineligible is None,
            ineligible_reason=ineligible.reason if ineligible else "", uses_in_period=used,
            remaining_uses=benefits_rules.remaining_uses(benefit, used))
        start, end = _period(benefit, now, zone)
        if start is not None and end is not None:
            listed.period_start.FromDatetime(start)
            listed.period_end.FromDatetime(end)
    response.next_page_token = _created_token(page, more, request)
    return response


# ---- uses --------------------------------------------------------------------------------------


async def prepare_use(pool: asyncpg.Pool, request: rewards_pb2.UseBenefitRequest, birth_months: BirthMonths
                      ) -> int | None:
    """What a use needs from outside its transaction, read before it so no lock is held while
    profile answers: the member's birth month when the benefit is a birthday bonus (a benefit's
    kind never changes). NOT_FOUND for an unknown benefit."""
    benefit = await get_benefit(pool, request.benefit_id)
    return await birth_month_if_needed(birth_months, request.member_id, [benefit])


async def _verify(conn: DbConnection, request: rewards_pb2.UseBenefitRequest, birth_month: int | None, zone: ZoneInfo,
                  now: datetime, *, lock: bool) -> tuple[benefits_pb2.Benefit, str]:
    """The benefit as it is now and the member's tier, or the reason the member may not use it."""
    status = await (tiers_repo.lock_status(conn, request.member_id) if lock
                    else tiers_repo.load_status(conn, request.member_id))
    benefit = await benefits_repo.load_benefit(conn, request.benefit_id)  # as it is now: it may have changed
    if benefit is None:
        raise _not_found(request.benefit_id)
    if status is None or not status.tier_id or status.tier_id != benefit.tier_id:
        raise errors.failed_precondition(f"the member's tier does not grant benefit {benefit.benefit_id!r}",
                                         reason=BENEFIT_NOT_IN_TIER, benefit_id=benefit.benefit_id)
    uses = await _uses_in_period(conn, request.member_id, [benefit], now, zone)
    ineligible = benefits_rules.ineligibility(benefit, now, zone, uses[benefit.benefit_id], birth_month)
    if ineligible is not None:
        raise errors.failed_precondition(ineligible.message, reason=ineligible.reason, benefit_id=benefit.benefit_id)
    return benefit, status.tier_id


def _to_use(use: UseRow, coupon: benefits_pb2.Coupon | None) -> benefits_pb2.BenefitUse:
    message = benefits_pb2.BenefitUse(
        use_id=use.use_id, member_id=use.member_id, benefit_id=use.benefit_id, kind=use.kind, tier_id=use.tier_id,
        value=use.value, ledger_entry_id=str(use.ledger_entry_id or ""), order_id=use.order_id,
        channel=use.channel, verification_code=use.verification_code, request_id=use.request_id, coupon=coupon)
    message.used_at.FromDatetime(use.used_at)
    return message


async def check_use(pool: asyncpg.Pool, request: rewards_pb2.UseBenefitRequest, birth_month: int | None,
                    zone: ZoneInfo, now: datetime) -> benefits_pb2.BenefitUse:
    """validate_only: the use the member would get, verified, with nothing recorded or granted."""
    async with pool.acquire() as conn:
        benefit, tier_id = await _verify(conn, request, birth_month, zone, now, lock=False)
    use = benefits_pb2.BenefitUse(member_id=request.member_id, benefit_id=benefit.benefit_id, kind=benefit.kind,
                                  tier_id=tier_id, value=benefit.value, order_id=request.order_id,
                                  channel=request.channel, request_id=request.request_id)
    use.used_at.FromDatetime(now)
    return use


async def grant_points(conn: DbConnection, member_id: str, points: int, benefit: benefits_pb2.Benefit,
                       request_id: str, rules: earning_pb2.EarningRuleSet, zone: ZoneInfo, actor: str,
                       now: datetime) -> int:
    """Credit a points benefit as a BENEFIT_GRANT entry and its lot (expiring under the active
    rules' policy), inside the caller's transaction; returns the entry id. Granted points are not
    tier-qualifying: a tier's gift must not earn the tier."""
    tx = LedgerTx(conn, now=now, actor=actor)
    accounts = await tx.lock([member_id])
    if accounts[member_id].merged_into:
        raise errors.failed_precondition(f"member {member_id!r} was merged into another member",
                                         reason=MEMBER_MERGED, member_id=member_id)
    await tx.reserve_ids(entries=1, lots=1)
    entry_id, _ = tx.credit_lot(
        member_id, points, entry_type=ledger_pb2.LEDGER_ENTRY_TYPE_BENEFIT_GRANT,
        source=ledger_pb2.LEDGER_SOURCE_BENEFIT,
        earned_at=now, expires_at=expires_at(now, rules.expiry, zone), qualifying_points=0,
        reason=f"benefit {benefit.name}", reason_code=K.Name(benefit.kind).removeprefix("BENEFIT_KIND_"),
        request_id=request_id)
    await tx.flush()
    return entry_id


async def record_use(conn: DbConnection, request: rewards_pb2.UseBenefitRequest, birth_month: int | None,
                     rules: earning_pb2.EarningRuleSet, zone: ZoneInfo, actor: str, now: datetime
                     ) -> benefits_pb2.BenefitUse:
    """Verify, grant and record one use inside the caller's transaction (all or nothing)."""
    benefit, tier_id = await _verify(conn, request, birth_month, zone, now, lock=True)
    value = benefit.value  # 0 for the kinds without a value rule
    entry_id: int | None = None
    coupon: benefits_pb2.Coupon | None = None
    if benefit.kind in benefits_rules.POINTS_KINDS:
        entry_id = await grant_points(conn, request.member_id, value, benefit, request.request_id, rules, zone, actor,
                                      now)
    elif benefit.kind == K.BENEFIT_KIND_COUPON:
        origin = Origin(request_id=request.request_id, actor=actor, benefit_id=benefit.benefit_id)
        (coupon,), _ = await coupons.issue(conn, [request.member_id], benefit.coupon_template, origin, now)
    use = UseRow(member_id=request.member_id, use_id=str(uuid.uuid4()), benefit_id=benefit.benefit_id,
                 kind=benefit.kind, tier_id=tier_id, value=value, ledger_entry_id=entry_id,
                 coupon_id=coupon.coupon_id if coupon else None, order_id=request.order_id, channel=request.channel,
                 verification_code=coupons_rules.display_code(coupons_rules.new_code()),
                 request_id=request.request_id, actor=actor, used_at=now)
    await benefits_repo.insert_use(conn, use)
    return _to_use(use, coupon)


def list_uses_violations(request: rewards_pb2.ListBenefitUsesRequest) -> list[FieldViolation]:
    return window_violations(request, "start_time", "end_time")


async def list_uses(pool: asyncpg.Pool, request: rewards_pb2.ListBenefitUsesRequest, now: datetime
                    ) -> rewards_pb2.ListBenefitUsesResponse:
    """Newest first; keyset-paged on (used_at, use_id). Coupons as they are now."""
    size = paging.page_size(request.page_size)
    key = paging.decode(request, 2)
    after = (datetime.fromisoformat(key[0]), str(key[1])) if key else None
    start = to_datetime(request.start_time) if request.HasField("start_time") else None
    end = to_datetime(request.end_time) if request.HasField("end_time") else None
    rows = await benefits_repo.list_uses(pool, request.member_id, request.benefit_id, start, end, after, size + 1)
    page, more = paging.split([UseRow(**dict(r)) for r in rows], size)
    with_coupon = [u for u in page if u.coupon_id]
    coupon_rows = await coupons_repo.load_many(pool, [u.member_id for u in with_coupon],
                                               [u.coupon_id or "" for u in with_coupon], now)
    by_id = {r["coupon_id"]: to_coupon(r) for r in coupon_rows}
    response = rewards_pb2.ListBenefitUsesResponse(
        uses=[_to_use(u, by_id.get(u.coupon_id or "")) for u in page])
    if more:
        last = page[-1]
        response.next_page_token = paging.encode([last.used_at.isoformat(), last.use_id], request)
    return response


def audit_fields(benefit: benefits_pb2.Benefit) -> dict[str, object]:
    """What the audit log keeps of a catalogue entry (no texts: they are long and not value)."""
    fields: dict[str, object] = {"benefit_id": benefit.benefit_id, "tier_id": benefit.tier_id,
                                 "kind": K.Name(benefit.kind), "state": benefits_pb2.BenefitState.Name(benefit.state),
                                 "revision": benefit.revision, "value": benefit.value}
    if benefit.HasField("usage_limit"):
        fields["usage_limit"] = {"max_uses": benefit.usage_limit.max_uses,
                                 "period": benefits_pb2.BenefitPeriod.Name(benefit.usage_limit.period)}
    return fields

