"""The learning RPCs end to end on a stack of their own (real profile, rewards and scoring processes):
learned weights, segments, upgrade propensity, category recommendations and the fairness report.

The population has a known structure, seeded once for the module:
- four archetypes over the last 420 days: FREQUENT (an order every ~12 days of 30-60 yuan), BIG (one
  every ~100 days of 1,500-2,500 yuan), STEADY (every ~25 days, 300-500 yuan; half of them RISERS
  who make as many orders in the year, ever more of them recently, so they climb the tiers), LIGHT
  (one or two orders of 20-30 yuan, all in region CN-WEST);
  heavy buyers keep buying, so past spend predicts the next window's;
- every order has one line in a category of the member's "world" (electronics or baby), three of
  the world's four categories per member: co-purchase structure for the recommender;
- every ninth member has no profiling consent; tenure is random (noise for a "random" policy).
Tests run in file order: they share the stack's policies, runs and models.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import event_pb2, member_pb2
from loyalty.profile.v1 import profile_service_pb2 as P
from loyalty.rewards.v1 import rewards_pb2
from loyalty.scoring.v1 import evaluation_pb2 as E
from loyalty.scoring.v1 import learning_pb2 as L
from loyalty.scoring.v1 import policy_pb2
from loyalty.scoring.v1 import scoring_service_pb2 as S
from tests.scoring.conftest import Stack, Stubs, policy, purchase, record, uid
from tests.support.rpc import rpc_error

pytestmark = pytest.mark.timeout(300)
LONG_S = 120.0
HISTORY_DAYS = 420
RISER_DAYS = 250
ARCHETYPES = {"frequent": 36, "big": 28, "steady": 36, "light": 24}
WORLDS = (("phones", "cases", "chargers", "headphones"), ("diapers", "formula", "toys", "strollers"))
SEGMENT_FEATURES = ["purchase_count_365d", "average_order_value_365d"]


@dataclass
class Population:
    now: datetime
    archetype: dict[str, str] = field(default_factory=dict)  # member id → archetype
    riser: set[str] = field(default_factory=set)
    consenting: set[str] = field(default_factory=set)
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)  # member id → categories bought
    world: dict[str, int] = field(default_factory=dict)
    no_history: str = ""

    def of(self, kind: str) -> list[str]:
        return sorted(m for m, a in self.archetype.items() if a == kind)


def _order(member_id: str, amount_minor: int, at: datetime, category: str) -> event_pb2.BehaviourEvent:
    event = purchase(member_id, amount_minor, at)
    event.purchase.items.add(sku=f"sku-{category}", category=category, quantity=1,
                             unit_price=types_pb2.Money(amount_minor=amount_minor, currency="CNY"))
    return event


def _schedule(kind: str, riser: bool, rng: random.Random) -> list[tuple[float, int]]:
    """(days ago, amount in fen) of a member's orders."""
    if kind == "light":
        return [(rng.uniform(2, HISTORY_DAYS), rng.randint(2000, 3000)) for _ in range(rng.randint(1, 2))]
    interval, low, high = {"frequent": (12.0, 3000, 6000), "big": (100.0, 150_000, 250_000),
                           "steady": (25.0, 30_000, 50_000)}[kind]
    if riser:  # as many orders as a steady buyer in the year, ever more of them recently
        count = rng.randint(14, 17)
        return [(1 + RISER_DAYS * ((i + rng.uniform(-0.3, 0.3)) / count) ** 1.7, rng.randint(low, high))
                for i in range(1, count + 1)]
    orders = []
    day = HISTORY_DAYS - rng.uniform(0, interval)
    while day > 1:
        orders.append((day, rng.randint(low, high)))
        day -= interval * rng.uniform(0.8, 1.2)
    return orders


async def _create(stubs: Stubs, metadata: Any, member: member_pb2.Member) -> None:
    await stubs.profile.CreateMember(P.CreateMemberRequest(request_id=uid("r"), member=member), metadata=metadata,
                                     timeout=30)


@pytest.fixture
async def population(stack: Stack, stubs: Stubs, operator: Any) -> Population:
    seeded: Population | None = getattr(stack, "learning_population", None)
    if seeded is not None:
        return seeded
    rng = random.Random(7)
    now = datetime.now(UTC)
    found = Population(now)
    members: list[member_pb2.Member] = []
    events: list[event_pb2.BehaviourEvent] = []
    index = 0
    for kind, count in ARCHETYPES.items():
        for k in range(count):
            member_id = f"lm-{kind}-{k:02d}-{uid('x')[-6:]}"
            region = "CN-WEST" if kind == "light" else ("CN-EAST", "CN-NORTH")[k % 2]
            member = member_pb2.Member(member_id=member_id, region=region, channel=1 + index % 3,
                                       gender=(member_pb2.GENDER_FEMALE, member_pb2.GENDER_MALE)[index % 2],
                                       birth_date=f"{1960 + index % 40}-06-15")
            member.consents.profiling = index % 9 != 4
            member.joined_at.FromDatetime(now - timedelta(days=600 + rng.uniform(0, 120)))
            members.append(member)
            found.archetype[member_id] = kind
            if member.consents.profiling:
                found.consenting.add(member_id)
            riser = kind == "steady" and k % 2 == 1
            if riser:
                found.riser.add(member_id)
            world = WORLDS[index % 2]
            skipped = (index // 2) % 4
            bought = tuple(c for i, c in enumerate(world) if i != skipped)
            found.world[member_id] = index % 2
            orders = _schedule(kind, riser, rng)
            found.categories[member_id] = tuple(sorted({bought[i % 3] for i in range(len(orders))}))
            events += [_order(member_id, amount, now - timedelta(days=days), bought[i % 3])
                       for i, (days, amount) in enumerate(orders)]
            index += 1
    empty = member_pb2.Member(member_id=f"lm-empty-{uid('x')[-6:]}", region="CN-WEST", channel=1)
    empty.consents.profiling = True
    empty.joined_at.FromDatetime(now - timedelta(days=610))
    members.append(empty)
    found.no_history = empty.member_id
    found.categories[empty.member_id] = ()
    found.archetype[empty.member_id] = "light"
    found.consenting.add(empty.member_id)
    for start in range(0, len(members), 25):
        await asyncio.gather(*(_create(stubs, operator, m) for m in members[start:start + 25]))
    await record(stubs, operator, events)
    stack.learning_population = found  # type: ignore[attr-defined]
    return found


async def _policy(stubs: Stubs, metadata: Any, message: policy_pb2.Policy, activate: bool = False
                  ) -> policy_pb2.Policy:
    created = await stubs.scoring.CreatePolicy(S.CreatePolicyRequest(request_id=uid("r"), policy=message),
                                               metadata=metadata, timeout=10)
    if activate:
        await stubs.scoring.ActivatePolicy(S.ActivatePolicyRequest(
            request_id=uid("r"), policy_id=created.policy.policy_id, version=created.policy.version),
            metadata=metadata, timeout=10)
    return created.policy  # type: ignore[no-any-return]


def _noise_policy() -> policy_pb2.Policy:
    """Tiers by tenure alone, which the population's spending does not depend on: a random ranking."""
    message = policy(uid("noise"))
    del message.features[:]
    message.features.add(feature_name="tenure_days", weight=1.0,
                         transform=policy_pb2.FeatureTransform(kind=policy_pb2.TRANSFORM_KIND_IDENTITY))
    return message


def _spend_policy() -> policy_pb2.Policy:
    """Silver from 4,000 yuan of net spend over the year, gold from 7,000: who upgrades next is who is
    close and buying (a big-basket buyer a few orders short, a riser)."""
    message = policy(uid("spend"), rule="fixed")
    del message.features[:]
    message.features.add(feature_name="net_spend_365d", weight=1.0,
                         transform=policy_pb2.FeatureTransform(kind=policy_pb2.TRANSFORM_KIND_IDENTITY))
    message.fixed.min_scores[:] = [400_000, 700_000]
    return message


async def _dry_run(stubs: Stubs, metadata: Any, base: policy_pb2.Policy) -> E.EvaluationRun:
    reply = await stubs.scoring.RunEvaluation(S.RunEvaluationRequest(
        request_id=uid("r"), policy_id=base.policy_id, version=base.version, dry_run=True, wait=True),
        metadata=metadata, timeout=LONG_S)
    assert reply.run.state == E.EVALUATION_STATE_SUCCEEDED, reply.run
    return reply.run


def _fit_request(base: policy_pb2.Policy, now: datetime, **fields: Any) -> S.FitWeightsRequest:
    fields.setdefault("method", L.FIT_METHOD_NNLS_RIDGE)
    request = S.FitWeightsRequest(request_id=uid("r"), horizon_days=45, **fields)
    request.base_policy.policy_id = base.policy_id
    request.base_policy.version = base.version
    if not request.HasField("training_as_of"):
        request.training_as_of.FromDatetime(now - timedelta(days=150))
    return request


# ---- before anything is learned -----------------------------------------------------------------


async def test_nothing_learned_yet_and_bad_requests(stubs: Stubs, operator: Any, analyst: Any) -> None:
    checks = [
        (stubs.scoring.PredictUpgradePropensity(S.PredictUpgradePropensityRequest(
            top=S.TopMembers(n=5)), metadata=operator), grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_TRAINED"),
        (stubs.scoring.RecommendCategories(S.RecommendCategoriesRequest(member_ids=["m-1"]), metadata=operator),
         grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_TRAINED"),
        (stubs.scoring.ListSegments(S.ListSegmentsRequest(), metadata=analyst), grpc.StatusCode.NOT_FOUND,
         "NO_SEGMENTATION"),
        (stubs.scoring.ListSegments(S.ListSegmentsRequest(segmentation_id="seg-nope"), metadata=analyst),
         grpc.StatusCode.NOT_FOUND, "SEGMENTATION_NOT_FOUND"),
        (stubs.scoring.GetMemberSegment(S.GetMemberSegmentRequest(member_id="m-1"), metadata=analyst),
         grpc.StatusCode.NOT_FOUND, "NO_SEGMENTATION"),
        (stubs.scoring.ListSegmentMembers(S.ListSegmentMembersRequest(segment_id="seg-nope.0"), metadata=analyst),
         grpc.StatusCode.NOT_FOUND, "SEGMENT_NOT_FOUND"),
        (stubs.scoring.GetModel(S.GetModelRequest(model_id="model-nope"), metadata=analyst),
         grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (stubs.scoring.PredictUpgradePropensity(S.PredictUpgradePropensityRequest(
            top=S.TopMembers(n=5), model_id="model-nope"), metadata=operator), grpc.StatusCode.NOT_FOUND,
         "MODEL_NOT_FOUND"),
        (stubs.scoring.GetFairnessReport(S.GetFairnessReportRequest(run_id="run-nope"), metadata=analyst),
         grpc.StatusCode.NOT_FOUND, "EVALUATION_NOT_FOUND"),
        (stubs.scoring.TrainModel(S.TrainModelRequest(request_id=uid("r"), kind=L.MODEL_KIND_UPGRADE_PROPENSITY),
                                  metadata=operator, timeout=LONG_S),
         grpc.StatusCode.FAILED_PRECONDITION, "NO_ACTIVE_POLICY"),
    ]
    for call, code, reason in checks:
        assert (await rpc_error(call))[:2] == (code, reason)
    code, _, fields = await rpc_error(stubs.scoring.TrainModel(S.TrainModelRequest(
        request_id=uid("r"), kind=L.MODEL_KIND_CATEGORY_RECOMMENDER, method=L.MODEL_METHOD_LOGISTIC_REGRESSION),
        metadata=operator))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["method"])
    segments = S.BuildSegmentsRequest(request_id=uid("r"), feature_names=SEGMENT_FEATURES, k_min=6, k_max=4)
    code, _, fields = await rpc_error(stubs.scoring.BuildSegments(segments, metadata=operator))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["k_min"])
    segments = S.BuildSegmentsRequest(request_id=uid("r"), feature_names=["gender", "no_such_feature"])
    code, reason, fields = await rpc_error(stubs.scoring.BuildSegments(segments, metadata=operator))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PROTECTED_ATTRIBUTE")
    assert fields == ["feature_names[0]", "feature_names[1]"]
    # The declarative rules run first: k beyond 20 never reaches the handler.
    code, _, fields = await rpc_error(stubs.scoring.BuildSegments(S.BuildSegmentsRequest(
        request_id=uid("r"), feature_names=SEGMENT_FEATURES, k=21), metadata=operator))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["k"])


# ---- FitWeights ---------------------------------------------------------------------------------


async def test_fitted_weights_beat_a_random_policy_out_of_time(stubs: Stubs, operator: Any,
                                                               population: Population) -> None:
    noise = await _policy(stubs, operator, _noise_policy(), activate=True)
    base = await _policy(stubs, operator, policy(uid("base")))
    request = _fit_request(base, population.now, random_seed=3)
    reply = await stubs.scoring.FitWeights(request, metadata=operator, timeout=LONG_S)
    fit, proposed = reply.fit, reply.proposed_policy
    assert proposed.state == policy_pb2.POLICY_STATE_DRAFT and proposed.version == base.version + 1
    assert proposed.fit_id == fit.fit_id and proposed.policy_id == base.policy_id
    assert fit.proposed_policy == policy_pb2.PolicyRef(policy_id=base.policy_id, version=proposed.version)
    assert [w.feature_name for w in fit.weights] == [f.feature_name for f in base.features]
    assert [w.weight for w in fit.weights] == pytest.approx([f.weight for f in proposed.features])
    assert sum(abs(w.weight) for w in fit.weights) == pytest.approx(sum(abs(f.weight) for f in base.features))
    assert fit.weights[2].weight == 0.0  # nobody browsed: a constant feature learns nothing
    assert sum(w.importance for w in fit.weights) == pytest.approx(1.0)
    # Out of time: the fit on the history before T ranks the members' spend after V better than chance.
    mine, chance = fit.proposed_metrics, fit.current_metrics
    assert mine.members == chance.members > 100 and fit.members_trained > 80
    assert mine.spearman > 0.3 and mine.spearman > chance.spearman + 0.2, (mine, chance)
    assert mine.top20_revenue_share > chance.top20_revenue_share + 0.05, (mine, chance)
    assert mine.upgrade_auc > 0.5 and not fit.HasField("ranker_metrics")
    assert fit.training_as_of.ToDatetime() + timedelta(days=45) == fit.validation_as_of.ToDatetime()
    assert fit.base_policy == policy_pb2.PolicyRef(policy_id=base.policy_id, version=base.version)
    assert proposed.display_name == "Tiers (fitted)" and fit.created_by and fit.elapsed.ToTimedelta()

    again = await stubs.scoring.FitWeights(request, metadata=operator, timeout=LONG_S)
    assert again == reply
    request.ridge_alpha = 5.0
    code, reason, _ = await rpc_error(stubs.scoring.FitWeights(request, metadata=operator, timeout=LONG_S))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    active = await stubs.scoring.GetActivePolicy(S.GetActivePolicyRequest(), metadata=operator)
    assert (active.policy.policy_id, active.policy.version) == (noise.policy_id, noise.version)

    ranked = await stubs.scoring.FitWeights(_fit_request(base, population.now, method=L.FIT_METHOD_GBM_RANK,
                                                         display_name="GBM"), metadata=operator, timeout=LONG_S)
    assert ranked.proposed_policy.version == base.version + 2 and ranked.proposed_policy.display_name == "GBM"
    assert ranked.fit.HasField("ranker_metrics") and ranked.fit.ranker_metrics.spearman > 0.3
    assert ranked.fit.proposed_metrics.spearman > ranked.fit.current_metrics.spearman + 0.15
    assert sum(w.importance for w in ranked.fit.weights) == pytest.approx(1.0)


async def test_fit_weights_refusals_store_nothing(stubs: Stubs, operator: Any, population: Population) -> None:
    base = await _policy(stubs, operator, policy(uid("base")))
    now = population.now
    recent = _fit_request(base, now)
    recent.training_as_of.FromDatetime(datetime.now(UTC) - timedelta(days=60))
    code, reason, _ = await rpc_error(stubs.scoring.FitWeights(recent, metadata=operator, timeout=LONG_S))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "HORIZON_NOT_ELAPSED")
    before_anyone = _fit_request(base, now)
    before_anyone.training_as_of.FromDatetime(now - timedelta(days=725))
    before_anyone.validation_as_of.FromDatetime(now - timedelta(days=150))
    code, reason, _ = await rpc_error(stubs.scoring.FitWeights(before_anyone, metadata=operator, timeout=LONG_S))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_ENOUGH_HISTORY")
    backwards = _fit_request(base, now)
    backwards.validation_as_of.FromDatetime(now - timedelta(days=200))
    code, _, fields = await rpc_error(stubs.scoring.FitWeights(backwards, metadata=operator, timeout=LONG_S))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["validation_as_of"])
    unknown = _fit_request(base, now)
    unknown.base_policy.policy_id = "no-such-policy"
    code, reason, _ = await rpc_error(stubs.scoring.FitWeights(unknown, metadata=operator, timeout=LONG_S))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "POLICY_NOT_FOUND")
    listed = await stubs.scoring.ListPolicies(S.ListPoliciesRequest(policy_id=base.policy_id), metadata=operator)
    assert [p.version for p in listed.policies] == [1]
    # A refused request id is not spent: the same id works once the request is fixed.
    before_anyone.training_as_of.FromDatetime(now - timedelta(days=150))
    before_anyone.ClearField("validation_as_of")
    done = await stubs.scoring.FitWeights(before_anyone, metadata=operator, timeout=LONG_S)
    assert done.proposed_policy.version == 2


# ---- segments -----------------------------------------------------------------------------------


async def _all_members(stubs: Stubs, metadata: Any, segment_id: str) -> list[str]:
    found: list[str] = []
    token = ""
    while True:
        reply = await stubs.scoring.ListSegmentMembers(S.ListSegmentMembersRequest(
            segment_id=segment_id, page_size=17, page_token=token), metadata=metadata, timeout=10)
        found += [m.member_id for m in reply.members]
        assert all(m.segment_id == segment_id and m.distance >= 0 for m in reply.members)
        token = reply.next_page_token
        if not token:
            return found


async def test_segments_find_the_archetypes(stubs: Stubs, operator: Any, analyst: Any,
                                            population: Population) -> None:
    request = S.BuildSegmentsRequest(request_id=uid("r"), feature_names=SEGMENT_FEATURES, k_min=2, k_max=6,
                                     pca_sample_points=50, random_seed=11, dry_run=True)
    dry = await stubs.scoring.BuildSegments(request, metadata=operator, timeout=LONG_S)
    assert not dry.segmentation.current
    code, reason, _ = await rpc_error(stubs.scoring.ListSegments(S.ListSegmentsRequest(), metadata=analyst))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "NO_SEGMENTATION")

    request.dry_run = False
    request.request_id = uid("r")
    built = await stubs.scoring.BuildSegments(request, metadata=operator, timeout=LONG_S)
    segmentation = built.segmentation
    assert segmentation.current and segmentation.k_chosen_automatically and segmentation.k == 4
    assert [s.k for s in segmentation.silhouettes] == [2, 3, 4, 5, 6]
    assert segmentation.silhouette == max(s.silhouette for s in segmentation.silhouettes) > 0.5
    everyone = len(population.archetype)
    assert segmentation.members_segmented == len(population.consenting)
    assert segmentation.members_excluded == everyone - len(population.consenting) > 0
    assert len(segmentation.pca.sample_points) == 50 and len(segmentation.pca.loadings) == 2
    assert sum(s.member_count for s in built.segments) == segmentation.members_segmented
    assert [s.segment_id for s in built.segments] == [f"{segmentation.segmentation_id}.{i}" for i in range(4)]
    for segment in built.segments:
        assert segment.label and segment.description and segment.offer.kind != L.OFFER_KIND_UNSPECIFIED
        assert [c.feature_name for c in segment.centroid] == SEGMENT_FEATURES
        assert segment.top_categories and set(segment.top_categories) <= {c for w in WORLDS for c in w}
    assert await stubs.scoring.BuildSegments(request, metadata=operator, timeout=LONG_S) == built

    listed = await stubs.scoring.ListSegments(S.ListSegmentsRequest(page_size=3), metadata=analyst)
    rest = await stubs.scoring.ListSegments(S.ListSegmentsRequest(page_size=3, page_token=listed.next_page_token),
                                            metadata=analyst)
    assert [*listed.segments, *rest.segments] == list(built.segments) and not rest.next_page_token
    assert listed.segmentation == segmentation
    # Each archetype is (almost) one segment of its own (risers buy as often as steady buyers in a year).
    where: dict[str, str] = {}
    for segment in built.segments:
        members = await _all_members(stubs, analyst, segment.segment_id)
        assert len(members) == segment.member_count and members == sorted(members)
        where.update(dict.fromkeys(members, segment.segment_id))
    assert set(where) == population.consenting
    homes = {}
    for kind in ARCHETYPES:
        counts = Counter(where[m] for m in population.of(kind) if m in where)
        home, size = counts.most_common(1)[0]
        assert size >= 0.9 * sum(counts.values()), (kind, counts)
        homes[kind] = home
    assert len(set(homes.values())) == 4
    big = next(s for s in built.segments if s.segment_id == homes["big"])
    assert big.centroid[1].value > 100_000 and big.centroid[1].z_score > 1  # 1,000+ yuan baskets

    member = next(m for m in population.of("frequent") if m in population.consenting)
    mine = await stubs.scoring.GetMemberSegment(S.GetMemberSegmentRequest(member_id=member), metadata=analyst)
    assert mine.membership.segment_id == mine.segment.segment_id == homes["frequent"]
    outsider = next(m for m in population.archetype if m not in population.consenting)
    code, reason, _ = await rpc_error(stubs.scoring.GetMemberSegment(S.GetMemberSegmentRequest(
        member_id=outsider), metadata=analyst))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_SEGMENTED")
    tier = await stubs.rewards.GetMemberTier(rewards_pb2.GetMemberTierRequest(member_id=member), metadata=operator)
    assert (tier.tier.segmentation_id, tier.tier.segment_id) == (segmentation.segmentation_id, homes["frequent"])


async def test_segments_are_not_stored_when_rewards_cannot_take_them(stack: Stack, stubs: Stubs, operator: Any,
                                                                     analyst: Any, population: Population) -> None:
    current = (await stubs.scoring.ListSegments(S.ListSegmentsRequest(), metadata=analyst)).segmentation
    request = S.BuildSegmentsRequest(request_id=uid("r"), feature_names=SEGMENT_FEATURES, k=3, random_seed=1)
    stack.stop("rewards")
    try:
        code, reason, _ = await rpc_error(stubs.scoring.BuildSegments(request, metadata=operator, timeout=LONG_S))
    finally:
        stack.start("rewards")
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REWARDS_UNAVAILABLE")
    assert (await stubs.scoring.ListSegments(S.ListSegmentsRequest(), metadata=analyst)).segmentation == current
    # Nothing was stored, not even the request id: the retry builds and sends the segmentation.
    retried = (await stubs.scoring.BuildSegments(request, metadata=operator, timeout=LONG_S)).segmentation
    assert retried.current and retried.k == 3 and not retried.k_chosen_automatically
    assert retried.segmentation_id != current.segmentation_id
    assert [s.k for s in retried.silhouettes] == [3]
    old = await stubs.scoring.ListSegments(S.ListSegmentsRequest(segmentation_id=current.segmentation_id),
                                           metadata=analyst)
    assert not old.segmentation.current and len(old.segments) == current.k
    member = next(iter(sorted(population.consenting)))
    tier = await stubs.rewards.GetMemberTier(rewards_pb2.GetMemberTierRequest(member_id=member), metadata=operator)
    assert tier.tier.segmentation_id == retried.segmentation_id


# ---- upgrade propensity -------------------------------------------------------------------------


async def test_upgrade_propensity(stubs: Stubs, operator: Any, analyst: Any, population: Population) -> None:
    # The active policy ranks by tenure, which moves everybody alike: nobody ever upgrades under it.
    code, reason, _ = await rpc_error(stubs.scoring.TrainModel(S.TrainModelRequest(
        request_id=uid("r"), kind=L.MODEL_KIND_UPGRADE_PROPENSITY, horizon_days=45), metadata=operator,
        timeout=LONG_S))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_ENOUGH_HISTORY")
    tiers = await _policy(stubs, operator, _spend_policy())
    request = S.TrainModelRequest(request_id=uid("r"), kind=L.MODEL_KIND_UPGRADE_PROPENSITY, horizon_days=45,
                                  policy=policy_pb2.PolicyRef(policy_id=tiers.policy_id),
                                  feature_names=["purchase_count_30d", "purchase_count_365d", "net_spend_90d"],
                                  random_seed=5)
    trained = (await stubs.scoring.TrainModel(request, metadata=operator, timeout=LONG_S)).model
    assert trained.kind == L.MODEL_KIND_UPGRADE_PROPENSITY and trained.latest
    assert trained.method == L.MODEL_METHOD_LOGISTIC_REGRESSION and trained.horizon_days == 45
    assert trained.policy == policy_pb2.PolicyRef(policy_id=tiers.policy_id, version=tiers.version)
    calibration = trained.calibration
    assert 0 < calibration.base_rate < 0.6 and calibration.validation_members > 50
    assert sum(b.count for b in calibration.bins) == calibration.validation_members and len(calibration.bins) == 10
    assert calibration.auc > 0.65 and calibration.expected_calibration_error < 0.2, calibration
    assert calibration.brier_score < calibration.base_rate * (1 - calibration.base_rate) + 0.02  # beats the rate
    assert await stubs.scoring.TrainModel(request, metadata=operator, timeout=LONG_S) == S.TrainModelResponse(
        model=trained)
    assert (await stubs.scoring.GetModel(S.GetModelRequest(model_id=trained.model_id), metadata=analyst)).model == \
        trained

    code, reason, _ = await rpc_error(stubs.scoring.PredictUpgradePropensity(S.PredictUpgradePropensityRequest(
        top=S.TopMembers(n=5)), metadata=operator, timeout=LONG_S))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_EVALUATION_STATISTICS")
    run = await _dry_run(stubs, operator, tiers)
    gold = await stubs.scoring.ListEvaluationScores(S.ListEvaluationScoresRequest(
        run_id=run.run_id, tier_id="gold", page_size=1), metadata=analyst)
    risers = sorted(m for m in population.riser if m in population.consenting)[:3]
    outsider = next(m for m in population.archetype if m not in population.consenting)
    asked = [risers[0], gold.scores[0].member_id, outsider, "lm-unknown", *risers[1:]]
    reply = await stubs.scoring.PredictUpgradePropensity(S.PredictUpgradePropensityRequest(
        members=S.MemberIdList(member_ids=asked)), metadata=operator, timeout=LONG_S)
    got = [p.member_id for p in reply.predictions]
    assert got and got == [m for m in asked if m in got] and set(got) <= set(risers)  # request order, risers only
    for p in reply.predictions:
        assert 0 <= p.probability <= 1 and p.score_gap > 0 and p.next_tier_id != p.current_tier_id
    assert not reply.model.HasField("calibration") and reply.model.model_id == trained.model_id

    top = await stubs.scoring.PredictUpgradePropensity(S.PredictUpgradePropensityRequest(
        top=S.TopMembers(n=8), include_calibration=True), metadata=operator, timeout=LONG_S)
    probabilities = [p.probability for p in top.predictions]
    assert len(probabilities) == 8 and probabilities == sorted(probabilities, reverse=True)
    assert all(p.member_id in population.consenting and p.current_tier_id != "gold" for p in top.predictions)
    assert top.model.calibration == calibration
    silver_only = await stubs.scoring.PredictUpgradePropensity(S.PredictUpgradePropensityRequest(
        top=S.TopMembers(n=100, next_tier_id="silver")), metadata=operator, timeout=LONG_S)
    assert silver_only.predictions and {p.next_tier_id for p in silver_only.predictions} == {"silver"}


# ---- category recommendations -------------------------------------------------------------------


async def test_category_recommendations_follow_co_purchases(stubs: Stubs, operator: Any, analyst: Any,
                                                            population: Population) -> None:
    request = S.TrainModelRequest(request_id=uid("r"), kind=L.MODEL_KIND_CATEGORY_RECOMMENDER, random_seed=2)
    model = (await stubs.scoring.TrainModel(request, metadata=operator, timeout=LONG_S)).model
    report = model.recommender
    assert model.method == L.MODEL_METHOD_ITEM_COSINE and model.latest
    assert report.categories == 8 and report.members == model.members_trained > 80
    assert report.hit_rate_at_5 > 0.9 and report.hit_rate_at_5 >= report.popularity_hit_rate_at_5
    listed = await stubs.scoring.ListModels(S.ListModelsRequest(page_size=1), metadata=analyst)
    assert [m.model_id for m in listed.models] == [model.model_id] and listed.next_page_token
    propensity = await stubs.scoring.ListModels(S.ListModelsRequest(
        kind=L.MODEL_KIND_UPGRADE_PROPENSITY), metadata=analyst)
    assert [m.kind for m in propensity.models] == [L.MODEL_KIND_UPGRADE_PROPENSITY] * len(propensity.models)
    code, reason, _ = await rpc_error(stubs.scoring.PredictUpgradePropensity(S.PredictUpgradePropensityRequest(
        top=S.TopMembers(n=1), model_id=model.model_id), metadata=operator))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "WRONG_MODEL_KIND")

    shoppers = sorted(m for m in population.consenting if len(population.categories[m]) == 3)[:6]
    outsider = next(m for m in population.archetype if m not in population.consenting)
    asked = [*shoppers, outsider, population.no_history, "lm-unknown"]
    reply = await stubs.scoring.RecommendCategories(S.RecommendCategoriesRequest(
        member_ids=asked, top_n=3, exclude_purchased=True), metadata=operator, timeout=LONG_S)
    assert reply.model_id == model.model_id
    assert [r.member_id for r in reply.recommendations] == asked
    for entry in reply.recommendations[:len(shoppers)]:
        world = WORLDS[population.world[entry.member_id]]
        missing = next(c for c in world if c not in population.categories[entry.member_id])
        first = entry.recommendations[0]
        assert first.category == missing, entry
        assert set(first.because_of) and set(first.because_of) <= set(population.categories[entry.member_id])
        assert not {r.category for r in entry.recommendations} & set(population.categories[entry.member_id])
    assert [r.exclusion for r in reply.recommendations[len(shoppers):]] == [
        L.RECOMMENDATION_EXCLUSION_NO_PROFILING_CONSENT, L.RECOMMENDATION_EXCLUSION_NO_HISTORY,
        L.RECOMMENDATION_EXCLUSION_UNKNOWN_MEMBER]
    kept = await stubs.scoring.RecommendCategories(S.RecommendCategoriesRequest(member_ids=shoppers[:1], top_n=8),
                                                   metadata=operator, timeout=LONG_S)
    everything = [r.category for r in kept.recommendations[0].recommendations]
    assert len(everything) == 8 and set(population.categories[shoppers[0]]) <= set(everything)


# ---- fairness -----------------------------------------------------------------------------------


async def test_fairness_flags_the_group_made_worse_off(stubs: Stubs, operator: Any, analyst: Any,
                                                       population: Population) -> None:
    tiers = await _policy(stubs, operator, policy(uid("fair")))
    run = await _dry_run(stubs, operator, tiers)
    reply = await stubs.scoring.GetFairnessReport(S.GetFairnessReportRequest(
        run_id=run.run_id, min_group_size=10), metadata=analyst, timeout=LONG_S)
    report = reply.report
    assert report.reference_tier_id == "silver" and report.ratio_threshold == 0.8 and report.min_group_size == 10
    assert {g.dimension for g in report.groups} == {1, 2, 3, 4, 5}
    regions = {g.group: g for g in report.groups if g.dimension == E.FAIRNESS_DIMENSION_REGION}
    assert set(regions) == {"CN-EAST", "CN-NORTH", "CN-WEST"}
    assert regions["CN-WEST"].flagged and regions["CN-WEST"].reference_rate < 0.1
    assert regions["CN-WEST"].member_count == len(population.of("light"))
    assert not regions["CN-EAST"].flagged and not regions["CN-NORTH"].flagged
    assert max(g.ratio_to_best for g in regions.values()) == 1.0
    assert all(sum(s.share for s in g.tier_shares) == pytest.approx(1.0) for g in report.groups)
    assert sum(g.member_count for g in report.groups if g.dimension == E.FAIRNESS_DIMENSION_GENDER) == \
        run.members_scored
    assert report.flagged_count == sum(g.flagged for g in report.groups) >= 1
    assert {g.group for g in report.groups if g.dimension == E.FAIRNESS_DIMENSION_TENURE_BAND} == {"1-2y"}
    assert set(report.protected_attributes) == {"region", "gender", "age_band"}
    assert [o.feature_name for o in report.outlier_treatment] == [f.feature_name for f in tiers.features]
    assert not any(g.HasField("average_benefit_value") for g in report.groups)  # the policy prices no tier
    strict = await stubs.scoring.GetFairnessReport(S.GetFairnessReportRequest(
        run_id=run.run_id, dimensions=[E.FAIRNESS_DIMENSION_REGION], reference_tier_id="gold"), metadata=analyst)
    assert {g.dimension for g in strict.report.groups} == {E.FAIRNESS_DIMENSION_REGION}
    assert not any(g.flagged for g in strict.report.groups)  # every group under 100 members: never flagged
    assert all(g.insufficient_data for g in strict.report.groups)
    code, reason, fields = await rpc_error(stubs.scoring.GetFairnessReport(S.GetFairnessReportRequest(
        run_id=run.run_id, reference_tier_id="platinum"), metadata=analyst))
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_TIER", ["reference_tier_id"])



async def test_fairness_reports_the_benefit_value_each_group_gets(stubs: Stubs, operator: Any, analyst: Any,
                                                                   population: Population) -> None:
    """Benefit value by group: the mean over the group of the yearly value the policy gives each
    member's tier (run tiers, after hysteresis), in the policy's currency."""
    values = {"regular": 0, "silver": 30_000, "gold": 120_000}
    message = policy(uid("fair"))
    for tier in message.tiers:
        tier.yearly_benefit_value.CopyFrom(types_pb2.Money(amount_minor=values[tier.tier_id], currency="CNY"))
    tiers = await _policy(stubs, operator, message)
    assert [t.yearly_benefit_value.amount_minor for t in tiers.tiers] == [0, 30_000, 120_000]
    run = await _dry_run(stubs, operator, tiers)
    placed: dict[str, str] = {}
    token = ""
    while True:
        page = await stubs.scoring.ListEvaluationScores(S.ListEvaluationScoresRequest(
            run_id=run.run_id, page_size=1000, page_token=token), metadata=analyst)
        placed.update((s.member_id, s.tier_id) for s in page.scores)
        token = page.next_page_token
        if not token:
            break
    report = (await stubs.scoring.GetFairnessReport(S.GetFairnessReportRequest(
        run_id=run.run_id, dimensions=[E.FAIRNESS_DIMENSION_REGION], min_group_size=10), metadata=analyst,
        timeout=LONG_S)).report
    by_region: dict[str, list[int]] = {}
    for member, tier in placed.items():
        region = "CN-WEST" if population.archetype[member] == "light" else None
        if region is None:
            region = "CN-EAST" if int(member.split("-")[2]) % 2 == 0 else "CN-NORTH"
        by_region.setdefault(region, []).append(values[tier])
    got = {g.group: g.average_benefit_value for g in report.groups}
    assert set(got) == set(by_region)
    for region, amounts in by_region.items():
        assert got[region].currency == "CNY"
        assert got[region].amount_minor == round(sum(amounts) / len(amounts)), region
    assert got["CN-WEST"].amount_minor < min(got["CN-EAST"].amount_minor, got["CN-NORTH"].amount_minor)
    # The four-fifths ratios, recomputed from the run's own placements: each region's share at or
    # above silver (the default reference, here every tier worth more than 0) over the best region's.
    rates = {region: sum(a > 0 for a in amounts) / len(amounts) for region, amounts in by_region.items()}
    best = max(rate for region, rate in rates.items() if len(by_region[region]) >= 10)
    for group in report.groups:
        assert group.member_count == len(by_region[group.group])
        assert group.reference_rate == pytest.approx(rates[group.group])
        assert group.ratio_to_best == pytest.approx(rates[group.group] / best)
        assert group.flagged == (not group.insufficient_data and rates[group.group] / best < 0.8), group.group
    assert {g.group for g in report.groups if g.flagged} == {"CN-WEST"}  # the bias the population was built with

    partial = policy(uid("fair"))
    partial.tiers[1].yearly_benefit_value.CopyFrom(types_pb2.Money(amount_minor=-5, currency="CNY"))
    code, reason, fields = await rpc_error(stubs.scoring.ValidatePolicy(S.ValidatePolicyRequest(policy=partial),
                                                                        metadata=operator))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_POLICY")
    assert fields == ["policy.tiers[0].yearly_benefit_value", "policy.tiers[2].yearly_benefit_value",
                      "policy.tiers[1].yearly_benefit_value.amount_minor"]


# ---- the QUALIFYING POINTS rule -----------------------------------------------------------------


async def _points_settled(stubs: Stubs, metadata: Any) -> None:
    """Until profile's outbox has delivered every purchase to rewards (which posts the points)."""
    deadline = asyncio.get_running_loop().time() + LONG_S
    while True:
        status = await stubs.profile.GetOutboxStatus(P.GetOutboxStatusRequest(), metadata=metadata, timeout=10)
        if status.pending_count == 0 and status.retrying_count == 0:
            return
        assert asyncio.get_running_loop().time() < deadline, status
        await asyncio.sleep(0.5)


def _points_policy() -> policy_pb2.Policy:
    """The spend policy's ladder decided by qualifying points instead (about a point a yuan over a
    rolling year): silver from 4,000 points, gold from 7,000."""
    message = _spend_policy()
    message.qualifying_points.min_points[:] = [4_000, 7_000]
    return message


async def test_upgrade_propensity_and_upgrade_auc_under_qualifying_points(
        stubs: Stubs, operator: Any, analyst: Any, population: Population) -> None:
    """"Upgraded" is read off the members' qualifying points at each date, as the policy decides
    tiers: the model learns it, predictions give the points short of the next tier (no run needed),
    and FitWeights' upgrade AUC is measured rather than left at 0.5."""
    await _points_settled(stubs, operator)
    tiers = await _policy(stubs, operator, _points_policy())
    assert tiers.WhichOneof("threshold_rule") == "qualifying_points"
    trained = (await stubs.scoring.TrainModel(S.TrainModelRequest(
        request_id=uid("r"), kind=L.MODEL_KIND_UPGRADE_PROPENSITY, horizon_days=45,
        policy=policy_pb2.PolicyRef(policy_id=tiers.policy_id),
        feature_names=["purchase_count_30d", "purchase_count_365d", "net_spend_90d"], random_seed=5),
        metadata=operator, timeout=LONG_S)).model
    calibration = trained.calibration
    assert 0 < calibration.base_rate < 0.6 and calibration.validation_members > 50, calibration
    assert calibration.auc > 0.65, calibration

    risers = sorted(m for m in population.riser if m in population.consenting)
    reply = await stubs.scoring.PredictUpgradePropensity(S.PredictUpgradePropensityRequest(
        members=S.MemberIdList(member_ids=risers), model_id=trained.model_id), metadata=operator, timeout=LONG_S)
    assert reply.predictions and {p.member_id for p in reply.predictions} <= set(risers)
    balances = {}
    request = rewards_pb2.StreamQualifyingPointsRequest(member_ids=[p.member_id for p in reply.predictions])
    request.window_start.FromDatetime(datetime.now(UTC) - timedelta(days=366))
    async for chunk in stubs.rewards.StreamQualifyingPoints(request, metadata=analyst):
        balances.update(zip(chunk.member_ids, chunk.points, strict=True))
    minimum = {"silver": 4_000, "gold": 7_000}
    for p in reply.predictions:
        assert p.score_gap == 0 and 0 <= p.probability <= 1
        points = balances.get(p.member_id, 0)
        # The window is a rolling year in the time zone: a day's points at its edge may differ.
        assert abs(p.points_gap - (minimum[p.next_tier_id] - points)) <= 400, (p, points)
        assert p.points_gap > 0
    top = await stubs.scoring.PredictUpgradePropensity(S.PredictUpgradePropensityRequest(
        top=S.TopMembers(n=5), model_id=trained.model_id), metadata=operator, timeout=LONG_S)
    assert len(top.predictions) == 5 and all(p.current_tier_id != "gold" for p in top.predictions)

    fit = (await stubs.scoring.FitWeights(_fit_request(tiers, population.now), metadata=operator,
                                          timeout=LONG_S)).fit
    assert fit.proposed_metrics.upgrade_auc != 0.5 and 0.5 < fit.proposed_metrics.upgrade_auc <= 1, fit


# ---- exclude_purchased --------------------------------------------------------------------------


async def _bought_since(stubs: Stubs, metadata: Any, member_id: str, days: int) -> set[str]:
    request = P.ListMemberEventsRequest(member_id=member_id, page_size=1000)
    request.occurred_after.FromDatetime(datetime.now(UTC) - timedelta(days=days))
    reply = await stubs.profile.ListMemberEvents(request, metadata=metadata)
    return {i.category for e in reply.events if e.event.HasField("purchase") for i in e.event.purchase.items}


async def test_exclude_purchased_leaves_out_only_what_was_bought_in_the_window(
        stubs: Stubs, operator: Any, analyst: Any, population: Population) -> None:
    """exclude_purchased follows the purchases of the last `purchased_within_days` days (365 by
    default): a category bought only before that may be recommended again."""
    model = (await stubs.scoring.TrainModel(S.TrainModelRequest(
        request_id=uid("r"), kind=L.MODEL_KIND_CATEGORY_RECOMMENDER, random_seed=2), metadata=operator,
        timeout=LONG_S)).model
    big = [m for m in population.of("big") if m in population.consenting]
    for days in (30, 0):
        reply = await stubs.scoring.RecommendCategories(S.RecommendCategoriesRequest(
            member_ids=big, top_n=8, exclude_purchased=True, purchased_within_days=days, model_id=model.model_id),
            metadata=operator, timeout=LONG_S)
        for entry in reply.recommendations:
            recent = await _bought_since(stubs, operator, entry.member_id, days or 365)
            assert {r.category for r in entry.recommendations} == set(WORLDS[0] + WORLDS[1]) - recent, entry
    # Big buyers order every ~100 days: some bought a category of theirs only before the last 30 days.
    window = await stubs.scoring.RecommendCategories(S.RecommendCategoriesRequest(
        member_ids=big, top_n=8, exclude_purchased=True, purchased_within_days=30, model_id=model.model_id),
        metadata=operator, timeout=LONG_S)
    again = [e for e in window.recommendations
             if {r.category for r in e.recommendations} & set(population.categories[e.member_id])]
    assert again, "a category bought long ago was never recommended again"

    for fields, wrong in (({"purchased_within_days": 30}, "purchased_within_days"),
                          ({"purchased_within_days": 731, "exclude_purchased": True}, "purchased_within_days")):
        code, _, violations = await rpc_error(stubs.scoring.RecommendCategories(S.RecommendCategoriesRequest(
            member_ids=big[:1], **fields), metadata=operator))
        assert (code, violations) == (grpc.StatusCode.INVALID_ARGUMENT, [wrong])
