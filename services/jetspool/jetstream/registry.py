"""The function registry: functions stored in a KV bucket, and a live in-memory view of it.

Every gateway and worker keeps a `RegistryView`: one watcher on the (small) functions bucket,
so a lookup on the request path costs no round trip and a newly registered function reaches
every worker without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Final

from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError

from jetspool.aio import stop_task
from jetspool.domain.errors import BadRequest, DecodeError, NotFound
from jetspool.domain.functions import Function, decode_function
from jetspool.jetstream.ridethrough import is_transient, ride_through, ride_through_create

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

APPLY_ATTEMPTS = 5
APPLY_BACKOFF_S = 1.0
"""A registry change that fails to apply is tried this often, waiting this long times the attempt."""

OnChange = Callable[[str, Function | None], Awaitable[None]]
"""Called with a function's name and its new entry (None when it was removed)."""


_WRONG_LAST_SEQUENCE: Final = 10071
"""JetStream's error code for a write whose expected last sequence is not the stream's."""


class FunctionRegistry:
    """Reads and writes registry entries; the authority every `RegistryView` follows."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def get(self, name: str) -> Function:
        value = await self._stored(name)
        if value is None:
            raise NotFound(f"function {name!r} is not registered")
        return decode_function(value)

    async def create(self, function: Function) -> bool:
        """Register a new function: True once written, False when exactly this entry is registered
        already; BadRequest if the name is taken by another entry.

        The same entry is no conflict: our own first try may have landed with its acknowledgement
        lost (riding through a node loss), or a client repeats a POST whose answer it did not get,
        and was refused for its own registration (found by an audit: a 503 during a NATS outage,
        the entry stored once NATS was back, then a 400 for the repeat)."""
        value = function.encode()
        try:
            await ride_through_create(partial(self._kv.create, function.name, value), "registry write")
        except KeyWrongLastSequenceError as exc:
            if await self._stored(function.name) == value:
                return False
            raise BadRequest(f"function {function.name!r} is already registered; use PUT to update it") from exc
        return True

    async def _stored(self, name: str) -> bytes | None:
        """The stored entry of `name`, encoded; None when there is none."""
        try:
            return (await ride_through(partial(self._kv.get, name), "registry read")).value
        except KeyNotFoundError:
            return None

    async def put(self, function: Function) -> bool:
        """Register or replace; True when it was new."""
        existed = await self._stored(function.name) is not None
        await self._write(function)
        return not existed

    async def _write(self, function: Function) -> None:
        """Store `function` (a repeat of the same put changes nothing)."""
        await ride_through(partial(self._kv.put, function.name, function.encode()), "registry write")

    async def ensure(self, function: Function) -> None:
        """Make the stored entry equal `function` (config-file functions at start), writing only on change."""
        try:
            current = await self.get(function.name)
        except (NotFound, DecodeError):
            current = None
        if current != function:
            await self._write(function)
            log.info("registered function %s", function.name)

    async def delete(self, name: str) -> None:
        await self.get(name)
        await ride_through(partial(self._kv.delete, name), "registry delete")  # a repeated delete marker is harmless

    async def withdraw(self, function: Function) -> bool:
        """Unregister `function` if the stored entry is still exactly it, not one written since in
        its place; whether it was."""
        try:
            entry = await ride_through(partial(self._kv.get, function.name), "registry read")
        except KeyNotFoundError:
            return False
        if entry.value != function.encode():
            return False
        delete = partial(self._kv.delete, function.name, last=entry.revision)
        try:
            await ride_through(delete, "registry delete")
        except BadRequestError as exc:
            # Written over meanwhile (or our own first try landed, its answer lost). nats-py's delete
            # raises the plain error, not KeyWrongLastSequenceError (found by a review).
            if exc.err_code != _WRONG_LAST_SEQUENCE:
                raise
            return False
        return True


class RegistryView:
    """An in-memory copy of the registry, kept current by one KV watcher."""

    def __init__(self, kv: KeyValue, on_change: OnChange | None = None) -> None:
        self._kv = kv
        self._functions: dict[str, Function] = {}
        self.on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopped = False
        self._resyncing = asyncio.Lock()
        """Resyncs take turns: two at once (reconnects in quick succession) each stopped the same
        old follower and started one, and the first one started followed on beside the second."""

    def get(self, name: str) -> Function | None:
        return self._functions.get(name)

    def all(self) -> list[Function]:
        return sorted(self._functions.values(), key=lambda f: f.name)

    def remember(self, function: Function) -> None:
        """Record a write this process just made, before the watcher brings it back."""
        self._functions[function.name] = function

    def forget(self, name: str) -> None:
        self._functions.pop(name, None)

    async def start(self) -> None:
        """Load every entry and keep following changes; returns once the initial entries are in.

        The watch rides through a cluster's election: a worker started just after a node came
        back had its watch's consumer create time out, and it stopped (found by a flaky cluster test)."""
        watcher = await ride_through(self._kv.watchall, "registry watch")
        self._task = asyncio.create_task(self._follow(watcher), name="registry-view")
        await self._ready.wait()

    async def resync(self) -> None:
        """Follow with a new watcher (after a reconnect: the old one's consumer may be gone with the
        server, and nats-py would notice only after missed heartbeats, some 15 s later). The new
        watcher replays every entry; names it does not bring back were deleted meanwhile."""
        async with self._resyncing:
            await self._resync()

    async def _resync(self) -> None:
        if self._task is None or self._stopped:
            return
        # The new watcher first (riding through a cluster's election): if it cannot be had, the old one stays.
        try:
            watcher = await ride_through(self._kv.watchall, "registry watch")
        except Exception as exc:
            if not is_transient(exc):
                raise
            # Its consumer comes back by itself: nats-py re-creates it every two missed heartbeats
            # (10 s), from the last entry it saw: in chaos runs with 45-90 s losses of quorum, the
            # views had each change made after the cluster was back within 4 s. So this is no error.
            log.warning("registry watch not renewed (%s); the current one renews itself", type(exc).__name__)
            return
        try:
            if not self._stopped:
                await stop_task(self._task)
        except BaseException:  # cancelled on the way (a stop): the new watch must not outlive it
            await _unwatch(watcher)
            raise
        if self._stopped:  # stopped meanwhile: no change is followed after a stop (found by reviews)
            await _unwatch(watcher)
            return
        self._task = asyncio.create_task(self._follow(watcher, replay=True), name="registry-view")
        log.info("registry view renewed after a reconnect")

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            await stop_task(self._task)

    async def _follow(self, watcher: KeyValue.KeyWatcher, *, replay: bool = False) -> None:
        replayed: set[str] | None = set() if replay else None
        try:
            async for entry in watcher:
                if entry is None:  # end of the initial values
                    if replayed is not None:
                        for gone in set(self._functions) - replayed:
                            await self._notify(gone, None)
                        replayed = None
                    self._ready.set()
                    continue
                if replayed is not None:
                    replayed.add(entry.key)
                await self._apply(entry)
        finally:
            self._ready.set()
            await _unwatch(watcher)

    async def _apply(self, entry: KeyValue.Entry) -> None:
        name = entry.key
        function: Function | None = None
        if entry.operation is None and entry.value:
            try:
                function = decode_function(entry.value)
            except DecodeError:
                log.exception("ignoring unreadable registry entry %s", name)
                return
        await self._notify(name, function)

    async def _notify(self, name: str, function: Function | None) -> None:
        """Take `function` (None: deleted) into the view, and tell `on_change`."""
        if function is None:
            self._functions.pop(name, None)
        else:
            self._functions[name] = function
        if self.on_change is None:
            return
        for attempt in range(1, APPLY_ATTEMPTS + 1):
            try:
                await self.on_change(name, function)
            except Exception:  # the follower must outlive one failed change
                log.exception("applying the registry change of %s failed (attempt %d)", name, attempt)
                await asyncio.sleep(APPLY_BACKOFF_S * attempt)
            else:
                return


async def _unwatch(watcher: KeyValue.KeyWatcher) -> None:
    """Stop `watcher` (its subscription and consumer), whatever that meets."""
    with contextlib.suppress(Exception):
        await watcher.stop()  # type: ignore[no-untyped-call]
