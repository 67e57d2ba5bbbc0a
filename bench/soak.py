"""Soak: the mixed load of bench/load.py for a long time (30 minutes by default), in windows, with
each service's memory and PostgreSQL's connections sampled after every window. It passes when the
books hold after every window (bench/load.py's checks) and memory and connections stay flat: the
last third of the windows may not exceed the first third's (after the first window, which warms
caches and pools up) by more than 10 % + 20 MiB of resident memory per service, or by any
database connection.

    .venv/bin/python -m bench.soak [--minutes 30] [--window 60] [--rate 30] [--members 300]

Not in the test command (it is the run that takes the time); docs/reliability.md records the last
figures.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.harness import database, service
from bench.load import HISTORY_DAYS, LoadRun
from libs.auth import ensure_dev_tokens
from libs.settings import SERVICE_NAMES
from tests.support.processes import free_port
from tools.demo import generate

RSS_SLACK = 1.10
RSS_SLACK_MB = 20.0


def rss_now_mb(pid: int) -> float:
    """Resident set size (VmRSS) of a process now, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Sample:
    window: int
    rss_mb: dict[str, float]
    connections: int
    worst_p99_ms: float
    errors: int
    books_ok: bool


def flat(samples: list[Sample]) -> list[str]:
    """Why memory or connections did not stay flat ([] when they did)."""
    steady = samples[1:]
    if len(steady) < 3:
        return ["too few windows to judge (at least 4)"]
    third = max(1, len(steady) // 3)
    first, last = steady[:third], steady[-third:]
    problems = []
    for name in first[0].rss_mb:
        before = max(s.rss_mb[name] for s in first)
        after = max(s.rss_mb[name] for s in last)
        if after > before * RSS_SLACK + RSS_SLACK_MB:
            problems.append(f"{name} grew from {before:.0f} to {after:.0f} MiB")
    before_conn = max(s.connections for s in first)
    after_conn = max(s.connections for s in last)
    if after_conn > before_conn:
        problems.append(f"database connections grew from {before_conn} to {after_conn}")
    return problems


async def soak(dsn: str, pids: dict[str, int], address: dict[str, str], token: str, minutes: float,
               window_s: float, rate: float, members: int) -> list[Sample]:
    population = generate(seed=1, members=members, days=HISTORY_DAYS, rings=1)
    load = LoadRun(lambda name: address[name], token, population)
    samples: list[Sample] = []
    try:
        await load.prepare()
        windows = max(1, int(minutes * 60 // window_s))
        for window in range(windows):
            report = await load.run(rate, window_s)
            conn = await asyncpg.connect(dsn)
            try:
                connections = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()") - 1
            finally:
                await conn.close()
            sample = Sample(window, {n: rss_now_mb(pid) for n, pid in pids.items()}, connections,
                            report.worst_p99_ms, report.errors, report.books_ok)
            samples.append(sample)
            rss = "  ".join(f"{n} {mb:5.0f} MiB" for n, mb in sample.rss_mb.items())
            print(f"window {window + 1:3d}/{windows}: worst p99 {sample.worst_p99_ms:6.1f} ms, errors {sample.errors},"
                  f" books {'ok' if sample.books_ok else 'NOT OK'}; {rss}; db connections {connections}", flush=True)
    finally:
        await load.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of load between samples (default 60)")
    parser.add_argument("--rate", type=float, default=30.0, help="operations a second (default 30)")
    parser.add_argument("--members", type=int, default=300)
    args = parser.parse_args()
    state_dir = Path(tempfile.mkdtemp(prefix="loyalty-soak-"))
    token = ensure_dev_tokens(state_dir)["admin"]
    ports = {name: free_port() for name in SERVICE_NAMES}
    env = {f"LOYALTY_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in ports.items()}
    with database() as dsn, ExitStack() as stack:
        processes = {name: stack.enter_context(service(name, dsn, state_dir, port=ports[name], **env))
                     for name in ("risk", "rewards", "profile", "scoring")}
        samples = asyncio.run(soak(dsn, {n: p.process.pid for n, p in processes.items()},
                                   {n: p.address for n, p in processes.items()}, token, args.minutes,
                                   args.window, args.rate, args.members))
    problems = flat(samples)
    problems += [f"window {s.window + 1}: books not ok" for s in samples if not s.books_ok]
    problems += [f"window {s.window + 1}: {s.errors} errors" for s in samples if s.errors]
    print("soak: " + ("memory and connections flat, books kept in every window" if not problems
                      else "FAILED: " + "; ".join(problems)))
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
