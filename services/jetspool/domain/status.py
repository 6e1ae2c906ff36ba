"""The status of a request: the record kept in the status bucket, its transitions, its public view.

    IN_QUEUE ──▶ IN_PROGRESS ──▶ COMPLETED
        ▲             │              │
        └── retried ──┘              │
        ▲                            │
        └─ retry route (errors only) ┘

Only the retry route leaves COMPLETED, and only for an error or a cancellation. Every write is
fenced by the KV revision it was read at (see `jetstream/status_store.py`), so a stale writer
can never overwrite a newer state.
"""

from __future__ import annotations

import math
import secrets
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

import msgspec

from jetspool.domain.functions import masked
from jetspool.domain.messages import CallbackKind, QueuedRequest, StoredResult, WireMessage, decode, encode
from jetspool.domain.names import Priority


class State(StrEnum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


class ErrorType(StrEnum):
    """Machine-readable outcome of a request that did not succeed (SPEC §5)."""

    FUNCTION_ERROR = "function_error"
    RUNNER_UNAVAILABLE = "runner_unavailable"
    FUNCTION_TIMEOUT = "function_timeout"
    REQUEST_TIMEOUT = "request_timeout"
    CANCELLED = "cancelled"


def ttl_seconds(seconds: float) -> int:
    """A JetStream message TTL (whole seconds, at least 1) keeping a record at least `seconds`:
    rounded down, status and result went 0.15-0.6 s before `result_ttl` had passed (found by an
    outside audit)."""
    return max(1, math.ceil(seconds))


def utcnow() -> datetime:
    return datetime.now(UTC)


def start_deadline_missed(attempts: int) -> str:
    """The error of a request that completes as `request_timeout` after `attempts` attempts. It said
    "no attempt started" also of a request whose deadline passed while it waited to be retried
    (found by a SPEC audit)."""
    if attempts == 0:
        return "no attempt started before the request's start deadline"
    return f"the request's start deadline passed while it waited to be retried after attempt {attempts}"


def start_deadline_passed_during(attempt: int, failure: object) -> str:
    """The error of a request whose start deadline passed during `attempt`, which then failed in a
    way that is retried: no other attempt may start."""
    return f"the request's start deadline passed during attempt {attempt}, which failed: {failure}"


DeliveryState = Literal["pending", "delivered", "failed"]


class CallbackTarget(msgspec.Struct, frozen=True, kw_only=True):
    """One callback or webhook of a request and how its delivery went (SPEC §6)."""

    url: str
    kind: CallbackKind
    state: DeliveryState = "pending"
    attempts: int = 0
    """Delivery attempts made, over every run and redelivery."""
    round: int = 0
    """Redeliveries asked for so far (the redeliver route): a job of an earlier round is dropped,
    so that a chain of retries still pending when a redelivery is asked stops beside the new one."""
    last_status: int | None = None
    """HTTP status of the receiver's last answer (none when it could not be reached)."""
    delivered_at: datetime | None = None
    settled_at: datetime | None = None
    """When its round's outcome was recorded (delivered or failed): its count is sent again only soon
    after (`stats.may_count_again`)."""

    def takes(self, in_round: int, state: DeliveryState) -> bool:
        """Whether an attempt made in `in_round` that ended in `state` sets this target's state.

        Not one of a round superseded meanwhile: the last attempt of a job in flight when a
        redelivery was asked wrote `failed` over the new round's `pending`, and the new job, read
        after that, was dropped unsent (found by a race review). Nor a failed one over a delivery
        of its own round: two deliveries of one job (a nats-server restart forgot the first, or a
        worker was paused past the ack wait) each made an attempt, and the late failure wrote
        `pending` over `delivered`, for good, since the job its success acknowledged was gone
        (found by a fault audit)."""
        if in_round < self.round:
            return False
        if in_round > self.round:
            return True
        if self.state == "delivered":
            return state == "delivered"
        return not (self.state == "failed" and state == "pending")  # given up on: a late retry stays off

    def counts(self, in_round: int, state: DeliveryState) -> bool:
        """Whether that attempt's outcome counts in the totals: a final one the target `takes`, the
        first of its round. A late success over `failed` shows, and is not counted again: one
        callback was in both totals (found by a review)."""
        if state == "pending" or not self.takes(in_round, state):
            return False
        return in_round > self.round or self.state == "pending"

    def attempted(self, in_round: int, state: DeliveryState, last_status: int | None, at: datetime) -> CallbackTarget:
        """This target after an attempt made in `in_round` ended in `state`: counted, and its
        outcome taken if it `takes`."""
        if not self.takes(in_round, state):
            return msgspec.structs.replace(self, attempts=self.attempts + 1)
        return msgspec.structs.replace(
            self,
            state=state,
            attempts=self.attempts + 1,
            last_status=last_status,
            delivered_at=at if state == "delivered" else self.delivered_at,
            settled_at=self.settled_at if state == "pending" else at,
            round=in_round,  # a round the route had not recorded yet, or one an older version's write lost
        )

    def view(self) -> dict[str, Any]:
        return {
            "url": masked(self.url),
            "kind": self.kind,
            "state": self.state,
            "attempts": self.attempts,
            "last_status": self.last_status,
            "delivered_at": _rfc3339(self.delivered_at),
        }


class StatusRecord(WireMessage, frozen=True, kw_only=True):
    """What the status bucket holds under a request id."""

    request_id: str
    function: str
    status: State = State.IN_QUEUE
    priority: Priority = "normal"
    attempts: int = 0
    submitted_at: datetime
    queue_seq: int | None = None
    """Stream sequence of the request's message on the queue stream (for its queue position)."""
    started_at: datetime | None = None
    completed_at: datetime | None = None
    inference_time: float | None = None
    """Seconds the final attempt ran."""
    function_status: int | None = None
    """HTTP status of the function's final response, when there was one."""
    error: str | None = None
    error_type: ErrorType | None = None
    cancel_requested: bool = False
    """Set when a cancel arrives while the request runs; a redelivery then completes it as cancelled."""
    logs_token: str = ""
    """Secret of the request's X-Logs-Url (never shown in the status object)."""
    retries: int = 0
    """Times the retry route re-queued the request; its current run is the queue message with this `retry`."""
    attempt_base: int = 0
    """Attempts made before the current run: `max_attempts` counts from here."""
    callbacks: list[CallbackTarget] = msgspec.field(default_factory=list)
    expires_at: datetime | None = None
    """When a completed record goes (completion + the function's `result_ttl`); every write keeps it."""
    result: StoredResult | None = None
    """The function's final response when it is small: completing is then one write, not two
    (larger ones are in the results bucket, under the request and attempt)."""

    @property
    def is_completed(self) -> bool:
        return self.status is State.COMPLETED

    @classmethod
    def waiting(cls, request: QueuedRequest, queue_seq: int) -> StatusRecord:
        """The first record of a request just stored on the queue stream at `queue_seq`."""
        return cls(
            request_id=request.request_id,
            function=request.function,
            priority=request.priority,
            submitted_at=request.submitted_at,
            queue_seq=queue_seq,
            logs_token=secrets.token_urlsafe(16),
            callbacks=[CallbackTarget(url=url, kind=kind) for kind, url in request.callbacks()],
        )

    def started(self, attempt: int, at: datetime) -> StatusRecord:
        """The request's attempt number `attempt` has begun."""
        return msgspec.structs.replace(self, status=State.IN_PROGRESS, attempts=attempt, started_at=at)

    def requeued(self, error: str, ran_s: float | None = None) -> StatusRecord:
        """An attempt failed in a way worth retrying; the request waits again. `ran_s`: how long the
        attempt ran, which stays the request's `inference_time` should it end with no further attempt."""
        ran = self.inference_time if ran_s is None else ran_s
        return msgspec.structs.replace(self, status=State.IN_QUEUE, error=error, inference_time=ran)

    def completed(
        self,
        at: datetime,
        *,
        keep_s: float,
        function_status: int | None,
        inference_time: float | None,
        error: str | None = None,
        error_type: ErrorType | None = None,
        result: StoredResult | None = None,
    ) -> StatusRecord:
        """The request's final outcome, kept for `keep_s` seconds (`result`: the response, if small).

        `inference_time` None (an outcome of no attempt: cancelled or timed out while waiting) keeps
        the run time of the attempt before, if one ran: SPEC §3 gives the final attempt's."""
        return msgspec.structs.replace(
            self,
            status=State.COMPLETED,
            completed_at=at,
            expires_at=at + timedelta(seconds=keep_s),
            function_status=function_status,
            inference_time=self.inference_time if inference_time is None else inference_time,
            error=error,
            error_type=error_type,
            result=result,
        )

    def retried(self, queue_seq: int) -> StatusRecord:
        """The retry route re-queued this completed request as run `retries + 1`, stored at `queue_seq`."""
        return msgspec.structs.replace(
            self,
            status=State.IN_QUEUE,
            retries=self.retries + 1,
            attempt_base=self.attempts,
            queue_seq=queue_seq,
            started_at=None,
            completed_at=None,
            function_status=None,
            inference_time=None,
            error=None,
            error_type=None,
            cancel_requested=False,
            expires_at=None,
            result=None,
            callbacks=[msgspec.structs.replace(t, state="pending") for t in self.callbacks],
        )

    def callbacks_again(self) -> StatusRecord:
        """Every callback of the request is to be delivered again, each in a round of its own."""
        return msgspec.structs.replace(
            self,
            callbacks=[msgspec.structs.replace(t, state="pending", round=t.round + 1) for t in self.callbacks],
        )

    def callbacks_put_back(self, written: StatusRecord, before: StatusRecord) -> StatusRecord | None:
        """The targets as they were in `before` where they are still as `written` left them (a
        redelivery whose jobs could not be queued); None when none is."""
        restored = [
            was if now == wrote else now
            for now, wrote, was in zip(self.callbacks, written.callbacks, before.callbacks, strict=True)
        ]
        return None if restored == self.callbacks else msgspec.structs.replace(self, callbacks=restored)

    def callback_target(self, kind: CallbackKind, url: str) -> CallbackTarget | None:
        """The callback `kind` to `url`, if the request has it."""
        return next((t for t in self.callbacks if (t.kind, t.url) == (kind, url)), None)

    def callback_attempted(
        self,
        kind: CallbackKind,
        url: str,
        *,
        in_round: int,
        state: DeliveryState,
        last_status: int | None,
        at: datetime,
    ) -> StatusRecord:
        """One delivery attempt of the callback `kind` to `url`, made in `in_round`, ended in `state`."""
        return msgspec.structs.replace(
            self,
            callbacks=[
                t.attempted(in_round, state, last_status, at) if (t.kind, t.url) == (kind, url) else t
                for t in self.callbacks
            ],
        )

    def encode(self) -> bytes:
        return encode(self)


def decode_status(data: bytes) -> StatusRecord:
    return decode(data, StatusRecord)


def rfc3339(at: datetime) -> str:
    """`at` as the status object and events write times: RFC 3339, UTC, with a `Z`."""
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _rfc3339(at: datetime | None) -> str | None:
    return None if at is None else rfc3339(at)


def request_urls(base_url: str, function: str, request_id: str) -> dict[str, str]:
    """The absolute response, status and cancel URLs of a request."""
    prefix = f"{base_url}/queue/{function}/requests/{request_id}"
    return {"response_url": prefix, "status_url": f"{prefix}/status", "cancel_url": f"{prefix}/cancel"}


def public_status(
    record: StatusRecord,
    base_url: str,
    *,
    logs: list[dict[str, Any]] | None = None,
    queue_position: int | None = None,
) -> dict[str, Any]:
    """The status object of SPEC §3, with absolute URLs under `base_url`."""
    view: dict[str, Any] = {
        "status": record.status.value,
        "request_id": record.request_id,
        **request_urls(base_url, record.function, record.request_id),
        "logs": logs,
        "function": record.function,
        "priority": record.priority,
        "attempts": record.attempts,
        "submitted_at": _rfc3339(record.submitted_at),
        "started_at": _rfc3339(record.started_at),
        "completed_at": _rfc3339(record.completed_at),
        "callbacks": [target.view() for target in record.callbacks],
    }
    if record.status is State.IN_QUEUE and queue_position is not None:
        view["queue_position"] = queue_position
    if record.status is State.COMPLETED:
        view["metrics"] = {"inference_time": record.inference_time}
        if record.error_type is not None:
            view["error"] = record.error
            view["error_type"] = record.error_type.value
    return view
