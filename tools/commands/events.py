"""`loyalty events import FILE`: load behaviour events from CSV or JSONL through profile
BatchRecordEvents, up to 1,000 events a call, and report what was accepted, duplicate or rejected
(grouped by reason). Importing a file again is safe: profile de-duplicates on event ids."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from google.protobuf import json_format

from libs.settings import get_settings
from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import event_pb2, profile_service_pb2, profile_service_pb2_grpc
from tools.ops import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    CommandError,
    add_action,
    add_group,
    call,
    label,
    parse_time,
    table,
)

PROFILE = profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"]
BATCH_MAX = 1000
UNREADABLE = "UNREADABLE_ROW"  # rejected here, before profile saw it

# CSV columns: name -> what it holds (also the command's help and the README's table).
CSV_COLUMNS = {
    "event_id": "required; unique id of the event (profile de-duplicates on it)",
    "member_id": "required",
    "occurred_at": "required; ISO 8601 time, e.g. 2025-06-30T12:00:00+08:00 (no offset: UTC)",
    "channel": "required; web, app, mini_program, store or call_center",
    "type": "required; view, browse, search, click, add_to_cart, purchase or refund",
    "device_id": "optional",
    "ip_address": "optional",
    "session_id": "optional",
    "product_id": "view, add_to_cart",
    "category": "view, browse, click, add_to_cart",
    "seconds": "browse: length in seconds",
    "query": "search: the query text",
    "target": "click: what was clicked",
    "quantity": "add_to_cart: units",
    "unit_price_minor": "add_to_cart: price of one unit in minor units (fen)",
    "order_id": "purchase, refund",
    "amount_minor": "purchase, refund: amount in minor units (fen)",
    "currency": "ISO 4217 code of the amounts; empty: the programme currency ($LOYALTY_CURRENCY)",
    "points_paid": "purchase, optional: points spent on the order",
    "shipping_minor": "purchase, optional: shipping charged, minor units",
}
REQUIRED_COLUMNS = ("event_id", "member_id", "occurred_at", "channel", "type")
CHANNELS = {label(types_pb2.Channel, v).lower(): v for v in types_pb2.Channel.values() if v}
TYPES = ("view", "browse", "search", "click", "add_to_cart", "purchase", "refund")


# ---- reading -----------------------------------------------------------------------------------


@dataclass
class Row:
    line: int
    event: event_pb2.BehaviourEvent | None
    error: str = ""


def _int(row: dict[str, str], column: str) -> int | None:
    text = row.get(column, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{column}: not a whole number: {text!r}") from None


def _money(target: Any, amount: int | None, currency: str) -> None:
    if amount is not None:
        target.amount_minor = amount
        target.currency = currency


def event_from_csv(row: dict[str, str], default_currency: str) -> event_pb2.BehaviourEvent:
    """One CSV row as an event; ValueError naming the column when a value cannot be read. Rules of
    the fields themselves (required per type, ranges) are profile's to check."""
    value = {k: (v or "").strip() for k, v in row.items() if k is not None}
    event = event_pb2.BehaviourEvent(event_id=value["event_id"], member_id=value["member_id"],
                                     device_id=value.get("device_id", ""), ip_address=value.get("ip_address", ""),
                                     session_id=value.get("session_id", ""))
    try:
        event.occurred_at.FromDatetime(parse_time(value["occurred_at"]))
    except ValueError as error:
        raise ValueError(f"occurred_at: {error}") from None
    channel = CHANNELS.get(value["channel"].lower().removeprefix("channel_"))
    if channel is None:
        raise ValueError(f"channel: unknown channel {value['channel']!r}; one of {', '.join(CHANNELS)}")
    event.channel = channel
    kind = value["type"].lower().removeprefix("event_type_")
    if kind not in TYPES:
        raise ValueError(f"type: unknown event type {value['type']!r}; one of {', '.join(TYPES)}")
    payload = getattr(event, kind)
    payload.SetInParent()
    currency = value.get("currency") or default_currency
    for column in ("product_id", "category", "query", "target", "order_id"):
        if value.get(column) and column in payload.DESCRIPTOR.fields_by_name:
            setattr(payload, column, value[column])
    seconds, quantity = _int(value, "seconds"), _int(value, "quantity")
    amount, unit_price = _int(value, "amount_minor"), _int(value, "unit_price_minor")
    points_paid, shipping = _int(value, "points_paid"), _int(value, "shipping_minor")
    if kind == "browse" and seconds is not None:
        payload.seconds = seconds
    if kind == "add_to_cart":
        payload.quantity = quantity or 0
        _money(payload.unit_price, unit_price, currency)
    if kind in ("purchase", "refund"):
        _money(payload.amount, amount, currency)
    if kind == "purchase":
        payload.points_paid = points_paid or 0
        _money(payload.shipping, shipping, currency)
    return event


def read_rows(path: Path, default_currency: str) -> Iterator[Row]:
    """Every data row of the file with its line number: an event, or why it could not be read."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(handle)
            for row in reader:
                try:
                    yield Row(reader.line_num, event_from_csv(row, default_currency))
                except ValueError as error:
                    yield Row(reader.line_num, None, str(error))
            return
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                document = json.loads(text)
                if not isinstance(document, dict):
                    raise ValueError("expected a JSON object (a loyalty.profile.v1.BehaviourEvent)")
                yield Row(number, json_format.ParseDict(document, event_pb2.BehaviourEvent()))
            except (ValueError, json_format.ParseError) as error:
                yield Row(number, None, str(error).splitlines()[0])


def check_file(path: Path) -> int:
    """Refuse what cannot be imported at all (exit 2) before anything is sent; the number of rows."""
    if path.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        raise CommandError(f"{path}: unknown format; name the file .csv or .jsonl", EXIT_REFUSED)
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if path.suffix.lower() != ".csv":
                return sum(1 for text in handle if text.strip())
            reader = csv.reader(handle)
            header = [c.strip() for c in next(reader, [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            unknown = [c for c in header if c not in CSV_COLUMNS]
            if missing or unknown:
                problems = ([f"missing column(s) {', '.join(missing)}"] if missing else []) + (
                    [f"unknown column(s) {', '.join(unknown)}"] if unknown else [])
                raise CommandError(f"{path}: {'; '.join(problems)} (see `loyalty events import --help`)",
                                   EXIT_REFUSED)
            return sum(1 for _ in reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise CommandError(f"cannot read {path}: {error}", EXIT_REFUSED) from None


# ---- sending and reporting ---------------------------------------------------------------------


@dataclass
class Rejection:
    line: int
    event_id: str
    reason: str
    field: str
    message: str


@dataclass
class Summary:
    rows: int = 0
    accepted: int = 0
    duplicate: int = 0
    flagged: int = 0
    members_created: int = 0
    rejections: list[Rejection] = field(default_factory=list)

    def add(self, lines: list[int], events: list[event_pb2.BehaviourEvent],
            reply: profile_service_pb2.BatchRecordEventsResponse) -> None:
        self.rows += len(events)
        self.accepted += reply.accepted_count
        self.duplicate += reply.duplicate_count
        self.flagged += reply.flagged_count
        self.members_created += reply.members_created
        for result in reply.results:
            if result.status == event_pb2.EVENT_STATUS_REJECTED:
                # "events[3].browse.seconds" is the batch's numbering: the file's is the line.
                where = result.field.split(".", 1)[1] if result.field.startswith("events[") and "." in result.field \
                    else result.field
                self.rejections.append(Rejection(lines[result.index], result.event_id,
                                                 label(event_pb2.EventRejectReason, result.reject_reason), where,
                                                 result.message))

    @property
    def rejected(self) -> int:
        return len(self.rejections)

    def counts(self) -> str:
        return (f"{self.accepted:,} accepted, {self.duplicate:,} duplicate, {self.rejected:,} rejected")

    def as_dict(self, path: Path) -> dict[str, Any]:
        return {"file": str(path), "rows": self.rows, "accepted": self.accepted, "duplicate": self.duplicate,
                "rejected": self.rejected, "flagged": self.flagged, "membersCreated": self.members_created,
                "rejectionsByReason": dict(Counter(r.reason for r in self.rejections).most_common()),
                "rejections": [{"line": r.line, "eventId": r.event_id, "reason": r.reason, "field": r.field,
                                "message": r.message} for r in self.rejections]}

    def text(self, path: Path) -> str:
        lines = [f"{path.name}: {self.rows:,} rows: {self.counts()} "
                 f"({self.flagged:,} flagged, {self.members_created:,} members created)"]
        if self.rejections:
            by_reason: dict[str, list[Rejection]] = {}
            for r in self.rejections:
                by_reason.setdefault(r.reason, []).append(r)
            rows = []
            for reason, found in sorted(by_reason.items(), key=lambda item: -len(item[1])):
                first = found[0]
                example = f"line {first.line}" + (f" ({first.event_id})" if first.event_id else "") + ": " + \
                    ": ".join(filter(None, [first.field, first.message]))
                numbers = ", ".join(str(r.line) for r in found[:10]) + (", ..." if len(found) > 10 else "")
                rows.append((reason, f"{len(found):,}", numbers, example))
            lines += ["", table(rows, ("rejected because", "rows", "lines", "first"))]
        return "\n".join(lines)


class Progress:
    """A bar on a terminal; otherwise one line of counts per batch (logs, pipes)."""

    WIDTH = 30

    def __init__(self, name: str, total: int, stream: IO[str]) -> None:
        self.name, self.total, self.stream = name, total, stream
        self.bar = stream.isatty()
        self.shown = 0

    def update(self, summary: Summary) -> None:
        done = self.shown = summary.rows
        if self.bar:
            filled = self.WIDTH * done // self.total if self.total else self.WIDTH
            self.stream.write(f"\r{self.name} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done:,}/{self.total:,} "
                              f"rows, {summary.rejected:,} rejected")
        else:
            self.stream.write(f"{self.name}: {done:,}/{self.total:,} rows: {summary.counts()}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar:
            self.stream.write("\n")
            self.stream.flush()


def _cmd_import(args: argparse.Namespace) -> int:
    path = Path(args.file)
    total = check_file(path)
    summary = Summary()
    progress = Progress(path.name, total, sys.stderr)

    async def send_all(stub: profile_service_pb2_grpc.ProfileServiceAsyncStub) -> Summary:
        lines: list[int] = []
        batch: list[event_pb2.BehaviourEvent] = []

        async def send() -> None:
            reply = await stub.BatchRecordEvents(profile_service_pb2.BatchRecordEventsRequest(
                events=batch, create_unknown_members=args.create_unknown_members), timeout=args.timeout)
            summary.add(lines, batch, reply)
            lines.clear()
            batch.clear()
            progress.update(summary)

        for row in read_rows(path, get_settings().currency):
            if row.event is None:
                summary.rows += 1
                summary.rejections.append(Rejection(row.line, "", UNREADABLE, "", row.error))
                continue
            lines.append(row.line)
            batch.append(row.event)
            if len(batch) == args.batch_size:
                await send()
        if batch:
            await send()
        elif summary.rows and summary.rows != progress.shown:
            progress.update(summary)  # unreadable rows after the last batch
        return summary

    try:
        call(args, "profile", profile_service_pb2_grpc.ProfileServiceStub, PROFILE, send_all)
    except CommandError as error:
        raise CommandError(f"{error}\nstopped after {summary.rows:,} of {total:,} rows ({summary.counts()}); "
                           "importing the file again is safe: event ids de-duplicate", error.code) from None
    finally:
        progress.close()
    if args.json:
        print(json.dumps(summary.as_dict(path), indent=2, ensure_ascii=False))
    else:
        print(summary.text(path))
    return EXIT_CHECK_FAILED if summary.rejected else EXIT_OK


def _batch_size(text: str) -> int:
    value = int(text)
    if not 1 <= value <= BATCH_MAX:
        raise argparse.ArgumentTypeError(f"must be 1 to {BATCH_MAX}, got {value}")
    return value


def csv_columns_help() -> str:
    width = max(map(len, CSV_COLUMNS))
    return "\n".join(f"  {name:<{width}}  {meaning}" for name, meaning in CSV_COLUMNS.items())


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = add_group(sub, "events", "load behaviour events into profile")
    description = (
        "Load behaviour events from FILE through profile BatchRecordEvents, up to 1,000 a call, and report "
        "accepted, duplicate and rejected rows, rejections grouped by reason with their line numbers. Exit 1 "
        "when any row was rejected. Importing a file again is safe: profile de-duplicates on event_id.\n\n"
        "FILE.jsonl (or .ndjson): one loyalty.profile.v1.BehaviourEvent per line in proto3 JSON, e.g.\n"
        '  {"eventId": "e-1", "memberId": "m-1", "occurredAt": "2025-06-30T04:00:00Z", "channel": "CHANNEL_APP",\n'
        '   "purchase": {"orderId": "o-1", "amount": {"amountMinor": "12900", "currency": "CNY"}}}\n\n'
        "FILE.csv: a header row, then one event per row; empty cells are unset. Columns:\n"
        + csv_columns_help() + "\n(order lines of purchases and refunds need JSONL.)")
    command = add_action(actions, "import", _cmd_import, "load events from a CSV or JSONL file "
                         "(profile BatchRecordEvents)", description, timeout_s=60.0)
    command.add_argument("file", metavar="FILE", help="FILE.csv or FILE.jsonl")
    command.add_argument("--create-unknown-members", action="store_true",
                         help="create a bare member for an unknown member id instead of rejecting its events")
    command.add_argument("--batch-size", type=_batch_size, default=BATCH_MAX, help="events per call (1 to 1,000)")
