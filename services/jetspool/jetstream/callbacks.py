"""Queueing a request's callbacks on their own stream, from wherever it completes."""

from __future__ import annotations

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

    async def emit(self, record: StatusRecord, rounds: list[int] | None = None) -> None:
        """One job per callback target of the record's run, in the target's round, or the one
        `rounds` gives it (a redelivery's, in the order of `callbacks`).

        Message ids make a repeat within the duplicate window harmless: a run's outcome, or one
        round of redelivery, is delivered once.
        """
        run = f".retry{record.retries}" if record.retries else ""
        for target, in_round in zip(record.callbacks, rounds or [t.round for t in record.callbacks], strict=True):
            again = f".round{in_round}" if in_round else ""
            job = CallbackJob(
                request_id=record.request_id,
                function=record.function,
                kind=target.kind,
                url=target.url,
                run=record.retries,
                round=in_round,
            )
            subject, payload = names.callback_subject(target.kind), encode(job)
            headers = tracing.inject({names.NATS_MSG_ID: f"{record.request_id}.{target.kind}{run}{again}"})
            await ride_through(partial(self._js.publish, subject, payload, headers=headers), "callback enqueue")
