"""Queueing a request's callbacks on their own stream, from wherever it completes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jetspool.domain import names
from jetspool.domain.messages import CallbackJob, QueuedRequest, encode

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext


class CallbackQueue:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def emit(self, request: QueuedRequest) -> None:
        """One job per callback target and run; message ids make a repeat within the duplicate window harmless."""
        run = f".retry{request.retry}" if request.retry else ""
        for kind, url in request.callbacks():
            job = CallbackJob(request_id=request.request_id, function=request.function, kind=kind, url=url)
            await self._js.publish(
                names.callback_subject(kind),
                encode(job),
                headers={names.NATS_MSG_ID: f"{request.request_id}.{kind}{run}"},
            )
