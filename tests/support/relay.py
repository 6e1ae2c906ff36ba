"""A TCP relay a test can cut: one part loses NATS while the server, and every other part, stay up."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

from tests.support.servers import loopback_socket

_CHUNK = 64 * 1024


class Relay:
    """Relays connections from a loopback port to the server at `target` (a nats:// URL).

    `cut()` drops every connection through it and refuses new ones until `mend()`, as a broken
    network link would; the server behind it sees its clients go. Refused while it stops listening:
    a connection accepted and dropped at once was left half-open by nats-py's reconnection
    attempts, and its unclosed stream warned when collected."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 4222
        self._server: asyncio.Server | None = None
        self._listen_port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        sock = loopback_socket()
        self._listen_port = int(sock.getsockname()[1])
        self._server = await asyncio.start_server(self._relay, sock=sock)

    @property
    def url(self) -> str:
        assert self._listen_port, "start() first"
        return f"nats://127.0.0.1:{self._listen_port}"

    def cut(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections: they are refused
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()

    async def mend(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", self._listen_port)

    async def stop(self) -> None:
        server = self._server
        self.cut()
        if server is not None:
            await server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self._host, self._port)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer, upstream_writer}
        self._writers |= pair
        try:
            await asyncio.gather(_pump(reader, upstream_writer), _pump(upstream_reader, writer))
        finally:
            self._writers -= pair
            for end in pair:
                end.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either side goes; then close the other, as the link between them is gone."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
