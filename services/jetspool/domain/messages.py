"""Wire messages: typed, versioned, encoded and decoded here and nowhere else.

- `QueuedRequest`: a waiting request on the queue stream (JSON; the body base64-encoded,
  or `body_ref` naming an object when the body is too large for one NATS message).
- `CallbackJob`: a callback to deliver, on the callbacks stream.
- `DeadlineJob`: a start deadline to enforce, on the timers stream.
- `SweepJob`: out-of-line bodies and results to delete once kept long enough, on the timers stream.
- `LogLine`: a request's log line, on the logs stream.
- `StoredResult`: a function's response kept for the result route (msgpack in the results bucket).

`schemas/` holds the JSON Schema of the JSON ones; `tests/test_schemas.py` keeps them in agreement.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, TypeVar

import msgspec

from jetspool.domain import ids
from jetspool.domain.errors import DecodeError
from jetspool.domain.names import Priority

WIRE_VERSION = 1
CallbackKind = Literal["openfaas", "fal"]


class WireMessage(msgspec.Struct, frozen=True, kw_only=True):
    v: int = WIRE_VERSION


class QueuedRequest(WireMessage, frozen=True, kw_only=True):
    """A request as it waits on `jetspool.queue.<function>.<priority>`."""

    request_id: str = ""
    """Empty when the id derives from the message's stream sequence and `id_nonce` (see `identified`)."""
    id_nonce: str | None = None
    """The random part of a derived request id (`jetspool.domain.ids`)."""
    function: str
    priority: Priority = "normal"
    method: str = "POST"
    path: str = ""
    """Sub-path below the function's URL, without a leading slash."""
    query: str = ""
    """Raw query string forwarded to the function, without `?`."""
    headers: list[tuple[str, str]] = msgspec.field(default_factory=list)
    body: bytes = b""
    body_ref: str | None = None
    """Object-store name of the body when it is stored out of line; `body` is then empty."""
    submitted_at: datetime
    callback_url: str | None = None
    """OpenFaaS-style callback (`X-Callback-Url`)."""
    webhook_url: str | None = None
    """fal-style webhook (`?fal_webhook=`)."""
    no_retry: bool = False
    start_deadline: datetime | None = None
    """No attempt may start after this (`X-Request-Timeout`); the request then completes as request_timeout."""
    retry: int = 0
    """Which run of the request this message is: 0 as submitted, n after the n-th use of the retry route."""
    queued_at: datetime | None = None
    """When the retry route queued this run; None for the run as submitted, queued at `submitted_at`."""

    def identified(self, seq: int) -> QueuedRequest:
        """This request with its id, when it is derived from `seq`, the sequence of its message."""
        if self.request_id or self.id_nonce is None:
            return self
        return msgspec.structs.replace(self, request_id=ids.derived_id(seq, self.id_nonce))

    def callbacks(self) -> list[tuple[CallbackKind, str]]:
        """Every callback target of this request, with its kind."""
        targets: list[tuple[CallbackKind, str]] = []
        if self.callback_url:
            targets.append(("openfaas", self.callback_url))
        if self.webhook_url:
            targets.append(("fal", self.webhook_url))
        return targets


class CallbackJob(WireMessage, frozen=True, kw_only=True):
    """One callback delivery, on `jetspool.callbacks.<kind>`."""

    request_id: str
    function: str
    kind: CallbackKind
    url: str
    run: int = 0
    """The run of the request (`QueuedRequest.retry`) whose outcome this delivers."""
    round: int = 0
    """The target's round (`CallbackTarget.round`) the job was made in: 0, or a redelivery asked for."""
    again: bool = False
    """Set on a redelivery's jobs for workers of the previous version, which read it (this one reads
    `round`): with it, they send the job over a `failed` state too."""


LogLevel = Literal["STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG"]


class LogLine(WireMessage, frozen=True, kw_only=True):
    """One log line of a request, on `jetspool.logs.<request id>` (SPEC §3)."""

    message: str
    level: LogLevel = "INFO"
    source: str = "function"
    timestamp: datetime


class DeadlineJob(WireMessage, frozen=True, kw_only=True):
    """A start deadline to enforce, on `jetspool.timers.deadline` (held back by delayed naks until due)."""

    request_id: str
    function: str
    due_at: datetime
    retry: int = 0
    """The run of the request (see `QueuedRequest.retry`) this deadline belongs to."""


class SweepJob(WireMessage, frozen=True, kw_only=True):
    """Objects to delete from the object store at `due_at`, on `jetspool.timers.sweep`.

    With `unless_retried_after` set, the objects (a request body kept for the retry route) are
    kept when the request was retried after run number `unless_retried_after`: the new run needs them.
    """

    request_id: str
    objects: list[str]
    due_at: datetime
    unless_retried_after: int | None = None


class StoredResult(WireMessage, frozen=True, kw_only=True):
    """A function's final response, kept for `result_ttl`."""

    status_code: int
    content_type: str | None = None
    body: bytes = b""
    body_ref: str | None = None
    headers: list[tuple[str, str]] = msgspec.field(default_factory=list)
    """The answer's own headers, as read off the wire (`functions.kept_headers`)."""


_T = TypeVar("_T", bound=WireMessage)
_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def encode(message: WireMessage) -> bytes:
    """Encode a wire message: msgpack for stored results, JSON for everything else."""
    if isinstance(message, StoredResult):
        return _msgpack_encoder.encode(message)
    return _json_encoder.encode(message)


def decode(data: bytes, kind: type[_T]) -> _T:
    """Decode a wire message of type `kind`; any failure is a DecodeError."""
    try:
        if kind is StoredResult:
            message = msgspec.msgpack.decode(data, type=kind)
        else:
            message = msgspec.json.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DecodeError(f"cannot decode {kind.__name__}: {exc}") from exc
    if message.v != WIRE_VERSION:
        raise DecodeError(f"{kind.__name__} has version {message.v}, this jetspool reads {WIRE_VERSION}")
    return message
