"""Rewards-only settings, from `LOYALTY_REWARDS_*` environment variables like the shared ones
(libs.settings)."""

from __future__ import annotations

from functools import cache
from zoneinfo import ZoneInfo

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RewardsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOYALTY_REWARDS_", extra="ignore", frozen=True)

    # The programme's time zone: calendar days and months for caps, expiry rounding, campaigns.
    time_zone: str = "Asia/Shanghai"
    # How long Accrue waits for risk before holding the credits (fail-closed).
    risk_deadline_ms: int = Field(default=1_000, ge=10, le=60_000)
    # The background jobs (gate re-assessment, pending credits, lapsed reservations): polling
    # interval, and the longest back-off between re-assessments of one held credit.
    jobs_interval_s: float = Field(default=1.0, gt=0, le=3600)
    gate_retry_backoff_max_s: float = Field(default=60.0, gt=0, le=3600)
    # How often the expiry job looks for lots past their expiry date (RunExpiry runs it on demand).
    expiry_interval_s: float = Field(default=60.0, gt=0, le=86400)
    # A posted credit of at least this many points asks scoring for an online upgrade check
    # (ScoreMember UPGRADE_ONLY, through the outbox); 0 turns the checks off.
    upgrade_check_min_points: int = Field(default=500, ge=0)
    # The outbox relay (upgrade checks and refund re-checks to scoring, refunds and redemptions
    # to risk): polling interval, and the longest back-off of a message that keeps failing.
    relay_interval_s: float = Field(default=0.2, gt=0, le=3600)
    relay_backoff_max_s: float = Field(default=60.0, gt=0, le=3600)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)


@cache
def get_rewards_settings() -> RewardsSettings:
    return RewardsSettings()
