"""The janitor over more objects than nats-server lists in one answer (100,000): a paged listing of
the metas skipped a live object's meta when another object went between two pages, and the live
object's chunks were purged as named by none (found by a review). Chunks are removed only on a
listing in one answer."""

from __future__ import annotations

import asyncio
import json
from base64 import urlsafe_b64encode
from typing import TYPE_CHECKING, Any

import pytest
from nats.js.api import ObjectStoreConfig, StorageType

from jetspool.domain import names
from jetspool.embedded import EmbeddedNats
from jetspool.jetstream.connection import connect
from jetspool.jetstream.retention import BlobJanitor
from jetspool.settings import NatsSettings
from tests.support.servers import eventually_true

if TYPE_CHECKING:
    from pathlib import Path

_BEFORE = 100_000  # nats-server lists 100,000 subjects per STREAM.INFO answer: the live one opens page two
_AFTER = 10
_GRACE_S = 1.0


def _meta_subject(name: str) -> str:
    return f"$O.{names.BLOB_STORE}.M.{urlsafe_b64encode(name.encode()).decode()}"


class _OneDeleteBetweenPages:
    """The janitor's connection; after the first page of the metas' listing, one object (a filler
    sorted before the live one) is deleted, as another worker's sweep or janitor does at any time."""

    def __init__(self, nc: Any, js: Any, gone: str) -> None:
        self._nc, self._js, self._gone, self.pages = nc, js, gone, 0

    async def request(self, subject: str, payload: bytes, timeout: float) -> Any:  # noqa: ASYNC109 - nats-py's
        reply = await self._nc.request(subject, payload, timeout=timeout)
        if b"$O.jetspool-blobs.M.>" in payload:
            self.pages += 1
            if self.pages == 1:
                await self._js.purge_stream(names.BLOB_STREAM, subject=self._gone)
        return reply


@pytest.mark.timeout(300)
async def test_a_live_objects_chunks_survive_a_delete_between_the_pages_of_the_metas(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", sync_interval="2m")  # quick to fill; nothing here is about fsync
    server.start()
    conn = await connect(NatsSettings(url=server.url), "test")
    try:
        await conn.js.create_key_value(bucket=names.STATUS_BUCKET)  # the janitor reads it
        store = await conn.js.create_object_store(names.BLOB_STORE, config=ObjectStoreConfig(storage=StorageType.FILE))
        # A live result, stored and named by its meta: nothing may remove its chunks.
        live = "result-00000000-0000-4000-8000-000000000000-1"
        await store.put(live, b"r" * 600_000)
        # Many other objects (metas only: what the janitor lists), all sorted before the live one
        # ("a-..." encodes as "YS0...", "result-..." as "cmVz...").
        fillers = [f"a-{i:07d}" for i in range(_BEFORE)] + [f"z-{i:07d}" for i in range(_AFTER)]
        for i, name in enumerate(fillers):
            info = {"name": name, "bucket": names.BLOB_STORE, "nuid": f"filler{i}", "size": 0, "chunks": 0}
            await conn.nc.publish(_meta_subject(name), json.dumps(info).encode())
        await conn.nc.flush()

        async def all_stored() -> bool:
            return (await conn.js.stream_info(names.BLOB_STREAM)).state.messages >= len(fillers) + 2

        await eventually_true(all_stored, timeout_s=60, interval_s=0.1)
        await asyncio.sleep(_GRACE_S + 0.2)  # the live object's last chunk is older than the grace

        janitor = BlobJanitor(conn, orphaned_after_s=_GRACE_S)
        hook = _OneDeleteBetweenPages(conn.nc, conn.js, _meta_subject("a-0000000"))
        janitor._nc = hook  # type: ignore[assignment]  # noqa: SLF001 - a concurrent delete, placed
        await janitor.clean()
        try:
            async with asyncio.timeout(10):
                left = (await store.get(live)).data
        except TimeoutError:
            left = None  # nats-py waits for chunks that are no more
    finally:
        await conn.close()
        server.stop()

    assert left == b"r" * 600_000, "the live object's chunks were purged"
