"""The function registry through /system/functions, and workers following it without restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

import nats as nats_py
import pytest
from nats.errors import OutboundBufferLimitError
from nats.js.errors import APIError, NotFoundError

import jetspool.worker.main as worker_main
from jetspool.aio import stop_task
from jetspool.domain import names
from jetspool.domain.functions import Function
from jetspool.domain.names import PRIORITIES
from jetspool.embedded import EmbeddedNats
from jetspool.jetstream import provision, ridethrough
from jetspool.jetstream import registry as registry_module
from jetspool.jetstream.registry import FunctionRegistry, RegistryView
from jetspool.worker import puller
from tests.support.permissions import PASSWORD, as_user, users
from tests.support.servers import AsgiServer, RecordingApp, Reply, eventually, eventually_true, free_port
from tests.support.stack import start_stack

if TYPE_CHECKING:
    from pathlib import Path

    import httpx
    from nats.aio.client import Client as NatsClient
    from nats.js.kv import KeyValue

    from jetspool.jetstream.connection import Nats
    from jetspool.worker.runner import FunctionRunner
    from tests.support.stack import Stack


async def test_registered_function_is_listed_with_defaults_and_live_stats(stack: Stack) -> None:
    created = await stack.register("echo", concurrency=2)

    listed = (await stack.client.get("/system/functions")).json()
    one = (await stack.client.get("/system/functions/echo")).json()

    assert [f["name"] for f in listed] == ["echo"]
    assert one == created
    assert one["concurrency"] == 2
    assert one["timeout"] == 3600
    assert one["max_attempts"] == 10
    assert one["result_ttl"] == 604800
    assert one["stats"] == {
        "waiting": {"high": 0, "normal": 0, "low": 0},
        "in_progress": 0,
        "completed": 0,
        "failed": 0,
    }


async def test_an_entry_as_read_back_registers_with_post_and_put(stack: Stack) -> None:
    """Its `stats` are read-only and left out: a POST refused them as an unknown key (found by a
    SPEC audit), where a PUT took the same body."""
    await stack.register("echo", concurrency=2)
    entry = (await stack.client.get("/system/functions/echo")).json()

    posted = await stack.client.post("/system/functions", json={**entry, "name": "copy"})
    put = await stack.client.put("/system/functions/echo", json=entry)

    assert (posted.status_code, posted.json()["concurrency"]) == (201, 2)
    assert put.status_code == 200


async def test_stats_count_completed_and_failed_requests(stack: Stack) -> None:
    await stack.register("echo")
    stack.functions.script("/echo", [Reply(400, b"no")])
    failed = await stack.submit("echo")
    await stack.wait_for_status("echo", failed)
    done = await stack.submit("echo")
    await stack.wait_for_status("echo", done)

    stats = (await stack.client.get("/system/functions/echo")).json()["stats"]

    assert (stats["completed"], stats["failed"]) == (1, 1)


async def test_a_request_cancelled_while_waiting_counts_as_failed(stack: Stack) -> None:
    running = await stack.occupy("busy")
    waiting = await stack.submit("busy")
    cancelled = await stack.client.put(f"/queue/busy/requests/{waiting}/cancel")
    stack.functions.release("/busy")
    await stack.wait_for_status("busy", running)

    stats = (await stack.client.get("/system/functions/busy")).json()["stats"]

    assert cancelled.status_code == 202
    assert (stats["completed"], stats["failed"]) == (1, 1)


async def test_a_function_registered_after_the_worker_started_is_served(stack: Stack) -> None:
    assert stack.worker is not None, "the worker runs before the function exists"
    await stack.register("late")

    request_id = await stack.submit("late", content=b"hello")

    await stack.wait_for_status("late", request_id)
    assert [s.body for s in stack.functions.on("/late")] == [b"hello"]


async def test_an_update_reaches_the_worker_without_restart(stack: Stack) -> None:
    await stack.register("echo", path="/old")
    first = await stack.submit("echo")
    await stack.wait_for_status("echo", first)

    response = await stack.client.put(
        "/system/functions/echo", json={"name": "echo", "url": stack.function_url("/new")}
    )
    assert response.status_code == 200
    second = await stack.submit("echo")
    await stack.wait_for_status("echo", second)

    assert len(stack.functions.on("/old")) == 1
    assert len(stack.functions.on("/new")) == 1


async def test_put_creates_an_unknown_function(stack: Stack) -> None:
    response = await stack.client.put("/system/functions/fresh", json={"url": stack.function_url("/fresh")})

    assert response.status_code == 201
    assert response.json()["name"] == "fresh"


async def test_deleted_function_refuses_new_requests(stack: Stack) -> None:
    await stack.register("echo")

    deleted = await stack.client.delete("/system/functions/echo")
    submit = await stack.client.post("/async-function/echo", content=b"x")
    again = await stack.client.delete("/system/functions/echo")

    assert deleted.status_code == 204
    assert submit.status_code == 404
    assert again.status_code == 404
    assert (await stack.client.get("/system/functions")).json() == []


async def _consumers(conn: Nats, function: str) -> int:
    """How many of `function`'s queue consumers exist."""
    found = 0
    for priority in PRIORITIES:
        with contextlib.suppress(NotFoundError):
            await conn.js.consumer_info(names.QUEUE_STREAM, names.queue_consumer(function, priority))
            found += 1
    return found


async def test_a_function_deleted_with_nothing_queued_leaves_no_consumers(stack: Stack, conn: Nats) -> None:
    """A soak run found three consumers left per function name ever deleted, for good."""
    await stack.register("echo")
    await stack.wait_for_status("echo", await stack.submit("echo", content=b"before"))
    assert await _consumers(conn, "echo") == len(PRIORITIES)

    deleted = await stack.client.delete("/system/functions/echo")
    left = await _consumers(conn, "echo")
    await stack.register("echo")
    final = await stack.wait_for_status("echo", await stack.submit("echo", content=b"registered again"))

    assert deleted.status_code == 204
    assert left == 0
    assert "error_type" not in final


async def test_a_registration_racing_a_delete_keeps_its_consumers(stack: Stack, conn: Nats) -> None:
    """A PUT that lands between a DELETE's registry delete and its drop of the idle consumers found
    them still there, and the DELETE dropped them after: registered, with no consumers, its
    requests waited for good (found by a race review, 8 of 20 tries)."""
    body = {"name": "echo", "url": stack.function_url("/echo")}
    await stack.register("echo")
    for n in range(12):
        await asyncio.gather(
            stack.client.delete("/system/functions/echo"), stack.client.put("/system/functions/echo", json=body)
        )
        if (await stack.client.get("/system/functions/echo")).status_code == 404:
            await stack.register("echo")
        assert await _consumers(conn, "echo") == len(PRIORITIES), f"try {n}"
    final = await stack.wait_for_status("echo", await stack.submit("echo", content=b"x"), timeout_s=30)

    assert "error_type" not in final


async def test_a_function_deleted_with_requests_waiting_runs_them_once_registered_again(
    stack_without_worker: Stack, conn: Nats
) -> None:
    stack = stack_without_worker
    await stack.register("echo")
    waiting = await stack.submit("echo", content=b"waits for a new registration")

    deleted = await stack.client.delete("/system/functions/echo")
    left = await _consumers(conn, "echo")
    await stack.register("echo")
    await stack.start_worker()
    final = await stack.wait_for_status("echo", waiting)

    assert deleted.status_code == 204
    assert left == len(PRIORITIES)
    assert "error_type" not in final
    assert [s.body for s in stack.functions.on("/echo")] == [b"waits for a new registration"]


async def _deleted_with_a_call_running(stack: Stack, name: str) -> httpx.Response:
    """Register `name` (concurrency 1), hold a call of it, and delete it; the delete's answer."""
    await stack.register(name, concurrency=1)
    stack.functions.hold(f"/{name}")
    await stack.submit(name, content=b"a long call")
    await stack.functions.wait_for(f"/{name}")
    return await stack.client.delete(f"/system/functions/{name}")


@pytest.mark.parametrize("again", [False, True], ids=["deleted", "deleted and registered again"])
async def test_a_function_deleted_with_a_call_running_holds_up_no_other_function(
    nats_server: EmbeddedNats, again: bool
) -> None:
    """The worker stopped the deleted function's runner, whose calls may take `shutdown_grace`, in
    the one loop that follows the registry: a function registered meanwhile got no runner, and its
    requests waited with the worker idle (found by a review). Registered again, its new runner
    starts once the old one's calls are over (a request waits for that), and holds up no other."""
    stack = await start_stack(nats_server, overrides={"worker": {"shutdown_grace": 60.0}})
    try:
        deleted = await _deleted_with_a_call_running(stack, "old")
        if again:
            await stack.register("old", concurrency=1)
            waiting = await stack.submit("old", content=b"after the old call")
        await stack.register("new")
        request_id = await stack.submit("new", content=b"x")
        final = await stack.wait_for_status("new", request_id, timeout_s=15)  # well within the old call's grace
        if again:
            assert len(stack.functions.on("/old")) == 1, "no call beside the old runner's"
            stack.functions.release("/old", 2)
            assert "error_type" not in await stack.wait_for_status("old", waiting, timeout_s=15)
    finally:
        stack.functions.release("/old", 5)
        await stack.close()

    assert deleted.status_code == 204
    assert "error_type" not in final


async def test_a_runner_started_once_its_old_one_stopped_is_tried_again_when_its_start_fails(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registered again while its old runner's call ran, a function's runner starts once that call
    is over; that start failing once (here a JetStream error on its consumers) left the function
    registered with no runner, its requests waiting for ever (found by a review)."""
    stack = await start_stack(nats_server, overrides={"worker": {"shutdown_grace": 60.0}})
    try:
        await _deleted_with_a_call_running(stack, "old")
        await stack.register("old", concurrency=1)
        failures = _failing_starts(monkeypatch, 1)  # the new runner's start
        stack.functions.release("/old", 2)  # the old call ends, and the next one answers at once
        waiting = await stack.submit("old", content=b"after the old call")
        final = await stack.wait_for_status("old", waiting, timeout_s=20)
    finally:
        stack.functions.release("/old", 5)
        await stack.close()

    assert failures == [], "the start did fail once"
    assert "error_type" not in final


async def test_a_start_tried_again_after_a_later_delete_and_registration_runs_beside_no_old_call(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrency 1. A start waiting out its backoff after a failure (cycle 1) saw, on waking, the
    function registered again while a later runner of it still stopped with a call running (B), and
    started a runner beside that call: C ran while B did (found by a review). It waits for
    whichever old runner stops last."""
    monkeypatch.setattr(worker_main, "APPLY_BACKOFF_S", 4.0)  # cycle 1's wait after its failed start
    stack = await start_stack(nats_server, overrides={"worker": {"shutdown_grace": 60.0}})
    try:
        await _deleted_with_a_call_running(stack, "old")  # call A runs on
        await stack.register("old", concurrency=1)  # cycle 1: its runner starts once A is over
        failures = _failing_starts(monkeypatch, 1)
        stack.functions.release("/old", 1)  # A ends; cycle 1's start fails once and waits 4 s
        await eventually(lambda: not failures)
        await stack.client.delete("/system/functions/old")
        await stack.register("old", concurrency=1)  # nothing stopping: a runner starts at once
        await stack.submit("old", content=b"B")
        await stack.functions.wait_for("/old", 2)  # B runs, held
        await stack.client.delete("/system/functions/old")  # that runner stops, B still running
        await stack.register("old", concurrency=1)
        waiting = await stack.submit("old", content=b"C")
        with contextlib.suppress(TimeoutError):  # cycle 1 wakes meanwhile
            await stack.functions.wait_for("/old", 3, timeout_s=6)
        while_b_ran = [seen.body for seen in stack.functions.on("/old")]
        stack.functions.release("/old", 2)  # B ends; then C runs, and answers
        final = await stack.wait_for_status("old", waiting, timeout_s=15)
    finally:
        stack.functions.release("/old", 5)
        await stack.close()

    assert while_b_ran == [b"a long call", b"B"], "C waited for B's runner to stop (concurrency 1)"
    assert "error_type" not in final


def _failing_starts(monkeypatch: pytest.MonkeyPatch, times: int) -> list[APIError]:
    """The worker's next `times` starts of a runner fail on its consumers (a JetStream error); the
    failures left to come."""
    ensure = provision.ensure_function_consumers
    failures = [APIError(code=500, description="insufficient resources", err_code=10023) for _ in range(times)]

    async def failing(*args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        await ensure(*args, **kwargs)

    monkeypatch.setattr(worker_main, "ensure_function_consumers", failing)
    return failures


async def test_a_repeated_registration_of_the_same_entry_is_no_conflict(stack: Stack) -> None:
    """A client repeating a POST whose answer it lost (a 503 while NATS was away, the entry stored
    once it came back) was refused for its own registration (found by an audit)."""
    entry = {"name": "echo", "url": stack.function_url("/echo")}
    first = await stack.client.post("/system/functions", json=entry)
    again = await stack.client.post("/system/functions", json=entry)
    other = await stack.client.post("/system/functions", json={**entry, "timeout": 5})

    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 400)
    assert again.json() == first.json()
    assert (await stack.client.get("/system/functions/echo")).json()["timeout"] == 3600


async def test_registering_a_taken_name_is_refused_without_409(stack: Stack) -> None:
    await stack.register("echo")

    response = await stack.client.post("/system/functions", json={"name": "echo", "url": stack.function_url("/x")})

    assert response.status_code == 400
    assert "PUT" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"name": "Bad_Name", "url": "http://127.0.0.1:1"}, "name"),
        ({"name": "ok"}, "url"),
        ({"name": "ok", "url": "ftp://127.0.0.1:1"}, "url"),
        ({"name": "ok", "url": "http://127.0.0.1:1", "concurrency": 0}, "concurrency"),
        ({"name": "ok", "url": "http://127.0.0.1:1", "timeout": "soon"}, "timeout"),
        ({"name": "ok", "url": "http://127.0.0.1:1", "colour": "red"}, "colour"),
        ({"name": "ok", "url": "http://127.0.0.1:1", "cancel_path": "cancel"}, "cancel_path"),
        ({"name": "ok", "url": "http://127.0.0.1:1", "result_ttl": 1e300}, "result_ttl"),
        ({"name": "ok", "url": "http://127.0.0.1:1", "timeout": 1e300}, "timeout"),
        ({"name": "ok", "url": "http://127.0.0.1:1", "headers": {"bad header\n": "x"}}, "headers"),
        ({"name": "ok", "url": "http://127.0.0.1:1", "headers": {"X-Token": "a\r\nInjected: 1"}}, "headers"),
        ({"name": "ok", "url": "http://127.0.0.1:1", "headers": {"Content-Length": "5"}}, "headers"),
    ],
)
async def test_invalid_registry_entry_is_refused_naming_the_field(
    stack: Stack, body: dict[str, Any], named: str
) -> None:
    response = await stack.client.post("/system/functions", json=body)

    assert response.status_code == 422
    assert named in response.json()["detail"]
    assert (await stack.client.get("/system/functions")).json() == [], "nothing was registered"


async def test_a_url_or_headers_no_call_could_use_are_refused_naming_the_field(stack: Stack) -> None:
    """Each was registered (201), and every call then failed without a reason, or the synchronous
    proxy answered a bare 500; a configured X-Call-Id replaced the request's id (found by an audit)."""
    ok = "http://127.0.0.1:1"
    refused: list[tuple[dict[str, Any], str]] = [
        ({"url": "http://127.0.0.1:99999/"}, "url"),
        ({"url": "http://127.0.0.1:0/"}, "url"),
        ({"url": "http://127.0.0.1:ab/"}, "url"),
        ({"url": "http://[::1/"}, "url"),
        ({"url": "http://a b/"}, "url"),
        ({"url": "http://a\tb/"}, "url"),
        ({"url": "http://ab/\x01"}, "url"),
        ({"url": ok, "headers": {"X-Tenant": "café"}}, "headers"),
        ({"url": ok, "headers": {"X-Call-Id": "mine"}}, "X-Call-Id"),
        ({"url": ok, "headers": {"x-logs-url": "http://127.0.0.1:1/"}}, "x-logs-url"),
        ({"url": ok, "headers": {"x-fn": "a", "X-FN": "b"}}, "same header"),
        ({"url": ok, "cancel_path": "/../admin"}, "cancel_path"),
    ]
    answers = [
        (await stack.client.post("/system/functions", json={"name": "ok", **body}), named) for body, named in refused
    ]

    for response, named in answers:
        assert response.status_code == 422, response.request.content
        assert named in response.json()["detail"]
    assert (await stack.client.get("/system/functions")).json() == [], "nothing was registered"
    accepted = await stack.client.post("/system/functions", json={"name": "ok", "url": "http://[::1]:8080/a?code=k"})
    assert accepted.status_code == 201


async def test_non_json_registry_body_is_refused(stack: Stack) -> None:
    for body in (b"not json", b"[1, 2]"):
        response = await stack.client.post("/system/functions", content=body)
        assert response.status_code == 422
        assert response.json()["detail"]


async def test_put_with_a_null_name_takes_the_paths_as_without_one(stack: Stack) -> None:
    """It was a 400 saying the body named None (found by an audit)."""
    response = await stack.client.put("/system/functions/one", json={"name": None, "url": stack.function_url("/x")})

    assert response.status_code == 201
    assert response.json()["name"] == "one"


async def test_put_with_a_different_name_in_the_body_is_refused(stack: Stack) -> None:
    response = await stack.client.put("/system/functions/one", json={"name": "two", "url": stack.function_url("/x")})

    assert response.status_code == 400
    assert (await stack.client.get("/system/functions")).json() == []


@pytest.mark.parametrize("path", ["/system/functions/nobody", "/system/functions/No_Pe"])
async def test_unknown_or_invalid_function_lookup(stack: Stack, path: str) -> None:
    response = await stack.client.get(path)

    assert response.status_code == 404
    assert "is not registered" in response.json()["detail"]


async def test_functions_from_the_config_file_are_registered_at_start(nats_server: EmbeddedNats) -> None:
    function = RecordingApp()
    server = AsgiServer(function)
    await server.start()
    stack = await start_stack(
        nats_server, overrides={"functions": [{"name": "configured", "url": f"{server.url}/c", "concurrency": 3}]}
    )
    try:
        listed = (await stack.client.get("/system/functions/configured")).json()
        request_id = await stack.submit("configured", content=b"x")
        await stack.wait_for_status("configured", request_id)
    finally:
        await stack.close()
        await server.stop()

    assert listed["concurrency"] == 3
    assert [s.body for s in function.on("/c")] == [b"x"]


async def test_health_and_readiness(stack: Stack) -> None:
    health = await stack.client.get("/healthz")
    ready = await stack.client.get("/readyz")
    heads = [await stack.client.head(path) for path in ("/healthz", "/readyz")]  # `curl -I`: it was 405

    assert (health.status_code, ready.status_code) == (200, 200)
    assert ready.json()["status"] == "ready"
    assert [(head.status_code, head.content) for head in heads] == [(200, b""), (200, b"")]


async def test_not_ready_while_nats_does_not_answer(nats_server: EmbeddedNats) -> None:
    """A connected flag alone said ready for a nats-server that hung, while every submit waited
    31 s for a 503 (found by a SPEC audit)."""
    stack = await start_stack(nats_server)
    os.kill(nats_server.pid, signal.SIGSTOP)
    try:
        hung = await stack.client.get("/readyz", timeout=10)
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    try:

        async def ready_again() -> bool:
            return (await stack.client.get("/readyz", timeout=10)).status_code == 200

        await eventually_true(ready_again, timeout_s=20)
        # And the gateway still hears NATS: a ping answered after its time out once ended nats-py's
        # read loop for good, while /readyz went on saying ready (found by a review).
        await stack.register("echo")
        final = await stack.wait_for_status("echo", await stack.submit("echo", content=b"after"))
    finally:
        await stack.close()

    assert final["status"] == "COMPLETED"
    assert (hung.status_code, hung.json()["status"]) == (503, "not ready")
    assert "did not answer" in hung.json()["detail"]


async def test_a_function_registered_after_a_nats_restart_is_served_at_once(tmp_path: Path) -> None:
    """The registry watchers are renewed on reconnect (nats-py alone would notice the lost
    consumer only after missed heartbeats, about 15 s later)."""
    nats = EmbeddedNats(tmp_path / "nats", port=free_port())
    nats.start()
    stack = await start_stack(nats)
    try:
        nats.kill()
        nats.start()

        async def registered() -> bool:
            body = {"name": "late", "url": stack.function_url("/late")}
            return (await stack.client.put("/system/functions/late", json=body)).status_code == 201

        await eventually_true(registered, timeout_s=30, interval_s=0.2)
        request_id = await stack.submit("late", content=b"after the restart")
        final = await stack.wait_for_status("late", request_id, timeout_s=10)
    finally:
        await stack.close()
        nats.stop()

    assert "error_type" not in final
    assert [s.body for s in stack.functions.on("/late")] == [b"after the restart"]


async def _reload(nats: EmbeddedNats, gateway_denied: list[str]) -> None:
    """Change what the `gateway` user is denied while it is connected (a configuration reload)."""
    log = nats.data_dir / "nats-server.log"
    reloads = log.read_text().count("Reloaded server configuration")
    nats.extra_config = users("gateway", gateway_denied)
    (nats.data_dir / "nats-server.conf").write_text(nats.config(), encoding="utf-8")
    os.kill(nats.pid, signal.SIGHUP)
    await eventually(lambda: log.read_text().count("Reloaded server configuration") > reloads)


async def _gateway_stack(nats: EmbeddedNats) -> Stack:
    return await start_stack(nats, worker=False, overrides=as_user("gateway"))


async def test_a_registration_stored_while_nats_fails_is_answered_once_nats_answers(tmp_path: Path) -> None:
    """Found by a chaos run on a cluster back from a lost quorum: the entry was stored, creating
    its consumers timed out, and the answer was 503; the client's repeat was refused as taken."""
    consumer_info = [f"$JS.API.CONSUMER.INFO.JETSPOOL_QUEUE.jetspool-fresh-{p}" for p in PRIORITIES]
    nats = EmbeddedNats(tmp_path / "nats", port=free_port(), extra_config=users("gateway", consumer_info))
    nats.start()
    try:
        stack = await _gateway_stack(nats)
        try:
            body = {"name": "fresh", "url": stack.function_url("/fresh")}
            answer = asyncio.create_task(stack.client.post("/system/functions", json=body))
            await eventually(lambda: "jetspool-fresh" in (nats.data_dir / "nats-server.log").read_text(), timeout_s=10)

            await _reload(nats, [])
            registered = await answer
            listed = await stack.client.get("/system/functions/fresh")
        finally:
            await stack.close()
    finally:
        nats.stop()

    assert registered.status_code == 201, registered.text
    assert listed.status_code == 200


async def test_a_registry_watch_that_cannot_be_renewed_leaves_the_old_one_following(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After a reconnect the gateway and workers renew their registry watch. On a cluster whose
    quorum stayed away past the ride-through this failed, and was logged as an error with a
    traceback (`a reconnect hook failed`), though the old watch renews its own consumer (a chaos
    run: each change made once the cluster was back reached the views within 4 s)."""
    nats = EmbeddedNats(tmp_path / "nats", port=free_port(), extra_config=users("gateway", []))
    nats.start()
    try:
        stack = await _gateway_stack(nats)
        try:
            view = stack.app.state.gateway.view
            bucket = f"KV_{names.FUNCTIONS_BUCKET}"
            await _reload(nats, [f"$JS.API.CONSUMER.CREATE.{bucket}", f"$JS.API.CONSUMER.CREATE.{bucket}.>"])
            monkeypatch.setattr(ridethrough, "RIDE_THROUGH_S", 0.5)

            with caplog.at_level(logging.WARNING, logger="jetspool.jetstream.registry"):
                await view.resync()  # no new watch can be made
            admin = await nats_py.connect(nats.url, user="admin", password=PASSWORD)
            try:
                functions = await admin.jetstream().key_value(names.FUNCTIONS_BUCKET)
                later = Function(name="later", url=stack.function_url("/later"))
                await functions.put("later", later.encode())
            finally:
                await admin.close()
            await eventually(lambda: view.get("later") == later)
        finally:
            await stack.close()
    finally:
        nats.stop()

    assert "registry watch not renewed" in caplog.text


async def _a_view_of_one_function(nc: NatsClient) -> tuple[KeyValue, RegistryView]:
    """A registry bucket holding one function, `f`, and a view following it."""
    kv = await nc.jetstream().create_key_value(bucket="functions")
    await FunctionRegistry(kv).create(Function(name="f", url="http://127.0.0.1:9/"))
    view = RegistryView(kv)
    await view.start()
    return kv, view


@pytest.mark.parametrize("step", ["ride_through", "stop_task"], ids=["renewing its watch", "stopping its old follower"])
async def test_a_view_stopped_during_a_resync_follows_nothing_after(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A resync (after a reconnect) under way when the worker stopped started a follower after the
    stop: it fed registry changes to a runner pool that had stopped, and was never stopped itself
    (found by two reviews, with the stop at either step of the resync)."""
    nc = await nats_py.connect(nats_server.url)
    try:
        _, view = await _a_view_of_one_function(nc)
        reached, go = asyncio.Event(), asyncio.Event()
        real = getattr(registry_module, step)

        async def held(*args: Any, **kwargs: Any) -> Any:  # the resync's step waits for the stop
            if not reached.is_set():
                reached.set()
                await go.wait()
            return await real(*args, **kwargs)

        monkeypatch.setattr(registry_module, step, held)
        resync = asyncio.create_task(view.resync())
        await asyncio.wait_for(reached.wait(), 5)
        await view.stop()
        go.set()
        await asyncio.wait_for(resync, 10)
        follower = view._task  # noqa: SLF001 - the view's follower, if any
        following = follower is not None and not follower.done()
        if follower is not None:
            await stop_task(follower)
    finally:
        await nc.close()

    assert not following, "no follower runs after the view stopped"


async def test_a_resync_cancelled_once_its_new_watch_is_made_leaves_no_watch_behind(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resync cancelled while it stopped the old follower (a worker stopping during a reconnect)
    left the watch it had just made subscribed, its consumer on the server, for the process's life
    (found by a review)."""
    nc = await nats_py.connect(nats_server.url)
    try:
        _, view = await _a_view_of_one_function(nc)
        subscribed = len(nc._subs)  # noqa: SLF001 - the connection's subscriptions
        reached = asyncio.Event()

        async def held(task: asyncio.Task[Any]) -> None:  # stopping the old follower never ends
            reached.set()
            await asyncio.Event().wait()

        monkeypatch.setattr(registry_module, "stop_task", held)
        resync = asyncio.create_task(view.resync())
        await asyncio.wait_for(reached.wait(), 5)
        resync.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await resync
        left = len(nc._subs)  # noqa: SLF001
        monkeypatch.undo()
        await view.stop()
    finally:
        await nc.close()

    assert left == subscribed, f"{left - subscribed} watch(es) left subscribed"


async def test_two_resyncs_at_once_leave_one_follower(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two resyncs at once (reconnects in quick succession) each stopped the same old follower and
    started one of their own: the first one started followed on beside the second, every change
    applied twice, for the worker's life (found by a review). They take turns."""
    following: set[asyncio.Task[Any]] = set()
    real_follow = RegistryView._follow  # noqa: SLF001

    async def counted(self: RegistryView, watcher: Any, *, replay: bool = False) -> None:
        task = asyncio.current_task()
        assert task is not None
        following.add(task)
        try:
            await real_follow(self, watcher, replay=replay)
        finally:
            following.discard(task)

    monkeypatch.setattr(RegistryView, "_follow", counted)
    nc = await nats_py.connect(nats_server.url)
    try:
        kv, view = await _a_view_of_one_function(nc)
        await asyncio.gather(view.resync(), view.resync())
        await FunctionRegistry(kv).create(Function(name="g", url="http://127.0.0.1:9/"))
        await eventually(lambda: view.get("g") is not None)
        alive = [task for task in following if not task.done()]
        await view.stop()
    finally:
        await nc.close()

    assert len(alive) == 1, f"{len(alive)} followers"


def _recorded_pools(monkeypatch: pytest.MonkeyPatch) -> list[worker_main.RunnerPool]:
    """The runner pools the workers started from now on make, as they make them."""
    pools: list[worker_main.RunnerPool] = []

    class RecordedPool(worker_main.RunnerPool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(worker_main, "RunnerPool", RecordedPool)
    return pools


async def test_a_worker_stopped_while_its_registry_is_replayed_starts_no_runner(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry change that still reaches the worker's runner pool once it stopped (a replay after
    a reconnect, overlapping the stop) starts nothing (found by a review)."""
    pools = _recorded_pools(monkeypatch)
    stack = await start_stack(nats_server)
    try:
        await stack.register("echo")
        await eventually(lambda: bool(pools) and "echo" in pools[0]._runners)  # noqa: SLF001 - its runners
        pool = pools[0]
        await pool.stop()
        await pool.on_change("late", Function(name="late", url=stack.function_url("/late")))
        started = list(pool._runners)  # noqa: SLF001
    finally:
        await stack.close()

    assert started == []


async def test_a_runner_whose_stop_fails_lets_no_new_runner_beside_its_calls(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deleted function's runner whose stop raised on the way (its unsubscribe refused) counted as
    stopped: its call ran on unbounded, and the runner of the function registered again ran beside
    it (found by a review). Its calls are waited for whatever failed."""
    real_stop = puller.PriorityPuller.stop
    fails = [OutboundBufferLimitError()]

    async def failing_stop(self: puller.PriorityPuller) -> Any:
        if fails:
            raise fails.pop()
        return await real_stop(self)

    stack = await start_stack(nats_server, overrides={"worker": {"shutdown_grace": 60.0}})
    try:
        monkeypatch.setattr(puller.PriorityPuller, "stop", failing_stop)
        await _deleted_with_a_call_running(stack, "old")  # its runner's stop fails once; call A runs on
        await stack.register("old", concurrency=1)
        waiting = await stack.submit("old", content=b"B")
        with contextlib.suppress(TimeoutError):
            await stack.functions.wait_for("/old", 2, timeout_s=4)
        while_a_ran = [seen.body for seen in stack.functions.on("/old")]
        stack.functions.release("/old", 2)
        final = await stack.wait_for_status("old", waiting, timeout_s=15)
    finally:
        stack.functions.release("/old", 5)
        await stack.close()

    assert fails == [], "the stop did fail once"
    assert while_a_ran == [b"a long call"], "B waited for A (concurrency 1)"
    assert "error_type" not in final


async def test_a_runner_stop_cancelled_on_its_way_ends_at_once(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runner's stop waits for its calls whatever failed on the way, but not a cancellation: one
    cancel (as `asyncio.gather` or the event loop's shutdown gives) ends it at once, where it waited
    out the calls' grace (found by a review)."""
    pools = _recorded_pools(monkeypatch)
    stack = await start_stack(nats_server, overrides={"worker": {"shutdown_grace": 30.0}})
    stopping: asyncio.Task[None] | None = None
    try:
        await stack.held_call("slow", b"a long call")
        await eventually(lambda: bool(pools) and "slow" in pools[0]._runners)  # noqa: SLF001 - its runners
        runner = pools[0]._runners.pop("slow")  # noqa: SLF001 - stopped here, not by the pool
        on_its_way, never = asyncio.Event(), asyncio.Event()

        async def held_stop() -> Any:  # the stop is handing back what its puller holds
            on_its_way.set()
            await never.wait()

        monkeypatch.setattr(runner._puller, "stop", held_stop)  # noqa: SLF001
        stopping = asyncio.create_task(runner.stop(30.0))
        await asyncio.wait_for(on_its_way.wait(), 5)
        stopping.cancel()
        done, _ = await asyncio.wait({stopping}, timeout=5)  # the held call would hold it 30 s
    finally:
        stack.functions.release("/slow", 5)
        if stopping is not None:
            await asyncio.wait({stopping}, timeout=35)
        await stack.close()

    assert stopping in done, "the cancelled stop waited for the held call"
    assert stopping.cancelled()


async def test_a_runner_stop_cancelled_while_its_calls_have_their_grace_ends_them(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop cancelled while it waited out its calls' grace (where a stop spends its time) ended and
    left its call running, owned by nobody, its message neither settled nor handed back (found by a
    review). The calls are stopped at once, and their messages go back."""
    pools = _recorded_pools(monkeypatch)
    stack = await start_stack(nats_server, overrides={"worker": {"shutdown_grace": 30.0}})
    stopping: asyncio.Task[None] | None = None
    try:
        request_id = await stack.held_call("slow", b"a long call")
        await eventually(lambda: bool(pools) and "slow" in pools[0]._runners)  # noqa: SLF001 - its runners
        runner = pools[0]._runners.pop("slow")  # noqa: SLF001 - stopped here, not by the pool
        stopping = asyncio.create_task(runner.stop(30.0))
        await eventually(lambda: runner._puller._sub is None)  # noqa: SLF001 - past the hand-backs: the grace
        stopping.cancel()
        done, _ = await asyncio.wait({stopping}, timeout=5)
        await eventually(lambda: runner.in_flight == 0, timeout_s=5)
        waiting = await stack.wait_for_status("slow", request_id, "IN_QUEUE", timeout_s=5)  # handed back
    finally:
        stack.functions.release("/slow", 5)
        await stack.close()

    assert stopping in done
    assert stopping.cancelled()
    assert waiting["status"] == "IN_QUEUE"


async def test_a_pool_stop_waits_for_every_runner_when_one_runner_stop_fails(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's stop gathered its runners' stops, and the first to fail (at once: it had no call)
    ended it while another runner's call still ran; the worker then closed its connection under the
    call, whose result was lost and whose request ran again (found by a review)."""
    pools = _recorded_pools(monkeypatch)
    stack = await start_stack(nats_server, overrides={"worker": {"shutdown_grace": 30.0}})
    worker = stack.worker
    assert worker is not None
    assert worker.task is not None
    try:
        await stack.register("quick")
        request_id = await stack.held_call("slow", b"a long call")
        await eventually(lambda: bool(pools) and {"quick", "slow"} <= set(pools[0]._runners))  # noqa: SLF001

        async def refused() -> Any:  # an unsubscribe refused by a closing connection
            raise OutboundBufferLimitError

        monkeypatch.setattr(pools[0]._runners["quick"]._puller, "stop", refused)  # noqa: SLF001
        worker.stop_event.set()
        done, _ = await asyncio.wait({worker.task}, timeout=3)  # the held call keeps the worker 30 s
        stack.functions.release("/slow")
        await asyncio.wait({worker.task}, timeout=35)
        stack.worker = None
        final = await stack.wait_for_status("slow", request_id, timeout_s=5)
    finally:
        stack.functions.release("/slow", 5)
        await stack.close()

    assert worker.task not in done, "the worker stopped while a call ran"
    assert isinstance(worker.task.exception(), OutboundBufferLimitError), "the failure is raised, at the end"
    assert final["status"] == "COMPLETED"
    assert "error_type" not in final


def _cut_pulls_short(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Have each runner's pull round stop for good after the high class gave a delivery, as a stop
    cuts one short: the delivery stays in the puller's hands. The event is set once one does."""
    real_pull_class = puller.PriorityPuller._pull_class  # noqa: SLF001
    in_second_pull = asyncio.Event()

    async def cut_short(self: puller.PriorityPuller, priority: str, batch: int, wait_s: float = 0.0) -> int:
        if priority == "normal" and self._ready:
            in_second_pull.set()
            await asyncio.Event().wait()
        return await real_pull_class(self, priority, batch, wait_s)  # type: ignore[arg-type]

    monkeypatch.setattr(puller.PriorityPuller, "_pull_class", cut_short)
    monkeypatch.setattr(puller.PriorityPuller, "_skip", lambda self, priority: False)
    return in_second_pull


async def _taken_by_another_worker(nats_server: EmbeddedNats, function: str) -> list[Any]:
    """What another worker asking for `function`'s high class gets within 5 s (then handed back):
    a request handed back is there at once, one left to its ack wait is not."""
    nc = await nats_py.connect(nats_server.url)
    try:
        consumer = names.queue_consumer(function, "high")
        sub = await nc.jetstream().pull_subscribe_bind(consumer, stream=names.QUEUE_STREAM)
        try:
            taken = await sub.fetch(1, timeout=5)
        except nats_py.errors.TimeoutError:
            return []
        for msg in taken:
            await msg.nak()
        return taken
    finally:
        await nc.close()


async def _a_runner_holding_a_delivery(
    stack: Stack, pools: list[worker_main.RunnerPool], in_second_pull: asyncio.Event
) -> FunctionRunner:
    """The runner of a function `f`, taken from its pool to be stopped by the test, once its puller
    holds a delivery of the high class (`_cut_pulls_short`)."""
    await stack.register("f", concurrency=2)
    await eventually(lambda: bool(pools) and "f" in pools[0]._runners)  # noqa: SLF001
    runner = pools[0]._runners.pop("f")  # noqa: SLF001 - stopped by the test, not by the pool
    await stack.submit("f", content=b"high", headers={names.H_QUEUE_PRIORITY: "high"})
    await asyncio.wait_for(in_second_pull.wait(), 5)
    return runner


@pytest.mark.parametrize("fails", [False, True], ids=["stop succeeds", "unsubscribe refused"])
async def test_a_runner_stop_hands_back_what_its_puller_holds_whatever_failed(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """A stop whose first step raised (its wake-up unsubscribe refused) handed back none of what its
    puller held, taken by a pull the stop cut short: those requests waited out the ack wait, with no
    worker on them (found by a review). Each step runs whatever the one before did."""
    pools = _recorded_pools(monkeypatch)
    in_second_pull = _cut_pulls_short(monkeypatch)
    stack = await start_stack(nats_server, overrides={"worker": {"ack_wait": 30.0}})
    try:
        runner = await _a_runner_holding_a_delivery(stack, pools, in_second_pull)

        async def refused(*_: Any, **__: Any) -> None:
            raise OutboundBufferLimitError

        if fails:
            monkeypatch.setattr(runner._wake_sub, "unsubscribe", refused)  # noqa: SLF001
            with pytest.raises(OutboundBufferLimitError):
                await runner.stop(2.0)
        else:
            await runner.stop(2.0)
        taken = await _taken_by_another_worker(nats_server, "f")
    finally:
        await stack.close()

    assert stack.functions.on("/f") == [], "the request was never called"
    assert len(taken) == 1, "handed back at once, not after the ack wait"


@pytest.mark.parametrize("puller_unsubscribe", ["quick", "hangs", "refused"])
async def test_a_runner_stop_cancelled_before_its_hand_backs_still_makes_them(
    nats_server: EmbeddedNats,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    puller_unsubscribe: str,
) -> None:
    """A cancel that landed before the hand-backs (here in a slow wake-up unsubscribe) stopped the
    calls and left the puller's deliveries to their ack wait, no worker on them; so did an
    unsubscribe of the puller's own that hung as well (a connection busy flushing), and one that
    failed left no trace (found by reviews). The hand-backs come first, each unsubscribe is bounded,
    and a failure of a cancelled stop is logged."""
    pools = _recorded_pools(monkeypatch)
    in_second_pull = _cut_pulls_short(monkeypatch)
    stack = await start_stack(nats_server, overrides={"worker": {"ack_wait": 30.0}})
    try:
        runner = await _a_runner_holding_a_delivery(stack, pools, in_second_pull)
        unsubscribing = asyncio.Event()

        async def hangs(*_: Any, **__: Any) -> None:
            unsubscribing.set()
            await asyncio.Event().wait()

        async def refused(*_: Any, **__: Any) -> None:
            raise OutboundBufferLimitError

        monkeypatch.setattr(runner._wake_sub, "unsubscribe", hangs)  # noqa: SLF001
        if puller_unsubscribe != "quick":
            sub = runner._puller._sub  # noqa: SLF001
            monkeypatch.setattr(sub, "unsubscribe", hangs if puller_unsubscribe == "hangs" else refused)
        with caplog.at_level(logging.WARNING, logger="jetspool.worker.runner"):
            stopping = asyncio.create_task(runner.stop(2.0))
            await asyncio.wait_for(unsubscribing.wait(), 5)
            stopping.cancel()
            await asyncio.wait({stopping}, timeout=5)
        taken = await _taken_by_another_worker(nats_server, "f")
    finally:
        await stack.close()

    assert stopping.cancelled()
    assert stack.functions.on("/f") == [], "the request was never called"
    assert len(taken) == 1, "handed back at once, not after the ack wait"
    if puller_unsubscribe == "refused":
        assert "OutboundBufferLimitError" in caplog.text


async def test_a_worker_stop_reports_every_runner_stop_that_failed(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool's stop raised the first failure of its runners' stops and dropped the others without
    a trace (found by a review): they are logged."""
    pools = _recorded_pools(monkeypatch)
    stack = await start_stack(nats_server)
    worker = stack.worker
    assert worker is not None
    assert worker.task is not None
    try:
        await stack.register("a")
        await stack.register("b")
        await eventually(lambda: bool(pools) and {"a", "b"} <= set(pools[0]._runners))  # noqa: SLF001
        for name in ("a", "b"):

            async def refused(name: str = name) -> Any:
                raise RuntimeError(f"runner {name} could not stop")

            monkeypatch.setattr(pools[0]._runners[name]._puller, "stop", refused)  # noqa: SLF001
        with caplog.at_level(logging.ERROR, logger="jetspool.aio"):
            worker.stop_event.set()
            await asyncio.wait({worker.task}, timeout=10)
        stack.worker = None
    finally:
        await stack.close()

    raised = worker.task.exception()
    logged = [str(r.exc_info[1]) for r in caplog.records if r.exc_info is not None]
    assert isinstance(raised, RuntimeError)
    assert sorted([str(raised), *logged]) == ["runner a could not stop", "runner b could not stop"]


async def test_withdrawing_an_entry_written_over_since_it_was_read_leaves_the_new_one(stack: Stack) -> None:
    """`up --demo` unregisters its demo functions only as it registered them. An entry written over
    between its read and its delete made the delete raise nats-py's plain BadRequestError, which
    stopped the others' unregistering (found by a review)."""
    ours = Function(name="echo", url=stack.function_url("/echo"))
    theirs = Function(name="echo", url=stack.function_url("/theirs"))
    nc = await nats_py.connect(stack.nats.url)
    try:
        kv = await nc.jetstream().key_value(names.FUNCTIONS_BUCKET)
        registry = FunctionRegistry(kv)
        await registry.put(ours)

        class WrittenOverAfterTheRead:
            """The real bucket; its read is followed at once by another writer's real write."""

            async def get(self, key: str) -> Any:
                entry = await kv.get(key)
                await kv.put(key, theirs.encode())
                return entry

            async def delete(self, key: str, last: int | None = None) -> bool:
                return bool(await kv.delete(key, last=last))

        withdrawn = await FunctionRegistry(WrittenOverAfterTheRead()).withdraw(ours)  # type: ignore[arg-type]
        left = await registry.get("echo")
    finally:
        await nc.close()

    assert withdrawn is False
    assert left == theirs
