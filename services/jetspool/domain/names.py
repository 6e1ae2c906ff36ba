"""Every name that crosses a process boundary, defined once.

Streams, subjects, consumers, KV buckets, object stores and HTTP headers. Code, `schemas/`,
`infra/` and the docs all use these; `tests/test_names.py` keeps them in agreement.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final, Literal

Priority = Literal["high", "normal", "low"]
PRIORITIES: Final[tuple[Priority, ...]] = ("high", "normal", "low")
"""Strict order: a lower class starts only when no higher-class request waits."""

# --- JetStream -------------------------------------------------------------------------

QUEUE_STREAM: Final = "JETSPOOL_QUEUE"
QUEUE_SUBJECTS: Final = "jetspool.queue.>"

CALLBACK_STREAM: Final = "JETSPOOL_CALLBACKS"
CALLBACK_SUBJECTS: Final = "jetspool.callbacks.>"
CALLBACK_CONSUMER: Final = "jetspool-callbacks"

LOG_STREAM: Final = "JETSPOOL_LOGS"
LOG_SUBJECTS: Final = "jetspool.logs.>"

TIMER_STREAM: Final = "JETSPOOL_TIMERS"
TIMER_SUBJECTS: Final = "jetspool.timers.>"
DEADLINE_SUBJECT: Final = "jetspool.timers.deadline"
SWEEP_SUBJECT: Final = "jetspool.timers.sweep"
TIMER_CONSUMER: Final = "jetspool-timers"

EVENT_STREAM: Final = "JETSPOOL_EVENTS"
EVENT_SUBJECTS: Final = "jetspool.events.>"
EventType = Literal["queued", "started", "retrying", "succeeded", "failed", "cancelled"]
EVENT_TYPES: Final[tuple[EventType, ...]] = ("queued", "started", "retrying", "succeeded", "failed", "cancelled")

COUNTER_STREAM: Final = "JETSPOOL_COUNTERS"
COUNTER_SUBJECTS: Final = "jetspool.counters.>"

STATUS_BUCKET: Final = "jetspool-status"
FUNCTIONS_BUCKET: Final = "jetspool-functions"
RESULTS_BUCKET: Final = "jetspool-results"
IDEMPOTENCY_BUCKET: Final = "jetspool-idempotency"
ENVELOPE_BUCKET: Final = "jetspool-envelopes"
"""The queued form of each request that ended in an error or was cancelled, kept for the retry route."""
BLOB_STORE: Final = "jetspool-blobs"
BLOB_STREAM: Final = f"OBJ_{BLOB_STORE}"
BLOB_CHUNK_SUBJECTS: Final = f"$O.{BLOB_STORE}.C.>"
"""The chunks of every object: one subject per upload, named by the random id its meta names."""
BLOB_META_SUBJECTS: Final = f"$O.{BLOB_STORE}.M.>"
"""The meta of every object: one subject per object name, written once its last chunk is stored."""

WAKE_SUBJECTS: Final = "jetspool.wake.>"
STATUS_CHANGE_SUBJECTS: Final = "jetspool.status.>"
"""Every write to the status bucket is republished here as `jetspool.status.<request id>`."""
CANCEL_SUBJECTS: Final = "jetspool.cancel.>"


def queue_subject(function: str, priority: Priority) -> str:
    """Subject a waiting request of `function` is stored on."""
    return f"jetspool.queue.{function}.{priority}"


def queue_consumer(function: str, priority: Priority) -> str:
    """Durable pull consumer that feeds one priority class of one function to the workers."""
    return f"jetspool-{function}-{priority}"


WAKE_ANY: Final = "any"
"""The last token of a wake-up that names no class: any class of the function may have work."""


def wake_subject(function: str, priority: str = WAKE_ANY) -> str:
    """Core NATS subject that tells idle workers new work of `function` and class `priority` waits
    (`any`: any class may have work); the queue stream sends one for each message it stores."""
    return f"jetspool.wake.{function}.{priority}"


WAKE_REPUBLISH: Final = ("jetspool.queue.*.*", wake_subject("{{wildcard(1)}}", "{{wildcard(2)}}"))
"""(source, destination): the queue stream republishes the headers of each message it stores as
the wake-up of its function and class. nats-server sends it as it acknowledges the write, so the
worker pulls while the gateway is still being answered (a wake-up the gateway published after the
answer made submitted → started 0.3-0.5 ms longer at 100 requests/s), and a request stored by any
writer wakes the workers."""


def log_subject(request_id: str) -> str:
    """Subject of the log lines of one request."""
    return f"jetspool.logs.{request_id}"


def cancel_subject(function: str) -> str:
    """Core NATS subject that tells workers to abort a running request of `function` (payload: its id)."""
    return f"jetspool.cancel.{function}"


def callback_subject(kind: str) -> str:
    """Subject a pending callback delivery of `kind` (openfaas, fal) is stored on."""
    return f"jetspool.callbacks.{kind}"


def event_subject(function: str, event: EventType) -> str:
    """Subject every status change of a request of `function` is published on (SPEC §6)."""
    return f"jetspool.events.{function}.{event}"


Counter = Literal["completed", "failed", "retried", "cancelled", "callbacks_delivered", "callbacks_failed"]
COUNTERS: Final[tuple[Counter, ...]] = (
    "completed",
    "failed",
    "retried",
    "cancelled",
    "callbacks_delivered",
    "callbacks_failed",
)


def counter_subject(function: str, counter: Counter) -> str:
    """Subject of a server-side counter (completed, failed) of one function."""
    return f"jetspool.counters.{function}.{counter}"


def idempotency_key(function: str, key: str) -> str:
    """Idempotency-bucket key of a client's Idempotency-Key for one function (hashed: any text is safe)."""
    return f"{function}.{hashlib.sha256(key.encode()).hexdigest()}"


def body_object(request_id: str) -> str:
    """Object-store name of a request body too large for one NATS message."""
    return f"body-{request_id}"


def request_of_body_object(name: str) -> str | None:
    """The request id of the body object `name` (`body_object`); None for another object."""
    found = _BODY_OBJECT.fullmatch(name)
    return None if found is None else found.group(1)


_BODY_OBJECT: Final = re.compile(r"body-([0-9a-f-]{36})")


def result_key(request_id: str, attempt: int) -> str:
    """Results-bucket key of the answer of one attempt (only the latest attempt's is ever read)."""
    return f"{request_id}.{attempt}"


def result_object(request_id: str, attempt: int) -> str:
    """Object-store name of a result too large for one KV value."""
    return f"result-{request_id}-{attempt}"


def result_key_of_object(name: str) -> str | None:
    """The results-bucket key naming the result object `name` (`result_object`); None for another object."""
    found = _RESULT_OBJECT.fullmatch(name)
    return None if found is None else result_key(found.group(1), int(found.group(2)))


_RESULT_OBJECT: Final = re.compile(r"result-([0-9a-f-]{36})-([0-9]+)")


# --- HTTP headers ------------------------------------------------------------------------

H_CALL_ID: Final = "X-Call-Id"
H_REQUEST_ID: Final = "X-Request-Id"
H_ATTEMPT: Final = "X-Attempt"
H_CALLBACK_URL: Final = "X-Callback-Url"
H_FUNCTION_NAME: Final = "X-Function-Name"
H_FUNCTION_STATUS: Final = "X-Function-Status"
H_DURATION_SECONDS: Final = "X-Duration-Seconds"
H_START_TIME: Final = "X-Start-Time"
H_ERROR_TYPE: Final = "X-Error-Type"
H_FAL_ERROR_TYPE: Final = "X-Fal-Error-Type"
"""The same, by the name fal's clients read when a body holds no `error_type` (the function's own)."""
H_FAL_REQUEST_ID: Final = "X-Fal-Request-Id"
"""On a completed request's answer: fal-client takes a 502-504 without it for its ingress's error and
retries it, for about 52 s, when the body says `nginx` (as a function's host in a detail may)."""
H_QUEUE_PRIORITY: Final = "X-Queue-Priority"
H_FAL_QUEUE_PRIORITY: Final = "X-Fal-Queue-Priority"
H_LOGS_URL: Final = "X-Logs-Url"
H_REQUEST_TIMEOUT: Final = "X-Request-Timeout"
H_FAL_REQUEST_TIMEOUT: Final = "X-Fal-Request-Timeout"
H_RETRY_AFTER: Final = "Retry-After"

# --- NATS message headers ----------------------------------------------------------------

NATS_MSG_ID: Final = "Nats-Msg-Id"
NATS_EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
NATS_TTL: Final = "Nats-TTL"
NATS_INCR: Final = "Nats-Incr"

# --- object meta headers (of a request body in the object store) --------------------------

OBJ_FUNCTION: Final = "Jetspool-Function"
OBJ_PRIORITY: Final = "Jetspool-Priority"
OBJ_QUEUED_AFTER: Final = "Jetspool-Queued-After"
"""The last sequence of the queue stream before the body's upload: its request's message comes later."""
