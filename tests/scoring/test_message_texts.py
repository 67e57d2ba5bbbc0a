"""Operators reword scoring's member-facing texts without a release: ListMessageTexts shows the
catalogue, UpdateMessageText changes what ExplainScore tells a Chinese and an English member at
once (the replica that took the update drops its cached snapshot), clearing restores the shipped
wording, bad updates are refused on their field, and every update leaves one audit record. Runs on
this module's own stack (tests/scoring/conftest.py)."""

from __future__ import annotations

import re
from typing import Any

import grpc
import pytest

from loyalty.profile.v1 import member_pb2
from loyalty.profile.v1 import profile_service_pb2 as P
from loyalty.scoring.v1 import evaluation_pb2 as E
from loyalty.scoring.v1 import scoring_service_pb2 as S
from services.scoring.domain import explain
from services.scoring.entrypoints.grpc_api import CATALOGUE
from tests.scoring.conftest import Stack, Stubs, long_ago, policy, purchase, record, uid
from tests.support.rpc import rpc_error

pytestmark = pytest.mark.timeout(300)

KEY = "hint.purchase_count.other"


@pytest.fixture
async def members(stack: Stack, stubs: Stubs, operator: Any) -> dict[str, str]:
    """A Chinese and an English member at Silver (two orders of 100 yuan) under an active fixed
    policy with a scored dry run, and a few others around them. Seeded once for the stack."""
    seeded: dict[str, str] | None = getattr(stack, "texts_members", None)
    if seeded is not None:
        return seeded
    seeded = {"zh-CN": uid("mt-zh"), "en": uid("mt-en")}
    others = [(uid("mt-low"), 1, 1000), (uid("mt-top"), 10, 100_000), (uid("mt-mid"), 4, 5000)]
    events = [purchase(m, 10_000, long_ago(5 + j)) for m in seeded.values() for j in range(2)]
    events += [purchase(m, amount, long_ago(5 + j)) for m, orders, amount in others for j in range(orders)]
    await record(stubs, operator, events)
    for locale, member in seeded.items():
        update = P.UpdateMemberRequest(request_id=uid("r"), member=member_pb2.Member(member_id=member, locale=locale))
        update.update_mask.paths.append("locale")
        await stubs.profile.UpdateMember(update, metadata=operator, timeout=10)
    created = await stubs.scoring.CreatePolicy(S.CreatePolicyRequest(request_id=uid("r"), policy=policy(
        uid("texts"), rule="fixed")), metadata=operator, timeout=10)
    await stubs.scoring.ActivatePolicy(S.ActivatePolicyRequest(
        request_id=uid("r"), policy_id=created.policy.policy_id, version=created.policy.version), metadata=operator,
        timeout=10)
    dry = await stubs.scoring.RunEvaluation(S.RunEvaluationRequest(request_id=uid("r"), wait=True, dry_run=True),
                                            metadata=operator, timeout=60)
    assert dry.run.state == E.EVALUATION_STATE_SUCCEEDED, dry.run.error_message
    stack.texts_members = seeded  # type: ignore[attr-defined]
    return seeded


async def explained(stubs: Stubs, analyst: Any, member: str) -> S.ExplainScoreResponse:
    """The member's explanation in its own language (no locale asked)."""
    return await stubs.scoring.ExplainScore(S.ExplainScoreRequest(member_id=member), metadata=analyst,  # type: ignore[no-any-return]
                                            timeout=10)


def orders_hint(reply: S.ExplainScoreResponse) -> tuple[int, str]:
    """The number of orders and the text of the order-count hint (the test member needs several)."""
    hint = next(h for h in reply.next_tier.hints if h.feature_name == "purchase_count_365d")
    assert hint.raw_delta > 1
    return int(hint.raw_delta), hint.text


async def set_text(stubs: Stubs, metadata: Any, key: str, language: str, template: str,
                   request_id: str = "") -> S.UpdateMessageTextResponse:
    return await stubs.scoring.UpdateMessageText(S.UpdateMessageTextRequest(  # type: ignore[no-any-return]
        request_id=request_id or uid("r"), key=key, language_tag=language, template=template),
        metadata=metadata, timeout=10)


async def test_the_catalogue_covers_every_text_explanations_ask_for() -> None:
    """Every name, hint, currency and summary key the explain code renders is shipped, in both
    languages, with the same placeholders in its one and other forms."""
    entries = CATALOGUE.entries
    for family, spec in [*explain._FAMILIES.items(), *explain._POINTS.items()]:
        assert f"feature.{family}.name" in entries
        for form in ("one", "other"):
            assert (f"hint.{family}.{form}" in entries) == spec.advised, family
    for currency in explain._NAMED_CURRENCIES:
        assert {f"currency.{currency}.one", f"currency.{currency}.other"} <= set(entries)
    for key in entries:
        if key.endswith(".one"):
            assert entries[key].params == entries[key.removesuffix(".one") + ".other"].params, key
    assert {"summary.top_tier", "summary.keep_going", "summary.with_hints", "summary.hints_separator",
            "summary.hints_last_separator", "hint.generic.count", "hint.generic.amount",
            "feature.windowed_name.one", "feature.windowed_name.other"} <= set(entries)
    assert all(set(entry.defaults) == {"zh-CN", "en"} for entry in entries.values())


async def test_list_message_texts_shows_the_catalogue_with_its_defaults(stubs: Stubs, analyst: Any) -> None:
    listed: list[Any] = []
    token = ""
    while True:
        reply = await stubs.scoring.ListMessageTexts(S.ListMessageTextsRequest(page_size=40, page_token=token),
                                                     metadata=analyst, timeout=10)
        listed += reply.message_texts
        token = reply.next_page_token
        if not token:
            break
    assert [(t.key, t.language_tag) for t in listed] == [(k, language) for k in sorted(CATALOGUE.entries)
                                                         for language in ("zh-CN", "en")]
    by_key = {(t.key, t.language_tag): t for t in listed}
    orders = by_key[(KEY, "en")]
    assert (orders.template, orders.default_template, list(orders.params), orders.customized) == (
        "about {n} more orders", "about {n} more orders", ["n"], False)
    assert by_key[(KEY, "zh-CN")].template == "约再下 {n} 单" and orders.description
    hints = await stubs.scoring.ListMessageTexts(S.ListMessageTextsRequest(key_prefix="hint.net_spend.",
                                                                           language_tag="zh-CN"), metadata=analyst)
    assert [(t.key, t.template, list(t.params)) for t in hints.message_texts] == [
        ("hint.net_spend.one", "约再消费 {n} {money}", ["n", "money"]),
        ("hint.net_spend.other", "约再消费 {n} {money}", ["n", "money"])]


async def test_an_operator_rewords_a_hint_for_both_languages_and_clears_it(
        stubs: Stubs, operator: Any, analyst: Any, members: dict[str, str]) -> None:
    chinese, english = members["zh-CN"], members["en"]
    before_zh, before_en = await explained(stubs, analyst, chinese), await explained(stubs, analyst, english)
    assert (before_zh.locale, before_en.locale) == ("zh-CN", "en")
    assert before_zh.score.tier_id == "silver" and before_zh.next_tier.tier_id == "gold"
    n, text = orders_hint(before_zh)
    assert text == f"约再下 {n} 单" and text in before_zh.summary
    n_en, text_en = orders_hint(before_en)
    assert text_en == f"about {n_en} more orders" and text_en in before_en.summary

    zh = await set_text(stubs, operator, KEY, "zh-CN", "再买 {n} 单就能升级")
    assert (zh.message_text.customized, zh.message_text.template, zh.message_text.updated_by) == (
        True, "再买 {n} 单就能升级", "admin")
    await set_text(stubs, operator, KEY, "en", "{n} more orders and you move up")
    # No restart and no wait: the replica that took the update reads the new wording at once.
    after_zh, after_en = await explained(stubs, analyst, chinese), await explained(stubs, analyst, english)
    assert orders_hint(after_zh) == (n, f"再买 {n} 单就能升级")
    assert orders_hint(after_en) == (n_en, f"{n_en} more orders and you move up")
    assert f"再买 {n} 单就能升级" in after_zh.summary
    assert f"{n_en} more orders and you move up" in after_en.summary
    # Only that key changed: the other hints and the names keep their shipped wording.
    assert [c.display_name for c in after_zh.contributions] == [c.display_name for c in before_zh.contributions]
    assert {h.text for h in after_en.next_tier.hints} - {f"{n_en} more orders and you move up"} == \
        {h.text for h in before_en.next_tier.hints} - {text_en}
    listed = await stubs.scoring.ListMessageTexts(S.ListMessageTextsRequest(key_prefix=KEY), metadata=analyst)
    assert [(t.language_tag, t.customized, t.default_template) for t in listed.message_texts] == [
        ("zh-CN", True, "约再下 {n} 单"), ("en", True, "about {n} more orders")]

    cleared = await set_text(stubs, operator, KEY, "zh-CN", "")
    assert (cleared.message_text.customized, cleared.message_text.template) == (False, "约再下 {n} 单")
    await set_text(stubs, operator, KEY, "en", "")
    assert orders_hint(await explained(stubs, analyst, chinese)) == (n, text)
    restored = await explained(stubs, analyst, english)
    assert orders_hint(restored) == (n_en, text_en) and restored.summary == before_en.summary


async def test_a_summary_and_a_feature_name_are_operator_texts_too(
        stubs: Stubs, operator: Any, analyst: Any, members: dict[str, str]) -> None:
    english = members["en"]
    await set_text(stubs, operator, "summary.with_hints", "en", "{tier} now. To reach {next_tier}: {hints}.")
    await set_text(stubs, operator, "feature.purchase_count.name", "en", "purchases")
    try:
        reply = await explained(stubs, analyst, english)
        assert re.fullmatch(r"Silver now\. To reach Gold: .+\.", reply.summary), reply.summary
        names = {c.feature_name: c.display_name for c in reply.contributions}
        assert names["purchase_count_365d"] == "purchases (365 days)"
    finally:
        await set_text(stubs, operator, "summary.with_hints", "en", "")
        await set_text(stubs, operator, "feature.purchase_count.name", "en", "")
    assert (await explained(stubs, analyst, english)).summary.startswith("You are Silver; ")


async def test_bad_updates_are_refused_on_their_field(stubs: Stubs, operator: Any, analyst: Any) -> None:
    code, reason, fields = await rpc_error(set_text(stubs, operator, KEY, "en", "about {n} more orders to {tier}"))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["template"])
    code, _, fields = await rpc_error(set_text(stubs, operator, KEY, "en", "about {n more orders"))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["template"])
    code, reason, _ = await rpc_error(set_text(stubs, operator, "hint.no_such_feature.other", "en", "x"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MESSAGE_KEY_NOT_FOUND")
    code, _, fields = await rpc_error(set_text(stubs, operator, KEY, "fr", "environ {n} commandes de plus"))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["language_tag"])
    code, _, _ = await rpc_error(set_text(stubs, analyst, KEY, "en", "{n} more"))  # scoring.read, not .write
    assert code == grpc.StatusCode.PERMISSION_DENIED
    listed = await stubs.scoring.ListMessageTexts(S.ListMessageTextsRequest(key_prefix=KEY), metadata=analyst)
    assert not any(t.customized for t in listed.message_texts)


async def test_each_update_leaves_one_audit_record(stubs: Stubs, operator: Any, analyst: Any) -> None:
    async def records() -> list[Any]:
        reply = await stubs.scoring.ListAuditEvents(S.ListAuditEventsRequest(
            action="message_text.update", resource_id=f"{KEY}/en", page_size=100), metadata=analyst, timeout=10)
        return list(reply.audit_events)

    before = len(await records())
    request_id = uid("r")
    first = await set_text(stubs, operator, KEY, "en", "{n} orders to go", request_id=request_id)
    again = await set_text(stubs, operator, KEY, "en", "{n} orders to go", request_id=request_id)  # a retry
    assert again == first
    await set_text(stubs, operator, KEY, "en", "")
    found = await records()
    assert len(found) == before + 2
    newest, update = found[0], found[1]  # newest first
    assert (update.actor, update.resource_type, update.request_id) == ("admin", "message_text", request_id)
    assert '"{n} orders to go"' in update.after_json and '"about {n} more orders"' in update.before_json
    assert '"customized":false' in newest.after_json
