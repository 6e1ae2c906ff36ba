"""The callback delivery loop: pull jobs from the callbacks stream, POST them, retry with backoff."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

import httpx

from jetspool.aio import stop_task
from jetspool.callbacks.payloads import build
from jetspool.domain import names
from jetspool.domain.errors import DecodeError
from jetspool.domain.messages import CallbackJob, decode
from jetspool.domain.status import utcnow
from jetspool.jetstream.pulling import ConnectionGone, fetch
from jetspool.settings import RetrySettings
from jetspool.worker.handler import Settle, settle
from jetspool.worker.policy import backoff_s, parse_retry_after

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

    from jetspool.jetstream.results import ResultStore
    from jetspool.jetstream.status_store import StatusStore
    from jetspool.settings import CallbackSettings

log = logging.getLogger(__name__)

_BATCH = 32
_FETCH_TIMEOUT_S = 2.0


class CallbackDelivery:
    def __init__(
        self,
        js: JetStreamContext,
        status: StatusStore,
        results: ResultStore,
        settings: CallbackSettings,
        http: httpx.AsyncClient,
    ) -> None:
        self._js = js
        self._status = status
        self._results = results
        self._settings = settings
        self._http = http
        self._backoff = _as_retry(settings)
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sub = await self._js.pull_subscribe_bind(names.CALLBACK_CONSUMER, stream=names.CALLBACK_STREAM)
        self._task = asyncio.create_task(self._loop(sub), name="callback-delivery")

    async def stop(self, grace_s: float) -> None:
        if self._task is not None:
            await stop_task(self._task)
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=grace_s)
            await asyncio.gather(*(stop_task(task) for task in pending))

    async def _loop(self, sub: JetStreamContext.PullSubscription) -> None:
        while True:
            free = _BATCH - len(self._inflight)
            if free <= 0:
                await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await fetch(sub, free, _FETCH_TIMEOUT_S, "callback")
            except ConnectionGone:
                return
            for msg in msgs:
                task = asyncio.create_task(self._deliver(msg))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _deliver(self, msg: Msg) -> None:
        try:
            decision = await self._attempt(msg)
        except asyncio.CancelledError:
            await asyncio.shield(settle(msg, Settle("nak")))
            raise
        except Exception:
            log.exception("callback delivery failed unexpectedly")
            decision = Settle("nak", self._settings.initial_backoff)
        await settle(msg, decision)

    async def _attempt(self, msg: Msg) -> Settle:
        try:
            job = decode(msg.data, CallbackJob)
        except DecodeError:
            log.exception("dropping an unreadable callback job")
            return Settle("term")
        current = await self._status.get(job.request_id)
        if current is None:
            log.warning("callback for %s: the request is gone; dropping it", job.request_id)
            return Settle("term")
        result = await self._results.get(job.request_id, current.record.attempts)
        request = build(job.kind, current.record, result)
        attempt = int(msg.metadata.num_delivered)
        retry_after: float | None = None
        try:
            response = await self._http.post(
                job.url, content=request.body, headers=request.headers, timeout=self._settings.timeout
            )
        except httpx.HTTPError as exc:
            reason = f"{exc.__class__.__name__}: {exc}"
        else:
            if 200 <= response.status_code < 300:  # noqa: PLR2004
                log.info("callback for %s delivered to %s", job.request_id, job.url)
                return Settle("ack")
            reason = f"receiver answered {response.status_code}"
            retry_after = parse_retry_after(response.headers.get(names.H_RETRY_AFTER), utcnow())
        if attempt >= self._settings.max_attempts:
            log.error("callback for %s to %s failed %d times, giving up: %s", job.request_id, job.url, attempt, reason)
            return Settle("term")
        delay = backoff_s(attempt, self._backoff, retry_after, self._rng)
        log.warning("callback for %s attempt %d: %s; retrying in %.0f s", job.request_id, attempt, reason, delay)
        return Settle("nak", delay)


def _as_retry(settings: CallbackSettings) -> RetrySettings:
    return RetrySettings(initial_backoff=settings.initial_backoff, max_backoff=settings.max_backoff)
