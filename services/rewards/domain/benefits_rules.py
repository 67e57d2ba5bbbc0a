"""The benefit catalogue without I/O: the value rule, the checks an entry must pass, how an update
applies, whether a member may use a benefit now, and the texts a member reads.

Values are exact integers: value = base + floor(coefficient_bps × (premium − base) / 10000), so the
brief's 100 + 1.2 × (150 − 100) is 100 + 12000 × 50 // 10000 = 160 with no float on the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from google.protobuf import field_mask_pb2

from libs.errors import FieldViolation
from loyalty.rewards.v1 import benefits_pb2
from services.rewards.domain.benefits_calendar import in_birthday_month, to_datetime, window_violations
from services.rewards.domain.coupons_rules import template_violations
from services.rewards.domain.tiers_rules import repeats

K = benefits_pb2.BenefitKind
BPS_ONE = 10_000
BENEFIT_POINTS_MAX = 1_000_000_000
DEFAULT_LANGUAGE = "en"

# Kinds whose value comes from a value rule, and those whose value is points credited on use.
VALUED_KINDS = frozenset({K.BENEFIT_KIND_DISCOUNT_PERCENTAGE, K.BENEFIT_KIND_FREE_SHIPPING,
                          K.BENEFIT_KIND_BIRTHDAY_BONUS, K.BENEFIT_KIND_POINTS_GRANT})
POINTS_KINDS = frozenset({K.BENEFIT_KIND_BIRTHDAY_BONUS, K.BENEFIT_KIND_POINTS_GRANT})

ACTIVE = benefits_pb2.BENEFIT_STATE_ACTIVE
RETIRED = benefits_pb2.BENEFIT_STATE_RETIRED

BENEFIT_NOT_FOUND = "BENEFIT_NOT_FOUND"
BENEFIT_NOT_IN_TIER = "BENEFIT_NOT_IN_TIER"
BENEFIT_NOT_ACTIVE = "BENEFIT_NOT_ACTIVE"
BENEFIT_OUT_OF_WINDOW = "BENEFIT_OUT_OF_WINDOW"
BENEFIT_USAGE_LIMIT_REACHED = "BENEFIT_USAGE_LIMIT_REACHED"
BENEFIT_FIELD_IMMUTABLE = "BENEFIT_FIELD_IMMUTABLE"

# What UpdateBenefit may change (an empty mask means all of them) and what it may not.
MUTABLE_FIELDS = ("name", "description", "texts", "value_rule", "coupon_template", "usage_limit", "valid_from",
                  "valid_until", "state")
IMMUTABLE_FIELDS = ("tier_id", "kind")
OUTPUT_ONLY_FIELDS = ("benefit_id", "value", "revision", "created_at", "updated_at")


def benefit_value(rule: benefits_pb2.BenefitValueRule) -> int:
    """base + floor(coefficient_bps × (premium − base) / 10000), exactly (rounded towards −∞)."""
    return rule.base + rule.coefficient_bps * (rule.premium - rule.base) // BPS_ONE


# ---- checks ----------------------------------------------------------------------------------


def _value_range(kind: int) -> tuple[int, int]:
    """The values a kind accepts, in its unit."""
    if kind == K.BENEFIT_KIND_DISCOUNT_PERCENTAGE:
        return 1, BPS_ONE  # 0.01% .. 100%
    if kind == K.BENEFIT_KIND_FREE_SHIPPING:
        return 0, BENEFIT_POINTS_MAX  # 0 = all shipping covered
    return 1, BENEFIT_POINTS_MAX


def _kind_name(kind: benefits_pb2.BenefitKind.ValueType) -> str:
    return K.Name(kind).removeprefix("BENEFIT_KIND_")  # a defined kind: the field rules check it


def _value_rule_violations(benefit: benefits_pb2.Benefit, path: str) -> list[FieldViolation]:
    """A value rule for the valued kinds only, giving a value in the kind's range, with a currency
    for a money value only."""
    kind = _kind_name(benefit.kind)
    if benefit.kind not in VALUED_KINDS:
        return [FieldViolation(f"{path}value_rule", f"must not be set for a {kind} benefit")] \
            if benefit.HasField("value_rule") else []
    if not benefit.HasField("value_rule"):
        return [FieldViolation(f"{path}value_rule", f"is required for a {kind} benefit")]
    out: list[FieldViolation] = []
    low, high = _value_range(benefit.kind)
    value = benefit_value(benefit.value_rule)
    if not low <= value <= high:
        out.append(FieldViolation(f"{path}value_rule", f"gives {value}: a {kind} value must be within [{low}, {high}]"))
    money = benefit.kind == K.BENEFIT_KIND_FREE_SHIPPING
    if money != bool(benefit.value_rule.currency):
        out.append(FieldViolation(f"{path}value_rule.currency",
                                  "is required for FREE_SHIPPING" if money else f"must be empty for a {kind} benefit"))
    return out


def _coupon_template_violations(benefit: benefits_pb2.Benefit, path: str, expiry_after: datetime | None
                                ) -> list[FieldViolation]:
    """A valid coupon template for a COUPON benefit, and none for another kind."""
    if benefit.kind != K.BENEFIT_KIND_COUPON:
        return [FieldViolation(f"{path}coupon_template", f"must not be set for a {_kind_name(benefit.kind)} benefit")] \
            if benefit.HasField("coupon_template") else []
    if not benefit.HasField("coupon_template"):
        return [FieldViolation(f"{path}coupon_template", "is required for a COUPON benefit")]
    return template_violations(benefit.coupon_template, f"{path}coupon_template.", expiry_after)


def benefit_violations(benefit: benefits_pb2.Benefit, expiry_after: datetime | None, path: str = "benefit."
                       ) -> list[FieldViolation]:
    """What the field rules cannot say about a catalogue entry, with paths under `path`
    (`expiry_after`: see coupons_rules.template_violations)."""
    languages = repeats((t.language_tag.lower() for t in benefit.texts), lambda i: f"{path}texts[{i}].language_tag")
    return (_value_rule_violations(benefit, path) + _coupon_template_violations(benefit, path, expiry_after)
            + languages + window_violations(benefit, "valid_from", "valid_until", path))


def catalogue_entry(benefit: benefits_pb2.Benefit) -> benefits_pb2.Benefit:
    """The content to store: output-only fields cleared, and a birthday bonus limited to once a
    year unless the entry says otherwise (the kind is "once a year" by definition)."""
    entry = benefits_pb2.Benefit()
    entry.CopyFrom(benefit)
    for name in OUTPUT_ONLY_FIELDS:
        entry.ClearField(name)  # type: ignore[arg-type]
    if entry.kind == K.BENEFIT_KIND_BIRTHDAY_BONUS and not entry.HasField("usage_limit"):
        entry.usage_limit.max_uses = 1
        entry.usage_limit.period = benefits_pb2.BENEFIT_PERIOD_YEAR
    return entry


# ---- updates ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Update:
    """A benefit as an update leaves it, or why the update is refused."""

    benefit: benefits_pb2.Benefit
    immutable: list[FieldViolation]
    violations: list[FieldViolation]


def mask_violations(paths: Sequence[str]) -> list[FieldViolation]:
    """Paths that are not fields of Benefit, or are output only."""
    out: list[FieldViolation] = []
    for index, path in enumerate(paths):
        top = path.split(".", 1)[0]
        if top in OUTPUT_ONLY_FIELDS:
            out.append(FieldViolation(f"update_mask.paths[{index}]", f"{path!r} is output only"))
        elif not field_mask_pb2.FieldMask(paths=[path]).IsValidForDescriptor(benefits_pb2.Benefit.DESCRIPTOR):
            out.append(FieldViolation(f"update_mask.paths[{index}]", f"{path!r} is not a field of Benefit"))
    return out


def apply_update(stored: benefits_pb2.Benefit, incoming: benefits_pb2.Benefit, paths: Sequence[str],
                 now: datetime) -> Update:
    """`stored` with the masked fields of `incoming` (every mutable field for an empty mask);
    `paths` passed mask_violations.

    tier_id and kind never change: asking to change them is refused (naming them with their
    current value is not). State UNSPECIFIED under an empty mask keeps the current state."""
    merged = benefits_pb2.Benefit()
    merged.CopyFrom(stored)
    named = {p.split(".", 1)[0] for p in paths} if paths else set(MUTABLE_FIELDS) | set(IMMUTABLE_FIELDS)
    immutable = [FieldViolation(f"benefit.{name}", "cannot change after create")
                 for name in IMMUTABLE_FIELDS if name in named and getattr(incoming, name) != getattr(stored, name)]
    if immutable:
        return Update(merged, immutable, [])
    field_mask_pb2.FieldMask(paths=list(paths) or list(MUTABLE_FIELDS)).MergeMessage(
        incoming, merged, replace_message_field=True, replace_repeated_field=True)
    violations: list[FieldViolation] = []
    if incoming.state == benefits_pb2.BENEFIT_STATE_UNSPECIFIED:
        if "state" in paths:
            violations.append(FieldViolation("benefit.state", "must be ACTIVE or RETIRED"))
        merged.state = stored.state
    template_changed = merged.coupon_template.expires_at != stored.coupon_template.expires_at
    return Update(merged, [], violations + benefit_violations(merged, now if template_changed else None))


# ---- members ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ineligible:
    reason: str
    message: str


def _out_of_window(benefit: benefits_pb2.Benefit, now: datetime, zone: ZoneInfo, birth_month: int | None) -> str:
    """Why `now` is outside the benefit's availability, or ''."""
    valid_from = to_datetime(benefit.valid_from) if benefit.HasField("valid_from") else None
    valid_until = to_datetime(benefit.valid_until) if benefit.HasField("valid_until") else None
    if valid_from is not None and now < valid_from:
        return "the benefit is not available yet"
    if valid_until is not None and now >= valid_until:
        return "the benefit is no longer available"
    if benefit.kind == K.BENEFIT_KIND_BIRTHDAY_BONUS and not in_birthday_month(birth_month, now, zone):
        return "a birthday bonus is available in the member's birthday month only"
    coupons_expire = to_datetime(benefit.coupon_template.expires_at) \
        if benefit.coupon_template.HasField("expires_at") else None
    if coupons_expire is not None and coupons_expire <= now:
        return "the coupons this benefit issues have expired"
    return ""


def ineligibility(benefit: benefits_pb2.Benefit, now: datetime, zone: ZoneInfo, uses_in_period: int,
                  birth_month: int | None) -> Ineligible | None:
    """Why the member (whose tier grants the benefit) may not use it now, or None."""
    if benefit.state != ACTIVE:
        return Ineligible(BENEFIT_NOT_ACTIVE, "the benefit is retired")
    window = _out_of_window(benefit, now, zone, birth_month)
    if window:
        return Ineligible(BENEFIT_OUT_OF_WINDOW, window)
    if benefit.HasField("usage_limit") and uses_in_period >= benefit.usage_limit.max_uses:
        return Ineligible(BENEFIT_USAGE_LIMIT_REACHED,
                          f"the benefit's limit of {benefit.usage_limit.max_uses} use(s) per period is reached")
    return None


def remaining_uses(benefit: benefits_pb2.Benefit, uses_in_period: int) -> int:
    """Uses left in the period; -1 = unlimited."""
    if not benefit.HasField("usage_limit"):
        return -1
    return max(0, benefit.usage_limit.max_uses - uses_in_period)


def display_texts(benefit: benefits_pb2.Benefit, language_tag: str) -> tuple[str, str]:
    """(name, description) in the language asked for: the exact tag, else the same language
    (zh for zh-CN), else English, else the operator's name and description."""
    wanted = (language_tag or DEFAULT_LANGUAGE).lower()
    by_tag = {t.language_tag.lower(): t for t in benefit.texts}
    by_language = {t.language_tag.lower().split("-", 1)[0]: t for t in reversed(benefit.texts)}
    text = (by_tag.get(wanted) or by_language.get(wanted.split("-", 1)[0]) or by_tag.get(DEFAULT_LANGUAGE)
            or by_language.get(DEFAULT_LANGUAGE))
    if text is None:
        return benefit.name, benefit.description
    return text.name, text.description
