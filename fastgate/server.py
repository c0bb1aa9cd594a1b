"""Process level: the event loop (uvloop when installed), the listener, signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import errno
import gc
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
from .connection import ClientProtocol, _plain_ip
from .errors import BadRequest, ConfigError
from .gate import Gate
from .gojson import warm_up as warm_up_json_reader
from .logs import log, set_format, set_level
from . import pidfile
from .managed import ManagedKeys
from .messages import error_response
from .metrics import Metrics
from .startup import example_key_warnings, forwarding_to, in_effect, probe_backends, probe_warnings
from .store import StoreError
from .state.stores import StoreUnavailable, open_store
from .proxy import FD_WARN_INTERVAL_S, Proxy
from .state import LiveState
from .tls import load_certificate, server_context
from .worker import MetricsPeers, WorkerRole

try:
    import resource
except ImportError:  # pragma: no cover - Windows: no RLIMIT_NOFILE to manage
    resource = None  # type: ignore[assignment]

LISTEN_BACKLOG = 1024
# File descriptors a client connection may hold: its socket, and the Ollama connection its request needs.
FDS_PER_CONNECTION = 2
# Descriptors besides those: stdio, the selector and its wake-up pipe, the listeners, the key store (database,
# WAL, shared memory), log files, the /health probe, refused connections lingering over their 503
# (proxy.REFUSALS_LINGERING_MAX), and room to spare.
FIXED_FDS = 128
# Above this share of the open file limit in use (seen from an accepted socket's descriptor number), say so:
# past the limit uvloop's libuv drops new connections without a word, and upstream connects fail (502).
FD_WARN_SHARE = 0.9
ACCEPT_RETRY_S = 0.5  # after accept() failed for want of descriptors
ACCEPTS_PER_YIELD = 32  # connections accepted in a row before other work gets the loop
# Plain HTTP on the TLS port: a TLS ClientHello starts with 0x16, a request with its method (as far as peeked).
PEEK_BYTES = 16
_PLAIN_HTTP_START = re.compile(rb"[A-Z][A-Z_-]{0,19}(?: |\Z)")
PLAIN_HTTP_MESSAGE = ("this port speaks HTTPS only: the plain HTTP request was sent to an HTTPS port; "
                      "use an https:// URL")
PLAIN_HTTP_HEAD_MAX = 16 * 1024  # read at most this much of its head before answering
PLAIN_HTTP_LINGER_S = 1.0  # to send the 400 and let the client close first (so it is not lost to a reset)
# [keys] entries written as "sha256:<hex>" are digests (keys.KeyRing reads them so), not secrets.
_DIGEST_KEY = re.compile(r"sha256:[0-9a-fA-F]{64}")
_GROUP_OR_OTHER_READ = stat.S_IRGRP | stat.S_IROTH


@dataclass(frozen=True)
class OpenFilePlan:
    """What to do about RLIMIT_NOFILE for a config: the soft limit to set, the max_connections it can hold."""

    soft: int  # the soft limit to run with
    raise_to: int | None  # set the soft limit to this first (None: leave it as it is)
    max_connections: int  # server.max_connections, or less if the limit cannot hold that many
    messages: tuple[tuple[int, str], ...]  # (logging level, line) to log


def plan_open_files(soft: int, hard: int, max_connections: int, upstream_idle: int, *,
                    backlog: int = LISTEN_BACKLOG, unlimited: int = -1) -> OpenFilePlan:
    """Pure: raise the soft limit toward the hard one (`unlimited` is RLIM_INFINITY) as far as
    max_connections needs, and lower max_connections to what the limit can hold otherwise.

    Every client connection may hold two descriptors (its socket, its Ollama connection); the pool keeps up to
    `upstream_idle` more; a burst of up to `backlog` connections can be accepted before any is refused (asyncio
    and libuv accept what waits in the backlog in one go), a quarter of the limit at most; FIXED_FDS for the
    rest. Running out is worse than refusing: connected clients get 502 "Too many open files" and new ones
    are dropped, unlogged under uvloop.
    """
    def overhead(limit: int) -> int:
        return upstream_idle + min(backlog, limit // 4) + FIXED_FDS

    wanted = FDS_PER_CONNECTION * max_connections + upstream_idle + backlog + FIXED_FDS
    hard_text = "unlimited" if hard == unlimited else str(hard)
    messages: list[tuple[int, str]] = []
    new_soft = soft
    if soft != unlimited and soft < wanted:
        new_soft = wanted if hard == unlimited else min(wanted, hard)
    raise_to = new_soft if new_soft != soft else None
    if raise_to is not None:
        messages.append((logging.INFO, f"Raised the open file limit (RLIMIT_NOFILE) from {soft} to {new_soft} "
                                       f"(hard limit {hard_text}) for server.max_connections = {max_connections}"))
    effective = max_connections
    if new_soft != unlimited and new_soft < wanted:
        effective = min(max_connections, max(1, (new_soft - overhead(new_soft)) // FDS_PER_CONNECTION))
        messages.append((logging.WARNING, (
            f"server.max_connections = {max_connections} lowered to {effective}: the open file limit is {new_soft} "
            f"(hard limit {hard_text}) and each client connection may need {FDS_PER_CONNECTION} descriptors, plus "
            f"{overhead(new_soft)} for the upstream pool, accept bursts, listeners, store and logs; raise the hard "
            f"limit to {wanted} (LimitNOFILE= under systemd, ulimit -n) to serve {max_connections}")))
    return OpenFilePlan(new_soft, raise_to, effective, tuple(messages))


def apply_open_file_limit(config: Config) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE as `plan_open_files` says and log what was done; returns the effective
    max_connections and the soft limit in force (0: unknown)."""
    max_connections = config.server.max_connections
    if resource is None:  # pragma: no cover - Windows
        return max_connections, 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    idle = config.upstream.max_idle_connections
    plan = plan_open_files(soft, hard, max_connections, idle, unlimited=resource.RLIM_INFINITY)
    if plan.raise_to is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (plan.raise_to, hard))
        except (ValueError, OSError) as exc:
            log.warning("Could not raise the open file limit from %d to %d: %s", soft, plan.raise_to, exc)
            plan = plan_open_files(soft, soft, max_connections, idle, unlimited=resource.RLIM_INFINITY)
    for level, line in plan.messages:
        log.log(level, line)
    return plan.max_connections, plan.soft if plan.soft != resource.RLIM_INFINITY else 0


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """The event loop's own errors: accept() out of descriptors gets fastgate's log at ERROR (asyncio says it
    once per refused accept to a logger nobody reads); anything else goes to the default handler."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        now = loop.time()
        last = getattr(_log_loop_error, "last", float("-inf"))
        if now - last >= FD_WARN_INTERVAL_S:
            _log_loop_error.last = now  # type: ignore[attr-defined]
            log.error("Out of file descriptors (%s: %s): new connections are not accepted until some close; "
                      "lower server.max_connections or raise the open file limit", context.get("message"), exc)
        return
    loop.default_exception_handler(context)


class TlsListener(asyncio.AbstractServer):
    """A TLS listener that accepts its sockets itself, so that each counts against the connection caps from
    accept on, by address, before its handshake.

    With `loop.create_server(ssl=...)` fastgate heard of a connection only once its handshake was over: 200 bare
    connects from one address held 216 descriptors past max_connections = 5 and max_connections_per_ip = 2, each
    for up to the handshake timeout. Here a socket over a cap is closed at accept (there is no HTTP to answer
    with before a handshake not worth its CPU), and an admitted one is handed to `loop.connect_accepted_socket`,
    which does the handshake within server.header_timeout. A handshake that fails or times out never reaches
    the application protocol (no connection_lost): its slot is given back here, when connect_accepted_socket
    raises, by which time the loop has closed the socket. Before the handshake its first bytes are peeked: plain
    HTTP (a method where a ClientHello's 0x16 belongs) is answered with a 400 saying to use https, as nginx does.
    """

    def __init__(self, proxy: Proxy, ssl_context: ssl.SSLContext, factory: Callable[..., ClientProtocol],
                 listeners: list[socket.socket]) -> None:
        self.proxy = proxy
        self.ssl_context = ssl_context
        self.factory = factory
        self.listeners = listeners
        self.loop = asyncio.get_running_loop()
        self._accepting = [self.loop.create_task(self._accept(sock)) for sock in listeners]
        self._handshakes: set[asyncio.Task[None]] = set()
        self._accept_failed_at = float("-inf")

    @classmethod
    async def bind(cls, proxy: Proxy, ssl_context: ssl.SSLContext, factory: Callable[..., ClientProtocol],
                   host: str, port: int, *, reuse_port: bool = False) -> TlsListener:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        listeners: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:  # one of several workers on this address (see fastgate.supervisor)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as create_server binds them
                sock.bind(address)
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
        except OSError:
            for sock in listeners:
                sock.close()
            raise
        return cls(proxy, ssl_context, factory, listeners)

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self.listeners)

    async def _accept(self, listener: socket.socket) -> None:
        loop = self.loop
        accepted = 0
        while True:
            try:
                sock, address = await loop.sock_accept(listener)
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as exc:
                # Out of descriptors (or buffers): the connection waits in the backlog. Say so, and retry soon.
                now = loop.time()
                if now - self._accept_failed_at >= FD_WARN_INTERVAL_S:
                    self._accept_failed_at = now
                    log.error("Cannot accept connections: %s; retrying every %.1f s (lower server.max_connections "
                              "or raise the open file limit)", exc, ACCEPT_RETRY_S)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            self.proxy.check_descriptor(sock.fileno())
            ip = _plain_ip(address[0])
            if not self.proxy.take_slot(ip):
                sock.close()
            else:
                task = loop.create_task(self._handshake(sock, ip))
                self._handshakes.add(task)
                task.add_done_callback(self._handshakes.discard)
            accepted += 1
            if accepted % ACCEPTS_PER_YIELD == 0:
                await asyncio.sleep(0)  # sock_accept does not suspend while the backlog is full

    async def _handshake(self, sock: socket.socket, ip: str) -> None:
        made: list[ClientProtocol] = []

        def factory() -> ClientProtocol:
            made.append(self.factory(ip))
            return made[-1]

        deadline = self.loop.time() + self.proxy.config.server.header_timeout
        try:
            first = await self._first_bytes(sock, deadline)
            if first is not None and _PLAIN_HTTP_START.match(first):
                await self._answer_plain_http(sock, ip, deadline)
                first = None
            if first is None:  # closed, silent until the deadline, or answered: the socket is still ours
                sock.close()
                self.proxy.release_slot(ip)
                return
            await self.loop.connect_accepted_socket(factory, sock, ssl=self.ssl_context,
                                                    ssl_handshake_timeout=max(deadline - self.loop.time(), 0.001))
        except BaseException as exc:
            if made:
                made[0].release_slot()
            else:  # refused before a protocol was even made: the socket is still ours
                sock.close()
                self.proxy.release_slot(ip)
            if not isinstance(exc, Exception):
                raise
            log.debug("TLS handshake with %s failed: %s", ip, exc)

    async def _first_bytes(self, sock: socket.socket, deadline: float) -> bytes | None:
        """The first bytes the client sent, peeked (still there for the handshake to read); None when it
        closed, or sent nothing before the deadline."""
        loop = self.loop
        sock.setblocking(False)
        while True:
            try:
                return sock.recv(PEEK_BYTES, socket.MSG_PEEK) or None
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return None
            readable = loop.create_future()
            loop.add_reader(sock.fileno(), lambda: readable.done() or readable.set_result(None))
            try:
                await asyncio.wait_for(readable, deadline - loop.time())
            except asyncio.TimeoutError:
                return None
            finally:
                loop.remove_reader(sock.fileno())

    async def _answer_plain_http(self, sock: socket.socket, ip: str, deadline: float) -> None:
        """Plain HTTP sent to the TLS port gets a readable 400 saying to use https (as nginx does), not an empty
        reply. Its head is read first, within the handshake deadline, so that the answer takes the shape of the
        path (/v1 errors) and closing does not reset the connection under the client; the answer and the wait
        for the client to close take at most PLAIN_HTTP_LINGER_S more."""
        loop = self.loop
        head = bytearray()

        async def read_head() -> None:
            while b"\r\n\r\n" not in head and len(head) < PLAIN_HTTP_HEAD_MAX:
                piece = await loop.sock_recv(sock, 4096)
                if not piece:
                    return
                head.extend(piece)

        async def answer(data: bytes) -> None:
            await loop.sock_sendall(sock, data)
            sock.shutdown(socket.SHUT_WR)
            while await loop.sock_recv(sock, 65536):  # whatever else it sends, until it closes
                pass

        try:
            await asyncio.wait_for(read_head(), max(deadline - loop.time(), 0))
        except (asyncio.TimeoutError, OSError):
            pass
        method, _, rest = bytes(head).partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        log.info("Plain HTTP from %s on the TLS port (%s %s): answered 400, use https", ip,
                 method[:20].decode("latin-1"), path[:100].decode("latin-1"))
        reply = error_response(BadRequest(PLAIN_HTTP_MESSAGE), path=path, request_id=b"", close=True,
                               head_only=method == b"HEAD")
        try:
            await asyncio.wait_for(answer(reply), PLAIN_HTTP_LINGER_S)
        except (asyncio.TimeoutError, OSError):
            pass

    def close(self) -> None:
        for task in self._accepting:
            task.cancel()
        for task in list(self._handshakes):
            task.cancel()  # the handshake is aborted and its socket closed
        for sock in self.listeners:
            sock.close()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def is_serving(self) -> bool:
        return any(not task.done() for task in self._accepting)

    async def start_serving(self) -> None:
        pass  # serving from the start

    async def serve_forever(self) -> None:
        await asyncio.gather(*self._accepting, return_exceptions=True)

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._accepting, *self._handshakes, return_exceptions=True)


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
    pid_file: str = ""  # the pid file this process wrote ("" for none); stays where it is until exit
    worker: WorkerRole | None = None  # one of several workers ([server] workers > 1), or the only process

    def reload(self, config: Config) -> None:
        """Apply a new config without dropping a connection: keys, trust, limits, timeouts, log level and
        format, the TLS certificate (new handshakes use it). Raises ConfigError, leaving everything as it was."""
        if self.ssl_context is not None and config.server.tls:
            server_context(config.server.tls_cert, config.server.tls_key)  # validate before touching anything
        fixed = self.proxy.reload(config)
        self.proxy.max_connections, _ = apply_open_file_limit(self.proxy.config)
        if self.ssl_context is not None and config.server.tls:
            load_certificate(self.ssl_context, config.server.tls_cert, config.server.tls_key)  # never prompts
        set_level(config.log.level)
        set_format(config.log.format)
        for name in fixed:
            log.warning("Reload: %s changed; that takes a restart, the old value stays in force", name)
        if self.managed is not None:
            self.managed.retention_days = config.store.usage_retention_days
        if config.server.pid_file != self.pid_file:
            log.warning("Reload: server.pid_file changed; that takes a restart, the pid file stays %s",
                        self.pid_file or "unwritten")

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
        if self.proxy.state is not None:
            await self.proxy.state.stop()  # this instance's leases and heartbeat are given back at once


async def start(config: Config, *, reuse_port: bool = False) -> RunningServer:
    """Bind the listener and start serving; returns once it accepts connections. `reuse_port`: a worker of
    several, whose listeners share their addresses with its siblings' (SO_REUSEPORT)."""
    listen = config.server.listen
    ssl_context = server_context(config.server.tls_cert, config.server.tls_key) if config.server.tls else None
    proxy = Proxy(config)
    warm_up_json_reader()  # once per process, before the loop serves anyone
    proxy.max_connections, fd_limit = apply_open_file_limit(config)
    if fd_limit:
        proxy.fd_warn_at = int(fd_limit * FD_WARN_SHARE)
    await proxy.start()
    if config.state is not None:
        proxy.state = await open_state(config, proxy.gate, proxy.metrics)  # before the key store seeds the daily token counts
    managed = None
    if config.store.path or config.store.url:
        try:
            store = await asyncio.to_thread(open_store, config)  # SQLite file or PostgreSQL database
        except StoreUnavailable:
            raise  # its server is down: not a config error (the CLI exits 1, so a supervisor tries again)
        except StoreError as exc:
            raise ConfigError(f"{'store.url' if config.store.url else 'store.path'}: {exc}") from None
        managed = ManagedKeys(store, proxy.gate, retention_days=config.store.usage_retention_days,
                              metrics=proxy.metrics)
        try:
            await managed.start()
        except StoreError:  # the database went away between opening and the first read
            await asyncio.to_thread(store.close)
            raise
        proxy.set_usage_sink(managed.record)
    accepted: weakref.WeakSet[ClientProtocol] = weakref.WeakSet()

    def tracked(factory: Callable[..., ClientProtocol]) -> Callable[..., ClientProtocol]:
        def make(*args: str) -> ClientProtocol:
            protocol = factory(*args)
            accepted.add(protocol)
            return protocol
        return make

    loop = asyncio.get_running_loop()
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(_log_loop_error)
    server: asyncio.AbstractServer
    if ssl_context is not None:
        server = await TlsListener.bind(proxy, ssl_context, tracked(proxy.protocol_factory), listen.host, listen.port,
                                        reuse_port=reuse_port)
    else:
        server = await loop.create_server(
            tracked(proxy.protocol_factory), listen.host, listen.port, backlog=LISTEN_BACKLOG, reuse_address=True,
            reuse_port=reuse_port)
    sock: socket.socket = server.sockets[0]  # type: ignore[attr-defined]
    host, port = sock.getsockname()[:2]
    metrics_server = None
    metrics = config.metrics
    if metrics.enabled and metrics.listen is not None:
        metrics_server = await loop.create_server(tracked(proxy.metrics_protocol_factory), metrics.listen.host,
                                                  metrics.listen.port, reuse_address=True, reuse_port=reuse_port)
    return RunningServer(proxy, server, host, port, "https" if ssl_context else "http", ssl_context,
                         metrics_server, managed, accepted)


async def open_state(config: Config, gate: Gate, metrics: Metrics) -> LiveState:
    """The shared live state of [state] (imported only then: the redis client is an extra)."""
    assert config.state is not None
    try:
        from .state.redis_state import open_state as open_redis
    except ImportError:
        raise ConfigError("state.url: the Redis client is not installed: pip install 'fastgate[redis]'") from None
    # The gate's tables become mirrors of the shared ones (see fastgate/state/redis_state.py).
    return await open_redis(config.state, gate, metrics=metrics)


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
                on_ready: Callable[[RunningServer], None] | None = None, worker: WorkerRole | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully. SIGHUP re-reads the config via `reread`.

    With `[server] pid_file`: PidFileError before binding when it names another running fastgate; written once
    the listener is up and SIGHUP is handled (a `fastgate reload` that finds it never kills the process), removed
    on the way out.

    As one of several workers (`worker`, see fastgate.supervisor): the supervisor owns the pid file and says the
    startup and reload warnings once; the listeners share their addresses with the siblings' (SO_REUSEPORT); the
    start line goes to the supervisor; /metrics answers with the totals of every worker."""
    set_format(config.log.format)  # before the first line: every line of a run in the configured format
    pid_path = ""
    if worker is None:
        warn_if_keys_exposed(config)
        warn_if_example_keys(config)
        pid_path = config.server.pid_file
    if pid_path:
        stale = pidfile.claim(pid_path)
        if stale:
            log.warning("%s", stale)
    loop = asyncio.get_running_loop()
    # Ollama is probed while the listener comes up: the start line says whether it answered, and startup waits
    # at most the probe's short timeout for it.
    probe = loop.create_task(probe_backends(config))
    try:
        running = await start(config, reuse_port=worker is not None)
    except BaseException:
        probe.cancel()
        raise
    peers = None
    if worker is not None:
        running.worker = worker
        peers = MetricsPeers(worker, running.proxy.metrics, running.proxy.metrics_gauges)
        try:
            await peers.start()
        except BaseException:
            probe.cancel()
            await running.stop(grace=0)
            raise
        running.proxy.metrics_total = peers.render
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reread is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload, running, reread)
    if pid_path:
        try:
            pidfile.write(pid_path)
        except pidfile.PidFileError:
            probe.cancel()
            await running.stop(grace=0)
            raise
        running.pid_file = pid_path
    try:
        ollama = await probe
        for warning in probe_warnings(config, ollama):
            log.warning("%s", warning)
        store_keys = running.managed.active_keys if running.managed is not None else None
        if worker is None:
            # Where it listens, and what is in effect, is announced whatever the log level: operators and
            # scripts wait for this line.
            log.log(max(logging.INFO, log.getEffectiveLevel()), "fastgate %s listening on %s, forwarding to %s; %s",
                    __version__, running.url, forwarding_to(config),
                    in_effect(config, ollama=ollama, pid=os.getpid(), store_keys=store_keys))
        else:  # the supervisor says it once all workers serve, with its own pid (the pid file's)
            log.info("Worker %d of %d serving %s", worker.index, worker.count, running.url)
            worker.report({"ready": f"fastgate {__version__} listening on {running.url}, forwarding to "
                                    f"{forwarding_to(config)}; " + in_effect(config, ollama=ollama,
                                                                           pid=worker.parent_pid,
                                                                           store_keys=store_keys)})
        # What exists now (modules, config, compiled patterns) lives as long as the process: frozen out of the
        # garbage collector's sight, so that a full collection walks only what requests made, not the whole
        # heap (its pause is what every live stream's next token waits behind).
        gc.freeze()
        if on_ready is not None:
            on_ready(running)
        await stop.wait()
        log.info("Shutting down: no new connections; waiting up to %.0f s for requests in flight",
                 config.server.shutdown_grace)
        await running.stop()
        if peers is not None:
            await peers.stop()  # after the drain: the final counts, for the totals of the workers that remain
        log.info("Stopped")
    finally:
        if running.pid_file:
            pidfile.remove(running.pid_file)


def warn_if_example_keys(config: Config) -> None:
    """Warn (startup and every reload) about keys of config.toml.example: they are public."""
    for line in example_key_warnings(config):
        log.warning("%s", line)


_reloads: set[asyncio.Task[None]] = set()  # reloads waiting for the store (a reference keeps each task alive)


def _reload(running: RunningServer, reread: Callable[[], Config]) -> None:
    """SIGHUP. With a key store, its keys are read first and the file applied after: keys just moved from the
    file into the store (`fastgate keys import`, then [keys] removed, then a reload) never drop out until the
    next poll of the store."""
    managed = running.managed
    if managed is None:
        _apply_reload(running, reread)
        return

    async def refresh_then_apply() -> None:
        try:
            await managed.refresh()
        except StoreError as exc:
            log.error("Key store: %s", exc)
        _apply_reload(running, reread)

    task = asyncio.get_running_loop().create_task(refresh_then_apply())
    _reloads.add(task)
    task.add_done_callback(_reloads.discard)


def _apply_reload(running: RunningServer, reread: Callable[[], Config]) -> None:
    try:
        config = reread()
        if running.worker is None:  # several workers: the supervisor warns, once
            warn_if_keys_exposed(config)
            warn_if_example_keys(config)
        running.reload(config)
    except ConfigError as exc:
        log.error("Reload failed, keeping the running config: %s", exc)
        return
    log.info("Reloaded %s: %d keys, IP trust %s, log level %s", config.source or "defaults", len(config.keys),
             f"{config.auth.session_ttl} s" if config.auth.session_ttl else "off", config.log.level)


def run(config: Config, reread: Callable[[], Config] | None = None,
        on_ready: Callable[[RunningServer], None] | None = None, worker: WorkerRole | None = None) -> None:
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(config, reread=reread, on_ready=on_ready, worker=worker))
    finally:
        loop.close()
