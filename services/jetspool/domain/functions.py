"""A function: a named HTTP endpoint requests are delivered to (SPEC §1)."""

from __future__ import annotations

import re
import ssl
from typing import TYPE_CHECKING, Annotated, Final
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec
import yarl

from jetspool.domain.errors import DecodeError

if TYPE_CHECKING:
    from collections.abc import Iterable

NAME_PATTERN: Final = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_NAME = re.compile(NAME_PATTERN)
DEFAULT_RESULT_TTL_S: Final = 604_800.0
MAX_SECONDS: Final = 315_360_000.0
"""Ten years: the longest timeout or result_ttl (NATS message TTLs and datetimes overflow far above it)."""
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_VALUE = re.compile(r"^[^\x00-\x08\x0a-\x1f\x7f]*$")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
_SET_BY_JETSPOOL: Final = frozenset({"x-call-id", "x-request-id", "x-attempt", "x-logs-url"})
"""What a call carries from jetspool (SPEC §4): a function's configured `headers` took its place,
and the function got the configured `X-Call-Id` instead of the request's id (found by an audit)."""
FRAMING_HEADERS: Final = frozenset(
    {"content-length", "transfer-encoding", "host", "connection", "keep-alive", "te", "trailer", "upgrade", "expect"}
)
"""Headers HTTP itself sets on each call: a function's `headers` may not set them, and a caller's
are not forwarded (an `Expect: 100-continue` was answered by the gateway already; forwarded, it
would have the call wait for a `100 Continue` a function need not send)."""
HOP_BY_HOP: Final = FRAMING_HEADERS | {
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "trailers",
    "authorization",
}
"""Headers of one hop: framing (see `FRAMING_HEADERS`), the other hop-by-hop ones, and the caller's
credentials."""
NOT_FORWARDED: Final = HOP_BY_HOP | {"accept-encoding"}
"""Headers never forwarded to a function: `HOP_BY_HOP`, and `Accept-Encoding`. A function's answer
is stored and handed out later as it was meant, so it must come back decoded: a function that
honoured a caller's `br` or `zstd` answered in a coding the worker cannot decode, and the call
failed as if the function could not be reached."""
_SET_ON_ANSWERS: Final = frozenset(
    {
        "x-call-id",
        "x-request-id",
        "x-fal-request-id",
        "x-function-name",
        "x-function-status",
        "x-duration-seconds",
        "x-start-time",
        "x-error-type",
        "x-fal-error-type",
        "x-request-timeout-type",
        "x-fal-request-timeout-type",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "traceparent",
        "tracestate",
    }
)
"""What jetspool sets on a result it hands out and on a callback (SPEC §5, §6)."""
KEPT_HEADERS_BYTES: Final = 16 * 1024
"""The most of a function's answer headers its result keeps (names, values and separators)."""
NOT_HANDED_ON: Final = HOP_BY_HOP | {"content-encoding", "server", "date"}
"""Headers of a function's answer never handed on, by the synchronous proxy or with a result: those
of the hop, the coding (the body comes decoded), and those each server sets for itself."""
NOT_KEPT: Final = NOT_HANDED_ON | _SET_ON_ANSWERS | {"content-type", "set-cookie"}
"""Headers of a function's answer not kept with its result: `NOT_HANDED_ON`, jetspool's own, the
type (kept on its own), and cookies, which were the function's business with the worker's call."""
_PATH_SAFE: Final = "/:@!$&'()*+,;="
"""Characters a URL path may hold as they are (RFC 3986 pchar); the rest of a decoded sub-path is
percent-encoded again, so `%1F` or `%25` in a caller's path reaches the function as it was sent."""

FunctionName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]


def forwardable(headers: list[tuple[str, str]], never: frozenset[str] = NOT_FORWARDED) -> list[tuple[str, str]]:
    """The headers that travel on to the next hop: not those in `never`, nor those the message's
    `Connection` header names, which are hop-by-hop too (RFC 9110 §7.6.1)."""
    listed = (value for key, value in headers if key.lower() == "connection")
    named = {token.strip().lower() for value in listed for token in value.split(",")}
    dropped = never | named if named else never
    return [(key, value) for key, value in headers if key.lower() not in dropped]


def kept_headers(raw: Iterable[tuple[bytes, bytes]]) -> tuple[list[tuple[str, str]], int]:
    """The headers of a function's answer that its result keeps (see `NOT_KEPT`), read off the
    wire, and how many were left out for size.

    The result route and an OpenFaaS callback hand them out as the synchronous proxy would, as
    OpenFaaS's queue-worker passes them to a callback: a 3xx came without its `Location`. They are
    kept in the order sent up to `KEPT_HEADERS_BYTES`: a small result travels in the status record,
    and one too large for a NATS message failed its completion write, so that a call that succeeded
    ran again at every attempt (found by a review)."""
    kept, size = [], 0
    candidates = forwardable(read_off_wire(raw), NOT_KEPT)
    for name, value in candidates:
        size += len(name) + len(value) + 4  # as on the wire: `name: value\r\n`
        if size > KEPT_HEADERS_BYTES:
            break
        kept.append((name, value))
    return kept, len(candidates) - len(kept)


def read_off_wire(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Headers as text, each byte a Latin-1 character, so that `to_wire` gives back the same bytes."""
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]


def to_wire(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Headers read off the wire (`read_off_wire`) as the bytes they were: httpx encodes a str value as
    ASCII, and a caller's `café` made a synchronous call a bare 500 (found by an audit)."""
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def as_utf8(value: str) -> str:
    """A header value as read off the wire (each byte a Latin-1 character), in the form aiohttp
    sends byte for byte (it encodes header values as UTF-8): a caller's UTF-8 `café` reached the
    function encoded twice (found by an audit). Submits refuse values that are not UTF-8
    (`not_utf8`); one stored before that is sent with replacement characters."""
    if value.isascii():
        return value
    return value.encode("latin-1").decode("utf-8", "replace")


def not_utf8(headers: list[tuple[str, str]]) -> str | None:
    """The first header, read off the wire, whose value is not UTF-8; None when all are."""
    for name, value in headers:
        if not value.isascii():
            try:
                value.encode("latin-1").decode("utf-8")
            except UnicodeError:
                return name
    return None


def call_headers(
    forwarded: list[tuple[str, str]], own: list[tuple[str, str]], configured: dict[str, str]
) -> list[tuple[str, str]]:
    """The headers of a call to a function: the caller's `forwarded` ones, then jetspool's `own`,
    then the function's `configured` ones, each name once. A later source's name drops the earlier
    copies, so a caller cannot send a header the function's config sets (its auth to the function)
    nor one jetspool sets: the function reads the first copy of a repeated header (found by a
    security audit of the synchronous proxy)."""
    set_later = {name.lower() for name in configured}
    own = [(k, v) for k, v in own if k.lower() not in set_later]
    set_later.update(k.lower() for k, _ in own)
    return [*((k, v) for k, v in forwarded if k.lower() not in set_later), *own, *configured.items()]


def _check_url(url: str) -> None:
    """A function's URL as both HTTP clients (aiohttp in the worker, httpx in the gateway's
    synchronous proxy) can call it. A port out of range, a broken IPv6 literal and a space or control
    character were registered, and every call then failed with no reason given, or a bare 500 from
    the synchronous proxy (found by an audit)."""
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError("url: must be an absolute http:// or https:// URL")
    if "#" in url:
        raise ValueError("url: must not have a fragment (#...): it is never sent, and what followed it would be lost")
    if _SPACE_OR_CONTROL.search(url):
        raise ValueError("url: must not hold spaces or control characters (percent-encode them)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"url: not a valid URL ({exc})") from exc
    if not parts.hostname:
        raise ValueError("url: must name a host")
    if port == 0:
        raise ValueError("url: the port must be 1 to 65535")


def _check_headers(headers: dict[str, str]) -> None:
    """A function's configured headers, as they can be sent on every call."""
    seen: dict[str, str] = {}
    for header, value in headers.items():
        lower = header.lower()
        if not _HEADER_NAME.fullmatch(header) or lower in FRAMING_HEADERS:
            raise ValueError(f"headers: {header!r} cannot be sent as a header name")
        if lower in _SET_BY_JETSPOOL:
            raise ValueError(f"headers: {header} is set by jetspool on every call (SPEC §4)")
        if lower in seen:
            raise ValueError(f"headers: {seen[lower]!r} and {header!r} name the same header")
        seen[lower] = header
        if not _HEADER_VALUE.fullmatch(value):
            raise ValueError(f"headers: the value of {header!r} holds a control character")
        if not value.isascii():
            # The synchronous proxy's httpx sends ASCII only: a `café` there was a bare 500 (an audit).
            raise ValueError(f"headers: the value of {header!r} must be ASCII (percent-encode or base64 the rest)")


def is_valid_name(name: str) -> bool:
    """Whether `name` may be used as a function name (and so in subjects and consumer names)."""
    return _NAME.fullmatch(name) is not None


class Function(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Registry entry of one function, as stored in the functions KV bucket (the admin API adds `stats`)."""

    name: FunctionName
    url: str
    timeout: Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS)] = 3600.0
    """Seconds one invocation may run (exec timeout)."""
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    """Deliveries before giving up; 1 means no retries."""
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 8
    """Requests in flight to this function per worker process."""
    cancel_path: str | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra headers added to every invocation (e.g. auth to the function)."""
    result_ttl: Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS)] = DEFAULT_RESULT_TTL_S
    """Seconds status and result are kept after completion."""

    def __post_init__(self) -> None:
        if not is_valid_name(self.name):  # the pattern's `$` alone would let a trailing newline through
            raise ValueError(f"name: invalid function name {self.name!r}")
        _check_url(self.url)
        _check_headers(self.headers)
        if self.cancel_path is not None:
            if not self.cancel_path.startswith("/"):
                raise ValueError("cancel_path: must start with /")
            if leaves_its_url(self.cancel_path) or _SPACE_OR_CONTROL.search(self.cancel_path):
                raise ValueError("cancel_path: must not hold a '.' or '..' segment, spaces or control characters")

    def endpoint(self, path: str) -> str:
        """The URL a request with sub-path `path` is delivered to (SPEC §4: `url + path`): the URL
        as registered without one (a trailing slash dropped made FastAPI answer a redirect); with
        one, joined to the URL's path by one slash, ahead of the URL's own query (a key, such as
        Azure Functions' `?code=`, which a caller's query then follows: see `with_query`)."""
        if not path:
            return self.url
        base, mark, own_query = self.url.partition("?")
        return f"{base.rstrip('/')}/{quote(path.lstrip('/'), safe=_PATH_SAFE)}{mark}{own_query}"

    def encode(self) -> bytes:
        return msgspec.json.encode(self)


def leaves_its_url(path: str) -> bool:
    """Whether a sub-path has a `.` or `..` segment, which would take a call out from under its
    function's URL. Backslashes count as separators and `;` parameters are ignored, as some servers do."""
    return any(segment.partition(";")[0] in {".", ".."} for segment in re.split(r"[/\\]", path))


def is_base_url(url: str) -> bool:
    """`http(s)://host[:port][/path]`, the base of a gateway's URLs: no spaces or control
    characters, no query, no fragment."""
    if re.search(r"[\x00-\x20\x7f?#]", url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - reading it checks the port
    except ValueError:
        return False
    return parts.scheme in {"http", "https"} and bool(parts.hostname)


def with_query(url: str, query: str) -> str:
    """`url` with a caller's query string added after the one it may have."""
    if not query:
        return url
    if url.endswith(("?", "&")):
        return f"{url}{query}"
    return f"{url}{'&' if '?' in url else '?'}{query}"


def shown(url: str) -> str:
    """`url` as logs and traces show it: without credentials or query (which may hold a key, such
    as `?code=`, or a caller's secret)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def masked(url: str) -> str:
    """`url` as the status object shows it to every reader and event subscriber: its user info and
    query values masked, its query names kept (which callback a caller gave stays plain to see).
    The status showed a callback URL's `user:password@` and `?token=` as given (found by a security
    audit)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")
    netloc = f"{_MASK}@{host[2]}" if host[1] else host[2]
    query = "&".join(_masked_item(item) for item in parts.query.split("&"))
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


_MASK: Final = "***"


def _masked_item(item: str) -> str:
    """A query item with its value masked; one without `=` is all value (`?s3cret`), masked whole."""
    name, equals, _ = item.partition("=")
    if not equals:
        return _MASK if item else ""
    return f"{name}={_MASK}"


def decode_function(data: bytes) -> Function:
    """Decode a registry entry; raises DecodeError."""
    try:
        return msgspec.json.decode(data, type=Function)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"invalid function entry: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise DecodeError(f"function entry is not JSON: {exc}") from exc


_QUERY_SAFE: Final = "".join(map(chr, range(0x21, 0x7F)))
"""Every printable ASCII character: a query keeps them as they came; other bytes are percent-encoded."""


_ORIGIN: Final = re.compile(r"(https?://[^/?#]*)(.*)", re.DOTALL)
"""A function URL's scheme and authority, and the rest (path and query)."""


def function_url(function: Function, path: str, query: str = "") -> yarl.URL:
    """Where a call to `function` at sub-path `path` goes (a request, or its cancel notice): the
    function's URL as registered, the sub-path percent-encoded again (see `Function.endpoint`), and
    `query` exactly as the caller sent it, after the URL's own.

    Only the host is normalised (IDNA). Given the rest to parse, yarl normalised it too: `%3A` in a
    query went out as `:` and `%2F` as `/`, in a caller's query or a key in the function's URL."""
    origin, rest = _ORIGIN.fullmatch(function.endpoint(path)).groups()  # type: ignore[union-attr]
    own = quote(rest, safe=_QUERY_SAFE)  # only what a request line cannot carry raw
    query = quote(query, safe=_QUERY_SAFE, encoding="latin-1")
    return yarl.URL(with_query(f"{yarl.URL(origin)}{own}", query), encoded=True)


def outbound_tls() -> ssl.SSLContext:
    """The certificates that calls out of jetspool (functions, both routes; callbacks) trust: the
    system's, and `SSL_CERT_FILE` / `SSL_CERT_DIR` as they stand when a client is made. aiohttp's
    own default is made at its import, and httpx's is certifi's bundle unless it reads the
    environment, which would also give it the environment's proxy."""
    return ssl.create_default_context()
