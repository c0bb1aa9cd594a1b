"""Managed-key access end to end: roles, model allow-lists (including trimmed model listings), per-key
limits, usage and token metrics, /metrics, CORS. Managed keys are injected into the running gate here;
the key store and its CLI have their own tests."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from fastgate.access import Principal, Role
from fastgate.server import RunningServer
from fastgate.usage import UsageRecord
from tests.conftest import KEY1, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.rawhttp import Client, build_request

pytestmark = pytest.mark.timeout(30)

SECRET = "fg_test-managed-key-000000000001"


def give_key(gw: RunningServer, **fields: object) -> None:
    principal = Principal("dana", "k_dana", **{"role": Role.USER, **fields})  # type: ignore[arg-type]
    gw.proxy.gate.set_managed_keys({hashlib.sha256(SECRET.encode()).digest(): principal})


async def test_user_role_is_refused_model_management(gateway: RunningServer, ollama: FakeOllama) -> None:
    give_key(gateway)
    c = await Client.connect(gateway.port)
    resp = await c.request("POST", "/api/pull", headers={"X-API-Key": SECRET}, json_body={"model": "x"})
    assert resp.status == 403 and "admin" in resp.json()["error"]
    resp = await c.request("POST", "/api/generate", headers={"X-API-Key": SECRET},
                           json_body={"model": "llama3.2:latest", "prompt": "hi", "stream": False})
    assert resp.status == 200
    assert [r.path for r in ollama.received] == ["/api/generate"]
    await c.close()


async def test_model_allow_list_refuses_and_trims_listings(gateway: RunningServer, ollama: FakeOllama) -> None:
    give_key(gateway, models=("qwen2.5:*",))
    c = await Client.connect(gateway.port)
    resp = await c.request("POST", "/api/chat", headers={"X-API-Key": SECRET}, json_body={
        "model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 403 and "llama3.2:latest" in resp.json()["error"]
    resp = await c.request("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {SECRET}"},
                           json_body={"model": "llama3.2:latest", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 403 and resp.json()["error"]["type"] == "permission_error"
    tags = await c.request("GET", "/api/tags", headers={"X-API-Key": SECRET})
    assert tags.status == 200
    assert [m["name"] for m in tags.json()["models"]] == ["qwen2.5:0.5b"]
    assert int(tags.header("content-length") or 0) == len(tags.body)
    models = await c.request("GET", "/v1/models", headers={"X-API-Key": SECRET})
    assert [m["id"] for m in models.json()["data"]] == ["qwen2.5:0.5b"]
    everything = await c.request("GET", "/api/tags", headers={"X-API-Key": KEY1})  # an unrestricted key
    assert len(everything.json()["models"]) == 2
    await c.close()


async def test_rate_limit_answers_429_in_the_path_s_error_shape(gateway: RunningServer) -> None:
    give_key(gateway, rpm=2)
    c = await Client.connect(gateway.port)
    for _ in range(2):
        assert (await c.request("GET", "/api/version", headers={"X-API-Key": SECRET})).status == 200
    resp = await c.request("GET", "/api/version", headers={"X-API-Key": SECRET})
    assert resp.status == 429 and int(resp.header("retry-after") or 0) >= 1
    assert "requests per minute" in resp.json()["error"]
    resp = await c.request("GET", "/v1/models", headers={"X-API-Key": SECRET})
    assert resp.status == 429 and resp.json()["error"]["type"] == "rate_limit_error"
    await c.close()


async def test_max_concurrent_counts_streams_until_they_end(gateway: RunningServer) -> None:
    give_key(gateway, max_concurrent=1)
    first = await Client.connect(gateway.port)
    first.send(build_request("POST", "/api/generate", headers={"X-API-Key": SECRET}, body=json.dumps(
        {"model": "llama3.2:latest", "prompt": "x", "options": {"num_predict": 5, "fake_gap_ms": 80}}).encode()))
    head = await first.response_head()
    assert head.status == 200
    second = await Client.connect(gateway.port)
    busy = await second.request("GET", "/api/version", headers={"X-API-Key": SECRET})
    assert busy.status == 429
    await first.body(head)
    await asyncio.sleep(0.05)
    assert (await second.request("GET", "/api/version", headers={"X-API-Key": SECRET})).status == 200
    await first.close()
    await second.close()


async def test_tokens_per_day_counts_what_ollama_reports(gateway: RunningServer) -> None:
    give_key(gateway, tokens_per_day=10)
    c = await Client.connect(gateway.port)
    resp = await c.request("POST", "/api/generate", headers={"X-API-Key": SECRET},
                           json_body={"model": "llama3.2:latest", "prompt": "hello there", "stream": False,
                                      "options": {"num_predict": 8}})
    assert resp.status == 200
    reported = resp.json()["prompt_eval_count"] + resp.json()["eval_count"]
    assert reported >= 10
    assert gateway.proxy.gate.limits.tokens_today("k_dana", gateway.proxy.gate.wall_clock()) == reported
    resp = await c.request("GET", "/api/version", headers={"X-API-Key": SECRET})
    assert resp.status == 429 and "daily token limit" in resp.json()["error"]
    await c.close()


async def test_usage_records_and_token_metrics(gateway: RunningServer) -> None:
    give_key(gateway)
    records: list[UsageRecord] = []
    gateway.proxy.set_usage_sink(records.append)
    c = await Client.connect(gateway.port)
    stream = await c.request("POST", "/api/chat", headers={"X-API-Key": SECRET}, json_body={
        "model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_predict": 7}})
    final = stream.lines[-1]
    sse = await c.request("POST", "/v1/chat/completions", headers={"X-API-Key": SECRET}, json_body={
        "model": "qwen2.5:0.5b", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}]})
    assert sse.status == 200
    await c.close()
    assert [(r.user, r.key_id, r.model, r.path, r.status) for r in records] == [
        ("dana", "k_dana", "llama3.2:latest", "/api/chat", 200),
        ("dana", "k_dana", "qwen2.5:0.5b", "/v1/chat/completions", 200)]
    assert (records[0].prompt_tokens, records[0].completion_tokens) == (final["prompt_eval_count"],
                                                                       final["eval_count"])
    usage = json.loads(sse.chunks[-2][len(b"data: "):])["usage"]
    assert (records[1].prompt_tokens, records[1].completion_tokens) == (usage["prompt_tokens"],
                                                                       usage["completion_tokens"])
    text = gateway.proxy.metrics.render(in_flight=0, connections=0).decode()
    assert f'fastgate_tokens_total{{user="dana",model="llama3.2:latest",kind="completion"}} {final["eval_count"]}' in text


async def test_metrics_need_an_admin_key(gateway: RunningServer) -> None:
    give_key(gateway)
    c = await Client.connect(gateway.port)
    await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})
    await c.request("GET", "/api/version", headers={"X-API-Key": "wrong-wrong-wrong-1"})
    assert (await c.request("GET", "/metrics")).status == 401
    assert (await c.request("GET", "/metrics", headers={"X-API-Key": SECRET})).status == 403  # role user
    resp = await c.request("GET", "/metrics", headers={"X-API-Key": KEY1})  # config keys are admins
    assert resp.status == 200 and resp.header("content-type", ).startswith("text/plain; version=0.0.4")  # type: ignore[union-attr]
    text = resp.body.decode()
    assert 'fastgate_requests_total{user="user1",path="/api/version",status="200"} 1' in text
    assert 'fastgate_auth_failures_total{reason="invalid_key"} 1' in text
    assert "fastgate_upstream_first_byte_seconds_count 1" in text
    assert "fastgate_upstream_up 1" in text
    await c.close()


async def test_separate_metrics_listener_serves_only_metrics(make_gateway: MakeGateway) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = await make_gateway(metrics={"listen": f"127.0.0.1:{port}"})
    assert gw.metrics_server is not None
    c = await Client.connect(port)
    resp = await c.request("GET", "/metrics")
    assert resp.status == 200 and b"fastgate_requests_total" in resp.body
    assert (await c.request("GET", "/api/tags", headers={"X-API-Key": KEY1})).status == 404
    await c.close()


async def test_cors_preflight_and_headers(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway(cors={"allow_origins": ["https://chat.example.com"]})
    c = await Client.connect(gw.port)
    pre = await c.request("OPTIONS", "/api/chat", headers={
        "Origin": "https://chat.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, content-type"})
    assert pre.status == 204
    assert pre.header("access-control-allow-origin") == "https://chat.example.com"
    assert "X-API-Key" in (pre.header("access-control-allow-headers") or "")
    assert pre.header("content-length") is None
    resp = await c.request("POST", "/api/chat", headers={"Origin": "https://chat.example.com", "X-API-Key": KEY1},
                           json_body={"model": "llama3.2:latest", "stream": False,
                                      "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200 and resp.header("access-control-allow-origin") == "https://chat.example.com"
    assert ollama.received[-1].header("origin") is None  # still never reaches Ollama
    denied = await c.request("POST", "/api/chat", headers={"Origin": "https://chat.example.com"}, body=b"{}")
    assert denied.status == 401 and denied.header("access-control-allow-origin") == "https://chat.example.com"
    other = await c.request("OPTIONS", "/api/chat", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.status == 403 and other.header("access-control-allow-origin") is None
    assert [r.method for r in ollama.received] == ["POST"]
    await c.close()


async def test_running_models_listing_is_trimmed_too(gateway: RunningServer) -> None:
    give_key(gateway, models=("llama3*",))
    c = await Client.connect(gateway.port)
    await c.request("POST", "/api/generate", headers={"X-API-Key": KEY1},
                    json_body={"model": "qwen2.5:0.5b", "prompt": "x", "stream": False})  # loads a model
    await c.request("POST", "/api/generate", headers={"X-API-Key": KEY1},
                    json_body={"model": "llama3.2:latest", "prompt": "x", "stream": False})
    everything = await c.request("GET", "/api/ps", headers={"X-API-Key": KEY1})
    mine = await c.request("GET", "/api/ps", headers={"X-API-Key": SECRET})
    assert mine.status == 200
    assert sorted(m["name"] for m in everything.json()["models"]) == ["llama3.2:latest", "qwen2.5:0.5b"]
    assert [m["name"] for m in mine.json()["models"]] == ["llama3.2:latest"]
    await c.close()
