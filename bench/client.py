"""The load client: raw asyncio Protocols, no HTTP library, as little work per read as possible.

Every read is stored as (arrival time, bytes) and parsed only after the measurement window
(`bench.analysis`), so the client costs one `monotonic_ns()`, one list append and an end-of-response
check per read. Closed loops (small requests, full-speed streams) issue the next request from inside
`data_received`: no task switch, no future per request.

End of a response is found without parsing the body: chunked responses end with `\\n0\\r\\n\\r\\n`
(NDJSON payloads never contain a bare CRLF), and Content-Length responses are counted.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field

monotonic_ns = time.monotonic_ns

CHUNKED_END = b"\n0\r\n\r\n"
HEAD_END = b"\r\n\r\n"
SAMPLE = 2  # exchanges per connection kept whole in closed loops that otherwise keep only timings


def stream_request(host: str, key: str | None, num_predict: int, gap_ms: float, *, lean: bool = False,
                   path: str = "/api/generate", model: str = "llama3.2") -> bytes:
    """A native streaming request whose items carry the fake's send time (and, lean, its CRC-32)."""
    options = '"num_predict":%d,"fake_gap_ms":%s,"fake_timestamps":true%s' % (
        num_predict, f"{gap_ms:g}", ',"fake_lean":true' if lean else "")
    if path == "/api/chat":
        body = '{"model":"%s","messages":[{"role":"user","content":"hi"}],"options":{%s}}' % (model, options)
    else:
        body = '{"model":"%s","prompt":"hi","options":{%s}}' % (model, options)
    data = body.encode()
    auth = f"X-API-Key: {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def get_request(host: str, key: str | None, path: str = "/api/version") -> bytes:
    auth = f"X-API-Key: {key}\r\n" if key else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n".encode()


@dataclass
class Exchange:
    """One request and its response as it arrived: (arrival ns, bytes) per read."""

    sent_ns: int
    reads: list[tuple[int, bytes]] = field(default_factory=list)
    complete: bool = False

    @property
    def first_byte_ns(self) -> int:
        return self.reads[0][0] if self.reads else 0


class HttpConn(asyncio.Protocol):
    """One keep-alive client connection, one request at a time.

    `loop_request`: when set, the next request is written as soon as a response completes, while
    `running` is true (a closed loop). Otherwise `request()` sends one and returns a future.
    """

    def __init__(self, *, keep_reads: bool = True, address: tuple[str, int] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.address = address
        self.reconnects = 0
        self._closed_by_us = False
        self._close_after = False
        self.exchanges: list[Exchange] = []
        self.current: Exchange | None = None
        self.keep_reads = keep_reads
        self.closed = asyncio.get_running_loop().create_future()
        self.waiter: asyncio.Future[Exchange] | None = None
        self.first_data: asyncio.Future[int] | None = None
        self.loop_request: bytes | None = None
        self.running = False
        self.completed = 0
        self.latencies_ns: list[int] = []  # per completed exchange (closed loops with keep_reads False)
        self.bad_status = 0  # keep_reads False: responses whose status was not 200
        self.sample: list[Exchange] = []  # keep_reads False: the first SAMPLE exchanges, kept whole
        self._sampling = False
        # response framing state (only what is needed to find the end)
        self._head = bytearray()
        self._in_head = True
        self._chunked = False
        self._remaining = 0
        self._tail = b""
        self.eof = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if self.running and self.loop_request is not None and self.address is not None:
            # A closed loop outlives server-side closes (nginx ends a keep-alive connection after
            # keepalive_requests, 1000 by default): reconnect like a real client would and go on.
            self.current = None
            asyncio.get_running_loop().create_task(self._reconnect())
            return
        if not self.closed.done():
            self.closed.set_result(None)
        waiter = self.waiter
        fd = self.first_data
        if self._closed_by_us:  # nobody waits for these any more
            for fut in (waiter, fd):
                if fut is not None and not fut.done():
                    fut.cancel()
            return
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError("connection closed before the response ended"))
        if fd is not None and not fd.done():
            fd.set_exception(ConnectionError("connection closed before any response"))

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def data_received(self, data: bytes) -> None:
        t = monotonic_ns()
        ex = self.current
        if ex is None:
            return  # bytes nobody asked for: analysis will not see them; correctness checks catch it
        if self.keep_reads or self._sampling or not ex.reads:
            ex.reads.append((t, data))
        fd = self.first_data
        if fd is not None:
            self.first_data = None
            if not fd.done():
                fd.set_result(t)
        if self._in_head:
            head = self._head
            head += data
            end = head.find(HEAD_END)
            if end < 0:
                return
            self._in_head = False
            lower = bytes(head[:end]).lower()
            self._close_after = b"\r\nconnection: close" in lower
            self._chunked = b"transfer-encoding: chunked" in lower
            body = bytes(head[end + 4:])
            head.clear()
            if not self._chunked:
                length = 0
                i = lower.find(b"content-length:")
                if i >= 0:
                    j = lower.find(b"\r\n", i)
                    length = int(lower[i + 15:j if j >= 0 else len(lower)])
                if lower.startswith(b"http/1.1 1"):
                    length = 0
                self._remaining = length - len(body)
                if self._remaining <= 0:
                    self._done(t)
                return
            data = body
            self._tail = b""
        if self._chunked:
            if len(data) >= 7:
                tail = data[-7:]
            else:
                tail = (self._tail + data)[-7:]
            self._tail = tail
            if tail.endswith(CHUNKED_END) or tail == b"0\r\n\r\n":
                self._done(t)
        else:
            self._remaining -= len(data)
            if self._remaining <= 0:
                self._done(t)

    # -- requests -----------------------------------------------------------------------------------------

    def _done(self, t: int) -> None:
        ex = self.current
        assert ex is not None
        ex.complete = True
        self.current = None
        self._in_head = True
        self._tail = b""
        self.completed += 1
        if self.keep_reads:
            self.exchanges.append(ex)
        else:
            self.latencies_ns.append(t - ex.sent_ns)
            if not ex.reads[0][1].startswith(b"HTTP/1.1 200 "):
                self.bad_status += 1
            if self._sampling:
                self.sample.append(ex)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(ex)
        if self.running and self.loop_request is not None and not self.eof:
            if self._close_after:
                self.transport.close()  # type: ignore[union-attr]  # connection_lost reconnects
            else:
                self._send(self.loop_request)

    async def _reconnect(self) -> None:
        assert self.address is not None
        self.reconnects += 1
        self._in_head = True
        self._head.clear()
        self._tail = b""
        self._close_after = False
        self.eof = False
        try:
            await asyncio.get_running_loop().create_connection(lambda: self, *self.address)
        except OSError:
            self.running = False
            self.eof = True
            if not self.closed.done():
                self.closed.set_result(None)
            return
        if self.running and self.loop_request is not None:
            self._send(self.loop_request)

    def _send(self, data: bytes) -> Exchange:
        ex = Exchange(monotonic_ns())
        self.current = ex
        self._sampling = not self.keep_reads and len(self.sample) < SAMPLE
        self.transport.write(data)  # type: ignore[union-attr]
        return ex

    def request(self, data: bytes, *, first_data: bool = False) -> asyncio.Future[Exchange]:
        loop = asyncio.get_running_loop()
        self.waiter = fut = loop.create_future()
        if first_data:
            self.first_data = loop.create_future()
        self._send(data)
        return fut

    def start_loop(self, data: bytes) -> None:
        self.loop_request = data
        self.running = True
        self._send(data)

    def partial(self) -> Exchange | None:
        """The unfinished exchange (when a closed loop was cut off), for prefix checks."""
        return self.current

    def close(self) -> None:
        self._closed_by_us = True
        self.running = False
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._closed_by_us = True
        self.running = False
        if self.transport is not None:
            self.transport.abort()


async def connect(host: str, port: int, **kwargs: bool) -> HttpConn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: HttpConn(address=(host, port), **kwargs), host, port)
    return proto  # type: ignore[return-value]


async def connect_many(host: str, port: int, count: int, *, parallel: int = 64,
                       **kwargs: bool) -> list[HttpConn]:
    conns: list[HttpConn] = []
    for start in range(0, count, parallel):
        size = min(parallel, count - start)
        batch = await asyncio.gather(*(connect(host, port, **kwargs) for _ in range(size)))
        conns.extend(batch)
    return conns


async def send_raw(host: str, port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """One request on a fresh connection; everything the server sent until it closed or went quiet."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        out = b""
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout)
            except asyncio.TimeoutError:
                break
            if not chunk:
                break
            out += chunk
            if HEAD_END in out:
                head, _, body = out.partition(HEAD_END)
                low = head.lower()
                if b"content-length:" in low:
                    i = low.index(b"content-length:")
                    n = int(low[i + 15:].split(b"\r\n", 1)[0])
                    if len(body) >= n:
                        break
                elif b"chunked" in low and (body == b"0\r\n\r\n" or body.endswith(CHUNKED_END)):
                    break  # (on the body only: a head ending in "...0\r\n\r\n" is no end)
        return out
    finally:
        writer.close()
