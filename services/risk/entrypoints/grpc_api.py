"""The RiskService servicer: one class composed of the assessment, rule/list, model and case APIs.
Every RPC of risk.proto is implemented by one of them."""

from __future__ import annotations

from libs.audit import AuditApi
from libs.server import Runtime
from loyalty.risk.v1 import risk_pb2, risk_pb2_grpc
from services.risk.entrypoints.assessments_api import AssessmentsApi
from services.risk.entrypoints.cases_api import CasesApi
from services.risk.entrypoints.models_api import ModelsApi
from services.risk.entrypoints.rules_api import RulesApi
from services.risk.service_layer.assess import Assessor
from services.risk.service_layer.config import ConfigCache
from services.risk.service_layer.queries import RuleSetCache
from services.risk.settings import get_risk_settings

PACKAGE = "loyalty.risk.v1"


class RiskServicer(AuditApi, AssessmentsApi, RulesApi, ModelsApi, CasesApi, risk_pb2_grpc.RiskServiceServicer):
    audit_list_response = risk_pb2.ListAuditEventsResponse
    audit_verify_response = risk_pb2.VerifyAuditChainResponse

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config = ConfigCache(lambda: runtime.pool)
        self.assessor = Assessor(lambda: runtime.pool, self.config, get_risk_settings(), runtime.settings.shards)
        self.rule_sets = RuleSetCache()
