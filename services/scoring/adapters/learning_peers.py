"""What the learning RPCs read from profile beside the feature matrix (profiling consent, the members'
group attributes, the sparse member × category matrix) and what they send to rewards (segment
assignments). The evaluation runs' clients (peers.py) drop those parts of a chunk; these keep them.

Both classes wrap the stubs of peers.Profile and peers.Rewards (the composition root builds those),
so the learning RPCs share their channels and deadlines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
import numpy as np
from scipy import sparse

from libs import errors
from libs.errors import details_from_rpc_error
from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import feature_pb2, profile_service_pb2
from loyalty.rewards.v1 import rewards_pb2, tiers_pb2
from services.scoring.adapters.peers import _TRANSIENT, REWARDS_UNAVAILABLE, _columns, _profile_error

log = logging.getLogger(__name__)
_STREAM_RESUMES_MAX = 6
_CHUNK_TOO_LARGE = "CHUNK_TOO_LARGE"
ASSIGN_CHUNK_MAX = 1000  # rewards' AssignMemberSegments limit
ASSIGN_ATTEMPTS = 4
ASSIGN_BACKOFF_S = 0.2
PURCHASES_CALLS_IN_FLIGHT = 16


@dataclass
class GroupAttributes:
    """Fairness groupings per member, aligned with Population.member_ids."""

    channels: np.ndarray  # int64, loyalty.common.v1.Channel
    regions: np.ndarray  # str objects, "" unknown
    genders: np.ndarray  # int64, loyalty.profile.v1.Gender
    age_bands: np.ndarray  # int64, loyalty.profile.v1.AgeBand
    tenure_days: np.ndarray  # int64


@dataclass
class Population:
    """Members (profile's order) × features as of a time, with what the learning RPCs need beside."""

    member_ids: list[str]
    values: np.ndarray  # (n, f) float64, columns in `names` order
    names: list[str]
    definitions: list[feature_pb2.FeatureDefinition]
    consent: np.ndarray  # (n,) bool: profiling consent
    as_of: datetime
    groups: GroupAttributes | None = None
    categories: sparse.csr_matrix | None = None  # (n, len(vocabulary))
    vocabulary: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.member_ids)

    def columns(self, names: Sequence[str]) -> np.ndarray:
        """The (n, len(names)) matrix of these features, in this order."""
        index = {name: j for j, name in enumerate(self.names)}
        return np.ascontiguousarray(self.values[:, [index[n] for n in names]])

    def defaults(self, names: Sequence[str]) -> np.ndarray:
        """The catalogue's value for a member without data, per feature."""
        by_name = {d.name: d.default_value for d in self.definitions}
        return np.array([by_name.get(n, 0.0) for n in names], dtype=np.float64)


class _Blocks:
    """A stream's chunks as they arrive (a resumed stream adds to them)."""

    def __init__(self, names: Sequence[str], groups: bool) -> None:
        self.names = list(names)
        self.groups = groups
        self.ids: list[str] = []
        self.values: list[np.ndarray] = []
        self.consent: list[np.ndarray] = []
        self.attributes: list[tuple[np.ndarray, ...]] = []
        self.category_rows: list[np.ndarray] = []  # non-zeros per member
        self.category_indices: list[np.ndarray] = []  # into `vocabulary`
        self.category_values: list[np.ndarray] = []
        self.vocabulary: dict[str, int] = {}
        self.definitions: list[feature_pb2.FeatureDefinition] = []

    def header(self, header: feature_pb2.FeatureMatrixHeader) -> np.ndarray:
        """Take a (re)sent header; the map of its category columns into the stream's vocabulary (a
        resumed stream may list categories added meanwhile, in other positions)."""
        if not self.definitions:
            self.definitions = list(header.features)
        return np.array([self.vocabulary.setdefault(c, len(self.vocabulary)) for c in header.category_vocabulary],
                        dtype=np.int64)

    def add(self, chunk: feature_pb2.FeatureChunk, category_map: np.ndarray | None) -> None:
        count = len(chunk.member_ids)
        self.ids.extend(chunk.member_ids)
        self.values.append(_columns(chunk, self.names))
        consent = np.fromiter(chunk.profiling_consent, dtype=bool, count=len(chunk.profiling_consent))
        self.consent.append(consent if consent.size == count else np.zeros(count, dtype=bool))
        if self.groups:
            g = chunk.group_attributes
            self.attributes.append((np.fromiter(g.channels, dtype=np.int64, count=count),
                                    np.array(list(g.regions), dtype=object),
                                    np.fromiter(g.genders, dtype=np.int64, count=count),
                                    np.fromiter(g.age_bands, dtype=np.int64, count=count),
                                    np.fromiter(g.tenure_days, dtype=np.int64, count=count)))
        if category_map is not None:
            matrix = chunk.category_matrix
            offsets = np.fromiter(matrix.row_offsets, dtype=np.int64, count=len(matrix.row_offsets))
            if offsets.size != count + 1:
                offsets = np.zeros(count + 1, dtype=np.int64)  # no rows sent: no category for anyone
            local = np.fromiter(matrix.category_indices, dtype=np.int64, count=len(matrix.category_indices))
            self.category_rows.append(np.diff(offsets))
            self.category_indices.append(category_map[local] if local.size else local)
            self.category_values.append(np.fromiter(matrix.values, dtype=np.float64, count=len(matrix.values)))

    def population(self, as_of: datetime, categories: bool) -> Population:
        n, f = len(self.ids), len(self.names)
        values = np.concatenate(self.values) if self.values else np.empty((0, f))
        consent = np.concatenate(self.consent) if self.consent else np.empty(0, dtype=bool)
        assert values.shape == (n, f)
        assert consent.shape == (n,)
        population = Population(self.ids, values, self.names, self.definitions[:f], consent, as_of)
        if self.groups:
            parts = list(zip(*self.attributes, strict=True)) if self.attributes else [()] * 5
            columns = [np.concatenate(p) if p else np.empty(0, dtype=object if i == 1 else np.int64)
                       for i, p in enumerate(parts)]
            assert all(c.shape == (n,) for c in columns), "group attribute columns must have one value per member"
            population.groups = GroupAttributes(*columns)
        if categories:
            vocabulary = sorted(self.vocabulary, key=self.vocabulary.__getitem__)
            rows = np.concatenate(self.category_rows) if self.category_rows else np.zeros(n, dtype=np.int64)
            indptr = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
            indices = np.concatenate(self.category_indices) if self.category_indices else np.empty(0, np.int64)
            data = np.concatenate(self.category_values) if self.category_values else np.empty(0)
            population.categories = sparse.csr_matrix((data, indices, indptr), shape=(n, len(vocabulary)))
            population.vocabulary = vocabulary
        return population


class LearningProfile:
    """Profile's feature stream with consent, group attributes and the category matrix kept."""

    def __init__(self, stub: Any, deadline_s: float) -> None:
        self._stub = stub
        self._deadline_s = deadline_s

    async def stream(self, names: Sequence[str], as_of: datetime, chunk_size: int, *, groups: bool = False,
                     category_measure: int = feature_pb2.CATEGORY_MEASURE_UNSPECIFIED,
                     member_ids: Sequence[str] = ()) -> Population:
        """Every member (or only `member_ids`) as of `as_of`. A cut stream is resumed after the last
        member received; a chunk too large for one message (heavy category rows) is asked again
        with half the chunk size."""
        blocks = _Blocks(names, groups)
        resumes = 0
        size = chunk_size
        while True:
            request = profile_service_pb2.StreamFeaturesRequest(
                feature_names=names, chunk_size=size, start_after_member_id=blocks.ids[-1] if blocks.ids else "",
                include_group_attributes=groups, category_measure=category_measure,  # type: ignore[arg-type]
                member_ids=member_ids)
            request.as_of.FromDatetime(as_of)
            category_map: np.ndarray | None = None  # this attempt's category columns → the stream's
            try:
                async for message in self._stub.StreamFeatures(request):
                    if message.HasField("header"):
                        mapped = blocks.header(message.header)
                        category_map = mapped if category_measure else None
                    if message.HasField("chunk") and message.chunk.member_ids:
                        blocks.add(message.chunk, category_map)
                    if message.last:
                        return blocks.population(as_of, bool(category_measure))
            except grpc.aio.AioRpcError as error:
                too_large = details_from_rpc_error(error).reason == _CHUNK_TOO_LARGE
                if too_large and size > 1:
                    size = max(1, size // 2)
                elif error.code() not in _TRANSIENT or resumes >= _STREAM_RESUMES_MAX:
                    raise _profile_error(error, "stream the feature matrix") from None
            resumes += 1
            log.warning("learning feature stream cut; resuming", extra={"after_members": len(blocks.ids),
                                                                         "chunk_size": size})

    async def members(self, member_ids: Sequence[str], names: Sequence[str], as_of: datetime | None,
                      groups: bool = False) -> tuple[Population, list[str]]:
        """Up to 1,000 members and the ids profile does not know (unknown, erased or merged)."""
        request = profile_service_pb2.BatchGetMemberFeaturesRequest(member_ids=member_ids, feature_names=names,
                                                                    include_group_attributes=groups)
        if as_of is not None:
            request.as_of.FromDatetime(as_of)
        try:
            response = await self._stub.BatchGetMemberFeatures(request, timeout=self._deadline_s)
        except grpc.aio.AioRpcError as error:
            raise _profile_error(error, "read the members' features") from None
        blocks = _Blocks(names, groups)
        blocks.header(response.header)
        if response.chunk.member_ids:
            blocks.add(response.chunk, None)
        return blocks.population(response.header.as_of.ToDatetime(), False), list(response.missing_member_ids)


    async def purchased_categories(self, member_ids: Sequence[str], since: datetime, until: datetime
                                   ) -> dict[str, set[str]]:
        """The categories of each member's PURCHASE events in [since, until) (profile's event list, one
        member a call, a few calls in flight); a member profile does not know has none."""
        gate = asyncio.Semaphore(PURCHASES_CALLS_IN_FLIGHT)
        found: dict[str, set[str]] = {}

        async def one(member_id: str) -> None:
            categories: set[str] = set()
            token = ""
            async with gate:
                while True:
                    request = profile_service_pb2.ListMemberEventsRequest(
                        member_id=member_id, page_size=1000, page_token=token,
                        event_types=[types_pb2.EVENT_TYPE_PURCHASE])
                    request.occurred_after.FromDatetime(since)
                    request.occurred_before.FromDatetime(until)
                    try:
                        response = await self._stub.ListMemberEvents(request, timeout=self._deadline_s)
                    except grpc.aio.AioRpcError as error:
                        if error.code() == grpc.StatusCode.NOT_FOUND:
                            break
                        raise _profile_error(error, "list the member's purchases") from None
                    categories.update(item.category for e in response.events for item in e.event.purchase.items
                                      if item.category)
                    token = response.next_page_token
                    if not token:
                        break
            found[member_id] = categories

        await asyncio.gather(*(one(m) for m in member_ids))
        return found


class LearningRewards:
    """Rewards' segment assignments."""

    def __init__(self, stub: Any, deadline_s: float) -> None:
        self._stub = stub
        self._deadline_s = deadline_s

    async def assign_segments(self, segmentation_id: str, effective_at: datetime,
                              assignments: Sequence[tuple[str, str]]) -> None:
        """One chunk of (member id, segment id), at most 1,000. Rewards keys each by (segmentation,
        member), so a resend after a failure is harmless; a transient failure is retried briefly."""
        assert 0 < len(assignments) <= ASSIGN_CHUNK_MAX
        request = rewards_pb2.AssignMemberSegmentsRequest(segmentation_id=segmentation_id, assignments=[
            tiers_pb2.SegmentAssignment(member_id=m, segment_id=s) for m, s in assignments])
        request.effective_at.FromDatetime(effective_at)
        delay = ASSIGN_BACKOFF_S
        for attempt in range(ASSIGN_ATTEMPTS):
            try:
                await self._stub.AssignMemberSegments(request, timeout=self._deadline_s)
                return
            except grpc.aio.AioRpcError as error:
                if error.code() not in _TRANSIENT:
                    raise errors.failed_precondition(f"rewards refused the segment assignments: {error.details()}",
                                                     reason="REWARDS_REFUSED") from None
                if attempt + 1 == ASSIGN_ATTEMPTS:
                    raise errors.unavailable("rewards could not record the segment assignments; retry later",
                                             reason=REWARDS_UNAVAILABLE) from None
            await asyncio.sleep(delay)
            delay *= 2
