"""Ollama's answer is not an HTTP response head fastgate can relay: the client gets a 502 that says what was
wrong, and fastgate's own code path handles it (no exception escapes into the event loop's transport)."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import KEY1
from tests.fake_ollama import FakeOllama
from tests.rawhttp import Client

CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.mark.parametrize("fault", ["malformed-status", "malformed-header"])
async def test_a_malformed_head_is_a_502_naming_the_fault(client: Client, ollama: FakeOllama, fault: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    ollama.faults.append(fault)
    resp = await client.request("POST", "/api/chat", headers={"X-API-Key": KEY1}, json_body=CHAT)
    assert resp.status == 502
    # the parse error's own words, not the "closed the connection" of a transport torn down by an exception
    assert "closed the connection" not in resp.json()["error"], resp.json()
    assert not [r for r in caplog.records if r.name == "asyncio"], [r.getMessage() for r in caplog.records]
    assert (await client.request("GET", "/api/version", headers={"X-API-Key": KEY1})).status == 200
