"""What a process killed, or a submit refused, while storing leaves in the object store is removed
by the workers' `BlobJanitor`, and nothing a live request needs is (jetstream/retention.py).

The processes are killed for real; the janitor's passes are run by the test, with a grace of a
second instead of ten minutes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml
from nats.js.api import ObjectInfo

from jetspool.domain import names
from jetspool.domain.messages import QueuedRequest
from jetspool.domain.status import utcnow
from jetspool.jetstream.connection import connect
from jetspool.jetstream.provision import provision
from jetspool.jetstream.retention import BlobJanitor, body_meta
from jetspool.settings import NatsSettings
from tests.support.processes import JetspoolProcess, sigkill, start_part
from tests.support.servers import AsgiServer, RecordingApp, Reply, eventually_true, free_port, wait_until_ready
from tests.support.stack import has_object

if TYPE_CHECKING:
    from pathlib import Path

    from nats.js.client import JetStreamContext

    from jetspool.embedded import EmbeddedNats
    from jetspool.jetstream.connection import Nats
    from tests.support.stack import Stack

_BIG = bytes(range(256)) * (120 * 1024)  # 30 MiB, 240 chunks: out of line (above half the 8 MiB max payload)
_LARGE = b"b" * (5 * 1024 * 1024)  # out of line too, and quicker to store
_GRACE_S = 1.0


def _config(path: Path, function_url: str) -> Path:
    settings = {
        "worker": {"poll_interval": 0.2, "shutdown_grace": 1.0, "ack_wait": 1.5},
        "retry": {"initial_backoff": 0.05, "max_backoff": 0.2},
        "functions": [{"name": "echo", "url": function_url, "result_ttl": 60}],
    }
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


async def _janitor(conn: Nats) -> BlobJanitor:
    return BlobJanitor(conn, orphaned_after_s=_GRACE_S)


async def _subjects(js: JetStreamContext, which: str = ">") -> dict[str, int]:
    return dict((await js.stream_info(names.BLOB_STREAM, subjects_filter=which)).state.subjects or {})


async def _kill_once_uploading(js: JetStreamContext, process: JetspoolProcess, timeout_s: float = 30.0) -> int:
    """SIGKILL `process` as soon as the blob stream holds some chunks; the count seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = int((await js.stream_info(names.BLOB_STREAM)).state.messages)
        if seen > 0:
            sigkill(process)
            return seen
        await asyncio.sleep(0.002)
    raise TimeoutError("no upload seen")


async def _stale(js: JetStreamContext, subject: str) -> None:
    """Wait until the last message on `subject` is older than the janitor's grace."""
    last = await js.get_msg(names.BLOB_STREAM, subject=subject)
    assert last.time is not None
    await asyncio.sleep(max(0.0, _GRACE_S + 0.2 - (time.time() - last.time.timestamp())))


@pytest.mark.timeout(90)
async def test_the_chunks_of_a_result_upload_cut_by_a_worker_kill_are_removed(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    function_server = AsgiServer(RecordingApp(default=Reply(200, _BIG, "application/octet-stream")))
    await function_server.start()
    config = _config(tmp_path / "jetspool.yaml", f"{function_server.url}/echo")
    port = free_port()
    conn = await connect(NatsSettings(url=nats_server.url), "test")
    gateway = start_part("gateway", config, nats_server.url, port)
    worker = start_part("worker", config, nats_server.url)
    try:
        await wait_until_ready(f"http://127.0.0.1:{port}")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            request_id = (await client.post("/async-function/echo", content=b"small")).headers["x-call-id"]
            seen = await _kill_once_uploading(conn.js, worker)
            cut = set(await _subjects(conn.js, names.BLOB_CHUNK_SUBJECTS))
            worker = start_part("worker", config, nats_server.url)  # takes the request again after the ack wait

            async def completed() -> bool:
                status = await client.get(f"/queue/echo/requests/{request_id}/status")
                return status.status_code == 200 and status.json()["status"] == "COMPLETED"

            await eventually_true(completed, timeout_s=30)
            (orphan,) = cut
            await _stale(conn.js, orphan)
            janitor = await _janitor(conn)
            removed = await janitor.clean()
            again = await janitor.clean()
            chunks = await _subjects(conn.js, names.BLOB_CHUNK_SUBJECTS)
            result = await client.get(f"/queue/echo/requests/{request_id}")
    finally:
        worker.kill_tree()
        gateway.kill_tree()
        await conn.close()
        await function_server.stop()

    assert 0 < seen < 240, f"killed mid-upload ({seen} of 241 messages stored)"
    assert (removed, again) == (1, 0)
    assert orphan not in chunks, "the cut upload's chunks are removed"
    assert list(chunks.values()) == [240], "the finished result's chunks stay"
    assert (result.status_code, result.content == _BIG) == (200, True)


@pytest.mark.timeout(90)
async def test_the_chunks_of_a_body_upload_cut_by_a_gateway_kill_are_removed(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    function_server = AsgiServer(RecordingApp())
    await function_server.start()
    config = _config(tmp_path / "jetspool.yaml", f"{function_server.url}/echo")
    port = free_port()
    conn = await connect(NatsSettings(url=nats_server.url), "test")
    gateway = start_part("gateway", config, nats_server.url, port)
    try:
        await wait_until_ready(f"http://127.0.0.1:{port}")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            submit = asyncio.create_task(client.post("/async-function/echo", content=_BIG))
            seen = await _kill_once_uploading(conn.js, gateway)
            with pytest.raises(httpx.HTTPError):
                await submit  # not accepted: the client submits again
        (orphan,) = await _subjects(conn.js, names.BLOB_CHUNK_SUBJECTS)
        await _stale(conn.js, orphan)
        removed = await (await _janitor(conn)).clean()
        left = (await conn.js.stream_info(names.BLOB_STREAM)).state.messages
    finally:
        gateway.kill_tree()
        await conn.close()
        await function_server.stop()

    assert 0 < seen < 240, f"killed mid-upload ({seen} of 241 messages stored)"
    assert (removed, left) == (1, 0)


async def test_a_body_whose_request_was_refused_is_removed_and_no_waiting_requests_body_is(
    stack_without_worker: Stack, conn: Nats
) -> None:
    """Three large bodies: one of a waiting request, one of a waiting request without a status
    record (its gateway died between the publish and the status write), and one of a request the
    queue refused. Two janitors clean at once; the refused request's body goes, and both waiting
    requests run with theirs. An upload in progress keeps its chunks."""
    stack = stack_without_worker
    await stack.register("echo")
    waiting = await stack.submit("echo", content=_LARGE)
    unrecorded = await stack.submit("echo", content=_LARGE + b"2")
    await conn.js.purge_stream(f"KV_{names.STATUS_BUCKET}", subject=f"$KV.{names.STATUS_BUCKET}.{unrecorded}")
    queue = (await conn.js.stream_info(names.QUEUE_STREAM)).config
    await conn.js.update_stream(dataclasses.replace(queue, max_msg_size=64))  # every message refused
    refused = await stack.client.post("/async-function/echo", content=_LARGE + b"3")
    await conn.js.update_stream(queue)
    refused_body = names.body_object(_only_other(await _bodies(conn), waiting, unrecorded))
    assert await has_object(conn, refused_body)
    await asyncio.sleep(_GRACE_S + 0.2)
    in_progress = f"$O.{names.BLOB_STORE}.C.an-upload-in-progress"
    await conn.js.publish(in_progress, b"a chunk")

    removed = await asyncio.gather((await _janitor(conn)).clean(), (await _janitor(conn)).clean())

    assert refused.status_code == 503
    assert sum(removed) >= 1
    assert not await has_object(conn, refused_body)
    assert await has_object(conn, names.body_object(waiting))
    assert await has_object(conn, names.body_object(unrecorded))
    assert in_progress in await _subjects(conn.js, names.BLOB_CHUNK_SUBJECTS)
    await stack.start_worker()

    async def both_completed() -> bool:
        for request_id in (waiting, unrecorded):
            status = await stack.client.get(f"/queue/echo/requests/{request_id}/status")
            if status.status_code != 200 or status.json()["status"] != "COMPLETED":
                return False  # the unrecorded one is not found until a worker takes it
        return True

    await eventually_true(both_completed, timeout_s=30)
    assert sorted(len(seen.body) for seen in stack.functions.on("/echo")) == [len(_LARGE), len(_LARGE) + 1]


async def _bodies(conn: Nats) -> list[str]:
    """The request ids of the bodies in the object store."""
    store = await conn.js.object_store(names.BLOB_STORE)
    found = (names.request_of_body_object(info.name) for info in await store.list(ignore_deletes=True))
    return [request_id for request_id in found if request_id is not None]


def _only_other(request_ids: list[str], *known: str) -> str:
    (other,) = set(request_ids) - set(known)
    return other


async def test_the_janitor_goes_on_after_a_pass_that_failed(conn: Nats, caplog: pytest.LogCaptureFixture) -> None:
    """With no object store yet, its passes fail; they go on, and clean once there is one."""
    await conn.js.create_key_value(bucket=names.STATUS_BUCKET)  # the janitor reads it
    janitor = BlobJanitor(conn, every_s=0.1, orphaned_after_s=0.3)
    caplog.set_level(logging.WARNING, logger="jetspool.aio")
    await janitor.start()
    try:
        await eventually_true(_logged(caplog, "could not clean the object store"), timeout_s=5)
        await conn.js.create_object_store(names.BLOB_STORE)
        orphan = f"$O.{names.BLOB_STORE}.C.an-upload-cut-short"
        await conn.js.publish(orphan, b"a chunk")

        async def removed() -> bool:
            return orphan not in await _subjects(conn.js)

        await eventually_true(removed, timeout_s=5)
    finally:
        await janitor.stop()


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> Any:
    async def found() -> bool:
        return any(text in record.getMessage() for record in caplog.records)

    return found


def test_a_body_stored_again_under_its_name_keeps_the_earlier_queue_sequence() -> None:
    """An Idempotency-Key's repeat uploads the body again: the first submit's message, queued after
    the sequence its upload named, may be the request's, and the janitor must look from there."""
    request = QueuedRequest(request_id="0" * 36, function="echo", priority="high", submitted_at=utcnow())
    earlier = ObjectInfo(name="body", bucket=names.BLOB_STORE, nuid="n", headers={names.OBJ_QUEUED_AFTER: ["7"]})

    first = body_meta("body", request, 7, None)
    again = body_meta("body", request, 50, earlier)

    assert first.headers == {
        names.OBJ_FUNCTION: ["echo"],
        names.OBJ_PRIORITY: ["high"],
        names.OBJ_QUEUED_AFTER: ["7"],
    }
    assert again.headers is not None
    assert again.headers[names.OBJ_QUEUED_AFTER] == ["7"]


async def test_no_chunks_are_removed_while_a_meta_cannot_be_read(conn: Nats) -> None:
    """A meta the janitor cannot read may name any chunks: it was logged as left alone, and its
    chunks went all the same, as named by none (found by a review). Chunks wait for a pass that
    reads every meta."""
    await provision(conn, replicas=1)
    unnamed = f"$O.{names.BLOB_STORE}.C.an-upload-cut-short"
    await conn.js.publish(unnamed, b"a chunk")
    await conn.js.publish(f"$O.{names.BLOB_STORE}.M.bm90LWpzb24", b"not json")
    await _stale(conn.js, unnamed)
    janitor = await _janitor(conn)

    await janitor.clean()
    kept = unnamed in await _subjects(conn.js)
    await conn.js.purge_stream(names.BLOB_STREAM, subject=f"$O.{names.BLOB_STORE}.M.bm90LWpzb24")
    await janitor.clean()

    assert kept, "left while a meta could not be read"
    assert unnamed not in await _subjects(conn.js), "removed once every meta is read"
