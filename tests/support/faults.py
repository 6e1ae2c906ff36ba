"""What the fault tests share: a counting function, bounded submit load, and the final check
that every accepted request completed with its own result."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from tests.support.servers import Receive, Scope, Send, eventually, eventually_true, read_body

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    import pytest

SUBMITTERS = 32


@dataclass
class CountingEcho:
    """A 20 ms function that answers each request's body back and counts calls per request id."""

    delay_s: float = 0.02
    calls: Counter[str] = field(default_factory=Counter)
    running: dict[str, int] = field(default_factory=dict)
    """Request id → the caller's TCP port, for each call under way."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        call_id = dict(scope["headers"]).get(b"x-call-id", b"").decode()
        self.calls[call_id] += 1
        self.running[call_id] = scope["client"][1]
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.running.pop(call_id, None)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})

    async def wait_for_calls(self, count: int) -> None:
        await eventually(lambda: sum(self.calls.values()) >= count, timeout_s=120)


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    """Show a figure of the run in the test output, captured or not."""
    with capsys.disabled():
        print(text)  # noqa: T201


async def submit_all(
    clients: Sequence[httpx.AsyncClient],
    count: int,
    on_accepted: Callable[[int], Awaitable[None]] | None = None,
    function: str = "echo",
    refused: list[str] | None = None,
) -> dict[str, bytes]:
    """Submit `count` requests in turn through `clients` (gateways) with bounded concurrency; the
    accepted ones (202), id → body. A submit not answered 202 (the gateway or NATS was down) was
    not accepted; why goes to `refused`."""
    accepted: dict[str, bytes] = {}
    gate = asyncio.Semaphore(SUBMITTERS)
    refused = [] if refused is None else refused

    async def one(n: int) -> None:
        body = f"request {n}".encode()
        async with gate:
            try:
                response = await clients[n % len(clients)].post(f"/async-function/{function}", content=body)
            except httpx.HTTPError as exc:
                refused.append(f"request {n}: {type(exc).__name__} {exc}")
                return
        if response.status_code != 202:
            refused.append(f"request {n}: {response.status_code} {response.text[:300]}")
        else:
            accepted[response.headers["x-call-id"]] = body
            if on_accepted is not None:
                await on_accepted(len(accepted))

    await asyncio.gather(*(one(n) for n in range(count)))
    return accepted


async def stats(client: httpx.AsyncClient, function: str = "echo") -> dict[str, Any]:
    figures: dict[str, Any] = (await client.get(f"/system/functions/{function}")).json()["stats"]
    return figures


async def check_every_result(
    client: httpx.AsyncClient, accepted: dict[str, bytes], timeout_s: float, function: str = "echo"
) -> None:
    """Every accepted request COMPLETED without error, its result its own body."""

    async def queue_empty() -> bool:
        try:
            figures = await stats(client, function)
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        return bool(sum(figures["waiting"].values()) == 0 and figures["in_progress"] == 0)

    try:
        await eventually_true(queue_empty, timeout_s=timeout_s, interval_s=0.5)
    except TimeoutError:
        states = Counter(
            [(await client.get(f"/queue/{function}/requests/{r}/status")).json()["status"] for r in accepted]
        )
        raise AssertionError(f"not all completed: {dict(states)}; stats {await stats(client)}") from None
    gate = asyncio.Semaphore(SUBMITTERS)

    async def check(request_id: str, body: bytes) -> None:
        async with gate:
            result = await client.get(f"/queue/{function}/requests/{request_id}")
        assert (result.status_code, result.content) == (200, body), f"{request_id}: {result.text[:200]}"

    await asyncio.gather(*(check(request_id, body) for request_id, body in accepted.items()))
