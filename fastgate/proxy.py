"""Glue for one request: parsed head -> gate decision -> local reply or upstream exchange -> relay -> log.

Owns the order of things that must happen in order: authorisation before `100 Continue`, the request body
pumped to Ollama while its answer is awaited (Ollama may answer a blob upload before reading it), an error
answered only while nothing of the response has been sent, and the upstream connection closed at once when
the client leaves. All GateErrors become bytes in `_refuse`, nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import h11

from . import __version__, fanout
from .budget import BodyBudget
from .config import Config
from .connection import (
    CONTINUE_100, PIECES_PER_YIELD, PIPELINE_CHECK_EVERY, ClientClosed, ClientConnection, ClientProtocol,
    ClientState, header_lists,
)
from .access import filter_model_list, model_refusal
from .cors import render as render_headers, without_cors_fields
from .errors import (
    BadGateway, BadRequest, GateError, NotFound, ServiceUnavailable, UpstreamTimeout, UpstreamUnreachable,
)
from .gate import Forward, Gate, IncomingRequest, LocalReply, ProbeHealth, ReadBody, ServeMetrics, normalize_path
from .logs import FIELDS, fields_wanted, log, log_path, new_request_id, request_fields
from .messages import (
    BodyKind, ResponseHead, client_response_head, dechunk, error_response, is_openai_path, json_body,
    local_response, retarget_head,
)
from .metrics import BackendGauges, Metrics, path_label
from .routing import MAX_MOVES, MoveReason, Placement, Refusal, Router, Ticket
from .routing.health import RESTORE_AFTER_SUCCESSES
from .routing.pollers import Pollers
from .state import Admission, LiveState
from .upstream import (
    BufferSink, ClientGone, RelayOutcome, UpstreamClosed, UpstreamConnection, UpstreamPool,
)
from .usage import UsageRecord, bounded_model, reported_model, token_counts

# Methods safe to send again when a pooled connection turned out closed before any answer.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS"})
# Errors after which the rest of the client's bytes cannot be trusted to be a next request.
CLOSE_AFTER = frozenset({400, 408, 413, 431, 501})
HEALTH_TIMEOUT_S = 5.0
HEALTH_PROBE_INTERVAL_S = 1.0
OFFLOAD_READ_BYTES = 256 * 1024
STREAM_READER_LIMIT = 512 * 1024
PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"
LAST_CHUNK = b"0\r\n\r\n"
# Connections refused over a cap get their 503 and a lingering close (so a reset does not destroy the 503) only
# while fewer than this many sockets linger so; a flood beyond it is closed at once after the 503, because a
# lingering socket holds a file descriptor for up to LINGER_S.
REFUSALS_LINGERING_MAX = 64
# Pipelined requests answered in a row without the loop being given to other connections: a read of 256 KiB
# can hold thousands of tiny requests.
PIPELINED_PER_YIELD = 64
FD_WARN_INTERVAL_S = 10.0  # at most one "running out of file descriptors" line this often
# Retry-After (seconds) of a 503 for a full or timed-out wait for a backend slot: slots free as streams end.
QUEUE_RETRY_AFTER_S = 1
# Ollama's 503 when its own queue is full (server/sched.go ErrMaxQueue): it started no work (rule 4).
SERVER_BUSY = "server busy, please try again.  maximum pending requests exceeded"
SERVER_BUSY_MARK = b"server busy"


async def _stop(task: asyncio.Task[None] | None) -> None:
    """Cancel the body pump and wait until it has really stopped reading from the client."""
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():  # our own task is being cancelled, not just the pump
            raise


def frame_body_parts(parts: list[bytes], chunked: bool, *, last: bool) -> list[bytes]:
    """Request body pieces as they go to Ollama: re-chunked when the client sent chunks (h11 took its
    framing apart, so what Ollama sees is framing fastgate wrote), as they are otherwise."""
    if not chunked:
        return parts
    framed = []
    for part in parts:
        if part:
            framed += (b"%x\r\n" % len(part), part, b"\r\n")
    if last:
        framed.append(LAST_CHUNK)
    return framed


@dataclass(slots=True)
class RequestContext:
    """One request as the proxy carries it from decision to answer."""

    conn: ClientConnection
    req: IncomingRequest
    rid: bytes
    close_after: bool  # the client asked to close (Connection: close, HTTP/1.0)
    cors: tuple[tuple[bytes, bytes], ...]  # CORS headers for every answer, when its Origin is allowed
    # The backend the request is placed on (the router's; released when the exchange is over, however).
    placement: Placement | None = None
    backend: str | None = None  # its name in log lines, when there are several backends to tell apart

    @property
    def path(self) -> str:
        return self.req.path.decode("latin-1")

    def log_fields(self, fwd: Forward | None = None, **more: object) -> dict[str, object] | None:
        """`extra=` for one of this request's log lines: the fields the JSON format writes (request_fields);
        None when nothing reads them (text lines only)."""
        if not fields_wanted():
            return None
        if fwd is None:
            return request_fields(self.rid.decode(), self.req.method.decode("latin-1"), self.path, **more)
        return request_fields(self.rid.decode(), self.req.method.decode("latin-1"), self.path, user=fwd.user,
                              key=fwd.key_label, url=fwd.url, backend=self.backend, **more)


def _log_stream_start(ctx: RequestContext, fwd: Forward, status: int, upstream_ms: float) -> None:
    """A stream may run for minutes: say now who it is for and when it began."""
    log.info("[%s] %s (%s) -> %s: %d in %.1f ms", ctx.rid.decode(), fwd.user, fwd.key_label, fwd.url, status,
             upstream_ms,
             extra=ctx.log_fields(fwd, status=status, upstream_ms=upstream_ms) if fields_wanted() else None)


class _QueueWait:
    """Stands in for the upstream exchange (ClientProtocol.exchange) while a request waits for a backend
    slot: a client that leaves takes its ticket out of the queue at once rather than at its deadline."""

    __slots__ = ("router", "ticket", "loop")

    def __init__(self, router: Router, ticket: Ticket, loop: asyncio.AbstractEventLoop) -> None:
        self.router = router
        self.ticket = ticket
        self.loop = loop

    def pause_relay(self) -> None:
        pass  # nothing is relayed yet

    def resume_relay(self) -> None:
        pass

    def client_gone(self) -> None:
        self.router.cancel(self.ticket, self.loop.time())  # resolves the ticket: the waiter wakes up


class Proxy:
    """Shared state of one fastgate process: config, gate, router, upstream pools, live connections."""

    def __init__(self, config: Config, *, gate: Gate | None = None) -> None:
        self.config = config
        self.gate = gate or Gate(config)
        self.pool: UpstreamPool | None = None  # the first backend's (the only one's, without [[backends]])
        self.pools: dict[str, UpstreamPool] = {}  # by backend name; [upstream]'s settings apply to all
        self.router = Router(config.backends, config.routing, rng=random.Random())
        # Several backends: pollers feed the router and /health, /metrics show each backend. One: nothing
        # to choose, so no pollers (Ollama gets no requests of fastgate's own) and /health probes as before.
        self.several = len(config.backends) > 1
        self.pollers: Pollers | None = None
        self.connections: set[ClientConnection] = set()  # connections whose handler runs
        # Client sockets holding a slot (from accept to connection_lost, see ClientProtocol), in all and per
        # address: what max_connections and max_connections_per_ip bound.
        self.open_sockets = 0
        self._per_ip: dict[str, int] = {}
        # server.max_connections, or less when the open file limit cannot hold that many (server.py sets it)
        self.max_connections = config.server.max_connections
        self._refusals_lingering = 0
        self.fd_warn_at = 0  # an accepted socket with a descriptor number this high means the limit is near (0: off)
        self._fd_warned_at = float("-inf")
        self.in_flight = 0
        self.requests_total = 0
        self.closing = False
        self.started = time.monotonic()
        self.metrics = Metrics()
        self.budget = BodyBudget(config.auth.max_buffered_bytes)
        self.usage_sink: Callable[[UsageRecord], None] | None = None
        self.state: LiveState | None = None  # [state]: limits, leases, trust and lockout shared (server.py)
        # [server] workers > 1: the /metrics body summed over every worker (fastgate.worker sets it); None: ours
        self.metrics_total: Callable[[], Awaitable[bytes]] | None = None
        self._idle_event: asyncio.Event | None = None
        self._health_probe: asyncio.Task[dict[str, object]] | None = None
        self._health_result: tuple[float, dict[str, object]] = (float("-inf"), {"reachable": False})

    def reload(self, config: Config) -> list[str]:
        """Apply a new config to the running proxy; returns the settings that need a restart instead."""
        fixed = [name for name, old, new in (
            ("server.listen", self.config.server.listen, config.server.listen),
            ("server.tls_cert/tls_key (on or off)", self.config.server.tls, config.server.tls),
            ("upstream.url", self.config.upstream.url, config.upstream.url),
            ("backends", self.config.backend_tables, config.backend_tables),
            ("store.path", self.config.store.path, config.store.path),
            ("store.url", self.config.store.url, config.store.url),
            ("metrics.listen", self.config.metrics.listen, config.metrics.listen),
            ("state", self.config.state, config.state)) if old != new]
        if fixed:
            config = replace(config,
                             server=replace(config.server, listen=self.config.server.listen),
                             upstream=replace(config.upstream, url=self.config.upstream.url),
                             backend_tables=self.config.backend_tables,
                             store=self.config.store,
                             metrics=replace(config.metrics, listen=self.config.metrics.listen),
                             state=self.config.state)
        self.config = config
        self.max_connections = config.server.max_connections
        self.gate.reload(config)
        self.budget.limit = config.auth.max_buffered_bytes
        for pool in self.pools.values():
            pool.configure(config.upstream)
        self.router.settings = config.routing  # the bound and timeout of the wait apply to new requests
        if self.pollers is not None:
            self.pollers.settings = config.routing
        return fixed

    def set_usage_sink(self, sink: Callable[[UsageRecord], None] | None) -> None:
        """Where per-request usage records go (the key store's batch writer), if anywhere."""
        self.usage_sink = sink

    async def start(self) -> None:
        backends = self.config.backends
        self.pools = {backend.name: UpstreamPool(replace(self.config.upstream, url=backend.url))
                      for backend in backends}
        self.pool = self.pools[backends[0].name]
        self._idle_event = asyncio.Event()
        if self.several:
            self.pollers = Pollers(self.router, self.pools, backends, self.config.routing)
            self.pollers.start()

    def protocol_factory(self, slot_ip: str | None = None) -> ClientProtocol:
        """`slot_ip`: the connection already holds a slot for this address (see take_slot)."""
        return ClientProtocol(asyncio.StreamReader(limit=STREAM_READER_LIMIT), self._on_connection, admission=self,
                              slot_ip=slot_ip)

    def metrics_protocol_factory(self) -> ClientProtocol:
        return ClientProtocol(asyncio.StreamReader(limit=STREAM_READER_LIMIT), self._on_metrics_connection,
                              admission=self)

    def admit(self, protocol: ClientProtocol) -> bool:
        """At accept (connection_made of a plain TCP connection): whether it may take a connection slot."""
        if self.fd_warn_at:
            sock = protocol.transport.get_extra_info("socket") if protocol.transport is not None else None
            if sock is not None:
                self.check_descriptor(sock.fileno())
        return self.take_slot(protocol.peer_ip)

    def take_slot(self, ip: str) -> bool:
        """Count one more open client socket from `ip`, unless that is over a cap (or fastgate is stopping).
        Each slot taken is given back by `release_slot` once that socket is closed."""
        per_ip = self.config.server.max_connections_per_ip
        if (self.closing or ip == "unknown" or self.open_sockets >= self.max_connections
                or (per_ip and self._per_ip.get(ip, 0) >= per_ip)):
            return False
        self.open_sockets += 1
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return True

    def release_slot(self, ip: str) -> None:
        self.open_sockets -= 1
        left = self._per_ip.pop(ip, 1) - 1
        if left:
            self._per_ip[ip] = left

    def check_descriptor(self, fd: int) -> None:
        """A newly accepted socket's descriptor number: near the open file limit, say so, loudly."""
        # Descriptors are handed out lowest first, so a socket numbered N means N others are open. Past the
        # limit upstream connects fail (502) and uvloop drops new connections without telling anyone.
        if not self.fd_warn_at or fd < self.fd_warn_at:
            return
        now = time.monotonic()
        if now - self._fd_warned_at >= FD_WARN_INTERVAL_S:
            self._fd_warned_at = now
            log.error("Running out of file descriptors: a new client socket got descriptor %d, near the open file "
                      "limit; connected clients will get 502 and new ones will be dropped past it (open client "
                      "sockets: %d, max_connections: %d)", fd, self.open_sockets, self.max_connections)

    def release(self, protocol: ClientProtocol) -> None:
        """The socket of a counted connection is gone: its slot is free."""
        self.release_slot(protocol.peer_ip)

    async def _on_metrics_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._on_connection(reader, writer, metrics_only=True)

    # -- connections -------------------------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                             metrics_only: bool = False) -> None:
        protocol: ClientProtocol = writer.transport.get_protocol()  # type: ignore[assignment]
        server = self.config.server
        conn = ClientConnection(reader, writer, protocol, max_header_bytes=server.max_header_bytes,
                                header_timeout=server.header_timeout, keepalive_timeout=server.keepalive_timeout,
                                body_timeout=server.body_timeout)
        conn.metrics_only = metrics_only
        if not protocol.admitted:
            await self._refuse_connection(conn)
            return
        self.connections.add(conn)
        try:
            while not self.closing:
                try:
                    request = await conn.next_request()
                except GateError as err:
                    rid = new_request_id()
                    log.info("[%s] Refused unreadable request from %s: %d %s", rid.decode(), conn.peer_ip,
                             err.status, err.message,
                             extra={FIELDS: {"request_id": rid.decode(), "status": err.status,
                                             "client": conn.peer_ip}})
                    conn.write(error_response(err, path=b"/", request_id=rid, close=True))
                    conn.linger = True
                    break
                if request is None:
                    break
                if not await self.handle(conn, request):
                    break
                # The next request is parsed only once the client takes our answers (see flush).
                if ((protocol.writing_paused or conn.requests % PIPELINE_CHECK_EVERY == 0)
                        and not await conn.flush()):
                    log.info("Closed a connection from %s: it took none of its answers for %.0f s", conn.peer_ip,
                             min(conn.keepalive_timeout, conn.send_timeout))
                    break
                if conn.requests % PIPELINED_PER_YIELD == 0:
                    await asyncio.sleep(0)
        except Exception:  # a bug must cost one connection, never the process
            log.exception("unexpected error on a connection from %s", conn.peer_ip)
            conn.abort()
        finally:
            protocol.exchange = None
            try:
                if conn.linger:
                    await conn.linger_close()
            except Exception:  # noqa: BLE001 - whatever happens, the connection below must be let go
                log.exception("error while closing a connection from %s", conn.peer_ip)
            conn.close()
            self.connections.discard(conn)
            if not self.connections and self._idle_event is not None:
                self._idle_event.set()

    async def _refuse_connection(self, conn: ClientConnection) -> None:
        """A connection over a cap (or during shutdown): 503, then a lingering close while few others linger."""
        if conn.peer_ip == "unknown":  # reset before we could even see who it was: nothing to serve
            conn.abort()
            return
        conn.write(error_response(ServiceUnavailable("too many connections"), path=b"/", request_id=b"", close=True))
        if self._refusals_lingering >= REFUSALS_LINGERING_MAX:
            conn.close()
            return
        self._refusals_lingering += 1
        try:
            await conn.linger_close()
        finally:
            self._refusals_lingering -= 1

    # -- one request -------------------------------------------------------------------------------------

    async def handle(self, conn: ClientConnection, request: h11.Request) -> bool:
        """Answer one request. Returns whether the connection may carry another."""
        rid = new_request_id()
        self.requests_total += 1
        if self.config.log.request_start:
            rid_text, method = rid.decode(), request.method.decode("latin-1")
            log.info("[%s] Processing request: %s %s", rid_text, method, log_path(request.target),
                     extra=request_fields(rid_text, method, request.target.partition(b"?")[0].decode("latin-1"))
                     if fields_wanted() else None)
        headers, raw_headers = header_lists(request)
        content_length: int | None = None
        chunked = False
        close_after = request.http_version != b"1.1"
        for name, value in headers:
            if name == b"content-length":
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close_after = True
        req = IncomingRequest(request.method, request.target, headers, raw_headers, request.http_version,
                              conn.peer_ip, conn.tls, content_length, chunked)
        ctx = RequestContext(conn, req, rid, close_after, self.gate.cors_headers(req))
        if conn.metrics_only:
            return await self._metrics_listener(ctx)
        try:
            if chunked and content_length is not None:
                # RFC 9112 section 6.1: a smuggling attempt more often than not; refuse and close.
                raise BadRequest("both Content-Length and Transfer-Encoding")
            decision = self.gate.decide(req, rid)
            if isinstance(decision, ReadBody):
                if conn.waiting_for_100_continue:
                    conn.write(CONTINUE_100)  # the key may be in the body: authorisation needs it
                raw = await conn.read_body(decision.limit, self.budget,
                                           deadline=conn.identify_deadline if decision.for_key else None)
                body = self.gate.buffered_body(req, raw)
                if len(raw) >= OFFLOAD_READ_BYTES:
                    # Reading a big JSON body is linear but not free (tens of ms per MiB of small tokens): do
                    # it on a worker thread so other connections are served meanwhile.
                    await conn.loop.run_in_executor(None, body.read_all)
                decision = self.gate.decide_with_body(req, body, rid)
                del raw, body
        except GateError as err:
            conn.release_budget()
            if self.state is not None and err.status == 401 and err.detail:  # a wrong key: counted by all
                err = await self.state.failed_guess(self.gate.client_ip(req), err)
            return await self._refuse(ctx, err)
        except ClientClosed:
            conn.release_budget()
            return False

        try:
            if isinstance(decision, Forward):
                return await self._forward(ctx, decision)
            if isinstance(decision, ProbeHealth):
                decision = await self._health(decision)
            elif isinstance(decision, ServeMetrics):
                decision = await self._metrics_answer(decision.head_only)
            return await self._reply(ctx, decision)
        finally:
            # The buffered body lives as long as the decision that carries it (until the exchange ends).
            conn.release_budget()

    async def _reply(self, ctx: RequestContext, reply: LocalReply) -> bool:
        conn = ctx.conn
        close = ctx.close_after or self.closing or not await conn.drain_small_body(ctx.req.content_length)
        conn.write(local_response(reply.status, reply.body, request_id=ctx.rid, close=close,
                                  head_only=reply.head_only, content_type=reply.content_type,
                                  extra_headers=reply.headers if reply.cors_included else reply.headers + ctx.cors))
        self.metrics.request("-", ctx.path, reply.status)
        log.info("[%s] Answered %d%s", ctx.rid.decode(), reply.status, f": {reply.note}" if reply.note else "",
                 extra=ctx.log_fields(status=reply.status))
        return not close

    async def _refuse(self, ctx: RequestContext, err: GateError, *, force_close: bool = False,
                      fwd: Forward | None = None) -> bool:
        """Answer `err`. `fwd`: the request had been let through to Ollama (whose failure this is)."""
        conn = ctx.conn
        # Whose request it was, once known: the forwarded request's key, or the one the gate recognised
        # before refusing (role, model, limit). Unknown (no key, a wrong one): "-" in metrics, absent in JSON.
        user = fwd.user if fwd is not None else err.user
        log.info("[%s] Refused %d: %s%s", ctx.rid.decode(), err.status, err.message,
                 f" ({err.detail})" if err.detail else "",
                 extra=ctx.log_fields(fwd, status=err.status) if fwd is not None else
                 ctx.log_fields(user=user or None, key=err.key_label or None, status=err.status))
        self.metrics.request(user or "-", ctx.path, err.status)
        if fwd is not None and ctx.placement is not None and self.several:  # the backend failed it (502, 504)
            self.metrics.backend_request(ctx.placement.backend, err.status)
        if err.status in (401, 429) and not err.message.startswith(("rate limit", "daily", "this key")):
            self.metrics.auth_failure("rate_limited" if err.status == 429 else
                                      "invalid_key" if err.detail else "missing_key")
        close = force_close or ctx.close_after or self.closing or err.status in CLOSE_AFTER
        if not close:
            close = not await conn.drain_small_body(ctx.req.content_length)
        conn.write(error_response(err, path=ctx.req.path, request_id=ctx.rid, close=close,
                                  head_only=ctx.req.method == b"HEAD", extra_headers=ctx.cors))
        if close and not conn.body_complete:
            conn.linger = True
        return not close

    # -- forwarding --------------------------------------------------------------------------------------

    async def _forward(self, ctx: RequestContext, fwd: Forward) -> bool:
        admission = overlapped = None
        if self.state is not None and fwd.principal.limited:
            # With [state] the key's limits are counted here, in the shared state, not by the gate. The
            # admission goes to Redis now; with one backend _exchange places the request and takes a pooled
            # connection while Redis answers (tens of us on loopback), and awaits the answer before anything
            # reaches Ollama or the client. With several, a placement leaves traces (warm hints) that a
            # refused request must not: the answer comes first.
            admission = self.state.begin_admit(fwd.principal)
            if self.several or fwd.fan_out is not None:
                refused = await self._admission_refused(fwd, admission)
                if refused is not None:
                    return await self._refuse(ctx, refused)
            else:
                overlapped = admission
        self.in_flight += 1
        try:
            if fwd.fan_out is not None:  # several backends asked at once (issue 9 rules 6 and 7)
                return await fanout.serve(self, ctx, fwd)
            return await self._exchange(ctx, fwd, overlapped)
        finally:
            if ctx.placement is not None:  # its slot goes to the next waiter (a no-op if moved or released)
                self.router.release(ctx.placement, ctx.conn.loop.time())
            self.in_flight -= 1
            self.gate.finished(fwd)
            if admission is not None:
                admission.end()

    async def _admission_refused(self, fwd: Forward, admission: Admission, *, ticket: Ticket | None = None,
                                 upstream: UpstreamConnection | None = None) -> GateError | None:
        """The shared limits' answer to `admission`: None when admitted, else the 429 to answer (the request's
        own, as the gate's would be). What was taken meanwhile goes back unless admitted: `ticket`'s place in
        the router's queue, `upstream` (a pooled connection) to its pool."""
        try:
            await admission
        except BaseException as exc:
            if ticket is not None:
                self.router.cancel(ticket, asyncio.get_running_loop().time())
            if upstream is not None:
                upstream.pool.release(upstream)
            if not isinstance(exc, GateError):
                raise
            exc.user, exc.key_label = fwd.user, fwd.key_label
            return exc
        return None

    # -- routing (issue 9): the router decides, this layer awaits and does -----------------------------------

    async def _place(self, ctx: RequestContext, fwd: Forward, outcome: Placement | Ticket | Refusal) -> None:
        """Put the request on a backend (`ctx.placement`) from the router's `outcome`, waiting for a slot if
        need be. Raises GateError."""
        ctx.placement = outcome if isinstance(outcome, Placement) else await self._settle(ctx, outcome, fwd)
        if self.several:
            ctx.backend = ctx.placement.backend

    async def _settle(self, ctx: RequestContext, outcome: Placement | Ticket | Refusal, fwd: Forward,
                      failure: GateError | None = None) -> Placement:
        """A router answer as a Placement: a Ticket awaited, a Refusal raised as the GateError answering it
        (`failure`: the error a refused move answers with), ClientGone when the client left while waiting."""
        if isinstance(outcome, Ticket):
            outcome = await self._wait(ctx, outcome)
        if outcome is Refusal.CANCELLED:
            raise ClientGone()
        if isinstance(outcome, Refusal):
            raise self._refusal_error(outcome, fwd, failure)
        return outcome

    async def _wait(self, ctx: RequestContext, ticket: Ticket) -> Placement | Refusal:
        """Wait in the router's queue until it gives the ticket a slot or refuses it (full wait, gone)."""
        loop = asyncio.get_running_loop()
        router = self.router
        future: asyncio.Future[Placement | Refusal] = loop.create_future()
        protocol = ctx.conn.protocol

        def resolved(done: Ticket) -> None:
            # Runs inside the router call that resolved it: record only, never call back into the router.
            if not future.done():
                future.set_result(done.outcome)  # type: ignore[arg-type]

        ticket.add_done_callback(resolved)
        timer = loop.call_at(ticket.deadline, lambda: router.expire(loop.time()))
        waiting = _QueueWait(router, ticket, loop)
        if protocol.gone:
            waiting.client_gone()
        else:
            protocol.exchange = waiting  # a client that leaves gives up its place at once
        try:
            return await future
        except asyncio.CancelledError:
            router.cancel(ticket, loop.time())  # leave the queue, or give back the slot just granted
            raise
        finally:
            timer.cancel()
            if protocol.exchange is waiting:
                protocol.exchange = None

    def _refusal_error(self, refusal: Refusal, fwd: Forward, failure: GateError | None) -> GateError:
        if refusal is Refusal.NOT_FOUND:
            # Ollama's own answer for a model it does not have, so clients react as they would to Ollama.
            return NotFound(f'model "{fwd.model}" not found, try pulling it first')
        if refusal is Refusal.UNKNOWN_BACKEND:
            return BadRequest(f"X-Fastgate-Backend: no backend is named {fwd.pin!r} "
                              f"(backends: {', '.join(self.router.backend_names())})")
        if refusal is Refusal.UNAVAILABLE:
            # An ejected backend is back after RESTORE_AFTER_SUCCESSES probes at the earliest.
            wait = max(1, math.ceil(self.config.routing.health_interval * RESTORE_AFTER_SUCCESSES))
            return ServiceUnavailable("no healthy backend has this model; try again shortly",
                                      headers=((b"Retry-After", str(wait).encode()),))
        if refusal is Refusal.QUEUE_FULL:
            return ServiceUnavailable("every backend is busy and too many requests wait; try again shortly",
                                      headers=((b"Retry-After", str(QUEUE_RETRY_AFTER_S).encode()),))
        if refusal is Refusal.TIMED_OUT:
            return ServiceUnavailable("timed out waiting for a free backend; try again shortly",
                                      headers=((b"Retry-After", str(QUEUE_RETRY_AFTER_S).encode()),))
        if refusal is Refusal.NO_MOVE and failure is not None:
            return failure
        return BadGateway()

    async def _acquire(self, ctx: RequestContext, fwd: Forward) -> tuple[UpstreamConnection, bool]:
        """A connection to the placed backend. One that cannot be reached before any request byte was
        written costs that backend its health and moves the request on (rule 4: at most MAX_MOVES)."""
        loop = ctx.conn.loop
        while True:
            placement = ctx.placement
            assert placement is not None
            pool = self.pools[placement.backend]
            conn = pool.take_idle()
            if conn is not None:
                return conn, True
            try:
                return await pool.connect(), False
            except (UpstreamUnreachable, UpstreamTimeout) as err:
                if not self.several:
                    raise  # nowhere else to go: answered as it always was
                now = loop.time()
                refused = isinstance(err, UpstreamUnreachable) and err.refused
                if self.router.record_connection_error(placement.backend, now, refused=refused) is not None:
                    log.warning("Backend %s (%s) ejected: %s", placement.backend, placement.url, err.message)
                moved = self.router.move(placement, now, reason=MoveReason.CONNECT_REFUSED if refused
                                         else MoveReason.CONNECT_FAILED)
                if moved is not Refusal.NO_MOVE:
                    log.info("[%s] Backend %s unreachable (%s): moving the request", ctx.rid.decode(),
                             placement.backend, err.message, extra=ctx.log_fields(fwd))
                ctx.placement = await self._settle(ctx, moved, fwd, err)
                ctx.backend = ctx.placement.backend

    def _server_busy(self, ctx: RequestContext, upstream: UpstreamConnection) -> bool:
        """Whether a 503 is Ollama's "server busy" for a request that may still move: read from the bytes
        already in after its head (the answer is a few dozen bytes), never by waiting for more."""
        placement = ctx.placement
        return (self.several and placement is not None and not placement.pinned
                and placement.moves < MAX_MOVES and SERVER_BUSY_MARK in upstream.early_body())

    async def _discard(self, ctx: RequestContext, upstream: UpstreamConnection, head: ResponseHead) -> None:
        """Read an answer nobody will see to its end, so that its connection can serve again."""
        try:
            outcome = await upstream.start_relay(head, BufferSink())
        finally:
            ctx.conn.protocol.exchange = None
        if outcome is RelayOutcome.COMPLETE:
            upstream.pool.release(upstream)
        else:
            upstream.abort()

    def _for_backend(self, fwd: Forward, placement: Placement) -> Forward:
        """`fwd` as it goes to the placed backend: the gate built it for the first one."""
        url = placement.url
        if url == self.config.upstream.url:
            return fwd
        target = url.base_path.encode() + fwd.target
        return replace(fwd, head=retarget_head(fwd.head, target, url.host_header.encode()),
                       url=f"{url.scheme}://{url.host_header}{target.decode('latin-1')}")

    async def _exchange(self, ctx: RequestContext, fwd: Forward, admission: Admission | None = None) -> bool:
        """`admission`: [state]'s, still to be awaited (see _forward)."""
        conn, req, rid = ctx.conn, ctx.req, ctx.rid
        loop = conn.loop
        # Durations on perf_counter, not loop.time(): uvloop's clock has millisecond resolution (and is read
        # once per loop iteration), which made every logged and measured duration a whole millisecond.
        started = time.perf_counter()
        protocol = conn.protocol
        upstream: UpstreamConnection | None = None
        body_task: asyncio.Task[None] | None = None
        try:
            # Before 100 Continue: a request refused here (no such model, every backend busy) has its body
            # never sent. A placement at once (the usual case) is taken without a coroutine.
            chosen = self.router.choose(fwd.model, fwd.user, loop.time(), needs_slot=fwd.runs_model, pin=fwd.pin)
            if isinstance(chosen, Placement):
                ctx.placement = chosen
                if self.several:
                    ctx.backend = chosen.backend
            if admission is not None and (ctx.placement is None or (fwd.body is None and req.has_body)):
                # A wait in the queue, a refusal, a body to read: only once the shared limits said yes.
                refused, admission = await self._admission_refused(
                    fwd, admission, ticket=chosen if isinstance(chosen, Ticket) else None), None
                if refused is not None:
                    return await self._refuse(ctx, refused)
            if not isinstance(chosen, Placement):
                await self._place(ctx, fwd, chosen)
        except GateError as err:
            return await self._refuse(ctx, err, fwd=fwd)
        except ClientGone:
            elapsed = time.perf_counter() - started
            log.info("[%s] Client went away while waiting for a backend (%s)", rid.decode(), fwd.user,
                     extra=ctx.log_fields(fwd, status=499, duration_ms=elapsed * 1000))
            self._account(ctx, fwd, 499, None, elapsed)
            return False
        # The request goes to Ollama in one write when its body is already here (buffered by the gate, or
        # arrived with the head); only a body still on its way needs a task to pump it.
        body = fwd.body or b""
        body_pending = False
        if fwd.body is None and req.has_body:
            if conn.waiting_for_100_continue:
                conn.write(CONTINUE_100)
                body_pending = True
            else:
                try:
                    parts, complete = conn.take_buffered_body()
                except GateError as err:
                    return await self._refuse(ctx, err, fwd=fwd)
                body = b"".join(frame_body_parts(parts, req.chunked, last=complete))
                body_pending = not complete
        sent_at = started  # when the request went to the backend that answers it
        try:
            pooled_retry = True  # one retry on a fresh connection when a pooled one was found closed
            while True:
                # A pooled connection (the usual case) is taken without a coroutine.
                upstream = self.pools[ctx.placement.backend].take_idle()  # type: ignore[union-attr]
                if admission is not None:  # nothing reaches Ollama before the shared limits said yes
                    refused, admission = await self._admission_refused(fwd, admission, upstream=upstream), None
                    if refused is not None:
                        return await self._refuse(ctx, refused)
                    if upstream is not None and upstream.transport.is_closing():  # type: ignore[union-attr]
                        upstream = None  # Ollama closed it while Redis answered: its loss is being handled
                if upstream is not None:
                    reused = True
                else:
                    upstream, reused = await self._acquire(ctx, fwd)
                if protocol.gone:
                    upstream.pool.release(upstream)
                    return False
                assert ctx.placement is not None
                fwd = self._for_backend(fwd, ctx.placement)
                protocol.exchange = upstream
                sent_at = time.perf_counter()
                upstream.send_head(fwd.head + body if body else fwd.head, fwd.upstream_method or req.method)
                if body_pending:
                    body_task = loop.create_task(self._pump_body(conn, upstream, req.chunked))
                try:
                    head = await upstream.response_head()
                except UpstreamClosed as exc:
                    # A pooled connection Ollama closed while it sat idle: nothing was processed, so an
                    # idempotent request may go again on a new connection. Anything else is a 502.
                    if (pooled_retry and reused and exc.nothing_received and not body_pending
                            and req.method in IDEMPOTENT):
                        pooled_retry = False
                        log.info("[%s] Pooled upstream connection was closed; retrying once", rid.decode(),
                                 extra=ctx.log_fields(fwd))
                        continue
                    raise
                if head.status == 503 and not body_pending and self._server_busy(ctx, upstream):
                    # Rule 4: Ollama's queue is full, so it started no work; the whole request is still at
                    # hand (never a streamed body) and nothing reached the client: try another backend.
                    await self._discard(ctx, upstream, head)
                    upstream = None
                    placement = ctx.placement
                    assert placement is not None
                    moved = self.router.move(placement, loop.time(), reason=MoveReason.BUSY)
                    if moved is not Refusal.NO_MOVE:
                        log.info("[%s] Backend %s is busy (its queue is full): moving the request",
                                 rid.decode(), placement.backend, extra=ctx.log_fields(fwd))
                    ctx.placement = await self._settle(ctx, moved, fwd, ServiceUnavailable(SERVER_BUSY))
                    ctx.backend = ctx.placement.backend
                    continue
                break
        except ClientGone:
            await _stop(body_task)
            elapsed = time.perf_counter() - started
            log.info("[%s] Client went away before the response (%s -> %s)", rid.decode(), fwd.user, fwd.url,
                     extra=ctx.log_fields(fwd, status=499, duration_ms=elapsed * 1000))
            self._account(ctx, fwd, 499, None, elapsed)
            return False
        except GateError as err:
            if upstream is not None:
                upstream.abort()
            protocol.exchange = None
            if isinstance(err, (UpstreamUnreachable, UpstreamTimeout)) or isinstance(err, UpstreamClosed):
                self.metrics.upstream_up = 0
            body_unfinished = body_task is not None and not body_task.done()
            await _stop(body_task)
            return await self._refuse(ctx, err, force_close=body_unfinished or not conn.body_complete,
                                      fwd=fwd)

        # From here on the response has begun: a failure can only end it by closing the connection.
        head_at = time.perf_counter()
        self.metrics.upstream_up = 1
        self.metrics.upstream_head.observe(head_at - started)
        if ctx.backend is not None:
            self.metrics.backend_head(ctx.backend, head_at - sent_at)
        upstream_ms = (head_at - started) * 1000
        if head.status == 404 and fwd.model is not None and self.pollers is not None and ctx.backend:
            # Most likely "model not found" where the inventory said it was: read that inventory again now.
            self.pollers.refresh_inventory(ctx.backend)
        if protocol.gone:
            # The client left between Ollama's head arriving and this task running: nothing to relay to.
            upstream.client_gone()
            await _stop(body_task)
            log.info("[%s] Client went away before the response (%s -> %s)", rid.decode(), fwd.user, fwd.url,
                     extra=ctx.log_fields(fwd, status=499, upstream_ms=upstream_ms,
                                          duration_ms=upstream_ms))
            self._account(ctx, fwd, 499, None, head_at - started)
            return False
        early_answer = body_task is not None and not body_task.done()
        if early_answer:
            # Ollama answered before reading the whole body (an existing blob): stop uploading. The client's
            # unread body makes its connection unusable for another request. The pump must be over before
            # anything else reads from the client (the lingering close does).
            await _stop(body_task)
            upstream.reusable = False
            conn.linger = True  # closing on unread bytes would reset the connection under the answer
        # A body that ends with the connection must say so to the client too.
        close = ctx.close_after or early_answer or self.closing or head.body_kind is BodyKind.UNTIL_CLOSE
        streaming = head.body_kind is not BodyKind.LENGTH and head.body_kind is not BodyKind.NONE
        if fwd.trim_listing and head.status == 200:
            if streaming:
                _log_stream_start(ctx, fwd, head.status, upstream_ms)
            outcome = await self._relay_filtered(ctx, fwd, upstream, head, close)
        else:
            if ctx.cors and self.config.upstream.forward_origin:
                # Ollama saw the Origin and may have answered CORS itself: one set of these fields, ours.
                head = replace(head, header_block=without_cors_fields(head.header_block))
            try:
                relay = upstream.start_relay(head, conn.transport, client_response_head(
                    head, request_id=rid, close=close, extra=render_headers(ctx.cors)))
                if streaming:
                    # Logged once the relay began, so that the line is not paid for on the way to the first
                    # byte (start_relay wrote whatever came with Ollama's head already).
                    _log_stream_start(ctx, fwd, head.status, upstream_ms)
                outcome = await relay
            finally:
                protocol.exchange = None
        elapsed = time.perf_counter() - started
        self.metrics.request_duration.observe(elapsed)
        self._account(ctx, fwd, head.status, upstream, elapsed)
        if outcome is RelayOutcome.COMPLETE:
            upstream.pool.release(upstream)
            # Asked first: building the keywords for log_fields cost more than the question (text lines).
            fields = ctx.log_fields(fwd, status=head.status, upstream_ms=upstream_ms, bytes=upstream.body_bytes,
                                    duration_ms=elapsed * 1000) if fields_wanted() else None
            if streaming:
                log.info("[%s] Completed %d: %d bytes in %.3f s", rid.decode(), head.status, upstream.body_bytes,
                         elapsed, extra=fields)
            else:
                log.info("[%s] %s (%s) -> %s: %d in %.1f ms, %d bytes", rid.decode(), fwd.user, fwd.key_label,
                         fwd.url, head.status, elapsed * 1000, upstream.body_bytes, extra=fields)
            if not close and protocol.gone:
                return False
            return not close
        if not streaming:
            log.info("[%s] %s (%s) -> %s: %d in %.1f ms", rid.decode(), fwd.user, fwd.key_label, fwd.url,
                     head.status, upstream_ms,
                     extra=ctx.log_fields(fwd, status=head.status, upstream_ms=upstream_ms))
        log.info("[%s] Response %s after %d bytes in %.3f s", rid.decode(),
                 "ended (close-delimited)" if outcome is RelayOutcome.COMPLETE_CLOSE else f"cut off: {outcome.value}",
                 upstream.body_bytes, elapsed,
                 extra=ctx.log_fields(fwd, status=head.status, upstream_ms=upstream_ms,
                                      bytes=upstream.body_bytes, duration_ms=elapsed * 1000,
                                      outcome=outcome.value))
        if outcome is RelayOutcome.CLIENT_GONE:
            conn.abort()
        else:
            conn.close()  # flushes what was relayed, then FIN: the client sees the response end early
        return False

    async def _relay_filtered(self, ctx: RequestContext, fwd: Forward, upstream: UpstreamConnection,
                              head: ResponseHead, close: bool) -> RelayOutcome:
        """A model listing for a key limited to some models: read it whole (it is small), trim it, answer it
        with a Content-Length. The one response fastgate rewrites instead of relaying."""
        sink = BufferSink()
        try:
            outcome = await upstream.start_relay(head, sink)
        finally:
            ctx.conn.protocol.exchange = None
        if outcome is not RelayOutcome.COMPLETE:
            ctx.conn.close()
            return outcome
        body = dechunk(bytes(sink.data)) if head.body_kind is BodyKind.CHUNKED else bytes(sink.data)
        principal, allow_cloud = fwd.principal, self.config.auth.allow_cloud
        normal = normalize_path(ctx.req.path)
        filtered = filter_model_list(normal, body, lambda name: model_refusal(principal, name, allow_cloud) is None)
        if filtered is None:  # not a listing we know how to trim: show none of it
            filtered = b'{"object":"list","data":[]}' if normal == b"/v1/models" else b'{"models":[]}'
        # A HEAD was asked of Ollama as GET (see Gate._forward) so that this head carries the trimmed length.
        ctx.conn.write(local_response(200, filtered, request_id=ctx.rid, close=close, extra_headers=ctx.cors,
                                      head_only=ctx.req.method == b"HEAD"))
        return outcome

    def _account(self, ctx: RequestContext, fwd: Forward, status: int, upstream: UpstreamConnection | None,
                 elapsed: float) -> None:
        """Per-request bookkeeping after the fact: metrics, the key's daily tokens, the usage record."""
        principal = fwd.principal
        raw_path = ctx.req.path  # a property that splits the target: read once
        path = raw_path.decode("latin-1")
        self.metrics.request(principal.user, path, status)
        if ctx.placement is not None and self.several:
            self.metrics.backend_request(ctx.placement.backend, status)
        tail = upstream.tail() if upstream is not None else b""
        counts = token_counts(tail, openai=is_openai_path(raw_path)) if tail else None
        if counts is None and self.usage_sink is None:
            return
        # The model the policy read from the request (as Ollama reads it), else the one Ollama's own answer
        # names; never a guess from the request's raw bytes, which a client could fill with decoys.
        model = bounded_model(fwd.model or reported_model(tail))
        if counts is not None:
            self.metrics.add_tokens(principal.user, model, counts.prompt, counts.completion)
            if principal.tokens_per_day is not None:
                self.gate.limits.add_tokens(principal.key_id, counts.total, self.gate.wall_clock())
        if self.usage_sink is not None:
            self.usage_sink(UsageRecord(
                at=self.gate.wall_clock(), user=principal.user, key_id=principal.key_id, model=model,
                path=path_label(path), status=status, prompt_tokens=counts.prompt if counts else 0,
                completion_tokens=counts.completion if counts else 0, duration_ms=round(elapsed * 1000, 3),
                backend=ctx.placement.backend if ctx.placement is not None else ctx.backend or ""))

    async def _pump_body(self, conn: ClientConnection, upstream: UpstreamConnection, chunked: bool) -> None:
        """Stream the client's request body to Ollama as it arrives, bounded by Ollama's pace."""
        pieces = 0
        try:
            async for data in conn.body_events():
                upstream.writelines(frame_body_parts([data], chunked, last=False))
                await upstream.drain()
                pieces += 1
                if pieces % PIECES_PER_YIELD == 0:
                    # drain() does not suspend while Ollama keeps up: a read full of tiny chunks would
                    # otherwise be worked through without letting other connections in.
                    await asyncio.sleep(0)
            if chunked:
                upstream.write(LAST_CHUNK)
        except ClientClosed:
            upstream.abort(ClientGone())
        except GateError as err:
            upstream.abort(err)

    # -- metrics -----------------------------------------------------------------------------------------

    def metrics_gauges(self) -> dict[str, Any]:
        """This process's gauges: the keyword arguments of Metrics.render besides the counters it holds."""
        backends: list[BackendGauges] = []
        queue_depth = None
        if self.several:
            snapshot = self.router.snapshot(asyncio.get_running_loop().time())
            backends = [BackendGauges(view.name, view.state == "up", view.in_flight, view.waiting,
                                      view.ejections) for view in snapshot.backends]
            queue_depth = snapshot.queue_depth
        return {"in_flight": self.in_flight, "connections": len(self.connections),
                "buffered_bytes": self.budget.used, "buffer_refusals": self.budget.refusals,
                "backends": backends, "queue_depth": queue_depth}

    def _metrics_reply(self, head_only: bool) -> LocalReply:
        return LocalReply(200, self.metrics.render(**self.metrics_gauges()), head_only=head_only,
                          content_type=PROMETHEUS_TEXT)

    async def _metrics_answer(self, head_only: bool) -> LocalReply:
        """One process: its own numbers. Several workers: every worker's, summed (asked at scrape time only)."""
        if self.metrics_total is None:
            return self._metrics_reply(head_only)
        return LocalReply(200, await self.metrics_total(), head_only=head_only, content_type=PROMETHEUS_TEXT)

    async def _metrics_listener(self, ctx: RequestContext) -> bool:
        """The separate metrics listener ([metrics] listen) serves /metrics to anyone who can reach it."""
        if ctx.path == "/metrics" and ctx.req.method in (b"GET", b"HEAD"):
            return await self._reply(ctx, await self._metrics_answer(ctx.req.method == b"HEAD"))
        return await self._refuse(ctx, NotFound("only /metrics is served here"))

    # -- health ------------------------------------------------------------------------------------------

    async def _health(self, probe: ProbeHealth) -> LocalReply:
        """fastgate's state and Ollama's. `/health` needs no key, so it must not be an amplifier: however many
        callers ask, Ollama is probed at most once per HEALTH_PROBE_INTERVAL_S, on a pooled connection, and
        callers in between share that answer. Only admins see versions, uptime and traffic.

        With several backends the pollers already probe each one: the answer is the router's view (200 while
        at least one backend is up), with each backend's state for admins."""
        if self.several:
            return self._backends_health(probe)
        loop = asyncio.get_running_loop()
        checked_at, upstream_info = self._health_result
        if loop.time() - checked_at >= HEALTH_PROBE_INTERVAL_S:
            if self._health_probe is None or self._health_probe.done():
                self._health_probe = loop.create_task(self._probe_upstream())
            # shield: a caller that leaves must not cancel the probe other callers wait for
            upstream_info = await asyncio.shield(self._health_probe)
        reachable = bool(upstream_info["reachable"])
        status = 200 if reachable else 503
        body: dict[str, object] = {"status": "ok" if reachable else "degraded"}
        if self.state is not None:
            body["state"] = self.state.mode  # "shared", or "degraded": Redis unreachable, local tables
        if probe.detailed:
            body["fastgate"] = {"version": __version__, "uptime_s": round(time.monotonic() - self.started, 1),
                                "connections": len(self.connections), "in_flight": self.in_flight,
                                "requests_total": self.requests_total}
            body["upstream"] = upstream_info
        return LocalReply(status, json_body(body), head_only=probe.head_only)

    def _backends_health(self, probe: ProbeHealth) -> LocalReply:
        snapshot = self.router.snapshot(asyncio.get_running_loop().time())
        healthy = snapshot.healthy > 0
        body: dict[str, object] = {"status": "ok" if healthy else "degraded"}
        if self.state is not None:
            body["state"] = self.state.mode
        if probe.detailed:
            body["fastgate"] = {"version": __version__, "uptime_s": round(time.monotonic() - self.started, 1),
                                "connections": len(self.connections), "in_flight": self.in_flight,
                                "requests_total": self.requests_total}
            body["queue_depth"] = snapshot.queue_depth
            body["backends"] = [
                {"name": view.name, "url": view.url, "state": view.state, "models": view.models,
                 "loaded": list(view.loaded), "in_flight": view.in_flight, "slots_busy": view.slots_busy,
                 "max_parallel": view.max_parallel, "queue_depth": view.waiting, "ejections": view.ejections,
                 "ejected_for_s": round(view.ejected_for_s, 1)}
                for view in snapshot.backends]
        return LocalReply(200 if healthy else 503, json_body(body), head_only=probe.head_only)

    async def _probe_upstream(self) -> dict[str, object]:
        """One `GET /api/version` to Ollama on a pooled connection; the result is kept for the next callers."""
        assert self.pool is not None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()  # latency_ms: perf_counter, not uvloop's millisecond loop clock
        info: dict[str, object] = {"reachable": False}
        conn: UpstreamConnection | None = None
        try:
            conn, _ = await self.pool.acquire()
            url = self.config.upstream.url
            conn.send_head(b"GET %s/api/version HTTP/1.1\r\nHost: %s\r\nUser-Agent: fastgate/%s\r\n\r\n"
                           % (url.base_path.encode(), url.host_header.encode(), __version__.encode()), b"GET")
            head = await asyncio.wait_for(conn.response_head(), HEALTH_TIMEOUT_S)
            sink = BufferSink()
            outcome = await asyncio.wait_for(conn.start_relay(head, sink), HEALTH_TIMEOUT_S)
            info = {"reachable": True, "status": head.status}
            try:
                info["version"] = json.loads(bytes(sink.data)).get("version")
            except (ValueError, AttributeError):
                info["version"] = None
            if outcome is RelayOutcome.COMPLETE:
                self.pool.release(conn)
                conn = None
        except (GateError, asyncio.TimeoutError) as exc:
            info["error"] = exc.message if isinstance(exc, GateError) else "timed out"
        finally:
            if conn is not None:
                conn.close()
        info["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        self.metrics.upstream_up = 1 if info["reachable"] else 0
        self._health_result = (loop.time(), info)
        return info

    # -- shutdown ----------------------------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """Stop taking requests, let in-flight ones finish for `grace` seconds, then cut the rest."""
        self.closing = True
        if self._health_probe is not None:
            self._health_probe.cancel()
        if self.pollers is not None:
            await self.pollers.stop()
        for conn in list(self.connections):
            if conn.state is ClientState.IDLE:
                conn.close()
        if self.connections and self._idle_event is not None:
            self._idle_event.clear()
            try:
                await asyncio.wait_for(self._idle_event.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("Shutdown grace period over; cutting %d connection(s)", len(self.connections))
        # Requests still waiting for a backend slot are refused now (503) rather than at their deadline.
        self.router.expire(math.inf)
        for conn in list(self.connections):
            conn.abort()
        for pool in self.pools.values():
            pool.close()
