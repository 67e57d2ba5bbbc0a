"""Scoring fixtures: a stack per test module (risk, profile, rewards, scoring on a fresh database), so
the population a run scores is exactly the members that module creates, and the active policy and
run history are its alone. Pure-domain tests (kernel, learning...) never start one."""

from __future__ import annotations

import secrets
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from loyalty.profile.v1 import event_pb2
from loyalty.profile.v1 import profile_service_pb2 as P
from loyalty.profile.v1.profile_service_pb2_grpc import ProfileServiceStub
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from loyalty.scoring.v1 import policy_pb2
from loyalty.scoring.v1.scoring_service_pb2_grpc import ScoringServiceStub
from tests.conftest import bearer
from tests.support.database import sibling_database
from tests.support.processes import RunningProcess, free_port, start_module

STACK = ("risk", "profile", "rewards", "scoring")


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class Stack:
    env: dict[str, str]
    log_dir: Path
    ports: dict[str, int]
    running: dict[str, RunningProcess] = field(default_factory=dict)

    def start(self, name: str) -> RunningProcess:
        process = start_module(f"{name}-scoring-stack", f"services.{name}", self.env, self.log_dir,
                               port=self.ports[name])
        process.wait_status("SERVING")
        self.running[name] = process
        return process

    def stop(self, name: str) -> None:
        self.running.pop(name).terminate()

    def kill(self, name: str) -> None:
        process = self.running.pop(name)
        process.process.kill()
        process.process.wait()

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start_gateway(self) -> str:
        """The HTTP gateway in front of this stack's services; its base URL once it answers."""
        from tests.gateway.conftest import wait_http_ready

        self.ports["gateway"] = free_port()
        process = start_module("gateway-scoring-stack", "services.gateway", self.env, self.log_dir,
                               port=self.ports["gateway"])
        self.running["gateway"] = process
        url = f"http://{self.address('gateway')}"
        wait_http_ready(url, process)
        return url


@pytest.fixture(scope="module")
def stack(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[Stack]:
    name = f"loyalty_scoring_{secrets.token_hex(4)}"
    ports = {service: free_port() for service in STACK}
    with sibling_database(pg_dsn, name) as dsn:
        yield from _started_stack(dsn, service_env, state_dir, ports)


@contextmanager
def own_stack(pg_dsn: str, service_env: dict[str, str], state_dir: Path, prefix: str) -> Iterator[Stack]:
    """The four services on a database of their own (named `prefix` and a random suffix), for tests
    that activate policies and apply tiers, which the session's shared services must not see."""
    with sibling_database(pg_dsn, f"{prefix}_{secrets.token_hex(4)}") as dsn:
        started = _started_stack(dsn, service_env, state_dir, {service: free_port() for service in STACK})
        running = next(started)
        try:
            yield running
        finally:
            # Every process drains at once rather than one after the other; the stack's own
            # teardown then finds them stopped.
            for process in running.running.values():
                if process.process.poll() is None:
                    process.process.send_signal(signal.SIGTERM)
            started.close()


def _started_stack(dsn: str, service_env: dict[str, str], state_dir: Path, ports: dict[str, int]
                   ) -> Iterator[Stack]:
    env = dict(service_env, DATABASE_URL=dsn,
               LOYALTY_SCORING_WORKER_INTERVAL_S="0.2", LOYALTY_SCORING_LEASE_S="2",
               LOYALTY_SCORING_SCHEDULER_INTERVAL_S="0.5", LOYALTY_SCORING_APPLY_RETRY_S_MAX="60",
               LOYALTY_SCORING_CALL_DEADLINE_S="5",
               **{f"LOYALTY_{s.upper()}_ADDR": f"127.0.0.1:{p}" for s, p in ports.items()})
    running = Stack(env, state_dir / "logs", ports)
    try:
        for service in STACK:
            running.start(service)
        yield running
    finally:
        for service in list(running.running):
            running.stop(service)


@dataclass
class Stubs:
    scoring: ScoringServiceStub
    profile: ProfileServiceStub
    rewards: RewardsServiceStub


@pytest.fixture
async def stubs(stack: Stack) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(stack.address("scoring")) as s, \
            grpc.aio.insecure_channel(stack.address("profile")) as p, \
            grpc.aio.insecure_channel(stack.address("rewards")) as r:
        yield Stubs(ScoringServiceStub(s), ProfileServiceStub(p), RewardsServiceStub(r))


@dataclass
class StackStubs:
    """Stubs of all four services of a stack."""

    profile: ProfileServiceStub
    rewards: RewardsServiceStub
    risk: RiskServiceStub
    scoring: ScoringServiceStub


@asynccontextmanager
async def stack_stubs(stack: Stack) -> AsyncIterator[StackStubs]:
    channels = {name: grpc.aio.insecure_channel(stack.address(name)) for name in STACK}
    try:
        yield StackStubs(ProfileServiceStub(channels["profile"]), RewardsServiceStub(channels["rewards"]),
                         RiskServiceStub(channels["risk"]), ScoringServiceStub(channels["scoring"]))
    finally:
        for channel in channels.values():
            await channel.close()


@pytest.fixture
def operator(admin: Any) -> Any:
    """An operator of tier policies: the development admin (the root conftest's `admin`)."""
    return admin


@pytest.fixture
def analyst(dev_tokens: dict[str, str]) -> Any:
    return bearer(dev_tokens["analyst"])


def purchase(member_id: str, amount_minor: int, at: datetime, order_id: str | None = None
             ) -> event_pb2.BehaviourEvent:
    event = event_pb2.BehaviourEvent(event_id=uid("e"), member_id=member_id, channel=2)
    event.occurred_at.FromDatetime(at)
    event.purchase.order_id = order_id or uid("o")
    event.purchase.amount.amount_minor = amount_minor
    event.purchase.amount.currency = "CNY"
    return event


def refund(member_id: str, order_id: str, amount_minor: int, at: datetime) -> event_pb2.BehaviourEvent:
    event = event_pb2.BehaviourEvent(event_id=uid("e"), member_id=member_id, channel=2)
    event.occurred_at.FromDatetime(at)
    event.refund.order_id = order_id
    event.refund.amount.amount_minor = amount_minor
    event.refund.amount.currency = "CNY"
    return event


async def record(stubs: Stubs, metadata: Any, events: list[event_pb2.BehaviourEvent]) -> None:
    for start in range(0, len(events), 1000):
        reply = await stubs.profile.BatchRecordEvents(
            P.BatchRecordEventsRequest(events=events[start:start + 1000], create_unknown_members=True),
            metadata=metadata, timeout=30)
        assert all(r.status == event_pb2.EVENT_STATUS_ACCEPTED for r in reply.results), reply.results


def policy(policy_id: str, rule: str = "quantile", **overrides: Any) -> policy_pb2.Policy:
    """A three-tier policy on order count and net spend (log1p) and browse minutes."""
    message = policy_pb2.Policy(
        policy_id=policy_id, display_name="Tiers", description="test policy",
        features=[
            policy_pb2.PolicyFeature(feature_name="purchase_count_365d", weight=0.5,
                                     transform=policy_pb2.FeatureTransform(kind=policy_pb2.TRANSFORM_KIND_LOG1P)),
            policy_pb2.PolicyFeature(feature_name="net_spend_365d", weight=0.3,
                                     transform=policy_pb2.FeatureTransform(kind=policy_pb2.TRANSFORM_KIND_LOG1P)),
            policy_pb2.PolicyFeature(feature_name="browse_minutes_90d", weight=0.2,
                                     transform=policy_pb2.FeatureTransform(kind=policy_pb2.TRANSFORM_KIND_IDENTITY)),
        ],
        tiers=[policy_pb2.Tier(tier_id="regular", display_name="Regular"),
               policy_pb2.Tier(tier_id="silver", display_name="Silver",
                               localized_names=[policy_pb2.LocalizedText(language_tag="zh-CN", text="白银会员")]),
               policy_pb2.Tier(tier_id="gold", display_name="Gold",
                               localized_names=[policy_pb2.LocalizedText(language_tag="zh-CN", text="黄金会员")])],
        schedule=policy_pb2.Schedule(kind=policy_pb2.SCHEDULE_KIND_MANUAL))
    if rule == "quantile":
        message.quantile.target_share_bps.extend([6000, 3000, 1000])
    else:
        message.fixed.min_scores.extend([3.0, 4.5])
    for name, value in overrides.items():
        if isinstance(value, policy_pb2.Hysteresis):
            message.hysteresis.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def long_ago(days: int) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)
