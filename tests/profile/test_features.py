"""The feature catalogue and the columnar feature matrix (stream and batch), on known data."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import grpc
import pytest

from libs.errors import LoyaltyError
from loyalty.profile.v1 import feature_pb2, profile_service_pb2
from services.profile.domain import features as catalogue
from services.profile.service_layer import features as features_module
from services.profile.service_layer.features import (
    category_bytes_per_member,
    list_features,
    member_features,
    stream_features,
)
from services.profile.service_layer.portraits import category_affinities
from tests.profile.conftest import Events, uid
from tests.profile.test_record_events import record
from tests.support.rpc import rpc_error


def _last_noon() -> datetime:
    """Noon UTC of today, or of yesterday before today's: a fixed hour keeps events off day edges,
    and it must not be ahead of the clock (as_of in the future is refused) when the suite runs in
    the morning."""
    now = datetime.now(UTC)
    noon = now.replace(hour=12, minute=0, second=0, microsecond=0)
    return noon if noon <= now else noon - timedelta(days=1)


NOW = _last_noon()


async def _population(pool: asyncpg.Pool) -> list[Events]:
    """Five members; member i bought i times 1,000 (10 days ago) and once 5,000 (100 days ago)."""
    members = [Events(now=NOW) for _ in range(5)]
    for i, ev in enumerate(members):
        events = [ev.purchase(1_000, at=NOW - timedelta(days=10, minutes=j)) for j in range(i)]
        events.append(ev.purchase(5_000, at=NOW - timedelta(days=100)))
        events.append(ev.browse(120 * (i + 1), at=NOW - timedelta(days=2)))
        await record(pool, *events)
    return members


async def _collect(pool: asyncpg.Pool, request: profile_service_pb2.StreamFeaturesRequest
                   ) -> list[profile_service_pb2.StreamFeaturesResponse]:
    return [message async for message in stream_features(pool, request)]


def _matrix(messages: list[profile_service_pb2.StreamFeaturesResponse]) -> dict[str, dict[str, float]]:
    names = list(messages[0].header.feature_names)
    result: dict[str, dict[str, float]] = {}
    for message in messages[1:]:
        if message.HasField("chunk"):
            for row, member in enumerate(message.chunk.member_ids):
                result[member] = {c.feature_name: c.values[row] for c in message.chunk.columns}
                assert [c.feature_name for c in message.chunk.columns] == names
    return result


def test_catalogue_lists_families_and_points() -> None:
    response = list_features(profile_service_pb2.ListFeaturesRequest())
    names = {f.name for f in response.features}
    assert {"net_spend_365d", "purchase_count_90d", "browse_minutes_30d", "tenure_days",
            "days_since_last_purchase"} <= names
    assert response.catalogue_version == catalogue.catalogue_version()
    page = list_features(profile_service_pb2.ListFeaturesRequest(page_size=5))
    assert len(page.features) == 5
    assert page.next_page_token
    rest = list_features(profile_service_pb2.ListFeaturesRequest(page_size=1000, page_token=page.next_page_token))
    assert len(page.features) + len(rest.features) == len(response.features)


@pytest.mark.parametrize(("name", "ok"), [("net_spend_45d", True), ("net_spend_730d", True),
                                          ("net_spend_731d", False), ("net_spend_0d", False),
                                          ("no_such_feature", False), ("tenure_days", True)])
def test_feature_names(name: str, ok: bool) -> None:
    if ok:
        column, _ = catalogue.resolve(name)
        assert column.name == name
    else:
        with pytest.raises(catalogue.UnknownFeature):
            catalogue.resolve(name)


async def test_stream_matches_known_values_across_chunks(profile_pool: asyncpg.Pool) -> None:
    members = await _population(profile_pool)
    ids = sorted(ev.member_id for ev in members)
    request = profile_service_pb2.StreamFeaturesRequest(
        feature_names=["purchase_count_30d", "net_spend_365d", "gross_spend", "browse_minutes_7d",
                       "days_since_last_purchase", "average_order_value"],
        chunk_size=2, member_ids=ids, include_group_attributes=True)
    request.as_of.FromDatetime(NOW)
    messages = await _collect(profile_pool, request)
    assert messages[0].header.total_members == 5
    assert messages[0].header.chunk_size == 2
    assert [len(m.chunk.member_ids) for m in messages[1:-1]] == [2, 2, 1]
    assert messages[-1].last and messages[-1].members_sent == 5
    assert [m.chunk.offset for m in messages[1:-1]] == [0, 2, 4]
    matrix = _matrix(messages)
    assert list(matrix) == ids  # ascending ids across the whole stream
    for i, ev in enumerate(members):
        row = matrix[ev.member_id]
        assert row["purchase_count_30d"] == i
        assert row["net_spend_365d"] == 1_000 * i + 5_000
        assert row["gross_spend"] == 1_000 * i + 5_000
        assert row["browse_minutes_7d"] == 2 * (i + 1)
        assert row["days_since_last_purchase"] == (10 if i else 100)
        assert row["average_order_value"] == pytest.approx((1_000 * i + 5_000) / (i + 1))
    groups = messages[1].chunk.group_attributes
    assert len(groups.tenure_days) == len(messages[1].chunk.member_ids) == 2


async def test_as_of_in_the_past_sees_only_what_happened_before(profile_pool: asyncpg.Pool) -> None:
    members = await _population(profile_pool)
    request = profile_service_pb2.StreamFeaturesRequest(feature_names=["gross_spend", "days_since_last_purchase"],
                                                        member_ids=[ev.member_id for ev in members])
    request.as_of.FromDatetime(NOW - timedelta(days=50))
    matrix = _matrix(await _collect(profile_pool, request))
    # The members joined (were created by their first event) 100 days ago; the later purchases don't count.
    assert {row["gross_spend"] for row in matrix.values()} == {5_000}
    assert {row["days_since_last_purchase"] for row in matrix.values()} == {50}


async def test_resume_after_a_cut(profile_pool: asyncpg.Pool) -> None:
    members = await _population(profile_pool)
    ids = sorted(ev.member_id for ev in members)
    request = profile_service_pb2.StreamFeaturesRequest(feature_names=["gross_spend"], member_ids=ids,
                                                        start_after_member_id=ids[1])
    matrix = _matrix(await _collect(profile_pool, request))
    assert list(matrix) == ids[2:]


async def test_members_without_data_get_defaults_and_erased_ones_are_left_out(profile_pool: asyncpg.Pool) -> None:
    quiet, erased = Events(), Events()
    await record(profile_pool, quiet.view(), erased.view())
    await profile_pool.execute("UPDATE members SET status = 2 WHERE member_id = $1", erased.member_id)
    request = profile_service_pb2.StreamFeaturesRequest(feature_names=["gross_spend_30d", "days_since_last_purchase"],
                                                        member_ids=[quiet.member_id, erased.member_id])
    matrix = _matrix(await _collect(profile_pool, request))
    assert matrix == {quiet.member_id: {"gross_spend_30d": 0.0,
                                        "days_since_last_purchase": catalogue.NO_PURCHASE_DAYS}}


async def test_unknown_features_are_invalid_arguments_naming_the_item(profile_pool: asyncpg.Pool) -> None:
    request = profile_service_pb2.StreamFeaturesRequest(feature_names=["gross_spend", "nope", "net_spend_999d"])
    with pytest.raises(LoyaltyError) as caught:
        await _collect(profile_pool, request)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in caught.value.violations] == ["feature_names[1]", "feature_names[2]"]


async def test_chunks_stay_under_the_message_limit(profile_pool: asyncpg.Pool) -> None:
    request = profile_service_pb2.StreamFeaturesRequest(chunk_size=50_000, member_ids=["nobody"])
    header = (await _collect(profile_pool, request))[0].header
    bytes_per_member = 8 * len(header.feature_names) + 40
    assert header.chunk_size * bytes_per_member <= 3_500_000 < 50_000 * bytes_per_member


async def test_batch_get_lists_missing_members(profile_pool: asyncpg.Pool) -> None:
    members = await _population(profile_pool)
    request = profile_service_pb2.BatchGetMemberFeaturesRequest(
        member_ids=[members[2].member_id, "unknown-member"], feature_names=["purchase_count_30d"])
    response = await member_features(profile_pool, request)
    assert list(response.chunk.member_ids) == [members[2].member_id]
    assert list(response.chunk.columns[0].values) == [2.0]
    assert list(response.missing_member_ids) == ["unknown-member"]
    assert response.header.features[0] == catalogue.resolve("purchase_count_30d")[0].definition
    assert isinstance(response.header.features[0], feature_pb2.FeatureDefinition)


# ---------------------------------------------------------------------------------------------
# The member × category matrix
# ---------------------------------------------------------------------------------------------

Measure: TypeAlias = feature_pb2.CategoryMeasure.ValueType
UNDEFINED_MEASURE = Measure(99)
SPEND = feature_pb2.CATEGORY_MEASURE_SPEND
ITEMS = feature_pb2.CATEGORY_MEASURE_ITEMS_PURCHASED
VIEWS = feature_pb2.CATEGORY_MEASURE_VIEWS
AFFINITY = feature_pb2.CATEGORY_MEASURE_AFFINITY


@dataclass(frozen=True)
class _Shoppers:
    """A buyer (spend, items and views across three categories), a viewer (views of one category
    only) and a quiet member (no category at all); categories a < b < c are this test's own."""

    a: str
    b: str
    c: str
    buyer: str
    viewer: str
    quiet: str

    @property
    def ids(self) -> list[str]:
        return sorted([self.buyer, self.viewer, self.quiet])


async def _shoppers(pool: asyncpg.Pool) -> _Shoppers:
    tag = uid("cat")
    a, b, c = f"{tag}-a", f"{tag}-b", f"{tag}-c"
    buyer, viewer, quiet = Events(now=NOW), Events(now=NOW), Events(now=NOW)
    await record(pool, buyer.purchase(5_000, items=[(a, 1, 1_000), (b, 2, 2_000)]),
                 buyer.view(c), buyer.view(c), buyer.view(a), viewer.view(b), viewer.view(b), quiet.browse(60))
    return _Shoppers(a, b, c, buyer.member_id, viewer.member_id, quiet.member_id)


def _expected_rows(s: _Shoppers, measure: Measure) -> dict[str, dict[str, float]]:
    """Each member's non-zero cells by category name, worked out by hand (affinity: weight times share,
    in that order, so the floats are the same bits)."""
    w = 0.7  # CategoryAffinity: 0.7 · spend share + 0.3 · view share
    rows: dict[Measure, dict[str, dict[str, float]]] = {
        SPEND: {s.buyer: {s.a: 1_000, s.b: 4_000}, s.viewer: {}, s.quiet: {}},
        ITEMS: {s.buyer: {s.a: 1, s.b: 2}, s.viewer: {}, s.quiet: {}},
        VIEWS: {s.buyer: {s.a: 1, s.c: 2}, s.viewer: {s.b: 2}, s.quiet: {}},
        AFFINITY: {s.buyer: {s.a: w * (1 / 5) + (1 - w) * (1 / 3), s.b: w * (4 / 5), s.c: (1 - w) * (2 / 3)},
                   s.viewer: {s.b: (1 - w) * 1.0}, s.quiet: {}},
    }
    return rows[measure]


def _csr(chunk: feature_pb2.FeatureChunk) -> tuple[list[int], list[int], list[float]]:
    matrix = chunk.category_matrix
    return list(matrix.row_offsets), list(matrix.category_indices), list(matrix.values)


def _expected_csr(ids: list[str], rows: dict[str, dict[str, float]], vocabulary: list[str]
                  ) -> tuple[list[int], list[int], list[float]]:
    offsets, indices, values = [0], [], []
    for member in ids:
        cells = sorted((vocabulary.index(name), value) for name, value in rows[member].items())
        indices += [index for index, _ in cells]
        values += [value for _, value in cells]
        offsets.append(len(indices))
    return offsets, indices, values


def _category_request(s: _Shoppers, measure: Measure, **fields: Any) -> profile_service_pb2.StreamFeaturesRequest:
    return profile_service_pb2.StreamFeaturesRequest(feature_names=["gross_spend"], category_measure=measure,
                                                     member_ids=[*s.ids, "unknown-member"], **fields)


@pytest.mark.parametrize("measure", [SPEND, ITEMS, VIEWS, AFFINITY])
async def test_category_matrix_is_exact_csr_in_chunk_order(profile_pool: asyncpg.Pool, measure: Measure) -> None:
    s = await _shoppers(profile_pool)
    messages = await _collect(profile_pool, _category_request(s, measure))
    header = messages[0].header
    vocabulary = list(header.category_vocabulary)
    assert header.category_measure == measure
    assert vocabulary == sorted(set(vocabulary))  # other tests' categories may be there too
    ia, ib, ic = (vocabulary.index(name) for name in (s.a, s.b, s.c))
    assert ia < ib < ic
    [chunk] = [m.chunk for m in messages if m.HasField("chunk")]
    assert list(chunk.member_ids) == s.ids
    offsets, indices, values = _csr(chunk)
    assert (offsets, indices, values) == _expected_csr(s.ids, _expected_rows(s, measure), vocabulary)
    row = {member: slice(offsets[i], offsets[i + 1]) for i, member in enumerate(s.ids)}
    assert row[s.quiet].start == row[s.quiet].stop  # no categories: an empty row
    if measure == SPEND:
        assert (indices[row[s.buyer]], values[row[s.buyer]]) == ([ia, ib], [1_000.0, 4_000.0])
        assert indices[row[s.viewer]] == []  # views only: no spend, and zeros are left out
    elif measure == VIEWS:
        assert (indices[row[s.buyer]], values[row[s.buyer]]) == ([ia, ic], [1.0, 2.0])
        assert (indices[row[s.viewer]], values[row[s.viewer]]) == ([ib], [2.0])
    elif measure == AFFINITY:
        assert values[row[s.buyer]] == pytest.approx([0.14 + 0.1, 0.56, 0.2])
        assert values[row[s.viewer]] == pytest.approx([0.3])


async def test_category_affinity_is_the_portraits_formula_bit_for_bit(profile_pool: asyncpg.Pool) -> None:
    s = await _shoppers(profile_pool)
    messages = await _collect(profile_pool, _category_request(s, AFFINITY))
    vocabulary = list(messages[0].header.category_vocabulary)
    offsets, indices, values = _csr(messages[1].chunk)
    for i, member in enumerate(s.ids):
        rows = await profile_pool.fetch(
            "SELECT category, spend_minor, items_purchased, view_count FROM member_categories WHERE member_id = $1",
            member)
        portrait = {a.category: a.affinity for a in category_affinities(rows, "CNY") if a.affinity}
        streamed = {vocabulary[indices[j]]: values[j] for j in range(offsets[i], offsets[i + 1])}
        assert streamed == portrait


async def test_category_matrix_resumes_after_a_cut_one_member_per_chunk(profile_pool: asyncpg.Pool) -> None:
    s = await _shoppers(profile_pool)
    messages = await _collect(profile_pool, _category_request(s, VIEWS, chunk_size=1,
                                                              start_after_member_id=s.ids[0]))
    vocabulary = list(messages[0].header.category_vocabulary)
    assert messages[0].header.total_members == 2
    chunks = [m.chunk for m in messages if m.HasField("chunk")]
    assert [list(c.member_ids) for c in chunks] == [[member] for member in s.ids[1:]]
    rows = _expected_rows(s, VIEWS)
    for chunk in chunks:  # each chunk's CSR stands alone: its offsets start at 0
        assert _csr(chunk) == _expected_csr(list(chunk.member_ids), rows, vocabulary)
    assert messages[-1].last and messages[-1].members_sent == 2


async def test_without_a_measure_there_is_no_category_matrix(profile_pool: asyncpg.Pool) -> None:
    s = await _shoppers(profile_pool)
    messages = await _collect(profile_pool, _category_request(s, feature_pb2.CATEGORY_MEASURE_UNSPECIFIED))
    assert not messages[0].header.category_vocabulary
    assert not messages[1].chunk.HasField("category_matrix")


async def test_category_matrix_shrinks_chunks_to_stay_under_the_message_limit(profile_pool: asyncpg.Pool) -> None:
    await _shoppers(profile_pool)  # at least three categories
    plain = profile_service_pb2.StreamFeaturesRequest(chunk_size=50_000, member_ids=["nobody"])
    with_categories = profile_service_pb2.StreamFeaturesRequest(chunk_size=50_000, member_ids=["nobody"],
                                                                category_measure=AFFINITY)
    plain_header = (await _collect(profile_pool, plain))[0].header
    header = (await _collect(profile_pool, with_categories))[0].header
    assert len(header.category_vocabulary) >= 3
    least_per_member = 8 * len(header.feature_names) + 40 + category_bytes_per_member(3, 0.0)
    assert header.chunk_size < plain_header.chunk_size
    assert header.chunk_size * least_per_member <= 3_500_000


def test_category_bytes_per_member_estimate() -> None:
    assert category_bytes_per_member(0, None) == 4  # no categories: the row offset only
    assert category_bytes_per_member(3, None) == 4 + 3 * 9  # never more entries than categories
    assert category_bytes_per_member(1_000, 2.0) == 4 + 16 * 10  # a floor, 2-byte indices
    assert category_bytes_per_member(1_000, 10.0) == 4 + 40 * 10  # four times the average
    assert category_bytes_per_member(200, None) == 4 + 64 * 10  # statistics not gathered yet


async def test_a_vocabulary_over_one_message_is_a_failed_precondition(profile_pool: asyncpg.Pool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    s = await _shoppers(profile_pool)
    monkeypatch.setattr(features_module, "GRPC_MESSAGE_BYTES_MAX", 16)
    with pytest.raises(LoyaltyError) as caught:
        await _collect(profile_pool, _category_request(s, SPEND))
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "CATEGORY_VOCABULARY_TOO_LARGE"


async def test_an_undefined_measure_is_an_invalid_argument_in_process(profile_pool: asyncpg.Pool) -> None:
    request = profile_service_pb2.StreamFeaturesRequest(feature_names=["gross_spend"],
                                                        category_measure=UNDEFINED_MEASURE)
    with pytest.raises(LoyaltyError) as caught:
        await _collect(profile_pool, request)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in caught.value.violations] == ["category_measure"]


async def test_category_matrix_over_the_real_service(profile_pool: asyncpg.Pool, stub: Any,
                                                     storefront: Any) -> None:
    """The process's stream agrees with its own portraits; an undefined measure is refused up front."""
    s = await _shoppers(profile_pool)
    messages = [m async for m in stub.StreamFeatures(_category_request(s, AFFINITY), metadata=storefront,
                                                     timeout=30)]
    vocabulary = list(messages[0].header.category_vocabulary)
    offsets, indices, values = _csr(messages[1].chunk)
    for i, member in enumerate(messages[1].chunk.member_ids):
        reply = await stub.GetMemberPortrait(profile_service_pb2.GetMemberPortraitRequest(member_id=member),
                                             metadata=storefront, timeout=30)
        portrait = {a.category: a.affinity for a in reply.portrait.category_affinity if a.affinity}
        assert {vocabulary[indices[j]]: values[j] for j in range(offsets[i], offsets[i + 1])} == portrait

    async def undefined() -> None:
        request = profile_service_pb2.StreamFeaturesRequest(category_measure=UNDEFINED_MEASURE)
        async for _ in stub.StreamFeatures(request, metadata=storefront, timeout=30):
            pass

    code, _, fields = await rpc_error(undefined())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == ["category_measure"]
