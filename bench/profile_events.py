"""BatchRecordEvents throughput over gRPC on loopback (batches of 500 mixed events, aggregates
updated), reported with its ratio to a raw asyncpg COPY of the same event rows in the same run.
The outbox rows are written as always, but profile's relay is off (no rewards runs here; its
delivery is measured end to end by bench/load.py).

    .venv/bin/python -m bench.profile_events [--events 100000] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import psutil

from bench.harness import Timer, database, service
from loyalty.profile.v1 import event_pb2, profile_service_pb2, profile_service_pb2_grpc

BATCH_EVENTS = 500


def make_events(count: int, members: int, seed: int = 7) -> list[event_pb2.BehaviourEvent]:
    """A realistic mix: mostly views, browses and searches; some carts, purchases and refunds."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    orders: list[tuple[str, str, int]] = []
    events = []
    for n in range(count):
        member = f"bm-{rng.randrange(members):07d}"
        event = event_pb2.BehaviourEvent(event_id=f"be-{n:09d}", member_id=member, channel=rng.choice([1, 2, 3]),
                                         session_id=f"s-{rng.randrange(members * 3)}",
                                         device_id=f"d-{rng.randrange(9999)}",
                                         ip_address=f"10.{rng.randrange(255)}.{rng.randrange(255)}.{rng.randrange(255)}")
        event.occurred_at.FromDatetime(now - timedelta(minutes=rng.randrange(60 * 24 * 300)))
        roll = rng.random()
        category = rng.choice(["books", "toys", "garden", "electronics", "food", "beauty"])
        if roll < 0.45:
            event.view.product_id = f"p-{rng.randrange(50_000)}"
            event.view.category = category
        elif roll < 0.65:
            event.browse.seconds = rng.randrange(30, 3_000)
            event.browse.category = category
        elif roll < 0.78:
            event.search.query = rng.choice(["shoes", "phone", "gift", "tea"])
        elif roll < 0.86:
            event.add_to_cart.product_id = f"p-{rng.randrange(50_000)}"
            event.add_to_cart.quantity = 1
            event.add_to_cart.unit_price.amount_minor = rng.randrange(100, 50_000)
            event.add_to_cart.unit_price.currency = "CNY"
        elif roll < 0.98 or not orders:
            order = f"o-{uuid.uuid4().hex[:16]}"
            amount = rng.randrange(1_000, 200_000)
            event.purchase.order_id = order
            event.purchase.amount.amount_minor = amount
            event.purchase.amount.currency = "CNY"
            event.purchase.items.add(sku=f"sku-{rng.randrange(9999)}", category=category, quantity=1,
                                     unit_price={"amount_minor": amount, "currency": "CNY"})
            orders.append((member, order, amount))
        else:
            member, order, amount = orders.pop(rng.randrange(len(orders)))
            event.member_id = member
            event.refund.order_id = order
            event.refund.amount.amount_minor = amount // 2
            event.refund.amount.currency = "CNY"
        events.append(event)
    return events


async def send_all(address: str, token: str, events: list[event_pb2.BehaviourEvent], concurrency: int) -> int:
    batches = [events[i:i + BATCH_EVENTS] for i in range(0, len(events), BATCH_EVENTS)]
    queue: asyncio.Queue[list[event_pb2.BehaviourEvent]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)
    accepted = 0
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = profile_service_pb2_grpc.ProfileServiceStub(channel)

        async def worker() -> None:
            nonlocal accepted
            while not queue.empty():
                batch = queue.get_nowait()
                reply = await stub.BatchRecordEvents(
                    profile_service_pb2.BatchRecordEventsRequest(events=batch, create_unknown_members=True),
                    metadata=(("authorization", f"Bearer {token}"),), timeout=60)
                accepted += reply.accepted_count

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return accepted


async def raw_copy(dsn: str, events: list[event_pb2.BehaviourEvent]) -> float:
    """The floor: COPY the same event rows into a bare table (no checks, no aggregates)."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("CREATE TABLE bench_events_copy (member_id text, event_id text, event_type smallint,"
                                 " occurred_at timestamptz, payload bytea)")
        rows = [(e.member_id, e.event_id, 1, e.occurred_at.ToDatetime(tzinfo=UTC), e.SerializeToString())
                for e in events]
        with Timer() as timer:
            await connection.copy_records_to_table("bench_events_copy", records=rows)
        return timer.seconds
    finally:
        await connection.close()


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    events = make_events(args.events, args.members)
    state = Path(tempfile.mkdtemp(prefix="loyalty-bench-state-"))
    # No rewards runs here: the relay is off rather than retrying a dead address between batches.
    with database() as dsn, service("profile", dsn, state, LOYALTY_OUTBOX_RELAY_ENABLED="false") as profile:
        token = json.loads((state / "dev-tokens.json").read_text())["admin"]
        warm = make_events(2_000, 500, seed=99)
        for e in warm:
            e.event_id = "warm-" + e.event_id
        asyncio.run(send_all(profile.address, token, warm, args.concurrency))
        server = psutil.Process(profile.process.pid)
        postgres = [p for p in psutil.process_iter(["name", "cmdline"]) if "postgres" in (p.info["name"] or "")]
        before = cpu_seconds([server]), cpu_seconds(postgres), time.process_time()
        with Timer() as timer:
            accepted = asyncio.run(send_all(profile.address, token, events, args.concurrency))
        used = (cpu_seconds([server]) - before[0], cpu_seconds(postgres) - before[1], time.process_time() - before[2])
        copy_s = asyncio.run(raw_copy(dsn, events))
    rate = args.events / timer.seconds
    copy_rate = args.events / copy_s
    print(f"BatchRecordEvents: {args.events} events in {timer.seconds:.2f}s = {rate:,.0f} events/s "
          f"(accepted {accepted}, batches of {BATCH_EVENTS}, {args.concurrency} in flight)")
    per_event = [seconds / args.events * 1e6 for seconds in used]
    print(f"CPU per event: service {per_event[0]:.0f} us, PostgreSQL {per_event[1]:.0f} us, "
          f"load client {per_event[2]:.0f} us (2 cores: {2e6 / args.events * timer.seconds:.0f} us "
          "of core time per event available)")
    print(f"raw COPY of the same rows: {copy_rate:,.0f} rows/s")
    print(f"ratio BatchRecordEvents / raw COPY = {rate / copy_rate:.3f}   (target: >= 15,000 events/s)")


if __name__ == "__main__":
    main()
