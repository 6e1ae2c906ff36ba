"""The asyncio helpers of `jetspool.aio` that the stop paths rely on."""

from __future__ import annotations

import asyncio

import pytest

from jetspool.aio import run_to_end, stop_task


async def test_work_run_to_end_outlasts_the_repeated_cancels_of_stop_task() -> None:
    """A stopping worker's status write of a call it hands back must end before the hand-back:
    under `asyncio.shield` alone it gave way to stop_task's second cancel, 50 ms on (found by a
    review), and the nak went out before the write."""
    done: list[str] = []

    async def write() -> None:
        await asyncio.sleep(0.3)  # longer than several of stop_task's rounds
        done.append("written")

    async def call() -> None:
        try:
            await asyncio.Event().wait()  # a call in flight
        except asyncio.CancelledError:
            await run_to_end(write())
            done.append("handed back")
            raise

    task = asyncio.create_task(call())
    await asyncio.sleep(0)  # the call is in flight
    await stop_task(task)

    assert done == ["written", "handed back"]
    assert task.cancelled()


async def test_an_error_of_the_work_is_raised() -> None:
    async def failing() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match=r"^no$"):
        await run_to_end(failing())
