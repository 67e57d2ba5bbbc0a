"""Operator commands of `loyalty` that call the running services over gRPC.

Each command resolves its service address (`--addr`, else the configured one) and bearer token
(`--token`, else $LOYALTY_TOKEN, else the development `admin` token of the state folder), calls the
generated stub through the shared client (deadlines, retries of idempotent RPCs, TLS when
configured), and prints a human table, or the response as proto3 JSON with `--json`.

Exit codes: 0 done (and, for checks, passed), 1 the check found problems, 2 the request was
refused (bad input, not found, not allowed: the message names the field or reason), 3 the service
could not be reached or did not answer in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message

from libs.clients import open_channel
from libs.errors import details_from_rpc_error
from libs.settings import Settings, get_settings
from loyalty.rewards.v1 import ledger_pb2, rewards_pb2, rewards_pb2_grpc

EXIT_OK, EXIT_CHECK_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2, 3
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

Reply = TypeVar("Reply")
REWARDS = rewards_pb2.DESCRIPTOR.services_by_name["RewardsService"]


class CommandError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def resolve_token(args: argparse.Namespace, settings: Settings) -> str:
    if getattr(args, "token", None):
        return str(args.token)
    if os.environ.get("LOYALTY_TOKEN"):
        return os.environ["LOYALTY_TOKEN"]
    path = settings.state_dir / "dev-tokens.json"
    if path.exists():
        token = json.loads(path.read_text()).get("admin")
        if token:
            return str(token)
    raise CommandError(f"no token: pass --token, set LOYALTY_TOKEN, or run `loyalty up` (creates {path})",
                       EXIT_REFUSED)


def call(args: argparse.Namespace, service: str, stub_class: Any, descriptor: Any,
         request: Callable[[Any], Awaitable[Reply]]) -> Reply:
    """Run one RPC against `service` (or a few on one channel: `request` gets the stub and may make
    several calls); a failure becomes a CommandError with a readable message."""
    settings = get_settings()
    address = getattr(args, "addr", None) or settings.addr_for(service)
    token = resolve_token(args, settings)

    async def run() -> Reply:
        channel = open_channel(address, settings, [descriptor], token=token)
        try:
            return await request(stub_class(channel))
        finally:
            await channel.close(None)

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as error:
        raise CommandError(describe_rpc_error(error, service, address),
                           EXIT_UNREACHABLE if error.code() in _UNREACHABLE else EXIT_REFUSED) from None


def describe_rpc_error(error: grpc.aio.AioRpcError, service: str, address: str) -> str:
    if error.code() in _UNREACHABLE:
        return f"{service} did not answer at {address} ({error.code().name}); is the suite running (`loyalty status`)?"
    details = details_from_rpc_error(error)
    lines = [f"{error.code().name}: {error.details()}" + (f" [{details.reason}]" if details.reason else "")]
    lines += [f"  {v.field}: {v.description}" for v in details.violations]
    return "\n".join(lines)


def as_json(message: Message) -> str:
    """Proto3 JSON with every field, false and zero included: scripts should not guess defaults."""
    return json_format.MessageToJson(message, indent=2, always_print_fields_with_no_presence=True)


def as_dict(message: Message) -> dict[str, Any]:
    """The same proto3 JSON as a dict, for a --json document made of several messages."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(tuple("-" * w for w in widths)),
                      *(line(tuple(str(c) for c in r)) for r in rows)])


def details(pairs: Sequence[tuple[str, object]], indent: str = "  ") -> str:
    """Aligned `label  value` lines for one record (a member, a case); empty values show as '-'."""
    width = max((len(label) for label, _ in pairs), default=0)
    return "\n".join(f"{indent}{label:<{width}}  {value if value not in ('', None) else '-'}".rstrip()
                     for label, value in pairs)


def label(enum: Any, value: int) -> str:
    """An enum value by name without its type prefix (CHANNEL_APP -> APP); '-' when unspecified."""
    if value == 0:
        return "-"
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(enum.Name(0).removesuffix("UNSPECIFIED"))


def timestamp(value: timestamp_pb2.Timestamp) -> str:
    """UTC time to the second; '-' when unset."""
    if not value.seconds and not value.nanos:
        return "-"
    return f"{value.ToDatetime(UTC):%Y-%m-%d %H:%M:%S}"


def parse_time(text: str) -> datetime:
    """ISO 8601 date or date-time (2025-06-30, 2025-06-30T12:00:00+08:00); without an offset, UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO 8601 date or time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def time_argument(text: str) -> datetime:
    """argparse type of --as-of and the like."""
    try:
        return parse_time(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def money(amount_minor: int, currency: str) -> str:
    return f"{amount_minor / 100:,.2f} {currency}"


def duration(value: duration_pb2.Duration) -> str:
    """A duration as 2d3h, 3h12m, 4m5s or 1.25s."""
    seconds = value.seconds + value.nanos / 1e9
    if seconds < 60:
        return f"{seconds:.2f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    return f"{hours}h{minutes}m" if hours else f"{minutes}m{secs}s"


def positive_int(text: str) -> int:
    """argparse type of --limit and the like."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def new_request_id() -> str:
    """An idempotency key for one invocation (commands that write take --request-id to retry one)."""
    return f"cli-{uuid.uuid4().hex}"


def list_command(args: argparse.Namespace, service: str, stub_class: Any, descriptor: Any, rpc: str,
                 request: Message, field: str, empty: str, render: Callable[[list[Any]], str],
                 page_max: int = 1000) -> int:
    """A paginated list RPC (`page_size` / `page_token` in, `field` and `next_page_token` out) read
    page by page up to --limit items on one channel; printed as the list response with them all
    (--json), `empty`, or `render(items)`."""
    kind: list[type[Message]] = []
    paged: Any = request

    async def collect(stub: Any) -> list[Any]:
        items: list[Any] = []
        token = ""
        while len(items) < args.limit:
            paged.page_size = min(page_max, args.limit - len(items))
            paged.page_token = token
            reply = await getattr(stub, rpc)(request, timeout=args.timeout)
            kind[:] = [type(reply)]
            items.extend(getattr(reply, field))
            token = reply.next_page_token
            if not token:
                break
        return items[:args.limit]

    found = call(args, service, stub_class, descriptor, collect)
    if args.json:
        response = kind[0]()
        getattr(response, field).extend(found)
        print(as_json(response))
    else:
        print(render(found) if found else empty)
    return EXIT_OK


# ---- reconcile ---------------------------------------------------------------------------------


def _cmd_reconcile(args: argparse.Namespace) -> int:
    request = rewards_pb2.ReconcileRequest(member_ids=args.member or [], max_discrepancies=args.max)
    reply = call(args, "rewards", rewards_pb2_grpc.RewardsServiceStub, REWARDS,
                 lambda stub: stub.Reconcile(request, timeout=args.timeout))
    report = reply.report
    if args.json:
        print(as_json(report))
    else:
        print(reconcile_text(report))
    return EXIT_OK if report.balanced else EXIT_CHECK_FAILED


def reconcile_text(report: ledger_pb2.ReconciliationReport) -> str:
    t = report.totals
    verdict = "BALANCED" if report.balanced else f"NOT BALANCED: {report.discrepancy_count} discrepancies"
    lines = [
        f"Ledger reconciliation as of {report.as_of.ToDatetime(UTC):%Y-%m-%d %H:%M:%S} UTC: {verdict}",
        f"  {report.members_checked:,} members, {report.entries_checked:,} entries checked",
        "",
        table([("issued", f"{t.issued_points:,}"), ("posted (outstanding)", f"{t.outstanding_posted_points:,}"),
               ("pending", f"{t.pending_points:,}"), ("held", f"{t.held_points:,}"),
               ("voided", f"{t.voided_points:,}"), ("expired", f"{t.expired_points:,}"),
               ("redeemed", f"{t.redeemed_points:,}"), ("reversed", f"{t.reversed_points:,}"),
               ("adjusted out", f"{t.adjusted_out_points:,}"), ("reserved", f"{t.reserved_points:,}"),
               ("debt", f"{t.debt_points:,}")], ("points", "total")),
        "",
        "issued = posted + pending + held + voided + expired + redeemed + reversed + adjusted out: "
        + ("holds" if report.issuance_identity_holds else "DOES NOT HOLD"),
        f"Outstanding liability: {report.liability.outstanding_points:,} points"
        + "".join(f", {money(m.amount_minor, m.currency)}" for m in report.liability.outstanding_value),
    ]
    if report.liability.by_expiry_month:
        lines += ["", table([(f"{b.month_start.ToDatetime(UTC):%Y-%m}", f"{b.points:,}")
                             for b in report.liability.by_expiry_month], ("expires in", "points"))]
    if report.discrepancies:
        lines += ["", table([(d.member_id or "(programme)", ledger_pb2.DiscrepancyKind.Name(d.kind)
                              .removeprefix("DISCREPANCY_KIND_"), f"{d.expected:,}", f"{d.actual:,}", d.detail)
                             for d in report.discrepancies], ("member", "check", "expected", "actual", "detail"))]
        if report.discrepancy_count > len(report.discrepancies):
            lines.append(f"... and {report.discrepancy_count - len(report.discrepancies)} more (--max)")
    return "\n".join(lines)


def add_connection_options(command: argparse.ArgumentParser, timeout_s: float = 120.0) -> None:
    command.add_argument("--addr", help="host:port of the service (default: the configured address)")
    command.add_argument("--token", help="bearer token (default: $LOYALTY_TOKEN, else the dev admin token)")
    command.add_argument("--json", action="store_true", help="print the response as JSON")
    command.add_argument("--timeout", type=float, default=timeout_s, help="seconds to wait for the answer")


def add_group(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
              ) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """A command group (`loyalty members ...`): its actions are added to the returned subparsers."""
    group = sub.add_parser(name, help=help_text, description=_wrapped(f"{help_text}\n\n{EXIT_CODES_HELP}"),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    return group.add_subparsers(dest="action", required=True, metavar="ACTION")


def add_action(actions: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
               func: Callable[[argparse.Namespace], int], help_text: str, description: str = "",
               timeout_s: float = 30.0) -> argparse.ArgumentParser:
    """One action of a group, with the connection options; the caller adds its own arguments."""
    action = actions.add_parser(name, help=help_text, description=_wrapped(description or help_text),
                                epilog=_wrapped(EXIT_CODES_HELP), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_options(action, timeout_s)
    action.set_defaults(func=func)
    return action


def _wrapped(text: str, width: int = 100) -> str:
    """Help text with its one-line paragraphs filled; paragraphs of several lines (examples,
    column lists) are kept as written."""
    return "\n\n".join(paragraph if "\n" in paragraph else textwrap.fill(paragraph, width)
                       for paragraph in text.split("\n\n"))


EXIT_CODES_HELP = ("exit codes: 0 done, 1 the check or the job failed, 2 refused (bad input, not found, "
                   "not allowed), 3 the service is unreachable")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reconcile = sub.add_parser("reconcile", help="check every balance against its ledger entries; report liability",
                               description="Exit 0 when the ledger balances, 1 when discrepancies are found.")
    reconcile.add_argument("--member", action="append", metavar="MEMBER_ID", help="check only this member (repeat)")
    reconcile.add_argument("--max", type=int, default=0, help="most discrepancies listed (0 = 100); all are counted")
    add_connection_options(reconcile)
    reconcile.set_defaults(func=_cmd_reconcile)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return func(args)
    except CommandError as error:
        name = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
        print(f"loyalty {name}: {error}", file=sys.stderr)
        return error.code
