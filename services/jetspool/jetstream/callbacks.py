"""Queueing a request's callbacks on their own stream, from wherever it completes."""

from __future__ import annotations

import uuid
from functools import partial
from typing import TYPE_CHECKING

from jetspool import tracing
from jetspool.domain import names
from jetspool.domain.messages import CallbackJob, encode
from jetspool.jetstream.ridethrough import ride_through

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    from jetspool.domain.status import StatusRecord


class CallbackQueue:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def emit(self, record: StatusRecord, *, again: bool = False) -> None:
        """One job per callback target of the record's run, in the target's round.

        Message ids make a repeat within the duplicate window harmless; `again` (a redelivery asked
        for) is never taken for a repeat: a part of the previous version, which knows no rounds,
        may have written the round back to one already used (found by an upgrade audit).
        """
        run = f".retry{record.retries}" if record.retries else ""
        nonce = f".again.{uuid.uuid4().hex}" if again else ""
        for target in record.callbacks:
            job = CallbackJob(
                request_id=record.request_id,
                function=record.function,
                kind=target.kind,
                url=target.url,
                run=record.retries,
                round=target.round,
                again=again,
            )
            subject, payload = names.callback_subject(target.kind), encode(job)
            headers = tracing.inject({names.NATS_MSG_ID: f"{record.request_id}.{target.kind}{run}{nonce}"})
            await ride_through(partial(self._js.publish, subject, payload, headers=headers), "callback enqueue")
