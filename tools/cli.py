"""The `loyalty` command for developers and operators.

    loyalty up [--services profile,risk]   run the suite (embedded PostgreSQL unless DATABASE_URL)
    loyalty status                          health of every service
    loyalty services [--addr HOST:PORT]     services each server lists through reflection
    loyalty tokens                          the development bearer tokens and their scopes
    loyalty backtest --transactions FILE.csv --cutoff DATE --horizon-days N [--policy FILE.json]
                                            try a tier policy offline on a transaction history
    loyalty reconcile [--member ID ...] [--json]
                                            check the points ledger, report liability (exit 1 if off)
    loyalty members show|portrait|ledger|tier MEMBER_ID
                                            one member as profile, rewards and scoring see it
    loyalty cases list|show|approve|reject  the risk review queue
    loyalty disputes list|show|resolve      members' disputes of a tier, an entry or a blocked credit
    loyalty policies create|validate|list|dry-run|compare|activate
                                            tier policies (create from YAML; activate asks first)
    loyalty evaluations run|status|report|list
                                            tier evaluation runs
    loyalty events import FILE.csv|FILE.jsonl
                                            load behaviour events, report rejections by reason
    loyalty texts list|set|reset --service rewards|scoring
                                            member-facing texts (zh-CN, en) and operators' wording
    loyalty demo load|generate              the demo population (`up` loads it on a fresh state folder)
    loyalty certs [--dir DIR] [--force]     a development CA and a certificate per service (mTLS), and
                                            the LOYALTY_TLS_* environment of each service

Commands that call a service take --addr, --token and --json (tools/ops.py); each group's
commands are in tools/commands/.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from libs.auth import DEV_CALLERS
from libs.clients import channel_credentials
from libs.settings import SERVICE_NAMES, get_settings
from tools import commands, ops
from tools.commands import certs as certs_command
from tools.commands import demo
from tools.supervisor import health_status, run_up


def list_services(address: str, timeout_s: float = 3.0, credentials: grpc.ChannelCredentials | None = None
                  ) -> list[str]:
    """Ask a server's reflection service which services it offers (over TLS with `credentials`)."""
    with (grpc.insecure_channel(address) if credentials is None
          else grpc.secure_channel(address, credentials)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=timeout_s)
        for response in responses:
            return sorted(service.name for service in response.list_services_response.service)
    return []


def _cmd_up(args: argparse.Namespace) -> int:
    services = [s.strip() for s in args.services.split(",")] if args.services else list(SERVICE_NAMES)
    unknown = sorted(set(services) - set(SERVICE_NAMES))
    if unknown:
        print(f"unknown service(s): {', '.join(unknown)}; choose from {', '.join(SERVICE_NAMES)}", file=sys.stderr)
        return 2
    settings = get_settings()
    wanted = not args.no_demo and set(services) == set(SERVICE_NAMES)
    return run_up(settings, services, when_ready=(lambda: demo.load_on_first_start(settings)) if wanted else None)


def _cmd_status(args: argparse.Namespace) -> int:
    settings = get_settings()
    credentials = channel_credentials(settings)
    statuses = {name: health_status(settings.addr_for(name), credentials=credentials) for name in SERVICE_NAMES}
    if args.json:
        print(json.dumps(statuses))
    else:
        for name, status in statuses.items():
            print(f"{name:9} {settings.addr_for(name):21} {status}")
    return 0 if all(status == "SERVING" for status in statuses.values()) else 1


def _cmd_services(args: argparse.Namespace) -> int:
    settings = get_settings()
    addresses = [args.addr] if args.addr else [settings.addr_for(name) for name in SERVICE_NAMES]
    failed = False
    for address in addresses:
        try:
            names = list_services(address, credentials=channel_credentials(settings))
        except grpc.RpcError as error:
            print(f"{address}: unreachable ({error.code().name})", file=sys.stderr)
            failed = True
            continue
        print(f"{address}: {', '.join(names)}")
    return 1 if failed else 0


def _cmd_tokens(args: argparse.Namespace) -> int:
    path = get_settings().state_dir / "dev-tokens.json"
    if not path.exists():
        print(f"no development tokens yet ({path}); `loyalty up` creates them", file=sys.stderr)
        return 1
    tokens = json.loads(path.read_text())
    for name, token in tokens.items():
        print(f"{name:11} {token}  scopes: {' '.join(DEV_CALLERS.get(name, []))}")
    return 0


def _cmd_backtest(args: argparse.Namespace) -> int:
    """Read the history, score as of the cut-off, judge on the horizon; a readable report, and
    optionally a PNG and JSON. Bad input is one clear line on stderr and exit code 2."""
    from datetime import date

    from services.scoring import backtest

    columns = backtest.ColumnMap(member=args.member_column, timestamp=args.date_column, amount=args.amount_column,
                                 quantity=args.quantity_column, category=args.category_column)
    try:
        cutoff = date.fromisoformat(args.cutoff)
        policy = backtest.load_policy(args.policy) if args.policy else None
        transactions = backtest.read_transactions(args.transactions, columns, args.amount_unit)
        report = backtest.run_backtest(transactions, cutoff, args.horizon_days, policy, seed=args.seed)
    except (OSError, ValueError) as error:
        print(f"loyalty backtest: {error}", file=sys.stderr)
        return 2
    print(backtest.report_text(report))
    if args.plot:
        backtest.plot(report, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _add_backtest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = sub.add_parser("backtest", help="try a tier policy offline on a transaction history (CSV)")
    command.add_argument("--transactions", required=True, help="CSV with a header row")
    command.add_argument("--cutoff", required=True, help="YYYY-MM-DD: features as of this day")
    command.add_argument("--horizon-days", type=int, required=True, help="days after the cut-off to judge on")
    command.add_argument("--policy", help="policy JSON (see services/scoring/backtest.py); default: built-in")
    command.add_argument("--member-column", default="member_id")
    command.add_argument("--date-column", default="timestamp", help="date or timestamp column")
    command.add_argument("--amount-column", default="amount")
    command.add_argument("--quantity-column")
    command.add_argument("--category-column")
    command.add_argument("--amount-unit", choices=["major", "minor"], default="major",
                         help="amounts in yuan (major) or fen (minor)")
    command.add_argument("--plot", help="write a PNG of the gains curves and lift tables here")
    command.add_argument("--seed", type=int, default=0)
    command.set_defaults(func=_cmd_backtest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loyalty", description="Loyalty suite: operator and developer commands")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run all services on this machine until Ctrl-C")
    up.add_argument("--services", help="comma-separated subset, e.g. profile,rewards")
    up.add_argument("--no-demo", action="store_true",
                    help="do not load the demo population (loaded once per state folder otherwise)")
    up.set_defaults(func=_cmd_up)
    status = sub.add_parser("status", help="health of every service")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)
    services = sub.add_parser("services", help="list services through server reflection")
    services.add_argument("--addr", help="host:port of one server")
    services.set_defaults(func=_cmd_services)
    tokens = sub.add_parser("tokens", help="print the development tokens")
    tokens.set_defaults(func=_cmd_tokens)
    _add_backtest(sub)
    certs_command.add_commands(sub)
    ops.add_commands(sub)
    commands.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return ops.run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
