"""`POST /queue/{name}/requests/{id}/logs?token=...`: the X-Logs-Url a running function appends log lines to.

Open without an API key: the per-request token is the credential. The body is a JSON object
`{"message", "level"?, "source"?}`, a JSON list of them, or `text/plain` with one message per line.
"""

from __future__ import annotations

import hmac
from typing import Any, Final

import msgspec
from litestar import Request, Response, post
from litestar.params import FromPath, FromQuery

from jetspool.domain import names
from jetspool.domain.errors import InvalidInput, RequestError
from jetspool.domain.messages import LogLevel, LogLine
from jetspool.domain.status import utcnow
from jetspool.domain.validation import describe
from jetspool.gateway.lookup import require_request
from jetspool.gateway.state import GatewayDep
from jetspool.jetstream.logs import MAX_LINES, MAX_MESSAGE_CHARS


class Unauthorized(RequestError):
    status_code = 401


class _Posted(msgspec.Struct, forbid_unknown_fields=True):
    message: str
    level: LogLevel = "INFO"
    source: str = "function"


_PLAIN: Final = "text/plain"


@post("/queue/{name:str}/requests/{request_id:str}/logs", status_code=202)
async def append_logs(
    request: Request[Any, Any, Any],
    gateway: GatewayDep,
    name: FromPath[str],
    request_id: FromPath[str],
    token: FromQuery[str | None] = None,
) -> Response[dict[str, int]]:
    """Append log lines to a request; 202 with how many were stored."""
    record = (await require_request(gateway, name, request_id)).record
    if token is None or not hmac.compare_digest(token.encode(), record.logs_token.encode()):
        raise Unauthorized("a valid token for this request's logs is required (use the X-Logs-Url as given)")
    lines = _lines(await request.body(), request.headers.get("content-type", ""))
    await gateway.logs.write_acked(record.request_id, lines)
    return Response({"accepted": len(lines)}, status_code=202, headers={names.H_REQUEST_ID: record.request_id})


def _lines(body: bytes, content_type: str) -> list[LogLine]:
    now = utcnow()
    media_type, _, parameters = content_type.partition(";")
    if media_type.strip().lower() == _PLAIN:
        charset = _charset(parameters)
        try:
            text = body.decode(charset, errors="replace")
        except (LookupError, UnicodeError):  # unknown, or no text encoding (base64, rot13): a 500 (a review)
            raise InvalidInput(f"charset {charset!r} of the content type is no text encoding Python knows") from None
        posted = [_Posted(message=line) for line in text.splitlines() if line.strip()]
    else:
        try:
            raw = msgspec.json.decode(body)
            items = raw if isinstance(raw, list) else [raw]
            posted = msgspec.convert(items, list[_Posted])
        except msgspec.DecodeError as exc:
            raise InvalidInput(f"log lines must be JSON or text/plain: {exc}") from exc
        except msgspec.ValidationError as exc:
            raise InvalidInput(f"invalid log line: {describe(exc)}") from exc
    if len(posted) > MAX_LINES:
        raise InvalidInput(f"at most {MAX_LINES} lines per request")
    return [
        LogLine(message=p.message[:MAX_MESSAGE_CHARS], level=p.level, source=p.source[:64], timestamp=now)
        for p in posted
    ]


def _charset(parameters: str) -> str:
    """The `charset=` among a content type's parameters (UTF-8 if none). A declared charset was
    ignored: Latin-1 text came out with its accented letters replaced (found by an outside audit)."""
    for parameter in parameters.split(";"):
        key, _, value = parameter.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"')
    return "utf-8"
