"""CORS proven in a real browser: Debian's headless Chromium, driven through the system chromedriver.

A page served from an origin listed in `[cors] allow_origins` streams a chat through fastgate with `fetch()`
and `X-API-Key`, reading the tokens as they arrive, and reads a 401 (status, JSON body, exposed header). The
same page served from an unlisted origin is blocked: its `fetch()` rejects with a TypeError, and nothing
reaches Ollama. One browser session serves all the checks.

Needs the Debian packages `chromium` and `chromium-driver` (`.ci/run` installs them) and Selenium (a test
extra). Selenium Manager never runs: the driver's path is given, so nothing is downloaded. Elsewhere, point
FASTGATE_CHROMIUM and FASTGATE_CHROMEDRIVER at a Chromium and its matching chromedriver.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from fastgate.server import RunningServer
from tests.conftest import KEY1, MakeGateway
from tests.fake_ollama import FakeOllama

pytestmark = pytest.mark.timeout(60)

CHROMIUM = os.environ.get("FASTGATE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FASTGATE_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage")
SCRIPT_TIMEOUT_S = 15
MODEL = "llama3.2:latest"
TOKENS = 5
GAP_MS = 100  # between tokens at the fake Ollama: 5 gaps, so a stream spans about half a second

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>fastgate CORS check</title></head>
<body><p>fastgate CORS check</p>
<script>
// Stream a chat through fastgate and record every read of the body as it arrives.
window.streamChat = async (gateway, key, body) => {
  const started = performance.now();
  const res = await fetch(gateway + "/api/chat", {
    method: "POST", headers: {"X-API-Key": key, "Content-Type": "application/json"}, body: JSON.stringify(body)});
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  const reads = [];
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    reads.push({ms: performance.now() - started, text: decoder.decode(value, {stream: true})});
  }
  return {status: res.status, contentType: res.headers.get("content-type"), reads: reads};
};
// An answer read from JavaScript: status, JSON body and an exposed header.
window.readAnswer = async (gateway, key) => {
  const res = await fetch(gateway + "/api/tags", {headers: {"X-API-Key": key}});
  return {status: res.status, body: await res.json(), requestId: res.headers.get("x-request-id")};
};
// What a page sees: the value, or the error fetch() rejected with.
window.attempt = async (run) => {
  try { return {value: await run()}; }
  catch (e) { return {error: e.name, message: String(e.message)}; }
};
</script></body></html>
"""


def _missing_browser() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: apt-get install -y chromium chromium-driver (as .ci/run does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is missing: pip install -e '.[test]'"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = _missing_browser()
    if missing is not None:
        pytest.fail(missing)  # a browser test that silently skips proves nothing
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager is skipped, nothing is looked up or downloaded.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_script_timeout(SCRIPT_TIMEOUT_S)
        driver.set_page_load_timeout(SCRIPT_TIMEOUT_S)
        yield driver
    finally:
        driver.quit()


async def _serve_page(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
        status, body, kind = ((b"200 OK", PAGE, b"text/html; charset=utf-8") if path == b"/"
                              else (b"404 Not Found", b"not found\n", b"text/plain"))
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def origins() -> AsyncIterator[tuple[str, str]]:
    """Two local origins serving the page: (listed in allow_origins, unlisted)."""
    servers = [await asyncio.start_server(_serve_page, "127.0.0.1", 0) for _ in range(2)]
    try:
        yield tuple(f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers)  # type: ignore[misc]
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def cors_gateway(make_gateway: MakeGateway, origins: tuple[str, str]) -> RunningServer:
    return await make_gateway(cors={"allow_origins": [origins[0]]})


async def _run_in_page(driver: Any, origin: str, call: str, *args: Any) -> dict[str, Any]:
    """Open the page at `origin` (unless it is open already) and run `call` there, e.g. `streamChat(a, b)`."""
    def run() -> dict[str, Any]:
        if not driver.current_url.startswith(origin + "/"):
            driver.get(origin + "/")
        script = ("const done = arguments[arguments.length - 1]; const a = arguments;"
                  f"window.attempt(() => window.{call}).then(done);")
        return driver.execute_async_script(script, *args)
    return await asyncio.to_thread(run)


def _chat_body() -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Why is the sky blue?"}],
            "options": {"num_predict": TOKENS, "fake_gap_ms": GAP_MS}}


async def test_chromium_streams_reads_errors_and_is_blocked_elsewhere(
        browser: Any, cors_gateway: RunningServer, origins: tuple[str, str], ollama: FakeOllama) -> None:
    allowed, unlisted = origins
    gateway = cors_gateway.url

    # 1. A streamed chat from the allowed origin, read as the tokens arrive.
    got = await _run_in_page(browser, allowed, "streamChat(a[0], a[1], a[2])", gateway, KEY1, _chat_body())
    assert "value" in got, f"fetch from the allowed origin failed: {got}"
    stream = got["value"]
    assert stream["status"] == 200 and stream["contentType"] == "application/x-ndjson"
    reads = stream["reads"]
    lines = [json.loads(line) for line in "".join(r["text"] for r in reads).splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == "".join(f"tok{i} " for i in range(TOKENS))
    assert [line["done"] for line in lines] == [False] * TOKENS + [True]
    # Several reads spread over the generation, not one buffered body: the first token was in the page
    # while the model was still generating the rest.
    assert len(reads) >= 4, reads
    first_token_ms = next(r["ms"] for r in reads if "tok0" in r["text"])
    last_ms = reads[-1]["ms"]
    assert last_ms - first_token_ms >= 3 * GAP_MS, reads
    forwarded = ollama.received[-1]
    assert (forwarded.method, forwarded.path) == ("POST", "/api/chat")
    assert forwarded.header("origin") is None and forwarded.header("x-api-key") is None

    # 2. A 401 the page can read: status, JSON body and the exposed X-Request-Id (CORS headers on errors).
    got = await _run_in_page(browser, allowed, "readAnswer(a[0], a[1])", gateway, "api-not-a-key")
    assert "value" in got, f"the 401 was not readable from JavaScript: {got}"
    assert got["value"]["status"] == 401
    assert "API key" in got["value"]["body"]["error"]
    assert got["value"]["requestId"]
    # and the same call with the right key reads Ollama's answer
    got = await _run_in_page(browser, allowed, "readAnswer(a[0], a[1])", gateway, KEY1)
    assert got["value"]["status"] == 200 and MODEL in [m["name"] for m in got["value"]["body"]["models"]]

    # 3. The same page from an unlisted origin: fetch() rejects with a TypeError, even with a valid key,
    # and nothing reaches Ollama.
    seen = len(ollama.received)
    for call, args in (("streamChat(a[0], a[1], a[2])", (gateway, KEY1, _chat_body())),
                       ("readAnswer(a[0], a[1])", (gateway, KEY1))):
        got = await _run_in_page(browser, unlisted, call, *args)
        assert got.get("error") == "TypeError", f"{call} from an unlisted origin was not blocked: {got}"
    assert len(ollama.received) == seen
