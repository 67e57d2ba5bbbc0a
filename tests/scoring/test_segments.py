"""k-means segmentation, PCA map, centroid descriptions and offers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from sklearn.metrics import adjusted_rand_score

from services.scoring.domain import segments
from services.scoring.domain.segments import OfferKind

NAMES = ["purchase_count_365d", "average_order_value", "browse_minutes_90d", "days_since_last_purchase"]


def _blobs(seed: int, per_blob: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Four well-separated groups in raw units (orders, fen, minutes, days)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[30.0, 5_000.0, 600.0, 5.0], [2.0, 40_000.0, 60.0, 40.0],
                        [1.0, 8_000.0, 30.0, 400.0], [10.0, 15_000.0, 2_000.0, 20.0]])
    scales = np.array([2.0, 800.0, 40.0, 3.0])
    truth = np.repeat(np.arange(4), per_blob)
    X = centres[truth] + rng.normal(size=(truth.size, 4)) * scales
    return X, truth


def test_standardise_maps_constant_columns_to_zero() -> None:
    X = np.column_stack([np.arange(5.0), np.full(5, 7.0)])
    Z, mean, std = segments.standardise(X)
    assert Z[:, 1] == pytest.approx(np.zeros(5))
    assert std[1] == 1.0
    assert Z[:, 0].mean() == pytest.approx(0.0) and Z[:, 0].std() == pytest.approx(1.0)
    assert Z * std + mean == pytest.approx(X)


def test_silhouette_picks_the_number_of_blobs_and_finds_them() -> None:
    X, truth = _blobs(seed=1)
    Z, mean, std = segments.standardise(X)
    result = segments.choose_k_and_cluster(Z, mean, std, k_min=2, k_max=6, silhouette_sample=500, seed=3)
    assert result.k == 4 and result.k_chosen_automatically
    assert [s.k for s in result.silhouettes] == [2, 3, 4, 5, 6]
    assert result.silhouette == max(s.silhouette for s in result.silhouettes) > 0.5
    assert adjusted_rand_score(truth, result.labels) > 0.9
    assert result.labels.dtype == np.int16
    assert result.sizes.tolist() == np.bincount(result.labels).tolist()
    assert np.all(np.diff(result.sizes) <= 0)  # largest first
    # Raw centroids land on the blob centres.
    assert sorted(result.centroids_raw[:, 0].round().tolist()) == pytest.approx([1.0, 2.0, 10.0, 30.0], abs=1.0)
    assert result.distances == pytest.approx(np.linalg.norm(Z - result.centroids_z[result.labels], axis=1))
    assert result.inertia == pytest.approx(float(np.square(result.distances).sum()))


def test_clustering_is_reproducible_with_its_seed() -> None:
    X, _ = _blobs(seed=2, per_blob=100)
    Z, mean, std = segments.standardise(X)
    first = segments.choose_k_and_cluster(Z, mean, std, k=3, seed=11)
    second = segments.choose_k_and_cluster(Z, mean, std, k=3, seed=11)
    assert not first.k_chosen_automatically and [s.k for s in first.silhouettes] == [3]
    assert np.array_equal(first.labels, second.labels)
    assert np.array_equal(first.centroids_z, second.centroids_z)


def test_minibatch_path_for_large_populations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segments, "MINIBATCH_ROWS_MIN", 100)
    X, truth = _blobs(seed=4, per_blob=200)
    Z, mean, std = segments.standardise(X)
    result = segments.choose_k_and_cluster(Z, mean, std, k=4, silhouette_sample=300, seed=5)
    assert adjusted_rand_score(truth, result.labels) > 0.9


def test_invalid_k_is_rejected() -> None:
    Z = np.zeros((3, 2))
    with pytest.raises(ValueError, match="cannot form"):
        segments.choose_k_and_cluster(Z, np.zeros(2), np.ones(2), k=3)
    with pytest.raises(ValueError, match="at least 2"):
        segments.choose_k_and_cluster(Z, np.zeros(2), np.ones(2), k_min=5, k_max=4)


def test_pca_map() -> None:
    X, truth = _blobs(seed=6, per_blob=100)
    Z, _, _ = segments.standardise(X)
    labels = truth.astype(np.int16)
    pca = segments.pca_2d(Z, labels, NAMES, sample_points=50, seed=7)
    assert 0.0 <= pca.explained_variance_pc2 <= pca.explained_variance_pc1 <= 1.0
    assert pca.explained_variance_pc1 + pca.explained_variance_pc2 <= 1.0 + 1e-9
    assert [loading.feature_name for loading in pca.loadings] == NAMES
    loadings = np.array([[loading.pc1, loading.pc2] for loading in pca.loadings])
    assert loadings.T @ loadings == pytest.approx(np.eye(2))
    assert pca.coordinates.shape == (400, 2) and pca.segment_centres.shape == (4, 2)
    assert pca.segment_spreads.shape == (4, 2) and np.all(pca.segment_spreads >= 0)
    assert len(pca.sample_points) == 50
    point = pca.sample_points[0]
    assert (point.x, point.y) == pytest.approx(tuple(pca.coordinates[point.member_index]))
    assert point.segment_index == labels[point.member_index]
    again = segments.pca_2d(Z, labels, NAMES, sample_points=50, seed=7)
    assert again.sample_points == pca.sample_points
    assert np.array_equal(again.coordinates, pca.coordinates)


def _centroid(**z: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    names = ["purchase_count_365d", "net_spend_365d", "average_order_value", "browse_minutes_90d",
             "refund_ratio_365d", "days_since_last_purchase", "tenure_days"]
    centroid_z = np.array([z.get(name, 0.0) for name in names])
    raw = np.array([12.0, 240_000.0, 20_000.0, 300.0, 0.05, 30.0, 700.0])
    return centroid_z, raw, names


def test_descriptions_name_the_distinctive_traits_strongest_first() -> None:
    centroid_z, raw, names = _centroid(purchase_count_365d=1.8, average_order_value=-1.1, browse_minutes_90d=0.9,
                                       tenure_days=0.2)
    assert segments.describe_centroid(centroid_z, names, raw) == "frequent, low basket, heavy browsing"
    assert segments.describe_centroid(centroid_z, names, raw, "electronics") == (
        "frequent, low basket, heavy browsing, electronics")
    assert segments.describe_centroid(np.zeros(7), names, raw) == "average"
    lapsed_z, _, _ = _centroid(days_since_last_purchase=2.0, net_spend_365d=-0.8)
    assert segments.describe_centroid(lapsed_z, names, raw) == "lapsed, low spend"


def test_windows_of_one_family_make_one_trait_and_unknown_families_get_plain_words() -> None:
    names = ["net_spend_90d", "net_spend_365d", "loyalty_quirk"]
    text = segments.describe_centroid(np.array([0.7, 0.8, -0.9]), names, np.zeros(3))
    assert text == "low loyalty quirk, high spend"


def test_labels_for_archetypes() -> None:
    for traits, label in (({"purchase_count_365d": 1.5, "net_spend_365d": 1.2}, "Champions"),
                          ({"purchase_count_365d": 1.5, "average_order_value": -1.0}, "Frequent bargain hunters"),
                          ({"days_since_last_purchase": 2.0}, "Lapsed customers"),
                          ({"refund_ratio_365d": 2.0, "net_spend_365d": 1.0}, "Frequent returners"),
                          ({"tenure_days": -1.2}, "Newcomers"),
                          ({}, "Everyday members")):
        centroid_z, _, names = _centroid(**traits)
        assert segments.label_for(centroid_z, names) == label


def test_offer_for_frequent_low_basket_is_a_basket_raising_coupon() -> None:
    centroid_z, raw, names = _centroid(purchase_count_365d=1.5, average_order_value=-1.0)
    offer = segments.offer_for(centroid_z, names, raw, None)
    assert offer.kind == OfferKind.COUPON
    assert offer.min_spend_minor == 26_000  # 1.3 × 200 yuan basket
    assert offer.coupon_value_minor == 2_600
    assert offer.currency == "CNY" and offer.validity_s == 14 * 86_400
    assert "raise" in offer.rationale


def test_offer_for_lapsed_is_bonus_points() -> None:
    centroid_z, raw, names = _centroid(days_since_last_purchase=2.0)
    offer = segments.offer_for(centroid_z, names, raw, "books")
    assert offer.kind == OfferKind.BONUS_POINTS
    assert offer.bonus_points == segments.BONUS_POINTS_MIN  # a fifth of 200 yuan is 40 points, below the floor
    assert offer.validity_s == 30 * 86_400


def test_bonus_points_scale_with_the_basket() -> None:
    centroid_z, raw, names = _centroid(days_since_last_purchase=2.0)
    raw[names.index("average_order_value")] = 150_000.0  # 1,500 yuan
    assert segments.offer_for(centroid_z, names, raw, None).bonus_points == 300


def test_offer_for_champions_is_a_capped_multiplier() -> None:
    for spend_z, bps in ((0.8, 12_000), (1.5, 13_500), (4.0, 15_000)):
        centroid_z, raw, names = _centroid(purchase_count_365d=1.5, net_spend_365d=spend_z)
        offer = segments.offer_for(centroid_z, names, raw, None)
        assert offer.kind == OfferKind.EARN_MULTIPLIER
        assert offer.earn_multiplier_bps == bps
        assert offer.validity_s == 90 * 86_400


def test_offer_for_category_affinity_and_for_returners() -> None:
    centroid_z, raw, names = _centroid(browse_minutes_90d=0.7)
    offer = segments.offer_for(centroid_z, names, raw, "beauty")
    assert offer.kind == OfferKind.CATEGORY_COUPON and offer.category == "beauty"
    assert offer.min_spend_minor == 20_000 and offer.coupon_value_minor == 2_000
    assert segments.offer_for(centroid_z, names, raw, None).kind == OfferKind.COUPON
    returners_z, _, _ = _centroid(refund_ratio_365d=2.0, purchase_count_365d=2.0, net_spend_365d=2.0)
    assert segments.offer_for(returners_z, names, raw, "beauty").kind == OfferKind.NONE


def test_offer_basket_falls_back_to_spend_per_order() -> None:
    names = ["purchase_count_90d", "gross_spend_90d", "days_since_last_purchase"]
    offer = segments.offer_for(np.array([1.0, 0.0, -1.0]), names, np.array([4.0, 12_345.0, 3.0]), "toys")
    assert offer.kind == OfferKind.CATEGORY_COUPON
    assert offer.min_spend_minor == 3_100  # 30.86 yuan rounded up to a whole yuan
    assert offer.coupon_value_minor == 300


def test_top_categories_by_mean_affinity_per_segment() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2], dtype=np.int16)
    affinity = sparse.csr_matrix(np.array([[5.0, 0, 1, 0], [3.0, 0, 0, 0],   # segment 0: category 0, then 2
                                           [0, 2.0, 0, 1], [0, 2.0, 0, 0], [0, 2.0, 0, 4],  # segment 1: 1, then 3
                                           [0, 0, 0, 0]]))  # segment 2: no affinity at all
    top = segments.top_categories(labels, 3, affinity, limit=3)
    assert top.tolist() == [[0, 2, -1], [1, 3, -1], [-1, -1, -1]]
    assert segments.top_categories(labels, 3, affinity.toarray(), limit=1).tolist() == [[0], [1], [-1]]
