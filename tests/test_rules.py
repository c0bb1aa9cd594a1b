"""Rules fastgate keeps that no other test pinned down, each checked against what the fake Ollama recorded:

- a POST is never sent to Ollama twice, even when the pooled connection it went out on dies under it;
- a client's `Connection: close` is honoured, whoever answers (Ollama, fastgate, an error);
- the token counts are found when Ollama's final object reaches fastgate in several reads, or chunks.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from fastgate.usage import UsageRecord
from tests.conftest import KEY1, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.rawhttp import Client, build_request

pytestmark = pytest.mark.timeout(30)

KEYED = {"X-API-Key": KEY1}
MODEL = "llama3.2:latest"


async def read_rest(c: Client, timeout: float = 5.0) -> tuple[bytes, bool]:
    """What arrives until the server closes the connection (EOF or reset), and whether it did so before
    `timeout` seconds passed with nothing arriving."""
    out = bytearray()
    try:
        while data := await asyncio.wait_for(c.reader.read(65536), timeout):
            out += data
    except ConnectionError:
        pass
    except asyncio.TimeoutError:
        return bytes(out), False
    return bytes(out), True


# -- never twice -----------------------------------------------------------------------------------------

CHAT_ONCE = {"model": MODEL, "messages": [{"role": "user", "content": "charge my card once"}], "stream": False}


@pytest.mark.parametrize("fault", ["reset-before-status", "close-before-status", "stall"])
async def test_a_post_on_a_pooled_connection_that_dies_reaches_ollama_at_most_once(
        make_gateway: MakeGateway, ollama: FakeOllama, fault: str) -> None:
    """The pooled connection looks like one Ollama closed while it sat idle (nothing came back), which is
    when fastgate sends a GET again on a new connection. Ollama did receive this POST, though: sending it
    again would run it twice. The client gets an error instead, or (were fastgate to know better) one answer."""
    gw = await make_gateway(upstream={"read_timeout": 0.5})
    async with await Client.connect(gw.port) as c:
        assert (await c.request("GET", "/api/version", headers=KEYED)).status == 200  # leaves a pooled connection
        assert gw.proxy.pool is not None and gw.proxy.pool.idle_count == 1
        ollama.faults.append(fault)  # acts on the next request the fake parses: the POST
        resp = await c.request("POST", "/api/chat", headers=KEYED, json_body=CHAT_ONCE)
        chats = [r for r in ollama.received if r.path == "/api/chat"]
        assert chats and chats[0].conn_id == ollama.received[0].conn_id  # it went out on the pooled connection
        assert resp.status in (502, 504) or (resp.status == 200 and resp.json()["done"] is True), resp.raw
    async with await Client.connect(gw.port) as c:  # a late second attempt would show up by now
        assert (await c.request("GET", "/api/version", headers=KEYED)).status == 200
    assert len([r for r in ollama.received if r.path == "/api/chat"]) == 1
    assert ollama.faults == []


async def test_a_get_on_a_pooled_connection_closed_under_it_is_sent_again(make_gateway: MakeGateway,
                                                                         ollama: FakeOllama) -> None:
    """The control for the test above: the same fault on a GET is retried (so that test does reach the
    retry decision, and what keeps the POST from a second trip is the method)."""
    gw = await make_gateway()
    async with await Client.connect(gw.port) as c:
        assert (await c.request("GET", "/api/version", headers=KEYED)).status == 200
        ollama.faults.append("close-before-status")
        resp = await c.request("GET", "/api/tags", headers=KEYED)
        assert resp.status == 200
    tags = [r for r in ollama.received if r.path == "/api/tags"]
    assert len(tags) == 2 and tags[0].conn_id == ollama.received[0].conn_id != tags[1].conn_id


# -- Connection: close -----------------------------------------------------------------------------------

PIPELINED = build_request("GET", "/api/tags", headers=KEYED)  # would reach Ollama if it were processed

CLOSE_CASES = {
    "forwarded": (build_request("GET", "/api/version", headers={**KEYED, "Connection": "close"}), 200),
    "forwarded-stream": (build_request("POST", "/api/generate", headers={**KEYED, "Connection": "close"},
                                       body=json.dumps({"model": MODEL, "prompt": "hi"}).encode()), 200),
    "forwarded-ollama-error": (build_request("POST", "/api/chat", headers={**KEYED, "Connection": "close"},
                                             body=b'{"model": "no-such-model"}'), 404),
    "local": (build_request("GET", "/", headers={"Connection": "close"}), 200),
    "error": (build_request("GET", "/api/version", headers={"Connection": "close"}), 401),
    "error-with-body": (build_request("POST", "/api/chat", headers={"X-API-Key": "wrong", "Connection": "close"},
                                      body=b'{"model": "x"}'), 401),
    "token-list": (build_request("GET", "/api/version", headers={**KEYED, "Connection": "keep-alive, Close"}),
                   200),
    "http10": (b"GET /api/version HTTP/1.0\r\nHost: x\r\nX-API-Key: " + KEY1.encode() + b"\r\n\r\n", 200),
}


@pytest.mark.parametrize("case", list(CLOSE_CASES))
async def test_connection_close_is_honoured_and_nothing_after_it_is_processed(
        make_gateway: MakeGateway, ollama: FakeOllama, case: str) -> None:
    request, status = CLOSE_CASES[case]
    gw = await make_gateway()
    async with await Client.connect(gw.port) as c:
        c.send(request + PIPELINED)  # one write: the second request is already there when the first is read
        resp = await c.response()
        assert resp.status == status and resp.complete
        if case != "http10":  # an HTTP/1.0 answer may also just end; fastgate says it anyway
            assert resp.header("connection") == "close", resp.raw
        rest, closed = await read_rest(c)
    assert [r.path for r in ollama.received if r.path == "/api/tags"] == []  # the second was never processed
    assert rest == b"" and closed  # the connection ended after the first answer, with nothing more
    forwarded = [r.path for r in ollama.received]
    assert len(forwarded) == (1 if case.startswith("forwarded") or case in ("token-list", "http10") else 0)
    if case != "http10":  # (an HTTP/1.0 request goes on as one, with fastgate's own Connection: close)
        for r in ollama.received:  # the client's hop-by-hop choice is not passed on: the pool keeps its connection
            assert r.header("connection") is None


# -- usage when the final object arrives in pieces --------------------------------------------------------

def native_counts(resp_body: bytes) -> tuple[int, int]:
    last = json.loads(resp_body.strip().splitlines()[-1])
    assert last["done"] is True
    return last["prompt_eval_count"], last["eval_count"]


def openai_counts(resp_body: bytes) -> tuple[int, int]:
    if resp_body.startswith(b"data: "):
        events = [json.loads(line[6:]) for line in resp_body.split(b"\n\n") if line.startswith(b"data: {")]
        usage = events[-1]["usage"]
    else:
        usage = json.loads(resp_body)["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


SPLIT_CASES = {
    # (path, body) - each asks the fake to write its final object in 24 pieces, 20 ms apart
    "generate-stream": ("/api/generate", {"model": MODEL, "prompt": "a b c", "options": {"num_predict": 7}}),
    "generate-long-stream": ("/api/generate", {"model": MODEL, "prompt": "long", "options": {"num_predict": 800}}),
    "chat-stream": ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}],
                                  "options": {"num_predict": 9}}),
    "chat-whole": ("/api/chat", {"model": MODEL, "stream": False, "options": {"num_predict": 3},
                                 "messages": [{"role": "user", "content": "one two three four"}]}),
    "v1-chat-stream": ("/v1/chat/completions", {"model": MODEL, "stream": True, "max_tokens": 6,
                                                "stream_options": {"include_usage": True},
                                                "messages": [{"role": "user", "content": "hello"}]}),
    "v1-chat-whole": ("/v1/chat/completions", {"model": MODEL, "max_tokens": 4,
                                               "messages": [{"role": "user", "content": "hello again"}]}),
}


@pytest.mark.parametrize("case,as_chunks", [
    # one chunk (or a Content-Length body) arriving in 24 reads
    *(pytest.param(case, False, id=f"{case}-reads") for case in SPLIT_CASES),
    # the object cut into 24 chunks of its own (Ollama does not do this; a proxy in front of it might)
    *(pytest.param(case, True, id=f"{case}-chunks") for case in SPLIT_CASES if "stream" in case),
])
async def test_usage_is_read_from_a_final_object_split_over_many_reads(make_gateway: MakeGateway,
                                                                       case: str, as_chunks: bool) -> None:
    path, body = SPLIT_CASES[case]
    streamed = "stream" in case
    split = {"fake_split_final": 24, "fake_split_gap_ms": 15, "fake_split_chunks": as_chunks}
    if path.startswith("/v1/"):
        body = {**body, **split}
    else:
        body = {**body, "options": {**body["options"], **split}}  # type: ignore[dict-item]
    gw = await make_gateway()
    records: list[UsageRecord] = []
    gw.proxy.set_usage_sink(records.append)
    async with await Client.connect(gw.port) as c:
        resp = await c.request("POST", path, headers=KEYED, json_body=body)
    assert resp.status == 200 and resp.complete
    if streamed:
        assert len(resp.chunks) > (20 if as_chunks else 1)  # the fake did split (or not) as asked
    expected = openai_counts(resp.body) if path.startswith("/v1/") else native_counts(resp.body)
    assert expected[0] > 0 and expected[1] > 0
    assert len(records) == 1
    record = records[0]
    assert (record.prompt_tokens, record.completion_tokens) == expected
    assert record.status == 200 and record.path == path
