"""Abuse resistance (issue 13): no single client can freeze, starve or bloat fastgate, and accounting cannot be
forged. Each test runs the attack against a real gateway on loopback and measures what matters."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from fastgate.access import Principal, Role
from fastgate.metrics import MAX_MODEL_LABELS, Metrics
from fastgate.usage import UsageRecord
from tests.conftest import KEY1, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.rawhttp import Client

pytestmark = pytest.mark.timeout(60)

USER_SECRET = "fg_abuse-user-key-00000000000001"


# -- /health is not an amplifier -----------------------------------------------------------------------------

async def test_health_flood_probes_ollama_at_most_once_per_second(make_gateway: MakeGateway,
                                                                  ollama: FakeOllama) -> None:
    gw = await make_gateway()
    clients = [await Client.connect(gw.port) for _ in range(20)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        answers = []
        for _ in range(10):
            answers += await asyncio.gather(*(c.request("GET", "/health") for c in clients))
    finally:
        for c in clients:
            await c.close()
    elapsed = loop.time() - started
    assert len(answers) == 200 and all(a.status == 200 for a in answers)
    probes = [r for r in ollama.received if r.path == "/api/version"]
    assert 1 <= len(probes) <= int(elapsed) + 1
    assert len({r.conn_id for r in probes}) == 1  # one pooled connection, not one per probe


async def test_health_tells_only_up_or_degraded_without_an_admin_key(make_gateway: MakeGateway,
                                                                     ollama: FakeOllama) -> None:
    gw = await make_gateway()
    gw.proxy.gate.set_managed_keys({hashlib.sha256(USER_SECRET.encode()).digest():
                                    Principal("u", "k_u", role=Role.USER)})
    c = await Client.connect(gw.port)
    try:
        anonymous = await c.request("GET", "/health")
        user = await c.request("GET", "/health", headers={"X-API-Key": USER_SECRET})
        admin = await c.request("GET", "/health", headers={"X-API-Key": KEY1})
    finally:
        await c.close()
    assert anonymous.json() == {"status": "ok"} and user.json() == {"status": "ok"}
    assert admin.json()["upstream"]["version"] and "uptime_s" in admin.json()["fastgate"]


# -- accounting cannot be forged -----------------------------------------------------------------------------

@pytest.mark.parametrize("secret", [USER_SECRET, KEY1])  # a judged request, and an admin's unjudged one
async def test_usage_records_the_model_ollama_runs_not_a_decoy(secret: str, make_gateway: MakeGateway,
                                                               ollama: FakeOllama) -> None:
    gw = await make_gateway()
    gw.proxy.gate.set_managed_keys({hashlib.sha256(USER_SECRET.encode()).digest():
                                    Principal("u", "k_u", role=Role.USER)})
    records: list[UsageRecord] = []
    gw.proxy.set_usage_sink(records.append)
    c = await Client.connect(gw.port)
    try:
        resp = await c.request("POST", "/api/chat", headers={"X-API-Key": secret}, body=(
            b'{"format":{"model":"gpt-5-spoof"},"messages":[{"role":"user","content":"\\"model\\":\\"x\\""}],'
            b'"model":"llama3.2:latest","stream":false}'))
    finally:
        await c.close()
    assert resp.status == 200
    assert [r.model for r in records] == ["llama3.2:latest"]
    text = gw.proxy.metrics.render(in_flight=0, connections=0).decode()
    assert "gpt-5-spoof" not in text


async def test_usage_paths_are_route_labels(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway()
    records: list[UsageRecord] = []
    gw.proxy.set_usage_sink(records.append)
    c = await Client.connect(gw.port)
    try:
        for n in range(3):
            await c.request("GET", "/api/" + "x" * 20000 + str(n), headers={"X-API-Key": KEY1})
    finally:
        await c.close()
    assert [r.path for r in records] == ["other"] * 3


def test_metric_model_labels_are_bounded() -> None:
    metrics = Metrics()
    for n in range(MAX_MODEL_LABELS * 3):
        metrics.add_tokens("u", f"model-{n}", 1, 1)
    assert len({model for _, model, _ in metrics.tokens}) == MAX_MODEL_LABELS + 1
    assert ("u", "other", "prompt") in metrics.tokens


# -- bodies buffered without a key: bounded in total, in time and in work ------------------------------------

async def _latency_of_root(port: int) -> float:
    """How long another client's `GET /` takes right now."""
    loop = asyncio.get_running_loop()
    c = await Client.connect(port)
    try:
        started = loop.time()
        resp = await c.request("GET", "/")
        assert resp.status == 200
        return loop.time() - started
    finally:
        await c.close()


async def test_buffered_bodies_share_one_budget_and_rss_stays_bounded(tmp_path, ollama: FakeOllama) -> None:
    from tests.proc import FastgateProcess, write_config
    budget_mib, body_mib, holders = 32, 8, 12  # 96 MiB asked for, 32 MiB allowed
    config = write_config(tmp_path / "fg.toml", ollama.url, keys={KEY1: "user1"},
                          extra=f"[auth]\nmax_buffered_bytes = {budget_mib << 20}\nmax_body_bytes = {body_mib << 21}\n")
    proc = await FastgateProcess.start("serve", "--config", str(config))
    writers = []
    try:
        await _latency_of_root(proc.port)
        baseline_kib = proc.rss_kib()
        refused = 0
        piece = b"x" * (1 << 20)
        for _ in range(holders):
            reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
            writers.append(writer)
            prefix = b'{"x":"'
            writer.write(b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % (
                len(prefix) + (body_mib << 20) + 1) + prefix)
            for _ in range(body_mib):  # all but the last byte: the body is held, never finished
                writer.write(piece)
                try:
                    await asyncio.wait_for(writer.drain(), 5)
                except (ConnectionError, asyncio.TimeoutError):
                    break
            try:
                head = await asyncio.wait_for(reader.read(65536), 0.3)
            except asyncio.TimeoutError:
                head = b""  # held: no answer while the body is incomplete
            if head.startswith(b"HTTP/1.1 503"):
                assert b"retry-after" in head.lower()
                refused += 1
        latency = await _latency_of_root(proc.port)
        grown_mib = (proc.rss_kib() - baseline_kib) / 1024
        assert refused >= holders - budget_mib // body_mib, bytes(proc.log)[-3000:]  # those past the budget were told to come back
        assert grown_mib < budget_mib + 24, grown_mib
        assert latency < 1.0
    finally:
        for writer in writers:
            writer.close()
        await proc.stop()
    assert [r.path for r in ollama.received if r.path != "/api/version"] == []  # only the startup probe


async def test_slow_keyless_body_must_arrive_within_the_header_timeout(make_gateway: MakeGateway,
                                                                       ollama: FakeOllama) -> None:
    gw = await make_gateway(server={"header_timeout": 1.0, "body_timeout": 5.0})
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    started = loop.time()
    try:
        writer.write(b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n{")
        answer = b""
        for _ in range(40):  # one byte every 0.1 s: each read is well inside body_timeout
            writer.write(b" ")
            try:
                answer = await asyncio.wait_for(reader.read(65536), 0.1)
                break
            except asyncio.TimeoutError:
                continue
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert loop.time() - started < 2.5  # the header timeout (1 s), not 40 s of trickle
    assert ollama.received == []


async def test_duplicate_key_members_do_not_freeze_the_loop(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway()
    body = b"{" + b'"api_key":0,' * 200_000 + b'"model":"x"}'  # 2.4 MB of duplicates
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await asyncio.sleep(0.05)
        latency = await _latency_of_root(gw.port)
        answer = await asyncio.wait_for(reader.read(65536), 20)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 401")
    assert latency < 1.0


async def test_tiny_chunks_are_bounded_and_do_not_freeze_the_loop(make_gateway: MakeGateway,
                                                                  ollama: FakeOllama) -> None:
    gw = await make_gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    pieces = b"1\r\nx\r\n" * 500_000  # 3 MB of one-byte chunks, no key
    try:
        writer.write(b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(pieces)
        await asyncio.sleep(0.05)
        latency = await _latency_of_root(gw.port)
        answer = await asyncio.wait_for(reader.read(65536), 20)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413")
    assert latency < 1.0
    assert ollama.received == []
