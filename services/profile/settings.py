"""Profile-only settings, from `LOYALTY_*` environment variables like the shared ones (libs.settings)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

PII_KEYS_FILE_NAME = "pii-keys.json"


class ProfileSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOYALTY_", extra="ignore", frozen=True)

    # The PII key ring: {"active": id, "keys": {id: base64 32 bytes}, "lookup_hash_key": base64 32
    # bytes}. Unset: state_dir/pii-keys.json, created with one random key on first use (zero config).
    # A configured file is never created: a missing production key must stop the service, not be
    # silently replaced by a new one that cannot open the stored data.
    pii_keys_file: Path | None = None
    # Whether this process runs the outbox relay to rewards. Off for a replica that should only
    # record (the relay runs on others; it is safe on several) and in the ingestion benchmark.
    outbox_relay_enabled: bool = True

    def pii_keys_path(self, state_dir: Path) -> Path:
        return self.pii_keys_file or state_dir / PII_KEYS_FILE_NAME

    @property
    def creates_pii_keys(self) -> bool:
        return self.pii_keys_file is None


@cache
def get_profile_settings() -> ProfileSettings:
    return ProfileSettings()
