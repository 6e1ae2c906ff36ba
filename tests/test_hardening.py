"""Hostile clients: a body over the limit sent in chunks, a body that trickles in, too many
open status streams. Each gets a clear error and queues nothing."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import httpx
import pytest

from jetspool.embedded import EmbeddedNats
from tests.support.servers import eventually_true, free_port
from tests.support.stack import start_stack

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from tests.support.stack import Stack


@pytest.fixture
async def strict(nats_server: EmbeddedNats) -> AsyncIterator[Stack]:
    overrides = {"gateway": {"max_body_size": 1024, "receive_timeout": 1.0, "max_streams": 2}}
    running = await start_stack(nats_server, worker=False, overrides=overrides)
    await running.register("echo")
    yield running
    await running.close()


async def _waiting(stack: Stack) -> int:
    stats = (await stack.client.get("/system/functions/echo")).json()["stats"]
    return int(sum(stats["waiting"].values()))


async def test_a_chunked_body_over_the_limit_is_refused_while_read(strict: Stack) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 512  # no Content-Length: only counting while reading can stop it

    response = await strict.client.post("/queue/echo", content=chunks())
    openfaas = await strict.client.post("/async-function/echo", content=chunks())

    assert (response.status_code, openfaas.status_code) == (413, 413)
    limit = "larger than the gateway takes: 1024 bytes (gateway.max_body_size)"
    assert limit in response.json()["detail"]
    assert limit in openfaas.json()["detail"]
    assert await _waiting(strict) == 0


async def test_a_body_that_trickles_in_gets_408(strict: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", strict.gateway.port)
    try:
        writer.write(
            b"POST /queue/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"slow": '
        )
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
            answer = await reader.read(4096)
    finally:
        writer.close()

    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    assert b"not received within 1 s" in answer
    assert await _waiting(strict) == 0


async def test_a_gateway_holds_at_most_max_streams_open(strict: Stack) -> None:
    ids = [(await strict.client.post("/queue/echo", json={})).json()["request_id"] for _ in range(3)]
    streams = [strict.client.stream("GET", f"/queue/echo/requests/{i}/status/stream") for i in ids[:2]]
    opened = [await stream.__aenter__() for stream in streams]
    lines = [response.aiter_lines() for response in opened]  # kept: a dropped iterator closes its stream
    try:
        for response, stream_lines in zip(opened, lines, strict=True):
            assert response.status_code == 200
            await anext(stream_lines)  # the first event: the stream is open
        third = await strict.client.get(f"/queue/echo/requests/{ids[2]}/status/stream")
        waited = await strict.client.get(f"/queue/echo/requests/{ids[2]}", params={"wait": "1"})
    finally:
        for stream in streams:
            await stream.__aexit__(None, None, None)

    assert third.status_code == 503
    assert "status streams" in third.json()["detail"]
    assert waited.status_code == 503, "long polls count too"

    async def accepted_again() -> bool:
        response = await strict.client.get(f"/queue/echo/requests/{ids[2]}", params={"wait": "0.1"})
        return response.status_code == 400

    await eventually_true(accepted_again)


async def test_dashboard_event_streams_count_among_the_gateways_streams(strict: Stack) -> None:
    """Each dashboard event stream holds a NATS subscription and a task, and any number of them was
    taken (found by an audit): they count against `gateway.max_streams` as status streams do."""
    request_id = (await strict.client.post("/queue/echo", json={})).json()["request_id"]
    streams = [strict.client.stream("GET", "/system/dashboard/events?limit=0") for _ in range(2)]
    opened = [await stream.__aenter__() for stream in streams]
    try:
        codes = [response.status_code for response in opened]
        third = await strict.client.get("/system/dashboard/events?limit=0")
        status_stream = await strict.client.get(f"/queue/echo/requests/{request_id}/status/stream")
    finally:
        for stream in streams:
            await stream.__aexit__(None, None, None)

    assert codes == [200, 200]
    assert (third.status_code, third.headers.get("retry-after")) == (503, "1")
    assert status_stream.status_code == 503

    async def accepted_again() -> bool:  # a closed dashboard stream gives its place back
        response = await strict.client.get(f"/queue/echo/requests/{request_id}", params={"wait": "0.1"})
        return response.status_code == 400

    await eventually_true(accepted_again)


async def test_streams_opened_at_once_past_the_maximum_get_503_not_a_broken_200(strict: Stack) -> None:
    """Checked before the answer started and taken once the stream began, the places of streams
    opened at once were all free at the check: those past the maximum answered 200, then broke off
    without an event (found by an audit)."""
    request_id = (await strict.client.post("/queue/echo", json={})).json()["request_id"]
    url = f"/queue/echo/requests/{request_id}/status/stream"

    answered: list[tuple[int, str, str | None]] = []
    everyone = asyncio.Event()

    async def open_one() -> tuple[int, str, str | None]:
        async with strict.client.stream("GET", url) as response:
            if response.status_code != 200:
                await response.aread()
                answer = response.status_code, response.json()["detail"], response.headers.get("retry-after")
            else:
                answer = 200, await anext(response.aiter_lines()), None  # a stream answered 200 has its first event
            answered.append(answer)
            if len(answered) == 8:
                everyone.set()
            async with asyncio.timeout(20):
                await everyone.wait()  # an open stream keeps its place until every one has its answer
            return answer

    answers = await asyncio.gather(*(open_one() for _ in range(8)))

    assert sorted(code for code, _, _ in answers) == [200, 200] + [503] * 6
    assert all(first.startswith(("id:", "data:")) for code, first, _ in answers if code == 200)
    assert all(after == "1" for code, _, after in answers if code == 503)

    async def all_free() -> bool:  # each place is given back
        responses = [await strict.client.get(f"/queue/echo/requests/{request_id}", params={"wait": "0.05"})]
        return all(r.status_code == 400 for r in responses)

    await eventually_true(all_free)


async def test_a_plain_request_is_not_limited_once_received(strict: Stack) -> None:
    """The deadline covers receiving the request, not answering it: a long ?wait= outlasts it."""
    request_id = (await strict.client.post("/queue/echo", json={})).json()["request_id"]

    response = await strict.client.get(f"/queue/echo/requests/{request_id}", params={"wait": "1.5"})

    assert response.status_code == 400
    assert response.json()["status"] == "IN_QUEUE"


async def test_hostile_names_and_ids_never_reach_nats(strict: Stack) -> None:
    for name in ("a.b", "a*", "a>", "a%20b", "A", "-a", "a" * 64):
        response = await strict.client.post(f"/queue/{name}", json={})
        assert response.status_code in {404, 422}, (name, response.status_code)
    for request_id in ("x.y", "*", ">", "00000000-0000-0000-0000-00000000000", "a" * 36):
        response = await strict.client.get(f"/queue/echo/requests/{request_id}/status")
        assert response.status_code == 422, (request_id, response.status_code)
    key = await strict.client.post("/queue/echo", json={}, headers={"Idempotency-Key": "a.b.*.>"})
    assert key.status_code == 200, "any key text is safe: it is hashed before it names anything"
    assert isinstance(httpx.URL(key.json()["status_url"]).path, str)


async def _raw_post(port: int, target: str) -> int:
    """POST `target` exactly as written (an HTTP client would resolve its dot segments first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{{}}".encode())
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
    finally:
        writer.close()
    return int(status_line.split()[1])


@pytest.mark.parametrize(
    "target",
    [
        "/function/echo/../../admin",
        "/async-function/echo/../admin",
        "/queue/echo/a/../../admin",
        "/fal/queue/submit/echo/..;/admin",
        "/async-function/echo/%2e%2e/admin",
        "/queue/echo/..%2F..%2Fadmin",
        "/async-function/echo/..%5Cadmin",
        "/async-function/echo/./admin",
    ],
)
async def test_a_sub_path_that_would_leave_the_functions_url_is_refused(stack: Stack, target: str) -> None:
    """A function registered at `/echo` is called under `/echo/` only: a `..` segment in a sub-path
    reached `/admin` on the function's host, with the function's key and headers (found by a
    security audit). Refused with 422 on every route, before anything is queued or called."""
    await stack.register("echo")

    status = await _raw_post(stack.gateway.port, target)
    allowed = await _raw_post(stack.gateway.port, "/async-function/echo/v1.2/..data/.well")

    assert status == 422
    assert allowed == 202
    await stack.functions.wait_for("/echo/v1.2/..data/.well")
    assert [seen.path for seen in stack.functions.seen] == ["/echo/v1.2/..data/.well"]


async def test_headers_too_large_for_a_queue_message_get_431_and_an_inline_body_beside_them_fits(
    tmp_path: Path,
) -> None:
    """NATS's max_payload (64 KiB here) holds a message's headers, query and URLs as well as its
    body: a request with large headers beside an inline body was refused by NATS, and the client
    told 503, as if to try again (found by a security audit). Headers beyond a quarter of it get
    431 and nothing is queued; within it, beside the largest inline body, the request runs."""
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), extra_config="max_payload: 65536\n")
    server.start()
    stack = await start_stack(server)
    try:
        await stack.register("echo")
        body = bytes(range(256)) * 128  # 32 KiB: the largest body kept inline
        refused = await stack.client.post("/queue/echo", content=body, headers={"X-Pad": "a" * 21_000})
        quoted = await stack.client.post("/queue/echo", content=body, headers={"X-Pad": '"' * 9_000})  # JSON: 18,000
        waiting = (await stack.client.get("/system/functions/echo")).json()["stats"]["waiting"]
        accepted = await stack.client.post("/queue/echo", content=body, headers={"X-Pad": "b" * 16_000})
        final = await stack.wait_for_status("echo", accepted.json()["request_id"])
    finally:
        await stack.close()
        server.stop()

    assert (refused.status_code, quoted.status_code) == (431, 431)
    assert "at most 16384 are queued" in refused.json()["detail"]
    assert sum(waiting.values()) == 0
    assert (accepted.status_code, final["status"], "error_type" in final) == (200, "COMPLETED", False)
    [seen] = stack.functions.on("/echo")
    assert (seen.body, seen.header("x-pad")) == (body, "b" * 16_000)


async def test_a_url_beyond_the_http_servers_limit_is_refused_and_queues_nothing(nats_server: EmbeddedNats) -> None:
    """The README's limit: httptools, which uvicorn parses requests with, takes URLs of up to 65,535
    bytes; a longer one gets a plain-text 400 before jetspool sees it (the README said a query
    could reach a quarter of max_payload, 2 MiB: an audit found this limit first)."""
    stack = await start_stack(nats_server, worker=False)
    answers = []
    try:
        await stack.register("echo")
        host, port = stack.gateway.url.removeprefix("http://").rsplit(":", 1)
        for length in (65_535, 65_536):
            target = b"/queue/echo?q="
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                padded = target + b"x" * (length - len(target))
                writer.write(
                    b"POST " + padded + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                answers.append((await asyncio.wait_for(reader.read(), 30)).split(b"\r\n", 1)[0])
            finally:
                writer.close()
        waiting = (await stack.client.get("/system/functions/echo")).json()["stats"]["waiting"]
    finally:
        await stack.close()

    assert answers == [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"]
    assert sum(waiting.values()) == 1, "the URL within the limit only"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/healthz", {"GET", "HEAD", "OPTIONS"}),
        ("DELETE", "/queue/echo/requests/00000000-0000-4000-8000-000000000000", {"GET", "HEAD", "OPTIONS"}),
        ("PUT", "/queue/echo", {"POST", "OPTIONS"}),
    ],
)
async def test_a_wrong_method_gets_405_naming_the_allowed_ones(
    stack: Stack, method: str, path: str, allowed: set[str]
) -> None:
    """RFC 9110 requires `Allow` on a 405; the error handler dropped it (found by a SPEC audit)."""
    await stack.register("echo")

    response = await stack.client.request(method, path)

    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == allowed
    named = path.split("/requests/")[1] if "/requests/" in path else None  # a 405 about a request names it too
    assert response.headers.get("x-request-id") == named
    assert response.json()["detail"]
