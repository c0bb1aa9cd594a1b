"""[state]: with one backend, the admission goes to Redis before the request is placed and its pooled connection
taken, and is awaited before anything is sent (issue 10's latency goal). What was taken meanwhile must go back
when Redis refuses, or when the client leaves, and nothing may reach Ollama before Redis said yes. In-process
fastgate, a real redis-server, the fake Ollama."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastgate.access import Principal
from fastgate.config import build_config
from fastgate.errors import TooManyRequests
from fastgate.gate import Gate
from fastgate.server import RunningServer
from fastgate.state.redis_state import lease_key, open_state
from fastgate.store import KeyStore
from fastgate.upstream import UpstreamPool
from tests.conftest import KEY1, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.rawhttp import Client, build_request
from tests.redis_server import RedisServer, require_redis_server

pytestmark = pytest.mark.timeout(60)

GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer(require_redis_server())
    server.start()
    yield server
    server.close()


def limited_key(db: str, **limits: int) -> tuple[str, str]:
    """A key with `limits` in a new key store at `db`: its id and secret."""
    with KeyStore(db) as store:
        record, secret = store.add("ann", role="user", now=time.time(), **limits)  # type: ignore[arg-type]
    return record.id, secret


def only_pool(gw: RunningServer) -> UpstreamPool:
    (pool,) = gw.proxy.pools.values()
    return pool


def router_in_flight(gw: RunningServer) -> int:
    (backend,) = gw.proxy.router.snapshot(asyncio.get_running_loop().time()).backends
    return backend.in_flight


async def eventually(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_refused_admission_reaches_no_ollama_and_gives_back_what_it_took(
        make_gateway: MakeGateway, ollama: FakeOllama, redis: RedisServer, tmp_path: Path) -> None:
    db = str(tmp_path / "keys.db")
    _, secret = limited_key(db, rpm=1)
    gw = await make_gateway(store={"path": db}, state={"url": redis.url, "timeout": 2})
    assert gw.proxy.state is not None and gw.proxy.state.mode == "shared"
    c = await Client.connect(gw.port)
    try:
        assert (await c.request("POST", "/api/generate", headers={"X-API-Key": secret}, json_body=GENERATE)).status == 200
        pool = only_pool(gw)
        idle, connects, received = len(pool._idle), pool.connects, len(ollama.received)
        assert idle == 1  # the next request takes it while Redis answers

        refused = await c.request("POST", "/api/generate", headers={"X-API-Key": secret}, json_body=GENERATE)
        assert refused.status == 429  # as the in-process limits answer it
        assert refused.json()["error"] == "rate limit of 1 requests per minute reached for this key"
        assert 55 <= int(refused.header("Retry-After") or 0) <= 60
        assert len(ollama.received) == received  # nothing of it reached Ollama
        assert len(pool._idle) == idle  # the pooled connection is back in its pool, not lost nor closed
        assert router_in_flight(gw) == 0 and gw.proxy.in_flight == 0  # its placement was given back
        metrics = gw.proxy.metrics.render(in_flight=0, connections=0).decode()
        assert 'status="429"' in metrics

        # The client's connection goes on, and the next request is served on the same upstream connection.
        assert (await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})).status == 200
        assert pool.connects == connects and len(ollama.received) == received + 1
    finally:
        await c.close()


async def test_a_client_that_leaves_during_the_admission_frees_its_lease_and_connection(
        make_gateway: MakeGateway, ollama: FakeOllama, redis: RedisServer, tmp_path: Path) -> None:
    db = str(tmp_path / "keys.db")
    key_id, secret = limited_key(db, max_concurrent=1)
    gw = await make_gateway(store={"path": db}, state={"url": redis.url, "timeout": 5})
    c = await Client.connect(gw.port)
    try:
        assert (await c.request("POST", "/api/generate", headers={"X-API-Key": secret}, json_body=GENERATE)).status == 200
        pool = only_pool(gw)
        received = len(ollama.received)
        redis.pause()  # the admission waits in Redis's socket
        leaving = await Client.connect(gw.port)
        leaving.send(build_request("POST", "/api/generate", headers={"X-API-Key": secret},
                                   body=json.dumps(GENERATE).encode(), host="gateway.example.com"))
        await eventually(lambda: gw.proxy.in_flight == 1)
        await leaving.close()
        await asyncio.sleep(0.1)
        redis.resume()
        # Redis admits it (a lease taken); the client is gone: the lease, the placement and the pooled
        # connection go back, and nothing reaches Ollama.
        await eventually(lambda: gw.proxy.in_flight == 0)
        await eventually(lambda: redis.command("ZCARD", lease_key(key_id)) == b":0\r\n")
        assert router_in_flight(gw) == 0 and len(pool._idle) == 1
        assert len(ollama.received) == received
        # The key's only slot is free: served at once (a lease left behind would hold it for the lease TTL).
        assert (await c.request("POST", "/api/generate", headers={"X-API-Key": secret}, json_body=GENERATE)).status == 200
        assert gw.proxy.state is not None and gw.proxy.state.mode == "shared"
    finally:
        redis.resume()
        await c.close()


async def test_an_admission_ended_whether_awaited_or_not_holds_no_lease(redis: RedisServer) -> None:
    config = build_config({"state": {"url": redis.url, "timeout": 1.0}})
    assert config.state is not None
    state = await open_state(config.state, Gate(config))
    try:
        key = Principal("ann", "k_ended", max_concurrent=1)
        unawaited = state.begin_admit(key)  # the script is on its way and takes the only slot...
        unawaited.end()  # ...which goes back, though nobody waits for the answer
        admitted = state.begin_admit(key)
        assert (await admitted).member  # the slot was free
        with pytest.raises(RuntimeError):
            await admitted  # once: a second answer would count the request again
        with pytest.raises(TooManyRequests, match="this key already has 1 requests in flight"):
            await state.admit(key)
        admitted.end()
        admitted.end()  # given back once
        state.release(await state.admit(key))
        assert state.mode == "shared"
    finally:
        await state.stop()
