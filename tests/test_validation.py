"""The declarative field rules, each at and around its edges (unit: no I/O)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from libs.validation import validate


@pytest.fixture(scope="module")
def rules(test_protos_dir: Path) -> ModuleType:
    from loyalty_testing.v1 import rules_pb2

    return rules_pb2


def _valid(rules: ModuleType) -> Any:
    message = rules.Everything(id="m-1", must_colour=rules.COLOUR_RED, text="hello")
    message.at.seconds = 1_700_000_000
    message.items.add(sku="A1", quantity=1)
    return message


def _fields(message: Any) -> dict[str, str]:
    return {v.field: v.description for v in validate(message)}


def test_valid_message_has_no_violations(rules: ModuleType) -> None:
    assert validate(_valid(rules)) == []


def test_missing_required_fields_are_all_reported(rules: ModuleType) -> None:
    found = _fields(rules.Everything())
    for name in ("id", "must_colour", "at", "items", "payload"):
        assert name in found, found


@pytest.mark.parametrize(("field", "value", "ok"), [
    ("id", "a", True), ("id", "a" * 128, True), ("id", "a" * 129, False), ("id", "-lead", False),
    ("id", "with space", False), ("id", "ord:2024.1_x-y", True),
    ("name", "ab", True), ("name", "a", False), ("name", "abcde", True), ("name", "abcdef", False),
    ("name", "", True),  # empty is absent in proto3: only `required` refuses it
    ("code", "AB-12", True), ("code", "AB-", False), ("code", "xAB-1", False),
    ("email", "a@b.cn", True), ("email", "a@b", False), ("email", "a b@c.cn", False),
    ("uuid", "123e4567-e89b-12d3-a456-426614174000", True), ("uuid", "123e4567", False),
    ("currency", "CNY", True), ("currency", "cny", False), ("currency", "CNYY", False),
    ("ip", "10.0.0.1", True), ("ip", "::1", True), ("ip", "10.0.0.256", False),
    ("day", "2024-02-29", True), ("day", "2023-02-29", False), ("day", "2024-2-1", False),
    ("phone", "+8613800138000", True), ("phone", "13800138000", False), ("phone", "+0123456789", False),
    ("locale", "zh-CN", True), ("locale", "en", True), ("locale", "zh_CN", False),
])
def test_string_rules(rules: ModuleType, field: str, value: str, ok: bool) -> None:
    message = _valid(rules)
    setattr(message, field, value)
    found = _fields(message)
    assert (field not in found) is ok, found


@pytest.mark.parametrize(("value", "ok"), [(-1, False), (0, True), (1000, True), (1001, False)])
def test_int_bounds(rules: ModuleType, value: int, ok: bool) -> None:
    message = _valid(rules)
    message.page_size = value
    assert ("page_size" not in _fields(message)) is ok


@pytest.mark.parametrize(("value", "ok"), [(0, False), (1, True), (1_000_000, True), (1_000_001, False)])
def test_optional_int_checked_only_when_present(rules: ModuleType, value: int, ok: bool) -> None:
    message = _valid(rules)
    assert "points" not in _fields(message)  # absent: fine
    message.points = value
    assert ("points" not in _fields(message)) is ok


@pytest.mark.parametrize(("value", "ok"), [(-0.001, False), (0.0, True), (1.0, True), (1.0001, False),
                                            (float("nan"), False), (float("inf"), False)])
def test_double_bounds_and_finiteness(rules: ModuleType, value: float, ok: bool) -> None:
    message = _valid(rules)
    message.weight = value
    assert ("weight" not in _fields(message)) is ok


def test_enum_rules(rules: ModuleType) -> None:
    message = _valid(rules)
    message.colour = 7  # proto3 keeps unknown enum numbers
    assert "colour" in _fields(message)
    message.colour = rules.COLOUR_BLUE
    assert "colour" not in _fields(message)
    message.must_colour = rules.COLOUR_UNSPECIFIED
    assert _fields(message)["must_colour"] == "is required"


def test_nested_message_rules_carry_the_path(rules: ModuleType) -> None:
    message = _valid(rules)
    message.price.amount_minor = 100
    message.price.currency = "yuan"
    message.items.add(sku="TOO-LONG-SKU", quantity=0)
    found = _fields(message)
    assert "price.currency" in found
    assert "items[1].sku" in found
    assert "items[1].quantity" in found
    assert "items[0].sku" not in found


def test_repeated_counts(rules: ModuleType) -> None:
    message = _valid(rules)
    for _ in range(3):
        message.items.add(sku="X", quantity=1)
    assert "must have at most 3 items" in _fields(message)["items"]


def test_items_left_to_the_handler_are_not_checked_but_counted(rules: ModuleType) -> None:
    message = _valid(rules)
    message.batch.add(sku="", quantity=0)  # invalid item: the handler answers for it
    assert not any(f.startswith("batch") for f in _fields(message))
    for _ in range(3):
        message.batch.add(sku="X", quantity=1)
    assert "batch" in _fields(message)


def test_repeated_scalar_items_and_uniqueness(rules: ModuleType) -> None:
    message = _valid(rules)
    message.tags.extend(["ok", "toolong", ""])
    found = _fields(message)
    assert "tags[1]" in found and "tags[2]" in found and "tags[0]" not in found
    message.ClearField("tags")
    message.tags.extend(["a", "a"])
    assert _fields(message)["tags"] == "must not contain duplicates"


def test_oneof_required(rules: ModuleType) -> None:
    message = _valid(rules)
    message.ClearField("payload")
    assert "payload" in _fields(message)
    message.item.sku = "S"
    message.item.quantity = 1
    assert "payload" not in _fields(message)


@pytest.mark.parametrize(("seconds", "nanos", "valid"), [
    (0, 0, True), (1_700_000_000, 999_999_999, True), (-62_135_596_800, 0, True), (253_402_300_799, 0, True),
    (0, -1, False), (0, 1_000_000_000, False), (-62_135_596_801, 0, False), (253_402_300_800, 0, False)])
def test_every_timestamp_must_be_a_real_instant(rules: ModuleType, seconds: int, nanos: int, valid: bool) -> None:
    """Checked wherever a Timestamp appears, declared rules or not: a handler converting it to a
    datetime must never meet year 0 or negative nanos (found by tests/reliability/test_grpc_fuzz.py)."""
    message = _valid(rules)
    message.at.seconds, message.at.nanos = seconds, nanos
    assert ("at" not in _fields(message)) is valid


@pytest.mark.parametrize(("seconds", "nanos", "valid"), [
    (5, 1, True), (-5, -1, True), (0, -3, True), (315_576_000_000, 0, True),
    (5, -1, False), (-5, 1, False), (315_576_000_001, 0, False), (0, 1_000_000_000, False)])
def test_every_duration_must_be_well_formed(seconds: int, nanos: int, valid: bool) -> None:
    from loyalty.rewards.v1 import earning_pb2

    rules_message = earning_pb2.EarningRuleSet()
    rules_message.pending_period.seconds, rules_message.pending_period.nanos = seconds, nanos
    found = {v.field for v in validate(rules_message)}
    assert ("pending_period" not in found) is valid
