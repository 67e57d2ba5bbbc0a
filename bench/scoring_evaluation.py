"""RunEvaluation end to end over gRPC for N members (default 1,000,000): stream from profile, score,
write the scores, send every tier change to rewards; then a second run of the same policy (nothing
changes); then ScoreMember under a paced load. Real profile, rewards and scoring processes.

Baselines measured in the same run: a bare StreamFeatures of the same columns (the floor of the
streaming stage) and BatchGetMemberFeatures of one member (the floor of ScoreMember).

    .venv/bin/python -m bench.scoring_evaluation [--members 1000000] [--rate 100] [--seconds 20]

`--score-member-only` measures just ScoreMember and its floor: no bare stream, one RunEvaluation (the
statistics and tiers ScoreMember reads) instead of two, and only the online figures are printed. With a
smaller population it takes about a minute:

    .venv/bin/python -m bench.scoring_evaluation --score-member-only --members 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import grpc

from bench.harness import Timer, database, paced, rss_mb, service
from bench.profile_features import SCORING_FEATURES, load, stream
from loyalty.profile.v1 import profile_service_pb2, profile_service_pb2_grpc
from loyalty.scoring.v1 import evaluation_pb2, policy_pb2, scoring_service_pb2_grpc
from loyalty.scoring.v1 import scoring_service_pb2 as S
from tests.support.processes import free_port

LOG1P = {"purchase_count_365d", "net_spend_365d", "average_order_value", "visit_count_90d", "browse_minutes_90d"}
WEIGHTS = {"purchase_count_365d": 0.3, "net_spend_365d": 0.3, "average_order_value": 0.1, "visit_count_90d": 0.1,
           "browse_minutes_90d": 0.1, "refund_ratio_365d": -0.2, "tenure_days": 0.05,
           "days_since_last_purchase": -0.05}


def bench_policy() -> policy_pb2.Policy:
    message = policy_pb2.Policy(policy_id="bench", display_name="Bench tiers",
                                schedule=policy_pb2.Schedule(kind=policy_pb2.SCHEDULE_KIND_MANUAL),
                                hysteresis=policy_pb2.Hysteresis(downgrade_margin=0.05, grace_cycles=1),
                                allow_online_upgrades=True)
    for name in SCORING_FEATURES:
        kind = policy_pb2.TRANSFORM_KIND_LOG1P if name in LOG1P else policy_pb2.TRANSFORM_KIND_STANDARDIZE
        message.features.add(feature_name=name, weight=WEIGHTS[name], transform=policy_pb2.FeatureTransform(kind=kind))
    for tier in ("regular", "silver", "gold", "platinum"):
        message.tiers.add(tier_id=tier, display_name=tier.title())
    message.quantile.target_share_bps.extend([6000, 2500, 1000, 500])
    return message


def seconds(duration: Any) -> float:
    return float(duration.seconds + duration.nanos / 1e9)


def describe(run: evaluation_pb2.EvaluationRun, wall: float) -> str:
    t = run.timings
    return (f"{run.members_scored:,} members in {wall:.1f}s wall (stream {seconds(t.stream):.1f}s, score "
            f"{seconds(t.score):.2f}s, write {seconds(t.write):.1f}s, apply {seconds(t.apply):.1f}s), "
            f"{run.tier_changes_applied:,} tier changes sent; state {evaluation_pb2.EvaluationState.Name(run.state)}")


async def evaluate(address: str, metadata: Any, members: int, rate: float, duration: float,
                   profile_address: str, score_member_only: bool = False) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel, grpc.aio.insecure_channel(profile_address) as pchannel:
        stub = scoring_service_pb2_grpc.ScoringServiceStub(channel)
        profile = profile_service_pb2_grpc.ProfileServiceStub(pchannel)
        created = await stub.CreatePolicy(S.CreatePolicyRequest(request_id="bench-create", policy=bench_policy()),
                                          metadata=metadata, timeout=60)
        await stub.ActivatePolicy(S.ActivatePolicyRequest(request_id="bench-activate", policy_id="bench",
                                                          version=created.policy.version), metadata=metadata)
        runs = []
        for name in ("first",) if score_member_only else ("first", "second"):
            with Timer() as timer:
                reply = await stub.RunEvaluation(S.RunEvaluationRequest(request_id=f"bench-{name}", wait=True),
                                                 metadata=metadata, timeout=1800)
            runs.append((reply.run, timer.seconds))
            print(f"RunEvaluation ({name}): {describe(reply.run, timer.seconds)}", flush=True)
            if reply.run.error_message:
                print(f"  error: {reply.run.error_reason} {reply.run.error_message}")
        rng = random.Random(7)

        async def score_one() -> None:
            member = f"fm-{rng.randrange(members):08d}"
            await stub.ScoreMember(S.ScoreMemberRequest(request_id=f"p-{rng.random()}", member_id=member),
                                   metadata=metadata, timeout=5)

        async def features_one() -> None:
            member = f"fm-{rng.randrange(members):08d}"
            await profile.BatchGetMemberFeatures(profile_service_pb2.BatchGetMemberFeaturesRequest(
                member_ids=[member], feature_names=SCORING_FEATURES), metadata=metadata, timeout=5)

        floor = await paced(features_one, rate, duration)
        online = await paced(score_one, rate, duration)
    return {"runs": runs, "online": online, "floor": floor}


def print_online(rate: float, online: dict[str, float], floor: dict[str, float]) -> None:
    print(f"ScoreMember at {rate:.0f}/s    : p50 {online['p50_ms']:.1f} ms, p99 {online['p99_ms']:.1f} ms, "
          f"errors {online['errors']:.0f} (target p99 < 10 ms)")
    print(f"BatchGetMemberFeatures  : p50 {floor['p50_ms']:.1f} ms, p99 {floor['p99_ms']:.1f} ms "
          f"(the floor); ratio p99 {online['p99_ms'] / max(floor['p99_ms'], 1e-9):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=4, help="daily buckets per member")
    parser.add_argument("--rate", type=float, default=100.0, help="ScoreMember calls per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--score-member-only", action="store_true",
                        help="one RunEvaluation, no bare stream; print only ScoreMember against its floor")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="loyalty-bench-state-"))
    ports = {name: free_port() for name in ("profile", "rewards", "scoring", "risk")}
    env = {f"LOYALTY_{n.upper()}_ADDR": f"127.0.0.1:{p}" for n, p in ports.items()}
    with database() as dsn:
        with Timer() as loading:
            asyncio.run(load(dsn, args.members, args.days))
        print(f"loaded {args.members:,} members x ~{args.days} daily buckets in {loading.seconds:.1f}s", flush=True)
        with service("profile", dsn, state, port=ports["profile"], **env) as profile, \
                service("rewards", dsn, state, port=ports["rewards"], **env), \
                service("scoring", dsn, state, port=ports["scoring"], **env) as scoring:
            token = json.loads((state / "dev-tokens.json").read_text())["admin"]
            metadata = (("authorization", f"Bearer {token}"),)
            if not args.score_member_only:
                with Timer() as bare:
                    streamed, _ = asyncio.run(stream(profile.address, token, SCORING_FEATURES))
                print(f"bare StreamFeatures: {streamed:,} members in {bare.seconds:.1f}s", flush=True)
            result = asyncio.run(evaluate(scoring.address, metadata, args.members, args.rate, args.seconds,
                                          profile.address, args.score_member_only))
            scoring_rss = rss_mb(scoring.process.pid)
    online, floor = result["online"], result["floor"]
    print()
    if args.score_member_only:
        print_online(args.rate, online, floor)
        print(json.dumps({"members": args.members, "score_member_p50_ms": round(online["p50_ms"], 2),
                          "score_member_p99_ms": round(online["p99_ms"], 2), "floor_p50_ms": round(floor["p50_ms"], 2),
                          "floor_p99_ms": round(floor["p99_ms"], 2)}))
        return
    (_, first_s), (_, second_s) = result["runs"]
    print(f"RunEvaluation first run : {first_s:6.1f}s  ratio to bare stream {first_s / bare.seconds:5.2f}  "
          f"(target < 120 s for 1,000,000)")
    print(f"RunEvaluation second run: {second_s:6.1f}s  ratio to bare stream {second_s / bare.seconds:5.2f}")
    print(f"scoring peak RSS        : {scoring_rss:6.0f} MB (target < 1,500 MB)")
    print_online(args.rate, online, floor)
    print(json.dumps({"members": args.members, "first_s": round(first_s, 2), "second_s": round(second_s, 2),
                      "bare_stream_s": round(bare.seconds, 2), "scoring_rss_mb": round(scoring_rss),
                      "score_member_p99_ms": round(online["p99_ms"], 2), "floor_p99_ms": round(floor["p99_ms"], 2)}))


if __name__ == "__main__":
    main()
