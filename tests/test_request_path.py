"""The small-request path kept cheap without changing what it does (issue 11): the `Processing request` line
as a setting, log lines flushed once per loop iteration, records made from a template, bodyless requests
complete with their head, and the response heads fastgate copies rather than rebuilds."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import pytest

from fastgate import logs
from fastgate.logs import LOGGER_NAME, LineHandler, log
from tests.conftest import KEY1, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.rawhttp import Client

pytestmark = pytest.mark.timeout(30)


async def test_request_start_line_is_on_by_default(make_gateway: MakeGateway,
                                                   gate_logs: pytest.LogCaptureFixture) -> None:
    gw = await make_gateway()
    async with await Client.connect(gw.port) as c:
        resp = await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})
    assert resp.status == 200
    rid = resp.header("X-Request-Id")
    lines = [r.getMessage() for r in gate_logs.records if r.getMessage().startswith(f"[{rid}]")]
    assert lines[0] == f"[{rid}] Processing request: GET api/version"
    assert "user1 (x-api-key:" in lines[1] and ": 200 in " in lines[1]
    assert len(lines) == 2


async def test_request_start_false_leaves_out_only_that_line(make_gateway: MakeGateway,
                                                             gate_logs: pytest.LogCaptureFixture) -> None:
    gw = await make_gateway(log={"request_start": False})
    async with await Client.connect(gw.port) as c:
        ok = await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})
        refused = await c.request("GET", "/api/version", headers={"X-API-Key": "wrong-key-000000"})
    assert (ok.status, refused.status) == (200, 401)
    messages = [r.getMessage() for r in gate_logs.records]
    assert not [m for m in messages if "Processing request" in m]
    ok_lines = [m for m in messages if m.startswith(f"[{ok.header('X-Request-Id')}]")]
    refused_lines = [m for m in messages if m.startswith(f"[{refused.header('X-Request-Id')}]")]
    assert len(ok_lines) == 1 and "user1 (x-api-key:" in ok_lines[0] and ": 200 in " in ok_lines[0]
    assert len(refused_lines) == 1 and "Refused 401: invalid API key" in refused_lines[0]


async def test_bodyless_requests_pipelined_with_one_with_a_body(make_gateway: MakeGateway) -> None:
    # A request without a body is complete with its head (its empty end is never taken from h11): the next
    # request, already in the same read, is parsed from the bytes after it, whether it has a body or not.
    gw = await make_gateway()
    body = b'{"model":"llama3.2","prompt":"hi","stream":false}'
    head = f"Host: gateway.example.com\r\nX-API-Key: {KEY1}\r\n"
    async with await Client.connect(gw.port) as c:
        c.send((f"GET /api/version HTTP/1.1\r\n{head}\r\n"
                f"POST /api/generate HTTP/1.1\r\n{head}Content-Length: {len(body)}\r\n\r\n").encode() + body
               + f"GET /api/tags HTTP/1.1\r\n{head}Expect: 100-continue\r\n\r\n".encode()
               + f"GET /api/version HTTP/1.1\r\n{head}\r\n".encode())
        answers = [await c.response() for _ in range(4)]
        assert [a.status for a in answers] == [200, 200, 200, 200]
        assert b'"version"' in answers[0].body and b'"done":true' in answers[1].body
        assert b'"models"' in answers[2].body and b'"version"' in answers[3].body
        # A bodyless request that asks for 100 Continue gets none: there is nothing to send after the head.
        assert not any(a.raw.startswith(b"HTTP/1.1 100") for a in answers)


@pytest.mark.parametrize("key_in_body", [False, True])
async def test_content_length_bodies_in_pieces_keep_what_follows_for_the_next_request(
        make_gateway: MakeGateway, ollama: FakeOllama, key_in_body: bool) -> None:
    # A Content-Length body is counted by the connection, not by h11: cut anywhere, in pieces that arrive
    # apart, it reaches Ollama whole, and the bytes after it (a pipelined request, here in the same read as
    # the body's end) are the next request. With the key in the body the gate buffers the body first.
    gw = await make_gateway()
    fields = f'"api_key":"{KEY1}",' if key_in_body else ""
    body = ('{%s"model":"llama3.2","prompt":"%s","stream":false}' % (fields, "x" * 300)).encode()
    auth = "" if key_in_body else f"X-API-Key: {KEY1}\r\n"
    head = f"POST /api/generate HTTP/1.1\r\nHost: gateway.example.com\r\n{auth}Content-Length: {len(body)}\r\n\r\n"
    follow = f"GET /api/version HTTP/1.1\r\nHost: gateway.example.com\r\nX-API-Key: {KEY1}\r\n\r\n".encode()
    async with await Client.connect(gw.port) as c:
        for cut in (0, 1, 150, len(body) - 1):
            c.send(head.encode() + body[:cut])
            await asyncio.sleep(0.05)
            c.send(body[cut:] + follow)
            first, second = await c.response(), await c.response()
            assert (first.status, second.status) == (200, 200), (cut, first.body)
            assert b'"done":true' in first.body and b'"version"' in second.body
            got = ollama.received[-2]
            assert got.path == "/api/generate"
            sent = got.json()
            assert sent["prompt"] == "x" * 300 and "api_key" not in sent


async def test_content_length_body_cut_short_by_the_client_is_a_400(make_gateway: MakeGateway,
                                                                    ollama: FakeOllama) -> None:
    gw = await make_gateway()
    body = b'{"model":"llama3.2","prompt":"hi","stream":false}'
    async with await Client.connect(gw.port) as c:
        c.send((f"POST /api/generate HTTP/1.1\r\nHost: gateway.example.com\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body) + 10}\r\n\r\n").encode() + body)
        c.writer.write_eof()  # the promised body never comes whole
        resp = await c.response()
    assert resp.status == 400 and "error" in resp.json()
    assert ollama.received == []


async def test_expect_100_with_a_content_length_body_gets_continue_then_the_answer(
        make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway()
    body = b'{"model":"llama3.2","prompt":"hi","stream":false}'
    async with await Client.connect(gw.port) as c:
        c.send((f"POST /api/generate HTTP/1.1\r\nHost: gateway.example.com\r\nX-API-Key: {KEY1}\r\n"
                f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n").encode())
        interim = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 ")
        c.send(body)
        resp = await c.response()
        assert resp.status == 200 and b'"done":true' in resp.body
        again = await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})
        assert again.status == 200
    assert ollama.received[-2].json()["prompt"] == "hi"


async def test_bodyless_expect_100_on_auth_is_answered_without_continue(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    async with await Client.connect(gw.port) as c:
        c.send(b"POST /auth HTTP/1.1\r\nHost: gateway.example.com\r\nExpect: 100-continue\r\n"
               b"Content-Length: 0\r\n\r\n")
        resp = await c.response()
        assert resp.status == 401
        assert not resp.raw.startswith(b"HTTP/1.1 100")
        again = await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})  # still usable
        assert again.status == 200


def test_line_handler_flushes_at_once_without_a_loop() -> None:
    stream = _CountingStream()
    handler = LineHandler(stream)
    handler.setFormatter(logs.LineFormatter())
    handler.handle(_record("one"))
    assert stream.flushed.endswith(" - INFO - one\n") and stream.flushes == 1


async def test_line_handler_flushes_once_per_loop_iteration() -> None:
    stream = _CountingStream()
    handler = LineHandler(stream)
    handler.setFormatter(logs.LineFormatter())
    for i in range(5):
        handler.handle(_record(f"line {i}"))
    assert stream.flushes == 0 and stream.flushed == ""  # written into the buffer, not yet out
    await asyncio.sleep(0)  # the next iteration runs the flush scheduled by the first line
    assert stream.flushes == 1
    assert [line.rpartition(" - ")[2] for line in stream.flushed.splitlines()] == [f"line {i}" for i in range(5)]
    handler.handle(_record("later"))
    await asyncio.sleep(0)
    assert stream.flushes == 2 and stream.flushed.endswith("later\n")


async def test_line_handler_flushes_from_other_threads_at_once() -> None:
    stream = _CountingStream()
    handler = LineHandler(stream)
    handler.setFormatter(logs.LineFormatter())
    await asyncio.get_running_loop().run_in_executor(None, handler.handle, _record("from a thread"))
    assert stream.flushes == 1 and stream.flushed.endswith("from a thread\n")


@pytest.fixture
def own_logging() -> Iterator[io.StringIO]:
    """fastgate's logger set up as `fastgate serve` does it, writing to a StringIO; put back afterwards."""
    stream = io.StringIO()
    saved = (log.handlers[:], log.filters[:], log.level, log.propagate, dict(log.__dict__), logs._direct[:])
    logs.setup_logging("INFO", stream)
    try:
        yield stream
    finally:
        handlers, filters, level, propagate, attrs, direct = saved
        log.handlers[:] = handlers
        log.filters[:] = filters
        log.setLevel(level)
        log.propagate = propagate
        for name in ("makeRecord", "findCaller", "info"):
            if name in attrs:
                setattr(log, name, attrs[name])
            else:
                log.__dict__.pop(name, None)
        logs._direct[:] = direct


def test_records_from_the_template_match_logging_s_own(own_logging: io.StringIO) -> None:
    made = log.makeRecord(LOGGER_NAME, logging.INFO, "(unknown file)", 0, "[%s] %s", ("a1", "x"), None,
                          "(unknown function)", {logs.FIELDS: {"request_id": "a1"}})
    plain = logging.LogRecord(LOGGER_NAME, logging.INFO, "(unknown file)", 0, "[%s] %s", ("a1", "x"), None,
                              "(unknown function)")
    made_attrs, plain_attrs = dict(made.__dict__), dict(plain.__dict__)
    for varying in ("created", "msecs", "relativeCreated"):
        assert abs(made_attrs.pop(varying) - plain_attrs.pop(varying)) < 1000
    assert made_attrs.pop(logs.FIELDS) == {"request_id": "a1"}
    assert made_attrs == plain_attrs
    assert made.getMessage() == "[a1] x"
    with pytest.raises(KeyError):  # as logging refuses it
        log.makeRecord(LOGGER_NAME, logging.INFO, "(unknown file)", 0, "m", (), None, None, {"msg": "forged"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")  # an exception record takes logging's own path
    text = own_logging.getvalue()
    assert " - ERROR - failed\nTraceback (most recent call last):\n" in text and "ValueError: boom" in text


def _only_own_handler() -> None:
    # pytest attaches its capture handlers to non-propagating loggers when each test phase begins.
    log.handlers[:] = logs._direct[:]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_direct_lines_equal_the_records_lines(own_logging: io.StringIO, fmt: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _only_own_handler()
    logs.set_format(fmt)
    monkeypatch.setattr(logs, "_logger_info", lambda *a, **k: pytest.fail("took logging's way"))
    fields = {logs.FIELDS: {"request_id": "a1", "path": "/api/tags\n", "status": 200, "upstream_ms": 1.23456}}
    calls: list[tuple[tuple[object, ...], dict[str, object] | None]] = [
        (("[%s] Processing request: %s %s", "a1", "GET", "api/tags\nforged\u2028"), fields),
        (("[%s] %s (%s) -> %s: %d in %.1f ms", "a1", "u", "x-api-key:api-****0101", "http://o/api/tags", 200, 1.5),
         fields),
        (("plain, no arguments, 100%% sure",), None),
        (("%(a)s and %(b)d", {"a": "mapping", "b": 7}), None),
    ]
    for args, extra in calls:
        log.info(*args, extra=extra)
    monkeypatch.undo()
    direct = own_logging.getvalue().splitlines()
    handler = log.handlers[0]
    expected = []
    for args, extra in calls:
        record = logging.LogRecord(LOGGER_NAME, logging.INFO, "(unknown file)", 0, args[0], args[1:], None)
        record.__dict__.update(extra or {})
        expected.append(handler.format(record))
    strip = (lambda line: line.partition(" - ")[2]) if fmt == "text" else (lambda line: line.partition(",")[2])
    assert [strip(line) for line in direct] == [strip(line) for line in expected]  # all but the time
    assert len(direct) == 4 and "\n" not in "".join(direct)
    if fmt == "text":
        assert direct[0].endswith(" - INFO - [a1] Processing request: GET api/tags\\x0aforged\\u2028")
        assert direct[3].endswith(" - INFO - mapping and 7")


def test_direct_lines_give_way_to_filters_handlers_and_tracebacks(own_logging: io.StringIO,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    _only_own_handler()
    seen: list[logging.LogRecord] = []

    class Tag(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            seen.append(record)
            record.msg = "[tag] " + str(record.msg)
            return True

    tag = Tag()
    log.addFilter(tag)
    log.info("with a filter %d", 1)
    log.removeFilter(tag)
    assert len(seen) == 1 and own_logging.getvalue().endswith(" - INFO - [tag] with a filter 1\n")
    extra = logging.Handler()
    records: list[logging.LogRecord] = []
    extra.emit = records.append  # type: ignore[method-assign]
    log.addHandler(extra)
    log.info("two handlers %s", "x", extra={logs.FIELDS: {"request_id": "b2"}})
    log.removeHandler(extra)
    assert [r.getMessage() for r in records] == ["two handlers x"]
    assert getattr(records[0], logs.FIELDS) == {"request_id": "b2"}
    assert own_logging.getvalue().endswith(" - INFO - two handlers x\n")
    log.setLevel("WARNING")
    log.info("hidden")
    log.setLevel("INFO")
    assert "hidden" not in own_logging.getvalue()


class _CountingStream(io.StringIO):
    """Keeps what was flushed apart from what was only written."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0
        self.flushed = ""

    def flush(self) -> None:
        self.flushes += 1
        self.flushed = self.getvalue()


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord(LOGGER_NAME, logging.INFO, "(unknown file)", 0, message, (), None)


# -- response heads: the copy path agrees with the general parser --------------------------------------------

_STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.1 200", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content",
                 b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 100 Continue", b"HTTP/1.1 101 Switching",
                 b"HTTP/1.1 404 Not Found", b"HTTP/1.1 503 Service Unavailable", b"HTTP/1.1 200 \xe9t\xe9",
                 b"HTTP/1.2 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 200 O\x01K"]
_FIELDS = [b"Content-Type: application/json; charset=utf-8", b"Date: Tue, 01 Dec 2026 01:58:20 GMT",
           b"Content-Length: 20", b"content-length: 0", b"Content-Length:  7 ", b"Content-Length: 5, 5",
           b"Content-Length: -1", b"Content-Length: 1234567890123456789", b"Content-Length: x",
           b"Transfer-Encoding: chunked", b"transfer-encoding: Chunked", b"Transfer-Encoding: gzip, chunked",
           b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked, gzip", b"Connection: close",
           b"Connection: keep-alive", b"Connection: X-Trace", b"X-Trace: 1", b"Keep-Alive: timeout=5",
           b"TE: trailers", b"Trailer: X", b"Upgrade: h2c", b"Proxy-Authenticate: Basic", b"Te-X: y",
           b"X-Content-Length: 9", b"X-Empty:", b"X-Tab: a\tb", b"X-Ctl: a\x01b", b"X-Del: \x7f",
           b"Bad Name: x", b"NoColon", b"X-Obs: \xff\xfe", b" Leading: space", b"X-CR: a\rb"]


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"POST"])
def test_plain_heads_parse_as_the_general_parser_does(method: bytes) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from fastgate.errors import GateError
    from fastgate.messages import _parse_response_head, parse_response_head

    def outcome(parse, head: bytes):  # type: ignore[no-untyped-def]
        try:
            return parse(head, method)
        except GateError as exc:
            return ("error", exc.status, exc.message)

    @settings(max_examples=400, deadline=None)
    @given(st.sampled_from(_STATUS_LINES), st.lists(st.sampled_from(_FIELDS), max_size=6),
           st.sampled_from([b"\r\n", b"\n"]))
    def check(status_line: bytes, fields: list[bytes], eol: bytes) -> None:
        head = eol.join([status_line, *fields]) + eol + eol
        assert outcome(parse_response_head, head) == outcome(_parse_response_head, head)

    check()
    # The usual answers take the copy path and relay their header block exactly as it came.
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
    assert parse_response_head(head, method).header_block == head[17:-2]


def test_normal_paths_are_returned_as_they_are_and_others_resolved() -> None:
    import posixpath
    from urllib.parse import unquote_to_bytes

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from fastgate.gate import normalize_path

    def general(path: bytes) -> bytes:
        decoded = unquote_to_bytes(path)
        if not decoded.startswith(b"/"):
            decoded = b"/" + decoded
        return posixpath.normpath(decoded).replace(b"//", b"/")

    pieces = st.sampled_from([b"/", b"api", b".", b"..", b"%2e", b"%2F", b"%", b"me", b"a.b", b"x/", b"\\", b"+"])

    @settings(max_examples=2000, deadline=None)
    @given(st.lists(pieces, max_size=7).map(b"".join))
    def check(path: bytes) -> None:
        assert normalize_path(path) == general(path)

    check()
    assert normalize_path(b"/api/version") == b"/api/version"
    assert normalize_path(b"/api//me/") == b"/api/me" and normalize_path(b"/api/%6de") == b"/api/me"


def test_fields_are_wanted_unless_only_text_lines_are_written(own_logging: io.StringIO) -> None:
    assert logs.fields_wanted()  # pytest's capture handler is there too
    _only_own_handler()
    assert not logs.fields_wanted()  # text: the line is the message alone
    logs.set_format("json")
    assert logs.fields_wanted()
    logs.set_format("text")
    other = logging.NullHandler()
    log.addHandler(other)
    assert logs.fields_wanted()  # someone else's handler may read them
    log.removeHandler(other)
    assert not logs.fields_wanted()


async def test_json_request_lines_keep_their_fields(make_gateway: MakeGateway, own_logging: io.StringIO) -> None:
    import json

    _only_own_handler()
    logs.set_format("json")
    gw = await make_gateway()
    async with await Client.connect(gw.port) as c:
        resp = await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})
    rid = resp.header("X-Request-Id")
    lines = [json.loads(line) for line in own_logging.getvalue().splitlines()]
    mine = [line for line in lines if line.get("request_id") == rid]
    assert [line["msg"].partition(" ")[2].split(":")[0] for line in mine] == ["Processing request", "user1 (x-api-key"]
    assert mine[1]["status"] == 200 and mine[1]["user"] == "user1" and mine[1]["path"] == "/api/version"
