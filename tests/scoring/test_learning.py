"""Weight fitting and validation metrics on data where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from services.scoring.domain import learning


def test_spearman_with_ties_matches_mean_ranks() -> None:
    score = np.array([1.0, 2.0, 2.0, 3.0])
    value = np.array([10.0, 20.0, 30.0, 40.0])
    # Ranks of score: 1, 2.5, 2.5, 4; of value: 1, 2, 3, 4. Pearson of the ranks = 4.5 / sqrt(4.5 * 5).
    assert learning.spearman(score, value) == pytest.approx(4.5 / np.sqrt(4.5 * 5.0))


def test_spearman_of_a_constant_side_is_zero_not_nan() -> None:
    assert learning.spearman(np.ones(5), np.arange(5.0)) == 0.0
    assert learning.spearman(np.arange(5.0), np.zeros(5)) == 0.0


def test_top20_share_by_hand() -> None:
    score = np.arange(10.0)  # the top 20 % are the members scoring 9 and 8
    value = np.array([1, 1, 1, 1, 1, 1, 1, 1, 6, 10], dtype=np.float64)
    assert learning.top_share(score, value) == pytest.approx(16.0 / 24.0)


def test_top20_share_splits_ties_at_the_boundary_whatever_the_row_order() -> None:
    # Ten members, two places: one for the member scoring 5, one left for the three tied at 1.
    score = np.array([5.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    value = np.array([4.0, 3.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    expected = (4.0 + 1.0) / 12.0  # the shared place is worth the tied group's mean value (3 / 3)
    assert learning.top_share(score, value) == pytest.approx(expected)
    order = np.array([3, 1, 4, 0, 2, 9, 8, 7, 6, 5])
    assert learning.top_share(score[order], value[order]) == pytest.approx(expected)


def test_top20_share_counts_net_refunds_as_zero_and_stays_in_range() -> None:
    score = np.arange(5.0)
    value = np.array([-100.0, 1.0, 1.0, 1.0, 2.0])
    assert learning.top_share(score, value) == pytest.approx(2.0 / 5.0)
    assert learning.top_share(score, np.zeros(5)) == 0.0


def test_auc_by_hand_with_a_tie() -> None:
    score = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    upgraded = np.array([False, False, True, True, True])
    # Positive/negative pairs: (0.35 > 0.1) 1, (0.35 < 0.4) 0, (0.8 >) 1, 1, (0.4 > 0.1) 1, (0.4 = 0.4) 0.5.
    assert learning.roc_auc(score, upgraded) == pytest.approx(4.5 / 6.0)


def test_auc_with_one_class_is_one_half() -> None:
    assert learning.roc_auc(np.arange(4.0), np.ones(4, dtype=bool)) == 0.5
    metrics = learning.validation_metrics(np.arange(4.0), np.arange(4.0), None)
    assert metrics.spearman == pytest.approx(1.0) and metrics.top20_revenue_share == pytest.approx(0.5)
    assert (metrics.upgrade_auc, metrics.members) == (0.5, 4)


def test_validation_metrics_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="one entry per member"):
        learning.validation_metrics(np.arange(3.0), np.arange(4.0), None)


def _linear_data(n: int, seed: int, penalty: float = -2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(n, 3))
    y = 3.0 * T[:, 0] + 1.0 * T[:, 1] + penalty * T[:, 2] + rng.normal(scale=0.5, size=n) + 7.0
    return T, y


def test_nnls_ridge_recovers_ratios() -> None:
    T, y = _linear_data(5000, seed=1, penalty=0.0)
    weights = learning.fit_nnls_ridge(T, y, alpha=1.0)
    assert weights == pytest.approx([0.75, 0.25, 0.0], abs=0.01)
    assert np.abs(weights).sum() == pytest.approx(1.0)


def test_nnls_ridge_zeroes_a_feature_whose_true_weight_is_negative() -> None:
    T, y = _linear_data(5000, seed=1)
    weights = learning.fit_nnls_ridge(T, y, alpha=1.0)
    assert weights[2] == 0.0
    assert weights[0] > 2.5 * weights[1] > 0.0


def test_nnls_ridge_keeps_a_penalty_when_its_sign_is_given() -> None:
    T, y = _linear_data(5000, seed=2)
    weights = learning.fit_nnls_ridge(T, y, alpha=1.0, signs=np.array([1.0, 1.0, -1.0]), l1_norm=6.0)
    assert weights == pytest.approx([3.0, 1.0, -2.0], rel=0.05)


def test_nnls_ridge_is_invariant_to_the_target_unit_and_shrinks_with_alpha() -> None:
    T, y = _linear_data(2000, seed=3)
    assert learning.fit_nnls_ridge(T, 100.0 * y, 1.0) == pytest.approx(learning.fit_nnls_ridge(T, y, 1.0))
    # Under a huge penalty ridge weights tend to the covariances of the features with the target.
    strong = learning.fit_nnls_ridge(T, y, alpha=1e9)
    covariances = np.maximum((T - T.mean(axis=0)).T @ (y - y.mean()), 0.0)
    assert strong == pytest.approx(covariances / covariances.sum(), abs=1e-6)


def test_nnls_ridge_edge_cases() -> None:
    T, _ = _linear_data(100, seed=4)
    assert np.all(learning.fit_nnls_ridge(T, np.full(100, 5.0), 1.0) == 0.0)
    constant_column = np.column_stack([T[:, 0], np.ones(100)])
    weights = learning.fit_nnls_ridge(constant_column, T[:, 0], alpha=0.0)
    assert weights == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        learning.fit_nnls_ridge(np.full((3, 2), np.nan), np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="signs"):
        learning.fit_nnls_ridge(T, T[:, 0], 1.0, signs=np.array([1.0, 0.0, 1.0]))


def test_importances_are_variance_shares() -> None:
    rng = np.random.default_rng(5)
    T = np.column_stack([rng.normal(size=4000), 2.0 * rng.normal(size=4000), np.full(4000, 3.0)])
    shares = learning.importances(T, np.array([1.0, 1.0, 5.0]))
    assert shares == pytest.approx([0.2, 0.8, 0.0], abs=0.02)
    assert shares.sum() == pytest.approx(1.0)
    assert np.all(learning.importances(T, np.zeros(3)) == 0.0)


def test_gbm_projection_ranks_held_out_members() -> None:
    rng = np.random.default_rng(6)
    n = 4000
    X = np.column_stack([rng.lognormal(3.0, 1.0, n), rng.poisson(5.0, n).astype(np.float64), rng.uniform(0, 1, n)])
    T = np.log1p(X)
    y = np.exp(1.5 * T[:, 0] + 0.7 * T[:, 1] + rng.normal(scale=0.3, size=n))
    train, held_out = slice(0, 3000), slice(3000, n)
    result = learning.fit_gbm_rank(X[train], T[train], y[train], seed=7)
    assert result.ranker is not None
    assert result.weights[0] > result.weights[1] > 0.0
    assert result.weights[2] == pytest.approx(0.0, abs=0.05)
    projected = learning.validation_metrics(T[held_out] @ result.weights, y[held_out], None)
    ranker = learning.validation_metrics(result.ranker.predict(X[held_out]), y[held_out], None)
    assert projected.spearman > 0.8
    assert ranker.spearman > 0.8
    assert result.importances.sum() == pytest.approx(1.0)
    assert result.importances[0] > result.importances[2]


def test_gbm_is_reproducible_with_its_seed() -> None:
    rng = np.random.default_rng(8)
    X = rng.uniform(0, 1, size=(500, 2))
    y = X[:, 0] + rng.normal(scale=0.1, size=500)
    first = learning.fit_gbm_rank(X, X, y, seed=3)
    second = learning.fit_gbm_rank(X, X, y, seed=3)
    assert np.array_equal(first.weights, second.weights)
