"""Connecting to NATS with every option of `nats:` settings (servers, credentials, TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import nats
import nkeys
from nats.errors import AuthorizationError
from nats.errors import Error as NatsError

from jetspool.aio import stop_task
from jetspool.domain.errors import ConfigError
from jetspool.jetstream.ridethrough import ride_through
from jetspool.settings import load_cert_chain, read_named_file

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.client import JetStreamContext

    from jetspool.settings import NatsSettings

log = logging.getLogger(__name__)

_FLUSH_TIMEOUT_S = 2


Hook = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Nats:
    """An open connection and its JetStream context, passed down to whoever needs them."""

    nc: Client
    js: JetStreamContext
    replicas: int = 1
    """`nats.replicas`: more than one means a cluster, where a stream can be between leaders."""
    reconnect_hooks: list[Hook] = field(default_factory=list)
    """Called after each reconnection (e.g. to renew a watcher whose server-side consumer is gone)."""

    def on_reconnect(self, hook: Hook) -> None:
        self.reconnect_hooks.append(hook)

    async def reconnected(self) -> None:
        log.info("nats: reconnected")
        for hook in list(self.reconnect_hooks):
            try:
                await hook()
            except Exception:
                log.exception("a reconnect hook failed")

    async def record(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        """Publish to a stream that records what happened (events, totals); `headers` carry a message id.

        On one server it goes without waiting for the acknowledgement (while reconnecting, nats-py
        holds it until the server is back). On a cluster a message sent while its stream elects a
        leader would be dropped, so there it is acknowledged, riding through the election."""
        if self.replicas == 1:
            await self.nc.publish(subject, payload, headers=headers)
        else:
            await ride_through(partial(self.js.publish, subject, payload, headers=headers), f"publish to {subject}")

    @property
    def direct_reads(self) -> bool:
        """Whether a read may be answered by any replica (a direct get): on one server only. On a
        cluster a follower may not have a write yet, so reads that must see it go to the leader."""
        return self.replicas == 1

    @property
    def inline_limit(self) -> int:
        """Largest body or result kept inside a NATS message; larger ones go to the object store."""
        return int(self.nc.max_payload) // 2

    async def close(self) -> None:
        """Flush what was published and close. (Not drain: every user has stopped by now, and a
        drain can wait forever on a subscription whose consumer task is gone.)

        Closed while NATS is away (reconnecting), nats-py writes what it buffered meanwhile to the
        lost connection and raises `ConnectionResetError`: a worker told to stop during an outage
        then ended with a traceback, the rest of its shutdown skipped. What was buffered is lost
        either way (acknowledgements, in-progress signals: JetStream redelivers). On Python 3.12 and
        3.13 (3.12.1 and 3.13.0 at least), asyncio's own loop raises `TypeError` instead: its socket
        transport, written to once closed, calls the write callback it cleared on closing; uvloop's
        raises `RuntimeError` (the handler is closed), as `jetspool worker` stopped during an outage
        did (found by an audit)."""
        if self.nc.is_closed:
            return
        with contextlib.suppress(NatsError, TimeoutError):
            await self.nc.flush(timeout=_FLUSH_TIMEOUT_S)
        away = not self.nc.is_connected
        try:
            await self.nc.close()
        except (OSError, TypeError, RuntimeError) as exc:
            if not away:
                raise
            log.info("nats: closed while disconnected, what was buffered is dropped (%r)", exc)


async def round_trip(nc: Client, timeout_s: float) -> None:
    """Wait until a message to ourselves has come back through the server: everything published or
    subscribed before it has reached the server. nats.errors.TimeoutError after `timeout_s`.

    Not nats-py's `flush(timeout)`: a pong that arrives after its timeout ends nats-py's read loop
    for good (it sets the result of the cancelled future), and the connection hears nothing more
    (found by a review). A late message to an inbox no one reads any more is dropped."""
    inbox = nc.new_inbox()
    echo = await nc.subscribe(inbox, max_msgs=1)
    try:
        await nc.publish(inbox, b"")
        await echo.next_msg(timeout=timeout_s)
    finally:
        with contextlib.suppress(NatsError):
            await echo.unsubscribe()


def connect_options(settings: NatsSettings, name: str) -> dict[str, Any]:
    """Keyword arguments for `nats.connect`, built from settings; ConfigError naming the key for a
    file among them that cannot be used."""
    servers = settings.servers
    if not servers:
        raise ConfigError("nats.url: no NATS server configured (jetspool up embeds one; gateway and worker need one)")
    tls = check_key_files(settings)
    options: dict[str, Any] = {
        "servers": servers,
        "name": name,
        "connect_timeout": settings.connect_timeout,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "allow_reconnect": True,
        "error_cb": _on_error,
        "disconnected_cb": _on_disconnect,
    }
    if settings.credentials:
        options["user_credentials"] = settings.credentials
    if settings.nkey_seed:
        options["nkeys_seed"] = settings.nkey_seed
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password
    if settings.token:
        options["token"] = settings.token
    if tls is not None:
        options["tls"] = tls
    return options


def check_key_files(settings: NatsSettings) -> ssl.SSLContext | None:
    """ConfigError naming the key unless the nkey seed and credentials files hold what nats-py will
    read from them, checked before connecting as the TLS files are. nats-py reads them as it
    connects, some only when the server asks: an absent credentials file went unnoticed on a server
    without authentication and was told as credentials the server refused on one with a token; an
    absent seed file ended a worker in a traceback (found by an audit). And a credentials file
    without its JWT line hangs the process: nats-py reads on past its end, blocking the event loop.
    Returns the context the TLS files make (None without them), read here like the others."""
    if settings.nkey_seed and not _is_seed(read_named_file("nats.nkey_seed", settings.nkey_seed).strip()):
        raise ConfigError(f"nats.nkey_seed: {settings.nkey_seed} holds no nkey seed")
    if settings.credentials:
        lines = read_named_file("nats.credentials", settings.credentials).splitlines()
        if not _line_after(lines, b"BEGIN NATS USER JWT") or not _is_seed(_line_after(lines, b"BEGIN USER NKEY SEED")):
            raise ConfigError(
                f"nats.credentials: {settings.credentials} is not a user's credentials file "
                "(its JWT and nkey seed, as `nsc` writes them)"
            )
    if settings.tls_ca or settings.tls_cert:
        # Read now too: `up` made its data dir and started nats-server before a worker refused an
        # absent CA file (found by a CLI audit). Returned, for the connection to use.
        return _tls_context(settings)
    return None


def _line_after(lines: list[bytes], marker: bytes) -> bytes:
    """The line after the first one holding `marker`, stripped; empty when there is none."""
    for line, following in itertools.pairwise(lines):
        if marker in line:
            return following.strip()
    return b""


def _is_seed(text: bytes) -> bool:
    try:
        nkeys.from_seed(bytearray(text))
    except nkeys.NkeysError:
        return False
    return True


def _tls_context(settings: NatsSettings) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=settings.tls_ca)
    except OSError as exc:  # ssl.SSLError too
        raise ConfigError(f"nats.tls_ca: cannot use {settings.tls_ca} ({exc})") from exc
    if settings.tls_cert:
        if not settings.tls_key:
            raise ConfigError("nats.tls_key: required with nats.tls_cert")
        load_cert_chain(context, settings.tls_cert, settings.tls_key, "nats")
    return context


async def connect(settings: NatsSettings, name: str) -> Nats:
    """Open a connection; raises ConfigError for settings, and at once when the server refuses our
    credentials or its certificate is not trusted (nats-py would try again forever). An
    unreachable server is waited for."""
    refused = asyncio.Event()
    reason: list[str] = []

    async def on_error(exc: Exception) -> None:
        refusal = _refusal(exc)
        if refusal is not None:
            reason.append(refusal)
            refused.set()
        await _on_error(exc)

    opened: list[Nats] = []

    async def on_reconnect() -> None:
        for conn in opened:
            await conn.reconnected()

    async def on_disconnect() -> None:
        # nats-py says "disconnected" on a close of our own too: every start-up that closed its
        # probe connection logged it (found by an outside audit).
        if not (opened and opened[0].nc.is_closed):
            await _on_disconnect()

    options = connect_options(settings, name) | {
        "error_cb": on_error,
        "reconnected_cb": on_reconnect,
        "disconnected_cb": on_disconnect,
    }
    connecting = asyncio.create_task(nats.connect(**options))
    refusal = asyncio.create_task(refused.wait())
    try:
        await asyncio.wait({connecting, refusal}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        refusal.cancel()
    if not connecting.done():
        await stop_task(connecting)
        raise ConfigError(reason[0])
    nc = connecting.result()
    opened.append(Nats(nc=nc, js=nc.jetstream(), replicas=settings.replicas))
    return opened[0]


def _refusal(exc: Exception) -> str | None:
    """What to tell the operator when `exc` means our settings can never connect; None otherwise."""
    text = str(exc).lower()
    if isinstance(exc, AuthorizationError) or "authorization violation" in text or "authentication" in text:
        return (
            f"nats: the server refused our credentials ({exc}): "
            "check nats.user/password, nats.token, nats.nkey_seed or nats.credentials"
        )
    if isinstance(exc, ssl.SSLCertVerificationError) or "certificate verify failed" in text:
        return f"nats: the server's TLS certificate is not trusted ({exc}): check nats.tls_ca"
    if isinstance(exc, ssl.SSLError) and any(alert in text for alert in _CLIENT_CERT_ALERTS):
        # The server's TLS alert about our certificate: it was retried, and logged, for ever (found by an audit).
        return f"nats: the server refused our TLS client certificate ({exc}): check nats.tls_cert and nats.tls_key"
    return None


_CLIENT_CERT_ALERTS: Final = (
    "alert certificate required",
    "alert unknown ca",
    "alert bad certificate",
    "alert certificate unknown",
    "alert certificate expired",
    "alert certificate revoked",
    "alert unsupported certificate",
)
"""TLS alerts a server sends about the client's certificate (OpenSSL's wording, lower case)."""


async def _on_error(exc: Exception) -> None:
    log.warning("nats: %s", exc)


async def _on_disconnect() -> None:
    log.info("nats: disconnected")
