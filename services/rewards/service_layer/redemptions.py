"""Spending points: at once (Redeem), or set aside at checkout and then confirmed, released or left
to lapse (ReserveRedemption, ConfirmRedemption, ReleaseRedemption, the reservation-expiry job).

Every use case runs inside the caller's transaction (the entrypoint's run_once) and locks the
member's account before it reads the balance, so concurrent redemptions of one member run one
after the other and none can spend what another just took: available never goes below zero.
Every refusal is raised before the ledger is flushed, so a refused call writes nothing, not even
its request id (the same request may succeed later).

Balances move as ledger.proto says: REDEEM takes posted points from the lots, earliest expiry
first; RESERVE sets points aside (+ reserved; posted and lots untouched); RESERVATION_RELEASE gives
them back, and a confirmation writes it and then REDEEM.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc

from libs import errors
from libs.db import DbConnection
from libs.errors import FieldViolation
from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2, ledger_pb2, rewards_pb2
from services.rewards.adapters import redemptions_repo as repo
from services.rewards.adapters.ledger import Account, Entry, LedgerTx, entry_id_text
from services.rewards.adapters.redemptions_repo import RedemptionRow
from services.rewards.domain.rules import reservation_ttls
from services.rewards.service_layer import notices

T = ledger_pb2.LedgerEntryType
S = ledger_pb2.LedgerSource
R = ledger_pb2.RedemptionState
REDEEMED, RESERVED, CONFIRMED = R.REDEMPTION_STATE_REDEEMED, R.REDEMPTION_STATE_RESERVED, R.REDEMPTION_STATE_CONFIRMED
RELEASED, EXPIRED = R.REDEMPTION_STATE_RELEASED, R.REDEMPTION_STATE_EXPIRED
# States whose points were debited: nothing left to confirm or release.
DEBITED = (REDEEMED, CONFIRMED)

JOB_BATCH = 100
# The actor of the entries a lapsed reservation writes, whichever call noticed the lapse.
EXPIRY_ACTOR = "rewards.reservation-expiry"
_SHARE_DENOMINATOR_BPS = 10_000


# ---- the request, its checks and its price -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spend:
    """What Redeem and ReserveRedemption ask for, in one shape."""

    request_id: str
    member_id: str
    points: int
    order_id: str
    order_amount: types_pb2.Money | None
    description: str = ""

    @classmethod
    def of(cls, request: rewards_pb2.RedeemRequest | rewards_pb2.ReserveRedemptionRequest,
           description: str = "") -> Spend:
        amount = request.order_amount if request.HasField("order_amount") else None
        return cls(request.request_id, request.member_id, request.points, request.order_id, amount, description)


def spend_violations(spend: Spend) -> list[FieldViolation]:
    """What the declared field rules cannot say: an order amount comes with an order (the caps and
    the money value need both) and is not negative."""
    if spend.order_amount is None:
        return [FieldViolation("order_amount", "is required with order_id")] if spend.order_id else []
    out = [] if spend.order_id else [FieldViolation("order_amount", "is only accepted with order_id")]
    if spend.order_amount.amount_minor < 0:
        out.append(FieldViolation("order_amount.amount_minor", "must not be negative"))
    return out


def reservation_ttl(request: rewards_pb2.ReserveRedemptionRequest, policy: earning_pb2.RedemptionPolicy
                    ) -> tuple[timedelta, list[FieldViolation]]:
    """The reservation's lifetime (the policy's default when unset) and what is wrong with it."""
    default, longest = reservation_ttls(policy)
    if not request.HasField("ttl"):
        return default, []
    ttl = request.ttl.ToTimedelta()
    if ttl <= timedelta(0):
        return ttl, [FieldViolation("ttl", "must be positive")]
    if ttl > longest:
        return ttl, [FieldViolation("ttl", f"must be at most {longest} (the redemption policy's maximum)")]
    return ttl, []


def _refuse_invalid(violations: list[FieldViolation]) -> None:
    if violations:
        raise errors.invalid_argument(violations)


def money_value(policy: earning_pb2.RedemptionPolicy, currency: str, points: int) -> int | None:
    """Minor units of `currency` that `points` pay, in whole steps rounded down; None when the
    policy gives the currency no point value."""
    for value in policy.point_values:
        if value.currency == currency:
            return points // value.points_per_step * value.amount_minor_per_step
    return None


def _not_redeemable(currency: str) -> errors.LoyaltyError:
    return errors.failed_precondition(f"points cannot pay in {currency}", reason="CURRENCY_NOT_REDEEMABLE",
                                      currency=currency)


def _insufficient(available: int, points: int) -> errors.LoyaltyError:
    return errors.failed_precondition(f"{points} points asked, {available} available", reason="INSUFFICIENT_POINTS",
                                      available_points=str(available), points=str(points))


def _refuse_spend(account: Account, spend: Spend, policy: earning_pb2.RedemptionPolicy, used_on_order: int) -> None:
    """Raise the FAILED_PRECONDITION that forbids the spend, if any: the member's state first,
    then the policy, then the balance (so the reason names the real obstacle, not a symptom)."""
    if account.merged_into:
        raise errors.failed_precondition(f"member {spend.member_id!r} was merged into another member",
                                         reason="MEMBER_MERGED", merged_into_member_id=account.merged_into)
    if account.posted < 0:
        raise errors.failed_precondition(f"the member owes {account.debt} points", reason="POINTS_DEBT",
                                         debt_points=str(account.debt))
    if spend.points < policy.min_points_per_redemption:
        raise errors.failed_precondition(
            f"at least {policy.min_points_per_redemption} points per redemption", reason="REDEMPTION_BELOW_MINIMUM",
            min_points=str(policy.min_points_per_redemption))
    if spend.order_amount is not None:
        _refuse_order_caps(spend.order_amount, used_on_order + spend.points, policy)
    if account.available < spend.points:
        raise _insufficient(account.available, spend.points)


def _refuse_order_caps(order_amount: types_pb2.Money, order_points: int, policy: earning_pb2.RedemptionPolicy
                       ) -> None:
    """The order's caps count every point the order uses (this request and its earlier redemptions
    and live reservations), so splitting a payment never gets round them."""
    value = money_value(policy, order_amount.currency, order_points)
    if value is None:
        raise _not_redeemable(order_amount.currency)
    cap = policy.max_points_per_order
    if cap and order_points > cap:
        raise errors.failed_precondition(f"an order may use at most {cap} points; this one would use {order_points}",
                                         reason="REDEMPTION_CAP_EXCEEDED", cap="MAX_POINTS_PER_ORDER", limit=str(cap))
    share = policy.max_order_share_bps
    if share and value * _SHARE_DENOMINATOR_BPS > order_amount.amount_minor * share:
        raise errors.failed_precondition(
            f"points may pay at most {share / 100:g}% of the order; {order_points} points are worth {value}"
            f" of {order_amount.amount_minor} {order_amount.currency}",
            reason="REDEMPTION_CAP_EXCEEDED", cap="MAX_ORDER_SHARE", limit=str(share))


# ---- reading -------------------------------------------------------------------------------------


def lapsed(row: RedemptionRow, now: datetime) -> bool:
    """A reservation past its ttl, whether or not the expiry has been recorded yet."""
    return row.state == RESERVED and row.expires_at is not None and row.expires_at <= now


def to_message(row: RedemptionRow, now: datetime) -> ledger_pb2.Redemption:
    """The Redemption of a row. A reservation past its ttl reads EXPIRED at once: it can no longer
    be confirmed, even before the job (or a call on it) records the expiry."""
    redemption = ledger_pb2.Redemption(
        redemption_id=row.redemption_id, member_id=row.member_id, state=EXPIRED if lapsed(row, now) else row.state,
        points=row.points, order_id=row.order_id or "", ledger_entry_id=entry_id_text(row.entry_id),
        available_points_after=row.available_after, request_id=row.request_id)
    if row.currency:
        redemption.order_amount.CopyFrom(types_pb2.Money(amount_minor=row.order_amount_minor, currency=row.currency))
        redemption.money_value.CopyFrom(types_pb2.Money(amount_minor=row.money_value_minor, currency=row.currency))
    for lot_id, points in zip(row.lot_ids, row.lot_points, strict=True):
        redemption.lot_movements.add(lot_id=str(lot_id), points=points)
    if row.expires_at is not None:
        redemption.expires_at.FromDatetime(row.expires_at)
    redemption.created_at.FromDatetime(row.created_at)
    redemption.updated_at.FromDatetime(row.updated_at)
    return redemption


def _not_found(redemption_id: str) -> errors.LoyaltyError:
    return errors.not_found("redemption", redemption_id, reason="REDEMPTION_NOT_FOUND")


async def get(conn: DbConnection, redemption_id: str) -> ledger_pb2.Redemption:
    row = await repo.find(conn, redemption_id)
    if row is None:
        raise _not_found(redemption_id)
    return to_message(row, datetime.now(UTC))


# ---- staging -------------------------------------------------------------------------------------


async def _locked_account(tx: LedgerTx, conn: DbConnection, spend: Spend, policy: earning_pb2.RedemptionPolicy
                          ) -> Account:
    """Lock the member's account, then refuse the spend if anything forbids it. Under the lock the
    order's earlier redemptions are exact: they change only under the same lock."""
    account = (await tx.lock([spend.member_id]))[spend.member_id]
    used = await repo.points_on_order(conn, spend.member_id, spend.order_id, tx.now) if spend.order_id else 0
    _refuse_spend(account, spend, policy, used)
    return account


def _new_row(spend: Spend, policy: earning_pb2.RedemptionPolicy, state: ledger_pb2.RedemptionState.ValueType,
             now: datetime) -> RedemptionRow:
    amount = spend.order_amount
    return RedemptionRow(
        member_id=spend.member_id, redemption_id=f"rdm-{uuid.uuid4().hex}", request_id=spend.request_id,
        state=state, points=spend.points, created_at=now, updated_at=now, order_id=spend.order_id or None,
        currency=amount.currency if amount else "", order_amount_minor=amount.amount_minor if amount else 0,
        money_value_minor=(money_value(policy, amount.currency, spend.points) or 0) if amount else 0,
        description=spend.description)


async def _debit(tx: LedgerTx, row: RedemptionRow, points: int, request_id: str) -> None:
    """Stage the REDEEM entry: `points` off the posted balance, taken from the lots FIFO by earliest
    expiry; the row records the entry and the lots. The caller has checked that available covers
    `points`, so the lots do too (they hold the posted balance): anything else is a broken ledger,
    refused rather than written."""
    taken = await tx.take_from_lots(row.member_id, points)
    if sum(share for _, share in taken) != points:
        raise RuntimeError(f"the open lots of {row.member_id!r} do not cover its posted balance")
    entry = tx.entry(Entry(
        member_id=row.member_id, type=T.LEDGER_ENTRY_TYPE_REDEEM, points=-points, posted_delta=-points,
        source=S.LEDGER_SOURCE_REDEMPTION, redemption_id=row.redemption_id, order_id=row.order_id,
        lot_ids=[lot_id for lot_id, _ in taken], lot_points=[-share for _, share in taken], reason=row.description,
        request_id=request_id))
    row.entry_id = entry.entry_id
    row.lot_ids, row.lot_points = list(entry.lot_ids), list(entry.lot_points)
    notices.redemption_activity(tx, row.member_id, entry.entry_id, points, row.order_id or "", tx.now)


def _unreserve(tx: LedgerTx, row: RedemptionRow, reason_code: str, request_id: str = "", reason: str = "") -> None:
    """Stage the RESERVATION_RELEASE entry that gives a reservation's points back to available."""
    tx.entry(Entry(
        member_id=row.member_id, type=T.LEDGER_ENTRY_TYPE_RESERVATION_RELEASE, points=-row.points,
        reserved_delta=-row.points, source=S.LEDGER_SOURCE_REDEMPTION, redemption_id=row.redemption_id,
        order_id=row.order_id, reason_code=reason_code, reason=reason, request_id=request_id))


async def _end_reservations(tx: LedgerTx, conn: DbConnection, rows: Sequence[RedemptionRow],
                            state: ledger_pb2.RedemptionState.ValueType, reason_code: str, request_id: str = "",
                            reason: str = "") -> None:
    """Release locked reservations for good (RELEASED by the caller, or EXPIRED) and write them."""
    await tx.lock(row.member_id for row in rows)
    await tx.reserve_ids(entries=len(rows))
    for row in rows:
        _unreserve(tx, row, reason_code, request_id, reason)
    for row in rows:
        row.state, row.updated_at = state, tx.now
        row.available_after = tx.account(row.member_id).available
    await tx.flush()
    await repo.save(conn, rows)


async def _locked_redemption(tx: LedgerTx, conn: DbConnection, redemption_id: str) -> RedemptionRow:
    """The redemption's row, locked, then its member's account (the repository's lock order)."""
    row = await repo.find(conn, redemption_id, for_update=True)
    if row is None:
        raise _not_found(redemption_id)
    await tx.lock([row.member_id])
    return row


# ---- use cases -----------------------------------------------------------------------------------


async def _spend(conn: DbConnection, spend: Spend, policy: earning_pb2.RedemptionPolicy, actor: str,
                 row_state: ledger_pb2.RedemptionState.ValueType, ttl: timedelta | None,
                 stage: Callable[[LedgerTx, RedemptionRow], Awaitable[None]]) -> ledger_pb2.Redemption:
    """What Redeem and ReserveRedemption share: lock and check, stage the one entry, record the row."""
    tx = LedgerTx(conn, datetime.now(UTC), actor)
    account = await _locked_account(tx, conn, spend, policy)
    row = _new_row(spend, policy, row_state, tx.now)
    row.expires_at = tx.now + ttl if ttl is not None else None
    await tx.reserve_ids(entries=1)
    await stage(tx, row)
    row.available_after = account.available
    await tx.flush()
    await repo.insert(conn, row)
    return to_message(row, tx.now)


async def redeem(conn: DbConnection, request: rewards_pb2.RedeemRequest, policy: earning_pb2.RedemptionPolicy,
                 actor: str) -> ledger_pb2.Redemption:
    """Redeem inside the caller's transaction: debit the points now."""
    spend = Spend.of(request, request.description)
    _refuse_invalid(spend_violations(spend))
    return await _spend(conn, spend, policy, actor, REDEEMED, None,
                        lambda tx, row: _debit(tx, row, spend.points, spend.request_id))


async def reserve(conn: DbConnection, request: rewards_pb2.ReserveRedemptionRequest,
                  policy: earning_pb2.RedemptionPolicy, actor: str) -> ledger_pb2.Redemption:
    """ReserveRedemption inside the caller's transaction: the same checks as Redeem, then the
    points stop being available (posted and lots untouched) until confirmed, released or lapsed."""
    spend = Spend.of(request)
    ttl, ttl_violations = reservation_ttl(request, policy)
    _refuse_invalid(spend_violations(spend) + ttl_violations)

    async def set_aside(tx: LedgerTx, row: RedemptionRow) -> None:
        tx.entry(Entry(member_id=row.member_id, type=T.LEDGER_ENTRY_TYPE_RESERVE, points=row.points,
                       reserved_delta=row.points, source=S.LEDGER_SOURCE_REDEMPTION, redemption_id=row.redemption_id,
                       order_id=row.order_id, request_id=spend.request_id))

    return await _spend(conn, spend, policy, actor, RESERVED, ttl, set_aside)


class ReservationExpired(errors.LoyaltyError):
    """FAILED_PRECONDITION RESERVATION_EXPIRED. When the row is still RESERVED (its ttl lapsed and
    nobody recorded it yet), the refused call's transaction rolls back with everything it did, so
    the caller records the expiry afterwards with `expire_reservation` (else the job will)."""

    def __init__(self, row: RedemptionRow) -> None:
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED",
                         f"the reservation {row.redemption_id!r} has expired", {"redemption_id": row.redemption_id})
        self.row = row


def _refuse_unconfirmable(row: RedemptionRow, points: int, now: datetime) -> None:
    """Why a reservation that was not debited cannot be confirmed for `points`, if it cannot."""
    if row.state == RELEASED:
        raise errors.failed_precondition(f"the reservation {row.redemption_id!r} was released",
                                         reason="RESERVATION_RELEASED", redemption_id=row.redemption_id)
    if row.state == EXPIRED or lapsed(row, now):
        raise ReservationExpired(row)
    if points > row.points:
        raise errors.failed_precondition(f"{points} points asked, {row.points} reserved",
                                         reason="RESERVATION_EXCEEDED", reserved_points=str(row.points))


def _already_debited(row: RedemptionRow) -> errors.LoyaltyError:
    return errors.failed_precondition(f"the redemption {row.redemption_id!r} was already debited ({row.points} points)",
                                      reason="RESERVATION_CONFIRMED", points=str(row.points))


async def confirm(conn: DbConnection, request: rewards_pb2.ConfirmRedemptionRequest,
                  policy: earning_pb2.RedemptionPolicy, actor: str) -> ledger_pb2.Redemption:
    """ConfirmRedemption inside the caller's transaction: debit all the reserved points or fewer
    (the rest goes back to available), priced at the active point value. A redemption already
    debited with these points (0 = all it reserved) is answered as it is; with others it is
    RESERVATION_CONFIRMED: "all" after a partial confirmation is not what was debited."""
    tx = LedgerTx(conn, datetime.now(UTC), actor)
    row = await _locked_redemption(tx, conn, request.redemption_id)
    if row.state in DEBITED:
        if (request.points or await repo.reserved_points(conn, row)) == row.points:
            return to_message(row, tx.now)
        raise _already_debited(row)
    points = request.points or row.points
    _refuse_unconfirmable(row, points, tx.now)
    value = money_value(policy, row.currency, points)
    if value is None:
        raise _not_redeemable(row.currency)
    await tx.reserve_ids(entries=2)
    _unreserve(tx, row, "RESERVATION_CONFIRMED", request.request_id)
    account = tx.account(row.member_id)
    if account.available < points:  # points expired or were reversed since the reservation
        raise _insufficient(account.available, points)
    await _debit(tx, row, points, request.request_id)
    row.state, row.points, row.money_value_minor = CONFIRMED, points, value
    row.available_after, row.updated_at = account.available, tx.now
    await tx.flush()
    await repo.save(conn, [row])
    return to_message(row, tx.now)


async def release(conn: DbConnection, request: rewards_pb2.ReleaseRedemptionRequest, actor: str
                  ) -> ledger_pb2.Redemption:
    """ReleaseRedemption inside the caller's transaction: the reserved points become available
    again. A reservation already released or expired is answered as it is; one past its ttl is
    recorded EXPIRED (not RELEASED); a debited one is RESERVATION_CONFIRMED."""
    tx = LedgerTx(conn, datetime.now(UTC), actor)
    row = await _locked_redemption(tx, conn, request.redemption_id)
    if row.state in DEBITED:
        raise _already_debited(row)
    if row.state in (RELEASED, EXPIRED):
        return to_message(row, tx.now)
    state, reason_code = (EXPIRED, "RESERVATION_EXPIRED") if lapsed(row, tx.now) else (RELEASED, "RESERVATION_RELEASED")
    await _end_reservations(tx, conn, [row], state, reason_code, request.request_id, request.reason)
    return to_message(row, tx.now)


# ---- lapsed reservations -------------------------------------------------------------------------


async def expire_reservation(pool: asyncpg.Pool, row: RedemptionRow) -> None:
    """Record one reservation's expiry now, if it is still RESERVED past its ttl (a refused
    ConfirmRedemption calls this after its own transaction rolled back)."""
    if row.state != RESERVED:
        return  # already recorded
    async with pool.acquire() as conn, conn.transaction():
        now = datetime.now(UTC)
        locked = await repo.lock_if_lapsed(conn, row.member_id, row.redemption_id, now)
        if locked is not None:
            await _end_reservations(LedgerTx(conn, now, EXPIRY_ACTOR), conn, [locked], EXPIRED, "RESERVATION_EXPIRED")


async def expire_reservations_once(pool: asyncpg.Pool) -> int:
    """Release up to JOB_BATCH reservations whose ttl has lapsed (state EXPIRED, one
    RESERVATION_RELEASE entry each) in one transaction; returns how many. Rows another transaction
    holds (another replica's round, a Confirm or Release in flight) are skipped, so replicas share
    the work, and the lock order (rows, then accounts) rules out deadlocks with the RPCs."""
    async with pool.acquire() as conn, conn.transaction():
        now = datetime.now(UTC)
        rows = await repo.lock_lapsed(conn, now, JOB_BATCH)
        if rows:
            await _end_reservations(LedgerTx(conn, now, EXPIRY_ACTOR), conn, rows, EXPIRED, "RESERVATION_EXPIRED")
        return len(rows)
