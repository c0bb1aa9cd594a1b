"""Strict configuration: TOML file -> frozen dataclasses.

Precedence is defaults < file < command-line overrides. Every key the file may hold is declared once in
`_SCHEMA` with its type and default; an unknown key or a value of the wrong type is a `ConfigError` naming
the dotted key, never a silent default. No I/O other than reading the one file; no sockets.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import sys
from types import MappingProxyType
from dataclasses import dataclass, field, replace
from collections.abc import Mapping
from typing import Any, Callable
from urllib.parse import urlsplit

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

DEFAULT_CONFIG_FILE = "fastgate.toml"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamURL:
    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/prefix" without trailing slash

    @property
    def host_header(self) -> str:
        """What Ollama must see as Host: its own host:port (wire doc section 1)."""
        return str(HostPort(self.host, self.port))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.base_path}"


@dataclass(frozen=True)
class ServerConfig:
    listen: HostPort = HostPort("127.0.0.1", 8000)
    tls_cert: str = ""
    tls_key: str = ""
    max_connections: int = 1024
    max_connections_per_ip: int = 0
    header_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    body_timeout: float = 60.0
    max_header_bytes: int = 65536
    shutdown_grace: float = 30.0
    pid_file: str = ""  # written at startup (for `fastgate reload` and service managers); "" for none
    workers: int = 1  # processes sharing the listener (SO_REUSEPORT) under one supervisor; > 1 needs [state]
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hostnames: tuple[str, ...] = ()  # names clients may use in Host for ambient credentials (DNS rebinding)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


@dataclass(frozen=True)
class UpstreamConfig:
    url: UpstreamURL = UpstreamURL("http", "127.0.0.1", 11434, "")
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    max_idle_connections: int = 64
    pool_idle_timeout: float = 60.0
    forward_origin: bool = False


@dataclass(frozen=True)
class AuthConfig:
    session_ttl: int = 3600
    max_trusted_ips: int = 10000
    max_body_bytes: int = 20 * 1024 * 1024
    allow_account_endpoints: bool = False
    max_failures: int = 10
    failure_window: float = 60.0
    max_buffered_bytes: int = 256 * 1024 * 1024  # all request bodies buffered at once (key search, model checks)
    allow_cloud: bool = False  # Ollama cloud models and server-side web tools (they spend the owner's account)


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    format: str = "text"  # "text" (the seed's lines) or "json" (one object per line)
    request_start: bool = True  # the "Processing request" line as a request arrives (the seed's), before its outcome


@dataclass(frozen=True)
class StoreConfig:
    path: str = ""  # SQLite file of managed keys and usage; "" for none
    url: str = ""  # or a PostgreSQL database shared by every instance (postgresql://...); never both
    usage_retention_days: int = 0  # 0 keeps every usage row; otherwise older rows are deleted once a day


DEFAULT_STATE_TIMEOUT_S = 0.05
REDIS_DEFAULT_PORT = 6379


@dataclass(frozen=True)
class StateURL:
    """Where the shared live state is: a Redis server over TCP, or over a unix socket (`path`)."""

    text: str = field(repr=False)  # as written (may hold a password: never log it, see `redacted`)
    host: str = ""
    port: int = REDIS_DEFAULT_PORT
    path: str = ""  # unix socket path; "" for TCP
    db: int = 0

    @property
    def redacted(self) -> str:
        """For logs and the start line: where, never with credentials."""
        return f"unix://{self.path}?db={self.db}" if self.path else f"redis://{HostPort(self.host, self.port)}/{self.db}"


@dataclass(frozen=True)
class StateConfig:
    """[state]: shared live state (limits, leases, trust, lockout) in Redis, for several instances."""

    url: StateURL
    timeout: float = DEFAULT_STATE_TIMEOUT_S  # seconds a request may wait on Redis before falling back


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    listen: HostPort | None = None  # a separate listener serving only /metrics, without a key


@dataclass(frozen=True)
class CorsConfig:
    allow_origins: tuple[str, ...] = ()  # exact origins, or "*" for any
    max_age: int = 600


DEFAULT_BACKEND_NAME = "default"  # the one backend of a config without [[backends]] (upstream.url)


@dataclass(frozen=True)
class BackendConfig:
    """One `[[backends]]` table: an Ollama that requests may be routed to ([upstream]'s timeouts apply)."""

    name: str  # unique, [a-z0-9_-]+: names it in logs, metrics and X-Fastgate-Backend
    url: UpstreamURL
    max_parallel: int = 0  # requests it runs at once (its OLLAMA_NUM_PARALLEL); 0 = no cap, Ollama queues
    weight: int = 1  # relative share among equally good backends


@dataclass(frozen=True)
class RoutingConfig:
    health_interval: float = 1.0  # seconds between GET /api/version probes per backend
    health_timeout: float = 1.0
    inventory_interval: float = 30.0  # seconds between GET /api/tags per backend
    loaded_interval: float = 2.0  # seconds between GET /api/ps per backend
    queue_timeout: float = 30.0  # seconds a request may wait for a free slot
    max_queue: int = 512  # waiting requests; beyond it 503 with Retry-After (0: never wait)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    log: LogConfig = field(default_factory=LogConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    state: StateConfig | None = None  # [state]; None: every piece of live state stays in this process
    # The file's [[backends]] tables as written; () when it has none. Read `backends`, not this.
    backend_tables: tuple[BackendConfig, ...] = ()
    keys: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # key -> user name
    source: str = ""  # path of the file it came from, "" for defaults

    @property
    def backends(self) -> tuple[BackendConfig, ...]:
        """The Ollamas to route to, never empty: the [[backends]] tables, else one `default` backend at
        upstream.url (so a config with only upstream.url, or neither, behaves exactly as before).

        A property rather than a field so that `replace(config, upstream=...)` (reload, --upstream) cannot
        leave a stale default backend behind. With [[backends]], upstream.url is the first table's URL (see
        build_config): the backend that code not yet routing between several sends everything to.
        """
        return self.backend_tables or (BackendConfig(DEFAULT_BACKEND_NAME, self.upstream.url),)


# ---------------------------------------------------------------------------------------------------------
# Value parsers: each takes (dotted_key, raw value) and returns the typed value or raises ConfigError.

def _int(minimum: int = 0) -> Callable[[str, Any], int]:
    def parse(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")
        return value
    return parse


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}: expected a number of seconds > 0, got {value!r}")
    return float(value)


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\[\]:\s]+)):(?P<port>[0-9]{1,5})")


def parse_host_port(key: str, value: Any) -> HostPort:
    match = _HOST_PORT.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match.group("port")) > 65535:
        raise ConfigError(f"{key}: expected \"HOST:PORT\" (e.g. 127.0.0.1:8000, [::1]:8000), got {value!r}")
    return HostPort(match.group("v6") or match.group("host"), int(match.group("port")))


def parse_upstream_url(key: str, value: Any) -> UpstreamURL:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a URL like http://127.0.0.1:11434, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme != "http" or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{key}: expected http://HOST[:PORT][/PATH] (Ollama speaks plain HTTP), got {value!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}: bad port in {value!r}") from None
    if port is None:
        port = 80
    elif port == 0:
        raise ConfigError(f"{key}: port 0 is not a port Ollama can listen on, got {value!r}")
    return UpstreamURL("http", parts.hostname, port, parts.path.rstrip("/"))


def parse_state_url(key: str, value: Any) -> StateURL:
    """redis://[user:password@]HOST[:PORT][/DB] or unix:///PATH[?db=N] (a password may also come this way)."""
    expected = f"{key}: expected redis://HOST[:PORT][/DB] or unix:///PATH.sock[?db=N], got "
    if not isinstance(value, str):
        raise ConfigError(expected + repr(value))
    parts = urlsplit(value)
    # No password in an error message.
    shown = shown_url(value)
    if parts.fragment:
        raise ConfigError(expected + repr(shown))
    if parts.scheme == "redis":
        if not parts.hostname or parts.query:
            raise ConfigError(expected + repr(shown))
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"{key}: bad port in {shown!r}") from None
        if port == 0:
            raise ConfigError(f"{key}: port 0 is not a port Redis can listen on, got {shown!r}")
        db_text = parts.path.strip("/")
        if db_text and not (db_text.isascii() and db_text.isdigit()):
            raise ConfigError(f"{key}: the database is a number (redis://host:port/0), got {shown!r}")
        return StateURL(value, parts.hostname, port or REDIS_DEFAULT_PORT, "", int(db_text or 0))
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise ConfigError(expected + repr(shown))
        db = 0
        if parts.query:
            name, _, db_text = parts.query.partition("=")
            if name != "db" or not (db_text.isascii() and db_text.isdigit()):
                raise ConfigError(f"{key}: the only query a unix:// URL takes is ?db=N, got {shown!r}")
            db = int(db_text)
        return StateURL(value, "", REDIS_DEFAULT_PORT, parts.path, db)
    raise ConfigError(expected + repr(shown))


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def _log_level(key: str, value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise ConfigError(f"{key}: expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.upper()


def _networks(key: str, value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of IP addresses or CIDR ranges, got {value!r}")
    nets = []
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{key}: expected strings such as \"10.0.0.5\" or \"10.0.0.0/8\", got {item!r}")
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {item!r} is not an IP address or CIDR range") from None
    return tuple(nets)


_SCHEMA: dict[str, tuple[type, dict[str, Callable[[str, Any], Any]]]] = {
    "server": (ServerConfig, {
        "listen": parse_host_port,
        "tls_cert": _str,
        "tls_key": _str,
        "max_connections": _int(1),
        "max_connections_per_ip": _int(0),
        "header_timeout": _seconds,
        "keepalive_timeout": _seconds,
        "body_timeout": _seconds,
        "max_header_bytes": _int(1024),
        "shutdown_grace": _seconds,
        "pid_file": _str,
        "workers": _int(1),
        "trusted_proxies": _networks,
        "hostnames": lambda key, value: _hostnames(key, value),
    }),
    "upstream": (UpstreamConfig, {
        "url": parse_upstream_url,
        "connect_timeout": _seconds,
        "read_timeout": _seconds,
        "max_idle_connections": _int(0),
        "pool_idle_timeout": _seconds,
        "forward_origin": _bool,
    }),
    "auth": (AuthConfig, {
        "session_ttl": _int(0),
        "max_trusted_ips": _int(1),
        "max_body_bytes": _int(0),
        "allow_account_endpoints": _bool,
        "max_failures": _int(0),
        "failure_window": _seconds,
        "max_buffered_bytes": _int(0),
        "allow_cloud": _bool,
    }),
    "log": (LogConfig, {
        "level": _log_level,
        "format": lambda key, value: _choice(key, value, ("text", "json")),
        "request_start": _bool,
    }),
    "store": (StoreConfig, {
        "path": _str,
        "url": lambda key, value: _postgres_url(key, value),
        "usage_retention_days": _int(0),
    }),
    "metrics": (MetricsConfig, {
        "enabled": _bool,
        "listen": lambda key, value: None if value == "" else parse_host_port(key, value),
    }),
    "cors": (CorsConfig, {
        "allow_origins": lambda key, value: _origins(key, value),
        "max_age": _int(0),
    }),
    "routing": (RoutingConfig, {
        "health_interval": _seconds,
        "health_timeout": _seconds,
        "inventory_interval": _seconds,
        "loaded_interval": _seconds,
        "queue_timeout": _seconds,
        "max_queue": _int(0),
    }),
    "state": (StateConfig, {
        "url": parse_state_url,
        "timeout": _seconds,
    }),
    # An array of tables ([[backends]]): each table is checked against these keys by _parse_backends.
    "backends": (BackendConfig, {
        "name": lambda key, value: _backend_name(key, value),
        "url": parse_upstream_url,
        "max_parallel": _int(0),
        "weight": _int(1),
    }),
}
_TABLE_ARRAYS = frozenset({"backends"})
_BACKEND_REQUIRED = ("name", "url")
_BACKEND_NAME = re.compile(r"[a-z0-9_-]{1,64}")  # 64: the name is a metrics label and a log field


def _backend_name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _BACKEND_NAME.fullmatch(value):
        raise ConfigError(f"{key}: expected a name of 1-64 characters a-z, 0-9, _ or -, got {value!r}")
    return value


def _parse_backends(raw: Any) -> tuple[BackendConfig, ...]:
    """The [[backends]] tables, in file order. Errors name the table by its index: `backends[1].url`."""
    if not isinstance(raw, list) or not all(isinstance(table, dict) for table in raw):
        raise ConfigError("backends: expected [[backends]] tables (an array of tables), one per Ollama")
    if not raw:
        raise ConfigError("backends: expected at least one [[backends]] table")
    cls, fields = _SCHEMA["backends"]
    backends: list[BackendConfig] = []
    for index, table in enumerate(raw):
        values = {}
        for name, value in table.items():
            dotted = f"backends[{index}].{name}"
            if name not in fields:
                raise ConfigError(f"{dotted}: unknown key")
            values[name] = fields[name](dotted, value)
        for name in _BACKEND_REQUIRED:
            if name not in values:
                raise ConfigError(f"backends[{index}].{name}: required")
        backend = cls(**values)
        for other_index, other in enumerate(backends):
            if other.name == backend.name:
                raise ConfigError(f"backends[{index}].name: {backend.name!r} is already the name of "
                                  f"backends[{other_index}]")
            if other.url == backend.url:  # one Ollama twice would count its slots twice
                raise ConfigError(f"backends[{index}].url: {str(backend.url)!r} is already the URL of "
                                  f"backends[{other_index}] ({other.name!r})")
        backends.append(backend)
    return tuple(backends)


def shown_url(value: str) -> str:
    """A URL from the config as an error message may show it: scheme, host, port and path. A password can sit
    in the userinfo (which an unencoded '/', '?' or '#' in it hides from urlsplit) or in the query, so
    everything up to the value's last '@', the query (unless it names no password and nothing was cut) and the
    fragment are left out."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value
    _userinfo, at, tail = rest.rpartition("@")
    rest = tail if at else rest
    rest = rest.partition("#")[0]
    base, question, query = rest.partition("?")
    shown = f"{scheme}://{base}" if scheme else base
    if question and not at and "password" not in query.lower():
        shown += "?" + query
    return shown


def _postgres_url(key: str, value: Any) -> str:
    """postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DBNAME[?PARAMS] (libpq's URI form). Errors never show the
    password."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a URL like postgresql://fastgate@db.internal/fastgate, got {value!r}")
    parts = urlsplit(value)
    shown = shown_url(value)
    if parts.scheme not in ("postgresql", "postgres") or parts.fragment:
        raise ConfigError(f"{key}: expected postgresql://[USER@]HOST[:PORT]/DBNAME, got {shown!r}")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{key}: bad port in {shown!r}") from None
    return value


def _origins(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: expected a list of origins such as [\"https://app.example.com\"] or [\"*\"]")
    for origin in value:
        if origin != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", origin):
            raise ConfigError(f"{key}: {origin!r} is not an origin (scheme://host[:port], no path)")
    return tuple(value)


_HOSTNAME = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?")


def _hostnames(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of host names such as [\"gpu.example.com\"]")
    names = []
    for name in value:
        lowered = name.lower()
        if not _HOSTNAME.fullmatch(lowered):
            raise ConfigError(f"{key}: {name!r} is not a host name (no port, no scheme)")
        names.append(lowered.rstrip("."))
    return tuple(names)


def _parse_keys(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ConfigError("keys: expected a table of \"key\" = \"user name\"")
    keys: dict[str, str] = {}
    for key, user in raw.items():
        # Never echo the key itself: error messages end up in logs and terminals.
        if isinstance(user, dict):
            raise ConfigError("keys: expected \"key\" = \"user name\" pairs, found a sub-table")
        if not key:
            raise ConfigError("keys: an empty key is not allowed")
        if not isinstance(user, str) or not user:
            raise ConfigError(f"keys: user names must be non-empty strings (entry {len(keys) + 1} is {user!r})")
        keys[key] = user
    return keys


def build_config(data: dict[str, Any], *, source: str = "", base_dir: str = "") -> Config:
    """Validate a parsed TOML document into a Config. Relative TLS, pid file and store paths resolve against
    base_dir."""
    sections: dict[str, Any] = {}
    for section_name, section_value in data.items():
        if section_name == "keys" or section_name in _TABLE_ARRAYS:
            continue
        if section_name not in _SCHEMA:
            raise ConfigError(f"{section_name}: unknown section (known: {', '.join([*_SCHEMA, 'keys'])})")
        if not isinstance(section_value, dict):
            raise ConfigError(f"{section_name}: expected a table")
        cls, fields = _SCHEMA[section_name]
        values = {}
        for name, raw in section_value.items():
            dotted = f"{section_name}.{name}"
            if name not in fields:
                raise ConfigError(f"{dotted}: unknown key")
            values[name] = fields[name](dotted, raw)
        if section_name == "state" and "url" not in values:
            raise ConfigError("state.url: required in [state] (redis://HOST:PORT/DB or unix:///PATH.sock)")
        sections[section_name] = cls(**values)

    server = sections.get("server", ServerConfig())
    if server.workers > 1 and "state" not in sections:
        # Limits, leases, IP trust and lockout would each be counted per worker: N times what was configured.
        raise ConfigError(f"server.workers: more than 1 needs [state] url (shared live state in Redis), so that "
                          f"the {server.workers} workers share limits, IP trust and lockout; set state.url, or "
                          f"workers = 1")
    if bool(server.tls_cert) != bool(server.tls_key):
        missing = "server.tls_key" if server.tls_cert else "server.tls_cert"
        raise ConfigError(f"{missing}: tls_cert and tls_key must be set together")
    if server.tls_cert and base_dir:
        server = replace(server, tls_cert=os.path.join(base_dir, server.tls_cert),
                          tls_key=os.path.join(base_dir, server.tls_key))
        sections["server"] = server
    if server.pid_file and base_dir:
        sections["server"] = server = replace(server, pid_file=os.path.join(base_dir, server.pid_file))
    store = sections.get("store")
    if store is not None and store.path and store.url:
        raise ConfigError("store.path and store.url: set one of them (path: a SQLite file for one machine, url: "
                          "a PostgreSQL database shared by every instance)")
    if store is not None and store.path and base_dir:
        sections["store"] = replace(store, path=os.path.join(base_dir, store.path))
    if "backends" in data:
        backends = _parse_backends(data["backends"])
        if "url" in data.get("upstream", {}):
            raise ConfigError("upstream.url: cannot be set together with [[backends]] (give that Ollama a "
                              "[[backends]] table instead)")
        # upstream.url stays meaningful for code that knows one Ollama: the first backend's (see Config).
        upstream = sections.get("upstream", UpstreamConfig())
        sections["upstream"] = replace(upstream, url=backends[0].url)
        sections["backend_tables"] = backends
    return Config(keys=MappingProxyType(_parse_keys(data.get("keys", {}))), source=source, **sections)


def load_config(path: str | None) -> Config:
    """Read `path`, or ./fastgate.toml when path is None and that file exists, else defaults."""
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG_FILE):
            return Config()
        path = DEFAULT_CONFIG_FILE
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return build_config(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


def with_overrides(config: Config, *, listen: str | None = None, upstream: str | None = None) -> Config:
    """Apply command-line overrides (they win over the file)."""
    if listen is not None:
        config = replace(config, server=replace(config.server, listen=parse_host_port("--listen", listen)))
    if upstream is not None:
        # The flag names the one Ollama to use: it replaces [[backends]] too (one `default` backend).
        config = replace(config, upstream=replace(config.upstream,
                                                    url=parse_upstream_url("--upstream", upstream)),
                         backend_tables=())
    return config
