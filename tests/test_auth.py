"""Development tokens: created once per state folder, and kept in step with DEV_CALLERS' scopes."""

from __future__ import annotations

import json
from pathlib import Path

from libs.auth import DEV_CALLERS, TokenRegistry, ensure_dev_tokens, hash_token


def test_dev_tokens_are_created_once_and_read_back(tmp_path: Path) -> None:
    first = ensure_dev_tokens(tmp_path)
    assert set(first) == set(DEV_CALLERS)
    assert ensure_dev_tokens(tmp_path) == first
    assert (tmp_path / "dev-tokens.json").stat().st_mode & 0o777 == 0o600


def test_an_older_state_folder_gets_the_scopes_a_release_added_with_its_tokens_unchanged(tmp_path: Path) -> None:
    tokens = ensure_dev_tokens(tmp_path)
    hashed = tmp_path / "tokens.json"
    document = json.loads(hashed.read_text())
    for caller in document["callers"]:  # as written by a release before rewards had pii.birth_month
        if caller["principal"] == "rewards":
            caller["scopes"] = [s for s in caller["scopes"] if s != "pii.birth_month"]
    hashed.write_text(json.dumps(document))
    assert ensure_dev_tokens(tmp_path) == tokens
    callers = {c["principal"]: c for c in json.loads(hashed.read_text())["callers"]}
    assert callers["rewards"]["scopes"] == DEV_CALLERS["rewards"]
    assert callers["rewards"]["token_sha256"] == hash_token(tokens["rewards"])
    principal = TokenRegistry.from_file(hashed).authenticate(f"Bearer {tokens['rewards']}")
    assert principal.allows("pii.birth_month") and not principal.allows("pii.read")
