"""Real HTTP servers on 127.0.0.1 free ports, served by uvicorn inside the test's event loop."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

_START_TIMEOUT_S = 10.0


async def read_body(receive: Receive) -> bytes:
    """The whole body of an ASGI HTTP request."""
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


_PORTS_PER_PROCESS = 1500
_LOWEST_PORT = 10000


def _port_block() -> Iterator[int]:
    """The ports `free_port` hands out in this test process, round and round from a random start.

    Below the kernel's range of ephemeral ports: a port found free there was taken by an outgoing
    connection before the server meant for it started (seen under `pytest -n 4`: "Address already
    in use"). Each xdist worker has a block of its own (up to as many workers as fit below the
    range; more share blocks). Where there is no room below the range, the kernel picks."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    blocks = (ephemeral_low - _LOWEST_PORT) // _PORTS_PER_PROCESS
    if blocks < 1:
        return iter(())
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    start = _LOWEST_PORT + (int(worker) if worker.isdigit() else 0) % blocks * _PORTS_PER_PROCESS
    offset = random.randrange(_PORTS_PER_PROCESS)  # noqa: S311 - spreads the ports of successive runs; no secret
    return (start + (offset + i) % _PORTS_PER_PROCESS for i in itertools.count())


_ports = _port_block()


def free_port() -> int:
    """A loopback port nothing listens on, for a server a test starts in another process."""
    for port in itertools.islice(_ports, _PORTS_PER_PROCESS):
        try:
            with loopback_socket(port):
                return port
        except OSError:
            continue
    with loopback_socket(0) as sock:  # every port of the block in use: let the kernel pick one
        return int(sock.getsockname()[1])


def loopback_socket(port: int = 0) -> socket.socket:
    """A TCP socket bound to 127.0.0.1:`port` (0: a free one), ready to hand to a server."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this; without it a response written in two parts waits
        # out the peer's delayed ACK (about 40 ms a request).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


class AsgiServer:
    """A real uvicorn server for `app` on a free loopback port."""

    def __init__(
        self, app: Any, port: int | None = None, tls: tuple[Path, Path] | None = None, sock: socket.socket | None = None
    ) -> None:
        """`app`: any ASGI application; `tls`: (cert, key) PEM files to serve HTTPS; `sock`: a bound
        socket to serve on (`loopback_socket`), for an app that must know its port before it exists."""
        self._sock = sock or loopback_socket(port or 0)
        self.port = int(self._sock.getsockname()[1])
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="auto",
            timeout_graceful_shutdown=2,
            # As `jetspool gateway` serves (75 s). uvicorn's default of 5 s is also httpx's idle
            # expiry: a test client could reuse a connection as the server closed it (ReadError).
            timeout_keep_alive=75,
            ssl_certfile=str(tls[0]) if tls else None,
            ssl_keyfile=str(tls[1]) if tls else None,
        )
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        async with asyncio.timeout(_START_TIMEOUT_S):
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                    raise RuntimeError("server stopped during start-up")
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            async with asyncio.timeout(_START_TIMEOUT_S):
                await self._task
        self._sock.close()


@dataclass(frozen=True)
class Seen:
    """One HTTP request as the server received it."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    at: float = field(default_factory=time.monotonic)
    """When it arrived (time.monotonic)."""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b'{"ok": true}'
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0


@dataclass
class RecordingApp:
    """An HTTP function (or callback receiver) that records every request and answers by script.

    `script(path, replies)` queues replies for a path, consumed in order; after them (or for an
    unscripted path) it answers `default`, or echoes the body back when `default` is None.
    """

    seen: list[Seen] = field(default_factory=list)
    default: Reply | None = None
    _scripts: dict[str, list[Reply]] = field(default_factory=dict)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _gates: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    in_flight: int = 0
    """Requests received and not yet answered."""
    most_in_flight: int = 0

    def hold(self, path: str) -> None:
        """Hold every request to `path` before it is answered, until `release(path)` lets it go."""
        self._gates[path] = asyncio.Semaphore(0)

    def release(self, path: str, count: int = 1) -> None:
        """Let `count` held requests to `path` be answered, in arrival order."""
        for _ in range(count):
            self._gates[path].release()

    def script(self, path: str, replies: list[Reply]) -> None:
        self._scripts.setdefault(path, []).extend(replies)

    def on(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    async def wait_for(self, path: str, count: int = 1, timeout_s: float = 10.0) -> list[Seen]:
        """Wait until `count` requests reached `path`; returns them."""
        async with asyncio.timeout(timeout_s):
            while len(self.on(path)) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.on(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        seen = Seen(scope["method"], scope["path"], scope["query_string"].decode("latin-1"), headers, body)
        self.seen.append(seen)
        self._arrived.set()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self._answer(seen, send)
        finally:
            self.in_flight -= 1

    async def _answer(self, seen: Seen, send: Send) -> None:
        gate = self._gates.get(seen.path)
        if gate is not None:
            await gate.acquire()
        reply = self._next_reply(seen)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        response_headers = [(b"content-type", reply.content_type.encode())] if reply.content_type else []
        response_headers += [(k.encode(), v.encode()) for k, v in reply.headers]
        await send({"type": "http.response.start", "status": reply.status, "headers": response_headers})
        await send({"type": "http.response.body", "body": reply.body})

    def _next_reply(self, seen: Seen) -> Reply:
        queued = self._scripts.get(seen.path)
        if queued:
            return queued.pop(0)
        if self.default is not None:
            return self.default
        content_type = seen.header("content-type") or "application/octet-stream"
        return Reply(200, seen.body, content_type)


async def eventually(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02) -> None:
    """Wait until `predicate()` holds, checking every `interval_s`; TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(interval_s)


async def eventually_true(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, interval_s: float = 0.05
) -> None:
    """Like `eventually`, for a check that has to ask a server."""
    async with asyncio.timeout(timeout_s):
        while True:
            if await check():
                return
            await asyncio.sleep(interval_s)


async def wait_until_ready(url: str, timeout_s: float = 30.0) -> None:
    """Wait until the gateway at `url` answers 200 on /readyz (it may not be listening yet)."""
    async with httpx.AsyncClient(base_url=url, timeout=1) as client:

        async def ready() -> bool:
            try:
                return (await client.get("/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually_true(ready, timeout_s=timeout_s, interval_s=0.1)
