"""The key store wired to a running fastgate: CLI changes take effect within a second or two, usage lands in
the store, connections survive. In-process and against a fastgate process driven by the real CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastgate.store import KeyStore
from tests.conftest import KEY1, KEYS, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.proc import FastgateProcess, write_config
from tests.rawhttp import Client

pytestmark = pytest.mark.timeout(60)


async def eventually(check, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_store_keys_take_effect_and_usage_is_recorded(make_gateway: MakeGateway, tmp_path: Path) -> None:
    db = str(tmp_path / "keys.db")
    gw = await make_gateway(store={"path": db}, auth={"max_failures": 0})  # polling with a new key must not trip it
    writer = KeyStore(db)  # as the CLI would, from another connection
    record, secret = writer.add("frank", role="user", models=("llama3*",), now=time.time())
    c = await Client.connect(gw.port)

    async def key_works() -> bool:
        return (await c.request("GET", "/api/version", headers={"X-API-Key": secret})).status == 200

    await eventually(key_works)
    resp = await c.request("POST", "/api/chat", headers={"X-API-Key": secret}, json_body={
        "model": "llama3.2:latest", "stream": False, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200
    refused = await c.request("POST", "/api/pull", headers={"X-API-Key": secret}, json_body={"model": "x"})
    assert refused.status == 403
    assert (await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})).status == 200  # config keys too

    async def usage_landed() -> bool:
        return any(s.group == "llama3.2:latest" for s in await asyncio.to_thread(writer.usage, None, "model"))

    await eventually(usage_landed)
    by_key = {s.group: s for s in writer.usage(by="key")}
    assert by_key[record.id].requests >= 2 and by_key[record.id].completion_tokens == resp.json()["eval_count"]
    assert writer.get(record.id).last_used_at is not None

    writer.revoke(record.id, time.time())

    async def key_refused() -> bool:
        return (await c.request("GET", "/api/version", headers={"X-API-Key": secret})).status == 401

    await eventually(key_refused)
    writer.close()
    await c.close()


def cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastgate", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=30)


async def test_cli_against_a_running_proxy(tmp_path: Path, ollama: FakeOllama) -> None:
    config = write_config(tmp_path / "fastgate.toml", ollama.url, keys=KEYS, extra='[store]\npath = "keys.db"\n\n[auth]\nmax_failures = 0\n')
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        added = await asyncio.to_thread(cli, "keys", "add", "gina", "--role", "admin", "--tokens-per-day", "1000",
                                        config=config)
        assert added.returncode == 0, added.stderr
        secret = next(line.split()[-1] for line in added.stdout.splitlines() if line.startswith("API key:"))
        key_id = next(word for word in added.stdout.split() if word.startswith("k_"))
        c = await Client.connect(proc.port)  # one kept-alive connection across every change

        async def status() -> int:
            return (await c.request("GET", "/api/version", headers={"X-API-Key": secret})).status

        async def works() -> bool:
            return await status() == 200

        await eventually(works)
        resp = await c.request("POST", "/api/generate", headers={"X-API-Key": secret}, json_body={
            "model": "qwen2.5:0.5b", "prompt": "hello", "stream": False})
        assert resp.status == 200

        async def usage_listed() -> bool:
            out = await asyncio.to_thread(cli, "usage", "--by", "user", "--json", config=config)
            return out.returncode == 0 and any(row.get("user") == "gina" for row in json.loads(out.stdout or "{}").get("rows", []))

        await eventually(usage_listed, timeout=5)
        listed = await asyncio.to_thread(cli, "keys", "list", "--json", config=config)
        assert secret not in listed.stdout and key_id in listed.stdout
        rotated = await asyncio.to_thread(cli, "keys", "rotate", key_id, config=config)
        assert rotated.returncode == 0
        new_secret = next(line.split()[-1] for line in rotated.stdout.splitlines() if line.startswith("API key:"))

        async def old_refused() -> bool:
            return await status() == 401

        await eventually(old_refused)
        assert (await c.request("GET", "/api/version", headers={"X-API-Key": new_secret})).status == 200
        revoked = await asyncio.to_thread(cli, "keys", "revoke", key_id, config=config)
        assert revoked.returncode == 0

        async def new_refused() -> bool:
            return (await c.request("GET", "/api/version", headers={"X-API-Key": new_secret})).status == 401

        await eventually(new_refused)
        await c.close()
    finally:
        assert await proc.stop() == 0
    assert secret.encode() not in proc.log and new_secret.encode() not in proc.log
