"""JSON Schemas of every JSON payload jetspool stores, sends over NATS or answers over HTTP,
generated from the wire types.

`schemas/` holds the committed output; `tests/test_schemas.py` fails when it and the types drift
apart, and validates real payloads captured from a running stack against it.
`asyncapi.json` describes the NATS subjects. Regenerate with `python -m jetspool.domain.schemas schemas/`.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, Final

import msgspec

from jetspool import __version__
from jetspool.domain.functions import Function
from jetspool.domain.messages import CallbackJob, DeadlineJob, LogLine, QueuedRequest, SweepJob
from jetspool.domain.names import (
    CALLBACK_STREAM,
    COUNTER_STREAM,
    COUNTERS,
    DEADLINE_SUBJECT,
    EVENT_STREAM,
    EVENT_TYPES,
    FUNCTIONS_BUCKET,
    LOG_STREAM,
    QUEUE_STREAM,
    STATUS_BUCKET,
    SWEEP_SUBJECT,
    TIMER_STREAM,
)
from jetspool.domain.status import StatusRecord
from jetspool.domain.views import (
    AsyncCallAnswer,
    CancelAnswer,
    ErrorAnswer,
    FalWebhook,
    FunctionEntry,
    LogsAnswer,
    PurgeAnswer,
    RedeliverAnswer,
    StatusEvent,
    StatusObject,
    SubmitAnswer,
)

ASYNCAPI_FILE: Final = "asyncapi.json"
_JSON_SCHEMA_2020_12: Final = "application/schema+json;version=draft-2020-12"
"""The payload schemas' format: AsyncAPI's own default is based on draft-07, which reads them otherwise."""
WIRE_TYPES: Final[dict[str, tuple[type, str]]] = {
    "queue-request": (QueuedRequest, f"message on stream {QUEUE_STREAM}, subject jetspool.queue.<function>.<priority>"),
    "callback-job": (CallbackJob, f"message on stream {CALLBACK_STREAM}, subject jetspool.callbacks.<kind>"),
    "deadline-job": (DeadlineJob, f"message on stream {TIMER_STREAM}, subject {DEADLINE_SUBJECT}"),
    "sweep-job": (SweepJob, f"message on stream {TIMER_STREAM}, subject {SWEEP_SUBJECT}"),
    "log-line": (LogLine, f"message on stream {LOG_STREAM}, subject jetspool.logs.<request id>"),
    "status-record": (StatusRecord, f"value in KV bucket {STATUS_BUCKET}, key <request id>"),
    "function": (Function, f"value in KV bucket {FUNCTIONS_BUCKET}, key <function name>"),
    "status-object": (StatusObject, "body of the status route, data of its SSE events, and an event's status"),
    "fal-webhook": (FalWebhook, "body POSTed to a fal webhook (?fal_webhook=)"),
    "status-event": (StatusEvent, f"message on stream {EVENT_STREAM}, subject jetspool.events.<function>.<type>"),
    "submit-answer": (SubmitAnswer, "body answering POST /queue/{name}[/{path}] (200) and the retry route (202)"),
    "async-call-answer": (AsyncCallAnswer, "body answering /function/{name}[/{path}]?async=true (202)"),
    "cancel-answer": (CancelAnswer, "body answering PUT /queue/{name}/requests/{id}/cancel (202, 400, 404)"),
    "redeliver-answer": (RedeliverAnswer, "body answering POST /queue/{name}/requests/{id}/callback/redeliver (202)"),
    "error-answer": (ErrorAnswer, "body of every other 4xx and 5xx answer of the gateway"),
    "function-entry": (
        FunctionEntry,
        "body of GET /system/functions/{name}, an item of GET /system/functions, the answer of a registration",
    ),
    "purge-answer": (PurgeAnswer, "body answering POST /system/functions/{name}/purge"),
    "logs-answer": (LogsAnswer, "body answering a function's POST to its X-Logs-Url (202)"),
}


def _channel(address: str, message: str, description: str, **parameters: str) -> dict[str, Any]:
    return {
        "address": address,
        "description": description,
        "parameters": {name: {"description": text} for name, text in parameters.items()},
        "messages": {message: {"$ref": f"#/components/messages/{message}"}},
    }


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of jetspool's NATS subjects, payloads referring to the schemas."""
    messages = {
        "queueRequest": "queue-request",
        "callbackJob": "callback-job",
        "deadlineJob": "deadline-job",
        "sweepJob": "sweep-job",
        "logLine": "log-line",
        "statusRecord": "status-record",
        "statusEvent": "status-event",
    }
    channels = {
        "queue": _channel(
            "jetspool.queue.{function}.{priority}",
            "queueRequest",
            f"Requests waiting for a worker (stream {QUEUE_STREAM}, WorkQueue).",
            function="function name",
            priority="high, normal or low",
        ),
        "events": _channel(
            "jetspool.events.{function}.{type}",
            "statusEvent",
            f"Every status change (stream {EVENT_STREAM}): subscribe to follow, or replay from the stream.",
            function="function name",
            type=", ".join(EVENT_TYPES),
        ),
        "callbacks": _channel(
            "jetspool.callbacks.{kind}",
            "callbackJob",
            f"Callbacks waiting for delivery (stream {CALLBACK_STREAM}, WorkQueue).",
            kind="openfaas or fal",
        ),
        "deadlines": _channel(DEADLINE_SUBJECT, "deadlineJob", f"Start deadlines (stream {TIMER_STREAM}).")
        | {"parameters": {}},
        "sweeps": _channel(SWEEP_SUBJECT, "sweepJob", f"Object-store sweeps (stream {TIMER_STREAM}).")
        | {"parameters": {}},
        "logs": _channel(
            "jetspool.logs.{request_id}", "logLine", f"Log lines of a request (stream {LOG_STREAM}).", request_id="id"
        ),
        "status": _channel(
            "jetspool.status.{request_id}",
            "statusRecord",
            f"Every write of the {STATUS_BUCKET} bucket, republished (core NATS).",
            request_id="request id",
        ),
        "wake": _channel(
            "jetspool.wake.{function}.{priority}",
            "wakeUp",
            f"Work of a function and class was stored: idle workers pull it. Sent by stream {QUEUE_STREAM} "
            "for each message it stores (a republish of its headers), and by a cancel with the class `any` "
            "(core NATS).",
            function="function name",
            priority="high, normal, low or any",
        ),
        "cancel": _channel(
            "jetspool.cancel.{function}",
            "cancelRunning",
            "A running request was cancelled: the worker running it aborts the call (core NATS).",
            function="function name",
        ),
        "counters": _channel(
            "jetspool.counters.{function}.{counter}",
            "counterIncrement",
            f"Totals (stream {COUNTER_STREAM}, a counter stream): each message adds its `Nats-Incr` to the "
            "subject's total, which a read of the subject's last message gives.",
            function="function name",
            counter=", ".join(COUNTERS),
        ),
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "jetspool",
            "version": __version__,
            "description": "NATS subjects of jetspool. Payloads are JSON unless said; their schemas (JSON Schema "
            "2020-12) are the files beside this one.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": {
            "followEvents": {
                "action": "receive",
                "channel": {"$ref": "#/channels/events"},
                "summary": "Subscribe to status changes (succeeded, failed, ...) of requests.",
            },
        },
        "components": {
            "messages": {
                **{
                    message: {
                        "name": message,
                        "payload": {"schemaFormat": _JSON_SCHEMA_2020_12, "schema": {"$ref": f"{schema}.schema.json"}},
                    }
                    for message, schema in messages.items()
                },
                "wakeUp": {
                    "name": "wakeUp",
                    "contentType": "text/plain",
                    "payload": {"type": "string", "maxLength": 0, "description": "empty: its headers tell what"},
                },
                "counterIncrement": {
                    "name": "counterIncrement",
                    "contentType": "text/plain",
                    "headers": {
                        "type": "object",
                        "properties": {"Nats-Incr": {"type": "string", "description": "what to add, e.g. +1"}},
                        "required": ["Nats-Incr"],
                    },
                    "payload": {"type": "string", "maxLength": 0},
                },
                "cancelRunning": {
                    "name": "cancelRunning",
                    "contentType": "text/plain",
                    "payload": {"type": "string", "description": "the request id"},
                },
            },
        },
    }


def generate() -> dict[str, dict[str, Any]]:
    """File name → JSON Schema (draft 2020-12) for every wire type."""
    schemas = {}
    for name, (kind, where) in WIRE_TYPES.items():
        schema = msgspec.json.schema(kind)
        schemas[f"{name}.schema.json"] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"Generated from jetspool.domain ({kind.__name__}); {where}.",
            **schema,
        }
    return schemas


def _clean_descriptions(node: Any) -> Any:
    """Docstring-born descriptions without their source indentation (msgspec releases differ on it)."""
    if isinstance(node, dict):
        cleaned = {key: _clean_descriptions(value) for key, value in node.items()}
        if isinstance(cleaned.get("description"), str):
            cleaned["description"] = inspect.cleandoc(cleaned["description"])
        return cleaned
    if isinstance(node, list):
        return [_clean_descriptions(item) for item in node]
    return node


def render(schema: dict[str, Any]) -> bytes:
    return msgspec.json.format(msgspec.json.encode(_clean_descriptions(schema)), indent=2) + b"\n"


def main(argv: list[str]) -> int:
    target = Path(argv[0] if argv else "schemas")
    target.mkdir(parents=True, exist_ok=True)
    for filename, schema in generate().items():
        (target / filename).write_bytes(render(schema))
    (target / ASYNCAPI_FILE).write_bytes(render(asyncapi()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
