"""Handling one queue message, in named steps:

    decode → check (completed already? attempts left?) → mark started → invoke (keeping the
    message with in-progress acks) → classify → record result and status → emit callbacks
    → decide the acknowledgement

`handle` returns a `Settle`; `settle` is the one place a queue message is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from jetspool.aio import stop_task
from jetspool.domain import names
from jetspool.domain.errors import DecodeError, PermanentDelivery, RetryableDelivery
from jetspool.domain.messages import CallbackJob, QueuedRequest, StoredResult, decode, encode
from jetspool.domain.status import ErrorType, StatusRecord, utcnow
from jetspool.jetstream.status_store import StaleStatus, StatusStore, Versioned
from jetspool.worker.invoke import FunctionAnswer, invoke
from jetspool.worker.policy import backoff_s

if TYPE_CHECKING:
    from collections.abc import Callable

    import httpx
    from nats.aio.msg import Msg

    from jetspool.domain.functions import Function
    from jetspool.jetstream.connection import Nats
    from jetspool.jetstream.queue import RequestQueue
    from jetspool.jetstream.registry import RegistryView
    from jetspool.jetstream.results import ResultStore
    from jetspool.settings import RetrySettings, WorkerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Settle:
    """How a queue message is acknowledged once handled."""

    verb: Literal["ack", "nak", "term"]
    delay_s: float | None = None


ACK = Settle("ack")
TERM = Settle("term")


async def settle(msg: Msg, decision: Settle) -> None:
    """Acknowledge a queue message: the only place that does."""
    if decision.verb == "ack":
        await msg.ack_sync()
    elif decision.verb == "nak":
        await msg.nak(delay=decision.delay_s)
    else:
        await msg.term()


@dataclass(frozen=True, slots=True)
class Services:
    """What the handler talks to, built once by the worker's `main`."""

    conn: Nats
    status: StatusStore
    results: ResultStore
    queue: RequestQueue
    registry: RegistryView
    http: httpx.AsyncClient


class RequestHandler:
    def __init__(self, services: Services, worker: WorkerSettings, retry: RetrySettings) -> None:
        self._s = services
        self._worker = worker
        self._retry = retry
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography

    async def handle(self, msg: Msg) -> Settle:
        try:
            request = decode(msg.data, QueuedRequest)
        except DecodeError:
            log.exception("dropping an unreadable queue message on %s", msg.subject)
            return TERM
        function = self._s.registry.get(request.function)
        if function is None:
            log.warning("request %s: function %s is not registered; waiting", request.request_id, request.function)
            return Settle("nak", self._worker.poll_interval)
        current = await self._s.status.get(request.request_id)
        if current is None:
            log.warning("request %s has no status record (expired or removed); dropping it", request.request_id)
            return ACK
        return await self._run(msg, request, function, current)

    async def _run(self, msg: Msg, request: QueuedRequest, function: Function, current: Versioned) -> Settle:
        attempt = int(msg.metadata.num_delivered)
        allowed = 1 if request.no_retry else function.max_attempts
        if current.record.is_completed:
            await self._emit_callbacks(request)  # a crash may have come between completion and callbacks
            return ACK
        if attempt > allowed:
            await self._complete(
                request, function, None, ErrorType.RUNNER_UNAVAILABLE, f"gave up after {allowed} deliveries"
            )
            return ACK
        started = await self._transition(current, lambda r: r.started(attempt, utcnow()))
        if started is None:
            return ACK  # completed (e.g. cancelled) meanwhile
        try:
            answer = await self._invoke_keeping_message(msg, function, request, attempt)
        except RetryableDelivery as exc:
            if attempt < allowed:
                reason = str(exc)
                delay = backoff_s(attempt, self._retry, exc.retry_after_s, self._rng)
                log.info("request %s attempt %d: %s; retrying in %.1f s", request.request_id, attempt, reason, delay)
                await self._transition(started, lambda r: r.requeued(reason))
                return Settle("nak", delay)
            await self._complete(
                request, function, None, ErrorType.RUNNER_UNAVAILABLE, f"gave up after {attempt} attempts: {exc}"
            )
        except PermanentDelivery as exc:
            await self._complete(request, function, None, ErrorType(exc.error_type), str(exc))
        else:
            error_type = None if 200 <= answer.status_code < 300 else ErrorType.FUNCTION_ERROR  # noqa: PLR2004
            error = None if error_type is None else f"function answered {answer.status_code}"
            await self._complete(request, function, answer, error_type, error)
        return ACK

    async def _invoke_keeping_message(
        self, msg: Msg, function: Function, request: QueuedRequest, attempt: int
    ) -> FunctionAnswer:
        """Invoke the function while telling JetStream, every third of the ack wait, that the work goes on."""
        body = await self._s.queue.load_body(request)
        keeper = asyncio.create_task(self._keep_in_progress(msg), name=f"in-progress-{request.request_id}")
        try:
            return await invoke(self._s.http, function, request, body, attempt)
        finally:
            await stop_task(keeper)

    async def _keep_in_progress(self, msg: Msg) -> None:
        interval = self._worker.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception:
                log.warning("in-progress ack failed for %s", msg.subject, exc_info=True)

    async def _complete(
        self,
        request: QueuedRequest,
        function: Function,
        answer: FunctionAnswer | None,
        error_type: ErrorType | None,
        error: str | None,
    ) -> None:
        """Record the final outcome: result first, then status (with its TTL), then counters and callbacks."""
        if answer is not None:
            stored = StoredResult(status_code=answer.status_code, content_type=answer.content_type, body=answer.body)
            await self._s.results.put(request.request_id, stored, function.result_ttl)
        current = await self._s.status.get(request.request_id)
        if current is None:
            return

        def complete(record: StatusRecord) -> StatusRecord:
            return record.completed(
                utcnow(),
                function_status=None if answer is None else answer.status_code,
                inference_time=None if answer is None else answer.duration_s,
                error=error,
                error_type=error_type,
            )

        done = await self._transition(current, complete, ttl_s=function.result_ttl)
        if done is None:
            return
        counter = "completed" if error_type is None else "failed"
        await self._s.conn.nc.publish(
            names.counter_subject(request.function, counter), b"", headers={names.NATS_INCR: "+1"}
        )
        await self._emit_callbacks(request)

    async def _transition(
        self,
        current: Versioned,
        change: Callable[[StatusRecord], StatusRecord],
        ttl_s: float | None = None,
    ) -> Versioned | None:
        """Apply `change` with compare-and-set, re-reading on conflict; None once the record is final or gone."""
        while True:
            if current.record.is_completed:
                return None
            record = change(current.record)
            try:
                revision = await self._s.status.update(record, current.revision, ttl_s)
            except StaleStatus:
                reread = await self._s.status.get(record.request_id)
                if reread is None:
                    return None
                current = reread
                continue
            return Versioned(record, revision)

    async def _emit_callbacks(self, request: QueuedRequest) -> None:
        """Queue the request's callbacks on their own stream (message ids make a repeat harmless)."""
        for kind, url in request.callbacks():
            job = CallbackJob(request_id=request.request_id, function=request.function, kind=kind, url=url)
            await self._s.conn.js.publish(
                names.callback_subject(kind),
                encode(job),
                headers={names.NATS_MSG_ID: f"{request.request_id}.{kind}"},
            )
