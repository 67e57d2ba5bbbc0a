"""StreamFeatures of N members (default 1,000,000) over gRPC: seconds, and peak RSS of the client
and the server, with the ratio to a raw `COPY ... TO STDOUT` of the same daily buckets in the run.

    .venv/bin/python -m bench.profile_features [--members 1000000] [--days 4] [--all-features]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import random
import resource
import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench.harness import Timer, database, rss_mb, service
from libs.migrations import migrate
from loyalty.profile.v1 import profile_service_pb2, profile_service_pb2_grpc
from services.profile.bootstrap import SERVICE_DIR

SCORING_FEATURES = ["purchase_count_365d", "net_spend_365d", "average_order_value", "visit_count_90d",
                    "browse_minutes_90d", "refund_ratio_365d", "tenure_days", "days_since_last_purchase"]


async def load(dsn: str, members: int, days: int) -> None:
    """Members and their daily buckets straight through COPY (the loader, not what is measured)."""
    connection = await asyncpg.connect(dsn)
    try:
        await migrate(connection, "profile", SERVICE_DIR / "migrations")
        rng = random.Random(1)
        joined = datetime(2024, 1, 1, tzinfo=UTC)
        batch = 100_000
        for start in range(0, members, batch):
            ids = [f"fm-{n:08d}" for n in range(start, min(members, start + batch))]
            await connection.copy_records_to_table(
                "members", schema_name="profile", columns=["member_id", "channel", "region", "joined_at"],
                records=[(m, 1 + n % 3, f"CN-{n % 30:02d}", joined + timedelta(days=n % 300)) for n, m in
                         enumerate(ids)])
            today = date.today()
            rows = []
            for m in ids:
                for _ in range(days):
                    day = today - timedelta(days=rng.randrange(400))
                    rows.append((m, day, rng.randrange(2), rng.randrange(50_000), rng.randrange(3), 0, 0,
                                 rng.randrange(3), rng.randrange(3_000), rng.randrange(20), rng.randrange(3),
                                 rng.randrange(5), rng.randrange(2)))
            buffer = io.BytesIO()
            seen = set()
            for row in rows:
                if (row[0], row[1]) in seen:
                    continue
                seen.add((row[0], row[1]))
                buffer.write(("\t".join(str(v) for v in row) + "\n").encode())
            buffer.seek(0)
            await connection.copy_to_table(
                "member_daily", schema_name="profile", source=buffer,
                columns=["member_id", "day", "purchase_count", "spend_minor", "items_purchased", "refund_count",
                         "refund_minor", "visit_count", "browse_seconds", "view_count", "search_count",
                         "click_count", "cart_add_count"])
        await connection.execute("ANALYZE profile.members; ANALYZE profile.member_daily")
    finally:
        await connection.close()


async def raw_copy_seconds(dsn: str) -> float:
    connection = await asyncpg.connect(dsn)
    try:
        sink = io.BytesIO()
        with Timer() as timer:
            await connection.copy_from_query("SELECT * FROM profile.member_daily ORDER BY member_id, day", output=sink)
        return timer.seconds
    finally:
        await connection.close()


async def stream(address: str, token: str, features: list[str]) -> tuple[int, int]:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    members = 0
    chunks = 0
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = profile_service_pb2_grpc.ProfileServiceStub(channel)
        request = profile_service_pb2.StreamFeaturesRequest(feature_names=features, chunk_size=10_000)
        async for message in stub.StreamFeatures(request, metadata=(("authorization", f"Bearer {token}"),),
                                                 timeout=600):
            if message.HasField("chunk"):
                members += len(message.chunk.member_ids)
                chunks += 1
    return members, chunks


def _client(address: str, token: str, features: list[str], results: Any) -> None:
    members, chunks = asyncio.run(stream(address, token, features))
    results.put((members, chunks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=4, help="daily buckets per member")
    parser.add_argument("--all-features", action="store_true", help="the whole catalogue instead of 8 features")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="loyalty-bench-state-"))
    with database() as dsn:
        with Timer() as loading:
            asyncio.run(load(dsn, args.members, args.days))
        print(f"loaded {args.members:,} members x ~{args.days} daily buckets in {loading.seconds:.1f}s")
        with service("profile", dsn, state) as profile:
            token = json.loads((state / "dev-tokens.json").read_text())["admin"]
            features = [] if args.all_features else SCORING_FEATURES
            # The client runs in its own process so its peak RSS is the stream's, not the loader's.
            context = multiprocessing.get_context("spawn")
            results: Any = context.Queue()
            with Timer() as timer:
                client = context.Process(target=_client, args=(profile.address, token, features, results))
                client.start()
                members, chunks, client_rss = results.get(timeout=900)
                client.join()
            server_rss = rss_mb(profile.process.pid)
        copy_s = asyncio.run(raw_copy_seconds(dsn))
    columns = "the whole catalogue" if args.all_features else f"{len(SCORING_FEATURES)} features"
    print(f"StreamFeatures: {members:,} members ({columns}) in {chunks} chunks, {timer.seconds:.1f}s "
          f"= {members / timer.seconds:,.0f} members/s   (target: under 20 s for 1,000,000)")
    print(f"peak RSS: server {server_rss:.0f} MB (target < 500 MB), client {client_rss:.0f} MB")
    print(f"raw COPY of the daily buckets: {copy_s:.1f}s; ratio stream / raw COPY = {timer.seconds / copy_s:.2f}")


if __name__ == "__main__":
    main()
