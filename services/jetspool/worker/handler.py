"""Handling one queue message, in named steps:

    decode → check (the request's current run? completed already? attempts left?) → mark
    started → invoke → classify → record result
    and status (keeping a failed request for the retry route) → emit callbacks → decide the
    acknowledgement

`handle` returns a `Settle`; `settle` is the one place a queue message is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import aiohttp
import orjson
from nats.errors import Error as NatsError
from opentelemetry.trace import SpanKind

from jetspool import logfmt, tracing
from jetspool.aio import run_to_end
from jetspool.domain import names
from jetspool.domain.errors import DecodeError, PermanentDelivery, RetryableDelivery
from jetspool.domain.functions import function_url
from jetspool.domain.messages import QueuedRequest, StoredResult, decode
from jetspool.domain.status import (
    ErrorType,
    StatusRecord,
    start_deadline_missed,
    start_deadline_passed_during,
    utcnow,
)
from jetspool.jetstream.logs import CLOSING_LINE
from jetspool.jetstream.stats import count, count_outcome, may_count_again
from jetspool.jetstream.status_store import StaleStatus, StatusStore, Versioned
from jetspool.worker.invoke import FunctionAnswer, invoke
from jetspool.worker.policy import SOONEST_S, backoff_s

if TYPE_CHECKING:
    from collections.abc import Callable

    from nats.aio.msg import Msg

    from jetspool.domain.functions import Function
    from jetspool.jetstream.callbacks import CallbackQueue
    from jetspool.jetstream.connection import Nats
    from jetspool.jetstream.events import EventLog
    from jetspool.jetstream.logs import RequestLogs
    from jetspool.jetstream.queue import RequestQueue
    from jetspool.jetstream.registry import RegistryView
    from jetspool.jetstream.results import ResultStore
    from jetspool.jetstream.retention import Retention
    from jetspool.settings import RetrySettings, WorkerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Settle:
    """How a queue message is acknowledged once handled."""

    verb: Literal["ack", "nak", "term", "leave"]
    """`leave`: send nothing (see `RequestHandler._superseded`)."""
    delay_s: float | None = None


class Aborted(Exception):
    """The running call was aborted because the request was cancelled."""


@dataclass(slots=True)
class _Call:
    """A call this worker runs or is about to run, so a cancel signal can reach it at any moment."""

    task: asyncio.Task[FunctionAnswer] | None = None
    aborted: bool = False
    logs_url: str = ""
    record: Versioned | None = None
    """The status record as this worker last wrote it: the next write builds on it without a re-read."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once this delivery's handling of the request is over."""


_CANCELLED_RUNNING = "cancelled while running"
_SPARE_DELIVERIES = 20
"""Deliveries beyond max_attempts that never reached the function (hand-backs, errors) before giving up."""
_QUICK_HAND_BACKS = 5
_FIRST_HAND_BACK_S = 0.02
"""A run the retry route has not named yet goes back for 20, 40, ... 320 ms, then a poll interval
at a time (`_SPARE_DELIVERIES` of them), before it is dropped as never to be named."""


_CANCEL_TIMEOUT_S = 10.0
_HANDED_BACK = "the worker stopped before the function answered; another worker takes it"
_HAND_BACK_WRITE_S = 2.0
"""At most this long for a stopping worker's status write of a call it hands back."""
ACK = Settle("ack")
TERM = Settle("term")
HAND_BACK = Settle("nak", SOONEST_S)
"""A message given back unhandled (the worker is stopping), for another worker at once. nats-server
keeps a plain nak's "redeliver now" in memory only, so after a restart of the whole stack the
message waited out the ack wait (30 s); a nak with a delay is written to the consumer's state."""
LEAVE = Settle("leave")
_LAPSE_SHARE = 0.8
"""Of the ack wait: a hold not renewed for this long may have lapsed. It is renewed every third, so
one renewal missed (NATS away for a moment) is no lapse, two are."""


@dataclass
class Lease:
    """When JetStream last heard that this delivery's message is being worked on.

    JetStream redelivers a message when its ack wait passes without an acknowledgement or an
    in-progress signal. A delivery cut off that long (NATS away, or the process paused) may no
    longer be the only one: another worker may run the request now. A nak it sent then, which
    nats-server applies to the message whichever delivery it names, put a third delivery beside
    the one running: with two workers and a NATS outage longer than the ack wait, a request whose
    second attempt was answering 200 was completed as given up by the other worker, or had its
    third attempt run beside the second (found by a fault-injection audit)."""

    kept_at: float = field(default_factory=time.monotonic)
    lapsed: bool = False
    """Once not renewed in time, for good: a redelivery made then stays out there."""

    def renew(self, ack_wait_s: float) -> None:
        self.lapsed = self.may_have_lapsed(ack_wait_s)
        self.kept_at = time.monotonic()

    def may_have_lapsed(self, ack_wait_s: float) -> bool:
        return self.lapsed or time.monotonic() - self.kept_at > ack_wait_s * _LAPSE_SHARE


def _attempts_made(attempts: int, base: int) -> str:
    """How many attempts a run that gives up made: `max_attempts` counts per run (see the retry route)."""
    if base == 0:
        return _counted(attempts, "attempt")
    return f"{_counted(attempts - base, 'attempt')} of this run, {attempts} in all"


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _is_current_run(msg: Msg, request: QueuedRequest, record: StatusRecord) -> bool:
    """Whether `msg` is the message of the run the request's record names: by run and by sequence.

    The first run too is named by its sequence: a keyed submit repeated after its first died before
    the status record stores a second message under the same id once JetStream's duplicate window
    (two minutes) is past, and both ran, side by side (found by a review). Only records of earlier
    versions have no sequence."""
    if request.retry != record.retries:
        return False
    if record.queue_seq is None:
        return request.retry == 0
    return int(msg.metadata.sequence.stream) == record.queue_seq


def _unrecorded(msg: Msg, request: QueuedRequest) -> Versioned | None:
    """The record a first delivery of a derived-id request implies, without reading it.

    Nothing but a cancel or a start deadline writes such a request's record before a worker
    takes it; the worker's first write is then a create, which fails if one of them came first
    (see `_run`)."""
    if request.id_nonce is None or request.retry or int(msg.metadata.num_delivered) != 1:
        return None
    return Versioned(StatusRecord.waiting(request, int(msg.metadata.sequence.stream)), 0)


async def settle(msg: Msg, decision: Settle) -> None:
    """Acknowledge a queue, callback or timer message: the only place that does.

    An ack is sent without waiting for JetStream's confirmation (in the end-to-end bench, 481
    against 436 completions/s). Waiting would not change what a lost ack leads to: the message is
    redelivered after `ack_wait` either way. A redelivered request finds itself completed and only
    repeats what is safe to repeat (events, totals and callback jobs carry message ids); a
    redelivered callback job finds its delivery recorded in the status and is not sent again."""
    if decision.verb == "ack":
        await msg.ack()
    elif decision.verb == "nak":
        await msg.nak(delay=decision.delay_s)
    elif decision.verb == "term":
        await msg.term()


@dataclass(frozen=True, slots=True)
class Services:
    """What the handler talks to, built once by the worker's `main`."""

    conn: Nats
    status: StatusStore
    results: ResultStore
    queue: RequestQueue
    registry: RegistryView
    http: aiohttp.ClientSession
    """For calling functions (see `invoke`)."""
    callbacks: CallbackQueue
    logs: RequestLogs
    retention: Retention
    events: EventLog
    base_url: str
    """The gateway's public base URL, for the X-Logs-Url handed to functions."""


class RequestHandler:
    def __init__(self, services: Services, worker: WorkerSettings, retry: RetrySettings) -> None:
        self._s = services
        self._worker = worker
        self._retry = retry
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        self._running: dict[str, _Call] = {}
        self._held: dict[int, tuple[Msg, Lease]] = {}
        """The deliveries `keep_in_progress` keeps, by the id of their message."""

    async def handle(self, msg: Msg) -> Settle:
        try:
            request = decode(msg.data, QueuedRequest).identified(int(msg.metadata.sequence.stream))
        except DecodeError:
            log.exception("dropping an unreadable queue message on %s", msg.subject)
            return TERM
        logfmt.request_id.set(request.request_id)  # this task's log lines name the request
        with tracing.tracer.start_as_current_span(
            "jetspool.attempt",
            context=tracing.extract(msg.headers),
            kind=SpanKind.CONSUMER,
            attributes={"jetspool.request_id": request.request_id, "jetspool.function": request.function},
        ):
            return await self._handle(msg, request)

    def unexpected(self, msg: Msg) -> Settle:
        """How to hand back a message whose handling raised unexpectedly (the request's status could
        not be read, say): tried again, never dropped, since the request was accepted, and backing
        off as a failing function's attempts do, so an error that recurs on every delivery is tried
        (and logged) about once a `retry.max_backoff`, not once a poll interval."""
        return Settle("nak", backoff_s(int(msg.metadata.num_delivered), self._retry, None, self._rng))

    async def _handle(self, msg: Msg, request: QueuedRequest) -> Settle:
        function = self._s.registry.get(request.function)
        if function is None:
            log.warning("request %s: function %s is not registered; waiting", request.request_id, request.function)
            return Settle("nak", self._worker.poll_interval)
        running = self._running.get(request.request_id)
        if running is not None:
            # This worker runs the request already, from an earlier delivery of this same message:
            # JetStream redelivered it because NATS was away longer than the ack wait. No second
            # call beside the first; once the first is over, this delivery reads where it stands.
            await running.done.wait()
        current = _unrecorded(msg, request) or await self._current(msg, request)
        if current is None or not _is_current_run(msg, request, current.record):
            return self._not_current(msg, request, current)
        return await self._run(msg, request, function, current)

    def _not_current(self, msg: Msg, request: QueuedRequest, current: Versioned | None) -> Settle:
        """A message that is not the request's current run: wait for the retry route to name it, or drop it.

        The route names its run a write after queueing it, so the first hand-backs are short: a
        hand-back of a whole poll interval (1 s) made a retried run wait that long with its function
        idle, and one with a start deadline of a second time out unstarted (found by an audit)."""
        named_soon = current is not None and request.retry > current.record.retries
        delivered = int(msg.metadata.num_delivered)
        if named_soon and delivered <= _QUICK_HAND_BACKS + _SPARE_DELIVERIES:
            quick = _FIRST_HAND_BACK_S * 2 ** (delivered - 1) if delivered <= _QUICK_HAND_BACKS else math.inf
            return Settle("nak", min(quick, self._worker.poll_interval))
        log.info(
            "request %s: dropping message %s (run %d), not the one its status names",
            request.request_id,
            msg.metadata.sequence.stream,
            request.retry,
        )
        return ACK

    async def _current(self, msg: Msg, request: QueuedRequest) -> Versioned | None:
        """The request's status record; created here when the gateway has not stored it yet.

        None for a run of the retry route whose request is gone.
        """
        current = await self._s.status.get(request.request_id)
        if current is None and request.retry:
            return None
        while current is None:
            record = StatusRecord.waiting(request, int(msg.metadata.sequence.stream))
            try:
                return Versioned(record, await self._s.status.create(record))
            except StaleStatus:
                current = await self._s.status.get(request.request_id)
        return current

    async def _run(self, msg: Msg, request: QueuedRequest, function: Function, current: Versioned) -> Settle:
        if current.record.is_completed:  # a crash may have come between completion and what follows it
            return await self._completed(request, function, current.record)
        per_run = 1 if request.no_retry else function.max_attempts
        allowed = current.record.attempt_base + per_run
        attempt = current.record.attempts + 1
        if current.record.cancel_requested:
            # The worker that ran it never finished: it died or was cut off, and its call may still
            # run at the function. Told nothing, the function ran on to the end (found by a fault
            # audit): it gets the cancel_path POST the holder would have sent (SPEC §4).
            await self._complete(request, function, None, ErrorType.CANCELLED, _CANCELLED_RUNNING, current=current)
            await self._notify_cancel(function, request)
            return ACK
        if request.start_deadline is not None and utcnow() >= request.start_deadline:
            late = start_deadline_missed(current.record.attempts)
            await self._complete(request, function, None, ErrorType.REQUEST_TIMEOUT, late, current=current)
            return ACK
        if attempt > allowed or int(msg.metadata.num_delivered) > per_run + _SPARE_DELIVERIES:
            gave_up = f"gave up after {_attempts_made(current.record.attempts, current.record.attempt_base)}"
            await self._complete(request, function, None, ErrorType.RUNNER_UNAVAILABLE, gave_up, current=current)
            return ACK
        call = _Call()
        self._running[request.request_id] = call  # before IN_PROGRESS shows: no cancel signal can be missed
        try:
            seen = current.record.attempts
            started = await self._transition(
                current,
                lambda r: r.started(attempt, utcnow()) if (r.retries, r.attempts) == (request.retry, seen) else None,
            )
            if started is None:
                return await self._superseded(request, function)
            call.record = started
            await self._s.events.publish(started.record)
            await self._s.logs.write(request.request_id, f"attempt {attempt} of {allowed} started")
            call.logs_url = self._logs_url(started.record)
            return await self._attempt(msg, request, function, call=call, attempt=attempt, allowed=allowed)
        finally:
            self._running.pop(request.request_id, None)
            call.done.set()

    async def _handed_back(self, request: QueuedRequest, attempt: int, call: _Call) -> None:
        """Show a call cut by the worker's stop as waiting again. It showed IN_PROGRESS until another
        worker took it, for good should none run (found by an audit). Fenced on the attempt, as a
        retry's write is: should another worker have started it meanwhile, nothing changes. A write
        that fails or is slow is let go: the next start overwrites it anyway."""
        try:
            async with asyncio.timeout(_HAND_BACK_WRITE_S):
                requeued = await self._update(request, attempt, lambda r: r.requeued(_HANDED_BACK), call.record)
                if requeued is not None:
                    await self._s.events.publish(requeued.record)
                    await self._s.logs.write(request.request_id, f"attempt {attempt}: {_HANDED_BACK}", level="WARN")
        except Exception:  # whatever failed, the message is still handed back at once, not with a backoff
            log.warning(
                "request %s: could not show it waiting again; it is handed back", request.request_id, exc_info=True
            )

    async def _completed(self, request: QueuedRequest, function: Function, record: StatusRecord) -> Settle:
        """Done with a completed request, after repeating what follows a completion (each step
        carries a message id or is idempotent: a crash may have come between them)."""
        if record.error_type is not None:
            await self._s.retention.keep_for_retry(request, function.result_ttl)
        else:  # a worker stopped before it deleted the body kept it for good (found by a review)
            await self._s.retention.release_body(request)
        await self._s.events.publish(record)
        if may_count_again(record.completed_at):
            await count_outcome(self._s.conn, record)
        await self._s.callbacks.emit(record)
        return ACK

    async def _superseded(self, request: QueuedRequest, function: Function) -> Settle:
        """This delivery's attempt did not take, or no longer counts: another attempt moved the
        record on. Done with a request completed meanwhile. Otherwise another delivery of the
        message owns the request, and this one is left alone: nats-server takes an ack or nak sent
        for an earlier delivery as one for the message, so an ack would delete the message under
        the attempt that holds it (lost, should that worker crash), and a nak would redeliver it
        beside that attempt. Left alone, it comes back after the ack wait only if no one settles it."""
        latest = await self._s.status.get(request.request_id)
        if latest is None:
            return ACK
        if latest.record.is_completed:
            return await self._completed(request, function, latest.record)
        log.info("request %s: another attempt owns it; leaving this delivery alone", request.request_id)
        return LEAVE

    async def _attempt(
        self, msg: Msg, request: QueuedRequest, function: Function, *, call: _Call, attempt: int, allowed: int
    ) -> Settle:
        """One invocation and its outcome: retry later, or complete."""
        began = time.monotonic()
        try:
            answer = await self._invoke(function, request, call, attempt)
        except asyncio.CancelledError:  # the worker is stopping and hands the message back
            await run_to_end(self._handed_back(request, attempt, call))  # before the nak: events in order
            raise
        except RetryableDelivery as exc:
            ran_s = time.monotonic() - began
            retried = await self._after_retryable(
                request, function, exc, call=call, attempt=attempt, allowed=allowed, ran_s=ran_s
            )
            if isinstance(retried, Settle):
                return retried
            recorded = await self._complete(
                request, function, None, *retried, attempt=attempt, current=call.record, ran_s=ran_s
            )
        except PermanentDelivery as exc:
            failure, ran_s = ErrorType(exc.error_type), time.monotonic() - began
            recorded = await self._complete(
                request, function, None, failure, str(exc), attempt=attempt, current=call.record, ran_s=ran_s
            )
        except Aborted:
            ran_s = time.monotonic() - began
            recorded = await self._complete(
                request,
                function,
                None,
                ErrorType.CANCELLED,
                _CANCELLED_RUNNING,
                attempt=attempt,
                current=call.record,
                ran_s=ran_s,
            )
            await self._notify_cancel(function, request)  # after: a slow cancel_path delays no one's answer
        else:
            error_type = None if 200 <= answer.status_code < 300 else ErrorType.FUNCTION_ERROR  # noqa: PLR2004
            error = None if error_type is None else f"function {answer.invalid or f'answered {answer.status_code}'}"
            recorded = await self._complete(
                request, function, answer, error_type, error, attempt=attempt, current=call.record
            )
        return ACK if recorded else await self._superseded(request, function)

    async def _after_retryable(
        self,
        request: QueuedRequest,
        function: Function,
        exc: RetryableDelivery,
        *,
        call: _Call,
        attempt: int,
        allowed: int,
        ran_s: float,
    ) -> Settle | tuple[ErrorType, str]:
        """After an attempt that failed in a way that is retried: the request re-queued (its
        settlement), or the outcome it completes with."""
        base = call.record.record.attempt_base if call.record else 0  # each run counts and backs off afresh
        if request.start_deadline is not None and utcnow() >= request.start_deadline and not call.aborted:
            # No retry may start: re-queued, it waited out its backoff, up to 10 minutes with a
            # Retry-After, before it completed so (found by an audit). A cancel that came meanwhile
            # is taken below, as without a deadline.
            return ErrorType.REQUEST_TIMEOUT, start_deadline_passed_during(attempt, exc)
        if attempt >= allowed:
            return ErrorType.RUNNER_UNAVAILABLE, f"gave up after {_attempts_made(attempt, base)}: {exc}"
        reason = str(exc)
        delay = backoff_s(attempt - base, self._retry, exc.retry_after_s, self._rng)
        cancel_requested = False

        def requeue(record: StatusRecord) -> StatusRecord | None:
            # A cancel that came as the function answered: no retry. Requeued over it, the
            # request showed IN_QUEUE until its backoff ended, up to 10 minutes with a
            # Retry-After (found by a race review).
            nonlocal cancel_requested
            cancel_requested = record.cancel_requested
            return None if cancel_requested else record.requeued(reason, ran_s)

        requeued = await self._update(request, attempt, requeue, call.record)
        if requeued is not None:
            retrying = f"attempt {attempt}: {reason}; retrying in {delay:.1f} s"
            log.info("request %s %s", request.request_id, retrying)
            await self._s.logs.write(request.request_id, retrying, level="WARN")
            await self._s.events.publish(requeued.record)
            await count(self._s.conn, request.function, "retried")
            return Settle("nak", delay)
        if not cancel_requested:
            return await self._superseded(request, function)
        return ErrorType.CANCELLED, _CANCELLED_RUNNING

    async def _invoke(self, function: Function, request: QueuedRequest, call: _Call, attempt: int) -> FunctionAnswer:
        """Invoke the function; a cancel signal aborts the call (`Aborted`)."""
        body = await self._s.queue.load_body(request)
        call.task = asyncio.create_task(
            invoke(self._s.http, function, request, body, attempt=attempt, logs_url=call.logs_url)
        )
        if call.aborted:
            call.task.cancel()
        try:
            return await call.task
        except asyncio.CancelledError:
            this = asyncio.current_task()
            if this is not None and this.cancelling():
                raise  # the worker is stopping: hand the message back
            raise Aborted from None

    async def on_cancel(self, msg: Msg) -> None:
        """A `jetspool.cancel.<function>` signal: abort the call if this worker runs it."""
        request_id = msg.data.decode(errors="replace")
        if self.abort(request_id):
            with logfmt.about(request_id):
                log.info("aborting %s: cancelled while running", request_id)

    def _logs_url(self, record: StatusRecord) -> str:
        prefix = f"{self._s.base_url}/queue/{record.function}/requests/{record.request_id}"
        return f"{prefix}/logs?token={record.logs_token}"

    def abort(self, request_id: str) -> bool:
        """Abort the running call of `request_id`, if this worker holds it."""
        call = self._running.get(request_id)
        if call is None:
            return False
        call.aborted = True
        if call.task is not None:
            call.task.cancel()
        return True

    async def _notify_cancel(self, function: Function, request: QueuedRequest) -> None:
        """POST `{"request_id"}` to the function's cancel_path, if it has one; failures are only logged."""
        if function.cancel_path is None:
            return
        try:
            async with self._s.http.post(
                function_url(function, function.cancel_path),
                data=orjson.dumps({"request_id": request.request_id}),
                headers={"Content-Type": "application/json", names.H_CALL_ID: request.request_id, **function.headers},
                timeout=aiohttp.ClientTimeout(total=_CANCEL_TIMEOUT_S),
            ) as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("cancel_path of %s failed for %s: %s", function.name, request.request_id, exc)

    async def keep_in_progress(self, msg: Msg, lease: Lease) -> None:
        """Tell JetStream, every third of the ack wait, that `msg` is being worked on (until cancelled).

        The runner keeps every message so from receipt to acknowledgement, not only during the
        call: loading a large body from the object store, or a status write riding through a
        leader election, may outlast the ack wait too, and a redelivery then would start a second
        attempt beside the first. `lease` notes each signal sent while connected (one sent while
        NATS is away waits in nats-py's buffer, and may come after the redelivery). After an
        outage, `renew_held` sends the signal at once."""
        interval = self._worker.ack_wait / 3
        self._held[id(msg)] = (msg, lease)
        try:
            while True:
                await asyncio.sleep(interval)
                if self._s.conn.nc.is_connected:
                    await self._renew(msg, lease)
        finally:
            del self._held[id(msg)]

    async def renew_held(self) -> None:
        """Once NATS is back, tell it at once that every message held is still being worked on.

        Each keeper skips its turns while NATS is away, and its next turn may come up to a third of
        the ack wait after the reconnection: a nats-server restarted meanwhile counted the ack wait
        from the last signal it had, redelivered the message when it ran out, and another worker
        started a second attempt beside the running one, after an outage shorter than the ack wait
        (found by a fault audit). A delivery held here is in `_held` until its keeper stops, before
        its settlement, so no signal goes out after an ack or a nak."""
        for key in list(self._held):
            held = self._held.get(key)
            if held is not None:
                await self._renew(*held)

    async def abort_cancelled(self) -> None:
        """Abort the calls whose request was marked cancelled while NATS was away: the cancel signal
        is a core NATS message, lost to a worker that was not connected then, and the call ran on to
        its end (a race review's finding)."""
        for request_id in list(self._running):
            try:
                current = await self._s.status.get(request_id)
            except (NatsError, TimeoutError):
                log.warning("could not read whether %s was cancelled meanwhile", request_id, exc_info=True)
                continue
            if current is not None and current.record.cancel_requested and self.abort(request_id):
                log.info("aborting %s: cancelled while NATS was away", request_id)

    async def _renew(self, msg: Msg, lease: Lease) -> None:
        try:
            await msg.in_progress()
        except Exception:
            log.warning("in-progress ack failed for %s", msg.subject, exc_info=True)
        else:
            lease.renew(self._worker.ack_wait)

    def settlement(self, msg: Msg, decision: Settle, lease: Lease) -> Settle:
        """`decision`, unless it is a nak from a delivery whose hold may have lapsed: then nothing is
        sent, and the message comes back after the ack wait, if it is not with another worker already."""
        if decision.verb == "nak" and lease.may_have_lapsed(self._worker.ack_wait):
            log.info("%s was not kept within its ack wait; leaving it to its redelivery", msg.subject)
            return LEAVE
        return decision

    async def _complete(
        self,
        request: QueuedRequest,
        function: Function,
        answer: FunctionAnswer | None,
        error_type: ErrorType | None,
        error: str | None,
        *,
        attempt: int | None = None,
        current: Versioned | None = None,
        ran_s: float | None = None,
    ) -> bool:
        """Record the final outcome of `attempt` (None: of no attempt): result, then status, then
        callbacks. False when it was not recorded: the request completed, or a newer attempt owns it.

        The result is stored under its attempt, and the status only completes while that attempt
        is still the latest: a stale worker's late answer can never replace a newer outcome. A
        failed request is kept for the retry route first; a successful one's out-of-line body goes.
        `current`: the record as this worker last read or wrote it, if it has it (saves a read).
        `ran_s`: how long the final attempt ran, when it ended without an answer to keep.
        """
        if error_type is not None:
            await self._s.retention.keep_for_retry(request, function.result_ttl)
        inline: StoredResult | None = None  # a small answer goes in the completed record: one write
        if answer is not None and attempt is not None:
            stored = StoredResult(
                status_code=answer.status_code,
                content_type=answer.content_type,
                body=answer.body,
                headers=answer.headers,
            )
            inline = await self._s.results.keep(request.request_id, attempt, stored, function.result_ttl)

        def complete(record: StatusRecord) -> StatusRecord | None:
            if attempt is not None and record.attempts != attempt:
                return None  # a newer attempt owns the record
            return record.completed(
                utcnow(),
                keep_s=function.result_ttl,
                function_status=None if answer is None else answer.status_code,
                inference_time=ran_s if answer is None else answer.duration_s,
                error=error,
                error_type=error_type,
                result=inline,
            )

        # The closing log line is stored before the completion: written after it, a status stream
        # with ?logs=1 sent its final event, and ended, without it about half the time (found by a
        # SPEC audit). Published first without waiting, it could still be stored second, each
        # stream storing in its own goroutine (found by a test audit).
        outcome = "succeeded" if error_type is None else f"failed: {error}"
        await self._s.logs.write(
            request.request_id, f"{CLOSING_LINE}{outcome}", level="INFO" if error_type is None else "ERROR", acked=True
        )
        completed = await self._update(request, attempt, complete, current)
        if completed is None:
            which = "outcome" if attempt is None else f"outcome of attempt {attempt}"
            dropped = f"{which} dropped; the request completed or moved on meanwhile"
            log.info("request %s: %s", request.request_id, dropped)
            await self._s.logs.write(request.request_id, dropped, level="WARN")
            return False
        await count_outcome(self._s.conn, completed.record)
        await self._s.events.publish(completed.record, None if answer is None else answer.body)
        # Independent of each other: one round trip of waiting, not two. Should the callback jobs
        # fail to store, the message is redelivered and finds the request completed (see `_run`).
        pending = [self._s.callbacks.emit(completed.record)]
        if error_type is None:
            pending.append(self._s.retention.release_body(request))
        await asyncio.gather(*pending)
        return True

    async def _update(
        self,
        request: QueuedRequest,
        attempt: int | None,
        change: Callable[[StatusRecord], StatusRecord | None],
        current: Versioned | None = None,
    ) -> Versioned | None:
        """Apply `change` to the record, but only while `request`'s run is its current run and
        `attempt` its latest attempt.

        The run too: the retry route starts a run where the last one stopped, with the same
        attempt count, so a worker paused through a cancel and a retry completed the new run with
        its old attempt's late answer, and the new run was never delivered (found by a race review).
        `current`: the record as last written by this worker; read afresh when not given. Either
        way the write is a compare-and-set, re-read and re-applied should the record have moved.
        """
        if current is None:
            current = await self._s.status.get(request.request_id)
        if current is None:
            return None

        def fenced(record: StatusRecord) -> StatusRecord | None:
            if record.retries != request.retry or (attempt is not None and record.attempts != attempt):
                return None
            return change(record)

        return await self._transition(current, fenced)

    async def _transition(
        self, current: Versioned, change: Callable[[StatusRecord], StatusRecord | None]
    ) -> Versioned | None:
        """Apply `change` by compare-and-set; None once the record is final or gone, or when `change` declines."""
        return await self._s.status.change(current, lambda r: None if r.is_completed else change(r))
