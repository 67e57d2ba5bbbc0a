"""What the learning use cases share: feature-name checks, seeds, samples, member alignment."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
from google.protobuf import duration_pb2, timestamp_pb2

from libs import errors
from libs.errors import FieldViolation
from services.scoring.adapters.peers import Profile
from services.scoring.domain import policy as rules

SAMPLE_SIZE_DEFAULT = 200_000  # members sampled for training when a request names no size
SEED_MODULUS = 2**32  # numpy's and scikit-learn's seeds are unsigned 32-bit


def seed_of(random_seed: int) -> int:
    """The request's int64 seed as a seed numpy and scikit-learn accept."""
    return random_seed % SEED_MODULUS


def sample_rows(candidates: np.ndarray, size: int, seed: int) -> np.ndarray:
    """At most `size` of the candidate row indices, drawn without replacement, in ascending order."""
    if candidates.size <= size:
        return candidates
    return np.sort(np.random.default_rng(seed).choice(candidates, size=size, replace=False))


def align(left: Sequence[str], right: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the members found on both sides: (rows in left, rows in right), in left's order. A
    dict, not a merge of the sorted lists: profile sorts ids in PostgreSQL's collation, which need
    not be Python's order."""
    index = dict(zip(right, range(len(right)), strict=True))
    positions = np.fromiter((index.get(m, -1) for m in left), dtype=np.int64, count=len(left))
    found = np.flatnonzero(positions >= 0)
    return found, positions[found]


async def check_feature_names(profile: Profile, names: Sequence[str], field: str) -> str:
    """INVALID_ARGUMENT with a violation per protected or unknown name (reason PROTECTED_ATTRIBUTE
    when any is protected, else UNKNOWN_FEATURE); the catalogue version otherwise."""
    catalogue, version = await profile.catalogue()
    protected: list[FieldViolation] = []
    unknown: list[FieldViolation] = []
    for i, name in enumerate(names):
        if rules.is_protected(name):
            protected.append(FieldViolation(f"{field}[{i}]", f"{name!r} is a protected attribute: never a feature"))
        elif rules.resolve_feature(name, catalogue) is None:
            unknown.append(FieldViolation(f"{field}[{i}]", f"{name!r} is not in profile's feature catalogue"))
    if protected or unknown:
        raise errors.invalid_argument(protected + unknown,
                                      reason="PROTECTED_ATTRIBUTE" if protected else "UNKNOWN_FEATURE")
    return version


def not_enough_history(message: str) -> errors.LoyaltyError:
    return errors.failed_precondition(message, reason="NOT_ENOUGH_HISTORY")


def timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(at)
    return message


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(timedelta(seconds=seconds))
    return message


def utc(message: timestamp_pb2.Timestamp) -> datetime:
    return message.ToDatetime(tzinfo=UTC)
