"""Riding through a node loss: which failures are retried, for how long, and which are not."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import TYPE_CHECKING, Any, cast

import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, KeyNotFoundError, NoStreamResponseError, ServiceUnavailableError

from jetspool.domain.errors import BadRequest
from jetspool.domain.functions import Function
from jetspool.jetstream.registry import FunctionRegistry, RegistryView
from jetspool.jetstream.ridethrough import is_transient, ride_through
from tests.support.servers import eventually

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from jetspool.embedded import EmbeddedNats


@pytest.mark.parametrize(
    "error",
    [
        NatsTimeoutError(),
        TimeoutError(),
        NoRespondersError(),
        NoStreamResponseError(),
        ServiceUnavailableError(code=503, err_code=10008, description="JetStream system temporarily unavailable"),
        APIError(code=500, err_code=10009, description="JetStream cluster can not handle request"),
        APIError(code=409, err_code=10158, description="duplicate message id is in process"),
    ],
    ids=type,
)
def test_what_a_leader_election_or_reconnect_looks_like_is_transient(error: Exception) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        KeyNotFoundError(),
        APIError(code=400, err_code=10071, description="wrong last sequence: 3"),
        APIError(code=400, err_code=10074, description="replicas > 1 not supported in non-clustered mode"),
        ValueError("bad"),
    ],
    ids=type,
)
def test_answers_and_bugs_are_not_transient(error: Exception) -> None:
    assert not is_transient(error)


async def test_a_transient_failure_is_retried_until_the_operation_succeeds() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise NoStreamResponseError
        return "stored"

    assert await ride_through(flaky, "test") == "stored"
    assert calls == 3


async def test_a_lasting_failure_is_raised_once_the_budget_is_spent() -> None:
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise NatsTimeoutError

    with pytest.raises(NatsTimeoutError):
        await ride_through(down, "test", budget_s=0.3)

    assert 1 < calls < 10, "retried with growing pauses, then given up"


async def test_a_non_transient_failure_is_raised_at_once() -> None:
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise APIError(code=400, err_code=10071, description="wrong last sequence")

    with pytest.raises(APIError):
        await ride_through(refused, "test")

    assert calls == 1


class _FirstAnswerLost:
    """A real KV bucket whose first `create` lands but whose answer is lost, as when the node
    that stored it dies before replying."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self.lost = 0

    async def create(self, key: str, value: bytes) -> int:
        revision = await self._kv.create(key, value)
        if not self.lost:
            self.lost += 1
            raise NatsTimeoutError
        return revision

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)


async def test_a_registration_whose_answer_was_lost_is_recognised_as_ours(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().create_key_value(bucket="functions-test")
        ours, theirs = Function(name="f", url="http://127.0.0.1:9/"), Function(name="g", url="http://127.0.0.1:8/")
        await kv.create("g", Function(name="g", url="http://127.0.0.1:7/").encode())

        lossy = _FirstAnswerLost(kv)
        await FunctionRegistry(cast("KeyValue", lossy)).create(ours)
        with pytest.raises(BadRequest, match="already registered"):
            await FunctionRegistry(cast("KeyValue", _FirstAnswerLost(kv))).create(theirs)
        stored = await FunctionRegistry(kv).get("g")
    finally:
        await nc.close()

    assert lossy.lost == 1, "the first answer was lost and the create repeated"
    assert stored.url == "http://127.0.0.1:7/", "a name someone else holds stays theirs"


async def test_a_registry_view_started_while_nats_does_not_answer_waits_it_out(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    """Its watch was not ridden through: a worker starting during a cluster's election stopped
    with a timeout from the watch's consumer create."""
    caplog.set_level(logging.INFO, logger="jetspool.jetstream.ridethrough")
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().create_key_value(bucket="functions-test")
        await FunctionRegistry(kv).create(Function(name="f", url="http://127.0.0.1:9/"))
        view = RegistryView(kv)
        os.kill(nats_server.pid, signal.SIGSTOP)
        try:
            started = asyncio.create_task(view.start())
            await eventually(lambda: "registry watch failed" in caplog.text, timeout_s=20)
        finally:
            os.kill(nats_server.pid, signal.SIGCONT)
        await asyncio.wait_for(started, timeout=30)
        seen = view.get("f")
        await view.stop()
    finally:
        await nc.close()

    assert seen is not None
    assert seen.url == "http://127.0.0.1:9/"
