"""Sockets fastgate lets go of are really closed.

`transport.close()` flushes what is buffered first, and waits for it without any limit; a peer that stops
reading would keep such a socket open for as long as the process runs, after fastgate has already taken the
connection off its books (so neither max_connections nor /health would show it). Each test here watches the
transport itself until `connection_lost`, the moment the socket is released.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import pytest

import fastgate.connection
from fastgate.connection import ClientConnection
from fastgate.server import RunningServer
from fastgate.upstream import UpstreamConnection
from tests.conftest import KEY1, MakeGateway
from tests.rawhttp import Client, build_request

pytestmark = pytest.mark.timeout(30)

KEYED = {"X-API-Key": KEY1}


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


async def stalled_reader(gw: RunningServer) -> tuple[socket.socket, ClientConnection, UpstreamConnection]:
    """A client that asks for 50 MB and never reads: fastgate's write buffer towards it fills and stays full.
    Returns the client's socket, fastgate's side of the connection and the upstream connection it relayed."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", gw.port))
    await loop.sock_sendall(sock, build_request("GET", "/fake/bytes?n=50000000", headers=KEYED))
    await eventually(lambda: len(gw.proxy.connections) == 1, 5, "fastgate took the connection")
    conn = next(iter(gw.proxy.connections))
    await eventually(lambda: conn.transport.get_write_buffer_size() > 0, 5, "fastgate's buffer filled")
    upstream = conn.protocol.exchange
    assert upstream is not None
    # Ollama is paused by the backpressure, says nothing more, and read_timeout cuts the response: fastgate
    # closes the connection, with its buffer still full.
    await eventually(lambda: not gw.proxy.connections, 10, "fastgate gave up on the response")
    assert conn.transport.is_closing() and conn.transport.get_write_buffer_size() > 0
    return sock, conn, upstream


async def test_a_client_that_stops_reading_is_reset_once_the_send_timeout_passes(
        make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastgate.connection, "SEND_TIMEOUT_S", 0.3)
    gw = await make_gateway(upstream={"read_timeout": 0.5})
    sock, conn, _ = await stalled_reader(gw)
    try:
        await eventually(lambda: conn.protocol.lost, 10, "the socket of a client that stopped reading was released")
    finally:
        sock.close()
    async with await Client.connect(gw.port) as c:  # and fastgate serves on
        assert (await c.request("GET", "/api/version", headers=KEYED)).status == 200


async def test_a_slow_reader_still_gets_the_rest_after_the_close(make_gateway: MakeGateway,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The reset is for a client that takes nothing at all: one that reads on, however slowly, gets every byte
    fastgate relayed. (Most of them wait in the kernel's send queue, which must drain by half before
    fastgate's own buffer moves at all: progress is counted there too.)"""
    monkeypatch.setattr(fastgate.connection, "SEND_TIMEOUT_S", 0.5)
    gw = await make_gateway(upstream={"read_timeout": 0.5})
    sock, conn, upstream = await stalled_reader(gw)

    def read_slowly_then_the_rest() -> bytes:  # in a thread: its pace does not depend on the event loop's
        sock.setblocking(True)
        sock.settimeout(10)
        received = bytearray()
        while not conn.protocol.lost:  # until fastgate's buffer is flushed and its socket released
            data = sock.recv(65536)  # a few KB at a time: the socket's receive buffer stays small
            if not data:
                break
            received += data
            time.sleep(0.01)  # well under 1 MB/s: a few send timeouts for the MB queued
        while data := sock.recv(1 << 20):
            received += data
        return bytes(received)

    try:
        received = await asyncio.to_thread(read_slowly_then_the_rest)
    except ConnectionResetError:
        pytest.fail("a client still reading was reset")
    finally:
        sock.close()
    head_end = received.index(b"\r\n\r\n") + 4
    assert len(received) - head_end == upstream.body_bytes  # every byte fastgate relayed, none dropped


async def test_stop_releases_sockets_that_are_still_flushing(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upstream={"read_timeout": 0.5})  # the send timeout stays at its default (60 s)
    sock, conn, _ = await stalled_reader(gw)
    try:
        assert not conn.protocol.lost
        await gw.stop(grace=0.2)
        await eventually(lambda: conn.protocol.lost, 5, "stop() released a socket still flushing")
    finally:
        sock.close()


async def test_an_upstream_connection_with_unsent_upload_bytes_is_released(
        make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream that answers an upload early, then neither reads the rest nor closes: fastgate's graceful
    close of that connection would wait forever for the unsent bytes. (Ollama closes such a connection
    itself, so this takes a raw upstream.)"""
    released: list[UpstreamConnection] = []
    lost = UpstreamConnection.connection_lost

    def record(self: UpstreamConnection, exc: Exception | None) -> None:
        released.append(self)
        lost(self, exc)

    monkeypatch.setattr(UpstreamConnection, "connection_lost", record)
    answer = asyncio.Event()
    holding: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holding.append((reader, writer))
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.pause_reading()  # not one more byte of the upload is read
        await answer.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # and then: nothing, for ever

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited: a small window into it
    listener.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(serve, sock=listener)
    try:
        gw = await make_gateway(upstream_url="http://127.0.0.1:%d" % server.sockets[0].getsockname()[1])
        async with await Client.connect(gw.port) as c:
            c.send(build_request("POST", "/api/blobs/sha256:" + "ab" * 32,
                                 headers=[*KEYED.items(), ("Content-Length", str(50_000_000))]))
            c.send(bytes(50_000_000))
            await eventually(lambda: len(gw.proxy.connections) == 1, 5, "fastgate took the connection")
            client_side = next(iter(gw.proxy.connections))
            await eventually(lambda: client_side.protocol.exchange is not None, 5, "the upload began")
            upstream = client_side.protocol.exchange
            assert upstream is not None
            await eventually(lambda: upstream.transport.get_write_buffer_size() > 0, 10,  # type: ignore[union-attr]
                             "upload bytes wait in fastgate's buffer towards the upstream")
            answer.set()
            resp = await c.response()
            assert resp.status == 200
        await eventually(lambda: upstream in released, 5, "the upstream connection's socket was released")
    finally:
        for _, writer in holding:
            writer.transport.abort()
        server.close()
        await server.wait_closed()
