"""The callback delivery loop: pull jobs from the callbacks stream, POST them, retry with backoff.

The POSTs go through aiohttp, as the function calls do: httpx's pool cost the worker over a quarter
of its CPU when callbacks were due at 100/s (py-spy), most of it in assigning requests to
connections. Each attempt is recorded in the request's status object (`callbacks`: state, attempts, last
status, delivered time). The URL is checked again after resolution and the connection goes to
the checked address (`addresses.py`); the body is signed when a secret is set (`signing.py`).
A job of a run that was retried since is dropped: the new run calls back with its own outcome.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import aiohttp
import yarl
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from jetspool import logfmt, tracing
from jetspool.aio import stop_task
from jetspool.callbacks.addresses import AddressPolicy, Destination, RefusedAddress
from jetspool.callbacks.payloads import build
from jetspool.callbacks.signing import Signer
from jetspool.domain import names
from jetspool.domain.errors import DecodeError
from jetspool.domain.functions import as_utf8, outbound_tls, shown
from jetspool.domain.messages import CallbackJob, decode
from jetspool.domain.status import utcnow
from jetspool.jetstream.pulling import ConnectionGone, fetch, stop_pulling
from jetspool.jetstream.stats import count, may_count_again
from jetspool.settings import RetrySettings
from jetspool.worker.handler import ACK, HAND_BACK, TERM, Settle, settle
from jetspool.worker.invoke import body_payload
from jetspool.worker.policy import backoff_s, parse_retry_after

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

    from jetspool.domain.names import Counter
    from jetspool.domain.status import DeliveryState, StatusRecord
    from jetspool.jetstream.connection import Nats
    from jetspool.jetstream.results import ResultStore
    from jetspool.jetstream.status_store import StatusStore, Versioned
    from jetspool.settings import CallbackSettings

log = logging.getLogger(__name__)

_BATCH = 32
_FETCH_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class _Answer:
    status_code: int
    retry_after: str | None


def callback_client() -> aiohttp.ClientSession:
    """The worker's one session for callbacks. Each attempt has `callbacks.timeout` as a whole and
    follows no redirect: a callback goes to the checked address only, directly (no proxy from the
    environment). A callback carries the content type it was built with and none of aiohttp's
    (a function's answer without one went out as `application/octet-stream`)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=_BATCH, limit_per_host=0, ssl=outbound_tls()),
        skip_auto_headers=("Content-Type",),
    )


class CallbackDelivery:
    def __init__(
        self,
        conn: Nats,
        status: StatusStore,
        results: ResultStore,
        settings: CallbackSettings,
        http: aiohttp.ClientSession,
    ) -> None:
        self._js = conn.js
        self._conn = conn
        self._status = status
        self._results = results
        self._settings = settings
        self._http = http
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self._backoff = _as_retry(settings)
        self._policy = AddressPolicy.of(settings)
        self._signer = Signer(settings.signing_secret)
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PullSubscription | None = None

    async def start(self) -> None:
        self._sub = await self._js.pull_subscribe_bind(names.CALLBACK_CONSUMER, stream=names.CALLBACK_STREAM)
        self._task = asyncio.create_task(self._loop(self._sub), name="callback-delivery")

    async def stop(self, grace_s: float) -> None:
        # Callback jobs of this worker's calls ending in the grace are left for the next worker.
        await stop_pulling(self._task, self._sub)
        self._task = self._sub = None
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
            await asyncio.shield(settle(msg, HAND_BACK))
            raise
        except _CountNotSent:
            # Soon, not after the job's own backoff (minutes by its last attempts): past
            # `RECOUNT_WITHIN_S` it would count nothing (found by a review).
            log.warning("a callback's outcome is recorded and its count not sent; the job comes again", exc_info=True)
            decision = Settle("nak", _COUNT_AGAIN_S)
        except Exception:
            # The request could not be read, or the attempt not recorded: tried again with backoff,
            # and dropped after `max_attempts` deliveries, as for a failing receiver (retried without
            # a bound, an error recurring on every delivery kept the job, and its log lines, for ever).
            delivered = int(msg.metadata.num_delivered)
            dropped = delivered >= self._settings.max_attempts
            log.exception("callback job failed unexpectedly (delivery %d%s)", delivered, ", dropped" if dropped else "")
            decision = TERM if dropped else Settle("nak", backoff_s(delivered, self._backoff, None, self._rng))
        await settle(msg, decision)

    async def _attempt(self, msg: Msg) -> Settle:
        with tracing.tracer.start_as_current_span(
            "jetspool.callback", context=tracing.extract(msg.headers), kind=SpanKind.CLIENT
        ) as span:
            decision = await self._attempt_traced(msg)
            span.set_attribute("jetspool.settle", decision.verb)
            return decision

    async def _attempt_traced(self, msg: Msg) -> Settle:
        found = await self._job(msg)
        if isinstance(found, Settle):
            return found
        job, current = found
        logfmt.request_id.set(job.request_id)
        span = trace.get_current_span()
        span.set_attribute("jetspool.request_id", job.request_id)
        span.set_attribute("jetspool.callback.kind", job.kind)
        span.set_attribute("url.full", shown(job.url))
        attempt = int(msg.metadata.num_delivered)
        try:
            destination = await self._policy.resolve(job.url)
        except RefusedAddress as exc:
            log.error("callback for %s refused: %s", job.request_id, exc)
            await self._note(current, job, "failed", None)
            return TERM
        except OSError as exc:
            return await self._failed(current, job, attempt, reason=f"cannot resolve {shown(job.url)}: {exc}")
        try:
            response = await self._post(destination, job, current.record)
        except Exception as exc:  # e.g. a stored result that cannot be read: a failed attempt, counted
            log.exception("callback for %s could not be sent", job.request_id)
            response = f"{exc.__class__.__name__}: {exc}"
        if isinstance(response, str):
            return await self._failed(current, job, attempt, reason=response)
        if 200 <= response.status_code < 300:  # noqa: PLR2004
            log.info("callback for %s delivered to %s", job.request_id, shown(job.url))
            await self._note(current, job, "delivered", response.status_code)
            return ACK
        return await self._failed(
            current,
            job,
            attempt,
            reason=f"receiver answered {response.status_code}",
            last_status=response.status_code,
            retry_after=parse_retry_after(response.retry_after, utcnow()),
        )

    async def _job(self, msg: Msg) -> tuple[CallbackJob, Versioned] | Settle:
        """The job and its request's status, or how to settle a job that is not to be delivered."""
        try:
            job = decode(msg.data, CallbackJob)
        except DecodeError:
            log.exception("dropping an unreadable callback job")
            return TERM
        current = await self._status.get(job.request_id)
        if current is None:
            log.warning("callback for %s: the request is gone; dropping it", job.request_id)
            return TERM
        if current.record.retries != job.run or not current.record.is_completed:
            log.info("callback for %s: run %d was retried since; its new run calls back", job.request_id, job.run)
            return TERM
        target = current.record.callback_target(job.kind, job.url)
        if target is not None and job.round < target.round:
            # A redelivery was asked for while this job's retries were still pending: its own job
            # delivers now. Both chains ran on, and the receiver got every retry twice.
            log.info("callback for %s to %s: a redelivery asked since sends it", job.request_id, shown(job.url))
            return ACK
        # A later round than the record's: a part of the previous version, which knows no rounds,
        # wrote the record since (back to round 0). It is sent (found by a review).
        if target is not None and job.round == target.round and target.state != "pending":
            # A job redelivered because its ack was lost, or its count not sent: what the status
            # recorded stands. Its count goes again, under the round's message id, soon after the
            # outcome only (`may_count_again`): one that failed after the status write was lost for
            # good (found by a review); one that landed counts once.
            log.info(
                "callback for %s to %s is %s already; not sent again", job.request_id, shown(job.url), target.state
            )
            if may_count_again(target.settled_at):
                await self._count(job, target.state)
            return ACK
        return job, current

    async def _post(self, destination: Destination, job: CallbackJob, record: StatusRecord) -> _Answer | str:
        """POST the callback to the checked address; the answer, or why there was none."""
        result = await self._results.of(record)
        request = build(job.kind, record, result)
        webhook_id = f"{job.request_id}-{job.kind}-{job.run}"
        headers = {
            **request.headers,
            **self._signer.headers(webhook_id, request.body, utcnow()),
            "Host": destination.host_header,
        }
        if (authorization := destination.authorization) is not None:
            headers["Authorization"] = authorization
        # The receiver joins the request's trace, as the function does: the callback went without
        # its `traceparent` (found by an outside audit).
        tracing.inject(headers)
        # The function's own first: none has a name of jetspool's (`NOT_KEPT`). aiohttp sends a value as
        # UTF-8; `as_utf8` makes that the bytes the function sent.
        sent = [*((name, as_utf8(value)) for name, value in request.relayed), *headers.items()]
        try:
            async with self._http.post(
                yarl.URL(destination.pinned_url, encoded=True),
                data=body_payload(request.body),
                headers=sent,
                timeout=self._timeout,
                allow_redirects=False,
                server_hostname=destination.server_hostname,
            ) as response:
                await response.read()  # the connection goes back to the pool only once the body is read
                return _Answer(response.status, response.headers.get(names.H_RETRY_AFTER))
        except TimeoutError:
            return f"no answer within {self._settings.timeout:g} s"
        except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a URL aiohttp cannot send
            return f"{exc.__class__.__name__}: {exc}"

    async def _failed(
        self,
        current: Versioned,
        job: CallbackJob,
        attempt: int,
        *,
        reason: str,
        last_status: int | None = None,
        retry_after: float | None = None,
    ) -> Settle:
        if attempt >= self._settings.max_attempts:
            log.error(
                "callback for %s to %s failed %d times, giving up: %s", job.request_id, shown(job.url), attempt, reason
            )
            await self._note(current, job, "failed", last_status)
            return TERM
        if not await self._note(current, job, "pending", last_status):
            log.info(
                "callback for %s attempt %d: %s; delivered or asked again meanwhile, so not retried",
                job.request_id,
                attempt,
                reason,
            )
            return ACK
        delay = backoff_s(attempt, self._backoff, retry_after, self._rng)
        log.warning("callback for %s attempt %d: %s; retrying in %.1f s", job.request_id, attempt, reason, delay)
        return Settle("nak", delay)

    async def _note(self, current: Versioned, job: CallbackJob, state: DeliveryState, last_status: int | None) -> bool:
        """Record the attempt in the request's status object (for its run only), and count its final
        outcome if the target `counts` it: the last attempt of a round a redelivery superseded was
        counted too, and one callback showed in both totals (found by a review). Whether the
        target took it."""
        taken, counted = True, state != "pending"

        def attempted(record: StatusRecord) -> StatusRecord | None:
            nonlocal taken, counted
            if record.retries != job.run:
                return None
            target = record.callback_target(job.kind, job.url)
            if target is not None:
                taken, counted = target.takes(job.round, state), target.counts(job.round, state)
            return record.callback_attempted(
                job.kind, job.url, in_round=job.round, state=state, last_status=last_status, at=utcnow()
            )

        # Counted only as recorded: on a record retried or gone since, `counted` was worked out on
        # the one read before, and a callback given up on was counted again (found by a review).
        if await self._status.change(current, attempted) is not None and counted:
            await self._count(job, state)
        return taken

    async def _count(self, job: CallbackJob, state: DeliveryState) -> None:
        """Count the final outcome `state` of `job`'s round. The message id is the round's, whatever
        the outcome: JetStream drops a second message with an id it holds on any subject of the
        stream, so a round counts once, in the total of its first final outcome."""
        counter: Counter = "callbacks_delivered" if state == "delivered" else "callbacks_failed"
        msg_id = f"{job.request_id}.callback.{job.run}.{job.kind}.{job.round}"
        try:
            await count(self._conn, job.function, counter, msg_id)
        except Exception as exc:
            raise _CountNotSent from exc


_COUNT_AGAIN_S: Final = 5.0
"""How soon a job whose count was not sent comes again to send it (well within `RECOUNT_WITHIN_S`)."""


class _CountNotSent(Exception):
    """A callback's outcome is recorded, its count did not go: the job's next delivery sends it.
    Taken for a failed delivery, the job was dropped after its last attempt, and the count with it
    (found by a review)."""


def _as_retry(settings: CallbackSettings) -> RetrySettings:
    return RetrySettings(
        initial_backoff=settings.initial_backoff,
        max_backoff=settings.max_backoff,
        multiplier=settings.multiplier,
        jitter=settings.jitter,
    )
