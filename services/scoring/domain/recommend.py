"""Category recommendations by item-based collaborative filtering on the member × category matrix.

Two categories are similar when the same members buy both: the cosine of their columns, shrunk
towards 0 when few members share them (a pair seen together twice is a coincidence, not a pattern).
A member's score for a category is the similarity-weighted sum of what the member bought.

Sketch: categories are a few hundred at most, so the category × category similarity is dense (500²
float64 = 2 MB) and computed with one sparse product over all members; scoring a batch of members
is one sparse × dense product and an argpartition per batch, never a loop over members.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

SHRINKAGE_DEFAULT = 10.0
TOP_N_DEFAULT = 5
REPORT_TOP_N = 5  # RecommenderReport's hit rates are "@5"
BECAUSE_OF_MAX = 3
EVALUATION_BATCH_ROWS = 20_000  # members scored at once: 20,000 × 500 categories × 8 B = 80 MB


@dataclass(frozen=True, eq=False)  # arrays do not compare with ==
class ItemCfModel:
    """Item-item similarity with the diagonal zeroed (a category does not recommend itself), and how
    many training members bought each category (the popularity fallback). Arrays only: no pickle."""

    similarity: np.ndarray  # (C, C) float64, symmetric, in [0, 1]
    popularity: np.ndarray  # (C,) float64 members with the category
    members: int
    non_zeros: int
    shrinkage: float

    @property
    def categories(self) -> int:
        return int(self.popularity.size)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"similarity": self.similarity, "popularity": self.popularity,
                "counts": np.array([self.members, self.non_zeros], dtype=np.int64),
                "shrinkage": np.array([self.shrinkage])}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ItemCfModel:
        similarity = np.asarray(arrays["similarity"], dtype=np.float64)
        popularity = np.asarray(arrays["popularity"], dtype=np.float64)
        if similarity.shape != (popularity.size, popularity.size):
            raise ValueError("stored recommender arrays do not agree on the number of categories")
        counts = arrays["counts"]
        return cls(similarity=similarity, popularity=popularity, members=int(counts[0]), non_zeros=int(counts[1]),
                   shrinkage=float(arrays["shrinkage"][0]))


@dataclass(frozen=True)
class RecommenderReport:
    """Mirrors loyalty.scoring.v1.RecommenderReport (the first five fields), plus the same measures at
    the requested top_n. Only members with at least one held-out category are evaluated."""

    categories: int
    members: int
    non_zeros: int
    hit_rate_at_5: float
    popularity_hit_rate_at_5: float
    top_n: int
    evaluated_members: int
    hit_rate: float  # at top_n: share of members with at least one held-out category in their top N
    precision: float  # at top_n: mean share of the N recommendations that were held-out categories
    recall: float  # at top_n: mean share of a member's held-out categories found in the top N
    coverage: float  # distinct categories recommended / categories
    popularity_hit_rate: float  # at top_n, for the popularity baseline


def _interest(matrix: sparse.csr_matrix) -> sparse.csr_matrix:
    """The values the model works on: log1p of non-negative amounts, so one member's huge spend does
    not make a column's norm (net refunds count as no interest)."""
    weighted = matrix.astype(np.float64, copy=True)
    weighted.data = np.log1p(np.maximum(weighted.data, 0.0))
    weighted.eliminate_zeros()
    return sparse.csr_matrix(weighted)


def member_matrix(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n_categories: int) -> sparse.csr_matrix:
    """A CSR member × category matrix from its three arrays (values: spend or affinity per cell)."""
    if indices.size and (indices.min() < 0 or indices.max() >= n_categories):
        raise ValueError(f"category indices must be in [0, {n_categories})")
    return sparse.csr_matrix((values, indices, indptr), shape=(indptr.size - 1, n_categories))


def fit_item_cf(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n_categories: int,
                shrinkage: float = SHRINKAGE_DEFAULT) -> ItemCfModel:
    """Item-item cosine similarity with shrinkage: sim(i, j) = cos(i, j) · nᵢⱼ / (nᵢⱼ + shrinkage), where
    nᵢⱼ is the number of members who bought both. Values are dampened with log1p first."""
    if shrinkage < 0:
        raise ValueError("shrinkage must be at least 0")
    interest = _interest(member_matrix(indptr, indices, values, n_categories))
    bought = interest.copy()
    bought.data = np.ones_like(bought.data)
    gram = np.asarray((interest.T @ interest).toarray(), dtype=np.float64)
    together = np.asarray((bought.T @ bought).toarray(), dtype=np.float64)
    norms = np.sqrt(np.diag(gram))
    outer = np.outer(norms, norms)
    cosine = np.divide(gram, outer, out=np.zeros_like(gram), where=outer > 0)
    similarity = np.clip(cosine * together / np.maximum(together + shrinkage, 1e-12), 0.0, 1.0)
    np.fill_diagonal(similarity, 0.0)
    return ItemCfModel(similarity=similarity, popularity=np.diag(together).copy(), members=int(interest.shape[0]),
                       non_zeros=int(interest.nnz), shrinkage=float(shrinkage))


def _popularity_key(model: ItemCfModel) -> np.ndarray:
    """Distinct values in [0, 1): the more members bought a category the higher, ties to the lower index."""
    order = np.lexsort((np.arange(model.categories), -model.popularity))
    key = np.empty(model.categories)
    key[order] = (model.categories - np.arange(model.categories)) / (model.categories + 1.0)
    return key


def _rank(model: ItemCfModel, rows: sparse.csr_matrix, top_n: int, exclude_purchased: bool, popular_fallback: bool,
          collaborative: bool = True, exclude: sparse.csr_matrix | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(categories, scores), each (members, top_n), best first, -1 / 0 where fewer are left.

    Categories with a positive similarity score come first, by score; then (when popular_fallback)
    the rest by popularity, reported with score 0. collaborative=False ranks by popularity alone
    (the baseline of RecommenderReport).
    """
    if rows.shape[1] != model.categories:
        raise ValueError(f"member rows must have {model.categories} category columns, got {rows.shape[1]}")
    interest = _interest(rows)
    m = interest.shape[0]
    scores = np.asarray(interest @ model.similarity) if collaborative else np.zeros((m, model.categories))
    row_max = scores.max(axis=1, initial=0.0)
    key = np.where(scores > 0, 2.0 + scores / np.where(row_max > 0, row_max, 1.0)[:, None], _popularity_key(model))
    if not popular_fallback:
        key[scores <= 0] = -np.inf
    if exclude_purchased:
        key[interest.nonzero()] = -np.inf
    if exclude is not None:
        key[sparse.csr_matrix(exclude).nonzero()] = -np.inf
    n = min(top_n, model.categories)
    if n <= 0 or m == 0:
        return np.full((m, 0), -1, dtype=np.int64), np.zeros((m, 0))
    top = np.argpartition(-key, n - 1, axis=1)[:, :n]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(key, top, axis=1), axis=1, kind="stable"), axis=1)
    valid = np.isfinite(np.take_along_axis(key, top, axis=1))
    return np.where(valid, top, -1), np.where(valid, np.take_along_axis(scores, top, axis=1), 0.0)


def recommend(model: ItemCfModel, member_rows: sparse.csr_matrix, top_n: int = TOP_N_DEFAULT,
              exclude_purchased: bool = False, popular_fallback: bool = True,
              exclude: sparse.csr_matrix | None = None) -> list[list[tuple[int, float]]]:
    """Top-N (category index, score) per member row, best first.

    Categories similar to what the member bought come first, by similarity-weighted score. When those
    run out, or the row is empty (no category history), the most popular categories fill the list
    with score 0 — unless popular_fallback is False, in which case an empty row gets an empty list
    (the caller reports RECOMMENDATION_EXCLUSION_NO_HISTORY). exclude_purchased leaves out the
    categories the row already holds; `exclude` (same shape, non-zero = leave out) names the categories
    to leave out instead, e.g. those bought recently.
    """
    categories, scores = _rank(model, sparse.csr_matrix(member_rows), top_n, exclude_purchased, popular_fallback,
                               exclude=exclude)
    return [[(c, s) for c, s in zip(row_c, row_s, strict=True) if c >= 0]
            for row_c, row_s in zip(categories.tolist(), scores.tolist(), strict=True)]


def because_of(model: ItemCfModel, member_rows: sparse.csr_matrix, recommendations: list[list[tuple[int, float]]],
               limit: int = BECAUSE_OF_MAX) -> list[list[tuple[int, ...]]]:
    """For each recommendation, the member's categories that contributed most to its score (interest ×
    similarity, largest first, at most `limit`; empty for a popularity fill-in)."""
    rows = _interest(sparse.csr_matrix(member_rows))
    if len(recommendations) != rows.shape[0]:
        raise ValueError("one list of recommendations per member row is needed")
    slots = max((len(r) for r in recommendations), default=0)
    picked = np.full((rows.shape[0], slots), -1, dtype=np.int64)
    for i, row in enumerate(recommendations):  # building the padded matrix; the work below is per slot
        picked[i, :len(row)] = [c for c, _ in row]
    interest = rows.toarray()
    keep = min(limit, model.categories)
    reasons = np.full((rows.shape[0], slots, keep), -1, dtype=np.int64)
    for slot in range(slots):
        target = np.maximum(picked[:, slot], 0)
        contribution = interest * model.similarity[:, target].T
        contribution[picked[:, slot] < 0] = 0.0
        order = np.argsort(-contribution, axis=1, kind="stable")[:, :keep]
        reasons[:, slot] = np.where(np.take_along_axis(contribution, order, axis=1) > 0, order, -1)
    return [[tuple(c for c in slot if c >= 0) for slot in member[:len(row)]]
            for member, row in zip(reasons.tolist(), recommendations, strict=True)]


def evaluate_recommender(train: sparse.csr_matrix, holdout: sparse.csr_matrix, top_n: int = REPORT_TOP_N,
                         shrinkage: float = SHRINKAGE_DEFAULT, exclude_purchased: bool = True) -> RecommenderReport:
    """Fit on `train` (members × categories up to the cut-off) and check against `holdout` (the same
    members' purchases in the next window), next to a popularity baseline.

    With exclude_purchased (the default) the targets are the categories new to the member, and
    neither ranking may propose a category already bought: re-buying a habitual category says
    nothing about discovery. Members without any target are not evaluated.
    """
    if train.shape != holdout.shape:
        raise ValueError(f"train and holdout must have the same shape, got {train.shape} and {holdout.shape}")
    train = sparse.csr_matrix(train)
    model = fit_item_cf(train.indptr, train.indices, train.data, train.shape[1], shrinkage)
    target = sparse.csr_matrix(holdout, dtype=np.float64)
    target.data = (target.data > 0).astype(np.float64)
    if exclude_purchased:
        target = target - target.multiply(_interest(train) > 0)
    target.eliminate_zeros()
    evaluated = np.flatnonzero(np.diff(target.indptr) > 0)
    depth = max(top_n, REPORT_TOP_N)
    totals = np.zeros(6)  # hits@5, popular hits@5, hits@n, precision@n, recall@n, popular hits@n
    recommended = np.zeros(model.categories, dtype=bool)
    for start in range(0, evaluated.size, EVALUATION_BATCH_ROWS):
        batch = evaluated[start:start + EVALUATION_BATCH_ROWS]
        wanted = target[batch].toarray() > 0
        found = []
        for collaborative in (True, False):
            ranked, _ = _rank(model, train[batch], depth, exclude_purchased, True, collaborative)
            hit = np.take_along_axis(wanted, np.maximum(ranked, 0), axis=1) & (ranked >= 0)
            found.append(hit)
            if collaborative:
                recommended[ranked[:, :top_n][ranked[:, :top_n] >= 0]] = True
        cf, popular = found
        hits_n = cf[:, :top_n].sum(axis=1)
        totals += [cf[:, :REPORT_TOP_N].any(axis=1).sum(), popular[:, :REPORT_TOP_N].any(axis=1).sum(),
                   (hits_n > 0).sum(), (hits_n / max(top_n, 1)).sum(), (hits_n / wanted.sum(axis=1)).sum(),
                   popular[:, :top_n].any(axis=1).sum()]
    rates = totals / max(evaluated.size, 1)
    return RecommenderReport(
        categories=model.categories, members=model.members, non_zeros=model.non_zeros,
        hit_rate_at_5=float(rates[0]), popularity_hit_rate_at_5=float(rates[1]), top_n=top_n,
        evaluated_members=int(evaluated.size), hit_rate=float(rates[2]), precision=float(rates[3]),
        recall=float(rates[4]), coverage=float(recommended.sum() / max(model.categories, 1)),
        popularity_hit_rate=float(rates[5]))
