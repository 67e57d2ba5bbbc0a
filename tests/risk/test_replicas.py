"""Two risk replicas on one database: a rule set or list change made through one decides the other's
next assessments without a restart (NOTIFY risk_config, polling as the fallback)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from loyalty.risk.v1 import assessment_pb2, risk_pb2, rules_pb2
from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from tests.risk.conftest import Accruals, uid
from tests.support.processes import RunningProcess, start_module

SWAP_WAIT_S = 10.0


@pytest.fixture(scope="module")
def second_replica(services: dict[str, RunningProcess], service_env: dict[str, str], state_dir: Path
                   ) -> Iterator[RunningProcess]:
    process = start_module("risk-b", "services.risk", service_env, state_dir / "logs")
    try:
        process.wait_status("SERVING")
        yield process
    finally:
        process.terminate()


async def test_a_change_through_one_replica_decides_on_the_other(risk: RiskServiceStub, admin: Any,
                                                                  second_replica: RunningProcess) -> None:
    device = uid("dev")
    async with grpc.aio.insecure_channel(second_replica.address) as channel:
        other = RiskServiceStub(channel)
        a = Accruals()
        assert (await other.AssessAccrual(a.purchase(1_000, device_id=device), metadata=admin)
                ).assessment.decision == assessment_pb2.DECISION_ALLOW
        added = await risk.AddListEntries(risk_pb2.AddListEntriesRequest(request_id=uid("r"), entries=[
            rules_pb2.ListEntry(kind=assessment_pb2.LIST_KIND_DENY,
                                subject_type=assessment_pb2.LIST_SUBJECT_TYPE_DEVICE, value=device,
                                reason="replica test")]), metadata=admin)
        try:
            deadline = asyncio.get_running_loop().time() + SWAP_WAIT_S
            while True:
                decision = (await other.AssessAccrual(a.purchase(1_000, device_id=device), metadata=admin)
                            ).assessment.decision
                if decision == assessment_pb2.DECISION_BLOCK:
                    break
                assert asyncio.get_running_loop().time() < deadline, "the other replica never saw the deny entry"
                await asyncio.sleep(0.1)
        finally:
            await risk.RemoveListEntries(risk_pb2.RemoveListEntriesRequest(
                request_id=uid("r"), entry_ids=[e.entry_id for e in added.entries], reason="test done"),
                metadata=admin)
