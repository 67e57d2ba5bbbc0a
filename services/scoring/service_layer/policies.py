"""Policy life-cycle: create (checked against profile's catalogue), validate, read, list, activate
(optimistic check, never during an applying run) and retire. Each change writes its audit record
(service_layer.audit_trail) in the caller's request-id transaction."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from libs import errors, paging
from libs.db import DbConnection
from loyalty.scoring.v1 import policy_pb2
from loyalty.scoring.v1 import scoring_service_pb2 as S
from services.scoring.adapters import policies_repo
from services.scoring.adapters.peers import Profile
from services.scoring.adapters.policies_repo import ACTIVE, DRAFT, RETIRED
from services.scoring.domain import policy as rules
from services.scoring.service_layer import audit_trail

APPLYING = 4  # EvaluationStage.EVALUATION_STAGE_APPLYING


async def check(profile: Profile, policy: policy_pb2.Policy, path: str = "policy"
                ) -> tuple[list[S.PolicyWarning], str]:
    """Raise INVALID_ARGUMENT / INVALID_POLICY with every problem; else the warnings and the
    catalogue version the features were checked against."""
    catalogue, version = await profile.catalogue()
    problems = rules.violations(policy, catalogue, path)
    if problems:
        raise errors.invalid_argument(problems, reason="INVALID_POLICY")
    remarks = [S.PolicyWarning(field=w.field, code=w.code, message=w.message) for w in rules.warnings(policy, path)]
    return remarks, version


async def create(conn: DbConnection, profile: Profile, request: S.CreatePolicyRequest, actor: str
                 ) -> S.CreatePolicyResponse:
    warnings, version = await check(profile, request.policy)
    stored = await policies_repo.insert(conn, request.policy, actor, version)
    await audit_trail.record(conn, "policy.create", "policy", stored.policy_id, request_id=request.request_id,
                             after=audit_trail.policy_summary(stored))
    return S.CreatePolicyResponse(policy=stored, warnings=warnings)


async def list_policies(pool: asyncpg.Pool, request: S.ListPoliciesRequest) -> S.ListPoliciesResponse:
    size = paging.page_size(request.page_size)
    key = paging.decode(request, 3)
    after = (datetime.fromisoformat(key[0]), str(key[1]), int(key[2])) if key else None
    rows = await policies_repo.list_page(pool, request.policy_id, request.state, request.latest_version_only, after,
                                         size + 1)
    page, more = paging.split(rows, size)
    response = S.ListPoliciesResponse(policies=page)
    if more:
        last = page[-1]
        response.next_page_token = paging.encode(
            [last.created_at.ToDatetime(tzinfo=UTC).isoformat(), last.policy_id, last.version], request)
    return response


async def _applying_run(conn: DbConnection) -> str | None:
    return await conn.fetchval(  # type: ignore[no-any-return]
        f"SELECT run_id FROM evaluation_runs WHERE NOT dry_run AND state = 2 AND stage = {APPLYING}")


async def activate(conn: DbConnection, request: S.ActivatePolicyRequest, actor: str) -> S.ActivatePolicyResponse:
    target = await policies_repo.get(conn, request.policy_id, request.version, for_update=True)
    current = await policies_repo.active(conn, for_update=True)
    if request.HasField("expected_active_policy"):
        expected = request.expected_active_policy
        matches = current is not None and current.policy_id == expected.policy_id and (
            expected.version in (0, current.version))
        if not matches:
            now = f"{current.policy_id} v{current.version}" if current else "none"
            raise errors.failed_precondition(f"the active policy is {now}, not the one expected",
                                             reason="ACTIVE_POLICY_CHANGED", active_policy=now)
    response = S.ActivatePolicyResponse()
    if current is not None and (current.policy_id, current.version) == (target.policy_id, target.version):
        response.policy.CopyFrom(target)
        return response
    run_id = await _applying_run(conn)
    if run_id:
        raise errors.failed_precondition(f"run {run_id} is applying tier changes; activate once it finished",
                                         reason="EVALUATION_IN_PROGRESS", run_id=run_id)
    await policies_repo.set_active(conn, target.policy_id, target.version, actor, datetime.now(UTC))
    response.policy.CopyFrom(await policies_repo.get(conn, target.policy_id, target.version))
    if current is not None:
        response.previous_policy.policy_id = current.policy_id
        response.previous_policy.version = current.version
    await audit_trail.record(conn, "policy.activate", "policy", target.policy_id, request_id=request.request_id,
                             before={"active": audit_trail.policy_ref(current)},
                             after={"active": audit_trail.policy_ref(response.policy)})
    return response


async def retire(conn: DbConnection, request: S.RetirePolicyRequest) -> S.RetirePolicyResponse:
    target = await policies_repo.get(conn, request.policy_id, request.version, for_update=True)
    if target.state == ACTIVE:
        raise errors.failed_precondition(
            "the active policy cannot be retired: activate another version instead, so a policy stays in force",
            reason="POLICY_ACTIVE")
    if target.state == DRAFT:
        await policies_repo.set_retired(conn, target.policy_id, target.version)
        retired = await policies_repo.get(conn, target.policy_id, target.version)
        await audit_trail.record(conn, "policy.retire", "policy", target.policy_id, request_id=request.request_id,
                                 before=audit_trail.policy_summary(target), after=audit_trail.policy_summary(retired))
        target = retired
    assert target.state == RETIRED
    return S.RetirePolicyResponse(policy=target)
