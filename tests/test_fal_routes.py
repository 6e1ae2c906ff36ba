"""More of the fal dialect: legacy aliases, max_queue_length, purge, and the /function proxy."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

import httpx
import pytest
from fal_client.client import _should_retry_response

from jetspool.callbacks.addresses import AddressPolicy, Destination
from tests.support.servers import Reply

if TYPE_CHECKING:
    from tests.support.stack import Stack


async def test_legacy_fal_serverless_paths_are_aliases(stack: Stack) -> None:
    await stack.occupy()

    submitted = await stack.client.post("/fal/queue/submit/busy/sub/path", json={"x": 1})
    request_id = submitted.json()["request_id"]
    status = await stack.client.get(f"/fal/queue/{request_id}/get")
    cancelled = await stack.client.put(f"/fal/queue/{request_id}/cancel")
    again = await stack.client.put(f"/fal/queue/{request_id}/cancel")
    unknown = await stack.client.get("/fal/queue/00000000-0000-4000-8000-000000000000/get")

    assert submitted.status_code == 200
    assert submitted.json()["queue_position"] == 0
    assert (status.status_code, status.json()["status"], status.json()["queue_position"]) == (202, "IN_QUEUE", 0)
    assert (cancelled.status_code, cancelled.json()["status"]) == (202, "CANCELLATION_REQUESTED")
    assert (again.status_code, again.json()["status"]) == (400, "ALREADY_COMPLETED")
    assert unknown.status_code == 404
    stack.functions.release("/busy")


async def test_max_queue_length_refuses_with_429_and_queues_nothing(stack: Stack) -> None:
    await stack.occupy()
    for _ in range(2):
        assert (await stack.client.post("/queue/busy", params={"max_queue_length": "2"})).status_code == 200

    refused = await stack.client.post("/queue/busy", params={"max_queue_length": "2"})
    alias = await stack.client.post("/async-function/busy", params={"fal_max_queue_length": "2"})
    bad = await stack.client.post("/queue/busy", params={"max_queue_length": "two"})
    empty = await stack.client.post("/queue/busy", params={"max_queue_length": ""})  # was taken as no limit
    # the alias was not read when both were given (found by an outside audit)
    disagree = await stack.client.post("/queue/busy", params={"max_queue_length": "5", "fal_max_queue_length": "1"})
    agree = await stack.client.post("/queue/busy", params={"max_queue_length": "2", "fal_max_queue_length": "2"})

    assert refused.status_code == 429
    assert refused.json()["detail"]
    assert refused.headers["retry-after"] == "1"
    assert alias.status_code == 429
    assert (bad.status_code, empty.status_code) == (422, 422)
    assert (disagree.status_code, agree.status_code) == (422, 429)
    assert "disagree" in disagree.json()["detail"]
    stats = (await stack.client.get("/system/functions/busy")).json()["stats"]
    assert stats["waiting"]["normal"] == 2
    stack.functions.release("/busy", 3)


async def test_max_queue_length_holds_under_concurrent_submits(stack: Stack) -> None:
    """Each submit counted what waited at once, and all 30 of a burst saw fewer than 5: 7 to 11
    were queued where 5 were allowed (found by an outside audit)."""
    await stack.occupy()

    answers = await asyncio.gather(
        *(stack.client.post("/queue/busy", json={}, params={"max_queue_length": "5"}) for _ in range(30))
    )

    assert sorted(answer.status_code for answer in answers) == [200] * 5 + [429] * 25
    stats = (await stack.client.get("/system/functions/busy")).json()["stats"]
    assert stats["waiting"]["normal"] == 5
    stack.functions.release("/busy", 6)


async def test_a_bounded_submit_waiting_on_its_callback_check_holds_up_no_other(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submits with `max_queue_length` take turns from their count to their write; the turn took in
    the callback URL's check too, so one slow DNS answer held up every bounded submit to the
    function (found by a review). Here the check of one host waits until the other submit is in."""
    checked = asyncio.Event()
    other_in = asyncio.Event()
    resolve = AddressPolicy.resolve

    async def slow_for_one_host(policy: AddressPolicy, url: str) -> Destination:
        if "slow.test" in url:
            checked.set()
            await asyncio.wait_for(other_in.wait(), 20)
            url = url.replace("slow.test", "127.0.0.1")
        return await resolve(policy, url)

    monkeypatch.setattr(AddressPolicy, "resolve", slow_for_one_host)
    await stack.occupy()
    bounded = {"max_queue_length": "5"}
    slow = asyncio.create_task(
        stack.client.post("/queue/busy", json={}, params={**bounded, "fal_webhook": "http://slow.test:9/hook"})
    )
    await asyncio.wait_for(checked.wait(), 10)
    other = await asyncio.wait_for(stack.client.post("/queue/busy", json={}, params=bounded), 10)
    other_in.set()
    slow_answer = await slow
    stack.functions.release("/busy", 3)

    assert (other.status_code, slow_answer.status_code) == (200, 200)


async def test_purge_cancels_every_waiting_request_and_spares_the_running_one(stack: Stack) -> None:
    await stack.occupy()
    waiting = [
        (await stack.client.post("/queue/busy", json={}, headers={"X-Queue-Priority": p})).json()["request_id"]
        for p in ("high", "normal", "low", "normal")
    ]

    response = await stack.client.post("/system/functions/busy/purge")

    assert response.json() == {"purged": 4}
    for request_id in waiting:
        assert (await stack.status("busy", request_id))["error_type"] == "cancelled"
    assert len(stack.functions.on("/busy")) == 1, "only the running request reached the function"
    stack.functions.release("/busy")


async def test_function_route_calls_the_function_synchronously(stack: Stack) -> None:
    await stack.register("echo")
    stack.functions.script("/echo/sub", [Reply(201, b"made", "text/plain", headers=(("X-Made", "yes"),))])

    response = await stack.client.put("/function/echo/sub", params={"a": "1"}, content=b"body")

    assert response.status_code == 201
    assert response.content == b"made"
    assert response.headers["x-made"] == "yes"
    assert len(response.headers.get_list("date")) == 1, "the gateway's own Date, not the function's too"
    assert len(response.headers.get_list("server")) <= 1
    [seen] = stack.functions.on("/echo/sub")
    assert (seen.method, seen.query, seen.body) == ("PUT", "a=1", b"body")


async def test_function_route_gives_each_call_an_id_and_its_timing_as_openfaas_does(stack: Stack) -> None:
    """The function and the caller see one call id (`X-Call-Id`, also `X-Request-Id`: SPEC §2, every
    response about a request carries it), `X-Start-Time`, and the caller `X-Duration-Seconds`; a
    caller's UUID `X-Call-Id` is kept (a function calling another), any other value replaced, and
    the function's own values of these headers are not relayed beside the gateway's."""
    await stack.register("echo")
    mine = str(uuid.uuid4())
    stack.functions.script("/echo/own", [Reply(200, b"ok", headers=(("X-Call-Id", "fn"), ("X-Duration-Seconds", "9")))])

    fresh = await stack.client.post("/function/echo/own", content=b"a", headers={"X-Call-Id": "not-a-uuid"})
    kept = await stack.client.post("/function/echo/kept", content=b"b", headers={"X-Call-Id": mine})

    [seen_fresh] = stack.functions.on("/echo/own")
    [seen_kept] = stack.functions.on("/echo/kept")
    fresh_id = fresh.headers["x-call-id"]
    assert str(uuid.UUID(fresh_id)) == fresh_id != "not-a-uuid"
    assert fresh.headers.get_list("x-call-id") == [fresh_id] == fresh.headers.get_list("x-request-id")
    assert (seen_fresh.header("x-call-id"), seen_fresh.header("x-request-id")) == (fresh_id, fresh_id)
    assert (kept.headers["x-call-id"], seen_kept.header("x-call-id")) == (mine, mine)
    assert seen_fresh.header("x-start-time") == fresh.headers["x-start-time"]
    assert abs(int(fresh.headers["x-start-time"]) / 1e9 - time.time()) < 60
    assert len(fresh.headers.get_list("x-duration-seconds")) == 1
    assert 0 < float(fresh.headers["x-duration-seconds"]) < 60


async def test_function_route_passes_an_encoded_sub_path_on_as_it_was_sent(stack: Stack) -> None:
    await stack.register("echo")

    for sent, seen_path in [("%1F", "/echo/\x1f"), ("100%25/%C3%A9%20x", "/echo/100%/é x")]:
        response = await stack.client.post(f"/function/echo/{sent}", content=b"odd")

        assert response.status_code == 200, response.text
        [seen] = stack.functions.on(seen_path)
        assert seen.body == b"odd"


async def test_function_route_relays_head_and_expect_stays_with_the_gateway(stack: Stack) -> None:
    await stack.register("echo")
    length = (("Content-Length", "42"),)  # of the body a GET would get
    stack.functions.script("/echo/thing", [Reply(200, b"", "text/plain", headers=(("X-Size", "42"), *length))])

    head = await stack.client.head("/function/echo/thing")
    post = await stack.client.post("/function/echo/upload", content=b"x" * 1024, headers={"Expect": "100-continue"})

    assert (head.status_code, head.headers["x-size"], head.content) == (200, "42", b"")
    assert head.headers.get_list("content-length") == ["42"]
    [seen_head] = stack.functions.on("/echo/thing")
    assert seen_head.method == "HEAD"
    assert post.status_code == 200
    [seen_post] = stack.functions.on("/echo/upload")
    assert seen_post.header("expect") is None
    assert seen_post.body == b"x" * 1024


async def test_function_route_with_async_true_queues_like_cerebrium(stack: Stack) -> None:
    await stack.register("echo")

    response = await stack.client.post(
        "/function/echo",
        params={"async": "true", "keep": "me", "webhookEndpoint": stack.callback_url("/hook")},
        content=b"later",
    )

    assert response.status_code == 202
    body = response.json()
    assert body["run_id"] == body["request_id"]
    assert body["status_url"].endswith(f"/queue/echo/requests/{body['request_id']}/status")
    await stack.wait_for_status("echo", body["request_id"])
    [seen] = stack.functions.on("/echo")
    assert seen.query == "keep=me", "jetspool's own parameters are not forwarded"
    [callback] = await stack.receiver.wait_for("/hook")
    assert callback.body == b"later"


@pytest.mark.parametrize(("flag", "queued"), [("yes", True), ("0", False), ("", False)])
async def test_function_routes_async_flag_reads_as_the_submit_flags_do(stack: Stack, flag: str, queued: bool) -> None:
    await stack.register("echo")

    response = await stack.client.post("/function/echo", params={"async": flag}, content=b"x")

    assert response.status_code == (202 if queued else 200)
    if queued:
        await stack.wait_for_status("echo", response.json()["request_id"])
    assert len(stack.functions.on("/echo")) == 1


async def test_function_routes_async_flag_with_a_typo_is_refused_and_calls_nothing(stack: Stack) -> None:
    """It made a synchronous call, which may run for minutes, where the client meant to queue."""
    await stack.register("echo")

    response = await stack.client.post("/function/echo", params={"async": "ture"}, content=b"x")

    assert response.status_code == 422
    assert response.json()["detail"] == "async must be 1, true or yes (0, false or no to say no); got 'ture'"
    assert stack.functions.on("/echo") == []


async def test_function_routes_async_flag_given_twice_differently_is_refused(stack: Stack) -> None:
    """The first value made a synchronous call of `?async=0&async=true`."""
    await stack.register("echo")

    response = await stack.client.post("/function/echo", params=[("async", "0"), ("async", "true")], content=b"x")

    assert response.status_code == 422
    assert response.json()["detail"] == "async is given twice, as '0' and as 'true'; send it once"
    assert stack.functions.on("/echo") == []


@pytest.mark.parametrize("path", ["/function/nobody", "/function/Bad_Name"])
async def test_function_route_refuses_unknown_or_invalid_names(stack: Stack, path: str) -> None:
    """A name no function may have is an unknown function too (SPEC §1: 404)."""
    answer = await stack.client.get(path)
    assert answer.status_code == 404
    assert "is not registered" in answer.json()["detail"]


async def test_function_route_answers_502_when_the_function_is_down_and_504_when_it_is_late(stack: Stack) -> None:
    """Both carry the call's id, as an answer from the function does: it is what the logs know the
    call by (they had none)."""
    await stack.client.post("/system/functions", json={"name": "down", "url": "http://127.0.0.1:9"})
    await stack.register("late", timeout=0.3)
    stack.functions.script("/late", [Reply(delay_s=1.5)])
    given = str(uuid.uuid4())

    down = await stack.client.get("/function/down", headers={"X-Call-Id": given})
    late = await stack.client.post("/function/late", content=b"x")

    assert (down.status_code, late.status_code) == (502, 504)
    assert "cannot reach function 'down'" in down.json()["detail"]
    assert (late.json()["detail"], late.json()["error_type"]) == (
        "function 'late' did not answer within 0.3 s",
        "function_timeout",
    )
    assert (down.headers["x-call-id"], down.headers["x-request-id"]) == (given, given)
    [seen] = stack.functions.on("/late")
    assert late.headers["x-call-id"] == late.headers["x-request-id"] == seen.header("x-call-id")
    assert int(late.headers["x-start-time"]) > 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/queue/echo/requests/{id}/status"),
        ("GET", "/queue/echo/requests/{id}"),
        ("GET", "/queue/echo/requests/{id}/status/stream"),
        ("PUT", "/queue/echo/requests/{id}/cancel"),
        ("POST", "/queue/echo/requests/{id}/retry"),
        ("GET", "/fal/queue/{id}/get"),
    ],
)
async def test_a_404_about_an_unknown_request_names_it_in_x_request_id(stack: Stack, method: str, path: str) -> None:
    await stack.register("echo")
    request_id = str(uuid.uuid4())

    response = await stack.client.request(method, path.format(id=request_id.upper()))

    assert response.status_code == 404
    assert response.headers["x-request-id"] == request_id, "in canonical form"
    assert "None" not in response.json()["detail"]


async def test_status_and_result_answer_head_as_get_without_a_body(stack: Stack) -> None:
    """`curl -I` on a request's status or result: 405 before."""
    await stack.occupy()
    waiting = (await stack.client.post("/queue/busy", json={})).json()["request_id"]
    await stack.register("echo")
    done = (await stack.client.post("/queue/echo", json={"x": 1})).json()["request_id"]
    await stack.wait_for_status("echo", done)
    unknown = str(uuid.uuid4())

    paths = [
        f"/queue/busy/requests/{waiting}/status",
        f"/queue/echo/requests/{done}/status",
        f"/queue/echo/requests/{done}",
        f"/queue/busy/requests/{waiting}",
        f"/queue/echo/requests/{unknown}/status",
    ]
    heads = [await stack.client.head(path) for path in paths]
    gets = [await stack.client.get(path) for path in paths]

    assert [h.status_code for h in heads] == [g.status_code for g in gets] == [202, 200, 200, 400, 404]
    assert [h.content for h in heads] == [b""] * len(paths)
    for head, got in zip(heads, gets, strict=True):
        assert head.headers["content-type"] == got.headers["content-type"]
        assert head.headers["x-request-id"] == got.headers["x-request-id"]
    assert heads[2].headers["content-length"] == str(len(gets[2].content))
    stack.functions.release("/busy")


@pytest.mark.parametrize("status", [204, 304])
async def test_a_result_without_a_body_has_no_content_length_on_head_as_on_get(stack: Stack, status: int) -> None:
    """RFC 9110 gives a 204 no Content-Length, and a 304's would be the 200's: HEAD said 0 (a review)."""
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(status, b"", "")])
    request_id = await stack.submit("echo")
    await stack.wait_for_status("echo", request_id)

    got = await stack.client.get(f"/queue/echo/requests/{request_id}")
    head = await stack.client.head(f"/queue/echo/requests/{request_id}")

    assert (got.status_code, head.status_code) == (status, status)
    assert "content-length" not in got.headers
    assert "content-length" not in head.headers


async def test_fal_client_does_not_retry_a_final_503_that_names_nginx(stack: Stack) -> None:
    """A completed request's answer says it is the server's (`X-Fal-Request-Id`). Without it,
    fal-client took a 502-504 whose body says `nginx` for its ingress's and retried it for 52 s: a
    function at `http://nginx.invalid/` that could not be reached did that (found by a dialect audit)."""
    await stack.register("echo", max_attempts=1)
    stack.functions.script("/echo", [Reply(503)])
    request_id = (await stack.client.post("/queue/echo", json={})).json()["request_id"]
    await stack.wait_for_status("echo", request_id)

    answer = await stack.client.get(f"/queue/echo/requests/{request_id}")
    named = {"detail": "gave up after 1 attempt: cannot reach function: Cannot connect to host nginx.invalid:80"}
    as_if_named = httpx.Response(answer.status_code, headers=answer.headers, json=named, request=answer.request)

    assert (answer.status_code, answer.headers["x-fal-request-id"]) == (503, request_id)
    assert not _should_retry_response(as_if_named)
