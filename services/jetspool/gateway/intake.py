"""Taking a request in: read the submission options, queue the request durably.

`Intake.submit` answers only once JetStream has acknowledged the request's message. That one
write is the whole submit: the request's id derives from the message's stream sequence
(`jetspool.domain.ids`), and its status reads from the message until a worker takes it. A keyed
submit (`Idempotency-Key`) and one whose body goes to the object store need their id before the
message exists; their `IN_QUEUE` status record is written after the message, carrying the
message's stream sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar
from urllib.parse import parse_qsl, unquote, unquote_plus

import orjson
from nats.errors import Error as NatsError
from opentelemetry.trace import SpanKind

from jetspool import logfmt, tracing
from jetspool.domain import ids, names
from jetspool.domain.errors import HeadersTooLarge, InvalidInput, NotFound, QueueFull, Unavailable
from jetspool.domain.functions import Function, forwardable, is_valid_name, leaves_its_url, not_utf8, read_off_wire
from jetspool.domain.messages import DeadlineJob, QueuedRequest
from jetspool.domain.status import StatusRecord, utcnow
from jetspool.jetstream.ridethrough import is_transient
from jetspool.jetstream.status_store import StaleStatus

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from litestar import Request

    from jetspool.callbacks.addresses import AddressPolicy
    from jetspool.jetstream.events import EventLog
    from jetspool.jetstream.idempotency import IdempotencyKeys
    from jetspool.jetstream.positions import QueuePositions
    from jetspool.jetstream.queue import RequestQueue
    from jetspool.jetstream.registry import RegistryView
    from jetspool.jetstream.status_store import StatusStore

log = logging.getLogger(__name__)

CONTROL_QUERY: Final = frozenset(
    {"webhookEndpoint", "fal_webhook", "webhook", "max_queue_length", "fal_max_queue_length"}
)
"""Query parameters that steer jetspool and are not forwarded to the function."""

_MAX_START_TIMEOUT_S: Final = 366 * 86400.0
_MAX_IDEMPOTENCY_KEY: Final = 256
PRIORITY_HEADERS: Final = (names.H_QUEUE_PRIORITY, names.H_FAL_QUEUE_PRIORITY)
NO_RETRY_HEADERS: Final = ("X-No-Retry", "X-Fal-No-Retry")
TIMEOUT_HEADERS: Final = (names.H_REQUEST_TIMEOUT, names.H_FAL_REQUEST_TIMEOUT)
_OPTION_HEADERS: Final = frozenset(
    h.lower() for h in (*PRIORITY_HEADERS, *NO_RETRY_HEADERS, *TIMEOUT_HEADERS, names.H_CALLBACK_URL, "Idempotency-Key")
)
"""The headers a submit reads its options from (SPEC §2), by lower-case name."""


@dataclass(frozen=True, slots=True)
class Submission:
    """Everything a submit route learned from the HTTP request."""

    function: Function
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    callback_url: str | None
    webhook_url: str | None
    priority: names.Priority
    no_retry: bool
    max_queue_length: int | None = None
    start_timeout_s: float | None = None
    idempotency_key: str | None = None


def function_for(view: RegistryView, name: str) -> Function:
    """The registered function `name`, or 404 (SPEC §1). A name no function may have is unknown too,
    and the answer says why: it was a 422, and a client submitting to `my_fn` got a validation error
    where SPEC promises the unknown function's 404 (found by an audit)."""
    if not is_valid_name(name):
        raise NotFound(
            f"function {name!r} is not registered: function names are lower-case letters, digits and '-', at most 63"
        )
    function = view.get(name)
    if function is None:
        raise NotFound(f"function {name!r} is not registered")
    return function


def parse_request_id(request_id: str) -> str:
    """A request id in canonical form; 422 if it is not a UUID."""
    try:
        return str(uuid.UUID(request_id))
    except ValueError as exc:
        raise InvalidInput(f"malformed request id {request_id!r}: expected a UUID") from exc


def named_request_id(path: str) -> str | None:
    """The request id a route's path names, as `X-Request-Id` shows it (SPEC §2: every response
    about a request has it): canonical, a malformed one as given when it fits a header
    (`_ECHOABLE`); None when the path names none. Read off the path, not the route's parameters,
    so that answers given before routing (401, 405) carry it too (found by a SPEC audit)."""
    found = _NAMED_REQUEST.match(path)
    if found is None:
        return None
    named = found.group(1)
    try:
        return parse_request_id(named)
    except InvalidInput:
        return named if _ECHOABLE.fullmatch(named) else None


_NAMED_REQUEST: Final = re.compile(r"/(?:queue/[^/]+/requests|fal/queue)/(?!submit/)([^/]+)")
_ECHOABLE: Final = re.compile(r"[\x21-\x7e]{1,200}")
"""A malformed request id echoed in `X-Request-Id`: visible ASCII, no space (a client would strip
it), at most 200 characters."""


def _check_envelope(submission: Submission, limit: int) -> None:
    """431 for a request whose headers, query, path and callback URLs are too large for a queue
    message even with its body stored out of line. They went unchecked: a request with large
    headers beside an inline body was refused by NATS, and the client told 503, as if to try again
    (found by a security audit)."""
    # Measured as JSON, as the message holds them: a `"` or a control character takes two bytes or
    # more there; counted as raw bytes, such headers passed and NATS refused the message (found by a review).
    envelope = [submission.path, submission.query, submission.callback_url, submission.webhook_url, submission.headers]
    size = len(orjson.dumps(envelope))
    if size > limit:
        raise HeadersTooLarge(
            f"the request's headers, query, path and callback URLs take {size} bytes; at most {limit} are queued"
        )


def sub_path(path: str) -> str:
    """A request's sub-path, which is appended to its function's URL (SPEC §4); 422 for one with a
    `.` or `..` segment, which would take the call out from under that URL: `/tenants/a/` with
    `../../admin` reached `/admin` with the function's key and headers (found by a security audit)."""
    if leaves_its_url(path):
        raise InvalidInput(f"sub-path {path!r} has a '.' or '..' segment: it would leave the function's URL")
    return path.lstrip("/")


def as_sent(request: Request[Any, Any, Any], matched: str) -> str:
    """The sub-path a route matched as `matched`, as the client sent it (decoded): Litestar's path
    parameter drops a trailing slash and empty segments, and `items/` reached the function as
    `items` (a redirect from most frameworks), `a//b` as `a/b` (found by an audit)."""
    raw = request.scope.get("raw_path")
    if not matched or not raw:
        return matched
    parts = unquote(raw.decode("latin-1")).split("/")
    wanted, start = len(_segments(matched)), len(parts)
    while wanted and start:
        start -= 1
        wanted -= bool(parts[start])
    sent = "/".join(parts[start:])
    return sent if _segments(sent) == _segments(matched) else matched


def _segments(path: str) -> list[str]:
    return [segment for segment in path.split("/") if segment]


def raw_query_and_headers(request: Request[Any, Any, Any]) -> tuple[str, list[tuple[str, str]]]:
    """The query string and headers exactly as the client sent them (order and repeats kept)."""
    query = request.scope.get("query_string", b"").decode("latin-1")
    return query, read_off_wire(request.scope["headers"])


async def read_submission(
    request: Request[Any, Any, Any],
    function: Function,
    path: str,
    also_control: frozenset[str] | set[str] = frozenset(),
) -> Submission:
    """Read method, sub-path, query, headers, body and the submission options of SPEC §2.

    `also_control` names further query parameters of the route that are not forwarded."""
    raw_query, headers = raw_query_and_headers(request)
    query = control_values(raw_query, CONTROL_QUERY | also_control) if raw_query else {}
    sent = _first_values(headers)
    forwarded = forwardable(headers)  # what reaches the function: no credentials stored in the queue
    odd = not_utf8(forwarded)
    if odd is not None:  # the worker's HTTP client sends UTF-8 only: it could not be forwarded as sent
        raise InvalidInput(f"header {odd}: its value is not UTF-8, and could not reach the function as sent")
    body = await request.body()
    return Submission(
        function=function,
        method=request.method,
        path=sub_path(as_sent(request, path)),
        query=_forwarded_query(raw_query, CONTROL_QUERY | also_control),
        headers=forwarded,
        body=body,
        callback_url=_one_url(
            (names.H_CALLBACK_URL, sent.get(names.H_CALLBACK_URL.lower())),
            ("webhookEndpoint", query.get("webhookEndpoint")),
        ),
        webhook_url=_one_url(("fal_webhook", query.get("fal_webhook")), ("webhook", query.get("webhook"))),
        priority=_priority(sent),
        no_retry=_aliased(sent, NO_RETRY_HEADERS, flag) or False,
        max_queue_length=_aliased(query, ("max_queue_length", "fal_max_queue_length"), _max_queue_length),
        start_timeout_s=_start_timeout(sent),
        idempotency_key=_idempotency_key(sent.get("idempotency-key")),
    )


def _first_values(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Each header's first value, by its lower-case name, in one pass (a submit reads up to eight
    options from headers; each look-up through Litestar's `request.headers` went through the scope).
    An option header sent twice must say the same both times (`_once`)."""
    first: dict[str, str] = {}
    for key, value in headers:
        name = key.lower()
        had = first.setdefault(name, value)
        if had != value and name in _OPTION_HEADERS:
            _once(key, had, value)
    return first


def control_values(raw_query: str, control: frozenset[str]) -> dict[str, str]:
    """The values of the query parameters named in `control`; one sent twice must say the same
    both times (`_once`)."""
    found: dict[str, str] = {}
    for name, value in parse_qsl(raw_query, keep_blank_values=True):
        if name in control:
            had = found.setdefault(name, value)
            if had != value:
                _once(name, had, value)
    return found


def _once(name: str, first: str, second: str) -> NoReturn:
    """422 for an option given twice with different values, as for two of its aliases: one of them
    was taken without a word, the first of a header, the last of a query parameter, and a callback
    URL refused on its own went through as the second of two (found by a SPEC audit)."""
    raise InvalidInput(f"{name} is given twice, as {first!r} and as {second!r}; send it once")


def _idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.strip() or len(value) > _MAX_IDEMPOTENCY_KEY:
        raise InvalidInput(f"Idempotency-Key must be 1 to {_MAX_IDEMPOTENCY_KEY} characters")
    return value


def _start_timeout(sent: dict[str, str]) -> float | None:
    return _aliased(sent, TIMEOUT_HEADERS, _seconds)


_T = TypeVar("_T")


def _seconds(header: str, value: str) -> float:
    # Decimal digits only: Python's float() also took "1_0", "+5" and "1e3" (found by a SPEC audit).
    seconds = float(value) if _SECONDS.fullmatch(value) else 0.0
    if not 0 < seconds < _MAX_START_TIMEOUT_S:
        limit = f"{_MAX_START_TIMEOUT_S:.0f}"
        raise InvalidInput(f"{header} must be a number of seconds above 0 and below {limit}; got {value!r}")
    return seconds


def _aliased(sent: dict[str, str], headers: tuple[str, ...], parse: Callable[[str, str], _T]) -> _T | None:
    """The option that `headers` (a name and its aliases) give, each value given read by `parse`;
    None when none is sent. Every value sent must be valid and all must agree: an alias with a bad
    value was ignored beside a good one (found by a security audit), where SPEC §2 says 422."""
    given = [(header, parse(header, sent[header.lower()])) for header in headers if header.lower() in sent]
    if len({value for _, value in given}) > 1:
        shown = ", ".join(f"{header}: {value}" for header, value in given)
        raise InvalidInput(f"{' and '.join(header for header, _ in given)} disagree ({shown}); send one of them")
    return given[0][1] if given else None


_SECONDS: Final = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def _max_queue_length(name: str, value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise InvalidInput(f"{name} must be a whole number; got {value!r}")
    return int(value)


def _forwarded_query(raw: str, control: frozenset[str]) -> str:
    """The query string without jetspool's own parameters, the rest byte for byte as the client sent
    it, empty segments included (`a=1&&b=2` went on as `a=1&b=2`; found by an audit)."""
    parts = raw.split("&")
    kept = [part for part in parts if unquote_plus(part.partition("=")[0]) not in control]
    return raw if len(kept) == len(parts) else "&".join(kept)


def _one_url(*given: tuple[str, str | None]) -> str | None:
    """A callback URL option that has two spellings; checked against the address policy by
    `Intake.submit`. Both given must agree: one of two different URLs was dropped without a word
    (found by a docs audit)."""
    urls = [(name, value) for name, value in given if value]
    if len({value for _, value in urls}) > 1:
        shown = " and ".join(name for name, _ in urls)
        raise InvalidInput(f"{shown} name different callback URLs; send one of them")
    return urls[0][1] if urls else None


_QUEUE_FULL_RETRY_AFTER: Final = "1"
"""Seconds a client refused by `max_queue_length` waits before trying again: a hint (RFC 6585), as
the queue drains at the function's pace; without one, clients retried at once or not at all."""

_FLAGS: Final = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}


def flag(name: str, value: str | None) -> bool:
    """A yes/no header or query flag (SPEC §2: `1|true|yes`; `0|false|no` or empty say no; absent:
    no): other values 422, where a typo such as `ture` quietly meant no (found by a docs audit)."""
    if value is None:
        return False
    said = _FLAGS.get(value.strip().lower())
    if said is None:
        raise InvalidInput(f"{name} must be 1, true or yes (0, false or no to say no); got {value!r}")
    return said


def _priority(sent: dict[str, str]) -> names.Priority:
    return _aliased(sent, PRIORITY_HEADERS, _priority_class) or "normal"


def _priority_class(header: str, value: str) -> names.Priority:
    value = value.strip()
    for priority in names.PRIORITIES:  # exactly these, lower case (SPEC §2: other values 422)
        if value == priority:
            return priority
    raise InvalidInput(f"{header} must be one of high, normal, low; got {value!r}")


class Intake:
    def __init__(
        self,
        *,
        status: StatusStore,
        queue: RequestQueue,
        positions: QueuePositions,
        keys: IdempotencyKeys,
        addresses: AddressPolicy,
        events: EventLog,
    ) -> None:
        self._status = status
        self._queue = queue
        self._positions = positions
        self._keys = keys
        self._addresses = addresses
        self._events = events
        self._bounded: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        """Per function, held by a submit with `max_queue_length` from its count to its write."""

    async def submit(self, submission: Submission) -> StatusRecord:
        """Queue the request and record its status (see `_submit`), in the request trace's first span."""
        with tracing.tracer.start_as_current_span(
            "jetspool.submit",
            context=tracing.extract(submission.headers),
            kind=SpanKind.SERVER,
            attributes={"jetspool.function": submission.function.name},
        ) as span:
            record = await self._submit(submission)
            span.set_attribute("jetspool.request_id", record.request_id)
            return record

    async def _submit(self, submission: Submission) -> StatusRecord:
        """Check the submission's options (`_admit`), then queue it (`_store`).

        Submits with `max_queue_length` to one function take turns on this gateway from their
        count of what waits to their write, each counting once the one before is stored: counted
        at once, 30 concurrent submits with `max_queue_length=5` all saw fewer than 5 waiting, and
        7 to 11 were queued (found by an outside audit). Their callback URLs are checked before,
        so that a slow DNS answer holds up no other submit (found by a review). Across gateways the
        limit is as exact as the counts they read."""
        _check_envelope(submission, self._queue.envelope_limit)
        repeat = await self._admit(submission, self._check_callbacks)
        if repeat is not None:
            return repeat
        bound = None if submission.max_queue_length is None else self._bounded[submission.function.name]
        return await self._store(submission, bound)

    async def _store(self, submission: Submission, bound: asyncio.Lock | None) -> StatusRecord:
        """Queue the request; returns its first status once the message is durable in JetStream.

        The status record of a request with an id of its own (keyed, or with a large body) is
        written after the message, so the message's stream sequence is in it from the start (the
        queue position needs it). A worker that receives the message before the record exists
        creates the same record itself from the message; either way exactly one is stored.
        """
        async with bound or contextlib.nullcontext():
            if bound is not None:  # counted now, with the submits before it stored
                repeat = await self._admit(submission, self._check_limit)
                if repeat is not None:
                    return repeat
            queued = await self._enqueue(submission)
        if isinstance(queued, StatusRecord):
            return queued  # the same key was used before: that request stands
        request, seq = queued
        request = request.identified(seq)
        logfmt.request_id.set(request.request_id)
        record = StatusRecord.waiting(request, seq)
        if request.id_nonce is None:
            await self._record_status(record)
        # Stamped with the time the gateway took the request, not the time of publishing: a worker
        # may start (and finish) the request before this event goes out, and its `at` came after
        # theirs (found by an audit). The events' `at` then orders them as the changes happened.
        await self._events.publish(record, at=record.submitted_at)
        if request.start_deadline is not None:
            await self._queue.set_deadline(
                DeadlineJob(request_id=request.request_id, function=request.function, due_at=request.start_deadline)
            )
        return record

    async def _enqueue(self, submission: Submission) -> tuple[QueuedRequest, int] | StatusRecord:
        """Write the request's message; the request and its stream sequence, or the request an
        earlier submit with the same Idempotency-Key stands for."""
        now = utcnow()
        deadline = None if submission.start_timeout_s is None else now + timedelta(seconds=submission.start_timeout_s)
        key, function = submission.idempotency_key, submission.function
        request_id, nonce = "", None
        if key is None and self._queue.fits(submission.body):
            nonce = ids.new_nonce()  # the id derives from where the message lands
        else:
            request_id = str(uuid.uuid4())
            logfmt.request_id.set(request_id)
        claimed = False
        if key is not None:
            first = await self._keys.claim(function.name, key, request_id, function.result_ttl)
            if isinstance(first, str):  # the key's first submit stored no status: queue as that request
                request_id = first
                logfmt.request_id.set(request_id)
            elif first is not None:
                return first  # the same key was used before: that request stands
            claimed = first is None
        request = QueuedRequest(
            request_id=request_id,
            id_nonce=nonce,
            function=submission.function.name,
            priority=submission.priority,
            method=submission.method,
            path=submission.path,
            query=submission.query,
            headers=submission.headers,
            body=submission.body,
            submitted_at=now,
            callback_url=submission.callback_url,
            webhook_url=submission.webhook_url,
            no_retry=submission.no_retry,
            start_deadline=deadline,
        )
        try:
            seq = await self._queue.enqueue(request)
        except (NatsError, TimeoutError) as exc:
            # The key is given back only when the message was refused. After a time-out it may
            # still be stored (a leader without its quorum commits it once the quorum is back), so
            # the key keeps naming this request: a repeat with it queues under the same id, which
            # the message id stores once (see `IdempotencyKeys`), instead of running a second one.
            if key is not None and claimed and not is_transient(exc):
                await self._keys.release(function.name, key)
            raise Unavailable(f"the queue is unavailable: {exc}") from exc
        return request, seq

    async def _check_callbacks(self, submission: Submission) -> None:
        """422 for a callback URL that may not be called."""
        for url in (submission.callback_url, submission.webhook_url):
            if url is not None:
                await self._check_callback(url)

    async def _check_limit(self, submission: Submission) -> None:
        """429 when `max_queue_length` requests wait."""
        limit = submission.max_queue_length
        if limit is not None:
            waiting = sum((await self._positions.waiting(submission.function.name)).values())
            if waiting >= limit:
                raise QueueFull(
                    f"{waiting} requests of {submission.function.name!r} wait (max_queue_length {limit})",
                    {names.H_RETRY_AFTER: _QUEUE_FULL_RETRY_AFTER},
                )

    async def _admit(
        self, submission: Submission, check: Callable[[Submission], Awaitable[None]]
    ) -> StatusRecord | None:
        """Refuse the submit as `check` of its options says, unless it repeats an earlier submit's
        Idempotency-Key: then that request, which stands though a new one would be refused now
        (SPEC §2: a repeat returns the first request's id). A client retrying after a lost answer
        was told 429 by `max_queue_length`, its own request being the one that waited (found by a
        dialect audit). None: go ahead."""
        try:
            await check(submission)
        except (InvalidInput, QueueFull) as refused:
            key = submission.idempotency_key
            if key is None:
                raise
            try:
                first = await self._keys.named(submission.function.name, key, submission.function.result_ttl)
            except (NatsError, TimeoutError):
                log.warning("could not look up an idempotency key; refusing the submit", exc_info=True)
                first = None
            if first is None:
                raise
            if isinstance(first, str):
                # Its first submit stored no status yet (a gateway died on the way): this one queues
                # under its id (see `_enqueue`), and was refused 429 by the very request it repeats
                # (found by a review). What it would queue must still pass every other check.
                if isinstance(refused, QueueFull):
                    return None
                raise
            return first
        return None

    async def _check_callback(self, url: str) -> None:
        """422 for a callback URL that may not be called (SPEC §6) or cannot be resolved."""
        try:
            await self._addresses.resolve(url)
        except OSError as exc:
            raise InvalidInput(f"callback URL {url!r}: its host cannot be resolved ({exc})") from exc

    async def _record_status(self, record: StatusRecord) -> None:
        """Store the first status record (the store rides through a node loss); a worker may have
        stored it first, which is fine."""
        try:
            await self._status.create(record)
        except StaleStatus:
            return  # a worker already picked the message up and recorded it
        except (NatsError, TimeoutError) as exc:
            # The request is queued and will run (a worker records its status when it takes it),
            # but a client could not follow it yet: say so rather than hand out an id.
            raise Unavailable(f"the request is queued but its status could not be stored: {exc}") from exc
