"""Upgrade propensity: the calibrated probability that a member reaches the next tier at the next cycle.

Two methods, as learning.proto's ModelMethod names them:
- LOGISTIC_REGRESSION: L2-regularised logistic regression on standardised features.
- BAYESIAN_LOGISTIC: the same fit read as a posterior mode, with a Laplace approximation of the
  posterior (Gaussian with the inverse Hessian as covariance); probabilities are posterior means,
  which pulls members far from the training data towards 1/2 instead of over-confident extremes.

No class weighting: re-weighting the classes would shift every probability away from the observed
rates, and these probabilities are promised to be calibrated. Both models are a handful of arrays
(to_arrays / from_arrays), so they are stored without pickle.

Sketch: 200,000 members × 64 features is 100 MB of float64; lbfgs needs a few dozen passes; the
(k+1)×(k+1) Hessian of the Laplace step is one matrix product.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from services.scoring.domain.learning import roc_auc

CALIBRATION_BINS = 10
PROBABILITY_EPS = 1e-15  # log loss clips probabilities to [eps, 1 − eps]
REGULARISATION_C = 1.0  # scikit-learn's C: inverse strength of the L2 penalty (prior precision 1/C)
LBFGS_ITERATIONS_MAX = 1000


class PropensityMethod(enum.IntEnum):
    """Mirrors the propensity values of loyalty.scoring.v1.ModelMethod (same numbers)."""

    LOGISTIC_REGRESSION = 1
    BAYESIAN_LOGISTIC = 2


@dataclass(frozen=True)
class CalibrationBin:
    """Mirrors loyalty.scoring.v1.CalibrationBin: predicted range [lower, upper)."""

    lower: float
    upper: float
    mean_predicted: float
    observed_rate: float
    count: int


@dataclass(frozen=True)
class CalibrationReport:
    """Mirrors loyalty.scoring.v1.CalibrationReport."""

    brier_score: float
    log_loss: float
    auc: float
    expected_calibration_error: float
    bins: tuple[CalibrationBin, ...]
    validation_members: int
    base_rate: float


@dataclass(frozen=True, eq=False)  # arrays do not compare with ==
class PropensityModel:
    """A fitted model: features are standardised with (mean, scale), then weighted by coef.

    covariance is the Laplace posterior covariance over [intercept, coef...] for BAYESIAN_LOGISTIC,
    and None for LOGISTIC_REGRESSION.
    """

    method: PropensityMethod
    mean: np.ndarray  # (k,)
    scale: np.ndarray  # (k,) standard deviation, 1 for a constant feature
    coef: np.ndarray  # (k,)
    intercept: float
    covariance: np.ndarray | None = None  # (k + 1, k + 1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """P(upgrade) per row of X (members × features, in the training order), in [0, 1]."""
        if X.ndim != 2 or X.shape[1] != self.coef.size:
            raise ValueError(f"X must be (members, {self.coef.size}), got {X.shape}")
        Z = (X - self.mean) / self.scale
        logit = Z @ self.coef + self.intercept
        if self.covariance is not None:
            # MacKay's probit approximation of E[σ(wᵀx)] under w ~ N(ŵ, Σ): σ(μ / √(1 + π·s²/8)).
            design = np.column_stack([np.ones(Z.shape[0]), Z])
            variance = np.einsum("ij,jk,ik->i", design, self.covariance, design)
            logit = logit / np.sqrt(1.0 + np.pi * np.maximum(variance, 0.0) / 8.0)
        return np.asarray(_sigmoid(logit), dtype=np.float64)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Numeric arrays only, so np.savez / np.load(allow_pickle=False) round-trip them exactly."""
        return {"method": np.array([int(self.method)], dtype=np.int64), "mean": self.mean, "scale": self.scale,
                "coef": self.coef, "intercept": np.array([self.intercept]),
                "covariance": self.covariance if self.covariance is not None else np.zeros((0, 0))}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PropensityModel:
        method = PropensityMethod(int(arrays["method"][0]))
        coef = np.asarray(arrays["coef"], dtype=np.float64)
        covariance = np.asarray(arrays["covariance"], dtype=np.float64)
        k = coef.size
        if arrays["mean"].shape != (k,) or arrays["scale"].shape != (k,) or arrays["intercept"].shape != (1,):
            raise ValueError("stored propensity model arrays do not agree on the number of features")
        if method == PropensityMethod.BAYESIAN_LOGISTIC and covariance.shape != (k + 1, k + 1):
            raise ValueError("a stored Bayesian propensity model needs its (k+1)×(k+1) covariance")
        return cls(method=method, mean=np.asarray(arrays["mean"], dtype=np.float64),
                   scale=np.asarray(arrays["scale"], dtype=np.float64), coef=coef,
                   intercept=float(arrays["intercept"][0]),
                   covariance=covariance if method == PropensityMethod.BAYESIAN_LOGISTIC else None)


@dataclass(frozen=True, eq=False)
class PropensityFit:
    """A trained model with its out-of-time calibration report."""

    model: PropensityModel
    calibration: CalibrationReport
    members_trained: int


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)), dtype=np.float64)  # overflow-free form


def calibration_report(probability: np.ndarray, outcome: np.ndarray) -> CalibrationReport:
    """Brier score, log loss, AUC and a ten-bin reliability table of probabilities against outcomes.

    Bins are equal-width over [0, 1] (the last one includes 1.0); an empty bin is reported with
    count 0 and zeros, so the diagram always has ten bars. ECE is the count-weighted mean gap
    between mean predicted probability and observed rate over the bins.
    """
    if probability.shape != outcome.shape or probability.ndim != 1:
        raise ValueError("one probability and one outcome per member are needed")
    n = probability.size
    if n == 0:
        raise ValueError("the validation set is empty")
    observed = outcome.astype(np.float64)
    clipped = np.clip(probability, PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)
    log_loss = -float(np.mean(observed * np.log(clipped) + (1.0 - observed) * np.log1p(-clipped)))
    index = np.minimum((probability * CALIBRATION_BINS).astype(np.int64), CALIBRATION_BINS - 1)
    counts = np.bincount(index, minlength=CALIBRATION_BINS)
    predicted_sums = np.bincount(index, weights=probability, minlength=CALIBRATION_BINS)
    observed_sums = np.bincount(index, weights=observed, minlength=CALIBRATION_BINS)
    safe = np.maximum(counts, 1)
    mean_predicted = predicted_sums / safe
    observed_rate = observed_sums / safe
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    bins = tuple(CalibrationBin(lower=float(edges[i]), upper=float(edges[i + 1]),
                                mean_predicted=float(mean_predicted[i]), observed_rate=float(observed_rate[i]),
                                count=int(counts[i])) for i in range(CALIBRATION_BINS))
    return CalibrationReport(
        brier_score=float(np.mean(np.square(probability - observed))), log_loss=log_loss,
        auc=roc_auc(probability, outcome.astype(bool)),
        expected_calibration_error=float(np.sum(counts * np.abs(mean_predicted - observed_rate)) / n),
        bins=bins, validation_members=n, base_rate=float(observed.mean()))


def _laplace_covariance(Z: np.ndarray, coef: np.ndarray, intercept: float, c: float) -> np.ndarray:
    """Inverse Hessian of the negative log posterior at the mode, over [intercept, coef...].

    scikit-learn minimises C·Σ log-loss + ½‖w‖² with the intercept unpenalised, i.e. a N(0, C·I)
    prior on the weights and a flat one on the intercept; the Hessian divides that by C.
    """
    design = np.column_stack([np.ones(Z.shape[0]), Z])
    p = _sigmoid(Z @ coef + intercept)
    hessian = (design * (p * (1.0 - p))[:, None]).T @ design
    prior = np.full(design.shape[1], 1.0 / c)
    prior[0] = 1e-9  # an almost flat prior on the intercept, still enough to keep the matrix invertible
    return np.asarray(np.linalg.inv(hessian + np.diag(prior)), dtype=np.float64)


def train_propensity(X_train: np.ndarray, y_train: np.ndarray, X_valid: np.ndarray, y_valid: np.ndarray, *,
                     method: PropensityMethod = PropensityMethod.LOGISTIC_REGRESSION, seed: int = 0,
                     c: float = REGULARISATION_C) -> PropensityFit:
    """Fit on (X_train, y_train), report calibration on the caller's out-of-time (X_valid, y_valid).

    ValueError when the training outcomes hold one class only (nobody upgraded, or everybody): there
    is nothing to learn, and the caller answers NOT_ENOUGH_HISTORY.
    """
    from sklearn.linear_model import LogisticRegression

    if X_train.ndim != 2 or y_train.shape != (X_train.shape[0],):
        raise ValueError(f"X_train must be (members, features) and y_train (members,), got {X_train.shape}, "
                         f"{y_train.shape}")
    if X_valid.ndim != 2 or X_valid.shape[1] != X_train.shape[1] or y_valid.shape != (X_valid.shape[0],):
        raise ValueError("X_valid and y_valid must match X_train's features, one outcome per member")
    if not (np.all(np.isfinite(X_train)) and np.all(np.isfinite(X_valid))):
        raise ValueError("features must be finite")
    outcome = y_train.astype(bool)
    if outcome.all() or not outcome.any():
        raise ValueError("the training outcomes hold only one class: nobody or everybody upgraded")
    mean = X_train.mean(axis=0)
    scale = X_train.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    Z = (X_train - mean) / scale
    fitted = LogisticRegression(C=c, max_iter=LBFGS_ITERATIONS_MAX, random_state=seed).fit(Z, outcome)
    coef = np.asarray(fitted.coef_[0], dtype=np.float64)
    intercept = float(fitted.intercept_[0])
    covariance = _laplace_covariance(Z, coef, intercept, c) if method == PropensityMethod.BAYESIAN_LOGISTIC else None
    model = PropensityModel(method=PropensityMethod(method), mean=mean, scale=scale, coef=coef, intercept=intercept,
                            covariance=covariance)
    return PropensityFit(model=model, calibration=calibration_report(model.predict(X_valid), y_valid.astype(bool)),
                         members_trained=int(X_train.shape[0]))
