"""Item-based collaborative filtering on a member × category matrix with a known group structure."""

from __future__ import annotations

import io

import numpy as np
import pytest
from scipy import sparse

from services.scoring.domain import recommend

GROUPS = 4
PER_GROUP = 5  # categories 0-4 are group 0, 5-9 group 1, ...
CATEGORIES = GROUPS * PER_GROUP


def _world(members: int, seed: int) -> tuple[np.ndarray, sparse.csr_matrix, sparse.csr_matrix]:
    """Each member shops in one group: 3 of its categories before the cut-off, 1 new one after. Group 0
    is the most popular by far, so popularity alone recommends group 0 to everybody."""
    rng = np.random.default_rng(seed)
    group = rng.choice(GROUPS, size=members, p=[0.55, 0.15, 0.15, 0.15])
    picks = np.argsort(rng.uniform(size=(members, PER_GROUP)), axis=1)[:, :4] + (group * PER_GROUP)[:, None]
    spend = rng.lognormal(8.0, 1.0, size=(members, 3))
    rows = np.repeat(np.arange(members), 3)
    train = sparse.csr_matrix((spend.ravel(), (rows, picks[:, :3].ravel())), shape=(members, CATEGORIES))
    holdout = sparse.csr_matrix((np.ones(members), (np.arange(members), picks[:, 3])), shape=(members, CATEGORIES))
    return group, train, holdout


def _fit(train: sparse.csr_matrix) -> recommend.ItemCfModel:
    return recommend.fit_item_cf(train.indptr, train.indices, train.data, CATEGORIES)


def test_similarity_is_symmetric_within_groups_and_zero_across() -> None:
    _, train, _ = _world(2000, seed=1)
    model = _fit(train)
    assert model.similarity == pytest.approx(model.similarity.T)
    assert np.all(np.diag(model.similarity) == 0.0)
    same = np.equal.outer(np.arange(CATEGORIES) // PER_GROUP, np.arange(CATEGORIES) // PER_GROUP)
    np.fill_diagonal(same, False)
    assert np.all(model.similarity[same] > 0.1)
    assert np.all(model.similarity[~same] == 0.0)
    assert model.members == 2000 and model.non_zeros == train.nnz
    assert model.popularity.sum() == train.nnz


def test_shrinkage_damps_rare_co_occurrence() -> None:
    # Categories 0 and 1 are bought together by two members; 2 and 3 by two hundred.
    rows = [0, 0, 1, 1] + [i for m in range(2, 202) for i in (m, m)]
    cols = [0, 1, 0, 1] + [c for _ in range(200) for c in (2, 3)]
    matrix = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(202, 4))
    model = recommend.fit_item_cf(matrix.indptr, matrix.indices, matrix.data, 4, shrinkage=10.0)
    assert model.similarity[0, 1] == pytest.approx(2 / 12)
    assert model.similarity[2, 3] == pytest.approx(200 / 210)
    unshrunk = recommend.fit_item_cf(matrix.indptr, matrix.indices, matrix.data, 4, shrinkage=0.0)
    assert unshrunk.similarity[0, 1] == pytest.approx(1.0)


def test_recommendations_come_from_the_members_group_and_exclusion_works() -> None:
    group, train, _ = _world(3000, seed=2)
    model = _fit(train)
    asked = np.arange(200)
    rows = train[asked]
    recommendations = recommend.recommend(model, rows, top_n=2, exclude_purchased=True)
    bought = [set(rows[i].indices.tolist()) for i in range(asked.size)]
    for member, row in enumerate(recommendations):
        assert len(row) == 2
        assert {c // PER_GROUP for c, _ in row} == {group[member]}
        assert not {c for c, _ in row} & bought[member]
        assert row[0][1] >= row[1][1] > 0.0
    included = recommend.recommend(model, rows, top_n=5, exclude_purchased=False)
    assert all(len(row) == 5 and {c // PER_GROUP for c, _ in row} == {group[m]} for m, row in enumerate(included))
    assert any({c for c, _ in row} & bought[m] for m, row in enumerate(included))


def test_popular_categories_fill_in_and_serve_empty_rows() -> None:
    _, train, _ = _world(3000, seed=3)
    model = _fit(train)
    most_popular = np.argsort(-model.popularity, kind="stable")[:3].tolist()
    empty = sparse.csr_matrix((2, CATEGORIES))
    assert [[c for c, _ in row] for row in recommend.recommend(model, empty, top_n=3)] == [most_popular] * 2
    assert all(s == 0.0 for row in recommend.recommend(model, empty, top_n=3) for _, s in row)
    assert recommend.recommend(model, empty, top_n=3, popular_fallback=False) == [[], []]
    # Five categories per group: with three bought and exclusion, two similar ones, then popular ones.
    row = recommend.recommend(model, train[:1], top_n=6, exclude_purchased=True)[0]
    assert len(row) == 6 and [s > 0 for _, s in row] == [True, True, False, False, False, False]
    assert len(recommend.recommend(model, train[:1], top_n=6, exclude_purchased=True, popular_fallback=False)[0]) == 2
    assert len(recommend.recommend(model, train[:1], top_n=50)[0]) == CATEGORIES


def test_because_of_names_the_members_own_categories() -> None:
    _, train, _ = _world(2000, seed=4)
    model = _fit(train)
    rows = train[:50]
    recommendations = recommend.recommend(model, rows, top_n=3, exclude_purchased=True)
    reasons = recommend.because_of(model, rows, recommendations, limit=2)
    for i, (row, why) in enumerate(zip(recommendations, reasons, strict=True)):
        assert len(why) == len(row)
        for (category, score), contributors in zip(row, why, strict=True):
            if score > 0:
                assert 1 <= len(contributors) <= 2
                assert set(contributors) <= set(rows[i].indices.tolist())
                assert all(c // PER_GROUP == category // PER_GROUP for c in contributors)
            else:
                assert contributors == ()


def test_hit_rate_beats_the_popularity_baseline() -> None:
    _, train, holdout = _world(4000, seed=5)
    report = recommend.evaluate_recommender(train, holdout, top_n=2)
    assert report.categories == CATEGORIES and report.members == 4000 and report.non_zeros == train.nnz
    assert report.evaluated_members == 4000
    # Two unseen categories in the member's group: the top 2 always holds the held-out one.
    assert report.hit_rate == pytest.approx(1.0)
    assert report.hit_rate_at_5 == pytest.approx(1.0)
    assert report.precision == pytest.approx(0.5) and report.recall == pytest.approx(1.0)
    assert report.popularity_hit_rate < 0.6 and report.popularity_hit_rate_at_5 < 0.7
    assert report.coverage == 1.0


def test_model_round_trips_through_npz_without_pickle() -> None:
    _, train, _ = _world(500, seed=6)
    model = _fit(train)
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **model.to_arrays())
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as stored:
        restored = recommend.ItemCfModel.from_arrays(dict(stored))
    assert np.array_equal(restored.similarity, model.similarity)
    assert np.array_equal(restored.popularity, model.popularity)
    assert (restored.members, restored.non_zeros, restored.shrinkage) == (500, train.nnz, 10.0)
    rows = train[:20]
    assert recommend.recommend(restored, rows, 4, True) == recommend.recommend(model, rows, 4, True)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="category indices"):
        recommend.fit_item_cf(np.array([0, 1]), np.array([7]), np.array([1.0]), 5)
    _, train, _ = _world(100, seed=7)
    model = _fit(train)
    with pytest.raises(ValueError, match="category columns"):
        recommend.recommend(model, sparse.csr_matrix((1, 3)))
