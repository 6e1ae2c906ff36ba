"""A batched direct get: many stored messages of a stream in one request, any replica answering."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg


async def direct_batch(nc: Client, stream: str, query: dict[str, Any], timeout_s: float) -> list[Msg]:
    """The messages a batched direct get `query` (`seq`, `batch`, optionally `next_by_subj`) finds
    on `stream`, oldest first; what came within `timeout_s` when the end of the batch does not."""
    inbox = nc.new_inbox()
    received: list[Msg] = []
    done = asyncio.Event()

    async def collect(msg: Msg) -> None:
        status = (msg.headers or {}).get("Status")
        if status is None:
            received.append(msg)
        else:  # 204 end of batch, or 404 none at all
            done.set()

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(query), reply=inbox)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await done.wait()
    finally:
        await sub.unsubscribe()
    return received
