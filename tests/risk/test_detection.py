"""Detection quality of the default rules on the scenario generator's honest population and attacks
(tests/risk/scenarios.py), through the real service. Prints the report (pytest -s shows it)."""

from __future__ import annotations

from typing import Any

from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from tests.risk.detection import run_scenario
from tests.risk.scenarios import ScenarioConfig, generate


async def test_default_rules_catch_attacks_and_spare_honest_members(risk: RiskServiceStub, admin: Any) -> None:
    report = await run_scenario(risk, generate(ScenarioConfig(seed=7)), admin, batch_size=500)
    print("\n" + report.format())
    assert report.meets_targets(), report.format()
