"""Tier policies: the semantic checks CreatePolicy and ValidatePolicy run beyond the declarative field
rules, the non-blocking warnings, and the kernel's form of a stored policy.

Features are checked against profile's catalogue (passed in as a mapping name → definition), so the
checks stay pure: the service layer fetches the catalogue, this module judges.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from libs.errors import FieldViolation
from libs.messages import language_of
from loyalty.profile.v1 import feature_pb2
from loyalty.scoring.v1 import policy_pb2
from services.scoring.domain import kernel
from services.scoring.domain.schedule import CronError, parse_cron

P = policy_pb2
SHARES_TOTAL_BPS = 10_000
TINY_SHARE_BPS = 100  # a tier meant for under 1 % of members is worth a second look
WINDOW_DAYS_MAX = 730
DEFAULT_ROLLING_MONTHS = 12

# Attributes a tier must never be decided on (fairness): a feature named after one, or built from
# one, is refused whatever the catalogue says.
PROTECTED_ATTRIBUTES = ("gender", "sex", "age", "age_band", "birth", "birth_date", "birth_month", "birth_year",
                        "birthday", "dob", "region", "ethnicity", "religion", "nationality", "marital_status")
_WINDOWED = re.compile(r"([a-z][a-z0-9_]*?)_(\d+)d")


@dataclass(frozen=True)
class Warning:
    field: str
    code: str
    message: str


def is_protected(name: str) -> bool:
    tokens = name.split("_")
    return any(name == p or name.startswith(p + "_") or p in tokens for p in PROTECTED_ATTRIBUTES)


def resolve_feature(name: str, catalogue: Mapping[str, feature_pb2.FeatureDefinition]
                    ) -> feature_pb2.FeatureDefinition | None:
    """The catalogue's definition of `name`, including "<window_base>_<N>d" names of a family."""
    if name in catalogue:
        return catalogue[name]
    match = _WINDOWED.fullmatch(name)
    if match is None or not 1 <= int(match.group(2)) <= WINDOW_DAYS_MAX:
        return None
    base = match.group(1)
    for definition in catalogue.values():
        if definition.window_base == base:
            resolved = feature_pb2.FeatureDefinition()
            resolved.CopyFrom(definition)
            resolved.name = name
            resolved.window_days = int(match.group(2))
            return resolved
    return None


def _feature_violations(policy: policy_pb2.Policy, catalogue: Mapping[str, feature_pb2.FeatureDefinition],
                        path: str) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    seen: dict[str, int] = {}
    for i, feature in enumerate(policy.features):
        where = f"{path}.features[{i}]"
        name = feature.feature_name
        if is_protected(name):
            violations.append(FieldViolation(f"{where}.feature_name",
                                             f"{name!r} is a protected attribute and can never decide a tier"))
        elif resolve_feature(name, catalogue) is None:
            violations.append(FieldViolation(f"{where}.feature_name",
                                             f"{name!r} is not in profile's feature catalogue"))
        if name in seen:
            violations.append(FieldViolation(f"{where}.feature_name", f"duplicates features[{seen[name]}]"))
        else:
            seen[name] = i
        kind = feature.transform.kind
        percentile = feature.transform.winsorize_percentile
        if kind == P.TRANSFORM_KIND_WINSORIZE and not 50 < percentile <= 100:
            violations.append(FieldViolation(f"{where}.transform.winsorize_percentile",
                                             "must be in (50, 100] for WINSORIZE, e.g. 99"))
        elif kind != P.TRANSFORM_KIND_WINSORIZE and percentile != 0:
            violations.append(FieldViolation(f"{where}.transform.winsorize_percentile",
                                             "must be 0 unless the transform is WINSORIZE"))
    return violations


def _increasing(values: list[float] | list[int], where: str) -> list[FieldViolation]:
    return [FieldViolation(f"{where}[{i}]", f"must be above the previous threshold ({values[i - 1]})")
            for i in range(1, len(values)) if not values[i] > values[i - 1]]


def _rule_violations(policy: policy_pb2.Policy, path: str) -> list[FieldViolation]:
    tiers = len(policy.tiers)
    rule = policy.WhichOneof("threshold_rule")
    violations: list[FieldViolation] = []
    if rule == "fixed":
        scores = list(policy.fixed.min_scores)
        if len(scores) != tiers - 1:
            violations.append(FieldViolation(f"{path}.fixed.min_scores",
                                             f"needs one threshold per tier above the lowest: {tiers - 1}, not "
                                             f"{len(scores)}"))
        violations += _increasing(scores, f"{path}.fixed.min_scores")
    elif rule == "quantile":
        shares = list(policy.quantile.target_share_bps)
        if len(shares) != tiers:
            violations.append(FieldViolation(f"{path}.quantile.target_share_bps",
                                             f"needs one share per tier: {tiers}, not {len(shares)}"))
        if sum(shares) != SHARES_TOTAL_BPS:
            violations.append(FieldViolation(f"{path}.quantile.target_share_bps",
                                             f"must sum to 10000 bp (100 %), not {sum(shares)}"))
    elif rule == "qualifying_points":
        points = list(policy.qualifying_points.min_points)
        if len(points) != tiers - 1:
            violations.append(FieldViolation(f"{path}.qualifying_points.min_points",
                                             f"needs one minimum per tier above the lowest: {tiers - 1}, not "
                                             f"{len(points)}"))
        violations += _increasing(points, f"{path}.qualifying_points.min_points")
    return violations


def _cron_violation(cron: str) -> str | None:
    try:
        parse_cron(cron)
    except CronError as error:
        return str(error)
    return None


def _schedule_violations(policy: policy_pb2.Policy, path: str) -> list[FieldViolation]:
    schedule = policy.schedule
    violations: list[FieldViolation] = []
    if schedule.kind == P.SCHEDULE_KIND_CRON:
        problem = _cron_violation(schedule.cron)
        if problem:
            violations.append(FieldViolation(f"{path}.schedule.cron", problem))
    elif schedule.cron:
        violations.append(FieldViolation(f"{path}.schedule.cron", "is only for SCHEDULE_KIND_CRON"))
    if schedule.day_of_month and schedule.kind not in (P.SCHEDULE_KIND_MONTHLY, P.SCHEDULE_KIND_UNSPECIFIED):
        violations.append(FieldViolation(f"{path}.schedule.day_of_month", "is only for SCHEDULE_KIND_MONTHLY"))
    if schedule.time_zone:
        try:
            ZoneInfo(schedule.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            violations.append(FieldViolation(f"{path}.schedule.time_zone",
                                             f"{schedule.time_zone!r} is not an IANA time zone"))
    window = policy.qualification_window
    if window.rolling_months and window.kind not in (P.QUALIFICATION_WINDOW_KIND_ROLLING_MONTHS,
                                                     P.QUALIFICATION_WINDOW_KIND_UNSPECIFIED):
        violations.append(FieldViolation(f"{path}.qualification_window.rolling_months",
                                         "is only for QUALIFICATION_WINDOW_KIND_ROLLING_MONTHS"))
    return violations


def violations(policy: policy_pb2.Policy, catalogue: Mapping[str, feature_pb2.FeatureDefinition],
               path: str = "policy") -> list[FieldViolation]:
    """Every semantic problem of a policy (empty when it is valid)."""
    found = _feature_violations(policy, catalogue, path)
    seen: dict[str, int] = {}
    for i, tier in enumerate(policy.tiers):
        if tier.tier_id in seen:
            found.append(FieldViolation(f"{path}.tiers[{i}].tier_id",
                                        f"duplicates tier_id {tier.tier_id!r} of tiers[{seen[tier.tier_id]}]"))
        else:
            seen[tier.tier_id] = i
        languages = [t.language_tag.lower() for t in tier.localized_names]
        if len(set(languages)) != len(languages):
            found.append(FieldViolation(f"{path}.tiers[{i}].localized_names", "has a language twice"))
    return (found + _rule_violations(policy, path) + _schedule_violations(policy, path)
            + _benefit_violations(policy, path))


def _benefit_violations(policy: policy_pb2.Policy, path: str) -> list[FieldViolation]:
    """Benefit values are all or nothing (a report cannot average a ladder priced in part), at least
    0, in one currency."""
    priced = [i for i, tier in enumerate(policy.tiers) if tier.HasField("yearly_benefit_value")]
    if not priced:
        return []
    violations = [FieldViolation(f"{path}.tiers[{i}].yearly_benefit_value",
                                 "must be given for every tier once one tier has it")
                  for i in range(len(policy.tiers)) if i not in priced]
    currency = policy.tiers[priced[0]].yearly_benefit_value.currency
    for i in priced:
        value = policy.tiers[i].yearly_benefit_value
        if value.amount_minor < 0:
            violations.append(FieldViolation(f"{path}.tiers[{i}].yearly_benefit_value.amount_minor",
                                             "must be at least 0"))
        if value.currency != currency:
            violations.append(FieldViolation(f"{path}.tiers[{i}].yearly_benefit_value.currency",
                                             f"must be {currency!r} like tiers[{priced[0]}]: one currency per ladder"))
    return violations


def benefit_values(policy: policy_pb2.Policy) -> tuple[list[int], str] | None:
    """Each tier's yearly benefit value (minor units, ladder order) and the currency; None unpriced."""
    if not policy.tiers or not all(t.HasField("yearly_benefit_value") for t in policy.tiers):
        return None
    return [t.yearly_benefit_value.amount_minor for t in policy.tiers], policy.tiers[0].yearly_benefit_value.currency


def warnings(policy: policy_pb2.Policy, path: str = "policy") -> list[Warning]:
    """Remarks on a valid policy that do not block it."""
    found: list[Warning] = []
    for i, feature in enumerate(policy.features):
        if feature.weight == 0:
            found.append(Warning(f"{path}.features[{i}].weight", "ZERO_WEIGHT",
                                 f"{feature.feature_name} has weight 0 and does not change any score"))
        elif feature.weight > 0 and feature.feature_name.startswith("days_since_"):
            found.append(Warning(f"{path}.features[{i}].weight", "POSITIVE_RECENCY_WEIGHT",
                                 f"{feature.feature_name} grows while a member stays away: a positive weight "
                                 "rewards inactivity"))
    if policy.WhichOneof("threshold_rule") == "quantile":
        for i, share in enumerate(policy.quantile.target_share_bps):
            if share < TINY_SHARE_BPS:
                found.append(Warning(f"{path}.quantile.target_share_bps[{i}]", "TINY_TIER_SHARE",
                                     f"tier {i} targets {share / 100:g} % of members"))
    if policy.WhichOneof("threshold_rule") == "fixed":
        total = sum(abs(f.weight) for f in policy.features)
        transforms = {f.transform.kind for f in policy.features}
        if transforms <= {P.TRANSFORM_KIND_RANK_PERCENTILE} and total and abs(total - 1) > 1e-9:
            found.append(Warning(f"{path}.features", "WEIGHTS_NOT_NORMALISED",
                                 f"rank-percentile weights sum to {total:g}: scores are not on a 0-1 scale"))
    if policy.hysteresis.downgrade_margin == 0 and policy.hysteresis.grace_cycles == 0:
        found.append(Warning(f"{path}.hysteresis", "NO_HYSTERESIS",
                             "members just under a threshold will move down and up from cycle to cycle"))
    return found


def spec_of(policy: policy_pb2.Policy) -> kernel.PolicySpec:
    """The kernel's form of a (checked) policy."""
    features = tuple(kernel.FeatureSpec(f.feature_name, kernel.Transform(f.transform.kind), f.weight,
                                        f.transform.winsorize_percentile) for f in policy.features)
    hysteresis = policy.hysteresis
    rules = {"fixed": kernel.Rule.FIXED, "quantile": kernel.Rule.QUANTILE,
             "qualifying_points": kernel.Rule.QUALIFYING_POINTS}
    # Only the chosen rule's list is non-empty: the others read as empty from an unset oneof member.
    return kernel.PolicySpec(
        features=features, tier_count=len(policy.tiers), rule=rules[policy.WhichOneof("threshold_rule") or "fixed"],
        fixed_min_scores=tuple(policy.fixed.min_scores),
        quantile_share_bps=tuple(policy.quantile.target_share_bps),
        min_points=tuple(policy.qualifying_points.min_points),
        downgrade_margin=hysteresis.downgrade_margin, max_tiers_down=hysteresis.max_tiers_down_per_cycle or 1,
        grace_cycles=hysteresis.grace_cycles)


def tier_ids(policy: policy_pb2.Policy) -> list[str]:
    return [t.tier_id for t in policy.tiers]


def tier_name(policy: policy_pb2.Policy, tier_id: str, locale: str) -> str:
    """The tier's name in `locale` (exact tag, then its language), else its default name. Chinese
    falls back only within one script: a zh-TW member never gets a Simplified name (nor the reverse)."""
    for tier in policy.tiers:
        if tier.tier_id != tier_id:
            continue
        wanted = locale.lower()
        names = {t.language_tag.lower(): t.text for t in tier.localized_names}
        if wanted in names:
            return names[wanted]
        language = wanted.split("-")[0]
        for tag, text in names.items():
            if tag.split("-")[0] == language and (language != "zh" or language_of(tag) == language_of(wanted)):
                return text
        return tier.display_name
    return tier_id


def rolling_months(policy: policy_pb2.Policy) -> int:
    return policy.qualification_window.rolling_months or DEFAULT_ROLLING_MONTHS


def window_start(policy: policy_pb2.Policy, as_of: datetime, zone: ZoneInfo) -> datetime:
    """Start of the qualification window that ends at `as_of`: the same wall-clock time N calendar
    months earlier (clamped to the month's last day), or 1 January of the year, in the zone."""
    local = as_of.astimezone(zone)
    if policy.qualification_window.kind == P.QUALIFICATION_WINDOW_KIND_CALENDAR_YEAR:
        return datetime(local.year, 1, 1, tzinfo=zone)
    months = local.year * 12 + local.month - 1 - rolling_months(policy)
    year, month = divmod(months, 12)
    day = min(local.day, calendar.monthrange(year, month + 1)[1])
    return local.replace(year=year, month=month + 1, day=day)
