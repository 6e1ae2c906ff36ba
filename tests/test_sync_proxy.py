"""The synchronous proxy `/function/{name}` reading a function's answer with httpx (found by a review).

Each test runs a real nats-server, the uvicorn gateway and a real HTTP function: the recording
uvicorn app where it can send the answer, a raw asyncio server where it cannot."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.support.raw_functions import raw_function, raw_server
from tests.support.servers import AsgiServer, RecordingApp
from tests.support.stack import start_stack
from tests.support.tls import self_signed

if TYPE_CHECKING:
    from pathlib import Path

    from jetspool.embedded import EmbeddedNats
    from tests.support.stack import Stack


@pytest.mark.parametrize("coding", ["br", "zstd", "compress"])
async def test_a_body_httpx_does_not_decode_is_not_handed_on_without_its_content_encoding(
    stack: Stack, coding: str
) -> None:
    """`_NOT_RELAYED` drops Content-Encoding because "the body comes decoded"; httpx decodes only
    gzip/deflate here (br and zstd need brotli/zstandard, not installed; `compress` never) and
    passes any other coding through as received. The caller gets coded bytes with nothing saying so."""
    answer = (
        f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Encoding: {coding}\r\nContent-Length: 4\r\n\r\nabcd"
    )
    async with raw_function(stack, answer.encode()):
        response = await stack.client.get("/function/raw")

    assert response.status_code == 502 or response.headers.get("content-encoding") == coding, (
        response.status_code,
        response.headers.raw,
        response.content,
    )


async def test_an_answer_whose_coding_cannot_be_decoded_is_a_502_with_the_calls_headers(stack: Stack) -> None:
    """httpx raises DecodingError (a RequestError, not a TransportError) for a corrupt gzip body;
    `_call` catches neither, and the caller gets Litestar's bare 500 without the call's X-Call-Id
    (README: the gateway's own 502 carries X-Call-Id, X-Request-Id and X-Start-Time)."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd"
    async with raw_function(stack, answer), stack.client.stream("GET", "/function/raw") as response:
        body = b"".join([chunk async for chunk in response.aiter_raw()])  # read as sent: not decoded here

    # Either answer stands: a 502 of the gateway's (with the call's headers), or the body relayed as
    # sent with its Content-Encoding, as a proxy that does not decode would.
    relayed = (response.status_code, response.headers.get("content-encoding")) == (200, "gzip")
    assert relayed or (response.status_code == 502 and "x-call-id" in response.headers), body


@pytest.mark.parametrize("status_line", [b"600 Odd", b"999 Odd"])
async def test_a_status_no_answer_can_carry_does_not_drop_the_callers_connection(
    stack: Stack, status_line: bytes
) -> None:
    """httpx (h11) accepts any three digits from 200; `_call` relays them as the status, and uvicorn
    drops the caller's connection (KeyError in its status-line table) instead of answering.
    RFC 9110 §15: an invalid status is to be processed as a 5xx, as the worker now does (502)."""
    answer = b"HTTP/1.1 " + status_line + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    async with raw_function(stack, answer):
        response = await stack.client.get("/function/raw")  # RemoteProtocolError here

    assert response.status_code == 502, response.text


async def test_a_function_that_answers_slowly_is_cut_at_its_timeout(stack: Stack) -> None:
    """`timeout=function.timeout` is httpx's per-operation timeout (connect, each read, each write,
    pool), not a deadline for the call: a function sending its answer a byte every 0.4 s runs on for
    4 s past a 1 s timeout, and the caller gets a 200 (SPEC §1: `timeout` is the seconds one
    invocation may run; README: the proxy's 504 is "no answer within the function's timeout")."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(10):
                await asyncio.sleep(0.4)
                writer.write(b"1\r\nx\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async with raw_server(stack, "slow", trickle, timeout=1):
        started = time.monotonic()
        response = await stack.client.get("/function/slow")
        took = time.monotonic() - started

    assert (response.status_code, response.headers.get("x-error-type")) == (504, "function_timeout"), (
        response.status_code,
        round(took, 2),
    )
    assert took < 2.5


async def test_calls_to_one_function_do_not_hold_up_calls_to_another(stack: Stack) -> None:
    """The proxy's one httpx client keeps httpx's default pool of 100 connections for every function:
    100 calls to a slow function leave none for any other, and a call to `quick` waits for a free
    connection, then answers 504 "did not answer within 2 s" though `quick` was never called."""
    await stack.register("busy", timeout=30)
    await stack.register("quick", timeout=2)
    stack.functions.hold("/busy")
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, limits=httpx.Limits(max_connections=200)) as client:
        held = [asyncio.create_task(client.get("/function/busy")) for _ in range(100)]
        try:
            await stack.functions.wait_for("/busy", 100, timeout_s=20)
            response = await client.get("/function/quick")
        finally:
            stack.functions.release("/busy", 100)
            await asyncio.gather(*held, return_exceptions=True)

    assert len(stack.functions.on("/quick")) == 1, response.text
    assert response.status_code == 200


async def test_a_function_that_cannot_be_connected_to_is_a_502_within_the_connect_timeout(stack: Stack) -> None:
    """`_proxy_client` sets a 10 s connect timeout, but `timeout=function.timeout` in `_call`
    replaces it: a function whose host does not accept the connection (here: its listen backlog is
    full, so SYNs are dropped) holds the caller for the whole `timeout`, then gets a 504
    `function_timeout` ("did not answer") instead of the 502 of a function out of reach."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the accept queue; later SYNs go unanswered
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        entry = {"name": "hole", "url": f"http://127.0.0.1:{port}/", "timeout": 20}
        assert (await stack.client.post("/system/functions", json=entry)).status_code == 201
        started = time.monotonic()
        response = await stack.client.get("/function/hole", timeout=60)
        took = time.monotonic() - started
    finally:
        for filler in fillers:
            filler.close()
        listener.close()

    assert response.status_code == 502, (response.status_code, response.text, round(took, 1))
    assert took < 15


async def test_a_call_its_caller_gave_up_on_is_not_left_running(stack: Stack) -> None:
    """A caller that disconnects does not end the proxy's call: the function's connection stays open
    (and holds one of the pool's 100 connections) until it answers or its `timeout` passes, where
    OpenFaaS's gateway cancels the upstream call with the caller's request context."""
    outcome: list[str] = []
    seen = asyncio.Event()

    async def wait_for_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            outcome.append("closed" if await asyncio.wait_for(reader.read(1), 5) == b"" else "data")
        except TimeoutError:
            outcome.append("still open after 5 s")
        seen.set()

    async with raw_server(stack, "held", wait_for_eof, timeout=30):
        async with httpx.AsyncClient(base_url=stack.url) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get("/function/held", timeout=0.5)
        await asyncio.wait_for(seen.wait(), 10)

    assert outcome == ["closed"]


async def test_the_query_reaches_the_function_byte_for_byte(stack: Stack) -> None:
    """README: the query is forwarded "byte for byte" (the queued route does so); the proxy hands it
    to httpx, which percent-encodes what it takes for unsafe: `"` arrives as `%22`."""
    await stack.register("echo")
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    writer.write(b'GET /function/echo?a={"x"} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
    await writer.drain()
    head = await reader.readuntil(b"\r\n")
    writer.close()

    assert head.startswith(b"HTTP/1.1 200")
    assert [seen.query for seen in stack.functions.on("/echo")] == ['a={"x"}']


@pytest.fixture
def proxy_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """An HTTP proxy in the environment that nothing answers at, set before the gateway starts."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")


async def test_a_call_goes_to_its_function_and_not_to_a_proxy_in_the_environment(
    proxy_in_env: None, stack: Stack
) -> None:
    """httpx takes `HTTP_PROXY` from the environment; the proxy then got the call, its target in
    origin form (the raw query goes as `target`), where the worker's queued calls go straight to the
    function (aiohttp reads no proxy from the environment; found by a review). Both go straight."""
    await stack.register("echo")
    response = await stack.client.get("/function/echo?a=1")

    assert response.status_code == 200, response.text
    assert [seen.query for seen in stack.functions.on("/echo")] == ["a=1"]


async def test_a_function_served_over_https_is_called_with_the_certificates_the_environment_names(
    nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no proxy taken from the environment, the proxy's client still takes `SSL_CERT_FILE`, as
    the worker's does: a function behind a private CA is called by both routes, and a callback
    reaches a receiver behind it (aiohttp's own default trust is fixed when it is imported)."""
    tls = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))
    app = RecordingApp()
    function = AsgiServer(app, tls=tls)
    await function.start()
    stack = await start_stack(nats_server)
    try:
        response = await stack.client.post("/system/functions", json={"name": "secure", "url": function.url})
        assert response.status_code == 201, response.text
        called = await stack.client.post("/function/secure", content=b"sync")
        request_id = await stack.submit(
            "secure", content=b"queued", headers={"X-Callback-Url": f"{function.url}/callback"}
        )
        status = await stack.wait_for_status("secure", request_id)
        result = await stack.client.get(f"/queue/secure/requests/{request_id}")
        [callback] = await app.wait_for("/callback")
    finally:
        await stack.close()
        await function.stop()

    assert (called.status_code, called.content) == (200, b"sync")
    assert status["status"] == "COMPLETED", status
    assert (result.status_code, result.content) == (200, b"queued"), result.text
    assert callback.body == b"queued"
