"""Isolation forests trained with scikit-learn, compiled into flat NumPy arrays.

scikit-learn scores one row in milliseconds (validation, a joblib dispatch and one ``apply`` call
per tree). A :class:`CompiledForest` holds every tree of the forest in a handful of flat arrays
and walks all trees at once, one vectorised step per depth level, so one row costs a few dozen
NumPy calls. The scores are the same numbers scikit-learn computes (to 1e-9, in practice to
rounding of the final sum):

- rows are cast to float32 and back, as ``tree.apply`` compares float32 features with float64
  thresholds (``x <= threshold`` goes left), and a NaN follows the node's ``missing_go_to_left``;
- each leaf holds ``depth + c(n_node_samples) - 1`` (the root has depth 1), as in
  ``IsolationForest._compute_score_samples``, and the score is
  ``2 ** -(sum over trees / (n_trees * c(max_samples)))``;
- per-tree feature indices go through ``estimators_features_`` only when scikit-learn itself
  indexes columns, i.e. when ``max_features`` is below the number of features (with all
  features, scikit-learn scores the columns as they are, whatever ``estimators_features_`` holds).

A compiled forest is stored as a NumPy ``.npz`` archive of plain arrays plus a JSON header
(never a pickle) and :meth:`CompiledForest.from_bytes` validates an archive completely before
anything scores with it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
import zipfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:  # scikit-learn is imported only to train or compile: serving never loads it
    from sklearn.ensemble import IsolationForest

FORMAT_NAME = "flat-forest-npz"
FORMAT_VERSION = 1
MAX_SCORE_DEVIATION = 1e-9
MIN_TRAINING_ROWS = 50

# The arrays of an archive, with the dtype each must have.
_ARRAY_DTYPES: dict[str, np.dtype[Any]] = {
    "header": np.dtype(np.uint8),
    "feature": np.dtype(np.int32),
    "split_threshold": np.dtype(np.float64),
    "left": np.dtype(np.int32),
    "right": np.dtype(np.int32),
    "value": np.dtype(np.float64),
    "missing_left": np.dtype(np.uint8),
    "n_samples": np.dtype(np.int32),
    "roots": np.dtype(np.int32),
}
_NODE_ARRAYS = ("feature", "split_threshold", "left", "right", "value", "missing_left", "n_samples")
_ROWS_PER_CHUNK = 64  # rows x trees index matrices that stay in L1/L2: 512 rows ran 1.6 times slower
_REFERENCE_SEED = 20240601


class ModelValidationError(ValueError):
    """A model (an archive, a fitted estimator or training data) that must not be used."""


@overload
def average_path_length(n: int) -> float: ...


@overload
def average_path_length(n: NDArray[Any]) -> NDArray[np.float64]: ...


def average_path_length(n: NDArray[Any] | int) -> NDArray[np.float64] | float:
    """c(n): the average path length of an unsuccessful search in a binary search tree of n nodes.

    The isolation forest paper's normaliser: 0 for n <= 1, 1 for n == 2, else
    ``2 (ln(n - 1) + euler_gamma) - 2 (n - 1) / n``. Same arithmetic as scikit-learn, so the
    results are bit-identical. An int gives a float, an array an array of the same shape.
    """
    samples = np.asarray(n)
    result = np.zeros(samples.shape, dtype=np.float64)
    result[samples == 2] = 1.0
    larger = samples > 2
    big = samples[larger]
    result[larger] = 2.0 * (np.log(big - 1.0) + np.euler_gamma) - 2.0 * (big - 1.0) / big
    if isinstance(n, np.ndarray):
        return result
    return float(result)


def _check_array(name: str, array: NDArray[Any], dtype: np.dtype[Any], length: int | None = None) -> None:
    if not isinstance(array, np.ndarray):
        raise ModelValidationError(f"array {name!r} is not a NumPy array")
    if array.dtype != dtype:
        raise ModelValidationError(f"array {name!r} has dtype {array.dtype}, expected {dtype}")
    if array.ndim != 1:
        raise ModelValidationError(f"array {name!r} has shape {array.shape}, expected one dimension")
    if length is not None and array.shape[0] != length:
        raise ModelValidationError(f"array {name!r} has {array.shape[0]} entries, expected {length}")


def _node_depths(nodes: dict[str, NDArray[Any]], roots: NDArray[np.int32], n_features: int,
                 max_samples: int) -> NDArray[np.int64]:
    """Check that the flat node arrays form one tree per root; returns each node's depth in edges."""
    feature, left, right = nodes["feature"], nodes["left"], nodes["right"]
    n_samples, value = nodes["n_samples"], nodes["value"]
    n_nodes = feature.shape[0]
    if n_nodes == 0:
        raise ModelValidationError("the forest has no nodes")
    for name in _NODE_ARRAYS:
        if nodes[name].shape[0] != n_nodes:
            raise ModelValidationError(
                f"array {name!r} has {nodes[name].shape[0]} entries, expected {n_nodes} (one per node)")
    n_trees = roots.shape[0]
    if n_trees == 0:
        raise ModelValidationError("the forest has no trees (roots is empty)")
    if roots[0] != 0 or np.any(np.diff(roots) <= 0) or roots[-1] >= n_nodes:
        raise ModelValidationError("roots must start at node 0, increase strictly and stay below the node count")
    starts = roots.astype(np.intp)
    ends = np.append(starts[1:], n_nodes)
    tree_end = np.repeat(ends, ends - starts)
    node_ids = np.arange(n_nodes, dtype=np.intp)

    leaf = left == -1
    internal = ~leaf
    if np.any(right[leaf] != -1) or np.any(feature[leaf] != -1):
        raise ModelValidationError("a leaf (left == -1) must have right == -1 and feature == -1")
    if np.any(nodes["missing_left"] > 1):
        raise ModelValidationError("missing_left must hold 0 or 1")
    if np.any((feature[internal] < 0) | (feature[internal] >= n_features)):
        raise ModelValidationError(f"feature index out of range: split features must be in [0, {n_features})")
    for name, children in (("left", left), ("right", right)):
        child = children[internal].astype(np.intp)
        if np.any((child < 0) | (child >= n_nodes)):
            raise ModelValidationError(f"child index out of range in {name!r}: must be a node of the forest")
        if np.any(child >= tree_end[internal]):
            raise ModelValidationError(f"child index out of range in {name!r}: a child lies outside its parent's tree")
        if np.any(child <= node_ids[internal]):
            raise ModelValidationError(f"child index in {name!r} does not come after its parent (a cycle)")
    parents = np.bincount(np.concatenate((left[internal], right[internal])).astype(np.intp), minlength=n_nodes)
    is_root = np.zeros(n_nodes, dtype=bool)
    is_root[starts] = True
    if np.any(parents[is_root] != 0) or np.any(parents[~is_root] != 1):
        raise ModelValidationError("nodes do not form trees: every node but a root needs exactly one parent")
    if not np.all(np.isfinite(nodes["split_threshold"])):
        raise ModelValidationError("non-finite split thresholds")
    if not np.all(np.isfinite(value)):
        raise ModelValidationError("non-finite leaf values")
    if np.any(n_samples < 1) or np.any(n_samples[starts] > max_samples):
        raise ModelValidationError(f"n_samples must be between 1 and max_samples ({max_samples}) in every node")
    inner = node_ids[internal]
    if np.any(n_samples[left[inner]].astype(np.int64) + n_samples[right[inner]] != n_samples[inner]):
        raise ModelValidationError("n_samples of a split must be the sum of its children's")

    # Breadth first from the roots; children come after their parents, so this ends.
    depth = np.zeros(n_nodes, dtype=np.int64)
    level = 0
    frontier = starts[internal[starts]]
    while frontier.size:
        level += 1
        children = np.concatenate((left[frontier], right[frontier])).astype(np.intp)
        depth[children] = level
        frontier = children[internal[children]]
    # sklearn counts the root as depth 1: a node adds depth + c(n_samples) - 1 to the path length.
    expected = (depth + 1) + average_path_length(n_samples.astype(np.int64)) - 1.0
    if np.any(np.abs(value - expected) > 1e-12 * np.maximum(1.0, expected)):
        raise ModelValidationError("leaf values disagree with depth + c(n_samples) - 1")
    return depth


@dataclass(frozen=True, eq=False)
class CompiledForest:
    """An isolation forest as flat arrays: all trees concatenated, node indices absolute.

    ``feature`` is the global column of each split (-1 at leaves), ``split_threshold`` its
    threshold (``x <= threshold`` goes left), ``left``/``right`` the children (-1 at leaves),
    ``missing_left`` where a NaN goes (1 = left), ``n_samples`` the training samples that reached
    each node, ``value`` the path length a leaf adds (``depth + c(n_samples) - 1``, the root at
    depth 1, checked against the structure), ``roots`` the first node of each tree, ``max_depth``
    the deepest leaf in edges and ``normaliser`` c(max_samples). Scores are in (0, 1]; the
    higher, the more anomalous; a row is flagged at or above ``threshold``.
    """

    feature_names: tuple[str, ...]
    threshold: float
    feature: NDArray[np.int32] = field(repr=False)
    split_threshold: NDArray[np.float64] = field(repr=False)
    left: NDArray[np.int32] = field(repr=False)
    right: NDArray[np.int32] = field(repr=False)
    value: NDArray[np.float64] = field(repr=False)
    missing_left: NDArray[np.uint8] = field(repr=False)
    n_samples: NDArray[np.int32] = field(repr=False)
    roots: NDArray[np.int32] = field(repr=False)
    max_depth: int
    normaliser: float
    max_samples: int

    # Traversal arrays derived from the above. Node i lives at "slot" 2*i; child[2*i + 1] is the
    # slot of the child taken when x <= threshold (left) and child[2*i] the other one, so one
    # step is ``slot = child[slot + (x[feature[slot]] <= threshold[slot])]``. Leaves loop on
    # themselves, so walking max_depth steps lands every tree on its leaf without masks.
    _feature2: NDArray[np.intp] = field(init=False, repr=False)
    _threshold2: NDArray[np.float64] = field(init=False, repr=False)
    _child2: NDArray[np.intp] = field(init=False, repr=False)
    _value2: NDArray[np.float64] = field(init=False, repr=False)
    _missing2: NDArray[np.bool_] = field(init=False, repr=False)
    _bits2: NDArray[np.float64] = field(init=False, repr=False)
    _root2: NDArray[np.intp] = field(init=False, repr=False)
    _any_missing_left: bool = field(init=False, repr=False)
    _denominator: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = self.feature_names
        if not isinstance(names, tuple) or not names or not all(isinstance(n, str) and n for n in names):
            raise ModelValidationError("feature_names must be a non-empty tuple of non-empty strings")
        if len(set(names)) != len(names):
            raise ModelValidationError("feature_names must be unique")
        _check_threshold(self.threshold)
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 2:
            raise ModelValidationError("max_samples must be an integer of at least 2")
        normaliser = self.normaliser
        if not isinstance(normaliser, float) or not math.isfinite(normaliser) or normaliser <= 0:
            raise ModelValidationError(f"normaliser must be a finite number > 0, got {normaliser!r}")
        expected = average_path_length(self.max_samples)
        if abs(normaliser - expected) > 1e-12 * expected:
            raise ModelValidationError(
                f"normaliser {normaliser!r} is not c(max_samples={self.max_samples}) = {expected!r}")
        for name in _NODE_ARRAYS:
            _check_array(name, getattr(self, name), _ARRAY_DTYPES[name])
        _check_array("roots", self.roots, _ARRAY_DTYPES["roots"])
        node_depth = _node_depths({name: getattr(self, name) for name in _NODE_ARRAYS}, self.roots, len(names),
                                  self.max_samples)
        depth = int(node_depth.max())
        if isinstance(self.max_depth, bool) or not isinstance(self.max_depth, int) or self.max_depth != depth:
            raise ModelValidationError(f"max_depth is {self.max_depth!r} but the deepest leaf is at depth {depth}")

        def frozen(array: NDArray[Any]) -> NDArray[Any]:
            array.setflags(write=False)
            return array

        for name in (*_NODE_ARRAYS, "roots"):
            object.__setattr__(self, name, frozen(np.array(getattr(self, name))))

        n_nodes = self.feature.shape[0]
        nodes = np.arange(n_nodes, dtype=np.intp)
        leaf = self.left == -1
        left = np.where(leaf, nodes, self.left.astype(np.intp))
        right = np.where(leaf, nodes, self.right.astype(np.intp))
        child2 = np.empty(2 * n_nodes, dtype=np.intp)
        child2[0::2] = 2 * right
        child2[1::2] = 2 * left
        # What a step from node i to its child teaches about the row: log2(n(i) / n(child)) bits.
        n_samples = self.n_samples.astype(np.float64)
        bits2 = np.zeros(2 * n_nodes, dtype=np.float64)
        bits2[0::2] = np.where(leaf, 0.0, np.log2(n_samples / n_samples[right]))
        bits2[1::2] = np.where(leaf, 0.0, np.log2(n_samples / n_samples[left]))
        derived: dict[str, Any] = {
            "_feature2": np.repeat(np.where(leaf, 0, self.feature).astype(np.intp), 2),
            "_threshold2": np.repeat(np.where(leaf, 0.0, self.split_threshold), 2),
            "_child2": child2,
            "_value2": np.repeat(self.value, 2),
            "_missing2": np.repeat(self.missing_left.astype(bool), 2),
            "_bits2": bits2,
            "_root2": 2 * self.roots.astype(np.intp),
            "_any_missing_left": bool(np.any(self.missing_left[~leaf])),
            "_denominator": self.roots.shape[0] * normaliser,
        }
        for name, value in derived.items():
            if isinstance(value, np.ndarray):
                value = frozen(value)
            object.__setattr__(self, name, value)

    @property
    def n_estimators(self) -> int:
        return int(self.roots.shape[0])

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    # --- scoring -------------------------------------------------------------------------------

    def _row(self, row: Sequence[float] | NDArray[Any]) -> NDArray[np.float64]:
        x = np.asarray(row, dtype=np.float32)
        if x.shape != (len(self.feature_names),):
            raise ValueError(f"expected one row of {len(self.feature_names)} features, got shape {x.shape}")
        return x.astype(np.float64)

    def _leaf_slots(self, x: NDArray[np.float64]) -> NDArray[np.intp]:
        """The slot of the leaf each tree sends row x to."""
        feature, threshold, child = self._feature2, self._threshold2, self._child2
        slots = self._root2
        if self._any_missing_left and np.isnan(x).any():
            missing = self._missing2
            for _ in range(self.max_depth):
                values = x[feature[slots]]
                goes_left = np.where(np.isnan(values), missing[slots], values <= threshold[slots])
                slots = child[slots + goes_left]
            return slots
        # Plain indexing beats .take() on arrays this short (one entry per tree).
        for _ in range(self.max_depth):
            slots = child[slots + (x[feature[slots]] <= threshold[slots])]
        return slots

    def score_one(self, row: Sequence[float] | NDArray[Any]) -> float:
        """The anomaly score of one row, in (0, 1]: ``-IsolationForest.score_samples([row])[0]``."""
        total = float(self._value2[self._leaf_slots(self._row(row))].sum())
        return float(2.0 ** (-total / self._denominator))

    def score_many(self, rows: NDArray[Any]) -> NDArray[np.float64]:
        """Anomaly scores of rows of shape (n, n_features), the vectorised form of :meth:`score_one`."""
        matrix = np.asarray(rows, dtype=np.float32)
        n_features = len(self.feature_names)
        if matrix.ndim != 2 or matrix.shape[1] != n_features:
            raise ValueError(f"expected rows of shape (n, {n_features}), got {matrix.shape}")
        totals = np.empty(matrix.shape[0], dtype=np.float64)
        feature, threshold, child, missing = self._feature2, self._threshold2, self._child2, self._missing2
        for start in range(0, matrix.shape[0], _ROWS_PER_CHUNK):
            chunk = matrix[start:start + _ROWS_PER_CHUNK].astype(np.float64)
            flat = chunk.ravel()
            offsets = (np.arange(chunk.shape[0], dtype=np.intp) * n_features)[:, None]
            slots = np.broadcast_to(self._root2, (chunk.shape[0], self._root2.shape[0]))
            with_missing = self._any_missing_left and bool(np.isnan(chunk).any())
            for _ in range(self.max_depth):
                values = flat.take(feature.take(slots) + offsets)
                goes_left = values <= threshold.take(slots)
                if with_missing:
                    goes_left = np.where(np.isnan(values), missing.take(slots), goes_left)
                slots = child.take(slots + goes_left)
            totals[start:start + chunk.shape[0]] = self._value2.take(slots).sum(axis=1)
        result: NDArray[np.float64] = np.power(2.0, -totals / self._denominator)
        return result

    def explain_one(self, row: Sequence[float] | NDArray[Any], top: int = 5) -> list[tuple[str, float, float]]:
        """The features that make this row's score, as (name, value, share), largest share first.

        Method: an isolation tree scores a row by how quickly random splits cut it off from the
        training sample. On the row's path from root to leaf, each split narrows the row's
        company from ``n(node)`` to ``n(child taken)`` training samples; the split's feature is
        credited ``log2(n(node) / n(child taken))`` bits. A split that leaves the row on the
        crowded side earns almost nothing, one that cuts it away from most of the sample earns a
        lot, and a tree's credits add up to ``log2(n(root) / n(leaf))``. Each tree's credits are
        weighted by its own anomaly score ``2 ** -(path length / c(max_samples))``, so trees that
        isolate the row in a few splits count more than trees where it sinks deep into the crowd.
        Shares are normalised to sum to 1 over all features (uniform when no tree splits at all);
        ``top`` limits how many are returned. NaN values follow the same routes as in scoring.
        """
        if top < 1:
            raise ValueError("top must be at least 1")
        original = np.asarray(row, dtype=np.float64)
        x = self._row(row)
        feature, threshold, child, missing = self._feature2, self._threshold2, self._child2, self._missing2
        with_missing = self._any_missing_left and bool(np.isnan(x).any())
        slots = self._root2
        n_features = len(self.feature_names)
        path: list[tuple[NDArray[np.intp], NDArray[np.float64]]] = []
        for _ in range(self.max_depth):
            features = feature.take(slots)
            values = x.take(features)
            goes_left = values <= threshold.take(slots)
            if with_missing:
                goes_left = np.where(np.isnan(values), missing.take(slots), goes_left)
            taken = slots + goes_left
            path.append((features, self._bits2.take(taken)))  # leaves loop with 0 bits
            slots = child.take(taken)
        tree_weight = np.power(2.0, -self._value2.take(slots) / self.normaliser)
        credit = np.zeros(n_features, dtype=np.float64)
        for features, bits in path:
            credit += np.bincount(features, weights=bits * tree_weight, minlength=n_features)
        total = credit.sum()
        shares = credit / total if total > 0 else np.full(n_features, 1.0 / n_features)
        order = sorted(range(n_features), key=lambda i: (-shares[i], i))
        return [(self.feature_names[i], float(original[i]), float(shares[i])) for i in order[:top]]

    def score_and_explain_many(self, rows: NDArray[Any], top: int = 5
                               ) -> tuple[NDArray[np.float64], list[list[tuple[str, float, float]]]]:
        """:meth:`score_many` and :meth:`explain_one` of each row of shape (n, n_features), from one
        walk of the trees for all rows at once: the scores are those of :meth:`score_many` (same
        leaves, same sum) and each explanation equals the one-row answer (the same additions in the
        same order)."""
        if top < 1:
            raise ValueError("top must be at least 1")
        original = np.asarray(rows, dtype=np.float64)
        n_features = len(self.feature_names)
        if original.ndim != 2 or original.shape[1] != n_features:
            raise ValueError(f"expected rows of shape (n, {n_features}), got {original.shape}")
        feature, threshold, child, missing = self._feature2, self._threshold2, self._child2, self._missing2
        answers: list[list[tuple[str, float, float]]] = []
        path_totals = np.empty(original.shape[0], dtype=np.float64)
        for start in range(0, original.shape[0], _ROWS_PER_CHUNK):
            chunk = np.asarray(original[start:start + _ROWS_PER_CHUNK], dtype=np.float32).astype(np.float64)
            n = chunk.shape[0]
            flat = chunk.ravel()
            offsets = (np.arange(n, dtype=np.intp) * n_features)[:, None]
            slots = np.broadcast_to(self._root2, (n, self._root2.shape[0]))
            with_missing = self._any_missing_left and bool(np.isnan(chunk).any())
            path: list[tuple[NDArray[np.intp], NDArray[np.float64]]] = []
            for _ in range(self.max_depth):
                features = feature.take(slots) + offsets
                values = flat.take(features)
                goes_left = values <= threshold.take(slots)
                if with_missing:
                    goes_left = np.where(np.isnan(values), missing.take(slots), goes_left)
                taken = slots + goes_left
                path.append((features, self._bits2.take(taken)))
                slots = child.take(taken)
            leaves = self._value2.take(slots)
            path_totals[start:start + n] = leaves.sum(axis=1)
            tree_weight = np.power(2.0, -leaves / self.normaliser)
            credit = np.zeros(n * n_features, dtype=np.float64)
            for features, bits in path:
                credit += np.bincount(features.ravel(), weights=(bits * tree_weight).ravel(), minlength=n * n_features)
            credit = credit.reshape(n, n_features)
            totals = credit.sum(axis=1)
            shares = np.where(totals[:, None] > 0, credit / np.where(totals > 0, totals, 1.0)[:, None],
                              1.0 / n_features)
            order = np.argsort(-shares, axis=1, kind="stable")[:, :top]
            rows_taken = np.arange(n)[:, None]
            # Python numbers in one conversion per array, not one float() per entry.
            picked_values = original[start:start + n][rows_taken, order].tolist()
            picked_shares = shares[rows_taken, order].tolist()
            names = self.feature_names
            for indices, values, row_shares in zip(order.tolist(), picked_values, picked_shares, strict=True):
                answers.append([(names[i], v, share) for i, v, share in zip(indices, values, row_shares, strict=True)])
        scores: NDArray[np.float64] = np.power(2.0, -path_totals / self._denominator)
        return scores, answers

    def flags(self, score: float) -> bool:
        return score >= self.threshold

    def with_threshold(self, threshold: float) -> CompiledForest:
        return dataclasses.replace(self, threshold=threshold)

    # --- storage ---------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """A NumPy .npz archive: the flat arrays and a JSON header (UTF-8 bytes in a uint8 array)."""
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "feature_names": list(self.feature_names),
            "threshold": self.threshold,
            "n_estimators": self.n_estimators,
            "max_samples": self.max_samples,
            "normaliser": self.normaliser,
            "max_depth": self.max_depth,
            "n_nodes": int(self.feature.shape[0]),
        }
        buffer = io.BytesIO()
        np.savez(
            buffer,
            header=np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8),
            feature=self.feature, split_threshold=self.split_threshold, left=self.left, right=self.right,
            value=self.value, missing_left=self.missing_left, n_samples=self.n_samples, roots=self.roots,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, content: bytes, known_features: Collection[str] | None = None) -> CompiledForest:
        """Load an archive written by :meth:`to_bytes`, refusing anything that is not exactly that.

        Checks the archive (npz, the expected arrays and nothing else, no pickled objects), dtypes
        and shapes, the header, the features against ``known_features``, the tree structure, then
        scores reference rows and refuses scores that are not finite or not in (0, 1].
        Raises :class:`ModelValidationError` saying what is wrong.
        """
        arrays = _read_archive(content)
        header = _read_header(arrays.pop("header"))
        names = header["feature_names"]
        if known_features is not None:
            unknown = [name for name in names if name not in known_features]
            if unknown:
                raise ModelValidationError(f"unknown feature names: {', '.join(unknown)}")
        n_nodes = header["n_nodes"]
        for name in _NODE_ARRAYS:
            _check_array(name, arrays[name], _ARRAY_DTYPES[name], n_nodes)
        _check_array("roots", arrays["roots"], _ARRAY_DTYPES["roots"], header["n_estimators"])
        forest = cls(
            feature_names=tuple(names), threshold=header["threshold"], feature=arrays["feature"],
            split_threshold=arrays["split_threshold"], left=arrays["left"], right=arrays["right"],
            value=arrays["value"], missing_left=arrays["missing_left"], n_samples=arrays["n_samples"],
            roots=arrays["roots"],
            max_depth=header["max_depth"], normaliser=header["normaliser"], max_samples=header["max_samples"],
        )
        forest.check_reference_scores()
        return forest

    def check_reference_scores(self) -> None:
        """Score zeros, ones and seeded random rows; refuse non-finite scores or scores outside (0, 1]."""
        n_features = len(self.feature_names)
        rng = np.random.default_rng(_REFERENCE_SEED)
        rows = np.vstack((np.zeros(n_features), np.ones(n_features), rng.normal(0.0, 3.0, (14, n_features))))
        scores = np.append(self.score_many(rows), [self.score_one(row) for row in rows[:2]])
        if not np.all(np.isfinite(scores)):
            raise ModelValidationError("reference rows score non-finite values")
        if np.any(scores <= 0) or np.any(scores > 1):
            raise ModelValidationError("reference rows score outside (0, 1]")


def _check_threshold(threshold: object) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, float | int):
        raise ModelValidationError(f"threshold must be a number, got {threshold!r}")
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ModelValidationError(f"threshold must be in [0, 1], got {threshold!r}")


def _read_archive(content: bytes) -> dict[str, NDArray[Any]]:
    if not isinstance(content, bytes | bytearray | memoryview):
        raise ModelValidationError("model content must be bytes")
    if not bytes(content[:4]) == b"PK\x03\x04":
        raise ModelValidationError("not an npz archive (no zip signature)")
    try:
        archive = np.load(io.BytesIO(content), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise ModelValidationError(f"not an npz archive: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ModelValidationError("not an npz archive")
    with archive:
        present = set(archive.files)
        missing = sorted(set(_ARRAY_DTYPES) - present)
        if missing:
            raise ModelValidationError(f"missing arrays: {', '.join(missing)}")
        unexpected = sorted(present - set(_ARRAY_DTYPES))
        if unexpected:
            raise ModelValidationError(f"unexpected arrays: {', '.join(unexpected)}")
        arrays: dict[str, NDArray[Any]] = {}
        for name in _ARRAY_DTYPES:
            try:
                arrays[name] = archive[name]
            except ValueError as exc:
                if "pickle" in str(exc).lower():
                    raise ModelValidationError(f"array {name!r} holds pickled Python objects; refused") from exc
                raise ModelValidationError(f"array {name!r} is unreadable: {exc}") from exc
            except (OSError, EOFError, KeyError, zipfile.BadZipFile, NotImplementedError) as exc:
                raise ModelValidationError(f"array {name!r} is unreadable (truncated or corrupt): {exc}") from exc
    return arrays


def _read_header(array: NDArray[Any]) -> dict[str, Any]:
    _check_array("header", array, _ARRAY_DTYPES["header"])
    try:
        header = json.loads(array.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelValidationError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelValidationError("header JSON must be an object")
    if header.get("format") != FORMAT_NAME:
        raise ModelValidationError(f"header format is {header.get('format')!r}, expected {FORMAT_NAME!r}")
    version = header.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ModelValidationError(f"unsupported format version {version!r} (this code reads {FORMAT_VERSION})")

    def integer(key: str) -> int:
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ModelValidationError(f"header field {key!r} must be a non-negative integer, got {value!r}")
        return value

    def number(key: str) -> float:
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ModelValidationError(f"header field {key!r} must be a number, got {value!r}")
        return float(value)

    names = header.get("feature_names")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ModelValidationError("header field 'feature_names' must be a list of strings")
    threshold = number("threshold")
    _check_threshold(threshold)
    return {
        "feature_names": names, "threshold": threshold, "n_estimators": integer("n_estimators"),
        "max_samples": integer("max_samples"), "normaliser": number("normaliser"),
        "max_depth": integer("max_depth"), "n_nodes": integer("n_nodes"),
    }


def compile_forest(model: IsolationForest, feature_names: Sequence[str], threshold: float) -> CompiledForest:
    """Flatten a fitted IsolationForest (its columns named ``feature_names``) into a CompiledForest."""
    from sklearn.ensemble import IsolationForest

    if not isinstance(model, IsolationForest) or not hasattr(model, "estimators_"):
        raise ModelValidationError("expected a fitted sklearn.ensemble.IsolationForest")
    n_features = int(model.n_features_in_)
    if len(feature_names) != n_features:
        raise ModelValidationError(f"the model has {n_features} features but {len(feature_names)} names were given")
    # scikit-learn indexes columns per tree only when the trees see fewer than all features
    # (IsolationForest never bootstraps features); otherwise trees use the columns as they are.
    max_features = int(getattr(model, "_max_features", n_features))
    subsample_features = max_features != n_features

    parts: dict[str, list[NDArray[Any]]] = {name: [] for name in _NODE_ARRAYS}
    roots: list[int] = []
    max_depth = 0
    offset = 0
    for estimator, columns in zip(model.estimators_, model.estimators_features_, strict=True):
        tree = estimator.tree_
        left = np.asarray(tree.children_left, dtype=np.int64)
        right = np.asarray(tree.children_right, dtype=np.int64)
        leaf = left == -1
        local = np.asarray(tree.feature, dtype=np.int64)
        mapped = np.asarray(columns, dtype=np.int64)[np.where(leaf, 0, local)] if subsample_features else local
        depths = np.asarray(tree.compute_node_depths(), dtype=np.int64)  # the root is at depth 1
        n_samples = np.asarray(tree.n_node_samples, dtype=np.int64)
        roots.append(offset)
        max_depth = max(max_depth, int(depths.max()) - 1)
        parts["feature"].append(np.where(leaf, -1, mapped))
        parts["split_threshold"].append(np.asarray(tree.threshold, dtype=np.float64))
        parts["left"].append(np.where(leaf, -1, left + offset))
        parts["right"].append(np.where(leaf, -1, right + offset))
        # The same expression as sklearn's _parallel_compute_tree_depths, so the same floats.
        parts["value"].append(depths + average_path_length(n_samples) - 1.0)
        parts["missing_left"].append(np.asarray(tree.missing_go_to_left, dtype=np.uint8))
        parts["n_samples"].append(n_samples)
        offset += int(tree.node_count)
    if offset >= np.iinfo(np.int32).max:
        raise ModelValidationError("the forest is too large for 32-bit node indices")
    max_samples = int(model.max_samples_)
    if max_samples < 2:
        raise ModelValidationError("max_samples must be at least 2 (a forest of one sample scores nothing)")
    arrays = {name: np.concatenate(parts[name]).astype(_ARRAY_DTYPES[name]) for name in _NODE_ARRAYS}
    return CompiledForest(
        feature_names=tuple(feature_names), threshold=float(threshold), **arrays,
        roots=np.asarray(roots, dtype=np.int32), max_depth=max_depth,
        normaliser=float(average_path_length(max_samples)), max_samples=max_samples,
    )


@dataclass(frozen=True, eq=False)
class TrainingResult:
    """A trained, calibrated forest and how it does on the out-of-time validation rows."""

    forest: CompiledForest
    sklearn_scores_validation: NDArray[np.float64] = field(repr=False)
    training_rows: int
    validation_rows: int
    labelled_rows: int
    review_rate: float
    fraud_recall: float
    legitimate_flag_rate: float
    roc_auc: float
    max_score_deviation: float
    p50_score_micros: float


def _roc_auc(scores: NDArray[np.float64], positive: NDArray[np.bool_]) -> float:
    """Mann-Whitney AUC with tied scores sharing their average rank."""
    n_pos = int(positive.sum())
    n_neg = int(positive.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        return 0.0
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _share(flags: NDArray[np.bool_]) -> float:
    return float(flags.mean()) if flags.size else 0.0


def train_forest(
    rows: NDArray[Any], feature_names: Sequence[str], *, labels: NDArray[Any] | None = None,
    n_estimators: int = 100, max_samples: int = 256, random_seed: int = 0,
    target_review_rate: float = 0.02, validation_share: float = 0.2,
) -> TrainingResult:
    """Train an isolation forest on time-ordered rows, compile it and calibrate its threshold.

    The last ``validation_share`` of the rows is held out (out of time); the rest trains, minus
    rows labelled fraud (``labels``: 1 fraud, 0 legitimate, -1 unlabelled). The threshold is the
    (1 - ``target_review_rate``) quantile of the compiled scores of all non-fraud rows (training
    and validation), clamped into (0, 1]. ``labelled_rows`` counts the labelled validation rows,
    the ones fraud_recall, legitimate_flag_rate and roc_auc are measured on (roc_auc is 0.0 below
    10 such rows or with one class). The compiled scores must match scikit-learn's to 1e-9 on the
    validation rows (on the training rows when there are none) or ModelValidationError is raised.
    """
    matrix = np.asarray(rows, dtype=np.float64)
    names = tuple(feature_names)
    if matrix.ndim != 2 or matrix.shape[1] != len(names):
        raise ModelValidationError(f"rows must have shape (n, {len(names)}), got {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ModelValidationError("training rows must be finite (no NaN or infinity)")
    n_rows = matrix.shape[0]
    if labels is None:
        label = np.full(n_rows, -1, dtype=np.int8)
    else:
        label = np.asarray(labels)
        if label.shape != (n_rows,) or not np.all(np.isin(label, (-1, 0, 1))):
            raise ModelValidationError("labels must have one entry per row, each -1, 0 or 1")
        label = label.astype(np.int8)
    if not 0.0 <= validation_share < 1.0:
        raise ModelValidationError(f"validation_share must be in [0, 1), got {validation_share}")
    if not 0.0 < target_review_rate < 1.0:
        raise ModelValidationError(f"target_review_rate must be in (0, 1), got {target_review_rate}")
    if n_estimators < 1 or max_samples < 2:
        raise ModelValidationError("n_estimators must be at least 1 and max_samples at least 2")

    n_validation = int(n_rows * validation_share)
    n_history = n_rows - n_validation
    fraud = label == 1
    train_mask = ~fraud[:n_history]
    training = matrix[:n_history][train_mask]
    if training.shape[0] < MIN_TRAINING_ROWS:
        raise ModelValidationError(
            f"not enough history: {training.shape[0]} training rows (non-fraud, before the validation part), "
            f"at least {MIN_TRAINING_ROWS} needed")

    from sklearn.ensemble import IsolationForest

    model = IsolationForest(n_estimators=n_estimators, max_samples=min(max_samples, training.shape[0]),
                            random_state=random_seed, contamination="auto")
    model.fit(training)
    forest = compile_forest(model, names, 1.0)

    honest_scores = forest.score_many(matrix[~fraud])
    threshold = float(np.quantile(honest_scores, 1.0 - target_review_rate))
    threshold = min(1.0, max(threshold, float(np.nextafter(0.0, 1.0))))
    forest = forest.with_threshold(threshold)

    validation = matrix[n_history:]
    validation_label = label[n_history:]
    compiled_validation = forest.score_many(validation)
    sklearn_validation = -np.asarray(model.score_samples(validation), dtype=np.float64)
    checked_rows = validation if n_validation else training
    compiled_checked = compiled_validation if n_validation else forest.score_many(training)
    sklearn_checked = sklearn_validation if n_validation else -np.asarray(model.score_samples(training))
    deviation = float(np.max(np.abs(compiled_checked - sklearn_checked))) if checked_rows.shape[0] else 0.0
    if not deviation < MAX_SCORE_DEVIATION:
        raise ModelValidationError(f"compiled scores deviate from scikit-learn's by {deviation:.3g} (limit 1e-9)")

    flagged = compiled_validation >= threshold
    is_fraud = validation_label == 1
    is_legitimate = validation_label == 0
    labelled = is_fraud | is_legitimate
    n_labelled = int(labelled.sum())
    roc_auc = _roc_auc(compiled_validation[labelled], is_fraud[labelled]) if n_labelled >= 10 else 0.0

    timing_rows = checked_rows[:200]
    for row in timing_rows[:10]:
        forest.score_one(row)
    timings = []
    for row in timing_rows:
        started = time.perf_counter_ns()
        forest.score_one(row)
        timings.append(time.perf_counter_ns() - started)

    return TrainingResult(
        forest=forest,
        sklearn_scores_validation=sklearn_validation,
        training_rows=int(training.shape[0]),
        validation_rows=int(n_validation),
        labelled_rows=n_labelled,
        review_rate=_share(flagged),
        fraud_recall=_share(flagged[is_fraud]),
        legitimate_flag_rate=_share(flagged[is_legitimate]),
        roc_auc=roc_auc,
        max_score_deviation=deviation,
        p50_score_micros=float(np.median(timings)) / 1000.0 if timings else 0.0,
    )
