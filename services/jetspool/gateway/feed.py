"""Status changes of every request, from one subscription per gateway, fanned out in memory.

The status bucket republishes each write on `jetspool.status.<request id>`; the queue stream each
stored message on `jetspool.wake.<function>.<priority>`. One subscription each feeds every
long-poll and SSE stream of this process, so a thousand open streams cost no more NATS consumers
than one.

The subscriptions exist only while someone watches (and a while after, so that a burst of short
polls does not subscribe and unsubscribe each time): a gateway nobody follows a request on does
not read every status change of the system.

A watcher subscribes first and reads the current record after, so no change can fall between:
the first watcher's `watch` returns once the server has its subscriptions (a flush). Changes
published while the gateway is away from NATS never reach it: after a reconnection, every watched
request is read again (`read_again`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Final

from litestar.response import ServerSentEventMessage

from jetspool.aio import stop_task
from jetspool.domain import names
from jetspool.domain.errors import DecodeError, Unavailable
from jetspool.domain.status import decode_status
from jetspool.jetstream.connection import round_trip
from jetspool.jetstream.status_store import Versioned

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

_QUEUE_LIMIT = 64
PING: Final = ServerSentEventMessage(comment="ping", data=None)
"""A keep-alive of an event stream: a comment line and nothing else (with data, it would be an event)."""
_SUBSCRIBED_S = 10.0
"""At most this long for the server to confirm the feed's subscriptions."""
_LINGER_S = 30.0
"""How long the subscriptions stay after the last watcher left."""
_READS_AT_ONCE = 32
"""Watched requests read at once after a reconnection."""


class Watch:
    """What one waiting client hears: its request's new records, and that its function's queue moved."""

    def __init__(self, request_id: str, function: str) -> None:
        self.request_id = request_id
        self.function = function
        self.records: asyncio.Queue[Versioned] = asyncio.Queue(_QUEUE_LIMIT)
        self.queue_moved = asyncio.Event()
        """Set on a change of the function's queue once armed (`StatusFeed.arm`); by this request's own
        changes and log lines at any time."""
        self.own_change = asyncio.Event()
        """Set on a change of this request itself: a new record or a new log line."""

    def offer(self, current: Versioned) -> None:
        if self.records.full():  # a slow reader only needs the newest state
            self.records.get_nowait()
        self.records.put_nowait(current)
        self.own_change.set()

    def latest(self, current: Versioned) -> Versioned:
        """The newest record heard since `current` (or `current` itself)."""
        while not self.records.empty():
            heard = self.records.get_nowait()
            if heard.revision > current.revision:
                current = heard
        return current


class Slot:
    """A place taken on the gateway (`StatusFeed.reserve`), given back once: by the watch that used
    it, or, for a stream whose answer never started (its client went first), when it is dropped."""

    __slots__ = ("_feed",)

    def __init__(self, feed: StatusFeed) -> None:
        self._feed: StatusFeed | None = feed

    def release(self) -> None:
        feed, self._feed = self._feed, None
        if feed is not None:
            feed._give_back()  # noqa: SLF001 - the feed's own bookkeeping

    def __del__(self) -> None:
        self.release()


class StatusFeed:
    def __init__(self, nc: Client, max_watches: int, linger_s: float = _LINGER_S) -> None:
        self._nc = nc
        self._max_watches = max_watches
        self._linger_s = linger_s
        self._by_request: dict[str, set[Watch]] = defaultdict(set)
        self._watching = 0
        self._armed: dict[str, set[Watch]] = defaultdict(set)
        """Function → watches waiting for its queue to move: a change wakes these, not every watch."""
        self._subs: list[Subscription] = []
        self._subscribing = asyncio.Lock()
        self._release: asyncio.TimerHandle | None = None
        self._releasing: asyncio.Task[None] | None = None
        self._rereads: set[asyncio.Task[None]] = set()
        self.closing = False
        """Set at shutdown: streams end so the server can stop."""

    @property
    def subscribed(self) -> bool:
        return bool(self._subs)

    @property
    def watching(self) -> int:
        """Streams and waits open on this gateway."""
        return self._watching

    async def _subscribe(self) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None
        async with self._subscribing:
            if self._subs:
                return
            self._subs.append(await self._nc.subscribe(names.STATUS_CHANGE_SUBJECTS, cb=self._on_status))
            self._subs.append(await self._nc.subscribe(names.WAKE_SUBJECTS, cb=self._on_wake))
            self._subs.append(await self._nc.subscribe(names.LOG_SUBJECTS, cb=self._on_log))
            await round_trip(self._nc, _SUBSCRIBED_S)  # the server has them: no change read next is missed

    def _release_later(self) -> None:
        if not self._by_request and self._release is None and not self.closing:
            self._release = asyncio.get_running_loop().call_later(self._linger_s, self._release_now)

    def _release_now(self) -> None:
        self._release = None
        if not self._by_request:
            self._releasing = asyncio.create_task(self._unsubscribe())

    async def _unsubscribe(self) -> None:
        async with self._subscribing:
            if self._by_request:
                return  # a watcher came meanwhile
            subs, self._subs = self._subs, []
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    def close(self) -> None:
        """The gateway is stopping: every stream ends (its client reconnects, with `Last-Event-ID`,
        to another gateway) and every long poll answers what it has. Called before the server waits
        for its open connections, which it would otherwise cut after its graceful timeout."""
        self.closing = True
        if self._release is not None:
            self._release.cancel()
        for watches in self._by_request.values():
            for watch in watches:
                watch.own_change.set()
                watch.queue_moved.set()

    async def stop(self) -> None:
        self.close()
        for task in list(self._rereads):
            await stop_task(task)
        if self._releasing is not None:
            await self._releasing
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    def reserve(self) -> Slot:
        """Take one of this gateway's places for a stream or wait; 503 (Unavailable, with Retry-After)
        when it holds its maximum already.

        A stream takes its place before its answer starts, so that a refusal can still be a 503:
        checked then and taken once the stream began, streams opened at once all passed the check,
        and those over the maximum failed after their 200 (found by an audit)."""
        if self._watching >= self._max_watches:
            busy = f"this gateway holds {self._max_watches} status streams and waits already; try later"
            raise Unavailable(busy, headers={"Retry-After": "1"})
        self._watching += 1
        return Slot(self)

    def _give_back(self) -> None:
        self._watching -= 1

    @contextlib.asynccontextmanager
    async def watch(self, request_id: str, function: str, slot: Slot | None = None) -> AsyncIterator[Watch]:
        """Hear the changes of one request, in the place `slot` took (else one taken now, see `reserve`)."""
        slot = slot or self.reserve()
        watch = Watch(request_id, function)
        self._by_request[request_id].add(watch)
        try:
            await self._subscribe()
            yield watch
        finally:
            slot.release()
            self._discard(self._by_request, request_id, watch)
            self._discard(self._armed, function, watch)
            self._release_later()

    def arm(self, watch: Watch) -> None:
        """Clear `watch`'s events; from now on the next change of its function's queue sets `queue_moved`.

        Only armed watches are woken by a change of the queue, once each: a thousand streams of one
        busy function, each waiting out its position interval, cost a change nothing."""
        watch.queue_moved.clear()
        watch.own_change.clear()
        self._armed[watch.function].add(watch)

    @staticmethod
    def _discard(index: dict[str, set[Watch]], key: str, watch: Watch) -> None:
        watches = index.get(key)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del index[key]

    async def _on_status(self, msg: Msg) -> None:
        try:
            record = decode_status(msg.data)
        except DecodeError:
            return  # a delete or purge marker, or a record this version cannot read
        revision = int((msg.headers or {}).get("Nats-Sequence", "0"))
        for watch in self._by_request.get(record.request_id, ()):
            watch.offer(Versioned(record, revision))
        self._queue_moved(record.function)

    async def _on_wake(self, msg: Msg) -> None:
        self._queue_moved(msg.subject.split(".")[2])  # jetspool.wake.<function>.<priority>

    async def _on_log(self, msg: Msg) -> None:
        for watch in self._by_request.get(msg.subject.rpartition(".")[2], ()):
            watch.own_change.set()
            watch.queue_moved.set()

    def _queue_moved(self, function: str) -> None:
        for watch in self._armed.pop(function, ()):
            watch.queue_moved.set()

    async def read_again(self, read: Callable[[str], Awaitable[Versioned | None]]) -> None:
        """After a reconnection: read every watched request again with `read`, and have every
        stream recompute its queue position. The changes published while this gateway was away
        from NATS never reach its subscriptions (nats-py renews them on reconnecting, before this
        runs): a stream open across a moment's cut heard no COMPLETED, and a `?wait=` answered
        "IN_PROGRESS" at the end of its wait (found by a review). In the background: the
        reconnection's other hooks do not wait for a thousand reads."""
        task = asyncio.create_task(self._read_again(read))
        self._rereads.add(task)
        task.add_done_callback(self._rereads.discard)

    async def _read_again(self, read: Callable[[str], Awaitable[Versioned | None]]) -> None:
        for function in list(self._armed):
            self._queue_moved(function)
        turns = asyncio.Semaphore(_READS_AT_ONCE)

        async def one(request_id: str) -> None:
            async with turns:
                try:
                    current = await read(request_id)
                except Exception:  # the next change it hears goes on as before
                    log.warning("status of %s not read again after a reconnection", request_id, exc_info=True)
                    return
            for watch in self._by_request.get(request_id, ()):
                if current is not None:
                    watch.offer(current)
                watch.queue_moved.set()

        await asyncio.gather(*(one(request_id) for request_id in list(self._by_request)))
