"""Learning RPCs of ScoringService: FitWeights, segments, models (propensity, recommender), predictions
and the fairness report. A mixin of ScoringServicer, which provides the runtime, peers and settings.

The mutating RPCs (FitWeights, BuildSegments unless a dry run, TrainModel) learn inside the request-id
transaction: a duplicate waits for the first call and gets its answer, and a failure stores nothing.
FitWeights' proposed DRAFT version and an applied segmentation are recorded in the audit trail in
that transaction (service_layer.audit_trail says why TrainModel is not).
They are synchronous and bounded by their sample sizes; the CPU-heavy parts run off the event loop.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from libs.auth import actor
from libs.db import DbConnection
from libs.idempotency import run_once_in_transaction
from libs.server import Runtime
from loyalty.scoring.v1 import scoring_service_pb2 as S
from services.scoring.adapters.learning_peers import LearningProfile, LearningRewards
from services.scoring.adapters.peers import Profile, Rewards
from services.scoring.service_layer import audit_trail, fairness, fitting, models, online, predictions, segmentation
from services.scoring.settings import ScoringSettings


class LearningApi:
    runtime: Runtime
    profile: Profile
    rewards: Rewards
    settings: ScoringSettings
    contexts: online.Contexts
    learning_profile: LearningProfile
    learning_rewards: LearningRewards

    # ---- weights ------------------------------------------------------------------------------

    async def FitWeights(self, request: S.FitWeightsRequest, context: Any) -> S.FitWeightsResponse:
        caller, now = actor(), datetime.now(UTC)

        async def fit(conn: DbConnection) -> S.FitWeightsResponse:
            response = await fitting.fit_weights(conn, self.profile, self.learning_profile, self.rewards, request,
                                                 caller, now, self.settings.stream_chunk_size, self.settings.zone)
            proposed = response.proposed_policy
            await audit_trail.record(conn, "policy.create", "policy", proposed.policy_id, request_id=request.request_id,
                                     after=audit_trail.policy_summary(proposed) | {"fit_id": response.fit.fit_id})
            return response

        return await run_once_in_transaction(self.runtime.pool, "FitWeights", request, S.FitWeightsResponse, fit)

    # ---- segments -----------------------------------------------------------------------------

    async def BuildSegments(self, request: S.BuildSegmentsRequest, context: Any) -> S.BuildSegmentsResponse:
        caller, now = actor(), datetime.now(UTC)
        if request.dry_run:  # stores nothing, not even its request id (as a ScoreMember preview)
            return segmentation.response_of(await segmentation.build(
                self.profile, self.learning_profile, request, caller, now, self.settings.stream_chunk_size))

        async def build(conn: DbConnection) -> S.BuildSegmentsResponse:
            built = await segmentation.build(self.profile, self.learning_profile, request, caller, now,
                                             self.settings.stream_chunk_size)
            await segmentation.store(conn, self.learning_rewards, built, self.settings.apply_concurrency)
            await audit_trail.record(conn, "segments.build", "segmentation", built.segmentation.segmentation_id,
                                     request_id=request.request_id,
                                     after=audit_trail.segmentation_summary(built.segmentation))
            return segmentation.response_of(built)

        return await run_once_in_transaction(self.runtime.pool, "BuildSegments", request, S.BuildSegmentsResponse,
                                             build)

    async def ListSegments(self, request: S.ListSegmentsRequest, context: Any) -> S.ListSegmentsResponse:
        return await segmentation.list_segments(self.runtime.pool, request)

    async def ListSegmentMembers(self, request: S.ListSegmentMembersRequest, context: Any
                                 ) -> S.ListSegmentMembersResponse:
        return await segmentation.list_members(self.runtime.pool, request)

    async def GetMemberSegment(self, request: S.GetMemberSegmentRequest, context: Any) -> S.GetMemberSegmentResponse:
        return await segmentation.member_segment(self.runtime.pool, request)

    # ---- models -------------------------------------------------------------------------------

    async def TrainModel(self, request: S.TrainModelRequest, context: Any) -> S.TrainModelResponse:
        caller, now = actor(), datetime.now(UTC)

        async def train(conn: DbConnection) -> S.TrainModelResponse:
            return await models.train(conn, self.profile, self.learning_profile, self.rewards, request, caller, now,
                                      self.settings.stream_chunk_size, self.settings.zone)

        return await run_once_in_transaction(self.runtime.pool, "TrainModel", request, S.TrainModelResponse, train)

    async def GetModel(self, request: S.GetModelRequest, context: Any) -> S.GetModelResponse:
        return await models.get_model(self.runtime.pool, request.model_id)

    async def ListModels(self, request: S.ListModelsRequest, context: Any) -> S.ListModelsResponse:
        return await models.list_models(self.runtime.pool, request)

    async def PredictUpgradePropensity(self, request: S.PredictUpgradePropensityRequest, context: Any
                                       ) -> S.PredictUpgradePropensityResponse:
        return await predictions.predict(self.runtime.pool, self.learning_profile, self.rewards, self.contexts,
                                         request, datetime.now(UTC), self.settings.stream_chunk_size,
                                         self.settings.zone)

    async def RecommendCategories(self, request: S.RecommendCategoriesRequest, context: Any
                                  ) -> S.RecommendCategoriesResponse:
        return await predictions.recommend_categories(self.runtime.pool, self.learning_profile, request,
                                                      datetime.now(UTC), self.settings.stream_chunk_size)

    # ---- fairness -----------------------------------------------------------------------------

    async def GetFairnessReport(self, request: S.GetFairnessReportRequest, context: Any
                                ) -> S.GetFairnessReportResponse:
        return await fairness.report(self.runtime.pool, self.learning_profile, request, datetime.now(UTC),
                                     self.settings.stream_chunk_size)
