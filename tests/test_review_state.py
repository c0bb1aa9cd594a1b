"""Review of [state] (Redis) and [store] url (PostgreSQL): problems in files other helpers own, recorded as
tests that failed on the code they were written against (each now passes)."""

from __future__ import annotations

import asyncio
import json

import pytest

from fastgate.config import build_config
from fastgate.errors import ConfigError
from fastgate.gate import Gate
from fastgate.state import SHARED
from fastgate.state.redis_state import EVENTS_CHANNEL, RedisState, open_state, trust_key
from fastgate.trust import FailureLimiter, failure_bucket
from tests.redis_server import RedisServer, require_redis_server

pytestmark = pytest.mark.timeout(60)

SECRET = "hunter2"


@pytest.mark.parametrize("url", [
    f"postgresql://fastgate:{SECRET}/x@db.internal/fastgate",  # bad port: 'hunter2'
    f"postgresql://fastgate:{SECRET}?x@db.internal/fastgate",
    f"postgresql://fastgate:{SECRET}#x@db.internal/fastgate",  # a fragment
    f"postgresql://db.internal/fastgate?password={SECRET}#x",
])
def test_a_store_url_error_never_shows_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"store": {"url": url}})
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("url", [f"redis://:{SECRET}/x@h/0", f"redis://:{SECRET}?x@h/0",
                                 f"redis://:{SECRET}#x@h/0"])
def test_a_state_url_error_never_shows_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"state": {"url": url}})
    assert SECRET not in str(info.value)


def test_locks_from_other_instances_respect_the_table_bound() -> None:
    limiter = FailureLimiter(max_failures=3, window_s=60.0, max_entries=100)
    for i in range(1000):
        limiter.lock(failure_bucket(f"2001:db8:{i:x}::1"), 50.0, 0.0)
    assert len(limiter._windows) <= limiter.max_entries
    assert limiter.retry_after("2001:db8:3e7::1", 1.0) > 0  # the last one locked is still refused


@pytest.fixture(scope="module")
def redis() -> object:
    server = RedisServer(require_redis_server())
    server.start()
    yield server
    server.close()


def state_config(url: str) -> object:
    config = build_config({"state": {"url": url, "timeout": 1.0}})
    assert config.state is not None
    return config


async def test_an_unreadable_trust_record_does_not_keep_instances_from_starting(redis: RedisServer) -> None:
    redis.command("FLUSHALL")
    redis.command("SET", trust_key("198.51.100.30"), "not json", "PX", "60000")
    config = state_config(redis.url)
    gate = Gate(config)  # type: ignore[arg-type]
    state = RedisState(config.state, clock=gate.clock, wall_clock=gate.wall_clock)  # type: ignore[attr-defined]
    state.attach(gate)
    try:
        await state.start()  # as open_state does
        assert state.mode == SHARED
    finally:
        await state.stop()  # whatever start() left open
        redis.command("FLUSHALL")


async def test_a_malformed_event_does_not_stop_the_listener(redis: RedisServer) -> None:
    redis.command("FLUSHALL")
    config = state_config(redis.url)
    gate_a, gate_b = Gate(config), Gate(config)  # type: ignore[arg-type]
    a = await open_state(config.state, gate_a)  # type: ignore[attr-defined]
    b = await open_state(config.state, gate_b)  # type: ignore[attr-defined]
    try:
        redis.command("PUBLISH", EVENTS_CHANNEL, "[1]")
        redis.command("PUBLISH", EVENTS_CHANNEL, json.dumps({"t": "lock", "bucket": "198.51.100.1", "from": "x"})
                      .replace("}", ', "ms": 1e999}'))
        gate_a.trust.grant("198.51.100.21", "ann", "x-api-key:sk-****0001", 600, gate_a.clock(), "config:ann")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while gate_b.trust.lookup("198.51.100.21", gate_b.clock()) is None:
            assert loop.time() < deadline, "b never applied a's grant: its listener is gone"
            await asyncio.sleep(0.02)
    finally:
        await a.stop()
        await b.stop()
        redis.command("FLUSHALL")


@pytest.mark.parametrize("url", [
    f"postgresql://fastgate:{SECRET}/x@db.internal/fastgate",
    f"postgresql://fastgate:{SECRET}?x@db.internal/fastgate",
    f"postgresql://fastgate:{SECRET}#x@db.internal/fastgate",
    f"postgresql://db.internal/fastgate?password={SECRET}#x",
    f"postgresql://fastgate:{SECRET}@db.internal:5433/fastgate?sslmode=require",
])
def test_the_start_line_form_of_a_store_url_never_shows_the_password(url: str) -> None:
    from fastgate.state.stores import redacted_url
    shown = redacted_url(url)
    assert SECRET not in shown
    assert shown.startswith("postgresql://") and "db.internal" in shown
