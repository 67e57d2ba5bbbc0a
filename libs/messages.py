"""Member-facing texts in Simplified Chinese and English, editable by operators without a release.

A service ships its catalogue as `messages.yaml` next to its code: per dotted key, a description
for operators, the placeholders the code fills, and the zh-CN and en wording. Operators override a
key's wording in one language through the service's UpdateMessageText RPC (stored in the service's
own `message_texts` table, libs/sql/0003_message_texts.sql, audited); clearing the override
restores the shipped text. Rendering reads a snapshot of the overrides that is refreshed at most
every `ttl_s` seconds (and at once after an update on this replica), so a hot path does not pay a
round trip per text.

Languages: any Simplified Chinese tag (zh, zh-CN, zh-Hans, zh-SG...) renders zh-CN; everything
else, Traditional Chinese included (Simplified text would be the wrong script), renders en.
Placeholders are `{name}`; `{{` and `}}` are literal braces.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from libs import audit, errors, paging
from libs.auth import actor
from libs.db import DbConnection
from libs.errors import FieldViolation
from libs.idempotency import run_once_in_transaction
from loyalty.common.v1 import messages_pb2

log = logging.getLogger(__name__)

LANGUAGES = ("zh-CN", "en")
DEFAULT_LANGUAGE = "en"
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([a-z][a-z0-9_]*)\}|[{}]")


def language_of(tag: str, default: str = DEFAULT_LANGUAGE) -> str:
    """The catalogue language for a BCP 47 tag ('' gives `default`)."""
    if not tag:
        return default
    parts = tag.replace("_", "-").lower().split("-")
    if parts[0] == "zh" and not ({"hant", "tw", "hk", "mo"} & set(parts[1:])):
        return "zh-CN"
    return "en"


def placeholders(template: str) -> list[str]:
    """Names used by `template`; ValueError for a stray brace or a malformed placeholder."""
    names: list[str] = []
    for match in _PLACEHOLDER.finditer(template):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        if match.group(1) is None:
            raise ValueError(f"stray {token!r} at {match.start()}: write {{{{ or }}}} for a literal brace")
        names.append(match.group(1))
    return names


def undeclared(template: str, params: tuple[str, ...]) -> list[str]:
    """Placeholders `template` uses that a key providing `params` cannot fill (ValueError for a
    stray brace or a malformed placeholder)."""
    return sorted(set(placeholders(template)) - set(params))


def fill(template: str, params: Mapping[str, Any]) -> str:
    def one(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        return str(params[match.group(1)])

    return _PLACEHOLDER.sub(one, template)


@dataclass(frozen=True)
class Entry:
    key: str
    description: str
    params: tuple[str, ...]
    defaults: Mapping[str, str]  # language -> shipped template


class Catalogue:
    """The shipped texts of one service."""

    def __init__(self, entries: Mapping[str, Entry]) -> None:
        self.entries = dict(sorted(entries.items()))

    @classmethod
    def load(cls, path: Path) -> Catalogue:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        entries: dict[str, Entry] = {}
        for key, spec in data.items():
            params = tuple(spec.get("params", []))
            defaults = {language: str(spec[language]) for language in LANGUAGES}
            for language, template in defaults.items():
                unknown = undeclared(template, params)
                if unknown:
                    raise ValueError(f"{path}: {key} [{language}] uses undeclared {unknown}")
            entries[key] = Entry(key, str(spec.get("description", "")), params, defaults)
        return cls(entries)


@dataclass(frozen=True)
class Override:
    template: str
    updated_at: datetime
    updated_by: str


class Texts:
    """A snapshot: the catalogue with the overrides in force when it was read."""

    def __init__(self, catalogue: Catalogue, overrides: Mapping[tuple[str, str], Override]) -> None:
        self.catalogue = catalogue
        self.overrides = overrides

    def template(self, key: str, language: str) -> str:
        override = self.overrides.get((key, language))
        return override.template if override else self.catalogue.entries[key].defaults[language]

    def render(self, key: str, language_tag: str, /, **params: Any) -> str:
        """The text of `key` in the member's language, placeholders filled (KeyError for a key or
        parameter the catalogue does not declare: a programming error, never the member's)."""
        entry = self.catalogue.entries[key]
        missing = set(entry.params) - set(params)
        if missing:
            raise KeyError(f"{key} needs {sorted(missing)}")
        return fill(self.template(key, language_of(language_tag)), params)

    def message(self, key: str, language: str) -> messages_pb2.MessageText:
        entry = self.catalogue.entries[key]
        override = self.overrides.get((key, language))
        text = messages_pb2.MessageText(
            key=key, language_tag=language, template=self.template(key, language), params=entry.params,
            default_template=entry.defaults[language], customized=override is not None,
            description=entry.description)
        if override is not None:
            text.updated_at.FromDatetime(override.updated_at)
            text.updated_by = override.updated_by
        return text


class MessageTexts:
    """A service's catalogue plus its operators' overrides, with the List/Update use cases."""

    def __init__(self, pool: Callable[[], asyncpg.Pool], catalogue: Catalogue, service: str,
                 ttl_s: float = 5.0) -> None:
        self._pool = pool  # a getter: the servicer is built before the runtime opens its pool
        self.catalogue = catalogue
        self.service = service
        self.ttl_s = ttl_s
        self._snapshot: Texts | None = None
        self._read_at = 0.0

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool()

    async def current(self) -> Texts:
        if self._snapshot is None or time.monotonic() - self._read_at > self.ttl_s:
            rows = await self.pool.fetch(
                "SELECT key, language_tag, template, updated_at, updated_by FROM message_texts")
            overrides = {(r["key"], r["language_tag"]): Override(r["template"], r["updated_at"], r["updated_by"])
                         for r in rows if self._fits(r["key"], r["language_tag"], r["template"])}
            self._snapshot, self._read_at = Texts(self.catalogue, overrides), time.monotonic()
        return self._snapshot

    def _fits(self, key: str, language: str, template: str) -> bool:
        """Whether a stored override can still be rendered: a release may drop a key or a placeholder
        an override uses (or a language); such an override is ignored, the shipped text serves, and
        the operator sees the key as not customized until updating it again."""
        entry = self.catalogue.entries.get(key)
        if entry is None or language not in LANGUAGES:
            return False
        try:
            fits = not undeclared(template, entry.params)
        except ValueError:
            fits = False
        if not fits:
            log.warning("ignoring the override of %s [%s]: it uses placeholders this release does not provide",
                        key, language)
        return fits

    def invalidate(self) -> None:
        self._snapshot = None

    async def list(self, request: Any) -> tuple[list[messages_pb2.MessageText], str]:
        """ListMessageTexts: keys in order, each in zh-CN then en (or the one language asked)."""
        languages = (language_of(request.language_tag),) if request.language_tag else LANGUAGES
        texts = await self.current()
        after = paging.decode(request, 2)
        if after is not None and not (isinstance(after[0], str) and after[1] in range(len(LANGUAGES))):
            raise errors.invalid_argument([FieldViolation("page_token", "is not a page token of this list")],
                                          reason="INVALID_PAGE_TOKEN")  # a forged key, never a TypeError
        found = [(key, language) for key in self.catalogue.entries if key.startswith(request.key_prefix)
                 for language in languages]
        if after is not None:
            found = [item for item in found if (item[0], LANGUAGES.index(item[1])) > (after[0], after[1])]
        size = paging.page_size(request.page_size)
        page, more = paging.split(found, size)
        token = paging.encode([page[-1][0], LANGUAGES.index(page[-1][1])], request) if more and page else ""
        return [texts.message(key, language) for key, language in page], token

    def _check(self, request: Any) -> tuple[Entry, str]:
        entry = self.catalogue.entries.get(request.key)
        if entry is None:
            raise errors.not_found("member-facing text key", request.key, reason="MESSAGE_KEY_NOT_FOUND")
        language = request.language_tag
        if language not in LANGUAGES:
            raise errors.invalid_argument([FieldViolation("language_tag", f"must be one of {', '.join(LANGUAGES)}")])
        try:
            unknown = undeclared(request.template, entry.params)
        except ValueError as error:
            raise errors.invalid_argument([FieldViolation("template", str(error))]) from None
        if unknown:
            offered = ", ".join(f"{{{p}}}" for p in entry.params) or "none"
            raise errors.invalid_argument([FieldViolation(
                "template", f"uses {', '.join(f'{{{u}}}' for u in unknown)}; this key provides {offered}")])
        return entry, language

    async def update(self, connection: DbConnection, request: Any) -> messages_pb2.MessageText:
        """UpdateMessageText inside the caller's transaction (with its idempotency key): upsert or
        clear the override, and one audit record with the wording before and after."""
        entry, language = self._check(request)
        before = await connection.fetchval(
            "SELECT template FROM message_texts WHERE key = $1 AND language_tag = $2 FOR UPDATE", entry.key, language)
        now = datetime.now(UTC)
        if request.template:
            await connection.execute(
                """INSERT INTO message_texts (key, language_tag, template, updated_at, updated_by)
                   VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (key, language_tag) DO UPDATE
                   SET template = excluded.template, updated_at = excluded.updated_at,
                       updated_by = excluded.updated_by""",
                entry.key, language, request.template, now, actor())
        else:
            await connection.execute("DELETE FROM message_texts WHERE key = $1 AND language_tag = $2",
                                     entry.key, language)
        await audit.record(connection, self.service, audit.Change(
            action="message_text.update", resource_type="message_text", resource_id=f"{entry.key}/{language}",
            request_id=request.request_id,
            before={"template": before if before is not None else entry.defaults[language],
                    "customized": before is not None},
            after={"template": request.template or entry.defaults[language], "customized": bool(request.template)}),
            now=now)
        self.invalidate()
        override = {(entry.key, language): Override(request.template, now, actor())} if request.template else {}
        return Texts(self.catalogue, override).message(entry.key, language)


class MessageTextsApi:
    """ListMessageTexts and UpdateMessageText for a servicer (a mixin over its `message_texts`);
    the servicer names its own response classes."""

    message_texts: MessageTexts
    texts_list_response: type[Any]
    texts_update_response: type[Any]

    async def ListMessageTexts(self, request: Any, context: Any) -> Any:
        found, token = await self.message_texts.list(request)
        return self.texts_list_response(message_texts=found, next_page_token=token)

    async def UpdateMessageText(self, request: Any, context: Any) -> Any:
        async def update(connection: DbConnection) -> Any:
            return self.texts_update_response(message_text=await self.message_texts.update(connection, request))

        response: Any = await run_once_in_transaction(self.message_texts.pool, "UpdateMessageText", request,
                                                      self.texts_update_response, update)
        self.message_texts.invalidate()  # a retry answered from the idempotency key changed nothing new
        return response
