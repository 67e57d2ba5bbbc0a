"""`loyalty members show|portrait|ledger|tier`: one member as profile, rewards and scoring see it.

    show      profile GetMember (PII masked unless the token has pii.read)
    portrait  profile GetMemberPortrait
    ledger    rewards ListLedgerEntries, newest first, with each entry's reason
    tier      scoring ExplainScore: score, tier, per-feature contributions, gap to the next tier
"""

from __future__ import annotations

import argparse

from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import member_pb2, profile_service_pb2, profile_service_pb2_grpc
from loyalty.rewards.v1 import ledger_pb2, rewards_pb2, rewards_pb2_grpc
from loyalty.scoring.v1 import evaluation_pb2, scoring_service_pb2, scoring_service_pb2_grpc
from tools.commands.evaluations import SCORING
from tools.ops import (
    EXIT_OK,
    REWARDS,
    add_action,
    add_group,
    as_json,
    call,
    details,
    label,
    list_command,
    money,
    positive_int,
    table,
    timestamp,
)

PROFILE = profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"]


# ---- show --------------------------------------------------------------------------------------


def _cmd_show(args: argparse.Namespace) -> int:
    reply = call(args, "profile", profile_service_pb2_grpc.ProfileServiceStub, PROFILE,
                 lambda stub: stub.GetMember(profile_service_pb2.GetMemberRequest(member_id=args.member_id),
                                             timeout=args.timeout))
    print(as_json(reply.member) if args.json else member_text(reply.member))
    return EXIT_OK


def member_text(m: member_pb2.Member) -> str:
    c = m.consents
    consents = [name for name, given in (("marketing", c.marketing), ("profiling", c.profiling),
                                         ("third-party sharing", c.third_party_sharing),
                                         ("personalised offers", c.personalised_offers)) if given]
    lines = [f"Member {m.member_id} ({label(member_pb2.MemberStatus, m.status)})", details([
        ("external id", m.external_id), ("display name", m.display_name), ("email", m.email),
        ("phone", m.phone), ("birth date", m.birth_date), ("gender", label(member_pb2.Gender, m.gender)),
        ("channel", label(types_pb2.Channel, m.channel)), ("region", m.region), ("locale", m.locale),
        ("consents", ", ".join(consents) or "none"), ("joined", timestamp(m.joined_at)),
        ("tenure", f"{m.tenure_days:,} days"), ("created", timestamp(m.created_at)),
        ("updated", timestamp(m.updated_at)),
        *([("merged into", m.merged_into_member_id)] if m.merged_into_member_id else []),
        *([("erased", timestamp(m.erased_at))] if m.HasField("erased_at") else []),
    ])]
    if m.pii_masked:
        lines.append("  (PII masked: the token lacks pii.read, or the member is erased)")
    return "\n".join(lines)


# ---- portrait ----------------------------------------------------------------------------------


def _cmd_portrait(args: argparse.Namespace) -> int:
    request = profile_service_pb2.GetMemberPortraitRequest(member_id=args.member_id,
                                                           max_categories=args.categories)
    reply = call(args, "profile", profile_service_pb2_grpc.ProfileServiceStub, PROFILE,
                 lambda stub: stub.GetMemberPortrait(request, timeout=args.timeout))
    print(as_json(reply.portrait) if args.json else portrait_text(reply.portrait))
    return EXIT_OK


def portrait_text(p: member_pb2.MemberPortrait) -> str:
    recency = "never purchased" if p.days_since_last_purchase < 0 else f"{p.days_since_last_purchase} days"
    lines = [f"Portrait of {p.member.member_id} as of {timestamp(p.as_of)} UTC", details([
        ("status", label(member_pb2.MemberStatus, p.member.status)), ("tenure", f"{p.tenure_days:,} days"),
        ("first purchase", timestamp(p.first_purchase_at)), ("last purchase", timestamp(p.last_purchase_at)),
        ("since last purchase", recency), ("last activity", timestamp(p.last_activity_at)),
        ("favourite categories", ", ".join(p.favourite_categories)),
    ]), ""]
    rows = [(f"{w.window_days}d" if w.window_days else "lifetime", f"{w.purchase_count:,}",
             money(w.gross_spend.amount_minor, w.gross_spend.currency),
             money(w.net_spend.amount_minor, w.net_spend.currency),
             money(w.average_order_value.amount_minor, w.average_order_value.currency),
             f"{w.visit_count:,}", f"{w.browse_seconds // 60:,}", f"{w.refund_count:,}", f"{w.active_days:,}")
            for w in [p.lifetime, *p.windows]]
    lines.append(table(rows, ("window", "orders", "gross spend", "net spend", "avg order", "visits",
                              "browse min", "refunds", "active days")))
    if p.category_affinity:
        lines += ["", table([(a.category, f"{a.affinity:.3f}", money(a.spend.amount_minor, a.spend.currency),
                              f"{a.spend_share:.1%}", f"{a.view_count:,}", f"{a.items_purchased:,}")
                             for a in p.category_affinity],
                            ("category", "affinity", "spend", "spend share", "views", "items"))]
    return "\n".join(lines)


# ---- ledger ------------------------------------------------------------------------------------


def _cmd_ledger(args: argparse.Namespace) -> int:
    return list_command(args, "rewards", rewards_pb2_grpc.RewardsServiceStub, REWARDS, "ListLedgerEntries",
                        rewards_pb2.ListLedgerEntriesRequest(member_id=args.member_id), "entries",
                        f"no ledger entries for {args.member_id}", ledger_table)


def ledger_table(found: list[ledger_pb2.LedgerEntry]) -> str:
    return table([(timestamp(e.created_at), label(ledger_pb2.LedgerEntryType, e.type), f"{e.points:+,}",
                   f"{e.posted_balance_after:,}", e.reason_code or "-", e.reason or "-",
                   e.order_id or e.source_event_id or e.case_id or e.redemption_id or "-", e.actor or "-")
                  for e in found],
                 ("time (UTC)", "type", "points", "posted after", "code", "reason", "source", "by"))


# ---- tier --------------------------------------------------------------------------------------


def _cmd_tier(args: argparse.Namespace) -> int:
    request = scoring_service_pb2.ExplainScoreRequest(member_id=args.member_id, locale=args.locale or "",
                                                      run_id=args.run or "")
    reply = call(args, "scoring", scoring_service_pb2_grpc.ScoringServiceStub, SCORING,
                 lambda stub: stub.ExplainScore(request, timeout=args.timeout))
    print(as_json(reply) if args.json else tier_text(reply))
    return EXIT_OK


def tier_text(reply: scoring_service_pb2.ExplainScoreResponse) -> str:
    s = reply.score
    held = " (held by hysteresis)" if s.held_by_hysteresis else ""
    lines = [f"Member {s.member_id}: {reply.tier_display_name or s.tier_id} ({s.tier_id}){held}", details([
        ("score", f"{s.score:.4f}"), ("percentile", f"{s.percentile:.1f}"),
        ("qualifies for", s.qualifying_tier_id), ("previous tier", s.previous_tier_id),
        ("change", label(evaluation_pb2.TierChange, s.change)),
        ("policy", f"{s.policy.policy_id} v{s.policy.version}"), ("run", s.run_id),
        ("source", label(evaluation_pb2.ScoreSource, s.source)), ("scored", timestamp(s.scored_at)),
    ])]
    if reply.summary:
        lines += ["", reply.summary]
    if reply.contributions:
        lines += ["", table([(c.feature_name, f"{c.raw_value:,.2f}", f"{c.transformed_value:.4f}", f"{c.weight:g}",
                              f"{c.contribution:+.4f}", f"{c.population_percentile:.1f}")
                             for c in reply.contributions],
                            ("feature", "value", "transformed", "weight", "contribution", "percentile"))]
    if reply.HasField("next_tier"):
        gap = reply.next_tier
        short = f"{gap.points_gap:,} points" if gap.points_gap else f"score {gap.score_gap:.4f}"
        lines += ["", f"Next tier: {gap.display_name or gap.tier_id} ({gap.tier_id}), {short} to go"]
        lines += [f"  - {hint.text}" for hint in gap.hints]
    else:
        lines += ["", "Top tier: no next tier."]
    return "\n".join(lines)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = add_group(sub, "members", "look at one member: profile, portrait, points ledger, tier")
    show = add_action(actions, "show", _cmd_show, "the member's profile record (profile GetMember)",
                      "The member's profile record. PII is masked unless the token has pii.read.")
    show.add_argument("member_id")
    portrait = add_action(actions, "portrait", _cmd_portrait,
                          "behaviour aggregates and category affinity (profile GetMemberPortrait)")
    portrait.add_argument("member_id")
    portrait.add_argument("--categories", type=int, default=0, help="most categories listed (0 = 10, at most 50)")
    ledger = add_action(actions, "ledger", _cmd_ledger,
                        "points ledger entries with their reasons, newest first (rewards ListLedgerEntries)")
    ledger.add_argument("member_id")
    ledger.add_argument("--limit", type=positive_int, default=20, help="most entries listed (default 20)")
    tier = add_action(actions, "tier", _cmd_tier,
                      "why the member has its tier: contributions and the gap to the next (scoring ExplainScore)")
    tier.add_argument("member_id")
    tier.add_argument("--locale", help="language of the texts (zh-CN, en); default: the member's")
    tier.add_argument("--run", metavar="RUN_ID", help="explain the score of this run (default: score now)")
