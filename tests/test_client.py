"""The Python client, sync and async, against a real stack: every method, and an exception for
every error row of SPEC §5 carrying its error_type."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
import pytest

from jetspool import client as client_module
from jetspool.client import (
    AsyncClient,
    Cancelled,
    Client,
    FunctionError,
    Handle,
    NotFound,
    Refused,
    Result,
    RunnerUnavailable,
    StartTimeout,
    Status,
    Unreachable,
    WaitTimeout,
)
from tests.support.processes import start_part
from tests.support.servers import AsgiServer, RecordingApp, Reply, free_port, wait_until_ready
from tests.support.stack import start_stack

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from jetspool.embedded import EmbeddedNats
    from tests.support.stack import Stack


async def test_sync_submit_status_events_result_and_run(stack: Stack) -> None:
    await stack.register("echo")

    def drive() -> Driven:
        with Client(stack.url) as client:
            handle = client.submit(
                "echo", json={"n": 1}, path="sub dir?q=1&q=2&e=", priority="high", idempotency_key="k1"
            )
            events = [s.status for s in handle.iter_events()]
            return Driven(
                handle=handle,
                events=events,
                result=handle.result(timeout=10),
                status=handle.status(logs=True),
                again=client.submit("echo", json={"n": 2}, idempotency_key="k1"),
                ran=client.run("echo", content=b"plain", headers={"Content-Type": "text/plain"}, client_timeout=10),
            )

    driven = await asyncio.to_thread(drive)

    assert driven.events[-1] == "COMPLETED"
    assert driven.result.json() == {"n": 1}
    assert driven.status.completed
    assert driven.status.logs is not None
    assert driven.again.request_id == driven.handle.request_id, "the idempotency key held"
    assert (driven.ran.text, driven.ran.content_type) == ("plain", "text/plain")
    [seen] = stack.functions.on("/echo/sub dir")
    assert seen.header("x-call-id") == driven.handle.request_id
    assert seen.query == "q=1&q=2&e=", "a query in the path goes to the function"


@dataclass
class Driven:
    handle: Handle
    events: list[str]
    result: Result
    status: Status
    again: Handle
    ran: Result


async def test_sync_errors_carry_their_error_type(stack: Stack) -> None:
    await stack.register("echo")
    await stack.register("down", max_attempts=1)
    await stack.register("taken")
    stack.functions.script("/echo", [Reply(500, b'{"boom": 1}')])
    stack.functions.script("/down", [Reply(503)])
    stack.functions.script("/taken", [Reply(409, b'{"taken": 1}')])

    def drive() -> dict[str, BaseException]:
        caught: dict[str, BaseException] = {}
        with Client(stack.url) as client:
            calls: dict[str, Callable[[], object]] = {
                "unknown": lambda: client.submit("nope"),
                "function_error": lambda: client.run("echo", content=b"x", client_timeout=10),
                "conflict": lambda: client.run("taken", content=b"x", client_timeout=10),
                "runner_unavailable": lambda: client.run("down", client_timeout=10),
                "bad": lambda: client.submit("echo", priority="urgent"),
            }
            for label, call in calls.items():
                try:
                    call()
                except Exception as exc:  # noqa: BLE001 - collected for the assertions
                    caught[label] = exc
        return caught

    caught = await asyncio.to_thread(drive)

    assert isinstance(caught["unknown"], NotFound)
    failure = caught["function_error"]
    assert isinstance(failure, FunctionError)
    assert failure.error_type == "function_error"
    assert failure.result is not None
    assert (failure.result.status_code, failure.result.json()) == (500, {"boom": 1})
    conflict = caught["conflict"]
    assert isinstance(conflict, FunctionError)
    assert conflict.result is not None
    assert conflict.result.status_code == 409, "the function's code, which the result route answers as 400"
    assert conflict.status_code == 409
    assert isinstance(caught["runner_unavailable"], RunnerUnavailable)
    assert caught["runner_unavailable"].error_type == "runner_unavailable"
    assert isinstance(caught["bad"], Refused)
    assert caught["bad"].status_code == 422


async def test_async_client_cancel_wait_timeout_and_start_timeout(stack: Stack) -> None:
    await stack.occupy("busy")
    async with AsyncClient(stack.url) as client:
        waiting = await client.submit("busy", json={})
        with pytest.raises(WaitTimeout):
            await waiting.result(timeout=0.3)
        assert await waiting.cancel() is True
        with pytest.raises(Cancelled) as cancelled:
            await waiting.result(timeout=5)
        assert await waiting.cancel() is False, "already completed"
        late = await client.submit("busy", json={}, start_timeout=0.3)
        with pytest.raises(StartTimeout) as timed_out:
            await late.result(timeout=10)
        stack.functions.release("/busy")

    assert cancelled.value.error_type == "cancelled"
    assert cancelled.value.request_id == waiting.request_id
    assert timed_out.value.error_type == "request_timeout"


async def test_async_client_events_run_and_functions(stack: Stack) -> None:
    async with AsyncClient(stack.url) as client:
        deployed = await client.deploy({"name": "echo", "url": stack.function_url("/echo"), "concurrency": 3})
        handle = await client.submit("echo", json={"a": 1}, no_retry=True)
        events = [status async for status in handle.iter_events()]
        stack.functions.script("/echo", [Reply(200, b"[1, 2]", headers=(("X-Model", "v2"),))])
        ran = await client.run("echo", json=[1, 2], client_timeout=10)
        listed = await client.functions()
        await client.remove("echo")
        after = await client.functions()

    assert deployed["concurrency"] == 3
    assert events[-1].completed
    assert events[0].request_id == handle.request_id
    assert ran.json() == [1, 2]
    assert ran.headers["x-model"] == "v2", "the function's own headers come with its result"
    assert [f["name"] for f in listed] == ["echo"]
    assert after == []


async def test_an_events_wait_gives_up_at_its_timeout_while_the_stream_keeps_alive(nats_server: EmbeddedNats) -> None:
    """`iter_events(timeout=T)` waited forever for T above 15 s: the gateway's keep-alive comment
    restarted a limit on each read (found by an audit). Here the keep-alive comes every 0.1 s and
    T is 1 s; the request waits behind another, and both clients give up."""
    stack = await start_stack(nats_server, overrides={"gateway": {"sse_ping_interval": 0.1}})
    try:
        await stack.occupy("busy")

        def sync_wait() -> list[str]:
            seen: list[str] = []
            with Client(stack.url) as client:
                handle = client.submit("busy", json={})
                try:
                    seen.extend(status.status for status in handle.iter_events(timeout=1.0))
                except WaitTimeout as exc:
                    seen.append(str(exc))
            return seen

        async def async_wait() -> list[str]:
            seen: list[str] = []
            async with AsyncClient(stack.url) as client:
                handle = await client.submit("busy", json={})
                try:
                    async for status in handle.iter_events(timeout=1.0):
                        seen.append(status.status)
                except WaitTimeout as exc:
                    seen.append(str(exc))
            return seen

        sync_seen = await asyncio.wait_for(asyncio.to_thread(sync_wait), 30)
        async_seen = await asyncio.wait_for(async_wait(), 30)
        stack.functions.release("/busy", 3)
    finally:
        await stack.close()

    timed_out = ["IN_QUEUE", "no status change within 1 s"]
    assert (sync_seen, async_seen) == (timed_out, timed_out), "the first event at once, then nothing new"


async def test_an_events_wait_gives_up_at_its_timeout_and_not_at_the_next_keep_alive(
    nats_server: EmbeddedNats,
) -> None:
    """`iter_events(timeout=T)` noticed T only when the stream next spoke: with a keep-alive every
    3 s and T of 3.2 s, it gave up at the second keep-alive, 6 s in. The stream is opened again
    after the first with what is left as its limit, so both clients give up about T in."""
    stack = await start_stack(nats_server, overrides={"gateway": {"sse_ping_interval": 3.0}})
    try:
        await stack.occupy("busy")

        def sync_wait() -> float:
            with Client(stack.url) as client:
                handle = client.submit("busy", json={})
                began = time.monotonic()
                with pytest.raises(WaitTimeout):
                    for _ in handle.iter_events(timeout=3.2):
                        pass
                return time.monotonic() - began

        async def async_wait() -> float:
            async with AsyncClient(stack.url) as client:
                handle = await client.submit("busy", json={})
                began = time.monotonic()
                with pytest.raises(WaitTimeout):
                    async for _ in handle.iter_events(timeout=3.2):
                        pass
                return time.monotonic() - began

        sync_s = await asyncio.wait_for(asyncio.to_thread(sync_wait), 30)
        async_s = await asyncio.wait_for(async_wait(), 30)
        stack.functions.release("/busy", 3)
    finally:
        await stack.close()

    # The keep-alive after the one at 3 s comes at 6 s: giving up before 5 s is giving up at T.
    assert sync_s < 5.0, sync_s
    assert async_s < 5.0, async_s


async def test_an_events_wait_resumed_after_news_keeps_its_whole_timeout() -> None:
    """After a resume, each read was limited to what was left of the timeout when the stream was
    opened again, though news came since: a wait of 6 s gave up 4.75 s after the last status
    (found by a review). Here the first stream ends after one status; the second brings news at
    once, and the request completes 2 s later, after what was left of the timeout when the stream
    opened (1.25 s). A stream opened after that news tells the state as it stands, as a gateway does."""
    request_id = "00000000-0000-4000-8000-000000000002"
    statuses = [
        {"status": "IN_QUEUE", "request_id": request_id, "queue_position": 3},
        {"status": "IN_QUEUE", "request_id": request_id, "queue_position": 2},
        {"status": "COMPLETED", "request_id": request_id},
    ]
    opened: list[float] = []
    completes_at: list[float] = []

    async def gateway(scope: dict[str, object], receive: object, send: Callable[..., Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return
        opened.append(time.monotonic())
        headers = [(b"content-type", b"text/event-stream"), (b"x-request-id", request_id.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def event(n: int) -> None:
            data = f"id: {n}\ndata: {orjson.dumps(statuses[n]).decode()}\n\n"
            await send({"type": "http.response.body", "body": data.encode(), "more_body": True})

        if len(opened) == 1:  # the first stream: one status, then quiet, then it ends
            await event(0)
            await asyncio.sleep(1.5)
        else:
            completes_at[:] = completes_at or [time.monotonic() + 2.0]
            await event(1)
            await asyncio.sleep(max(0.0, completes_at[0] - time.monotonic()))
            await event(2)
        await send({"type": "http.response.body", "body": b""})

    server = AsgiServer(gateway)
    await server.start()
    try:
        async with AsyncClient(server.url) as client:
            seen = [s.status async for s in client.handle("echo", request_id).iter_events(timeout=3.0)]
    finally:
        await server.stop()

    assert seen == ["IN_QUEUE", "IN_QUEUE", "COMPLETED"]


async def test_an_unreachable_gateway_is_reported_as_such() -> None:
    async with AsyncClient(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(Unreachable, match="cannot reach the gateway"):
            await client.submit("echo", json={})


@pytest.mark.parametrize("url", ["http://127.0.0.1:9?x=1", "http://127.0.0.1:9/#f", "ftp://127.0.0.1:9", "127.0.0.1:9"])
def test_a_url_that_is_not_a_gateways_is_refused_at_once(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx dropped the path of a base URL with a query: every call went to `/`, whose 404 was
    taken for an unknown request (found by a SPEC audit)."""
    with pytest.raises(ValueError, match="is not a gateway URL"):
        Client(url)
    monkeypatch.setenv("JETSPOOL_URL", url)
    with pytest.raises(ValueError, match="is not a gateway URL"):
        AsyncClient()


async def test_a_result_wait_rides_through_a_gateway_going_away() -> None:
    """A 503 (the gateway holds its maximum of waits, or its NATS is away) or a proxy's 502 ended
    the wait at once, and `run()` did not say which request it had queued (found by an audit)."""
    request_id = "00000000-0000-4000-8000-000000000001"
    path = f"/queue/echo/requests/{request_id}"
    busy = b'{"detail": "this gateway holds 3 status streams and waits already; try later"}'
    gateway = RecordingApp()
    gateway.script("/queue/echo", [Reply(200, orjson.dumps({"request_id": request_id}))])
    named = (("X-Request-Id", request_id),)  # as a gateway's every answer about a request
    gateway.script(
        path,
        [Reply(503, busy), Reply(502, b"<html>bad gateway</html>", "text/html"), Reply(200, b"[7]", headers=named)],
    )
    server = AsgiServer(gateway)
    await server.start()
    try:
        async with AsyncClient(server.url) as client:
            ran = await client.run("echo", json={})
            gateway.script(path, [Reply(503, busy)] * 3)
            with pytest.raises(
                Unreachable, match=f"the result of request {request_id} could not be fetched"
            ) as gave_up:
                await client.handle("echo", request_id).result(timeout=0.5)
        gateway.script(path, [Reply(503, busy), Reply(200, b"[8]", headers=named)])
        with Client(server.url) as sync_client:
            ran_sync = await asyncio.to_thread(sync_client.handle("echo", request_id).result)
    finally:
        await server.stop()

    assert (ran.status_code, ran.json(), ran_sync.json()) == (200, [7], [8])
    assert len(gateway.on(path)) > 3, "three polls for the result, then at least one before the wait ran out"
    assert gave_up.value.status_code == 503


async def test_a_gateway_slower_than_the_timeout_is_not_called_unreachable() -> None:
    """A submit riding out a NATS outage was told the gateway could not be reached (a CLI audit)."""
    slow = RecordingApp()
    slow.script("/queue/echo", [Reply(200, b"{}", delay_s=2.0)])
    server = AsgiServer(slow)
    await server.start()
    try:
        async with AsyncClient(server.url, timeout=0.3) as client:
            with pytest.raises(Unreachable, match="did not answer in time") as refused:
                await client.submit("echo", json={})
    finally:
        await server.stop()

    assert "cannot reach" not in str(refused.value)


async def test_sync_cancel_handles_and_the_registry(stack: Stack) -> None:
    await stack.occupy("busy")

    def drive() -> dict[str, object]:
        seen: dict[str, object] = {}
        with Client(stack.url) as client:
            seen["deployed"] = client.deploy({"name": "echo", "url": stack.function_url("/echo")})["name"]
            waiting = client.submit("busy", json={})
            same = client.handle("busy", waiting.request_id)
            seen["position"] = same.status().queue_position
            try:
                same.result(timeout=0.2)
            except WaitTimeout:
                seen["gave_up"] = True
            seen["cancel"] = same.cancel()
            try:
                same.result(timeout=5)
            except Cancelled as exc:
                seen["cancelled"] = exc.error_type
            seen["cancel_again"] = same.cancel()
            seen["listed"] = sorted(f["name"] for f in client.functions())
            client.remove("echo")
            seen["after"] = sorted(f["name"] for f in client.functions())
            try:
                client.handle("busy", "00000000-0000-4000-8000-000000000000").status()
            except NotFound:
                seen["unknown"] = True
        return seen

    seen = await asyncio.to_thread(drive)
    stack.functions.release("/busy")

    assert seen == {
        "deployed": "echo",
        "position": 0,
        "gave_up": True,
        "cancel": True,
        "cancelled": "cancelled",
        "cancel_again": False,
        "listed": ["busy", "echo"],
        "after": ["busy"],
        "unknown": True,
    }


@pytest.mark.parametrize("restarted", [True, False])
async def test_a_status_stream_goes_on_across_a_restart_of_its_gateway(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restarted: bool
) -> None:
    """A stopping gateway ends its streams; the client opens the stream again with Last-Event-ID
    (here on the same address, where a new gateway starts, as behind a load balancer) and goes on
    to COMPLETED, without telling a state twice. With no gateway back, it gives up: Unreachable."""
    monkeypatch.setattr(client_module, "_RESUME_FIRST_PAUSE_S", 0.01)  # six tries in 0.6 s, not 16 s
    request_id = await stack.held_call("echo", b"across a restart")
    config = tmp_path / "gateway.yaml"
    config.write_text("{}\n", encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = start_part("gateway", config, stack.nats.url, port)
    try:
        await wait_until_ready(url, timeout_s=30)
        async with AsyncClient(url) as client:
            events = client.handle("echo", request_id).iter_events()
            first = await anext(events)
            assert await asyncio.to_thread(gateway.terminate, 30) == 0
            if not restarted:
                with pytest.raises(Unreachable, match="could not be resumed"):
                    await anext(events)
                return
            gateway = start_part("gateway", config, stack.nats.url, port)
            await wait_until_ready(url, timeout_s=30)
            stack.functions.release("/echo")
            rest = [status async for status in events]
    finally:
        gateway.kill_tree()

    assert [first.status, *(status.status for status in rest)] == ["IN_PROGRESS", "COMPLETED"]
