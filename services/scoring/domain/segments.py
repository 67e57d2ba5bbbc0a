"""Member segmentation: k-means on standardised features, a readable name, description and offer per
centroid, and a 2-D PCA map for operators.

Sketch: two million members × up to 32 features is 512 MB of float64; k-means (Lloyd, a few restarts)
is a few matrix products per iteration, and MiniBatchKMeans takes over above a few hundred thousand
rows. The silhouette is quadratic in its sample (20,000 members by default ≈ 4·10⁸ distances per k),
which is why it is computed on a sample, the same one for every k tried.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

K_MIN_DEFAULT = 3
K_MAX_DEFAULT = 8
SILHOUETTE_SAMPLE_DEFAULT = 20_000
KMEANS_RESTARTS = 3
MINIBATCH_ROWS_MIN = 200_000  # from this many members k-means runs on mini-batches
MINIBATCH_BATCH_ROWS = 4096
PCA_SAMPLE_POINTS_MAX = 10_000
DISTINCTIVE_Z_MIN = 0.5  # a centroid value this far from the mean (in standard deviations) describes it
DESCRIPTION_TRAITS_MAX = 4
CURRENCY = "CNY"
MINOR_PER_MAJOR = 100
AVERAGE_ORDER_VALUE_DEFAULT_MINOR = 10_000  # 100 yuan, when the segmentation has no basket feature
DAY_S = 86_400


@dataclass(frozen=True)
class SilhouetteScore:
    """Mirrors loyalty.scoring.v1.SilhouetteScore."""

    k: int
    silhouette: float


@dataclass(frozen=True, eq=False)  # arrays do not compare with ==
class SegmentationResult:
    """One k-means segmentation. Segment indices are ordered by size, largest first, so that index 0
    is the bulk of the members whatever order k-means found the clusters in."""

    k: int
    k_chosen_automatically: bool
    labels: np.ndarray  # (n,) int16 segment index per member
    distances: np.ndarray  # (n,) float64 Euclidean distance to the member's centroid, standardised space
    centroids_z: np.ndarray  # (k, f) standardised
    centroids_raw: np.ndarray  # (k, f) in the features' raw units
    sizes: np.ndarray  # (k,) int64 members per segment
    silhouettes: tuple[SilhouetteScore, ...]  # every k tried, ascending k
    silhouette: float  # of the chosen k
    inertia: float  # sum of squared distances to the centroids


@dataclass(frozen=True)
class PcaLoading:
    """Mirrors loyalty.scoring.v1.PcaLoading."""

    feature_name: str
    pc1: float
    pc2: float


@dataclass(frozen=True)
class PcaPoint:
    """Mirrors loyalty.scoring.v1.PcaPoint, with the row of the member it plots."""

    x: float
    y: float
    segment_index: int
    member_index: int


@dataclass(frozen=True, eq=False)  # arrays do not compare with ==
class PcaSummary:
    """Mirrors loyalty.scoring.v1.PcaSummary, plus what Segment and SegmentMembership need."""

    explained_variance_pc1: float
    explained_variance_pc2: float
    loadings: tuple[PcaLoading, ...]
    sample_points: tuple[PcaPoint, ...]
    coordinates: np.ndarray  # (n, 2) every member on the map (SegmentMembership.pca_x, pca_y)
    segment_centres: np.ndarray  # (k, 2) mean position per segment (Segment.pca_x, pca_y)
    segment_spreads: np.ndarray  # (k, 2) standard deviation per segment and axis (Segment.pca_spread_x, _y)


class OfferKind(enum.IntEnum):
    """Mirrors loyalty.scoring.v1.OfferKind (same numbers)."""

    NONE = 1
    BONUS_POINTS = 2
    COUPON = 3
    CATEGORY_COUPON = 4
    EARN_MULTIPLIER = 5


@dataclass(frozen=True)
class Offer:
    """Mirrors loyalty.scoring.v1.OfferStrategy; money in minor units of `currency`, validity in seconds."""

    kind: OfferKind
    rationale: str
    bonus_points: int = 0
    coupon_value_minor: int = 0
    min_spend_minor: int = 0
    currency: str = CURRENCY
    category: str = ""
    earn_multiplier_bps: int = 0
    validity_s: int = 0


def standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Z, mean, std) with Z = (X − mean) / std per column; a constant column gets std 1 (so it maps to
    0 and de-standardises back to its value) instead of a division by zero."""
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (X - mean) / std, mean, std


def _kmeans(Z: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if Z.shape[0] >= MINIBATCH_ROWS_MIN:
        model = MiniBatchKMeans(n_clusters=k, n_init=KMEANS_RESTARTS, batch_size=MINIBATCH_BATCH_ROWS,
                                random_state=seed)
    else:
        model = KMeans(n_clusters=k, n_init=KMEANS_RESTARTS, random_state=seed)
    labels = model.fit_predict(Z)
    return np.asarray(labels, dtype=np.int64), np.asarray(model.cluster_centers_, dtype=np.float64)


def _silhouette(Z: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette; 0 when the sample holds fewer than two clusters (undefined there)."""
    from sklearn.metrics import silhouette_score

    clusters = np.unique(labels).size
    if clusters < 2 or clusters >= labels.size:
        return 0.0
    return float(silhouette_score(Z, labels))


def choose_k_and_cluster(Z: np.ndarray, mean: np.ndarray, std: np.ndarray, *, k: int | None = None,
                         k_min: int = K_MIN_DEFAULT, k_max: int = K_MAX_DEFAULT,
                         silhouette_sample: int = SILHOUETTE_SAMPLE_DEFAULT, seed: int = 0) -> SegmentationResult:
    """k-means with k given, or the k in [k_min, k_max] with the best silhouette (ties: the smaller k,
    fewer segments being easier to act on). Silhouettes are computed on one random sample of members
    (the same for every k, so they compare). The final labels come from a k-means of the chosen k
    over all members; `mean` and `std` (from standardise) map the centroids back to raw units.
    """
    n, f = Z.shape
    if mean.shape != (f,) or std.shape != (f,):
        raise ValueError("mean and std need one entry per feature")
    candidates = [k] if k is not None else list(range(k_min, k_max + 1))
    if not candidates or min(candidates) < 2:
        raise ValueError("k must be at least 2 and k_min at most k_max")
    if n <= max(candidates):
        raise ValueError(f"{n} members cannot form {max(candidates)} segments")
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=silhouette_sample, replace=False)) if n > silhouette_sample else np.arange(n)
    fits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    scores = []
    for candidate in candidates:
        fits[candidate] = _kmeans(Z, candidate, seed)
        scores.append(SilhouetteScore(candidate, _silhouette(Z[sample], fits[candidate][0][sample])))
    best = max(scores, key=lambda s: (s.silhouette, -s.k))
    labels, centres = fits[best.k]
    sizes = np.bincount(labels, minlength=best.k)
    order = np.lexsort((np.arange(best.k), -sizes))  # largest first; stable for equal sizes
    relabel = np.empty(best.k, dtype=np.int64)
    relabel[order] = np.arange(best.k)
    labels = relabel[labels]
    centres = centres[order]
    # Recomputed as member means: MiniBatchKMeans' centres are only approximately the means.
    counts = np.bincount(labels, minlength=best.k).astype(np.float64)
    sums = np.zeros((best.k, f))
    np.add.at(sums, labels, Z)
    centres = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1.0)[:, None], centres)
    distances = np.linalg.norm(Z - centres[labels], axis=1)
    return SegmentationResult(
        k=best.k, k_chosen_automatically=k is None, labels=labels.astype(np.int16), distances=distances,
        centroids_z=centres, centroids_raw=centres * std + mean, sizes=counts.astype(np.int64),
        silhouettes=tuple(scores), silhouette=best.silhouette, inertia=float(np.square(distances).sum()))


def pca_2d(Z: np.ndarray, labels: np.ndarray, feature_names: list[str], sample_points: int, seed: int) -> PcaSummary:
    """The first two principal components of the standardised features (an eigen-decomposition of
    their f×f covariance: exact and cheap for any n), every member's position on them, per-segment
    centre and spread, and a random sample of points for plotting.

    Component signs are fixed so that each one's largest loading is positive: an eigenvector's sign
    is arbitrary, and the map should not flip between two runs on the same data.
    """
    n, f = Z.shape
    if len(feature_names) != f or labels.shape != (n,):
        raise ValueError("one feature name per column and one label per member are needed")
    centred = Z - Z.mean(axis=0)
    covariance = centred.T @ centred / max(n - 1, 1)
    eigenvalues, vectors = np.linalg.eigh(covariance)
    top = np.argsort(eigenvalues)[::-1][:2]
    components = vectors[:, top]  # (f, 2); with one feature the second axis is all zeros
    if components.shape[1] < 2:
        components = np.column_stack([components, np.zeros(f)])
    largest = np.abs(components).argmax(axis=0)
    components = components * np.where(components[largest, [0, 1]] < 0, -1.0, 1.0)
    total = float(np.clip(eigenvalues, 0.0, None).sum())
    explained = [float(max(eigenvalues[i], 0.0) / total) if total > 0 else 0.0 for i in top]
    explained += [0.0] * (2 - len(explained))
    coordinates = centred @ components
    k = int(labels.max()) + 1 if n else 0
    counts = np.maximum(np.bincount(labels, minlength=k), 1).astype(np.float64)[:, None]
    sums = np.zeros((k, 2))
    squares = np.zeros((k, 2))
    np.add.at(sums, labels, coordinates)
    np.add.at(squares, labels, np.square(coordinates))
    centres = sums / counts
    spreads = np.sqrt(np.maximum(squares / counts - np.square(centres), 0.0))
    shown = min(sample_points, PCA_SAMPLE_POINTS_MAX, n)
    picked = np.sort(np.random.default_rng(seed).choice(n, size=shown, replace=False))
    points = tuple(PcaPoint(x, y, s, m) for x, y, s, m in zip(
        coordinates[picked, 0].tolist(), coordinates[picked, 1].tolist(), labels[picked].tolist(), picked.tolist(),
        strict=True))
    return PcaSummary(
        explained_variance_pc1=explained[0], explained_variance_pc2=explained[1],
        loadings=tuple(PcaLoading(name, float(a), float(b)) for name, (a, b) in zip(feature_names, components,
                                                                                     strict=True)),
        sample_points=points, coordinates=coordinates, segment_centres=centres, segment_spreads=spreads)


TOP_CATEGORIES_MAX = 3


def top_categories(labels: np.ndarray, k: int, affinity: Any, limit: int = TOP_CATEGORIES_MAX) -> np.ndarray:
    """(k, limit) category indices with the highest mean affinity per segment, best first, -1 where a
    segment has fewer categories with any affinity (Segment.top_categories; the first is the
    top_category of describe_centroid and offer_for). `affinity` is the members × categories matrix
    (scipy sparse or dense) in the rows of `labels`: one sparse product, no loop over members.
    """
    from scipy import sparse

    n = labels.size
    if affinity.shape[0] != n:
        raise ValueError("affinity needs one row per member")
    indicator = sparse.csr_matrix((np.ones(n), (labels.astype(np.int64), np.arange(n))), shape=(k, n))
    sizes = np.maximum(np.bincount(labels, minlength=k), 1).astype(np.float64)
    sums = indicator @ affinity
    means = np.asarray(sums.toarray() if sparse.issparse(sums) else sums, dtype=np.float64) / sizes[:, None]
    keep = min(limit, means.shape[1])
    order = np.argsort(-means, axis=1, kind="stable")[:, :keep]
    return np.where(np.take_along_axis(means, order, axis=1) > 0, order, -1)


# ---------------------------------------------------------------------------------------------
# Reading a centroid: traits, description, label, offer
# ---------------------------------------------------------------------------------------------

# Feature family (the catalogue name without its "_<N>d" window) → words for a high and a low value.
VOCABULARY: dict[str, tuple[str, str]] = {
    "purchase_count": ("frequent", "infrequent"),
    "average_order_value": ("high basket", "low basket"),
    "net_spend": ("high spend", "low spend"),
    "gross_spend": ("high spend", "low spend"),
    "items_purchased": ("many items", "few items"),
    "browse_minutes": ("heavy browsing", "light browsing"),
    "view_count": ("many product views", "few product views"),
    "search_count": ("many searches", "few searches"),
    "click_count": ("many clicks", "few clicks"),
    "cart_add_count": ("fills carts", "rarely adds to cart"),
    "refund_ratio": ("many returns", "few returns"),
    "refund_count": ("many returns", "few returns"),
    "refund_amount": ("many returns", "few returns"),
    "days_since_last_purchase": ("lapsed", "recent"),
    "days_since_last_activity": ("inactive", "recently active"),
    "tenure_days": ("long-standing", "new"),
    "visit_count": ("frequent visitor", "rare visitor"),
    "active_days": ("often active", "seldom active"),
}
_WINDOW = re.compile(r"_\d+d$")


def family_of(feature_name: str) -> str:
    """'net_spend_365d' → 'net_spend'; names without a window are their own family."""
    return _WINDOW.sub("", feature_name)


def _traits(centroid_z: np.ndarray, feature_names: list[str]) -> dict[str, float]:
    """Mean z per feature family (so net_spend_90d and net_spend_365d make one trait)."""
    by_family: dict[str, list[float]] = {}
    for name, z in zip(feature_names, centroid_z.tolist(), strict=True):
        by_family.setdefault(family_of(name), []).append(z)
    return {family: float(np.mean(values)) for family, values in by_family.items()}


def _high(traits: dict[str, float], *families: str) -> bool:
    return any(traits.get(f, 0.0) > DISTINCTIVE_Z_MIN for f in families)


def _low(traits: dict[str, float], *families: str) -> bool:
    return any(traits.get(f, 0.0) < -DISTINCTIVE_Z_MIN for f in families)


def describe_centroid(centroid_z: np.ndarray, feature_names: list[str], raw_centroid: np.ndarray,
                      top_category: str | None = None) -> str:
    """Plain English for a centroid from its most distinctive features (|z| > 0.5, strongest first, at
    most four), e.g. "frequent, low basket, heavy browsing, electronics". A feature outside the
    vocabulary is named as "high <name>" / "low <name>". "average" when nothing stands out.
    `raw_centroid` is accepted for symmetry with offer_for; words need only the z-scores.
    """
    if raw_centroid.shape != centroid_z.shape:
        raise ValueError("raw_centroid and centroid_z must have the same shape")
    traits = _traits(centroid_z, feature_names)
    distinctive = sorted((t for t in traits.items() if abs(t[1]) > DISTINCTIVE_Z_MIN), key=lambda t: -abs(t[1]))
    words: list[str] = []
    for family, z in distinctive:
        high, low = VOCABULARY.get(family, (f"high {family.replace('_', ' ')}", f"low {family.replace('_', ' ')}"))
        word = high if z > 0 else low
        if word not in words:
            words.append(word)
    words = words[:DESCRIPTION_TRAITS_MAX] or ["average"]
    if top_category:
        words.append(top_category)
    return ", ".join(words)


def label_for(centroid_z: np.ndarray, feature_names: list[str]) -> str:
    """A short name for the segment (Segment.label), from the archetype its traits match first."""
    t = _traits(centroid_z, feature_names)
    frequent, spend = ("purchase_count", "active_days", "visit_count"), ("net_spend", "gross_spend")
    archetypes = (
        (_high(t, "refund_ratio", "refund_count", "refund_amount"), "Frequent returners"),
        (_high(t, *spend) and _high(t, "days_since_last_purchase"), "Big spenders at risk"),
        (_high(t, "days_since_last_purchase", "days_since_last_activity"), "Lapsed customers"),
        (_high(t, *spend) and _high(t, *frequent), "Champions"),
        (_high(t, *frequent) and _low(t, "average_order_value"), "Frequent bargain hunters"),
        (_high(t, "average_order_value") and _low(t, *frequent), "Occasional big-basket buyers"),
        (_low(t, "tenure_days"), "Newcomers"),
        (_high(t, "browse_minutes", "view_count", "search_count") and _low(t, *frequent), "Window shoppers"),
        (_high(t, *frequent), "Regulars"),
        (_high(t, *spend), "High spenders"),
        (_low(t, *spend, *frequent), "Light buyers"),
    )
    return next((name for matched, name in archetypes if matched), "Everyday members")


def _average_order_value_minor(feature_names: list[str], raw_centroid: np.ndarray) -> float:
    """The segment's basket: its average_order_value feature, else spend / orders of the same window,
    else a default (the offer still needs a scale)."""
    raw = dict(zip(feature_names, raw_centroid.tolist(), strict=True))
    for name, value in raw.items():
        if family_of(name) == "average_order_value" and value > 0:
            return float(value)
    for name, orders in raw.items():
        if family_of(name) == "purchase_count" and orders > 0:
            window = name[len("purchase_count"):]
            spend = raw.get(f"gross_spend{window}", raw.get(f"net_spend{window}", 0.0))
            if spend > 0:
                return float(spend / orders)
    return float(AVERAGE_ORDER_VALUE_DEFAULT_MINOR)


def _nice_minor(amount_minor: float) -> int:
    """Rounded up to a whole yuan, or to ten yuan from 100 yuan: amounts a customer reads at a glance."""
    step = MINOR_PER_MAJOR * (10 if amount_minor >= 100 * MINOR_PER_MAJOR else 1)
    return int(max(step, np.ceil(amount_minor / step) * step))


def _coupon(min_spend_minor: float) -> tuple[int, int]:
    """(coupon value, minimum spend): about a tenth of the minimum spend, in whole yuan."""
    min_spend = _nice_minor(min_spend_minor)
    value = max(MINOR_PER_MAJOR, round(min_spend / 10 / MINOR_PER_MAJOR) * MINOR_PER_MAJOR)
    return value, min_spend


BONUS_POINTS_MIN = 50
BONUS_POINTS_MAX = 5_000
BONUS_POINTS_PER_MAJOR = 0.2  # a fifth of a point per yuan of the usual basket: felt, but no giveaway
EARN_MULTIPLIER_BPS = (12_000, 13_500, 15_000)  # by how far above average the segment spends
COUPON_BASKET_STRETCH = 1.3  # min spend of a basket-raising coupon, × the segment's basket
VALIDITY_DAYS = {OfferKind.BONUS_POINTS: 30, OfferKind.COUPON: 14, OfferKind.CATEGORY_COUPON: 30,
                 OfferKind.EARN_MULTIPLIER: 90}


def _bonus_points(aov_minor: float) -> int:
    points = round(aov_minor / MINOR_PER_MAJOR * BONUS_POINTS_PER_MAJOR / 10.0) * 10
    return int(np.clip(points, BONUS_POINTS_MIN, BONUS_POINTS_MAX))


def offer_for(centroid_z: np.ndarray, feature_names: list[str], raw_centroid: np.ndarray,
              top_category: str | None = None) -> Offer:
    """The offer strategy for a segment, from the first rule its traits match:

    1. many returns → NONE: an incentive would reward buying to return;
    2. high spend and frequent → EARN_MULTIPLIER 1.2× to 1.5× for 90 days (rewards' campaign caps allow
       up to 100×; 1.5× keeps the programme's cost bounded): recognise the best customers;
    3. lapsed → BONUS_POINTS on the next purchase (a fifth of a point per yuan of their basket, 50 to
       5,000) for 30 days: win them back;
    4. frequent with a low basket → COUPON with a minimum spend of 1.3× their basket, worth a tenth of
       it, for 14 days: raise the order value;
    5. new → BONUS_POINTS on the next purchase: make the second purchase happen;
    6. a top category → CATEGORY_COUPON on it at their usual basket: lean on a known affinity;
    7. otherwise a COUPON at 1.3× their basket.
    Money is in minor units of CNY, rounded to amounts people read at a glance.
    """
    if raw_centroid.shape != centroid_z.shape:
        raise ValueError("raw_centroid and centroid_z must have the same shape")
    t = _traits(centroid_z, feature_names)
    aov = _average_order_value_minor(feature_names, raw_centroid)
    frequent, spend = ("purchase_count", "active_days", "visit_count"), ("net_spend", "gross_spend")
    if _high(t, "refund_ratio", "refund_count", "refund_amount"):
        return Offer(OfferKind.NONE, "many returns: no incentive that would reward buying to return")
    if _high(t, *spend) and _high(t, *frequent):
        z = max(t.get(f, 0.0) for f in spend)
        bps = EARN_MULTIPLIER_BPS[0 if z <= 1.0 else 1 if z <= 2.0 else 2]
        return Offer(OfferKind.EARN_MULTIPLIER, "high spend, frequent: recognise the best customers",
                     earn_multiplier_bps=bps, validity_s=VALIDITY_DAYS[OfferKind.EARN_MULTIPLIER] * DAY_S)
    if _high(t, "days_since_last_purchase", "days_since_last_activity"):
        return Offer(OfferKind.BONUS_POINTS, "lapsed: win back with bonus points on the next purchase",
                     bonus_points=_bonus_points(aov), validity_s=VALIDITY_DAYS[OfferKind.BONUS_POINTS] * DAY_S)
    if _high(t, *frequent) and _low(t, "average_order_value"):
        value, min_spend = _coupon(COUPON_BASKET_STRETCH * aov)
        return Offer(OfferKind.COUPON, "high frequency, low basket: raise the order value",
                     coupon_value_minor=value, min_spend_minor=min_spend,
                     validity_s=VALIDITY_DAYS[OfferKind.COUPON] * DAY_S)
    if _low(t, "tenure_days"):
        return Offer(OfferKind.BONUS_POINTS, "new members: make the next purchase happen",
                     bonus_points=_bonus_points(aov), validity_s=VALIDITY_DAYS[OfferKind.BONUS_POINTS] * DAY_S)
    if top_category:
        value, min_spend = _coupon(aov)
        return Offer(OfferKind.CATEGORY_COUPON, f"affinity for {top_category}: a coupon where they already shop",
                     coupon_value_minor=value, min_spend_minor=min_spend, category=top_category,
                     validity_s=VALIDITY_DAYS[OfferKind.CATEGORY_COUPON] * DAY_S)
    value, min_spend = _coupon(COUPON_BASKET_STRETCH * aov)
    return Offer(OfferKind.COUPON, "no strong trait: a coupon that stretches the usual basket",
                 coupon_value_minor=value, min_spend_minor=min_spend,
                 validity_s=VALIDITY_DAYS[OfferKind.COUPON] * DAY_S)
