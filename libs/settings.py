"""Typed settings from environment variables: one object per process, and zero config runs.

Every variable is prefixed `LOYALTY_` except the ones other tools already define
(`DATABASE_URL`, `OTEL_EXPORTER_OTLP_ENDPOINT`). See the configuration table in README.md.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ServiceName = Literal["profile", "scoring", "rewards", "risk"]
SERVICE_NAMES: tuple[ServiceName, ...] = ("profile", "scoring", "rewards", "risk")

# Fixed loopback ports, so a developer and the supervisor agree without configuration.
DEFAULT_PORTS: dict[str, int] = {"profile": 50051, "scoring": 50052, "rewards": 50053, "risk": 50054,
                                 "gateway": 8080}
DEFAULT_GATEWAY_PORT = DEFAULT_PORTS["gateway"]

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOYALTY_", extra="ignore", frozen=True)

    # Where the process keeps local state: the embedded PostgreSQL data, dev tokens, certificates.
    state_dir: Path = REPO_ROOT / ".state"

    # Database. Unset: the embedded PostgreSQL under state_dir (started by `loyalty up`, or by the
    # service itself when run alone).
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "LOYALTY_DATABASE_URL")
    )
    db_pool_min: int = Field(default=2, ge=1, le=64)
    db_pool_max: int = Field(default=8, ge=1, le=256)
    db_connect_timeout_s: float = Field(default=10.0, gt=0)
    db_command_timeout_s: float = Field(default=30.0, gt=0)
    # How long start-up keeps retrying an unreachable database before giving up.
    db_wait_s_max: float = Field(default=60.0, ge=0)

    # How many shards the database is split into (distributed PostgreSQL, docs/scale.md): a batch
    # writes in one transaction per shard and a campaign budget is split into one allowance per
    # shard, so no credit writes another shard's rows. 1 on one database.
    shards: int = Field(default=1, ge=1, le=1024)

    # Serving.
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)
    # Let several processes of one service listen on the same port (SO_REUSEPORT): the kernel spreads
    # incoming connections over them, one way to use every core. Off by default so a port already in
    # use fails start-up instead of being shared by accident.
    reuse_port: bool = False
    grace_period_s: float = Field(default=10.0, ge=0, le=300)
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_concurrent_rpcs: int | None = Field(default=None, ge=1)

    # Auth: a JSON file of callers (token hash, principal, scopes). Unset: state_dir/tokens.json,
    # created with development tokens on first use.
    auth_tokens_file: Path | None = None
    # The bearer token this process presents when it calls another service.
    client_token: str | None = None

    # TLS / mTLS: both cert and key enable TLS; a CA also makes the server require client certs.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None

    # Other services (host:port; replicas as "ip:port,ip:port" or a dns:///name:port with a record per
    # replica, balanced round-robin by libs.clients). Unset: loopback on the default ports.
    profile_addr: str | None = None
    scoring_addr: str | None = None
    rewards_addr: str | None = None
    risk_addr: str | None = None
    # The HTTP/JSON gateway (host:port): where it is reached; it listens on `host` and `port` (default
    # 8080) like a service.
    gateway_addr: str | None = None
    # Deadline of a server-streaming call made through the gateway (a feature export of a million
    # members takes minutes); unary calls keep client_deadline_ms.
    gateway_stream_deadline_ms: int = Field(default=600_000, ge=1, le=3_600_000)
    # Deadline applied to every outgoing call that does not set its own.
    client_deadline_ms: int = Field(default=5_000, ge=1, le=600_000)

    # The programme currency (ISO 4217): money in events and ledgers is in its minor units.
    currency: str = Field(default="CNY", pattern=r"^[A-Z]{3}$")

    # Telemetry and logs.
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "LOYALTY_OTEL_EXPORTER_OTLP_ENDPOINT"),
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True

    def port_for(self, service: str) -> int:
        return self.port if self.port is not None else DEFAULT_PORTS[service]

    def addr_for(self, service: str) -> str:
        configured: str | None = getattr(self, f"{service}_addr")
        return configured or f"127.0.0.1:{DEFAULT_PORTS[service]}"

    @property
    def tokens_file(self) -> Path:
        return self.auth_tokens_file or self.state_dir / "tokens.json"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None


@cache
def get_settings() -> Settings:
    """The process's one settings object, read from the environment once."""
    return Settings()
