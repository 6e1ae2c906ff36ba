"""Hostile input, generated (Hypothesis): thousands of odd names, ids, paths, queries, headers
and bodies against the real gateway. Never a 5xx, and a refused request queues nothing (the
queue stream's last sequence does not move)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jetspool.domain import names

if TYPE_CHECKING:
    from jetspool.jetstream.connection import Nats
    from tests.support.stack import Stack

_PRINTABLE = st.characters(min_codepoint=32, max_codepoint=126)
_HOSTILE_TEXT = st.one_of(
    st.sampled_from(["", " ", ".", "*", ">", "a.b", "..", "%00", "-1", "1e309", "nan", "0", "99999999999999999999"]),
    st.text(_PRINTABLE, max_size=40),
    st.text(max_size=20),
)
_NAMES = st.one_of(
    st.sampled_from(["echo", "nope", "a.b", "*", ">", "ECHO", "e cho", "echo\n", "x" * 80]), _HOSTILE_TEXT
)
_URLS = st.one_of(
    st.sampled_from(
        [
            "http://169.254.169.254/latest",
            "http://[::ffff:169.254.169.254]/",
            "ftp://example.com/",
            "http://",
            "https://[::1",
            "http://0.0.0.0/",
            "javascript:alert(1)",
        ]
    ),
    st.text(_PRINTABLE, max_size=60),
)
_HEADER_VALUES = st.text(_PRINTABLE, max_size=300).map(str.strip)
_SUBMIT_HEADERS = st.dictionaries(
    st.sampled_from(
        [
            "X-Queue-Priority",
            "X-Fal-Queue-Priority",
            "X-Request-Timeout",
            "X-Fal-Request-Timeout",
            "X-No-Retry",
            "Idempotency-Key",
            "X-Callback-Url",
            "Content-Type",
            "Last-Event-ID",
        ]
    ),
    st.one_of(_HEADER_VALUES, _URLS.filter(lambda u: "\n" not in u and "\r" not in u).map(str.strip)),
    max_size=4,
)
_QUERIES = st.dictionaries(
    st.sampled_from(
        [
            "fal_webhook",
            "webhook",
            "webhookEndpoint",
            "max_queue_length",
            "fal_max_queue_length",
            "async",
            "wait",
            "logs",
        ]
    )
    | st.text(_PRINTABLE, max_size=10),
    st.one_of(_HOSTILE_TEXT, _URLS),
    max_size=3,
)


@dataclass(frozen=True)
class Hostile:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@st.composite
def _submits(draw: st.DrawFn) -> Hostile:
    name = quote(draw(_NAMES), safe="")
    sub = "/".join(quote(part, safe="") for part in draw(st.lists(_HOSTILE_TEXT, max_size=3)))
    route = draw(
        st.sampled_from(["/queue/{n}", "/async-function/{n}", "/fal/queue/submit/{n}", "/function/{n}"])
    ).format(n=name)
    path = f"{route}/{sub}" if sub else route
    query = draw(_QUERIES)
    if route.startswith("/function/") and draw(st.booleans()):
        query["async"] = "true"
    return Hostile("POST", path, query, draw(_SUBMIT_HEADERS), draw(st.binary(max_size=2048)))


@st.composite
def _lookups(draw: st.DrawFn) -> Hostile:
    name = quote(draw(_NAMES), safe="")
    request_id = draw(st.one_of(st.uuids().map(str), _HOSTILE_TEXT.map(lambda t: quote(t, safe=""))))
    method, template = draw(
        st.sampled_from(
            [
                ("GET", "/queue/{n}/requests/{i}/status"),
                ("GET", "/queue/{n}/requests/{i}"),
                ("PUT", "/queue/{n}/requests/{i}/cancel"),
                ("POST", "/queue/{n}/requests/{i}/retry"),
                ("POST", "/queue/{n}/requests/{i}/callback/redeliver"),
                ("POST", "/queue/{n}/requests/{i}/logs"),
                ("GET", "/fal/queue/{i}/get"),
                ("PUT", "/fal/queue/{i}/cancel"),
                ("GET", "/system/functions/{n}"),
                ("PUT", "/system/functions/{n}"),
                ("POST", "/system/functions"),
                ("POST", "/system/functions/{n}/purge"),
            ]
        )
    )
    body = draw(
        st.one_of(
            st.binary(max_size=512),
            st.dictionaries(
                st.sampled_from(["name", "url", "timeout", "max_attempts", "concurrency", "cancel_path", "headers"]),
                st.one_of(st.integers(), st.floats(allow_nan=True), _HOSTILE_TEXT, st.none(), st.lists(st.integers())),
            ).map(lambda d: repr(d).replace("'", '"').encode()),
        )
    )
    return Hostile(method, template.format(n=name, i=request_id), draw(_QUERIES), draw(_SUBMIT_HEADERS), body)


async def _last_seq(conn: Nats) -> int:
    return int((await conn.js.stream_info(names.QUEUE_STREAM)).state.last_seq)


async def _send(stack: Stack, conn: Nats, hostile: Hostile) -> None:
    before = await _last_seq(conn)
    try:
        response = await stack.client.request(
            hostile.method,
            hostile.path,
            params=hostile.query,
            headers=hostile.headers,
            content=hostile.body,
            timeout=10,
        )
    except httpx.InvalidURL:
        return  # not a request a client can send
    event(f"answered {response.status_code // 100}xx")
    context = f"{hostile} -> {response.status_code} {response.text[:300]}"
    assert response.status_code < 500, context
    if response.status_code >= 400:
        assert await _last_seq(conn) == before, f"a refused request queued something: {context}"


_FUZZ = settings(
    max_examples=1200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@pytest.mark.timeout(300)
@_FUZZ
@given(hostile=_submits())
async def test_hostile_submissions_never_fail_and_a_refusal_queues_nothing(
    stack_without_worker: Stack, conn: Nats, hostile: Hostile
) -> None:
    await _ensure_echo(stack_without_worker)
    await _send(stack_without_worker, conn, hostile)


@pytest.mark.timeout(300)
@_FUZZ
@given(hostile=_lookups())
async def test_hostile_lookups_and_admin_calls_never_fail(
    stack_without_worker: Stack, conn: Nats, hostile: Hostile
) -> None:
    await _ensure_echo(stack_without_worker)
    await _send(stack_without_worker, conn, hostile)


async def _ensure_echo(stack: Stack) -> None:
    body: dict[str, Any] = {"name": "echo", "url": stack.function_url("/echo")}
    response = await stack.client.put("/system/functions/echo", json=body)
    assert response.status_code in {200, 201}, response.text
