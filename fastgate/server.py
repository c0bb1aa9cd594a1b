"""Process level: the event loop (uvloop when installed), the listener, signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import ssl
import stat
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from . import __version__
from .config import Config
from .connection import ClientProtocol
from .errors import ConfigError
from .logs import log, set_level
from .managed import ManagedKeys
from .store import KeyStore, StoreError
from .proxy import Proxy
from .tls import load_certificate, server_context

LISTEN_BACKLOG = 1024
# [keys] entries written as "sha256:<hex>" are digests (keys.KeyRing reads them so), not secrets.
_DIGEST_KEY = re.compile(r"sha256:[0-9a-fA-F]{64}")
_GROUP_OR_OTHER_READ = stat.S_IRGRP | stat.S_IROTH


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, the standard one otherwise: the only place that chooses."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@dataclass
class RunningServer:
    proxy: Proxy
    server: asyncio.AbstractServer
    host: str
    port: int
    scheme: str
    ssl_context: ssl.SSLContext | None = None
    metrics_server: asyncio.AbstractServer | None = None
    managed: ManagedKeys | None = None
    # Every accepted connection not yet collected, whatever the proxy thinks of it: stop() leaves none open.
    accepted: weakref.WeakSet[ClientProtocol] = field(default_factory=weakref.WeakSet)

    def reload(self, config: Config) -> None:
        """Apply a new config without dropping a connection: keys, trust, limits, timeouts, log level and the
        TLS certificate (new handshakes use it). Raises ConfigError, leaving everything as it was."""
        if self.ssl_context is not None and config.server.tls:
            server_context(config.server.tls_cert, config.server.tls_key)  # validate before touching anything
        fixed = self.proxy.reload(config)
        if self.ssl_context is not None and config.server.tls:
            load_certificate(self.ssl_context, config.server.tls_cert, config.server.tls_key)  # never prompts
        set_level(config.log.level)
        for name in fixed:
            log.warning("Reload: %s changed; that takes a restart, the old value stays in force", name)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        grace = self.proxy.config.server.shutdown_grace if grace is None else grace
        # The last usage flush waits for the store's lock within the same grace, not after it.
        deadline = asyncio.get_running_loop().time() + grace
        self.server.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        await self.proxy.shutdown(grace)
        # The proxy cut what it still had on its books; a socket it already let go of may still be flushing a
        # last answer to a client that does not read (or be lingering after an early 503): reset those too.
        for protocol in list(self.accepted):
            if not protocol.lost and protocol.transport is not None:
                protocol.transport.abort()
        await self.server.wait_closed()
        if self.managed is not None:
            await self.managed.stop(deadline)  # the last usage records go to the store (or to its spill file)


async def start(config: Config) -> RunningServer:
    """Bind the listener and start serving; returns once it accepts connections."""
    listen = config.server.listen
    ssl_context = server_context(config.server.tls_cert, config.server.tls_key) if config.server.tls else None
    proxy = Proxy(config)
    await proxy.start()
    managed = None
    if config.store.path:
        try:
            store = await asyncio.to_thread(KeyStore, config.store.path)
        except StoreError as exc:
            raise ConfigError(f"store.path: {exc}") from None
        managed = ManagedKeys(store, proxy.gate)
        await managed.start()
        proxy.set_usage_sink(managed.record)
    accepted: weakref.WeakSet[ClientProtocol] = weakref.WeakSet()

    def tracked(factory: Callable[[], ClientProtocol]) -> Callable[[], ClientProtocol]:
        def make() -> ClientProtocol:
            protocol = factory()
            accepted.add(protocol)
            return protocol
        return make

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        tracked(proxy.protocol_factory), listen.host, listen.port, ssl=ssl_context, backlog=LISTEN_BACKLOG,
        reuse_address=True, ssl_handshake_timeout=config.server.header_timeout if ssl_context else None)
    sock: socket.socket = server.sockets[0]
    host, port = sock.getsockname()[:2]
    metrics_server = None
    metrics = config.metrics
    if metrics.enabled and metrics.listen is not None:
        metrics_server = await loop.create_server(tracked(proxy.metrics_protocol_factory), metrics.listen.host,
                                                  metrics.listen.port, reuse_address=True)
    return RunningServer(proxy, server, host, port, "https" if ssl_context else "http", ssl_context,
                         metrics_server, managed, accepted)


def warn_if_keys_exposed(config: Config) -> None:
    """Warn when the config file holds clear keys that group or others can read (startup and every reload):
    anyone with a login on the box could use them. Keys written as sha256:<hex> digests are not secrets."""
    clear = sum(1 for key in config.keys if not _DIGEST_KEY.fullmatch(key))
    if not clear or not config.source:
        return
    try:
        mode = os.stat(config.source).st_mode
    except OSError:
        return  # it was read a moment ago; one gone since is not this check's business
    if mode & _GROUP_OR_OTHER_READ:
        log.warning("Config file %s holds %d API keys in clear and group or others can read it (mode %03o): run "
                    "chmod 600 %s, or write the keys as sha256:<hex> digests", config.source, clear,
                    stat.S_IMODE(mode), config.source)


async def serve(config: Config, *, reread: Callable[[], Config] | None = None,
                on_ready: Callable[[RunningServer], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully. SIGHUP re-reads the config via `reread`."""
    warn_if_keys_exposed(config)
    running = await start(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reread is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload, running, reread)
    # Where it listens is announced whatever the log level: operators and scripts wait for this line.
    log.log(max(logging.INFO, log.getEffectiveLevel()),
            "fastgate %s listening on %s, forwarding to %s (%d keys, IP trust %s)", __version__, running.url,
             config.upstream.url, len(config.keys),
             f"{config.auth.session_ttl} s" if config.auth.session_ttl else "off")
    if on_ready is not None:
        on_ready(running)
    await stop.wait()
    log.info("Shutting down: no new connections; waiting up to %.0f s for requests in flight",
             config.server.shutdown_grace)
    await running.stop()
    log.info("Stopped")


def _reload(running: RunningServer, reread: Callable[[], Config]) -> None:
    try:
        config = reread()
        warn_if_keys_exposed(config)
        running.reload(config)
    except ConfigError as exc:
        log.error("Reload failed, keeping the running config: %s", exc)
        return
    log.info("Reloaded %s: %d keys, IP trust %s, log level %s", config.source or "defaults", len(config.keys),
             f"{config.auth.session_ttl} s" if config.auth.session_ttl else "off", config.log.level)


def run(config: Config, reread: Callable[[], Config] | None = None,
        on_ready: Callable[[RunningServer], None] | None = None) -> None:
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(config, reread=reread, on_ready=on_ready))
    finally:
        loop.close()
