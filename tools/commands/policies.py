"""`loyalty policies create|validate|list|dry-run|compare|activate`: scoring's tier policies.

    create    scoring CreatePolicy from a YAML file (a new DRAFT version)
    validate  scoring ValidatePolicy: every check of create, nothing stored
    list      scoring ListPolicies, newest first
    dry-run   scoring RunEvaluation with dry_run: the tier migration the version would cause
    compare   scoring ComparePolicies: two versions on the same members, base -> candidate
    activate  scoring GetPolicy / GetActivePolicy, then ActivatePolicy (asks first; --yes to skip)
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import yaml
from google.protobuf import json_format

from loyalty.scoring.v1 import policy_pb2, scoring_service_pb2, scoring_service_pb2_grpc
from tools.commands.evaluations import (
    SCORING,
    migration_table,
    policy_ref,
    ref_text,
    run_exit_code,
    run_text,
    tiers_table,
)
from tools.ops import (
    EXIT_OK,
    EXIT_REFUSED,
    CommandError,
    add_action,
    add_group,
    as_json,
    call,
    label,
    list_command,
    new_request_id,
    positive_int,
    table,
    time_argument,
    timestamp,
)

STATES = {label(policy_pb2.PolicyState, v).lower(): v for v in policy_pb2.PolicyState.values() if v}
Stub = scoring_service_pb2_grpc.ScoringServiceStub
if TYPE_CHECKING:
    AsyncStub = scoring_service_pb2_grpc.ScoringServiceAsyncStub

EXAMPLE = """\
policy_id: tiers-2025
display_name: Tiers 2025
description: order count and spend, three tiers by population share
features:
  - feature_name: purchase_count_365d
    transform: {kind: TRANSFORM_KIND_LOG1P}
    weight: 0.5
  - feature_name: net_spend_365d
    transform: {kind: TRANSFORM_KIND_WINSORIZE, winsorize_percentile: 99}
    weight: 0.5
tiers:
  - {tier_id: regular, display_name: Regular}
  - {tier_id: silver, display_name: Silver, localized_names: [{language_tag: zh-CN, text: 白银会员}]}
  - {tier_id: gold, display_name: Gold}
quantile: {target_share_bps: [6000, 3000, 1000]}
hysteresis: {downgrade_margin: 0.1, grace_cycles: 1}
schedule: {kind: SCHEDULE_KIND_MONTHLY, day_of_month: 1}
"""


def load_policy(path: str) -> policy_pb2.Policy:
    """A Policy from a YAML file of its proto3 JSON fields; bad input is a CommandError naming the
    line or the field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"cannot read {path}: {error}", EXIT_REFUSED) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(error, "problem", None) or str(error)
        raise CommandError(f"{where}: not valid YAML: {problem}", EXIT_REFUSED) from None
    if not isinstance(document, dict):
        raise CommandError(f"{path}: expected the policy's fields at the top level (policy_id: ..., features: ...), "
                           f"got {type(document).__name__}", EXIT_REFUSED)
    try:
        return json_format.ParseDict(document, policy_pb2.Policy())
    except (json_format.ParseError, TypeError, ValueError) as error:
        # ParseDict names the field: 'Message type "loyalty.scoring.v1.Policy" has no field named "x" at ...'
        first = str(error).splitlines()[0]
        raise CommandError(f"{path}: {first}", EXIT_REFUSED) from None


def _cmd_create(args: argparse.Namespace) -> int:
    policy = load_policy(args.file)
    # The same file gives the same request id: re-running the command returns the version it created
    # instead of adding an identical one.
    digest = hashlib.sha256(policy.SerializeToString(deterministic=True)).hexdigest()
    request_id = args.request_id or f"cli-policy-{digest[:32]}"
    request = scoring_service_pb2.CreatePolicyRequest(request_id=request_id, policy=policy)
    reply = call(args, "scoring", Stub, SCORING, lambda stub: stub.CreatePolicy(request, timeout=args.timeout))
    if args.json:
        print(as_json(reply))
        return EXIT_OK
    p = reply.policy
    print(f"Created policy {p.policy_id} version {p.version} ({label(policy_pb2.PolicyState, p.state)}): "
          f"{p.display_name}")
    _print_warnings(reply.warnings)
    print(f"Next: `loyalty policies dry-run {p.policy_id}/{p.version}`, then "
          f"`loyalty policies activate {p.policy_id}/{p.version}`.")
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    request = scoring_service_pb2.ValidatePolicyRequest(policy=load_policy(args.file))
    reply = call(args, "scoring", Stub, SCORING, lambda stub: stub.ValidatePolicy(request, timeout=args.timeout))
    if args.json:
        print(as_json(reply))
    else:
        print(f"{args.file}: valid (feature catalogue {reply.feature_catalogue_version})")
        _print_warnings(reply.warnings)
    return EXIT_OK


def _print_warnings(warnings: Any) -> None:
    if warnings:
        print(table([(w.code, w.field, w.message) for w in warnings], ("warning", "field", "message")))


def rule_text(policy: policy_pb2.Policy) -> str:
    rule = policy.WhichOneof("threshold_rule")
    if rule == "fixed":
        return "fixed " + "/".join(f"{s:g}" for s in policy.fixed.min_scores)
    if rule == "quantile":
        return "quantile " + "/".join(f"{b / 100:g}%" for b in policy.quantile.target_share_bps)
    if rule == "qualifying_points":
        return "points " + "/".join(f"{p:,}" for p in policy.qualifying_points.min_points)
    return "-"


def _cmd_list(args: argparse.Namespace) -> int:
    request = scoring_service_pb2.ListPoliciesRequest(
        policy_id=args.policy or "", state=STATES[args.state] if args.state else policy_pb2.POLICY_STATE_UNSPECIFIED,
        latest_version_only=args.latest)
    return list_command(args, "scoring", Stub, SCORING, "ListPolicies", request, "policies", "no policies",
                        policies_table)


def policies_table(found: list[policy_pb2.Policy]) -> str:
    return table([(p.policy_id, str(p.version), label(policy_pb2.PolicyState, p.state), p.display_name,
                   " / ".join(t.tier_id for t in p.tiers), rule_text(p), str(len(p.features)),
                   timestamp(p.created_at), timestamp(p.activated_at)) for p in found],
                 ("policy", "version", "state", "name", "tiers", "rule", "features", "created", "activated"))


def _cmd_dry_run(args: argparse.Namespace) -> int:
    ref = args.policy
    request = scoring_service_pb2.RunEvaluationRequest(
        request_id=args.request_id or new_request_id(), policy_id=ref.policy_id, version=ref.version,
        dry_run=True, wait=True)
    if args.as_of:
        request.as_of.FromDatetime(args.as_of)
    reply = call(args, "scoring", Stub, SCORING, lambda stub: stub.RunEvaluation(request, timeout=args.timeout))
    print(as_json(reply.run) if args.json else run_text(reply.run, full=True))
    return run_exit_code(reply.run)


def _cmd_compare(args: argparse.Namespace) -> int:
    request = scoring_service_pb2.ComparePoliciesRequest(base=args.base, candidate=args.candidate,
                                                         apply_hysteresis=args.hysteresis)
    if args.as_of:
        request.as_of.FromDatetime(args.as_of)
    reply = call(args, "scoring", Stub, SCORING, lambda stub: stub.ComparePolicies(request, timeout=args.timeout))
    print(as_json(reply) if args.json else compare_text(reply))
    return EXIT_OK


def compare_text(r: scoring_service_pb2.ComparePoliciesResponse) -> str:
    base_ladder = [c.tier_id for c in r.base_tier_counts]
    candidate_ladder = [c.tier_id for c in r.candidate_tier_counts]
    return "\n".join([
        f"Base {ref_text(r.base)} -> candidate {ref_text(r.candidate)} as of {timestamp(r.as_of)} UTC:",
        f"  {r.members_compared:,} members, {r.changed:,} change tier ({r.moved_up:,} up, {r.moved_down:,} down); "
        f"score rank correlation {r.score_rank_correlation:.3f}",
        "", f"base {ref_text(r.base)}:", tiers_table(r.base_tier_counts, r.base_thresholds),
        "", f"candidate {ref_text(r.candidate)}:", tiers_table(r.candidate_tier_counts, r.candidate_thresholds),
        "", migration_table(r.migration, base_ladder, candidate_ladder, "base \\ candidate"),
    ])


def _cmd_activate(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    if not args.yes and not interactive:
        raise CommandError("refusing to activate without --yes: stdin is not a terminal to confirm on", EXIT_REFUSED)
    ref = args.policy

    async def look(stub: AsyncStub) -> tuple[policy_pb2.Policy, policy_pb2.Policy | None]:
        target = (await stub.GetPolicy(scoring_service_pb2.GetPolicyRequest(
            policy_id=ref.policy_id, version=ref.version), timeout=args.timeout)).policy
        try:
            active = (await stub.GetActivePolicy(scoring_service_pb2.GetActivePolicyRequest(),
                                                 timeout=args.timeout)).policy
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return target, None
        return target, active

    target, active = call(args, "scoring", Stub, SCORING, look)
    replaces = f"{active.policy_id} v{active.version} ({active.display_name})" if active else "no active policy"
    if not args.yes:
        # The question goes to stderr so that stdout stays the answer (--json) alone.
        print(f"Activate {target.policy_id} v{target.version} ({target.display_name}), replacing {replaces}? "
              "It takes effect at the next evaluation. [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise CommandError("not activated: not confirmed", EXIT_REFUSED)
    request = scoring_service_pb2.ActivatePolicyRequest(
        request_id=args.request_id or new_request_id(), policy_id=target.policy_id, version=target.version)
    if active is not None:
        # Activate only if nobody activated another version since we looked (and asked).
        request.expected_active_policy.CopyFrom(policy_pb2.PolicyRef(policy_id=active.policy_id,
                                                                     version=active.version))
    reply = call(args, "scoring", Stub, SCORING, lambda stub: stub.ActivatePolicy(request, timeout=args.timeout))
    if args.json:
        print(as_json(reply))
    else:
        previous = (f"; {reply.previous_policy.policy_id} v{reply.previous_policy.version} is retired"
                    if reply.HasField("previous_policy") and reply.previous_policy.policy_id else "")
        print(f"Activated {reply.policy.policy_id} v{reply.policy.version} ({reply.policy.display_name}){previous}. "
              "It takes effect at the next evaluation.")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = add_group(sub, "policies", "create, check, compare and activate tier policies")
    yaml_help = ("YAML file of the policy's fields, as in proto3 JSON (loyalty.scoring.v1.Policy: snake_case or "
                 "camelCase names, enums by name); output-only fields are ignored")
    create = add_action(actions, "create", _cmd_create, "store a new DRAFT version from YAML (scoring CreatePolicy)",
                        "Store a policy as a new DRAFT version (version 1 of a new policy_id, or the next one). "
                        "Running it again with the same file returns the version it created. Example file:\n\n"
                        + EXAMPLE)
    create.add_argument("--file", required=True, help=yaml_help)
    create.add_argument("--request-id", help="idempotency key (default: derived from the file's policy)")
    validate = add_action(actions, "validate", _cmd_validate,
                          "run every check of create without storing (scoring ValidatePolicy)")
    validate.add_argument("--file", required=True, help=yaml_help)
    listing = add_action(actions, "list", _cmd_list, "policy versions, newest first (scoring ListPolicies)")
    listing.add_argument("--policy", metavar="POLICY_ID", help="only versions of this policy")
    listing.add_argument("--state", choices=sorted(STATES), help="only versions in this state")
    listing.add_argument("--latest", action="store_true", help="only the latest version of each policy")
    listing.add_argument("--limit", type=positive_int, default=50, help="most versions listed (default 50)")
    dry_run = add_action(actions, "dry-run", _cmd_dry_run,
                         "the tier migration a version would cause, changing nothing (scoring RunEvaluation)",
                         "Score every member with the version and report tiers, thresholds and the migration "
                         "from the members' current tiers; no tier changes. Exit 1 when the run failed.",
                         timeout_s=600.0)
    dry_run.add_argument("policy", type=policy_ref, metavar="POLICY_ID[/VERSION]", help="default version: latest")
    dry_run.add_argument("--as-of", type=time_argument, help="take features at this time (default: now)")
    dry_run.add_argument("--request-id", help="idempotency key: repeat it to retry the same request safely")
    compare = add_action(actions, "compare", _cmd_compare,
                         "two versions on the same members: tier counts and migration (scoring ComparePolicies)",
                         timeout_s=600.0)
    compare.add_argument("base", type=policy_ref, metavar="BASE", help="POLICY_ID[/VERSION], the rows")
    compare.add_argument("candidate", type=policy_ref, metavar="CANDIDATE", help="POLICY_ID[/VERSION], the columns")
    compare.add_argument("--as-of", type=time_argument, help="take features at this time (default: now)")
    compare.add_argument("--hysteresis", action="store_true",
                         help="apply each policy's hysteresis to the current tiers (what activation would do)")
    activate = add_action(actions, "activate", _cmd_activate,
                          "make a version the active one (scoring ActivatePolicy)",
                          "Make a version the ACTIVE one; the active one is retired. Asks for confirmation; "
                          "without a terminal on stdin it refuses (exit 2) unless --yes.")
    activate.add_argument("policy", type=policy_ref, metavar="POLICY_ID[/VERSION]", help="default version: latest")
    activate.add_argument("--yes", action="store_true", help="do not ask")
    activate.add_argument("--request-id", help="idempotency key: repeat it to retry the same request safely")
