"""Bearer-token authentication with scopes.

Callers are configured in a JSON file (`LOYALTY_AUTH_TOKENS_FILE`, default state_dir/tokens.json):

    {"callers": [{"principal": "orders", "token_sha256": "<hex>", "scopes": ["profile.write"],
                  "expires_at": "2027-01-01T00:00:00Z"}]}

Only token hashes are stored, so the file is not a secret. Zero config: on first use the file is
created with development tokens (their plaintext goes to state_dir/dev-tokens.json, mode 0600).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from libs import errors
from libs.files import atomic_write, create_once

# Scopes a principal may hold as a wildcard: "*" (everything) or "rewards.*" (one service's).
WILDCARD = "*"


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    scopes: frozenset[str]
    expires_at: datetime | None = None

    def allows(self, scope: str) -> bool:
        if WILDCARD in self.scopes or scope in self.scopes:
            return True
        prefix = scope.split(".", 1)[0]
        return f"{prefix}.*" in self.scopes


# The caller of the RPC being served, for handlers (audit actor) and logs.
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("current_principal", default=None)


def actor() -> str:
    """Who is calling, for audit fields: the authenticated principal's name."""
    principal = current_principal.get()
    return principal.name if principal else "anonymous"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenRegistry:
    def __init__(self, principals_by_hash: Mapping[str, Principal]) -> None:
        self._by_hash = dict(principals_by_hash)

    @classmethod
    def from_file(cls, path: Path) -> TokenRegistry:
        data = json.loads(path.read_text())
        by_hash: dict[str, Principal] = {}
        for entry in data.get("callers", []):
            expires = entry.get("expires_at")
            by_hash[entry["token_sha256"]] = Principal(
                name=entry["principal"],
                scopes=frozenset(entry.get("scopes", [])),
                expires_at=datetime.fromisoformat(expires) if expires else None,
            )
        return cls(by_hash)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise errors.unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'",
                                         reason="TOKEN_MISSING")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.unauthenticated("authorization must be 'Bearer <token>'", reason="TOKEN_MALFORMED")
        principal = self._by_hash.get(hash_token(token.strip()))
        if principal is None:
            raise errors.unauthenticated("unknown bearer token", reason="TOKEN_UNKNOWN")
        if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
            raise errors.unauthenticated("bearer token expired", reason="TOKEN_EXPIRED")
        return principal

    @staticmethod
    def authorize(principal: Principal, scopes: Iterable[str], method: str) -> None:
        missing = sorted(scope for scope in scopes if not principal.allows(scope))
        if missing:
            raise errors.permission_denied(
                f"{principal.name} lacks scope(s) {', '.join(missing)} for {method}",
                reason="SCOPE_MISSING", missing_scopes=",".join(missing), method=method,
            )


# Development callers: one token per service (what it needs to call the others), an operator with
# everything, an analyst, and a read-only caller. Real deployments write their own tokens file.
DEV_CALLERS: dict[str, list[str]] = {
    "admin": [WILDCARD],
    "profile": ["rewards.write", "rewards.read", "rewards.admin"],  # rewards.admin: MergeMemberLedgers
    "scoring": ["profile.read", "rewards.admin", "rewards.read"],
    # pii.birth_month: the month of a birth date (the birthday bonus window), nothing else of the PII.
    "rewards": ["risk.assess", "scoring.run", "profile.read", "pii.birth_month"],
    "risk": ["rewards.admin", "profile.read"],
    "gateway": [],
    "analyst": ["profile.read", "scoring.read", "scoring.run", "rewards.read", "risk.read", "risk.review",
                "audit.read"],
    # disputes.write: members submit disputes through the storefront; resolving them is an operator's (admin).
    "storefront": ["profile.write", "profile.read", "rewards.read", "rewards.write", "scoring.read", "disputes.write"],
    "readonly": ["profile.read", "scoring.read", "rewards.read", "risk.read"],
}


def ensure_dev_tokens(state_dir: Path) -> dict[str, str]:
    """Create (once) and return the development tokens {principal: token}.

    Several processes may start at once: exactly one creates the files (see libs.files.create_once),
    the others wait for them and read the same tokens.
    """
    plain = state_dir / "dev-tokens.json"
    hashed = state_dir / "tokens.json"

    def create() -> None:
        tokens = {name: f"dev-{name}-{secrets.token_urlsafe(24)}" for name in DEV_CALLERS}
        callers = [
            {"principal": name, "token_sha256": hash_token(tokens[name]), "scopes": scopes}
            for name, scopes in DEV_CALLERS.items()
        ]
        atomic_write(hashed, json.dumps({"callers": callers}, indent=2) + "\n", 0o644)
        # The plaintext file last: its existence is what the other processes wait for.
        atomic_write(plain, json.dumps(tokens, indent=2) + "\n", 0o600)

    create_once(plain, create)
    loaded: dict[str, str] = json.loads(plain.read_text())
    _refresh_dev_scopes(hashed)
    return loaded


def _refresh_dev_scopes(hashed: Path) -> None:
    """Bring the development callers' scopes in an existing state folder up to DEV_CALLERS (a new
    release may grant a service a scope it needs), tokens unchanged. The new content depends only
    on the file and DEV_CALLERS, so processes doing this at once write the same file."""
    document = json.loads(hashed.read_text())
    changed = False
    for caller in document.get("callers", []):
        wanted = DEV_CALLERS.get(caller.get("principal", ""))
        if wanted is not None and caller.get("scopes") != wanted:
            caller["scopes"] = wanted
            changed = True
    if changed:
        atomic_write(hashed, json.dumps(document, indent=2) + "\n", 0o644)
