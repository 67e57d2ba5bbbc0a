"""`loyalty events import` against the real profile process: CSV and JSONL files in batches, a
summary with rejections grouped by reason and line, exit 1 when rows were rejected, a file that
cannot be imported at all refused before anything is sent, and the progress on stderr."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from loyalty.profile.v1 import member_pb2
from loyalty.profile.v1 import profile_service_pb2 as P
from tests.cli.conftest import Connection, Stubs, loyalty
from tests.scoring.conftest import uid
from tools.commands.events import Progress, Summary

HEADER = "event_id,member_id,occurred_at,channel,type,product_id,category,seconds,query,order_id,amount_minor,currency"


def write(tmp_path: Path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


async def test_a_csv_with_bad_rows_is_summarised_by_reason_and_exits_1(
        tmp_path: Path, stubs: Stubs, admin: Any, connection: Connection, capsys: Any) -> None:
    member = uid("im")
    await stubs.profile.CreateMember(P.CreateMemberRequest(request_id=uid("r"), member=member_pb2.Member(
        member_id=member)), metadata=admin)
    at = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    e = [uid("e") for _ in range(9)]
    path = write(tmp_path, "events.csv", [
        HEADER,
        f"{e[0]},{member},{at},app,purchase,,,,,{uid('o')},12900,CNY",       # line 2: accepted
        f"{e[1]},{member},{at},web,view,p-1,tea,,,,,",                        # 3: accepted
        f"{e[2]},{member},{at},APP,browse,,tea,600,,,,",                      # 4: accepted
        f"{e[3]},{uid('ghost')},{at},app,purchase,,,,,{uid('o')},500,",      # 5: unknown member
        f"{e[4]},{member},{at},app,browse,,tea,,,,,",                         # 6: no seconds
        f"{e[5]},{member},{at},app,teleport,,,,,,,",                          # 7: unreadable type
        f"{e[6]},{member},{at},app,purchase,,,,,{uid('o')},500,USD",         # 8: not the programme currency
        f"{e[7]},{member},yesterday,app,search,,,,green tea,,,",              # 9: unreadable time
        f"{e[8]},{uid('ghost')},{at},store,view,p-2,,,,,,",                   # 10: unknown member
    ])
    assert await loyalty("events", "import", path, "--batch-size", "4", *connection("profile")) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [  # plain counts per batch: stderr is not a terminal here
        "events.csv: 4/9 rows: 3 accepted, 0 duplicate, 1 rejected",
        "events.csv: 9/9 rows: 3 accepted, 0 duplicate, 6 rejected",
    ]
    out = captured.out.splitlines()
    assert out[0] == "events.csv: 9 rows: 3 accepted, 0 duplicate, 6 rejected (0 flagged, 0 members created)"
    by_reason = {line.split()[0]: line for line in out[4:]}
    assert set(by_reason) == {"UNKNOWN_MEMBER", "UNREADABLE_ROW", "INVALID_FIELD", "CURRENCY_MISMATCH"}
    assert by_reason["UNKNOWN_MEMBER"].split()[1:4] == ["2", "5,", "10"]
    assert by_reason["UNREADABLE_ROW"].split()[1:4] == ["2", "7,", "9"]
    assert "type: unknown event type 'teleport'" in by_reason["UNREADABLE_ROW"]
    assert f"line 6 ({e[4]}): browse.seconds" in by_reason["INVALID_FIELD"]
    assert f"line 8 ({e[6]})" in by_reason["CURRENCY_MISMATCH"]

    # Again: what was accepted is now a duplicate, nothing is stored twice.
    assert await loyalty("events", "import", path, "--json", *connection("profile")) == 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["accepted"], summary["duplicate"], summary["rejected"]) == (0, 3, 6)
    assert summary["rejectionsByReason"] == {"UNKNOWN_MEMBER": 2, "UNREADABLE_ROW": 2, "INVALID_FIELD": 1,
                                             "CURRENCY_MISMATCH": 1}
    assert {r["line"] for r in summary["rejections"]} == {5, 6, 7, 8, 9, 10}
    events = await stubs.profile.ListMemberEvents(P.ListMemberEventsRequest(member_id=member), metadata=admin)
    assert sorted(ev.event.event_id for ev in events.events) == sorted(e[:3])


async def test_a_clean_jsonl_file_exits_0(tmp_path: Path, connection: Connection, capsys: Any) -> None:
    member = uid("im")
    at = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = write(tmp_path, "events.jsonl", [
        json.dumps({"eventId": uid("e"), "memberId": member, "occurredAt": at, "channel": "CHANNEL_APP",
                    "purchase": {"orderId": uid("o"), "amount": {"amountMinor": "8800", "currency": "CNY"},
                                 "items": [{"sku": "s-1", "category": "tea", "quantity": 1,
                                            "unitPrice": {"amountMinor": "8800", "currency": "CNY"}}]}}),
        "",
        json.dumps({"event_id": uid("e"), "member_id": member, "occurred_at": at, "channel": "CHANNEL_WEB",
                    "search": {"query": "oolong"}}),
    ])
    assert await loyalty("events", "import", path, "--create-unknown-members", *connection("profile")) == 0
    out = capsys.readouterr().out
    assert out.strip() == "events.jsonl: 2 rows: 2 accepted, 0 duplicate, 0 rejected (2 flagged, 1 members created)"


async def test_a_bad_jsonl_line_names_the_field(tmp_path: Path, connection: Connection, capsys: Any) -> None:
    path = write(tmp_path, "events.jsonl", [json.dumps({"eventId": uid("e"), "memberId": uid("m"),
                                                        "purchase": {"orderId": "o", "amout": 5}}), "[1, 2]", "{"])
    assert await loyalty("events", "import", path, "--json", *connection("profile")) == 1
    rejections = json.loads(capsys.readouterr().out)["rejections"]
    assert [r["line"] for r in rejections] == [1, 2, 3] and {r["reason"] for r in rejections} == {"UNREADABLE_ROW"}
    assert "amout" in rejections[0]["message"] and "JSON object" in rejections[1]["message"]


async def test_a_file_that_cannot_be_imported_is_refused_before_sending(tmp_path: Path, connection: Connection,
                                                                        capsys: Any) -> None:
    bad_header = write(tmp_path, "typo.csv", ["event_id,member_id,occurred_at,channel,amout", "e-1,m-1,,app,5"])
    assert await loyalty("events", "import", bad_header, *connection("profile")) == 2
    err = capsys.readouterr().err
    assert "missing column(s) type" in err and "unknown column(s) amout" in err
    assert await loyalty("events", "import", write(tmp_path, "events.txt", ["x"]), *connection("profile")) == 2
    assert "unknown format" in capsys.readouterr().err
    assert await loyalty("events", "import", str(tmp_path / "none.csv"), *connection("profile")) == 2
    assert "cannot read" in capsys.readouterr().err


async def test_an_unreachable_profile_exits_3_and_says_a_rerun_is_safe(tmp_path: Path, nowhere: list[str],
                                                                       capsys: Any) -> None:
    at = datetime.now(UTC).isoformat()
    path = write(tmp_path, "events.csv", [HEADER, f"e-1,m-1,{at},app,view,,,,,,,"])
    assert await loyalty("events", "import", path, *nowhere) == 3
    err = capsys.readouterr().err
    assert "profile did not answer" in err and "stopped after 0 of 1 rows" in err and "safe" in err


def test_the_progress_is_a_bar_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = Progress("big.csv", 4000, stream)
    summary = Summary(rows=1000, accepted=990)
    progress.update(summary)
    progress.close()
    assert stream.getvalue() == "\rbig.csv [#######.......................] 1,000/4,000 rows, 0 rejected\n"
