"""`loyalty evaluations run|status|report|list`: scoring's tier evaluation runs.

    run     scoring RunEvaluation (the active policy unless --policy; --dry-run changes no tier);
            --engine spark scores on Apache Spark and imports the result (also `loyalty evaluate`)
    status  scoring GetEvaluation: state, stage, progress
    report  scoring GetEvaluation in full (tier counts, thresholds, migration, statistics), and with
            --fairness scoring GetFairnessReport
    list    scoring ListEvaluations, newest first

Also the run and migration renderings `loyalty policies` shares.
"""

from __future__ import annotations

import argparse
import json
import shutil
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from loyalty.profile.v1 import profile_service_pb2_grpc
from loyalty.scoring.v1 import evaluation_pb2, policy_pb2, scoring_service_pb2, scoring_service_pb2_grpc
from services.scoring.settings import get_scoring_settings
from tools.ops import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    CommandError,
    add_action,
    add_group,
    as_dict,
    as_json,
    call,
    duration,
    label,
    list_command,
    money,
    new_request_id,
    positive_int,
    table,
    time_argument,
    timestamp,
)

SCORING = scoring_service_pb2.DESCRIPTOR.services_by_name["ScoringService"]
RUN_STATES = {label(evaluation_pb2.EvaluationState, v).lower(): v
              for v in evaluation_pb2.EvaluationState.values() if v}
_NOT_DONE = {evaluation_pb2.EVALUATION_STATE_FAILED, evaluation_pb2.EVALUATION_STATE_CANCELLED}


def policy_ref(text: str) -> policy_pb2.PolicyRef:
    """`POLICY_ID` (its latest version) or `POLICY_ID/VERSION`: argparse type of policy arguments."""
    policy_id, slash, version = text.partition("/")
    if not policy_id or (slash and not version.isdigit()):
        raise argparse.ArgumentTypeError(f"expected POLICY_ID or POLICY_ID/VERSION, got {text!r}")
    return policy_pb2.PolicyRef(policy_id=policy_id, version=int(version) if slash else 0)


def ref_text(ref: policy_pb2.PolicyRef) -> str:
    return f"{ref.policy_id} v{ref.version}" if ref.version else f"{ref.policy_id} (latest)"


def migration_table(cells: Iterable[evaluation_pb2.MigrationCell], rows: Sequence[str], columns: Sequence[str],
                    corner: str = "from \\ to") -> str:
    """A tier migration matrix: `rows` (tiers before) by `columns` (tiers after), ladder order first,
    then any other tier the cells name ('(none)' for members without a tier before)."""
    counts = {(c.from_tier_id, c.to_tier_id): c.count for c in cells}
    row_ids = [*rows, *sorted({f for f, _ in counts} - set(rows))]
    column_ids = [*columns, *sorted({t for _, t in counts} - set(columns))]
    return table([(r or "(none)", *(f"{counts.get((r, c), 0):,}" for c in column_ids),
                   f"{sum(counts.get((r, c), 0) for c in column_ids):,}") for r in row_ids],
                 (corner, *column_ids, "total"))


def tiers_table(counts: Sequence[evaluation_pb2.TierCount], thresholds: Sequence[evaluation_pb2.TierThreshold]
                ) -> str:
    by_tier = {t.tier_id: t for t in thresholds}

    def levels(tier_id: str) -> tuple[str, str]:
        t = by_tier.get(tier_id)
        if t is None:
            return "-", "-"
        if t.min_points or t.keep_points:
            return f"{t.min_points:,} pts", f"{t.keep_points:,} pts"
        return (f"{t.min_score:.4f}", f"{t.keep_score:.4f}") if t.min_score or t.keep_score else ("-", "-")

    return table([(c.tier_id, f"{c.count:,}", f"{c.share:.1%}", *levels(c.tier_id)) for c in counts],
                 ("tier", "members", "share", "min", "keep"))


def run_text(run: evaluation_pb2.EvaluationRun, full: bool) -> str:
    state = label(evaluation_pb2.EvaluationState, run.state)
    if run.state == evaluation_pb2.EVALUATION_STATE_RUNNING:
        state += f" ({label(evaluation_pb2.EvaluationStage, run.stage).lower()})"
    kind = "dry run" if run.dry_run else "applied run"
    trigger = label(evaluation_pb2.EvaluationTrigger, run.trigger).lower()
    lines = [f"Run {run.run_id}: {state}, {kind} of policy {ref_text(run.policy)} as of {timestamp(run.as_of)} UTC",
             f"  requested by {run.requested_by or '-'} ({trigger}) at {timestamp(run.created_at)}, "
             f"finished {timestamp(run.finished_at)}",
             f"  members scored {run.members_scored:,} of {run.members_total:,}; upgrades {run.upgrades:,}, "
             f"downgrades {run.downgrades:,}, unchanged {run.unchanged:,}, new {run.new_members:,}, "
             f"held by hysteresis {run.held_by_hysteresis:,}"]
    if not run.dry_run:
        lines.append(f"  tier changes sent to rewards {run.tier_changes_applied:,}, "
                     f"pending {run.tier_changes_pending:,}")
    if run.engine and run.engine != "numpy":
        lines.append(f"  engine: {run.engine}, quantiles within {run.quantile_relative_error:.4%} of members in rank; "
                     f"results {run.results_uri}")
    if run.error_reason or run.error_message:
        lines.append(f"  error: {run.error_reason}: {run.error_message}")
    if not full:
        return "\n".join(lines)
    t = run.timings
    lines.append(f"  timings: stream {duration(t.stream)}, score {duration(t.score)}, write {duration(t.write)}, "
                 f"apply {duration(t.apply)}, total {duration(t.total)}")
    if run.tier_counts:
        ladder = [c.tier_id for c in run.tier_counts]
        lines += ["", tiers_table(run.tier_counts, run.thresholds),
                  "", migration_table(run.migration, ladder, ladder, "previous \\ now")]
    d = run.score_distribution
    if run.members_scored:
        lines += ["", "scores: " + ", ".join(f"{name} {value:.4f}" for name, value in (
            ("mean", d.mean), ("sd", d.std_dev), ("min", d.min), ("p10", d.p10), ("p50", d.p50), ("p90", d.p90),
            ("p99", d.p99), ("max", d.max)))]
    if run.feature_statistics:
        lines += ["", table([(f.feature_name, f"{f.mean:,.2f}", f"{f.std_dev:,.2f}", f"{f.p50:,.2f}",
                              f"{f.p99:,.2f}", f"{f.max:,.2f}", f"{f.members_capped:,}")
                             for f in run.feature_statistics],
                            ("feature", "mean", "sd", "p50", "p99", "max", "capped"))]
    return "\n".join(lines)


def run_exit_code(run: evaluation_pb2.EvaluationRun) -> int:
    return EXIT_CHECK_FAILED if run.state in _NOT_DONE else EXIT_OK


def fairness_text(report: evaluation_pb2.FairnessReport) -> str:
    lines = [f"Fairness: share at or above {report.reference_tier_id}, flagged under {report.ratio_threshold:.0%} "
             f"of the best group (groups under {report.min_group_size:,} members never flagged): "
             f"{report.flagged_count} flagged", ""]
    lines.append(table([(label(evaluation_pb2.FairnessDimension, g.dimension).lower(), g.group or "(unknown)",
                         f"{g.member_count:,}", f"{g.reference_rate:.1%}", f"{g.ratio_to_best:.2f}",
                         f"{g.average_score:.3f}",
                         money(g.average_benefit_value.amount_minor, g.average_benefit_value.currency)
                         if g.HasField("average_benefit_value") else "-",
                         "FLAGGED" if g.flagged else ("few members" if g.insufficient_data else ""))
                        for g in report.groups],
                       ("dimension", "group", "members", "rate", "ratio", "avg score", "benefit value", "note")))
    return "\n".join(lines)


# ---- commands ----------------------------------------------------------------------------------


def _policy(args: argparse.Namespace) -> policy_pb2.Policy:
    ref = args.policy or policy_pb2.PolicyRef()

    async def get(stub: scoring_service_pb2_grpc.ScoringServiceStub) -> policy_pb2.Policy:
        if ref.policy_id:
            found = await stub.GetPolicy(scoring_service_pb2.GetPolicyRequest(  # type: ignore[misc]
                policy_id=ref.policy_id, version=ref.version), timeout=args.timeout)
        else:
            found = await stub.GetActivePolicy(scoring_service_pb2.GetActivePolicyRequest(),  # type: ignore[misc]
                                               timeout=args.timeout)
        return found.policy  # type: ignore[no-any-return]

    return call(args, "scoring", scoring_service_pb2_grpc.ScoringServiceStub, SCORING, get)


def _spark_results(args: argparse.Namespace, policy: policy_pb2.Policy, as_of: datetime) -> Path:
    """Export the policy's features, run the kernel on Spark over them; the result set's directory."""
    from services.scoring.domain import policy as rules
    from services.scoring.service_layer.evaluation import TENURE, needs_tenure
    from services.scoring.spark import job
    from tools.commands.features import PROFILE, export_features

    spec = rules.spec_of(policy)
    work = (args.work_dir or get_scoring_settings().imports) / f"eval-{uuid.uuid4().hex[:12]}"
    extra = [TENURE] if needs_tenure(policy) else []
    names = [*(f.name for f in spec.features), *(e for e in extra if e not in [f.name for f in spec.features])]
    at_profile = argparse.Namespace(**{**vars(args), "addr": args.profile_addr})  # --addr names scoring
    export = call(at_profile, "profile", profile_service_pb2_grpc.ProfileServiceStub, PROFILE,
                  lambda stub: export_features(stub, names, as_of, work / "features", args.timeout))
    if not args.json:
        print(f"Exported {export.members:,} members as of {as_of.isoformat()} to {export.directory}; "
              f"scoring them on Spark ({args.spark_master}, quantile rank error {args.relative_error:g})...",
              flush=True)
    spark = job.session(args.spark_master)
    try:
        job.evaluate(spark, str(work / "features"), str(work / "results"), spec, policy_id=policy.policy_id,
                     version=policy.version, as_of=as_of, relative_error=args.relative_error, extra=extra)
    except ValueError as error:
        raise CommandError(f"the Spark evaluation failed: {error}", EXIT_REFUSED) from None
    finally:
        spark.stop()
    shutil.rmtree(work / "features")  # the result set is what scoring reads
    return work / "results"


def _cmd_run(args: argparse.Namespace) -> int:
    ref = args.policy or policy_pb2.PolicyRef()
    request = scoring_service_pb2.RunEvaluationRequest(
        request_id=args.request_id or new_request_id(), policy_id=ref.policy_id, version=ref.version,
        dry_run=args.dry_run, wait=args.wait)
    if args.engine == "spark":
        policy = _policy(args)
        as_of = args.as_of or datetime.now(UTC)
        request.policy_id, request.version = policy.policy_id, policy.version
        request.results_uri = str(_spark_results(args, policy, as_of))
        request.as_of.FromDatetime(as_of)
    elif args.as_of:
        request.as_of.FromDatetime(args.as_of)
    reply = call(args, "scoring", scoring_service_pb2_grpc.ScoringServiceStub, SCORING,
                 lambda stub: stub.RunEvaluation(request, timeout=args.timeout))
    if args.json:
        print(as_json(reply.run))
    else:
        print(run_text(reply.run, full=args.wait))
        if not args.wait:
            print(f"\nFollow it with `loyalty evaluations status {reply.run.run_id}`.")
    return run_exit_code(reply.run)


def _get_run(args: argparse.Namespace) -> evaluation_pb2.EvaluationRun:
    request = scoring_service_pb2.GetEvaluationRequest(run_id=args.run_id)
    reply: scoring_service_pb2.GetEvaluationResponse = call(
        args, "scoring", scoring_service_pb2_grpc.ScoringServiceStub, SCORING,
        lambda stub: stub.GetEvaluation(request, timeout=args.timeout))
    return reply.run


def _cmd_status(args: argparse.Namespace) -> int:
    run = _get_run(args)
    print(as_json(run) if args.json else run_text(run, full=False))
    return run_exit_code(run)


def _cmd_report(args: argparse.Namespace) -> int:
    run = _get_run(args)
    report = None
    if args.fairness:
        request = scoring_service_pb2.GetFairnessReportRequest(run_id=args.run_id)
        report = call(args, "scoring", scoring_service_pb2_grpc.ScoringServiceStub, SCORING,
                      lambda stub: stub.GetFairnessReport(request, timeout=args.timeout)).report
    if args.json:
        # The run as GetEvaluation returns it; with --fairness, {"run": ..., "fairness": ...}.
        print(as_json(run) if report is None else
              json.dumps({"run": as_dict(run), "fairness": as_dict(report)}, indent=2, ensure_ascii=False))
    else:
        print(run_text(run, full=True) + ("" if report is None else "\n\n" + fairness_text(report)))
    return run_exit_code(run)


def _cmd_list(args: argparse.Namespace) -> int:
    request = scoring_service_pb2.ListEvaluationsRequest(
        policy_id=args.policy or "",
        state=RUN_STATES[args.state] if args.state else evaluation_pb2.EVALUATION_STATE_UNSPECIFIED)
    return list_command(args, "scoring", scoring_service_pb2_grpc.ScoringServiceStub, SCORING, "ListEvaluations",
                        request, "runs", "no evaluation runs", runs_table)


def runs_table(found: list[evaluation_pb2.EvaluationRun]) -> str:
    return table([(r.run_id, label(evaluation_pb2.EvaluationState, r.state), ref_text(r.policy),
                   "dry" if r.dry_run else "applied", timestamp(r.as_of), f"{r.members_scored:,}",
                   f"{r.upgrades:,}", f"{r.downgrades:,}", timestamp(r.created_at)) for r in found],
                 ("run", "state", "policy", "kind", "as of (UTC)", "members", "up", "down", "created"))


RUN_DESCRIPTION = (
    "Start an evaluation run of the active policy (or --policy). Only the active policy can run for real; "
    "--dry-run scores and reports without changing any tier. Returns at once unless --wait; exit 1 when the run "
    "failed.\n"
    "--engine spark computes the scores on Apache Spark instead of in the scoring service: the policy's features "
    "are exported from profile as Parquet, the scoring kernel runs over their partitions (local mode unless "
    "--spark-master), quantiles are approximate within --relative-error of the members in rank, and scoring "
    "imports the result set as the run (hysteresis, report, tier changes to rewards in batches). --work-dir must "
    "be inside scoring's import directory (LOYALTY_SCORING_IMPORT_DIR, default <state dir>/spark).")


def _run_arguments(run: argparse.ArgumentParser) -> None:
    from services.scoring.spark.results import RELATIVE_ERROR_MAX

    run.add_argument("--policy", type=policy_ref, metavar="POLICY_ID[/VERSION]",
                     help="policy version to evaluate (default: the active one)")
    run.add_argument("--as-of", type=time_argument, help="take features at this time (default: now)")
    run.add_argument("--dry-run", action="store_true", help="report only: change no tier")
    run.add_argument("--wait", action="store_true", help="answer when the run has finished (up to --timeout)")
    run.add_argument("--request-id", help="idempotency key: repeat it to retry the same request safely")
    run.add_argument("--engine", choices=("service", "spark"), default="service",
                     help="where the scores are computed (default: the scoring service)")
    run.add_argument("--spark-master", default="local[2]", help="Spark master URL (default local[2])")
    run.add_argument("--relative-error", type=_relative_error, default=1e-4,
                     help=f"rank error of Spark's approximate quantiles, 0 (exact) to {RELATIVE_ERROR_MAX} "
                          "(default 1e-4)")
    run.add_argument("--profile-addr", metavar="HOST:PORT", help="profile, which exports the features "
                                                                "(default: the configured address)")
    run.add_argument("--work-dir", type=Path, help="where the export and result set go (default: scoring's "
                                                   "import directory)")


def _relative_error(text: str) -> float:
    from services.scoring.spark.results import RELATIVE_ERROR_MAX

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= RELATIVE_ERROR_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, {RELATIVE_ERROR_MAX}]")
    return value


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = add_group(sub, "evaluations", "run tier evaluations and read their reports")
    _run_arguments(add_action(actions, "run", _cmd_run, "start an evaluation run (scoring RunEvaluation)",
                              RUN_DESCRIPTION, timeout_s=600.0))
    _run_arguments(add_action(sub, "evaluate", _cmd_run, "an evaluation run: `evaluations run` (--engine spark)",
                              RUN_DESCRIPTION, timeout_s=600.0))
    status = add_action(actions, "status", _cmd_status, "state and progress of a run (scoring GetEvaluation)",
                        "State and progress of a run; exit 1 when it failed or was cancelled.")
    status.add_argument("run_id")
    report = add_action(actions, "report", _cmd_report,
                        "a run's full report: tiers, thresholds, migration, statistics (scoring GetEvaluation)",
                        "A run's full report; --fairness adds the fairness report (scoring GetFairnessReport). "
                        "Exit 1 when the run failed or was cancelled.")
    report.add_argument("run_id")
    report.add_argument("--fairness", action="store_true", help="add the fairness report (succeeded runs only)")
    listing = add_action(actions, "list", _cmd_list, "evaluation runs, newest first (scoring ListEvaluations)")
    listing.add_argument("--policy", metavar="POLICY_ID", help="only runs of this policy")
    listing.add_argument("--state", choices=sorted(RUN_STATES), help="only runs in this state")
    listing.add_argument("--limit", type=positive_int, default=20, help="most runs listed (default 20)")
