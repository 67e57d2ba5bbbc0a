"""Learning policy weights from history, and the out-of-time metrics that judge a scoring.

A policy scores a member as Σ wᵢ·tᵢ(xᵢ) over its transformed features. FitWeights keeps the features,
transforms, tiers and rule of a base policy and learns only w, from the features at a training date
against each member's value in the following horizon. Two methods (learning.proto, FitMethod):

- NNLS_RIDGE: a ridge regression with sign-constrained weights, so the result is directly a policy.
- GBM_RANK: a gradient-boosted ranker on the raw features, which can find interactions a linear score
  cannot, projected back onto the linear form (a policy must stay explainable as Σ wᵢ·tᵢ).

Everything here is a pure function on numpy arrays; the service samples members, reads features and
stores the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy import optimize, stats

TOP_SHARE = 0.2  # "top 20 %" of top20_revenue_share
WEIGHTS_L1_DEFAULT = 1.0
GBM_ITERATIONS_MAX = 200
GBM_LEAF_NODES_MAX = 31
GBM_LEARNING_RATE = 0.1
EIGENVALUE_RELATIVE_MIN = 1e-12  # below this share of the largest eigenvalue a direction is treated as null


@dataclass(frozen=True)
class ValidationMetrics:
    """Mirrors loyalty.scoring.v1.ValidationMetrics."""

    spearman: float
    top20_revenue_share: float
    upgrade_auc: float
    members: int


class Ranker(Protocol):
    """What FitWeights needs of the GBM ranker: scores for raw feature rows (higher is better)."""

    def predict(self, X: Any) -> Any: ...


@dataclass(frozen=True, eq=False)  # arrays do not compare with ==
class FitResult:
    """Learned weights in the policy's feature order, with their importances in [0, 1].

    `ranker` is set for GBM_RANK only, so the caller can report the ranker's own validation metrics
    (learning.proto, WeightFit.ranker_metrics) next to the projected policy's.
    """

    weights: np.ndarray  # (k,) float64
    importances: np.ndarray  # (k,) float64, sums to 1 (all zeros when the score is constant)
    ranker: Ranker | None = None


def spearman(score: np.ndarray, value: np.ndarray) -> float:
    """Rank correlation with ties sharing their mean rank; 0 when either side is constant (scipy
    answers NaN there, which would poison a stored report)."""
    if score.size < 2 or np.ptp(score) == 0 or np.ptp(value) == 0:
        return 0.0
    rho = float(stats.spearmanr(score, value).statistic)
    return rho if np.isfinite(rho) else 0.0


def top_share(score: np.ndarray, value: np.ndarray, share: float = TOP_SHARE) -> float:
    """Share of the total value made by the top `share` of members by score, in [0, 1].

    The top is ceil(share·n) members. Members tied at the boundary score share the remaining places
    equally (each contributes the tied group's mean value per place), so the answer does not depend
    on the order of the rows. Negative values (net refunds) count as 0: this is a share of revenue,
    and it must stay in [0, 1].
    """
    n = score.size
    revenue = np.maximum(value.astype(np.float64), 0.0)
    total = float(revenue.sum())
    if n == 0 or total <= 0.0:
        return 0.0
    places = int(np.ceil(share * n - 1e-9))  # 0.2 × 15 is 3.0000000000000004 in binary: still 3 places
    if places <= 0:
        return 0.0
    boundary = np.sort(score)[::-1][places - 1]
    above = score > boundary
    tied = score == boundary
    captured = revenue[above].sum() + (places - int(above.sum())) * revenue[tied].mean()
    return float(min(1.0, captured / total))


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the Mann–Whitney rank sum (ties count one half); 0.5 when only one class is present,
    since no ordering can be judged then."""
    positive = positive.astype(bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.5
    ranks = stats.rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def validation_metrics(score: np.ndarray, next_value: np.ndarray, upgraded: np.ndarray | None) -> ValidationMetrics:
    """Out-of-time metrics of one scoring: scores at the validation date against the value each member
    made in the following horizon (and whether it reached a higher tier, when known)."""
    if score.shape != next_value.shape or (upgraded is not None and upgraded.shape != score.shape):
        raise ValueError("score, next_value and upgraded must have one entry per member")
    return ValidationMetrics(
        spearman=spearman(score, next_value),
        top20_revenue_share=top_share(score, next_value),
        upgrade_auc=0.5 if upgraded is None else roc_auc(score, upgraded),
        members=int(score.size))


def _sign_constrained_least_squares(T: np.ndarray, y: np.ndarray, alpha: float, signs: np.ndarray) -> np.ndarray:
    """argmin ‖T̃w − ỹ‖² + α‖w‖² with sign(wᵢ) ∈ {0, signsᵢ}, T̃ and ỹ centred.

    Centring stands in for an intercept: a policy has none, and quantile tiers (and rankings) do not
    care about a constant. The NNLS runs on the ridge-augmented system [T̃; √α·I] w ≈ [ỹ; 0], but
    reduced to k×k first: with T̃ᵀT̃ + αI = V Λ Vᵀ, the objective equals ‖Λ^½Vᵀw − Λ^-½VᵀT̃ᵀỹ‖² plus a
    constant, so the (n+k)×k matrix (gigabytes at two million members) is never built.
    """
    Tc = (T - T.mean(axis=0)) * signs
    yc = y - y.mean()
    gram = Tc.T @ Tc + alpha * np.eye(T.shape[1])
    eigenvalues, vectors = np.linalg.eigh(gram)
    keep = eigenvalues > EIGENVALUE_RELATIVE_MIN * max(float(eigenvalues.max()), 1e-300)
    root = np.sqrt(eigenvalues[keep])
    A = root[:, None] * vectors[:, keep].T
    b = (vectors[:, keep].T @ (Tc.T @ yc)) / root
    weights, _ = optimize.nnls(A, b, maxiter=50 * T.shape[1] + 100)
    return np.asarray(weights * signs + 0.0, dtype=np.float64)  # + 0.0: no -0.0 for a dropped penalty


def _checked(T: np.ndarray, y: np.ndarray, signs: np.ndarray | None) -> np.ndarray:
    if T.ndim != 2 or y.shape != (T.shape[0],):
        raise ValueError(f"T must be (members, features) and y (members,), got {T.shape} and {y.shape}")
    if T.shape[0] < 2:
        raise ValueError("at least two members are needed to fit weights")
    if not (np.all(np.isfinite(T)) and np.all(np.isfinite(y))):
        raise ValueError("T and y must be finite")
    if signs is None:
        return np.ones(T.shape[1])
    if signs.shape != (T.shape[1],) or not np.all(np.isin(signs, (-1.0, 1.0))):
        raise ValueError("signs must hold +1 or -1 per feature")
    return signs.astype(np.float64)


def _scaled(weights: np.ndarray, l1_norm: float) -> np.ndarray:
    total = float(np.abs(weights).sum())
    return weights * (l1_norm / total) if total > 0 else weights


def fit_nnls_ridge(T: np.ndarray, y: np.ndarray, alpha: float, signs: np.ndarray | None = None,
                   l1_norm: float = WEIGHTS_L1_DEFAULT) -> np.ndarray:
    """Ridge weights of the target y on the transformed features T (members × features), each weight
    either 0 or of the sign `signs` gives it (default: all +1, i.e. non-negative least squares).

    Scaling, chosen because the target's unit (fen, orders) says nothing about the score's unit:
    - y is standardised (z-scored) before the fit, so α means the same for spend and order counts;
    - α is on the sum of squares over members (scikit-learn's Ridge convention, not a mean), so a
      fixed α matters less as the sample grows; T is used as given (the policy's transformed units);
    - the result is rescaled so that Σ|wᵢ| = l1_norm (default 1). Pass the base policy's Σ|wᵢ| to
      keep its score range. A target that no feature explains gives all-zero weights.

    Pass signs = -1 for features the base policy penalises (refund ratio, days since last purchase)
    so the fit may keep them as penalties instead of dropping them to 0.
    """
    signs_checked = _checked(T, y, signs)
    if alpha < 0:
        raise ValueError("alpha must be at least 0")
    sd = float(y.std())
    if sd == 0.0:
        return np.zeros(T.shape[1])
    weights = _sign_constrained_least_squares(T.astype(np.float64), (y - y.mean()) / sd, alpha, signs_checked)
    return _scaled(weights, l1_norm)


def importances(T: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Share of the score's variance each feature explains, in [0, 1] and summing to 1.

    Var(s) = Σᵢ wᵢ·Cov(tᵢ, s) splits the variance exactly, but with correlated features a term can
    be negative (a feature that cancels another). Negative terms are clipped to 0 and the rest
    renormalised, so the shares read as "how much of the ranking comes from this feature". A
    constant score gives all zeros.
    """
    centred = T - T.mean(axis=0)
    score = centred @ weights
    if not np.any(score):
        return np.zeros(T.shape[1])
    terms = np.maximum(weights * (centred.T @ score), 0.0)
    total = float(terms.sum())
    return terms / total if total > 0 else np.zeros(T.shape[1])


def _gain_importances(model: Any, n_features: int) -> np.ndarray | None:
    """Total split gain per feature over the ranker's trees, normalised to sum to 1.

    HistGradientBoostingRegressor exposes no feature_importances_, so this reads its fitted
    predictors (a private attribute, pinned by the lock file); None when the layout changes, and the
    caller then falls back to the projected policy's variance shares.
    """
    try:
        gains = np.zeros(n_features)
        for iteration in model._predictors:
            for predictor in iteration:
                nodes = predictor.nodes
                split = ~nodes["is_leaf"].astype(bool)
                np.add.at(gains, nodes["feature_idx"][split], np.maximum(nodes["gain"][split], 0.0))
    except (AttributeError, KeyError, ValueError, IndexError):
        return None
    total = float(gains.sum())
    return gains / total if total > 0 else np.zeros(n_features)


def fit_gbm_rank(X_raw: np.ndarray, T: np.ndarray, y: np.ndarray, seed: int, signs: np.ndarray | None = None,
                 l1_norm: float = WEIGHTS_L1_DEFAULT) -> FitResult:
    """A gradient-boosted ranker on the raw features, projected onto the policy's linear form.

    The ranker (HistGradientBoostingRegressor) predicts the target's rank as a fraction in [0, 1]
    (ties share their mean rank): ranks make it indifferent to the heavy tail of spend, which would
    otherwise spend most trees on a few big spenders. Its scores on the training members are then
    projected onto the policy: a least-squares fit of the transformed features T to them, with the
    same sign constraint as fit_nnls_ridge (non-negative by default, since a policy's weights must
    read as "more of this feature helps") and no ridge penalty, rescaled to Σ|wᵢ| = l1_norm.

    Importances are the ranker's gain importances per raw feature (learning.proto, FittedWeight),
    which assumes X_raw and T have the same columns in the same order; when the ranker's internals
    cannot be read they are the projected weights' variance shares instead.
    """
    from sklearn.ensemble import HistGradientBoostingRegressor

    signs_checked = _checked(T, y, signs)
    if X_raw.shape != T.shape:
        raise ValueError(f"X_raw and T must have the same shape, got {X_raw.shape} and {T.shape}")
    target = (stats.rankdata(y) - 0.5) / y.size
    ranker = HistGradientBoostingRegressor(max_iter=GBM_ITERATIONS_MAX, max_leaf_nodes=GBM_LEAF_NODES_MAX,
                                           learning_rate=GBM_LEARNING_RATE, early_stopping=False, random_state=seed)
    ranker.fit(X_raw, target)
    ranked = np.asarray(ranker.predict(X_raw), dtype=np.float64)
    sd = float(ranked.std())
    weights = np.zeros(T.shape[1]) if sd == 0.0 else _scaled(
        _sign_constrained_least_squares(T.astype(np.float64), (ranked - ranked.mean()) / sd, 0.0, signs_checked),
        l1_norm)
    gains = _gain_importances(ranker, T.shape[1])
    return FitResult(weights=weights, importances=gains if gains is not None else importances(T, weights),
                     ranker=ranker)


def fit_nnls_ridge_result(T: np.ndarray, y: np.ndarray, alpha: float, signs: np.ndarray | None = None,
                          l1_norm: float = WEIGHTS_L1_DEFAULT) -> FitResult:
    """fit_nnls_ridge with the weights' variance-share importances, as FitWeights reports them."""
    weights = fit_nnls_ridge(T, y, alpha, signs, l1_norm)
    return FitResult(weights=weights, importances=importances(T, weights))
