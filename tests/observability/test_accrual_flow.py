"""One purchase followed end to end on an observed stack (this folder's conftest): a member with
distinctive PII is created and records a purchase through the HTTP gateway; profile's outbox relay
delivers it to rewards, which asks risk and posts the points. Then:

- the spans of all four processes form ONE trace: the gateway's HTTP span is its root, the parent
  of the gateway's call to profile; profile's BatchRecordEvents is the ancestor of
  rewards' Accrue, whose client call to risk is the parent of risk's server span; the decision and
  the points are span attributes; database statements are spans inside it;
- every RPC log line carries that trace's ids;
- /metrics of every service shows the flow's RED and domain counters, with bounded labels only;
- none of the member's PII appears in any log line, metric or span.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import httpx
import pytest
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families

from libs.settings import SERVICE_NAMES
from loyalty.profile.v1 import event_pb2, member_pb2
from loyalty.profile.v1 import profile_service_pb2 as pb
from loyalty.rewards.v1 import rewards_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from tests.conftest import bearer
from tests.observability.conftest import ObservedStack
from tests.support.otlp_receiver import KIND_CLIENT, KIND_SERVER, ReceivedSpan

pytestmark = pytest.mark.e2e

CALL_TIMEOUT_S = 10
CREDIT_WAIT_S = 30
PURCHASE_MINOR = 4_200
POINTS = 42 + 5  # 1 point per yuan + 5 per purchase (the default earning rules)
RECORD = "loyalty.profile.v1.ProfileService/BatchRecordEvents"
ACCRUE = "loyalty.rewards.v1.RewardsService/Accrue"
ASSESS = "loyalty.risk.v1.RiskService/BatchAssessAccruals"
LABELS_ALLOWED = {"service", "method", "code", "reason", "outcome", "kind", "le"}


@dataclass(frozen=True)
class Flow:
    member_id: str
    event_id: str
    pii: tuple[str, ...]


@pytest.fixture(scope="module")
async def flow(observed: ObservedStack, dev_tokens: dict[str, str]) -> Flow:
    tag = uuid.uuid4().hex[:10]
    member = member_pb2.Member(
        member_id=f"m-{tag}", external_id=f"shop-{tag}", display_name=f"Quirinus Vexley {tag}",
        email=f"Quirinus.Vexley.{tag}@Example.org", phone=f"+8613{int(tag[:8], 16) % 10**9:09d}",
        birth_date="1979-11-23", region="CN-SH", channel=2, gender=member_pb2.GENDER_MALE,
    )
    event = event_pb2.BehaviourEvent(event_id=f"e-{tag}", member_id=member.member_id, channel=2)
    event.occurred_at.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    event.purchase.order_id = f"o-{tag}"
    event.purchase.amount.amount_minor = PURCHASE_MINOR
    event.purchase.amount.currency = "CNY"
    admin = bearer(dev_tokens["admin"])
    headers = {"authorization": f"Bearer {dev_tokens['admin']}"}
    # A web caller's way in: the member (with its PII) and the purchase go through the HTTP gateway.
    async with httpx.AsyncClient(base_url=observed.gateway_url, headers=headers, timeout=CALL_TIMEOUT_S) as http, \
            grpc.aio.insecure_channel(observed.address("rewards")) as r:
        rewards = RewardsServiceStub(r)
        created = await http.post("/v1/members", json=json_format.MessageToDict(
            pb.CreateMemberRequest(request_id=f"r-{tag}", member=member)))
        assert created.status_code == 200, created.text
        recorded = await http.post("/v1/events:batchRecord", json=json_format.MessageToDict(
            pb.BatchRecordEventsRequest(events=[event])))
        assert recorded.status_code == 200 and recorded.json()["acceptedCount"] == 1, recorded.text
        deadline = time.monotonic() + CREDIT_WAIT_S
        posted = 0
        while posted == 0 and time.monotonic() < deadline:
            reply = await rewards.GetBalance(rewards_pb2.GetBalanceRequest(member_id=member.member_id),
                                             metadata=admin, timeout=CALL_TIMEOUT_S)
            posted = reply.balance.posted_points
            if posted == 0:
                await asyncio.sleep(0.1)
    assert posted == POINTS
    return Flow(member.member_id, event.event_id,
                (member.display_name, member.email, member.email.lower(), member.phone, member.phone[3:]))


def _trace_of_the_purchase(observed: ObservedStack) -> tuple[list[ReceivedSpan], str]:
    """Every span of the purchase's trace, once the three server spans and all their ancestors have
    arrived (each process exports on its own schedule; a caller's span ends after its callee's)."""
    def complete(spans: list[ReceivedSpan]) -> bool:
        record = [s for s in spans if s.name == RECORD and s.kind == KIND_SERVER]
        if not record:
            return False
        in_trace = [s for s in spans if s.trace_id == record[-1].trace_id]
        by_id = {s.span_id: s for s in in_trace}
        ends = [s for s in in_trace if s.kind == KIND_SERVER and s.name in (ACCRUE, ASSESS)]
        chains = [_ancestors(s, by_id) for s in [record[-1], *ends]]
        # Complete when every chain reaches the gateway's HTTP span, the root of the trace.
        return len(ends) == 2 and all(c and c[-1].parent_id == "" and c[-1].service == "loyalty-gateway"
                                      and (s is record[-1] or record[-1] in c)
                                      for s, c in zip([record[-1], *ends], chains, strict=True))

    spans = observed.receiver.wait_for(complete)
    [record] = [s for s in spans if s.name == RECORD and s.kind == KIND_SERVER]
    return [s for s in spans if s.trace_id == record.trace_id], record.trace_id


def _ancestors(span: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> list[ReceivedSpan]:
    chain = []
    while span.parent_id in by_id:
        span = by_id[span.parent_id]
        chain.append(span)
    return chain


async def test_the_purchase_is_one_trace_across_profile_rewards_and_risk(observed: ObservedStack,
                                                                         flow: Flow) -> None:
    spans, _ = _trace_of_the_purchase(observed)
    by_id = {s.span_id: s for s in spans}
    [record] = [s for s in spans if s.name == RECORD and s.kind == KIND_SERVER]
    assert record.service == "loyalty-profile"
    # The web caller sent no context: the gateway's HTTP span is the root, its gRPC call profile's parent.
    edge = _ancestors(record, by_id)
    assert [(s.service, s.kind) for s in edge] == [("loyalty-gateway", KIND_CLIENT), ("loyalty-gateway", KIND_SERVER)]
    assert edge[-1].parent_id == "" and edge[-1].name == "POST /v1/events:batchRecord"

    [accrue] = [s for s in spans if s.name == ACCRUE and s.kind == KIND_SERVER]
    assert accrue.service == "loyalty-rewards"
    chain = _ancestors(accrue, by_id)
    assert record in chain, [(s.service, s.name) for s in chain]
    assert chain[0].kind == KIND_CLIENT and chain[0].service == "loyalty-profile"  # the relay's call
    assert accrue.attributes["loyalty.points"] == POINTS
    assert accrue.attributes["loyalty.accrual.outcome"] == "ACCRUAL_OUTCOME_POSTED"
    assert accrue.attributes["loyalty.risk.outcome"] == "RISK_OUTCOME_ALLOW"

    [assess] = [s for s in spans if s.name == ASSESS and s.kind == KIND_SERVER]
    assert assess.service == "loyalty-risk"
    caller = by_id[assess.parent_id]
    assert (caller.name, caller.kind, caller.service) == (ASSESS, KIND_CLIENT, "loyalty-rewards")
    assert accrue in _ancestors(caller, by_id)
    assert assess.attributes["loyalty.risk.decision"] == "DECISION_ALLOW"
    assert 0 <= assess.attributes["loyalty.risk.score"] <= 1

    # Statements are spans of the work that ran them, with placeholders, never values.
    statements = [s for s in spans if s.attributes.get("db.system") == "postgresql"]
    assert {s.service for s in statements} >= {"loyalty-profile", "loyalty-rewards", "loyalty-risk"}
    for statement in statements:
        assert statement.kind == KIND_CLIENT and statement.parent_id in by_id
        assert flow.member_id not in str(statement.attributes["db.statement"])
    # The writes of BatchRecordEvents (the events, and their effects in one CTE) are its children.
    writes = [s for s in statements if s.service == "loyalty-profile" and record in _ancestors(s, by_id)
              and "INSERT" in s.name]
    assert {"INSERT events", "WITH INSERT events"} & {s.name for s in writes}, [s.name for s in writes]
    assert writes and all("$1" in str(s.attributes["db.statement"]) for s in writes)


def _scrape(observed: ObservedStack, service: str) -> str:
    url = f"http://127.0.0.1:{observed.metrics_ports[service]}/metrics"
    with urllib.request.urlopen(url, timeout=CALL_TIMEOUT_S) as response:
        body: bytes = response.read()
    return body.decode()


def _sample(text: str, name: str, **labels: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_metrics_show_the_flow_with_bounded_labels_only(observed: ObservedStack, flow: Flow) -> None:
    scraped = {service: await asyncio.to_thread(_scrape, observed, service) for service in SERVICE_NAMES}
    profile, rewards, risk = scraped["profile"], scraped["rewards"], scraped["risk"]
    assert _sample(profile, "loyalty_rpc_requests_total", service="profile", method="BatchRecordEvents",
                   code="OK") >= 1
    assert _sample(profile, "loyalty_profile_events_total", outcome="accepted") >= 1
    assert _sample(profile, "loyalty_client_requests_total", service="rewards", method="Accrue", code="OK") >= 1
    assert _sample(rewards, "loyalty_rpc_duration_seconds_count", service="rewards", method="Accrue") >= 1
    assert _sample(rewards, "loyalty_rewards_accruals_total", outcome="posted") >= 1
    assert _sample(rewards, "loyalty_rewards_points_issued_total", outcome="posted") >= POINTS
    assert _sample(risk, "loyalty_risk_decisions_total", outcome="allow") >= 1
    for service in ("profile", "rewards", "risk"):  # the services with an outbox table
        assert "loyalty_outbox_oldest_pending_age_seconds{" in scraped[service]
    assert "loyalty_outbox_pending{" not in scraped["scoring"]
    for service, text in scraped.items():
        assert _sample(text, "loyalty_db_pool_size", service=service) >= 1
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                # Ours; the client library's python_info carries the interpreter's version.
                if sample.name.startswith("loyalty_"):
                    assert set(sample.labels) <= LABELS_ALLOWED, (service, sample)


async def test_logs_carry_trace_ids_and_nothing_holds_the_members_pii(observed: ObservedStack, flow: Flow) -> None:
    spans, trace_id = _trace_of_the_purchase(observed)
    logs = observed.logs()
    assert len(logs) == len(SERVICE_NAMES) + 1  # and the gateway's
    rpc_lines = [json.loads(line) for text in logs.values() for line in text.splitlines()
                 if line.startswith("{") and '"msg": "rpc"' in line]
    assert rpc_lines and all(len(line["trace_id"]) == 32 and len(line["span_id"]) == 16 for line in rpc_lines)
    in_trace = {(line["service"], line["rpc_method"]) for line in rpc_lines if line["trace_id"] == trace_id}
    assert {("profile", f"/{RECORD}"), ("rewards", f"/{ACCRUE}"), ("risk", f"/{ASSESS}")} <= in_trace

    metrics = {service: await asyncio.to_thread(_scrape, observed, service) for service in SERVICE_NAMES}
    every_span = observed.receiver.spans()
    assert len(every_span) >= len(spans)
    haystacks: dict[str, str] = {f"log {name}": text for name, text in logs.items()}
    haystacks.update({f"metrics {service}": text for service, text in metrics.items()})
    haystacks["spans"] = "\n".join(span.text for span in every_span)
    for where, text in haystacks.items():
        lowered = text.lower()
        leaked = [value for value in flow.pii if value.lower() in lowered]
        assert leaked == [], f"{where} holds PII: {leaked}"
    # The member's id is not PII, but it must never become a label.
    assert all(flow.member_id not in text for where, text in haystacks.items() if where.startswith("metrics"))
