"""Review of the several-backends fan-out: what one misbehaving backend can make fastgate hold.

A backend is an Ollama the operator configured, but a confused or compromised one must not be able to make the
gateway buffer without bound: a listing far larger than any model list, an answer to a delete that never ends,
an error body before a pull stream that never ends. Each is cut off at a bound and the backend counted as failed;
the other backends' answers still reach the client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from fastgate import fanout
from fastgate.routing import pollers
from fastgate.server import RunningServer
from tests.backends_support import Fakes, Start, fake_ollamas, gateways
from tests.fake_ollama import FakeOllama
from tests.test_backends import LLAMA, QWEN, until, views
from tests.test_backends_fanout import MANAGED, SLOW_POLLS, call, names

pytestmark = pytest.mark.timeout(60)

PHI = "phi3:mini"
# What a request waits for before the test calls it a hang (the fixed gateway answers in well under a second).
HANG_S = 15.0

Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


class RawBackend:
    """A backend speaking just enough HTTP/1.1 for fastgate's pollers, with chosen answers for some paths."""

    def __init__(self, answers: dict[tuple[str, str], Answer]) -> None:
        self.answers = answers
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.sent = 0  # body bytes of the endless answers written so far
        self.handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                answer = self.answers.get((method, path))
                if answer is not None:
                    await answer(writer)
                    return
                if path == "/api/version":
                    body = b'{"version":"0.9.0"}'
                elif path in ("/api/tags", "/api/ps"):
                    body = b'{"models":[]}'
                else:
                    body = b'{"error":"not found"}'
                status = b"200 OK" if body != b'{"error":"not found"}' else b"404 Not Found"
                writer.write(b"HTTP/1.1 %s\r\nContent-Type: application/json; charset=utf-8\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.handlers.discard(task)
            writer.close()

    def endless(self, status: bytes) -> Answer:
        """An answer with `status` whose chunked body never ends (until fastgate hangs up)."""
        async def answer(writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         % status)
            piece = b" " * 65536
            chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
            while True:
                writer.write(chunk)
                await writer.drain()
                self.sent += len(piece)
        return answer


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    async with fake_ollamas() as make:
        yield make


@pytest.fixture
async def gateway_for() -> AsyncIterator[Start]:
    async with gateways(MANAGED) as make:
        yield make


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[dict[tuple[str, str], Answer]], Awaitable[RawBackend]]]:
    started: list[RawBackend] = []

    async def make(answers: dict[tuple[str, str], Answer]) -> RawBackend:
        backend = RawBackend(answers)
        await backend.start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.stop()


async def ready(gw: RunningServer, a: FakeOllama) -> None:
    """Both backends up, and the fake's first polls over (the raw backend's listing may never be readable)."""
    await until(lambda: {"/api/version", "/api/tags", "/api/ps"} <= {r.path for r in a.received})
    await until(lambda: len(views(gw)) == 2 and all(view.state == "up" for view in views(gw).values())
                and views(gw)["a"].inventory_known)


def fixed(status: bytes, body: bytes) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 %s\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s"
                     % (status, len(body), body))
        await writer.drain()
    return answer


async def test_a_listing_past_the_limit_is_left_out_of_the_merged_one(
        fakes: Fakes, gateway_for: Start, raw: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """pollers.fetch read a whole listing into memory whatever its size (MAX_LISTING_BYTES was only checked by
    model_names, after the read, and the fan-out did not check it at all): a backend could make every
    /api/tags hold as much as it sent within the listing timeout."""
    limit = 64 * 1024
    monkeypatch.setattr(pollers, "MAX_LISTING_BYTES", limit)
    huge = json.dumps({"models": [{"name": "huge:latest", "model": "huge:latest", "padding": "x" * (4 * limit)}]})
    a = await fakes([QWEN])
    b = await raw({("GET", "/api/tags"): fixed(b"200 OK", huge.encode())})
    gw = await gateway_for([{"name": "a", "url": a.url}, {"name": "b", "url": b.url}], **SLOW_POLLS)
    await ready(gw, a)
    tags = await asyncio.wait_for(call(gw.port, "GET", "/api/tags"), HANG_S)
    assert tags.status == 200
    assert names(tags) == [QWEN]  # b's answer was cut off at the limit: left out, as a backend that failed


async def test_a_delete_answer_that_never_ends_is_cut_off(fakes: Fakes, gateway_for: Start, raw: Any) -> None:
    """A delete's answer (as a copy's, or a pull's without a stream) was read whole into a BufferSink with no
    bound: a backend answering without end grew the gateway's memory until it died, and the client hung."""
    a = await fakes([LLAMA])
    b = await raw({("DELETE", "/api/delete"): None})
    b.answers[("DELETE", "/api/delete")] = b.endless(b"200 OK")
    gw = await gateway_for([{"name": "a", "url": a.url}, {"name": "b", "url": b.url}], **SLOW_POLLS)
    await ready(gw, a)
    resp = await asyncio.wait_for(call(gw.port, "DELETE", "/api/delete", body={"model": LLAMA}), HANG_S)
    assert resp.status == 502
    assert resp.json()["error"] == (f"delete failed on b: answer larger than {fanout.MAX_ANSWER_BYTES} bytes "
                                    "(succeeded on a)")
    assert b.sent < 64 * fanout.MAX_ANSWER_BYTES  # it was hung up on, not read for the whole wait
    assert not a._has_model(LLAMA)


async def test_an_error_before_a_pull_stream_that_never_ends_is_cut_off(
        fakes: Fakes, gateway_for: Start, raw: Any) -> None:
    """The same through a streamed pull: a backend refusing it (non-200) with an endless body held the whole
    pull (and the client) while fastgate buffered that body."""
    a = await fakes([QWEN])
    b = await raw({})
    b.answers[("POST", "/api/pull")] = b.endless(b"500 Internal Server Error")
    gw = await gateway_for([{"name": "a", "url": a.url}, {"name": "b", "url": b.url}], **SLOW_POLLS)
    await ready(gw, a)
    resp = await asyncio.wait_for(call(gw.port, "POST", "/api/pull", body={"model": PHI}), HANG_S)
    assert resp.status == 200 and resp.complete
    lines = resp.lines
    assert {"status": f"failed: answer larger than {fanout.MAX_ANSWER_BYTES} bytes", "backend": "b"} in lines
    assert lines[-1] == {"error": f"pull failed on b: answer larger than {fanout.MAX_ANSWER_BYTES} bytes "
                                  "(succeeded on a)"}
    assert a._has_model(PHI)


async def test_a_backends_long_error_is_shortened_in_the_answer_and_the_log(
        fakes: Fakes, gateway_for: Start, caplog: pytest.LogCaptureFixture) -> None:
    """A backend's error message went whole into its `failed:` line, the pull's last line and a log line (up to
    the 8 MiB a progress line may hold, per backend and request): one request could write megabytes of log."""
    a, b = await fakes([QWEN]), await fakes([LLAMA])
    b.pull_error = "registry says: " + "x" * 100_000
    gw = await gateway_for([{"name": "a", "url": a.url}, {"name": "b", "url": b.url}], **SLOW_POLLS)
    await ready(gw, a)
    with caplog.at_level("INFO", logger="fastgate"):
        resp = await asyncio.wait_for(call(gw.port, "POST", "/api/pull", body={"model": PHI}), HANG_S)
    assert resp.status == 200 and resp.complete
    final = resp.lines[-1]["error"]
    assert final.startswith("pull failed on b: registry says: xxx") and final.endswith("(succeeded on a)")
    assert len(final) < 1000
    assert all(len(line) < 2000 for line in resp.body.split(b"\n"))
    assert max(len(record.getMessage()) for record in caplog.records) < 2000


async def test_a_chunked_listing_is_read(fakes: Fakes, gateway_for: Start) -> None:
    """Ollama (Go) sends any answer over 2 KiB chunked, /api/tags of a dozen models included. pollers.fetch
    returned the wire's bytes, chunk sizes and all, so such a backend's listing never parsed: the router never
    learnt its models, and merged /api/tags, /api/ps and /v1/models left it out as "not a model listing"."""
    many = [f"model{i}:latest" for i in range(12)]
    a, b = await fakes(many), await fakes([LLAMA])
    gw = await gateway_for([{"name": "a", "url": a.url}, {"name": "b", "url": b.url}], **SLOW_POLLS)
    await ready(gw, a)  # waits, among others, for a's models to be known
    assert views(gw)["a"].models == len(many)
    tags = await call(gw.port, "GET", "/api/tags")
    assert tags.status == 200 and names(tags) == sorted([*many, LLAMA])
    models = await call(gw.port, "GET", "/v1/models")
    assert names(models, "data", "id") == sorted([*many, LLAMA])


async def test_a_chunked_error_answer_is_read(fakes: Fakes, gateway_for: Start) -> None:
    """The same for the answers a fan-out reads whole: a pull without a stream that failed with an error over
    2 KiB (chunked by Go) was reported with its chunk framing as the message (`pull failed on b: bd3\\r\\n{...`)."""
    a, b = await fakes([QWEN]), await fakes([LLAMA])
    b.pull_error = "registry says: " + "x" * 3000
    gw = await gateway_for([{"name": "a", "url": a.url}, {"name": "b", "url": b.url}], **SLOW_POLLS)
    await ready(gw, a)
    resp = await asyncio.wait_for(call(gw.port, "POST", "/api/pull", body={"model": PHI, "stream": False}), HANG_S)
    assert resp.status == 500
    assert resp.json()["error"].startswith("pull failed on b: registry says: xxx")
