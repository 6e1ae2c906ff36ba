"""The Python client: submit, follow, fetch and cancel requests, sync (`Client`) or async
(`AsyncClient`), on httpx. It speaks the gateway's fal dialect (SPEC §2).

    from jetspool.client import Client

    with Client("http://127.0.0.1:8080") as jetspool:
        handle = jetspool.submit("echo", json={"prompt": "a cat"})
        for status in handle.iter_events():      # Server-Sent Events, not polling
            print(status.status, status.queue_position)
        print(handle.result().json())

Errors are exceptions: `RequestFailed` (and one subclass per SPEC §5 outcome, each with its
`error_type`) when a request completed without success, `NotFound`, `Refused` (4xx),
`Unauthorized`, `Unreachable`, `BadAnswer` when the server answered what a jetspool gateway
never sends (most likely the URL names some other server), and `WaitTimeout` when the client
gave up waiting.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

import httpx
import orjson
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse, connect_sse

from jetspool.domain import names
from jetspool.domain.functions import NAME_PATTERN, is_base_url, is_valid_name, leaves_its_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

DEFAULT_URL: Final = "http://127.0.0.1:8080"
_MAX_WAIT_S: Final = 600.0
"""The gateway's longest `?wait=`; longer waits are made of several."""
_TIMEOUT_S: Final = 40.0
"""Longer than a gateway rides through a NATS outage (30 s) before it answers 503: at 30 s the client
gave up first, and a retry could not tell whether the submit was stored (found by a CLI audit)."""
_REOPEN_SLACK_S: Final = 0.05
"""A status stream is opened again when its reads could outlast the wait by more than this."""
_PROXY_UNAVAILABLE: Final = frozenset({502, 503, 504})
"""Statuses a proxy or load balancer answers, in its own words, when the gateway behind it is down."""
_QUOTED_CHARS: Final = 80
_STATUS_FIELDS: Final = ("status", "request_id")


# --- errors -------------------------------------------------------------------------------


class JetspoolError(Exception):
    """Anything the gateway refused or could not do; `status_code` is its HTTP status (0: none)."""

    def __init__(self, detail: str, status_code: int = 0) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status_code = status_code


class Unreachable(JetspoolError):
    """The gateway could not be reached, or answered 5xx (a proxy in front of it: 502, 503 or 504)."""


class BadAnswer(JetspoolError):
    """The server answered what a jetspool gateway never sends: not JSON where JSON is due, JSON
    without the fields it must carry, an error without a jetspool error body, a status stream that
    is not one. Its message names the URL and the HTTP status."""


class Unauthorized(JetspoolError):
    """401 or 403: a missing, wrong or insufficient API key."""


class NotFound(JetspoolError):
    """404: no such function or request."""


class Refused(JetspoolError):
    """Another 4xx: bad input, a full queue (429), a request in the wrong state."""


class WaitTimeout(JetspoolError):
    """The client stopped waiting; the request goes on."""


class RequestFailed(JetspoolError):
    """The request completed without success (SPEC §5); `error_type` says how."""

    error_type: str = ""

    def __init__(self, detail: str, status_code: int, request_id: str, result: Result | None = None) -> None:
        super().__init__(detail, status_code)
        self.request_id = request_id
        self.result = result
        """The function's own response, for `function_error`."""


class FunctionError(RequestFailed):
    error_type = "function_error"


class RunnerUnavailable(RequestFailed):
    error_type = "runner_unavailable"


class FunctionTimeout(RequestFailed):
    error_type = "function_timeout"


class StartTimeout(RequestFailed):
    """Not started before its `X-Request-Timeout` (`request_timeout`)."""

    error_type = "request_timeout"


class Cancelled(RequestFailed):
    error_type = "cancelled"


_FAILURES: Final = {
    cls.error_type: cls for cls in (FunctionError, RunnerUnavailable, FunctionTimeout, StartTimeout, Cancelled)
}


# --- values -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    """A status object (SPEC §3)."""

    status: str
    request_id: str
    queue_position: int | None = None
    attempts: int = 0
    error: str | None = None
    error_type: str | None = None
    logs: list[dict[str, Any]] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.status == "COMPLETED"

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Status:
        return cls(
            status=raw["status"],
            request_id=raw["request_id"],
            queue_position=raw.get("queue_position"),
            attempts=raw.get("attempts", 0),
            error=raw.get("error"),
            error_type=raw.get("error_type"),
            logs=raw.get("logs"),
            raw=raw,
        )


@dataclass(frozen=True, slots=True)
class Result:
    """A function's response to a request."""

    status_code: int
    content_type: str | None
    body: bytes
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    """The answer's headers: the function's own, as its result kept them, and jetspool's."""

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class Submission:
    """What `submit` sends, built once for both clients."""

    path: str
    content: bytes
    headers: dict[str, str]
    params: list[tuple[str, str]]


def submission(
    name: str,
    *,
    json: Any = None,
    content: bytes | str | None = None,
    path: str = "",
    priority: str | None = None,
    callback_url: str | None = None,
    webhook_url: str | None = None,
    start_timeout: float | None = None,
    no_retry: bool = False,
    idempotency_key: str | None = None,
    headers: dict[str, str] | None = None,
) -> Submission:
    sent = dict(headers or {})
    if json is not None:
        body = orjson.dumps(json)
        sent.setdefault("Content-Type", "application/json")
    else:
        body = content.encode() if isinstance(content, str) else (content or b"")
    options = {
        names.H_QUEUE_PRIORITY: priority,
        names.H_CALLBACK_URL: callback_url,
        names.H_REQUEST_TIMEOUT: None if start_timeout is None else f"{start_timeout:g}",
        "X-No-Retry": "1" if no_retry else None,
        "Idempotency-Key": idempotency_key,
    }
    sent |= {key: value for key, value in options.items() if value is not None}
    # A query in `path` goes to the function with the sub-path; passed in the URL it was dropped,
    # since httpx replaces a URL's query with `params` (found by a CLI audit).
    path, _, query = path.partition("?")
    if leaves_its_url(path):  # the HTTP client resolved it before the gateway could refuse it
        raise ValueError(f"sub-path {path!r} has a '.' or '..' segment: it would leave the function's URL")
    params = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if webhook_url:
        params.append(("fal_webhook", webhook_url))
    route = f"/queue/{function_name(name)}" + (f"/{path.lstrip('/')}" if path else "")
    return Submission(route, body, sent, params)


def function_name(name: str) -> str:
    """`name`, checked before it goes into a URL: a name with `/` or `..` reached another function
    or route (`../system/functions` registered a function; found by a CLI audit). ValueError
    for one that SPEC §1's pattern refuses."""
    if not is_valid_name(name):
        raise ValueError(f"{name!r} is not a function name ({NAME_PATTERN})")
    return name


def _unreachable(base_url: httpx.URL, exc: httpx.TransportError) -> Unreachable:
    """Unreachable, saying whether the gateway was not reached or did not answer in time: a submit
    riding out a NATS outage was told the gateway could not be reached (found by a CLI audit)."""
    if isinstance(exc, httpx.ReadTimeout):
        return Unreachable(f"the gateway at {base_url} did not answer in time (is its NATS down?): {exc}")
    return Unreachable(f"cannot reach the gateway at {base_url}: {exc}")


def _not_completed(request_id: str, timeout: float | None) -> str:
    """The message of a result not there in time; a look without a wait (the `result` command) said
    "did not complete within 0 s" (found by a CLI audit)."""
    if not timeout:
        return f"request {request_id} has not completed yet; it goes on"
    return f"request {request_id} did not complete within {timeout:g} s"


def _entry_path(function: dict[str, Any]) -> str:
    """The registry route of a function entry."""
    return f"/system/functions/{function_name(str(function.get('name', '')))}"


def _request_path(name: str, request_id: str) -> str:
    """The URL path of a request. ValueError for an id that is not a UUID, as the gateway's 422: one
    with `/` and `..` reached another route, resolved by the HTTP client (found by a CLI audit)."""
    try:
        canonical = uuid.UUID(request_id)
    except ValueError:
        raise ValueError(f"malformed request id {request_id!r}: expected a UUID") from None
    return f"/queue/{function_name(name)}/requests/{canonical}"


def _auth(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("JETSPOOL_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _base_url(url: str | None) -> str:
    """The gateway's base URL; ValueError for one that is not `http(s)://HOST[:PORT][/PATH]`: httpx
    drops the path of a base URL with a query, and every call went to `/`, a 404 taken for an
    unknown request."""
    base = url or os.environ.get("JETSPOOL_URL") or DEFAULT_URL
    if not is_base_url(base):
        raise ValueError(f"{base!r} is not a gateway URL: http://HOST[:PORT][/PATH] or https://..., no query")
    return base.rstrip("/")


def _checked(response: httpx.Response) -> httpx.Response:
    """`response` if 2xx, else the matching JetspoolError (read a streamed response first)."""
    if response.is_success:
        return response
    code = response.status_code
    detail = _error_detail(response)
    if detail is None and code in _PROXY_UNAVAILABLE:
        raise Unreachable(f"{_where(response)} answered HTTP {code}: {_quoted(response)}", code)
    if detail is None:
        raise _bad_answer(response, "not a jetspool error")
    if code in {401, 403}:
        raise Unauthorized(detail, code)
    if code == 404:  # noqa: PLR2004
        raise NotFound(detail, code)
    if code >= 500:  # noqa: PLR2004
        raise Unreachable(f"{_where(response)} answered HTTP {code}: {detail}", code)
    raise Refused(detail, code)


def _error_detail(response: httpx.Response) -> str | None:
    """The `detail` of a jetspool error body (a JSON object with a string `detail`); None for any other body."""
    body = _parsed(response.content)
    detail = body.get("detail") if isinstance(body, dict) else None
    return detail if isinstance(detail, str) else None


def _parsed(content: bytes | str) -> Any:
    """The JSON value of `content`; None when it is not JSON."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


def _object(response: httpx.Response, *fields: str) -> dict[str, Any]:
    """The JSON object of a 2xx answer, each of `fields` a string in it; else BadAnswer."""
    body = _parsed(response.content)
    if not _has(body, fields):
        raise _bad_answer(response, f"not a JSON object with {', '.join(fields)}")
    return dict(body)


def _objects(response: httpx.Response, *fields: str) -> list[dict[str, Any]]:
    """The JSON list of objects of a 2xx answer, each of `fields` a string in each; else BadAnswer."""
    body = _parsed(response.content)
    if not isinstance(body, list) or not all(_has(item, fields) for item in body):
        raise _bad_answer(response, f"not a JSON list of objects with {', '.join(fields)}")
    return [dict(item) for item in body]


def _has(body: Any, fields: tuple[str, ...]) -> bool:
    return isinstance(body, dict) and all(isinstance(body.get(name), str) for name in fields)


def _event_status(response: httpx.Response, data: str) -> Status:
    """The status object an SSE event carries; BadAnswer for anything else."""
    body = _parsed(data)
    if not _has(body, _STATUS_FIELDS):
        raise _bad_answer(response, f"an event that is not a status object: {_clipped(data)}", quote=False)
    return Status.of(body)


_RESUMES: Final = 6
_RESUME_FIRST_PAUSE_S: Final = 0.25


@dataclass
class _Resume:
    """Where a status stream got to. A stream that ends or breaks before COMPLETED (its gateway
    stopped: it ends its streams, and another gateway behind the same address goes on) is opened
    again with `Last-Event-ID`, after a growing pause, up to `_RESUMES` times in a row (about 16 s);
    then Unreachable. A resumed stream starts with the current state: one already seen is not
    told again."""

    last_id: str | None = None
    last_data: str | None = None
    done: bool = False
    failed: int = 0

    @property
    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": self.last_id} if self.last_id else {}

    def take(self, response: httpx.Response, event: ServerSentEvent) -> Status | None:
        """The status `event` carries, if it is news."""
        self.failed = 0
        if event.id:
            self.last_id = event.id
        if not event.data or event.data == self.last_data:
            return None
        self.last_data = event.data
        status = _event_status(response, event.data)
        self.done = status.completed
        return status

    def pause(self, broke: httpx.TransportError | None) -> float:
        """How long to wait before resuming; Unreachable once it failed `_RESUMES` times in a row."""
        self.failed += 1
        if self.failed > _RESUMES:
            why = f"it broke: {broke}" if broke else "it kept ending before the request completed"
            raise Unreachable(f"the status stream could not be resumed; {why}")
        return _growing_pause(self.failed)


def _growing_pause(failed: int) -> float:
    """The pause before trying again after `failed` failures in a row: 0.25 s, doubling."""
    return float(_RESUME_FIRST_PAUSE_S * 2 ** (failed - 1))


@dataclass
class _Quiet:
    """How long a status stream has said nothing new, against the caller's `idle_s`: WaitTimeout
    once it passes. A limit on each read did not do alone: the gateway's keep-alive comment every
    15 s restarted it, so a wait of more than 15 s never gave up (found by an audit). So the time
    is checked whenever the stream speaks, and a stream whose next read could outlast what is
    left of it (a keep-alive came, and no news) is opened again with that as its limit, resumed
    where it was: a wait ended up to one keep-alive late before."""

    idle_s: float | None
    since: float = field(default_factory=time.monotonic)
    limit: float | None = None
    """The limit on each read of the stream open now."""

    def heard(self) -> None:
        self.since = time.monotonic()

    def left(self) -> float | None:
        return None if self.idle_s is None else self.idle_s - (time.monotonic() - self.since)

    def check(self) -> None:
        left = self.left()
        if left is not None and left <= 0:
            raise WaitTimeout(f"no status change within {self.idle_s:g} s")

    def source(self, response: httpx.Response) -> EventSource:
        """The events of `response`, checked as its text arrives."""
        return EventSource(cast("httpx.Response", _Watched(response, self)))

    def read_timeout(self) -> httpx.Timeout:
        """The limit on each read of a stream opened now: what is left of `idle_s` (no limit on the
        stream's length). A read that times out early (news came since) opens the stream again."""
        self.check()
        self.limit = self.left()
        return httpx.Timeout(_TIMEOUT_S, read=self.limit)

    def outlasting(self) -> bool:
        """Whether the open stream's next read could outlast what is left of `idle_s`."""
        left = self.left()
        return left is not None and self.limit is not None and self.limit > left + _REOPEN_SLACK_S


class _Reopen(Exception):
    """The status stream is to be opened again (`_Quiet.outlasting`)."""


class _Watched:
    """The part of a response an `EventSource` reads, checking the quiet around each piece of text."""

    def __init__(self, response: httpx.Response, quiet: _Quiet) -> None:
        self.headers = response.headers
        self._response = response
        self._quiet = quiet

    def iter_text(self) -> Iterator[str]:
        for text in self._response.iter_text():
            self._quiet.check()
            yield text
            if self._quiet.outlasting():  # its events taken: the next read is the one to bound
                raise _Reopen

    async def aiter_text(self) -> AsyncIterator[str]:
        async for text in self._response.aiter_text():
            self._quiet.check()
            yield text
            if self._quiet.outlasting():
                raise _Reopen


@dataclass
class _Polls:
    """A result's wait rides through what a gateway going away looks like: a refused connection
    (it restarts), a 503 (its NATS is away, or it holds its maximum of waits) or a proxy's 502/504.
    Each is tried again after a growing pause, up to `_RESUMES` times in a row (about 16 s), as a
    status stream is resumed; then Unreachable, naming the request (a queued one goes on). A
    wait gave up at the first of them, and `run()` said nothing of the request it had queued
    (found by an audit)."""

    request_id: str
    deadline: float | None
    failed: int = 0

    def pause(self, exc: Unreachable) -> float:
        """How long to wait before polling again; Unreachable when it is time to give up."""
        self.failed += 1
        pause_s = _growing_pause(self.failed)
        late = self.deadline is not None and time.monotonic() + pause_s >= self.deadline
        if self.failed > _RESUMES or late:
            queued = (
                f"the result of request {self.request_id} could not be fetched (a queued request goes on meanwhile)"
            )
            raise Unreachable(f"{queued}: {exc.detail}", exc.status_code) from exc
        return pause_s


def _event_stream(response: httpx.Response) -> None:
    """BadAnswer unless `response` is a stream of Server-Sent Events."""
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        raise _bad_answer(response, "not a status stream (text/event-stream)", quote=False)


def _cancel_requested(response: httpx.Response) -> bool:
    """True for a cancellation requested, False for a request already completed (fal's 400)."""
    if response.status_code == 400 and _has(_parsed(response.content), ("status",)):  # noqa: PLR2004
        return False
    _object(_checked(response), "status")
    return True


def _bad_answer(response: httpx.Response, what: str, *, quote: bool = True) -> BadAnswer:
    """`response` is not what a jetspool gateway sends: `what` is wrong with it."""
    shown = f"{what}: {_quoted(response)}" if quote else what
    return BadAnswer(
        f"{_where(response)} answered HTTP {response.status_code} ({_content_type(response)}), {shown}; "
        "is it a jetspool gateway?",
        response.status_code,
    )


def _where(response: httpx.Response) -> str:
    """The request's method and URL, without any user name or password the URL carried."""
    url = response.request.url
    return f"{response.request.method} {url.scheme}://{url.netloc.decode('ascii')}{url.raw_path.decode('ascii')}"


def _content_type(response: httpx.Response) -> str:
    return response.headers.get("content-type") or "no content type"


def _quoted(response: httpx.Response) -> str:
    """The start of the body on one line, or what stands for it."""
    if not response.is_stream_consumed and not response.is_closed:
        return "(a stream)"
    return _clipped(response.text) if response.content.strip() else "(no body)"


def escaped(text: str) -> str:
    """`text` with its line breaks and other unprintable characters escaped (`\\n`, `\\x1b`), safe
    to show on a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _clipped(text: str) -> str:
    """`text` on one line, control characters escaped, cut to its first _QUOTED_CHARS characters."""
    flat = " ".join(text.split())
    shown = escaped(flat[:_QUOTED_CHARS])
    return repr(shown + ("…" if len(flat) > _QUOTED_CHARS else ""))


def _result(response: httpx.Response, request_id: str) -> Result | None:
    """The result of a completed request; None while it is not completed; RequestFailed for failures.

    A gateway's every answer about a request names it in `X-Request-Id` (SPEC §2): one without,
    short of a 5xx (a proxy's, while the gateway is away), is BadAnswer. Another server's page was
    taken for the result, and `jetspool result` printed it and exited 0 (found by an outside audit)."""
    if response.status_code < 500 and names.H_REQUEST_ID not in response.headers:  # noqa: PLR2004
        raise _bad_answer(response, "an answer without X-Request-Id")
    error_type = response.headers.get(names.H_ERROR_TYPE)
    code = response.headers.get(names.H_FUNCTION_STATUS)  # the function's 409, which the route answers as 400
    status = int(code) if code is not None and code.isascii() and code.isdigit() else response.status_code
    result = Result(status, response.headers.get("content-type"), response.content, response.headers)
    if error_type is not None:
        failure = _FAILURES.get(error_type, RequestFailed)
        body = _parsed(response.content)
        detail = body.get("detail") if isinstance(body, dict) else None
        if not detail:  # a function's own JSON error often has no "detail": "function_error" said nothing
            detail = f"the function answered {status}" if error_type == "function_error" else error_type
        raise failure(str(detail), status, request_id, result if error_type == "function_error" else None)
    if response.status_code == 400 and response.headers.get("content-type", "").startswith("application/json"):  # noqa: PLR2004
        body = _parsed(response.content)
        if isinstance(body, dict) and body.get("status") in {"IN_QUEUE", "IN_PROGRESS"}:
            return None
    _checked(response)
    return result


def _remaining(deadline: float | None) -> float:
    if deadline is None:
        return _MAX_WAIT_S
    return max(0.0, min(_MAX_WAIT_S, deadline - time.monotonic()))


# --- sync ---------------------------------------------------------------------------------


class Client:
    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = _TIMEOUT_S) -> None:
        """`url`: the gateway (default `$JETSPOOL_URL`, else http://127.0.0.1:8080); `api_key`: default
        `$JETSPOOL_API_KEY`; `timeout`: seconds for one HTTP exchange."""
        self._http = httpx.Client(base_url=_base_url(url), headers=_auth(api_key), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One HTTP exchange with the gateway (httpx keywords); Unreachable when there is none."""
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self._http.base_url, exc) from exc

    def events(self, url: str, params: dict[str, str], idle_s: float | None = None) -> Iterator[Status]:
        """The status objects of an SSE stream at `url`, until COMPLETED (WaitTimeout: none for
        `idle_s` s). A stream that ends or breaks before is resumed (see `_Resume`)."""
        resume, quiet = _Resume(), _Quiet(idle_s)
        while True:
            broke: httpx.TransportError | None = None
            try:
                timeout = quiet.read_timeout()
                with connect_sse(
                    self._http, "GET", url, params=params, headers=resume.headers, timeout=timeout
                ) as source:
                    if not source.response.is_success:
                        source.response.read()
                    _event_stream(_checked(source.response))
                    for event in quiet.source(source.response).iter_sse():
                        status = resume.take(source.response, event)
                        if status is not None:
                            yield status
                            quiet.heard()
            except (httpx.ReadTimeout, _Reopen):
                if resume.done:
                    return
                quiet.check()  # else news came, or a keep-alive: opened again with what is left
                continue
            except httpx.TransportError as exc:
                broke = exc
            if resume.done:
                return
            time.sleep(resume.pause(broke))

    def submit(self, name: str, **options: Any) -> Handle:
        """Queue a request (keywords: see `submission`); returns its handle at once."""
        sent = submission(name, **options)
        response = _checked(
            self.send("POST", sent.path, content=sent.content, headers=sent.headers, params=sent.params)
        )
        return Handle(self, name, _object(response, "request_id")["request_id"])

    def handle(self, name: str, request_id: str) -> Handle:
        return Handle(self, name, request_id)

    def run(self, name: str, *, client_timeout: float | None = None, **options: Any) -> Result:
        """Submit and wait for the result (at most `client_timeout` seconds: WaitTimeout)."""
        return self.submit(name, **options).result(timeout=client_timeout)

    def functions(self) -> list[dict[str, Any]]:
        return _objects(_checked(self.send("GET", "/system/functions")), "name", "url")

    def deploy(self, function: dict[str, Any]) -> dict[str, Any]:
        """Create or replace a function (a registry entry: name, url, ...)."""
        return _object(_checked(self.send("PUT", _entry_path(function), json=function)), "name")

    def remove(self, name: str) -> None:
        _checked(self.send("DELETE", f"/system/functions/{function_name(name)}"))


@dataclass(frozen=True, slots=True)
class Handle:
    client: Client
    function: str
    request_id: str

    @property
    def _prefix(self) -> str:
        return _request_path(self.function, self.request_id)

    def status(self, *, logs: bool = False) -> Status:
        response = self.client.send("GET", f"{self._prefix}/status", params={"logs": "1" if logs else "0"})
        return Status.of(_object(_checked(response), *_STATUS_FIELDS))

    def iter_events(self, *, logs: bool = False, timeout: float | None = None) -> Iterator[Status]:
        """The status at once, then each change, until COMPLETED (the gateway's SSE stream);
        WaitTimeout when nothing arrives for `timeout` seconds."""
        return self.client.events(f"{self._prefix}/status/stream", {"logs": "1" if logs else "0"}, timeout)

    def result(self, timeout: float | None = None) -> Result:
        """The function's response once completed, waiting at most `timeout` seconds (None: as long as
        it takes); a gateway going away is ridden through (`_Polls`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        polls = _Polls(self.request_id, deadline)
        while True:
            wait_s = _remaining(deadline)
            try:
                response = self.client.send(
                    "GET", self._prefix, params={"wait": f"{wait_s:g}"}, timeout=wait_s + _TIMEOUT_S
                )
                result = _result(response, self.request_id)
            except Unreachable as exc:
                time.sleep(polls.pause(exc))
                continue
            polls.failed = 0
            if result is not None:
                return result
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(_not_completed(self.request_id, timeout))

    def cancel(self) -> bool:
        """Ask for cancellation; True when requested, False when it had already completed."""
        response = self.client.send("PUT", f"{self._prefix}/cancel")
        return _cancel_requested(response)


# --- async --------------------------------------------------------------------------------


class AsyncClient:
    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = _TIMEOUT_S) -> None:
        """As `Client`, for asyncio."""
        self._http = httpx.AsyncClient(base_url=_base_url(url), headers=_auth(api_key), timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One HTTP exchange with the gateway (httpx keywords); Unreachable when there is none."""
        try:
            return await self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self._http.base_url, exc) from exc

    async def events(self, url: str, params: dict[str, str], idle_s: float | None = None) -> AsyncIterator[Status]:
        """As `Client.events`."""
        resume, quiet = _Resume(), _Quiet(idle_s)
        while True:
            broke: httpx.TransportError | None = None
            try:
                timeout = quiet.read_timeout()
                async with aconnect_sse(
                    self._http, "GET", url, params=params, headers=resume.headers, timeout=timeout
                ) as source:
                    if not source.response.is_success:
                        await source.response.aread()
                    _event_stream(_checked(source.response))
                    async for event in quiet.source(source.response).aiter_sse():
                        status = resume.take(source.response, event)
                        if status is not None:
                            yield status
                            quiet.heard()
            except (httpx.ReadTimeout, _Reopen):
                if resume.done:
                    return
                quiet.check()  # as in `Client.events`
                continue
            except httpx.TransportError as exc:
                broke = exc
            if resume.done:
                return
            await asyncio.sleep(resume.pause(broke))

    async def submit(self, name: str, **options: Any) -> AsyncHandle:
        sent = submission(name, **options)
        response = await self.send("POST", sent.path, content=sent.content, headers=sent.headers, params=sent.params)
        return AsyncHandle(self, name, _object(_checked(response), "request_id")["request_id"])

    def handle(self, name: str, request_id: str) -> AsyncHandle:
        return AsyncHandle(self, name, request_id)

    async def run(self, name: str, *, client_timeout: float | None = None, **options: Any) -> Result:
        return await (await self.submit(name, **options)).result(timeout=client_timeout)

    async def functions(self) -> list[dict[str, Any]]:
        return _objects(_checked(await self.send("GET", "/system/functions")), "name", "url")

    async def deploy(self, function: dict[str, Any]) -> dict[str, Any]:
        response = await self.send("PUT", _entry_path(function), json=function)
        return _object(_checked(response), "name")

    async def remove(self, name: str) -> None:
        _checked(await self.send("DELETE", f"/system/functions/{function_name(name)}"))


@dataclass(frozen=True, slots=True)
class AsyncHandle:
    client: AsyncClient
    function: str
    request_id: str

    @property
    def _prefix(self) -> str:
        return _request_path(self.function, self.request_id)

    async def status(self, *, logs: bool = False) -> Status:
        response = await self.client.send("GET", f"{self._prefix}/status", params={"logs": "1" if logs else "0"})
        return Status.of(_object(_checked(response), *_STATUS_FIELDS))

    def iter_events(self, *, logs: bool = False, timeout: float | None = None) -> AsyncIterator[Status]:
        """The status at once, then each change, until COMPLETED (the gateway's SSE stream);
        WaitTimeout when nothing arrives for `timeout` seconds."""
        return self.client.events(f"{self._prefix}/status/stream", {"logs": "1" if logs else "0"}, timeout)

    async def result(self, timeout: float | None = None) -> Result:  # noqa: ASYNC109 - fal's `result(timeout=)`
        """The function's response once completed, waiting at most `timeout` seconds (None: as long as
        it takes); a gateway going away is ridden through (`_Polls`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        polls = _Polls(self.request_id, deadline)
        while True:
            wait_s = _remaining(deadline)
            try:
                response = await self.client.send(
                    "GET", self._prefix, params={"wait": f"{wait_s:g}"}, timeout=wait_s + _TIMEOUT_S
                )
                result = _result(response, self.request_id)
            except Unreachable as exc:
                await asyncio.sleep(polls.pause(exc))
                continue
            polls.failed = 0
            if result is not None:
                return result
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(_not_completed(self.request_id, timeout))

    async def cancel(self) -> bool:
        response = await self.client.send("PUT", f"{self._prefix}/cancel")
        return _cancel_requested(response)
