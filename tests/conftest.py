"""Fixtures on real processes: a nats-server per test (temp store, free port) and whole stacks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from jetspool.embedded import EmbeddedNats
from jetspool.jetstream.connection import Nats, connect
from jetspool.settings import NatsSettings
from tests.support.faults import CountingEcho
from tests.support.processes import Up
from tests.support.servers import AsgiServer, free_port
from tests.support.stack import Stack, start_stack

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats", sync_interval="always")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    """`jetspool up --demo` on a free port and a temp data dir, announced ready."""
    running = Up(tmp_path / "data", free_port())
    yield running
    running.proc.kill_tree()


@pytest.fixture
async def conn(nats_server: EmbeddedNats) -> AsyncIterator[Nats]:
    """A connection of the test's own to `nats_server`, to look at what jetspool stored."""
    connection = await connect(NatsSettings(url=nats_server.url), "test")
    yield connection
    await connection.close()


@pytest.fixture
async def stack(nats_server: EmbeddedNats) -> AsyncIterator[Stack]:
    """A gateway, a worker, a recording function server and a callback receiver."""
    running = await start_stack(nats_server)
    yield running
    await running.close()


@pytest.fixture
async def stack_without_worker(nats_server: EmbeddedNats) -> AsyncIterator[Stack]:
    """Like `stack`, with no worker: requests stay queued."""
    running = await start_stack(nats_server, worker=False)
    yield running
    await running.close()


@pytest.fixture
async def echo() -> AsyncIterator[tuple[CountingEcho, AsgiServer]]:
    """A counting echo function (tests/support/faults.py) served on a free port."""
    app = CountingEcho()
    server = AsgiServer(app)
    await server.start()
    yield app, server
    await server.stop()
