"""bench/floor.py, the design-floor target: it forwards requests without the key and relays responses byte for
byte as they arrive, finding each response's end from its framing (the next request on the connection
depends on it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from bench import floor
from tests.fake_ollama import FakeOllama

DEADLINE_S = 10.0  # a deadline for a hang, not a timing assertion


class Floor:
    """bench/floor.py's connection handler on a listener of the test's own; `stop()` waits for its connections
    to end (their clients are closed first), so that nothing is left open when the loop closes."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self, upstream_port: int) -> int:
        addr = ("127.0.0.1", upstream_port)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
            await floor.handle(reader, writer, addr)

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return _port(self.server)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=DEADLINE_S)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


def _port(server: asyncio.AbstractServer) -> int:
    return server.sockets[0].getsockname()[1]


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Head and (de-chunked or counted) body of one response, read independently of bench/floor.py."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return head, body
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
    length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
    return head, await reader.readexactly(length)


async def test_floor_forwards_to_ollama_without_the_key(ollama: FakeOllama) -> None:
    proxy = Floor()
    port = await proxy.start(ollama.port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        host = "gateway.example.com"  # a name Ollama's DNS-rebinding guard refuses: the floor sends its own
        writer.write(f"GET /api/version HTTP/1.1\r\nHost: {host}\r\nX-API-Key: secret-key\r\n"
                     f"Authorization: Bearer other\r\n\r\n".encode())
        head, body = await asyncio.wait_for(_read_response(reader), DEADLINE_S)
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body) == {"version": ollama.version}
        payload = b'{"model":"llama3.2","prompt":"hi","options":{"num_predict":4,"fake_split_chunks":true}}'
        writer.write(f"POST /api/generate HTTP/1.1\r\nHost: {host}\r\nX-API-Key: secret-key\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        head, body = await asyncio.wait_for(_read_response(reader), DEADLINE_S)
        lines = [json.loads(x) for x in body.splitlines()]
        assert head.startswith(b"HTTP/1.1 200 ") and len(lines) == 5 and lines[-1]["done"] is True
        # pipelined: the second request is what the first one's parser left over
        writer.write(f"GET /api/version HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() * 2)
        for _ in range(2):
            head, body = await asyncio.wait_for(_read_response(reader), DEADLINE_S)
            assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body) == {"version": ollama.version}
        await _close(writer)
    finally:
        await proxy.stop()
    generate = [r for r in ollama.received if r.path == "/api/generate"]
    assert len(generate) == 1 and generate[0].body == payload
    for r in ollama.received:
        assert r.header("x-api-key") is None and r.header("authorization") is None
        assert r.header("host") == f"127.0.0.1:{ollama.port}"
    assert ollama.connections_opened == 1  # one keep-alive upstream connection for both requests


class Scripted:
    """An upstream that records the raw requests it gets and answers each with a list of pieces, written one
    by one; before a piece given as an asyncio.Event it waits for that event."""

    def __init__(self, answers: list[list[bytes | asyncio.Event]]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return _port(self.server)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                if b"transfer-encoding: chunked" in lower:
                    head += await reader.readuntil(b"\r\n0\r\n\r\n")
                elif b"content-length:" in lower:
                    head += await reader.readexactly(int(lower.split(b"content-length:")[1].split(b"\r\n")[0]))
                self.requests.append(head)
                for piece in self.answers.pop(0):
                    if isinstance(piece, asyncio.Event):
                        await piece.wait()
                    else:
                        writer.write(piece)
                        await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[list[Scripted]]:
    made: list[Scripted] = []
    yield made
    for s in made:
        if s.server is not None:
            s.server.close()


async def test_floor_relays_a_chunked_stream_byte_for_byte_as_it_arrives(scripted: list[Scripted]) -> None:
    go = asyncio.Event()
    first = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhel"
    # chunk-size lines and the trailer split across writes, a chunk extension and a trailer: only the framing
    # tells where this response ends
    pieces = [first, go, b"lo\r\n1", b"A\r\nabcdefghijklmnopqrstuvwxyz\r", b"\n0\r\nX-Trailer: t\r", b"\n\r\n"]
    second = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    up = Scripted([pieces, [second]])
    scripted.append(up)
    proxy = Floor()
    up_port = await up.start()
    port = await proxy.start(up_port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b"chunked request body"
        writer.write(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        # the first piece reaches the client while the upstream still holds the rest back
        assert await asyncio.wait_for(reader.readexactly(len(first)), DEADLINE_S) == first
        go.set()
        rest = b"".join(p for p in pieces[2:] if isinstance(p, bytes))
        assert await asyncio.wait_for(reader.readexactly(len(rest)), DEADLINE_S) == rest
        writer.write(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(len(second)), DEADLINE_S) == second
        await _close(writer)
    finally:
        await proxy.stop()
    assert up.connections == 1
    forwarded = up.requests[0]
    assert b"x-api-key" not in forwarded.lower()
    assert forwarded.startswith(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % up_port)
    # the body re-chunked: the same bytes once the chunk framing is taken off
    data = forwarded.split(b"\r\n\r\n", 1)[1]
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    assert out == body


async def test_floor_counts_a_content_length_body_over_reads_and_keeps_what_follows(
        scripted: list[Scripted]) -> None:
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"
    second = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo"
    up = Scripted([[first], [second]])
    scripted.append(up)
    proxy = Floor()
    port = await proxy.start(await up.start())
    body = b'{"model":"llama3.2","prompt":"' + b"x" * 5000 + b'"}'
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body[:1000])
        await writer.drain()
        await asyncio.sleep(0.05)  # most likely a read of its own; the outcome must not depend on it
        # the rest of the body and the next request in one write: the body's end is where the count says
        writer.write(body[1000:] + b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(len(first + second)), DEADLINE_S) == first + second
        await _close(writer)
    finally:
        await proxy.stop()
    assert len(up.requests) == 2
    assert up.requests[0].endswith(b"\r\n\r\n" + body)
    assert up.requests[1].startswith(b"GET /api/version HTTP/1.1\r\n")


async def test_floor_answers_502_without_an_upstream_and_400_to_garbage(scripted: list[Scripted]) -> None:
    up = Scripted([])
    scripted.append(up)
    port = await up.start()
    assert up.server is not None
    up.server.close()
    await up.server.wait_closed()
    proxy = Floor()
    port = await proxy.start(port)
    try:
        for request, status in ((b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n", b"502"),
                                (b"NOT HTTP\r\n\r\n", b"400")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            assert (await asyncio.wait_for(reader.read(), DEADLINE_S)).startswith(b"HTTP/1.1 " + status + b" ")
            await _close(writer)
    finally:
        await proxy.stop()


def test_report_puts_the_floor_beside_nginx_and_fastgate_figures_only() -> None:
    from bench import report

    def rnd(fg: float, ng: float, fl: float) -> dict[str, object]:
        res = {n: {"small": {"cpu_per_request_us": v, "requests_per_s": 100.0},
                   "auth": {"good_key_ok": True, "stream_ok": True, "bad_key_401": n != "floor"}}
               for n, v in (("fastgate", fg), ("nginx", ng), ("floor", fl))}
        res["direct"] = {"small": {"cpu_per_request_us": 0.0, "requests_per_s": 1000.0}}
        return {"order": [], "calibration_ms": 1.0, "system": {}, "results": res}

    names = ["direct", "fastgate", "floor", "nginx"]
    data = report.build({"system": {}}, names, [rnd(80.0, 10.0, 40.0), rnd(60.0, 10.0, 30.0)] * 4)
    by_text = {g["goal"]: g for g in data["goals"]}
    floor_cpu = by_text["design floor: CPU per small request, ratio to nginx"]
    assert floor_cpu["rounds"] == [4.0, 3.0] * 4 and floor_cpu["median"] == 3.5
    assert floor_cpu["verdict"] == "reported" and "(figures only)" in report._goal_line(floor_cpu)
    assert by_text["fastgate vs design floor: CPU per small request"]["rounds"] == [2.0, 2.0] * 4
    # fastgate's own goal is still judged against nginx
    assert [g["verdict"] for g in data["goals"] if g["goal"].startswith("CPU per small request")] == ["missed"]
    # the floor answers any key: the auth phase's 200s to wrong keys are not a failure of its
    assert data["correctness"]["floor"]["bad_key_401"] is None
    assert data["correctness"]["fastgate"]["bad_key_401"] is True
