"""The RewardsService servicer: one class composed of the ledger, redemption, tier, benefit and dispute
APIs, the audit trail and the member-facing texts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from libs.audit import AuditApi
from libs.messages import Catalogue, MessageTexts, MessageTextsApi
from libs.server import Runtime
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from services.rewards.adapters.benefits_birthdays import BirthMonths
from services.rewards.adapters.budgets import Slices
from services.rewards.adapters.risk_gate import RiskGate
from services.rewards.adapters.rules_repo import RulesCache
from services.rewards.entrypoints.benefits_api import BenefitsApi
from services.rewards.entrypoints.disputes_api import DisputesApi
from services.rewards.entrypoints.ledger_api import LedgerApi
from services.rewards.entrypoints.redemptions_api import RedemptionsApi
from services.rewards.entrypoints.tiers_api import TiersApi
from services.rewards.service_layer.accrue import Accruer
from services.rewards.service_layer.holds import Holds
from services.rewards.settings import get_rewards_settings

PACKAGE = "loyalty.rewards.v1"
# Member-facing texts shipped with the service; operators override them through UpdateMessageText.
CATALOGUE = Catalogue.load(Path(__file__).resolve().parents[1] / "messages.yaml")


class RewardsServicer(AuditApi, MessageTextsApi, LedgerApi, RedemptionsApi, TiersApi, BenefitsApi, DisputesApi,
                      rewards_pb2_grpc.RewardsServiceServicer):
    audit_list_response = rewards_pb2.ListAuditEventsResponse
    audit_verify_response = rewards_pb2.VerifyAuditChainResponse
    texts_list_response = rewards_pb2.ListMessageTextsResponse
    texts_update_response = rewards_pb2.UpdateMessageTextResponse

    def __init__(self, runtime: Runtime, gate: RiskGate, birth_months: BirthMonths) -> None:
        self.runtime = runtime
        self.message_texts = MessageTexts(lambda: runtime.pool, CATALOGUE, "rewards")
        self.birth_months = birth_months
        self.settings = get_rewards_settings()
        self.rules = RulesCache()

        def pool() -> Any:
            return runtime.pool

        slices = Slices(runtime.settings.shards)
        self.accruer = Accruer(pool, self.rules, gate, self.settings, slices)
        self.holds = Holds(pool, self.rules, gate, slices, self.settings.zone, self.settings.gate_retry_backoff_max_s,
                           self.settings.jobs_interval_s)
