"""Scoring's clients of profile (feature catalogue, feature matrix, single members) and rewards (tier
changes). The composition root owns the channels; these classes own the translation of the peers'
messages into numpy arrays and of their failures into scoring's errors.

Packed `repeated double` columns are read with np.fromiter over the container: protobuf gives no
buffer view, and this is the one copy a column costs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
import numpy as np

from libs import errors
from libs.errors import details_from_rpc_error
from loyalty.profile.v1 import feature_pb2, profile_service_pb2
from loyalty.rewards.v1 import rewards_pb2, tiers_pb2

log = logging.getLogger(__name__)
PROFILE_UNAVAILABLE = "PROFILE_UNAVAILABLE"
REWARDS_UNAVAILABLE = "REWARDS_UNAVAILABLE"
CATALOGUE_TTL_S = 60.0
_STREAM_RESUMES_MAX = 3
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED)


@dataclass
class Matrix:
    """Members (ascending ids) × features, float64, with the features' definitions."""

    member_ids: list[str]
    values: np.ndarray
    definitions: list[feature_pb2.FeatureDefinition]
    as_of: datetime
    extra: dict[str, np.ndarray]  # columns asked for beside the policy's (e.g. tenure_days)

    @property
    def size(self) -> int:
        return len(self.member_ids)


def _profile_error(error: grpc.aio.AioRpcError, what: str) -> errors.LoyaltyError:
    """Profile's refusals that are the caller's business pass through; the rest is UNAVAILABLE."""
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        reason = details_from_rpc_error(error).reason or "UNKNOWN_FEATURE"
        return errors.failed_precondition(f"profile refused the request: {error.details()}", reason=reason)
    return errors.unavailable(f"profile could not {what}; retry later", reason=PROFILE_UNAVAILABLE)


def _columns(chunk: feature_pb2.FeatureChunk, names: Sequence[str]) -> np.ndarray:
    count = len(chunk.member_ids)
    block = np.empty((count, len(names)), dtype=np.float64)
    for j, column in enumerate(chunk.columns):
        block[:, j] = np.fromiter(column.values, dtype=np.float64, count=count)
    return block


class Profile:
    def __init__(self, stub: Any, deadline_s: float) -> None:
        self._stub = stub  # generated stubs type calls as synchronous; on an aio channel they await
        self._deadline_s = deadline_s
        self._catalogue: tuple[float, dict[str, feature_pb2.FeatureDefinition], str] | None = None

    async def catalogue(self) -> tuple[dict[str, feature_pb2.FeatureDefinition], str]:
        """Profile's feature catalogue and its version, cached for a minute."""
        now = time.monotonic()
        if self._catalogue is not None and now - self._catalogue[0] < CATALOGUE_TTL_S:
            return self._catalogue[1], self._catalogue[2]
        found: dict[str, feature_pb2.FeatureDefinition] = {}
        token = ""
        try:
            while True:
                response = await self._stub.ListFeatures(
                    profile_service_pb2.ListFeaturesRequest(page_size=1000, page_token=token), timeout=self._deadline_s)
                found.update((d.name, d) for d in response.features)
                token = response.next_page_token
                if not token:
                    break
        except grpc.aio.AioRpcError as error:
            raise _profile_error(error, "list its feature catalogue") from None
        self._catalogue = (now, found, response.catalogue_version)
        return found, response.catalogue_version

    async def locale(self, member_id: str) -> str:
        """The member's language tag in profile; '' when it has none or profile cannot say (the
        caller falls back to the programme's default: a language is not worth failing a call)."""
        try:
            response = await self._stub.GetMember(profile_service_pb2.GetMemberRequest(member_id=member_id),
                                                  timeout=self._deadline_s)
        except grpc.aio.AioRpcError:
            return ""
        return str(response.member.locale)

    async def stream(self, names: Sequence[str], as_of: datetime, chunk_size: int, extra: Sequence[str] = (),
                     cancelled: Callable[[], bool] = lambda: False) -> Matrix:
        """The whole feature matrix as of `as_of`; a cut stream is resumed after the last member."""
        columns = [*names, *[e for e in extra if e not in names]]
        blocks: list[np.ndarray] = []
        ids: list[str] = []
        header: feature_pb2.FeatureMatrixHeader | None = None
        resumes = 0
        while True:
            request = profile_service_pb2.StreamFeaturesRequest(feature_names=columns, chunk_size=chunk_size,
                                                                start_after_member_id=ids[-1] if ids else "")
            request.as_of.FromDatetime(as_of)
            try:
                async for message in self._stub.StreamFeatures(request):
                    if message.HasField("header") and header is None:
                        header = message.header
                    if message.HasField("chunk") and message.chunk.member_ids:
                        ids.extend(message.chunk.member_ids)
                        blocks.append(_columns(message.chunk, columns))
                    if cancelled():
                        raise errors.failed_precondition("the run was cancelled", reason="EVALUATION_CANCELLED")
                    if message.last:
                        return self._matrix(ids, blocks, columns, names, header, as_of, extra)
            except grpc.aio.AioRpcError as error:
                if error.code() not in _TRANSIENT or resumes >= _STREAM_RESUMES_MAX:
                    raise _profile_error(error, "stream the feature matrix") from None
            resumes += 1
            log.warning("feature stream cut; resuming", extra={"after_members": len(ids), "resume": resumes})

    @staticmethod
    def _matrix(ids: list[str], blocks: list[np.ndarray], columns: list[str], names: Sequence[str],
                header: feature_pb2.FeatureMatrixHeader | None, as_of: datetime, wanted: Sequence[str] = ()) -> Matrix:
        """`wanted` extra columns are kept in Matrix.extra, also when the policy's names include them."""
        values = np.concatenate(blocks) if blocks else np.empty((0, len(columns)), dtype=np.float64)
        definitions = list(header.features) if header is not None else []
        extra = {name: values[:, columns.index(name)].copy() for name in wanted}
        policy_values = np.ascontiguousarray(values[:, :len(names)])
        return Matrix(ids, policy_values, definitions[:len(names)], as_of, extra)

    async def members(self, member_ids: Sequence[str], names: Sequence[str], as_of: datetime | None,
                      extra: Sequence[str] = ()) -> tuple[Matrix, list[str]]:
        """Features of up to 1,000 members (ascending ids) and the ids profile does not know."""
        columns = [*names, *[e for e in extra if e not in names]]
        request = profile_service_pb2.BatchGetMemberFeaturesRequest(member_ids=member_ids, feature_names=columns)
        if as_of is not None:
            request.as_of.FromDatetime(as_of)
        try:
            response = await self._stub.BatchGetMemberFeatures(request, timeout=self._deadline_s)
        except grpc.aio.AioRpcError as error:
            raise _profile_error(error, "read the member's features") from None
        block = _columns(response.chunk, columns)
        matrix = self._matrix(list(response.chunk.member_ids), [block], columns, names, response.header,
                              response.header.as_of.ToDatetime(), extra)
        return matrix, list(response.missing_member_ids)


@dataclass(frozen=True)
class Change:
    member_id: str
    from_tier_id: str
    to_tier_id: str
    direction: int  # tiers_pb2.TierChangeDirection
    reason: str


class Rewards:
    def __init__(self, stub: Any, deadline_s: float) -> None:
        self._stub = stub
        self._deadline_s = deadline_s

    async def apply(self, run_id: str, effective_at: datetime, changes: Sequence[Change]) -> None:
        """Send one chunk; rewards applies it once per (run, member), so a resend is harmless."""
        request = rewards_pb2.ApplyTierChangesRequest(evaluation_run_id=run_id, changes=[
            tiers_pb2.TierChange(member_id=c.member_id, from_tier_id=c.from_tier_id, to_tier_id=c.to_tier_id,
                                 direction=c.direction, reason=c.reason)  # type: ignore[arg-type]
            for c in changes])
        request.effective_at.FromDatetime(effective_at)
        try:
            await self._stub.ApplyTierChanges(request, timeout=self._deadline_s)
        except grpc.aio.AioRpcError as error:
            if error.code() in _TRANSIENT:
                raise errors.unavailable("rewards could not apply the tier changes; retry later",
                                         reason=REWARDS_UNAVAILABLE) from None
            raise errors.failed_precondition(f"rewards refused the tier changes: {error.details()}",
                                             reason="REWARDS_REFUSED") from None

    async def qualifying_points(self, window_start: datetime, as_of: datetime, member_ids: Sequence[str] = ()
                                ) -> tuple[list[str], np.ndarray]:
        """Members with qualifying points in [window_start, as_of) and their points (int64); the
        others have none. A cut stream is resumed after the last member received."""
        ids: list[str] = []
        blocks: list[np.ndarray] = []
        resumes = 0
        while True:
            request = rewards_pb2.StreamQualifyingPointsRequest(chunk_size=50_000, member_ids=member_ids,
                                                                 start_after_member_id=ids[-1] if ids else "")
            request.window_start.FromDatetime(window_start)
            request.as_of.FromDatetime(as_of)
            try:
                async for message in self._stub.StreamQualifyingPoints(request, timeout=self._deadline_s * 10):
                    ids.extend(message.member_ids)
                    blocks.append(np.fromiter(message.points, dtype=np.int64, count=len(message.points)))
                    if message.last:
                        return ids, np.concatenate(blocks) if blocks else np.empty(0, dtype=np.int64)
            except grpc.aio.AioRpcError as error:
                if error.code() not in _TRANSIENT or resumes >= _STREAM_RESUMES_MAX:
                    raise errors.unavailable("rewards could not export qualifying points; retry later",
                                             reason=REWARDS_UNAVAILABLE) from None
            resumes += 1
