"""Segments: BuildSegments (k-means on standardised features, a description, label and offer per
centroid, a 2-D PCA map) and the reads of stored segmentations.

A stored segmentation is written in one transaction with its segments and members (COPY), made
current, and sent to rewards' AssignMemberSegments (1,000 members a call, a few calls in flight)
before that transaction commits: if rewards cannot take them, nothing is stored and the call can be
retried with the same request id. Its id is derived from the caller and the request id, so the retry
sends the same segmentation and rewards (keyed by segmentation and member) records each member once.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat

import asyncpg
import numpy as np

from libs import errors, paging
from libs.db import DbConnection
from libs.errors import FieldViolation
from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import feature_pb2
from loyalty.scoring.v1 import learning_pb2 as L
from loyalty.scoring.v1 import scoring_service_pb2 as S
from services.scoring.adapters import learning_repo
from services.scoring.adapters.learning_peers import ASSIGN_CHUNK_MAX, LearningProfile, LearningRewards
from services.scoring.adapters.peers import Profile
from services.scoring.domain import segments as clustering
from services.scoring.service_layer import evaluation
from services.scoring.service_layer.learning_inputs import check_feature_names, duration, seed_of, timestamp

K_RANGE = (2, 20)
SEGMENTS_PAGE_DEFAULT = 20  # ListSegments: 0 means every segment (k is at most 20)
SEGMENT_MEMBERS_PAGE_DEFAULT = 1000


def k_choice(request: S.BuildSegmentsRequest) -> tuple[int | None, int, int]:
    """(k or None to choose, k_min, k_max); INVALID_ARGUMENT for 1 or an empty range."""
    violations = []
    low, high = K_RANGE
    for name in ("k", "k_min", "k_max"):
        if getattr(request, name) == 1:
            violations.append(FieldViolation(name, f"must be 0 (the default) or {low} to {high}: one segment "
                                                   "is not a segmentation"))
    k_min = request.k_min or clustering.K_MIN_DEFAULT
    k_max = request.k_max or clustering.K_MAX_DEFAULT
    if k_min > k_max:
        violations.append(FieldViolation("k_min", f"must be at most k_max ({k_max})"))
    if violations:
        raise errors.invalid_argument(violations)
    return request.k or None, k_min, k_max


def _offer(offer: clustering.Offer) -> L.OfferStrategy:
    message = L.OfferStrategy(kind=int(offer.kind), bonus_points=offer.bonus_points,  # type: ignore[arg-type]
                              category=offer.category, earn_multiplier_bps=offer.earn_multiplier_bps,
                              rationale=offer.rationale)
    if offer.coupon_value_minor:
        message.coupon_value.CopyFrom(types_pb2.Money(amount_minor=offer.coupon_value_minor, currency=offer.currency))
        message.min_spend.CopyFrom(types_pb2.Money(amount_minor=offer.min_spend_minor, currency=offer.currency))
    if offer.validity_s:
        message.validity.seconds = offer.validity_s
    return message


@dataclass(frozen=True, eq=False)
class Clustered:
    result: clustering.SegmentationResult
    pca: clustering.PcaSummary
    top: np.ndarray  # (k, TOP_CATEGORIES_MAX) category indices, -1 for none


def _cluster(X: np.ndarray, names: list[str], k: int | None, k_min: int, k_max: int, silhouette_sample: int,
             pca_points: int, seed: int, affinity: object) -> Clustered:
    """The CPU part (scikit-learn, numpy), run off the event loop."""
    Z, mean, std = clustering.standardise(X)
    result = clustering.choose_k_and_cluster(Z, mean, std, k=k, k_min=k_min, k_max=k_max,
                                             silhouette_sample=silhouette_sample, seed=seed)
    pca = clustering.pca_2d(Z, result.labels.astype(np.int64), names, pca_points, seed)
    top = clustering.top_categories(result.labels, result.k, affinity)
    return Clustered(result, pca, top)


@dataclass(frozen=True)
class Built:
    segmentation: L.Segmentation
    segments: list[L.Segment]
    member_ids: list[str]
    clustered: Clustered


def segmentation_id_of(actor: str, request_id: str) -> str:
    """The same caller's retry of one request builds the segmentation under the same id."""
    digest = hashlib.sha256(f"BuildSegments\0{actor}\0{request_id}".encode()).hexdigest()
    return f"seg-{digest[:32]}"


def _segments(segmentation_id: str, names: list[str], clustered: Clustered, vocabulary: Sequence[str]
              ) -> list[L.Segment]:
    result, pca = clustered.result, clustered.pca
    total = max(int(result.sizes.sum()), 1)
    found = []
    for i in range(result.k):
        z, raw = result.centroids_z[i], result.centroids_raw[i]
        categories = [vocabulary[c] for c in clustered.top[i].tolist() if c >= 0]
        first = categories[0] if categories else None
        found.append(L.Segment(
            segment_id=f"{segmentation_id}.{i}", segmentation_id=segmentation_id, index=i,
            label=clustering.label_for(z, names), description=clustering.describe_centroid(z, names, raw, first),
            member_count=int(result.sizes[i]), share=float(result.sizes[i]) / total,
            centroid=[L.CentroidValue(feature_name=n, value=v, z_score=s)
                      for n, v, s in zip(names, raw.tolist(), z.tolist(), strict=True)],
            top_categories=categories, offer=_offer(clustering.offer_for(z, names, raw, first)),
            pca_x=float(pca.segment_centres[i, 0]), pca_y=float(pca.segment_centres[i, 1]),
            pca_spread_x=float(pca.segment_spreads[i, 0]), pca_spread_y=float(pca.segment_spreads[i, 1])))
    return found


async def build(profile: Profile, learning_profile: LearningProfile, request: S.BuildSegmentsRequest, actor: str,
                now: datetime, chunk_size: int) -> Built:
    """Cluster the consenting members; nothing is stored here."""
    started = time.perf_counter()
    k, k_min, k_max = k_choice(request)
    names = list(request.feature_names)
    await check_feature_names(profile, names, "feature_names")
    as_of = evaluation.as_of_of(request, "as_of", now)
    population = await learning_profile.stream(names, as_of, chunk_size,
                                                category_measure=feature_pb2.CATEGORY_MEASURE_AFFINITY)
    consenting = np.flatnonzero(population.consent)
    n = int(consenting.size)
    fewest = k if k is not None else k_min
    if n <= fewest:
        raise errors.failed_precondition(f"{n} members with profiling consent cannot form {fewest} segments",
                                         reason="NOT_ENOUGH_MEMBERS")
    if k is None:
        k_max = min(k_max, n - 1)
    assert population.categories is not None
    seed = seed_of(request.random_seed)
    clustered = await asyncio.to_thread(
        _cluster, population.values[consenting], names, k, k_min, k_max,
        request.silhouette_sample_size or clustering.SILHOUETTE_SAMPLE_DEFAULT, request.pca_sample_points, seed,
        population.categories[consenting])
    segmentation_id = f"seg-{uuid.uuid4().hex}" if request.dry_run else segmentation_id_of(actor, request.request_id)
    result, pca = clustered.result, clustered.pca
    segmentation = L.Segmentation(
        segmentation_id=segmentation_id, as_of=timestamp(as_of), feature_names=names, k=result.k,
        k_chosen_automatically=result.k_chosen_automatically,
        silhouettes=[L.SilhouetteScore(k=s.k, silhouette=s.silhouette) for s in result.silhouettes],
        silhouette=result.silhouette, members_segmented=n, members_excluded=population.size - n,
        pca=L.PcaSummary(explained_variance_pc1=pca.explained_variance_pc1,
                         explained_variance_pc2=pca.explained_variance_pc2,
                         loadings=[L.PcaLoading(feature_name=p.feature_name, pc1=p.pc1, pc2=p.pc2)
                                   for p in pca.loadings],
                         sample_points=[L.PcaPoint(x=p.x, y=p.y, segment_index=p.segment_index)
                                        for p in pca.sample_points]),
        current=not request.dry_run, random_seed=request.random_seed, created_by=actor, created_at=timestamp(now))
    built = Built(segmentation, _segments(segmentation_id, names, clustered, population.vocabulary),
                  [population.member_ids[i] for i in consenting.tolist()], clustered)
    built.segmentation.elapsed.CopyFrom(duration(time.perf_counter() - started))
    return built


async def store(conn: DbConnection, rewards: LearningRewards, built: Built, concurrency: int) -> None:
    """Store the segmentation as the current one and send its members' segments to rewards, inside the
    caller's transaction (a failure leaves nothing stored)."""
    result, coordinates = built.clustered.result, built.clustered.pca.coordinates
    sid = built.segmentation.segmentation_id
    records = zip(repeat(sid), built.member_ids, result.labels.tolist(), result.distances.tolist(),
                  coordinates[:, 0].tolist(), coordinates[:, 1].tolist(), strict=False)
    await learning_repo.insert_segmentation(conn, built.segmentation, built.segments, records)
    effective_at = built.segmentation.created_at.ToDatetime(tzinfo=UTC)
    pairs = [(m, f"{sid}.{s}") for m, s in zip(built.member_ids, result.labels.tolist(), strict=True)]
    chunks = [pairs[i:i + ASSIGN_CHUNK_MAX] for i in range(0, len(pairs), ASSIGN_CHUNK_MAX)]
    for start in range(0, len(chunks), concurrency):
        await asyncio.gather(*(rewards.assign_segments(sid, effective_at, chunk)
                               for chunk in chunks[start:start + concurrency]))


def response_of(built: Built) -> S.BuildSegmentsResponse:
    return S.BuildSegmentsResponse(segmentation=built.segmentation, segments=built.segments)


# ---- reads ----------------------------------------------------------------------------------------


async def list_segments(pool: asyncpg.Pool, request: S.ListSegmentsRequest) -> S.ListSegmentsResponse:
    size = min(request.page_size or SEGMENTS_PAGE_DEFAULT, paging.MAX_PAGE_SIZE)
    key = paging.decode(request, 2)
    # The token names the segmentation it pages through: the current one may change between pages.
    row = await learning_repo.segmentation(pool, str(key[0]) if key else request.segmentation_id)
    page, more = paging.split(await learning_repo.segments(pool, row["segmentation_id"], int(key[1]) if key else -1,
                                                           size + 1), size)
    response = S.ListSegmentsResponse(segmentation=learning_repo.segmentation_message(row), segments=page)
    if more:
        response.next_page_token = paging.encode([row["segmentation_id"], page[-1].index], request)
    return response


def _segment_key(segment_id: str) -> tuple[str, int] | None:
    segmentation_id, _, index = segment_id.rpartition(".")
    if not segmentation_id or not index.isdigit() or int(index) >= K_RANGE[1]:
        return None
    return segmentation_id, int(index)


async def list_members(pool: asyncpg.Pool, request: S.ListSegmentMembersRequest) -> S.ListSegmentMembersResponse:
    found = _segment_key(request.segment_id)
    if found is None or await learning_repo.segment(pool, *found) is None:
        raise errors.not_found("segment", request.segment_id, reason="SEGMENT_NOT_FOUND")
    size = request.page_size or SEGMENT_MEMBERS_PAGE_DEFAULT
    key = paging.decode(request, 1)
    rows = await learning_repo.segment_members(pool, *found, str(key[0]) if key else "", size + 1)
    page, more = paging.split(rows, size)
    response = S.ListSegmentMembersResponse(members=[
        L.SegmentMembership(member_id=r["member_id"], segment_id=request.segment_id, distance=r["distance"],
                            pca_x=r["pca_x"], pca_y=r["pca_y"]) for r in page])
    if more:
        response.next_page_token = paging.encode([page[-1]["member_id"]], request)
    return response


async def member_segment(pool: asyncpg.Pool, request: S.GetMemberSegmentRequest) -> S.GetMemberSegmentResponse:
    row = await learning_repo.segmentation(pool, request.segmentation_id)
    segmentation_id = row["segmentation_id"]
    member = await learning_repo.member_segment(pool, segmentation_id, request.member_id)
    if member is None:
        raise errors.not_found("member segment", request.member_id, reason="MEMBER_NOT_SEGMENTED")
    segment = await learning_repo.segment(pool, segmentation_id, member["segment_index"])
    assert segment is not None
    membership = L.SegmentMembership(member_id=request.member_id, segment_id=segment.segment_id,
                                     distance=member["distance"], pca_x=member["pca_x"], pca_y=member["pca_y"])
    return S.GetMemberSegmentResponse(membership=membership, segment=segment)
