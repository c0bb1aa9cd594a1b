"""Keys are secrets: every key source through every path, then fastgate's logs and what Ollama got are
searched for the keys. Zero hits allowed."""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import pytest

from fastgate.logs import LOGGER_NAME
from tests.conftest import KEY1, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.rawhttp import Client, build_request

pytestmark = pytest.mark.timeout(60)

WRONG = "api-wrong-secret-99999999"  # an invalid key is a secret too: it may be a typo of a real one


def with_key(source: str, key: str, body: dict[str, object]) -> tuple[str, list[tuple[str, str]], bytes]:
    """(target suffix, headers, body) presenting `key` the way `source` does."""
    raw = json.dumps(body).encode()
    if source == "x-api-key":
        return "", [("X-API-Key", key)], raw
    if source == "bearer":
        return "", [("Authorization", f"Bearer {key}")], raw
    if source == "authorization":
        return "", [("Authorization", key)], raw
    if source == "basic":
        return "", [("Authorization", "Basic " + base64.b64encode(f"me:{key}".encode()).decode())], raw
    if source == "query":
        return f"?api_key={key}", [], raw
    return "", [], json.dumps({"api_key": key, **body}).encode()


SOURCES = ["x-api-key", "bearer", "authorization", "basic", "query", "body"]
CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.mark.parametrize("source", SOURCES)
async def test_no_key_in_logs_or_upstream_on_any_path(source: str, make_gateway: MakeGateway, ollama: FakeOllama,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    gw = await make_gateway(auth={"max_body_bytes": 4096})
    down = await make_gateway(upstream_url="http://127.0.0.1:9")

    async def send(port: int, key: str, body: dict[str, object], path: str = "/api/chat") -> int:
        suffix, headers, raw = with_key(source, key, body)
        c = await Client.connect(port)
        resp = await c.request("POST", path + suffix, headers=headers, body=raw)
        await c.close()
        return resp.status

    assert await send(gw.port, KEY1, CHAT) == 200                      # success
    assert await send(gw.port, WRONG, CHAT) == 401                     # refused
    assert await send(down.port, KEY1, CHAT) == 502                    # upstream unreachable
    big = {**CHAT, "pad": "x" * 8000}
    expected_big = 413 if source == "body" else 200                    # only a body key forces buffering
    assert await send(gw.port, KEY1, big) == expected_big
    assert await send(gw.port, KEY1, CHAT, path="/api/me") == 403      # blocked endpoint

    # client disconnect mid-stream
    suffix, headers, raw = with_key(source, KEY1, {"model": "llama3.2:latest", "prompt": "x",
                                                   "options": {"num_predict": 500, "fake_gap_ms": 5}})
    c = await Client.connect(gw.port)
    c.send(build_request("POST", "/api/generate" + suffix, headers=headers, body=raw))
    await c.response_head()
    c.writer.transport.abort()
    await ollama.wait_for_disconnect(timeout=2)

    # parse error: the key sits in a request fastgate cannot parse
    c = await Client.connect(gw.port)
    c.send(f"POST /api/chat?api_key={KEY1} HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY1}\r\nBad Header: {KEY1}\r\n\r\n"
           .encode())
    assert (await c.response()).status == 400
    await c.close()
    await asyncio.sleep(0.05)

    text = caplog.text
    assert "Processing request" in text  # the logs were captured at all
    for secret in (KEY1, WRONG):
        assert secret not in text
        for got in ollama.received:
            assert secret not in got.target
            assert secret not in json.dumps(got.headers)
            assert secret.encode() not in got.body
    assert "api-****0101" in text  # the masked form says which key was used
