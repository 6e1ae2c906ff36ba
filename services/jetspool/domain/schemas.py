"""JSON Schemas of every JSON payload jetspool stores or sends over NATS, generated from the wire types.

`schemas/` holds the committed output; `tests/test_schemas.py` fails when it and the types drift
apart, and validates real payloads captured from a running stack against it.
Regenerate with `python -m jetspool.domain.schemas schemas/`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Final

import msgspec

from jetspool.domain.functions import Function
from jetspool.domain.messages import CallbackJob, DeadlineJob, LogLine, QueuedRequest, SweepJob
from jetspool.domain.names import (
    CALLBACK_STREAM,
    DEADLINE_SUBJECT,
    FUNCTIONS_BUCKET,
    LOG_STREAM,
    QUEUE_STREAM,
    STATUS_BUCKET,
    SWEEP_SUBJECT,
    TIMER_STREAM,
)
from jetspool.domain.status import StatusRecord

WIRE_TYPES: Final[dict[str, tuple[type, str]]] = {
    "queue-request": (QueuedRequest, f"message on stream {QUEUE_STREAM}, subject jetspool.queue.<function>.<priority>"),
    "callback-job": (CallbackJob, f"message on stream {CALLBACK_STREAM}, subject jetspool.callbacks.<kind>"),
    "deadline-job": (DeadlineJob, f"message on stream {TIMER_STREAM}, subject {DEADLINE_SUBJECT}"),
    "sweep-job": (SweepJob, f"message on stream {TIMER_STREAM}, subject {SWEEP_SUBJECT}"),
    "log-line": (LogLine, f"message on stream {LOG_STREAM}, subject jetspool.logs.<request id>"),
    "status-record": (StatusRecord, f"value in KV bucket {STATUS_BUCKET}, key <request id>"),
    "function": (Function, f"value in KV bucket {FUNCTIONS_BUCKET}, key <function name>"),
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


def render(schema: dict[str, Any]) -> bytes:
    return msgspec.json.format(msgspec.json.encode(schema), indent=2) + b"\n"


def main(argv: list[str]) -> int:
    target = Path(argv[0] if argv else "schemas")
    target.mkdir(parents=True, exist_ok=True)
    for filename, schema in generate().items():
        (target / filename).write_bytes(render(schema))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
