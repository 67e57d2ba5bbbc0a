"""Why a member has its score, and what alone would lift it to the next tier, in the member's words.

Pure functions over one member's raw feature vector and the statistics of the run that scored it
(the same ones online scoring uses, so an explanation adds up to the score the member sees). The
gRPC layer turns the dataclasses into ScoreContribution / ImprovementHint messages.

Hints move one feature at a time: "about 2 more orders" means two more orders and nothing else
would close the gap. Each delta is inverted from the policy's transform, rounded up to what a
member can do (whole orders, days, minutes, whole yuan), then checked by rescoring the member with
it; a delta that does not check out is never shown. Features where "more" is not something to ask
of a member get no hint: ratios and booleans, refunds, and "days since ..." (lower is better).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from services.scoring.domain.kernel import PolicySpec, Statistics, Transform, percentile_one, score_one, transform_one

HINT_CHECKS_MAX = 4  # rounding fix-ups tried before a hint is dropped as not reachable


class FeatureType(IntEnum):
    """Mirror of loyalty.profile.v1.FeatureType (same numbers), to keep generated code out of the
    domain."""

    UNSPECIFIED = 0
    COUNT = 1
    AMOUNT = 2
    DURATION = 3
    DAYS = 4
    RATIO = 5
    BOOLEAN = 6


@dataclass(frozen=True)
class Contribution:
    feature_name: str
    display_name: str
    raw_value: float
    transformed_value: float
    weight: float
    contribution: float  # weight × transformed_value; they sum to the score
    population_percentile: float  # share of the population with a lower raw value, [0, 100]


@dataclass(frozen=True)
class Hint:
    feature_name: str
    text: str
    raw_delta: float  # in the feature's unit (minor units for money), rounded up to a whole unit
    money_minor: int | None  # the same delta as money, for AMOUNT features


@dataclass(frozen=True)
class _Wording:
    """How members read a feature family: names, and a hint template ({n} = the rounded delta,
    {money} = the currency's name) or None when the family is never advised."""

    kind: FeatureType  # the catalogue's type, used when the caller passes none
    en: str
    zh: str
    hint_en: tuple[str, str] | None = None  # (one, many)
    hint_zh: str | None = None


_SPEND_EN = ("about {n} {money} more spend", "about {n} {money} more spend")
_FAMILIES: dict[str, _Wording] = {
    "purchase_count": _Wording(FeatureType.COUNT, "orders", "订单数",
                               ("about {n} more order", "about {n} more orders"), "约再下 {n} 单"),
    "gross_spend": _Wording(FeatureType.AMOUNT, "gross spend", "消费总额", _SPEND_EN, "约再消费 {n} {money}"),
    "net_spend": _Wording(FeatureType.AMOUNT, "net spend", "净消费", _SPEND_EN, "约再消费 {n} {money}"),
    "items_purchased": _Wording(FeatureType.COUNT, "items bought", "购买件数",
                                ("about {n} more item", "about {n} more items"), "约再购买 {n} 件"),
    "refund_count": _Wording(FeatureType.COUNT, "refunds", "退款次数"),
    "refund_amount": _Wording(FeatureType.AMOUNT, "refunded amount", "退款金额"),
    "refund_ratio": _Wording(FeatureType.RATIO, "refund ratio", "退款率"),
    "average_order_value": _Wording(FeatureType.AMOUNT, "average order value", "客单价",
                                    ("about {n} {money} higher average order value",) * 2,
                                    "客单价约再提高 {n} {money}"),
    "visit_count": _Wording(FeatureType.COUNT, "visits", "访问次数",
                            ("about {n} more visit", "about {n} more visits"), "约再访问 {n} 次"),
    "browse_minutes": _Wording(FeatureType.DURATION, "browsing time", "浏览时长",
                               ("about {n} more minute of browsing", "about {n} more minutes of browsing"),
                               "约再浏览 {n} 分钟"),
    "view_count": _Wording(FeatureType.COUNT, "product views", "商品浏览量",
                           ("about {n} more product view", "about {n} more product views"), "约再浏览 {n} 件商品"),
    "search_count": _Wording(FeatureType.COUNT, "searches", "搜索次数",
                             ("about {n} more search", "about {n} more searches"), "约再搜索 {n} 次"),
    "click_count": _Wording(FeatureType.COUNT, "clicks", "点击次数",
                            ("about {n} more click", "about {n} more clicks"), "约再点击 {n} 次"),
    "cart_add_count": _Wording(FeatureType.COUNT, "add-to-carts", "加购次数",
                               ("about {n} more add-to-cart", "about {n} more add-to-carts"), "约再加购 {n} 次"),
    "active_days": _Wording(FeatureType.DAYS, "active days", "活跃天数",
                            ("about {n} more active day", "about {n} more active days"), "约再活跃 {n} 天"),
}
_POINTS: dict[str, _Wording] = {
    "tenure_days": _Wording(FeatureType.DAYS, "membership tenure", "会员时长",
                            ("about {n} more day of membership", "about {n} more days of membership"),
                            "会员时长约再增加 {n} 天"),
    "days_since_last_purchase": _Wording(FeatureType.DAYS, "days since last purchase", "距上次购买天数"),
    "days_since_last_activity": _Wording(FeatureType.DAYS, "days since last activity", "距上次活跃天数"),
}
_WINDOWED = re.compile(r"(?P<base>[a-z_]+?)(?:_(?P<days>\d+)d)?")

# ISO 4217 code → (minor digits, English one, English many, Chinese). Others: 2 digits, the code.
_CURRENCIES: dict[str, tuple[int, str, str, str]] = {
    "CNY": (2, "yuan", "yuan", "元"),
    "HKD": (2, "Hong Kong dollar", "Hong Kong dollars", "港元"),
    "USD": (2, "dollar", "dollars", "美元"),
    "EUR": (2, "euro", "euros", "欧元"),
    "GBP": (2, "pound", "pounds", "英镑"),
    "JPY": (0, "yen", "yen", "日元"),
    "KRW": (0, "won", "won", "韩元"),
}


def _is_chinese(locale: str) -> bool:
    """zh, zh-CN, zh-Hans-CN, zh_SG...: Simplified Chinese. Traditional tags (zh-Hant, zh-TW, zh-HK,
    zh-MO) fall back to English like any unsupported locale: Simplified text would be the wrong
    script for them."""
    parts = locale.replace("_", "-").lower().split("-")
    if parts[0] != "zh":
        return False
    return not ({"hant", "tw", "hk", "mo"} & set(parts[1:]))


def _lookup(feature_name: str) -> tuple[_Wording | None, int]:
    """The wording of a catalogue name and its window in days (0 for lifetime or point features)."""
    if feature_name in _POINTS:
        return _POINTS[feature_name], 0
    match = _WINDOWED.fullmatch(feature_name)
    if match and match["base"] in _FAMILIES:
        return _FAMILIES[match["base"]], int(match["days"] or 0)
    return None, 0


def display_name(feature_name: str, locale: str) -> str:
    """Member-facing name: "net spend (365 days)" / "净消费（365天）"; unknown names as they are."""
    wording, days = _lookup(feature_name)
    if wording is None:
        return feature_name
    if _is_chinese(locale):
        return f"{wording.zh}（{days}天）" if days else wording.zh
    if days:
        return f"{wording.en} ({days} {'day' if days == 1 else 'days'})"
    return wording.en


def contributions(x: npt.NDArray[np.floating[Any]], spec: PolicySpec, stats: Statistics,
                  feature_types: Mapping[str, int], locale: str) -> list[Contribution]:
    """Each feature's part of the score, largest |contribution| first (policy order among equals).
    ``feature_types`` does not change a contribution; it is taken so that every explain call gets the
    same inputs."""
    del feature_types
    values = np.asarray(x, dtype=np.float64)
    transformed = transform_one(values, spec, stats)
    parts = [
        Contribution(feature_name=f.name, display_name=display_name(f.name, locale), raw_value=float(values[j]),
                     transformed_value=float(transformed[j]), weight=f.weight,
                     contribution=f.weight * float(transformed[j]),
                     population_percentile=percentile_one(float(values[j]), fs.quantiles))
        for j, (f, fs) in enumerate(zip(spec.features, stats.features, strict=True))
    ]
    return sorted(parts, key=lambda c: -abs(c.contribution))


def _exact_delta(x: float, j: int, step: float, spec: PolicySpec, stats: Statistics, now: float) -> float | None:
    """Raw change of feature j that raises its transformed value by ``step`` (> 0) before rounding,
    or None when the transform cannot get there (past a winsorize cap or the population maximum,
    a constant standardised feature, an overflowing log)."""
    feature, fs = spec.features[j], stats.features[j]
    kind = feature.transform
    if kind is Transform.IDENTITY:
        return step
    if kind is Transform.STANDARDIZE:
        return step * fs.std_dev if fs.std_dev > 0 else None
    if kind is Transform.WINSORIZE:
        return step if x + step <= fs.winsorize_cap else None
    if kind is Transform.LOG1P:
        target = now + step
        return math.expm1(target) - x if target < 700.0 else None  # expm1(710) overflows
    # RANK_PERCENTILE: the value at the wanted rank on the grid, read back linearly.
    wanted = now + step
    grid = fs.quantiles
    if wanted > 1.0 or grid.size < 2:
        return None
    value = float(np.interp(wanted * (grid.size - 1), np.arange(grid.size), grid))
    return value - x if value > x else None


def _next_rank_value(x: float, grid: npt.NDArray[np.float64]) -> float | None:
    above = grid[grid > x]
    return float(above[0]) if above.size else None


def _feature_type(given: int | None, wording: _Wording | None) -> FeatureType:
    """The caller's type, else the catalogue family's; a number this module does not know (a newer
    catalogue) reads as UNSPECIFIED, which gets no hint rather than a wrongly worded one."""
    if given is None or given == FeatureType.UNSPECIFIED:
        return wording.kind if wording is not None else FeatureType.UNSPECIFIED
    try:
        return FeatureType(given)
    except ValueError:
        return FeatureType.UNSPECIFIED


def _money(currency: str) -> tuple[int, str, str, str]:
    return _CURRENCIES.get(currency.upper(), (2, currency, currency, currency))


def _hint_text(wording: _Wording | None, kind: FeatureType, name: str, amount: int, locale: str,
               currency: str) -> str:
    chinese = _is_chinese(locale)
    _, money_one, money_many, money_zh = _money(currency)
    if chinese:
        number = str(amount)
        if wording is not None and wording.hint_zh is not None:
            return wording.hint_zh.format(n=number, money=money_zh)
        unit = f" {money_zh}" if kind is FeatureType.AMOUNT else ""
        return f"{display_name(name, locale)}约再增加 {number}{unit}"
    number = f"{amount:,}"
    money = money_one if amount == 1 else money_many
    if wording is not None and wording.hint_en is not None:
        return wording.hint_en[0 if amount == 1 else 1].format(n=number, money=money)
    if kind is FeatureType.AMOUNT:
        return f"about {number} {money} more {display_name(name, locale)}"
    return f"about {number} more {display_name(name, locale)}"


def hints(x: npt.NDArray[np.floating[Any]], spec: PolicySpec, stats: Statistics, gap: float,
          feature_types: Mapping[str, int], locale: str, currency: str = "CNY", max_hints: int = 3) -> list[Hint]:
    """Ways to close a score gap (> 0) by moving one feature, least effort first, at most ``max_hints``.

    Effort is the delta relative to what the member already has, or to the population mean when
    that is larger (a member at zero spend is not told that any spend is an infinite effort), never
    below one unit: δ / max(|x|, |mean|, unit). It makes "2 more orders" (on 10) and "340 yuan" (on
    1,000 yuan) comparable although their units are not."""
    if not (gap > 0 and math.isfinite(gap)):
        return []
    values = np.asarray(x, dtype=np.float64)
    score = score_one(values, spec, stats)
    target = score + gap
    now = transform_one(values, spec, stats)
    found: list[tuple[float, int, Hint]] = []
    for j, (feature, fs) in enumerate(zip(spec.features, stats.features, strict=True)):
        wording, _ = _lookup(feature.name)
        kind = _feature_type(feature_types.get(feature.name), wording)
        never_advised = wording is not None and wording.hint_en is None
        if (feature.weight <= 0 or never_advised or feature.name.startswith("days_since_")
                or kind not in (FeatureType.COUNT, FeatureType.AMOUNT, FeatureType.DURATION, FeatureType.DAYS)):
            continue
        x_j = float(values[j])
        delta = _exact_delta(x_j, j, gap / feature.weight, spec, stats, float(now[j]))
        if delta is None:
            continue
        digits = _money(currency)[0] if kind is FeatureType.AMOUNT else 0
        unit = float(10**digits)
        # Round up to whole units; the tolerance keeps an exact 4.0 from becoming 5 through float noise.
        delta = max(unit, math.ceil(delta / unit - 1e-9) * unit)
        moved = values.copy()
        for _ in range(HINT_CHECKS_MAX):
            moved[j] = x_j + delta
            if score_one(moved, spec, stats) >= target:
                break
            # Short by rounding (or by a tie on the rank grid): one more unit, or the next grid value.
            following = _next_rank_value(x_j + delta, fs.quantiles) if feature.transform is Transform.RANK_PERCENTILE \
                else x_j + delta + unit
            if following is None:
                delta = math.inf
                break
            delta = math.ceil((following - x_j) / unit - 1e-9) * unit
        else:
            continue
        if not math.isfinite(delta):
            continue
        amount = round(delta / unit)
        hint = Hint(feature_name=feature.name, text=_hint_text(wording, kind, feature.name, amount, locale, currency),
                    raw_delta=delta, money_minor=int(delta) if kind is FeatureType.AMOUNT else None)
        effort = delta / max(abs(x_j), abs(fs.mean), unit)
        found.append((effort, j, hint))
    found.sort(key=lambda item: (item[0], item[1]))
    return [hint for _, _, hint in found[:max_hints]]


def _join(texts: list[str], chinese: bool) -> str:
    if chinese:
        return "或".join(texts)
    if len(texts) <= 1:
        return "".join(texts)
    return ", ".join(texts[:-1]) + " or " + texts[-1]


def summary(tier_name: str, next_tier_name: str | None, hints: list[Hint], locale: str) -> str:
    """One sentence for the member: where they are and, below the top, what would get them higher."""
    chinese = _is_chinese(locale)
    texts = [h.text for h in hints]
    if chinese:
        if next_tier_name is None:
            return f"您已是最高等级{tier_name}。"
        if not texts:
            return f"您当前是{tier_name}，继续加油即可升级为{next_tier_name}。"
        return f"您当前是{tier_name}，{_join(texts, True)}即可升级为{next_tier_name}。"
    if next_tier_name is None:
        return f"You are {tier_name}, the top tier."
    if not texts:
        return f"You are {tier_name}; keep going to reach {next_tier_name}."
    return f"You are {tier_name}; {_join(texts, False)} would take you to {next_tier_name}."
