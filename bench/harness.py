"""Shared benchmark plumbing: a throw-away database, real service processes, RSS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from libs.auth import ensure_dev_tokens
from tests.support.database import throwaway_database
from tests.support.processes import RunningProcess, free_port, start_module


def database() -> AbstractContextManager[str]:
    """A DSN to a fresh database: DATABASE_URL's cluster if set, else an embedded one."""
    return throwaway_database("loyalty_bench")


@contextmanager
def service(name: str, dsn: str, state_dir: Path, port: int | None = None, **env: str) -> Iterator[RunningProcess]:
    ensure_dev_tokens(state_dir)
    full_env = {"DATABASE_URL": dsn, "LOYALTY_STATE_DIR": str(state_dir), "LOYALTY_LOG_LEVEL": "WARNING",
                # Nothing listens here: the outbox relay backs off quietly instead of delivering.
                "LOYALTY_REWARDS_ADDR": f"127.0.0.1:{free_port()}", **env}
    process = start_module(name, f"services.{name}", full_env, state_dir / "logs", port=port)
    try:
        process.wait_status("SERVING", timeout_s=120)
        yield process
    finally:
        process.terminate()


def rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Timer:
    def __enter__(self) -> Timer:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


async def open_loop(start_one: Callable[[float], Coroutine[Any, Any, None]], rate: float, seconds: float,
                    wait_s: float | None = None) -> float:
    """Start `start_one(scheduled)` `rate` times a second for `seconds`, each at its scheduled time
    whether or not the earlier ones have answered (open loop: a stall is not hidden), then wait
    for those in flight (at most `wait_s`); returns the seconds elapsed."""
    in_flight: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []

    def finished(task: asyncio.Task[None]) -> None:
        in_flight.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            failures.append(error)

    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(start_one(scheduled))
        in_flight.add(task)
        task.add_done_callback(finished)
    if in_flight:
        await asyncio.wait(set(in_flight), timeout=wait_s)
    if failures:  # what the caller did not expect is not hidden
        raise failures[0]
    return time.perf_counter() - start


async def paced(call: Callable[[], Awaitable[object]], rate: float, seconds: float) -> dict[str, float]:
    """Start `call` `rate` times a second for `seconds` (open loop: each latency counts from the call's
    scheduled start, so a stall is not hidden); p50 / p99 / max and the errors."""
    total = int(rate * seconds)
    latencies: list[float] = []
    errors = 0

    async def one(scheduled: float) -> None:
        nonlocal errors
        try:
            await call()
            latencies.append((time.perf_counter() - scheduled) * 1e3)
        except grpc.aio.AioRpcError:
            errors += 1

    elapsed = await open_loop(one, rate, seconds)
    return {"calls": total, "errors": errors, "achieved_per_s": len(latencies) / elapsed,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies) if latencies else float("nan")}
