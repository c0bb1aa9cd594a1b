"""fastgate end to end over loopback: a raw client -> fastgate -> the fake Ollama (which records what it got)."""

from __future__ import annotations

import asyncio
import json

import pytest

from fastgate.server import RunningServer
from tests.conftest import KEY1, KEY2, MASKED1, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.rawhttp import Client, build_request

pytestmark = pytest.mark.timeout(30)

CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]}


# -- fastgate's own endpoints ------------------------------------------------------------------------------

async def test_root_describes_the_service_without_a_key(client: Client, ollama: FakeOllama) -> None:
    resp = await client.request("GET", "/")
    assert resp.status == 200
    assert resp.json()["name"] == "fastgate"
    assert "version" in resp.json()
    head = await client.request("HEAD", "/")
    assert head.status == 200 and head.body == b""
    assert head.header("content-length") == resp.header("content-length")
    assert ollama.received == []


async def test_health_reports_upstream_version_and_latency(client: Client) -> None:
    resp = await client.request("GET", "/health", headers={"X-API-Key": KEY1})  # details are for admins
    assert resp.status == 200
    body = resp.json()
    assert body["upstream"]["reachable"] is True
    assert body["upstream"]["version"] == "0.12.6"
    assert body["upstream"]["latency_ms"] >= 0
    assert body["status"] == "ok"


async def test_health_is_503_when_upstream_is_down(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway()
    await ollama.stop()
    c = await Client.connect(gw.port)
    resp = await c.request("GET", "/health", headers={"X-API-Key": KEY1})
    assert resp.status == 503
    assert resp.json()["upstream"]["reachable"] is False
    assert resp.json()["upstream"]["error"]
    await c.close()


async def test_wrong_method_on_own_endpoint_is_405(client: Client) -> None:
    resp = await client.request("POST", "/health", body=b"{}")
    assert resp.status == 405
    assert resp.header("allow") == "GET, HEAD"


# -- keys --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {"X-API-Key": KEY1},
    {"Authorization": f"Bearer {KEY1}"},
    {"Authorization": KEY1},
])
async def test_header_keys_are_accepted_and_never_forwarded(client: Client, ollama: FakeOllama,
                                                           headers: dict[str, str]) -> None:
    resp = await client.request("GET", "/api/tags", headers=headers)
    assert resp.status == 200, resp.body
    assert "models" in resp.json()
    got = ollama.received[-1]
    assert got.header("x-api-key") is None and got.header("authorization") is None
    assert KEY1 not in json.dumps(got.headers)


async def test_query_key_is_removed_and_other_params_kept(client: Client, ollama: FakeOllama) -> None:
    resp = await client.request("GET", f"/api/tags?a=1&api_key={KEY1}&b=two%20words")
    assert resp.status == 200
    assert ollama.received[-1].target == "/api/tags?a=1&b=two%20words"


async def test_body_key_is_removed_and_content_length_fixed(client: Client, ollama: FakeOllama) -> None:
    body = json.dumps({"api_key": KEY1, **CHAT, "stream": False}).encode()
    resp = await client.request("POST", "/api/chat", body=body, headers={"Content-Type": "application/json"})
    assert resp.status == 200, resp.body
    got = ollama.received[-1]
    assert KEY1.encode() not in got.body
    assert got.json() == {**CHAT, "stream": False}
    assert int(got.header("content-length") or -1) == len(got.body)


async def test_missing_key_is_401_json(client: Client, ollama: FakeOllama) -> None:
    resp = await client.request("POST", "/api/chat", json_body=CHAT)
    assert resp.status == 401
    assert "error" in resp.json() and isinstance(resp.json()["error"], str)
    assert ollama.received == []


async def test_invalid_key_is_401(client: Client, ollama: FakeOllama) -> None:
    resp = await client.request("GET", "/api/tags", headers={"X-API-Key": "api-wrong-key-000000"})
    assert resp.status == 401
    assert ollama.received == []


async def test_v1_errors_use_openai_shape(client: Client) -> None:
    resp = await client.request("POST", "/v1/chat/completions", json_body={"model": "x", "messages": []},
                                headers={"Authorization": "Bearer nope-nope-nope"})
    assert resp.status == 401
    error = resp.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["message"]


async def test_keys_identify_users_in_logs(client: Client, gate_logs: pytest.LogCaptureFixture) -> None:
    await client.request("GET", "/api/tags", headers={"X-API-Key": KEY2})
    await client.request("GET", "/api/tags", headers={"X-API-Key": KEY1})
    text = gate_logs.text
    assert "user2 (x-api-key:api-****0202)" in text
    assert f"user1 (x-api-key:{MASKED1})" in text
    assert KEY1 not in text and KEY2 not in text


# -- IP trust ----------------------------------------------------------------------------------------------

async def test_auth_trusts_the_ip_for_keyless_requests(client: Client, ollama: FakeOllama,
                                                       gate_logs: pytest.LogCaptureFixture) -> None:
    before = await client.request("GET", "/api/tags")
    assert before.status == 401
    resp = await client.request("POST", "/auth", json_body={"api_key": KEY2})
    assert resp.status == 200
    body = resp.json()
    assert body["user"] == "user2" and body["ip_trust"] is True and body["expires_in"] == 3600
    assert body["expires_at"]
    after = await client.request("GET", "/api/tags")
    assert after.status == 200
    assert "user2 (ip-trust:body:api-****0202)" in gate_logs.text


async def test_auth_with_bad_key_is_401_and_trusts_nothing(client: Client) -> None:
    resp = await client.request("POST", "/auth", json_body={"api_key": "wrong-wrong-wrong"})
    assert resp.status == 401
    assert (await client.request("GET", "/api/tags")).status == 401


async def test_session_ttl_zero_disables_ip_trust(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(auth={"session_ttl": 0})
    c = await Client.connect(gw.port)
    resp = await c.request("POST", "/auth", json_body={"api_key": KEY1})
    assert resp.status == 200 and resp.json()["ip_trust"] is False
    assert (await c.request("GET", "/api/tags")).status == 401
    await c.close()


# -- forwarding rules --------------------------------------------------------------------------------------

async def test_host_is_rewritten_origin_removed_forwarded_for_set(client: Client, ollama: FakeOllama) -> None:
    # The fake applies Ollama's Host and Origin checks: either header reaching it unchanged would be a 403.
    resp = await client.request("GET", "/api/version", host="gateway.example.com", headers={
        "X-API-Key": KEY1, "Origin": "https://app.example.com", "X-Forwarded-For": "6.6.6.6",
        "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5"})
    assert resp.status == 200, resp.raw
    got = ollama.received[-1]
    assert got.header("host") == f"127.0.0.1:{ollama.port}"
    assert got.header("origin") is None
    assert got.header("x-forwarded-for") == "127.0.0.1"
    assert got.header("x-forwarded-proto") == "http"
    assert got.header("x-secret-hop") is None and got.header("keep-alive") is None
    assert got.header("x-request-id") == resp.header("x-request-id")


async def test_forward_origin_option_passes_origin(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway(upstream={"forward_origin": True})
    c = await Client.connect(gw.port)
    resp = await c.request("GET", "/api/version", headers={"X-API-Key": KEY1, "Origin": "https://evil.example"})
    assert resp.status == 403  # Ollama's own Origin check, as the operator asked for
    assert resp.body == b""
    await c.close()


async def test_account_endpoints_are_blocked(client: Client, ollama: FakeOllama) -> None:
    for path in ("/api/me", "/api/signout", "/api/%6De"):
        resp = await client.request("POST", path, headers={"X-API-Key": KEY1}, body=b"{}")
        assert resp.status == 403, path
        assert "error" in resp.json()
    assert ollama.received == []


async def test_upstream_errors_are_relayed_unchanged(client: Client) -> None:
    resp = await client.request("POST", "/api/chat", headers={"X-API-Key": KEY1},
                                json_body={"model": "nope:latest", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 404
    assert "not found" in resp.json()["error"]
    resp = await client.request("GET", "/api/nothing-here", headers={"X-API-Key": KEY1})
    assert resp.status == 404 and resp.body == b"404 page not found"


# -- streaming ---------------------------------------------------------------------------------------------

async def test_stream_chunks_arrive_exactly_as_ollama_framed_them(client: Client) -> None:
    resp = await client.request("POST", "/api/generate", headers={"X-API-Key": KEY1},
                                json_body={"model": "llama3.2:latest", "prompt": "hi",
                                           "options": {"num_predict": 20}})
    assert resp.status == 200 and resp.complete
    assert resp.header("transfer-encoding") == "chunked"
    assert resp.header("content-type") == "application/x-ndjson"
    assert len(resp.chunks) == 21  # one chunk per NDJSON object: nothing merged or split
    objects = [json.loads(chunk) for chunk in resp.chunks]
    assert all(chunk.endswith(b"\n") and chunk.count(b"\n") == 1 for chunk in resp.chunks)
    assert objects[-1]["done"] is True and not any(o["done"] for o in objects[:-1])


async def test_stream_tokens_are_not_held_back(client: Client) -> None:
    """Each token is readable while the next one has not been generated yet."""
    client.send(build_request("POST", "/api/generate", headers={"X-API-Key": KEY1}, body=json.dumps(
        {"model": "llama3.2:latest", "prompt": "hi", "options": {"num_predict": 3, "fake_gap_ms": 400}}).encode()))
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert b"200" in head.split(b"\r\n")[0]
    first = await asyncio.wait_for(client.reader.readuntil(b"\r\n"), 5)
    size = int(first.strip(), 16)
    # The first item must be complete well before the 400 ms gap to the second has passed.
    data = await asyncio.wait_for(client.reader.readexactly(size + 2), 0.3)
    assert json.loads(data)["done"] is False


async def test_openai_sse_stream_ends_with_done(client: Client) -> None:
    resp = await client.request("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY1}"},
                                json_body={"model": "llama3.2:latest", "stream": True,
                                           "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200
    assert (resp.header("content-type") or "").startswith("text/event-stream")
    assert resp.chunks[-1] == b"data: [DONE]\n\n"
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in resp.chunks)


async def test_keepalive_reuses_one_upstream_connection(client: Client, ollama: FakeOllama) -> None:
    for _ in range(5):
        resp = await client.request("POST", "/api/generate", headers={"X-API-Key": KEY1},
                                    json_body={"model": "llama3.2:latest", "prompt": "hi"})
        assert resp.status == 200 and resp.complete
    assert len({r.conn_id for r in ollama.received}) == 1
    assert ollama.connections_opened == 1


async def test_pipelined_requests_are_answered_in_order(client: Client, ollama: FakeOllama) -> None:
    client.send(b"".join(build_request("GET", path, headers={"X-API-Key": KEY1})
                         for path in ("/api/version", "/api/tags", "/", "/api/ps")))
    statuses_and_kinds = []
    for _ in range(4):
        resp = await client.response()
        statuses_and_kinds.append((resp.status, sorted(resp.json())[0]))
    assert statuses_and_kinds == [(200, "version"), (200, "models"), (200, "name"), (200, "models")]
    assert [r.path for r in ollama.received] == ["/api/version", "/api/tags", "/api/ps"]


async def test_head_request_is_relayed_without_body(client: Client) -> None:
    resp = await client.request("HEAD", "/api/tags", headers={"X-API-Key": KEY1})
    assert resp.status == 200 and resp.body == b""
    again = await client.request("GET", "/api/version", headers={"X-API-Key": KEY1})
    assert again.status == 200 and "version" in again.json()


async def test_client_disconnect_mid_stream_stops_ollama(client: Client, ollama: FakeOllama) -> None:
    client.send(build_request("POST", "/api/generate", headers={"X-API-Key": KEY1}, body=json.dumps(
        {"model": "llama3.2:latest", "prompt": "hi", "options": {"num_predict": 1000, "fake_gap_ms": 20}}).encode()))
    await client.reader.readuntil(b"\r\n\r\n")
    await client.reader.readuntil(b"\n\r\n")
    loop = asyncio.get_running_loop()
    gone_at = loop.time()
    client.writer.transport.abort()
    disconnect = await ollama.wait_for_disconnect(timeout=1.0)
    assert disconnect.at - gone_at < 1.0
    assert disconnect.items_sent < 1000


async def test_client_disconnect_while_waiting_for_first_byte(client: Client, ollama: FakeOllama,
                                                            gateway: RunningServer) -> None:
    ollama.faults.append("stall")
    client.send(build_request("GET", "/api/tags", headers={"X-API-Key": KEY1}))
    for _ in range(100):
        if ollama.received:
            break
        await asyncio.sleep(0.01)
    assert ollama.open_connections == 1
    client.writer.transport.abort()
    for _ in range(100):
        if ollama.open_connections == 0:
            break
        await asyncio.sleep(0.01)
    assert ollama.open_connections == 0  # the upstream connection was closed, not left generating
    assert gateway.proxy.pool is not None and gateway.proxy.pool.open_count == 0


# -- upstream failures -------------------------------------------------------------------------------------

async def test_upstream_unreachable_is_502(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upstream_url="http://127.0.0.1:9")  # discard port: nothing listens
    c = await Client.connect(gw.port)
    resp = await c.request("GET", "/api/tags", headers={"X-API-Key": KEY1})
    assert resp.status == 502 and "error" in resp.json()
    resp = await c.request("GET", "/v1/models", headers={"X-API-Key": KEY1})
    assert resp.status == 502 and "message" in resp.json()["error"]
    await c.close()


async def test_upstream_connect_timeout_is_504(make_gateway: MakeGateway) -> None:
    import socket
    # A listener whose accept queue is full silently drops new SYNs: connecting to it hangs.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    try:
        gw = await make_gateway(upstream_url=f"http://127.0.0.1:{port}", upstream={"connect_timeout": 0.3})
        c = await Client.connect(gw.port)
        resp = await c.request("GET", "/api/tags", headers={"X-API-Key": KEY1})
        assert resp.status == 504 and "error" in resp.json()
        await c.close()
    finally:
        for s in fillers:
            s.close()
        blackhole.close()


@pytest.mark.parametrize("fault", ["reset-mid-stream", "close-mid-stream"])
async def test_upstream_dying_mid_stream_ends_the_response_visibly(client: Client, gateway: RunningServer,
                                                                   fault: str) -> None:
    resp = await client.request("POST", "/api/generate", headers={"X-API-Key": KEY1},
                                json_body={"model": f"fault:{fault}", "prompt": "hi"})
    assert resp.status == 200
    assert not resp.complete  # no fake terminating chunk
    assert len(resp.chunks) == 2
    assert await client.closed()
    # and the proxy keeps serving
    c2 = await Client.connect(gateway.port)
    assert (await c2.request("GET", "/api/version", headers={"X-API-Key": KEY1})).status == 200
    await c2.close()


@pytest.mark.parametrize("fault,status", [("reset-before-status", 502), ("malformed-status", 502),
                                          ("malformed-header", 502)])
async def test_broken_upstream_answers_are_502(client: Client, ollama: FakeOllama, fault: str, status: int) -> None:
    ollama.faults.append(fault)
    resp = await client.request("POST", "/api/chat", headers={"X-API-Key": KEY1}, json_body=CHAT)
    assert resp.status == status
    assert "error" in resp.json()
    ok = await client.request("GET", "/api/version", headers={"X-API-Key": KEY1})
    assert ok.status == 200


async def test_upstream_stall_before_head_is_504(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway(upstream={"read_timeout": 0.4})
    c = await Client.connect(gw.port)
    ollama.faults.append("stall")
    resp = await c.request("GET", "/api/tags", headers={"X-API-Key": KEY1})
    assert resp.status == 504
    await c.close()


async def test_upstream_stall_mid_stream_cuts_the_response(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upstream={"read_timeout": 0.4})
    c = await Client.connect(gw.port)
    resp = await c.request("POST", "/api/generate", headers={"X-API-Key": KEY1},
                           json_body={"model": "fault:stall-mid-stream", "prompt": "x"})
    assert resp.status == 200 and not resp.complete and len(resp.chunks) == 2
    await c.close()


async def test_error_line_mid_stream_is_relayed(client: Client) -> None:
    resp = await client.request("POST", "/api/generate", headers={"X-API-Key": KEY1},
                                json_body={"model": "fault:error-mid-stream", "prompt": "x"})
    assert resp.status == 200 and resp.complete
    assert resp.lines[-1] == {"error": "something went wrong"}


async def test_pooled_connection_closed_by_ollama_is_not_a_502(client: Client, ollama: FakeOllama) -> None:
    assert (await client.request("GET", "/api/version", headers={"X-API-Key": KEY1})).status == 200
    await ollama.close_idle_connections()
    await asyncio.sleep(0.05)
    resp = await client.request("GET", "/api/version", headers={"X-API-Key": KEY1})
    assert resp.status == 200
    resp = await client.request("POST", "/api/chat", headers={"X-API-Key": KEY1},
                                json_body={**CHAT, "stream": False})
    assert resp.status == 200
    assert sum(1 for r in ollama.received if r.path == "/api/chat") == 1


# -- bodies ------------------------------------------------------------------------------------------------

async def test_blob_upload_streams_through(client: Client, ollama: FakeOllama) -> None:
    import hashlib
    data = bytes(range(256)) * 4096  # 1 MiB
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    resp = await client.request("POST", f"/api/blobs/{digest}", headers={"X-API-Key": KEY1}, body=data)
    assert resp.status == 201
    got = ollama.received[-1]
    assert got.blob_size == len(data) and got.blob_sha256 == digest.split(":")[1]


async def test_chunked_blob_upload_without_length(client: Client, ollama: FakeOllama) -> None:
    import hashlib
    parts = [bytes([i]) * 70000 for i in range(10)]
    digest = "sha256:" + hashlib.sha256(b"".join(parts)).hexdigest()
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    resp = await client.request("POST", f"/api/blobs/{digest}", body=body,
                                headers=[("X-API-Key", KEY1), ("Transfer-Encoding", "chunked")])
    assert resp.status == 201
    assert ollama.received[-1].blob_size == 700000


async def test_existing_blob_answered_early(client: Client, ollama: FakeOllama) -> None:
    digest = "sha256:" + "ab" * 32
    ollama.blobs.add(digest)
    client.send(build_request("POST", f"/api/blobs/{digest}", headers=[("X-API-Key", KEY1),
                                                                       ("Content-Length", str(50_000_000))]))
    client.send(b"x" * 100_000)
    resp = await client.response()
    assert resp.status == 200


async def test_expect_100_continue_only_after_authorisation(client: Client, ollama: FakeOllama) -> None:
    body = json.dumps({**CHAT, "stream": False}).encode()
    client.send(build_request("POST", "/api/chat", headers=[("X-API-Key", "bad-bad-bad-bad"),
                                                            ("Expect", "100-continue"),
                                                            ("Content-Length", str(len(body)))]))
    raw = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert raw.startswith(b"HTTP/1.1 401")
    c2 = await Client.connect(client.writer.get_extra_info("peername")[1])
    c2.send(build_request("POST", "/api/chat", headers=[("X-API-Key", KEY1), ("Expect", "100-continue"),
                                                        ("Content-Length", str(len(body)))]))
    interim = await asyncio.wait_for(c2.reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    c2.send(body)
    resp = await c2.response()
    assert resp.status == 200 and resp.json()["done"] is True
    assert ollama.received[-1].header("expect") is None
    await c2.close()


async def test_oversized_buffered_body_is_413(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway(auth={"max_body_bytes": 1000})
    c = await Client.connect(gw.port)
    resp = await c.request("POST", "/api/chat", json_body={**CHAT, "pad": "x" * 2000})
    assert resp.status == 413
    assert ollama.received == []
    await c.close()
    # A key in the head means no buffering, so no limit either.
    c = await Client.connect(gw.port)
    resp = await c.request("POST", "/api/chat", headers={"X-API-Key": KEY1},
                           json_body={**CHAT, "stream": False, "pad": "x" * 2000})
    assert resp.status == 200
    await c.close()


# -- hostile input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,status", [
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="garbage"),
    pytest.param(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, id="cl-and-te"),
    pytest.param(b"POST /api/tags HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400, id="conflicting-cl"),
    pytest.param(b"POST /api/tags HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, id="negative-cl"),
    pytest.param(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400, id="space-in-name"),
    pytest.param(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431, id="huge-header"),
    pytest.param(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n" + b"X-Many: a\r\n" * 8000 + b"\r\n", 431, id="many-headers"),
])
async def test_hostile_requests_are_refused_and_never_forwarded(client: Client, ollama: FakeOllama,
                                                               gateway: RunningServer, raw: bytes,
                                                               status: int) -> None:
    client.send(raw.replace(b"Host: x\r\n", b"Host: x\r\nX-API-Key: " + KEY1.encode() + b"\r\n"))
    resp = await client.response()
    assert resp.status == status
    assert resp.header("connection") == "close"
    assert await client.closed()
    assert ollama.received == []
    other = await Client.connect(gateway.port)
    assert (await other.request("GET", "/")).status == 200
    await other.close()


async def test_obs_fold_is_unfolded_not_passed_on(client: Client, ollama: FakeOllama) -> None:
    # RFC 9112 section 5.2 allows replacing obs-fold with spaces; the folded line must never travel on.
    client.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY1.encode() +
                b"\r\nX-Note: a\r\n folded\r\n\r\n")
    resp = await client.response()
    assert resp.status == 200
    got = ollama.received[-1]
    assert got.header("x-note") == "a folded"
    assert len(ollama.received) == 1


async def test_smuggled_second_request_never_reaches_ollama(client: Client, ollama: FakeOllama) -> None:
    smuggled = b"GET /api/delete HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    client.send(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY1.encode() +
                b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    resp = await client.response()
    assert resp.status == 400
    await asyncio.sleep(0.1)
    assert ollama.received == []


async def test_slow_headers_get_408(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway(server={"header_timeout": 0.5})
    async with await Client.connect(gw.port) as c:
        for byte in b"GET /ap":  # 0.35 s of trickling, then silence: the head never completes
            c.send(bytes([byte]))
            await asyncio.sleep(0.05)
        resp = await c.response(timeout=3)
        assert resp.status == 408
        assert await c.closed()
    assert ollama.received == []


async def test_silent_connection_is_closed_after_header_timeout(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(server={"header_timeout": 0.3})
    async with await Client.connect(gw.port) as c:
        assert await c.closed(timeout=3)


async def test_connection_limit_refuses_extra_connections(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(server={"max_connections": 2})
    held = [await Client.connect(gw.port) for _ in range(2)]
    for h in held:
        assert (await h.request("GET", "/")).status == 200
    extra = await Client.connect(gw.port)
    resp = await extra.response()
    assert resp.status == 503
    await held[0].close()
    await asyncio.sleep(0.05)
    again = await Client.connect(gw.port)
    assert (await again.request("GET", "/")).status == 200
    for c in (*held[1:], extra, again):
        await c.close()


async def test_http10_client_gets_a_complete_response(client: Client) -> None:
    client.send(b"POST /api/generate HTTP/1.0\r\nX-API-Key: " + KEY1.encode() +
                b"\r\nContent-Length: 44\r\n\r\n" + b'{"model":"llama3.2:latest","prompt":"hi"}   ')
    raw = await asyncio.wait_for(client.reader.read(), 5)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower()
    assert [json.loads(line)["done"] for line in body.splitlines()][-1] is True


async def test_absolute_form_target_is_forwarded_as_its_path(client: Client, ollama: FakeOllama) -> None:
    resp = await client.request("GET", f"http://evil.example:1234/api/tags?api_key={KEY1}&x=1")
    assert resp.status == 200
    got = ollama.received[-1]
    assert got.target == "/api/tags?x=1"
    assert got.header("host") == f"127.0.0.1:{ollama.port}"
    blocked = await client.request("POST", "http://localhost/api/me", headers={"X-API-Key": KEY1}, body=b"{}")
    assert blocked.status == 403
    assert [r.path for r in ollama.received] == ["/api/tags"]


async def test_asterisk_form_is_refused(client: Client, ollama: FakeOllama) -> None:
    resp = await client.request("OPTIONS", "*", headers={"X-API-Key": KEY1})
    assert resp.status == 400
    assert ollama.received == []


async def test_key_guessing_gets_429_with_retry_after(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway(auth={"max_failures": 3, "failure_window": 120})
    c = await Client.connect(gw.port)
    for i in range(3):
        resp = await c.request("GET", "/api/tags", headers={"X-API-Key": f"guess-number-{i:08d}"})
        assert resp.status == 401
    resp = await c.request("GET", "/api/tags", headers={"X-API-Key": "guess-number-00000004"})
    assert resp.status == 429
    assert 100 <= int(resp.header("retry-after") or 0) <= 120
    assert "error" in resp.json()
    resp = await c.request("GET", "/v1/models", headers={"Authorization": "Bearer guess-number-5555"})
    assert resp.status == 429 and resp.json()["error"]["type"] == "rate_limit_error"
    resp = await c.request("POST", "/auth", json_body={"api_key": KEY1})
    assert resp.status == 429  # even a right key: the address is blocked for the window
    assert ollama.received == []
    await c.close()


async def test_reload_applies_new_keys_without_dropping_connections(make_gateway: MakeGateway,
                                                                    ollama: FakeOllama) -> None:
    from tests.conftest import gateway_config
    gw = await make_gateway()
    c = await Client.connect(gw.port)
    assert (await c.request("GET", "/api/version", headers={"X-API-Key": KEY2})).status == 200
    gw.reload(gateway_config(ollama.url, keys={KEY1: "user1", "api-new-key-for-carol": "carol"}))
    assert (await c.request("GET", "/api/version", headers={"X-API-Key": KEY2})).status == 401  # removed
    assert (await c.request("GET", "/api/version", headers={"X-API-Key": "api-new-key-for-carol"})).status == 200
    await c.close()


async def test_per_address_connection_cap(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(server={"max_connections_per_ip": 2})
    held = [await Client.connect(gw.port) for _ in range(2)]
    for h in held:
        assert (await h.request("GET", "/")).status == 200
    extra = await Client.connect(gw.port)
    assert (await extra.response()).status == 503
    await held[0].close()
    await asyncio.sleep(0.05)
    again = await Client.connect(gw.port)
    assert (await again.request("GET", "/")).status == 200
    for c in (held[1], extra, again):
        await c.close()
