"""Per-function totals on the counters stream: a count sent twice counts once, across a nats-server
restart too, and the stream keeps the increments of the duplicate window and each total, no more."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from jetspool.domain import names
from jetspool.embedded import EmbeddedNats
from jetspool.jetstream.connection import Nats, connect
from jetspool.jetstream.provision import provision
from jetspool.jetstream.stats import CounterTrim, StatsReader, count, trim_counters
from jetspool.settings import NatsSettings
from tests.support.servers import eventually, eventually_true

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

    from jetspool.domain.names import Counter


async def _counts_to(conn: Nats, function: str, counter: Counter, total: int) -> None:
    """Wait until `counter` of `function` reads `total` (a count goes without waiting for its ack)."""

    async def reached() -> bool:
        return (await StatsReader(conn).totals(function))[counter] == total

    await eventually_true(reached, timeout_s=10)


async def _kept(conn: Nats) -> dict[str, int]:
    return (await conn.js.stream_info(names.COUNTER_STREAM, subjects_filter=">")).state.subjects or {}


async def test_a_count_sent_again_after_a_nats_restart_counts_once(tmp_path: Path) -> None:
    """A worker that finds its request completed sends the count again under the same message id,
    not knowing whether the first landed. With one message kept per total, nats-server forgot the
    ids of the increments before the last once restarted, and the repeat counted twice (a chaos run
    saw `completed` at 1,100 for 1,099 requests across a restart)."""
    server = EmbeddedNats(tmp_path / "nats")
    url = server.start()
    try:
        conn = await connect(NatsSettings(url=url), "test")
        try:
            await provision(conn, replicas=1)
            await count(conn, "echo", "completed", "first.outcome.0")
            await count(conn, "echo", "completed", "second.outcome.0")
            await _counts_to(conn, "echo", "completed", 2)
        finally:
            await conn.close()
        server.stop()
        url = server.start()
        conn = await connect(NatsSettings(url=url), "test")
        try:
            await count(conn, "echo", "completed", "first.outcome.0")
            await count(conn, "after", "completed", "sentinel")  # stored after the repeat, one stream
            await _counts_to(conn, "after", "completed", 1)
            totals = await StatsReader(conn).totals("echo")
        finally:
            await conn.close()
    finally:
        server.stop()

    assert totals["completed"] == 2


async def test_a_trim_removes_what_is_older_than_its_mark_and_keeps_each_total(conn: Nats) -> None:
    await provision(conn, replicas=1)
    for n in range(3):
        await count(conn, "echo", "completed", f"old-{n}")
    await count(conn, "quiet", "completed", "only")
    await _counts_to(conn, "echo", "completed", 3)
    await _counts_to(conn, "quiet", "completed", 1)
    mark = (await conn.js.stream_info(names.COUNTER_STREAM)).state.last_seq
    await count(conn, "echo", "completed", "new")
    await _counts_to(conn, "echo", "completed", 4)

    await trim_counters(conn.js, mark)

    assert await _kept(conn) == {
        names.counter_subject("echo", "completed"): 1,  # the one after the mark
        names.counter_subject("quiet", "completed"): 1,  # its total, though older than the mark
    }
    assert (await StatsReader(conn).totals("echo"))["completed"] == 4
    assert (await StatsReader(conn).totals("quiet"))["completed"] == 1
    await count(conn, "echo", "completed", "old-0")  # still known: stored within the window
    await count(conn, "quiet", "completed", "after")
    await _counts_to(conn, "quiet", "completed", 2)
    assert (await StatsReader(conn).totals("echo"))["completed"] == 4


async def test_a_trim_keeps_the_last_total_however_far_its_mark(conn: Nats) -> None:
    await provision(conn, replicas=1)
    for n in range(2):
        await count(conn, "echo", "failed", f"run-{n}")
    await _counts_to(conn, "echo", "failed", 2)

    await trim_counters(conn.js, 10**9)

    assert await _kept(conn) == {names.counter_subject("echo", "failed"): 1}
    assert (await StatsReader(conn).totals("echo"))["failed"] == 2


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_trim_cuts_at_the_mark_a_duplicate_window_old(conn: Nats) -> None:
    """Each turn marks where the stream ends; a turn a window later removes what came before that mark."""
    await provision(conn, replicas=1)
    window_s = (await conn.js.stream_info(names.COUNTER_STREAM)).config.duplicate_window
    assert window_s
    clock = _Clock()
    trim = CounterTrim(conn.js, clock)
    await count(conn, "echo", "completed", "a")
    await count(conn, "echo", "completed", "b")
    await _counts_to(conn, "echo", "completed", 2)

    again_s = await trim.trim()  # marks the end after a and b
    await count(conn, "echo", "completed", "c")
    await _counts_to(conn, "echo", "completed", 3)
    clock.now += again_s
    assert again_s == window_s / 2
    await trim.trim()  # half a window on: nothing is old enough yet
    kept_at_half = await _kept(conn)
    clock.now += window_s / 2
    await trim.trim()  # a window after the first mark: a and b go, c stays

    assert kept_at_half == {names.counter_subject("echo", "completed"): 3}
    assert await _kept(conn) == {names.counter_subject("echo", "completed"): 1}
    assert (await StatsReader(conn).totals("echo"))["completed"] == 3


async def test_a_failed_trim_turn_does_not_end_the_trimming(
    conn: Nats, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop runs for the worker's life: a turn that raises (here the stream is not there) is
    tried again a little later."""
    monkeypatch.setattr(CounterTrim, "retry_s", 0.05)
    trim = CounterTrim(conn.js)

    def failed_turns() -> int:
        return sum(r.getMessage() == "could not trim the counters stream; trying again" for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="jetspool.aio"):
        await trim.start()
        try:
            await eventually(lambda: failed_turns() >= 2, timeout_s=5)
        finally:
            await trim.stop()
