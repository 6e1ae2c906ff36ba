"""Settings (SPEC §8, §9) and function entries (SPEC §1): pure logic, no server."""

from __future__ import annotations

import operator
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from jetspool.domain.errors import ConfigError, DecodeError
from jetspool.domain.functions import Function, decode_function, is_valid_name, shown, with_query
from jetspool.jetstream.startup import check_durability
from jetspool.settings import GatewaySettings, check_listen, check_tls_files, load, validate
from tests.support.processes import JetspoolProcess, stopped_while_waiting_for_nats
from tests.support.servers import free_port
from tests.support.tls import self_signed


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jetspool.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("nats.url", None),
        ("nats.replicas", 1),
        ("nats.sync_interval", "always"),
        ("nats.credentials", None),
        ("nats.tls_ca", None),
        ("gateway.host", "127.0.0.1"),
        ("gateway.port", 8080),
        ("gateway.public_url", None),
        ("gateway.max_body_size", 33554432),
        ("gateway.tls_cert", None),
        ("gateway.tls_key", None),
        ("auth.api_keys", []),
        ("auth.admin_keys", []),
        ("worker.ack_wait", 30.0),
        ("retry.initial_backoff", 1.0),
        ("retry.max_backoff", 60.0),
        ("retry.multiplier", 2.0),
        ("retry.jitter", 0.2),
        ("retry.max_retry_after", 600.0),
        ("callbacks.signing_secret", None),
        ("callbacks.max_attempts", 10),
        ("callbacks.initial_backoff", 5.0),
        ("callbacks.max_backoff", 1800.0),
        ("callbacks.deny_private", False),
        ("functions", []),
    ],
)
def test_defaults_follow_the_spec(key: str, expected: object) -> None:
    settings = load(None, env={})
    assert operator.attrgetter(key)(settings) == expected


def test_defaults_name_no_nats_server_so_up_embeds_one() -> None:
    assert load(None, env={}).nats.servers == []


def test_max_body_size_default_is_32_mib() -> None:
    assert load(None, env={}).gateway.max_body_size == 32 * 1024 * 1024


# --- the config file -----------------------------------------------------------------------


def test_config_file_values_are_read(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        """
nats:
  url: nats://10.0.0.1:4222
  replicas: 3
  sync_interval: 2m
gateway:
  port: 9000
  public_url: https://queue.example.com
auth:
  api_keys: [k1, k2]
  admin_keys:
    - admin
worker:
  ack_wait: 12.5
callbacks:
  deny_private: true
functions:
  - name: echo
    url: http://127.0.0.1:9000
    timeout: 30
    max_attempts: 3
    concurrency: 2
    cancel_path: /cancel
    headers:
      Authorization: Bearer fn-secret
""",
    )
    settings = load(path, env={})
    assert settings.nats.servers == ["nats://10.0.0.1:4222"]
    assert settings.nats.replicas == 3
    assert settings.nats.sync_interval == "2m"
    assert settings.gateway.port == 9000
    assert settings.gateway.base_url == "https://queue.example.com"
    assert settings.auth.api_keys == ["k1", "k2"]
    assert settings.auth.admin_keys == ["admin"]
    assert settings.worker.ack_wait == 12.5
    assert settings.callbacks.deny_private is True
    assert settings.functions == [
        Function(
            name="echo",
            url="http://127.0.0.1:9000",
            timeout=30,
            max_attempts=3,
            concurrency=2,
            cancel_path="/cancel",
            headers={"Authorization": "Bearer fn-secret"},
        )
    ]


def test_keys_missing_from_the_config_file_keep_their_defaults(tmp_path: Path) -> None:
    settings = load(_config(tmp_path, "gateway:\n  port: 9000\n"), env={})
    assert settings.gateway.host == "127.0.0.1"
    assert settings.nats.replicas == 1
    assert settings.retry.max_backoff == 60.0


def test_empty_config_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load(_config(tmp_path, ""), env={}) == load(None, env={})


def test_a_section_left_empty_in_the_config_file_keeps_its_defaults(tmp_path: Path) -> None:
    """Every key of a section commented out leaves it null: it was refused ("gateway: Expected
    `object`, got `null`")."""
    text = "gateway:\n  # port: 9000\nauth:\nfunctions:\nnats:\n  replicas: 1\n"
    assert load(_config(tmp_path, text), env={}) == load(None, env={})


def test_an_unknown_section_left_empty_is_still_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gatway"):
        load(_config(tmp_path, "gatway:\n"), env={})


def test_config_file_is_found_through_jetspool_config(tmp_path: Path) -> None:
    path = _config(tmp_path, "gateway:\n  port: 9100\n")
    assert load(None, env={"JETSPOOL_CONFIG": str(path)}).gateway.port == 9100


def test_config_file_argument_wins_over_jetspool_config(tmp_path: Path) -> None:
    chosen = _config(tmp_path, "gateway:\n  port: 9100\n")
    other = tmp_path / "other.yaml"
    other.write_text("gateway:\n  port: 9200\n", encoding="utf-8")
    assert load(chosen, env={"JETSPOOL_CONFIG": str(other)}).gateway.port == 9100


# --- precedence: flags > env > file --------------------------------------------------------


def test_env_value_wins_over_the_config_file(tmp_path: Path) -> None:
    path = _config(tmp_path, "nats:\n  url: nats://from-file:4222\n")
    settings = load(path, env={"JETSPOOL_NATS__URL": "nats://from-env:4222"})
    assert settings.nats.servers == ["nats://from-env:4222"]


def test_flag_wins_over_env_and_config_file(tmp_path: Path) -> None:
    path = _config(tmp_path, "nats:\n  url: nats://from-file:4222\n")
    settings = load(
        path,
        env={"JETSPOOL_NATS__URL": "nats://from-env:4222"},
        flags={"nats.url": "nats://from-flag:4222"},
    )
    assert settings.nats.servers == ["nats://from-flag:4222"]


def test_flag_left_unset_does_not_hide_the_env_value() -> None:
    settings = load(None, env={"JETSPOOL_GATEWAY__PORT": "9300"}, flags={"gateway.port": None})
    assert settings.gateway.port == 9300


def test_env_value_merges_into_a_file_section_without_dropping_its_other_keys(tmp_path: Path) -> None:
    path = _config(tmp_path, "gateway:\n  host: 0.0.0.0\n  port: 9000\n")
    settings = load(path, env={"JETSPOOL_GATEWAY__PORT": "9500"}, flags={"gateway.max_body_size": 1024})
    assert settings.gateway.host == "0.0.0.0"
    assert settings.gateway.port == 9500
    assert settings.gateway.max_body_size == 1024


def test_jetspool_variables_without_a_section_are_not_settings() -> None:
    settings = load(None, env={"JETSPOOL_URL": "http://gateway:8080", "JETSPOOL_API_KEY": "k"})
    assert settings == load(None, env={})


def test_variables_without_the_jetspool_prefix_are_ignored() -> None:
    assert load(None, env={"NATS__URL": "nats://x:4222", "PATH": "/bin"}).nats.url is None


# --- environment values --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "key", "expected"),
    [
        ("JETSPOOL_GATEWAY__PORT", "9000", "gateway.port", 9000),
        ("JETSPOOL_NATS__REPLICAS", "3", "nats.replicas", 3),
        ("JETSPOOL_WORKER__ACK_WAIT", "12.5", "worker.ack_wait", 12.5),
        ("JETSPOOL_CALLBACKS__DENY_PRIVATE", "true", "callbacks.deny_private", True),
        ("JETSPOOL_CALLBACKS__DENY_PRIVATE", "false", "callbacks.deny_private", False),
        ("JETSPOOL_NATS__SYNC_INTERVAL", "2m", "nats.sync_interval", "2m"),
        ("JETSPOOL_CALLBACKS__SIGNING_SECRET", f"whsec_{'A' * 32}", "callbacks.signing_secret", f"whsec_{'A' * 32}"),
        ("JETSPOOL_GATEWAY__PUBLIC_URL", "", "gateway.public_url", None),
    ],
)
def test_env_values_are_read_as_yaml_scalars(name: str, text: str, key: str, expected: object) -> None:
    value = operator.attrgetter(key)(load(None, env={name: text}))
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("k1,k2", ["k1", "k2"]),
        ("k1, k2 ,", ["k1", "k2"]),
        ("k1", ["k1"]),
        ("[k1, k2]", ["k1", "k2"]),
        ("- k1\n- k2", ["k1", "k2"]),
    ],
)
def test_env_list_field_accepts_comma_lists_and_yaml_lists(text: str, expected: list[str]) -> None:
    assert load(None, env={"JETSPOOL_AUTH__API_KEYS": text}).auth.api_keys == expected


def test_env_comma_list_does_not_split_a_plain_string_field() -> None:
    settings = load(None, env={"JETSPOOL_NATS__USER": "u", "JETSPOOL_NATS__PASSWORD": "a,b"})
    assert settings.nats.password == "a,b"


@pytest.mark.parametrize(
    ("name", "key", "expected"),
    [
        ("JETSPOOL_NATS__PASSWORD", "nats.password", "123456"),
        ("JETSPOOL_AUTH__API_KEYS", "auth.api_keys", ["123456"]),
    ],
)
def test_env_value_that_looks_like_a_number_is_kept_as_text_for_a_text_setting(
    name: str, key: str, expected: object
) -> None:
    env = {name: "123456", "JETSPOOL_NATS__USER": "u"}  # a password needs its user
    assert operator.attrgetter(key)(load(None, env=env)) == expected


@pytest.mark.parametrize("name", ["JETSPOOL_AUTH__API_KEYS", "JETSPOOL_AUTH__ADMIN_KEYS"])
@pytest.mark.parametrize("text", ["", "  "])
def test_empty_env_value_of_a_list_setting_is_an_empty_list(tmp_path: Path, name: str, text: str) -> None:
    path = _config(tmp_path, "auth:\n  api_keys: [k1]\n  admin_keys: [a1]\n")
    settings = load(path, env={name: text})
    key = name.removeprefix("JETSPOOL_AUTH__").lower()
    assert getattr(settings.auth, key) == []


def test_env_mapping_setting_is_read_as_a_yaml_or_json_mapping() -> None:
    settings = load(None, env={"JETSPOOL_CALLBACKS__HOSTS": '{"hooks.example.com": "10.0.0.1"}'})
    assert settings.callbacks.hosts == {"hooks.example.com": "10.0.0.1"}


@pytest.mark.parametrize(
    ("name", "key"),
    [("JETSPOOL_NATS__URL", "nats.url"), ("JETSPOOL_AUTH__RATE_LIMIT", "auth.rate_limit")],
)
def test_empty_env_value_of_a_setting_that_may_be_none_is_none(tmp_path: Path, name: str, key: str) -> None:
    path = _config(tmp_path, "nats:\n  url: nats://from-file:4222\nauth:\n  rate_limit: 5\n")
    assert operator.attrgetter(key)(load(path, env={name: ""})) is None


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("JETSPOOL_GATEWAY__PORT", "gateway.port"),
        ("JETSPOOL_NATS__REPLICAS", "nats.replicas"),
        ("JETSPOOL_CALLBACKS__DENY_PRIVATE", "callbacks.deny_private"),
        ("JETSPOOL_NATS__SYNC_INTERVAL", "nats.sync_interval"),
        ("JETSPOOL_CALLBACKS__HOSTS", "callbacks.hosts"),
    ],
)
def test_empty_env_value_of_any_other_setting_is_refused_naming_the_key(name: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: {name} is empty"):
        load(None, env={name: ""})


def test_empty_env_value_of_an_unknown_key_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"nats\.replicaz"):
        load(None, env={"JETSPOOL_NATS__REPLICAZ": ""})


# --- functions from the environment ---------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '[{"name": "echo", "url": "http://127.0.0.1:9000", "timeout": 30}]',
        '[{"name":"echo","url":"http://127.0.0.1:9000","timeout":30}]',
        "[{name: echo, url: 'http://127.0.0.1:9000', timeout: 30}]",
        "- name: echo\n  url: http://127.0.0.1:9000\n  timeout: 30\n",
    ],
)
def test_jetspool_functions_takes_a_json_or_yaml_list_of_functions(text: str) -> None:
    settings = load(None, env={"JETSPOOL_FUNCTIONS": text})
    assert settings.functions == [Function(name="echo", url="http://127.0.0.1:9000", timeout=30)]


def test_jetspool_functions_replaces_the_functions_of_the_config_file(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        "functions:\n  - name: echo\n    url: http://from-file:9000\n  - name: other\n    url: http://f:9000\n",
    )
    settings = load(path, env={"JETSPOOL_FUNCTIONS": '[{"name": "echo", "url": "http://from-env:9000"}]'})
    assert settings.functions == [Function(name="echo", url="http://from-env:9000")]


@pytest.mark.parametrize("text", ["", " "])
def test_empty_jetspool_functions_means_no_functions(tmp_path: Path, text: str) -> None:
    path = _config(tmp_path, "functions:\n  - name: echo\n    url: http://f:9000\n")
    assert load(path, env={"JETSPOOL_FUNCTIONS": text}).functions == []


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('[{"name": "Echo", "url": "http://f"}]', ["functions[0].name"]),
        ('[{"name": "echo", "url": "ftp://f"}]', ["functions[0]", "url"]),
        ('[{"name": "echo", "url": "http://f"}, {"name": "echo", "url": "http://g"}]', ["functions", "unique"]),
        ('{"name": "echo", "url": "http://f"}', ["functions", "array"]),
        ("echo", ["functions", "array"]),
        ("[{name: echo, url: http://f", ["functions", "JETSPOOL_FUNCTIONS"]),
    ],
)
def test_bad_jetspool_functions_is_refused_naming_functions(text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, env={"JETSPOOL_FUNCTIONS": text})
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert "JETSPOOL_FUNCTIONS" in str(caught.value), "the variable is named (found by an audit)"


# --- NATS servers and the gateway's base URL -----------------------------------------------


@pytest.mark.parametrize(
    ("url", "servers"),
    [
        (None, []),
        ("nats://a:4222", ["nats://a:4222"]),
        ("nats://a:4222,nats://b:4222", ["nats://a:4222", "nats://b:4222"]),
        (" nats://a:4222 , nats://b:4222 ,", ["nats://a:4222", "nats://b:4222"]),
        (["nats://a:4222", "nats://b:4222", "nats://c:4222"], ["nats://a:4222", "nats://b:4222", "nats://c:4222"]),
    ],
)
def test_nats_url_gives_the_list_of_servers(url: str | list[str] | None, servers: list[str]) -> None:
    assert validate({"nats": {"url": url}}).nats.servers == servers


def test_nats_url_from_env_may_name_a_cluster() -> None:
    settings = load(None, env={"JETSPOOL_NATS__URL": "nats://a:4222,nats://b:4222"})
    assert settings.nats.servers == ["nats://a:4222", "nats://b:4222"]


def test_nats_url_from_a_yaml_list_in_the_config_file(tmp_path: Path) -> None:
    path = _config(tmp_path, "nats:\n  url:\n    - nats://a:4222\n    - nats://b:4222\n")
    assert load(path, env={}).nats.servers == ["nats://a:4222", "nats://b:4222"]


@pytest.mark.parametrize(
    "url",
    [
        "nats://127.0.0.1:4222",
        "nats://127.0.0.1",
        "127.0.0.1:4222",
        "nats-1",
        "tls://nats.example.com:4222",
        "nats://alice:s3cret@nats.example.com:4222",
        "nats://[::1]:4222",
        "nats://a:1,nats://b:65535",
        "ws://127.0.0.1:8080",
        "wss://nats.example.com/ws",
        ["wss://a:443", "ws://b:80"],
    ],
)
def test_nats_url_may_name_any_nats_tls_or_websocket_server(url: str | list[str]) -> None:
    assert validate({"nats": {"url": url}}).nats.servers


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "127.0.0.1:99999",
        "http://127.0.0.1:1",
        "https://nats.example.com",
        "NATS://127.0.0.1:4222",
        "nats://",
        "nats://:4222",
        "nats://127.0.0.1:99999",
        "nats://127.0.0.1:0",
        "nats://127.0.0.1:port",
        "nats://nats example:4222",
        "nats://a:4222,ftp://b",
        ["nats://a:4222", "http://b:4222"],
    ],
)
def test_nats_url_that_names_no_nats_server_is_refused_naming_the_key(url: str | list[str]) -> None:
    """`nats://127.0.0.1:99999` ended the gateway in a traceback (exit 3) and the worker in another
    (exit 1); `http://...` was tried again forever (found by a CLI audit). Without a scheme, as nats-py
    takes it: `host[:port]` is a nats:// server."""
    with pytest.raises(ConfigError, match=r"^nats\.url: .* is not a NATS server URL"):
        validate({"nats": {"url": url}})


def test_nats_url_may_not_mix_websocket_and_plain_servers() -> None:
    """nats-py refuses the mix only when it connects, with a traceback."""
    with pytest.raises(ConfigError, match=r"^nats\.url: websocket servers"):
        validate({"nats": {"url": "nats://a:4222,ws://b:8080"}})


def test_nats_url_is_checked_from_the_environment_and_flags() -> None:
    with pytest.raises(ConfigError, match=r"^nats\.url: 'nats://127\.0\.0\.1:99999'"):
        load(None, env={"JETSPOOL_NATS__URL": "nats://127.0.0.1:99999"})
    with pytest.raises(ConfigError, match=r"^nats\.url: 'http://127\.0\.0\.1:1'"):
        load(None, env={}, flags={"nats.url": "http://127.0.0.1:1"})


def test_base_url_defaults_to_host_and_port() -> None:
    assert validate({}).gateway.base_url == "http://127.0.0.1:8080"
    assert validate({"gateway": {"host": "10.1.2.3", "port": 9000}}).gateway.base_url == "http://10.1.2.3:9000"
    assert validate({"gateway": {"host": "queue.internal"}}).gateway.base_url == "http://queue.internal:8080"


@pytest.mark.parametrize(
    ("host", "base_url"),
    [
        ("::1", "http://[::1]:8080"),
        ("fd00::7", "http://[fd00::7]:8080"),
        ("::ffff:127.0.0.1", "http://[::ffff:7f00:1]:8080"),
    ],
)
def test_default_base_url_brackets_an_ipv6_host(host: str, base_url: str) -> None:
    """`up --host ::1` stopped: the URL it handed its children, `http://::1:18791`, was refused as
    `gateway.public_url`, a key the user never set (found by a CLI audit)."""
    assert validate({"gateway": {"host": host}}).gateway.base_url == base_url


@pytest.mark.parametrize(("host", "base_url"), [("0.0.0.0", "http://127.0.0.1:9000"), ("::", "http://[::1]:9000")])
def test_default_base_url_of_a_wildcard_bind_is_loopback(host: str, base_url: str) -> None:
    """`http://0.0.0.0:9000/...` is no address a client can use; a client on this machine reaches
    the gateway on loopback (who serves clients elsewhere sets `gateway.public_url`)."""
    assert validate({"gateway": {"host": host, "port": 9000}}).gateway.base_url == base_url


def test_default_base_url_of_an_ipv6_host_is_one_client_commands_take() -> None:
    env = {"JETSPOOL_GATEWAY__HOST": "::1", "JETSPOOL_GATEWAY__PUBLIC_URL": ""}
    assert load(None, env=env).gateway.base_url == "http://[::1]:8080"


@pytest.mark.parametrize("host", ["my gateway", "bad/host", "[::1]", "user@host", ""])
def test_a_host_that_makes_no_default_public_url_is_named_as_the_host(host: str) -> None:
    with pytest.raises(ConfigError, match=r"^gateway\.host: "):
        validate({"gateway": {"host": host}})


def test_an_explicit_public_url_is_not_made_of_the_host() -> None:
    raw = {"gateway": {"host": "0.0.0.0", "public_url": "https://queue.example.com"}}
    assert validate(raw).gateway.base_url == "https://queue.example.com"


@pytest.mark.parametrize(
    ("public_url", "base_url"),
    [
        ("https://queue.example.com", "https://queue.example.com"),
        ("https://queue.example.com/", "https://queue.example.com"),
        ("https://example.com/jetspool/", "https://example.com/jetspool"),
    ],
)
def test_base_url_is_the_public_url_without_trailing_slash(public_url: str, base_url: str) -> None:
    assert validate({"gateway": {"public_url": public_url}}).gateway.base_url == base_url


@pytest.mark.parametrize(
    "public_url",
    ["http://127.0.0.1:8080", "https://queue.example.com", "HTTPS://Queue.Example.com/a/b/", "http://[::1]:8080"],
)
def test_public_url_may_be_any_absolute_http_or_https_url(public_url: str) -> None:
    assert validate({"gateway": {"public_url": public_url}}).gateway.public_url == public_url


@pytest.mark.parametrize(
    "public_url",
    [
        "not a url",
        "",
        "queue.example.com",
        "queue.example.com:8080",
        "/queue",
        "ftp://queue.example.com",
        "http://",
        "https:///path",
        "http://:8080",
        "http:// queue.example.com",
        "http://queue.example.com/a b",
        "http://queue.example.com:port",
        "http://queue.example.com:99999",
        "https://queue.example.com/?a=1",
        "https://queue.example.com?",
        "https://queue.example.com/#top",
        "https://queue.example.com\n",
    ],
)
def test_public_url_that_is_not_an_absolute_http_url_is_refused_naming_the_key(public_url: str) -> None:
    with pytest.raises(ConfigError, match=r"^gateway\.public_url: must be an absolute http"):
        validate({"gateway": {"public_url": public_url}})


def test_public_url_is_checked_when_loading_from_the_file_and_the_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.public_url"):
        load(_config(tmp_path, 'gateway:\n  public_url: "not a url"\n'), env={})
    with pytest.raises(ConfigError, match=r"gateway\.public_url"):
        load(None, env={"JETSPOOL_GATEWAY__PUBLIC_URL": "queue.example.com"})


_SPEC_GATEWAY = "gateway:\n  host: 127.0.0.1\n  port: 8080\n  public_url: http://127.0.0.1:8080/\n"
"""SPEC §9's example: the public URL spells out the gateway's own address."""


@pytest.mark.parametrize(
    ("env", "flags", "base_url"),
    [
        ({}, {"gateway.port": 9001}, "http://127.0.0.1:9001"),
        ({"JETSPOOL_GATEWAY__PORT": "9002"}, {}, "http://127.0.0.1:8080"),  # a container's port map, maybe
        ({}, {"gateway.host": "localhost"}, "http://localhost:8080"),
        ({}, {}, "http://127.0.0.1:8080"),
        ({"JETSPOOL_GATEWAY__PUBLIC_URL": "http://127.0.0.1:7000"}, {"gateway.port": 9001}, "http://127.0.0.1:7000"),
    ],
)
def test_a_public_url_spelling_out_the_files_address_follows_the_port_and_host_flags(
    tmp_path: Path, env: dict[str, str], flags: dict[str, Any], base_url: str
) -> None:
    """`up --port` with SPEC §9's example config served on the new port and handed out URLs on
    8080, where nothing listened (found by a CLI audit)."""
    assert load(_config(tmp_path, _SPEC_GATEWAY), env=env, flags=flags).gateway.base_url == base_url


def test_a_public_url_of_another_address_stays_when_the_port_is_given(tmp_path: Path) -> None:
    text = "gateway:\n  port: 8080\n  public_url: http://127.0.0.1:80/queue\n"
    assert load(_config(tmp_path, text), env={}, flags={"gateway.port": 9001}).gateway.base_url == (
        "http://127.0.0.1:80/queue"
    )


# --- the gateway's TLS files ---------------------------------------------------------------


@pytest.fixture
def pem_files(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path)


def test_base_url_defaults_to_https_when_the_gateway_serves_https(pem_files: tuple[Path, Path]) -> None:
    cert, key = pem_files
    gateway = validate({"gateway": {"tls_cert": str(cert), "tls_key": str(key), "port": 8443}}).gateway
    assert gateway.serves_https
    assert gateway.base_url == "https://127.0.0.1:8443"


def test_explicit_public_url_wins_over_the_https_default(pem_files: tuple[Path, Path]) -> None:
    cert, key = pem_files
    raw = {"gateway": {"tls_cert": str(cert), "tls_key": str(key), "public_url": "https://queue.example.com/"}}
    assert validate(raw).gateway.base_url == "https://queue.example.com"


def test_gateway_without_tls_files_serves_plain_http() -> None:
    assert not validate({}).gateway.serves_https


@pytest.mark.parametrize(("given", "missing"), [("tls_cert", "gateway.tls_key"), ("tls_key", "gateway.tls_cert")])
def test_one_tls_file_without_the_other_is_refused_naming_the_missing_key(
    pem_files: tuple[Path, Path], given: str, missing: str
) -> None:
    cert, key = pem_files
    path = cert if given == "tls_cert" else key
    with pytest.raises(ConfigError, match=rf"^{re.escape(missing)}: required with gateway\.{given}"):
        validate({"gateway": {given: str(path)}})


@pytest.mark.parametrize("key", ["tls_cert", "tls_key"])
def test_missing_tls_file_is_refused_naming_the_key_and_the_path(
    pem_files: tuple[Path, Path], tmp_path: Path, key: str
) -> None:
    cert, pem_key = pem_files
    absent = tmp_path / "absent.pem"
    gateway = validate({"gateway": {"tls_cert": str(cert), "tls_key": str(pem_key), key: str(absent)}}).gateway
    with pytest.raises(ConfigError, match=rf"^gateway\.{key}: cannot read {re.escape(str(absent))}"):
        check_tls_files(gateway)


def test_tls_file_that_cannot_be_read_is_refused_naming_the_key(pem_files: tuple[Path, Path], tmp_path: Path) -> None:
    cert, _ = pem_files
    gateway = validate({"gateway": {"tls_cert": str(cert), "tls_key": str(tmp_path)}}).gateway  # a directory
    with pytest.raises(ConfigError, match=r"^gateway\.tls_key: cannot read"):
        check_tls_files(gateway)


@pytest.mark.parametrize("wrong", ["another pair's key", "not PEM"])
def test_tls_files_that_do_not_make_a_certificate_chain_are_refused_naming_the_keys(
    pem_files: tuple[Path, Path], tmp_path: Path, wrong: str
) -> None:
    """Readable but unusable (a key of another certificate, a file that is no PEM): uvicorn's
    failed start-up ended in a traceback and exit code 1 (found by a security audit)."""
    cert, _ = pem_files
    other = tmp_path / "other"
    other.mkdir()
    key = self_signed(other)[1] if wrong == "another pair's key" else cert.with_name("text.pem")
    if wrong == "not PEM":
        key.write_text("not a key\n", encoding="utf-8")
    gateway = validate({"gateway": {"tls_cert": str(cert), "tls_key": str(key)}}).gateway
    with pytest.raises(ConfigError, match=rf"^gateway\.tls_cert, gateway\.tls_key: cannot use {re.escape(str(cert))}"):
        check_tls_files(gateway)


def test_tls_files_from_the_environment_are_checked(pem_files: tuple[Path, Path]) -> None:
    cert, _ = pem_files
    with pytest.raises(ConfigError, match=r"gateway\.tls_key"):
        load(None, env={"JETSPOOL_GATEWAY__TLS_CERT": str(cert)})


@pytest.mark.parametrize("section", ["retry", "callbacks"])
def test_a_backoff_starting_above_its_cap_is_refused_naming_both_keys(section: str) -> None:
    """`retry.initial_backoff: 10` with `retry.max_backoff: 1` was taken silently (found by an audit)."""
    keys = rf"^{section}\.initial_backoff, {section}\.max_backoff: "
    with pytest.raises(ConfigError, match=keys):
        validate({section: {"initial_backoff": 10, "max_backoff": 1}})
    with pytest.raises(ConfigError, match=keys):
        load(None, env={f"JETSPOOL_{section.upper()}__INITIAL_BACKOFF": "5000"})  # above the default cap


@pytest.mark.parametrize("section", ["retry", "callbacks"])
def test_a_backoff_may_start_at_its_cap(section: str) -> None:
    settings = validate({section: {"initial_backoff": 2, "max_backoff": 2}})
    assert getattr(settings, section).initial_backoff == getattr(settings, section).max_backoff == 2


@pytest.mark.parametrize("interval", ["always", "2m", "500ms", "30s", "1h"])
def test_sync_interval_accepts_always_or_a_duration(interval: str) -> None:
    assert validate({"nats": {"sync_interval": interval}}).nats.sync_interval == interval


# --- errors name the bad key ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"nats": {"replicas": "three"}}, ["nats.replicas"]),
        ({"nats": {"replicas": 0}}, ["nats.replicas"]),
        ({"nats": {"replicaz": 3}}, ["nats.replicaz"]),
        ({"gateway": {"port": 70000}}, ["gateway.port"]),
        ({"gateway": {"max_body_size": 0}}, ["gateway.max_body_size"]),
        ({"retry": {"jitter": 1.5}}, ["retry.jitter"]),
        ({"callbacks": {"max_attempts": "many"}}, ["callbacks.max_attempts"]),
        ({"auth": {"api_keys": "k1"}}, ["auth.api_keys"]),
        ({"auth": {"api_keys": ["k1", ""]}}, ["auth.api_keys[1]", "non-empty printable ASCII"]),
        ({"auth": {"api_keys": [" k1"]}}, ["auth", "without surrounding spaces"]),
        ({"auth": {"admin_keys": ["clé"]}}, ["auth.admin_keys[0]", "printable ASCII"]),
        ({"auth": {"admin_keys": ["k1\tk2"]}}, ["auth.admin_keys[0]", "printable ASCII"]),
        ({"nope": {"x": 1}}, ["nope"]),
        ({"callbacks": {"hosts": {"hooks.example.com": "nope"}}}, ["callbacks.hosts.hooks.example.com: must be an IP"]),
        ({"nats": {"sync_interval": "sometimes"}}, ["nats.sync_interval: must be"]),
        ({"nats": {"sync_interval": "2 minutes"}}, ["nats", "sync_interval"]),
        # past a Go duration: nats-server refused it once the data dir was made (found by a CLI audit)
        ({"nats": {"sync_interval": "99999999h"}}, ["nats.sync_interval: longer", "2562047h"]),
        ({"functions": [{"name": "Echo", "url": "http://f"}]}, ["functions[0].name"]),
        (
            {"functions": [{"name": "echo", "url": "http://f"}, {"name": "a_b", "url": "http://f"}]},
            ["functions[1].name"],
        ),
        ({"functions": [{"name": "echo", "url": "ftp://f"}]}, ["functions[0].url: must be an absolute"]),
        ({"functions": [{"name": "echo", "url": "f.example.com"}]}, ["functions[0]", "url"]),
        (
            {"functions": [{"name": "echo", "url": "http://f", "cancel_path": "cancel"}]},
            ["functions[0].cancel_path: must start with /"],
        ),
        ({"functions": [{"name": "echo", "url": "http://f", "timout": 3}]}, ["functions[0].timout"]),
        ({"functions": [{"name": "echo", "url": "http://f", "concurrency": 0}]}, ["functions[0].concurrency"]),
        ({"functions": [{"url": "http://f"}]}, ["functions[0]", "name"]),
    ],
)
def test_invalid_setting_raises_config_error_naming_the_key(raw: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(raw)
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"callbacks": {"signing_secret": "nope"}}, "callbacks.signing_secret: must be a Standard Webhooks secret"),
        ({"callbacks": {"signing_secret": "A" * 32}}, "whsec_"),
        ({"callbacks": {"signing_secret": "whsec_" + "A" * 8}}, "24 to 64 bytes"),
        ({"callbacks": {"signing_secret": "whsec_" + "A" * 100}}, "24 to 64 bytes"),
        ({"nats": {"tls_key": "/key.pem"}}, "nats.tls_key: needs tls_cert"),
        ({"nats": {"password": "pw"}}, "nats.password: needs user"),
        ({"nats": {"user": "u", "password": "pw", "token": "t"}}, "nats.token: "),
    ],
)
def test_a_half_or_a_malformed_credential_is_refused_naming_it(raw: dict[str, Any], fragment: str) -> None:
    """Each was taken, a 3-byte signing key made of `nope`, the other half ignored (found by a CLI audit)."""
    section = next(iter(raw))
    with pytest.raises(ConfigError, match=section) as refused:
        validate(raw)
    assert fragment in str(refused.value)


def test_a_signing_secret_may_end_with_a_newline_as_a_kubernetes_secret_file_does() -> None:
    secret = "whsec_" + "A" * 32 + "\n"
    assert validate({"callbacks": {"signing_secret": secret}}).callbacks.signing_secret == secret


def test_a_key_given_twice_in_the_config_file_is_refused_naming_it(tmp_path: Path) -> None:
    """The last one won without a word (found by a CLI audit); a YAML merge may still be overridden."""
    with pytest.raises(ConfigError, match="the key 'port' is given twice"):
        load(_config(tmp_path, "gateway:\n  port: 9001\n  port: 9002\n"), env={})
    merged = "functions:\n  - &fn {name: a, url: 'http://127.0.0.1:9/'}\n  - <<: *fn\n    name: b\n"
    assert [f.name for f in load(_config(tmp_path, merged), env={}).functions] == ["a", "b"]
    with pytest.raises(ConfigError, match="the key 'timeout' is given twice"):  # beside a merge too
        load(_config(tmp_path, merged + "    timeout: 5\n    timeout: 6\n"), env={})
    twice = '[{"name": "a", "url": "http://127.0.0.1:9/", "name": "b"}]'
    with pytest.raises(ConfigError, match="the key 'name' is given twice"):  # JSON too (a review)
        load(None, env={"JETSPOOL_FUNCTIONS": twice})


def test_duplicate_function_names_are_refused() -> None:
    raw = {"functions": [{"name": "echo", "url": "http://a"}, {"name": "echo", "url": "http://b"}]}
    with pytest.raises(ConfigError, match="unique") as caught:
        validate(raw)
    assert "echo" in str(caught.value)


def test_wrong_type_in_the_config_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nats\.replicas"):
        load(_config(tmp_path, "nats:\n  replicas: three\n"), env={})


def test_unknown_key_in_the_config_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nats\.replicaz"):
        load(_config(tmp_path, "nats:\n  replicaz: 3\n"), env={})


def test_invalid_function_name_in_the_config_file_names_its_index(tmp_path: Path) -> None:
    path = _config(tmp_path, "functions:\n  - name: Not_Valid\n    url: http://127.0.0.1:9000\n")
    with pytest.raises(ConfigError, match=r"functions\[0\]\.name"):
        load(path, env={})


def test_unknown_section_in_env_is_refused_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="JETSPOOL_NOPE__X") as caught:
        load(None, env={"JETSPOOL_NOPE__X": "1"})
    assert "nope" in str(caught.value)


def test_unknown_key_in_env_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"nats\.replicaz"):
        load(None, env={"JETSPOOL_NATS__REPLICAZ": "3"})


def test_wrong_type_in_env_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"nats\.replicas"):
        load(None, env={"JETSPOOL_NATS__REPLICAS": "three"})


def test_wrong_type_in_a_flag_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.port"):
        load(None, env={}, flags={"gateway.port": "eighty"})


@pytest.mark.parametrize("text", ["- nats\n- gateway\n", "just a string\n", "42\n"])
def test_config_file_whose_top_level_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load(_config(tmp_path, text), env={})


def test_config_file_that_is_not_yaml_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _config(tmp_path, "nats: [unclosed\n  url: :\n")
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        load(path, env={})
    assert str(path) in str(caught.value)


def test_missing_config_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load(path, env={})
    assert str(path) in str(caught.value)


def test_missing_config_file_named_by_jetspool_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.yaml"):
        load(None, env={"JETSPOOL_CONFIG": str(tmp_path / "absent.yaml")})


# --- every command stops on a bad setting before it starts anything ------------------------


@pytest.mark.parametrize(
    ("command", "gateway", "named"),
    [
        *(
            (command, gateway, named)
            for command in ("up", "gateway", "worker")
            for gateway, named in [
                ("  tls_cert: {cert}\n", "gateway.tls_key"),
                ("  tls_key: {key}\n", "gateway.tls_cert"),
                ('  public_url: "not a url"\n', "gateway.public_url"),
            ]
        ),
        ("up", "  tls_cert: {absent}\n  tls_key: {key}\n", "gateway.tls_cert"),
        ("gateway", "  tls_cert: {absent}\n  tls_key: {key}\n", "gateway.tls_cert"),
    ],
)
def test_every_command_stops_with_exit_2_naming_a_bad_gateway_setting(
    pem_files: tuple[Path, Path], tmp_path: Path, command: str, gateway: str, named: str
) -> None:
    cert, key = pem_files
    section = gateway.format(cert=cert, key=key, absent=tmp_path / "absent.pem")
    config = _config(tmp_path, f"gateway:\n  port: {free_port()}\n{section}")
    data_dir = tmp_path / "data"
    args = [command, "--config", str(config)]
    args += ["--data-dir", str(data_dir)] if command == "up" else ["--nats-url", "nats://127.0.0.1:1"]
    proc = JetspoolProcess(args, env={"JETSPOOL_CONFIG": ""})
    try:
        code = proc.wait(30)
    finally:
        proc.kill_tree()

    assert code == 2, proc.output
    assert named in proc.output
    assert "Traceback" not in proc.output
    assert not data_dir.exists()  # `up` started no NATS server


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("host", "reached_at"), [("::1", "[::1]"), ("0.0.0.0", "127.0.0.1")])
def test_up_on_an_ipv6_or_wildcard_host_starts_and_client_commands_find_it(
    tmp_path: Path, host: str, reached_at: str
) -> None:
    """`up --host ::1` stopped with exit code 2 naming `gateway.public_url`, a key never set: the
    URL it handed its children was `http://::1:PORT`; client commands with `JETSPOOL_GATEWAY__HOST=::1`
    refused it too (found by a CLI audit). On a wildcard bind, `http://0.0.0.0:PORT` was announced."""
    port = free_port()
    env = {"JETSPOOL_CONFIG": "", "JETSPOOL_URL": "", "JETSPOOL_WORKER__SHUTDOWN_GRACE": "1"}
    proc = JetspoolProcess(["up", "--host", host, "--port", str(port), "--data-dir", str(tmp_path / "data")], env=env)
    try:
        announced = proc.wait_for_line("jetspool is up:")
        client = JetspoolProcess(
            ["functions", "list"], env={**env, "JETSPOOL_GATEWAY__HOST": host, "JETSPOOL_GATEWAY__PORT": str(port)}
        )
        try:
            listed = client.wait(30)
        finally:
            client.kill_tree()
        code = proc.terminate(30)
    finally:
        proc.kill_tree()

    assert announced == f"jetspool is up: http://{reached_at}:{port}"
    assert listed == 0, client.output
    assert code == 0, proc.output


def test_a_worker_does_not_need_the_gateways_tls_files(pem_files: tuple[Path, Path], tmp_path: Path) -> None:
    """Workers may share the config file on machines without the gateway's key: it gets past its
    settings (to waiting for NATS) with the files absent."""
    _, key = pem_files
    config = _config(tmp_path, f"gateway:\n  tls_cert: {tmp_path / 'absent.pem'}\n  tls_key: {key}\n")
    env = {"JETSPOOL_CONFIG": "", "JETSPOOL_NATS__ACCEPT_SINGLE_REPLICA": "true"}
    args = ["worker", "--config", str(config), "--nats-url", f"nats://127.0.0.1:{free_port()}"]
    code, proc = stopped_while_waiting_for_nats(args, env)

    assert code == 0
    assert "tls_cert" not in proc.output


# --- functions -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "7", "echo", "my-fn-2", "a" * 63, "a" + "-" * 61 + "b"])
def test_valid_function_names_are_accepted(name: str) -> None:
    assert is_valid_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "-a", "a-", "A", "Echo", "a_b", "a.b", "a*", "a>", "a b", " a", "a/b", "a" * 64],
)
def test_invalid_function_names_are_refused(name: str) -> None:
    assert not is_valid_name(name)


def test_function_name_with_a_trailing_newline_is_refused() -> None:
    assert not is_valid_name("echo\n")


def test_function_defaults_follow_the_spec() -> None:
    function = Function(name="echo", url="http://127.0.0.1:9000")
    assert function.timeout == 3600
    assert function.max_attempts == 10
    assert function.concurrency == 8
    assert function.cancel_path is None
    assert function.headers == {}
    assert function.result_ttl == 604800


@pytest.mark.parametrize(
    ("url", "path", "endpoint"),
    [
        ("http://f:9000", "", "http://f:9000"),
        ("http://f:9000/", "", "http://f:9000/"),
        ("https://f.example.com/predict/", "", "https://f.example.com/predict/"),
        ("https://f.example.net/api/run?code=k%2B1", "", "https://f.example.net/api/run?code=k%2B1"),
        ("https://f.example.net/api/run?code=k", "sub/x", "https://f.example.net/api/run/sub/x?code=k"),
        ("https://f.example.net/api/?code=k", "/sub", "https://f.example.net/api/sub?code=k"),
        ("http://f:9000", "run", "http://f:9000/run"),
        ("http://f:9000", "/run", "http://f:9000/run"),
        ("http://f:9000/", "/run", "http://f:9000/run"),
        ("http://f:9000/", "run", "http://f:9000/run"),
        ("https://f.example.com/api/v1", "models/a/predict", "https://f.example.com/api/v1/models/a/predict"),
        ("https://f.example.com/api/v1/", "/models/a", "https://f.example.com/api/v1/models/a"),
        ("http://f:9000", "a\x1fb", "http://f:9000/a%1Fb"),
        ("http://f:9000", "100%/é x", "http://f:9000/100%25/%C3%A9%20x"),
        ("http://f:9000", "v1/a:b@c;d=e,f", "http://f:9000/v1/a:b@c;d=e,f"),
    ],
)
def test_endpoint_joins_url_and_sub_path_with_one_slash(url: str, path: str, endpoint: str) -> None:
    """SPEC §4: `url + path`. The URL alone is called as registered (a trailing slash dropped made
    FastAPI answer a redirect); a sub-path goes before the URL's own query (a key, like `?code=`)."""
    assert Function(name="f", url=url).endpoint(path) == endpoint


@pytest.mark.parametrize(
    ("url", "query", "joined"),
    [
        ("http://f/run", "", "http://f/run"),
        ("http://f/run", "a=1", "http://f/run?a=1"),
        ("http://f/run?code=k", "a=1", "http://f/run?code=k&a=1"),
        ("http://f/run?", "a=1", "http://f/run?a=1"),
        ("http://f/run?code=k&", "a=1", "http://f/run?code=k&a=1"),
    ],
)
def test_a_callers_query_follows_the_function_urls_own(url: str, query: str, joined: str) -> None:
    assert with_query(url, query) == joined


def test_logs_and_traces_show_a_function_url_without_its_key_or_credentials() -> None:
    assert shown("https://user:secret@f.example.net:8443/api/run?code=k&x=1") == "https://f.example.net:8443/api/run"
    assert shown("http://[::1]:9000/") == "http://[::1]:9000/"


def test_a_gateway_host_that_is_not_this_machines_is_named_as_the_host() -> None:
    with pytest.raises(ConfigError, match=r"^gateway\.host: cannot listen on 192\.0\.2\.1:"):
        check_listen(GatewaySettings(host="192.0.2.1", port=free_port()))  # TEST-NET-1: no machine has it


@pytest.mark.parametrize("url", ["ftp://f", "f:9000", "/relative", "http://", "http:// f", "http://f/run#part"])
def test_function_url_must_be_absolute_http_or_https(url: str) -> None:
    with pytest.raises(ValueError, match="url"):
        Function(name="f", url=url)


def test_function_entry_round_trips_through_its_encoding() -> None:
    function = Function(name="echo", url="https://f", timeout=5, headers={"X-Key": "v"}, cancel_path="/stop")
    assert decode_function(function.encode()) == function


@pytest.mark.parametrize(
    "data",
    [b"not json", b"{}", b'{"name": "Echo", "url": "http://f"}', b'{"name": "echo", "url": "http://f", "x": 1}'],
)
def test_unreadable_function_entry_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_function(data)


_DOCS = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("doc", ["README.md", "docs/deployment.md"])
def test_every_config_file_in_the_docs_is_one_every_command_starts_with(doc: str) -> None:
    """A user copies these: each YAML block must pass the checks `up`, `gateway` and `worker` make
    before they start (the README's once lacked `accept_single_replica` and stopped with exit code 2)."""
    blocks = re.findall(r"```ya?ml\n(.*?)```", (_DOCS / doc).read_text(encoding="utf-8"), re.S)
    configs = [yaml.safe_load(block) for block in blocks]

    assert configs, f"{doc} shows a config file"
    for config in configs:
        settings = validate(config)
        check_durability(settings)
        assert settings.nats.servers, "each names the NATS it runs on"


@pytest.mark.parametrize("port", ["0", "65536"])
def test_a_gateway_port_outside_1_to_65535_is_refused_naming_the_key(port: str) -> None:
    """Port 0 was taken: `up` then waited 60 s for a gateway at :0, and a gateway handed out
    URLs with :0 in them (found by a CLI audit)."""
    with pytest.raises(ConfigError, match=r"gateway\.port"):
        load(None, env={"JETSPOOL_GATEWAY__PORT": port})


def test_a_bad_value_from_the_environment_names_its_variable() -> None:
    """It named the key only, as if the config file had it (found by an outside audit); a flag
    that overrides the variable leaves it unnamed."""
    with pytest.raises(ConfigError) as from_env:
        load(env={"JETSPOOL_GATEWAY__PORT": "abc"})
    with pytest.raises(ConfigError) as unknown:
        load(env={"JETSPOOL_GATEWAY__PROT": "1"})
    with pytest.raises(ConfigError) as from_flag:
        load(env={"JETSPOOL_GATEWAY__PORT": "80"}, flags={"gateway.port": 70000})

    assert str(from_env.value).endswith("(set by JETSPOOL_GATEWAY__PORT)")
    assert str(unknown.value) == "gateway.prot: unknown key (set by JETSPOOL_GATEWAY__PROT)"
    assert "JETSPOOL_" not in str(from_flag.value)
    assert str(from_flag.value).startswith("gateway.port:")
