"""Log lines of requests: one subject per request on the logs stream (SPEC §3).

Writes are plain publishes into the stream (no round trip on the worker's path: a log line
is worth less than a request), but for the worker's closing line, which is acknowledged within
`_ACKED_TIMEOUT_S` before the completion is written. Reads take every line of a request in one
batched direct get.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Final

import msgspec
from nats.errors import Error as NatsError

from jetspool.domain import names
from jetspool.domain.errors import DecodeError
from jetspool.domain.messages import LogLevel, LogLine, decode, encode
from jetspool.domain.status import rfc3339, utcnow
from jetspool.jetstream.direct import direct_batch

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from jetspool.jetstream.connection import Nats

MAX_LINES: Final = 1000
"""Log lines kept per request (the oldest go first), and the most one POST may add."""
MAX_MESSAGE_CHARS: Final = 8192
CLOSING_LINE: Final = "completed, "
"""How the worker's last line of a request begins: `completed, succeeded` or `completed, failed: ...`."""
_READ_TIMEOUT_S = 5.0
_ACKED_TIMEOUT_S = 1.0
"""How long a completion waits for its closing line: a logs stream electing a leader drops the
publish without a reply, and nats-py's 5 s default held every completion for that long."""


class RequestLogs:
    def __init__(self, conn: Nats) -> None:
        self._conn = conn

    async def write(
        self, request_id: str, message: str, *, level: LogLevel = "INFO", source: str = "worker", acked: bool = False
    ) -> None:
        """Store a line of jetspool's own; a failure is let go. `acked`: wait until the stream has
        it, for a line that must be stored before a write that follows to another stream:
        nats-server stores each stream's messages in that stream's own goroutine, so the order of
        publishes on one connection is not the order they are stored in across streams."""
        line = LogLine(message=message[:MAX_MESSAGE_CHARS], level=level, source=source, timestamp=utcnow())
        subject, data = names.log_subject(request_id), encode(line)
        with contextlib.suppress(NatsError, TimeoutError):
            if acked:
                await self._conn.js.publish(subject, data, timeout=_ACKED_TIMEOUT_S)
            else:
                await self._conn.nc.publish(subject, data)

    async def write_acked(self, request_id: str, lines: list[LogLine]) -> None:
        """Store lines and wait for the stream to take them (for lines a function sends us)."""
        for line in lines:
            await self._conn.js.publish(names.log_subject(request_id), encode(line))

    async def read(self, request_id: str) -> list[dict[str, Any]]:
        """Every stored line of the request, oldest first, as status-object entries."""
        query = {"seq": 1, "next_by_subj": names.log_subject(request_id), "batch": MAX_LINES}
        received = await direct_batch(self._conn.nc, names.LOG_STREAM, query, _READ_TIMEOUT_S)
        return [_entry(msg) for msg in received if msg.data]


def _entry(msg: Msg) -> dict[str, Any]:
    try:
        line = decode(msg.data, LogLine)
    except DecodeError:  # not written by jetspool: its text, at the time the stream stored it
        stored_at = (msg.headers or {}).get("Nats-Time-Stamp") or rfc3339(utcnow())
        text = msg.data.decode(errors="replace")
        return {"message": text, "level": "INFO", "source": "unknown", "timestamp": stored_at}
    entry: dict[str, Any] = msgspec.to_builtins(line)
    entry.pop("v", None)
    entry["timestamp"] = rfc3339(line.timestamp)
    return entry
