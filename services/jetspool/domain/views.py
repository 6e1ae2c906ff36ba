"""The shapes of the JSON jetspool hands out, for `schemas/` (SPEC §2, §3, §6).

The status object, the fal webhook body, the status-change event and the HTTP answers below are
built as plain dicts where they are sent (`status.public_status`, `callbacks/payloads.py`,
`jetstream/events.py`, the gateway's routes); these types describe them for the generated JSON
Schemas, and `tests/test_schemas.py` validates real captured payloads against those schemas, so
the two cannot drift apart. Fields that are sometimes absent are `UNSET`; extra fields are
allowed, except in a function entry, which is a registry entry with its figures.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from jetspool.domain.functions import Function
from jetspool.domain.messages import CallbackKind
from jetspool.domain.names import EventType, Priority
from jetspool.domain.status import DeliveryState, ErrorType, State


class CallbackView(msgspec.Struct, kw_only=True):
    url: str
    kind: CallbackKind
    state: DeliveryState
    attempts: int
    last_status: int | None
    delivered_at: datetime | None


class Metrics(msgspec.Struct, kw_only=True):
    inference_time: float | None


class LogView(msgspec.Struct, kw_only=True):
    message: str
    level: str
    source: str
    timestamp: datetime


class StatusObject(msgspec.Struct, kw_only=True):
    """The status object of SPEC §3 (status route, SSE events, status-change events)."""

    status: State
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    logs: list[LogView] | None
    function: str
    priority: Priority
    attempts: int
    submitted_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    callbacks: list[CallbackView]
    queue_position: int | msgspec.UnsetType = msgspec.UNSET
    """Only while IN_QUEUE."""
    eta_seconds: float | msgspec.UnsetType | None = msgspec.UNSET
    """Only while IN_QUEUE (on the gateway's routes)."""
    metrics: Metrics | msgspec.UnsetType = msgspec.UNSET
    """Only once COMPLETED."""
    error: str | msgspec.UnsetType | None = msgspec.UNSET
    """Only for a request that completed with an error."""
    error_type: ErrorType | msgspec.UnsetType = msgspec.UNSET


class FalWebhook(msgspec.Struct, kw_only=True):
    """The body of a fal webhook (`?fal_webhook=`)."""

    request_id: str
    gateway_request_id: str
    status: Literal["OK", "ERROR"]
    payload: Any
    """The function's JSON output; null when there is none or it is not JSON."""
    error: str | msgspec.UnsetType = msgspec.UNSET
    """Only with status ERROR."""
    payload_error: str | msgspec.UnsetType = msgspec.UNSET
    """Only when the function's output is not JSON."""


class StatusEvent(msgspec.Struct, kw_only=True):
    """A status change, on `jetspool.events.<function>.<type>`."""

    v: Literal[1]
    type: EventType
    function: str
    request_id: str
    at: datetime
    status: StatusObject
    result: Any | msgspec.UnsetType = msgspec.UNSET
    """The function's JSON output, when it is JSON and at most `events.inline_result_limit` bytes."""


class SubmitAnswer(msgspec.Struct, kw_only=True):
    """The answer of a fal submit (`POST /queue/{name}`) and of the retry route."""

    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int | None
    """Null when the request is stored but its position could not be read in time."""


class AsyncCallAnswer(msgspec.Struct, kw_only=True):
    """The answer of `/function/{name}?async=true` (Cerebrium style)."""

    request_id: str
    run_id: str
    response_url: str
    status_url: str
    cancel_url: str


class CancelAnswer(msgspec.Struct, kw_only=True):
    """The answer of the cancel routes."""

    status: Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]
    detail: str


class ErrorAnswer(msgspec.Struct, kw_only=True):
    """Any error answer of the gateway (SPEC §2): a human-readable `detail`, and `error_type` where
    SPEC §5 names one (also in header `X-Error-Type`). The result route's answer for a request
    that has not completed, the retry and redeliver routes' refusals carry the request's `status`."""

    detail: str
    error_type: str | msgspec.UnsetType = msgspec.UNSET
    status: State | msgspec.UnsetType = msgspec.UNSET


class RedeliverAnswer(msgspec.Struct, kw_only=True):
    """The answer of `POST /queue/{name}/requests/{id}/callback/redeliver`."""

    status: Literal["REDELIVERY_REQUESTED"]
    request_id: str
    callbacks: list[CallbackView]


class PurgeAnswer(msgspec.Struct, kw_only=True):
    """The answer of `POST /system/functions/{name}/purge`: how many waiting requests were dropped."""

    purged: int


class LogsAnswer(msgspec.Struct, kw_only=True):
    """The answer of a function's POST to its `X-Logs-Url`: how many lines were taken."""

    accepted: int


class WaitingCounts(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Requests waiting, per priority class."""

    high: int
    normal: int
    low: int


class FunctionStats(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A function's live queue figures."""

    waiting: WaitingCounts
    in_progress: int
    """Requests held by workers: running, or waiting out a retry's backoff."""
    completed: int
    failed: int


class FunctionEntry(Function, frozen=True, kw_only=True):
    """A function as the admin routes show it (`/system/functions`): its registry entry and `stats`."""

    stats: FunctionStats
