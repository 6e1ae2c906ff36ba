"""schemas/ agrees with the wire types, and real payloads from a running stack validate against it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import orjson
import pytest
from openapi_spec_validator import validate as validate_openapi

from jetspool.domain import names
from jetspool.domain.schemas import ASYNCAPI_FILE, asyncapi, generate, render
from jetspool.gateway.intake import CONTROL_QUERY
from jetspool.jetstream.connection import connect
from jetspool.settings import NatsSettings
from tests.support.servers import Reply

if TYPE_CHECKING:
    from tests.support.stack import Stack

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


@pytest.mark.parametrize(("filename", "schema"), sorted(generate().items()))
def test_committed_schema_matches_the_wire_type(filename: str, schema: dict[str, Any]) -> None:
    committed = (SCHEMAS / filename).read_bytes()
    assert committed == render(schema), f"regenerate: python -m jetspool.domain.schemas schemas/ ({filename})"


def test_every_committed_schema_is_generated() -> None:
    assert sorted(p.name for p in SCHEMAS.glob("*.schema.json")) == sorted(generate())


def test_the_asyncapi_document_is_generated_and_refers_to_committed_schemas() -> None:
    document = asyncapi()
    assert (SCHEMAS / ASYNCAPI_FILE).read_bytes() == render(document), "regenerate: python -m jetspool.domain.schemas"
    for message in document["components"]["messages"].values():
        if "schema" in message["payload"]:  # a multi-format schema object, naming JSON Schema 2020-12
            assert message["payload"]["schemaFormat"] == "application/schema+json;version=draft-2020-12"
            assert (SCHEMAS / message["payload"]["schema"]["$ref"]).exists()
        else:  # no JSON: an empty wake-up or counter increment, a request id to cancel
            assert message["contentType"] == "text/plain"
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert names.queue_subject("{function}", "high").replace("high", "{priority}") in addresses
    assert names.event_subject("{function}", "queued").replace("queued", "{type}") in addresses
    assert names.callback_subject("{kind}") in addresses
    assert {names.DEADLINE_SUBJECT, names.SWEEP_SUBJECT} <= addresses
    assert names.wake_subject("{function}", "{priority}") in addresses
    assert names.cancel_subject("{function}") in addresses
    assert names.counter_subject("{function}", "completed").replace("completed", "{counter}") in addresses


def _status_key(request_id: str) -> tuple[str, str]:
    return f"KV_{names.STATUS_BUCKET}", f"$KV.{names.STATUS_BUCKET}.{request_id}"


def _validate(filename: str, payload: bytes) -> None:
    schema = orjson.loads((SCHEMAS / filename).read_bytes())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(orjson.loads(payload), schema, cls=jsonschema.Draft202012Validator)


async def test_real_payloads_validate_against_the_schemas(stack_without_worker: Stack) -> None:
    stack = stack_without_worker
    await stack.register("echo")
    stack.receiver.default = Reply(500)  # the callback job stays on its stream, retried, so it can be read
    request_id = await stack.submit(
        "echo", content=b"\x00\xffbinary", headers={"X-Callback-Url": stack.callback_url("/hook")}
    )
    keyed_id = await stack.submit("echo", content=b"{}", headers={"Idempotency-Key": "schemas"})
    conn = await connect(NatsSettings(url=stack.nats.url), "schema-test")
    try:
        on = names.queue_subject("echo", "normal")
        queued = await conn.js.get_msg(names.QUEUE_STREAM, seq=1, subject=on, next=True)  # the first
        keyed = await conn.js.get_msg(names.QUEUE_STREAM, subject=on)  # the last
        stream, subject = _status_key(request_id)
        keyed_subject = _status_key(keyed_id)[1]
        waiting_status = await conn.js.get_msg(stream, subject=keyed_subject)  # a keyed submit writes it at once
        function = await conn.js.get_msg(f"KV_{names.FUNCTIONS_BUCKET}", subject=f"$KV.{names.FUNCTIONS_BUCKET}.echo")
        await stack.start_worker()
        await stack.wait_for_status("echo", request_id)
        await stack.receiver.wait_for("/hook")
        job = await conn.js.get_msg(names.CALLBACK_STREAM, subject=names.callback_subject("openfaas"))
        done_status = await conn.js.get_msg(stream, subject=subject)
    finally:
        await conn.close()

    _validate("queue-request.schema.json", queued.data or b"")  # with an id derived from it
    _validate("queue-request.schema.json", keyed.data or b"")  # with its own id
    _validate("status-record.schema.json", waiting_status.data or b"")
    _validate("status-record.schema.json", done_status.data or b"")  # the small result in it
    assert orjson.loads(queued.data or b"")["id_nonce"]
    assert orjson.loads(keyed.data or b"")["request_id"] == keyed_id
    assert orjson.loads(done_status.data or b"")["result"]["body"]
    _validate("function.schema.json", function.data or b"")
    _validate("callback-job.schema.json", job.data or b"")
    assert orjson.loads(done_status.data or b"")["status"] == "COMPLETED"


async def test_status_objects_and_webhooks_validate_against_the_schemas(stack: Stack) -> None:
    await stack.register("echo")
    running = await stack.occupy()
    waiting = await stack.client.post("/queue/busy", json={}, params={"fal_webhook": stack.callback_url("/fal")})
    waiting_id = waiting.json()["request_id"]
    in_queue = await stack.client.get(f"/queue/busy/requests/{waiting_id}/status", params={"logs": "1"})
    in_progress = await stack.client.get(f"/queue/busy/requests/{running}/status")
    stack.functions.script("/echo", [Reply(500, b"not json")])
    failed_id = await stack.submit("echo", headers={"X-Callback-Url": stack.callback_url("/hook")})
    await stack.wait_for_status("echo", failed_id)
    stack.functions.release("/busy", 2)
    await stack.wait_for_status("busy", waiting_id)
    [webhook] = await stack.receiver.wait_for("/fal")
    done = await stack.client.get(f"/queue/busy/requests/{waiting_id}/status", params={"logs": "1"})
    failed = await stack.client.get(f"/queue/echo/requests/{failed_id}/status")
    async with stack.client.stream("GET", f"/queue/busy/requests/{waiting_id}/status/stream") as sse:
        data = [line.removeprefix("data: ") async for line in sse.aiter_lines() if line.startswith("data: ")]

    assert in_queue.json()["status"] == "IN_QUEUE"
    assert "queue_position" in in_queue.json()
    assert in_progress.json()["status"] == "IN_PROGRESS"
    assert failed.json()["error_type"] == "function_error"
    for response in (in_queue, in_progress, done, failed):
        _validate("status-object.schema.json", response.content)
    for event in data:
        _validate("status-object.schema.json", event.encode())
    _validate("fal-webhook.schema.json", webhook.body)


async def test_the_gateways_http_answers_validate_against_the_schemas(stack: Stack) -> None:
    """Every JSON answer of the public and admin routes that is not a status object."""
    entry = await stack.register("echo")
    listed = (await stack.client.get("/system/functions")).json()
    one = (await stack.client.get("/system/functions/echo")).json()
    submitted = await stack.client.post("/queue/echo", json={"x": 1}, headers={"X-Callback-Url": stack.callback_url()})
    request_id = submitted.json()["request_id"]
    async_call = await stack.client.post("/function/echo", params={"async": "true"}, content=b"{}")
    await stack.wait_for_status("echo", request_id)
    done_cancel = await stack.client.put(f"/queue/echo/requests/{request_id}/cancel")
    unknown_cancel = await stack.client.put(f"/queue/echo/requests/{uuid.uuid4()}/cancel")
    redeliver = await stack.client.post(f"/queue/echo/requests/{request_id}/callback/redeliver")
    refused_retry = await stack.client.post(f"/queue/echo/requests/{request_id}/retry")
    bad_priority = await stack.client.post("/queue/echo", json={}, headers={"X-Queue-Priority": "urgent"})
    no_function = await stack.client.post("/async-function/nope", content=b"")
    running = await stack.occupy()
    not_done = await stack.client.get(f"/queue/busy/requests/{running}")
    waiting = await stack.client.post("/queue/busy", json={})
    waiting_cancel = await stack.client.put(f"/queue/busy/requests/{waiting.json()['request_id']}/cancel")
    await stack.client.post("/queue/busy", json={})
    purge = await stack.client.post("/system/functions/busy/purge")
    [call] = stack.functions.on("/busy")
    logs = await stack.client.post(call.header("x-logs-url") or "", json={"message": "hello"})
    stack.functions.release("/busy")

    answers = [
        ("function-entry", [entry, *listed, one]),
        ("submit-answer", [submitted.json()]),
        ("async-call-answer", [async_call.json()]),
        ("cancel-answer", [done_cancel.json(), unknown_cancel.json(), waiting_cancel.json()]),
        ("redeliver-answer", [redeliver.json()]),
        ("error-answer", [refused_retry.json(), bad_priority.json(), no_function.json(), not_done.json()]),
        ("purge-answer", [purge.json()]),
        ("logs-answer", [logs.json()]),
    ]
    for name, bodies in answers:
        for body in bodies:
            _validate(f"{name}.schema.json", orjson.dumps(body))
    refusals = [done_cancel, unknown_cancel, refused_retry, bad_priority, no_function, not_done]
    assert [r.status_code for r in refusals] == [400, 404, 400, 422, 404, 400]
    assert [r.status_code for r in (waiting_cancel, purge, logs)] == [202, 200, 202]
    assert (not_done.json()["status"], purge.json()["purged"]) == ("IN_PROGRESS", 1)


_SPEC_ROUTES = {
    ("post", "/async-function/{name}"),
    ("post", "/async-function/{name}/{path}"),
    *((method, "/function/{name}") for method in ("get", "post", "put", "patch", "delete")),
    ("post", "/queue/{name}"),
    ("post", "/queue/{name}/{path}"),
    ("get", "/queue/{name}/requests/{request_id}/status"),
    ("get", "/queue/{name}/requests/{request_id}/status/stream"),
    ("get", "/queue/{name}/requests/{request_id}"),
    ("put", "/queue/{name}/requests/{request_id}/cancel"),
    ("post", "/queue/{name}/requests/{request_id}/retry"),
    ("post", "/queue/{name}/requests/{request_id}/callback/redeliver"),
    ("post", "/fal/queue/submit/{name}"),
    ("get", "/fal/queue/{request_id}/get"),
    ("put", "/fal/queue/{request_id}/cancel"),
    ("get", "/system/functions"),
    ("post", "/system/functions"),
    ("get", "/system/functions/{name}"),
    ("put", "/system/functions/{name}"),
    ("delete", "/system/functions/{name}"),
    ("post", "/system/functions/{name}/purge"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/schema"),
    ("get", "/schema/openapi.json"),
}
"""SPEC §2's routes, as the OpenAPI document names them."""


async def test_the_openapi_document_is_valid_and_has_every_route_of_the_spec(stack: Stack) -> None:
    answer = await stack.client.get("/schema/openapi.json")
    document = answer.json()

    validate_openapi(document)  # raises on an invalid OpenAPI 3 document
    assert (answer.status_code, document["openapi"].split(".")[0]) == (200, "3")
    assert answer.headers["content-type"] == "application/json", "SPEC §2; Litestar's own type failed a strict check"
    viewer = await stack.client.get("/schema")
    assert (viewer.status_code, viewer.headers["content-type"].split(";")[0]) == (200, "text/html")
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert _SPEC_ROUTES - documented == set()


async def test_every_route_answers_options_with_the_methods_the_document_names(stack: Stack) -> None:
    """The registry paths answered `Allow: GET, OPTIONS`, leaving out POST, PUT and DELETE (found by
    an audit). The synchronous proxy is left out: it relays OPTIONS to the function."""
    await stack.register("echo")
    document = (await stack.client.get("/schema/openapi.json")).json()
    filled = {"{name}": "echo", "{request_id}": str(uuid.uuid4()), "{path}": "x"}
    allowed, documented = {}, {}
    for path, item in document["paths"].items():
        if path.startswith("/function/"):
            continue
        url = path
        for slot, value in filled.items():
            url = url.replace(slot, value)
        answer = await stack.client.options(url)
        allowed[path] = (answer.status_code, set(answer.headers["allow"].split(", ")))
        documented[path] = (204, {method.upper() for method in item} | {"OPTIONS"})

    assert allowed == documented
    assert allowed["/system/functions/{name}"] == (204, {"GET", "PUT", "DELETE", "OPTIONS"})


async def test_the_openapi_document_describes_the_registry_routes_and_the_api_keys(stack: Stack) -> None:
    """The registry routes answered a bare object, their entry's `stats` named nowhere, POST and PUT
    took no body, and no security scheme was named (found by an audit)."""
    document = (await stack.client.get("/schema/openapi.json")).json()
    paths, ref = document["paths"], "#/components/schemas/{}".format

    def answer(path: str, method: str, code: str) -> Any:
        return paths[path][method]["responses"][code]["content"]["application/json"]["schema"]

    assert answer("/system/functions", "get", "200") == {"type": "array", "items": {"$ref": ref("FunctionEntry")}}
    assert answer("/system/functions/{name}", "get", "200") == {"$ref": ref("FunctionEntry")}
    assert answer("/system/functions", "post", "201") == {"$ref": ref("FunctionEntry")}
    assert answer("/system/functions/{name}", "put", "201") == {"$ref": ref("FunctionEntry")}
    assert answer("/system/functions/{name}/purge", "post", "200") == {"$ref": ref("PurgeAnswer")}
    for path, method in (("/system/functions", "post"), ("/system/functions/{name}", "put")):
        body = paths[path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": ref("Function")}
        assert {"400", "422"} <= set(paths[path][method]["responses"])
    assert "stats" in document["components"]["schemas"]["FunctionEntry"]["properties"]
    schemes = document["components"]["securitySchemes"]
    assert (schemes["bearer"]["scheme"], schemes["key"]["name"]) == ("bearer", "Authorization")
    assert document["security"] == [{"bearer": []}, {"key": []}]
    for path in ("/healthz", "/readyz", "/metrics", "/schema"):
        assert paths[path]["get"]["security"] == [], path
    logs = paths["/queue/{name}/requests/{request_id}/logs"]["post"]
    assert logs["security"] == []
    assert "token" in {p["name"] for p in logs["parameters"] if p["in"] == "query"}
    assert "security" not in paths["/queue/{name}"]["post"]


@pytest.mark.parametrize("path", ["/schema/nope", "/schema/nope.json", "/schema/swagger/nope"])
async def test_an_unknown_path_under_schema_gets_a_json_404(stack: Stack, path: str) -> None:
    """SPEC §2: errors are JSON with `detail`; Litestar answered HTML here (found by a security audit)."""
    answer = await stack.client.get(path)

    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["detail"]
    assert (await stack.client.get("/schema/swagger")).headers["content-type"].startswith("text/html")


async def test_a_functions_own_html_404_is_relayed_as_it_is(stack: Stack) -> None:
    """The JSON 404 of unknown `/schema` paths is for them alone: made on the app, it replaced a
    function's `text/html` 404 (nginx's own page) on the proxy and the result route (found by a review)."""
    await stack.register("echo")
    page = Reply(404, b"<html>nginx: not here</html>", content_type="text/html")
    stack.functions.script("/echo", [page, page])
    proxied = await stack.client.get("/function/echo")
    request_id = await stack.submit("echo", content=b"x")
    await stack.wait_for_status("echo", request_id)
    result = await stack.client.get(f"/queue/echo/requests/{request_id}")

    for answer in (proxied, result):
        assert (answer.status_code, answer.content) == (404, b"<html>nginx: not here</html>")
        assert answer.headers["content-type"] == "text/html"
    assert result.headers["x-error-type"] == "function_error"


async def test_the_openapi_document_names_the_submission_options_answers_and_errors(stack: Stack) -> None:
    """Generated alone, every error was a 400 with `status_code` and `extra`, which no answer has,
    the status route had no 202, and no submit named an option (found by a SPEC audit)."""
    document = (await stack.client.get("/schema/openapi.json")).json()
    paths = document["paths"]
    error = {"$ref": "#/components/schemas/ErrorAnswer"}

    for route in ("/queue/{name}", "/async-function/{name}", "/fal/queue/submit/{name}/{path}"):
        submit = paths[route]["post"]
        named = {(p["in"], p["name"]) for p in submit["parameters"]}
        assert {("query", name) for name in CONTROL_QUERY} <= named, route
        assert {("header", "X-Queue-Priority"), ("header", "X-Request-Timeout"), ("header", "Idempotency-Key")} <= named
        for code in ("400", "404", "413", "422", "429", "431", "503"):
            assert submit["responses"][code]["content"]["application/json"]["schema"] == error, (route, code)
        assert "Retry-After" in submit["responses"]["429"]["headers"], route
        assert submit["requestBody"]["content"] == {"*/*": {}}, route
    status = paths["/queue/{name}/requests/{request_id}/status"]["get"]["responses"]
    assert status["202"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/StatusObject"}
    assert status["404"]["content"]["application/json"]["schema"] == error
    assert "401" not in paths["/healthz"]["get"]["responses"]
    assert "503" in paths["/readyz"]["get"]["responses"]
    for stream in ("/queue/{name}/requests/{request_id}/status/stream", "/system/dashboard/events"):
        assert "max_streams" in paths[stream]["get"]["responses"]["503"]["description"], stream
    assert "text/event-stream" in paths["/system/dashboard/events"]["get"]["responses"]["200"]["content"]
    # an outside audit: the result route gives the function's own answers (any status, any type), and
    # every answer about a request names it in X-Request-Id (SPEC §2)
    result = paths["/queue/{name}/requests/{request_id}"]["get"]["responses"]
    assert {"*/*", "application/json"} <= result["404"]["content"].keys()
    assert "X-Error-Type" in result["default"]["headers"]
    about_a_request = [
        (route, method, code)
        for route, operations in paths.items()
        if "{request_id}" in route
        for method, operation in operations.items()
        for code, answer in operation["responses"].items()
        if "X-Request-Id" not in answer.get("headers", {})
    ]
    assert about_a_request == []
    assert "401" in paths["/queue/{name}/requests/{request_id}/logs"]["post"]["responses"]  # its token
    cancel_404 = paths["/queue/{name}/requests/{request_id}/cancel"]["put"]["responses"]["404"]
    assert cancel_404["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/CancelAnswer"}
    proxy = paths["/function/{name}"]["post"]
    assert {"async", "X-Queue-Priority"} <= {p["name"] for p in proxy["parameters"]}
    assert {"202", "502", "504", "429"} <= set(proxy["responses"])
    # schemathesis (an audit): the proxy relays a function's 204 or 405, and a JSON answer is no binary string
    assert proxy["responses"]["default"]["content"] == {"*/*": {}}
    assert result["200"]["content"]["*/*"] == {}
    assert "403" in paths["/system/functions"]["post"]["responses"]
    # an audit: a registry write's body is bounded too, and so is the dashboard's `limit`
    assert {"413", "422"} <= set(paths["/system/functions/{name}"]["put"]["responses"])
    assert "413" in paths["/system/functions"]["post"]["responses"]
    assert "413" not in paths["/system/functions/{name}"]["get"]["responses"]
    assert "422" in paths["/system/dashboard/events"]["get"]["responses"]
    assert "requestBody" not in paths["/function/{name}"]["get"]
    error_schema = document["components"]["schemas"]["ErrorAnswer"]
    assert set(error_schema["properties"]) == {"detail", "error_type", "status"}
    accepted = paths["/async-function/{name}"]["post"]["responses"]["202"]["headers"]
    assert {"X-Call-Id", "X-Request-Id"} <= set(accepted)
    answered = await stack.client.get("/queue/nobody/requests/00000000-0000-4000-8000-000000000000/status")
    assert answered.status_code == 404
    assert set(answered.json()) <= set(error_schema["properties"])
