"""Issue 12: `[log] format = "json"`, sub-millisecond durations, refusals of known keys counted per user.

The JSON format writes one object per line with the fields carried on each record (never re-parsed from the
text); the text format stays the seed's lines. Both formats are attached side by side here to show they carry
the same events, and both are searched for keys from every source.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import math
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastgate.access import Principal, Role
from fastgate.logs import FIELDS, DATE_FORMAT, JsonFormatter, LineFormatter, escape_controls, log, make_formatter
from fastgate.server import RunningServer, start
from tests.conftest import KEY1, MASKED1, MakeGateway, gateway_config
from tests.fake_ollama import FakeOllama
from tests.proc import FastgateProcess, write_config
from tests.rawhttp import Client, build_request
from tests.test_secrets import CHAT, SOURCES, WRONG, with_key

pytestmark = pytest.mark.timeout(60)

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TEXT_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) - ([A-Z]+) - (.*)")
WAIT_S = 10.0  # upper bound for a log line to appear; the wait ends as soon as it does
GENERATE = {"model": "llama3.2:latest", "prompt": "hi", "options": {"num_predict": 3}}

# Managed keys (role user) for refusals of a known key.
DANA = "fg_test-dana-role-user-0000000001"  # role user: model management refused
ERIN = "fg_test-erin-models-qwen-00000002"  # only qwen models
FRED = "fg_test-fred-one-per-minute-00003"  # one request per minute


class LogLines(io.StringIO):
    """A log stream that wakes up whoever waits for a line (no sleeping: the write is the signal)."""

    def __init__(self) -> None:
        super().__init__()
        self._written = asyncio.Event()

    def write(self, text: str) -> int:
        n = super().write(text)
        self._written.set()
        return n

    def lines(self) -> list[str]:
        return self.getvalue().splitlines()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]

    async def until(self, predicate: Callable[[list[str]], bool], timeout: float = WAIT_S) -> list[str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.lines()):
            self._written.clear()
            await asyncio.wait_for(self._written.wait(), max(deadline - loop.time(), 0.001))
        return self.lines()


@pytest.fixture
def attach() -> Iterator[Callable[[str], LogLines]]:
    """Attach a handler in a given format to fastgate's logger, as setup_logging would; undone afterwards."""
    saved_handlers, saved_level = list(log.handlers), log.level
    log.setLevel(logging.DEBUG)

    def add(fmt: str) -> LogLines:
        stream = LogLines()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(make_formatter(fmt))
        log.addHandler(handler)
        return stream

    yield add
    log.handlers[:] = saved_handlers
    log.setLevel(saved_level)


def give_keys(gw: RunningServer) -> None:
    gw.proxy.gate.set_managed_keys({
        hashlib.sha256(DANA.encode()).digest(): Principal("dana", "k_dana", role=Role.USER),
        hashlib.sha256(ERIN.encode()).digest(): Principal("erin", "k_erin", role=Role.USER, models=("qwen*",)),
        hashlib.sha256(FRED.encode()).digest(): Principal("fred", "k_fred", role=Role.USER, rpm=1),
    })


def count(fragment: str, n: int = 1) -> Callable[[list[str]], bool]:
    return lambda lines: sum(fragment in line for line in lines) >= n


def is_whole_ms(ms: float) -> bool:
    return abs(ms - round(ms)) < 1e-9


# -- the formatters alone ---------------------------------------------------------------------------------


def _record(msg: str, *args: object, created: float = 1741860923.25, **fields: object) -> logging.LogRecord:
    record = log.makeRecord(log.name, logging.INFO, "(unknown file)", 0, msg, args, None,
                            extra={FIELDS: fields} if fields else None)
    record.created = created
    return record


def test_json_line_shape_timestamp_and_field_types() -> None:
    line = JsonFormatter().format(_record("[%s] done in %.1f ms", "a1b2c3d4", 1.25, request_id="a1b2c3d4",
                                          status=200, upstream_ms=0.123456, bytes=12, flag=True, none=None,
                                          bad=math.nan))
    assert "\n" not in line
    event = json.loads(line)
    assert event == {"ts": "2025-03-13T10:15:23.250Z", "level": "INFO", "msg": "[a1b2c3d4] done in 1.2 ms",
                     "request_id": "a1b2c3d4", "status": 200, "upstream_ms": 0.123, "bytes": 12, "flag": True,
                     "none": None, "bad": None}
    assert list(event)[:3] == ["ts", "level", "msg"]


def test_json_escapes_every_control_and_line_separator() -> None:
    hostile = "m\nx\r2025-01-01 00:00:00 - INFO - forged\x00\x1b[31m\x7f\x85\u2028\u2029é"
    line = JsonFormatter().format(_record("%s", hostile, path=hostile))
    assert line.isascii() and len(line.splitlines()) == 1
    assert not any(c in line for c in "\x00\x1b\x7f")
    event = json.loads(line)
    assert event["msg"] == hostile and event["path"] == hostile  # escaped on the wire, intact when read


def test_text_format_ignores_the_fields() -> None:
    record = _record("[%s] Processing request: %s %s", "a1b2c3d4", "GET", "api/tags", request_id="a1b2c3d4",
                     method="GET", path="/api/tags")
    stamp = time.strftime(DATE_FORMAT, time.localtime(record.created))
    assert LineFormatter().format(record) == f"{stamp} - INFO - [a1b2c3d4] Processing request: GET api/tags"


def test_exceptions_stay_on_one_json_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = log.makeRecord(log.name, logging.ERROR, "", 0, "unexpected error", (), __import__("sys").exc_info())
    event = json.loads(JsonFormatter().format(record))
    assert event["level"] == "ERROR" and "ValueError: boom\nsecond line" in event["exc"]


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="json"):
        make_formatter("xml")


# -- request lines ----------------------------------------------------------------------------------------


async def test_request_lines_carry_their_fields(make_gateway: MakeGateway, ollama: FakeOllama,
                                                attach: Callable[[str], LogLines]) -> None:
    out = attach("json")
    gw = await make_gateway()
    c = await Client.connect(gw.port)
    tags = await c.request("GET", "/api/tags", headers={"X-API-Key": KEY1})
    stream = await c.request("POST", f"/api/generate?api_key={KEY1}&keep=1", json_body=GENERATE)
    wrong = await c.request("GET", "/api/tags", headers={"Authorization": f"Bearer {WRONG}"})
    health = await c.request("GET", "/health")
    await c.close()
    assert (tags.status, stream.status, wrong.status, health.status) == (200, 200, 401, 200)
    await out.until(count("Answered 200"))  # the last request's last line
    events = out.events()
    for event in events:
        assert RFC3339_UTC.fullmatch(event["ts"]) and event["level"] == "INFO"
    by_id: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if "request_id" in event:
            assert event["msg"].startswith(f"[{event['request_id']}] ")
            by_id.setdefault(event["request_id"], []).append(event)
    plain, streamed, refused, answered = by_id.values()

    assert plain[0] == {**plain[0], "method": "GET", "path": "/api/tags"}
    assert "user" not in plain[0]  # "Processing request": nobody is identified yet
    done = plain[1]
    assert {k: done[k] for k in ("user", "key", "method", "path", "status", "bytes")} == {
        "user": "user1", "key": f"x-api-key:{MASKED1}", "method": "GET", "path": "/api/tags", "status": 200,
        "bytes": len(tags.body)}
    assert 0 <= done["upstream_ms"] <= done["duration_ms"]
    assert f"{done['bytes']} bytes" in done["msg"] and "backend" not in done  # one upstream: no backend field

    began, completed = streamed[1], streamed[2]
    assert began["status"] == 200 and "upstream_ms" in began and "bytes" not in began
    assert completed["msg"].split("] ")[1].startswith("Completed 200")
    assert {k: completed[k] for k in ("user", "key", "path", "status")} == {
        "user": "user1", "key": f"query:{MASKED1}", "path": "/api/generate", "status": 200}
    assert completed["bytes"] >= len(stream.body) > 0  # as relayed: chunk framing included
    assert completed["url"].endswith("/api/generate?keep=1")  # forwarded without api_key
    assert "api_key" not in json.dumps(streamed)

    assert refused[1]["status"] == 401 and refused[1]["key"] == "bearer:api-****9999"
    assert "user" not in refused[1]  # a wrong key names nobody
    assert answered[1] == {**answered[1], "status": 200, "path": "/health", "method": "GET"}


async def test_text_and_json_carry_the_same_events(make_gateway: MakeGateway, ollama: FakeOllama,
                                                   attach: Callable[[str], LogLines]) -> None:
    """Every text line has its JSON counterpart: same level, same message (escaped in text), same order."""
    text, out = attach("text"), attach("json")
    gw = await make_gateway()
    give_keys(gw)
    down = await make_gateway(upstream_url="http://127.0.0.1:9")
    c = await Client.connect(gw.port)
    assert (await c.request("GET", "/api/tags", headers={"X-API-Key": KEY1})).status == 200
    assert (await c.request("POST", "/api/chat", headers={"X-API-Key": KEY1}, json_body={
        "model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]})).status == 200
    assert (await c.request("POST", "/api/pull", headers={"X-API-Key": DANA}, json_body={"model": "x"})).status == 403
    assert (await c.request("POST", "/api/chat", headers={"X-API-Key": ERIN}, json_body={
        "model": "bad\nname\x85", "messages": []})).status == 403
    # a stream the client leaves: "Response cut off"
    c.send(build_request("POST", "/api/generate", headers={"X-API-Key": KEY1}, body=json.dumps(
        {"model": "llama3.2:latest", "prompt": "x", "options": {"num_predict": 500, "fake_gap_ms": 5}}).encode()))
    await c.response_head()
    c.writer.transport.abort()
    await ollama.wait_for_disconnect(timeout=5)
    await out.until(count("cut off"))
    d = await Client.connect(down.port)
    assert (await d.request("GET", "/api/tags", headers={"X-API-Key": KEY1})).status == 502
    d.send(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n")  # unreadable: refused before any request
    assert (await d.response()).status == 400
    await d.close()
    await out.until(count("Refused unreadable"))

    pairs = list(zip(text.lines(), out.lines(), strict=True))
    assert len(pairs) >= 15  # 7 requests and an unreadable one
    for text_line, json_line in pairs:
        match = TEXT_LINE.fullmatch(text_line)
        assert match, text_line
        event = json.loads(json_line)
        assert (match.group(2), match.group(3)) == (event["level"], escape_controls(event["msg"]))
    events = out.events()
    statuses = {e["status"] for e in events if "status" in e}
    assert statuses >= {200, 403, 502, 400}
    assert any(e.get("outcome") == "client went away" and e["bytes"] > 0 for e in events)
    refusal = next(e for e in events if e.get("status") == 403 and e["path"] == "/api/pull")
    assert (refusal["user"], refusal["key"]) == ("dana", "x-api-key:fg_t****0001")
    upstream_down = next(e for e in events if e.get("status") == 502)
    assert upstream_down["user"] == "user1" and upstream_down["url"].endswith("/api/tags")


@pytest.mark.parametrize("source", SOURCES)
async def test_no_full_key_in_either_format(source: str, make_gateway: MakeGateway, ollama: FakeOllama,
                                            attach: Callable[[str], LogLines]) -> None:
    text, out = attach("text"), attach("json")
    gw = await make_gateway(auth={"max_body_bytes": 4096})
    give_keys(gw)
    down = await make_gateway(upstream_url="http://127.0.0.1:9")

    async def send(port: int, key: str, body: dict[str, object], path: str = "/api/chat") -> int:
        suffix, headers, raw = with_key(source, key, body)
        c = await Client.connect(port)
        resp = await c.request("POST", path + suffix, headers=headers, body=raw)
        await c.close()
        return resp.status

    assert await send(gw.port, KEY1, CHAT) == 200                                      # forwarded
    assert await send(gw.port, WRONG, CHAT) == 401                                     # wrong key
    assert await send(down.port, KEY1, CHAT) == 502                                    # Ollama down
    assert await send(gw.port, DANA, {"model": "x"}, path="/api/pull") == 403          # role
    assert await send(gw.port, ERIN, CHAT) == 403                                      # model
    assert await send(gw.port, FRED, CHAT) == 200
    assert await send(gw.port, FRED, CHAT) == 429                                      # limit
    c = await Client.connect(gw.port)  # unreadable, with the key in it
    c.send(f"POST /api/chat?api_key={KEY1} HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY1}\r\nBad Header: {KEY1}\r\n\r\n"
           .encode())
    assert (await c.response()).status == 400
    await c.close()
    await out.until(count("Refused unreadable"))

    for stream in (text, out):
        logged = stream.getvalue()
        for secret in (KEY1, WRONG, DANA, ERIN, FRED):
            assert secret not in logged
    keys = {e["key"] for e in out.events() if "key" in e}
    assert {k.partition(":")[2] for k in keys} >= {MASKED1, "api-****9999", "fg_t****0001", "fg_t****0002",
                                                  "fg_t****0003"}
    users = {e["user"] for e in out.events() if "user" in e}
    assert users == {"user1", "dana", "erin", "fred"}


async def test_control_characters_are_escaped_in_both_formats(make_gateway: MakeGateway,
                                                              attach: Callable[[str], LogLines]) -> None:
    text, out = attach("text"), attach("json")
    gw = await make_gateway()
    give_keys(gw)
    forged = "x\n2025-01-01 00:00:00 - INFO - [deadbeef] forged\u2028\x7f\x85"
    c = await Client.connect(gw.port)
    resp = await c.request("POST", "/api/chat", headers={"X-API-Key": ERIN}, json_body={
        "model": forged, "messages": [{"role": "user", "content": "hi"}]})
    await c.close()
    assert resp.status == 403
    await out.until(count("Refused 403"))
    assert len(text.lines()) == len(out.lines()) == 2  # "Processing request" and "Refused 403", nothing forged
    assert "\\x0a2025-01-01" in text.lines()[1] and "\\x7f" in text.lines()[1]
    raw = out.lines()[1]
    assert raw.isascii() and "\x7f" not in raw and "\\u2028" in raw and "\\u007f" in raw
    event = json.loads(raw)
    assert forged in event["msg"] and event["user"] == "erin"


# -- the format from the config: startup and reload -------------------------------------------------------


async def test_reload_switches_the_format(make_gateway: MakeGateway, ollama: FakeOllama,
                                          attach: Callable[[str], LogLines]) -> None:
    out = attach("text")
    gw = await make_gateway()
    c = await Client.connect(gw.port)
    await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})
    gw.reload(gateway_config(ollama.url, log={"format": "json"}))
    await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})
    gw.reload(gateway_config(ollama.url))
    await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})
    await c.close()
    lines = await out.until(lambda lines: count("Processing request", 3)(lines) and count(" bytes", 3)(lines))
    kinds = ["json" if line.startswith("{") else "text" for line in lines if "Processing request" in line]
    assert kinds == ["text", "json", "text"]
    for line in lines:
        if line.startswith("{"):
            json.loads(line)
        else:
            assert TEXT_LINE.fullmatch(line)


async def _log_has(proc: FastgateProcess, needle: bytes) -> None:
    """Until the process has written `needle` (its output is collected by a task; polled, bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while needle not in proc.log:
        assert loop.time() < deadline, f"no {needle!r} in {bytes(proc.log)!r}"
        await asyncio.sleep(0.02)


async def test_serve_logs_json_from_its_first_line_and_sighup_switches_back(tmp_path: Path,
                                                                             ollama: FakeOllama) -> None:
    # Not the example config's keys, and a file only its owner reads: no warnings at reload, which come before
    # the new format is applied.
    key = "fg-logs-json-test-key-0000000001"
    config = write_config(tmp_path / "fastgate.toml", ollama.url, keys={key: "user1"},
                          extra='[log]\nformat = "json"\n')
    config.chmod(0o600)
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        c = await Client.connect(proc.port)
        assert (await c.request("GET", "/api/tags", headers={"X-API-Key": key})).status == 200
        await _log_has(proc, b'"bytes":')
        first = [json.loads(line) for line in bytes(proc.log).decode().splitlines()]
        assert any("listening on http://127.0.0.1:" in event["msg"] for event in first)
        assert first[-1]["user"] == "user1" and first[-1]["path"] == "/api/tags"
        config.write_text(config.read_text().replace('format = "json"', 'format = "text"'))
        proc.signal(signal.SIGHUP)
        await _log_has(proc, b" - INFO - Reloaded")
        assert (await c.request("GET", "/api/tags", headers={"X-API-Key": key})).status == 200
        await _log_has(proc, b"api/tags: 200 in")
        await c.close()
    finally:
        assert await proc.stop() == 0
    after = bytes(proc.log).decode().splitlines()[len(first):]
    assert after and all(TEXT_LINE.fullmatch(line) for line in after)


# -- durations: a sub-millisecond clock under uvloop ------------------------------------------------------


def test_durations_are_sub_millisecond_under_uvloop(attach: Callable[[str], LogLines]) -> None:
    """uvloop's loop.time() counts whole milliseconds: durations taken from it all came out whole."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> tuple[list[float], str, list[float]]:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        out = attach("json")
        fake = FakeOllama()
        await fake.start()
        gw = await start(gateway_config(fake.url))
        try:
            c = await Client.connect(gw.port)
            for _ in range(10):
                assert (await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})).status == 200
            await out.until(count('"duration_ms"', 10))
            metrics = (await c.request("GET", "/metrics", headers={"X-API-Key": KEY1})).body.decode()
            await c.close()
            latencies = [float((await gw.proxy._probe_upstream())["latency_ms"]) for _ in range(5)]
        finally:
            await gw.stop(grace=0.5)
            await fake.stop()
        durations = [e[k] for e in out.events() for k in ("duration_ms", "upstream_ms") if k in e]
        return durations, metrics, latencies

    loop = uvloop.new_event_loop()
    try:
        durations, metrics, latencies = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert len(durations) == 20
    assert not all(is_whole_ms(ms) for ms in durations)
    assert not all(is_whole_ms(ms) for ms in latencies)  # /health's latency_ms
    sums = [float(m.group(1)) * 1000 for m in re.finditer(
        r"fastgate_(?:upstream_first_byte|request_duration)_seconds_sum (\S+)", metrics)]
    assert len(sums) == 2 and not all(is_whole_ms(ms) for ms in sums)


# -- refusals of a known key counted under its user -------------------------------------------------------


async def test_refusals_of_a_known_key_are_counted_under_its_user(make_gateway: MakeGateway,
                                                                   attach: Callable[[str], LogLines]) -> None:
    out = attach("json")
    gw = await make_gateway()
    give_keys(gw)
    down = await make_gateway(upstream_url="http://127.0.0.1:9")
    c = await Client.connect(gw.port)
    chat = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    assert (await c.request("POST", "/api/pull", headers={"X-API-Key": DANA}, json_body={"model": "x"})).status == 403
    assert (await c.request("GET", "/metrics", headers={"X-API-Key": DANA})).status == 403
    assert (await c.request("POST", "/api/chat", headers={"X-API-Key": ERIN}, json_body=chat)).status == 403
    assert (await c.request("GET", "/api/version", headers={"X-API-Key": FRED})).status == 200
    assert (await c.request("GET", "/api/version", headers={"X-API-Key": FRED})).status == 429
    assert (await c.request("GET", "/api/version", headers={"X-API-Key": WRONG})).status == 401
    assert (await c.request("GET", "/api/version")).status == 401
    text = (await c.request("GET", "/metrics", headers={"X-API-Key": KEY1})).body.decode()
    await c.close()
    for line in ('fastgate_requests_total{user="dana",path="/api/pull",status="403"} 1',
                 'fastgate_requests_total{user="dana",path="/metrics",status="403"} 1',
                 'fastgate_requests_total{user="erin",path="/api/chat",status="403"} 1',
                 'fastgate_requests_total{user="fred",path="/api/version",status="200"} 1',
                 'fastgate_requests_total{user="fred",path="/api/version",status="429"} 1',
                 'fastgate_requests_total{user="-",path="/api/version",status="401"} 2',
                 'fastgate_auth_failures_total{reason="invalid_key"} 1',
                 'fastgate_auth_failures_total{reason="missing_key"} 1'):
        assert line in text
    assert 'user="-",path="/api/version",status="429"' not in text  # a key's own limit is no auth failure
    assert "rate_limited" not in text
    refused = [e for e in out.events() if e.get("status") in (403, 429)]
    assert [(e["user"], e["status"]) for e in refused] == [("dana", 403), ("dana", 403), ("erin", 403),
                                                           ("fred", 429)]
    # Ollama unreachable for a known key: that user's error too
    d = await Client.connect(down.port)
    assert (await d.request("GET", "/api/tags", headers={"X-API-Key": KEY1})).status == 502
    await d.close()
    assert down.proxy.metrics.requests == {("user1", "/api/tags", "502"): 1}
