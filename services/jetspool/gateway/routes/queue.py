"""The fal queue dialect: submit, status, result and cancel of a request (SPEC §2, §3, §5)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from datetime import datetime
from functools import partial
from typing import Any, Final

import orjson
from litestar import Request, Response, get, post, put, route
from litestar.enums import HttpMethod
from litestar.params import FromPath, FromQuery
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.response.base import ASGIResponse
from nats.errors import Error as NatsError

from jetspool.aio import wait_event
from jetspool.domain import names
from jetspool.domain.errors import InvalidInput, NotFound
from jetspool.domain.outcomes import JSON, Answer, result_answer
from jetspool.domain.status import State, StatusRecord, public_status, request_urls
from jetspool.gateway.feed import PING, Slot
from jetspool.gateway.intake import flag, function_for, parse_request_id, read_submission
from jetspool.gateway.lookup import find_request, require_request
from jetspool.gateway.state import Gateway, GatewayDep
from jetspool.jetstream.cancel import CancelOutcome
from jetspool.jetstream.logs import CLOSING_LINE
from jetspool.jetstream.retry import RetryOutcome
from jetspool.jetstream.ridethrough import ride_through
from jetspool.jetstream.status_store import Versioned

log = logging.getLogger(__name__)

_MAX_WAIT_S = 600.0
_EVENT_IDS_PER_REVISION = 1_000_000
_READ: Final = [HttpMethod.GET, HttpMethod.HEAD]
"""A request's status and result answer HEAD too, as GET without the body (`curl -I`, HTTP monitors)."""
_POSITION_AFTER_SUBMIT_S = 2.0
"""How long a submit's answer waits for the request's queue position, at most."""


@post("/queue/{name:str}", status_code=200)
async def submit(request: Request[Any, Any, Any], gateway: GatewayDep, name: FromPath[str]) -> Response[Any]:
    """Queue a request; 200 with its id, absolute URLs and queue position."""
    return await _submit(request, gateway, name, "")


@post("/queue/{name:str}/{path:path}", status_code=200)
async def submit_path(
    request: Request[Any, Any, Any], gateway: GatewayDep, name: FromPath[str], path: FromPath[str]
) -> Response[Any]:
    """Queue a request for the function's sub-path `path`."""
    return await _submit(request, gateway, name, path)


async def _submit(request: Request[Any, Any, Any], gateway: Gateway, name: str, path: str) -> Response[Any]:
    function = function_for(gateway.view, name)
    record = await gateway.intake.submit(await read_submission(request, function, path))
    return await _queued(gateway, record, 200)


async def _queued(gateway: Gateway, record: StatusRecord, status_code: int) -> Response[Any]:
    """The submit response: the request's id, absolute URLs and queue position."""
    body = {
        "request_id": record.request_id,
        **request_urls(gateway.base_url, record.function, record.request_id),
        "queue_position": await _position_after_submit(gateway, record),
    }
    return Response(body, status_code=status_code, headers={names.H_REQUEST_ID: record.request_id})


async def _position_after_submit(gateway: Gateway, record: StatusRecord) -> int | None:
    """The queue position a submit answers with; None when NATS cannot tell it in time.

    The request is stored by now. A failed read of where it stands must not turn the answer into
    an error: the client, told that nothing was queued, would submit the request again while the
    first one runs. (Found by a chaos run: nats-server killed just after a submit's message was
    stored made its answer a 503, five seconds later, and the request then ran.)"""
    if record.status is not State.IN_QUEUE:
        return 0
    try:
        async with asyncio.timeout(_POSITION_AFTER_SUBMIT_S):
            return await ride_through(partial(gateway.positions.position, record), "queue position")
    except (NatsError, TimeoutError) as exc:
        log.warning("request %s is queued; answering without its queue position (%r)", record.request_id, exc)
        return None


@route("/queue/{name:str}/requests/{request_id:str}/status", http_method=_READ)
async def request_status(
    gateway: GatewayDep, name: FromPath[str], request_id: FromPath[str], logs: FromQuery[str | None] = None
) -> Response[dict[str, Any]]:
    """The status object (SPEC §3): 202 while waiting or running, 200 once completed."""
    return await _status(gateway, name, request_id, logs)


async def _status(gateway: Gateway, name: str | None, request_id: str, logs: str | None) -> Response[dict[str, Any]]:
    with_logs = flag("logs", logs)
    record = (await require_request(gateway, name, request_id)).record
    body = await _view(gateway, record, with_logs=with_logs)
    return Response(
        body,
        status_code=200 if record.status is State.COMPLETED else 202,
        headers={names.H_REQUEST_ID: record.request_id},
    )


@route("/queue/{name:str}/requests/{request_id:str}", http_method=_READ)
async def request_result(
    request: Request[Any, Any, Any],
    gateway: GatewayDep,
    name: FromPath[str],
    request_id: FromPath[str],
    wait: FromQuery[str | None] = None,
) -> ASGIResponse:
    """The function's response once completed (with `?wait=S`, first wait up to S seconds for it),
    with the headers its result kept; 400 with the status while it is not."""
    wait_s = _seconds("wait", wait)
    record = (await require_request(gateway, name, request_id)).record
    if record.status is not State.COMPLETED and wait_s > 0:
        gone = asyncio.create_task(_client_gone(request))
        try:
            record = await _wait_for_completion(gateway, record, wait_s, gone)
        finally:
            gone.cancel()
    if record.status is not State.COMPLETED:
        waiting = {"detail": f"request is {record.status.value}, not completed yet", "status": record.status.value}
        answer = Answer(400, orjson.dumps(waiting), JSON, {names.H_REQUEST_ID: record.request_id})
    else:
        answer = result_answer(record, await gateway.results.of(record))
    content_type = answer.content_type or "application/octet-stream"
    # A list: a header the function repeated (`Link`) goes out as often. The type is exactly the
    # function's, no charset added.
    headers = [*answer.relayed, *answer.headers.items(), ("content-type", content_type)]
    if request.method == HttpMethod.HEAD:  # what a GET would say, without its body
        if answer.status_code not in _NO_BODY:  # which has no Content-Length on a GET either (RFC 9110)
            headers.append(("content-length", str(len(answer.body))))
        return ASGIResponse(status_code=answer.status_code, headers=headers, is_head_response=True)
    return ASGIResponse(body=answer.body, status_code=answer.status_code, headers=headers)


_NO_BODY: Final = frozenset({204, 304})
"""Statuses whose answer has no body, nor a Content-Length for one."""

_CANCEL_ANSWERS = {
    CancelOutcome.CANCELLED: (202, "CANCELLATION_REQUESTED", "the request was removed from the queue"),
    CancelOutcome.SIGNALLED: (202, "CANCELLATION_REQUESTED", "the worker running the request was told to stop"),
    CancelOutcome.ALREADY_COMPLETED: (400, "ALREADY_COMPLETED", "the request had already completed"),
    CancelOutcome.NOT_FOUND: (404, "NOT_FOUND", "no such request"),
}


@put("/queue/{name:str}/requests/{request_id:str}/cancel", status_code=202)
async def cancel_request(
    gateway: GatewayDep, name: FromPath[str], request_id: FromPath[str]
) -> Response[dict[str, str]]:
    """202 CANCELLATION_REQUESTED · 400 ALREADY_COMPLETED · 404 NOT_FOUND (SPEC §2)."""
    return await _cancel(gateway, name, request_id)


async def _cancel(gateway: Gateway, name: str | None, request_id: str) -> Response[dict[str, str]]:
    current = await find_request(gateway, name, request_id)
    if current is None:
        outcome = CancelOutcome.NOT_FOUND
    else:
        outcome = await gateway.canceller.cancel(current, gateway.view.get(current.record.function))
    status_code, status, detail = _CANCEL_ANSWERS[outcome]
    headers = {names.H_REQUEST_ID: parse_request_id(request_id)}
    return Response({"status": status, "detail": detail}, status_code=status_code, headers=headers)


@post("/queue/{name:str}/requests/{request_id:str}/retry", status_code=202)
async def retry_request(gateway: GatewayDep, name: FromPath[str], request_id: FromPath[str]) -> Response[Any]:
    """Run a request that ended in an error or was cancelled again, under its id: 202 with the
    submit response; 400 for a request that succeeded, has not completed, or is no longer kept;
    404 when the function is no longer registered, as for a submit."""
    current = await require_request(gateway, name, request_id)
    function_for(gateway.view, name)
    answer = await gateway.retrier.retry(current)
    if answer.outcome is RetryOutcome.NOT_FOUND or answer.current is None:
        raise NotFound(f"request {request_id} not found for function {name!r}")
    record = answer.current.record
    if answer.outcome is not RetryOutcome.REQUEUED:
        return Response(
            {"detail": answer.outcome.value, "status": record.status.value},
            status_code=400,
            headers={names.H_REQUEST_ID: record.request_id},
        )
    return await _queued(gateway, record, 202)


@post("/queue/{name:str}/requests/{request_id:str}/callback/redeliver", status_code=202)
async def redeliver_callbacks(gateway: GatewayDep, name: FromPath[str], request_id: FromPath[str]) -> Response[Any]:
    """Deliver a completed request's callbacks and webhooks again: 202 with their state;
    400 when it has not completed or has no callback URL."""
    current = await require_request(gateway, name, request_id)
    seen = current.record
    before: list[StatusRecord] = []

    def again(record: StatusRecord) -> StatusRecord | None:
        if not record.is_completed or record.retries != seen.retries:
            return None
        before[:] = [record]
        return record.callbacks_again()

    changed = await gateway.status.change(current, again) if seen.is_completed and seen.callbacks else None
    if changed is not None:
        # The round is recorded first, then its jobs queued: a worker of the previous version, which
        # knows no rounds, dropped a job that came before its `pending` (found by an upgrade audit).
        try:
            await gateway.callbacks.emit(changed.record, again=True)
        except BaseException:  # a time-out, NATS away, or the handler cancelled
            await asyncio.shield(_put_back(gateway, changed, before[0]))
            raise
    if changed is None:
        detail = "the request has no callback URL" if seen.is_completed else "the request has not completed yet"
        return Response(
            {"detail": detail, "status": seen.status.value},
            status_code=400,
            headers={names.H_REQUEST_ID: seen.request_id},
        )
    body = {
        "status": "REDELIVERY_REQUESTED",
        "request_id": seen.request_id,
        "callbacks": [target.view() for target in changed.record.callbacks],
    }
    return Response(body, status_code=202, headers={names.H_REQUEST_ID: seen.request_id})


async def _put_back(gateway: Gateway, written: Versioned, before: StatusRecord) -> None:
    """Undo a redelivery's round whose jobs could not be queued, where nothing changed it since: left
    recorded with no job, it stopped the pending retries of the round before, and the callback was
    never sent (found by a review). At best: the client, told 503, asks again."""
    try:
        await gateway.status.change(written, lambda record: record.callbacks_put_back(written.record, before))
    except (NatsError, TimeoutError):
        log.warning("could not undo the redelivery of %s, whose jobs were not queued", written.record.request_id)


def _seconds(name: str, value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= _MAX_WAIT_S:
        raise InvalidInput(f"{name} must be a number of seconds from 0 to {_MAX_WAIT_S:g}; got {value!r}")
    return seconds


async def _client_gone(request: Request[Any, Any, Any]) -> None:
    """Returns once the client has closed its connection (or its connection failed)."""
    with contextlib.suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass


async def _wait_for_completion(
    gateway: Gateway, record: StatusRecord, wait_s: float, gone: asyncio.Task[None]
) -> StatusRecord:
    """The record once COMPLETED, or as it is after `wait_s` seconds, or once the client is `gone`
    (the wait would hold one of the gateway's `max_streams` for nobody, up to 600 s)."""
    async with gateway.feed.watch(record.request_id, record.function) as watch:
        current = await gateway.status.get(record.request_id)  # read after subscribing: nothing falls between
        if current is None:
            return record
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                while not gone.done():
                    watch.own_change.clear()  # before reading: a record offered from now on sets it
                    current = watch.latest(current)
                    if current.record.is_completed or gateway.feed.closing:
                        break
                    changed = asyncio.ensure_future(watch.own_change.wait())
                    try:
                        await asyncio.wait({changed, gone}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        changed.cancel()
        return current.record


@get("/queue/{name:str}/requests/{request_id:str}/status/stream")
async def status_stream(
    request: Request[Any, Any, Any],
    gateway: GatewayDep,
    name: FromPath[str],
    request_id: FromPath[str],
    logs: FromQuery[str | None] = None,
) -> ServerSentEvent:
    """Server-Sent Events: the status object at once, then one per change (status, queue position,
    log lines), ending after COMPLETED; a `: ping` comment after `gateway.sse_ping_interval` (15 s) of quiet."""
    with_logs = flag("logs", logs)
    current = await require_request(gateway, name, request_id)
    slot = gateway.feed.reserve()  # before the answer starts: a refusal can still be a 503
    last_id = _event_id(request.headers.get("last-event-id"))
    headers = {names.H_REQUEST_ID: current.record.request_id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    events = _events(gateway, current, slot, with_logs=with_logs, last_id=last_id)
    return ServerSentEvent(events, headers=headers)


def _event_id(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def _events(
    gateway: Gateway, current: Versioned, slot: Slot, *, with_logs: bool, last_id: int | None
) -> AsyncIterator[ServerSentEventMessage]:
    """Event ids are `revision * 1e6 + n`: monotonic, and a reconnect with Last-Event-ID continues them.

    An id is never at or below the client's `Last-Event-ID`, even one the record never reached (made
    up, or from a bucket since recreated): the ids went backwards after it, and a client that keeps
    the highest id it saw would have taken every event as one it had."""
    record = current.record
    loop, ping_s = asyncio.get_running_loop(), gateway.settings.gateway.sse_ping_interval
    async with gateway.feed.watch(record.request_id, record.function, slot) as watch:
        current = await gateway.status.get(record.request_id) or current
        revision, count, sent, spoke_at = current.revision, 0, None, loop.time()
        last_sent = -1 if last_id is None else last_id
        if last_id is not None and last_id // _EVENT_IDS_PER_REVISION == revision:
            if current.record.is_completed:
                return  # the client has the final event: nothing was missed, and it is not sent again
            count = last_id % _EVENT_IDS_PER_REVISION + 1
        while not gateway.feed.closing:
            gateway.feed.arm(watch)  # before reading: a change from now on wakes the wait below
            current = watch.latest(current)
            try:
                async with asyncio.timeout(ping_s * _VIEW_READ_SHARE):
                    view = await _view(gateway, current.record, with_logs=with_logs)
            except (NatsError, TimeoutError) as exc:
                # NATS away: the stream said nothing while each read rode through for 30 s, and then
                # broke off mid-answer (found by a review). It says it is alive, and reads again.
                log.debug("status stream of %s: its view not read (%r); reading again", record.request_id, exc)
                yield PING
                spoke_at = loop.time()
                await wait_event(watch.own_change, ping_s * _VIEW_READ_SHARE)
                continue
            if view != sent:
                if current.revision != revision:
                    revision, count = current.revision, 0
                last_sent = max(revision * _EVENT_IDS_PER_REVISION + count, last_sent + 1)
                yield ServerSentEventMessage(data=orjson.dumps(view).decode(), id=last_sent)
                count, sent, spoke_at = count + 1, view, loop.time()
            if current.record.is_completed:
                return
            # The ping is due `ping_s` after the stream last said anything: timed from each wait, it
            # never came while other requests of the function kept moving the queue and this one
            # did not move, and a proxy's idle timeout could cut the stream (found by an audit).
            if not await wait_event(watch.queue_moved, max(0.0, spoke_at + ping_s - loop.time())):
                yield PING
                spoke_at = loop.time()
            elif not watch.own_change.is_set():
                # Only others moved: a new queue position goes out at most once per interval, so a
                # thousand streams on one busy function do not each recompute it on every change.
                await wait_event(watch.own_change, position_interval_s(gateway.feed.watching))


_VIEW_READ_SHARE = 0.5
"""Of `gateway.sse_ping_interval`: how long a stream's read of what it shows (queue position, log
lines) may take before it sends a keep-alive instead and reads again."""
_POSITION_INTERVAL_S = 1.0
"""Mean time between two stream events that only move the queue position, at most."""
_POSITION_INTERVAL_PER_WATCH_S = 0.01
"""Mean time between two of them per stream or wait open on the gateway, up to `_POSITION_INTERVAL_S`."""


def position_interval_s(watching: int) -> float:
    """How long a stream holds back an event that would only move its queue position.

    With few streams open, a new position goes out almost at once: within about 10 ms for a stream
    alone (SPEC: one event per change). With more, each position read costs the gateway (up to
    three consumer reads and a direct get): up to 100 streams, their
    reads together stay near 100 per second; from 100 on, each stream sends a new position at most
    about once a second, as all did before (so 1,000 streams read about 1,000 times a second on a
    busy function). The
    wait is drawn from 0.5 to 1.5 times the mean: streams woken by the same change would otherwise
    all read their positions at the same instant one interval later (with 1,000 streams that
    stalled the gateway for about 250 ms, and the status changes behind it reached their streams
    that late)."""
    mean = min(_POSITION_INTERVAL_S, watching * _POSITION_INTERVAL_PER_WATCH_S)
    return mean * random.uniform(0.5, 1.5)  # noqa: S311 - spreading load, not cryptography


async def _view(gateway: Gateway, record: StatusRecord, *, with_logs: bool) -> dict[str, Any]:
    place = await gateway.positions.place(record) if record.status is State.IN_QUEUE else None
    lines = await gateway.logs.read(record.request_id) if with_logs else None
    if lines and record.status is State.IN_PROGRESS and _closes(lines[-1], record):
        lines = lines[:-1]  # it shows with the COMPLETED record, written just after it
    view = public_status(record, gateway.base_url, logs=lines, queue_position=None if place is None else place[0])
    if place is not None:
        view["eta_seconds"] = _eta_s(gateway, record.function, *place)
    return view


def _closes(line: dict[str, Any], record: StatusRecord) -> bool:
    """Whether `line` is the worker's closing line ("completed, ...") of the attempt under way. The
    worker stores it just before the completion, so that a stream's last event has it; shown until
    then, a request read as IN_PROGRESS and completed at once, in an event of its own (found by an
    audit, in 10 of 10 streams)."""
    if record.started_at is None or line.get("source") != "worker":
        return False
    if not str(line.get("message", "")).startswith(CLOSING_LINE):
        return False
    try:
        return datetime.fromisoformat(str(line["timestamp"])) >= record.started_at
    except (KeyError, ValueError, TypeError):
        return False


def _eta_s(gateway: Gateway, function: str, position: int, in_flight: int) -> float | None:
    """(position + 1) runs of the recent mean run time, spread over the calls the function runs at
    once: its concurrency, or the calls under way when more (`concurrency` is per worker process,
    and with two workers the estimate was twice the wait; found by a load audit). None until this
    gateway has seen the function complete something."""
    mean_s = gateway.metrics.run_times.get(function)
    registered = gateway.view.get(function)
    if mean_s is None or registered is None:
        return None
    return round((position + 1) * mean_s / max(registered.concurrency, in_flight), 3)


# --- legacy fal-serverless aliases (seed 000): the request id alone identifies the request ----------


@post("/fal/queue/submit/{name:str}", status_code=200)
async def legacy_submit(request: Request[Any, Any, Any], gateway: GatewayDep, name: FromPath[str]) -> Response[Any]:
    """= POST /queue/{name}."""
    return await _submit(request, gateway, name, "")


@post("/fal/queue/submit/{name:str}/{path:path}", status_code=200)
async def legacy_submit_path(
    request: Request[Any, Any, Any], gateway: GatewayDep, name: FromPath[str], path: FromPath[str]
) -> Response[Any]:
    """= POST /queue/{name}/{path}."""
    return await _submit(request, gateway, name, path)


@get("/fal/queue/{request_id:str}/get")
async def legacy_status(
    gateway: GatewayDep, request_id: FromPath[str], logs: FromQuery[str | None] = None
) -> Response[dict[str, Any]]:
    """= GET /queue/{name}/requests/{id}/status."""
    return await _status(gateway, None, request_id, logs)


@put("/fal/queue/{request_id:str}/cancel", status_code=202)
async def legacy_cancel(gateway: GatewayDep, request_id: FromPath[str]) -> Response[dict[str, str]]:
    """= PUT /queue/{name}/requests/{id}/cancel."""
    return await _cancel(gateway, None, request_id)
