"""libs.messages: placeholders and braces, the language of a tag, a catalogue that refuses what it
cannot render, and, over the real database, operators' overrides (set, clear, list, audit, the
snapshot's cache)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from libs import errors, paging
from libs.auth import Principal, current_principal
from libs.messages import Catalogue, MessageTexts, Texts, fill, language_of, placeholders
from libs.migrations import migrate
from loyalty.scoring.v1 import scoring_service_pb2 as S

SCHEMA = "messages_test"

CATALOGUE_YAML = """\
greeting:
  description: Hello to a member.
  params: [name]
  en: "Hello {name}, {{literal}}"
  zh-CN: "{name}，您好"
hint.orders.one:
  description: One more order.
  params: [n, tier]
  en: "about {n} more order to {tier}"
  zh-CN: "约再下 {n} 单即可升至{tier}"
hint.orders.other:
  description: More orders.
  params: [n, tier]
  en: "about {n} more orders to {tier}"
  zh-CN: "约再下 {n} 单即可升至{tier}"
hint.spend.other:
  description: More spend.
  params: [n]
  en: "about {n} yuan more spend"
  zh-CN: "约再消费 {n} 元"
summary.top:
  description: At the top.
  params: []
  en: "You are at the top."
  zh-CN: "您已是最高等级。"
"""


def catalogue_from(tmp_path: Path, text: str) -> Catalogue:
    path = tmp_path / "messages.yaml"
    path.write_text(text, encoding="utf-8")
    return Catalogue.load(path)


# ---- pure: templates, languages, the catalogue ---------------------------------------------------

def test_placeholders_and_literal_braces() -> None:
    assert placeholders("about {n} more orders to {tier}") == ["n", "tier"]
    assert placeholders("{{not_a_placeholder}} {n}") == ["n"]
    assert fill("{{{n}}} and {{n}} }}", {"n": 3}) == "{3} and {n} }"
    assert fill("约再下 {n} 单", {"n": 2, "unused": "x"}) == "约再下 2 单"
    for bad in ("a { b", "a } b", "{N}", "{1n}", "{n", "{n-1}"):
        with pytest.raises(ValueError, match="stray"):
            placeholders(bad)


@pytest.mark.parametrize(("tag", "language"), [
    ("zh", "zh-CN"), ("zh-CN", "zh-CN"), ("zh_CN", "zh-CN"), ("zh-Hans", "zh-CN"), ("zh-Hans-CN", "zh-CN"),
    ("zh-SG", "zh-CN"), ("ZH-cn", "zh-CN"),
    ("zh-Hant", "en"), ("zh-TW", "en"), ("zh-HK", "en"), ("zh-MO", "en"), ("zh-Hant-HK", "en"), ("zh_TW", "en"),
    ("en", "en"), ("en-GB", "en"), ("fr", "en"), ("ja-JP", "en"),
])
def test_language_of(tag: str, language: str) -> None:
    assert language_of(tag) == language


def test_language_of_an_empty_tag_is_the_default() -> None:
    assert language_of("") == "en"
    assert language_of("", default="zh-CN") == "zh-CN"


def test_catalogue_refuses_an_undeclared_placeholder_or_a_stray_brace(tmp_path: Path) -> None:
    undeclared = 'k:\n  params: [n]\n  en: "about {n} more {thing}"\n  zh-CN: "约再 {n}"\n'
    with pytest.raises(ValueError, match=r"k \[en\] uses undeclared \['thing'\]"):
        catalogue_from(tmp_path, undeclared)
    stray = 'k:\n  params: []\n  en: "ok"\n  zh-CN: "坏 {"\n'
    with pytest.raises(ValueError, match="stray"):
        catalogue_from(tmp_path, stray)
    loaded = catalogue_from(tmp_path, CATALOGUE_YAML)
    assert list(loaded.entries) == sorted(loaded.entries)
    assert loaded.entries["hint.orders.other"].params == ("n", "tier")


def test_render_picks_the_language_and_fills_the_placeholders(tmp_path: Path) -> None:
    texts = Texts(catalogue_from(tmp_path, CATALOGUE_YAML), {})
    assert texts.render("greeting", "en-GB", name="Ann") == "Hello Ann, {literal}"
    assert texts.render("greeting", "zh-Hans-CN", name="小明") == "小明，您好"
    assert texts.render("greeting", "zh-TW", name="Ann") == "Hello Ann, {literal}"  # Traditional → en
    assert texts.render("hint.orders.other", "zh-CN", n=2, tier="黄金会员") == "约再下 2 单即可升至黄金会员"


def test_render_refuses_a_missing_parameter_or_an_unknown_key(tmp_path: Path) -> None:
    texts = Texts(catalogue_from(tmp_path, CATALOGUE_YAML), {})
    with pytest.raises(KeyError, match="tier"):
        texts.render("hint.orders.other", "en", n=2)
    with pytest.raises(KeyError):
        texts.render("no.such.key", "en")


# ---- over the real database ----------------------------------------------------------------------

@pytest.fixture
async def pool(db: asyncpg.Connection, pg_dsn: str, tmp_path: Path) -> AsyncIterator[asyncpg.Pool]:
    """A schema with the shared tables only (idempotency keys, audit trail, message_texts)."""
    await db.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    migrations = tmp_path / "m"
    migrations.mkdir()
    await migrate(db, SCHEMA, migrations)
    created = await asyncpg.create_pool(pg_dsn, server_settings={"search_path": SCHEMA}, min_size=1, max_size=4)
    assert created is not None
    try:
        yield created
    finally:
        await created.close()


@pytest.fixture
def texts(pool: asyncpg.Pool, tmp_path: Path) -> MessageTexts:
    return MessageTexts(lambda: pool, catalogue_from(tmp_path, CATALOGUE_YAML), "test")


@pytest.fixture(autouse=True)
def operator() -> Any:
    token = current_principal.set(Principal("ops-lin", frozenset()))
    yield
    current_principal.reset(token)


async def update(texts: MessageTexts, key: str, language: str, template: str) -> Any:
    request = S.UpdateMessageTextRequest(request_id=f"r-{key}-{language}-{len(template)}", key=key,
                                         language_tag=language, template=template)
    async with texts.pool.acquire() as connection, connection.transaction():
        return await texts.update(connection, request)


async def audit_rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT action, resource_type, resource_id, actor, before_json, after_json "
                            "FROM audit_events ORDER BY sequence")


async def test_an_override_renders_and_clearing_restores_the_shipped_text(texts: MessageTexts,
                                                                         pool: asyncpg.Pool) -> None:
    assert (await texts.current()).render("hint.orders.other", "zh-CN", n=3, tier="黄金") == "约再下 3 单即可升至黄金"
    changed = await update(texts, "hint.orders.other", "zh-CN", "再买 {n} 单，升级{tier}！")
    assert (changed.customized, changed.template, changed.updated_by) == (True, "再买 {n} 单，升级{tier}！", "ops-lin")
    assert changed.default_template == "约再下 {n} 单即可升至{tier}" and list(changed.params) == ["n", "tier"]
    snapshot = await texts.current()  # the update invalidated the cached snapshot
    assert snapshot.render("hint.orders.other", "zh-CN", n=3, tier="黄金") == "再买 3 单，升级黄金！"
    assert snapshot.render("hint.orders.other", "en", n=3, tier="Gold") == "about 3 more orders to Gold"  # untouched
    cleared = await update(texts, "hint.orders.other", "zh-CN", "")
    assert (cleared.customized, cleared.template, cleared.updated_by) == (False, "约再下 {n} 单即可升至{tier}", "")
    assert (await texts.current()).render("hint.orders.other", "zh-CN", n=3, tier="黄金") == "约再下 3 单即可升至黄金"
    assert await pool.fetchval("SELECT count(*) FROM message_texts") == 0
    # One audit record per update, with the wording before and after.
    rows = await audit_rows(pool)
    assert [(r["action"], r["resource_type"], r["resource_id"], r["actor"]) for r in rows] == [
        ("message_text.update", "message_text", "hint.orders.other/zh-CN", "ops-lin")] * 2
    assert json.loads(rows[0]["before_json"]) == {"template": "约再下 {n} 单即可升至{tier}", "customized": False}
    assert json.loads(rows[0]["after_json"]) == {"template": "再买 {n} 单，升级{tier}！", "customized": True}
    assert json.loads(rows[1]["after_json"]) == {"template": "约再下 {n} 单即可升至{tier}", "customized": False}


@pytest.mark.parametrize(("key", "language", "template", "code", "field"), [
    ("no.such.key", "en", "x", grpc.StatusCode.NOT_FOUND, None),
    ("greeting", "fr", "Bonjour {name}", grpc.StatusCode.INVALID_ARGUMENT, "language_tag"),
    ("greeting", "zh", "{name}好", grpc.StatusCode.INVALID_ARGUMENT, "language_tag"),  # exactly zh-CN or en
    ("greeting", "en", "Hi {nickname}", grpc.StatusCode.INVALID_ARGUMENT, "template"),
    ("greeting", "en", "Hi {name", grpc.StatusCode.INVALID_ARGUMENT, "template"),
])
async def test_a_refused_update_changes_nothing(texts: MessageTexts, pool: asyncpg.Pool, key: str, language: str,
                                                template: str, code: grpc.StatusCode, field: str | None) -> None:
    with pytest.raises(errors.LoyaltyError) as refused:
        await update(texts, key, language, template)
    assert refused.value.code == code
    if field is None:
        assert refused.value.reason == "MESSAGE_KEY_NOT_FOUND"
    else:
        assert [v.field for v in refused.value.violations] == [field]
    assert await pool.fetchval("SELECT count(*) FROM message_texts") == 0
    assert await audit_rows(pool) == []


async def test_list_pages_through_keys_and_languages_with_filters(texts: MessageTexts) -> None:
    await update(texts, "hint.spend.other", "en", "spend {n} more yuan")

    async def listed(**fields: Any) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        token = ""
        while True:
            page, token = await texts.list(S.ListMessageTextsRequest(page_token=token, **fields))
            assert len(page) <= fields.get("page_size", 50)
            found += [(m.key, m.language_tag) for m in page]
            if not token:
                return found

    keys = ["greeting", "hint.orders.one", "hint.orders.other", "hint.spend.other", "summary.top"]
    assert await listed(page_size=3) == [(k, language) for k in keys for language in ("zh-CN", "en")]
    assert await listed(page_size=1, key_prefix="hint.orders.") == [
        ("hint.orders.one", "zh-CN"), ("hint.orders.one", "en"), ("hint.orders.other", "zh-CN"),
        ("hint.orders.other", "en")]
    assert await listed(page_size=2, language_tag="en", key_prefix="hint.") == [
        ("hint.orders.one", "en"), ("hint.orders.other", "en"), ("hint.spend.other", "en")]
    assert await listed(language_tag="zh-Hans-CN", key_prefix="summary") == [("summary.top", "zh-CN")]
    assert await listed(key_prefix="nothing.") == []
    page, _ = await texts.list(S.ListMessageTextsRequest(key_prefix="hint.spend."))
    by_language = {m.language_tag: m for m in page}
    assert (by_language["en"].customized, by_language["en"].template) == (True, "spend {n} more yuan")
    assert by_language["en"].default_template == "about {n} yuan more spend"
    assert (by_language["zh-CN"].customized, by_language["zh-CN"].description) == (False, "More spend.")


async def test_a_page_token_of_other_filters_or_a_forged_one_is_refused(texts: MessageTexts) -> None:
    _, token = await texts.list(S.ListMessageTextsRequest(page_size=1, key_prefix="hint."))
    assert token
    with pytest.raises(errors.LoyaltyError) as other:
        await texts.list(S.ListMessageTextsRequest(page_size=1, key_prefix="summary.", page_token=token))
    assert other.value.reason == "PAGE_TOKEN_MISMATCH"
    request = S.ListMessageTextsRequest(page_size=1)
    forged = json.loads(base64.urlsafe_b64decode(paging.encode(["greeting", 0], request) + "=="))
    forged["k"] = [["greeting"], "en"]
    request.page_token = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
    with pytest.raises(errors.LoyaltyError) as bad:
        await texts.list(request)
    assert (bad.value.code, bad.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_the_snapshot_is_cached_until_it_expires_or_an_update_invalidates_it(
        pool: asyncpg.Pool, tmp_path: Path) -> None:
    texts = MessageTexts(lambda: pool, catalogue_from(tmp_path, CATALOGUE_YAML), "test", ttl_s=3600)
    first = await texts.current()
    # A write this replica did not make (another replica's) is not seen before the snapshot expires...
    await pool.execute("INSERT INTO message_texts VALUES ('summary.top', 'en', 'Top!', now(), 'other-replica')")
    assert await texts.current() is first
    assert (await texts.current()).render("summary.top", "en") == "You are at the top."
    texts.ttl_s = 0.0  # ...and is once it has
    assert (await texts.current()).render("summary.top", "en") == "Top!"
    texts.ttl_s = 3600
    cached = await texts.current()
    await update(texts, "summary.top", "en", "Top again!")
    assert await texts.current() is not cached
    assert (await texts.current()).render("summary.top", "en") == "Top again!"


async def test_an_override_a_release_can_no_longer_render_is_ignored(pool: asyncpg.Pool, tmp_path: Path) -> None:
    """A stored override that uses a placeholder the shipped key dropped (or a key or a language the
    catalogue no longer has) never breaks rendering: the shipped text serves."""
    await pool.executemany("INSERT INTO message_texts VALUES ($1, $2, $3, now(), 'ops-lin')", [
        ("hint.spend.other", "en", "spend {n} more {money}"), ("hint.spend.other", "zh-CN", "再消费 {n} 元吧"),
        ("gone.key", "en", "x"), ("summary.top", "fr", "Au sommet")])
    texts = MessageTexts(lambda: pool, catalogue_from(tmp_path, CATALOGUE_YAML), "test")
    snapshot = await texts.current()
    assert snapshot.render("hint.spend.other", "en", n=5) == "about 5 yuan more spend"
    assert snapshot.render("hint.spend.other", "zh-CN", n=5) == "再消费 5 元吧"
    assert set(snapshot.overrides) == {("hint.spend.other", "zh-CN")}
