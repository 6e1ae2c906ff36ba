"""Idempotency-Key (SPEC §2): the same key to the same function, through either dialect, returns the
first request instead of queueing again; the same key on another function is a new request."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import httpx
import nats
import pytest
from nats.js.errors import KeyNotFoundError

from jetspool.domain import names
from jetspool.domain.messages import QueuedRequest, encode
from jetspool.domain.status import utcnow
from jetspool.embedded import EmbeddedNats
from jetspool.jetstream import ridethrough
from jetspool.jetstream.connection import connect
from jetspool.settings import NatsSettings
from tests.support.permissions import PASSWORD, as_user, users
from tests.support.servers import eventually_true, free_port
from tests.support.stack import Worker, start_stack

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.stack import Stack

_DUPLICATE_WINDOW_S = 120.0
_SHORT_WINDOW_S = 1.0


async def test_the_same_key_returns_the_first_request_through_either_dialect(stack: Stack) -> None:
    await stack.register("echo")
    key = {"Idempotency-Key": "order-42"}

    first = await stack.client.post("/queue/echo", json={"n": 1}, headers=key)
    first_id = first.json()["request_id"]
    await stack.wait_for_status("echo", first_id)
    again = await stack.client.post("/queue/echo", json={"n": 2}, headers=key)
    openfaas = await stack.client.post("/async-function/echo", content=b"3", headers=key)

    assert again.status_code == 200
    assert again.json()["request_id"] == first_id
    assert openfaas.status_code == 202
    assert openfaas.headers["x-call-id"] == first_id
    assert [seen.body for seen in stack.functions.on("/echo")] == [b'{"n":1}']


async def test_concurrent_submits_with_one_key_make_one_request(stack: Stack) -> None:
    await stack.register("echo")

    responses = await asyncio.gather(
        *(stack.client.post("/queue/echo", json={}, headers={"Idempotency-Key": "burst"}) for _ in range(8))
    )

    assert len({r.json()["request_id"] for r in responses}) == 1


async def test_the_same_key_on_another_function_is_a_new_request(stack: Stack) -> None:
    await stack.register("one")
    await stack.register("two")
    key = {"Idempotency-Key": "shared"}

    first = (await stack.client.post("/queue/one", json={}, headers=key)).json()["request_id"]
    second = (await stack.client.post("/queue/two", json={}, headers=key)).json()["request_id"]

    assert first != second


async def test_a_repeat_returns_its_request_where_a_new_submit_would_be_refused(stack: Stack) -> None:
    """A repeat stands on the first submit: not refused by max_queue_length when the one request
    waiting is its own (a client retrying after a lost answer was told 429, nothing queued), nor
    by a callback URL refused now. A new key is refused as before, and changes nothing."""
    await stack.occupy()
    key = {"Idempotency-Key": "retry-me"}
    limit = {"max_queue_length": "1"}
    first = await stack.client.post("/queue/busy", params=limit, headers=key)
    first_id = first.json()["request_id"]

    full = await stack.client.post("/queue/busy", params=limit, headers=key)
    openfaas = await stack.client.post("/async-function/busy", params={"fal_max_queue_length": "1"}, headers=key)
    refused_hook = await stack.client.post(
        "/queue/busy", params={"fal_webhook": "http://169.254.169.254/"}, headers=key
    )
    new_key = await stack.client.post("/queue/busy", params=limit, headers={"Idempotency-Key": "another"})
    no_key = await stack.client.post("/queue/busy", params={"fal_webhook": "http://169.254.169.254/"})
    waiting = (await stack.client.get("/system/functions/busy")).json()["stats"]["waiting"]
    stack.functions.release("/busy")

    assert first.status_code == 200
    assert (full.status_code, full.json()["request_id"], full.headers["x-request-id"]) == (200, first_id, first_id)
    assert (openfaas.status_code, openfaas.headers["x-call-id"]) == (202, first_id)
    assert (refused_hook.status_code, refused_hook.json()["request_id"]) == (200, first_id)
    assert (new_key.status_code, no_key.status_code) == (429, 422)
    assert sum(waiting.values()) == 1


@pytest.mark.parametrize("key", ["", "k" * 257])
async def test_an_unusable_key_is_refused(stack: Stack, key: str) -> None:
    await stack.register("echo")

    response = await stack.client.post("/queue/echo", json={}, headers={"Idempotency-Key": key})

    assert response.status_code == 422
    assert "Idempotency-Key" in response.json()["detail"]


async def _submit_once_reconnected(client: httpx.AsyncClient, key: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """POST with `key`, again while the gateway is still reconnecting to NATS (5xx or no answer)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                response = await client.post("/queue/echo", json={"n": 2}, headers={"Idempotency-Key": key})
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code < 500:
                assert response.status_code == 200, response.text
                body: dict[str, Any] = response.json()
                return body
            await asyncio.sleep(0.1)


async def test_the_key_holds_after_a_nats_restart_and_past_the_duplicate_window(tmp_path: Path) -> None:
    """The key does not rest on JetStream's message-id window (two minutes). Rather than wait the
    window out (the test took 127 s), it shortens the queue stream's window to a second and checks
    that JetStream no longer knows the first request's message id, a publish with it being stored,
    not taken for a duplicate, before it repeats the key."""
    nats = EmbeddedNats(tmp_path / "nats", port=free_port())
    nats.start()
    stack = await start_stack(nats)
    try:
        await stack.register("echo")
        first = await stack.client.post("/queue/echo", json={"n": 1}, headers={"Idempotency-Key": "survivor"})
        first_id = first.json()["request_id"]
        await stack.wait_for_status("echo", first_id)

        nats.stop()
        nats.start()
        after_restart = await _submit_once_reconnected(stack.client, "survivor")
        conn = await connect(NatsSettings(url=nats.url), "test")
        try:
            queue = (await conn.js.stream_info(names.QUEUE_STREAM)).config
            window = queue.duplicate_window
            await conn.js.update_stream(replace(queue, duplicate_window=_SHORT_WINDOW_S))

            # nats-server fires its purge of message ids as the update begins and stores the new
            # window after, so the purge may read the old two minutes and sleep until they pass (CI
            # saw 30 s go by). Each further change of the window fires it again, now reading a
            # short one.
            windows = itertools.cycle((_SHORT_WINDOW_S + 0.5, _SHORT_WINDOW_S))

            async def forgotten() -> bool:  # on a subject no worker reads: the probe stays unread
                probe = names.queue_subject("probe", "normal")
                ack = await conn.js.publish(probe, b"", headers={names.NATS_MSG_ID: first_id})
                if ack.duplicate:
                    await conn.js.update_stream(replace(queue, duplicate_window=next(windows)))
                return not ack.duplicate

            await eventually_true(forgotten, timeout_s=30)
        finally:
            await conn.close()
        after_window = await _submit_once_reconnected(stack.client, "survivor")
    finally:
        await stack.close()
        nats.stop()

    assert window == _DUPLICATE_WINDOW_S
    assert after_restart["request_id"] == first_id
    assert after_window["request_id"] == first_id
    assert [seen.body for seen in stack.functions.on("/echo")] == [b'{"n":1}'], "queued once, run once"


async def test_a_key_whose_submit_died_before_its_status_runs_once(stack_without_worker: Stack) -> None:
    """A gateway killed between a keyed submit's message and its status record: a second submit
    with the key used to give up on the first after 2 s and queue a second request, and both ran
    (found by a fault probe). It now queues under the first id, which stores nothing twice."""
    stack = stack_without_worker
    await stack.register("echo")
    first_id = await _died_before_its_status(stack, "order-7")

    again = await stack.client.post("/queue/echo", content=b"second", headers={"Idempotency-Key": "order-7"})
    waiting = await _waiting(stack)
    await stack.start_worker()
    done = await stack.wait_for_status("echo", first_id)

    assert again.json()["request_id"] == first_id
    assert waiting == 1, "one message for the key"
    assert done["status"] == "COMPLETED"
    assert [call.body for call in stack.functions.on("/echo")] == [b"first"]


async def _died_before_its_status(stack: Stack, key: str, *, message_id: bool = True) -> str:
    """What a gateway killed between a keyed submit's message and its status record leaves: the
    key's claim and the message. Without a message id, as once JetStream's two-minute duplicate
    window is past: a repeat's message is not recognised as the same."""
    first_id = str(uuid.uuid4())
    first = QueuedRequest(
        request_id=first_id, function="echo", priority="normal", method="POST", body=b"first", submitted_at=utcnow()
    )
    async with await nats.connect(stack.nats.url) as nc:
        js = nc.jetstream()
        claims = await js.key_value(names.IDEMPOTENCY_BUCKET)
        await claims.create(names.idempotency_key("echo", key), f"{first_id} {time.time():.3f}".encode())
        headers = {names.NATS_MSG_ID: first_id} if message_id else None
        await js.publish(names.queue_subject("echo", "normal"), encode(first), headers=headers)
    return first_id


async def _stored(stack: Stack) -> int:
    """How many messages of echo the queue stream holds, waiting or running."""
    async with await nats.connect(stack.nats.url) as nc:
        subject = names.queue_subject("echo", "normal")
        info = await nc.jetstream().stream_info(names.QUEUE_STREAM, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def test_a_key_whose_submit_died_runs_once_when_repeated_past_the_duplicate_window(
    stack_without_worker: Stack,
) -> None:
    """Repeated once JetStream's duplicate window was past, the key's request had two messages, and
    two workers ran it side by side, each message as the first run (found by a review). A worker
    runs only the message its status record names, and drops the other."""
    stack = stack_without_worker
    await stack.register("echo", concurrency=1)
    first_id = await _died_before_its_status(stack, "order-9", message_id=False)
    again = await stack.client.post("/queue/echo", content=b"second", headers={"Idempotency-Key": "order-9"})
    both_stored = await _stored(stack)
    stack.functions.hold("/echo")
    await stack.start_worker()
    other = Worker(stack.settings)
    await other.start()
    try:
        await stack.functions.wait_for("/echo")

        async def one_left() -> bool:  # the running one; the other is dropped, not run beside it
            return await _stored(stack) == 1

        await eventually_true(one_left, timeout_s=10)
        stack.functions.release("/echo")
        done = await stack.wait_for_status("echo", first_id)
    finally:
        stack.functions.release("/echo", 2)
        await other.stop()

    assert again.json()["request_id"] == first_id
    assert both_stored == 2, "past the window, the repeat's message is stored too"
    assert (done["status"], done.get("error_type")) == ("COMPLETED", None)
    assert len(stack.functions.on("/echo")) == 1


async def test_a_repeat_of_a_key_whose_submit_died_is_not_refused_by_its_own_queue_length(
    stack_without_worker: Stack,
) -> None:
    """A repeat returns the first request even where a new submit would be refused now (README). A
    key whose submit died before its status record names an id with no status yet: a plain repeat
    queued under that id, but one with `max_queue_length` was refused 429 by the very request it
    repeats (found by a review)."""
    stack = stack_without_worker
    await stack.register("echo")
    first_id = await _died_before_its_status(stack, "order-8")

    refused = await stack.client.post(  # what it would queue must still pass every other check
        "/queue/echo",
        params={"max_queue_length": "1"},
        content=b"again",
        headers={"Idempotency-Key": "order-8", "X-Callback-Url": "http://169.254.169.254/"},
    )
    again = await stack.client.post(
        "/queue/echo", params={"max_queue_length": "1"}, content=b"again", headers={"Idempotency-Key": "order-8"}
    )

    assert again.status_code == 200, again.text
    assert again.json()["request_id"] == first_id
    assert await _stored(stack) == 1, "stored once"
    assert refused.status_code == 422, refused.text


async def _waiting(stack: Stack) -> int:
    figures = (await stack.client.get("/system/functions/echo")).json()["stats"]
    return int(sum(figures["waiting"].values()))


_QUEUE_DENIED = users("gateway", ["jetspool.queue.>"])
"""A NATS user whose queue messages the server drops: each publish of one times out."""


async def test_a_key_stays_with_its_request_when_storing_the_message_timed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a chaos run on a cluster: a queue write that timed out (its leader had lost its
    quorum) gave the key back, the write committed once the quorum returned, and the client's
    repeat with the key claimed it afresh and queued a second request: both ran. A write that
    timed out may still land, so the key now keeps naming the first request (a repeat queues under
    its id, which is stored once: see the test before)."""
    monkeypatch.setattr(ridethrough, "RIDE_THROUGH_S", 0.5)  # one publish's 5 s wait, not 30 s of repeats
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), extra_config=_QUEUE_DENIED)
    server.start()
    try:
        stack = await start_stack(server, worker=False, overrides=as_user("gateway"))
        try:
            await stack.register("echo")
            answer = await stack.client.post("/queue/echo", json={"n": 1}, headers={"Idempotency-Key": "timed-out"})
        finally:
            await stack.close()
        claim, stored = await _claim_and_stored(server.url, "timed-out", admin=True)
    finally:
        server.stop()

    assert answer.status_code == 503, answer.text
    assert "timeout" in answer.json()["detail"]
    assert stored == 0
    assert claim is not None, "the key still names the request"


async def test_a_key_is_given_back_when_its_message_was_refused(stack_without_worker: Stack) -> None:
    """A queue write JetStream refused stored nothing: the key is free for the client's next try,
    which makes a new request."""
    stack = stack_without_worker
    await stack.register("echo")
    async with await nats.connect(stack.nats.url) as nc:
        js = nc.jetstream()
        queue = (await js.stream_info(names.QUEUE_STREAM)).config
        await js.update_stream(replace(queue, max_msg_size=16))  # takes no request
        refused = await stack.client.post("/queue/echo", json={"n": 1}, headers={"Idempotency-Key": "refused"})
        claim, _ = await _claim_and_stored(stack.nats.url, "refused")
        await js.update_stream(queue)
    again = await stack.client.post("/queue/echo", json={"n": 2}, headers={"Idempotency-Key": "refused"})

    assert refused.status_code == 503, refused.text
    assert "message size exceeds maximum allowed" in refused.json()["detail"]
    assert claim is None, "the key was given back"
    assert again.status_code == 200, again.text
    assert await _waiting(stack) == 1


async def _claim_and_stored(url: str, key: str, *, admin: bool = False) -> tuple[bytes | None, int]:
    """The claim on `key` for echo (None when there is none), and how many messages the queue holds."""
    settings = NatsSettings(url=url, user="admin", password=PASSWORD) if admin else NatsSettings(url=url)
    conn = await connect(settings, "test")
    try:
        claims = await conn.js.key_value(names.IDEMPOTENCY_BUCKET)
        try:
            claim = (await claims.get(names.idempotency_key("echo", key))).value
        except KeyNotFoundError:
            claim = None
        stored = (await conn.js.stream_info(names.QUEUE_STREAM)).state.messages
    finally:
        await conn.close()
    return claim, stored
