"""`SharedRead`: callers asking at once share one read, and each answer is read after its caller asked."""

from __future__ import annotations

import asyncio

import pytest

from jetspool.aio import SharedRead


class Gated:
    """A read that counts its calls and holds each until released."""

    def __init__(self) -> None:
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.fail_with: Exception | None = None

    async def __call__(self) -> int:
        self.calls += 1
        number = self.calls
        self.started.set()
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return number


async def test_callers_asking_at_once_share_one_read() -> None:
    read = Gated()
    shared = SharedRead(read)
    callers = [asyncio.create_task(shared.get()) for _ in range(100)]
    await asyncio.wait_for(read.started.wait(), 5)
    read.release.set()
    answers = await asyncio.wait_for(asyncio.gather(*callers), 5)

    assert answers == [1] * 100
    assert read.calls == 1


async def test_a_caller_asking_during_a_read_gets_the_next_read() -> None:
    """The running read began before the caller asked, so it might miss a write the caller saw finish."""
    read = Gated()
    shared = SharedRead(read)
    first = asyncio.create_task(shared.get())
    await asyncio.wait_for(read.started.wait(), 5)
    later = [asyncio.create_task(shared.get()) for _ in range(10)]
    await asyncio.sleep(0)  # let them ask while read 1 is held
    read.release.set()

    assert await asyncio.wait_for(first, 5) == 1
    assert await asyncio.wait_for(asyncio.gather(*later), 5) == [2] * 10
    assert read.calls == 2
    assert await asyncio.wait_for(shared.get(), 5) == 3  # nothing running: a read of its own


async def test_a_failed_read_raises_in_each_of_its_callers_and_the_next_ask_reads_again() -> None:
    read = Gated()
    read.fail_with = TimeoutError("no answer")
    shared = SharedRead(read)
    callers = [asyncio.create_task(shared.get()) for _ in range(3)]
    await asyncio.wait_for(read.started.wait(), 5)
    read.release.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)
    assert [type(outcome) for outcome in outcomes] == [TimeoutError] * 3

    read.fail_with = None
    assert await asyncio.wait_for(shared.get(), 5) == 2


async def test_a_caller_that_stops_waiting_leaves_the_read_to_the_others() -> None:
    read = Gated()
    shared = SharedRead(read)
    leaving = asyncio.create_task(shared.get())
    staying = asyncio.create_task(shared.get())
    await asyncio.wait_for(read.started.wait(), 5)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    read.release.set()

    assert await asyncio.wait_for(staying, 5) == 1
