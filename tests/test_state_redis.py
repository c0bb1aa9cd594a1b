"""[state]: live state shared through a real redis-server by three fastgate processes (issue 10).

Each test starts three `fastgate serve` processes that share one SQLite key store (keys with limits come from
`fastgate keys add`) and one private redis-server, and spreads its requests across them. Nothing here mocks
Redis: limits, leases, trust and lockout are what the instances agree on through it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastgate.access import Principal
from fastgate.config import build_config
from fastgate.errors import ConfigError, TooManyRequests, Unauthorized
from fastgate.gate import Gate
from fastgate.state.redis_state import RedisState, local_share, open_state, tokens_key
from tests.conftest import KEYS
from tests.fake_ollama import FakeOllama
from tests.proc import FastgateProcess, write_config
from tests.rawhttp import Client, RawResponse
from tests.redis_server import RedisServer, require_redis_server

pytestmark = pytest.mark.timeout(120)

INSTANCES = 3
GENERATE = {"model": "qwen2.5:0.5b", "prompt": "hi", "stream": False}


# ---------------------------------------------------------------------------------------------------------
# Config (pure)

@pytest.mark.parametrize(("url", "host", "port", "path", "db"), [
    ("redis://127.0.0.1:6379/0", "127.0.0.1", 6379, "", 0),
    ("redis://cache.internal/3", "cache.internal", 6379, "", 3),
    ("redis://:secret@10.0.0.5:6380", "10.0.0.5", 6380, "", 0),
    ("unix:///run/redis/redis.sock", "", 6379, "/run/redis/redis.sock", 0),
    ("unix:///run/redis/redis.sock?db=2", "", 6379, "/run/redis/redis.sock", 2),
])
def test_state_url_forms(url: str, host: str, port: int, path: str, db: int) -> None:
    state = build_config({"state": {"url": url}}).state
    assert state is not None and state.timeout == 0.05
    assert (state.url.host, state.url.port, state.url.path, state.url.db) == (host, port, path, db)
    assert "secret" not in state.url.redacted and "secret" not in repr(state)


def test_without_state_section_there_is_none() -> None:
    assert build_config({}).state is None


@pytest.mark.parametrize(("section", "message"), [
    ({}, "state.url: required"),
    ({"url": "http://127.0.0.1:6379"}, "state.url: expected redis://"),
    ({"url": "redis://h/zero"}, "state.url: the database is a number"),
    ({"url": "redis://h:0"}, "state.url: port 0"),
    ({"url": "redis://h:99999"}, "state.url: bad port"),
    ({"url": "unix://relative/path"}, "state.url: expected"),
    ({"url": "unix:///p.sock?database=1"}, "state.url: the only query"),
    ({"url": 6379}, "state.url: expected"),
    ({"url": "redis://h", "timeout": 0}, "state.timeout: expected a number of seconds > 0"),
    ({"url": "redis://h", "timeout": "fast"}, "state.timeout: expected a number of seconds > 0"),
    ({"url": "redis://h", "timout": 1}, "state.timout: unknown key"),
])
def test_state_config_errors_name_the_key(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("?", r"\?")):
        build_config({"state": section})


def test_password_never_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"state": {"url": "redis://user:hunter2@h/x"}})
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(("limit", "live", "share"), [(10, 3, 3), (10, 1, 10), (2, 3, 1), (None, 3, None), (7, 0, 7)])
def test_local_share_while_degraded(limit: int | None, live: int, share: int | None) -> None:
    assert local_share(limit, live) == share


# ---------------------------------------------------------------------------------------------------------
# Three processes, one Redis

@pytest.fixture(scope="session")
def redis_binary() -> str:
    return require_redis_server()


@pytest.fixture(scope="session")
def shared_redis(redis_binary: str) -> Iterator[RedisServer]:
    server = RedisServer(redis_binary)
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis(shared_redis: RedisServer) -> RedisServer:
    if shared_redis.proc is None:
        shared_redis.start()
    shared_redis.command("FLUSHALL")
    return shared_redis


@pytest.fixture
def own_redis(redis_binary: str) -> Iterator[RedisServer]:
    """A Redis of the test's own, for tests that stop it."""
    server = RedisServer(redis_binary)
    server.start()
    yield server
    server.close()


def cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastgate", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=30, check=False)


@dataclass
class Cluster:
    procs: list[FastgateProcess]
    configs: list[Path]
    clients: list[Client]

    async def add_key(self, *argv: str) -> str:
        seen = [bytes(proc.log).count(b"Key store changed") for proc in self.procs]
        added = await asyncio.to_thread(cli, "keys", "add", "lim", *argv, config=self.configs[0])
        assert added.returncode == 0, added.stderr
        secret = next(line.split()[-1] for line in added.stdout.splitlines() if line.startswith("API key:"))
        # Every instance polls the shared store: wait until each has read it again (any request with the key
        # would use up some of its limits, or count as a wrong key).
        for proc, before in zip(self.procs, seen):
            if proc.proc.returncode is None:
                await eventually(lambda p=proc, b=before: bytes(p.log).count(b"Key store changed") > b, timeout=10)
        return secret

    async def get(self, i: int, target: str = "/api/version", **headers: str) -> RawResponse:
        return await self.clients[i % len(self.clients)].request("GET", target, headers=headers)

    async def health(self, i: int) -> dict[str, object]:
        return json.loads((await self.get(i, "/health")).body)


async def eventually(check, timeout: float = 5.0, interval: float = 0.05) -> float:  # type: ignore[no-untyped-def]
    """Poll `check` (sync or async) until true; how long it took. Fails at the deadline."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return loop.time() - started
        assert loop.time() - started < timeout, "condition not met in time"
        await asyncio.sleep(interval)


# The tests of what is shared give Redis a second: on this busy machine a 50 ms wait (the default) is sometimes
# missed, and then an instance rightly falls back to its local share, which is what the outage test checks.
SHARED_TIMEOUT_S = 1.0


async def start_cluster(tmp_path: Path, ollama: FakeOllama, redis_url: str, *, auth: str = "",
                        timeout_s: float = SHARED_TIMEOUT_S) -> Cluster:
    procs: list[FastgateProcess] = []
    configs: list[Path] = []
    extra = (f'[store]\npath = "{tmp_path / "keys.db"}"\n\n[state]\nurl = "{redis_url}"\ntimeout = {timeout_s}\n\n'
             f'{auth}')
    for i in range(INSTANCES):
        config = write_config(tmp_path / f"fastgate{i}.toml", ollama.url, keys=KEYS, extra=extra)
        text = config.read_text().replace("[upstream]", 'hostnames = ["gateway.example.com"]\n\n[upstream]', 1)
        config.write_text(text)
        configs.append(config)
    try:
        for config in configs:
            procs.append(await FastgateProcess.start("serve", "--config", str(config)))
        clients = [await Client.connect(proc.port) for proc in procs]
    except BaseException:
        for proc in procs:
            await proc.stop()
        raise
    return Cluster(procs, configs, clients)


@pytest.fixture
async def cluster(tmp_path: Path, ollama: FakeOllama, redis: RedisServer) -> AsyncIterator[Cluster]:
    c = await start_cluster(tmp_path, ollama, redis.url)
    yield c
    await stop_cluster(c)


async def stop_cluster(c: Cluster) -> None:
    for client in c.clients:
        await client.close()
    for proc in c.procs:
        await proc.stop()


async def test_rpm_is_one_bucket_across_instances(cluster: Cluster) -> None:
    secret = await cluster.add_key("--rpm", "10")
    # 10x the limit at once: 20 connections (spread over the three instances) sending 5 requests each.
    clients = [await Client.connect(cluster.procs[i % INSTANCES].port) for i in range(20)]

    async def send_five(c: Client) -> list[RawResponse]:
        return [await c.request("GET", "/api/version", headers={"X-API-Key": secret}) for _ in range(5)]

    answers = [r for rs in await asyncio.gather(*(send_five(c) for c in clients)) for r in rs]
    for c in clients:
        await c.close()
    statuses = [r.status for r in answers]
    for resp in answers:
        if resp.status == 429:
            assert int(resp.header("retry-after") or 0) >= 1
            assert b"rate limit of 10 requests per minute reached for this key" in resp.body
    admitted = statuses.count(200)
    assert not any(b"unreachable" in bytes(proc.log) for proc in cluster.procs)  # never fell back
    # The burst is the limit (a full bucket); refilling at 10/min adds one per 6 s of test time.
    assert 10 <= admitted <= 11, statuses
    assert statuses.count(429) == 100 - admitted
    for i in range(INSTANCES):
        assert (await cluster.health(i))["state"] == "shared"


async def test_max_concurrent_across_instances_and_a_killed_holder(cluster: Cluster, ollama: FakeOllama) -> None:
    secret = await cluster.add_key("--max-concurrent", "2")
    body = {"model": "qwen2.5:0.5b", "prompt": "hi", "stream": True,
            "options": {"num_predict": 100000, "fake_gap_ms": 50}}
    streams: list[Client] = []
    admitted: list[int] = []
    for i in range(6):  # two attempts per instance, the first two streams hold their slots throughout
        c = await Client.connect(cluster.procs[i % INSTANCES].port)
        streams.append(c)
        c.send(build(secret, body))
        head = await c.response_head()
        if head.status == 200:
            admitted.append(i)
        else:
            assert head.status == 429
            assert b"this key already has 2 requests in flight" in (await c.body(head)).body
    assert admitted == [0, 1]  # the third, fourth... on any instance: refused
    # The holder on instance 0 dies without a word: its lease runs out, and a new stream gets the slot.
    cluster.procs[0].proc.send_signal(signal.SIGKILL)
    await cluster.procs[0].wait()
    loop = asyncio.get_running_loop()
    killed_at = loop.time()

    async def slot_free() -> bool:
        c = await Client.connect(cluster.procs[2].port)
        c.send(build(secret, body))
        head = await c.response_head()
        await c.close()
        return head.status == 200

    took = await eventually(slot_free, timeout=30, interval=0.5)
    assert loop.time() - killed_at < 30
    print(f"lease of a SIGKILLed instance freed after {took:.1f} s")
    for c in streams:
        await c.close()


def build(secret: str, body: dict[str, object]) -> bytes:
    from tests.rawhttp import build_request
    return build_request("POST", "/api/generate", headers={"X-API-Key": secret}, body=json.dumps(body).encode())


async def test_auth_on_one_instance_trusts_on_all(cluster: Cluster) -> None:
    for i in range(INSTANCES):
        assert (await cluster.get(i)).status == 401
    key = next(iter(KEYS))
    resp = await cluster.clients[0].request("POST", "/auth", json_body={"api_key": key})
    assert resp.status == 200 and json.loads(resp.body)["ip_trust"] is True
    for i in range(INSTANCES):
        await eventually(lambda i=i: _status_is(cluster, i, 200), timeout=1)


async def _status_is(cluster: Cluster, i: int, status: int, **headers: str) -> bool:
    return (await cluster.get(i, **headers)).status == status


async def test_key_guessing_is_counted_together(tmp_path: Path, ollama: FakeOllama, redis: RedisServer) -> None:
    c = await start_cluster(tmp_path, ollama, redis.url, auth="[auth]\nmax_failures = 6\nfailure_window = 60\n")
    try:
        statuses = [(await c.get(i, **{"X-API-Key": f"wrong-{i}"})).status for i in range(12)]
        # Six wrong keys in all (two per instance) lock the address everywhere; alone each instance would
        # have allowed six of its own (eighteen).
        assert statuses[:6] == [401] * 6 and statuses[6:] == [429] * 6, statuses
        good = next(iter(KEYS))
        for i in range(INSTANCES):  # even the right key, on every instance: a lock answers every key alike
            await eventually(lambda i=i: _status_is(c, i, 429, **{"X-API-Key": good}), timeout=1)
    finally:
        await stop_cluster(c)


async def test_tokens_per_day_are_one_count(cluster: Cluster) -> None:
    secret = await cluster.add_key("--tokens-per-day", "40")
    spent = 0
    for _ in range(20):  # each answer costs 10 + 5 tokens: the third reaches 45
        resp = await cluster.clients[0].request("POST", "/api/generate", headers={"X-API-Key": secret},
                                                json_body=GENERATE)
        if resp.status == 429:
            break
        spent += 1
    assert spent == 3
    for i in (1, 2):
        resp = await cluster.clients[i].request("POST", "/api/generate", headers={"X-API-Key": secret},
                                                json_body=GENERATE)
        assert resp.status == 429 and b"daily token limit of 40 reached for this key" in resp.body


async def test_redis_down_every_request_served_and_back_within_5_s(tmp_path: Path, ollama: FakeOllama,
                                                                   own_redis: RedisServer) -> None:
    c = await start_cluster(tmp_path, ollama, own_redis.url, timeout_s=0.05)  # the default
    try:
        busy = await c.add_key("--rpm", "100000")  # limited (so Redis is on its path) but never refused

        async def timed(i: int) -> float:
            started = time.perf_counter()
            resp = await c.get(i, **{"X-API-Key": busy})
            assert resp.status == 200
            return time.perf_counter() - started

        shared = [await timed(i) for i in range(60)]
        # Frozen (SIGSTOP): connections stay open and nothing answers, the worst case. Each instance waits
        # state.timeout once, then answers locally without asking Redis again.
        own_redis.pause()
        paused = [await timed(i) for i in range(60)]
        for i in range(INSTANCES):
            assert (await c.health(i))["state"] == "degraded"
        own_redis.resume()
        own_redis.stop()  # gone: connection refused
        down = [await timed(i) for i in range(60)]
        base = sorted(shared)[len(shared) // 2]
        worst = max(paused + down)
        print(f"p50 shared {base * 1000:.2f} ms; worst with Redis frozen or down {worst * 1000:.2f} ms")
        assert worst - base < 0.1, (base, worst)
        # Degraded: each instance has its share of the limit (rpm 9 / 3 live instances = 3 each).
        limited = await c.add_key("--rpm", "9")
        admitted = sum([(await c.get(i, **{"X-API-Key": limited})).status == 200 for i in range(45)])
        assert admitted == 9
        # Redis back (empty: no persistence): every instance shared again within 5 s, and the limit global.
        own_redis.start()
        loop = asyncio.get_running_loop()
        back_at = loop.time()
        for i in range(INSTANCES):
            await eventually(lambda i=i: _health_state(c, i, "shared"), timeout=5 - (loop.time() - back_at))
        print(f"shared again after {loop.time() - back_at:.2f} s")
        strict = await c.add_key("--rpm", "4")
        statuses = [(await c.get(i, **{"X-API-Key": strict})).status for i in range(30)]
        assert statuses.count(200) == 4, statuses
    finally:
        await stop_cluster(c)


async def _health_state(c: Cluster, i: int, state: str) -> bool:
    return (await c.health(i)).get("state") == state


# ---------------------------------------------------------------------------------------------------------
# Two RedisStates in this process (two instances' worth), for what needs a short lease or a unix socket



async def two_states(url: str, *, lease_ttl_s: float = 15.0, timeout_s: float = SHARED_TIMEOUT_S,
                     **auth: object) -> list[tuple[Gate, RedisState]]:
    config = build_config({"state": {"url": url, "timeout": timeout_s}, "auth": auth})
    assert config.state is not None
    pairs = []
    for _ in range(2):
        gate = Gate(config)
        pairs.append((gate, await open_state(config.state, gate, lease_ttl_s=lease_ttl_s)))
    return pairs


async def test_a_running_stream_keeps_its_lease_and_a_dead_one_loses_it(redis: RedisServer) -> None:
    (_, a), (_, b) = await two_states(redis.url, lease_ttl_s=0.6)
    try:
        key = Principal("ann", "k_lease", max_concurrent=1)
        lease = await a.admit(key)
        await asyncio.sleep(1.5)  # well past the TTL: only renewals keep it
        with pytest.raises(TooManyRequests, match="this key already has 1 requests in flight"):
            await b.admit(key)
        a.release(lease)
        await eventually(lambda: _admits(b, key), timeout=2)
        # An instance that stops renewing (its process died): its lease lapses after the TTL, not before.
        assert a._runner is not None
        a._runner.cancel()
        await asyncio.wait_for(asyncio.gather(a._runner, return_exceptions=True), 2)  # no more renewals
        await a.admit(key)  # b's lease was released by _admits
        took = await eventually(lambda: _admits(b, key), timeout=3, interval=0.05)
        assert 0.2 < took < 1.5, took
    finally:
        await a.stop()
        await b.stop()


async def _admits(state: RedisState, key: Principal) -> bool:
    try:
        lease = await state.admit(key)
    except TooManyRequests:
        return False
    state.release(lease)
    await asyncio.sleep(0.05)  # the release is sent on without waiting
    return True


async def _refused(state: RedisState, key: Principal, message: str) -> bool:
    try:
        state.release(await state.admit(key))
    except TooManyRequests as err:
        return message in err.message
    return False


async def test_unix_socket_url(redis_binary: str, tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    proc = await asyncio.create_subprocess_exec(redis_binary, "--port", "0", "--unixsocket", str(sock), "--save", "",
                                                "--appendonly", "no", "--dir", str(tmp_path),
                                                stdout=subprocess.DEVNULL)
    try:
        await eventually(sock.exists, timeout=10)
        (_, a), (_, b) = await two_states(f"unix://{sock}?db=3")
        try:
            assert a.mode == b.mode == "shared"
            key = Principal("ann", "k_unix", rpm=2)
            await a.admit(key)
            await b.admit(key)
            with pytest.raises(TooManyRequests, match="rate limit of 2 requests per minute"):
                await a.admit(key)
        finally:
            await a.stop()
            await b.stop()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def test_a_frozen_redis_costs_one_timeout_then_nothing(own_redis: RedisServer) -> None:
    (gate_a, a), (gate_b, b) = await two_states(own_redis.url, timeout_s=0.05, max_failures=3)
    try:
        key = Principal("ann", "k_frozen", rpm=6)
        await eventually(lambda: a.live_instances == 2, timeout=3)  # b's first heartbeat came after a's
        own_redis.pause()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await a.admit(key)  # waits state.timeout (0.05 s), then answers from the local share
        assert loop.time() - started < 0.05 + 0.05
        assert a.mode == "degraded"
        rendered = a.metrics.render(in_flight=0, connections=0)
        assert b"fastgate_state_shared 0\n" in rendered and b"fastgate_state_fallbacks_total 1\n" in rendered
        started = loop.time()
        for _ in range(2):  # live instances: 2, so 3 of 6 here, one already taken
            await a.admit(key)
        with pytest.raises(TooManyRequests, match="rate limit of 6 requests per minute"):
            await a.admit(key)
        assert loop.time() - started < 0.01  # degraded: Redis is not asked at all
        # Guessing: the wrong key is still counted, locally.
        error = Unauthorized("invalid API key")
        assert await a.failed_guess("192.0.2.9", error) is error
        # Tokens spent and trust granted during the outage reach the others once Redis is back.
        gate_a.limits.add_tokens("k_frozen_tokens", 500, time.time())
        gate_a.trust.grant("192.0.2.77", "ann", "x-api-key:sk-****0001", 3600, gate_a.clock(), "config:ann")
        assert gate_b.trust.lookup("192.0.2.77", gate_b.clock()) is None
        own_redis.resume()
        await eventually(lambda: a.mode == "shared", timeout=5)
        assert b"fastgate_state_shared 1\n" in a.metrics.render(in_flight=0, connections=0)
        await eventually(lambda: gate_b.trust.lookup("192.0.2.77", gate_b.clock()) is not None, timeout=2)
        await eventually(lambda: _refused(b, Principal("ann", "k_frozen_tokens", tokens_per_day=400),
                                          "daily token limit of 400 reached"), timeout=2)
    finally:
        own_redis.resume()
        await a.stop()
        await b.stop()


async def test_admissions_waiting_on_a_frozen_redis_each_wait_their_own_timeout(own_redis: RedisServer) -> None:
    # One watchdog keeps every waiting call's deadline: the first call's expiry must not leave the second
    # waiting for ever, nor cut it short at the first one's deadline.
    (_, a), (_, b) = await two_states(own_redis.url, timeout_s=0.2)
    try:
        key = Principal("ann", "k_waiting", rpm=100, max_concurrent=10)
        a.release(await a.admit(key))
        assert a.mode == "shared"
        own_redis.pause()
        loop = asyncio.get_running_loop()

        async def admit_after(delay_s: float) -> float:
            await asyncio.sleep(delay_s)
            started = loop.time()
            a.release(await a.admit(key))  # past the timeout: a lease of the local share
            return loop.time() - started

        first, second = await asyncio.wait_for(asyncio.gather(admit_after(0), admit_after(0.05)), 2)
        assert a.mode == "degraded"
        assert first < 0.2 + 0.1 and second < 0.2 + 0.1, (first, second)
        assert second >= 0.19, second  # its own deadline, not the first call's (0.05 s earlier)
    finally:
        own_redis.resume()
        await a.stop()
        await b.stop()


async def test_closing_the_pipeline_answers_the_calls_still_waiting(own_redis: RedisServer) -> None:
    (_, a), (_, b) = await two_states(own_redis.url, timeout_s=5)  # its watchdog would wait 5 s
    try:
        key = Principal("ann", "k_closing", rpm=100)
        a.release(await a.admit(key))
        own_redis.pause()
        waiting = asyncio.ensure_future(a.admit(key))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        assert a._pipeline is not None
        await a._pipeline.close(0)  # as a reconnect closes the old one
        a.release(await asyncio.wait_for(waiting, 1))  # answered from the local share, not after 5 s
        assert a.mode == "degraded"
    finally:
        own_redis.resume()
        await a.stop()
        await b.stop()


async def test_a_pipeline_connection_redis_closes_degrades_at_once_then_shares_again(redis: RedisServer) -> None:
    # The replies are read where the bytes arrive (the transport's protocol): an end of the connection must
    # reach the pipeline there too, without a call waiting on it, and closing it later (the reconnect, stop)
    # must still end through redis-py's own stream.
    (_, a), (_, b) = await two_states(redis.url, timeout_s=5)
    try:
        key = Principal("ann", "k_killed", rpm=100, max_concurrent=5)
        a.release(await a.admit(key))
        assert a.mode == "shared"
        assert a._pipeline is not None
        host, port = a._pipeline._writer.get_extra_info("sockname")[:2]
        assert redis.command("CLIENT", "KILL", f"{host}:{port}") == b"+OK\r\n"  # a's pipeline, nothing else
        await eventually(lambda: a.mode == "degraded", timeout=1)
        assert b.mode == "shared"
        await eventually(lambda: a.mode == "shared", timeout=5)
        for _ in range(3):
            a.release(await asyncio.wait_for(a.admit(key), 1))
        assert a.mode == "shared"
    finally:
        await asyncio.wait_for(a.stop(), 5)
        await asyncio.wait_for(b.stop(), 5)


async def test_a_redis_that_lost_the_script_degrades_then_shares_again(redis: RedisServer) -> None:
    (_, a), (_, b) = await two_states(redis.url)
    try:
        key = Principal("ann", "k_noscript", rpm=100, max_concurrent=5)
        a.release(await a.admit(key))
        assert a.mode == "shared"
        redis.command("SCRIPT", "FLUSH")
        a.release(await a.admit(key))  # NOSCRIPT, an error reply: answered from the local share at once
        assert a.mode == "degraded"
        await eventually(lambda: a.mode == "shared", timeout=5)  # the reconnect loaded the scripts again
        for _ in range(3):
            a.release(await a.admit(key))
        assert a.mode == "shared"
    finally:
        await a.stop()
        await b.stop()


async def test_a_daily_token_count_in_redis_expires(redis: RedisServer) -> None:
    (gate_a, a), (_, b) = await two_states(redis.url)
    try:
        wall = time.time()
        for _ in range(3):  # the expiry goes out with the first count only; the count grows by each
            gate_a.limits.add_tokens("k_expiring", 5, wall)
        name = tokens_key("k_expiring", wall)
        await eventually(lambda: redis.command("GET", name) == b"$2\r\n15\r\n", timeout=2)
        ttl_s = int(redis.command("TTL", name)[1:].split(b"\r\n")[0])
        assert 2 * 86400 - 60 < ttl_s <= 2 * 86400
    finally:
        await a.stop()
        await b.stop()


async def test_a_late_instance_learns_the_trust_and_locks_already_there(redis: RedisServer) -> None:
    (gate_a, a), (gate_b, b) = await two_states(redis.url, max_failures=3, failure_window=60)
    late: list[RedisState] = []
    try:
        error = Unauthorized("invalid API key")
        answers = [await (a if i % 2 else b).failed_guess("198.51.100.7", error) for i in range(4)]
        assert [e.status for e in answers] == [401, 401, 401, 429]  # the fourth wrong key: over the shared 3
        assert gate_a.failures.retry_after("198.51.100.7", gate_a.clock()) > 50
        await eventually(lambda: gate_b.failures.retry_after("198.51.100.7", gate_b.clock()) > 50, timeout=1)
        assert gate_a.failures.retry_after("198.51.100.8", gate_a.clock()) == 0  # nobody else
        gate_a.trust.grant("198.51.100.20", "ann", "x-api-key:sk-****0001", 600, gate_a.clock(), "config:ann")
        await eventually(lambda: gate_b.trust.lookup("198.51.100.20", gate_b.clock()) is not None, timeout=1)
        (gate_c, c), (_, d) = await two_states(redis.url, max_failures=3, failure_window=60)
        late += [c, d]
        grant = gate_c.trust.lookup("198.51.100.20", gate_c.clock())
        assert grant is not None and grant.user == "ann" and 590 < grant.expires_at - gate_c.clock() <= 600
        assert gate_c.failures.retry_after("198.51.100.7", gate_c.clock()) > 50
    finally:
        for state in (a, b, *late):
            await state.stop()


async def test_many_admissions_at_once_share_one_connection_and_keep_their_replies(redis: RedisServer) -> None:
    (_, a), (_, b) = await two_states(redis.url)
    try:
        keys = [Principal("ann", f"k_many_{i}", rpm=7, max_concurrent=100) for i in range(5)]

        async def try_admit(state: RedisState, key: Principal) -> str:
            try:
                lease = await state.admit(key)
            except TooManyRequests as err:
                return f"{key.key_id}: {err.message}"
            state.release(lease)
            return f"{key.key_id}: admitted"

        # 300 admissions of five keys issued in one go from two instances: each key gets exactly its 7.
        writes: list[int] = []

        def counted(write: Callable[[bytes], None]) -> Callable[[bytes], None]:
            def counting(data: bytes) -> None:
                writes.append(len(data))
                write(data)
            return counting

        for state in (a, b):  # count what each instance's pipeline writes (the bytes still go to Redis)
            assert state._pipeline is not None
            writer = state._pipeline._writer
            writer.write = counted(writer.write)  # type: ignore[method-assign, assignment]
        results = await asyncio.gather(*(try_admit(a if i % 2 else b, keys[i % 5]) for i in range(300)))
        # Made in one turn of each instance's loop, the admissions go out in two writes per instance (the first
        # at once, the rest when the turn ends), the releases in a few more.
        assert len(writes) <= 40, writes  # each admission alone: 300
        for key in keys:
            mine = [r for r in results if r.startswith(f"{key.key_id}: ")]
            assert len(mine) == 60 and mine.count(f"{key.key_id}: admitted") == 7
            assert all(r.endswith(("admitted", "rate limit of 7 requests per minute reached for this key"))
                       for r in mine)
        clients = int(redis.command("INFO", "clients").split(b"connected_clients:")[1].split(b"\r\n")[0])
        assert clients <= 2 * 5  # per instance: the pipeline, pub/sub and a few pooled for the heartbeat
        assert a.mode == b.mode == "shared"
    finally:
        await a.stop()
        await b.stop()


async def test_redis_down_at_start_serves_locally_then_shares(redis_binary: str) -> None:
    server = RedisServer(redis_binary)  # its port is free: nothing listens there yet
    try:
        (_, a), (_, b) = await two_states(server.url)
        try:
            assert a.mode == b.mode == "degraded"
            key = Principal("ann", "k_late_redis", rpm=4)
            for _ in range(4):  # live instances unknown (1): the whole limit, locally
                a.release(await a.admit(key))
            server.start()
            await eventually(lambda: a.mode == b.mode == "shared", timeout=5)
            await eventually(lambda: a.live_instances == b.live_instances == 2, timeout=3)
            admitted = 0
            for i in range(10):
                try:
                    (a if i % 2 else b).release(await (a if i % 2 else b).admit(key))
                    admitted += 1
                except TooManyRequests:
                    pass
            assert admitted == 4  # one bucket for both again, full (Redis had none)
        finally:
            await a.stop()
            await b.stop()
    finally:
        server.close()


async def test_an_admission_cancelled_while_redis_answers_leaves_no_lease(own_redis: RedisServer) -> None:
    # The client leaves (its task is cancelled) after the admission script was sent: Redis may still take the
    # lease; nothing would release or renew it, so the key lost a slot for the lease TTL.
    from fastgate.state.redis_state import lease_key
    (_, a), (_, b) = await two_states(own_redis.url, timeout_s=5)
    try:
        key = Principal("ann", "k_cancelled", max_concurrent=1)
        a.release(await a.admit(key))
        own_redis.pause()  # the script is queued in Redis's socket, run once it resumes
        admission = asyncio.get_running_loop().create_task(a.admit(key))
        await asyncio.sleep(0.1)
        admission.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admission
        own_redis.resume()
        # Free again at once (before the fix: only after the lease TTL, 15 s), on both instances, and the
        # pipeline still pairs replies with calls after the dropped one.
        await eventually(lambda: _admits(b, key), timeout=3)
        await eventually(lambda: _admits(a, key), timeout=3)
        assert a.mode == "shared" and b.mode == "shared"
        assert own_redis.command("ZCARD", lease_key(key.key_id)) == b":0\r\n"
        b.release(await b.admit(key))  # the slot is free
    finally:
        own_redis.resume()
        await a.stop()
        await b.stop()



async def test_instances_on_other_databases_of_one_redis_share_nothing(redis: RedisServer) -> None:
    # Redis's pub/sub channels are server-wide: fastgates on databases 1 and 2 of one server (two deployments)
    # heard each other's trust grants and key-guessing locks, which share the channel.
    base = redis.url.rsplit("/", 1)[0]
    pairs = await two_states(f"{base}/1") + await two_states(f"{base}/2")
    (gate_a, _), (gate_a2, _), (gate_b, _), (gate_b2, _) = pairs
    try:
        gate_a.trust.grant("198.51.100.31", "ann", "x-api-key:sk-****0001", 600, gate_a.clock(), "config:ann")
        gate_b.trust.grant("198.51.100.32", "bob", "x-api-key:sk-****0002", 600, gate_b.clock(), "config:bob")
        # Each reaches the other instance on its own database (so anything published has had time to arrive)...
        await eventually(lambda: gate_a2.trust.lookup("198.51.100.31", gate_a2.clock()) is not None, timeout=2)
        await eventually(lambda: gate_b2.trust.lookup("198.51.100.32", gate_b2.clock()) is not None, timeout=2)
        # ...and none on the other database.
        for gate in (gate_b, gate_b2):
            assert gate.trust.lookup("198.51.100.31", gate.clock()) is None
        for gate in (gate_a, gate_a2):
            assert gate.trust.lookup("198.51.100.32", gate.clock()) is None
    finally:
        for _, state in pairs:
            await state.stop()
