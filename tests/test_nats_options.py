"""NATS connection options (SPEC §7): user/password, token, nkey, credentials file and TLS work for every component; a
server that refuses the credentials stops start-up at once with a clear message (exit code 2)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

import msgspec
import nkeys
import pytest

from jetspool.domain.errors import ConfigError
from jetspool.embedded import EmbeddedNats
from jetspool.jetstream.connection import connect
from jetspool.settings import NatsSettings
from tests.support.operator import Keys, Operator
from tests.support.processes import ACCEPT_SINGLE_REPLICA, JetspoolProcess
from tests.support.servers import eventually, free_port
from tests.support.stack import start_stack
from tests.support.tls import self_signed

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

_USER = 'authorization { user: "alice", password: "s3cret" }\n'
_SHUTDOWN_GRACE = "JETSPOOL_WORKER__SHUTDOWN_GRACE"
_TOKEN = 'authorization { token: "t0ken-value" }\n'


@pytest.fixture
def secured(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), extra_config=request.param)
    server.start()
    yield server
    server.stop()


async def _round_trip(server: EmbeddedNats, **nats: str) -> None:
    """A whole stack on `server` with these connection settings serves a request."""
    stack = await start_stack(server, overrides={"nats": nats})
    try:
        await stack.register("echo")
        request_id = await stack.submit("echo", content=b"through auth")
        final = await stack.wait_for_status("echo", request_id)
    finally:
        await stack.close()
    assert "error_type" not in final
    assert [s.body for s in stack.functions.on("/echo")] == [b"through auth"]


@pytest.mark.parametrize("secured", [_USER], indirect=True)
async def test_user_and_password(secured: EmbeddedNats) -> None:
    await _round_trip(secured, user="alice", password="s3cret")


@pytest.mark.parametrize("secured", [_TOKEN], indirect=True)
async def test_token(secured: EmbeddedNats) -> None:
    await _round_trip(secured, token="t0ken-value")


async def test_an_nkey_seed(tmp_path: Path) -> None:
    """`nats.nkey_seed` (a seed file) signs the server's challenge. nats-py needs the `nkeys`
    package for it, which the project did not install: every component stopped with
    ModuleNotFoundError (found by a security audit); `nats.credentials` uses it too."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    users = f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}\n'
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), extra_config=users)
    server.start()
    try:
        await _round_trip(server, nkey_seed=str(seed_file))
        with pytest.raises(ConfigError, match="refused our credentials"):
            await connect(NatsSettings(url=server.url, connect_timeout=2.0), "no-seed")
    finally:
        server.stop()


async def test_a_credentials_file(tmp_path: Path) -> None:
    """`nats.credentials`: a user's `.creds` file (its JWT and nkey seed) on a server in operator
    mode, as Synadia Cloud and `nsc`-managed servers run. A user signed by a key the operator does
    not know is refused, with the message naming the settings to check."""
    operator = Operator.new()
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), extra_config=operator.server_config())
    server.start()
    try:
        await _round_trip(server, credentials=str(operator.user_creds(tmp_path / "user.creds")))
        stranger = operator.user_creds(tmp_path / "stranger.creds", signer=Keys.new(nkeys.PREFIX_BYTE_ACCOUNT))
        with pytest.raises(ConfigError, match=r"refused our credentials .*nats\.credentials"):
            await connect(NatsSettings(url=server.url, credentials=str(stranger), connect_timeout=2.0), "stranger")
    finally:
        server.stop()


async def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tls = f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n'
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), extra_config=tls)
    server.start()
    try:
        await _round_trip(server, tls_ca=str(cert))
        with pytest.raises(ConfigError, match=r"not trusted .* check nats\.tls_ca"):
            await connect(NatsSettings(url=server.url, connect_timeout=2.0), "no-ca")
    finally:
        server.stop()


async def test_a_client_certificate_the_server_refuses_stops_start_up_at_once(tmp_path: Path) -> None:
    """Without one, or with one of another CA, the server's TLS alert was logged and retried for
    ever, where a refused password stops start-up (found by an audit)."""
    (tmp_path / "server").mkdir()
    (tmp_path / "stranger").mkdir()
    cert, key = self_signed(tmp_path / "server")
    stranger_cert, stranger_key = self_signed(tmp_path / "stranger")
    tls = f'tls {{ cert_file: "{cert}", key_file: "{key}", ca_file: "{cert}", verify: true }}\n'
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), extra_config=tls)
    server.start()
    try:
        await _round_trip(server, tls_ca=str(cert), tls_cert=str(cert), tls_key=str(key))
        for client_cert, client_key in ((None, None), (str(stranger_cert), str(stranger_key))):
            settings = NatsSettings(
                url=server.url, tls_ca=str(cert), tls_cert=client_cert, tls_key=client_key, connect_timeout=2.0
            )
            with pytest.raises(ConfigError, match=r"refused our TLS client certificate .* check nats\.tls_cert"):
                await asyncio.wait_for(connect(settings, "refused-cert"), timeout=20)
    finally:
        server.stop()


def test_a_worker_on_a_tls_nats_stops_without_asyncios_ssl_eof_warning(tmp_path: Path) -> None:
    """asyncio warned "returning true from eof_received() has no effect when using ssl" at every
    stop, which tells an operator nothing (found by an audit)."""
    cert, key = self_signed(tmp_path)
    server = EmbeddedNats(
        tmp_path / "nats", port=free_port(), extra_config=f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n'
    )
    server.start()
    env = {
        "JETSPOOL_CONFIG": "",
        ACCEPT_SINGLE_REPLICA: "true",
        _SHUTDOWN_GRACE: "0",
        "JETSPOOL_NATS__TLS_CA": str(cert),
    }
    proc = JetspoolProcess(["worker", "--nats-url", server.url], env=env)
    try:
        proc.wait_for_text("worker ready", 30)
        code = proc.terminate(30)
    finally:
        proc.kill_tree()
        server.stop()

    assert code == 0, proc.output
    assert "worker stopping" in proc.output
    assert "eof_received" not in proc.output


async def test_unusable_tls_files_are_a_config_error_naming_the_keys(tmp_path: Path) -> None:
    """An absent CA file, or a key of another certificate: FileNotFoundError or ssl.SSLError with
    a traceback and exit code 1 before (found by a security audit)."""
    cert, _ = self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = self_signed(other)
    absent = str(tmp_path / "absent.pem")

    with pytest.raises(ConfigError, match=r"^nats\.tls_ca: cannot use"):
        await connect(NatsSettings(url="nats://127.0.0.1:1", tls_ca=absent), "bad-ca")
    with pytest.raises(ConfigError, match=r"^nats\.tls_cert, nats\.tls_key: cannot use"):
        await connect(NatsSettings(url="nats://127.0.0.1:1", tls_cert=str(cert), tls_key=str(other_key)), "bad-pair")


def _worker_exit(nats_url: str, env: dict[str, str]) -> tuple[int, str]:
    """Run `jetspool worker` against `nats_url` until it exits; its exit code and output."""
    return _command_exit(["worker", "--nats-url", nats_url], env)


def _command_exit(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `jetspool ARGS` (no config file; one replica accepted) until it exits; its exit code and output."""
    env = {"JETSPOOL_CONFIG": "", ACCEPT_SINGLE_REPLICA: "true", _SHUTDOWN_GRACE: "1", **env}
    proc = JetspoolProcess(args, env=env)
    try:
        code = proc.wait(30)
    finally:
        proc.kill_tree()
    return code, proc.output


def _args(command: str, nats_url: str, tmp_path: Path) -> list[str]:
    """`up`, `gateway` or `worker` on `nats_url` (`up` and `gateway` on a free port)."""
    args = [command, "--nats-url", nats_url]
    if command in {"up", "gateway"}:
        args += ["--port", str(free_port())]
    return [*args, "--data-dir", str(tmp_path / "data")] if command == "up" else args


def test_a_worker_with_an_absent_ca_file_exits_2_naming_it(tmp_path: Path) -> None:
    code, output = _worker_exit("nats://127.0.0.1:1", {"JETSPOOL_NATS__TLS_CA": str(tmp_path / "absent.pem")})

    assert code == 2
    assert "nats.tls_ca: cannot use" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("command", ["up", "gateway", "worker"])
@pytest.mark.parametrize("url", ["nats://127.0.0.1:99999", "not a url", "http://127.0.0.1:1"])
def test_every_command_stops_with_exit_2_naming_a_nats_url_that_names_no_server(
    tmp_path: Path, command: str, url: str
) -> None:
    """A port out of range ended the gateway in an ExceptionGroup traceback (exit 3) and the worker
    in `nats: invalid connect url option` (exit 1); an http:// URL was tried again
    for good (found by a CLI audit)."""
    code, output = _command_exit(_args(command, url, tmp_path), {})

    assert code == 2, output
    assert f"jetspool: nats.url: {url!r} is not a NATS server URL" in output
    assert "Traceback" not in output
    assert not (tmp_path / "data").exists()  # `up` started nothing


def _creds(path: Path, *, jwt: bool, seed: bool) -> str:
    """A credentials file with its JWT block, its seed block, or both, written to `path`."""
    text = "-----BEGIN NATS USER JWT-----\neyJ0eXAi.e30.sig\n------END NATS USER JWT------\n\n" if jwt else ""
    if seed:
        seed_text = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
        text += f"-----BEGIN USER NKEY SEED-----\n{seed_text}\n------END USER NKEY SEED------\n"
    path.write_text(text)
    return str(path)


def _text(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


_UNUSABLE_KEY_FILES: dict[str, tuple[str, Callable[[Path], str], str]] = {
    "an absent seed file": ("nkey_seed", lambda tmp: str(tmp / "absent.nk"), "cannot read"),
    "a directory for a seed": ("nkey_seed", str, "cannot read"),
    "a seed file without a seed": ("nkey_seed", lambda tmp: _text(tmp / "x.nk", "SUNOTASEED\n"), "holds no nkey seed"),
    "an absent credentials file": ("credentials", lambda tmp: str(tmp / "absent.creds"), "cannot read"),
    "credentials without a JWT": (
        "credentials",
        lambda tmp: _creds(tmp / "x.creds", jwt=False, seed=True),
        "is not a user's credentials file",
    ),
    "credentials without a seed": (
        "credentials",
        lambda tmp: _creds(tmp / "x.creds", jwt=True, seed=False),
        "is not a user's credentials file",
    ),
}


@pytest.mark.parametrize("case", sorted(_UNUSABLE_KEY_FILES))
async def test_unusable_key_files_are_a_config_error_naming_the_key(
    nats_server: EmbeddedNats, tmp_path: Path, case: str
) -> None:
    """nats-py reads these files only when a server asks for them: on this server, without
    authentication, an absent or broken credentials file went unnoticed; an absent or broken seed
    file ended in FileNotFoundError or ErrInvalidSeed (a worker's traceback, exit code 1). And on a
    server that asks, a credentials file without its JWT line has nats-py read past its end for good."""
    key, make, says = _UNUSABLE_KEY_FILES[case]
    path = make(tmp_path)
    settings = msgspec.structs.replace(NatsSettings(url=nats_server.url, connect_timeout=2.0), **{key: path})
    with pytest.raises(ConfigError, match=rf"^nats\.{key}: ") as caught:
        await connect(settings, case)
    assert says in str(caught.value)
    assert path in str(caught.value)


@pytest.mark.parametrize("command", ["up", "gateway", "worker"])
@pytest.mark.parametrize("key", ["nkey_seed", "credentials"])
def test_every_command_stops_with_exit_2_naming_an_absent_key_file(
    nats_server: EmbeddedNats, tmp_path: Path, command: str, key: str
) -> None:
    """On a server without authentication, which never asks for the file."""
    absent = tmp_path / "absent.nk"
    env = {f"JETSPOOL_NATS__{key.upper()}": str(absent)}
    code, output = _command_exit(_args(command, nats_server.url, tmp_path), env)

    assert code == 2, output
    assert f"jetspool: nats.{key}: cannot read {absent}" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("secured", [_TOKEN], indirect=True)
def test_an_absent_credentials_file_is_told_as_such_not_as_refused_credentials(secured: EmbeddedNats) -> None:
    """Against a server that wants a token, an absent `nats.credentials` was reported as
    credentials the server refused (found by an audit)."""
    absent = "/nonexistent.creds"
    code, output = _worker_exit(secured.url, {"JETSPOOL_NATS__CREDENTIALS": absent})

    assert code == 2, output
    assert f"nats.credentials: cannot read {absent}" in output
    assert "refused" not in output


@pytest.mark.parametrize("secured", [_USER], indirect=True)
async def test_refused_credentials_stop_start_up_at_once(secured: EmbeddedNats) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match="refused our credentials"):
        await connect(NatsSettings(url=secured.url, user="alice", password="wrong"), "test")
    assert time.monotonic() - started < 10, "no endless reconnecting"


@pytest.mark.parametrize("secured", [_TOKEN], indirect=True)
def test_a_worker_with_a_wrong_token_exits_2_naming_the_settings(secured: EmbeddedNats) -> None:
    code, output = _worker_exit(secured.url, {"JETSPOOL_NATS__TOKEN": "wrong"})

    assert code == 2
    assert "refused our credentials" in output
    assert "nats.token" in output


async def test_a_connection_closed_while_nats_is_away_closes_cleanly(nats_server: EmbeddedNats) -> None:
    """A gateway or worker told to stop during a NATS outage: nats-py wrote what it had buffered
    to the lost connection and raised ConnectionResetError, so the component's shutdown ended with
    a traceback and skipped what came after (seen as a test stack that never stopped its server)."""
    conn = await connect(NatsSettings(url=nats_server.url), "test")
    nats_server.stop()
    await eventually(lambda: conn.nc.is_reconnecting, timeout_s=10)
    await conn.nc.publish("jetspool.test", b"buffered while nats is away")
    await conn.close()

    assert conn.nc.is_closed


async def test_disconnected_is_logged_for_an_outage_not_for_our_own_close(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    """Every start-up logged "nats: disconnected" when it closed a connection of its own (found by
    an outside audit)."""
    caplog.set_level(logging.INFO, logger="jetspool.jetstream.connection")
    closed = await connect(NatsSettings(url=nats_server.url), "test")
    await closed.close()
    after_close = [r.getMessage() for r in caplog.records]
    away = await connect(NatsSettings(url=nats_server.url), "test")
    nats_server.stop()
    await eventually(lambda: away.nc.is_reconnecting, timeout_s=10)
    await away.close()

    assert "nats: disconnected" not in after_close
    assert "nats: disconnected" in [r.getMessage() for r in caplog.records]
