"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

log = logging.getLogger(__name__)

_RECHECK_S = 0.05

T = TypeVar("T")


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


async def run_to_end(work: Coroutine[Any, Any, Any]) -> None:
    """Await `work` to its end even though the awaiting task is cancelled meanwhile, for short,
    bounded work a stopping task still owes (`stop_task` cancels every 50 ms until the task ends,
    and one `asyncio.shield` gives way to the second). Its exception, if any, is raised."""
    task = asyncio.ensure_future(work)
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
    task.result()


async def gather_all(*work: Awaitable[Any]) -> None:
    """Await every one of `work` to its end, then raise the first failure, if any, having logged the
    others (a piece of work cancelled on its own is no failure of the caller's).

    `asyncio.gather` raises the first failure at once and leaves the rest running unawaited: a
    worker's stop went on closing its connection while another runner's calls still ran (found by a
    review), their results lost and the requests run again."""
    outcomes = await asyncio.gather(*work, return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, asyncio.CancelledError)]
    for later in failures[1:]:
        log.error("and another failure while stopping", exc_info=later)
    if failures:
        raise failures[0]


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for `event` at most `timeout_s`; whether it was set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()


class SharedRead(Generic[T]):
    """One read that every caller asking meanwhile shares, never one begun before a caller asked.

    A caller's answer comes from a read that starts after it asked: the one starting now if none
    runs, else the next, which starts once the running one is over and serves everyone who asked
    meanwhile. So an answer reflects every write the caller saw finish, as a read of its own would,
    while a thousand callers asking at once cost two reads, not a thousand. A failed read raises
    in each of its callers; a caller that stops waiting does not stop the read of the others.
    """

    def __init__(self, read: Callable[[], Awaitable[T]]) -> None:
        self._read = read
        self._next: asyncio.Future[T] | None = None
        """The answer of the read that starts next: callers asking now wait on it."""
        self._reading: asyncio.Task[None] | None = None

    async def get(self) -> T:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next.add_done_callback(_retrieved)
            if self._reading is None:
                # Its own context: the read serves every caller, not the one that started it (log lines).
                self._reading = asyncio.create_task(self._serve(), context=contextvars.Context())
        return await asyncio.shield(self._next)

    async def _serve(self) -> None:
        try:
            while self._next is not None:
                answer, self._next = self._next, None
                try:
                    result = await self._read()
                except asyncio.CancelledError:
                    answer.cancel()
                    raise
                except Exception as exc:  # noqa: BLE001 - not swallowed: every caller of this read gets it
                    answer.set_exception(exc)
                else:
                    answer.set_result(result)
        finally:
            self._reading = None
            if self._next is not None:  # cancelled (the loop is closing): no one is left waiting
                self._next.cancel()
                self._next = None


def _retrieved(answer: asyncio.Future[Any]) -> None:
    """Mark a shared read's failure as seen: its callers may all have stopped waiting."""
    if not answer.cancelled():
        answer.exception()


class Periodic:
    """Housekeeping in turns for the process's life: `turn` does one and says how long until the
    next. A turn that raises is logged, and the next comes `retry_s` later: the loop must not end
    (a timers loop once ended for good on one unexpected error)."""

    name = "periodic"
    failed = "a periodic turn failed; trying again"
    retry_s = 5.0

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def turn(self) -> float:
        raise NotImplementedError

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                again_s = await self.turn()
            except Exception:  # whatever it was, the next turn tries again
                log.warning(self.failed, exc_info=True)
                again_s = self.retry_s
            await asyncio.sleep(again_s)
