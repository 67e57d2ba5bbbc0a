"""The ScoringService servicer: policies, evaluation runs, member scores and explanations here; learned
weights, segments, models, predictions and fairness reports from the LearningApi mixin
(learning_api.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from libs import errors, paging
from libs.audit import AuditApi
from libs.auth import actor
from libs.db import DbConnection
from libs.idempotency import run_once_in_transaction
from libs.messages import Catalogue, MessageTexts, MessageTextsApi
from libs.server import Runtime
from loyalty.scoring.v1 import scoring_service_pb2 as S
from loyalty.scoring.v1 import scoring_service_pb2_grpc
from services.scoring.adapters import policies_repo, runs_repo
from services.scoring.adapters.learning_peers import LearningProfile, LearningRewards
from services.scoring.adapters.peers import Profile, Rewards
from services.scoring.entrypoints.learning_api import LearningApi
from services.scoring.service_layer import compare, evaluation, online, policies
from services.scoring.service_layer.evaluation import RunWorker
from services.scoring.settings import get_scoring_settings

PACKAGE = "loyalty.scoring.v1"
# Member-facing texts shipped with the service; operators override them through UpdateMessageText.
CATALOGUE = Catalogue.load(Path(__file__).resolve().parents[1] / "messages.yaml")


class ScoringServicer(AuditApi, MessageTextsApi, LearningApi, scoring_service_pb2_grpc.ScoringServiceServicer):
    audit_list_response = S.ListAuditEventsResponse
    audit_verify_response = S.VerifyAuditChainResponse
    texts_list_response = S.ListMessageTextsResponse
    texts_update_response = S.UpdateMessageTextResponse

    def __init__(self, runtime: Runtime, profile: Profile, rewards: Rewards, learning_profile: LearningProfile,
                 learning_rewards: LearningRewards) -> None:
        self.runtime = runtime
        self.message_texts = MessageTexts(lambda: runtime.pool, CATALOGUE, "scoring")
        self.profile = profile
        self.rewards = rewards
        self.learning_profile = learning_profile
        self.learning_rewards = learning_rewards
        self.settings = get_scoring_settings()
        self.contexts = online.Contexts()
        self.worker = RunWorker(lambda: runtime.pool, profile, rewards, self.settings)

    @property
    def pool(self) -> asyncpg.Pool:
        return self.runtime.pool

    # ---- policies ----------------------------------------------------------------------------

    async def CreatePolicy(self, request: S.CreatePolicyRequest, context: Any) -> S.CreatePolicyResponse:
        caller = actor()

        async def create(conn: DbConnection) -> S.CreatePolicyResponse:
            return await policies.create(conn, self.profile, request, caller)

        return await run_once_in_transaction(self.pool, "CreatePolicy", request, S.CreatePolicyResponse, create)

    async def GetPolicy(self, request: S.GetPolicyRequest, context: Any) -> S.GetPolicyResponse:
        return S.GetPolicyResponse(policy=await policies_repo.get(self.pool, request.policy_id, request.version))

    async def GetActivePolicy(self, request: S.GetActivePolicyRequest, context: Any) -> S.GetActivePolicyResponse:
        policy = await policies_repo.active(self.pool)
        if policy is None:
            raise errors.not_found("active policy", "none", reason="NO_ACTIVE_POLICY")
        return S.GetActivePolicyResponse(policy=policy)

    async def ListPolicies(self, request: S.ListPoliciesRequest, context: Any) -> S.ListPoliciesResponse:
        return await policies.list_policies(self.pool, request)

    async def ValidatePolicy(self, request: S.ValidatePolicyRequest, context: Any) -> S.ValidatePolicyResponse:
        warnings, version = await policies.check(self.profile, request.policy)
        return S.ValidatePolicyResponse(warnings=warnings, feature_catalogue_version=version)

    async def ActivatePolicy(self, request: S.ActivatePolicyRequest, context: Any) -> S.ActivatePolicyResponse:
        caller = actor()

        async def activate(conn: DbConnection) -> S.ActivatePolicyResponse:
            return await policies.activate(conn, request, caller)

        return await run_once_in_transaction(self.pool, "ActivatePolicy", request, S.ActivatePolicyResponse, activate)

    async def RetirePolicy(self, request: S.RetirePolicyRequest, context: Any) -> S.RetirePolicyResponse:
        async def retire(conn: DbConnection) -> S.RetirePolicyResponse:
            return await policies.retire(conn, request)

        return await run_once_in_transaction(self.pool, "RetirePolicy", request, S.RetirePolicyResponse, retire)

    async def ComparePolicies(self, request: S.ComparePoliciesRequest, context: Any) -> S.ComparePoliciesResponse:
        return await compare.compare(self.pool, self.profile, self.rewards, request, self.settings.stream_chunk_size,
                                     self.settings.zone, datetime.now(UTC))

    # ---- evaluations -------------------------------------------------------------------------

    async def RunEvaluation(self, request: S.RunEvaluationRequest, context: Any) -> S.RunEvaluationResponse:
        caller = actor()

        async def start(conn: DbConnection) -> S.RunEvaluationResponse:
            return await evaluation.start(conn, request, caller, datetime.now(UTC), self.settings.imports)

        response = await run_once_in_transaction(self.pool, "RunEvaluation", request, S.RunEvaluationResponse, start)
        self.worker.wake()
        run_id = response.run.run_id
        if request.wait:
            response.run.CopyFrom(await evaluation.wait_finished(self.pool, run_id, context.time_remaining))
        else:
            response.run.CopyFrom(runs_repo.run_message(await runs_repo.get_run(self.pool, run_id)))
        return response

    async def GetEvaluation(self, request: S.GetEvaluationRequest, context: Any) -> S.GetEvaluationResponse:
        return S.GetEvaluationResponse(run=runs_repo.run_message(await runs_repo.get_run(self.pool, request.run_id)))

    async def ListEvaluations(self, request: S.ListEvaluationsRequest, context: Any) -> S.ListEvaluationsResponse:
        size = paging.page_size(request.page_size)
        key = paging.decode(request, 2)
        dry = {S.DRY_RUN_FILTER_DRY_RUNS_ONLY: True, S.DRY_RUN_FILTER_APPLIED_RUNS_ONLY: False}.get(
            request.dry_run_filter)
        rows = await self.pool.fetch(
            """
            SELECT * FROM evaluation_runs
            WHERE ($1 = '' OR policy_id = $1) AND ($2 = 0 OR state = $2) AND ($3::boolean IS NULL OR dry_run = $3)
              AND ($4::timestamptz IS NULL OR created_at >= $4) AND ($5::timestamptz IS NULL OR created_at < $5)
              AND ($6::timestamptz IS NULL OR (created_at, run_id) < ($6, $7))
            ORDER BY created_at DESC, run_id DESC LIMIT $8
            """,
            request.policy_id, request.state, dry,
            request.created_after.ToDatetime(tzinfo=UTC) if request.HasField("created_after") else None,
            request.created_before.ToDatetime(tzinfo=UTC) if request.HasField("created_before") else None,
            datetime.fromisoformat(key[0]) if key else None, str(key[1]) if key else "", size + 1)
        page, more = paging.split(rows, size)
        response = S.ListEvaluationsResponse(runs=[runs_repo.run_message(r) for r in page])
        if more:
            response.next_page_token = paging.encode([page[-1]["created_at"].isoformat(), page[-1]["run_id"]], request)
        return response

    async def CancelEvaluation(self, request: S.CancelEvaluationRequest, context: Any
                               ) -> S.CancelEvaluationResponse:
        async def cancel(conn: DbConnection) -> S.CancelEvaluationResponse:
            return await evaluation.cancel(conn, request)

        return await run_once_in_transaction(self.pool, "CancelEvaluation", request, S.CancelEvaluationResponse,
                                             cancel)

    async def ListEvaluationScores(self, request: S.ListEvaluationScoresRequest, context: Any
                                   ) -> S.ListEvaluationScoresResponse:
        run = await runs_repo.get_run(self.pool, request.run_id)
        if run["statistics"] is None:
            raise errors.failed_precondition(f"run {request.run_id} has not stored its scores yet",
                                             reason="EVALUATION_NOT_SCORED")
        size = 500 if request.page_size <= 0 else request.page_size
        key = paging.decode(request, 1)
        rows = await self.pool.fetch(
            "SELECT * FROM evaluation_scores WHERE run_id = $1 AND ($2 = '' OR tier_id = $2)"
            " AND (cardinality($3::smallint[]) = 0 OR change = ANY($3::smallint[])) AND member_id > $4"
            " ORDER BY member_id LIMIT $5",
            request.run_id, request.tier_id, list(request.changes), str(key[0]) if key else "", size + 1)
        page, more = paging.split(rows, size)
        response = S.ListEvaluationScoresResponse(scores=[online.stored_score(r, run) for r in page])
        if more:
            response.next_page_token = paging.encode([page[-1]["member_id"]], request)
        return response

    # ---- member scores -----------------------------------------------------------------------

    async def GetMemberScore(self, request: S.GetMemberScoreRequest, context: Any) -> S.GetMemberScoreResponse:
        return S.GetMemberScoreResponse(score=await online.member_score(self.pool, request.member_id))

    async def ScoreMember(self, request: S.ScoreMemberRequest, context: Any) -> S.ScoreMemberResponse:
        now = datetime.now(UTC)

        async def score(conn: DbConnection) -> S.ScoreMemberResponse:
            return await online.score_member(conn, self.profile, self.rewards, self.contexts, request,
                                             self.settings.zone, now)

        if request.mode in (S.SCORE_MODE_UNSPECIFIED, S.SCORE_MODE_PREVIEW):
            async with self.pool.acquire() as conn:
                return await score(conn)  # a preview stores nothing, not even its request id
        return await run_once_in_transaction(self.pool, "ScoreMember", request, S.ScoreMemberResponse, score)

    async def ExplainScore(self, request: S.ExplainScoreRequest, context: Any) -> S.ExplainScoreResponse:
        return await online.explain_score(self.pool, self.profile, self.rewards, self.contexts, request,
                                          self.settings.default_locale, self.settings.zone, datetime.now(UTC),
                                          self.message_texts)

