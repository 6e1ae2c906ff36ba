"""The gateway's one door: `create_app(settings)` builds the Litestar application.

Connections are made in the lifespan and handed to handlers as one `Gateway` object
(dependency `gateway`); nothing global.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import httpx
from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from nats.errors import Error as NatsError

from jetspool import tracing
from jetspool.callbacks.addresses import AddressPolicy
from jetspool.domain import names
from jetspool.domain.errors import ConfigError, RequestError
from jetspool.domain.functions import outbound_tls
from jetspool.gateway.auth import KeyGuard
from jetspool.gateway.feed import StatusFeed
from jetspool.gateway.intake import Intake, named_request_id
from jetspool.gateway.limits import receive_deadline
from jetspool.gateway.metrics import GatewayMetrics
from jetspool.gateway.openapi import complete_openapi, openapi_config
from jetspool.gateway.routes import dashboard, function, logs, openfaas, queue, system
from jetspool.gateway.state import Gateway
from jetspool.jetstream.callbacks import CallbackQueue
from jetspool.jetstream.cancel import Canceller
from jetspool.jetstream.events import EventLog
from jetspool.jetstream.idempotency import IdempotencyKeys
from jetspool.jetstream.logs import RequestLogs
from jetspool.jetstream.positions import QueuePositions
from jetspool.jetstream.queue import RequestQueue
from jetspool.jetstream.registry import FunctionRegistry, RegistryView
from jetspool.jetstream.results import ResultStore
from jetspool.jetstream.retention import Retention
from jetspool.jetstream.retry import Retrier
from jetspool.jetstream.startup import open_jetstream
from jetspool.jetstream.stats import StatsReader
from jetspool.jetstream.status_store import StatusStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from jetspool.jetstream.connection import Nats
    from jetspool.jetstream.provision import Stores
    from jetspool.settings import Settings

log = logging.getLogger(__name__)
_CLIENT_DEFAULTS: Final = ("Accept", "Accept-Encoding", "User-Agent")
"""Headers httpx adds to every request of its own accord (besides the hop-by-hop `Connection`)."""


def stopping(app: Litestar) -> None:
    """The server stops: its status streams end and its long polls answer, before it waits for its
    open connections (which it would cut after its graceful timeout, with a 500 or a broken stream)."""
    gateway: Gateway | None = app.state.get("gateway")
    if gateway is not None:
        gateway.feed.close()


def create_app(settings: Settings, *, config_errors: list[ConfigError] | None = None) -> Litestar:
    """The gateway app; a ConfigError in start-up is also appended to `config_errors`, if given
    (uvicorn reports a failed start-up only as a log line)."""
    tracing.setup("jetspool-gateway")
    metrics = GatewayMetrics()
    wired = _Wired()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with AsyncExitStack() as started:
            try:
                conn, stores, registry = await open_jetstream(settings, "jetspool-gateway", started)
            except ConfigError as exc:
                if config_errors is not None:
                    config_errors.append(exc)
                raise
            view = RegistryView(stores.functions)
            await view.start()
            conn.on_reconnect(view.resync)
            started.push_async_callback(view.stop)
            feed = StatusFeed(conn.nc, settings.gateway.max_streams)
            started.push_async_callback(feed.stop)
            http = await started.enter_async_context(_proxy_client())
            stats = StatsReader(conn)
            await metrics.start(conn.nc, view, stats)
            started.push_async_callback(metrics.stop)
            app.state.gateway = wired.gateway = _wire(
                settings, conn, stores, registry=registry, view=view, feed=feed, http=http, metrics=metrics, stats=stats
            )
            conn.on_reconnect(partial(feed.read_again, wired.gateway.status.get))
            if not settings.auth.api_keys and not settings.auth.admin_keys:
                log.warning("no API keys configured: every route is open")
            # As the worker's: a gateway started with API keys logged nothing at all (found by an audit).
            log.info("gateway ready at %s", settings.gateway.base_url)
            yield
            log.info("gateway stopping")

    app = Litestar(
        route_handlers=[
            function.call_function,
            function.call_function_path,
            openfaas.async_function,
            openfaas.async_function_path,
            queue.submit,
            queue.submit_path,
            queue.request_status,
            queue.status_stream,
            logs.append_logs,
            queue.cancel_request,
            queue.retry_request,
            queue.redeliver_callbacks,
            queue.legacy_submit,
            queue.legacy_submit_path,
            queue.legacy_status,
            queue.legacy_cancel,
            system.purge_function,
            queue.request_result,
            *system.REGISTRY_OPTIONS,
            system.list_functions,
            system.get_function,
            system.create_function,
            system.replace_function,
            system.delete_function,
            system.metrics,
            system.healthz,
            system.readyz,
            dashboard.page,
            dashboard.asset,
            dashboard.overview,
            dashboard.events,
        ],
        dependencies={"gateway": Provide(wired.get, sync_to_thread=False)},
        lifespan=[lifespan],
        exception_handlers={
            RequestError: _request_error,
            NatsError: _nats_error,
            HTTPException: _http_error,
        },
        request_max_body_size=settings.gateway.max_body_size,
        middleware=[KeyGuard(settings.auth), receive_deadline(settings.gateway.receive_timeout)],
        openapi_config=openapi_config(),
        state=State(),
        logging_config=None,
    )
    complete_openapi(app)
    app.asgi_handler = metrics.timed(app.asgi_handler)  # around the router: 404s and 405s are timed too
    return app


def _proxy_client() -> httpx.AsyncClient:
    """The sync proxy's client. It sends what the caller sent, not httpx's own defaults (SPEC §4)."""
    # No bound on connections: a call waits for its function, not for a slot another function's
    # slow calls hold (100 held calls to one made every other's a 504; found by a review).
    # Straight to the function, as the worker's queued calls go (aiohttp): no proxy from the environment.
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=10.0),
        follow_redirects=False,
        trust_env=False,
        verify=outbound_tls(),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
    )
    for default in _CLIENT_DEFAULTS:
        del client.headers[default]
    return client


def _wire(
    settings: Settings,
    conn: Nats,
    stores: Stores,
    *,
    registry: FunctionRegistry,
    view: RegistryView,
    feed: StatusFeed,
    http: httpx.AsyncClient,
    metrics: GatewayMetrics,
    stats: StatsReader,
) -> Gateway:
    status = StatusStore(conn, stores.status)
    positions = QueuePositions(conn)
    queue = RequestQueue(conn, stores.blobs)
    retention = Retention(conn.js, stores.envelopes, stores.blobs)
    callbacks = CallbackQueue(conn.js)
    events = EventLog(conn, settings.gateway.base_url, settings.events.inline_result_limit)
    logs = RequestLogs(conn)
    return Gateway(
        settings=settings,
        conn=conn,
        intake=Intake(
            status=status,
            queue=queue,
            positions=positions,
            keys=IdempotencyKeys(stores.idempotency, status),
            addresses=AddressPolicy.of(settings.callbacks),
            events=events,
        ),
        status=status,
        results=ResultStore(conn.js, stores.results, stores.blobs, retention, conn.inline_limit),
        registry=registry,
        view=view,
        stats=stats,
        positions=positions,
        canceller=Canceller(conn, status, callbacks, retention, events, logs=logs),
        retrier=Retrier(status, retention, queue, events),
        callbacks=callbacks,
        feed=feed,
        http=http,
        logs=logs,
        metrics=metrics,
    )


class _Wired:
    """The gateway the lifespan built, for the `gateway` dependency.

    A dependency with no parameters: one that took the app's `State` had Litestar build and
    validate a `State` from the app's state on every request: 13 µs of a submit's 0.7 ms of CPU,
    measured on a bare Litestar app in-process (62-68 against 52-53 µs per request)."""

    __slots__ = ("gateway",)

    def __init__(self) -> None:
        self.gateway: Gateway | None = None

    def get(self) -> Gateway:
        if self.gateway is None:
            raise RuntimeError("the gateway is not started")
        return self.gateway


def _error(
    detail: str,
    status_code: int,
    error_type: str | None = None,
    *,
    extra: Any = None,
    request: Request[Any, Any, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[dict[str, Any]]:
    body: dict[str, Any] = {"detail": detail}
    if extra:
        body["extra"] = extra
    headers = dict(headers or {})
    request_id = None if request is None else named_request_id(request.scope["path"])
    if request_id is not None:  # every response about a request, an error included (SPEC §2)
        headers[names.H_REQUEST_ID] = request_id
    if error_type is not None:
        body["error_type"] = error_type
        headers[names.H_ERROR_TYPE] = error_type
    return Response(body, status_code=status_code, headers=headers)


def _request_error(request: Request[Any, Any, Any], exc: RequestError) -> Response[dict[str, Any]]:
    return _error(exc.detail, exc.status_code, exc.error_type, request=request, headers=exc.headers)


def _nats_error(request: Request[Any, Any, Any], exc: NatsError) -> Response[dict[str, Any]]:
    log.warning("NATS error while serving a request: %s", exc)
    return _error(f"the queue is unavailable: {exc}", 503, request=request)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    detail = str(exc.detail)
    if isinstance(exc, RequestEntityTooLarge):  # it said only "Request Entity Too Large" (found by an audit)
        limit = request.route_handler.resolve_request_max_body_size()
        detail = f"the request body is larger than the gateway takes: {limit} bytes (gateway.max_body_size)"
    # Its headers too: a 405's Allow (RFC 9110 requires it; it was dropped, found by a SPEC audit).
    return _error(detail, exc.status_code, extra=exc.extra, request=request, headers=exc.headers)
