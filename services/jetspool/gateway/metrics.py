"""`/metrics` in the Prometheus text format.

Three sources, each the right one for its figure:
- Queue figures and totals are read from JetStream at scrape time (consumer state and the
  server-side counters), so they are system-wide and exact whichever gateway is scraped.
- Queue wait and run time histograms are observed from the status-change events
  (`jetspool.events.>`), which every gateway hears: each gateway's histograms cover the whole
  system since it started. Scrape one gateway for them (or take the max across gateways).
- Request latency is this gateway's own: per route template, method and status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import orjson
from litestar.enums import ScopeType
from nats.errors import Error as NatsError
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jetspool.domain import names
from jetspool.gateway.activity import Activity

if TYPE_CHECKING:
    from collections.abc import Iterable

    from litestar.types import ASGIApp, Message, Receive, Scope, Send
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from prometheus_client import Metric

    from jetspool.jetstream.registry import RegistryView
    from jetspool.jetstream.stats import StatsReader

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4"
"""Prometheus text format 0.0.4; Litestar adds `; charset=utf-8` to a text type itself."""
_EWMA: Final = 0.2
_FIGURES_S: Final = 5.0
"""How long a scrape waits for the queue figures and totals from NATS, within Prometheus's default
10 s scrape timeout."""
_SECONDS_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_TOTALS: Final[dict[names.Counter, str]] = {
    "completed": "requests that completed successfully",
    "failed": "requests that completed with an error (cancellations included)",
    "retried": "attempts that failed in a way worth retrying and were retried",
    "cancelled": "requests that were cancelled",
    "callbacks_delivered": "callbacks and webhooks delivered",
    "callbacks_failed": "callbacks and webhooks given up on",
}


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class GatewayMetrics:
    def __init__(self) -> None:
        self._view: RegistryView | None = None
        self._stats: StatsReader | None = None
        self._subs: list[Subscription] = []
        self.activity = Activity()
        """Per function, the last minutes of completions, failures and run times (for the dashboard)."""
        self.run_times: dict[str, float] = {}
        """Per function, a moving average of the seconds its recent successful requests ran (for eta_seconds)."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.queue_wait = Histogram(
            "jetspool_queue_wait_seconds",
            "Seconds from submission to the first attempt's start",
            ["function"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.run_time = Histogram(
            "jetspool_run_seconds",
            "Seconds the final attempt of a completed request ran",
            ["function"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "jetspool_gateway_request_seconds",
            "Seconds this gateway took to answer an HTTP request (until the last byte)",
            ["method", "route", "status"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )

    async def start(self, nc: Client, view: RegistryView, stats: StatsReader) -> None:
        self._view, self._stats = view, stats
        # Only the events the histograms read: not `queued`, the most frequent.
        self._subs = [
            await nc.subscribe(names.event_subject("*", kind), cb=self._on_event)
            for kind in ("started", "succeeded", "failed")
        ]

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()

    async def render(self) -> bytes:
        """The whole exposition: figures read now from JetStream, then the histograms."""
        waiting = GaugeMetricFamily(
            "jetspool_requests_waiting", "Requests waiting for a worker", labels=["function", "priority"]
        )
        in_progress = GaugeMetricFamily(
            "jetspool_requests_in_progress",
            "Requests held by workers (running or waiting out a retry)",
            labels=["function"],
        )
        totals = {
            counter: CounterMetricFamily(f"jetspool_{counter}", f"Total {text}", labels=["function"])
            for counter, text in _TOTALS.items()
        }
        if self._view is None or self._stats is None:
            raise RuntimeError("metrics are read only once the gateway started")
        read = GaugeMetricFamily(
            "jetspool_queue_figures_read", "1 when this scrape read the queue figures and totals from NATS, else 0"
        )
        try:
            async with asyncio.timeout(_FIGURES_S):
                for function in sorted(f.name for f in self._view.all()):
                    figures = await self._stats.for_function(function)
                    for priority, count in figures["waiting"].items():
                        waiting.add_metric([function, priority], count)
                    in_progress.add_metric([function], figures["in_progress"])
                    for counter, value in (await self._stats.totals(function)).items():
                        totals[counter].add_metric([function], value)
        except (NatsError, TimeoutError) as exc:
            # The gateway's own histograms still go out: a scrape waited 31 s for a 503 while NATS was
            # away, blind to everything, beyond Prometheus's 10 s scrape timeout (found by an audit).
            log.warning("metrics: queue figures not read from NATS (%r); left out of this scrape", exc)
            families: list[Metric] = [read]
            read.add_metric([], 0)
        else:
            families = [waiting, in_progress, *totals.values(), read]
            read.add_metric([], 1)
        snapshot = CollectorRegistry(auto_describe=False)
        snapshot.register(_Snapshot(families))
        return generate_latest(snapshot) + generate_latest(self.registry)

    async def _on_event(self, msg: Msg) -> None:
        try:
            event: dict[str, Any] = orjson.loads(msg.data)
            status = event["status"]
            if event["type"] == "started" and status["attempts"] == 1:
                waited = _seconds_between(status["submitted_at"], status["started_at"])
                self.queue_wait.labels(event["function"]).observe(waited)
            elif event["type"] in {"succeeded", "failed"}:
                succeeded = event["type"] == "succeeded"
                self._on_completion(event["function"], succeeded, status["metrics"]["inference_time"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.debug("ignoring an unreadable event on %s", msg.subject)

    def _on_completion(self, function: str, succeeded: bool, inference_time: float | None) -> None:
        ran = None if inference_time is None else float(inference_time)
        self.activity.observe(function, succeeded=succeeded, ran_s=ran)
        if ran is None:
            return
        self.run_time.labels(function).observe(ran)
        if succeeded:
            previous = self.run_times.get(function)
            self.run_times[function] = ran if previous is None else previous + _EWMA * (ran - previous)

    def timed(self, app: ASGIApp) -> ASGIApp:
        """ASGI middleware around the app's router: observe each request's latency under its route
        template, `unmatched` when the router found none (a 404, or a 405 for a method the path
        does not take). Set as a Litestar middleware, it ran after routing, and those went unseen,
        a flood of them too. A method HTTP does not define shows as `other`: a label per made-up
        method would grow without bound."""

        async def observed(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            method = scope["method"] if scope["method"] in _METHODS else "other"
            started = time.perf_counter()
            status = 500

            async def sending(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            try:
                await app(scope, receive, sending)
            finally:
                route = scope.get("path_template") or "unmatched"
                elapsed = time.perf_counter() - started
                self.request_latency.labels(method, route, str(status)).observe(elapsed)

        return observed


_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
"""HTTP's methods (RFC 9110 §9, and PATCH)."""


def _seconds_between(earlier: str, later: str) -> float:
    return max(0.0, (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds())
