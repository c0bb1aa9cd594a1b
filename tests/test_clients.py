"""fastgate driven by the real client libraries, used exactly as their users use them.

ollama-python, the OpenAI SDK and langchain-ollama talk to a fastgate started in this test's event loop,
which forwards to the fake Ollama. Sync clients run in a worker thread (`asyncio.to_thread`) so the loop
keeps serving. Ollama's Go CLI cannot be installed here, so its requests are replayed byte for byte with the
raw client (wire doc section 10: no key header, its own User-Agent, NDJSON streams, chunked blob uploads).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

import httpx
import ollama as ollama_lib  # imported under another name: the `ollama` fixture is the fake
import openai
import pytest
from langchain_ollama import ChatOllama, OllamaEmbeddings

from fastgate.config import build_config
from fastgate.server import RunningServer, start
from tests.conftest import KEY1, KEY2
from tests.fake_ollama import DEFAULT_MODELS, FakeOllama, _embedding
from tests.rawhttp import Client, build_request

pytestmark = pytest.mark.timeout(30)

MODEL = "llama3.2:latest"
TOKENS = "tok0 tok1 tok2 tok3 tok4 "  # what the fake generates by default (5 tokens)
BAD_KEY = "api-wrong-key-999999"
GO_UA = "ollama/0.12.6 (amd64 linux) Go/go1.24"
LangchainModel = TypeVar("LangchainModel", ChatOllama, OllamaEmbeddings)
MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(autouse=True)
def _no_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The clients read these; a developer's own settings must not leak into (or rescue) a test.
    for name in ("OLLAMA_API_KEY", "OLLAMA_HOST", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def assert_no_key_reached(fake: FakeOllama) -> None:
    """Nothing that carried a key, and no key anywhere, got to Ollama."""
    assert fake.received, "the fake received nothing at all"
    for got in fake.received:
        assert got.header("x-api-key") is None, got
        assert got.header("authorization") is None, got
        wire = json.dumps(got.headers) + got.target + got.body.decode("latin-1")
        for key in (KEY1, KEY2, BAD_KEY):
            assert key not in wire, got


def paths(fake: FakeOllama) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in fake.received]


# -- ollama-python -----------------------------------------------------------------------------------------

async def test_ollama_async_chat_stream(gateway: RunningServer, ollama: FakeOllama) -> None:
    async with async_client(gateway) as client:
        parts = [part async for part in await client.chat(model=MODEL, messages=MESSAGES, stream=True)]
    assert [p.message.content for p in parts[:-1]] == [f"tok{i} " for i in range(5)]
    assert [p.done for p in parts] == [False] * 5 + [True]
    assert parts[-1].done_reason == "stop"
    assert parts[-1].eval_count == 5
    assert paths(ollama) == [("POST", "/api/chat")]
    sent = ollama.received[0].json()
    assert sent["model"] == MODEL and sent["messages"] == MESSAGES and sent["stream"] is True
    assert ollama.received[0].header("user-agent").startswith("ollama-python/")
    assert_no_key_reached(ollama)


async def test_ollama_async_chat_and_generate_without_streaming(gateway: RunningServer,
                                                                ollama: FakeOllama) -> None:
    async with async_client(gateway) as client:
        chat = await client.chat(model=MODEL, messages=MESSAGES, stream=False)
        gen = await client.generate(model=MODEL, prompt="Why is the sky blue?", options={"num_predict": 3})
        streamed = [p.response async for p in await client.generate(model=MODEL, prompt="hi", stream=True)]
    assert chat.message.role == "assistant" and chat.message.content == TOKENS
    assert chat.done is True and chat.done_reason == "stop"
    assert gen.response == "tok0 tok1 tok2 " and gen.done is True and gen.done_reason == "length"
    assert gen.context and gen.eval_count == 3
    assert "".join(streamed) == TOKENS
    assert paths(ollama) == [("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/generate")]
    assert ollama.received[1].json()["options"] == {"num_predict": 3}
    assert_no_key_reached(ollama)


async def test_ollama_async_list_show_embed_ps(gateway: RunningServer, ollama: FakeOllama) -> None:
    async with async_client(gateway) as client:
        listed = await client.list()
        shown = await client.show(MODEL)
        embedded = await client.embed(model=MODEL, input=["first text", "second text"])
        running = await client.ps()
        version = await client.version() if hasattr(client, "version") else None  # not in ollama 0.6.x
    assert [m.model for m in listed.models] == DEFAULT_MODELS
    assert all(m.size and m.digest and m.details and m.details.family for m in listed.models)
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelfile and f"FROM {MODEL}" in shown.modelfile
    assert embedded.model == MODEL
    assert [list(v) for v in embedded.embeddings] == [_embedding("first text"), _embedding("second text")]
    # /api/embed loaded the model, so /api/ps lists it.
    assert [m.model for m in running.models] == [MODEL]
    if version is not None:
        assert version.version == ollama.version
    assert paths(ollama)[:4] == [("GET", "/api/tags"), ("POST", "/api/show"), ("POST", "/api/embed"),
                                 ("GET", "/api/ps")]
    assert_no_key_reached(ollama)


async def test_ollama_async_create_blob_streams_the_file(gateway: RunningServer, ollama: FakeOllama,
                                                         tmp_path: Path) -> None:
    data = os.urandom(100_000)  # several of the client's 32 KiB reads: a real chunked upload
    blob = tmp_path / "model.gguf"
    blob.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    statuses: list[tuple[str, int]] = []

    async def record(response: httpx.Response) -> None:
        statuses.append((response.request.url.path, response.status_code))

    async with async_client(gateway, event_hooks={"response": [record]}) as client:
        digest = await client.create_blob(blob)
    assert digest == f"sha256:{expected}"
    assert statuses == [(f"/api/blobs/sha256:{expected}", 201)]
    got = ollama.received[-1]
    assert (got.method, got.path) == ("POST", f"/api/blobs/sha256:{expected}")
    assert got.blob_sha256 == expected and got.blob_size == len(data)
    assert got.header("transfer-encoding") == "chunked"  # the async client streams a generator
    assert f"sha256:{expected}" in ollama.blobs
    assert_no_key_reached(ollama)


async def test_ollama_sync_client_in_a_thread(gateway: RunningServer, ollama: FakeOllama,
                                              tmp_path: Path) -> None:
    data = b"GGUF" + bytes(range(256)) * 40
    blob = tmp_path / "adapter.bin"
    blob.write_bytes(data)

    def use_sync_client() -> tuple[list[str], list[str], str]:
        with sync_client(gateway) as client:
            parts = [p.message.content for p in client.chat(model=MODEL, messages=MESSAGES, stream=True)]
            names = [m.model for m in client.list().models]
            digest = client.create_blob(blob)  # the sync client uploads the open file: Content-Length
        return parts, names, digest

    parts, names, digest = await asyncio.to_thread(use_sync_client)
    assert "".join(parts) == TOKENS
    assert names == DEFAULT_MODELS
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    upload = ollama.received[-1]
    assert upload.blob_sha256 == hashlib.sha256(data).hexdigest() and upload.blob_size == len(data)
    assert upload.header("content-length") == str(len(data))
    assert_no_key_reached(ollama)


async def test_ollama_api_key_env_var_is_sent_as_bearer(gateway: RunningServer, ollama: FakeOllama,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        gate_logs: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OLLAMA_API_KEY", KEY2)
    monkeypatch.setenv("OLLAMA_HOST", gateway.url)
    async with ollama_lib.AsyncClient() as client:  # host and key from the environment
        listed = await client.list()
        chat = await client.chat(model=MODEL, messages=MESSAGES)
    assert [m.model for m in listed.models] == DEFAULT_MODELS
    assert chat.message.content == TOKENS
    assert "user2 (bearer:api-****0202)" in gate_logs.text
    assert_no_key_reached(ollama)


async def test_ollama_wrong_key_raises_response_error_401(gateway: RunningServer, ollama: FakeOllama) -> None:
    async with ollama_lib.AsyncClient(host=gateway.url, headers={"X-API-Key": BAD_KEY}) as client:
        with pytest.raises(ollama_lib.ResponseError) as plain:
            await client.list()
        with pytest.raises(ollama_lib.ResponseError) as streamed:
            async for _ in await client.chat(model=MODEL, messages=MESSAGES, stream=True):
                pass
    for exc in (plain.value, streamed.value):
        assert exc.status_code == 401
        assert exc.error == "invalid API key"  # the JSON body's message, not raw JSON
        assert str(exc) == "invalid API key (status code: 401)"
    assert ollama.received == []


async def test_ollama_without_any_key_is_told_how_to_authenticate(gateway: RunningServer,
                                                                  ollama: FakeOllama) -> None:
    async with ollama_lib.AsyncClient(host=gateway.url) as client:
        with pytest.raises(ollama_lib.ResponseError) as info:
            await client.generate(model=MODEL, prompt="hi", stream=False)
    assert info.value.status_code == 401
    assert "X-API-Key" in info.value.error and "POST /auth" in info.value.error
    assert ollama.received == []


# -- OpenAI SDK --------------------------------------------------------------------------------------------

async def test_openai_chat_completion(gateway: RunningServer, ollama: FakeOllama) -> None:
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=KEY1, max_retries=0) as client:
        resp = await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert resp.object == "chat.completion" and resp.model == MODEL
    assert resp.choices[0].message.content == TOKENS
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    got = ollama.received[-1]
    assert (got.method, got.path) == ("POST", "/v1/chat/completions")
    assert got.json()["messages"] == MESSAGES
    assert_no_key_reached(ollama)


async def test_openai_chat_completion_stream(gateway: RunningServer, ollama: FakeOllama) -> None:
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=KEY1, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]  # ends at "data: [DONE]"
        again = await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas == [f"tok{i} " for i in range(5)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None] * 5 + ["stop"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and usage.completion_tokens == 5
    assert again.choices[0].message.content == TOKENS  # the connection was left in a usable state
    assert ollama.received[0].json()["stream"] is True
    assert_no_key_reached(ollama)


async def test_openai_models_and_embeddings(gateway: RunningServer, ollama: FakeOllama) -> None:
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=KEY1, max_retries=0) as client:
        models = [m.id async for m in client.models.list()]
        one = await client.models.retrieve(MODEL)
        emb = await client.embeddings.create(model=MODEL, input=["alpha", "beta"])
    assert models == DEFAULT_MODELS
    assert one.id == MODEL
    assert [d.index for d in emb.data] == [0, 1]
    for d, text in zip(emb.data, ["alpha", "beta"]):
        assert d.embedding == pytest.approx(_embedding(text), abs=1e-6)
    assert emb.usage.prompt_tokens == 2
    assert paths(ollama) == [("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"),
                             ("POST", "/v1/embeddings")]
    assert_no_key_reached(ollama)


async def test_openai_bad_key_is_authentication_error(gateway: RunningServer, ollama: FakeOllama) -> None:
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=BAD_KEY, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        with pytest.raises(openai.AuthenticationError) as streamed:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                                 stream=True)
    for exc in (info.value, streamed.value):
        assert exc.status_code == 401
        assert exc.body == {"message": "invalid API key", "type": "invalid_request_error", "param": None,
                            "code": "invalid_api_key"}
        assert exc.code == "invalid_api_key" and exc.type == "invalid_request_error"
        assert "invalid API key" in exc.message
        assert exc.request_id and len(exc.request_id) == 8  # fastgate's X-Request-Id
    assert ollama.received == []


# -- langchain-ollama --------------------------------------------------------------------------------------

async def test_langchain_chat_invoke_ainvoke_astream(gateway: RunningServer, ollama: FakeOllama) -> None:
    async with closing_langchain(ChatOllama(model=MODEL, base_url=gateway.url,
                                            client_kwargs={"headers": {"X-API-Key": KEY1}})) as llm:
        sync_answer = await asyncio.to_thread(llm.invoke, "Why is the sky blue?")
        async_answer = await llm.ainvoke("Why is the sky blue?")
        pieces = [chunk.content async for chunk in llm.astream("Why is the sky blue?")]
    assert sync_answer.content == TOKENS
    assert async_answer.content == TOKENS
    assert "".join(pieces) == TOKENS  # type: ignore[arg-type]
    assert len([p for p in pieces if p]) == 5  # streamed token by token, not buffered
    assert paths(ollama) == [("POST", "/api/chat")] * 3
    for got in ollama.received:
        body = got.json()
        assert body["model"] == MODEL
        assert body["messages"][-1] == {"role": "user", "content": "Why is the sky blue?"}
    assert_no_key_reached(ollama)


async def test_langchain_embeddings(gateway: RunningServer, ollama: FakeOllama) -> None:
    async with closing_langchain(OllamaEmbeddings(model=MODEL, base_url=gateway.url,
                                                  client_kwargs={"headers": {"X-API-Key": KEY1}})) as emb:
        query = await asyncio.to_thread(emb.embed_query, "what is fastgate")
        docs = await emb.aembed_documents(["doc one", "doc two"])
    assert query == pytest.approx(_embedding("what is fastgate"))
    assert docs == [pytest.approx(_embedding("doc one")), pytest.approx(_embedding("doc two"))]
    assert paths(ollama) == [("POST", "/api/embed")] * 2
    assert_no_key_reached(ollama)


async def test_langchain_without_headers_after_post_auth(gateway: RunningServer, ollama: FakeOllama,
                                                         gate_logs: pytest.LogCaptureFixture) -> None:
    async with closing_langchain(ChatOllama(model=MODEL, base_url=gateway.url)) as llm:
        with pytest.raises(ollama_lib.ResponseError) as before:
            await llm.ainvoke("hi")
        assert before.value.status_code == 401
        assert ollama.received == []

        async with httpx.AsyncClient(base_url=gateway.url) as http:
            auth = await http.post("/auth", json={"api_key": KEY1})
        assert auth.status_code == 200, auth.text
        assert auth.json()["user"] == "user1" and auth.json()["ip"] == "127.0.0.1"
        assert auth.json()["ip_trust"] is True and auth.json()["expires_in"] == 3600

        assert (await llm.ainvoke("hi")).content == TOKENS
        assert (await asyncio.to_thread(llm.invoke, "hi")).content == TOKENS
    assert "user1 (ip-trust:body:api-****0101)" in gate_logs.text
    assert_no_key_reached(ollama)


# -- Ollama's Go CLI (emulated on the wire) ----------------------------------------------------------------

def go_cli_head(method: str, target: str, gw: RunningServer, *, accept: str, extra: list[tuple[str, str]],
                body: bytes | None = None) -> bytes:
    """A request head the way Go's net/http client writes it for `ollama run` / `ollama create`."""
    headers = [("Host", f"127.0.0.1:{gw.port}"), ("User-Agent", GO_UA), *extra,
               ("Accept", accept), ("Content-Type", "application/json"), ("Accept-Encoding", "gzip")]
    return build_request(method, target, headers=headers, body=body, host=None)


async def test_go_cli_probe_auth_and_streamed_generate(gateway: RunningServer, ollama: FakeOllama) -> None:
    c = await Client.connect(gateway.port)
    try:
        probe = await c.request("HEAD", "/", headers=[("User-Agent", GO_UA)],
                                host=f"127.0.0.1:{gateway.port}")
        assert probe.status == 200 and probe.body == b""
        assert ollama.received == []  # answered by fastgate itself

        body = json.dumps({"model": MODEL, "prompt": "Why is the sky blue?", "options": {}}).encode()
        c.send(go_cli_head("POST", "/api/generate", gateway, accept="application/x-ndjson",
                           extra=[("Content-Length", str(len(body)))], body=body))
        refused = await c.response()
        assert refused.status == 401 and "POST /auth" in refused.json()["error"]
        assert ollama.received == []

        auth = await c.request("POST", "/auth", json_body={"api_key": KEY1},
                               headers={"Content-Type": "application/json"})
        assert auth.status == 200 and auth.json()["user"] == "user1"

        c.send(go_cli_head("POST", "/api/generate", gateway, accept="application/x-ndjson",
                           extra=[("Content-Length", str(len(body)))], body=body))
        resp = await c.response()
    finally:
        await c.close()
    assert resp.status == 200, resp.body
    assert resp.header("content-type") == "application/x-ndjson"
    assert resp.header("transfer-encoding") == "chunked"
    assert len(resp.chunks) == 6  # one chunk per NDJSON line, as Ollama wrote them
    lines = resp.lines
    assert "".join(line["response"] for line in lines) == TOKENS
    assert [line["done"] for line in lines] == [False] * 5 + [True]
    got = ollama.received[-1]
    assert (got.method, got.path) == ("POST", "/api/generate")
    assert got.header("user-agent") == GO_UA and got.header("accept") == "application/x-ndjson"
    assert got.body == body
    assert_no_key_reached(ollama)


async def test_go_cli_chunked_blob_upload_from_trusted_ip(gateway: RunningServer, ollama: FakeOllama) -> None:
    data = os.urandom(300_000)
    digest = hashlib.sha256(data).hexdigest()
    target = f"/api/blobs/sha256:{digest}"
    head = go_cli_head("POST", target, gateway, accept="application/json",
                       extra=[("Transfer-Encoding", "chunked")])

    c = await Client.connect(gateway.port)
    try:
        c.send(head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(data[:1000]), data[:1000]))
        refused = await c.response()
        assert refused.status == 401  # no key and no trust yet: the upload never reaches Ollama
    finally:
        await c.close()
    assert ollama.received == []

    async with httpx.AsyncClient(base_url=gateway.url) as http:
        assert (await http.post("/auth", json={"api_key": KEY2})).status_code == 200

    c = await Client.connect(gateway.port)
    try:
        c.send(head)
        for i in range(0, len(data), 32 * 1024):  # like Go's io.Copy from a TeeReader: 32 KiB chunks
            piece = data[i:i + 32 * 1024]
            c.send(b"%x\r\n%b\r\n" % (len(piece), piece))
            await c.writer.drain()
        c.send(b"0\r\n\r\n")
        resp = await c.response()
        again = await c.request("GET", "/api/tags", headers=[("User-Agent", GO_UA)])  # still usable
    finally:
        await c.close()
    assert resp.status == 201, resp.body
    assert resp.body == b""
    assert again.status == 200
    upload = ollama.received[0]
    assert (upload.method, upload.path) == ("POST", target)
    assert upload.blob_sha256 == digest and upload.blob_size == len(data)
    assert upload.header("content-length") is None and upload.header("transfer-encoding") == "chunked"
    assert upload.header("content-type") == "application/json"
    assert f"sha256:{digest}" in ollama.blobs
    assert_no_key_reached(ollama)


# -- three backends ----------------------------------------------------------------------------------------
# The same clients through a fastgate in front of three Ollamas (issue 9), models spread so that routing
# matters: qwen only on gpu2, the embedding model only on gpu3, llama on gpu1 and gpu3. Listings are the union.

QWEN = "qwen2.5:0.5b"
EMBEDDER = "nomic-embed-text:latest"
SPREAD = {"gpu1": [MODEL], "gpu2": [QWEN], "gpu3": [MODEL, EMBEDDER]}


@pytest.fixture
async def three() -> AsyncIterator[tuple[RunningServer, dict[str, FakeOllama]]]:
    fakes = {name: FakeOllama(models=models) for name, models in SPREAD.items()}
    for fake in fakes.values():
        await fake.start()
    config = build_config({
        "server": {"listen": "127.0.0.1:0"}, "keys": {KEY1: "user1"},
        "backends": [{"name": name, "url": fake.url} for name, fake in fakes.items()],
        "routing": {"health_interval": 0.1, "inventory_interval": 0.5, "loaded_interval": 0.1}})
    gw = await start(config)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not all(view.inventory_known for view in gw.proxy.router.snapshot(loop.time()).backends):
            assert loop.time() < deadline, "the pollers did not read every backend's models"
            await asyncio.sleep(0.01)
        yield gw, fakes
    finally:
        await gw.stop(grace=0.5)
        for fake in fakes.values():
            await fake.stop()


def served(fakes: dict[str, FakeOllama], path: str) -> dict[str, list[str]]:
    """Backend name -> the models of the `path` requests it received (the ones the clients' calls made)."""
    return {name: [r.json()["model"] for r in fake.received if r.path == path] for name, fake in fakes.items()}


async def test_three_backends_ollama_python(three: tuple[RunningServer, dict[str, FakeOllama]]) -> None:
    gw, fakes = three
    async with async_client(gw) as client:
        parts = [p async for p in await client.chat(model=QWEN, messages=MESSAGES, stream=True)]
        gen = await client.generate(model=MODEL, prompt="Why is the sky blue?")
        embedded = await client.embed(model=EMBEDDER, input=["first text"])
        listed = await client.list()
        running = await client.ps()
    assert "".join(p.message.content or "" for p in parts) == TOKENS and parts[-1].done
    assert gen.response == TOKENS
    assert [list(v) for v in embedded.embeddings] == [_embedding("first text")]
    assert served(fakes, "/api/chat") == {"gpu1": [], "gpu2": [QWEN], "gpu3": []}
    assert served(fakes, "/api/embed") == {"gpu1": [], "gpu2": [], "gpu3": [EMBEDDER]}
    assert sum(len(models) for models in served(fakes, "/api/generate").values()) == 1
    assert served(fakes, "/api/generate")["gpu2"] == []  # llama is not there
    # one list and one ps for all three: the union, each model once
    assert sorted(m.model for m in listed.models) == sorted({MODEL, QWEN, EMBEDDER})
    assert sorted(m.model for m in running.models) == sorted({QWEN, MODEL, EMBEDDER})
    for fake in fakes.values():
        assert_no_key_reached(fake)


async def test_three_backends_openai(three: tuple[RunningServer, dict[str, FakeOllama]]) -> None:
    gw, fakes = three
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY1, max_retries=0) as client:
        resp = await client.chat.completions.create(model=QWEN, messages=MESSAGES)  # type: ignore[arg-type]
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                                      stream=True)
        deltas = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
        models = [m.id async for m in client.models.list()]
        emb = await client.embeddings.create(model=EMBEDDER, input=["alpha"])
    assert resp.choices[0].message.content == TOKENS and resp.model == QWEN
    assert "".join(deltas) == TOKENS
    assert sorted(models) == sorted({MODEL, QWEN, EMBEDDER})
    assert emb.data[0].embedding == pytest.approx(_embedding("alpha"), abs=1e-6)
    chats = served(fakes, "/v1/chat/completions")
    assert chats["gpu2"] == [QWEN] and chats["gpu1"] + chats["gpu3"] == [MODEL]
    assert served(fakes, "/v1/embeddings") == {"gpu1": [], "gpu2": [], "gpu3": [EMBEDDER]}
    for fake in fakes.values():
        assert_no_key_reached(fake)


async def test_three_backends_langchain(three: tuple[RunningServer, dict[str, FakeOllama]]) -> None:
    gw, fakes = three
    headers = {"client_kwargs": {"headers": {"X-API-Key": KEY1}}}
    async with closing_langchain(ChatOllama(model=QWEN, base_url=gw.url, **headers)) as llm:
        sync_answer = await asyncio.to_thread(llm.invoke, "Why is the sky blue?")
        pieces = [chunk.content async for chunk in llm.astream("Why is the sky blue?")]
    async with closing_langchain(OllamaEmbeddings(model=EMBEDDER, base_url=gw.url, **headers)) as emb:
        docs = await emb.aembed_documents(["doc one"])
    assert sync_answer.content == TOKENS and "".join(pieces) == TOKENS  # type: ignore[arg-type]
    assert docs == [pytest.approx(_embedding("doc one"))]
    assert served(fakes, "/api/chat") == {"gpu1": [], "gpu2": [QWEN, QWEN], "gpu3": []}
    assert served(fakes, "/api/embed") == {"gpu1": [], "gpu2": [], "gpu3": [EMBEDDER]}
    for fake in fakes.values():
        assert_no_key_reached(fake)


# -- helpers -----------------------------------------------------------------------------------------------

def async_client(gw: RunningServer, **kwargs: object) -> ollama_lib.AsyncClient:
    return ollama_lib.AsyncClient(host=gw.url, headers={"X-API-Key": KEY1}, **kwargs)


def sync_client(gw: RunningServer) -> ollama_lib.Client:
    return ollama_lib.Client(host=gw.url, headers={"X-API-Key": KEY1})


@contextlib.asynccontextmanager
async def closing_langchain(model: LangchainModel) -> AsyncIterator[LangchainModel]:
    """langchain-ollama has no close(): close the two ollama clients it made, as a long-lived app would.

    Left open, their pooled sockets are finalized by a later garbage collection, after this test's loop
    is gone, and that noise can land anywhere in the session.
    """
    try:
        yield model
    finally:
        model._client.close()  # noqa: SLF001 - no public way
        await model._async_client.close()  # noqa: SLF001
