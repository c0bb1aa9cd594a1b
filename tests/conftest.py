"""Shared fixtures: a fake Ollama on a free loopback port and fastgate instances in front of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from fastgate.config import build_config
from fastgate.logs import LOGGER_NAME
from fastgate.server import RunningServer, start
from tests.fake_ollama import FakeOllama
from tests.rawhttp import Client

KEY1 = "api-20250312000101"
KEY2 = "api-20250312000202"
KEYS = {KEY1: "user1", KEY2: "user2"}
MASKED1 = "api-****0101"

MakeGateway = Callable[..., Awaitable[RunningServer]]
# In-process proxy tests run on both loops fastgate supports: uvloop (what `fastgate serve` uses) and plain
# asyncio (the fallback). Tests that start fastgate as a process already exercise uvloop there.
BOTH_LOOPS_MODULES = {"test_proxy", "test_secrets", "test_tls", "test_clients", "test_leaks",
                      "test_rules"}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in BOTH_LOOPS_MODULES:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factories["uvloop"] = uvloop.new_event_loop
    return factories


def gateway_config(upstream_url: str, **sections: dict[str, Any]):  # type: ignore[no-untyped-def]
    # gateway.example.com is the Host the raw test client sends: the gateway's configured name, so IP trust
    # and Basic credentials pass its DNS-rebinding guard.
    data: dict[str, Any] = {"server": {"listen": "127.0.0.1:0", "hostnames": ["gateway.example.com"]},
                            "upstream": {"url": upstream_url}, "keys": dict(KEYS)}
    for section, values in sections.items():
        if section == "keys":
            data["keys"] = values
        else:
            data.setdefault(section, {}).update(values)
    return build_config(data)


@pytest.fixture
async def ollama() -> AsyncIterator[FakeOllama]:
    fake = FakeOllama()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def make_gateway(ollama: FakeOllama) -> AsyncIterator[MakeGateway]:
    running: list[RunningServer] = []

    async def make(upstream_url: str | None = None, **sections: dict[str, Any]) -> RunningServer:
        server = await start(gateway_config(upstream_url or ollama.url, **sections))
        running.append(server)
        return server

    yield make
    for server in running:
        await server.stop(grace=0.5)


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> RunningServer:
    return await make_gateway()


@pytest.fixture
async def client(gateway: RunningServer) -> AsyncIterator[Client]:
    c = await Client.connect(gateway.port)
    yield c
    await c.close()


@pytest.fixture
def gate_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    return caplog
