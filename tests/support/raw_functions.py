"""Functions served by a raw asyncio HTTP server, for answers uvicorn will not send: a byte that is
not UTF-8 in a header, a status no answer can carry, a body in a coding, an answer that trickles."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from tests.support.stack import Stack

    Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(stack: Stack, name: str, serve: Handler, **entry: Any) -> AsyncIterator[None]:
    """Register `name` (with the registry fields `entry`) served by the asyncio handler `serve`, each
    connection closed after it; every handler still running is stopped at the end."""
    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await serve(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        registered = {"name": name, "url": f"http://127.0.0.1:{port}/", **entry}
        assert (await stack.client.post("/system/functions", json=registered)).status_code == 201
        yield
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


@contextlib.asynccontextmanager
async def raw_function(stack: Stack, answer: bytes, name: str = "raw") -> AsyncIterator[list[bytes]]:
    """Register `name` (max_attempts 3, timeout 5 s) answering every request with the bytes
    `answer`; yields the request heads it received."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
        await reader.readexactly(int(lengths[0]) if lengths else 0)
        writer.write(answer)
        await writer.drain()

    async with raw_server(stack, name, serve, max_attempts=3, timeout=5):
        yield heads
