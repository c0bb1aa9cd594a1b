"""Fake Ollamas and gateways in front of them, shared by the several-backends tests (test_backends,
test_backends_fanout): each test module wraps these in its own fixtures."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastgate.access import Principal
from fastgate.config import build_config
from fastgate.server import RunningServer, start
from tests.conftest import KEYS
from tests.fake_ollama import FakeOllama

USER_KEY = "api-20250312009999"  # a managed key with the user role (config keys are admins)
FAST_ROUTING = {"health_interval": 0.05, "health_timeout": 0.5, "inventory_interval": 0.5,
                "loaded_interval": 0.05, "queue_timeout": 5.0}

Fakes = Callable[..., Awaitable[FakeOllama]]
Start = Callable[..., Awaitable[RunningServer]]


@asynccontextmanager
async def fake_ollamas() -> AsyncIterator[Fakes]:
    """`make(models)` starts a fake Ollama that has these models; all of them stop on the way out."""
    started: list[FakeOllama] = []

    async def make(models: list[str]) -> FakeOllama:
        fake = FakeOllama(models=models)
        await fake.start()
        started.append(fake)
        return fake

    try:
        yield make
    finally:
        for fake in started:
            await fake.stop()


@asynccontextmanager
async def gateways(managed: Mapping[str, Principal]) -> AsyncIterator[Start]:
    """`make(backends, upstream=None, **routing)` starts a gateway in front of these [[backends]] (routing
    polls fast unless told otherwise) with the config's KEYS as admins and `managed` as store keys; all of them
    stop on the way out."""
    running: list[RunningServer] = []

    async def make(backends: list[dict[str, Any]], upstream: dict[str, Any] | None = None,
                   **routing: Any) -> RunningServer:
        config = build_config({"server": {"listen": "127.0.0.1:0", "hostnames": ["gateway.example.com"]},
                               "backends": backends, "routing": {**FAST_ROUTING, **routing},
                               "upstream": upstream or {}, "keys": dict(KEYS)})
        server = await start(config)
        running.append(server)
        server.proxy.gate.set_managed_keys({hashlib.sha256(key.encode()).digest(): principal
                                            for key, principal in managed.items()})
        return server

    try:
        yield make
    finally:
        for server in running:
            await server.stop(grace=0.5)
