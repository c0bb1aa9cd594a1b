"""Strict config: TOML -> frozen dataclasses, errors that name the dotted key, defaults < file < flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import textwrap
from pathlib import Path

import pytest

from fastgate.config import (
    _SCHEMA,
    AuthConfig,
    Config,
    HostPort,
    LogConfig,
    ServerConfig,
    UpstreamConfig,
    UpstreamURL,
    build_config,
    load_config,
    parse_host_port,
    parse_upstream_url,
    with_overrides,
)
from fastgate.errors import ConfigError


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Defaults


def test_defaults() -> None:
    config = Config()
    assert config.server.listen == HostPort("127.0.0.1", 8000)
    assert str(config.server.listen) == "127.0.0.1:8000"
    assert config.server.tls_cert == "" and config.server.tls_key == ""
    assert config.server.tls is False
    assert config.server.max_connections == 1024
    assert config.server.header_timeout == 30.0
    assert config.server.keepalive_timeout == 75.0
    assert config.server.body_timeout == 60.0
    assert config.server.max_header_bytes == 65536
    assert config.server.shutdown_grace == 30.0
    assert config.server.trusted_proxies == ()
    assert config.upstream.url == UpstreamURL("http", "127.0.0.1", 11434, "")
    assert str(config.upstream.url) == "http://127.0.0.1:11434"
    assert config.upstream.url.host_header == "127.0.0.1:11434"
    assert config.upstream.connect_timeout == 5.0
    assert config.upstream.read_timeout == 600.0
    assert config.upstream.max_idle_connections == 64
    assert config.upstream.pool_idle_timeout == 60.0
    assert config.upstream.forward_origin is False
    assert config.auth.session_ttl == 3600
    assert config.auth.max_trusted_ips == 10000
    assert config.auth.max_body_bytes == 20 * 1024 * 1024
    assert config.auth.allow_account_endpoints is False
    assert config.log.level == "INFO"
    assert config.keys == {}
    assert config.source == ""


def test_empty_document_is_the_defaults() -> None:
    assert build_config({}) == Config()


@pytest.mark.parametrize("instance", [
    ServerConfig(), UpstreamConfig(), AuthConfig(), LogConfig(), Config(), HostPort("h", 1),
    UpstreamURL("http", "h", 1, ""),
], ids=lambda i: type(i).__name__)
def test_config_classes_are_frozen(instance: object) -> None:
    field_name = dataclasses.fields(instance)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(instance, field_name, None)


@pytest.mark.parametrize("section", sorted(_SCHEMA))
def test_schema_declares_every_field_of_its_section(section: str) -> None:
    cls, parsers = _SCHEMA[section]
    assert set(parsers) == {f.name for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------------------------------------------------
# Every documented key, read from a real file


FULL_FILE = """\
    [server]
    listen = "0.0.0.0:9000"
    tls_cert = "certs/cert.pem"
    tls_key = "certs/key.pem"
    max_connections = 10
    header_timeout = 1.5
    keepalive_timeout = 2
    body_timeout = 3.25
    max_header_bytes = 2048
    shutdown_grace = 4
    trusted_proxies = ["10.0.0.0/8", "192.168.1.5", "::1", "fd00::/8"]

    [upstream]
    url = "http://ollama.internal:11500/base/"
    connect_timeout = 0.5
    read_timeout = 900
    max_idle_connections = 0
    pool_idle_timeout = 12.5
    forward_origin = true

    [auth]
    session_ttl = 0
    max_trusted_ips = 5
    max_body_bytes = 0
    allow_account_endpoints = true

    [log]
    level = "debug"

    [keys]
    "api-20250312000101" = "alice"
    "api-20250312000202" = "bob"
"""


def test_every_documented_key_is_parsed(tmp_path: Path) -> None:
    path = write(tmp_path / "fastgate.toml", FULL_FILE)
    config = load_config(path)
    server = config.server
    assert server.listen == HostPort("0.0.0.0", 9000)
    assert server.tls_cert == os.path.join(str(tmp_path), "certs/cert.pem")
    assert server.tls_key == os.path.join(str(tmp_path), "certs/key.pem")
    assert server.tls is True
    assert server.max_connections == 10
    assert server.header_timeout == 1.5
    assert server.keepalive_timeout == 2.0 and isinstance(server.keepalive_timeout, float)
    assert server.body_timeout == 3.25
    assert server.max_header_bytes == 2048
    assert server.shutdown_grace == 4.0 and isinstance(server.shutdown_grace, float)
    assert server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.5/32"),
        ipaddress.ip_network("::1/128"), ipaddress.ip_network("fd00::/8"),
    )
    upstream = config.upstream
    assert upstream.url == UpstreamURL("http", "ollama.internal", 11500, "/base")
    assert upstream.connect_timeout == 0.5
    assert upstream.read_timeout == 900.0
    assert upstream.max_idle_connections == 0
    assert upstream.pool_idle_timeout == 12.5
    assert upstream.forward_origin is True
    assert config.auth == AuthConfig(session_ttl=0, max_trusted_ips=5, max_body_bytes=0,
                                     allow_account_endpoints=True)
    assert config.log.level == "DEBUG"
    assert config.keys == {"api-20250312000101": "alice", "api-20250312000202": "bob"}
    assert config.source == path


def test_partial_sections_keep_other_defaults() -> None:
    config = build_config({"auth": {"session_ttl": 60}, "keys": {"k-123456789012": "carol"}})
    assert config.auth.session_ttl == 60
    assert config.auth.max_trusted_ips == AuthConfig().max_trusted_ips
    assert config.server == ServerConfig()
    assert config.upstream == UpstreamConfig()
    assert config.keys == {"k-123456789012": "carol"}


def test_trusted_proxies_host_bits_are_masked() -> None:
    config = build_config({"server": {"trusted_proxies": ["10.1.2.3/8"]}})
    assert config.server.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize("level", ["debug", "Info", "WARNING", "error"])
def test_log_level_is_case_insensitive(level: str) -> None:
    assert build_config({"log": {"level": level}}).log.level == level.upper()


# ---------------------------------------------------------------------------------------------------------
# Listen addresses and upstream URLs


@pytest.mark.parametrize("text, expected, shown", [
    ("127.0.0.1:8000", HostPort("127.0.0.1", 8000), "127.0.0.1:8000"),
    ("0.0.0.0:0", HostPort("0.0.0.0", 0), "0.0.0.0:0"),
    ("localhost:65535", HostPort("localhost", 65535), "localhost:65535"),
    ("[::1]:8000", HostPort("::1", 8000), "[::1]:8000"),
    ("[::]:443", HostPort("::", 443), "[::]:443"),
])
def test_parse_host_port_good(text: str, expected: HostPort, shown: str) -> None:
    parsed = parse_host_port("server.listen", text)
    assert parsed == expected
    assert str(parsed) == shown


def test_listen_ipv6_in_config() -> None:
    assert build_config({"server": {"listen": "[::1]:8000"}}).server.listen == HostPort("::1", 8000)


@pytest.mark.parametrize("text, expected", [
    ("http://127.0.0.1:11434", UpstreamURL("http", "127.0.0.1", 11434, "")),
    ("http://localhost", UpstreamURL("http", "localhost", 80, "")),
    ("http://ollama:11434/", UpstreamURL("http", "ollama", 11434, "")),
    ("http://ollama:11434/base", UpstreamURL("http", "ollama", 11434, "/base")),
    ("http://ollama:11434/a/b/", UpstreamURL("http", "ollama", 11434, "/a/b")),
    ("http://[::1]:11434/x", UpstreamURL("http", "::1", 11434, "/x")),
    ("HTTP://Example.COM:1234", UpstreamURL("http", "example.com", 1234, "")),
])
def test_parse_upstream_url_good(text: str, expected: UpstreamURL) -> None:
    assert parse_upstream_url("upstream.url", text) == expected


def test_upstream_url_host_header_and_str() -> None:
    url = parse_upstream_url("upstream.url", "http://[::1]:11434/base/")
    assert url.host_header == "[::1]:11434"
    assert str(url) == "http://[::1]:11434/base"


def test_upstream_base_path_is_kept_in_config() -> None:
    config = build_config({"upstream": {"url": "http://10.0.0.2:8080/ollama/"}})
    assert config.upstream.url.base_path == "/ollama"
    assert config.upstream.url.host_header == "10.0.0.2:8080"


# ---------------------------------------------------------------------------------------------------------
# Errors name the dotted key

INT_KEYS = [("server", "max_connections"), ("server", "max_header_bytes"),
            ("upstream", "max_idle_connections"), ("auth", "session_ttl"), ("auth", "max_trusted_ips"),
            ("auth", "max_body_bytes")]
SECONDS_KEYS = [("server", "header_timeout"), ("server", "keepalive_timeout"), ("server", "body_timeout"),
                ("server", "shutdown_grace"), ("upstream", "connect_timeout"), ("upstream", "read_timeout"),
                ("upstream", "pool_idle_timeout")]
BOOL_KEYS = [("upstream", "forward_origin"), ("auth", "allow_account_endpoints")]
STR_KEYS = [("server", "tls_cert"), ("server", "tls_key")]

BAD_VALUES = (
    [(s, k, v) for s, k in INT_KEYS for v in (True, False, "5", 1.5, -1, [1], {"a": 1})]
    + [(s, k, v) for s, k in SECONDS_KEYS for v in (True, "5", 0, 0.0, -1, -0.5, [1])]
    + [("server", "header_timeout", float("nan"))]
    + [(s, k, v) for s, k in BOOL_KEYS for v in (1, 0, "true", "yes")]
    + [(s, k, v) for s, k in STR_KEYS for v in (1, True, ["a"])]
    + [("server", "max_connections", 0), ("auth", "max_trusted_ips", 0), ("server", "max_header_bytes", 1023)]
    + [("server", "listen", v) for v in (
        8000, True, "localhost", "localhost:", ":8000", "localhost:65536", "localhost:-1", "localhost:http",
        "localhost:80x", "[::1]", "::1", "", "localhost:\u00b2", "[::1:8000")]
    + [("upstream", "url", v) for v in (
        11434, "https://127.0.0.1:11434", "ftp://h", "http://", "http:///api", "http://:80",
        "127.0.0.1:11434", "localhost:11434", "http://h:11434?x=1", "http://h:11434#frag", "http://h:abc",
        "http://h:99999", "http://h:0", "")]
    + [("log", "level", v) for v in ("TRACE", "", 10, True)]
    + [("server", "trusted_proxies", v)
       for v in ("10.0.0.0/8", ["not-an-ip"], ["10.0.0.0/33"], [None], [1], 5)]
)


@pytest.mark.parametrize("section, key, value", BAD_VALUES, ids=[f"{s}.{k}={v!r}" for s, k, v in BAD_VALUES])
def test_wrong_value_names_dotted_key(section: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({section: {key: value}})
    assert str(info.value).startswith(f"{section}.{key}:")


@pytest.mark.parametrize("section, key", INT_KEYS)
def test_int_message_says_what_is_expected(section: str, key: str) -> None:
    with pytest.raises(ConfigError, match=r"expected an integer >= \d+, got True"):
        build_config({section: {key: True}})


def test_session_ttl_message_exact() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"auth": {"session_ttl": -5}})
    assert str(info.value) == "auth.session_ttl: expected an integer >= 0, got -5"


@pytest.mark.parametrize("section", ["server", "upstream", "auth", "log"])
def test_unknown_key(section: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({section: {"sesion_ttl": 1}})
    assert str(info.value) == f"{section}.sesion_ttl: unknown key"


@pytest.mark.parametrize("section", ["servers", "Auth", "logging", "key"])
def test_unknown_section(section: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({section: {}})
    assert str(info.value).startswith(f"{section}: unknown section")
    assert "server" in str(info.value) and "keys" in str(info.value)


@pytest.mark.parametrize("section", ["server", "upstream", "auth", "log"])
def test_section_that_is_not_a_table(section: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({section: 5})
    assert str(info.value) == f"{section}: expected a table"


@pytest.mark.parametrize("server, missing", [
    ({"tls_cert": "cert.pem"}, "server.tls_key"),
    ({"tls_key": "key.pem"}, "server.tls_cert"),
    ({"tls_cert": "cert.pem", "tls_key": ""}, "server.tls_key"),
])
def test_tls_cert_and_key_go_together(server: dict[str, str], missing: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"server": server})
    assert str(info.value).startswith(f"{missing}:")


def test_tls_paths_unresolved_without_base_dir() -> None:
    config = build_config({"server": {"tls_cert": "c.pem", "tls_key": "k.pem"}})
    assert (config.server.tls_cert, config.server.tls_key) == ("c.pem", "k.pem")


def test_relative_tls_paths_resolve_against_the_config_directory(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    absolute_key = str(tmp_path / "abs" / "key.pem")
    path = write(conf_dir / "gate.toml", f"""\
        [server]
        tls_cert = "cert.pem"
        tls_key = "{absolute_key}"
    """)
    config = load_config(path)
    assert config.server.tls_cert == str(conf_dir / "cert.pem")
    assert config.server.tls_key == absolute_key  # absolute paths are left alone


def test_relative_config_path_resolves_tls_against_its_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "f.toml", '[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(os.path.join("sub", "f.toml"))
    assert config.server.tls_cert == str(tmp_path / "sub" / "c.pem")
    assert config.server.tls_key == str(tmp_path / "sub" / "k.pem")


# ---------------------------------------------------------------------------------------------------------
# Finding and reading the file


def test_load_none_reads_fastgate_toml_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "fastgate.toml", '[auth]\nsession_ttl = 42\n[keys]\n"api-20250312000101" = "alice"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.auth.session_ttl == 42
    assert config.keys == {"api-20250312000101": "alice"}
    assert config.source == "fastgate.toml"


def test_load_none_without_file_gives_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(None) == Config()


def test_load_none_with_broken_default_file_is_an_error(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "fastgate.toml", "[auth]\nsession_ttl = -1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^auth\.session_ttl:"):
        load_config(None)


def test_missing_explicit_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: cannot read config file")


@pytest.mark.parametrize("text", [
    "[server\nlisten = 1", "a = = 1", "[auth]\nsession_ttl = 1\nsession_ttl = 2\n", 'x = "unterminated',
])
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = str(tmp_path / "bad.toml")
    Path(path).write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid TOML")


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[log]\nlevel = "\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}:")


def test_file_errors_name_the_dotted_key(tmp_path: Path) -> None:
    path = write(tmp_path / "f.toml", '[upstream]\nurl = "https://ollama:11434"\n')
    with pytest.raises(ConfigError, match=r"^upstream\.url: "):
        load_config(path)


# ---------------------------------------------------------------------------------------------------------
# Overrides: flags beat the file


def test_overrides_beat_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "f.toml", """\
        [server]
        listen = "0.0.0.0:9000"
        max_connections = 7
        [upstream]
        url = "http://file-host:1111/base"
        forward_origin = true
    """)
    config = with_overrides(load_config(path), listen="[::1]:7000", upstream="http://flag-host:2222/other")
    assert config.server.listen == HostPort("::1", 7000)
    assert config.upstream.url == UpstreamURL("http", "flag-host", 2222, "/other")
    # everything else still comes from the file
    assert config.server.max_connections == 7
    assert config.upstream.forward_origin is True
    assert config.source == path


def test_no_overrides_is_identity() -> None:
    config = build_config({"server": {"listen": "0.0.0.0:1"}})
    assert with_overrides(config) == config


def test_override_only_listen_keeps_file_upstream() -> None:
    config = build_config({"upstream": {"url": "http://u:1/p"}})
    result = with_overrides(config, listen="1.2.3.4:5")
    assert result.server.listen == HostPort("1.2.3.4", 5)
    assert result.upstream.url == UpstreamURL("http", "u", 1, "/p")


@pytest.mark.parametrize("kwargs, flag", [
    ({"listen": "nope"}, "--listen"),
    ({"upstream": "https://x"}, "--upstream"),
])
def test_bad_override_names_the_flag(kwargs: dict[str, str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        with_overrides(Config(), **kwargs)
    assert str(info.value).startswith(f"{flag}:")


# ---------------------------------------------------------------------------------------------------------
# [keys]

SECRET = "api-20250312000101"


@pytest.mark.parametrize("keys", [
    {SECRET: 5},
    {SECRET: ""},
    {SECRET: True},
    {SECRET: ["alice"]},
    {SECRET: {"user": "alice"}},
    {"Zq": 1},  # a tiny key: its "last two characters" are the whole key
])
def test_keys_errors_never_contain_the_key(keys: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"keys": keys})
    message = str(info.value)
    assert message.startswith("keys:")
    secret = next(iter(keys))
    assert secret not in message


def test_empty_key_rejected() -> None:
    with pytest.raises(ConfigError, match="^keys: an empty key"):
        build_config({"keys": {"": "alice"}})


@pytest.mark.parametrize("value", ["alice", 5, ["a"]])
def test_keys_not_a_table(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"keys": value})
    assert str(info.value).startswith("keys:")
    assert "alice" not in str(info.value)


def test_keys_sub_table_in_file(tmp_path: Path) -> None:
    path = write(tmp_path / "f.toml", '[keys.api-20250312000101]\nuser = "alice"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith("keys:")
    assert SECRET not in str(info.value)


def test_repr_of_error_in_file_never_shows_key(tmp_path: Path) -> None:
    path = write(tmp_path / "f.toml", f'[keys]\n"{SECRET}" = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert SECRET not in repr(info.value)
