"""`loyalty demo load` (and `loyalty up` on a fresh state folder): send the demo population
(tools/demo.py) through the running services, as a shop would, then make it visible:

1. members through profile CreateMember (idempotent per member: loading again creates nothing);
2. events through profile BatchRecordEvents, 1,000 a call in time order; profile's outbox hands
   purchases and refunds to rewards, which prices them and asks risk before granting a point;
3. wait until profile's outbox has delivered everything;
4. scoring: the demo policy (tools/commands/policies.EXAMPLE) created and activated when no
   policy is active, an evaluation run and applied, segments built;
5. a summary: members by tier, open review cases, where to look.

Everything goes through the public RPCs with the caller's token, so the demo exercises the same
paths as production traffic (and what it loads can be erased like any other data).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format

from libs.clients import open_channel
from libs.settings import Settings, get_settings
from loyalty.profile.v1 import event_pb2, profile_service_pb2, profile_service_pb2_grpc
from loyalty.risk.v1 import cases_pb2, risk_pb2, risk_pb2_grpc
from loyalty.scoring.v1 import policy_pb2, scoring_service_pb2, scoring_service_pb2_grpc
from tools.commands.policies import EXAMPLE
from tools.demo import Population, generate
from tools.ops import EXIT_OK, EXIT_REFUSED, CommandError, add_action, add_group, resolve_token, table

PROFILE = profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"]
SCORING = scoring_service_pb2.DESCRIPTOR.services_by_name["ScoringService"]
RISK = risk_pb2.DESCRIPTOR.services_by_name["RiskService"]
MARKER = "demo.json"
SEGMENT_FEATURES = ["purchase_count_90d", "net_spend_90d", "browse_minutes_30d", "days_since_last_activity"]


@dataclass
class LoadSummary:
    members: int = 0  # created, or there already (CreateMember is idempotent per member)
    events: Counter[str] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)
    pipeline_drained: bool = False
    policy: str = ""
    evaluation_id: str = ""
    tiers: dict[str, int] = field(default_factory=dict)
    segments: int = 0
    open_cases: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"members": self.members, "events": dict(self.events), "rejections": dict(self.rejections),
                "pipeline_drained": self.pipeline_drained, "policy": self.policy,
                "evaluation_id": self.evaluation_id, "tiers": self.tiers, "segments": self.segments,
                "open_cases": self.open_cases, "seconds": round(self.seconds, 1)}


def demo_policy() -> policy_pb2.Policy:
    return json_format.ParseDict(yaml.safe_load(EXAMPLE), policy_pb2.Policy())


async def _bounded(calls: Sequence[Callable[[], Awaitable[None]]], at_once: int) -> None:
    gate = asyncio.Semaphore(at_once)

    async def one(call: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            await call()

    await asyncio.gather(*(one(c) for c in calls))


class Loader:
    def __init__(self, settings: Settings, token: str, say: Callable[[str], None],
                 address: Callable[[str], str] | None = None) -> None:
        """`address` maps a service name to host:port (default: the configured addresses)."""
        self.settings = settings
        self.say = say
        where = address or settings.addr_for
        self.channels = [open_channel(where(name), settings, [descriptor], token=token)
                         for name, descriptor in (("profile", PROFILE), ("scoring", SCORING), ("risk", RISK))]
        self.profile = profile_service_pb2_grpc.ProfileServiceStub(self.channels[0])
        self.scoring = scoring_service_pb2_grpc.ScoringServiceStub(self.channels[1])
        self.risk = risk_pb2_grpc.RiskServiceStub(self.channels[2])

    async def load(self, population: Population, drain_timeout_s: float = 180.0) -> LoadSummary:
        started = time.monotonic()
        summary = LoadSummary()
        await self._members(population, summary)
        await self._events(population, summary)
        summary.pipeline_drained = await self.drain(drain_timeout_s)
        await self._tiers_and_segments(summary)
        cases = await self.risk.ListCases(
            risk_pb2.ListCasesRequest(statuses=[cases_pb2.CASE_STATUS_OPEN], page_size=500), timeout=30)
        summary.open_cases = len(cases.cases)
        summary.seconds = time.monotonic() - started
        return summary

    async def _members(self, population: Population, summary: LoadSummary) -> None:
        self.say(f"creating {len(population.members)} members")

        def create(member: Any) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                try:
                    await self.profile.CreateMember(profile_service_pb2.CreateMemberRequest(
                        request_id=f"{member.member_id}-create", member=member), timeout=30)
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.ALREADY_EXISTS:  # created by an earlier load
                        raise
                summary.members += 1
            return run

        await _bounded([create(m.member) for m in population.members], at_once=16)

    async def _events(self, population: Population, summary: LoadSummary) -> None:
        events = population.events
        self.say(f"recording {len(events):,} behaviour events")
        # Two batches are in flight at once: refunds go last, so none arrives before its order.
        refunds = [e for e in events if e.WhichOneof("payload") == "refund"]
        others = [e for e in events if e.WhichOneof("payload") != "refund"]

        def send(batch: list[event_pb2.BehaviourEvent]) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                reply = await self.profile.BatchRecordEvents(
                    profile_service_pb2.BatchRecordEventsRequest(events=batch), timeout=120)
                for result in reply.results:
                    status = event_pb2.EventStatus.Name(result.status).removeprefix("EVENT_STATUS_").lower()
                    summary.events[status] += 1
                    if result.status == event_pb2.EVENT_STATUS_REJECTED:
                        summary.rejections[event_pb2.EventRejectReason.Name(result.reject_reason)] += 1
            return run

        for part in (others, refunds):
            await _bounded([send(part[i:i + 1000]) for i in range(0, len(part), 1000)], at_once=2)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until profile's outbox has handed every purchase and refund on (rewards, risk)."""
        self.say("waiting for points and risk decisions")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = await self.profile.GetOutboxStatus(profile_service_pb2.GetOutboxStatusRequest(), timeout=10)
            if status.pending_count == 0 and status.retrying_count == 0:
                return True
            await asyncio.sleep(0.5)
        return False

    async def _tiers_and_segments(self, summary: LoadSummary) -> None:
        try:
            active = (await self.scoring.GetActivePolicy(scoring_service_pb2.GetActivePolicyRequest(),
                                                         timeout=10)).policy
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            policy = demo_policy()
            created = (await self.scoring.CreatePolicy(scoring_service_pb2.CreatePolicyRequest(
                request_id=f"demo-policy-{policy.policy_id}", policy=policy), timeout=30)).policy
            self.say(f"activating the demo tier policy {created.policy_id}/{created.version}")
            active = (await self.scoring.ActivatePolicy(scoring_service_pb2.ActivatePolicyRequest(
                request_id=f"demo-activate-{created.policy_id}-{created.version}", policy_id=created.policy_id,
                version=created.version), timeout=30)).policy
        summary.policy = f"{active.policy_id}/{active.version}"
        self.say(f"evaluating tiers with {summary.policy}")
        run = (await self.scoring.RunEvaluation(scoring_service_pb2.RunEvaluationRequest(
            request_id=f"demo-evaluation-{time.time_ns()}", wait=True), timeout=300)).run
        summary.evaluation_id = run.run_id
        summary.tiers = {c.tier_id: c.count for c in run.tier_counts}
        segments = await self.scoring.BuildSegments(scoring_service_pb2.BuildSegmentsRequest(
            request_id=f"demo-segments-{time.time_ns()}", feature_names=SEGMENT_FEATURES, k_min=3, k_max=6),
            timeout=300)
        summary.segments = len(segments.segments)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)


def summary_text(summary: LoadSummary, settings: Settings) -> str:
    lines = [f"demo loaded in {summary.seconds:.0f} s: {summary.members} members",
             "events: " + ", ".join(f"{k} {v:,}" for k, v in sorted(summary.events.items()))]
    if summary.rejections:
        lines.append("rejected: " + ", ".join(f"{k} {v}" for k, v in summary.rejections.most_common()))
    if not summary.pipeline_drained:
        lines.append("note: profile's outbox was still delivering when the wait ended; points keep arriving")
    lines.append(f"tiers ({summary.policy}, evaluation {summary.evaluation_id}):")
    lines.append(table([[tier, str(n)] for tier, n in summary.tiers.items()], ["tier", "members"]))
    lines.append(f"segments: {summary.segments}; open review cases: {summary.open_cases}")
    return "\n".join(lines)


def marker_path(settings: Settings) -> Path:
    return settings.state_dir / MARKER


def load_demo(settings: Settings, token: str, *, seed: int, members: int, days: int, rings: int,
              say: Callable[[str], None]) -> LoadSummary:
    """Generate and load the population, then leave a marker in the state folder."""
    say(f"generating the demo population (seed {seed}, {members} members, {days} days)")
    population = generate(seed=seed, members=members, days=days, rings=rings)

    async def run() -> LoadSummary:
        loader = Loader(settings, token, say)
        try:
            return await loader.load(population)
        finally:
            await loader.close()

    summary = asyncio.run(run())
    marker_path(settings).write_text(json.dumps({"seed": seed, "members": members, "days": days, "rings": rings,
                                                 **summary.as_dict()}, indent=2))
    return summary


def load_on_first_start(settings: Settings, members: int = 1000, days: int = 90) -> None:
    """`loyalty up`: load the demo once per state folder; a failure is reported, never fatal."""
    if marker_path(settings).exists():
        print(f"demo data: already loaded ({marker_path(settings)}); `loyalty demo load` loads more", flush=True)
        return
    try:
        token = resolve_token(argparse.Namespace(token=None), settings)
        summary = load_demo(settings, token, seed=7, members=members, days=days, rings=3,
                            say=lambda text: print(f"demo: {text}", flush=True))
    except (CommandError, grpc.RpcError, OSError) as error:
        print(f"demo data: not loaded ({error}); the services keep running", file=sys.stderr, flush=True)
        return
    print(summary_text(summary, settings), flush=True)


def _cmd_load(args: argparse.Namespace) -> int:
    settings = get_settings()
    token = resolve_token(args, settings)

    def say(text: str) -> None:
        if not args.json:
            print(text, file=sys.stderr, flush=True)

    try:
        summary = load_demo(settings, token, seed=args.seed, members=args.members, days=args.days,
                            rings=args.rings, say=say)
    except ValueError as error:
        raise CommandError(str(error), EXIT_REFUSED) from None
    print(json.dumps(summary.as_dict(), indent=2) if args.json else summary_text(summary, settings))
    return EXIT_OK


def _cmd_generate(args: argparse.Namespace) -> int:
    try:
        population = generate(seed=args.seed, members=args.members, days=args.days, rings=args.rings)
    except ValueError as error:
        raise CommandError(str(error), EXIT_REFUSED) from None
    with open(args.out, "w", encoding="utf-8") as out:
        for event in population.events:
            out.write(json_format.MessageToJson(event, indent=None) + "\n")
    print(f"{len(population.events):,} events of {len(population.members)} members written to {args.out}"
          f" (load the members first: `loyalty events import` needs --create-unknown-members otherwise)")
    return EXIT_OK


def _population_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--seed", type=int, default=7, help="same seed, same population (default 7)")
    command.add_argument("--members", type=int, default=1000, help="members besides the fraud rings (default 1000)")
    command.add_argument("--days", type=int, default=90, help="days of history before now (default 90)")
    command.add_argument("--rings", type=int, default=3, help="fraud rings of 5-8 new accounts (default 3)")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = add_group(sub, "demo", "the demo population: members, months of behaviour, a few fraud rings")
    load = add_action(actions, "load", _cmd_load, "generate the population and send it through the running services",
                      timeout_s=600)
    _population_options(load)
    generate_ = actions.add_parser("generate", help="write the population's events as JSONL (nothing is sent)")
    _population_options(generate_)
    generate_.add_argument("--out", required=True, help="the JSONL file to write")
    generate_.set_defaults(func=_cmd_generate)
