"""Jobs due at a given time: start deadlines and object sweeps, whether or not a worker is free.

Each is a job on the timers stream. This loop takes a job, and while it is not due gives it
back with a delayed nak, so JetStream itself holds it until then (durably: a restart loses none).

- A start deadline (`jetspool.timers.deadline`): a request still waiting completes as
  `request_timeout` and its message is deleted, so it is never delivered. Workers also check the
  deadline when they receive a request, for the case where the job could not be stored.
- A sweep (`jetspool.timers.sweep`): out-of-line bodies and results whose time is up are deleted
  from the object store (a body is kept when the request was retried since; see `retention`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Final

from nats.errors import Error as NatsError

from jetspool import logfmt
from jetspool.domain import names
from jetspool.domain.errors import DecodeError
from jetspool.domain.messages import DeadlineJob, SweepJob, decode
from jetspool.domain.status import utcnow
from jetspool.jetstream.pulling import ConnectionGone, fetch, stop_pulling
from jetspool.settings import RetrySettings
from jetspool.worker.handler import ACK, TERM, Settle, settle
from jetspool.worker.policy import backoff_s

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

    from jetspool.jetstream.cancel import Canceller
    from jetspool.jetstream.registry import RegistryView
    from jetspool.jetstream.results import ResultStore
    from jetspool.jetstream.retention import Retention
    from jetspool.jetstream.status_store import StatusStore

log = logging.getLogger(__name__)

_BATCH = 256
_FETCH_TIMEOUT_S = 1.0
_NAMED_RECHECK_S = 1.0
"""How soon a sweep due while a record still names its object looks again."""
_FAILED_BACKOFF: Final = RetrySettings(initial_backoff=1.0, multiplier=2.0, max_backoff=60.0, jitter=0.0)
"""How long a job whose handling failed waits before it is tried again: doubling, up to a minute."""
_NO_JITTER: Final = random.Random()  # noqa: S311 - `_FAILED_BACKOFF` has no jitter to draw


class Timers:
    def __init__(
        self,
        js: JetStreamContext,
        status: StatusStore,
        canceller: Canceller,
        registry: RegistryView,
        *,
        retention: Retention,
        results: ResultStore,
    ) -> None:
        self._js = js
        self._status = status
        self._canceller = canceller
        self._registry = registry
        self._retention = retention
        self._results = results
        self._task: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PullSubscription | None = None

    async def start(self) -> None:
        self._sub = await self._js.pull_subscribe_bind(names.TIMER_CONSUMER, stream=names.TIMER_STREAM)
        self._task = asyncio.create_task(self._loop(self._sub), name="timers")

    async def stop(self) -> None:
        await stop_pulling(self._task, self._sub)
        self._task = self._sub = None

    async def _loop(self, sub: JetStreamContext.PullSubscription) -> None:
        while True:
            try:
                msgs = await fetch(sub, _BATCH, _FETCH_TIMEOUT_S, "timer")
            except ConnectionGone:
                return
            for msg in msgs:
                try:
                    decision = await self._check(msg)
                except Exception:
                    # Any error ends this job's turn, not the loop: one that was not NATS's (a status
                    # record that cannot be read) ended the loop for good, and no start deadline fired
                    # on this worker again (found by a review). Tried again later, without a bound:
                    # a job's deliveries also count its turns before it is due.
                    log.exception("a timer job on %s failed; it is tried again", msg.subject)
                    delayed = backoff_s(int(msg.metadata.num_delivered), _FAILED_BACKOFF, None, _NO_JITTER)
                    decision = Settle("nak", delayed)
                try:
                    await settle(msg, decision)
                except NatsError:
                    log.warning("a timer job was not settled; JetStream will bring it back", exc_info=True)

    async def _check(self, msg: Msg) -> Settle:
        try:
            job: SweepJob | DeadlineJob = (
                decode(msg.data, SweepJob) if msg.subject == names.SWEEP_SUBJECT else decode(msg.data, DeadlineJob)
            )
        except DecodeError:
            log.exception("dropping an unreadable timer job on %s", msg.subject)
            return TERM
        remaining_s = (job.due_at - utcnow()).total_seconds()
        if remaining_s > 0:
            return Settle("nak", remaining_s)
        if isinstance(job, SweepJob):
            if await self._results.names_any(job.objects):
                return Settle("nak", _NAMED_RECHECK_S)
            await self._sweep(job)
        else:
            await self._expire(job)
        return ACK

    async def _sweep(self, job: SweepJob) -> None:
        if job.unless_retried_after is not None:
            current = await self._status.get(job.request_id)
            if current is not None and current.record.retries > job.unless_retried_after:
                return  # retried since: the new run owns the body, and keeps or deletes it
        await self._retention.delete(job.objects)

    async def _expire(self, job: DeadlineJob) -> None:
        current = await self._status.get(job.request_id)
        if current is None or current.record.retries != job.retry:
            return  # gone, or retried since: the new run has its own deadline
        with logfmt.about(job.request_id):
            if await self._canceller.expire(current, self._registry.get(job.function)):
                log.info("request %s passed its start deadline waiting", job.request_id)
