"""The compiled isolation forest: same scores as scikit-learn, a strict archive loader, training."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.ensemble import IsolationForest
from sklearn.ensemble._iforest import _average_path_length

from services.risk.domain.forest import (
    CompiledForest,
    ModelValidationError,
    average_path_length,
    compile_forest,
    train_forest,
)


def names_for(n_features: int) -> list[str]:
    return [f"feature_{i}" for i in range(n_features)]


def history(rng: np.random.Generator, n_rows: int, n_features: int) -> NDArray[np.float64]:
    """Mixed columns: gaussian, heavy-tailed, and small integers (many ties)."""
    columns = []
    for i in range(n_features):
        if i % 3 == 0:
            columns.append(rng.normal(0.0, 1.0, n_rows))
        elif i % 3 == 1:
            columns.append(rng.lognormal(3.0, 1.0, n_rows))
        else:
            columns.append(rng.integers(0, 6, n_rows).astype(np.float64))
    return np.column_stack(columns)


def probe_rows(rng: np.random.Generator, forest: CompiledForest, base: NDArray[np.float64],
               n_rows: int) -> NDArray[np.float64]:
    """Test rows: resampled history, wide noise, values sitting exactly on split thresholds, NaNs."""
    rows = base[rng.integers(0, base.shape[0], n_rows)].copy()
    rows[: n_rows // 4] *= rng.uniform(-3.0, 3.0, (n_rows // 4, base.shape[1]))
    internal = forest.feature >= 0
    on_split = rng.choice(np.flatnonzero(internal), n_rows // 4)
    rows[n_rows // 4: n_rows // 2][np.arange(n_rows // 4), forest.feature[on_split]] = forest.split_threshold[on_split]
    nan_rows = rng.choice(n_rows, n_rows // 50, replace=False)
    rows[nan_rows, rng.integers(0, base.shape[1], nan_rows.size)] = np.nan
    return rows


CASES = [
    # seed, n_features, training rows, max_samples, max_features
    (0, 12, 5000, 256, 1.0),
    (1, 3, 300, 64, 1.0),
    (2, 7, 2000, 256, 0.5),
    (3, 1, 500, 128, 1.0),
    (4, 20, 1500, 256, 3),
    (5, 5, 120, 256, 1.0),  # max_samples above the rows: sklearn caps it at 120
]


@pytest.mark.parametrize(("seed", "n_features", "n_rows", "max_samples", "max_features"), CASES)
def test_compiled_scores_equal_sklearn(seed: int, n_features: int, n_rows: int, max_samples: int,
                                       max_features: float) -> None:
    rng = np.random.default_rng(seed)
    base = history(rng, n_rows, n_features)
    model = IsolationForest(n_estimators=60, max_samples=min(max_samples, n_rows), max_features=max_features,
                            random_state=seed, contamination="auto").fit(base)
    forest = compile_forest(model, names_for(n_features), 0.6)
    rows = probe_rows(rng, forest, base, 10_000)
    expected = -model.score_samples(rows)

    compiled = forest.score_many(rows)
    assert compiled.shape == (10_000,)
    assert np.max(np.abs(compiled - expected)) < 1e-9

    sample = rng.choice(rows.shape[0], 200, replace=False)
    one_by_one = np.array([forest.score_one(rows[i]) for i in sample])
    assert np.max(np.abs(one_by_one - expected[sample])) < 1e-9
    assert forest.score_one(list(rows[sample[0]])) == pytest.approx(expected[sample[0]], abs=1e-9)
    assert np.all((compiled > 0) & (compiled <= 1))


def test_sklearn_routes_nan_by_missing_go_to_left_and_so_do_we() -> None:
    rng = np.random.default_rng(11)
    base = rng.normal(size=(1000, 4))
    model = IsolationForest(n_estimators=50, random_state=11).fit(base)
    forest = compile_forest(model, names_for(4), 0.6)
    assert forest.missing_left[forest.feature >= 0].any()
    rows = rng.normal(size=(300, 4))
    rows[rng.random(rows.shape) < 0.3] = np.nan
    expected = -model.score_samples(rows)
    assert np.max(np.abs(forest.score_many(rows) - expected)) < 1e-9
    assert max(abs(forest.score_one(row) - e) for row, e in zip(rows, expected, strict=True)) < 1e-9


def test_feature_subsets_map_to_global_columns() -> None:
    rng = np.random.default_rng(7)
    base = rng.normal(size=(800, 9))
    model = IsolationForest(n_estimators=30, max_features=4, random_state=7).fit(base)
    forest = compile_forest(model, names_for(9), 0.6)
    for tree, (start, columns) in enumerate(zip(forest.roots, model.estimators_features_, strict=True)):
        end = forest.roots[tree + 1] if tree + 1 < forest.n_estimators else forest.feature.shape[0]
        used = set(forest.feature[start:end][forest.feature[start:end] >= 0].tolist())
        assert used <= set(np.asarray(columns).tolist())


def test_average_path_length_matches_sklearn() -> None:
    n = np.array([0, 1, 2, 3, 4, 10, 100, 256, 4096])
    assert np.array_equal(average_path_length(n), _average_path_length(n))
    assert average_path_length(1) == 0.0
    assert average_path_length(2) == 1.0
    euler_gamma = 0.5772156649015329
    assert average_path_length(256) == pytest.approx(2 * (math.log(255) + euler_gamma) - 2 * 255 / 256, abs=1e-12)


def test_compile_refuses_mismatched_names_and_unfitted_models() -> None:
    model = IsolationForest(n_estimators=5, random_state=0).fit(np.random.default_rng(0).normal(size=(100, 3)))
    with pytest.raises(ModelValidationError, match="3 features but 2 names"):
        compile_forest(model, ["a", "b"], 0.5)
    with pytest.raises(ModelValidationError, match="fitted"):
        compile_forest(IsolationForest(), ["a", "b", "c"], 0.5)
    with pytest.raises(ModelValidationError, match="unique"):
        compile_forest(model, ["a", "a", "c"], 0.5)


# --- storage ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_forest() -> tuple[CompiledForest, NDArray[np.float64]]:
    rng = np.random.default_rng(3)
    base = rng.normal(size=(1000, 5))
    model = IsolationForest(n_estimators=25, max_samples=128, random_state=3).fit(base)
    return compile_forest(model, names_for(5), 0.62), rng.normal(size=(500, 5))


def archive_arrays(content: bytes) -> dict[str, NDArray[Any]]:
    with np.load(io.BytesIO(content), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def as_kwargs(arrays: dict[str, NDArray[Any]]) -> dict[str, Any]:
    return dict(arrays)


def rebuild(content: bytes, change: Callable[[dict[str, NDArray[Any]]], None]) -> bytes:
    arrays = archive_arrays(content)
    change(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **as_kwargs(arrays))
    return buffer.getvalue()


def edit_header(**fields: Any) -> Callable[[dict[str, NDArray[Any]]], None]:
    def change(arrays: dict[str, NDArray[Any]]) -> None:
        header = json.loads(arrays["header"].tobytes())
        header.update(fields)
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    return change


def first_internal(arrays: dict[str, NDArray[Any]], after_root: bool = False) -> int:
    internal = np.flatnonzero(arrays["left"] >= 0)
    return int(internal[1] if after_root else internal[0])


def test_round_trip_gives_identical_scores(small_forest: tuple[CompiledForest, NDArray[np.float64]]) -> None:
    forest, rows = small_forest
    content = forest.to_bytes()
    loaded = CompiledForest.from_bytes(content, known_features=set(names_for(5)) | {"other"})
    assert loaded.feature_names == forest.feature_names
    assert loaded.threshold == forest.threshold
    assert loaded.n_estimators == forest.n_estimators == 25
    assert loaded.max_samples == 128
    assert np.array_equal(loaded.score_many(rows), forest.score_many(rows))
    assert loaded.score_one(rows[0]) == forest.score_one(rows[0])
    assert loaded.to_bytes() == content
    assert "allow_pickle" not in repr(loaded)


def _set(name: str, index: Callable[[dict[str, NDArray[Any]]], int], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(arrays: dict[str, NDArray[Any]]) -> None:
        arrays[name] = arrays[name].copy()
        arrays[name][index(arrays)] = value
    return change


def _into_second_tree(arrays: dict[str, NDArray[Any]]) -> None:
    arrays["right"] = arrays["right"].copy()
    arrays["right"][first_internal(arrays)] = arrays["roots"][1]


def _loop_to_root(arrays: dict[str, NDArray[Any]]) -> None:
    arrays["left"] = arrays["left"].copy()
    arrays["left"][first_internal(arrays, after_root=True)] = 0


def _drop(name: str) -> Callable[[dict[str, NDArray[Any]]], None]:
    def change(arrays: dict[str, NDArray[Any]]) -> None:
        del arrays[name]
    return change


def _retype(name: str, dtype: Any) -> Callable[[dict[str, NDArray[Any]]], None]:
    def change(arrays: dict[str, NDArray[Any]]) -> None:
        arrays[name] = arrays[name].astype(dtype)
    return change


def _shorten(name: str) -> Callable[[dict[str, NDArray[Any]]], None]:
    def change(arrays: dict[str, NDArray[Any]]) -> None:
        arrays[name] = arrays[name][:-1]
    return change


def _bad_json(arrays: dict[str, NDArray[Any]]) -> None:
    arrays["header"] = np.frombuffer(b'{"format": "flat-forest-npz", ', dtype=np.uint8)


def _extra(arrays: dict[str, NDArray[Any]]) -> None:
    arrays["notes"] = np.zeros(3)


def _shift_leaf_values(arrays: dict[str, NDArray[Any]]) -> None:
    arrays["value"] = arrays["value"].copy()
    arrays["value"][arrays["left"] == -1] -= 0.5


BROKEN = [
    ("array removed", _drop("value"), "missing arrays: value"),
    ("extra array", _extra, "unexpected arrays: notes"),
    ("child out of range", _set("left", first_internal, 10**6), "child index out of range"),
    ("child in another tree", _into_second_tree, "child index out of range in 'right': a child lies outside"),
    ("cycle", _loop_to_root, "cycle"),
    ("NaN threshold", _set("split_threshold", first_internal, np.nan), "non-finite split thresholds"),
    ("infinite value", _set("value", first_internal, np.inf), "non-finite leaf values"),
    ("feature out of range", _set("feature", first_internal, 5), "feature index out of range"),
    ("bad header JSON", _bad_json, "header is not valid JSON"),
    ("wrong format version", edit_header(format_version=2), "unsupported format version 2"),
    ("wrong format name", edit_header(format="other"), "header format"),
    ("threshold 1.5", edit_header(threshold=1.5), r"threshold must be in \[0, 1\]"),
    ("normaliser zero", edit_header(normaliser=0.0), "normaliser must be a finite number > 0"),
    ("normaliser tampered", edit_header(normaliser=3.0), "is not c"),
    ("max_depth lies", edit_header(max_depth=2), "max_depth"),
    ("n_estimators lies", edit_header(n_estimators=3), "'roots' has 25 entries, expected 3"),
    ("wrong dtype", _retype("feature", np.int64), "'feature' has dtype int64, expected int32"),
    ("wrong shape", _shorten("split_threshold"), "'split_threshold' has"),
    ("leaf values tampered", _shift_leaf_values, "leaf values disagree"),
    ("n_samples inconsistent", _set("n_samples", first_internal, 10_000), "n_samples"),
    ("negative n_samples", _retype("n_samples", np.int64), "'n_samples' has dtype int64"),
]


@pytest.mark.parametrize(("problem", "change", "message"), BROKEN, ids=[case[0] for case in BROKEN])
def test_from_bytes_refuses_broken_archives(small_forest: tuple[CompiledForest, NDArray[np.float64]], problem: str,
                                            change: Callable[[dict[str, NDArray[Any]]], None], message: str) -> None:
    content = rebuild(small_forest[0].to_bytes(), change)
    with pytest.raises(ModelValidationError, match=message):
        CompiledForest.from_bytes(content)


def test_from_bytes_refuses_garbage_and_truncation(small_forest: tuple[CompiledForest, NDArray[np.float64]]) -> None:
    content = small_forest[0].to_bytes()
    with pytest.raises(ModelValidationError, match="not an npz archive"):
        CompiledForest.from_bytes(b"definitely not a model")
    with pytest.raises(ModelValidationError, match="not an npz archive"):
        CompiledForest.from_bytes(b"")
    with pytest.raises(ModelValidationError, match="not an npz archive"):
        CompiledForest.from_bytes(content[: len(content) // 2])
    single = io.BytesIO()
    np.save(single, np.zeros(3))
    with pytest.raises(ModelValidationError, match="not an npz archive"):
        CompiledForest.from_bytes(single.getvalue())


def test_from_bytes_refuses_unknown_features(small_forest: tuple[CompiledForest, NDArray[np.float64]]) -> None:
    with pytest.raises(ModelValidationError, match="unknown feature names: feature_4"):
        CompiledForest.from_bytes(small_forest[0].to_bytes(), known_features=names_for(4))


UNPICKLED: list[str] = []


def _record_unpickling() -> str:
    UNPICKLED.append("unpickled")
    return "boom"


class Tripwire:
    """Unpickling this calls _record_unpickling: the test sees whether the loader unpickled it."""

    def __reduce__(self) -> tuple[Callable[[], str], tuple[()]]:
        return _record_unpickling, ()


def test_from_bytes_refuses_pickled_arrays_without_unpickling(
        small_forest: tuple[CompiledForest, NDArray[np.float64]]) -> None:
    arrays = archive_arrays(small_forest[0].to_bytes())
    trap = np.empty(len(arrays["feature"]), dtype=object)
    trap[:] = [Tripwire() for _ in range(trap.shape[0])]
    arrays["feature"] = trap
    buffer = io.BytesIO()
    np.savez(buffer, **as_kwargs(arrays))  # allow_pickle defaults to True when saving
    with pytest.raises(ModelValidationError, match="pickled"):
        CompiledForest.from_bytes(buffer.getvalue())
    assert UNPICKLED == []


def test_threshold_and_flags(small_forest: tuple[CompiledForest, NDArray[np.float64]]) -> None:
    forest = small_forest[0]
    assert forest.flags(0.62) and forest.flags(0.9) and not forest.flags(0.6199)
    stricter = forest.with_threshold(0.7)
    assert stricter.threshold == 0.7 and forest.threshold == 0.62
    assert stricter.score_one(small_forest[1][0]) == forest.score_one(small_forest[1][0])
    with pytest.raises(ModelValidationError, match="threshold"):
        forest.with_threshold(1.5)
    with pytest.raises(ValueError, match="5 features"):
        forest.score_one([1.0, 2.0])


# --- training ---------------------------------------------------------------------------------------


def honest_rows(rng: np.random.Generator, n_rows: int, n_features: int = 8) -> NDArray[np.float64]:
    return rng.normal(size=(n_rows, n_features)) * np.linspace(1.0, 5.0, n_features)


def test_train_calibrates_the_review_rate_on_honest_history() -> None:
    rng = np.random.default_rng(21)
    rows = honest_rows(rng, 6000)
    result = train_forest(rows, names_for(8), target_review_rate=0.02, random_seed=21)
    assert result.training_rows == 4800 and result.validation_rows == 1200 and result.labelled_rows == 0
    honest_share = float(np.mean(result.forest.score_many(rows) >= result.forest.threshold))
    assert honest_share == pytest.approx(0.02, abs=0.002)
    assert result.review_rate == pytest.approx(0.02, abs=0.012)
    assert 0.0 < result.forest.threshold <= 1.0
    assert result.max_score_deviation < 1e-9
    assert result.sklearn_scores_validation.shape == (1200,)
    compiled = result.forest.score_many(rows[4800:])
    assert np.max(np.abs(compiled - result.sklearn_scores_validation)) < 1e-9
    assert result.fraud_recall == 0.0 and result.legitimate_flag_rate == 0.0 and result.roc_auc == 0.0
    assert result.p50_score_micros > 0
    assert result.forest.n_estimators == 100 and result.forest.max_samples == 256


def test_train_flags_injected_fraud_and_leaves_it_out_of_training() -> None:
    rng = np.random.default_rng(22)
    n_rows, n_features = 5000, 8
    rows = honest_rows(rng, n_rows, n_features)
    labels = np.full(n_rows, -1, dtype=np.int8)
    labels[rng.choice(n_rows, 800, replace=False)] = 0
    # A fraud ring: one tight cluster far out on four features, in history and in validation.
    fraud = np.concatenate((rng.choice(4000, 150, replace=False), 4000 + rng.choice(1000, 60, replace=False)))
    for column, centre in ((1, 8.0), (2, 30.0), (5, -40.0), (6, 50.0)):
        rows[fraud, column] = centre + rng.normal(0.0, 0.2, fraud.size)
    labels[fraud] = 1

    result = train_forest(rows, names_for(n_features), labels=labels, random_seed=22)
    assert result.training_rows == 4000 - 150
    assert result.validation_rows == 1000
    assert result.labelled_rows == int(np.sum(labels[4000:] >= 0))
    assert result.fraud_recall >= 0.95
    assert result.legitimate_flag_rate <= 0.06
    assert result.roc_auc >= 0.95
    assert result.review_rate == pytest.approx(0.06 + 0.94 * 0.02, abs=0.015)
    assert result.max_score_deviation < 1e-9
    # The calibration ignores fraud: 2% of the honest rows are at or above the threshold.
    honest = labels != 1
    assert np.mean(result.forest.score_many(rows[honest]) >= result.forest.threshold) == pytest.approx(0.02, abs=0.003)

    # The forest is exactly the one trained on the non-fraud history rows.
    history_rows = rows[:4000][labels[:4000] != 1]
    reference = IsolationForest(n_estimators=100, max_samples=256, random_state=22, contamination="auto")
    reference.fit(history_rows)
    assert np.max(np.abs(result.forest.score_many(rows) + reference.score_samples(rows))) < 1e-9
    unlabelled = train_forest(rows, names_for(n_features), random_seed=22)
    assert unlabelled.training_rows == 4000
    assert not np.allclose(unlabelled.forest.score_many(rows), result.forest.score_many(rows))


def test_train_needs_fifty_rows_of_history() -> None:
    rng = np.random.default_rng(23)
    with pytest.raises(ModelValidationError, match="not enough history: 48 training rows"):
        train_forest(rng.normal(size=(60, 3)), names_for(3))
    labels = np.full(80, -1, dtype=np.int8)
    labels[:20] = 1
    with pytest.raises(ValueError, match="not enough history: 44"):
        train_forest(rng.normal(size=(80, 3)), names_for(3), labels=labels)
    result = train_forest(rng.normal(size=(63, 3)), names_for(3), n_estimators=10)
    assert result.training_rows == 51 and result.forest.max_samples == 51


def test_train_refuses_bad_inputs() -> None:
    rng = np.random.default_rng(24)
    rows = rng.normal(size=(200, 3))
    with pytest.raises(ModelValidationError, match="shape"):
        train_forest(rows, names_for(4))
    with pytest.raises(ModelValidationError, match="labels"):
        train_forest(rows, names_for(3), labels=np.full(200, 2))
    rows[5, 1] = np.nan
    with pytest.raises(ModelValidationError, match="finite"):
        train_forest(rows, names_for(3))


# --- explanations -----------------------------------------------------------------------------------


@pytest.mark.parametrize("culprit", [0, 4])
def test_explain_ranks_the_outlying_feature_first(culprit: int) -> None:
    rng = np.random.default_rng(31 + culprit)
    rows = rng.normal(size=(3000, 6))
    forest = train_forest(rows, names_for(6), random_seed=culprit, n_estimators=100).forest
    outlier = rng.normal(size=6) * 0.3
    outlier[culprit] = 9.0
    explanation = forest.explain_one(outlier, top=6)
    assert explanation[0][0] == f"feature_{culprit}"
    assert explanation[0][1] == pytest.approx(9.0)
    assert explanation[0][2] > 0.4 > explanation[1][2] * 2
    assert sum(share for _, _, share in explanation) == pytest.approx(1.0, abs=1e-12)
    shares = [share for _, _, share in explanation]
    assert shares == sorted(shares, reverse=True)
    assert len(forest.explain_one(outlier)) == 5
    assert len(forest.explain_one(outlier, top=2)) == 2
    ordinary = forest.explain_one(rows[0], top=6)
    assert sum(share for _, _, share in ordinary) == pytest.approx(1.0, abs=1e-12)


def test_score_and_explain_many_gives_each_row_its_one_row_answer() -> None:
    """The batch path scores and explains rows all at once: the scores must be score_many's and
    every explanation exactly the one-row answer, ties, missing values (routed as scikit-learn
    does) and rows beyond one chunk included."""
    rng = np.random.default_rng(41)
    model = IsolationForest(n_estimators=60, random_state=41).fit(rng.normal(size=(2000, 5)))
    forest = compile_forest(model, names_for(5), 0.6)
    assert forest.missing_left[forest.feature >= 0].any()
    rows = np.vstack([rng.normal(size=(700, 5)) * rng.choice([0.5, 4.0], size=(700, 1)),
                      np.zeros((3, 5)), np.full((1, 5), 1e9)])
    rows[rng.random(rows.shape) < 0.02] = np.nan
    scores, many = forest.score_and_explain_many(rows, top=5)
    assert np.array_equal(scores, forest.score_many(rows))
    assert len(many) == rows.shape[0]
    for row, answer in zip(rows, many, strict=True):
        assert _same_with_nan(answer, forest.explain_one(row, top=5))
    assert [len(a) for a in forest.score_and_explain_many(rows[:4], top=2)[1]] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="shape"):
        forest.score_and_explain_many(rows[:, :4])
    with pytest.raises(ValueError, match="top"):
        forest.score_and_explain_many(rows, top=0)


def _same_with_nan(left: list[tuple[str, float, float]], right: list[tuple[str, float, float]]) -> bool:
    """Equal answers, a NaN feature value counting as equal to itself."""
    return len(left) == len(right) and all(
        a[0] == b[0] and a[2] == b[2] and (a[1] == b[1] or (math.isnan(a[1]) and math.isnan(b[1])))
        for a, b in zip(left, right, strict=True))
