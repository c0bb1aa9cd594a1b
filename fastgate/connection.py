"""The client side of one TCP (or TLS) connection: asyncio streams + h11, one request at a time, in order.

h11 parses requests (heads and bodies, keep-alive, pipelining); responses are written as raw bytes
because relayed bodies must stay byte for byte, so each request cycle gets a fresh h11 connection seeded
with whatever the client already sent after the previous request.

`ClientProtocol` adds to the stream protocol the hooks the relay needs: write-buffer pause/resume
(backpressure into the Ollama connection) and EOF/connection loss (close the Ollama connection at once).
"""

from __future__ import annotations

import asyncio
import enum
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import h11

from .trust import canonical_ip
from .budget import BodyBudget
from .errors import BadRequest, BodyTooLarge, GateError, HeadersTooLarge, RequestTimeout, ServiceUnavailable

if TYPE_CHECKING:
    from .upstream import UpstreamConnection

try:  # the kernel's count of bytes sent but not yet acknowledged by the peer (Linux and most Unixes)
    from fcntl import ioctl as _ioctl
    from termios import TIOCOUTQ as _TIOCOUTQ
except ImportError:  # pragma: no cover - Windows
    _ioctl = None

READ_SIZE = 256 * 1024
# Unread request bodies up to this size are drained so the connection can stay alive after an early answer.
DRAIN_LIMIT_BYTES = 64 * 1024
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
LINGER_S = 2.0
LINGER_MAX_BYTES = 1024 * 1024
# What each body piece h11 hands over costs on top of its bytes when a body is buffered: a chunk header is at
# least 5 bytes on the wire and parsing it costs far more than copying 256; tiny chunks hit the limits sooner
# (a 20 MiB limit allows at most 80k pieces).
PIECE_COST_BYTES = 256
PIECES_PER_YIELD = 256
# A client that pipelines requests without reading the answers: once this much of ours is unsent (our buffer
# plus the kernel's send queue), no further request is parsed until it takes them. The kernel alone absorbs
# megabytes before our transport's own high-water mark trips: thousands of answers, a CPU-second each time.
PIPELINE_UNSENT_BYTES = 64 * 1024
PIPELINE_CHECK_EVERY = 8  # requests on one connection between two looks at what is unsent (one ioctl)
PIPELINE_POLL_S = 0.05
# A closed connection whose answer is still being flushed gets this long without progress (nginx's
# send_timeout), then it is reset: close() alone would wait forever on a client that stopped reading.
# Progress is any byte the client takes, counted in fastgate's buffer and in the kernel's send queue.
SEND_TIMEOUT_S = 60.0
# uvloop's clock and timers count whole milliseconds: a timer may fire up to this much before its deadline
# reads as passed.
TIMER_SLACK_S = 0.002


class ClientState(enum.Enum):
    IDLE = "idle"  # between requests: may be closed at shutdown
    READING_HEAD = "reading-head"
    ACTIVE = "active"  # a request is being handled
    CLOSED = "closed"


class ClientClosed(Exception):
    """The client closed (or reset) the connection."""


class ReadTimeout(Exception):
    pass


class Admission(Protocol):
    """Who counts client sockets against max_connections and max_connections_per_ip (the proxy)."""

    def admit(self, protocol: ClientProtocol) -> bool: ...

    def release(self, protocol: ClientProtocol) -> None: ...


class Exchange(Protocol):
    """What the client side tells about itself: the upstream exchange (UpstreamConnection), or whatever
    stands in for it while the request waits for a backend slot."""

    def pause_relay(self) -> None: ...

    def resume_relay(self) -> None: ...

    def client_gone(self) -> None: ...


class ClientProtocol(asyncio.StreamReaderProtocol):
    """Stream protocol that also tells the current upstream exchange about the client's state.

    It holds the connection's slot in the proxy's connection count from accept to `connection_lost`, when the
    socket is really released: a connection counted only while its handler runs would leave the count while
    its socket, and the unread answer buffered for it, stayed (flushing after a close, or mid TLS handshake).
    """

    exchange: Exchange | None = None
    transport: asyncio.Transport | None = None
    gone = False  # EOF or connection lost: the client went away
    lost = False  # connection_lost: the socket is released
    writing_paused = False  # the write buffer is above its high-water mark: the client is not taking our bytes
    peer_ip = "unknown"
    admitted = True  # took a slot at accept (False: over a cap, to be refused)
    counted = False  # holds that slot now

    def __init__(self, stream_reader: asyncio.StreamReader,
                 client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], *,
                 admission: Admission | None = None, slot_ip: str | None = None) -> None:
        super().__init__(stream_reader, client_connected_cb)
        self.admission = admission
        if slot_ip is not None:
            # A TLS listener took the slot for this address at accept, before the handshake (server.TlsListener)
            self.peer_ip = slot_ip
            self.counted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.admission is not None and not self.counted:
            peer = transport.get_extra_info("peername")
            if peer:
                self.peer_ip = _plain_ip(peer[0])
            self.admitted = self.counted = self.admission.admit(self)
        super().connection_made(transport)

    def release_slot(self) -> None:
        """Give the connection's slot back (once): at connection_lost, or when a failed TLS handshake let the
        socket go without this protocol ever hearing of it (asyncio tells the application protocol nothing of a
        connection that never completed its handshake)."""
        if self.counted:
            self.counted = False
            if self.admission is not None:
                self.admission.release(self)

    def pause_writing(self) -> None:
        self.writing_paused = True
        super().pause_writing()  # type: ignore[misc]
        exchange = self.exchange
        if exchange is not None:
            exchange.pause_relay()

    def resume_writing(self) -> None:
        self.writing_paused = False
        super().resume_writing()  # type: ignore[misc]
        exchange = self.exchange
        if exchange is not None:
            exchange.resume_relay()

    def eof_received(self) -> bool | None:
        # A client that closes its side while its request is with Ollama has gone away (as nginx judges
        # it): stop the upstream at once rather than generate for nobody.
        self.gone = True
        exchange = self.exchange
        if exchange is not None:
            exchange.client_gone()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = self.lost = True
        self.release_slot()
        exchange = self.exchange
        if exchange is not None:
            exchange.client_gone()
        super().connection_lost(exc)


def _map_h11_error(exc: h11.RemoteProtocolError) -> GateError:
    if exc.error_status_hint == 431:
        return HeadersTooLarge()
    error = BadRequest("malformed request")
    if exc.error_status_hint == 501:
        error.status = 501
        error.message = "unsupported transfer coding"
    return error


class ClientConnection:
    """Reads requests from one client with h11 and writes raw responses back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: ClientProtocol,
                 *, max_header_bytes: int, header_timeout: float, keepalive_timeout: float,
                 body_timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        self.protocol = protocol
        self.loop = asyncio.get_running_loop()
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.body_timeout = body_timeout
        self.send_timeout = SEND_TIMEOUT_S
        self.identify_deadline: float | None = None
        self._read_deadline: float | None = None  # loop time by which the read waiting now must get data
        self._read_timer: asyncio.TimerHandle | None = None
        self._read_timer_at = 0.0
        self.budget_held = 0
        self._budget: BodyBudget | None = None
        self.state = ClientState.IDLE
        self.h11: h11.Connection = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        peer = self.transport.get_extra_info("peername")
        self.peer_ip: str = _plain_ip(peer[0]) if peer else "unknown"
        self.tls = self.transport.get_extra_info("sslcontext") is not None
        self.requests = 0
        self.has_body = False  # the current request has a body (Content-Length > 0, or chunked)
        # A Content-Length body is counted here, not by h11: h11 parses heads (and chunked bodies), and asking it
        # for a small body's Data and EndOfMessage cost a third of parsing the head. -1: h11 frames the body.
        self._length_left = -1
        self._received = b""  # bytes after the head not yet taken, while this connection frames the body
        self._body_started = False  # body bytes were taken (the client no longer waits for 100 Continue)
        self._eof = False  # the client closed its side (seen while this connection framed the body)
        self.linger = False  # close with linger_close(): an error answer may race the client's bytes
        self.metrics_only = False  # a connection to the separate metrics listener
        sock = self.transport.get_extra_info("socket")
        if sock is not None and not self.tls:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def __repr__(self) -> str:
        return f"<ClientConnection {self.peer_ip} {self.state.value} requests={self.requests}>"

    # -- reading -------------------------------------------------------------------------------------------

    async def _read(self, timeout: float) -> bytes:
        """One read with a deadline. The timer poisons the reader instead of wrapping the read in a task.

        One timer serves every read of the connection: a read sets its deadline, and the timer, when it
        fires, either times out the read waiting past its deadline or moves itself to the later deadline of
        the read waiting now. A keep-alive connection so arms about one timer per keep-alive period instead
        of arming and cancelling one per read (per request)."""
        reader = self.reader
        loop = self.loop
        deadline = loop.time() + timeout
        self._read_deadline = deadline
        if self._read_timer is None or self._read_timer_at > deadline:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer_at = deadline
            self._read_timer = loop.call_at(deadline, self._read_timer_fired)
        try:
            data = await reader.read(READ_SIZE)
        except (ConnectionError, OSError) as exc:
            raise ClientClosed() from exc
        finally:
            self._read_deadline = None
        if isinstance(reader.exception(), ReadTimeout):
            # The timer fired after the data had arrived but before this task resumed: not a timeout.
            reader._exception = None  # noqa: SLF001 - StreamReader has no public way to clear it
        return data

    def _read_timer_fired(self) -> None:
        self._read_timer = None
        deadline = self._read_deadline
        if deadline is None:
            return  # no read waits now; the next one arms the timer again
        if self.loop.time() >= deadline - TIMER_SLACK_S:
            self.reader.set_exception(ReadTimeout())
        else:
            self._read_timer_at = deadline
            self._read_timer = self.loop.call_at(deadline, self._read_timer_fired)

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    async def next_request(self) -> h11.Request | None:
        """The next request head, or None when the client closed cleanly between requests."""
        conn = self.h11
        # Whether the parser holds anything yet: an empty one can only answer NEED_DATA, so it is not asked
        # (a next_event that finds nothing costs a fifth of one that parses a head).
        pending = False
        if self.requests:
            # A new cycle gets a fresh parser fed with what the client already sent (pipelining). The
            # caller only asks for another request once the previous body was read to its end.
            if self._length_left >= 0:  # this connection read the last body: what follows it is its own
                leftover, closed = self._received, self._eof
                self._length_left, self._received, self._body_started = -1, b"", False
            else:
                leftover, closed = conn.trailing_data
            conn = self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
            if leftover:
                conn.receive_data(leftover)
            if closed:
                conn.receive_data(b"")
            pending = bool(leftover) or closed
        self.state = ClientState.IDLE
        # A new connection must send its first request within the header timeout (a silent connection is a
        # slowloris); between requests of a kept-alive one the longer keep-alive timeout applies.
        deadline: float | None = None if self.requests else self.loop.time() + self.header_timeout
        while True:
            try:
                event = conn.next_event() if pending else h11.NEED_DATA
            except h11.RemoteProtocolError as exc:
                raise _map_h11_error(exc) from None
            pending = True
            if type(event) is h11.Request:
                self.state = ClientState.ACTIVE
                self.requests += 1
                # Until it is identified (key found, in the head or its body), the whole request must arrive
                # within the header timeout of its first byte: a slow body is a slowloris too.
                self.identify_deadline = deadline if deadline is not None else self.loop.time() + self.header_timeout
                length = _check_head(event, self.max_header_bytes)
                self.has_body = length != 0
                if length > 0:
                    self._length_left = length
                    self._received, self._eof = conn.trailing_data
                # A request without a body is complete with its head: h11 still holds the (empty) end of the
                # message, which is not asked for (a next_event is a sixth of the cost of parsing the head);
                # body_complete says so instead, and the next cycle's fresh parser starts from the same
                # leftover bytes either way.
                return event
            if event is h11.NEED_DATA:
                if deadline is None and conn.trailing_data[0]:
                    deadline = self.loop.time() + self.header_timeout
                timeout = self.keepalive_timeout if deadline is None else max(deadline - self.loop.time(), 0.001)
                try:
                    data = await self._read(timeout)
                except ReadTimeout:
                    if conn.trailing_data[0]:
                        raise RequestTimeout() from None  # part of a head, too slowly
                    return None  # nothing of a request arrived: close quietly
                except ClientClosed:
                    return None
                if deadline is None:
                    deadline = self.loop.time() + self.header_timeout
                self.state = ClientState.READING_HEAD
                conn.receive_data(data)
                continue
            if type(event) is h11.ConnectionClosed:
                return None
            raise BadRequest("unexpected data")  # pragma: no cover - h11 yields nothing else here

    async def body_events(self, deadline: float | None = None):  # type: ignore[no-untyped-def]
        """Yield the request body piece by piece (h11 Data payloads) until its end: each read within
        body_timeout, and all of it by `deadline` (loop time) when one is given."""
        if self._length_left >= 0:
            async for data in self._length_body(deadline):
                yield data
            return
        conn = self.h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _map_h11_error(exc) from None
            if type(event) is h11.Data:
                yield event.data
            elif type(event) is h11.EndOfMessage:
                return
            elif event is h11.NEED_DATA:
                conn.receive_data(await self._read_body_piece(deadline))
            elif type(event) is h11.ConnectionClosed:
                raise ClientClosed()
            else:  # pragma: no cover
                raise BadRequest("unexpected data")

    async def _read_body_piece(self, deadline: float | None) -> bytes:
        """One read of body bytes: within body_timeout, and before `deadline` (loop time) when one is given."""
        timeout = self.body_timeout
        if deadline is not None:
            timeout = min(timeout, deadline - self.loop.time())
            if timeout <= 0:
                raise RequestTimeout("the request was not complete in time")
        try:
            return await self._read(timeout)
        except ReadTimeout:
            raise RequestTimeout("timed out reading the request body") from None

    async def _length_body(self, deadline: float | None):  # type: ignore[no-untyped-def]
        """body_events for a Content-Length body: the pieces as they arrive, none past its end (what follows
        is the next request's)."""
        while self._length_left > 0:
            if self._received:
                yield self._take_received()
                continue
            if self._eof:  # as h11 answers a body cut short by the client closing
                raise BadRequest("malformed request")
            data = await self._read_body_piece(deadline)
            if data:
                self._received = data
            else:
                self._eof = True

    def _take_received(self) -> bytes:
        data, left = self._received, self._length_left
        if len(data) > left:
            data, self._received = data[:left], data[left:]
        else:
            self._received = b""
        self._length_left = left - len(data)
        self._body_started = True
        return data

    def take_buffered_body(self) -> tuple[list[bytes], bool]:
        """The body bytes already received, without waiting for more, and whether that is all of it.

        A small request body usually arrives with its head; taking it here lets it go to Ollama in the same
        write as the head, with no task to pump it.
        """
        if self._length_left >= 0:
            parts = [self._take_received()] if self._received and self._length_left else []
            return parts, self._length_left == 0
        parts: list[bytes] = []
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise _map_h11_error(exc) from None
            if type(event) is h11.Data:
                parts.append(event.data)
            elif type(event) is h11.EndOfMessage:
                return parts, True
            else:  # NEED_DATA: the rest is still on its way
                return parts, False

    async def read_body(self, limit: int, budget: BodyBudget, *, deadline: float | None = None) -> bytes:
        """Buffer the whole body: at most `limit` bytes (413), by `deadline` (408), within the budget shared
        by every connection (503 before reading on). What it takes from the budget stays taken until
        `release_budget()`.

        Every piece h11 hands over is charged PIECE_COST_BYTES on top of its length, so a body cut into tiny
        chunks reaches the limits after bounded work, and the loop is yielded every PIECES_PER_YIELD pieces
        so one read full of chunk headers cannot keep other connections waiting.
        """
        parts: list[bytes] = []
        size = 0
        async for data in self.body_events(deadline):
            cost = len(data) + PIECE_COST_BYTES
            size += cost
            if size > limit:
                raise BodyTooLarge(f"request body larger than {limit} bytes")
            if not budget.take(cost):
                raise ServiceUnavailable("too many request bodies are being read at once; try again shortly",
                                         headers=((b"Retry-After", b"1"),))
            self.budget_held += cost
            self._budget = budget
            parts.append(data)
            if len(parts) % PIECES_PER_YIELD == 0:
                await asyncio.sleep(0)
        return b"".join(parts)

    def release_budget(self) -> None:
        """Give back what read_body took from the shared body budget (its body is no longer held)."""
        if self._budget is not None and self.budget_held:
            self._budget.give_back(self.budget_held)
        self.budget_held = 0

    @property
    def body_complete(self) -> bool:
        if self._length_left >= 0:
            return self._length_left == 0
        return not self.has_body or self.h11.their_state is h11.DONE

    @property
    def waiting_for_100_continue(self) -> bool:
        # h11 stops waiting once it handed over body bytes; for a body counted here, once any were taken.
        return self.has_body and not self._body_started and self.h11.they_are_waiting_for_100_continue

    async def drain_small_body(self, content_length: int | None) -> bool:
        """Read and discard a small unread body so the connection can be kept. False: close instead."""
        if self.body_complete:
            return True
        if content_length is None or content_length > DRAIN_LIMIT_BYTES or self.waiting_for_100_continue:
            return False
        try:
            async for _ in self.body_events():
                pass
        except (GateError, ClientClosed):
            return False
        return True

    # -- writing -------------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():  # uvloop raises on a closed transport; the client is gone anyway
            self.transport.write(data)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            raise ClientClosed() from None

    async def flush(self) -> bool:
        """Before the next request is parsed: wait while the write buffer is above its high-water mark, until
        the client has taken enough of our answers. False: it took nothing for the flush deadline and the
        connection was aborted (or it went away meanwhile).

        Without this a client that pipelines requests and never reads would have every answer buffered here,
        without limit. Waiting here also stops parsing its requests; reading them stops by itself once the
        stream reader holds twice its limit, so one connection holds a bounded amount of memory. A client that
        takes nothing for as long as an idle connection may stay open (keepalive_timeout, at most
        send_timeout) is gone.
        """
        timeout = min(self.keepalive_timeout, self.send_timeout)
        unsent = self._unsent()
        if unsent > PIPELINE_UNSENT_BYTES:
            # The kernel takes our answers without the transport ever pausing: watch the queue itself.
            deadline = self.loop.time() + timeout
            while unsent > PIPELINE_UNSENT_BYTES:
                await asyncio.sleep(PIPELINE_POLL_S)
                if self.protocol.lost:
                    return False
                now, left = self.loop.time(), self._unsent()
                if left < unsent:
                    deadline = now + timeout  # it is reading: give it time
                elif now >= deadline:
                    self.abort()
                    return False
                unsent = left
        while self.protocol.writing_paused:
            before = self._unsent()
            try:
                await asyncio.wait_for(self.drain(), timeout)
            except asyncio.TimeoutError:
                if self._unsent() >= before:
                    self.abort()
                    return False
            except ClientClosed:
                return False
        return True

    async def linger_close(self) -> None:
        """Close after an error answer without destroying it (RFC 9112 section 9.6).

        A client may still be sending (a body we refused, the rest of an oversized head); closing at once
        would make the kernel answer those bytes with a reset, which can discard our answer before the
        client reads it. So: send FIN, read and drop what still comes for a short while, then close.
        """
        if self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            try:
                self.transport.write_eof()
                deadline = self.loop.time() + LINGER_S
                drained = 0
                while drained < LINGER_MAX_BYTES and (left := deadline - self.loop.time()) > 0:
                    data = await self._read(left)
                    if not data:
                        break
                    drained += len(data)
            except (ClientClosed, ReadTimeout, OSError):
                pass
        self.close()

    def close(self) -> None:
        self.state = ClientState.CLOSED
        self._stop_read_timer()
        transport = self.transport
        if not transport.is_closing():
            transport.close()
            if transport.get_write_buffer_size():
                # close() lets the buffered answer go out first, and waits for it without any limit: a client
                # that stopped reading would hold this socket forever (the connection has already left the
                # proxy's books). Reset it once it has taken nothing for send_timeout.
                self.loop.call_later(self.send_timeout, self._check_flush, self._unsent())

    def _unsent(self) -> int:
        """What the client has yet to take: fastgate's write buffer, plus the kernel's unacknowledged bytes
        (which drain first: the socket turns writable again only once half of them are gone)."""
        left = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if _ioctl is not None and sock is not None:
            try:
                left += struct.unpack("i", _ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0"))[0]
            except (OSError, ValueError):
                pass
        return left

    def _check_flush(self, before: int) -> None:
        if self.protocol.lost:
            return  # flushed: the socket is released
        left = self._unsent()
        if left >= before:
            self.transport.abort()
        else:
            self.loop.call_later(self.send_timeout, self._check_flush, left)

    def abort(self) -> None:
        self.state = ClientState.CLOSED
        self._stop_read_timer()
        self.transport.abort()


_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def header_fields(request: h11.Request) -> list[tuple[bytes, bytes, bytes]]:
    """The request's header fields as (name as sent, lowercase name, value), in order.

    h11 keeps them in this form; its public views (iterating `headers`, `raw_items()`) rebuild a tuple per
    field through Python-level indexing on every pass, which fastgate's request path made five of.
    """
    fields = getattr(request.headers, "_full_items", None)
    if fields is None:  # pragma: no cover - an h11 that stores them otherwise: the same from its public API
        fields = [(raw, name, value) for (raw, value), (name, _) in zip(request.headers.raw_items(), request.headers)]
    return fields  # type: ignore[no-any-return]


def header_lists(request: h11.Request) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """(lowercase name, value) and (name as sent, value) pairs of the request's header fields."""
    fields = header_fields(request)
    return [(name, value) for _, name, value in fields], [(raw, value) for raw, _, value in fields]


def _check_head(request: h11.Request, max_header_bytes: int) -> int:
    """What h11 lets through but fastgate must not pass on. Returns the body's length: 0 for none, -1 for a
    chunked one."""
    size = len(request.target)
    length = 0
    transfer_encoding = False
    values = []
    for _, name, value in header_fields(request):
        size += len(name) + len(value) + 4
        values.append(value)
        if name == b"transfer-encoding":
            transfer_encoding = True
        elif name == b"content-length":  # h11 checked it is digits, and one value
            length = int(value)
    # h11 bounds only heads that arrive in pieces; one that came whole in a single read is measured here.
    if size > max_header_bytes:
        raise HeadersTooLarge()
    # RFC 9110 section 5.5: control characters are not allowed in field values (h11 accepts them).
    if _CONTROL_BYTES.search(b" ".join(values)):
        raise BadRequest("control character in a header field")
    # RFC 9112 section 6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing.
    if transfer_encoding and request.http_version == b"1.0":
        raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
    # Both framings: refused by the proxy (a smuggling attempt), after h11, which frames by Transfer-Encoding.
    return -1 if transfer_encoding else length


def _plain_ip(ip: str) -> str:
    # Dual-stack listeners report IPv4 peers as ::ffff:a.b.c.d; trust and logs want the IPv4 form.
    try:
        return canonical_ip(ip)
    except ValueError:
        return ip
