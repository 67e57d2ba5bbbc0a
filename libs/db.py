"""PostgreSQL access: where the database is (external DATABASE_URL or the embedded pgserver
cluster), and an asyncpg pool whose connections work inside one service's schema."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from libs.db_tracing import trace_connection
from libs.settings import Settings
from libs.telemetry import tracing_enabled

log = logging.getLogger(__name__)

# What repositories accept: a plain connection or one borrowed from a pool.
DbConnection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

EMBEDDED_DATABASE = "loyalty"

_PARAM = re.compile(r"\$(\d+)")


class Writes:
    """Several INSERT / UPDATE / DELETE statements sent as one, so the writes of a transaction cost
    one round trip instead of one each. Each statement keeps its own `$1...` numbering; `execute`
    renumbers them and sends `WITH w0 AS (...), w1 AS (...) SELECT 1`.

    PostgreSQL runs such data-modifying WITH items on one snapshot, each exactly once and to
    completion, and none sees the rows another one writes. So the statements added together must
    touch different rows and must not read what another one writes (an insert of entries next to an
    update of balances is fine; two updates of one row are not). Constraints are checked at the end
    of the statement, as for separate statements in a transaction."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, tuple[Any, ...]]] = []

    def add(self, sql: str, *args: Any) -> None:
        sql = sql.strip().rstrip(";")
        if "$$" in sql:
            raise ValueError("dollar-quoted text cannot be renumbered")
        used = max((int(n) for n in _PARAM.findall(sql)), default=0)
        if used != len(args):
            raise ValueError(f"the statement uses ${used} as its last parameter but {len(args)} were given")
        self._parts.append((sql, args))

    def __len__(self) -> int:
        return len(self._parts)

    def statement(self) -> tuple[str, list[Any]]:
        """The combined statement and its arguments (the single statement itself when alone)."""
        if len(self._parts) == 1:
            sql, args = self._parts[0]
            return sql, list(args)
        items: list[str] = []
        values: list[Any] = []
        for i, (sql, args) in enumerate(self._parts):
            offset = len(values)

            def shifted(match: re.Match[str], offset: int = offset) -> str:
                return f"${int(match.group(1)) + offset}"

            items.append(f"w{i} AS ({_PARAM.sub(shifted, sql)})")
            values.extend(args)
        return "WITH " + ",\n".join(items) + "\nSELECT 1", values

    async def execute(self, conn: DbConnection) -> None:
        """Send everything added (nothing when empty) and start afresh."""
        if not self._parts:
            return
        sql, values = self.statement()
        self._parts = []
        await conn.execute(sql, *values)


def embedded_pgdata(settings: Settings) -> Path:
    return settings.state_dir / "pgdata"


def start_embedded_postgres(pgdata: Path) -> Any:
    """Start (or attach to) the embedded PostgreSQL in `pgdata` and make sure our database exists.

    pgserver runs the server as a detached postmaster shared by every process that points at the
    same folder, so the supervisor and a service started alone agree on one cluster.
    """
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver_handle(pgdata)
    tune_embedded_postgres(pgdata, server)
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DATABASE}';")
    if "1 row" not in exists:
        server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE};")
    return server


# Settings for the embedded cluster on a developer machine (24 GiB, SSD): a bigger buffer cache,
# fewer and smoother checkpoints, and compressed full-page images, which dominate the WAL of an
# insert-heavy load. Durability is untouched (fsync and synchronous_commit stay on).
EMBEDDED_SETTINGS: dict[str, str] = {
    "shared_buffers": "512MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
    "checkpoint_completion_target": "0.9",
    "wal_compression": "on",
    "wal_buffers": "16MB",
    "random_page_cost": "1.1",
    "effective_cache_size": "4GB",
}


def tune_embedded_postgres(pgdata: Path, server: Any) -> None:
    """Apply EMBEDDED_SETTINGS once (restarting the cluster when a setting needs it)."""
    from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

    marker = pgdata / "loyalty-tuned"
    if marker.exists():
        return
    for name, value in EMBEDDED_SETTINGS.items():
        server.psql(f"ALTER SYSTEM SET {name} = '{value}';")
    # pg_ctl restart reuses the options the server was started with (socket dir, no TCP).
    pg_ctl(["-w", "-m", "fast", "-l", str(server.log), "restart"], pgdata=pgdata.resolve(), user=server.system_user,
           timeout=60)
    marker.write_text("settings applied: " + ", ".join(f"{k}={v}" for k, v in EMBEDDED_SETTINGS.items()) + "\n")


def stop_embedded_postgres(pgdata: Path) -> None:
    """Stop the embedded cluster (fast shutdown: sessions are disconnected, data is flushed).

    Done with pg_ctl directly rather than pgserver's handle bookkeeping, which only stops a server
    whose last handle in its own pid list is closing, and leaves it running after any crash."""
    if not (pgdata / "postmaster.pid").exists():
        return
    from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

    server = pgserver_handle(pgdata)
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata.resolve(), user=server.system_user)


# The database went away or is not taking connections yet: a crash, a restart, a fail-over.
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.CannotConnectNowError,  # 57P03: starting up or recovering
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,  # 57P02: another backend crashed
    asyncpg.ConnectionDoesNotExistError,  # the connection closed mid-operation
)


def database_unavailable(error: BaseException) -> bool:
    """Whether `error` says the database cannot be reached right now (the caller may retry), not
    that the request or the code is wrong: a connection error from asyncpg, or an OS-level one
    (refused, reset, the socket file gone) raised while asyncpg was connecting or talking."""
    if isinstance(error, _UNAVAILABLE_ERRORS):
        return True
    if isinstance(error, asyncpg.InterfaceError):
        return "connection is closed" in str(error) or "connection was closed" in str(error)
    if isinstance(error, (ConnectionError, FileNotFoundError, TimeoutError)):
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_globals.get("__name__", "").startswith("asyncpg"):
                return True
            tb = tb.tb_next
    return False


def pgserver_handle(pgdata: Path) -> Any:
    import pgserver

    # platformdirs warns on every start when XDG_RUNTIME_DIR is unset (root shells, CI): harmless.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    return pgserver.get_server(pgdata, cleanup_mode=None)  # type: ignore[attr-defined]


def resolve_database_url(settings: Settings) -> str:
    """DATABASE_URL if set, else the embedded cluster under the state folder (started if needed)."""
    if settings.database_url:
        return settings.database_url
    server = start_embedded_postgres(embedded_pgdata(settings))
    return str(server.get_uri(EMBEDDED_DATABASE))


async def _reset_if_dirty(connection: asyncpg.Connection) -> None:
    """Release-time reset, skipped for a clean connection.

    asyncpg's default reset costs one round trip on every release (UNLISTEN, RESET ALL, advisory
    unlock). Our code never leaves session state behind: transactions are context managers, advisory
    locks are transaction-scoped and listeners are removed before release. So only a connection
    still inside a transaction (a cancelled call) is reset, which rolls it back."""
    if connection.is_in_transaction():
        await connection.reset()


async def create_pool(dsn: str, schema: str, settings: Settings) -> asyncpg.Pool:
    """A pool whose connections resolve unqualified names in the service's own schema first, and
    report their statements as spans when tracing is on."""
    pool = await asyncpg.create_pool(
        dsn,
        reset=_reset_if_dirty,
        init=trace_connection if tracing_enabled() else None,
        min_size=min(settings.db_pool_min, settings.db_pool_max),
        max_size=settings.db_pool_max,
        timeout=settings.db_connect_timeout_s,
        command_timeout=settings.db_command_timeout_s,
        server_settings={"search_path": f"{schema},public", "application_name": f"loyalty-{schema}"},
    )
    assert pool is not None
    return pool


async def wait_for_database(dsn: str, wait_s_max: float) -> None:
    """Retry until the database answers, with back-off, or raise after `wait_s_max` seconds."""
    deadline = time.monotonic() + wait_s_max
    backoff_s = 0.1
    while True:
        try:
            connection = await asyncpg.connect(dsn, timeout=5)
            try:
                await connection.fetchval("SELECT 1")
            finally:
                await connection.close()
            return
        except (TimeoutError, OSError, asyncpg.PostgresError) as error:
            if time.monotonic() + backoff_s > deadline:
                raise
            log.warning("database not reachable yet, retrying", extra={"error": type(error).__name__,
                                                                        "retry_in_s": backoff_s})
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 2.0)
