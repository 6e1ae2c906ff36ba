"""Settings: one typed object for every component, validated at start.

Sources, later ones winning: the YAML config file (`--config FILE` or `JETSPOOL_CONFIG`),
`JETSPOOL_*` environment variables (`JETSPOOL_` + the key path in upper case joined by `__`,
e.g. `JETSPOOL_NATS__URL`; `JETSPOOL_FUNCTIONS` for the list of functions), then command-line
flags. A bad value raises `ConfigError` naming the key, e.g. ``nats.replicas: Expected `int`,
got `str```; `validate` also checks what the types cannot (the NATS server URLs, the gateway's
public URL, its TLS files given both or neither, backoffs that start above their cap), so every
command stops before it starts anything. That files can be read is checked only by what needs them:
the gateway's by what serves it (`check_tls_files`), the NATS ones by what connects
(`jetspool.jetstream.connection`); client commands need neither.
"""

from __future__ import annotations

import base64
import binascii
import errno
import ipaddress
import json
import os
import re
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, get_args, get_origin
from urllib.parse import urlsplit

import msgspec
import yaml
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

from jetspool.domain.errors import ConfigError
from jetspool.domain.functions import Function, is_base_url
from jetspool.domain.validation import describe

if TYPE_CHECKING:
    from collections.abc import Mapping

ENV_PREFIX: Final = "JETSPOOL_"
_Positive = Annotated[float, msgspec.Meta(gt=0)]
_Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
"""Port 0 (any free one) is refused: the URLs handed to clients, and `up`'s readiness check, name the port."""
_SYNC_INTERVAL = re.compile(r"^(?:always|(\d+)(ms|s|m|h))$")
_NATS_SCHEMES: Final = ("nats", "tls", "ws", "wss")
_SECRET_BYTES: Final = (24, 64)
_NANOS: Final = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
_WEBSOCKET_SCHEMES: Final = ("ws", "wss")


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every settings section: immutable, unknown keys refused."""


class NatsSettings(_Section, frozen=True, kw_only=True):
    url: str | list[str] | None = None
    """Server URL (`nats://`, `tls://`, `ws://` or `wss://`), a comma-separated string or a list of a
    cluster's servers; None: `up` embeds one."""
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    """Replicas of every stream, KV bucket and object store (3 on a cluster)."""
    sync_interval: str = "always"
    """Embedded server's fsync policy: `always` (an acknowledged request survives power loss) or e.g. `2m`."""
    credentials: str | None = None
    """A user's `.creds` file (its JWT and nkey seed), read by every component that connects."""
    nkey_seed: str | None = None
    """A file holding a user's nkey seed, read by every component that connects."""
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: _Positive = 5.0
    accept_single_replica: bool = False
    """Run with `replicas: 1` on a server jetspool did not start. Such a server keeps an acknowledged
    request through its machine's crash only if it fsyncs every write (`sync_interval: always`),
    which jetspool cannot check: say so here (`jetspool up` says so for the server it embeds)."""

    def __post_init__(self) -> None:
        found = _SYNC_INTERVAL.match(self.sync_interval)
        if not found:
            raise ValueError("sync_interval: must be `always` or a duration such as `2m`")
        count, unit = found.groups()
        if unit is not None and int(count) * _NANOS[unit] >= 2**63:
            # past what nats-server reads (a Go duration): it refused to start after the data dir was made
            raise ValueError("sync_interval: longer than nats-server takes (at most 2562047h)")
        # Each of these was taken, and its half ignored or one of the two sent (found by a CLI audit).
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_key: needs tls_cert, the certificate it belongs to")
        if self.password is not None and not self.user:
            raise ValueError("password: needs user")
        if self.token and self.user:
            raise ValueError("token: token and user/password are two ways to log in: set one of them")

    @property
    def servers(self) -> list[str]:
        """The configured servers as a list (empty when none is configured)."""
        if self.url is None:
            return []
        urls = self.url.split(",") if isinstance(self.url, str) else self.url
        return [u.strip() for u in urls if u.strip()]


class GatewaySettings(_Section, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: _Port = 8080
    public_url: str | None = None
    """Base of the absolute URLs handed to clients (an http:// or https:// URL without query or fragment);
    default `http://{host}:{port}`, or `https://` when the gateway serves HTTPS. An IPv6 host goes in
    brackets, and a wildcard bind (`0.0.0.0`, `::`) is named by loopback (`127.0.0.1`, `[::1]`), where
    a client on this machine reaches it: who serves clients elsewhere sets the URL they use."""
    max_body_size: Annotated[int, msgspec.Meta(gt=0)] = 32 * 1024 * 1024
    tls_cert: str | None = None
    """PEM certificate (chain) file; the gateway serves HTTPS when both it and `tls_key` are set."""
    tls_key: str | None = None
    """PEM private key file of `tls_cert`."""
    sse_ping_interval: _Positive = 15.0
    """Seconds of quiet after which a status stream sends a `: ping` comment."""
    max_streams: Annotated[int, msgspec.Meta(ge=1)] = 1000
    """Status streams (SSE) and `?wait=` long polls one gateway holds open at once; more get 503."""
    receive_timeout: _Positive = 60.0
    """Seconds a client has to send a whole request (headers already in); slower ones get 408."""

    @property
    def serves_https(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def base_url(self) -> str:
        return (self.public_url or self.default_url).rstrip("/")

    @property
    def default_url(self) -> str:
        """`public_url` when it is not set: where a client on this machine reaches the gateway."""
        scheme = "https" if self.serves_https else "http"
        return f"{scheme}://{url_host(self.host)}:{self.port}"


def url_host(host: str) -> str:
    """`host` (a bind address) as the host of a URL a client on this machine can use: a wildcard
    (`0.0.0.0`, `::`) is reached on loopback, and an IPv6 address goes in brackets (`[::1]`)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a name (or brackets given already)
    v6 = isinstance(address, ipaddress.IPv6Address)
    if address.is_unspecified:
        return "[::1]" if v6 else "127.0.0.1"
    return f"[{address}]" if v6 else str(address)


class AuthSettings(_Section, frozen=True, kw_only=True):
    api_keys: list[str] = msgspec.field(default_factory=list)
    """Keys that may submit and read (`Authorization: Bearer <key>` or `Key <key>`)."""
    admin_keys: list[str] = msgspec.field(default_factory=list)
    """Keys that may also use `/system/*`."""
    rate_limit: _Positive | None = None
    """Requests per second per key (in each gateway process); None: no limit."""
    rate_burst: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Requests a key may make at once before the rate applies; default twice the rate."""

    def __post_init__(self) -> None:
        # Naming the list and the entry: it said only `auth:` (found by an outside audit). The key
        # itself is not shown: it is a secret.
        for kind, keys in (("api_keys", self.api_keys), ("admin_keys", self.admin_keys)):
            for index, key in enumerate(keys):
                if not _is_sendable_key(key):
                    raise ValueError(
                        f"{kind}[{index}]: API keys must be non-empty printable ASCII, without surrounding spaces"
                    )


def _is_sendable_key(key: str) -> bool:
    """Whether a client can send `key` in an Authorization header and have it match. A key with a
    letter beyond ASCII never matched: headers arrive as bytes, read as latin-1, while the key was
    hashed as UTF-8 (found by a security audit); clients disagree on how to encode one anyway."""
    return key == key.strip() and key.isascii() and key.isprintable() and bool(key)


class WorkerSettings(_Section, frozen=True, kw_only=True):
    ack_wait: _Positive = 30.0
    """Seconds JetStream waits for an acknowledgement; running calls send in-progress acks every third of it."""
    poll_interval: _Positive = 1.0
    """Seconds an idle worker waits before looking for work that became due without a wake-up (retries)."""
    shutdown_grace: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """Seconds a stopping worker lets in-flight calls finish before handing them back."""


class RetrySettings(_Section, frozen=True, kw_only=True):
    initial_backoff: _Positive = 1.0
    max_backoff: _Positive = 60.0
    multiplier: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    jitter: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.2
    max_retry_after: _Positive = 600.0


class CallbackSettings(_Section, frozen=True, kw_only=True):
    signing_secret: str | None = None
    """Standard Webhooks secret (`whsec_` + base64); every callback is signed when it is set."""
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 10
    initial_backoff: _Positive = 5.0
    max_backoff: _Positive = 1800.0
    multiplier: Annotated[float, msgspec.Meta(ge=1)] = 3.0
    """With the defaults: 10 attempts over about 2 hours (waits of 5 s, 15 s, 45 s, ... up to 30 min)."""
    jitter: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.2
    deny_private: bool = False
    """Also refuse callback URLs resolving to loopback or private addresses."""
    hosts: dict[str, str] = msgspec.field(default_factory=dict)
    """Host name → IP address, used before DNS for callback URLs (like curl's --resolve)."""
    timeout: _Positive = 10.0
    """Seconds one delivery attempt may take."""

    def __post_init__(self) -> None:
        if self.signing_secret is not None:
            # The library takes any base64 with or without the prefix: `nope` made a 3-byte key
            # (found by a CLI audit). Standard Webhooks keys are 24 to 64 bytes.
            shape = "signing_secret: must be a Standard Webhooks secret: whsec_ + the base64 of 24 to 64 bytes"
            secret = self.signing_secret.strip()  # a Kubernetes secret's file ends with a newline
            if not secret.startswith("whsec_"):
                raise ValueError(shape)
            try:
                Webhook(self.signing_secret)
                key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
            except (ValueError, binascii.Error, EmptyWebhookSecretError) as exc:
                raise ValueError(shape) from exc
            if not _SECRET_BYTES[0] <= len(key) <= _SECRET_BYTES[1]:
                raise ValueError(shape)
        for name, address in self.hosts.items():
            try:
                ipaddress.ip_address(address)
            except ValueError as exc:
                raise ValueError(f"hosts.{name}: must be an IP address, got {address!r}") from exc


class EventSettings(_Section, frozen=True, kw_only=True):
    max_age: _Positive = 7 * 86400.0
    """Seconds the events stream keeps an event for subscribers to replay."""
    max_bytes: Annotated[int, msgspec.Meta(ge=-1)] = -1
    """Size cap of the events stream (oldest events go first); -1: no cap."""
    inline_result_limit: Annotated[int, msgspec.Meta(ge=0)] = 64 * 1024
    """A function's JSON output up to this many bytes rides in its succeeded/failed event as `result`."""


class Settings(_Section, frozen=True, kw_only=True):
    nats: NatsSettings = msgspec.field(default_factory=NatsSettings)
    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    retry: RetrySettings = msgspec.field(default_factory=RetrySettings)
    callbacks: CallbackSettings = msgspec.field(default_factory=CallbackSettings)
    events: EventSettings = msgspec.field(default_factory=EventSettings)
    functions: list[Function] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        names = [f.name for f in self.functions]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"functions: names must be unique, repeated: {', '.join(duplicates)}")


_SECTIONS: Final = {f.name: f.type for f in msgspec.structs.fields(Settings) if f.name != "functions"}
_FUNCTIONS_ENV: Final = f"{ENV_PREFIX}FUNCTIONS"
_KNOWN_TOP: Final = frozenset(f.name for f in msgspec.structs.fields(Settings))


def load(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the config file, the environment and flags (dotted keys, e.g. `nats.url`) and validate."""
    env = os.environ if env is None else env
    config_file = config_file or env.get(f"{ENV_PREFIX}CONFIG") or None
    merged = _read_file(Path(config_file)) if config_file else {}
    from_file = dict(merged["gateway"]) if isinstance(merged.get("gateway"), dict) else None
    from_env, from_flags = _from_env(env), _from_flags(flags or {})
    _deep_merge(merged, from_env)
    _deep_merge(merged, from_flags)
    _follow_address(merged, from_file, from_env.get("gateway"), from_flags.get("gateway"))
    try:
        return validate(merged)
    except ConfigError as exc:
        raise ConfigError(_with_source(str(exc), from_env, from_flags)) from exc


def _with_source(message: str, from_env: dict[str, Any], from_flags: dict[str, Any]) -> str:
    """`message` about a key, saying which environment variable set it, when one did and no flag
    overrode it: `gateway.port: ...` did not say the bad value came from `JETSPOOL_GATEWAY__PORT`
    (found by an outside audit)."""
    key = message.partition(":")[0]
    if re.match(r"functions\b", key) and "functions" in from_env and _FUNCTIONS_ENV not in message:
        return f"{message} (set by {_FUNCTIONS_ENV})"  # it did not say so (found by an audit)
    path = key.split(".")
    if len(path) < 2 or not all(part.isidentifier() for part in path) or _has_path(from_flags, path):  # noqa: PLR2004
        return message
    if not _has_path(from_env, path):
        return message
    return f"{message} (set by {ENV_PREFIX}{'__'.join(part.upper() for part in path)})"


def _has_path(tree: dict[str, Any], path: list[str]) -> bool:
    node: Any = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _follow_address(merged: dict[str, Any], from_file: object, from_env: object, flagged: object) -> None:
    """A file's `gateway.public_url` that only spells out the address its `host` and `port` make,
    as SPEC §9's example does, follows a host or port given by flag (`--host`, `--port`): `up
    --port` served on the new port and handed out URLs of the file's, where nothing listened (found
    by a CLI audit). A URL of another address (a proxy's, a name) stays as written, and so does any
    with an environment variable for the port (a container's port map may publish the file's)."""
    if not isinstance(from_file, dict) or not isinstance(flagged, dict):
        return
    if (isinstance(from_env, dict) and "public_url" in from_env) or "public_url" in flagged:
        return
    if not {"host", "port"} & flagged.keys() or not isinstance(from_file.get("public_url"), str):
        return
    address = {k: v for k, v in from_file.items() if k in ("host", "port", "tls_cert", "tls_key")}
    try:
        spelled_out = msgspec.convert(address, GatewaySettings, strict=False).default_url
    except msgspec.ValidationError:
        return  # validation names the bad key
    if from_file["public_url"].rstrip("/") == spelled_out:
        del merged["gateway"]["public_url"]


def validate(raw: Mapping[str, Any]) -> Settings:
    """Convert a raw mapping into `Settings`, or raise `ConfigError` naming the bad key."""
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(describe(exc)) from exc
    _check_nats_urls(settings.nats.servers)
    _check_public_url(settings.gateway)
    _check_tls(settings.gateway)
    _check_backoff("retry", settings.retry.initial_backoff, settings.retry.max_backoff)
    _check_backoff("callbacks", settings.callbacks.initial_backoff, settings.callbacks.max_backoff)
    return settings


def _check_nats_urls(servers: list[str]) -> None:
    """Each server a URL nats-py can connect to, and not websocket and plain ones mixed (nats-py
    refuses both only when it connects: a traceback, or a host name it looks up forever)."""
    for url in servers:
        if not _is_nats_url(url):
            raise ConfigError(
                f"nats.url: {url!r} is not a NATS server URL: nats://, tls://, ws:// or wss:// with a host, "
                "and a port from 1 to 65535 if given (several servers: comma-separated, or a YAML list)"
            )
    if len({url.partition("://")[0] in _WEBSOCKET_SCHEMES for url in servers}) > 1:
        raise ConfigError("nats.url: websocket servers (ws://, wss://) cannot be mixed with nats:// or tls:// ones")


def _is_nats_url(url: str) -> bool:
    """`scheme://[user[:password]@]host[:port]`, the scheme in lower case as nats-py looks for it;
    without one, `host[:port]` is a nats:// server, as nats-py and the `nats` CLI take it."""
    if "://" not in url:
        url = f"nats://{url}"
    scheme, _, _ = url.partition("://")
    if scheme not in _NATS_SCHEMES or re.search(r"[\x00-\x20\x7f]", url):
        return False
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return bool(parts.hostname) and port != 0


def _check_backoff(section: str, initial_s: float, max_s: float) -> None:
    """The first wait of a backoff may not be longer than the cap every wait is held to."""
    if initial_s > max_s:
        raise ConfigError(
            f"{section}.initial_backoff, {section}.max_backoff: the first wait ({initial_s:g} s) may not be "
            f"longer than the cap on every wait ({max_s:g} s)"
        )


def _check_public_url(gateway: GatewaySettings) -> None:
    """The base of the URLs handed to clients must make them absolute (SPEC §2); when it is not set,
    the one made of `gateway.host` too (a host that makes none is named as such)."""
    url = gateway.public_url
    if url is not None and not is_base_url(url):
        raise ConfigError(
            f"gateway.public_url: must be an absolute http:// or https:// URL without query or fragment, got {url!r}"
        )
    if url is None and not _is_host(gateway.host):
        raise ConfigError(f"gateway.host: {gateway.host!r} is not a host name or IP address")


def _is_host(host: str) -> bool:
    """An IP address, or a name of letters, digits, `-`, `_` and `.`: what a URL can name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return re.fullmatch(r"[\w.-]+", host) is not None
    return True


def _check_tls(gateway: GatewaySettings) -> None:
    """HTTPS needs both PEM files (SPEC §9): neither alone."""
    files = _tls_files(gateway)
    given = [key for key, path in files.items() if path is not None]
    if len(given) == 1:
        (missing,) = files.keys() - set(given)
        raise ConfigError(f"{missing}: required with {given[0]} (the gateway serves HTTPS when both are set)")


def _tls_files(gateway: GatewaySettings) -> dict[str, str | None]:
    return {"gateway.tls_cert": gateway.tls_cert, "gateway.tls_key": gateway.tls_key}


def check_tls_files(gateway: GatewaySettings) -> None:
    """ConfigError naming the key unless the gateway's PEM files can be read: checked by what
    serves the gateway (`gateway`, `up`) before it starts. Not by `validate`: workers and client
    commands may share the config file on machines that do not hold the gateway's key."""
    for key, path in _tls_files(gateway).items():
        if path is not None:
            read_named_file(key, path)
    if gateway.tls_cert and gateway.tls_key:
        load_cert_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), gateway.tls_cert, gateway.tls_key, "gateway")


def read_named_file(key: str, path: str) -> bytes:
    """The contents of the file setting `key` names; ConfigError naming the key when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc


def load_cert_chain(context: ssl.SSLContext, cert: str, key: str, section: str) -> None:
    """Load `section`'s (gateway, nats) certificate and key into `context`; ConfigError naming the
    keys when they do not go together or are not PEM (a traceback and exit code 1 before)."""
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError too
        raise ConfigError(f"{section}.tls_cert, {section}.tls_key: cannot use {cert} with {key} ({exc})") from exc


def check_listen(gateway: GatewaySettings) -> None:
    """ConfigError naming the key when the gateway's address is taken: checked by what serves the
    gateway before it starts (uvicorn's own failed bind ends in a traceback; `up` would take the
    other server's answers for its gateway's)."""
    v6 = ":" in gateway.host
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: only a listener stops it
        try:
            sock.bind((gateway.host, gateway.port))
        except OSError as exc:
            where = f"[{gateway.host}]:{gateway.port}" if v6 else f"{gateway.host}:{gateway.port}"
            taken = exc.errno in (errno.EADDRINUSE, errno.EACCES)  # else the host: not ours, or no address
            key = "gateway.port" if taken else "gateway.host"
            raise ConfigError(f"{key}: cannot listen on {where} ({exc.strerror})") from None


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # what `<<:` brings in may be overridden
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:  # `1:` and `true:` too: they are one key of the mapping, the last one kept
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object of `JETSPOOL_FUNCTIONS`, refusing a key given twice, as `load_yaml` does."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ConfigError(f"functions: {_FUNCTIONS_ENV}: the key {key!r} is given twice")
        found[key] = value
    return found


def load_yaml(text: str) -> Any:
    """Read YAML as `yaml.safe_load` does, but a mapping with a key given twice is a YAMLError: the
    last one won without a word (found by a CLI audit)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:  # a traceback and exit 1 from `up` and `worker` (a CLI audit)
        raise ConfigError(f"config file {path}: not UTF-8 text ({exc.reason})") from exc
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    # A section left empty (every key under it commented out) reads as null: its defaults, not a
    # refusal ("gateway: Expected `object`, got `null`"). An unknown one is still refused.
    return {key: value for key, value in data.items() if not (value is None and key in _KNOWN_TOP)}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """`JETSPOOL_SECTION__KEY=value` for every known section, and `JETSPOOL_FUNCTIONS`; other
    `JETSPOOL_*` names are not settings."""
    tree: dict[str, Any] = {}
    for name, text in env.items():
        if name == _FUNCTIONS_ENV:
            tree["functions"] = _env_functions(text)
            continue
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name.removeprefix(ENV_PREFIX).lower().partition("__")
        if section not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section `{section}` (one of {', '.join(sorted(_SECTIONS))})")
        path = key.split("__")
        _set_path(tree, [section, *path], _env_value(name, section, path, text))
    return tree


def _env_functions(text: str) -> Any:
    """`JETSPOOL_FUNCTIONS`: a JSON or YAML list of function entries, replacing the file's `functions`;
    empty: no functions. `validate` checks the entries as it checks the file's."""
    if not text.strip():
        return []
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError:
        pass  # not JSON: YAML, then
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"functions: {_FUNCTIONS_ENV} is not a JSON or YAML list: {exc}") from exc


def _env_value(name: str, section: str, path: list[str], text: str) -> Any:
    """An environment value as its setting wants it.

    Text settings keep the text as it is (a password of digits stays text); list settings take
    `a,b` or a YAML list; everything else is read as YAML (numbers, booleans, mappings). An empty
    value is an empty list for list settings and none for those that may be none; other settings
    refuse it.
    """
    kinds = _field_kinds(section, path[0]) if len(path) == 1 else set()
    if not text.strip():
        return _empty_value(name, ".".join([section, *path]), kinds)
    if list in kinds and not text.lstrip().startswith(("[", "- ")):
        return [part.strip() for part in text.split(",") if part.strip()]
    if kinds and kinds <= {str, type(None)}:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _empty_value(name: str, key: str, kinds: set[object]) -> Any:
    """What an empty variable means: none, or an empty list; refused for other settings."""
    if type(None) in kinds:
        return None
    if list in kinds:
        return []
    if kinds:
        raise ConfigError(f"{key}: {name} is empty; give it a value or unset it")
    return None  # not a known key: `validate` names it


def _field_kinds(section: str, key: str) -> set[object]:
    """The plain types a setting accepts (`str | list[str] | None` gives {str, list, NoneType})."""
    for field in msgspec.structs.fields(_SECTIONS[section]):
        if field.name == key:
            annotation = get_args(field.type)[0] if get_origin(field.type) is Annotated else field.type
            members = get_args(annotation) if get_origin(annotation) not in {list, dict} else ()
            plain = [get_args(t)[0] if get_origin(t) is Annotated else t for t in (members or (annotation,))]
            return {get_origin(t) or t for t in plain}
    return set()


def _from_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flags.items():
        if value is not None:
            _set_path(tree, dotted.split("."), value)
    return tree


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> None:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
