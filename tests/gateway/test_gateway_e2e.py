"""The real gateway process in front of the session's four real services: round trips of real
RPCs over HTTP/JSON, their errors as google.rpc.Status, and the OpenAPI document and docs page."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from libs.contracts import package_modules, service_descriptors
from libs.settings import SERVICE_NAMES
from services.gateway.routes import bindings_for
from tests.gateway.statuses import reason as _reason
from tests.gateway.statuses import violations as _violations

pytestmark = pytest.mark.e2e


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _uid() -> str:
    return uuid.uuid4().hex[:12]


async def _create_member(http: httpx.AsyncClient, token: str, **member: Any) -> dict[str, Any]:
    member_id = f"gw-{_uid()}"
    reply = await http.post("/v1/members", headers=_auth(token), json={
        "requestId": f"r-{_uid()}",
        "member": {"memberId": member_id, "channel": "CHANNEL_APP", "region": "CN-SH", **member},
    })
    assert reply.status_code == 200, reply.text
    created: dict[str, Any] = reply.json()["member"]
    return created


def _purchase(member_id: str, at: datetime, amount_minor: int) -> dict[str, Any]:
    return {"eventId": f"ev-{_uid()}", "memberId": member_id, "occurredAt": at.isoformat().replace("+00:00", "Z"),
            "channel": "CHANNEL_WEB",
            "purchase": {"orderId": f"o-{_uid()}", "amount": {"amountMinor": str(amount_minor), "currency": "CNY"}}}


def _view(member_id: str, at: datetime) -> dict[str, Any]:
    return {"eventId": f"ev-{_uid()}", "memberId": member_id, "occurredAt": at.isoformat().replace("+00:00", "Z"),
            "channel": "CHANNEL_APP", "view": {"category": "shoes"}}


async def test_member_events_and_features_round_trip(http: httpx.AsyncClient, dev_tokens: dict[str, str]) -> None:
    admin = dev_tokens["admin"]
    member = await _create_member(http, admin, joinedAt="2023-01-15T00:00:00Z")
    member_id = member["memberId"]
    # camelCase, enums by name, timestamps as RFC 3339, defaults shown
    assert member["channel"] == "CHANNEL_APP" and member["status"] == "MEMBER_STATUS_ACTIVE"
    assert member["joinedAt"] == "2023-01-15T00:00:00Z" and "tenureDays" in member and "member_id" not in member

    now = datetime.now(UTC).replace(microsecond=0)
    events = [_purchase(member_id, now - timedelta(days=2), 12_345), _view(member_id, now - timedelta(days=1)),
              _purchase(member_id, now - timedelta(hours=1), 5_000)]
    recorded = await http.post("/v1/events:batchRecord", headers=_auth(admin), json={"events": events})
    assert recorded.status_code == 200, recorded.text
    body = recorded.json()
    assert body["acceptedCount"] == 3 and [r["status"] for r in body["results"]] == ["EVENT_STATUS_ACCEPTED"] * 3

    listed = await http.get(f"/v1/members/{member_id}/events", headers=_auth(admin),
                            params=[("pageSize", "1"), ("eventTypes", "EVENT_TYPE_PURCHASE"),
                                    ("eventTypes", "EVENT_TYPE_REFUND")])
    assert listed.status_code == 200, listed.text
    page = listed.json()
    assert len(page["events"]) == 1 and page["nextPageToken"]  # two purchases, one per page
    newest = page["events"][0]
    assert newest["event"]["purchase"]["amount"] == {"amountMinor": "5000", "currency": "CNY"}  # int64 as string

    portrait = await http.get(f"/v1/members/{member_id}/portrait", headers=_auth(admin))
    assert portrait.status_code == 200, portrait.text
    assert member_id in portrait.text

    features = await http.post("/v1/features:batchGet", headers=_auth(admin),
                               json={"memberIds": [member_id], "featureNames": ["purchase_count_30d"]})
    assert features.status_code == 200, features.text
    assert features.json()["chunk"]["memberIds"] == [member_id]


async def test_feature_stream_is_ndjson(http: httpx.AsyncClient, dev_tokens: dict[str, str]) -> None:
    admin = dev_tokens["admin"]
    ids = sorted([(await _create_member(http, admin))["memberId"] for _ in range(3)])
    async with http.stream("POST", "/v1/features:stream", headers=_auth(admin),
                           json={"memberIds": ids, "chunkSize": 2, "featureNames": ["tenure_days"]}) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) async for line in reply.aiter_lines() if line]
    messages = [line["result"] for line in lines]
    assert messages[0]["header"]["featureNames"] == ["tenure_days"]
    assert [m for chunk in messages[1:] if "chunk" in chunk for m in chunk["chunk"]["memberIds"]] == ids
    assert messages[-1]["last"] is True and messages[-1]["membersSent"] == "3"


async def test_stream_refused_before_its_first_message(http: httpx.AsyncClient, dev_tokens: dict[str, str]) -> None:
    reply = await http.post("/v1/features:stream", headers=_auth(dev_tokens["admin"]),
                            json={"featureNames": ["no_such_feature"]})
    assert reply.status_code == 400
    assert reply.json()["code"] == 3 and _violations(reply.json())


async def test_service_errors_keep_their_details(http: httpx.AsyncClient, dev_tokens: dict[str, str]) -> None:
    admin = _auth(dev_tokens["admin"])
    invalid = await http.post("/v1/members", headers=admin,
                              json={"requestId": "r-1", "member": {"memberId": "bad id!", "email": "nope"}})
    assert invalid.status_code == 400
    assert invalid.json()["code"] == 3 and {"member.member_id", "member.email"} <= set(_violations(invalid.json()))

    missing = await http.get(f"/v1/members/nobody-{_uid()}", headers=admin)
    assert missing.status_code == 404
    assert missing.json()["code"] == 5 and _reason(missing.json()) == "MEMBER_NOT_FOUND"

    anonymous = await http.get("/v1/members/anyone")
    assert anonymous.status_code == 401 and anonymous.json()["code"] == 16

    readonly = await http.post("/v1/members", headers=_auth(dev_tokens["readonly"]),
                               json={"requestId": f"r-{_uid()}", "member": {"memberId": f"m-{_uid()}"}})
    assert readonly.status_code == 403
    assert readonly.json()["code"] == 7 and _reason(readonly.json()) == "SCOPE_MISSING"

    wrong_token = await http.get("/v1/members/anyone", headers=_auth("not-a-token"))
    assert wrong_token.status_code == 401


async def test_member_update_binds_a_nested_path_field(http: httpx.AsyncClient, dev_tokens: dict[str, str]) -> None:
    admin = dev_tokens["admin"]
    member = await _create_member(http, admin)
    reply = await http.patch(f"/v1/members/{member['memberId']}", headers=_auth(admin), json={
        "requestId": f"r-{_uid()}", "member": {"region": "CN-BJ"}, "updateMask": "region"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["member"]["region"] == "CN-BJ"


async def test_gateway_refusals(http: httpx.AsyncClient, dev_tokens: dict[str, str]) -> None:
    admin = _auth(dev_tokens["admin"])
    malformed = await http.post("/v1/members", headers={**admin, "content-type": "application/json"},
                                content=b'{"member": ')
    assert malformed.status_code == 400 and _reason(malformed.json()) == "MALFORMED_JSON"
    unknown_field = await http.post("/v1/members", headers=admin, json={"member": {"memberId": "x", "shoeSize": 9}})
    assert unknown_field.status_code == 400 and list(_violations(unknown_field.json())) == ["member.shoeSize"]
    bad_page = await http.get("/v1/members", headers=admin, params={"pageSize": "many"})
    assert bad_page.status_code == 400 and list(_violations(bad_page.json())) == ["pageSize"]
    no_route = await http.get("/v2/members")
    assert no_route.status_code == 404
    assert no_route.json()["code"] == 5 and _reason(no_route.json()) == "ROUTE_NOT_FOUND"


async def test_request_id_echoed_or_generated(http: httpx.AsyncClient, dev_tokens: dict[str, str]) -> None:
    given = await http.get("/v1/features", headers={**_auth(dev_tokens["admin"]), "x-request-id": "trace-me-42"})
    assert given.status_code == 200 and given.headers["x-request-id"] == "trace-me-42"
    generated = await http.get("/v1/features", headers=_auth(dev_tokens["admin"]))
    assert len(generated.headers["x-request-id"]) == 32


def _all_bindings() -> list[Any]:
    services = [s for name in SERVICE_NAMES for s in service_descriptors(package_modules(f"loyalty.{name}.v1"))]
    return bindings_for(services)


async def test_openapi_lists_every_annotated_rpc_and_is_valid(http: httpx.AsyncClient) -> None:
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

    reply = await http.get("/openapi.json")
    assert reply.status_code == 200
    spec = reply.json()
    errors = [str(e)[:300] for e in OPENAPI_31_VALIDATOR.iter_errors(spec)]
    assert errors == []
    operations = {op["operationId"]: (method, path) for path, item in spec["paths"].items()
                  for method, op in item.items()}
    bindings = _all_bindings()
    assert len(bindings) >= 100
    assert set(operations) == {b.operation_id for b in bindings}
    methods = {m.full_name for svc in {b.method.containing_service for b in bindings} for m in svc.methods}
    assert {b.method.full_name for b in bindings} == methods  # every RPC of the four services is routed
    create = spec["paths"]["/v1/members"]["post"]
    assert create["x-loyalty-scopes"] == ["profile.write"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/loyalty.profile.v1.CreateMemberRequest"}
    schemas = spec["components"]["schemas"]
    member = schemas["loyalty.profile.v1.Member"]["properties"]
    assert member["joinedAt"]["format"] == "date-time"
    assert member["channel"] == {"$ref": "#/components/schemas/loyalty.common.v1.Channel",
                                 "x-loyalty-rules": {"definedOnly": True}}
    assert schemas["loyalty.common.v1.Money"]["properties"]["amountMinor"]["type"] == "string"
    assert "CHANNEL_APP" in schemas["loyalty.common.v1.Channel"]["enum"]
    stream = spec["paths"]["/v1/features:stream"]["post"]["responses"]["200"]["content"]
    assert list(stream) == ["application/x-ndjson"]


async def test_docs_page_and_health(http: httpx.AsyncClient) -> None:
    docs = await http.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    for binding in _all_bindings():
        assert f'id="{binding.operation_id}"' in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text  # self-contained: no CDN
    health = await http.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "SERVING"
