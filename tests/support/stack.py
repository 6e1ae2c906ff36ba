"""A whole jetspool on real parts: nats-server process, uvicorn gateway, in-process worker,
recording HTTP functions and a recording callback receiver."""

from __future__ import annotations

import asyncio
import contextlib
import io
import ssl
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from nats.js.errors import NotFoundError

from jetspool.domain import names
from jetspool.gateway.app import create_app
from jetspool.settings import Settings, validate
from jetspool.worker.main import run as run_worker
from tests.support.servers import AsgiServer, RecordingApp, loopback_socket

if TYPE_CHECKING:
    from pathlib import Path

    from litestar import Litestar

    from jetspool.cluster import LocalCluster
    from jetspool.embedded import EmbeddedNats
    from jetspool.jetstream.connection import Nats

_WAIT_S = 15.0


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def stack_settings(nats_url: str, gateway_port: int, overrides: dict[str, Any] | None = None) -> Settings:
    raw: dict[str, Any] = {
        "nats": {"url": nats_url, "accept_single_replica": True},  # a local test server, sync_interval always
        "gateway": {"port": gateway_port},
        "worker": {"ack_wait": 5.0, "poll_interval": 0.2, "shutdown_grace": 2.0},
        "retry": {"initial_backoff": 0.05, "max_backoff": 0.2},
        "callbacks": {"initial_backoff": 0.05, "max_backoff": 0.2},
    }
    return validate(_merge(raw, overrides or {}))


@dataclass
class Worker:
    settings: Settings
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ready = asyncio.Event()
        self.task = asyncio.create_task(run_worker(self.settings, self.stop_event, ready))
        ready_wait = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({self.task, ready_wait}, timeout=_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            ready_wait.cancel()
            self.task.result()
        if ready_wait not in done:
            ready_wait.cancel()
            raise TimeoutError("worker did not become ready")

    async def stop(self) -> None:
        self.stop_event.set()
        if self.task is None:
            return
        done, _ = await asyncio.wait({self.task}, timeout=_WAIT_S)
        if not done:
            _dump_tasks()
            self.task.cancel()
            raise TimeoutError("the worker did not stop")
        self.task.result()


def _dump_tasks() -> None:
    """Print where every task waits, to diagnose a hang."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(file=out)
    sys.stderr.write(out.getvalue())


@dataclass
class Stack:
    nats: EmbeddedNats | LocalCluster
    settings: Settings
    gateway: AsgiServer
    functions: RecordingApp
    function_server: AsgiServer
    receiver: RecordingApp
    receiver_server: AsgiServer
    client: httpx.AsyncClient
    app: Litestar
    worker: Worker | None = None
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def url(self) -> str:
        return self.gateway.url

    def function_url(self, path: str) -> str:
        return f"{self.function_server.url}{path}"

    def callback_url(self, path: str = "/callback") -> str:
        return f"{self.receiver_server.url}{path}"

    async def register(self, name: str, path: str | None = None, **fields: Any) -> dict[str, Any]:
        """Register function `name` served by the recording app at `path` (default `/<name>`)."""
        body = {"name": name, "url": self.function_url(path or f"/{name}"), **fields}
        response = await self.client.post("/system/functions", json=body)
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result

    async def submit(self, name: str, path: str = "", **kwargs: Any) -> str:
        """POST /async-function/<name>[/<path>]; returns the X-Call-Id."""
        url = f"/async-function/{name}" + (f"/{path}" if path else "")
        response = await self.client.post(url, **kwargs)
        assert response.status_code == 202, response.text
        return response.headers["x-call-id"]

    async def status(self, name: str, request_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/queue/{name}/requests/{request_id}/status")
        assert response.status_code in (200, 202), response.text
        result: dict[str, Any] = response.json()
        return result

    async def wait_for_status(
        self, name: str, request_id: str, status: str = "COMPLETED", timeout_s: float = _WAIT_S
    ) -> dict[str, Any]:
        """Poll the status route until the request reaches `status`."""
        async with asyncio.timeout(timeout_s):
            while True:
                current = await self.status(name, request_id)
                if current["status"] == status:
                    return current
                await asyncio.sleep(0.02)

    async def occupy(self, name: str = "busy") -> str:
        """Register `name` with concurrency 1 and hold its first request running; returns that request's id.

        Requests queued after it wait; `self.functions.release(f"/{name}")` lets held calls answer."""
        await self.register(name, concurrency=1)
        self.functions.hold(f"/{name}")
        response = await self.client.post(f"/queue/{name}", json={})
        assert response.status_code == 200, response.text
        request_id = str(response.json()["request_id"])
        await self.wait_for_status(name, request_id, "IN_PROGRESS")
        return request_id

    async def held_call(self, name: str, content: bytes) -> str:
        """Register `name`, submit `content` to it and hold the call; returns the request id once the
        worker's call has arrived (`self.functions.release(f"/{name}")` lets it answer)."""
        await self.register(name)
        self.functions.hold(f"/{name}")
        request_id = await self.submit(name, content=content)
        await self.functions.wait_for(f"/{name}")
        return request_id

    async def start_worker(self) -> Worker:
        worker = Worker(self.settings)
        await worker.start()
        self.worker = worker
        return worker

    async def close(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        await self.client.aclose()
        await self.gateway.stop()
        await self.function_server.stop()
        await self.receiver_server.stop()


async def start_stack(
    nats: EmbeddedNats | LocalCluster,
    *,
    worker: bool = True,
    overrides: dict[str, Any] | None = None,
    tls: tuple[Path, Path] | None = None,
) -> Stack:
    functions, receiver = RecordingApp(), RecordingApp(default=None)
    function_server, receiver_server = AsgiServer(functions), AsgiServer(receiver)
    # The gateway's own settings name its port, for the absolute URLs it hands out: bound first,
    # so that no other process takes the port before the gateway serves on it.
    sock = loopback_socket()
    servers, stack = [function_server, receiver_server], None
    try:
        await function_server.start()
        await receiver_server.start()
        port = int(sock.getsockname()[1])
        if tls is not None:
            overrides = _merge(overrides or {}, {"gateway": {"public_url": f"https://127.0.0.1:{port}"}})
        settings = stack_settings(nats.url, port, overrides)
        app = create_app(settings)
        gateway = AsgiServer(app, tls=tls, sock=sock)
        servers.append(gateway)
        await gateway.start()
        verify = ssl.create_default_context(cafile=str(tls[0])) if tls else True
        # The tests' own client goes straight to the gateway, whatever proxy the environment names.
        client = httpx.AsyncClient(base_url=gateway.url, timeout=_WAIT_S, verify=verify, trust_env=False)
        stack = Stack(nats, settings, gateway, functions, function_server, receiver, receiver_server, client, app)
        if worker:
            await stack.start_worker()
    except BaseException:  # a stack that did not start leaves no server behind
        sock.close()
        if stack is not None:
            await stack.close()
        else:
            for server in servers:
                await server.stop()
        raise
    return stack


async def has_object(conn: Nats, name: str) -> bool:
    """Whether the object store holds object `name`."""
    store = await conn.js.object_store(names.BLOB_STORE)
    try:
        await store.get_info(name)
    except NotFoundError:
        return False
    return True
