"""Tests for tests/fake_ollama.py, driven over real loopback sockets.

Responses are parsed by hand (see read_response) so chunk framing is checked byte for byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_ollama import FakeOllama

pytestmark = pytest.mark.timeout(10)

RFC3339NANO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")


# ---- a tiny raw HTTP/1.1 client -------------------------------------------------------------
@dataclass
class Resp:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    chunks: list[bytes] | None  # None when the response was not chunked
    complete: bool = True  # False if the connection ended before the message did

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


def build(
    method: str, path: str, *, host: str | None = "127.0.0.1:11434", headers: list[tuple[str, str]] = (),
    body: bytes | None = None, json_body: Any = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    if json_body is not None:
        body = json.dumps(json_body).encode()
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def read_head(reader: asyncio.StreamReader) -> Resp:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), lines[0]
    headers = [tuple(line.split(": ", 1)) for line in lines[1:] if line]
    return Resp(int(lines[0].split(" ")[1]), headers, b"", None)  # type: ignore[arg-type]


async def read_chunks(reader: asyncio.StreamReader, resp: Resp, limit: int | None = None) -> Resp:
    """Parse chunk framing strictly; stop after `limit` chunks, at the terminator, or at EOF."""
    if resp.chunks is None:
        resp.chunks, resp.complete = [], False
    try:
        while limit is None or len(resp.chunks) < limit:
            size_line = await reader.readuntil(b"\r\n")
            assert re.fullmatch(rb"[0-9a-f]+\r\n", size_line), size_line  # lowercase hex, no extensions
            size = int(size_line[:-2], 16)
            if size == 0:
                assert await reader.readexactly(2) == b"\r\n"
                resp.complete = True
                break
            resp.chunks.append(await reader.readexactly(size))
            assert await reader.readexactly(2) == b"\r\n"
    except asyncio.IncompleteReadError:
        pass
    resp.body = b"".join(resp.chunks)
    return resp


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> Resp:
    resp = await read_head(reader)
    if head or resp.status in (204, 304):
        return resp
    if resp.header("transfer-encoding") == "chunked":
        assert resp.header("content-length") is None
        return await read_chunks(reader, resp)
    if resp.header("content-length") is not None:
        resp.body = await reader.readexactly(int(resp.header("content-length")))  # type: ignore[arg-type]
    else:
        resp.body = await reader.read()
    return resp


class Client:
    def __init__(self, fake: FakeOllama) -> None:
        self.fake = fake
        self.host = f"127.0.0.1:{fake.port}"

    async def __aenter__(self) -> Client:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.fake.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def call(self, method: str, path: str, **kw: Any) -> Resp:
        kw.setdefault("host", self.host)
        await self.send(build(method, path, **kw))
        return await read_response(self.reader, head=method == "HEAD")


async def call(fake: FakeOllama, method: str, path: str, **kw: Any) -> Resp:
    async with Client(fake) as c:
        return await c.call(method, path, **kw)


@pytest.fixture
async def fake():
    async with FakeOllama() as f:
        yield f
    assert not f.errors


def lines_of(resp: Resp) -> list[dict[str, Any]]:
    """Each chunk must be exactly one NDJSON line."""
    assert resp.chunks is not None
    out = []
    for chunk in resp.chunks:
        assert chunk.endswith(b"\n") and chunk.count(b"\n") == 1, chunk
        out.append(json.loads(chunk))
    return out


def sse_events(resp: Resp) -> list[bytes]:
    """Each chunk must be exactly one SSE event `data: ...\\n\\n`."""
    assert resp.chunks is not None
    for chunk in resp.chunks:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"\n\n") == 1, chunk
    return [c[len(b"data: ") : -2] for c in resp.chunks]


# ---- basics -------------------------------------------------------------------------------
async def test_root_get_and_head_keep_alive(fake: FakeOllama) -> None:
    async with Client(fake) as c:
        r = await c.call("GET", "/")
        assert (r.status, r.body) == (200, b"Ollama is running")
        assert r.header("content-length") == "17"
        assert r.header("content-type") == "text/plain; charset=utf-8"
        assert r.header("date") and r.header("server") is None
        h = await c.call("HEAD", "/")
        assert h.status == 200 and h.header("content-length") == "17"
        # If HEAD had leaked a body, this response would not parse.
        v = await c.call("GET", "/api/version")
        assert v.json() == {"version": "0.12.6"}
        assert v.header("content-type") == "application/json; charset=utf-8"
    assert [r.conn_id for r in fake.received] == [1, 1, 1]
    assert fake.connections_opened == 1


async def test_keep_alive_reuse_and_new_connection_ids(fake: FakeOllama) -> None:
    async with Client(fake) as a:
        await a.call("GET", "/api/tags")
        await a.call("GET", "/api/tags")
        assert fake.open_connections == 1
        async with Client(fake) as b:
            await b.call("GET", "/api/version")
            assert fake.open_connections == 2
    await asyncio.sleep(0.05)
    assert [r.conn_id for r in fake.received] == [1, 1, 2]
    assert fake.connections_opened == 2 and fake.open_connections == 0


async def test_connection_close_request_closes(fake: FakeOllama) -> None:
    async with Client(fake) as c:
        r = await c.call("GET", "/api/version", headers=[("Connection", "close")])
        assert r.status == 200 and r.header("connection") == "close"
        assert await c.reader.read() == b""


async def test_tags_ps_show_and_large_bodies_are_chunked(fake: FakeOllama) -> None:
    tags = await call(fake, "GET", "/api/tags")
    assert tags.header("content-length") is not None  # two models: small body
    names = [m["name"] for m in tags.json()["models"]]
    assert names == ["llama3.2:latest", "qwen2.5:0.5b"]
    assert set(tags.json()["models"][0]) == {"name", "model", "modified_at", "size", "digest", "details"}
    show = await call(fake, "POST", "/api/show", json_body={"model": "llama3.2"})
    assert show.status == 200 and len(show.body) > 2048
    assert show.chunks is not None and len(show.chunks) == 1  # one big chunk, like Go
    assert "license" in show.json() and show.json()["details"]["format"] == "gguf"
    assert (await call(fake, "POST", "/api/show", json_body={})).json() == {"error": "model is required"}
    nf = await call(fake, "POST", "/api/show", json_body={"model": "nope"})
    assert (nf.status, nf.json()) == (404, {"error": "model 'nope' not found"})
    many = FakeOllama(models=[f"model-{i}:latest" for i in range(30)])
    async with many:
        big = await call(many, "GET", "/api/tags")
        assert big.chunks is not None and len(big.json()["models"]) == 30
        head = await call(many, "HEAD", "/api/tags")
        assert head.header("content-length") is None and head.header("transfer-encoding") is None
    await call(fake, "POST", "/api/generate", json_body={"model": "qwen2.5:0.5b", "prompt": "x"})
    ps = (await call(fake, "GET", "/api/ps")).json()
    assert [m["name"] for m in ps["models"]] == ["qwen2.5:0.5b"] and "expires_at" in ps["models"][0]


# ---- Host and Origin guards -----------------------------------------------------------------
async def test_host_check(fake: FakeOllama) -> None:
    for host in ("gateway.example.com", "8.8.8.8:11434", "example.com:80", "[::1]"):
        r = await call(fake, "GET", "/api/version", host=host)
        assert r.status == 403, host
        assert r.body == b"" and r.header("content-length") == "0" and r.header("content-type") is None
    allowed = ["localhost:11434", "LOCALHOST", "a.localhost", "box.local:80", "db.internal", "10.1.2.3:9",
               "172.16.0.1", "192.168.1.1", "[::1]:11434", "0.0.0.0:11434", "", socket.gethostname()]
    for host in allowed:
        r = await call(fake, "GET", "/api/version", host=host)
        assert r.status == 200, host
    # A hostname that passes answers OPTIONS itself with 204.
    opt = await call(fake, "OPTIONS", "/api/chat", host="localhost:11434")
    assert opt.status == 204 and opt.header("content-length") is None
    async with FakeOllama(check_host=False) as open_fake:
        assert (await call(open_fake, "GET", "/api/version", host="gateway.example.com")).status == 200


async def test_origin_check(fake: FakeOllama) -> None:
    for origin in ("https://app.example.com", "chrome-extension://abcdef", "http://localhost.evil.com"):
        r = await call(fake, "GET", "/api/version", headers=[("Origin", origin)])
        assert (r.status, r.body, r.header("content-length")) == (403, b"", "0"), origin
    ok = await call(fake, "GET", "/api/version", headers=[("Origin", "http://localhost:3000")])
    assert ok.status == 200
    assert ok.header("access-control-allow-origin") == "http://localhost:3000"
    assert ok.header("vary") == "Origin"
    pre = await call(fake, "OPTIONS", "/api/chat", headers=[
        ("Origin", "http://127.0.0.1:5173"), ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "x-api-key")])
    assert pre.status == 204 and pre.body == b""
    assert pre.header("access-control-allow-origin") == "http://127.0.0.1:5173"
    assert pre.header("access-control-allow-methods") == "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
    allow_headers = pre.header("access-control-allow-headers").split(",")  # type: ignore[union-attr]
    assert "Authorization" in allow_headers and "X-Api-Key" not in allow_headers
    assert pre.header("access-control-max-age") == "43200"
    assert [v for k, v in pre.headers if k == "Vary"] == [
        "Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers"]
    # Same-origin requests are not CORS requests, even for an origin that is not in the list.
    same = await call(fake, "GET", "/api/version", host="box.local:8080",
                      headers=[("Origin", "http://box.local:8080")])
    assert same.status == 200 and same.header("access-control-allow-origin") is None
    async with FakeOllama(check_origin=False) as open_fake:
        r = await call(open_fake, "GET", "/api/version", headers=[("Origin", "https://app.example.com")])
        assert r.status == 200


# ---- native generation --------------------------------------------------------------------
async def test_generate_stream_one_line_per_chunk(fake: FakeOllama) -> None:
    body = {"model": "llama3.2", "prompt": "hello there", "options": {"num_predict": 3}}
    r = await call(fake, "POST", "/api/generate?x=1", json_body=body,
                   headers=[("X-Trace", "a"), ("X-Trace", "b")])
    assert r.status == 200 and r.complete
    assert r.header("content-type") == "application/x-ndjson" and r.header("transfer-encoding") == "chunked"
    items = lines_of(r)
    assert [i["response"] for i in items] == ["tok0 ", "tok1 ", "tok2 ", ""]
    assert all(i["model"] == "llama3.2" and RFC3339NANO.match(i["created_at"]) for i in items)
    assert [i["done"] for i in items] == [False, False, False, True]
    assert list(items[0]) == ["model", "created_at", "response", "done"]
    last = items[-1]
    assert last["done_reason"] == "length" and last["eval_count"] == 3 and last["context"]
    metrics = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
               "eval_duration")
    for k in metrics:
        assert isinstance(last[k], int) and last[k] > 0, k
    rec = fake.received[-1]
    assert (rec.method, rec.target, rec.path, rec.query) == (
        "POST", "/api/generate?x=1", "/api/generate", "x=1")
    assert rec.json() == body and rec.header("X-TRACE") == "a"
    assert [v for k, v in rec.headers if k == "x-trace"] == ["a", "b"]
    default = lines_of(
        await call(fake, "POST", "/api/generate", json_body={"model": "llama3.2", "prompt": "x"}))
    assert len(default) == 6 and default[-1]["done_reason"] == "stop"


async def test_chat_stream_and_stream_false(fake: FakeOllama) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    items = lines_of(await call(fake, "POST", "/api/chat", json_body={"model": "llama3.2", "messages": msgs}))
    assert [i["message"] for i in items[:2]] == [
        {"role": "assistant", "content": "tok0 "}, {"role": "assistant", "content": "tok1 "}]
    assert list(items[-1])[:5] == ["model", "created_at", "message", "done_reason", "done"]
    r = await call(fake, "POST", "/api/chat", json_body={
        "model": "llama3.2", "messages": msgs, "stream": False, "options": {"num_predict": 2}})
    assert r.header("content-type") == "application/json; charset=utf-8" and r.header("content-length")
    obj = r.json()
    assert obj["message"] == {"role": "assistant", "content": "tok0 tok1 "} and obj["done"] is True
    assert obj["eval_count"] == 2


async def test_load_unload_and_request_errors(fake: FakeOllama) -> None:
    load = await call(fake, "POST", "/api/generate", json_body={"model": "llama3.2"})
    assert load.header("content-type") == "application/json; charset=utf-8" and load.chunks is None
    assert load.json()["done_reason"] == "load" and load.json()["done"] is True
    unload = await call(fake, "POST", "/api/chat",
                        json_body={"model": "llama3.2", "messages": [], "keep_alive": 0})
    assert unload.json()["done_reason"] == "unload"
    nf = await call(fake, "POST", "/api/chat", json_body={"model": "nope", "messages": [{"role": "user"}]})
    assert nf.status == 404 and nf.body == b'{"error":"model \\"nope\\" not found, try pulling it first"}'
    empty = await call(fake, "POST", "/api/generate", body=b"")
    assert (empty.status, empty.body) == (400, b'{"error":"missing request body"}')
    bad = await call(fake, "POST", "/api/chat", body=b"xyz")
    assert bad.status == 400 and bad.json()["error"].startswith("invalid character 'x'")
    no_model = await call(fake, "POST", "/api/chat", json_body={"messages": []})
    assert (no_model.status, no_model.json()) == (400, {"error": "model is required"})


async def test_404_405_and_trailing_slash(fake: FakeOllama) -> None:
    r = await call(fake, "GET", "/nope")
    assert (r.status, r.body, r.header("content-type")) == (404, b"404 page not found", "text/plain")
    assert r.header("content-length") == "18"
    r = await call(fake, "GET", "/api/chat")
    assert (r.status, r.body, r.header("allow")) == (405, b"405 method not allowed", "POST")
    assert (await call(fake, "HEAD", "/api/ps")).header("allow") == "GET"
    assert (await call(fake, "POST", "/api/tags")).header("allow") == "HEAD, GET"
    red = await call(fake, "GET", "/api/tags/?a=b")
    assert red.status == 301 and red.header("location") == "/api/tags?a=b"
    me = await call(fake, "POST", "/api/me")
    assert me.status == 200 and "email" in me.json()
    assert (await call(fake, "POST", "/api/signout")).status == 200


async def test_embed_pull_copy_delete(fake: FakeOllama) -> None:
    e = (await call(fake, "POST", "/api/embed", json_body={"model": "llama3.2", "input": ["a", "b"]})).json()
    assert len(e["embeddings"]) == 2 and e["embeddings"][0] != e["embeddings"][1]
    legacy = await call(fake, "POST", "/api/embeddings", json_body={"model": "llama3.2", "prompt": ""})
    assert legacy.json() == {"embedding": []}
    pull = await call(fake, "POST", "/api/pull", json_body={"model": "mistral"})
    statuses = [i["status"] for i in lines_of(pull)]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == [
        "verifying sha256 digest", "writing manifest", "success"]
    layer = [i for i in lines_of(pull) if i["status"].startswith("pulling ") and "digest" in i]
    assert re.fullmatch(r"pulling [0-9a-f]{12}", layer[0]["status"]) and "completed" not in layer[0]
    assert layer[-1]["completed"] == layer[-1]["total"]
    assert "mistral:latest" in fake.models
    quiet = await call(fake, "POST", "/api/pull", json_body={"model": "phi3", "stream": False})
    assert quiet.header("content-type") == "application/json" and quiet.json() == {"status": "success"}
    missing = lines_of(await call(fake, "POST", "/api/pull", json_body={"model": "missing-model"}))
    assert missing[-1] == {"error": "pull model manifest: file does not exist"}
    cp = await call(fake, "POST", "/api/copy", json_body={"source": "llama3.2", "destination": "mine"})
    assert (cp.status, cp.body, cp.header("content-length")) == (200, b"", "0")
    cp404 = await call(fake, "POST", "/api/copy", json_body={"source": "zzz", "destination": "y"})
    assert (cp404.status, cp404.json()) == (404, {"error": 'model "zzz" not found'})
    d = await call(fake, "DELETE", "/api/delete", json_body={"model": "mine"})
    assert (d.status, d.body) == (200, b"") and "mine" not in fake.models
    d404 = await call(fake, "DELETE", "/api/delete", json_body={"model": "mine"})
    assert (d404.status, d404.json()) == (404, {"error": "model 'mine' not found"})


async def test_stream_timestamps_and_gap(fake: FakeOllama) -> None:
    body = {"model": "llama3.2", "prompt": "x",
            "options": {"num_predict": 3, "fake_gap_ms": 30, "fake_timestamps": True}}
    t0 = time.monotonic_ns()
    items = lines_of(await call(fake, "POST", "/api/generate", json_body=body))
    stamps = [i["sent_ns"] for i in items]
    assert len(stamps) == 4 and stamps[0] >= t0
    assert all(b - a >= 25_000_000 for a, b in zip(stamps, stamps[1:]))


# ---- OpenAI compatible --------------------------------------------------------------------
async def test_v1_chat_sse_and_json(fake: FakeOllama) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 3, "stream_options": {"include_usage": True}}
    r = await call(fake, "POST", "/v1/chat/completions", json_body=body)
    assert r.header("content-type") == "text/event-stream" and r.complete
    events = sse_events(r)
    assert events[-1] == b"[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": "tok0 "}
    assert [o["choices"][0]["delta"] for o in objs[1:3]] == [{"content": "tok1 "}, {"content": "tok2 "}]
    assert objs[3]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    assert objs[4]["choices"] == [] and objs[4]["usage"]["completion_tokens"] == 3
    assert {o["object"] for o in objs} == {"chat.completion.chunk"} and len({o["id"] for o in objs}) == 1
    assert objs[0]["id"].startswith("chatcmpl-") and objs[0]["system_fingerprint"] == "fp_ollama"
    no_stream = {k: v for k, v in body.items() if k != "stream"}  # /v1 defaults to stream:false
    plain = await call(fake, "POST", "/v1/chat/completions", json_body=no_stream)
    assert plain.header("content-type") == "application/json" and plain.body.endswith(b"}\n")
    obj = plain.json()
    assert obj["object"] == "chat.completion" and obj["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert obj["usage"]["total_tokens"] == obj["usage"]["prompt_tokens"] + 3
    nf = await call(fake, "POST", "/v1/chat/completions", json_body={**body, "model": "nope"})
    assert nf.status == 404 and nf.json() == {"error": {
        "message": 'model "nope" not found, try pulling it first', "type": "not_found_error",
        "param": None, "code": None}}
    empty = await call(fake, "POST", "/v1/chat/completions", json_body={"model": "llama3.2", "messages": []})
    assert empty.status == 400 and empty.json()["error"]["type"] == "invalid_request_error"


async def test_v1_completions_models_embeddings(fake: FakeOllama) -> None:
    r = await call(fake, "POST", "/v1/completions",
                   json_body={"model": "llama3.2", "prompt": "x", "stream": True})
    events = sse_events(r)
    assert events[-1] == b"[DONE]"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert texts == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "tok4 ", ""]
    models = (await call(fake, "GET", "/v1/models")).json()
    assert [m["id"] for m in models["data"]] == fake.models and models["object"] == "list"
    assert (await call(fake, "GET", "/v1/models/llama3.2:latest")).json()["owned_by"] == "library"
    emb = await call(fake, "POST", "/v1/embeddings", json_body={"model": "llama3.2", "input": "hello"})
    assert emb.json()["data"][0]["object"] == "embedding" and emb.json()["usage"]["total_tokens"] >= 1


async def test_httpx_client_streaming(fake: FakeOllama) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as client:
        async with client.stream("POST", "/api/chat", json={
                "model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}) as resp:
            lines = [json.loads(line) async for line in resp.aiter_lines() if line]
    assert resp.status_code == 200 and lines[-1]["done"] is True and len(lines) == 6


# ---- blobs --------------------------------------------------------------------------------
async def test_blob_upload_chunked_then_exists(fake: FakeOllama) -> None:
    data = os.urandom(300_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert (await call(fake, "HEAD", f"/api/blobs/{digest}")).status == 404
    async with Client(fake) as c:
        await c.send(
            f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: {c.host}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        for i in range(0, len(data), 65536):
            part = data[i : i + 65536]
            await c.send(b"%x\r\n%b\r\n" % (len(part), part))
        await c.send(b"0\r\n\r\n")
        r = await read_response(c.reader)
        assert (r.status, r.body, r.header("content-length")) == (201, b"", "0")
    rec = fake.received[-1]
    assert (rec.body, rec.blob_size, rec.blob_sha256) == (b"", len(data), digest[7:])
    assert digest in fake.blobs
    assert (await call(fake, "HEAD", f"/api/blobs/{digest}")).status == 200

    # Already present: 200 at once although 10 MiB of announced body never arrives.
    async with Client(fake) as c:
        await c.send(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: {c.host}\r\n"
                     f"Content-Length: {10 << 20}\r\n\r\n".encode())
        r = await asyncio.wait_for(read_response(c.reader), 1.0)
        assert r.status == 200 and r.header("connection") == "close"
        assert await c.reader.read() == b""  # FIN follows (Go's closeWriteAndWait)
    assert fake.received[-1].blob_size is None and fake.received[-1].path == f"/api/blobs/{digest}"

    # Small unread body (<= 256 KiB) is discarded and the connection stays usable.
    async with Client(fake) as c:
        r = await c.call("POST", f"/api/blobs/{digest}", body=b"x" * 1000)
        assert r.status == 200 and r.header("connection") is None
        assert (await c.call("GET", "/api/version")).status == 200


async def test_blob_mismatch_and_invalid_digest(fake: FakeOllama) -> None:
    data = b"hello blob"
    real = "sha256:" + hashlib.sha256(data).hexdigest()
    claimed = "sha256:" + "0" * 64
    r = await call(fake, "POST", f"/api/blobs/{claimed}", body=data)
    assert r.status == 400 and r.json() == {"error": f'digest mismatch, expected "{claimed}", got "{real}"'}
    assert real in fake.blobs and claimed not in fake.blobs
    upper = "sha256:" + hashlib.sha256(b"other").hexdigest().upper()
    assert (await call(fake, "POST", f"/api/blobs/{upper}", body=b"other")).status == 400
    for bad in ("sha256:xyz", "md5:" + "0" * 64, "sha256:" + "0" * 63):
        r = await call(fake, "POST", f"/api/blobs/{bad}", body=b"abc")
        assert (r.status, r.body) == (400, b'{"error":"invalid digest format"}'), bad


async def test_large_blob_streamed_with_content_length(fake: FakeOllama) -> None:
    block = os.urandom(1 << 20)
    total = 24
    h = hashlib.sha256()
    for _ in range(total):
        h.update(block)
    digest = "sha256:" + h.hexdigest()
    async with Client(fake) as c:
        await c.send(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: {c.host}\r\n"
                     f"Content-Length: {total << 20}\r\n\r\n".encode())
        for _ in range(total):
            await c.send(block)
        assert (await read_response(c.reader)).status == 201
    assert fake.received[-1].blob_size == total << 20


# ---- faults -------------------------------------------------------------------------------
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 5}}


async def test_fault_reset_before_status(fake: FakeOllama) -> None:
    fake.faults.append("reset-before-status")
    async with Client(fake) as c:
        await c.send(build("POST", "/api/chat", host=c.host, json_body=CHAT))
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(c.reader.read(100), 2)
    assert fake.received[-1].path == "/api/chat" and fake.faults == []
    assert fake.disconnects == []  # our own reset is not a client disconnect


async def test_fault_reset_mid_stream(fake: FakeOllama) -> None:
    async with Client(fake) as c:
        await c.send(build("POST", "/api/chat", host=c.host,
                           json_body={**CHAT, "model": "fault:reset-mid-stream"}))
        await c.reader.readuntil(b"\r\n\r\n")
        got = b""
        with pytest.raises(ConnectionResetError):
            while True:
                data = await c.reader.read(65536)
                assert data, "expected RST, got FIN"
                got += data
    assert got.count(b'"done":false') == 2 and b"0\r\n\r\n" not in got


async def test_fault_close_mid_stream(fake: FakeOllama) -> None:
    fake.faults.append("close-mid-stream")
    async with Client(fake) as c:
        await c.send(build("POST", "/api/chat", host=c.host, json_body=CHAT))
        r = await read_response(c.reader)
    assert r.status == 200 and not r.complete and len(lines_of(r)) == 2


async def test_fault_error_mid_stream(fake: FakeOllama) -> None:
    async with Client(fake) as c:
        await c.send(build("POST", "/api/generate", host=c.host,
                           json_body={"model": "fault:error-mid-stream", "prompt": "x"}))
        r = await read_response(c.reader)
        assert r.status == 200 and r.complete
        items = lines_of(r)
        assert len(items) == 3 and items[-1] == {"error": "something went wrong"}
        assert (await c.call("GET", "/api/version")).status == 200  # stream ended cleanly
    fake.faults.append("error-mid-stream")
    sse = await call(fake, "POST", "/v1/chat/completions", json_body={**CHAT, "stream": True})
    assert json.loads(sse_events(sse)[-1])["error"]["message"] == "something went wrong"


async def test_fault_stall_and_stall_mid_stream(fake: FakeOllama) -> None:
    fake.faults.append("stall")
    async with Client(fake) as c:
        await c.send(build("GET", "/api/tags", host=c.host))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.reader.read(1), 0.3)
    d = await fake.wait_for_disconnect(1.0)
    assert (d.path, d.items_sent) == ("/api/tags", 0)
    async with Client(fake) as c:
        await c.send(build("POST", "/api/chat", host=c.host,
                           json_body={**CHAT, "model": "fault:stall-mid-stream"}))
        await c.reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.2)
        buffered = await asyncio.wait_for(c.reader.read(65536), 0.5)
        assert buffered.count(b'"done":false') == 2
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.reader.read(1), 0.2)
        assert fake.open_connections == 1
    d = await fake.wait_for_disconnect(1.0)
    assert (d.path, d.items_sent) == ("/api/chat", 2)


async def test_fault_malformed_status_and_header(fake: FakeOllama) -> None:
    fake.faults += ["malformed-status", "malformed-header"]
    async with Client(fake) as c:
        await c.send(build("GET", "/api/version", host=c.host))
        assert await asyncio.wait_for(c.reader.read(), 2) == b"HTTP/1.1 abc\r\n\r\n"
    async with Client(fake) as c:
        await c.send(build("GET", "/api/version", host=c.host))
        raw = await asyncio.wait_for(c.reader.read(), 2)
    head_lines = raw.split(b"\r\n")
    assert head_lines[0] == b"HTTP/1.1 200 OK" and any(line and b":" not in line for line in head_lines[1:])


async def test_fault_status_500_slow_first_byte_and_queue_order(fake: FakeOllama) -> None:
    fake.faults += ["status-500", "slow-first-byte", "bogus-fault"]
    r = await call(fake, "POST", "/api/chat", json_body=CHAT)
    assert (r.status, r.json()) == (500, {"error": "something went wrong"})
    t = time.monotonic()
    r = await call(fake, "POST", "/api/chat", json_body=CHAT)
    assert r.status == 200 and len(lines_of(r)) == 6 and time.monotonic() - t >= 0.3
    r = await call(fake, "GET", "/api/version")
    assert r.status == 500 and "bogus-fault" in r.json()["error"]
    assert (await call(fake, "GET", "/api/version")).status == 200 and fake.faults == []
    v1 = await call(fake, "POST", "/v1/chat/completions", json_body={**CHAT, "model": "fault:status-500"})
    assert v1.status == 500 and v1.json()["error"]["type"] == "api_error"


# ---- disconnects, pipelining, lifecycle ---------------------------------------------------------
async def test_disconnect_detected_and_generation_stops(fake: FakeOllama) -> None:
    body = {**CHAT, "options": {"num_predict": 1000, "fake_gap_ms": 20}}
    async with Client(fake) as c:
        await c.send(build("POST", "/api/chat", host=c.host, json_body=body))
        r = await read_chunks(c.reader, await read_head(c.reader), limit=3)
        assert len(lines_of(r)) == 3 and not r.complete
        closed_at = time.monotonic()
    d = await fake.wait_for_disconnect(1.0)
    assert d.path == "/api/chat" and d.at - closed_at < 1.0
    assert 3 <= d.items_sent < 20
    await asyncio.sleep(0.1)
    assert fake.open_connections == 0 and len(fake.disconnects) == 1
    with pytest.raises(asyncio.TimeoutError):
        await fake.wait_for_disconnect(0.05)  # nothing else was recorded
    assert not handler_tasks()


def handler_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if "_Conn._work" in repr(t.get_coro())]


async def test_disconnect_cancels_non_streaming_generation(fake: FakeOllama) -> None:
    # stream:false with 1000 x 20 ms would keep "generating" for 20 s if not cancelled.
    body = {**CHAT, "stream": False, "options": {"num_predict": 1000, "fake_gap_ms": 20}}
    async with Client(fake) as c:
        await c.send(build("POST", "/api/chat", host=c.host, json_body=body))
        await asyncio.sleep(0.1)
        assert len(handler_tasks()) == 1
    d = await fake.wait_for_disconnect(1.0)
    assert (d.path, d.items_sent) == ("/api/chat", 0)
    await asyncio.sleep(0.05)
    assert not handler_tasks()


async def test_pipelined_requests_answered_in_order(fake: FakeOllama) -> None:
    async with Client(fake) as c:
        gen = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 2, "fake_gap_ms": 10}}
        await c.send(
            build("POST", "/api/generate", host=c.host, json_body=gen)
            + build("GET", "/api/version", host=c.host)
            + build("HEAD", "/", host=c.host)
            + build("GET", "/nope", host=c.host)
        )
        first = await read_response(c.reader)
        assert len(lines_of(first)) == 3
        assert (await read_response(c.reader)).json() == {"version": "0.12.6"}
        head = await read_response(c.reader, head=True)
        assert head.header("content-length") == "17"
        assert (await read_response(c.reader)).status == 404
    assert [r.path for r in fake.received] == ["/api/generate", "/api/version", "/", "/nope"]
    assert {r.conn_id for r in fake.received} == {1}


async def test_restart_same_port(fake: FakeOllama) -> None:
    port = fake.port
    async with Client(fake) as c:
        assert (await c.call("GET", "/api/version")).status == 200
        await fake.restart()
        assert await asyncio.wait_for(c.reader.read(), 1) == b""  # old connection was dropped
    assert fake.port == port and fake.url == f"http://127.0.0.1:{port}"
    assert (await call(fake, "GET", "/api/version")).status == 200
    assert fake.connections_opened == 2 and len(fake.received) == 2


async def test_close_idle_connections(fake: FakeOllama) -> None:
    async with Client(fake) as idle, Client(fake) as busy:
        await idle.call("GET", "/api/version")
        await busy.send(build("POST", "/api/chat", host=busy.host, json_body={
            **CHAT, "options": {"num_predict": 10, "fake_gap_ms": 20}}))
        head = await read_head(busy.reader)
        await fake.close_idle_connections()
        assert await asyncio.wait_for(idle.reader.read(), 1) == b""
        assert fake.open_connections == 1
        r = await asyncio.wait_for(read_chunks(busy.reader, head), 3)
        assert r.complete and len(lines_of(r)) == 11  # the busy stream was not touched
        assert (await busy.call("GET", "/api/version")).status == 200
    assert fake.disconnects == []


async def test_fake_bytes_exact_and_faults(fake: FakeOllama) -> None:
    n = 3 * 65536 + 123
    r = await call(fake, "GET", f"/fake/bytes?n={n}")
    assert r.header("content-length") == str(n) and r.header("content-type") == "application/octet-stream"
    assert r.body == (bytes(range(256)) * (n // 256 + 1))[:n]
    fake.faults.append("close-mid-stream")
    async with Client(fake) as c:
        await c.send(build("GET", f"/fake/bytes?n={n}", host=c.host))
        await c.reader.readuntil(b"\r\n\r\n")
        assert len(await asyncio.wait_for(c.reader.read(), 2)) == 2 * 65536


async def test_http10_and_expect_continue(fake: FakeOllama) -> None:
    async with Client(fake) as c:
        await c.send(b"POST /api/generate HTTP/1.0\r\nContent-Length: 40\r\n\r\n"
                     + json.dumps({"model": "llama3.2", "prompt": "x"}).encode().ljust(40))
        raw = await asyncio.wait_for(c.reader.read(), 2)  # no chunking in 1.0: body ends at close
    assert raw.startswith(b"HTTP/1.0 200 OK") and b"Transfer-Encoding" not in raw
    assert raw.count(b'"done":') == 6
    body = json.dumps({"model": "llama3.2", "prompt": "x", "stream": False}).encode()
    async with Client(fake) as c:
        await c.send(f"POST /api/generate HTTP/1.1\r\nHost: {c.host}\r\nExpect: 100-continue\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        assert await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 1) == b"HTTP/1.1 100 Continue\r\n\r\n"
        await c.send(body)
        assert (await read_response(c.reader)).json()["done"] is True


async def test_bad_request_and_standalone_main(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fake_ollama", "--port", "0", cwd=repo,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 5)).decode()  # type: ignore[union-attr]
        m = re.fullmatch(r"listening on http://127\.0\.0\.1:(\d+)\n", line)
        assert m, line
        reader, writer = await asyncio.open_connection("127.0.0.1", int(m.group(1)))
        writer.write(b"GET /api/version HTTP/1.1\r\n\r\n")  # no Host: Go answers 400 and closes
        raw = await asyncio.wait_for(reader.read(), 2)
        assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"Connection: close" in raw
        writer.close()
        await writer.wait_closed()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.communicate(), 5)
    assert proc.returncode == 0


@pytest.mark.parametrize("body, model", [
    (b'{"Model":"qwen2.5:0.5b","stream":false}', "qwen2.5:0.5b"),  # keys fold as Go's struct fields do
    (b'{"model":"qwen2.5:0.5b","MODEL":"llama3.2:latest","stream":false}', "llama3.2:latest"),  # last wins
    (b'{"model":"qwen2.5:0.5b","model":null,"stream":false}', "qwen2.5:0.5b"),  # null leaves it
    (b'{"x":' + b"[" * 3000 + b"]" * 3000 + b',"x2":' + b"9" * 5000 + b',"model":"qwen2.5:0.5b","stream":false}',
     "qwen2.5:0.5b"),  # deep nesting and huge numbers elsewhere are fine in Go
])
async def test_bodies_are_read_as_go_reads_them(fake: FakeOllama, body: bytes, model: str) -> None:
    resp = await call(fake, "POST", "/api/generate", body=body)
    assert resp.status == 200, resp.body
    assert resp.json()["model"] == model
