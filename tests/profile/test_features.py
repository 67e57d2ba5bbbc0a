"""The feature catalogue and the columnar feature matrix (stream and batch), on known data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from libs.errors import LoyaltyError
from loyalty.profile.v1 import feature_pb2, profile_service_pb2
from services.profile.domain import features as catalogue
from services.profile.service_layer.features import list_features, member_features, stream_features
from tests.profile.conftest import Events
from tests.profile.test_record_events import record

NOW = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)


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
