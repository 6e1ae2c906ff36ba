"""A deadline for receiving a whole request, so slow clients cannot hold the gateway.

uvicorn bounds the time to send headers, but not the body: a client could trickle one byte a
minute. From the first read of the body, the rest must arrive within `gateway.receive_timeout`
seconds, or the request ends with 408. Once the body is complete, reads (Litestar's wait for
a disconnect during a stream) are not limited.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from litestar.enums import ScopeType

from jetspool.domain.errors import RequestTimeout

if TYPE_CHECKING:
    from collections.abc import Callable

    from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send


def receive_deadline(seconds: float) -> Callable[[ASGIApp], ASGIApp]:
    """Litestar middleware: 408 when a request's body takes longer than `seconds` to arrive."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def limited(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            loop = asyncio.get_running_loop()
            deadline: float | None = None
            complete = False

            async def receive_in_time() -> ReceiveMessage:
                nonlocal deadline, complete
                if complete:
                    return await receive()
                deadline = deadline or loop.time() + seconds
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise RequestTimeout(f"the request was not received within {seconds:g} s") from None
                complete = message["type"] != "http.request" or not message.get("more_body", False)
                return message

            await app(scope, receive_in_time, send)

        return limited

    return middleware
