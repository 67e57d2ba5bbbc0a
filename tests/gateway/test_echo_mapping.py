"""The gateway's mapping rules against the test-only EchoService: routes read from its
descriptors, proto3 JSON both ways, path/query/body binding, NDJSON streams, headers, and every
bad input answered with a 4xx google.rpc.Status naming the field."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from libs.contracts import ContractError
from services.gateway.routes import Router, bindings_for, parse_template
from tests.gateway.echo import BODY_BYTES_MAX, EchoStack
from tests.gateway.statuses import reason as _reason
from tests.gateway.statuses import violations as _violations

FULL = {
    "id": "e1", "big": "9007199254740993", "unsignedBig": "18446744073709551615", "small": -5,
    "ratio": 0.25, "single": 1.5, "flag": True, "blob": "aGVsbG8=", "shade": "SHADE_DARK",
    "tags": ["a", "b"], "shades": ["SHADE_LIGHT", "SHADE_DARK"], "counts": {"x": "1", "y": "-2"},
    "names": {"1": "one"}, "at": "2024-05-01T08:00:00Z", "wait": "1.500s", "mask": "big,inner.label",
    "maybeBig": "7", "maybeFlag": False, "extra": {"k": [1, "v", None, {"n": True}]},
    "inner": {"label": "top", "level": 1, "child": {"label": "deep", "level": 2, "child": {"label": "deeper"}}},
    "inners": [{"label": "i0"}, {"level": 3}], "item": {"label": "chosen"}, "opt": "",
    "bigs": ["1", "-9223372036854775808"],
}


def _subset(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    for key, value in expected.items():
        if isinstance(value, dict) and key not in ("counts", "names", "extra"):
            _subset(value, actual[key])
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for want, got in zip(value, actual[key], strict=True):
                _subset(want, got)
        else:
            assert actual[key] == value, (key, actual[key], value)


# -- routes from descriptors ---------------------------------------------------------------------

def test_routes_come_from_the_descriptors(echo_stack: EchoStack) -> None:
    """A new annotated RPC appears without gateway code; an RPC without an annotation does not."""
    assert echo_stack.gateway is not None
    routes = {(b.http_method, b.path.template, b.method.name) for b in echo_stack.gateway.bindings}
    assert routes == {
        ("POST", "/v1/echo/{id}:echo", "Echo"), ("GET", "/v1/echo/{id}", "Echo"),
        ("PUT", "/v1/{shelf.name=shelves/*}/note", "PutNote"), ("DELETE", "/v1/things/{thing_id}", "DeleteThing"),
        ("GET", "/v1/count/{to}", "Count"),
    }
    spec = echo_stack.gateway.spec
    operations = {op["operationId"] for item in spec["paths"].values() for op in item.values()}
    assert operations == {"EchoService_Echo", "EchoService_Echo_1", "EchoService_PutNote",
                          "EchoService_DeleteThing", "EchoService_Count"}
    assert set(spec["paths"]) == {"/v1/echo/{id}:echo", "/v1/echo/{id}", "/v1/{shelf_name}/note",
                                  "/v1/things/{thing_id}", "/v1/count/{to}"}
    assert spec["paths"]["/v1/things/{thing_id}"]["delete"]["security"] == []  # public


def test_templates_prefer_the_most_specific_route() -> None:
    from loyalty_testing.v1 import gateway_pb2

    router = Router(bindings_for([gateway_pb2.DESCRIPTOR.services_by_name["EchoService"]]))
    echo = router.match("POST", "/v1/echo/a:b:echo")
    assert echo is not None and echo.path_values == {"id": "a:b"}
    shelf = router.match("PUT", "/v1/shelves/s%2F1/note")
    assert shelf is not None and shelf.path_values == {"shelf.name": "shelves/s/1"}
    assert router.match("PUT", "/v1/shelves/a/b/note") is None
    assert router.match("GET", "/v1/echo/") is None
    assert router.allowed_methods("/v1/echo/x") == ["GET"]


@pytest.mark.parametrize("template", ["v1/x", "/v1/{a", "/v1/{a}}", "/v1/{1a}", "/v1/{a=b c}", "/v1/x:bad verb",
                                      "/v1/{a=**/x}"])
def test_bad_templates_stop_start_up(template: str) -> None:
    with pytest.raises(ContractError):
        parse_template(template)


# -- proto3 JSON -------------------------------------------------------------------------------

async def test_every_json_mapping_round_trips(echo: httpx.AsyncClient) -> None:
    reply = await echo.post("/v1/echo/e1:echo", json=FULL)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    echoed = reply.json()["echoed"]
    _subset(FULL, echoed)
    assert echoed["counts"] == FULL["counts"] and echoed["names"] == FULL["names"]
    assert echoed["extra"] == FULL["extra"]
    assert "text" not in echoed  # the unset member of the oneof stays absent
    assert echoed["failWith"] == 0  # unset fields without presence are shown with their default


async def test_proto_names_numbers_and_nulls_are_accepted(echo: httpx.AsyncClient) -> None:
    body = {"unsigned_big": 5, "big": 12, "shade": 1, "fail_with": None, "inner": None, "bigs": [3, "4"],
            "ratio": "NaN", "single": "-Infinity", "wait": "-0.5s"}
    echoed = (await echo.post("/v1/echo/x:echo", json=body)).json()["echoed"]
    assert echoed["unsignedBig"] == "5" and echoed["big"] == "12" and echoed["shade"] == "SHADE_LIGHT"
    assert echoed["bigs"] == ["3", "4"] and "inner" not in echoed
    assert echoed["ratio"] == "NaN" and echoed["single"] == "-Infinity" and echoed["wait"] == "-0.500s"


async def test_path_and_query_values_set_fields(echo: httpx.AsyncClient) -> None:
    query = [("big", "-42"), ("tags", "a"), ("tags", "b c"), ("shade", "SHADE_DARK"), ("shades", "2"),
             ("inner.label", "x"), ("inner.child.level", "3"), ("flag", "true"), ("at", "2024-01-02T03:04:05Z"),
             ("maybeBig", "7"), ("maybe_flag", "false"), ("wait", "2s"), ("mask", "a,b"), ("ratio", "0.5"),
             ("blob", "aGk"), ("opt", "")]
    reply = await echo.get("/v1/echo/p%20q%C3%A9", params=query)
    assert reply.status_code == 200, reply.text
    echoed = reply.json()["echoed"]
    assert echoed["id"] == "p qé"
    assert echoed["big"] == "-42" and echoed["tags"] == ["a", "b c"] and echoed["shades"] == ["SHADE_DARK"]
    assert echoed["inner"] == {"label": "x", "level": 0, "child": {"label": "", "level": 3}}
    assert echoed["flag"] is True and echoed["at"] == "2024-01-02T03:04:05Z" and echoed["maybeBig"] == "7"
    assert echoed["maybeFlag"] is False and echoed["wait"] == "2s" and echoed["mask"] == "a,b"
    assert echoed["blob"] == "aGk=" and echoed["opt"] == ""


async def test_path_value_wins_over_the_body(echo: httpx.AsyncClient) -> None:
    echoed = (await echo.post("/v1/echo/from-path:echo", json={"id": "from-body"})).json()["echoed"]
    assert echoed["id"] == "from-path"


async def test_named_body_field_and_response_body(echo: httpx.AsyncClient) -> None:
    reply = await echo.put("/v1/shelves/s1/note", params={"dryRun": "false"}, json={"text": "hi", "version": "3"})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"text": "hi", "version": "4"}  # the response's `note` field only
    refused = await echo.put("/v1/shelves/s1/note", params={"note.text": "x"}, json={"text": "hi"})
    assert refused.status_code == 400 and "note.text" in _violations(refused.json())


async def test_delete_with_repeated_query(echo: httpx.AsyncClient) -> None:
    reply = await echo.delete("/v1/things/t1", params=[("reasons", "old"), ("reasons", "dup")])
    assert reply.json() == {"thingId": "t1", "reasons": ["old", "dup"]}


async def test_empty_body_is_an_empty_message(echo: httpx.AsyncClient) -> None:
    reply = await echo.post("/v1/echo/e:echo")
    assert reply.status_code == 200 and reply.json()["echoed"]["id"] == "e"


# -- streams -----------------------------------------------------------------------------------

async def test_server_stream_is_ndjson(echo: httpx.AsyncClient) -> None:
    reply = await echo.get("/v1/count/3")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert lines == [{"result": {"n": "1"}}, {"result": {"n": "2"}}, {"result": {"n": "3"}}]


async def test_empty_stream_is_an_empty_body(echo: httpx.AsyncClient) -> None:
    reply = await echo.get("/v1/count/0")
    assert reply.status_code == 200 and reply.text == ""


async def test_stream_failing_midway_ends_with_an_error_line(echo: httpx.AsyncClient) -> None:
    reply = await echo.get("/v1/count/5", params={"failAfter": "2"})
    assert reply.status_code == 200
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert lines[:2] == [{"result": {"n": "1"}}, {"result": {"n": "2"}}]
    assert lines[2]["error"]["code"] == 9 and _reason(lines[2]["error"]) == "ASKED_TO_FAIL"
    assert len(lines) == 3


async def test_stream_refused_at_once_gets_its_http_status(echo: httpx.AsyncClient) -> None:
    reply = await echo.get("/v1/count/1000")
    assert reply.status_code == 400
    assert reply.json()["code"] == 3 and "fail_with" in _violations(reply.json())


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "http"), [
    (1, 499), (2, 500), (3, 400), (4, 504), (5, 404), (6, 409), (7, 403), (8, 429), (9, 400), (10, 409),
    (11, 400), (12, 501), (13, 500), (14, 503), (15, 500), (16, 401),
])
async def test_grpc_codes_map_to_http_statuses(echo: httpx.AsyncClient, code: int, http: int) -> None:
    reply = await echo.post("/v1/echo/e:echo", json={"failWith": code})
    assert reply.status_code == http
    body = reply.json()
    assert body["code"] == code and body["message"]
    info = next(d for d in body["details"] if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo")
    assert info == {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ASKED_TO_FAIL",
                    "domain": "testing.loyalty", "metadata": {"code": str(code)}}
    if code == 3:
        assert _violations(body) == {"fail_with": "asked to fail"}


BAD_BODIES: list[tuple[Any, str, str]] = [
    ({"nope": 1}, "nope", "unknown field"),
    ({"big": "12x"}, "big", "expected an integer"),
    ({"big": 1.5}, "big", "expected an integer"),
    ({"small": 2**31}, "small", "out of range"),
    ({"unsignedBig": "-1"}, "unsignedBig", "out of range"),
    ({"flag": "yes"}, "flag", "expected true or false"),
    ({"shade": "SHADE_PURPLE"}, "shade", "is not a Shade"),
    ({"shade": True}, "shade", "expected a Shade"),
    ({"blob": "!!!"}, "blob", "base64"),
    ({"at": "yesterday"}, "at", "not a valid Timestamp"),
    ({"wait": "5 minutes"}, "wait", "not a valid Duration"),
    ({"tags": "a"}, "tags", "expected a JSON array"),
    ({"tags": [1]}, "tags[0]", "expected a string"),
    ({"inners": [None]}, "inners[0]", "null"),
    ({"inner": {"level": "x"}}, "inner.level", "expected an integer"),
    ({"inner": {"child": {"oops": 1}}}, "inner.child.oops", "unknown field"),
    ({"inner": []}, "inner", "expected a JSON object"),
    ({"text": "a", "item": {}}, "item", "only one of oneof 'choice'"),
    ({"counts": {"a": "x"}}, "counts['a']", "expected an integer"),
    ({"names": {"one": "x"}}, "names['one']", "expected an integer"),
    ({"counts": []}, "counts", "expected a JSON object"),
    ({"single": 1e39}, "single", "out of range"),
    ({"ratio": "lots"}, "ratio", "expected a number"),
    ({"maybeBig": "x"}, "maybeBig", "not a valid Int64Value"),
    ([1, 2], "body", "expected a JSON object"),
    ("text", "body", "expected a JSON object"),
]


@pytest.mark.parametrize(("body", "field", "words"), BAD_BODIES, ids=[b[1] + "-" + b[2] for b in BAD_BODIES])
async def test_bad_body_values_name_their_field(echo: httpx.AsyncClient, body: Any, field: str, words: str) -> None:
    reply = await echo.post("/v1/echo/e:echo", json=body)
    assert reply.status_code == 400, reply.text
    status = reply.json()
    assert status["code"] == 3 and _reason(status) == "INVALID_ARGUMENT"
    violations = _violations(status)
    assert field in violations and words in violations[field], violations


BAD_QUERIES: list[tuple[list[tuple[str, str]], str, str]] = [
    ([("small", "abc")], "small", "expected an integer"),
    ([("small", "1"), ("small", "2")], "small", "takes one value"),
    ([("flag", "yes")], "flag", "expected true or false"),
    ([("nope", "1")], "nope", "unknown field"),
    ([("inner", "x")], "inner", "cannot be set from text"),
    ([("inner.nope", "x")], "inner.nope", "unknown field"),
    ([("tags.x", "1")], "tags", "is not a message field"),
    ([("counts", "1")], "counts", "map field"),
    ([("extra", "{}")], "extra", "cannot be set from text"),
    ([("id", "other")], "id", "set by the path"),
    ([("at", "soon")], "at", "not a valid Timestamp"),
    ([("shade", "DARK")], "shade", "is not a Shade"),
]


@pytest.mark.parametrize(("query", "field", "words"), BAD_QUERIES, ids=[q[1] + "-" + q[2] for q in BAD_QUERIES])
async def test_bad_query_values_name_their_field(echo: httpx.AsyncClient, query: list[tuple[str, str]],
                                                 field: str, words: str) -> None:
    reply = await echo.get("/v1/echo/e", params=query)
    assert reply.status_code == 400, reply.text
    violations = _violations(reply.json())
    assert field in violations and words in violations[field], violations


@pytest.mark.parametrize(("content", "words"), [
    (b"{", "not valid JSON"), (b'{"id": }', "not valid JSON"), (b"\xff\xfe", "not UTF-8"),
    (b'{"ratio": NaN}', "not valid JSON"), (b"[" * 100 + b"]" * 100, "nests deeper"),
])
async def test_malformed_json_is_a_400(echo: httpx.AsyncClient, content: bytes, words: str) -> None:
    reply = await echo.post("/v1/echo/e:echo", content=content, headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["code"] == 3 and _reason(reply.json()) == "MALFORMED_JSON" and words in reply.json()["message"]


async def test_other_request_refusals(echo: httpx.AsyncClient) -> None:
    with_query = await echo.post("/v1/echo/e:echo", params={"big": "1"}, json={})
    assert with_query.status_code == 400 and "big" in _violations(with_query.json())
    not_json = await echo.post("/v1/echo/e:echo", content=b"id=1", headers={"content-type": "text/plain"})
    assert not_json.status_code == 415 and _reason(not_json.json()) == "UNSUPPORTED_MEDIA_TYPE"
    body_on_get = await echo.request("GET", "/v1/echo/e", content=b'{"id": "x"}')
    assert body_on_get.status_code == 400 and "takes no request body" in body_on_get.json()["message"]
    too_large = await echo.post("/v1/echo/e:echo", json={"tags": ["x" * 1000] * (BODY_BYTES_MAX // 1000 + 1)})
    assert too_large.status_code == 413 and _reason(too_large.json()) == "BODY_TOO_LARGE"
    bad_path = await echo.get("/v1/echo/%FF")
    assert bad_path.status_code == 400 and "path" in _violations(bad_path.json())
    bad_query = await echo.get("/v1/echo/e?tags=%FF")
    assert bad_query.status_code == 400 and "query" in _violations(bad_query.json())


async def test_unknown_route_and_wrong_method_are_statuses(echo: httpx.AsyncClient) -> None:
    missing = await echo.get("/v1/nothing/here")
    assert missing.status_code == 404
    assert missing.json()["code"] == 5 and _reason(missing.json()) == "ROUTE_NOT_FOUND"
    wrong = await echo.delete("/v1/echo/e")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
    assert wrong.json()["code"] == 12 and _reason(wrong.json()) == "METHOD_NOT_ALLOWED"
    odd = await echo.request("BREW", "/v1/echo/e")
    assert odd.status_code == 405


# -- headers and traces ----------------------------------------------------------------------------

async def test_bearer_token_and_request_id_pass_through(echo: httpx.AsyncClient) -> None:
    reply = await echo.post("/v1/echo/e:echo", json={}, headers={"authorization": "Bearer abc.def",
                                                                   "x-request-id": "req-123"})
    assert reply.headers["x-request-id"] == "req-123"
    seen = reply.json()
    assert seen["authorization"] == "Bearer abc.def" and seen["requestId"] == "req-123"


async def test_request_id_is_generated_when_absent(echo: httpx.AsyncClient) -> None:
    first = await echo.post("/v1/echo/e:echo", json={})
    second = await echo.get("/v1/nothing")
    generated = first.headers["x-request-id"]
    assert len(generated) == 32 and generated == first.json()["requestId"]
    assert first.json()["authorization"] == ""  # the gateway adds no token of its own
    assert second.headers["x-request-id"] not in ("", generated)


@pytest.mark.parametrize("value", ["a" * 129, "has space", "semi;colon", "ünï"])
async def test_bad_request_id_is_refused(echo: httpx.AsyncClient, value: str) -> None:
    reply = await echo.post("/v1/echo/e:echo", json={}, headers={"x-request-id": value.encode()})
    assert reply.status_code == 400 and "X-Request-Id" in _violations(reply.json())
    assert len(reply.headers["x-request-id"]) == 32  # a generated one, to find the refusal in the logs


async def test_bad_authorization_header_is_refused(echo: httpx.AsyncClient) -> None:
    reply = await echo.post("/v1/echo/e:echo", json={}, headers={"authorization": "Bearer \x01"})
    assert reply.status_code == 400 and "Authorization" in _violations(reply.json())


async def test_trace_context_continues_through_the_gateway(echo: httpx.AsyncClient, span_exporter: Any) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e4736aa"
    span_exporter.clear()
    reply = await echo.post("/v1/echo/e:echo", json={},
                            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    outgoing = reply.json()["traceparent"]
    assert outgoing.split("-")[1] == trace_id  # the gRPC call carries the caller's trace
    spans = [s for s in span_exporter.get_finished_spans() if s.name == "POST /v1/echo/{id}:echo"]
    assert spans, [s.name for s in span_exporter.get_finished_spans()]
    span = spans[-1]
    assert f"{span.context.trace_id:032x}" == trace_id
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert span.attributes["http.route"] == "/v1/echo/{id}:echo"
    assert span.attributes["http.response.status_code"] == 200
    assert outgoing.split("-")[2] != "00f067aa0ba902b7"  # a child of the gateway's span, not the caller's


# -- an unreachable upstream ----------------------------------------------------------------------

async def test_unreachable_service_is_a_503(test_protos_dir: Any) -> None:
    from services.gateway.app import Gateway
    from tests.gateway.echo import echo_settings, echo_upstream
    from tests.support.processes import free_port

    gateway = Gateway(echo_settings(), [echo_upstream(f"127.0.0.1:{free_port()}")])
    await gateway.open()
    try:
        transport = httpx.ASGITransport(app=gateway.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            reply = await client.post("/v1/echo/e:echo", json={})
    finally:
        await gateway.close()
    assert reply.status_code == 503
    body = reply.json()
    assert body["code"] == 14 and _reason(body) == "UPSTREAM_UNAVAILABLE"
    assert "127.0.0.1" not in body["message"]  # grpc's transport text (addresses) is not sent
