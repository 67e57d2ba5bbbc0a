"""Rewards ledger speed, two figures from one run, each with a baseline measured in the same run:

1. Accrue in batches of 100 with risk answering ALLOW, end to end (points priced, risk assessed
   over gRPC, accrual rows, entries, lots, balances, usage): credits/s, against a raw asyncpg
   batched INSERT + UPDATE of the same credits, 100 per transaction (target: >= 5,000 credits/s,
   aim for 20% of the raw figure). Measured at each level of --streams (batches in flight at
   once, as several relays would send them); the capacity is the best level. With too few
   batches in flight the cores idle while every batch waits on another process (rewards, risk,
   PostgreSQL each take their turn), so a single level would time the pipeline's latency, not
   what the machine can credit;
2. Redeem paced at --rate a second for --seconds over gRPC on loopback (open loop), p50 / p99,
   against the round trip of a read that touches one row (target: p99 under 15 ms at 200/s).

Risk and rewards run as real processes on a throw-away database. Every credit is a new member's
(each level has members of its own), so risk's velocity rule never sends a credit to review.

    .venv/bin/python -m bench.rewards_ledger [--batches 100] [--streams 4,8] [--rate 200] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench.harness import Timer, database, paced, percentile, service
from libs.auth import ensure_dev_tokens
from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2, rewards_pb2, rewards_pb2_grpc
from tests.support.processes import free_port

BATCH = 100


def accrual(member_id: str, amount_minor: int, n: int) -> earning_pb2.Accrual:
    a = earning_pb2.Accrual(source_event_id=f"ev-{uuid.uuid4().hex}", member_id=member_id,
                            event_type=types_pb2.EVENT_TYPE_PURCHASE, order_id=f"o-{uuid.uuid4().hex[:16]}",
                            device_id=f"d-{member_id}", ip=f"10.{n % 250}.{(n // 250) % 250}.{n % 200 + 1}",
                            channel=types_pb2.CHANNEL_APP)
    a.amount.amount_minor = amount_minor
    a.amount.currency = "CNY"
    a.occurred_at.FromDatetime(datetime.now(UTC))
    return a


async def accrue_batches(stub: Any, md: Any, batches: int, streams: int, members: str = "bm"
                         ) -> tuple[float, dict[str, int]]:
    """`batches` Accrue calls of 100 distinct members each (named `members`-batch-item), `streams`
    at once (as several relays)."""
    prepared = [rewards_pb2.AccrueRequest(accruals=[accrual(f"{members}-{b}-{i}", 5_000 + 37 * i, b * BATCH + i)
                                                    for i in range(BATCH)]) for b in range(batches)]
    queue = list(prepared)
    counts: Counter[earning_pb2.AccrualOutcome.ValueType] = Counter()

    async def caller() -> None:
        while queue:
            response = await stub.Accrue(queue.pop(), metadata=md, timeout=120)
            counts.update(r.outcome for r in response.results)

    with Timer() as timer:
        await asyncio.gather(*(caller() for _ in range(streams)))
    return batches * BATCH / timer.seconds, {earning_pb2.AccrualOutcome.Name(k): n for k, n in counts.items()}


async def raw_credits(dsn: str, batches: int) -> float:
    """The same number of credits as one INSERT of 100 entries + one UPDATE of 100 balances per
    transaction, into bare tables: what the ledger would cost without any logic. The tables are
    ordinary (logged) ones, committed as durably as the ledger's: temporary tables skip the
    write-ahead log, a saving no durable ledger can have (about 1.5 times faster here)."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(
            "CREATE SCHEMA raw_bench;"
            "CREATE TABLE raw_bench.entries (member_id text, entry_id bigint, points bigint, created_at timestamptz,"
            " PRIMARY KEY (member_id, entry_id));"
            "CREATE TABLE raw_bench.balances (member_id text PRIMARY KEY, posted bigint)")
        members = [[f"rm-{b}-{i}" for i in range(BATCH)] for b in range(batches)]
        await connection.execute("INSERT INTO raw_bench.balances SELECT unnest($1::text[]), 0",
                                 [m for batch in members for m in batch])
        points = [50 + i for i in range(BATCH)]
        with Timer() as timer:
            for b, batch in enumerate(members):
                async with connection.transaction():
                    await connection.execute(
                        "INSERT INTO raw_bench.entries SELECT m, $2 + n, p, now()"
                        " FROM unnest($1::text[], $3::bigint[]) WITH ORDINALITY AS u(m, p, n)",
                        batch, b * BATCH, points)
                    await connection.execute(
                        "UPDATE raw_bench.balances SET posted = posted + u.p"
                        " FROM unnest($1::text[], $2::bigint[]) AS u(m, p) WHERE member_id = u.m", batch, points)
        await connection.execute("DROP SCHEMA raw_bench CASCADE")
        return batches * BATCH / timer.seconds
    finally:
        await connection.close()


async def redeemers(stub: Any, md: Any, count: int) -> list[str]:
    """Members with plenty of points (manual credits: no risk involved)."""
    members = [f"rd-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    for m in members:
        await stub.AdjustPoints(rewards_pb2.AdjustPointsRequest(request_id=f"seed-{m}", member_id=m, points=1_000_000,
                                                                reason="benchmark seed"), metadata=md)
    return members


async def settle(dsn: str) -> None:
    """Vacuum and analyse what the Accrue phase inserted, then checkpoint: otherwise autovacuum and
    the write-back of tens of thousands of fresh rows run during the Redeem measurement, and it
    times them (a steady stream of credits keeps up with its vacuuming instead)."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("VACUUM (ANALYZE)")
        await connection.execute("CHECKPOINT")
    finally:
        await connection.close()


async def read_round_trip(stub: Any, md: Any, member_id: str, n: int = 500) -> dict[str, float]:
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        await stub.GetBalance(rewards_pb2.GetBalanceRequest(member_id=member_id), metadata=md)
        latencies.append((time.perf_counter() - started) * 1e3)
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}


async def run(dsn: str, state_dir: Path, args: argparse.Namespace) -> None:
    tokens = ensure_dev_tokens(state_dir)
    md = (("authorization", f"Bearer {tokens['admin']}"),)
    risk_port = free_port()
    with service("risk", dsn, state_dir, port=risk_port), \
            service("rewards", dsn, state_dir, LOYALTY_RISK_ADDR=f"127.0.0.1:{risk_port}") as rewards:
        async with grpc.aio.insecure_channel(rewards.address) as channel:
            stub = rewards_pb2_grpc.RewardsServiceStub(channel)
            await accrue_batches(stub, md, 2, 1, members="warm")
            # Each level credits members of its own: no member earns twice.
            levels = [(streams, *await accrue_batches(stub, md, args.batches, streams, members=f"bm{streams}"))
                      for streams in args.streams]
            members = await redeemers(stub, md, 200)
            await settle(dsn)
            base = await read_round_trip(stub, md, members[0])
            counter = iter(range(10**9))

            def redeem() -> Any:
                n = next(counter)
                return stub.Redeem(rewards_pb2.RedeemRequest(request_id=f"rd-{n}", member_id=members[n % len(members)],
                                                             points=100), metadata=md, timeout=5)

            sustained = await paced(redeem, args.rate, args.seconds)
    raw_rate = await raw_credits(dsn, args.batches)
    for streams, rate, outcomes in levels:
        print(f"Accrue, batches of {BATCH} with risk ALLOW, {streams} in flight: {rate:,.0f} credits/s  "
              f"outcomes {outcomes}")
    best_streams, accrue_rate, _ = max(levels, key=lambda level: level[1])
    print(f"Accrue capacity (best level, {best_streams} in flight): {accrue_rate:,.0f} credits/s   "
          f"(target >= 5,000/s: {'met' if accrue_rate >= 5_000 else 'NOT met'})")
    print(f"  baseline raw asyncpg INSERT+UPDATE, 100 per transaction: {raw_rate:,.0f} credits/s; "
          f"ratio {accrue_rate / raw_rate:.3f} (aim >= 0.20)")
    print(f"Redeem at {args.rate:.0f}/s for {args.seconds:.0f} s: {sustained['calls']:.0f} calls, "
          f"{sustained['errors']:.0f} errors, achieved {sustained['achieved_per_s']:.0f}/s")
    print(f"  latency p50 {sustained['p50_ms']:.2f} ms  p99 {sustained['p99_ms']:.2f} ms  max "
          f"{sustained['max_ms']:.1f} ms   (target p99 < 15 ms: {'met' if sustained['p99_ms'] < 15 else 'NOT met'})")
    print(f"  baseline GetBalance round trip: p50 {base['p50_ms']:.2f} ms  p99 {base['p99_ms']:.2f} ms; "
          f"ratio p99 {sustained['p99_ms'] / base['p99_ms']:.1f}x")


def _levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",")]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("give one or more positive counts, e.g. 4,8")
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--streams", type=_levels, default=[4, 8],
                        help="Accrue calls in flight at once; a comma-separated list measures each level")
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    with database() as dsn, tempfile.TemporaryDirectory(prefix="loyalty-bench-") as state:
        asyncio.run(run(dsn, Path(state), args))


if __name__ == "__main__":
    main()
