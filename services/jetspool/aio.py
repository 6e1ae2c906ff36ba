"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

log = logging.getLogger(__name__)

_RECHECK_S = 0.05


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has really ended.

    Python 3.11's `asyncio.wait_for` (used inside nats-py) can swallow a cancellation that
    arrives as its inner future completes; a loop would then run on. So cancel again until
    the task is done.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_RECHECK_S)
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for `event` at most `timeout_s`; whether it was set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()
