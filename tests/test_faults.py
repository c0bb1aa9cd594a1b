"""Faults, abuse and load: fastgate survives them, tells the client the truth, and loses or repeats nothing.

Most tests run fastgate in-process (make_gateway) in front of the fake Ollama, with short timeouts. Two
tests put a tiny raw upstream server in place of the fake, to answer with framing Ollama never sends but a
broken or different upstream might (bytes after the end of a response, close-delimited bodies). The memory
test runs fastgate as a process so that its RSS is its own.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from fastgate.server import RunningServer
from tests.conftest import KEY1, KEYS, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.proc import FastgateProcess, write_config
from tests.rawhttp import Client, RawResponse, build_request

pytestmark = pytest.mark.timeout(30)

KEYED = {"X-API-Key": KEY1}
MODEL = "llama3.2:latest"


def generate(prompt: str, n: int, *, gap_ms: int = 0, **extra: object) -> bytes:
    options: dict[str, object] = {"num_predict": n, **extra}
    if gap_ms:
        options["fake_gap_ms"] = gap_ms
    return build_request("POST", "/api/generate", headers=KEYED, body=json.dumps(
        {"model": MODEL, "prompt": prompt, "options": options}).encode())


async def eventually(predicate: Callable[[], bool], timeout: float = 1.0) -> float:
    """Wait until `predicate()` holds; returns how long it took. Fails after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)
    return loop.time() - start


async def read_rest(c: Client, timeout: float = 5.0) -> bytes:
    """Everything until the server closes the connection (EOF or reset)."""
    out = bytearray()
    try:
        while data := await asyncio.wait_for(c.reader.read(65536), timeout):
            out += data
    except ConnectionError:
        pass
    return bytes(out)


async def served(port: int) -> RawResponse:
    c = await Client.connect(port)
    try:
        return await c.request("GET", "/api/version", headers=KEYED)
    finally:
        await c.close()


def pool_busy(gw: RunningServer) -> int:
    assert gw.proxy.pool is not None
    return gw.proxy.pool.open_count - gw.proxy.pool.idle_count


# -- upstream restarts ---------------------------------------------------------------------------------------

async def test_upstream_restart_cuts_streams_visibly_and_never_replays_them(make_gateway: MakeGateway,
                                                                          ollama: FakeOllama) -> None:
    gw = await make_gateway(upstream={"read_timeout": 0.5})
    warm = await Client.connect(gw.port)
    assert (await warm.request("GET", "/api/version", headers=KEYED)).status == 200  # a pooled connection
    streams = [await Client.connect(gw.port) for _ in range(3)]
    heads = []
    for i, c in enumerate(streams):
        c.send(generate(f"in flight {i}", 1000, gap_ms=20))
        heads.append(await c.response_head())
        assert heads[-1].status == 200
        await asyncio.wait_for(c.reader.readuntil(b"\n\r\n"), 5)  # the first token is through
    # and one request Ollama took on the pooled connection but has not answered yet (a model loading)
    ollama.faults.append("stall")
    warm.send(build_request("POST", "/api/chat", headers=KEYED, body=json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "waiting"}], "stream": False}).encode()))
    await eventually(lambda: any(r.path == "/api/chat" for r in ollama.received), timeout=2)
    old_conns = {r.conn_id for r in ollama.received}

    await ollama.restart()

    for c, h in zip(streams, heads):
        resp = await c.body(h)
        assert not resp.complete  # no terminating chunk: the client can tell the answer was cut
        assert all(json.loads(ch)["done"] is False for ch in resp.chunks)
        assert await c.closed()
        await c.close()
    waiting = await warm.response()
    assert waiting.status == 502  # not sent again: Ollama may have acted on it
    # Next requests, on the kept-alive connection and on new ones, go on new upstream connections.
    chat = await warm.request("POST", "/api/chat", headers=KEYED, json_body={
        "model": MODEL, "messages": [{"role": "user", "content": "after"}], "stream": False})
    assert chat.status == 200 and chat.json()["done"] is True
    stream = await warm.request("POST", "/api/generate", headers=KEYED,
                                json_body={"model": MODEL, "prompt": "after", "options": {"num_predict": 7}})
    assert stream.status == 200 and stream.complete and len(stream.chunks) == 8
    await warm.close()
    assert (await served(gw.port)).status == 200
    await asyncio.sleep(0.2)  # a late replay would show up here
    generated = [r.json()["prompt"] for r in ollama.received if r.path == "/api/generate"]
    assert sorted(generated) == ["after", "in flight 0", "in flight 1", "in flight 2"]  # each exactly once
    chats = [r.json()["messages"][0]["content"] for r in ollama.received if r.path == "/api/chat"]
    assert chats == ["waiting", "after"]
    after = [r for r in ollama.received if r.path != "/api/version" and b'"after"' in r.body]
    assert len(after) == 2 and not {r.conn_id for r in after} & old_conns
    assert gw.proxy.in_flight == 0


# -- clients that leave --------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["reset", "fin"])
@pytest.mark.parametrize("kind", ["chat", "blob"])
async def test_client_leaving_mid_request_body_closes_upstream_at_once(make_gateway: MakeGateway,
                                                                       ollama: FakeOllama, kind: str,
                                                                       how: str) -> None:
    gw = await make_gateway(upstream={"read_timeout": 0.5}, server={"body_timeout": 5.0})
    c = await Client.connect(gw.port)
    if kind == "chat":
        target, total = "/api/chat", 100_000
        sent = b'{"model":"' + MODEL.encode() + b'","messages":[' + b" " * 5000
    else:
        target, total, sent = "/api/blobs/sha256:" + "cd" * 32, 10_000_000, bytes(range(256)) * 4096
    c.send(build_request("POST", target, headers=[*KEYED.items(), ("Content-Length", str(total))]) + sent)
    await eventually(lambda: ollama.open_connections == 1, timeout=2)
    await asyncio.sleep(0.1)  # let part of the body reach Ollama
    loop = asyncio.get_running_loop()
    left_at = loop.time()
    if how == "reset":
        c.writer.transport.abort()
    else:
        await c.close()
    took = await eventually(lambda: ollama.open_connections == 0, timeout=1.0)
    print(f"{kind}/{how}: upstream closed {took * 1000:.1f} ms after the client left")
    disconnect = await ollama.wait_for_disconnect(timeout=1.0)
    assert disconnect.path == target
    assert loop.time() - left_at < 1.0
    assert ollama.received == []  # the incomplete request never completed at Ollama
    await eventually(lambda: gw.proxy.in_flight == 0 and not gw.proxy.connections)
    assert pool_busy(gw) == 0 and gw.proxy.pool is not None and gw.proxy.pool.open_count == 0
    assert (await served(gw.port)).status == 200


async def test_half_close_while_streaming_counts_as_gone(make_gateway: MakeGateway,
                                                        ollama: FakeOllama) -> None:
    """Documented in connection.py: EOF while a request is with Ollama means the client went away (as nginx
    judges it), so Ollama is stopped at once rather than left generating for nobody."""
    gw = await make_gateway(upstream={"read_timeout": 0.5})
    other = await Client.connect(gw.port)
    other.send(generate("bystander", 40, gap_ms=10))
    c = await Client.connect(gw.port)
    c.send(generate("half-close", 1000, gap_ms=20))
    h = await c.response_head()
    assert h.status == 200
    await asyncio.wait_for(c.reader.readuntil(b"\n\r\n"), 5)
    loop = asyncio.get_running_loop()
    eof_at = loop.time()
    c.writer.write_eof()
    disconnect = await ollama.wait_for_disconnect(timeout=1.0)
    assert disconnect.path == "/api/generate" and disconnect.items_sent < 1000
    assert loop.time() - eof_at < 1.0
    resp = await c.body(h)
    assert not resp.complete  # cut, and visibly so
    assert await c.closed()
    await c.close()
    # the bystander's stream is untouched
    bystander = await other.response()
    assert bystander.status == 200 and bystander.complete and len(bystander.chunks) == 41
    assert [json.loads(ch).get("response") for ch in bystander.chunks[:-1]] == [f"tok{i} " for i in range(40)]
    await other.close()
    await eventually(lambda: ollama.open_connections <= 1 and pool_busy(gw) == 0)
    assert len([r for r in ollama.received if r.path == "/api/generate"]) == 2
    assert (await served(gw.port)).status == 200


async def test_half_close_before_the_response_head(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway(upstream={"read_timeout": 5.0})
    ollama.faults.append("stall")  # Ollama takes the request and says nothing yet (a model loading)
    c = await Client.connect(gw.port)
    c.send(build_request("GET", "/api/tags", headers=KEYED))
    await eventually(lambda: len(ollama.received) == 1, timeout=2)
    c.writer.write_eof()
    disconnect = await ollama.wait_for_disconnect(timeout=1.0)
    assert disconnect.path == "/api/tags"
    assert await read_rest(c) == b""  # no answer at all: nothing was sent, nothing is made up
    await c.close()
    await eventually(lambda: ollama.open_connections == 0)
    assert gw.proxy.pool is not None and gw.proxy.pool.open_count == 0
    assert (await served(gw.port)).status == 200


async def test_half_close_right_after_the_request(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    """Request and FIN arrive together. Whether fastgate forwards before it sees the EOF is a race, but either
    way: no answer is made up, nothing keeps generating upstream, nothing is forwarded twice."""
    gw = await make_gateway(upstream={"read_timeout": 0.5})
    c = await Client.connect(gw.port)
    c.send(generate("fin right away", 1000, gap_ms=20))
    c.writer.write_eof()
    rest = await read_rest(c, timeout=3)
    assert b"0\r\n\r\n" not in rest  # never a complete response
    await c.close()
    await eventually(lambda: pool_busy(gw) == 0 and gw.proxy.in_flight == 0)
    forwarded = [r for r in ollama.received if r.path == "/api/generate"]
    assert len(forwarded) <= 1
    if forwarded:
        await ollama.wait_for_disconnect(timeout=1.0)
    assert (await served(gw.port)).status == 200


# -- a slow reader on a big fast response --------------------------------------------------------------------

@pytest.mark.slow
async def test_slow_reader_of_a_200_mib_response_keeps_memory_flat(tmp_path: Path,
                                                                  ollama: FakeOllama) -> None:
    proc = await FastgateProcess.start("serve", "--config", str(write_config(
        tmp_path / "fastgate.toml", ollama.url, keys=KEYS, extra='[log]\nlevel = "WARNING"')))
    try:
        warm = await Client.connect(proc.port)  # warm up allocator and pool with a fast 8 MiB relay
        resp = await warm.request("GET", f"/fake/bytes?n={8 * 1024 * 1024}", headers=KEYED)
        assert resp.status == 200 and len(resp.body) == 8 * 1024 * 1024
        await warm.close()
        await asyncio.sleep(0.2)
        baseline = peak = proc.rss_kib()

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # a small window, like a slow link
        sock.connect(("127.0.0.1", proc.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
        writer.write(build_request("GET", "/fake/bytes?n=209715200", headers=KEYED))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 209715200" in head
        # From here the StreamReader's small limit pauses the socket whenever 32 KiB wait unread.
        pattern = bytes(range(256)) * 8
        got = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < 3.0:  # 1 KiB/s: 256 bytes every 0.25 s
            data = await asyncio.wait_for(reader.readexactly(256), 5)
            assert data == pattern[got % 256:got % 256 + 256]
            got += 256
            peak = max(peak, proc.rss_kib())
            await asyncio.sleep(0.25)
        growth = peak - baseline
        print(f"slow reader: read {got} bytes in {loop.time() - start:.1f} s; fastgate RSS {baseline} KiB, "
              f"peak growth {growth} KiB")
        assert growth < 4 * 1024, f"fastgate's RSS grew by {growth} KiB for one slow reader"
        writer.transport.abort()
        disconnect = await ollama.wait_for_disconnect(timeout=2.0)
        assert disconnect.path == "/fake/bytes"
        pulled = disconnect.items_sent * 64 * 1024  # the fake writes 64 KiB at a time, as fast as it may
        print(f"slow reader: Ollama got to write {pulled // 1024} KiB of the 200 MiB")
        assert pulled < 32 * 1024 * 1024, "fastgate kept reading from Ollama for a client that did not read"
        assert (await served(proc.port)).status == 200
    finally:
        await proc.stop()


# -- connection floods and idle timeouts ---------------------------------------------------------------------

@pytest.mark.slow
async def test_thousands_of_idle_connections_cannot_lock_out_clients_for_long(make_gateway: MakeGateway,
                                                                             ollama: FakeOllama) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4000:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 1500 connections at both ends")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # A connection that never sends anything is governed by header_timeout (it has not begun a request), an
    # idle kept-alive one by keepalive_timeout: both at 2 s here.
    timeout = 2.0
    gw = await make_gateway(server={"max_connections": 1000, "keepalive_timeout": timeout,
                                    "header_timeout": timeout})
    loop = asyncio.get_running_loop()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened_at = loop.time()
    try:
        for _ in range(15):  # in batches, so the listen backlog never overflows into SYN retries
            idle += await asyncio.gather(*(asyncio.open_connection("127.0.0.1", gw.port) for _ in range(100)))
            await asyncio.sleep(0)
        opened = loop.time() - opened_at

        async def first_bytes(reader: asyncio.StreamReader) -> bytes | None:
            try:
                return await asyncio.wait_for(reader.read(65536), 0.3)
            except asyncio.TimeoutError:
                return None  # held open, silently

        answers = await asyncio.gather(*(first_bytes(r) for r, _ in idle))
        refused = [a for a in answers if a is not None]
        assert len(refused) == 500, f"{len(refused)} of 1500 refused"
        assert all(a.startswith(b"HTTP/1.1 503") and b"Connection: close" in a for a in refused)
        assert len(gw.proxy.connections) == 1000

        # while the idle ones hold every slot, a real client is refused too...
        assert (await served(gw.port)).status == 503
        # ...until they time out, which frees the slots
        while True:
            resp = await served(gw.port)
            if resp.status == 200:
                break
            assert resp.status == 503
            assert loop.time() - opened_at < timeout + opened + 2.0, "idle connections were never timed out"
            await asyncio.sleep(0.05)
        locked_out = loop.time() - opened_at
        print(f"1500 idle connections opened in {opened:.2f} s; a keyed client was served again "
              f"{locked_out:.2f} s after the flood began (timeout {timeout} s)")
        assert timeout - 0.2 <= locked_out <= timeout + opened + 1.5
        # the held connections were closed quietly, without a word
        held = [(r, w) for (r, w), a in zip(idle, answers) if a is None]
        rest = await asyncio.gather(*(asyncio.wait_for(r.read(65536), 2) for r, _ in held))
        assert set(rest) == {b""}
        await eventually(lambda: len(gw.proxy.connections) == 0, timeout=2)
        assert [r.path for r in ollama.received] == ["/api/version"]
    finally:
        for _, w in idle:
            w.transport.abort()
        await asyncio.sleep(0)


@pytest.mark.parametrize("which", ["keepalive", "header"])
async def test_idle_timeouts_close_connections_on_time(make_gateway: MakeGateway, which: str) -> None:
    short, long = 0.5, 5.0
    if which == "keepalive":
        gw = await make_gateway(server={"keepalive_timeout": short, "header_timeout": long})
    else:
        gw = await make_gateway(server={"keepalive_timeout": long, "header_timeout": short})
    loop = asyncio.get_running_loop()
    c = await Client.connect(gw.port)
    if which == "keepalive":
        assert (await c.request("GET", "/api/version", headers=KEYED)).status == 200
    start = loop.time()
    rest = await read_rest(c, timeout=short + 3)
    took = loop.time() - start
    print(f"{which}: idle connection closed after {took:.3f} s (timeout {short} s)")
    assert rest == b""  # closed quietly: no 408 for a connection that had not begun a request
    assert short - 0.05 <= took <= short + 1.0
    await c.close()
    # and the other timeout does not cut a connection early: a kept-alive connection under header_timeout
    # stays open past it, a new one under keepalive_timeout stays open past that
    c = await Client.connect(gw.port)
    if which == "header":
        assert (await c.request("GET", "/api/version", headers=KEYED)).status == 200
        assert not await c.closed(timeout=short + 0.5)
    else:
        assert not await c.closed(timeout=short + 0.5)
        assert (await c.request("GET", "/api/version", headers=KEYED)).status == 200
    await c.close()


async def test_byte_by_byte_heads_get_408_on_an_absolute_deadline_while_others_are_served(
        make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    header_timeout = 0.5
    gw = await make_gateway(server={"header_timeout": header_timeout})
    loop = asyncio.get_running_loop()
    raw = build_request("GET", "/api/tags", headers=KEYED)  # a valid head, but it would take ~8 s to arrive

    async def slowloris() -> tuple[int, float]:
        c = await Client.connect(gw.port)
        start = loop.time()

        async def trickle() -> None:
            for byte in raw:
                c.send(bytes([byte]))
                await asyncio.sleep(0.1)

        sender = loop.create_task(trickle())
        try:
            resp = await c.response(timeout=header_timeout + 3)
            return resp.status, loop.time() - start
        finally:
            sender.cancel()
            await c.close()

    async def legit() -> list[float]:
        latencies = []
        c = await Client.connect(gw.port)
        for _ in range(15):
            t = loop.time()
            assert (await c.request("GET", "/api/version", headers=KEYED)).status == 200
            latencies.append(loop.time() - t)
            await asyncio.sleep(0.04)
        await c.close()
        return latencies

    *slow, latencies = await asyncio.gather(*(slowloris() for _ in range(20)), legit())
    print(f"slowloris: 408 after {max(t for _, t in slow):.3f} s at most; others' worst latency "
          f"{max(latencies) * 1000:.1f} ms")
    assert all(status == 408 for status, _ in slow), slow
    assert all(header_timeout - 0.05 <= t <= header_timeout + 1.0 for _, t in slow), slow
    assert max(latencies) < 0.25
    assert {r.path for r in ollama.received} == {"/api/version"} and len(ollama.received) == 15


# -- upstream framing Ollama never sends, from a raw upstream ------------------------------------------------

Responder = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class RawUpstream:
    """A minimal HTTP/1.1 server: reads request heads (no bodies) and lets the test write the answers."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.connections = 0
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request head)
        self.server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return "http://127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        number = self.connections
        try:
            while True:
                try:
                    request = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append((number, request))
                if not await self.respond(number, reader, writer):
                    return
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()


EXTRA = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("when", ["same-write", "later"])
async def test_bytes_after_the_response_end_never_reach_the_client(make_gateway: MakeGateway, framing: str,
                                                                   when: str) -> None:
    async def respond(number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if framing == "content-length":
            answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
        else:
            answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5\r\nhello\r\n0\r\n\r\n")
        if when == "same-write":
            writer.write(answer + EXTRA)
        else:
            writer.write(answer)
            await writer.drain()
            await asyncio.sleep(0.1)  # the connection is back in fastgate's pool by now
            writer.write(EXTRA)
        await writer.drain()
        return True

    async with RawUpstream(respond) as upstream:
        gw = await make_gateway(upstream_url=upstream.url)
        c = await Client.connect(gw.port)
        try:
            first = await c.request("GET", "/api/version", headers=KEYED)
            assert first.status == 200 and first.body == b"hello" and first.complete
            await asyncio.sleep(0.3)
            try:
                extra = await asyncio.wait_for(c.reader.read(65536), 0.2)
            except asyncio.TimeoutError:
                extra = b""
            assert extra == b"", f"bytes beyond the response reached the client: {extra!r}"
            second = await c.request("GET", "/api/version", headers=KEYED)
            assert second.status == 200 and second.body == b"hello", second.raw
            assert b"SMUGGLED" not in first.raw + second.raw
            # the connection that talked out of turn was dropped: the second request went on a new one
            assert [n for n, _ in upstream.requests] == [1, 2]
        finally:
            await c.close()


CLOSE_DELIMITED_BODY = bytes(range(256)) * 400  # 100 KiB, sent in three writes
LENGTH_HEADER = b"Content-Length: %d\r\n" % len(CLOSE_DELIMITED_BODY)


@pytest.mark.parametrize("status_line,headers,length_known", [
    pytest.param(b"HTTP/1.0 200 OK", b"Content-Type: text/plain\r\n", False, id="http10-no-length"),
    pytest.param(b"HTTP/1.1 200 OK", b"Connection: close\r\n", False, id="http11-connection-close-no-length"),
    pytest.param(b"HTTP/1.1 200 OK", b"Connection: close\r\n" + LENGTH_HEADER, True,
                 id="http11-connection-close-with-length"),
    pytest.param(b"HTTP/1.0 200 OK", LENGTH_HEADER, True, id="http10-with-length"),
])
async def test_upstream_closing_after_its_response(make_gateway: MakeGateway, status_line: bytes,
                                                   headers: bytes, length_known: bool) -> None:
    async def respond(number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(status_line + b"\r\n" + headers + b"\r\n")
        third = len(CLOSE_DELIMITED_BODY) // 3
        for piece in (CLOSE_DELIMITED_BODY[:third], CLOSE_DELIMITED_BODY[third:2 * third],
                      CLOSE_DELIMITED_BODY[2 * third:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.close()
        return False

    async with RawUpstream(respond) as upstream:
        gw = await make_gateway(upstream_url=upstream.url)
        c = await Client.connect(gw.port)
        try:
            resp = await c.request("GET", "/api/version", headers=KEYED)
            assert resp.status == 200 and resp.complete
            assert resp.body == CLOSE_DELIMITED_BODY
            if length_known:
                # the length tells the client where the body ends: its connection can stay
                assert resp.header("content-length") == str(len(CLOSE_DELIMITED_BODY))
                again = await c.request("GET", "/api/version", headers=KEYED)
                assert again.status == 200 and again.body == CLOSE_DELIMITED_BODY
                assert [n for n, _ in upstream.requests] == [1, 2]  # never reused after a close
            else:
                # only the close ends the body, so fastgate must close the client's connection too
                assert resp.header("content-length") is None and resp.header("transfer-encoding") is None
                assert await c.closed(timeout=2)
                assert (await served(gw.port)).status == 200
        finally:
            await c.close()


# -- load: nothing lost under concurrency --------------------------------------------------------------------

async def test_burst_of_200_streams_over_50_connections_arrives_byte_complete(make_gateway: MakeGateway,
                                                                             ollama: FakeOllama) -> None:
    gw = await make_gateway()
    per_conn, conns = 4, 50

    def request(i: int) -> tuple[bytes, int, bool]:
        n = 20 + i % 13
        if i % 2:  # chat, through the fake's ordinary per-item writes
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"burst {i}"}],
                    "options": {"num_predict": n}}
            return build_request("POST", "/api/chat", headers=KEYED, body=json.dumps(body).encode()), n, True
        # generate in the fake's lean mode: its last item carries the CRC-32 of every token item's bytes
        return generate(f"burst {i}", n, fake_lean=True), n, False

    async def one_connection(k: int) -> int:
        c = await Client.connect(gw.port)
        reqs = [request(k * per_conn + j) for j in range(per_conn)]
        c.send(b"".join(raw for raw, _, _ in reqs))  # pipelined: four streams queued on one connection
        for raw, n, chat in reqs:
            resp = await c.response(timeout=20)
            assert resp.status == 200 and resp.complete
            assert len(resp.chunks) == n + 1
            assert all(ch.endswith(b"\n") and ch.count(b"\n") == 1 for ch in resp.chunks)
            items = [json.loads(ch) for ch in resp.chunks]
            texts = [it["message"]["content"] if chat else it["response"] for it in items[:-1]]
            assert texts == [f"tok{t} " for t in range(n)]
            assert items[-1]["done"] is True and items[-1]["eval_count"] == n
            if not chat:
                crc = 0
                for ch in resp.chunks[:-1]:
                    crc = zlib.crc32(ch, crc)
                assert crc == items[-1]["fake_crc32"], "token bytes differ from what Ollama sent"
        await c.close()
        return per_conn

    done = await asyncio.gather(*(one_connection(k) for k in range(conns)))
    assert sum(done) == 200
    sent = sorted(f"burst {i}" for i in range(200))
    got = sorted(r.json().get("prompt") or r.json()["messages"][0]["content"] for r in ollama.received)
    assert got == sent  # each request reached Ollama exactly once
    await eventually(lambda: gw.proxy.in_flight == 0)


async def test_early_answer_to_a_partial_upload_releases_the_connection(make_gateway: MakeGateway,
                                                                        ollama: FakeOllama) -> None:
    """Ollama answers 200 for a blob it has before the body is in; fastgate relays it, lingers and then lets
    the connection go (it used to leak it: the pump and the lingering close both read the client)."""
    gw = await make_gateway(server={"max_connections": 3})
    digest = "sha256:" + "cd" * 32
    ollama.blobs.add(digest)
    for _ in range(5):  # more than max_connections: a leak would turn into 503s
        c = await Client.connect(gw.port)
        c.send(build_request("POST", f"/api/blobs/{digest}",
                             headers=[("X-API-Key", KEY1), ("Content-Length", "100000")]) + b"x" * 1000)
        resp = await c.response()
        assert resp.status == 200
        await c.close()
    for _ in range(50):
        if not gw.proxy.connections:
            break
        await asyncio.sleep(0.1)
    assert not gw.proxy.connections
    ok = await Client.connect(gw.port)
    assert (await ok.request("GET", "/api/version", headers={"X-API-Key": KEY1})).status == 200
    await ok.close()


async def test_non_ascii_basic_authorization_is_a_plain_401(client: Client) -> None:
    client.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Basic \xe9\r\n\r\n")
    assert (await client.response()).status == 401


def test_relay_into_a_closed_client_transport_ends_as_client_gone() -> None:
    """uvloop raises on writes to a transport that closed before connection_lost reached us."""
    from fastgate.config import UpstreamConfig
    from fastgate.messages import parse_response_head
    from fastgate.upstream import RelayOutcome, UpstreamConnection, UpstreamPool

    class ClosedSink:
        def write(self, data: bytes) -> None:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    class FakeTransport:
        aborted = False

        def abort(self) -> None:
            self.aborted = True

        def get_extra_info(self, name: str) -> None:
            return None

    loop = asyncio.new_event_loop()
    try:
        pool = UpstreamPool(UpstreamConfig(), loop=loop)
        conn = UpstreamConnection(pool)
        transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.send_head = lambda *a: None  # type: ignore[method-assign]
        head = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"POST")
        from fastgate.upstream import ConnState
        conn.state = ConnState.HEAD_READY
        done = conn.start_relay(head, ClosedSink(), b"HTTP/1.1 200 OK\r\n\r\n")
        assert done.done() and done.result() is RelayOutcome.CLIENT_GONE
        assert transport.aborted  # and Ollama's connection is closed at once
    finally:
        pool.close()
        loop.close()
