"""What an operator meets when starting fastgate: `fastgate init`, the public example keys, the quick probe of
Ollama and the line that says what is in effect.

No sockets except the one probe; no reading of the clock except where a caller passes it in.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone

import h11

from . import __version__
from .config import Config, HostPort, UpstreamURL
from .errors import ConfigError
from .keys import mask
from .state.stores import redacted_url
from .store import new_secret, secret_digest

# The keys of config.toml.example's [keys] table. They are published with fastgate, so they open any gateway
# that still holds them. Listed here because the example file is not installed with the package;
# tests/test_cli_ops.py checks that this list and the example agree.
EXAMPLE_KEYS: tuple[str, ...] = ("api-20250312000101", "api-20250312000202")
EXAMPLE_CONFIG = "config.toml.example"
ALLOW_EXAMPLE_KEYS_FLAG = "--allow-example-keys"
# The probe of Ollama at startup and in check-config: long enough for a local Ollama on a busy box, short
# enough that an unreachable one never holds up startup noticeably. The listener is already up meanwhile.
OLLAMA_PROBE_TIMEOUT_S = 1.0
OLLAMA_PROBE_MAX_BYTES = 64 * 1024  # /api/version answers are a few dozen bytes
_DIGEST_KEY = re.compile(r"sha256:([0-9a-fA-F]{64})")
_EXAMPLE_DIGESTS = {secret_digest(key): key for key in EXAMPLE_KEYS}


# ---------------------------------------------------------------------------------------------------------
# Example keys


@dataclass(frozen=True)
class ExampleKey:
    masked: str  # never the key itself, although it is public: lines like these end up in shared logs
    where: str  # "path:line" (or just the path when the line cannot be found)


def example_keys_in(config: Config) -> list[ExampleKey]:
    """The config's [keys] entries that are keys of config.toml.example, written in clear or as their digest."""
    found: list[tuple[str, str]] = []  # (example key, the text that names it in the file)
    for entry in config.keys:
        match = _DIGEST_KEY.fullmatch(entry)
        if match is not None:
            key = _EXAMPLE_DIGESTS.get(match.group(1).lower())
            if key is not None:
                found.append((key, match.group(1)))
        elif entry in _EXAMPLE_DIGESTS.values():
            found.append((entry, entry))
    if not found:
        return []
    lines: list[str] = []
    if config.source:
        try:
            with open(config.source, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            pass
    result = []
    for key, text in found:
        number = next((i for i, line in enumerate(lines, 1) if text.lower() in line.lower()), None)
        where = config.source or "the config"
        result.append(ExampleKey(mask(key), f"{where}:{number}" if number else where))
    return result


def example_key_warnings(config: Config) -> list[str]:
    return [f"{found.where}: [keys] holds {found.masked}, a key from {EXAMPLE_CONFIG}: it is published with "
            f"fastgate, so anyone can use it; replace it (fastgate init writes a config with a fresh key, "
            f"fastgate keys add creates one in the store)" for found in example_keys_in(config)]


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable only from this machine. Names other than localhost are not."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_example_keys(config: Config, *, allowed: bool) -> None:
    """ConfigError when example keys would be served on a listener other machines can reach."""
    if allowed or is_loopback(config.server.listen.host):
        return
    found = example_keys_in(config)
    if found:
        first = found[0]
        raise ConfigError(
            f"{first.where}: [keys] holds {first.masked}, a key from {EXAMPLE_CONFIG} (published, so anyone can "
            f"use it), and server.listen {config.server.listen} is not loopback: refusing to start. Replace the "
            f"key (fastgate init writes a config with a fresh one), or pass {ALLOW_EXAMPLE_KEYS_FLAG}")


# ---------------------------------------------------------------------------------------------------------
# Ollama probe


@dataclass(frozen=True)
class OllamaStatus:
    answered: bool
    detail: str  # "version 0.6.2" / "HTTP 404" when it answered; why not otherwise

    def __str__(self) -> str:
        return f"Ollama answered ({self.detail})" if self.answered else f"Ollama did not answer ({self.detail})"


@dataclass(frozen=True)
class BackendsStatus:
    """The startup probe of several [[backends]]: each one's answer, in file order."""

    each: tuple[tuple[str, OllamaStatus], ...]  # (backend name, its status)

    @property
    def answered(self) -> bool:
        """At least one backend answered: fastgate can serve (the router sends requests to those that did)."""
        return any(status.answered for _, status in self.each)

    def __str__(self) -> str:
        return "backends: " + ", ".join(
            f"{name} {'answered' if status.answered else 'did not answer'} ({status.detail})"
            for name, status in self.each)


async def probe_backends(config: Config, timeout_s: float = OLLAMA_PROBE_TIMEOUT_S) -> OllamaStatus | BackendsStatus:
    """The startup probe: of upstream.url as before with one backend; of every [[backends]] table with several,
    all at once (so the whole probe still takes at most `timeout_s`)."""
    backends = config.backends
    if len(backends) == 1:
        return await probe_ollama(backends[0].url, timeout_s)
    answers = await asyncio.gather(*(probe_ollama(backend.url, timeout_s) for backend in backends))
    return BackendsStatus(tuple((backend.name, status) for backend, status in zip(backends, answers)))


def probe_warnings(config: Config, status: OllamaStatus | BackendsStatus) -> list[str]:
    """What the start line's probe result calls for at WARNING: each Ollama that did not answer, and what that
    means for requests."""
    if isinstance(status, OllamaStatus):
        return [] if status.answered else [
            f"{status} at {config.upstream.url}: requests will get 502 or 504 until it does"]
    urls = {backend.name: backend.url for backend in config.backends}
    consequence = ("the others take its requests until it answers its health probes" if status.answered else
                   "no backend answered: requests will get 502, 503 or 504 until one does")
    return [f"Backend {name} ({urls[name]}) did not answer ({backend.detail}): {consequence}"
            for name, backend in status.each if not backend.answered]


def forwarding_to(config: Config) -> str:
    """Where requests go, for the start line and check-config: the URL, or each backend's name and URL."""
    backends = config.backends
    if len(backends) == 1:
        return str(config.upstream.url)
    return f"{len(backends)} backends (" + ", ".join(f"{b.name} {b.url}" for b in backends) + ")"


async def probe_ollama(url: UpstreamURL, timeout_s: float = OLLAMA_PROBE_TIMEOUT_S) -> OllamaStatus:
    """One `GET /api/version` on a connection of its own, bounded by `timeout_s` in all."""
    try:
        return await asyncio.wait_for(_probe(url), timeout_s)
    except asyncio.TimeoutError:
        return OllamaStatus(False, f"no answer within {timeout_s:g} s")
    except OSError as exc:
        # asyncio words a refused connect as "Connect call failed (...)"; the errno's own text says more.
        return OllamaStatus(False, (os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__).lower())
    except h11.ProtocolError as exc:
        return OllamaStatus(False, f"not HTTP: {exc}")


async def _probe(url: UpstreamURL) -> OllamaStatus:
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        conn = h11.Connection(h11.CLIENT)
        writer.write(conn.send(h11.Request(method="GET", target=f"{url.base_path}/api/version", headers=[
            ("Host", url.host_header), ("User-Agent", f"fastgate/{__version__}"), ("Connection", "close")])))
        writer.write(conn.send(h11.EndOfMessage()))
        status = 0
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(OLLAMA_PROBE_MAX_BYTES))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > OLLAMA_PROBE_MAX_BYTES:
                    break
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    finally:
        writer.close()
    if status != 200:
        return OllamaStatus(True, f"HTTP {status}")
    try:
        version = json.loads(bytes(body)).get("version")
    except (ValueError, AttributeError):
        version = None
    return OllamaStatus(True, f"version {version}" if isinstance(version, str) else "HTTP 200")


# ---------------------------------------------------------------------------------------------------------
# What is in effect


def in_effect(config: Config, *, ollama: OllamaStatus | BackendsStatus, store_keys: int | str | None,
              pid: int | None = None) -> str:
    """One line for the start line and check-config. `store_keys`: active keys in the store, None without a
    store, or a word on why they are not known ("no file yet")."""
    parts = [f"config {os.path.abspath(config.source) if config.source else 'none (defaults)'}"]
    if pid is not None:
        parts.append(f"pid {pid}")
    parts.append(f"workers {config.server.workers}")
    keys = f"keys: {len(config.keys)} from the file"
    if config.store.path or config.store.url:
        count = store_keys if isinstance(store_keys, str) else f"{store_keys or 0}"
        where = config.store.path or redacted_url(config.store.url)
        keys += f", {count} from the store {where}"
    else:
        keys += ", no store"
    parts.append(keys)
    parts.append(f"TLS on ({config.server.tls_cert})" if config.server.tls else "TLS off")
    metrics = config.metrics
    if not metrics.enabled:
        parts.append("metrics off")
    else:
        parts.append("metrics /metrics for admin keys" +
                     (f", listener {metrics.listen}" if metrics.listen is not None else ", no listener"))
    origins = config.cors.allow_origins
    parts.append(f"CORS origins {', '.join(origins)}" if origins else "CORS off")
    parts.append(f"IP trust {config.auth.session_ttl} s" if config.auth.session_ttl else "IP trust off")
    parts.append(str(ollama))
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# fastgate init


def initial_config(digest: str, user: str, listen: HostPort, upstream: UpstreamURL, now: float) -> str:
    """The config `fastgate init` writes: one admin key, as its digest, in [keys]; a pid file beside it."""
    stamp = datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""\
# Written by `fastgate init` on {stamp}. Every setting, with its default: config.toml.example.
# Check it: fastgate check-config --config <this file>

[server]
# Loopback only. "0.0.0.0:8000" serves other machines: set tls_cert and tls_key then.
listen = {json.dumps(str(listen))}
pid_file = "fastgate.pid"         # next to this file: lets `fastgate reload` find the running gateway

[upstream]
url = {json.dumps(str(upstream))}

# For a team: keys per person, with roles, model lists and limits, managed by `fastgate keys add ...`.
# Uncomment, restart fastgate, and move the key below over with `fastgate keys import`.
# [store]
# path = "fastgate.db"            # next to this file

[keys]
# The key `fastgate init` printed, written as its SHA-256 digest: this file holds no secret.
# Keys here act as admins (model pulls and deletes too).
"sha256:{digest}" = {json.dumps(user, ensure_ascii=False)}
"""


def write_initial_config(path: str, *, user: str, listen: HostPort, upstream: UpstreamURL, now: float) -> str:
    """Create `path` (never overwriting a file) with a fresh key; returns the key, which exists nowhere else.
    OSError (FileExistsError when the file is there) when it cannot be created."""
    secret = new_secret()
    text = initial_config(secret_digest(secret), user, listen, upstream, now)
    # O_EXCL: an existing file is never replaced, even one created a moment ago. 0600: the file says where
    # Ollama is and who the admin is; nobody else needs to read it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return secret
