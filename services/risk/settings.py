"""Risk-only settings, from `LOYALTY_*` environment variables like the shared ones (libs.settings)."""

from __future__ import annotations

from functools import cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RiskSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOYALTY_RISK_", extra="ignore", frozen=True)

    # How long an analyst has to resolve a review case before it counts as breaching its SLA.
    case_sla_hours: float = Field(default=24.0, gt=0, le=24 * 90)
    # Orders under this amount (minor units) count as small for the order-burst signal.
    small_order_minor: int = Field(default=2_000, ge=1)
    # Case outcomes to rewards: polling interval and the longest back-off between retries.
    relay_interval_s: float = Field(default=0.5, gt=0, le=60)
    relay_backoff_max_s: float = Field(default=60.0, gt=0, le=3600)
    # Assessments in flight at once per process; calls arriving while all are busy go together in
    # the next one (libs.coalesce), up to assess_round_items accruals.
    assess_rounds: int = Field(default=2, ge=1, le=16)
    assess_round_items: int = Field(default=1_000, ge=1, le=10_000)
    # Rounds that may lose a member to a concurrent writer before its items go through a round
    # that locks the member first.
    assess_optimistic_attempts: int = Field(default=3, ge=0, le=20)


@cache
def get_risk_settings() -> RiskSettings:
    return RiskSettings()
