"""Mixed load on the whole suite: the demo population's shoppers, live, with everything else an
operator and a shop do at the same time, then the books checked.

At a target rate of operations a second (open loop, for a set time), each operation one of:
- a shopping session: its events (views, browsing, searches, carts, an order) sent to profile's
  BatchRecordEvents with fresh ids and current times; profile's outbox hands orders and browsing to
  rewards, which asks risk before granting a point;
- a refund of an order of this run, as an event (rewards reverses the points);
- a redemption of 100-300 points (rewards Redeem; "not enough points" is an answer, not an error);
- a balance read (GetBalance), an online score (scoring ScoreMember), a review (risk ListCases,
  then ResolveCase on the oldest open case).
Reported per RPC: calls, errors by status code, business refusals, p50 / p99 / max (latency counts
from the operation's scheduled start). Then, once profile's outbox is drained: rewards' Reconcile
over the run's members must balance, and every accepted order must have its accrual entry.

    .venv/bin/python -m bench.load [--rate 100] [--seconds 30] [--members 300]
    .venv/bin/python -m bench.load --find-max   # the highest rate held with every p99 under 100 ms

Everything runs on loopback against real processes on a throw-away database (tests/reliability
runs a short, bounded load in CI through `run_load`).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from bench.harness import database, open_loop, percentile, service
from libs.auth import ensure_dev_tokens
from libs.errors import details_from_rpc_error
from libs.settings import SERVICE_NAMES, get_settings
from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import event_pb2, profile_service_pb2
from loyalty.rewards.v1 import ledger_pb2, rewards_pb2, rewards_pb2_grpc
from loyalty.risk.v1 import cases_pb2, risk_pb2
from loyalty.scoring.v1 import scoring_service_pb2
from tests.support.processes import free_port
from tools.commands.demo import Loader, LoadSummary
from tools.demo import Population, generate

P99_LIMIT_MS = 100.0
HISTORY_DAYS = 30  # loaded before the run: older orders have posted points to redeem
WEIGHTS = {"session": 50, "refund": 5, "redeem": 10, "balance": 15, "score": 15, "review": 5}
ACCRUAL_ENTRY_TYPES = (ledger_pb2.LEDGER_ENTRY_TYPE_CREDIT, ledger_pb2.LEDGER_ENTRY_TYPE_PENDING,
                       ledger_pb2.LEDGER_ENTRY_TYPE_HOLD, ledger_pb2.LEDGER_ENTRY_TYPE_VOID)
BUSINESS = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED}


@dataclass
class RpcStats:
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)

    def line(self, name: str) -> str:
        lat = self.latencies_ms
        figures = (f"p50 {percentile(lat, 50):6.1f} ms  p99 {percentile(lat, 99):6.1f} ms  max {max(lat):7.1f} ms"
                   if lat else "no answers")
        errors = ", ".join(f"{k} {v}" for k, v in self.errors.items()) or "none"
        refusals = ", ".join(f"{k} {v}" for k, v in self.refusals.items())
        return (f"  {name:26s} {len(lat):6d} answered  {figures}  errors: {errors}"
                + (f"  refused: {refusals}" if refusals else ""))


@dataclass
class Report:
    rate: float
    seconds: float
    achieved: float = 0.0
    rpcs: dict[str, RpcStats] = field(default_factory=lambda: defaultdict(RpcStats))
    events_accepted: int = 0
    orders: int = 0
    redeemed: int = 0
    drained: bool = False
    balanced: bool = False
    issuance_identity: bool = False
    orders_without_entry: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(sum(s.errors.values()) for s in self.rpcs.values())

    @property
    def worst_p99_ms(self) -> float:
        return max((percentile(s.latencies_ms, 99) for s in self.rpcs.values() if s.latencies_ms), default=0.0)

    @property
    def books_ok(self) -> bool:
        return self.drained and self.balanced and self.issuance_identity and not self.orders_without_entry

    def text(self) -> str:
        lines = [f"load at {self.rate:.0f} ops/s for {self.seconds:.0f} s: achieved {self.achieved:.0f} ops/s,"
                 f" {self.events_accepted:,} events accepted, {self.orders} orders, {self.redeemed} redemptions"]
        lines += [stats.line(name) for name, stats in sorted(self.rpcs.items())]
        lines.append(f"  outbox drained: {self.drained}; Reconcile balanced: {self.balanced}, issuance identity:"
                     f" {self.issuance_identity}; orders without their accrual entry: {len(self.orders_without_entry)}")
        return "\n".join(lines)


class Sessions:
    """The population's shopping sessions, endlessly, re-stamped to now with fresh ids."""

    def __init__(self, population: Population, run_id: str) -> None:
        grouped: dict[str, list[event_pb2.BehaviourEvent]] = defaultdict(list)
        for event in population.events:
            if event.WhichOneof("payload") != "refund":
                grouped[event.session_id or event.event_id].append(event)
        self.templates = list(grouped.values())
        self.run_id = run_id
        self.count = 0

    def next(self) -> list[event_pb2.BehaviourEvent]:
        template = self.templates[self.count % len(self.templates)]
        self.count += 1
        now = datetime.now(UTC)
        base = template[-1].occurred_at.ToDatetime(UTC)
        out = []
        for n, source in enumerate(template):
            event = event_pb2.BehaviourEvent()
            event.CopyFrom(source)
            event.event_id = f"{self.run_id}-{self.count}-{n}"
            event.session_id = f"{self.run_id}-s{self.count}"
            event.occurred_at.FromDatetime(now - (base - source.occurred_at.ToDatetime(UTC)))
            if event.WhichOneof("payload") == "purchase":
                event.purchase.order_id = f"{self.run_id}-o{self.count}"
            out.append(event)
        return out


class LoadRun:
    """One run against running services (`address` maps a service name to host:port)."""

    def __init__(self, address: Callable[[str], str], token: str, population: Population, seed: int = 1) -> None:
        self.loader = Loader(get_settings(), token, lambda _text: None, address=address)
        self.rewards_channel = grpc.aio.insecure_channel(address("rewards"))
        self.rewards = rewards_pb2_grpc.RewardsServiceStub(self.rewards_channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.population = population
        self.members = [m.member.member_id for m in population.members]
        self.rng = random.Random(seed)
        self.run_id = f"load{uuid.uuid4().hex[:8]}"
        self.sessions = Sessions(population, self.run_id)
        self.orders: list[tuple[str, str, int, str]] = []  # member, order id, amount, source event id
        self.refunded: set[str] = set()

    async def prepare(self) -> LoadSummary:
        """Members in, their history loaded, tiers evaluated: what the operations need."""
        return await self.loader.load(self.population, drain_timeout_s=120)

    async def _timed(self, report: Report, name: str, call: Awaitable[Any], scheduled: float) -> Any:
        stats = report.rpcs[name]
        try:
            answer = await call
        except grpc.aio.AioRpcError as error:
            if error.code() in BUSINESS:
                stats.refusals[details_from_rpc_error(error).reason or error.code().name] += 1
                stats.latencies_ms.append((time.perf_counter() - scheduled) * 1e3)
            else:
                stats.errors[error.code().name] += 1
            return None
        stats.latencies_ms.append((time.perf_counter() - scheduled) * 1e3)
        return answer

    async def _session(self, report: Report, scheduled: float) -> None:
        await self._send(report, "BatchRecordEvents", self.sessions.next(), scheduled)

    async def _send(self, report: Report, name: str, events: list[event_pb2.BehaviourEvent],
                    scheduled: float) -> None:
        """One BatchRecordEvents call for `events`, timed as `name`."""
        reply = await self._timed(report, name, self.loader.profile.BatchRecordEvents(
            profile_service_pb2.BatchRecordEventsRequest(events=events), timeout=10), scheduled)
        if reply is not None:
            self._record(report, events, reply, {event_pb2.EVENT_STATUS_ACCEPTED})

    def _record(self, report: Report, events: list[event_pb2.BehaviourEvent],
                reply: profile_service_pb2.BatchRecordEventsResponse, stored: set[event_pb2.EventStatus.ValueType]
                ) -> list[event_pb2.BehaviourEvent]:
        """Count the events `reply` answered with a status in `stored`, note the orders among them,
        and return them."""
        by_id = {e.event_id: e for e in events}
        kept = [by_id[r.event_id] for r in reply.results if r.status in stored]
        report.events_accepted += len(kept)
        for e in kept:
            if e.WhichOneof("payload") == "purchase":
                self.orders.append((e.member_id, e.purchase.order_id, e.purchase.amount.amount_minor, e.event_id))
        return kept

    def refund_event(self) -> event_pb2.BehaviourEvent | None:
        """A refund of half of an order of this run not refunded yet (not one of the last 20, whose
        points may still be on their way), or None."""
        candidates = [o for o in self.orders[:-20] if o[1] not in self.refunded]
        if not candidates:
            return None
        member, order_id, amount, _ = self.rng.choice(candidates)
        self.refunded.add(order_id)
        event = event_pb2.BehaviourEvent(event_id=f"{self.run_id}-r-{order_id}", member_id=member,
                                         channel=types_pb2.CHANNEL_APP, session_id=f"{self.run_id}-refunds")
        event.occurred_at.FromDatetime(datetime.now(UTC))
        event.refund.order_id = order_id
        event.refund.amount.amount_minor, event.refund.amount.currency = max(1, amount // 2), "CNY"
        return event

    async def _refund(self, report: Report, scheduled: float) -> None:
        event = self.refund_event()
        if event is None:
            return await self._balance(report, scheduled)
        await self._send(report, "BatchRecordEvents(refund)", [event], scheduled)

    async def _redeem(self, report: Report, scheduled: float) -> None:
        member = self.rng.choice(self.members)  # points of this run's orders are still pending
        answer = await self._timed(report, "Redeem", self.rewards.Redeem(rewards_pb2.RedeemRequest(
            request_id=f"{self.run_id}-{uuid.uuid4().hex}", member_id=member, points=self.rng.randint(100, 300),
            description="load"), metadata=self.metadata, timeout=10), scheduled)
        if answer is not None:
            report.redeemed += 1

    async def _balance(self, report: Report, scheduled: float) -> None:
        await self._timed(report, "GetBalance", self.rewards.GetBalance(rewards_pb2.GetBalanceRequest(
            member_id=self.rng.choice(self.members)), metadata=self.metadata, timeout=10), scheduled)

    async def _score(self, report: Report, scheduled: float) -> None:
        await self._timed(report, "ScoreMember", self.loader.scoring.ScoreMember(scoring_service_pb2.ScoreMemberRequest(
            request_id=f"{self.run_id}-{uuid.uuid4().hex}", member_id=self.rng.choice(self.members),
            mode=scoring_service_pb2.SCORE_MODE_PREVIEW), timeout=10), scheduled)

    async def _review(self, report: Report, scheduled: float) -> None:
        listed = await self._timed(report, "ListCases", self.loader.risk.ListCases(risk_pb2.ListCasesRequest(
            statuses=[cases_pb2.CASE_STATUS_OPEN], page_size=5), timeout=10), scheduled)
        if listed is None or not listed.cases:
            return
        case = self.rng.choice(listed.cases)
        decision = cases_pb2.CASE_DECISION_APPROVE if self.rng.random() < 0.7 else cases_pb2.CASE_DECISION_REJECT
        await self._timed(report, "ResolveCase", self.loader.risk.ResolveCase(risk_pb2.ResolveCaseRequest(
            request_id=f"{self.run_id}-{uuid.uuid4().hex}", case_id=case.case_id, decision=decision,
            analyst_id="load-analyst", note="load"), timeout=10), time.perf_counter())

    async def run(self, rate: float, seconds: float) -> Report:
        report = Report(rate, seconds)
        operations = {"session": self._session, "refund": self._refund, "redeem": self._redeem,
                      "balance": self._balance, "score": self._score, "review": self._review}
        names = list(WEIGHTS)
        weights = [WEIGHTS[n] for n in names]

        async def one(scheduled: float) -> None:
            await operations[self.rng.choices(names, weights)[0]](report, scheduled)

        elapsed = await open_loop(one, rate, seconds, wait_s=60)
        report.achieved = int(rate * seconds) / elapsed
        report.orders = len(self.orders)
        await self.check(report)
        return report

    async def check(self, report: Report) -> None:
        """The books after the load: outbox drained, ledger balanced, every order accrued."""
        report.drained = await self.loader.drain(120)
        await asyncio.sleep(1.0)  # the last Accrue calls commit
        reconciled = (await self.rewards.Reconcile(rewards_pb2.ReconcileRequest(member_ids=sorted(set(
            self.members))), metadata=self.metadata, timeout=120)).report
        report.balanced, report.issuance_identity = reconciled.balanced, reconciled.issuance_identity_holds

        async def accrued(member: str, event_id: str) -> None:
            entries = await self.rewards.ListLedgerEntries(rewards_pb2.ListLedgerEntriesRequest(
                member_id=member, source_event_id=event_id, types=ACCRUAL_ENTRY_TYPES, page_size=10),
                metadata=self.metadata, timeout=30)
            if not entries.entries:
                report.orders_without_entry.append(event_id)

        for chunk in range(0, len(self.orders), 50):
            await asyncio.gather(*(accrued(m, e) for m, _, _, e in self.orders[chunk:chunk + 50]))

    async def close(self) -> None:
        await self.loader.close()
        await self.rewards_channel.close(None)


async def run_load(address: Callable[[str], str], token: str, rate: float, seconds: float, members: int,
                   seed: int = 1) -> Report:
    """Prepare a population of `members` and run one load (what the CI test calls)."""
    population = generate(seed=seed, members=members, days=HISTORY_DAYS, rings=1)
    load = LoadRun(address, token, population, seed)
    try:
        await load.prepare()
        return await load.run(rate, seconds)
    finally:
        await load.close()


@contextmanager
def suite(state_dir: Path) -> Iterator[Callable[[str], str]]:
    """The four services on a throw-away database, each knowing where the others are."""
    ports: dict[str, int] = {name: free_port() for name in SERVICE_NAMES}
    env = {f"LOYALTY_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in ports.items()}
    with database() as dsn, ExitStack() as stack:
        for name in ("risk", "rewards", "profile", "scoring"):
            stack.enter_context(service(name, dsn, state_dir, port=ports[name], **env))
        yield lambda name: f"127.0.0.1:{ports[name]}"


async def _main(args: argparse.Namespace, address: Callable[[str], str], token: str) -> None:
    population = generate(seed=args.seed, members=args.members, days=HISTORY_DAYS, rings=1)
    load = LoadRun(address, token, population, args.seed)
    try:
        prepared = await load.prepare()
        print(f"prepared: {prepared.members} members, {sum(prepared.events.values()):,} events of a week,"
              f" tiers {prepared.tiers}")
        rates = [args.rate] if not args.find_max else [args.rate * 2 ** k for k in range(6)]
        best = 0.0
        for rate in rates:
            report = await load.run(rate, args.seconds)
            print(report.text(), flush=True)
            held = report.errors == 0 and report.books_ok and report.worst_p99_ms < P99_LIMIT_MS
            if not held:
                break
            best = rate
        if args.find_max:
            print(f"highest rate held (no errors, books balanced, every p99 < {P99_LIMIT_MS:.0f} ms): {best:.0f} ops/s")
    finally:
        await load.close()


def load_arguments(doc: str | None, rate: float, seconds: float, members: int) -> argparse.ArgumentParser:
    """The options every load-driven benchmark takes, with its defaults."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=rate, help=f"operations a second (default {rate:g})")
    parser.add_argument("--seconds", type=float, default=seconds, help=f"length of a run (default {seconds:g})")
    parser.add_argument("--members", type=int, default=members, help=f"members of the population (default {members})")
    parser.add_argument("--seed", type=int, default=1)
    return parser


def main() -> None:
    parser = load_arguments(__doc__, rate=100.0, seconds=30.0, members=300)
    parser.add_argument("--find-max", action="store_true", help="double the rate from --rate until a run fails")
    args = parser.parse_args()
    state_dir = Path(tempfile.mkdtemp(prefix="loyalty-load-"))
    token = ensure_dev_tokens(state_dir)["admin"]
    with suite(state_dir) as address:
        asyncio.run(_main(args, address, token))


if __name__ == "__main__":
    main()
