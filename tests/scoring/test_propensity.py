"""Upgrade propensity: discrimination and calibration on a known logistic truth, storage without pickle."""

from __future__ import annotations

import io

import numpy as np
import pytest

from services.scoring.domain import propensity
from services.scoring.domain.propensity import PropensityMethod


def _logistic_world(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw features on very different scales; the truth is logistic in their standardised values."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.normal(20.0, 5.0, n), rng.normal(300_000.0, 80_000.0, n), rng.normal(0.0, 1.0, n)])
    logit = -1.0 + 1.5 * (X[:, 0] - 20.0) / 5.0 + 1.0 * (X[:, 1] - 300_000.0) / 80_000.0
    y = rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-logit))
    return X, y


@pytest.mark.parametrize("method", list(PropensityMethod))
def test_known_logistic_truth_is_learned_and_calibrated(method: PropensityMethod) -> None:
    X, y = _logistic_world(12_000, seed=1)
    fit = propensity.train_propensity(X[:8000], y[:8000], X[8000:], y[8000:], method=method, seed=2)
    model = fit.model
    assert fit.members_trained == 8000
    assert model.coef * model.scale / np.array([5.0, 80_000.0, 1.0]) == pytest.approx([1.5, 1.0, 0.0], abs=0.12)
    report = fit.calibration
    assert report.auc > 0.8
    assert report.expected_calibration_error < 0.03
    assert report.validation_members == 4000
    assert report.base_rate == pytest.approx(float(y[8000:].mean()))
    assert len(report.bins) == 10 and sum(b.count for b in report.bins) == 4000
    assert report.bins[0].lower == 0.0 and report.bins[-1].upper == 1.0
    assert 0.0 < report.brier_score < 0.25
    assert report.log_loss < np.log(2.0)


def test_bayesian_probabilities_are_pulled_towards_one_half_far_from_the_data() -> None:
    X, y = _logistic_world(600, seed=3)
    plain = propensity.train_propensity(X, y, X, y, method=PropensityMethod.LOGISTIC_REGRESSION).model
    bayes = propensity.train_propensity(X, y, X, y, method=PropensityMethod.BAYESIAN_LOGISTIC).model
    far = np.array([[60.0, 900_000.0, 8.0], [-20.0, -300_000.0, -8.0]])
    assert np.all(np.abs(bayes.predict(far) - 0.5) < np.abs(plain.predict(far) - 0.5))
    assert bayes.covariance is not None and bayes.covariance.shape == (4, 4)
    assert np.all(np.linalg.eigvalsh(bayes.covariance) > 0)


@pytest.mark.parametrize("method", list(PropensityMethod))
def test_round_trip_through_npz_without_pickle_predicts_identically(method: PropensityMethod) -> None:
    X, y = _logistic_world(2000, seed=4)
    model = propensity.train_propensity(X, y, X, y, method=method).model
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **model.to_arrays())
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as stored:
        restored = propensity.PropensityModel.from_arrays(dict(stored))
    assert restored.method == method
    assert np.array_equal(restored.predict(X), model.predict(X))


def test_one_class_training_data_is_refused() -> None:
    X, _ = _logistic_world(100, seed=5)
    with pytest.raises(ValueError, match="one class"):
        propensity.train_propensity(X, np.zeros(100, dtype=bool), X, np.ones(100, dtype=bool))
    with pytest.raises(ValueError, match="one class"):
        propensity.train_propensity(X, np.ones(100, dtype=bool), X, np.ones(100, dtype=bool))


def test_constant_features_and_bad_shapes() -> None:
    X, y = _logistic_world(500, seed=6)
    X[:, 2] = 4.0
    model = propensity.train_propensity(X, y, X, y).model
    assert model.scale[2] == 1.0 and np.all(np.isfinite(model.predict(X)))
    with pytest.raises(ValueError, match="features"):
        propensity.train_propensity(X, y, X[:, :2], y)
    with pytest.raises(ValueError, match=r"\(members, 3\)"):
        model.predict(X[:, :2])


def test_calibration_report_by_hand() -> None:
    probability = np.array([0.05, 0.15, 0.95, 1.0])
    outcome = np.array([False, True, True, True])
    report = propensity.calibration_report(probability, outcome)
    assert report.bins[0].count == 1 and report.bins[1].count == 1 and report.bins[9].count == 2
    assert report.bins[9].mean_predicted == pytest.approx(0.975) and report.bins[9].observed_rate == 1.0
    assert report.bins[4] == propensity.CalibrationBin(0.4, 0.5, 0.0, 0.0, 0)
    # |0.05 − 0| + |0.15 − 1| + 2·|0.975 − 1| over 4 members.
    assert report.expected_calibration_error == pytest.approx((0.05 + 0.85 + 0.05) / 4)
    assert report.brier_score == pytest.approx((0.05**2 + 0.85**2 + 0.05**2 + 0.0) / 4)
    assert report.auc == 1.0 and report.base_rate == 0.75
    with pytest.raises(ValueError, match="empty"):
        propensity.calibration_report(np.zeros(0), np.zeros(0, dtype=bool))
