"""Use case: record a batch of behaviour events.

Per batch, in one transaction: every valid event is stored once (idempotent on its member and
event id), the members' lifetime aggregates, daily buckets and category affinities move by the
accepted events, and earning events get an outbox row for rewards carrying the trace context.
A bad event is rejected with a reason and does not stop the others.

Round trips per batch are constant (about ten statements whatever the batch size): the hot path
of the product, where per-event statements would cap us at a few thousand events a second.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import orjson
from opentelemetry import propagate, trace

from libs import errors
from libs.db import DbConnection
from libs.distribution import by_shard
from libs.validation import validate
from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import event_pb2, member_pb2, profile_service_pb2
from loyalty.rewards.v1 import earning_pb2
from services.profile.adapters import events_repo
from services.profile.domain import events as rules

PLANNED_MEMBER_ATTEMPTS = 3  # a batch rolled back this often by members changing under it is refused
MERGE_HOPS_MAX = 8  # a chain of merges longer than this is a data error, not a loop to follow

OUTBOX_KIND_ACCRUAL = profile_service_pb2.OUTBOX_MESSAGE_KIND_ACCRUAL
OUTBOX_KIND_REVERSAL = profile_service_pb2.OUTBOX_MESSAGE_KIND_REVERSAL


@dataclass
class Item:
    """One request event on its way through the batch."""

    index: int
    event: event_pb2.BehaviourEvent  # as cleaned (e.g. browse clipped)
    request_hash: bytes
    stored_bytes: bytes  # the event as stored (cleaned), serialized
    occurred_at: datetime
    event_type: int
    sent_member_id: str
    member_id: str = ""  # the member credited: the survivor after a merge
    flags: list[int] = field(default_factory=list)
    result: event_pb2.EventResult | None = None
    key: tuple[str, str] = ("", "")  # (member as sent, event id): what de-duplicates an event

    def reject(self, reason: int, field_path: str, message: str) -> None:
        self.result = event_pb2.EventResult(index=self.index, event_id=self.event.event_id,
                                            status=event_pb2.EVENT_STATUS_REJECTED, reject_reason=cast(Any, reason),
                                            field=field_path, message=message, member_id=self.sent_member_id)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # the time of an event refused before its own was read


def _prepare(index: int, event: event_pb2.BehaviourEvent, now: datetime, currency: str) -> Item:
    """Stateless checks: field rules, clock, money. Cleaning happens here too. The field rules run
    first: an impossible timestamp (nanos -1, year 0) is a rejected event, not a failed batch."""
    violations = validate(event)
    occurred_at = _EPOCH if violations else event.occurred_at.ToDatetime(tzinfo=UTC)
    data, digest = rules.serialized_with_sha256(event)
    item = Item(index=index, event=event, request_hash=digest, stored_bytes=data, occurred_at=occurred_at,
                event_type=rules.event_type(event), sent_member_id=event.member_id,
                key=(event.member_id, event.event_id))
    if violations:
        first = violations[0]
        item.reject(event_pb2.EVENT_REJECT_REASON_INVALID_FIELD, f"events[{index}].{first.field}",
                    "; ".join(f"{v.field}: {v.description}" for v in violations))
        return item
    for check in (rules.check_time(occurred_at, now), rules.check_amounts(event, currency)):
        if check is not None:
            item.reject(check.reason, f"events[{index}].{check.field}", check.message)
            return item
    item.event, item.flags = rules.clean(event)
    if item.event is not event:
        item.stored_bytes = item.event.SerializeToString(deterministic=True)
    return item


def _dedupe_within_batch(items: list[Item]) -> None:
    """The same (member, event id) twice in one batch: a DUPLICATE if the payload is the same, a
    CONFLICT_IN_BATCH otherwise. The first occurrence goes on."""
    first: dict[tuple[str, str], Item] = {}
    for item in items:
        if item.result is not None:
            continue
        seen = first.get(item.key)
        if seen is None:
            first[item.key] = item
        elif seen.request_hash == item.request_hash:
            item.result = event_pb2.EventResult(index=item.index, event_id=item.event.event_id,
                                                status=event_pb2.EVENT_STATUS_DUPLICATE, member_id=item.sent_member_id)
        else:
            item.reject(event_pb2.EVENT_REJECT_REASON_CONFLICT_IN_BATCH, f"events[{item.index}].event_id",
                        f"event_id also used by events[{seen.index}] with another payload")


class _PlannedMemberChanged(Exception):
    """A member this batch meant to create appeared meanwhile and is not a plain active member."""


async def _resolve_members(connection: DbConnection, items: list[Item], create_unknown: bool) -> dict[str, Item]:
    """Point each event at the member it credits. Unknown members, when the caller asks, are
    planned (each with its first event) and inserted by _create_planned at the end of the
    transaction: a new member's row locks out any concurrent batch naming it until commit, so
    inserting it first would serialise those batches for their whole transactions."""
    live = [i for i in items if i.result is None]
    wanted = {i.sent_member_id for i in live}
    facts = await events_repo.fetch_members(connection, sorted(wanted))
    planned: dict[str, Item] = {}
    missing = wanted - set(facts)
    if missing and create_unknown:
        for item in sorted(live, key=lambda i: i.occurred_at):
            if item.sent_member_id in missing:
                planned.setdefault(item.sent_member_id, item)
        for member_id, first in planned.items():
            facts[member_id] = events_repo.MemberFacts(member_id, member_pb2.MEMBER_STATUS_ACTIVE, None,
                                                       first.occurred_at, None)
    # Follow merges to the survivor (rarely more than one hop).
    for _ in range(MERGE_HOPS_MAX):
        targets = {f.merged_into_member_id for f in facts.values()
                   if f.status == member_pb2.MEMBER_STATUS_MERGED and f.merged_into_member_id} - set(facts)
        if not targets:
            break
        facts.update(await events_repo.fetch_members(connection, sorted(targets)))
    for item in live:
        member_id = item.sent_member_id
        member = facts.get(member_id)
        if member is None:
            item.reject(event_pb2.EVENT_REJECT_REASON_UNKNOWN_MEMBER, f"events[{item.index}].member_id",
                        "unknown member (send create_unknown_members to create it)")
            continue
        if member_id in planned:
            item.flags.append(event_pb2.EVENT_FLAG_MEMBER_CREATED)
        hops = 0
        while member.status == member_pb2.MEMBER_STATUS_MERGED and member.merged_into_member_id in facts:
            member = facts[member.merged_into_member_id]
            hops += 1
            if hops > MERGE_HOPS_MAX:
                break
        if member.status == member_pb2.MEMBER_STATUS_ERASED:
            item.reject(event_pb2.EVENT_REJECT_REASON_MEMBER_ERASED, f"events[{item.index}].member_id",
                        "the member was erased")
            continue
        if member.status == member_pb2.MEMBER_STATUS_MERGED:
            item.reject(event_pb2.EVENT_REJECT_REASON_UNKNOWN_MEMBER, f"events[{item.index}].member_id",
                        "the member was merged into a member that cannot be found")
            continue
        item.member_id = member.member_id
        if member.member_id != member_id:
            item.flags.append(event_pb2.EVENT_FLAG_MEMBER_REDIRECTED)
        if member.last_activity_at is not None and item.occurred_at < member.last_activity_at:
            item.flags.append(event_pb2.EVENT_FLAG_LATE_ARRIVAL)
    return planned


async def _create_planned(connection: DbConnection, planned: dict[str, Item], accepted: list[Item]) -> int:
    """Insert the planned members, last in the transaction (their rows stay locked only until the
    commit just after); returns how many this call created. A member a concurrent call created in
    between is kept if it is a plain active member (its events were recorded for it all the same,
    without the MEMBER_CREATED flag); anything else rolls the group back to be recorded again."""
    if not planned:
        return 0
    ids = sorted(planned)
    created = await events_repo.create_bare_members(connection, ids, [planned[m].event.channel for m in ids],
                                                    [planned[m].occurred_at for m in ids])
    lost = set(ids) - created
    if lost:
        facts = await events_repo.fetch_members(connection, sorted(lost))
        if len(facts) < len(lost) or any(f.status != member_pb2.MEMBER_STATUS_ACTIVE for f in facts.values()):
            raise _PlannedMemberChanged
        flagged = [i for i in accepted if i.member_id in lost]
        await events_repo.unflag_created(connection, [(i.member_id, i.event.event_id) for i in flagged])
        for item in flagged:
            item.flags.remove(event_pb2.EVENT_FLAG_MEMBER_CREATED)
    return len(created)


async def _claim(connection: DbConnection, items: list[Item]) -> list[Item]:
    """Store the new events (keyed by the member credited); the others are DUPLICATE (same payload)
    or CONFLICT. Returns the new items."""
    live = sorted((i for i in items if i.result is None), key=lambda i: (i.member_id, i.event.event_id))
    # Two events of one batch may land on the same member and id (a merged duplicate's and its
    # survivor's): the first goes on, the second is a conflict in the batch.
    first: dict[tuple[str, str], Item] = {}
    for item in live:
        target = (item.member_id, item.event.event_id)
        if target in first and first[target].request_hash != item.request_hash:
            item.reject(event_pb2.EVENT_REJECT_REASON_CONFLICT_IN_BATCH, f"events[{item.index}].event_id",
                        f"event_id also used by events[{first[target].index}] for the same member")
        elif target in first:
            item.result = event_pb2.EventResult(index=item.index, event_id=item.event.event_id,
                                                status=event_pb2.EVENT_STATUS_DUPLICATE, member_id=item.member_id)
        else:
            first[target] = item
    live = [i for i in live if i.result is None]
    if not live:
        return []
    new = await events_repo.claim_events(connection, orjson.dumps([_claim_row(i) for i in live]).decode())
    old = [i for i in live if (i.member_id, i.event.event_id) not in new]
    if old:
        stored = await events_repo.stored_hashes(connection, [(i.member_id, i.event.event_id) for i in old])
        for item in old:
            if stored.get((item.member_id, item.event.event_id)) == item.request_hash:
                item.result = event_pb2.EventResult(index=item.index, event_id=item.event.event_id,
                                                    status=event_pb2.EVENT_STATUS_DUPLICATE, member_id=item.member_id)
            else:
                item.reject(event_pb2.EVENT_REJECT_REASON_CONFLICT, f"events[{item.index}].event_id",
                            "event_id was already recorded with another payload")
    return [i for i in live if (i.member_id, i.event.event_id) in new]


async def _apply_orders(connection: DbConnection, fresh: list[Item]) -> None:
    """Purchases record their order once; refunds must fit in what is left of their order."""
    purchases = [i for i in fresh if i.event_type == types_pb2.EVENT_TYPE_PURCHASE]
    if purchases:
        inserted = await events_repo.insert_orders(connection, [
            (i.member_id, i.event.purchase.order_id, i.event.event_id, i.occurred_at,
             i.event.purchase.amount.amount_minor) for i in purchases])
        for item in purchases:
            if (item.member_id, item.event.purchase.order_id) not in inserted:
                item.reject(event_pb2.EVENT_REJECT_REASON_ORDER_ALREADY_RECORDED,
                            f"events[{item.index}].purchase.order_id", "this order was already recorded")
    refunds = [i for i in fresh if i.event_type == types_pb2.EVENT_TYPE_REFUND]
    if refunds:
        orders = await events_repo.lock_orders(connection, [(i.member_id, i.event.refund.order_id) for i in refunds])
        refunded: dict[tuple[str, str], int] = {}
        for item in sorted(refunds, key=lambda i: (i.occurred_at, i.index)):
            key = (item.member_id, item.event.refund.order_id)
            if key not in orders:
                item.reject(event_pb2.EVENT_REJECT_REASON_UNKNOWN_ORDER, f"events[{item.index}].refund.order_id",
                            "no purchase of this member has this order id")
                continue
            amount, already = orders[key]
            already = refunded.get(key, already)
            wanted = item.event.refund.amount.amount_minor
            if already + wanted > amount:
                item.reject(event_pb2.EVENT_REJECT_REASON_REFUND_EXCEEDS_ORDER, f"events[{item.index}].refund.amount",
                            f"refund {wanted} exceeds what is left of the order ({amount - already})")
                continue
            refunded[key] = already + wanted
        await events_repo.set_refunded(connection, refunded)
    rejected = [(i.member_id, i.event.event_id) for i in fresh if i.result is not None]
    await events_repo.unclaim_events(connection, rejected)


def _claim_row(item: Item) -> dict[str, Any]:
    """One event as a JSON object for claim_events: its columns."""
    event = item.event
    kind = event.WhichOneof("payload")
    order_id: str | None = None
    amount: int | None = None
    category: str | None = None
    if kind == "purchase":
        order_id, amount = event.purchase.order_id, event.purchase.amount.amount_minor
    elif kind == "refund":
        order_id, amount = event.refund.order_id, event.refund.amount.amount_minor
    elif kind in ("view", "browse", "click", "add_to_cart"):
        category = getattr(event, kind).category or None
    return {
        "n": item.index, "m": item.member_id, "e": event.event_id, "t": item.event_type,
        "o": item.occurred_at.isoformat(), "c": event.channel, "d": event.device_id or None,
        "ip": event.ip_address or None, "s": event.session_id or None, "ord": order_id, "amt": amount,
        "cat": category, "f": item.flags,
        "om": item.sent_member_id if item.sent_member_id != item.member_id else None,
        "h": base64.b64encode(item.request_hash).decode(), "p": base64.b64encode(item.stored_bytes).decode(),
    }


_DELTA_KEYS = tuple(events_repo.DELTA_KEYS.items())


def _effect_row(item: Item) -> dict[str, Any]:
    """One accepted event as a JSON object for write_accepted: the deltas it adds to the aggregates
    (counters that stay zero left out), its visit key and, for earning events, its outbox payload."""
    event = item.event
    delta = rules.delta_of(event)
    row: dict[str, Any] = {"n": item.index, "m": item.member_id, "e": event.event_id, "t": item.event_type,
                           "o": item.occurred_at.isoformat(), "sk": rules.session_key(event, item.occurred_at)}
    for counter, key in _DELTA_KEYS:
        value = getattr(delta, counter)
        if value:
            row[key] = value
    if delta.categories:
        row["cats"] = [[name, *values] for name, values in delta.categories.items()]
    if item.event_type in rules.OUTBOX_EVENT_TYPES:
        row["ok"] = OUTBOX_KIND_REVERSAL if item.event_type == types_pb2.EVENT_TYPE_REFUND else OUTBOX_KIND_ACCRUAL
        row["ob"] = base64.b64encode(_accrual(item)).decode()
    return row


def _accrual(item: Item) -> bytes:
    """The rewards Accrual that an earning event becomes (sent by the outbox relay)."""
    event = item.event
    accrual = earning_pb2.Accrual(
        source_event_id=event.event_id, member_id=item.member_id, event_type=cast(Any, item.event_type),
        device_id=event.device_id, ip=event.ip_address, channel=event.channel,
    )
    accrual.occurred_at.CopyFrom(event.occurred_at)
    kind = event.WhichOneof("payload")
    if kind == "browse":
        accrual.browse_seconds = event.browse.seconds
    elif kind == "purchase" or kind == "refund":
        order = event.purchase if kind == "purchase" else event.refund
        accrual.order_id = order.order_id
        accrual.amount.CopyFrom(order.amount)
        for line in order.items:
            accrual.items.add(sku=line.sku, category_id=line.category, quantity=line.quantity,
                              unit_price=line.unit_price)
    return accrual.SerializeToString()


async def _write_effects(connection: DbConnection, accepted: list[Item]) -> None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # the outbox rows carry the trace of the request that wrote them
    await events_repo.write_accepted(connection, orjson.dumps([_effect_row(i) for i in accepted]).decode(),
                                     orjson.dumps(carrier).decode())


async def _record_group(pool: asyncpg.Pool, group: list[Item], create_unknown: bool) -> int:
    """One shard's events in one transaction; returns the members it created."""
    async with pool.acquire() as connection, connection.transaction():
        planned = await _resolve_members(connection, group, create_unknown)
        fresh = await _claim(connection, group)
        await _apply_orders(connection, fresh)
        accepted = [i for i in fresh if i.result is None]
        if accepted:
            await _write_effects(connection, accepted)
        created = await _create_planned(connection, planned, accepted)
    for item in accepted:
        item.result = event_pb2.EventResult(index=item.index, event_id=item.event.event_id,
                                            status=event_pb2.EVENT_STATUS_ACCEPTED, flags=cast(Any, item.flags),
                                            member_id=item.member_id)
    return created


async def record_events(pool: asyncpg.Pool, request: profile_service_pb2.BatchRecordEventsRequest,
                        currency: str, now: datetime | None = None, shards: int = 1
                        ) -> profile_service_pb2.BatchRecordEventsResponse:
    """Record a batch: one transaction per shard of the members it names (one on one database),
    so no transaction writes two shards; an event merged into a member of another shard, or a
    member created for it, is the exception (libs.distribution)."""
    now = now or datetime.now(UTC)
    items = [_prepare(index, event, now, currency) for index, event in enumerate(request.events)]
    _dedupe_within_batch(items)
    members_created = 0
    for group in by_shard((i for i in items if i.result is None), lambda i: i.sent_member_id, shards):
        for attempt in range(PLANNED_MEMBER_ATTEMPTS):
            try:
                members_created += await _record_group(pool, group, request.create_unknown_members)
                break
            except _PlannedMemberChanged:
                if attempt == PLANNED_MEMBER_ATTEMPTS - 1:
                    raise errors.aborted("members named by the batch kept changing while it was recorded; "
                                         "send it again") from None
                # Rolled back: record the group afresh, reading the members as they are now.
                group = [_prepare(i.index, request.events[i.index], now, currency) for i in group]
                for item in group:
                    items[item.index] = item
    response = profile_service_pb2.BatchRecordEventsResponse(members_created=members_created)
    for item in items:
        assert item.result is not None
        response.results.append(item.result)
        if item.result.status == event_pb2.EVENT_STATUS_ACCEPTED:
            response.accepted_count += 1
            if item.result.flags:
                response.flagged_count += 1
        elif item.result.status == event_pb2.EVENT_STATUS_DUPLICATE:
            response.duplicate_count += 1
        else:
            response.rejected_count += 1
    span = trace.get_current_span()
    span.set_attribute("loyalty.events.accepted", response.accepted_count)
    span.set_attribute("loyalty.events.rejected", response.rejected_count)
    return response
