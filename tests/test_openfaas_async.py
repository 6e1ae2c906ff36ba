"""The OpenFaaS async path end to end: submit, queue, deliver, record, result, callback."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import nats
import orjson
import pytest

from jetspool.domain import ids, names
from jetspool.domain.messages import QueuedRequest, decode
from jetspool.embedded import EmbeddedNats
from tests.support.servers import Reply, eventually, free_port
from tests.support.stack import start_stack

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.stack import Stack


async def test_function_sees_exact_method_path_query_body_and_headers(stack: Stack) -> None:
    await stack.register("echo", path="/echo")
    body = b'{"prompt": "a cat", "n": 2}'
    request_id = await stack.submit(
        "echo",
        "sub/path",
        params={"a": "1", "b": "x y"},
        content=body,
        headers={"Content-Type": "application/json", "X-Custom": "kept", "Authorization": "Bearer secret"},
    )
    final = await stack.wait_for_status("echo", request_id)

    assert final["status"] == "COMPLETED"
    assert "error_type" not in final
    [seen] = stack.functions.on("/echo/sub/path")
    assert seen.method == "POST"
    assert seen.query == "a=1&b=x+y"
    assert seen.body == body
    assert seen.header("content-type") == "application/json"
    assert seen.header("x-custom") == "kept"
    assert seen.header("x-call-id") == request_id
    assert seen.header("x-request-id") == request_id
    assert seen.header("x-attempt") == "1"
    assert seen.header("authorization") is None, "the caller's credentials are not forwarded"


async def test_a_function_url_with_a_query_or_a_trailing_slash_is_called_as_registered(stack: Stack) -> None:
    """A key in the function's URL (`?code=` of Azure Functions) stays in its query, ahead of the
    caller's, with a sub-path before it; and a URL ending in `/` is called with it (without, FastAPI
    answers a 307 redirect, which a call does not follow)."""
    await stack.register("keyed", path="/run?code=k%2F1")
    await stack.register("slashed", path="/predict/")
    queued = await stack.submit("keyed", "sub", params={"a": "1"}, content=b"x")
    proxied = await stack.client.post("/function/keyed/now", params={"b": "2"}, content=b"y")
    plain = await stack.submit("slashed", content=b"z")

    assert proxied.status_code == 200
    for name, request_id in (("keyed", queued), ("slashed", plain)):
        assert (await stack.wait_for_status(name, request_id))["status"] == "COMPLETED"
    [seen] = stack.functions.on("/run/sub")
    assert seen.query == "code=k%2F1&a=1", "the key exactly as registered (yarl made %2F a /)"
    [seen] = stack.functions.on("/run/now")
    assert seen.query == "code=k%2F1&b=2"
    assert len(stack.functions.on("/predict/")) == 1


async def test_an_expect_header_is_not_forwarded_to_the_function(stack: Stack) -> None:
    """`Expect: 100-continue` was for the gateway; forwarded, the call would wait for a `100 Continue`."""
    await stack.register("echo", path="/echo")
    request_id = await stack.submit("echo", content=b"x" * 2048, headers={"Expect": "100-continue"})

    assert (await stack.wait_for_status("echo", request_id))["status"] == "COMPLETED"
    [seen] = stack.functions.on("/echo")
    assert seen.header("expect") is None
    assert seen.body == b"x" * 2048


async def test_headers_the_connection_header_names_are_not_forwarded(stack: Stack) -> None:
    """Hop-by-hop by RFC 9110 §7.6.1, like the fixed list (found by a SPEC probe)."""
    await stack.register("echo", path="/echo")
    hop = {"Connection": "keep-alive, X-Private-Hop", "X-Private-Hop": "1", "X-Custom": "kept"}
    request_id = await stack.submit("echo", content=b"x", headers=hop)
    proxied = await stack.client.post("/function/echo/now", content=b"y", headers=hop)

    assert (await stack.wait_for_status("echo", request_id))["status"] == "COMPLETED"
    assert proxied.status_code == 200
    for seen in (*stack.functions.on("/echo"), *stack.functions.on("/echo/now")):
        assert seen.header("x-private-hop") is None
        assert seen.header("x-custom") == "kept"


_ADDED_BY_JETSPOOL = frozenset(
    {"x-call-id", "x-request-id", "x-attempt", "x-start-time", "x-logs-url", "traceparent", "tracestate"}
)
_TRANSPORT = frozenset({"host", "content-length", "connection"})


async def test_the_function_gets_no_header_the_caller_did_not_send(stack: Stack) -> None:
    """SPEC §4: the caller's headers, plus jetspool's own; no HTTP client's defaults (a default
    `Content-Type: application/octet-stream` or `Accept-Encoding` changes what a function does).
    Found by a SPEC probe: a POST without a body reached the function with both.

    Nor the caller's `Accept-Encoding`: the answer is stored, so it must come back decoded (a
    function that honoured `br` answered in a coding the worker could not decode)."""
    await stack.register("echo", path="/echo")
    for url in ("/async-function/echo/queued", "/function/echo/now"):
        request = stack.client.build_request("POST", url, headers={"X-Custom": "kept", "Accept-Encoding": "br"})
        for default in ("accept", "user-agent"):
            del request.headers[default]
        response = await stack.client.send(request)
        assert response.status_code in (200, 202), response.text
        if response.status_code == 202:
            await stack.wait_for_status("echo", response.headers["x-call-id"])

    for path in ("/echo/queued", "/echo/now"):
        [seen] = stack.functions.on(path)
        names = {k.lower() for k, _ in seen.headers} - _ADDED_BY_JETSPOOL - _TRANSPORT
        assert names == {"x-custom"}, f"{path}: {seen.headers}"


async def test_the_callers_credentials_are_not_stored_in_the_queue(stack_without_worker: Stack) -> None:
    stack = stack_without_worker
    await stack.register("echo", path="/echo")
    request_id = await stack.submit("echo", content=b"x", headers={"Authorization": "Bearer secret", "X-Custom": "a"})
    derived = ids.parse_derived(request_id)
    assert derived is not None

    async with await nats.connect(stack.nats.url) as nc:
        stored = await nc.jetstream().get_msg(names.QUEUE_STREAM, seq=derived[0])

    assert b"secret" not in (stored.data or b"")
    assert ("X-Custom", "a") in [(k.title(), v) for k, v in decode(stored.data or b"", QueuedRequest).headers]


async def test_a_queued_query_reaches_the_function_byte_for_byte(stack: Stack) -> None:
    """Escapes a URL parser would normalise stay as sent (`%3A` went out as `:`; found by a SPEC probe)."""
    await stack.register("echo", path="/echo")
    query = "e=%3A&x=a%2Fb&y=%7e&z=a+b&empty=&flag"
    submitted = await stack.client.post(f"/async-function/echo?{query}", content=b"x")

    assert (await stack.wait_for_status("echo", submitted.headers["x-call-id"]))["status"] == "COMPLETED"
    [seen] = stack.functions.on("/echo")
    assert seen.query == query


async def test_a_queued_encoded_sub_path_reaches_the_function_as_it_was_sent(stack: Stack) -> None:
    await stack.register("echo", path="/echo")
    request_id = await stack.submit("echo", "a%1Fb/100%25", content=b"odd")

    assert (await stack.wait_for_status("echo", request_id))["status"] == "COMPLETED"
    [seen] = stack.functions.on("/echo/a\x1fb/100%")
    assert seen.body == b"odd"


async def test_a_sub_paths_trailing_slash_empty_segments_and_empty_query_parts_reach_the_function(
    stack: Stack,
) -> None:
    """Litestar's path parameter dropped them: `items/` was called as `items` (a redirect from most
    frameworks) and `a//b` as `a/b`; the queued query lost `&&` (found by an audit)."""
    await stack.register("echo", path="/echo")
    queued = [
        await stack.submit("echo", "items/?a=1&&b=2&", content=b"1"),
        (await stack.client.post("/queue/echo/a//b/", content=b"2")).json()["request_id"],
        await stack.submit("echo", "c/?webhookEndpoint=&x=1&", content=b"3"),
    ]
    called = await stack.client.get("/function/echo/sync/?&a=1")

    finals = [(await stack.wait_for_status("echo", request_id))["status"] for request_id in queued]
    assert finals == ["COMPLETED"] * 3
    assert called.status_code == 200
    assert [seen.query for seen in stack.functions.on("/echo/items/")] == ["a=1&&b=2&"]
    assert [seen.body for seen in stack.functions.on("/echo/a//b/")] == [b"2"]
    assert [seen.query for seen in stack.functions.on("/echo/c/")] == ["x=1&"]
    assert [seen.query for seen in stack.functions.on("/echo/sync/")] == ["&a=1"]


async def test_non_ascii_header_values_reach_the_function_and_come_back_byte_for_byte(stack: Stack) -> None:
    """A queued UTF-8 value reached the function encoded twice (`cafÃ©`); the synchronous proxy
    answered a bare 500 for a Latin-1 one, and for a UTF-8 one in the function's answer (an audit)."""
    await stack.register("echo", path="/echo")
    stack.functions.script("/echo/sync", [Reply(body=b"s", headers=(("X-Back", "€uro"),))])
    queued = await stack.submit("echo", "queued", content=b"q", headers=[(b"X-Odd", "café".encode())])
    called = await stack.client.post("/function/echo/sync", content=b"s", headers=[(b"X-Odd", b"caf\xe9")])

    assert (await stack.wait_for_status("echo", queued))["status"] == "COMPLETED"
    assert called.status_code == 200
    assert called.headers.raw[[k.lower() for k, _ in called.headers.raw].index(b"x-back")][1] == "€uro".encode()
    [seen_queued], [seen_called] = stack.functions.on("/echo/queued"), stack.functions.on("/echo/sync")
    assert dict(seen_queued.headers)["x-odd"].encode("latin-1") == "café".encode()
    assert dict(seen_called.headers)["x-odd"].encode("latin-1") == b"caf\xe9"


async def test_the_synchronous_proxy_relays_every_copy_of_a_repeated_answer_header(stack: Stack) -> None:
    """Relayed through a dict, only the last `Set-Cookie` of two came back (found by a review)."""
    await stack.register("echo", path="/echo")
    repeated = (("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Multi", "1"), ("x-multi", "2"))
    stack.functions.script("/echo/sync", [Reply(body=b"s", headers=repeated)])

    called = await stack.client.get("/function/echo/sync")

    assert called.status_code == 200
    assert called.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert called.headers.get_list("x-multi") == ["1", "2"]


async def test_a_queued_header_value_that_is_not_utf8_is_refused_and_nothing_is_queued(
    stack_without_worker: Stack,
) -> None:
    stack = stack_without_worker
    await stack.register("echo")

    refused = await stack.client.post("/async-function/echo", content=b"x", headers=[(b"X-Odd", b"caf\xe9")])

    assert refused.status_code == 422
    assert "x-odd" in refused.json()["detail"].lower()
    assert (await stack.client.get("/system/functions/echo")).json()["stats"]["waiting"]["normal"] == 0


async def test_result_route_returns_the_functions_response(stack: Stack) -> None:
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(200, b"<p>hi</p>", "text/html; charset=utf-8")])
    request_id = await stack.submit("echo", content=b"x")
    await stack.wait_for_status("echo", request_id)

    response = await stack.client.get(f"/queue/echo/requests/{request_id}")

    assert response.status_code == 200
    assert response.content == b"<p>hi</p>"
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["x-request-id"] == request_id


async def test_the_result_and_its_callback_carry_the_functions_own_headers(stack: Stack) -> None:
    """As the synchronous proxy relays them, and OpenFaaS's queue-worker passes them to a callback:
    a 303 came without its Location (found by an audit). Not kept: those of the hop, the function's
    server's Date and Server, its cookies, and the headers jetspool sets itself."""
    await stack.register("echo")
    own = (
        ("Location", "/elsewhere"),
        ("X-Model", "v2"),
        ("Link", "<a>; rel=next"),
        ("Link", "<b>; rel=prev"),
        ("Set-Cookie", "session=1"),
        ("X-Request-Id", "not-the-request"),
        ("Connection", "close"),
    )
    stack.functions.script("/echo", [Reply(303, b"see there", "text/plain", headers=own)])
    hook = {"X-Callback-Url": stack.callback_url("/hook")}
    request_id = await stack.submit("echo", content=b"x", headers=hook)
    await stack.wait_for_status("echo", request_id)

    result = await stack.client.get(f"/queue/echo/requests/{request_id}")
    [callback] = await stack.receiver.wait_for("/hook")

    assert (result.status_code, result.content) == (303, b"see there")
    assert (result.headers["location"], result.headers["x-model"]) == ("/elsewhere", "v2")
    assert result.headers.get_list("link") == ["<a>; rel=next", "<b>; rel=prev"]
    assert result.headers.get_list("x-request-id") == [request_id]
    assert "set-cookie" not in result.headers
    assert len(result.headers.get_list("date")) == len(result.headers.get_list("server")) == 1
    assert (callback.header("location"), callback.header("x-model")) == ("/elsewhere", "v2")
    assert [value for name, value in callback.headers if name == "link"] == ["<a>; rel=next", "<b>; rel=prev"]
    assert (callback.header("x-function-status"), callback.header("x-call-id")) == ("303", request_id)
    assert callback.header("set-cookie") is None


async def test_a_functions_headers_beyond_what_a_result_keeps_are_left_out_and_the_call_runs_once(
    tmp_path: Path,
) -> None:
    """Kept whole, 800 KB of them made the completion write too large for NATS (1 MB here): the
    call, which succeeded, ran again at every attempt and the request ended runner_unavailable
    (found by a review)."""
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), extra_config="max_payload: 1MB\n")
    server.start()
    stack = await start_stack(server)
    try:
        await stack.register("echo")
        many = tuple((f"x-h{i}", '"' * 8000) for i in range(100))
        stack.functions.script("/echo", [Reply(200, b"ok", "text/plain", headers=many)])
        request_id = await stack.submit("echo", content=b"x")
        final = await stack.wait_for_status("echo", request_id)
        result = await stack.client.get(f"/queue/echo/requests/{request_id}")
    finally:
        await stack.close()
        server.stop()

    assert (final["status"], final["attempts"], "error_type" in final) == ("COMPLETED", 1, False)
    assert len(stack.functions.on("/echo")) == 1
    assert (result.status_code, result.content) == (200, b"ok")
    assert result.headers["x-h0"] == '"' * 8000
    assert "x-h2" not in result.headers, "16 KiB of them are kept"


async def test_callback_receives_the_response_with_openfaas_headers(stack: Stack) -> None:
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(201, b'{"made": 1}', "application/json")])
    request_id = await stack.submit("echo", content=b"in", headers={"X-Callback-Url": stack.callback_url("/hook")})

    [callback] = await stack.receiver.wait_for("/hook")

    assert callback.method == "POST"
    assert callback.body == b'{"made": 1}'
    assert callback.header("content-type") == "application/json"
    assert callback.header("x-call-id") == request_id
    assert callback.header("x-function-name") == "echo"
    assert callback.header("x-function-status") == "201"
    assert float(callback.header("x-duration-seconds") or "-1") >= 0
    assert int(callback.header("x-start-time") or "0") > 1_600_000_000 * 10**9


async def test_submit_answers_202_only_once_the_request_waits_in_jetstream(stack_without_worker: Stack) -> None:
    stack = stack_without_worker
    await stack.register("echo")

    response = await stack.client.post("/async-function/echo", content=b"payload")

    assert response.status_code == 202
    assert response.content == b""
    request_id = response.headers["x-call-id"]
    assert response.headers["x-request-id"] == request_id
    status = await stack.status("echo", request_id)
    assert status["status"] == "IN_QUEUE"
    listing = (await stack.client.get("/system/functions/echo")).json()
    assert listing["stats"]["waiting"]["normal"] == 1


async def test_queued_request_is_delivered_when_a_worker_starts(stack_without_worker: Stack) -> None:
    stack = stack_without_worker
    await stack.register("echo")
    request_id = await stack.submit("echo", content=b"later")

    await stack.start_worker()

    await stack.wait_for_status("echo", request_id)
    assert [s.body for s in stack.functions.on("/echo")] == [b"later"]


async def test_function_error_is_recorded_and_returned_as_is(stack: Stack) -> None:
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(500, b'{"boom": true}')])
    request_id = await stack.submit("echo", content=b"x")

    final = await stack.wait_for_status("echo", request_id)
    response = await stack.client.get(f"/queue/echo/requests/{request_id}")

    assert final["error_type"] == "function_error"
    assert len(stack.functions.on("/echo")) == 1, "a 500 is an outcome, not retried"
    assert response.status_code == 500
    assert response.content == b'{"boom": true}'
    assert response.headers["x-error-type"] == "function_error"


@pytest.mark.parametrize("code", [409, 408])
async def test_a_functions_code_that_clients_retry_is_answered_400_by_the_result_route(stack: Stack, code: int) -> None:
    """SPEC §2: no route answers 409 for a final condition, as clients retry a 409; a client
    polling the result of a request its function answered 409 would never stop (found by a SPEC
    audit). fal-client retries a 408 too, for 55 s (found by a dialect audit). The function's body,
    content type and code (`X-Function-Status`) are kept."""
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(code, b'{"taken": true}', content_type="application/json")])
    hook = stack.callback_url("/hook")
    request_id = await stack.submit("echo", content=b"x", headers={"X-Callback-Url": hook})

    final = await stack.wait_for_status("echo", request_id)
    response = await stack.client.get(f"/queue/echo/requests/{request_id}")
    await eventually(lambda: len(stack.receiver.on("/hook")) == 1)
    [callback] = stack.receiver.on("/hook")

    assert final["error_type"] == "function_error"
    assert response.status_code == 400
    assert (response.content, response.headers["content-type"]) == (b'{"taken": true}', "application/json")
    assert response.headers["x-error-type"] == "function_error"
    assert response.headers["x-function-status"] == str(code)
    assert callback.header("x-function-status") == str(code), "a callback reports the function's own code"


async def test_unavailable_function_is_retried_until_it_answers(stack: Stack) -> None:
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(503), Reply(503), Reply(200, b"third time")])
    request_id = await stack.submit("echo", content=b"x")

    final = await stack.wait_for_status("echo", request_id)

    assert final["attempts"] == 3
    assert [s.header("x-attempt") for s in stack.functions.on("/echo")] == ["1", "2", "3"]
    assert (await stack.client.get(f"/queue/echo/requests/{request_id}")).content == b"third time"


async def test_body_larger_than_one_nats_message_arrives_intact(stack: Stack) -> None:
    await stack.register("echo")
    body = bytes(range(256)) * (5 * 4096)  # 5 MiB: above half of the server's 8 MiB max payload
    request_id = await stack.submit("echo", content=body, headers={"Content-Type": "application/octet-stream"})

    await stack.wait_for_status("echo", request_id, timeout_s=30)
    result = await stack.client.get(f"/queue/echo/requests/{request_id}")

    assert stack.functions.on("/echo")[0].body == body
    assert result.content == body


async def test_result_of_unfinished_request_is_400_with_its_status(stack_without_worker: Stack) -> None:
    stack = stack_without_worker
    await stack.register("echo")
    request_id = await stack.submit("echo")

    response = await stack.client.get(f"/queue/echo/requests/{request_id}")

    assert response.status_code == 400
    assert response.json()["status"] == "IN_QUEUE"
    assert response.json()["detail"]


@pytest.mark.parametrize(
    ("path", "expected_status"),
    [("/async-function/nobody", 404), ("/async-function/Bad_Name", 404), ("/async-function/a.b", 404)],
)
async def test_submit_to_unknown_or_invalid_function_is_refused(stack: Stack, path: str, expected_status: int) -> None:
    response = await stack.client.post(path, content=b"x")

    assert response.status_code == expected_status
    assert response.json()["detail"]


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({"X-Callback-Url": "ftp://example.invalid/x"}, {}),
        ({"X-Callback-Url": "not a url"}, {}),
        ({}, {"webhookEndpoint": "file:///etc/passwd"}),
        ({"X-Queue-Priority": "urgent"}, {}),
        ({"X-Fal-Queue-Priority": "HIGH"}, {}),
        # an alias's bad value beside a good one was ignored (found by a security audit)
        ({"X-Queue-Priority": "high", "X-Fal-Queue-Priority": "bogus"}, {}),
        ({"X-Queue-Priority": "high", "X-Fal-Queue-Priority": "low"}, {}),
        ({"X-Request-Timeout": "5", "X-Fal-Request-Timeout": "abc"}, {}),
        ({"X-Request-Timeout": "5", "X-Fal-Request-Timeout": "6"}, {}),
        # any value but yes or no meant no, and the alias was or-ed in (found by a docs audit)
        ({"X-No-Retry": "ture"}, {}),
        ({"X-No-Retry": "1", "X-Fal-No-Retry": "0"}, {}),
        # one of two different callback URLs was dropped without a word (found by a docs audit)
        ({"X-Callback-Url": "http://127.0.0.1:9/a"}, {"webhookEndpoint": "http://127.0.0.1:9/b"}),
        ({}, {"fal_webhook": "http://127.0.0.1:9/a", "webhook": "http://127.0.0.1:9/b"}),
        # an option given twice: a header's first value was taken, a query parameter's last, and a
        # refused callback URL went through as the second (found by a SPEC audit)
        ([("X-Callback-Url", "http://127.0.0.1:9/a"), ("X-Callback-Url", "http://169.254.169.254/latest/")], {}),
        ([("X-Queue-Priority", "high"), ("x-queue-priority", "low")], {}),
        ([("X-No-Retry", "0"), ("X-No-Retry", "1")], {}),
        ([("X-Request-Timeout", "5"), ("X-Request-Timeout", "6")], {}),
        ([("Idempotency-Key", "a"), ("Idempotency-Key", "b")], {}),
        ({}, (("fal_webhook", "http://127.0.0.1:9/a"), ("fal_webhook", "http://127.0.0.1:9/b"))),
        ({}, (("max_queue_length", "5"), ("max_queue_length", "6"))),
    ],
)
async def test_bad_submission_options_are_refused_and_nothing_is_queued(
    stack_without_worker: Stack,
    headers: dict[str, str] | list[tuple[str, str]],
    params: dict[str, str] | tuple[tuple[str, str], ...],
) -> None:
    stack = stack_without_worker
    await stack.register("echo")

    response = await stack.client.post("/async-function/echo", content=b"x", headers=headers, params=params)

    assert response.status_code == 422
    assert response.json()["detail"]
    stats = (await stack.client.get("/system/functions/echo")).json()["stats"]
    assert stats["waiting"] == {"high": 0, "normal": 0, "low": 0}


async def test_a_header_and_its_alias_that_agree_are_taken(stack_without_worker: Stack) -> None:
    """So is an option given twice alike."""
    stack = stack_without_worker
    await stack.register("echo")
    both = [
        ("X-Queue-Priority", "low"),
        ("X-Fal-Queue-Priority", "low"),
        ("X-Queue-Priority", "low"),
        ("X-Request-Timeout", "60"),
        ("X-Fal-Request-Timeout", "60.0"),
    ]

    request_id = await stack.submit("echo", content=b"x", headers=both, params=[("max_queue_length", "9")] * 2)

    assert (await stack.status("echo", request_id))["priority"] == "low"
    stats = (await stack.client.get("/system/functions/echo")).json()["stats"]
    assert stats["waiting"] == {"high": 0, "normal": 0, "low": 1}


async def test_status_route_refuses_malformed_and_unknown_ids(stack: Stack) -> None:
    await stack.register("echo")
    request_id = await stack.submit("echo")

    malformed = await stack.client.get("/queue/echo/requests/not-a-uuid/status")
    unprintable = await stack.client.get("/queue/echo/requests/caf%C3%A9/status")
    spaced = await stack.client.get("/queue/echo/requests/%20x/status")
    unknown = await stack.client.get("/queue/echo/requests/00000000-0000-4000-8000-000000000000/status")
    other_function = await stack.client.get(f"/queue/other/requests/{request_id}/status")
    bad_flag = await stack.client.get(f"/queue/echo/requests/{request_id}/status", params={"logs": "maybe"})

    assert malformed.status_code == 422
    assert malformed.headers["x-request-id"] == "not-a-uuid", "every response about a request carries it"
    assert unprintable.status_code == 422
    assert "x-request-id" not in unprintable.headers, "not ASCII: not echoed in a header"
    assert spaced.status_code == 422
    assert "x-request-id" not in spaced.headers, "a client would strip the space: not the id as given"
    assert unknown.status_code == 404
    assert other_function.status_code == 404
    assert bad_flag.status_code == 422
    for response in (malformed, unknown, other_function, bad_flag):
        assert orjson.loads(response.content)["detail"]


async def test_status_object_has_the_spec_fields(stack_without_worker: Stack) -> None:
    stack = stack_without_worker
    await stack.register("echo")
    request_id = await stack.submit("echo")

    response = await stack.client.get(f"/queue/echo/requests/{request_id}/status", params={"logs": "1"})

    assert response.status_code == 202
    assert response.headers["x-request-id"] == request_id
    body = response.json()
    prefix = f"{stack.url}/queue/echo/requests/{request_id}"
    assert body["request_id"] == request_id
    assert body["response_url"] == prefix
    assert body["status_url"] == f"{prefix}/status"
    assert body["cancel_url"] == f"{prefix}/cancel"
    assert body["logs"] == []
    assert body["submitted_at"].endswith("Z")


async def test_retries_exhausted_complete_as_runner_unavailable(stack: Stack) -> None:
    await stack.register("echo", max_attempts=3)
    stack.functions.script("/echo", [Reply(503), Reply(502), Reply(504), Reply(503), Reply(503)])
    request_id = await stack.submit("echo")

    final = await stack.wait_for_status("echo", request_id)
    result = await stack.client.get(f"/queue/echo/requests/{request_id}")

    assert (final["error_type"], final["attempts"]) == ("runner_unavailable", 3)
    assert len(stack.functions.on("/echo")) == 3, "never more than max_attempts deliveries"
    assert result.status_code == 503
    assert result.headers["x-error-type"] == "runner_unavailable"
    assert result.json()["detail"]


async def test_no_retry_gives_exactly_one_attempt(stack: Stack) -> None:
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(503)])
    request_id = await stack.submit("echo", headers={"X-No-Retry": "true"})

    final = await stack.wait_for_status("echo", request_id)

    assert final["error_type"] == "runner_unavailable"
    assert final["error"] == "gave up after 1 attempt: function answered 503"
    assert len(stack.functions.on("/echo")) == 1


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "POST"])
async def test_a_function_that_drops_the_connection_gets_one_call_per_attempt(stack: Stack, method: str) -> None:
    """aiohttp sent a GET, PUT, DELETE (any idempotent method) a second time, in the same attempt,
    when the function closed the connection without an answer: twice the calls `max_attempts`
    allows, and two where `X-No-Retry` promises one (found by an outside audit)."""
    calls: list[bytes] = []

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        calls.append(await reader.readuntil(b"\r\n\r\n"))  # the request's head, then no answer
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        body = {"name": "dropper", "url": f"http://127.0.0.1:{port}/", "max_attempts": 2}
        assert (await stack.client.post("/system/functions", json=body)).status_code == 201
        tried = await stack.client.request(method, "/function/dropper?async=true")
        once = await stack.client.request(method, "/function/dropper?async=true", headers={"X-No-Retry": "1"})
        finals = [await stack.wait_for_status("dropper", r.json()["request_id"]) for r in (tried, once)]
    finally:
        server.close()
        await server.wait_closed()

    assert [final["error_type"] for final in finals] == ["runner_unavailable"] * 2
    assert [final["attempts"] for final in finals] == [2, 1]
    assert len(calls) == 3, [call.split(b"\r\n")[0] for call in calls]
    assert all(call.startswith(method.encode()) for call in calls)


@pytest.mark.parametrize("value", ["0", "false", "No", ""])
async def test_no_retry_saying_no_leaves_the_retries(stack: Stack, value: str) -> None:
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(503), Reply(200, b"second")])
    request_id = await stack.submit("echo", headers={"X-No-Retry": value, "X-Fal-No-Retry": value})

    final = await stack.wait_for_status("echo", request_id)

    assert (final["attempts"], "error_type" in final) == (2, False)


async def test_exec_timeout_completes_as_function_timeout_without_retry(stack: Stack) -> None:
    await stack.register("echo", timeout=0.3)
    stack.functions.hold("/echo")
    request_id = await stack.submit("echo")

    final = await stack.wait_for_status("echo", request_id)
    result = await stack.client.get(f"/queue/echo/requests/{request_id}")
    stack.functions.release("/echo")

    assert final["error_type"] == "function_timeout"
    assert final["metrics"]["inference_time"] >= 0.3, "the final attempt ran until the exec timeout"
    assert len(stack.functions.on("/echo")) == 1
    assert result.status_code == 504
    assert result.headers["x-error-type"] == "function_timeout"


_SET_BY_JETSPOOL = ("X-Api-Key", "X-Call-Id", "X-Request-Id", "X-Attempt", "X-Logs-Url")


async def test_a_caller_cannot_send_a_header_jetspool_or_the_function_config_sets(stack: Stack) -> None:
    """SPEC §1: a function's `headers` (e.g. auth to the function) and jetspool's own headers
    reach it once, with jetspool's value, on both paths; the caller's copies are dropped. Found by
    a security audit: on `/function/{name}` the caller's copy came first, the one a function reads."""
    await stack.register("echo", path="/echo", headers={"X-Api-Key": "function-secret"})
    forged = dict.fromkeys(_SET_BY_JETSPOOL, "forged")
    await stack.submit("echo", "queued", content=b"x", headers=forged)
    proxied = await stack.client.post("/function/echo/now", content=b"y", headers=forged)
    assert proxied.status_code == 200, proxied.text

    await eventually(lambda: bool(stack.functions.on("/echo/queued")))
    for path in ("/echo/queued", "/echo/now"):
        (seen,) = stack.functions.on(path)
        values = {name: [v for k, v in seen.headers if k.lower() == name.lower()] for name in _SET_BY_JETSPOOL}
        assert values.pop("X-Api-Key") == ["function-secret"], path
        if path == "/echo/now":  # a synchronous call has no attempt nor logs URL
            assert values.pop("X-Attempt") == values.pop("X-Logs-Url") == [], path
        for name, value in values.items():
            assert len(value) == 1, f"{path} {name}: {value}"
            assert value != ["forged"], f"{path} {name}"
