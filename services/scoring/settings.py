"""Scoring-only settings, from `LOYALTY_SCORING_*` environment variables like the shared ones
(libs.settings)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ScoringSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOYALTY_SCORING_", extra="ignore", frozen=True)

    # The programme's time zone: schedules, calendar-year windows.
    time_zone: str = "Asia/Shanghai"
    # Language of explanations when the caller names none.
    default_locale: str = "zh-CN"
    # Members per chunk asked from profile's feature stream (profile may send fewer).
    stream_chunk_size: int = Field(default=20_000, ge=100, le=50_000)
    # Tier changes per ApplyTierChanges call (rewards' limit is 1,000) and calls in flight.
    apply_chunk_size: int = Field(default=1_000, ge=1, le=1_000)
    apply_concurrency: int = Field(default=4, ge=1, le=32)
    # Deadline of one call to rewards or profile, and how long a run keeps retrying rewards before
    # it fails with REWARDS_UNAVAILABLE (a later run finishes the job: changes are idempotent).
    call_deadline_s: float = Field(default=30.0, gt=0, le=600)
    apply_retry_s_max: float = Field(default=120.0, ge=0, le=3600)
    # Run worker: polling interval, and the lease a worker holds on a run (renewed while working).
    worker_interval_s: float = Field(default=1.0, gt=0, le=3600)
    lease_s: float = Field(default=30.0, ge=1, le=3600)
    # How often the scheduler checks whether the active policy's schedule is due.
    scheduler_interval_s: float = Field(default=30.0, gt=0, le=86400)

    # Where result sets computed off the service (`loyalty evaluate --engine spark`) may be imported
    # from; a run naming a directory outside it is refused. Unset: <LOYALTY_STATE_DIR>/spark.
    import_dir: Path | None = None

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    @property
    def imports(self) -> Path:
        from libs.settings import get_settings

        return (self.import_dir or get_settings().state_dir / "spark").resolve()


@cache
def get_scoring_settings() -> ScoringSettings:
    return ScoringSettings()
