"""The worker process: function delivery and callback delivery, until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from jetspool import tracing
from jetspool.aio import gather_all, stop_task
from jetspool.callbacks.delivery import CallbackDelivery, callback_client
from jetspool.domain import names
from jetspool.domain.functions import shown
from jetspool.jetstream.callbacks import CallbackQueue
from jetspool.jetstream.cancel import Canceller
from jetspool.jetstream.events import EventLog
from jetspool.jetstream.logs import RequestLogs
from jetspool.jetstream.provision import ensure_function_consumers
from jetspool.jetstream.queue import RequestQueue
from jetspool.jetstream.registry import APPLY_ATTEMPTS, APPLY_BACKOFF_S, RegistryView
from jetspool.jetstream.results import ResultStore
from jetspool.jetstream.retention import BlobJanitor, Retention
from jetspool.jetstream.startup import open_jetstream
from jetspool.jetstream.stats import CounterTrim
from jetspool.jetstream.status_store import StatusStore
from jetspool.worker.handler import RequestHandler, Services
from jetspool.worker.invoke import function_client
from jetspool.worker.runner import FunctionRunner
from jetspool.worker.timers import Timers

if TYPE_CHECKING:
    from nats.aio.client import Client

    from jetspool.domain.functions import Function
    from jetspool.settings import Settings

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 10.0
_MAX_CALLS = 10_000
"""Open connections to functions, over all of them (a function's `concurrency` is the real bound)."""


class RunnerPool:
    """One `FunctionRunner` per registered function, following the registry."""

    def __init__(self, nc: Client, handler: RequestHandler, settings: Settings) -> None:
        self._nc = nc
        self._handler = handler
        self._settings = settings
        self._runners: dict[str, FunctionRunner] = {}
        self._stopping: dict[str, asyncio.Task[None]] = {}
        """The runners of functions unregistered, stopping: their calls may take `shutdown_grace`."""
        self._waiting: dict[str, Function] = {}
        """Functions registered again while their old runner stops: started once it has."""
        self._starts: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._stopped = False
        """Once stopped, a change that still comes (a registry replay) starts nothing."""

    async def on_change(self, name: str, function: Function | None) -> None:
        """Follow one registry change. A runner stopping (its calls may take `shutdown_grace`) is
        waited for in the background: waited for here, it held up every registry change after it,
        and a function registered meanwhile got no runner (found by a review)."""
        async with self._lock:
            if self._stopped:
                return
            runner = self._runners.get(name)
            if function is None:
                self._waiting.pop(name, None)
                if runner is not None:
                    del self._runners[name]
                    self._stopping[name] = asyncio.create_task(self._stop_unregistered(name, runner))
                return
            if runner is not None:
                runner.update(function)
                return
            stopping = self._stopping.get(name)
            if stopping is not None:  # registered again: its old runner's calls end first, within their grace
                if name not in self._waiting:
                    start = asyncio.create_task(self._start_once_stopped(name))
                    self._starts.add(start)
                    start.add_done_callback(self._starts.discard)
                self._waiting[name] = function
                return
            await self._start(name, function)

    async def _start(self, name: str, function: Function) -> None:
        await ensure_function_consumers(self._nc.jetstream(), name, self._settings.worker.ack_wait)
        runner = FunctionRunner(self._nc, function, self._handler, self._settings.worker.poll_interval)
        await runner.start()
        self._runners[name] = runner
        log.info("delivering to %s at %s (concurrency %d)", name, shown(function.url), function.concurrency)

    async def _start_once_stopped(self, name: str) -> None:
        """Start the runner of `name` as registered now (changed or gone meanwhile) once no old
        runner of it is stopping, whichever stops last; a failed start is tried again as the
        registry view tries a change again (found by a review: tried once, a function was left
        registered with no runner). Waiting for the one old runner it was made for, a start woke
        after a later one had begun to stop, and ran beside its calls (found by a review)."""
        attempt = 0
        while True:
            stopping = self._stopping.get(name)
            if stopping is not None:
                await asyncio.shield(stopping)
                attempt = 0  # a new turn: the function as registered after that stop
                continue
            async with self._lock:
                if name in self._stopping:
                    continue
                function = None if self._stopped else self._waiting.get(name)
                if function is None or name in self._runners:
                    self._waiting.pop(name, None)
                    return
                attempt += 1
                try:
                    await self._start(name, function)
                except Exception:
                    log.exception("starting delivery to %s failed (attempt %d)", name, attempt)
                    if attempt >= APPLY_ATTEMPTS:
                        self._waiting.pop(name, None)
                        return
                else:
                    self._waiting.pop(name, None)
                    return
            await asyncio.sleep(APPLY_BACKOFF_S * attempt)

    async def _stop_unregistered(self, name: str, runner: FunctionRunner) -> None:
        try:
            await runner.stop(self._settings.worker.shutdown_grace)
            log.info("stopped delivering to %s (unregistered)", name)
        except Exception:
            log.exception("stopping the runner of %s (unregistered) failed", name)
        finally:
            if self._stopping.get(name) is asyncio.current_task():
                del self._stopping[name]

    async def stop(self) -> None:
        for start in list(self._starts):
            await stop_task(start)
        async with self._lock:
            self._stopped = True
            runners, self._runners = list(self._runners.values()), {}
            self._waiting.clear()
        await gather_all(
            *(r.stop(self._settings.worker.shutdown_grace) for r in runners),
            *(asyncio.shield(task) for task in list(self._stopping.values())),
        )


async def _drain(view: RegistryView, pool: RunnerPool, callbacks: CallbackDelivery, grace_s: float) -> None:
    """Stop taking work, then give the calls and the callbacks in flight one grace, together.

    Stopped one after the other, the callbacks' grace came first and the runners kept pulling
    requests meanwhile: a worker could take twice `shutdown_grace` to stop, past a Kubernetes
    `terminationGracePeriodSeconds` set from it. Cancel signals are still heard while calls finish.
    """
    await view.stop()  # no runner starts once the pool stopped
    await gather_all(pool.stop(), callbacks.stop(grace_s))


async def run(settings: Settings, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    """Deliver requests and callbacks until `stop` is set, then shut down gracefully.

    `ready` is set once every registered function has its runner and callbacks flow. Whatever
    has started is stopped again, in reverse order, however `run` ends.
    """
    tracing.setup("jetspool-worker")
    async with contextlib.AsyncExitStack() as started:
        conn, stores, _ = await open_jetstream(settings, "jetspool-worker", started)
        http = await started.enter_async_context(callback_client())
        calls = await started.enter_async_context(function_client(_MAX_CALLS, _CONNECT_TIMEOUT_S))
        status = StatusStore(conn, stores.status)
        retention = Retention(conn.js, stores.envelopes, stores.blobs)
        events = EventLog(conn, settings.gateway.base_url, settings.events.inline_result_limit)
        results = ResultStore(conn.js, stores.results, stores.blobs, retention, conn.inline_limit)
        view = RegistryView(stores.functions)
        queue = RequestQueue(conn, stores.blobs)
        logs = RequestLogs(conn)
        services = Services(
            conn,
            status,
            results,
            queue,
            view,
            calls,
            CallbackQueue(conn.js),
            logs,
            retention,
            events,
            settings.gateway.base_url,
        )
        handler = RequestHandler(services, settings.worker, settings.retry)
        pool = RunnerPool(conn.nc, handler, settings)
        view.on_change = pool.on_change

        started.push_async_callback(pool.stop)  # unwinds after view.stop: no runner starts once the pool stopped
        started.push_async_callback(view.stop)  # before it starts: a stop during start-up ends the view too
        await view.start()
        conn.on_reconnect(handler.renew_held)  # first: its deliveries' ack wait runs
        conn.on_reconnect(view.resync)
        conn.on_reconnect(handler.abort_cancelled)  # last: a status read per running call
        callbacks = CallbackDelivery(conn, status, results, settings.callbacks, http)
        await callbacks.start()
        started.push_async_callback(callbacks.stop, settings.worker.shutdown_grace)
        canceller = Canceller(conn, status, CallbackQueue(conn.js), retention, events, logs=logs)
        timers = Timers(conn.js, status, canceller, view, retention=retention, results=results)
        await timers.start()
        started.push_async_callback(timers.stop)
        trim = CounterTrim(conn.js)
        await trim.start()
        started.push_async_callback(trim.stop)
        janitor = BlobJanitor(conn)
        await janitor.start()
        started.push_async_callback(janitor.stop)
        cancels = await conn.nc.subscribe(names.CANCEL_SUBJECTS, cb=handler.on_cancel)
        started.push_async_callback(cancels.unsubscribe)
        started.push_async_callback(_drain, view, pool, callbacks, settings.worker.shutdown_grace)  # unwinds first

        log.info("worker ready")
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("worker stopping")
