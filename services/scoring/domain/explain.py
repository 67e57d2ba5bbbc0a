"""Why a member has its score, and what alone would lift it to the next tier, in the member's words.

Pure functions over one member's raw feature vector and the statistics of the run that scored it
(the same ones online scoring uses, so an explanation adds up to the score the member sees). The
gRPC layer turns the dataclasses into ScoreContribution / ImprovementHint messages.

Hints move one feature at a time: "about 2 more orders" means two more orders and nothing else
would close the gap. Each delta is inverted from the policy's transform, rounded up to what a
member can do (whole orders, days, minutes, whole yuan), then checked by rescoring the member with
it; a delta that does not check out is never shown. Features where "more" is not something to ask
of a member get no hint: ratios and booleans, refunds, and "days since ..." (lower is better).

The words are not here: every name, hint, currency name and summary sentence is a key of the
service's catalogue (services/scoring/messages.yaml), rendered through a `TextLookup` the caller
passes (the snapshot with the operators' overrides; the shipped wording when none is given). This
module decides which key, which plural form and how numbers are written, never the wording.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from libs.messages import Catalogue, Texts, language_of
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


class TextLookup(Protocol):
    """Where member-facing wording comes from: a libs.messages.Texts snapshot (the shipped catalogue,
    services/scoring/messages.yaml, with the operators' overrides in force), read by the caller."""

    def render(self, key: str, language_tag: str, /, **params: Any) -> str: ...


CATALOGUE_PATH = Path(__file__).resolve().parents[1] / "messages.yaml"


@functools.cache
def shipped_texts() -> Texts:
    """The catalogue's own wording, no overrides: what a caller without a snapshot gets."""
    return Texts(Catalogue.load(CATALOGUE_PATH), {})


@dataclass(frozen=True)
class _Family:
    """A feature family as members read it: its wording is the catalogue's `feature.<family>.name`
    and, when advised, `hint.<family>.one` / `.other`."""

    kind: FeatureType  # the catalogue's type, used when the caller passes none
    advised: bool = True  # False: never the subject of a hint


_FAMILIES: dict[str, _Family] = {
    "purchase_count": _Family(FeatureType.COUNT),
    "gross_spend": _Family(FeatureType.AMOUNT),
    "net_spend": _Family(FeatureType.AMOUNT),
    "items_purchased": _Family(FeatureType.COUNT),
    "refund_count": _Family(FeatureType.COUNT, advised=False),
    "refund_amount": _Family(FeatureType.AMOUNT, advised=False),
    "refund_ratio": _Family(FeatureType.RATIO, advised=False),
    "average_order_value": _Family(FeatureType.AMOUNT),
    "visit_count": _Family(FeatureType.COUNT),
    "browse_minutes": _Family(FeatureType.DURATION),
    "view_count": _Family(FeatureType.COUNT),
    "search_count": _Family(FeatureType.COUNT),
    "click_count": _Family(FeatureType.COUNT),
    "cart_add_count": _Family(FeatureType.COUNT),
    "active_days": _Family(FeatureType.DAYS),
}
_POINTS: dict[str, _Family] = {
    "tenure_days": _Family(FeatureType.DAYS),
    "days_since_last_purchase": _Family(FeatureType.DAYS, advised=False),
    "days_since_last_activity": _Family(FeatureType.DAYS, advised=False),
}
_WINDOWED = re.compile(r"(?P<base>[a-z_]+?)(?:_(?P<days>\d+)d)?")

# ISO 4217 code → minor digits (others: 2). Names are the catalogue's `currency.<code>.one/.other`;
# a code without them is shown as the code.
_MINOR_DIGITS: dict[str, int] = {"CNY": 2, "HKD": 2, "USD": 2, "EUR": 2, "GBP": 2, "JPY": 0, "KRW": 0}
_NAMED_CURRENCIES = frozenset(_MINOR_DIGITS)


def _form(n: int) -> str:
    """The plural form's key suffix: `one` for exactly 1, `other` otherwise (every language)."""
    return "one" if n == 1 else "other"


def _lookup(feature_name: str) -> tuple[str | None, int]:
    """The family of a catalogue name and its window in days (0 for lifetime or point features)."""
    if feature_name in _POINTS:
        return feature_name, 0
    match = _WINDOWED.fullmatch(feature_name)
    if match and match["base"] in _FAMILIES:
        return match["base"], int(match["days"] or 0)
    return None, 0


def _family(name: str | None) -> _Family | None:
    return None if name is None else _POINTS.get(name) or _FAMILIES.get(name)


def display_name(feature_name: str, locale: str, texts: TextLookup | None = None) -> str:
    """Member-facing name: "net spend (365 days)" / "净消费（365天）"; unknown names as they are."""
    family, days = _lookup(feature_name)
    if family is None:
        return feature_name
    texts = texts or shipped_texts()
    name = texts.render(f"feature.{family}.name", locale)
    if days:
        return texts.render(f"feature.windowed_name.{_form(days)}", locale, feature=name, days=days)
    return name


def contributions(x: npt.NDArray[np.floating[Any]], spec: PolicySpec, stats: Statistics,
                  feature_types: Mapping[str, int], locale: str, texts: TextLookup | None = None
                  ) -> list[Contribution]:
    """Each feature's part of the score, largest |contribution| first (policy order among equals).
    ``feature_types`` does not change a contribution; it is taken so that every explain call gets the
    same inputs."""
    del feature_types
    values = np.asarray(x, dtype=np.float64)
    transformed = transform_one(values, spec, stats)
    parts = [
        Contribution(feature_name=f.name, display_name=display_name(f.name, locale, texts), raw_value=float(values[j]),
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


def _feature_type(given: int | None, family: _Family | None) -> FeatureType:
    """The caller's type, else the catalogue family's; a number this module does not know (a newer
    catalogue) reads as UNSPECIFIED, which gets no hint rather than a wrongly worded one."""
    if given is None or given == FeatureType.UNSPECIFIED:
        return family.kind if family is not None else FeatureType.UNSPECIFIED
    try:
        return FeatureType(given)
    except ValueError:
        return FeatureType.UNSPECIFIED


def _minor_digits(currency: str) -> int:
    return _MINOR_DIGITS.get(currency.upper(), 2)


def _currency_name(currency: str, amount: int, locale: str, texts: TextLookup) -> str:
    code = currency.upper()
    return texts.render(f"currency.{code}.{_form(amount)}", locale) if code in _NAMED_CURRENCIES else currency


def _hint_text(family: str | None, kind: FeatureType, name: str, amount: int, locale: str, currency: str,
               texts: TextLookup) -> str:
    # Chinese writes the number bare ("约再消费 34000 元"), English groups thousands ("34,000 yuan").
    number = str(amount) if language_of(locale) == "zh-CN" else f"{amount:,}"
    money = _currency_name(currency, amount, locale, texts)
    if family is not None:
        return texts.render(f"hint.{family}.{_form(amount)}", locale, n=number, money=money)
    generic = "hint.generic.amount" if kind is FeatureType.AMOUNT else "hint.generic.count"
    return texts.render(generic, locale, n=number, money=money, feature=display_name(name, locale, texts))


def hints(x: npt.NDArray[np.floating[Any]], spec: PolicySpec, stats: Statistics, gap: float,
          feature_types: Mapping[str, int], locale: str, currency: str = "CNY", max_hints: int = 3,
          texts: TextLookup | None = None) -> list[Hint]:
    """Ways to close a score gap (> 0) by moving one feature, least effort first, at most ``max_hints``.

    Effort is the delta relative to what the member already has, or to the population mean when
    that is larger (a member at zero spend is not told that any spend is an infinite effort), never
    below one unit: δ / max(|x|, |mean|, unit). It makes "2 more orders" (on 10) and "340 yuan" (on
    1,000 yuan) comparable although their units are not."""
    if not (gap > 0 and math.isfinite(gap)):
        return []
    texts = texts or shipped_texts()
    values = np.asarray(x, dtype=np.float64)
    score = score_one(values, spec, stats)
    target = score + gap
    now = transform_one(values, spec, stats)
    found: list[tuple[float, int, Hint]] = []
    for j, (feature, fs) in enumerate(zip(spec.features, stats.features, strict=True)):
        family_name, _ = _lookup(feature.name)
        family = _family(family_name)
        kind = _feature_type(feature_types.get(feature.name), family)
        never_advised = family is not None and not family.advised
        if (feature.weight <= 0 or never_advised or feature.name.startswith("days_since_")
                or kind not in (FeatureType.COUNT, FeatureType.AMOUNT, FeatureType.DURATION, FeatureType.DAYS)):
            continue
        x_j = float(values[j])
        delta = _exact_delta(x_j, j, gap / feature.weight, spec, stats, float(now[j]))
        if delta is None:
            continue
        digits = _minor_digits(currency) if kind is FeatureType.AMOUNT else 0
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
        text = _hint_text(family_name, kind, feature.name, amount, locale, currency, texts)
        hint = Hint(feature_name=feature.name, text=text, raw_delta=delta,
                    money_minor=int(delta) if kind is FeatureType.AMOUNT else None)
        effort = delta / max(abs(x_j), abs(fs.mean), unit)
        found.append((effort, j, hint))
    found.sort(key=lambda item: (item[0], item[1]))
    return [hint for _, _, hint in found[:max_hints]]


def _join(texts: list[str], locale: str, lookup: TextLookup) -> str:
    """"a, b or c" / "a或b或c": the catalogue's separators between the hints."""
    if len(texts) <= 1:
        return "".join(texts)
    separator = lookup.render("summary.hints_separator", locale)
    return separator.join(texts[:-1]) + lookup.render("summary.hints_last_separator", locale) + texts[-1]


def summary(tier_name: str, next_tier_name: str | None, hints: list[Hint], locale: str,
            texts: TextLookup | None = None) -> str:
    """One sentence for the member: where they are and, below the top, what would get them higher."""
    lookup = texts or shipped_texts()
    if next_tier_name is None:
        return lookup.render("summary.top_tier", locale, tier=tier_name)
    if not hints:
        return lookup.render("summary.keep_going", locale, tier=tier_name, next_tier=next_tier_name)
    return lookup.render("summary.with_hints", locale, tier=tier_name, next_tier=next_tier_name,
                         hints=_join([h.text for h in hints], locale, lookup))
