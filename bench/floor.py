"""The design floor: the least a proxy built to fastgate's design card can do per request, as a bench target.

The design card: a raw asyncio HTTP/1.1 forwarder, asyncio streams plus h11 parsing each client connection,
uvloop, chunked transfer relayed byte for byte, keep-alive connections to Ollama. This is that and nothing
else, so that the benchmark can say in the same run how far the design itself is from nginx, and how far
fastgate is from the design:

- `asyncio.start_server` (StreamReader/StreamWriter), a fresh `h11.Connection` per request fed the bytes the
  previous one left over (pipelined requests are answered in order);
- one keep-alive upstream connection per client connection, an `asyncio.Protocol`, opened at the first
  request and again after the upstream closed it;
- the request head rebuilt from h11's headers without X-API-Key and Authorization (dropped, never checked:
  any key or none is forwarded) and without Connection / Keep-Alive (the upstream connection is always kept),
  Host set to the upstream's (Ollama refuses Hosts it does not know: its DNS-rebinding guard);
  a Content-Length body counted here and forwarded as it arrives (h11 parses heads), a chunked body decoded
  by h11 and re-chunked piece by piece;
  `Expect: 100-continue` answered here;
- the response written to the client as each upstream read arrives, unchanged; its end found by counting a
  Content-Length body or by following the chunk framing (sizes, data, trailer); no body for HEAD, 1xx, 204
  and 304; without either, the body runs to the upstream's close and the client connection is closed after;
- TCP_NODELAY on both sides; the upstream is paused while the client's write buffer is over 64 KiB;
- no key check, no policy, no logging, no timeouts, no metrics. A failure before any response byte is a
  502; an upstream that goes away mid-response aborts the client connection.

It lives in bench/ and fastgate never imports it.

    python -m bench.floor --port 8001 --upstream-port 11434
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket

import h11

READ_SIZE = 65536
HIGH_WATER = 65536  # client write buffer (bytes) above which the upstream is paused
MAX_LINE = 4096  # a chunk-size or trailer line longer than this is a broken upstream
DROP = frozenset((b"x-api-key", b"authorization", b"connection", b"keep-alive", b"expect"))
BAD_GATEWAY = (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
               b"Connection: close\r\n\r\nbad gateway\n")
BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
               b"Connection: close\r\n\r\nbad request\n")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# How the response body ends.
HEAD, LENGTH, CHUNKED, CLOSE, DONE = range(5)


class UpstreamError(Exception):
    pass


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream, relaying each response to the current client as it arrives.

    `begin()` arms it for one response and returns a future: True when the response ended and both
    connections may be kept, False when it ended with the upstream's close (the client must be closed too);
    an exception when it failed (`sent`: whether any of it reached the client)."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.ctransport = client.transport
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.done: asyncio.Future[bool] | None = None
        self.head_only = False  # the request was HEAD: the response has no body whatever it says
        self.state = DONE
        self.head = b""
        self.left = 0  # LENGTH: body bytes to come; CHUNKED: chunk data (and its CRLF) still to pass
        self.line = b""  # CHUNKED: a size or trailer line split over reads
        self.trailer = False  # CHUNKED: past the last chunk, reading the trailer up to its empty line
        self.boundary = False  # CHUNKED: between two chunks (the next read starts with a size line)
        self.sent = False
        self.paused = False
        self.drainer: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True
        _nodelay(transport)

    def begin(self, head_only: bool) -> asyncio.Future[bool]:
        self.done = self.loop.create_future()
        self.head_only = head_only
        self.state = HEAD
        self.head = b""
        self.line = b""
        self.trailer = False
        self.boundary = False
        self.sent = False
        return self.done

    def data_received(self, data: bytes) -> None:
        if self.boundary:
            # A token is one whole chunk, most often read in one go: telling that case apart costs a find, an
            # int and a compare, and it needs none of the tracking below.
            i = data.find(b"\r\n", 0, 18)
            if i > 0:
                try:
                    size = int(data[:i], 16)
                except ValueError:
                    size = 0
                if size > 0 and i + size + 4 == len(data) and not self.ctransport.is_closing():
                    self.ctransport.write(data)
                    if not self.paused and self.ctransport.get_write_buffer_size() > HIGH_WATER:
                        self._pause()
                    return
        if self.state == DONE:  # bytes nobody asked for: this connection cannot be trusted any more
            self.transport.close()  # type: ignore[union-attr]
            return
        if self.ctransport.is_closing():  # the client went away: stop the response at its source
            self._fail(UpstreamError("client gone"))
            self.transport.close()  # type: ignore[union-attr]
            return
        end = -1
        try:
            pos = 0
            if self.state == HEAD:
                pos = self._head(data)
                if pos < 0:
                    self.ctransport.write(data)
                    self.sent = True
                    return
            if self.state == LENGTH:
                self.left -= len(data) - pos
                if self.left <= 0:
                    end = len(data) + self.left
            elif self.state == CHUNKED:
                end = self._chunks(data, pos)
            elif self.state == DONE:
                end = pos
        except (ValueError, UpstreamError) as exc:
            self._fail(UpstreamError(f"broken response: {exc}"))
            self.transport.close()  # type: ignore[union-attr]
            return
        if end < 0:
            self.ctransport.write(data)
            self.sent = True
            if self.state == CHUNKED:
                self.boundary = not self.left and not self.line and not self.trailer
            if not self.paused and self.ctransport.get_write_buffer_size() > HIGH_WATER:
                self._pause()
            return
        self.boundary = False
        self.ctransport.write(data if end == len(data) else data[:end])
        self.sent = True
        if end != len(data):
            self.transport.close()  # type: ignore[union-attr]
        self.state = DONE
        self._finish(True)

    def _head(self, data: bytes) -> int:
        """Takes the response head from `data`; the position where its body starts, -1 if the head goes on."""
        offset = -len(self.head)  # where self.head starts, relative to `data`
        search = max(0, len(self.head) - 3)
        self.head += data
        while True:
            i = self.head.find(b"\r\n\r\n", search)
            if i < 0:
                if len(self.head) > 65536:
                    raise UpstreamError("response head too long")
                return -1
            head, body_at = self.head[:i], i + 4
            status = int(head[9:12])
            if 100 <= status < 200 and status != 101:  # an interim answer: the real head comes next
                self.head = self.head[body_at:]
                offset += body_at
                search = 0
                continue
            break
        length = -1
        chunked = close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if head.startswith(b"HTTP/1.0"):
            close = True
        if close:
            self.open = False  # the upstream closes after this response: the next request reconnects
        self.head = b""
        if self.head_only or status in (204, 304) or status == 101:
            self.state = DONE
        elif chunked:
            self.state, self.left = CHUNKED, 0
        elif length >= 0:
            self.state, self.left = (LENGTH, length) if length else (DONE, 0)
        else:
            self.state = CLOSE
        return offset + body_at

    def _chunks(self, data: bytes, pos: int) -> int:
        """Follows the chunk framing through `data` from `pos`; where the body ends, -1 if it goes on."""
        n = len(data)
        while True:
            if self.left:
                take = min(self.left, n - pos)
                pos += take
                self.left -= take
                if self.left:
                    return -1
            i = data.find(b"\n", pos)
            if i < 0:
                self.line += data[pos:]
                if len(self.line) > MAX_LINE:
                    raise UpstreamError("chunk line too long")
                return -1
            line = self.line + data[pos:i] if self.line else data[pos:i]
            self.line = b""
            pos = i + 1
            if self.trailer:
                if line in (b"", b"\r"):
                    return pos
                continue
            size = int(line.split(b";", 1)[0], 16)
            if size < 0:
                raise UpstreamError("negative chunk size")
            if size == 0:
                self.trailer = True
            else:
                self.left = size + 2

    def _pause(self) -> None:
        self.paused = True
        self.transport.pause_reading()  # type: ignore[union-attr]
        self.drainer = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.client.drain()
        except (ConnectionError, RuntimeError):
            self.transport.close()  # type: ignore[union-attr]
            return
        self.paused = False
        if self.open and not self.transport.is_closing():  # type: ignore[union-attr]
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _finish(self, keep: bool) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(keep)

    def _fail(self, exc: Exception) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.boundary = False
        if self.state == CLOSE:  # the body ran to the close: it is complete
            self.state = DONE
            self._finish(False)
        elif self.state != DONE:
            self.state = DONE
            self._fail(UpstreamError(f"upstream closed mid-response ({exc})"))


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream_addr: tuple[str, int],
                 ups: list[Upstream]) -> None:
    loop = asyncio.get_running_loop()
    upstream_host = f"{upstream_addr[0]}:{upstream_addr[1]}".encode()
    _nodelay(writer.transport)
    up: Upstream | None = None
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(READ_SIZE)
            if not data:
                return
            conn.receive_data(data)
            continue
        if type(event) is not h11.Request:
            return  # ConnectionClosed, or a client that is no longer speaking HTTP
        keep = event.http_version == b"1.1"
        chunked = expect = False
        length = 0
        lines = [event.method, b" ", event.target, b" HTTP/1.1\r\n"]
        # h11 keeps each field as (name as sent, lowercased name, value); iterating its Headers rebuilds a pair
        # per field through Sequence.__iter__, a Python call each, so the list is read as it is when it is there.
        fields = getattr(event.headers, "_full_items", None)
        if fields is None:
            fields = [(raw, name, value) for (raw, value), (name, _) in zip(event.headers.raw_items(), event.headers)]
        for raw, name, value in fields:
            if name in DROP:
                if name == b"connection" and b"close" in value.lower():
                    keep = False
                elif name == b"expect" and value.lower() == b"100-continue":
                    expect = True
                continue
            if name == b"host":
                value = upstream_host
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"content-length":
                length = int(value)  # h11 has checked it
            lines += (raw, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        if up is None or not up.open or up.transport.is_closing():  # type: ignore[union-attr]
            try:
                _, up = await loop.create_connection(lambda: Upstream(writer), *upstream_addr)
            except OSError:
                writer.write(BAD_GATEWAY)
                return
            ups[:] = [up]
        done = up.begin(event.method == b"HEAD")
        up.transport.write(b"".join(lines))  # type: ignore[union-attr]
        if expect:
            writer.write(CONTINUE)
        # A Content-Length body is counted here and passed on as it arrives: h11's Data and EndOfMessage for it
        # would cost about what parsing the head does (and for no body, EndOfMessage consumes nothing). A chunked
        # body is decoded by h11 and re-chunked.
        leftover = conn.trailing_data[0]
        while length:
            if len(leftover) >= length:
                up.transport.write(leftover[:length])  # type: ignore[union-attr]
                leftover = leftover[length:]
                break
            if leftover:
                up.transport.write(leftover)  # type: ignore[union-attr]
                length -= len(leftover)
            leftover = await reader.read(READ_SIZE)
            if not leftover:
                up.transport.close()  # type: ignore[union-attr]
                return
        while chunked:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(READ_SIZE)
                if not data:
                    up.transport.close()  # type: ignore[union-attr]
                    return
                conn.receive_data(data)
            elif type(event) is h11.Data:
                up.transport.write(b"%x\r\n%b\r\n" % (len(event.data), event.data))  # type: ignore[union-attr]
            elif type(event) is h11.EndOfMessage:
                up.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
                leftover = conn.trailing_data[0]
                break
            else:
                up.transport.close()  # type: ignore[union-attr]
                return
        try:
            keep = await done and keep
        except UpstreamError:
            if not up.sent:
                writer.write(BAD_GATEWAY)
            else:
                writer.transport.abort()
            return
        if not keep:
            return
        conn = h11.Connection(h11.SERVER)
        if not leftover:  # the usual case: wait for the next request here, not through a NEED_DATA from h11
            leftover = await reader.read(READ_SIZE)
            if not leftover:
                return
        conn.receive_data(leftover)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream_addr: tuple[str, int]
                 ) -> None:
    ups: list[Upstream] = []  # the connection's upstream, closed with it
    try:
        await _relay(reader, writer, upstream_addr, ups)
    except h11.RemoteProtocolError:
        writer.write(BAD_REQUEST)
    except (ConnectionError, UpstreamError):
        pass
    finally:
        for up in ups:
            if up.transport is not None:
                up.transport.close()
        writer.close()


async def serve(host: str, port: int, upstream_host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)  # a clean exit: callgrind writes its counts
    addr = (upstream_host, upstream_port)
    server = await asyncio.start_server(lambda r, w: handle(r, w, addr), host, port, backlog=1024,
                                        reuse_address=True)
    await stop
    # Not wait_closed(): it would wait for every client to leave. The open connections' tasks are
    # cancelled when the loop ends.
    server.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream-host", default="127.0.0.1")
    ap.add_argument("--upstream-port", type=int, required=True)
    args = ap.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.host, args.port, args.upstream_host, args.upstream_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
