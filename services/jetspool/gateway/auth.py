"""API keys and per-key rate limits (SPEC §7), as an ASGI layer in front of every route.

- No keys configured: every route is open (the app warns at start-up).
- Keys configured: every route needs `Authorization: Bearer <key>` or `Authorization: Key <key>`
  (fal-client's form), except the open ones: `/healthz`, `/readyz`, `/metrics`, `/schema...`,
  `/ui...`, and a request's X-Logs-Url (its own token guards it). `/system/*` needs an admin key.
  Missing or wrong key: 401; a valid key that is not an admin key on `/system/*`: 403.
- Keys are compared in constant time (every configured key, digests of equal length).
- `auth.rate_limit` (requests per second per key, with `auth.rate_burst`): over it, 429 with
  `Retry-After`. The buckets live in each gateway process: N gateways allow N times the rate.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import orjson
from litestar.enums import ScopeType

from jetspool.domain import names
from jetspool.gateway.intake import named_request_id

if TYPE_CHECKING:
    from litestar.types import ASGIApp, HTTPResponseBodyEvent, HTTPResponseStartEvent, Receive, Scope, Send

    from jetspool.settings import AuthSettings

OPEN_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
_OPEN_PREFIXES: Final = ("/schema", "/ui")
_LOGS_URL: Final = re.compile(r"^/queue/[^/]+/requests/[^/]+/logs$")
_ADMIN_PREFIX: Final = "/system/"
_SCHEMES: Final = ("bearer ", "key ")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass
class _Bucket:
    tokens: float
    at: float = field(default_factory=time.monotonic)


class KeyGuard:
    """The ASGI layer: `KeyGuard(settings)(app)` wraps the application."""

    def __init__(self, settings: AuthSettings) -> None:
        self._api = [_digest(k) for k in settings.api_keys]
        self._admin = [_digest(k) for k in settings.admin_keys]
        self._rate = settings.rate_limit
        self._burst = float(settings.rate_burst or max(1.0, 2 * (settings.rate_limit or 0)))
        self._buckets: dict[bytes, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._api or self._admin)

    def __call__(self, app: ASGIApp) -> ASGIApp:
        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP or not self.enabled or _is_open(scope):
                await app(scope, receive, send)
                return
            refusal = self._check(scope)
            if refusal is None:
                await app(scope, receive, send)
                return
            status, detail, headers = refusal
            request_id = named_request_id(scope["path"])
            if request_id is not None:  # a refusal about a request names it too (SPEC §2)
                headers = {**headers, names.H_REQUEST_ID: request_id}
            await _answer(send, status, detail, headers)

        return guarded

    def _check(self, scope: Scope) -> tuple[int, str, dict[str, str]] | None:
        """None when the request may pass; else (status, detail, headers)."""
        provided = _credential(scope)
        if provided is None:
            return 401, "an API key is required: Authorization: Bearer <key> (or Key <key>)", _CHALLENGE
        digest = _digest(provided)
        is_admin = _known(digest, self._admin)
        if not (is_admin or _known(digest, self._api)):
            return 401, "the API key is not valid", _CHALLENGE
        if scope["path"].startswith(_ADMIN_PREFIX) and not is_admin:
            return 403, "this route needs an admin key", {}
        wait_s = self._spend(digest)
        if wait_s is not None:
            return 429, "rate limit of this API key exceeded", {"Retry-After": str(max(1, math.ceil(wait_s)))}
        return None

    def _spend(self, digest: bytes) -> float | None:
        """Take a token from the key's bucket; None when there was one, else seconds until there is."""
        if self._rate is None:
            return None
        now = time.monotonic()
        bucket = self._buckets.setdefault(digest, _Bucket(self._burst, now))
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)
        bucket.at = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return (1 - bucket.tokens) / self._rate


_CHALLENGE: Final = {"WWW-Authenticate": 'Bearer realm="jetspool"'}


def _known(digest: bytes, keys: list[bytes]) -> bool:
    """Whether `digest` is one of `keys`, comparing with every one (no early exit)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(digest, key)
    return found


def _is_open(scope: Scope) -> bool:
    path: str = scope["path"]
    if path in OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
        return True
    return _LOGS_URL.match(path) is not None and b"token=" in scope.get("query_string", b"")


def _credential(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            text = value.decode("latin-1").strip()
            for scheme in _SCHEMES:
                if text.lower().startswith(scheme):
                    return text[len(scheme) :].strip() or None
            return None
    return None


async def _answer(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    body = orjson.dumps({"detail": detail})
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    start: HTTPResponseStartEvent = {"type": "http.response.start", "status": status, "headers": raw_headers}
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(start)
    await send(end)
