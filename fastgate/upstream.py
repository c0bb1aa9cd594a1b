"""The Ollama side: a pool of keep-alive connections and the per-chunk response relay.

Each `UpstreamConnection` is an asyncio Protocol rather than a stream: once a response head is parsed, every
`data_received` call writes the bytes straight into the client's transport and advances a framing tracker
(only chunk-size lines are read). That keeps the per-token path to one read, one write and no task
switch; with streams each chunk would cost a future, a task wake-up and a buffer copy. Backpressure goes
the other way through `pause_relay`/`resume_relay`, which the client protocol calls when its write buffer
fills or drains, so a slow client stops reads from Ollama instead of growing memory.

Invariants: a connection is in the pool only while idle and open; a connection whose client went away, whose
response did not end cleanly, or that sent bytes past the end of a response, is closed, never reused.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import re
import select
import socket
from collections import deque
from typing import Protocol

from .config import UpstreamConfig
from .errors import BadGateway, GateError, UpstreamTimeout, UpstreamUnreachable
from .logs import log
from .usage import TAIL_BYTES
from .messages import (
    MAX_RESPONSE_HEAD_BYTES, BodyKind, ChunkedFraming, FramingError, LengthFraming, ResponseHead, UntilCloseFraming,
    find_head_end, framing_for, parse_response_head,
)

EARLY_BODY_PAUSE_BYTES = 256 * 1024
# Usage is read from the response's last TAIL_BYTES, kept as references to the reads that hold them: Ollama's
# closing object (with its token counts), an SSE usage event and the terminators can arrive in any number of
# reads. Reads are let go of once a newer 2 * TAIL_BYTES are in, so the per-read cost stays a compare.
TAIL_KEEP_BYTES = 2 * TAIL_BYTES
# Chunk framing between two chunks' data ("\r\n" ending one, the next size line): removed from a chunked
# tail so that an object Ollama's answer split across chunks reads as one. JSON text holds no raw CR or LF.
_CHUNK_SEAM = re.compile(rb"\r\n[0-9A-Fa-f]{1,16}(?:;[^\r\n]*)?\r\n")
# An idle keep-alive connection is readable only when Ollama closed it (FIN or RST waiting) or talks out of turn.
_POLL_READABLE = select.POLLIN | select.POLLPRI | getattr(select, "POLLRDHUP", 0)


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...


class RelayOutcome(enum.Enum):
    COMPLETE = "complete"  # the whole response reached the client
    COMPLETE_CLOSE = "complete, close-delimited"  # complete, and the client connection must close too
    UPSTREAM_CLOSED = "upstream closed mid-response"
    UPSTREAM_TIMEOUT = "upstream idle timeout"
    CLIENT_GONE = "client went away"
    FRAMING_ERROR = "upstream sent broken framing"


class ConnState(enum.Enum):
    IDLE = "idle"
    AWAITING_HEAD = "awaiting-head"
    HEAD_READY = "head-ready"
    RELAYING = "relaying"
    CLOSED = "closed"


class UpstreamClosed(BadGateway):
    """The connection closed before a complete response head arrived."""

    def __init__(self, *, nothing_received: bool) -> None:
        super().__init__("upstream closed the connection")
        self.nothing_received = nothing_received


class ClientGone(Exception):
    """The client disconnected while its request was with Ollama."""


Framing = LengthFraming | ChunkedFraming | UntilCloseFraming


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.state = ConnState.IDLE
        self.requests = 0
        self.idle_since = 0.0
        self.reusable = True
        self._method = b"GET"
        self._head_buf = bytearray()
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._early: list[bytes] = []
        self._at_chunk_boundary = False
        self._tail: deque[bytes] = deque()
        self._tail_start = 0  # body offset of the first read in _tail
        self._tail_chunked = False
        self._sink: Sink | None = None
        self._framing: Framing | None = None
        self._done: asyncio.Future[RelayOutcome] | None = None
        self.body_bytes = 0
        self._progress = 0
        # Request bytes handed to the transport (upload progress): counted where the request body is written,
        # so a multi-GB blob upload Ollama receives in silence is not taken for a stalled Ollama.
        self._sent = 0
        self._tail.clear()
        self._seen_progress = -1
        self._stalled_ticks = 0
        self._paused_by_client = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._fd = -1
        self._poller: select.poll | None = None

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.state.value} requests={self.requests}>"

    def peer_closed(self) -> bool:
        """Whether the kernel already holds Ollama's close (or stray bytes) for this idle connection. The event
        loop learns of a close only at its next turn: a request written before that is lost with the
        connection and, its bytes being out, may not move to another backend (issue 9 rule 4). One poll(2)."""
        if self._fd < 0:
            return False
        poller = self._poller
        if poller is None:  # made once per connection: it is asked before every reuse
            poller = self._poller = select.poll()
            poller.register(self._fd, _POLL_READABLE)
        return bool(poller.poll(0))

    @property
    def pool(self) -> UpstreamPool:
        """The pool (so the backend) this connection belongs to: it goes back there after an exchange."""
        return self._pool

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
            try:
                self._fd = sock.fileno()
            except (OSError, AttributeError):
                pass

    def data_received(self, data: bytes) -> None:
        # The per-chunk relay path: keep it to a write, a counter and the framing tracker.
        sink = self._sink
        if sink is not None:
            end = -1
            one_chunk = False
            if self._at_chunk_boundary:
                # What Ollama writes per token is one whole chunk per read: its size line, then exactly that
                # much data and CRLF. Checking that is a find, an int and a compare; anything else (a partial
                # chunk, several, the last one, an odd size line) takes the general tracker below.
                i = data.find(b"\r\n", 0, 18)
                if i > 0:
                    try:
                        size = int(data[:i], 16)
                    except ValueError:
                        size = 0
                    one_chunk = size > 0 and i + size + 4 == len(data)
            if not one_chunk:
                framing = self._framing
                try:
                    end = framing.feed(data)  # type: ignore[union-attr]
                except FramingError:
                    self._terminate(BadGateway("broken framing from upstream"), RelayOutcome.FRAMING_ERROR)
                    return
                if end >= 0 and end != len(data):
                    # Bytes beyond the response: they must not reach the client, where they would pass for
                    # the answer to its next request, and this connection is never trusted again.
                    data = data[:end]
                    self.reusable = False
                self._at_chunk_boundary = end < 0 and framing.at_boundary  # type: ignore[union-attr]
            try:
                sink.write(data)
            except RuntimeError:  # uvloop: the client's transport closed before connection_lost reached us
                self.client_gone()
                return
            self._tail.append(data)  # a reference, not a copy: usage is read from it after the end
            self.body_bytes += len(data)
            if self.body_bytes - self._tail_start > TAIL_KEEP_BYTES:
                self._trim_tail()
            if end >= 0:
                self._finish(RelayOutcome.COMPLETE)
            return
        self._progress += 1
        self._head_data(data)

    def eof_received(self) -> bool:
        return False  # Ollama never half-closes; let the transport close and report connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        until_close = isinstance(self._framing, UntilCloseFraming)
        self._terminate(UpstreamClosed(nothing_received=not self._head_buf and self._progress == 0),
                        RelayOutcome.COMPLETE_CLOSE if until_close else RelayOutcome.UPSTREAM_CLOSED)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamClosed(nothing_received=False))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- request side ---------------------------------------------------------------------------------------

    def send_head(self, head: bytes, method: bytes) -> None:
        """Start an exchange: write the request head, expect a response head."""
        self.state = ConnState.AWAITING_HEAD
        self.requests += 1
        self._method = method
        self._head_waiter = self._loop.create_future()
        self.body_bytes = 0
        self._progress = 0
        self._tail.clear()
        self._tail_start = 0
        self._tail_chunked = False
        self.transport.write(head)  # type: ignore[union-attr]
        self._sent += len(head)  # may carry a whole body already received: its draining is progress too
        self._start_timer()

    def write(self, data: bytes) -> None:
        if self.state is not ConnState.CLOSED:
            self.transport.write(data)  # type: ignore[union-attr]
            self._sent += len(data)

    def writelines(self, parts: list[bytes]) -> None:
        if self.state is not ConnState.CLOSED:
            self.transport.writelines(parts)  # type: ignore[union-attr]
            self._sent += sum(map(len, parts))

    async def drain(self) -> None:
        """Wait while Ollama is slower than the client uploading to it."""
        if self._write_paused and self.state is not ConnState.CLOSED:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    def _trim_tail(self) -> None:
        tail = self._tail
        kept = self.body_bytes - self._tail_start
        while len(tail) > 1 and kept - len(tail[0]) >= TAIL_BYTES:
            kept -= len(tail.popleft())
        self._tail_start = self.body_bytes - kept

    def tail(self) -> bytes:
        """The last TAIL_BYTES of the response body just relayed (for usage accounting), whatever reads they
        came in; for a chunked body, with the framing between chunks taken out."""
        data = b"".join(self._tail)[-TAIL_BYTES:]
        return _CHUNK_SEAM.sub(b"", data) if self._tail_chunked else data

    def early_body(self) -> bytes:
        """The body bytes that arrived with the response head, before any relay (a copy; nothing is
        consumed): enough to tell a short error answer, such as Ollama's "server busy", without reading."""
        return b"".join(self._early)

    async def response_head(self) -> ResponseHead:
        assert self._head_waiter is not None
        return await self._head_waiter

    # -- response side -------------------------------------------------------------------------------------

    def _head_data(self, data: bytes) -> None:
        if self.state is ConnState.HEAD_READY:
            self._early.append(data)
            if sum(map(len, self._early)) > EARLY_BODY_PAUSE_BYTES:
                self.transport.pause_reading()  # type: ignore[union-attr]
            return
        if self.state is not ConnState.AWAITING_HEAD:
            # Bytes nobody asked for (an idle connection talking): the connection cannot be trusted.
            self.reusable = False
            self.transport.abort()  # type: ignore[union-attr]
            return
        # A head usually arrives whole in one read (with the start of its body): it is parsed from that read
        # as it is; only one that came in pieces is gathered in _head_buf first.
        buf = self._head_buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        start = 0
        while True:
            end = find_head_end(data, start)
            if end < 0:
                if len(data) - start > MAX_RESPONSE_HEAD_BYTES:
                    self._protocol_error(BadGateway("upstream response head too large"))
                    return
                buf += data[start:] if start else data
                return
            try:
                head = parse_response_head(data[start:end], self._method)
            except GateError as exc:
                self._protocol_error(exc)
                return
            start = end
            if head.informational:
                if head.status == 101:
                    self._protocol_error(BadGateway("upstream switched protocols"))
                    return
                continue  # 100 Continue and friends: not for the client, it got ours
            break
        if start < len(data):
            self._early.append(data[start:])
        if not head.keep_alive:
            self.reusable = False
        self.state = ConnState.HEAD_READY
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(head)

    def start_relay(self, head: ResponseHead, sink: Sink, prefix: bytes = b"") -> asyncio.Future[RelayOutcome]:
        """Relay the body that follows `head` into `sink`, byte for byte, after `prefix` (the client's
        response head). The future tells how it ended."""
        self._done = done = self._loop.create_future()
        early, self._early = self._early, []
        already_closed = self.state is ConnState.CLOSED
        framing = framing_for(head)
        if framing is None:
            if prefix and not self._write_or_give_up(sink, prefix):
                return done
            if early:
                self.reusable = False
            self._finish(RelayOutcome.COMPLETE)
            return done
        if (len(early) == 1 and not already_closed and head.body_kind is BodyKind.LENGTH
                and len(early[0]) == head.content_length):
            # A small answer that came whole with its head (nearly every one that is not a stream): one write
            # with the client's head, without a framing tracker or a prefixing sink; the same end as below.
            data = early[0]
            if not self._write_or_give_up(sink, prefix + data if prefix else data):
                return done
            self._tail.append(data)
            self.body_bytes = len(data)
            if len(data) > EARLY_BODY_PAUSE_BYTES:
                self.transport.resume_reading()  # type: ignore[union-attr]  # _head_data paused it
            self._finish(RelayOutcome.COMPLETE)
            return done
        self._framing = framing
        self._sink = sink
        self._at_chunk_boundary = self._tail_chunked = isinstance(framing, ChunkedFraming)
        if prefix:
            if early:
                # The client's response head goes out with the first body bytes when those are already here
                # (a small answer arrives whole): one write, one wake-up of the client instead of two.
                self._sink = _PrefixedSink(sink, prefix)
            elif not self._write_or_give_up(sink, prefix):
                return done
        if not already_closed:
            self.state = ConnState.RELAYING
            if early:
                self.transport.resume_reading()  # type: ignore[union-attr]
        for chunk in early:
            self.data_received(chunk)
            if self._sink is None:
                break
            self._sink = sink
        if already_closed and not done.done():
            # Ollama closed before the relay began: what it sent is all there is.
            until_close = isinstance(framing, UntilCloseFraming)
            self._finish(RelayOutcome.COMPLETE_CLOSE if until_close else RelayOutcome.UPSTREAM_CLOSED)
        return done

    def _write_or_give_up(self, sink: Sink, data: bytes) -> bool:
        """Write `data` before the relay proper; False (the relay over, as CLIENT_GONE) when the client is gone."""
        try:
            sink.write(data)
        except RuntimeError:
            self.client_gone()
            self._finish(RelayOutcome.CLIENT_GONE)
            return False
        return True

    def _finish(self, outcome: RelayOutcome) -> None:
        """The relay is over: settle its future. The connection goes back to IDLE only on COMPLETE."""
        self._sink = None
        self._framing = None
        self._cancel_timer()
        if self.state is not ConnState.CLOSED:
            if outcome is RelayOutcome.COMPLETE:
                self.state = ConnState.IDLE
                if self._paused_by_client:
                    self.transport.resume_reading()  # type: ignore[union-attr]
            else:
                self._terminate(BadGateway(), outcome)
        self._paused_by_client = False
        done = self._done
        if done is not None and not done.done():
            done.set_result(outcome)

    def _protocol_error(self, exc: GateError) -> None:
        """What Ollama sent is no response head fastgate can relay: the exchange fails with `exc` (its 502)
        and the connection, whose framing is lost, is closed."""
        self._terminate(exc, RelayOutcome.FRAMING_ERROR)

    def _fail_head(self, exc: BaseException) -> None:
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _terminate(self, head_exc: BaseException, outcome: RelayOutcome, *, graceful: bool = False) -> None:
        """Close the connection and settle whatever was waiting on it, exactly once."""
        state = self.state
        if state is ConnState.CLOSED:
            return
        self.state = ConnState.CLOSED
        self.reusable = False
        self._pool._forget(self)
        self._cancel_timer()
        if self.transport is not None:
            # close() would wait, without a limit, for unsent request bytes (an upload Ollama answered early
            # and stopped reading) to go out: a graceful close is only for a connection with nothing pending.
            if graceful and not self.transport.get_write_buffer_size():
                self.transport.close()
            else:
                self.transport.abort()
        if state is ConnState.AWAITING_HEAD:
            self._fail_head(head_exc)
        elif state is ConnState.RELAYING:
            self._finish(outcome)

    # -- hooks called by the client side --------------------------------------------------------------------

    def pause_relay(self) -> None:
        if self.state is ConnState.RELAYING and not self._paused_by_client:
            self._paused_by_client = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_relay(self) -> None:
        if self._paused_by_client:
            self._paused_by_client = False
            if self.state is not ConnState.CLOSED:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def client_gone(self) -> None:
        """Close at once: that is how Ollama learns to stop generating and free the GPU."""
        self._terminate(ClientGone(), RelayOutcome.CLIENT_GONE)

    # -- idle-read timeout: a tick counter instead of re-arming a timer on every chunk ------------------------

    def _start_timer(self) -> None:
        self._seen_progress = -1
        self._stalled_ticks = 0
        self._pool.watch(self)

    def _cancel_timer(self) -> None:
        self._pool.unwatch(self)

    def _tick(self) -> None:
        """One look by the pool's watchdog: time out after `ticks_per_timeout` looks without progress."""
        # The relay counts bytes, not reads. While a request body is still going out, bytes that left the
        # transport's buffer for Ollama count too (written minus still buffered: a paused upload is no
        # progress), so the timeout measures time without progress in either direction.
        transport = self.transport
        flushed = self._sent - (transport.get_write_buffer_size() if transport is not None else 0)
        progress = self._progress + self.body_bytes + flushed
        if progress != self._seen_progress:
            self._seen_progress = progress
            self._stalled_ticks = 0
            return
        self._stalled_ticks += 1
        if self._stalled_ticks >= self._pool.ticks_per_timeout:
            self._timed_out()

    def _timed_out(self) -> None:
        self._terminate(UpstreamTimeout("upstream did not answer in time"), RelayOutcome.UPSTREAM_TIMEOUT)

    # -- closing ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Graceful close (FIN), for idle connections leaving the pool."""
        self._terminate(UpstreamClosed(nothing_received=False), RelayOutcome.UPSTREAM_CLOSED, graceful=True)

    def abort(self, exc: BaseException | None = None) -> None:
        """Reset the connection, failing a pending response head with `exc`."""
        self._terminate(exc or UpstreamClosed(nothing_received=False), RelayOutcome.UPSTREAM_CLOSED)


class UpstreamPool:
    """Keep-alive connections to one Ollama, reused most-recently-used first."""

    def __init__(self, config: UpstreamConfig, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.host = config.url.host
        self.port = config.url.port
        # The idle-read timeout fires after 4 to 5 ticks without progress (between T and 1.25 T).
        self.ticks_per_timeout = 4
        self.configure(config)
        self._idle: list[UpstreamConnection] = []
        self._all: set[UpstreamConnection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        # Exchanges waiting on Ollama, looked at by one watchdog timer rather than a timer per exchange.
        self._busy: set[UpstreamConnection] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self.connects = 0

    def configure(self, config: UpstreamConfig) -> None:
        """Timeouts and pool size; they apply from the next request on."""
        self.connect_timeout = config.connect_timeout
        self.max_idle = config.max_idle_connections
        self.idle_ttl = config.pool_idle_timeout
        self.tick_s = config.read_timeout / self.ticks_per_timeout

    def __repr__(self) -> str:
        return f"<UpstreamPool {self.host}:{self.port} idle={len(self._idle)} open={len(self._all)}>"

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def open_count(self) -> int:
        return len(self._all)

    async def acquire(self) -> tuple[UpstreamConnection, bool]:
        """A connection ready for a request, and whether it was reused from the pool."""
        conn = self.take_idle()
        if conn is not None:
            return conn, True
        return await self.connect(), False

    def take_idle(self) -> UpstreamConnection | None:
        """A pooled connection ready for a request, if there is one (no awaiting: the usual case)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.state is ConnState.IDLE and conn.reusable and not conn.transport.is_closing():  # type: ignore[union-attr]
                if conn.peer_closed():  # Ollama restarted or was killed: try the next, else connect
                    conn.abort()
                    continue
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port),
                self.connect_timeout)
        except asyncio.TimeoutError:
            raise UpstreamTimeout("timed out connecting to upstream") from None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # Not Ollama's fault but fastgate's own: every request needing a new connection fails with 502
                # until descriptors free up. Say so at ERROR, not in a per-request INFO line.
                log.error("Out of file descriptors connecting to Ollama (%s): lower server.max_connections or "
                          "raise the open file limit", exc.strerror)
            error = UpstreamUnreachable(f"upstream unreachable ({exc.strerror or type(exc).__name__})")
            error.refused = isinstance(exc, ConnectionRefusedError)  # the router ejects such a backend at once
            raise error from None
        self.connects += 1
        self._all.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection after a complete exchange; anything not clean is closed instead."""
        if conn.state is not ConnState.IDLE or not conn.reusable or len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.idle_ttl, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = self.loop.time() - self.idle_ttl
        for conn in [c for c in self._idle if c.idle_since <= cutoff]:
            conn.close()
        if self._idle:
            self._sweeper = self.loop.call_later(self.idle_ttl, self._sweep)

    def watch(self, conn: UpstreamConnection) -> None:
        self._busy.add(conn)
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(self.tick_s, self._watch_tick)

    def unwatch(self, conn: UpstreamConnection) -> None:
        self._busy.discard(conn)

    def _watch_tick(self) -> None:
        self._watchdog = None
        for conn in list(self._busy):
            conn._tick()
        if self._busy:
            self._watchdog = self.loop.call_later(self.tick_s, self._watch_tick)

    def _forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for conn in list(self._all):
            conn.abort()



class _PrefixedSink:
    """Writes `prefix` together with the first write it forwards, then gets out of the way."""

    __slots__ = ("sink", "prefix")

    def __init__(self, sink: Sink, prefix: bytes) -> None:
        self.sink = sink
        self.prefix = prefix

    def write(self, data: bytes) -> None:
        prefix, self.prefix = self.prefix, b""
        self.sink.write(prefix + data if prefix else data)


class BufferSink:
    """A sink that keeps what it is given (for small answers fastgate reads itself, like /health)."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

