"""The result set of an evaluation computed off the service, and its checks.

A result set is a directory: Parquet files of (member_id, score, qualifying[, tenure_days]) written by
the Spark job, and ``_run.json`` (the manifest) saying what was evaluated (policy version, as of,
feature names), how (engine, the rank error bound of its approximate quantiles) and the population's
statistics and tier thresholds. Scoring reads it back as one evaluation run: it places the members
with its own hysteresis against its own previous tiers, reports, and applies like any run.

Nothing here imports pyspark: the service reads result sets with pyarrow alone.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from services.scoring.domain import kernel

MANIFEST = "_run.json"
FORMAT = "loyalty.scoring.evaluation-results/1"
MEMBER_ID_MAX = 64
RELATIVE_ERROR_MAX = 0.01  # 1 % of members: looser quantiles are not a tier evaluation any more


class ResultsError(ValueError):
    """A result set that cannot be imported; the message says what is wrong with it."""


@dataclass(frozen=True)
class Manifest:
    policy_id: str
    version: int
    as_of: datetime
    features: tuple[str, ...]
    members: int
    engine: str  # e.g. "spark 4.3.0 local[2]"
    relative_error: float  # rank error of each approximate quantile, as a share of members
    statistics: kernel.Statistics
    thresholds: tuple[float, ...]  # minimum value of tiers 1.. (+inf: nobody reaches the tier)
    extra: tuple[str, ...] = ()  # columns carried beside the scores (tenure_days)

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "policy_id": self.policy_id, "version": self.version,
            "as_of": self.as_of.isoformat(), "features": list(self.features), "members": self.members,
            "engine": self.engine, "relative_error": self.relative_error,
            "statistics": json.loads(self.statistics.to_json()),
            # JSON has no infinity: an unreachable tier's threshold is null.
            "thresholds": [None if math.isinf(t) else t for t in self.thresholds],
            "extra": list(self.extra)}, indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ResultsError(f"{MANIFEST} is not a result set of format {FORMAT}")
            thresholds = tuple(math.inf if t is None else float(t) for t in data["thresholds"])
            manifest = cls(policy_id=str(data["policy_id"]), version=int(data["version"]),
                           as_of=datetime.fromisoformat(data["as_of"]), features=tuple(map(str, data["features"])),
                           members=int(data["members"]), engine=str(data["engine"]),
                           relative_error=float(data["relative_error"]),
                           statistics=kernel.Statistics.from_json(json.dumps(data["statistics"])),
                           thresholds=thresholds, extra=tuple(map(str, data.get("extra", []))))
        except ResultsError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise ResultsError(f"{MANIFEST} is malformed: {error}") from None
        if manifest.as_of.tzinfo is None:
            raise ResultsError(f"{MANIFEST}: as_of has no time zone")
        if manifest.members < 0 or not 0.0 <= manifest.relative_error <= RELATIVE_ERROR_MAX:
            raise ResultsError(f"{MANIFEST}: members must be >= 0 and relative_error in [0, {RELATIVE_ERROR_MAX}]")
        return manifest

    def check_against(self, spec: kernel.PolicySpec, policy_id: str, version: int) -> None:
        """Refuse a result set computed for another policy version or feature list, or whose
        thresholds could not be that policy's."""
        if (self.policy_id, self.version) != (policy_id, version):
            raise ResultsError(f"the results are for policy {self.policy_id} v{self.version}, "
                               f"not {policy_id} v{version}")
        names = tuple(f.name for f in spec.features)
        if self.features != names or [f.name for f in self.statistics.features] != list(names):
            raise ResultsError(f"the results score features {list(self.features)}, the policy {list(names)}")
        thr = np.array(self.thresholds, dtype=np.float64)
        if thr.shape != (spec.tier_count - 1,) or np.isnan(thr).any() or (np.diff(thr) < 0).any():
            raise ResultsError(f"the results hold thresholds {list(self.thresholds)}: want {spec.tier_count - 1} "
                               "non-decreasing values")
        if spec.rule is not kernel.Rule.QUANTILE and not np.array_equal(thr, kernel.thresholds(thr[:0], spec)):
            raise ResultsError("the results' thresholds are not the policy's fixed ones")


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultsError(f"{directory} holds no {MANIFEST}: not a finished result set") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ResultsError(f"{path} cannot be read: {error}") from None
    return Manifest.from_json(text)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Written last, by rename: a directory with a manifest is a finished result set."""
    temporary = directory / f".{MANIFEST}.tmp"
    temporary.write_text(manifest.to_json(), encoding="utf-8")
    temporary.replace(directory / MANIFEST)


@dataclass
class Scores:
    member_ids: list[str]
    scores: np.ndarray  # float64
    qualifying: np.ndarray  # int8; -1 under QUALIFYING_POINTS (scoring places those by points)
    extra: dict[str, np.ndarray]

    @property
    def size(self) -> int:
        return len(self.member_ids)


def read_scores(directory: Path, manifest: Manifest, spec: kernel.PolicySpec) -> Scores:
    """Every member's score in member-id order, checked: as many as the manifest says, each member
    once, finite scores, and qualifying tiers that are the thresholds' (so the files and the
    manifest belong together)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    columns = ["member_id", "score", "qualifying", *manifest.extra]
    try:
        table = ds.dataset(directory, format="parquet").to_table(columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise ResultsError(f"the score files in {directory} cannot be read: {error}") from None
    if table.num_rows != manifest.members:
        raise ResultsError(f"the score files hold {table.num_rows:,} members, the manifest says {manifest.members:,}")
    if any(table.column(c).null_count for c in columns):
        raise ResultsError("the score files hold empty (null) values")
    table = table.sort_by("member_id")
    ids = table.column("member_id").to_pylist()
    if any(not isinstance(m, str) or not m or len(m) > MEMBER_ID_MAX for m in ids):
        raise ResultsError(f"the score files hold a member id that is empty, not text or over {MEMBER_ID_MAX} "
                           "characters")
    if any(a == b for a, b in itertools.pairwise(ids)):
        raise ResultsError("the score files hold a member more than once")
    scores = table.column("score").to_numpy().astype(np.float64, copy=False)
    if not np.isfinite(scores).all():
        raise ResultsError("the score files hold a score that is not finite")
    qualifying = table.column("qualifying").to_numpy().astype(np.int8)
    thr = np.array(manifest.thresholds, dtype=np.float64)
    expected = (np.full(len(ids), -1, dtype=np.int8) if spec.rule is kernel.Rule.QUALIFYING_POINTS
                else kernel.qualify(scores, thr))
    if not np.array_equal(qualifying, expected):
        raise ResultsError("the score files' qualifying tiers do not follow from the manifest's thresholds")
    extra = {name: table.column(name).to_numpy().astype(np.float64) for name in manifest.extra}
    return Scores(member_ids=ids, scores=scores, qualifying=qualifying, extra=extra)


def describe(manifest: Manifest) -> dict[str, Any]:
    """The manifest's headline, for logs and the CLI."""
    return {"policy": f"{manifest.policy_id} v{manifest.version}", "as_of": manifest.as_of.isoformat(),
            "members": manifest.members, "engine": manifest.engine, "relative_error": manifest.relative_error}
