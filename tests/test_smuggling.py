"""Request smuggling: every ambiguous way to frame a request, sent raw to fastgate with a valid key.

fastgate parses each request with h11 and writes a fresh head (its own framing) for Ollama, so the property
to prove is simple: what reaches Ollama is exactly one request carrying exactly the body the client meant,
or nothing at all. For each variant the table says whether fastgate accepts it (then the fake Ollama must have
received the intended body, byte for byte, and nothing else) or refuses it (then the status, a closed
connection, and nothing forwarded). After a refusal a fresh connection must still be served.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

import pytest

from fastgate.server import RunningServer
from tests.conftest import KEY1, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.rawhttp import Client, RawResponse, build_request

pytestmark = pytest.mark.timeout(20)

K = KEY1.encode()
SHOW = b'{"model":"llama3.2:latest"}'  # the body every accepted variant means to send (27 bytes)
SHOW_LEN = str(len(SHOW)).encode()
# A complete second request an attacker would like Ollama to run (it has no key: fastgate would refuse it).
HIDDEN = (b"DELETE /api/delete HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 30\r\n\r\n"
          b'{"model":"llama3.2:latest"}   ')
BODY_TIMEOUT = 0.5


def chunked(*parts: bytes, last: bytes = b"0\r\n\r\n") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + last


def head(*lines: bytes, start: bytes = b"POST /api/show HTTP/1.1", eol: bytes = b"\r\n") -> bytes:
    """A request head: the start line, Host and the key, then `lines`, then the blank line."""
    return eol.join([start, b"Host: gateway.example.com", b"X-API-Key: " + K, *lines]) + eol + eol


@dataclass(frozen=True)
class Accepted:
    raw: bytes
    body: bytes = SHOW  # what Ollama must receive
    target: str = "/api/show"


@dataclass(frozen=True)
class Refused:
    raw: bytes
    statuses: tuple[int | None, ...]  # acceptable answers; None: a close without an answer is fine too
    # "head": refused before anything goes upstream (no upstream connection at all); "body": the head may
    # have been forwarded, but the request must never complete at Ollama and its connection must be closed.
    stage: str = "head"


CL = b"Content-Length: " + SHOW_LEN
TE = b"Transfer-Encoding: chunked"
CHUNK = b"%x" % len(SHOW)  # the size line of a single chunk holding SHOW


def ok(case_id: str, raw: bytes, body: bytes = SHOW):  # type: ignore[no-untyped-def]
    return pytest.param(Accepted(raw, body), id=case_id)


def no(case_id: str, raw: bytes, *statuses: int | None, stage: str = "head"):  # type: ignore[no-untyped-def]
    return pytest.param(Refused(raw, statuses, stage), id=case_id)


ACCEPTED = [
    ok("baseline-content-length", head(CL) + SHOW),
    ok("baseline-chunked", head(TE) + chunked(SHOW[:10], SHOW[10:])),
    ok("te-leading-spaces-ows", head(b"Transfer-Encoding:    chunked") + chunked(SHOW)),
    ok("te-Chunked-case-insensitive", head(b"Transfer-Encoding: Chunked") + chunked(SHOW)),
    ok("te-trailing-ows", head(b"Transfer-Encoding: chunked   ") + chunked(SHOW)),
    ok("cl-duplicate-same-value", head(CL, CL) + SHOW),
    ok("cl-comma-same-values", head(CL + b", " + SHOW_LEN) + SHOW),
    ok("cl-leading-spaces-ows", head(b"Content-Length:     " + SHOW_LEN) + SHOW),
    ok("cl-leading-zeros", head(b"Content-Length: 00" + SHOW_LEN) + SHOW),
    # obs-fold: the folded "Transfer-Encoding: chunked" is part of X-Note's value, not a header of its own.
    ok("obs-fold-hides-te", head(b"X-Note: a", b" Transfer-Encoding: chunked", CL) + SHOW),
    ok("obs-fold-hides-cl", head(b"X-Note: a", b"\tContent-Length: 0", CL) + SHOW),
    ok("bare-lf-line-endings", head(CL, eol=b"\n") + SHOW),
    ok("mixed-crlf-and-lf", head(b"X-Note: mixed\n" + CL) + SHOW),
    ok("absolute-form-target", head(CL, start=b"POST http://evil.example:8080/api/show HTTP/1.1") + SHOW),
    ok("chunk-size-20-hex-digits-leading-zeros",
       head(TE) + CHUNK.zfill(20) + b"\r\n" + SHOW + b"\r\n0\r\n\r\n"),
    ok("chunk-extensions", head(TE) + CHUNK + b";name=value;flag\r\n" + SHOW + b"\r\n0;last=1\r\n\r\n"),
    ok("chunk-size-trailing-ows", head(TE) + CHUNK + b" \t\r\n" + SHOW + b"\r\n0\r\n\r\n"),
    ok("trailers", head(TE) + chunked(SHOW, last=b"0\r\nX-Trailer: v\r\nContent-Length: 999\r\n\r\n")),
    # "Transfer_Encoding" is an ordinary header to fastgate, h11 and Go alike: Content-Length frames the body.
    ok("te-underscore-is-not-te", head(b"Transfer_Encoding: chunked", CL) + SHOW),
    # The body is only bytes: a request inside it is never a request.
    ok("request-hidden-in-cl-body",
       head(b"Content-Length: %d" % (len(SHOW) + 4 + len(HIDDEN))) + SHOW + b"\r\n\r\n" + HIDDEN,
       body=SHOW + b"\r\n\r\n" + HIDDEN),
    ok("request-hidden-in-chunk-data", head(TE) + chunked(SHOW + b"\r\n0\r\n\r\n" + HIDDEN),
       body=SHOW + b"\r\n0\r\n\r\n" + HIDDEN),
]

REFUSED = [
    no("cl-te", head(CL, TE) + b"0\r\n\r\n" + HIDDEN[: len(SHOW) - 5], 400),
    no("te-cl", head(TE, b"Content-Length: 3") + chunked(SHOW) + HIDDEN, 400),
    no("te-xchunked", head(b"Transfer-Encoding: xchunked", CL) + SHOW, 501),
    no("te-xchunked-alone", head(b"Transfer-Encoding: xchunked") + chunked(SHOW), 501),
    no("te-chunked-identity", head(b"Transfer-Encoding: chunked, identity") + chunked(SHOW), 501),
    no("te-identity-chunked", head(b"Transfer-Encoding: identity, chunked") + chunked(SHOW), 501),
    no("te-gzip-chunked", head(b"Transfer-Encoding: gzip, chunked") + chunked(SHOW), 501),
    no("te-twice", head(TE, TE) + chunked(SHOW), 501),
    no("te-identity-then-chunked", head(b"Transfer-Encoding: identity", TE) + chunked(SHOW), 501),
    no("te-space-before-colon", head(b"Transfer-Encoding : chunked", CL) + SHOW, 400),
    no("te-tab-before-colon", head(b"Transfer-Encoding\t: chunked") + chunked(SHOW), 400),
    no("te-vertical-tab", head(b"Transfer-Encoding:\x0bchunked", CL) + SHOW, 400),
    no("te-trailing-vertical-tab", head(b"Transfer-Encoding: chunked\x0b") + chunked(SHOW), 400),
    no("te-form-feed", head(b"Transfer-Encoding: \x0cchunked") + chunked(SHOW), 400),
    no("te-nul", head(b"Transfer-Encoding: chunked\x00", CL) + SHOW, 400),
    no("bare-cr-in-value", head(b"X-Note: a\rTransfer-Encoding: chunked", CL) + SHOW, 400),
    no("fold-on-first-header-line",
       b"POST /api/show HTTP/1.1\r\n Transfer-Encoding: chunked\r\n" + head(CL)[25:] + SHOW, 400),
    no("cl-duplicate-different", head(CL, b"Content-Length: 28") + SHOW + b"x", 400),
    no("cl-comma-different", head(CL + b", 28") + SHOW + b"x", 400),
    no("cl-plus-sign", head(b"Content-Length: +" + SHOW_LEN) + SHOW, 400),
    no("cl-negative", head(b"Content-Length: -" + SHOW_LEN) + SHOW, 400),
    no("cl-hex", head(b"Content-Length: 0x1b") + SHOW, 400),
    no("cl-inner-space", head(b"Content-Length: 2 7") + SHOW, 400),
    no("cl-space-before-colon", head(b"Content-Length : " + SHOW_LEN) + SHOW, 400),
    no("nul-in-header-name", head(b"X-A\x00b: 1", CL) + SHOW, 400),
    no("control-byte-in-header-name", head(b"X-A\x01b: 1", CL) + SHOW, 400),
    no("space-in-header-name", head(b"X-A b: 1", CL) + SHOW, 400),
    no("header-without-colon", head(b"no colon here", CL) + SHOW, 400),
    no("nul-in-header-value", head(b"X-A: a\x00b", CL) + SHOW, 400),
    # RFC 9110 section 5.5: other CTLs are invalid too and may only be kept where no HTTP parser will see
    # them; Ollama's (Go's) parser refuses them, so fastgate must not pass them on.
    no("control-byte-in-header-value", head(b"X-A: a\x01b", CL) + SHOW, 400),
    no("del-in-header-value", head(b"X-A: a\x7fb", CL) + SHOW, 400),
    no("asterisk-form-target", head(CL, start=b"OPTIONS * HTTP/1.1") + SHOW, 400),
    no("authority-form-target", head(CL, start=b"CONNECT 127.0.0.1:11434 HTTP/1.1") + SHOW, 400),
    no("request-line-two-spaces-1", head(CL, start=b"POST  /api/show HTTP/1.1") + SHOW, 400),
    no("request-line-two-spaces-2", head(CL, start=b"POST /api/show  HTTP/1.1") + SHOW, 400),
    no("request-line-tab", head(CL, start=b"POST\t/api/show HTTP/1.1") + SHOW, 400),
    no("request-line-nul", head(CL, start=b"POST /api/show\x00 HTTP/1.1") + SHOW, 400),
    no("request-line-lowercase-version", head(CL, start=b"POST /api/show http/1.1") + SHOW, 400),
    # RFC 9112 section 6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing. Go's net/http
    # (Ollama) ignores Transfer-Encoding on HTTP/1.0 requests (golang/go#12785): forwarded, the body is lost
    # and the chunk bytes are left on the connection.
    no("http10-with-te", head(TE, start=b"POST /api/show HTTP/1.0") + chunked(SHOW), 400, 501),
    no("chunk-size-21-hex-digits", head(TE) + CHUNK.zfill(21) + b"\r\n" + SHOW + b"\r\n0\r\n\r\n", 400,
       stage="body"),
    no("chunk-size-0x", head(TE) + b"0x" + CHUNK + b"\r\n" + SHOW + b"\r\n0\r\n\r\n", 400, stage="body"),
    no("chunk-size-negative", head(TE) + b"-" + CHUNK + b"\r\n" + SHOW + b"\r\n0\r\n\r\n", 400, stage="body"),
    no("chunk-size-bare-lf", head(TE) + CHUNK + b"\n" + SHOW + b"\r\n0\r\n\r\n", 400, stage="body"),
    no("chunk-size-empty", head(TE) + b"\r\n" + chunked(SHOW), 400, stage="body"),
    # Chunk data longer than its size: the excess is not the next chunk size line.
    no("chunk-data-overruns-size", head(TE) + b"5\r\n" + SHOW + b"\r\n0\r\n\r\n", 400, stage="body"),
    # 20 hex digits is within h11's limit: a 2**80-byte chunk swallows everything after it (the "0" end and
    # the hidden request), so the body never ends and the body timeout answers.
    no("chunk-size-20-hex-digits-huge",
       head(TE) + b"f" * 20 + b"\r\n" + SHOW + b"\r\n0\r\n\r\n" + HIDDEN, 408, stage="body"),
]


@pytest.fixture
async def gw(make_gateway: MakeGateway) -> RunningServer:
    return await make_gateway(server={"body_timeout": BODY_TIMEOUT, "header_timeout": 2.0})


async def read_answer(c: Client, timeout: float = 5.0) -> RawResponse | None:
    """The next response, or None when the connection closes (or resets) without one."""
    try:
        return await c.response(timeout=timeout)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def settle(ollama: FakeOllama, timeout: float = 1.0) -> None:
    """Wait until the fake has no open connection left, or `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while ollama.open_connections and loop.time() < deadline:
        await asyncio.sleep(0.01)


async def fresh_connection_works(gw: RunningServer, ollama: FakeOllama) -> None:
    before = len(ollama.received)
    c = await Client.connect(gw.port)
    try:
        resp = await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})
        assert resp.status == 200 and resp.json() == {"version": ollama.version}
    finally:
        await c.close()
    assert [r.path for r in ollama.received[before:]] == ["/api/version"]


@pytest.mark.parametrize("case", ACCEPTED)
async def test_accepted_framing_delivers_exactly_the_intended_body(gw: RunningServer, ollama: FakeOllama,
                                                                  case: Accepted) -> None:
    c = await Client.connect(gw.port)
    try:
        await _check_accepted(c, ollama, case)
    finally:
        await c.close()
    await asyncio.sleep(0.05)
    assert len(ollama.received) == 2


async def _check_accepted(c: Client, ollama: FakeOllama, case: Accepted) -> None:
    c.send(case.raw)
    resp = await c.response()
    assert resp.status == 200, resp.raw
    assert resp.json()["details"]["family"] == "llama"
    assert len(ollama.received) == 1, [r.target for r in ollama.received]
    got = ollama.received[0]
    assert got.method == "POST" and got.target == case.target
    assert got.body == case.body
    # fastgate framed it itself: one framing header, consistent with the body, nothing else of the client's
    te = [v for n, v in got.headers if n == "transfer-encoding"]
    cl = [v for n, v in got.headers if n == "content-length"]
    assert (te == ["chunked"] and not cl) or (cl == [str(len(case.body))] and not te), got.headers
    assert got.header("x-trailer") is None
    # the client connection is still in step: the next request on it is answered normally, and only it
    again = await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})
    assert again.status == 200 and again.json() == {"version": ollama.version}
    assert [r.path for r in ollama.received] == ["/api/show", "/api/version"]


@pytest.mark.parametrize("case", REFUSED)
async def test_refused_framing_forwards_nothing(gw: RunningServer, ollama: FakeOllama, case: Refused) -> None:
    c = await Client.connect(gw.port)
    try:
        c.send(case.raw)
        resp = await read_answer(c, timeout=BODY_TIMEOUT + 4)
        if resp is None:
            assert None in case.statuses, "closed without an answer"
        else:
            assert resp.status in case.statuses, resp.raw
            assert resp.header("connection") == "close"
            assert "error" in resp.json()
        # a refused request poisons its connection: it must be closed, never read for another request
        assert await c.closed(5)
    finally:
        await c.close()
    await settle(ollama)
    assert ollama.received == [], [(r.method, r.target, r.body) for r in ollama.received]
    assert ollama.open_connections == 0  # an upstream connection that saw part of it is never reused
    if case.stage == "head":
        assert ollama.connections_opened == 0
    assert gw.proxy.pool is not None and gw.proxy.pool.idle_count == 0
    await fresh_connection_works(gw, ollama)


async def test_bytes_after_a_short_content_length_are_a_separate_request_needing_its_own_key(
        gw: RunningServer, ollama: FakeOllama) -> None:
    """CL covers the JSON only; what follows is parsed as the next pipelined request, and it has no key."""
    c = await Client.connect(gw.port)
    c.send(head(CL) + SHOW + HIDDEN)
    first = await c.response()
    second = await c.response()
    assert first.status == 200
    assert second.status == 401
    await asyncio.sleep(0.05)
    assert [(r.method, r.path, r.body) for r in ollama.received] == [("POST", "/api/show", SHOW)]
    await c.close()


async def test_keyed_requests_pipelined_behind_a_chunked_body_each_arrive_once(gw: RunningServer,
                                                                               ollama: FakeOllama) -> None:
    """Legitimate pipelining right after a chunked body: each request arrives once, with its own body."""
    data = bytes(range(256)) * 64
    digest = hashlib.sha256(data).hexdigest()
    c = await Client.connect(gw.port)
    upload = head(TE, start=f"POST /api/blobs/sha256:{digest} HTTP/1.1".encode())
    c.send(upload + chunked(data[:5000], data[5000:])
           + build_request("POST", "/api/show", headers={"X-API-Key": KEY1}, body=SHOW)
           + build_request("GET", "/api/version", headers={"X-API-Key": KEY1}))
    assert (await c.response()).status == 201
    assert (await c.response()).status == 200
    assert (await c.response()).json() == {"version": ollama.version}
    await asyncio.sleep(0.05)
    assert [r.path for r in ollama.received] == [f"/api/blobs/sha256:{digest}", "/api/show", "/api/version"]
    assert ollama.received[0].blob_sha256 == digest and ollama.received[0].blob_size == len(data)
    assert ollama.received[1].body == SHOW
    await c.close()

