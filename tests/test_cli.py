"""The command line and the process: install interface, config errors, serving, graceful shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastgate import __version__
from fastgate.cli import main
from fastgate.config import Config, load_config
from tests.conftest import KEY1, KEYS
from tests.fake_ollama import FakeOllama
from tests.proc import FastgateProcess, free_port, write_config
from tests.rawhttp import Client, build_request

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv", [["fastgate", "--version"], [sys.executable, "-m", "fastgate", "--version"]])
def test_version(argv: list[str]) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"fastgate {__version__}"


def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(ROOT / "config.toml.example")]) == 0
    assert "listen 127.0.0.1:8000" in capsys.readouterr().out


def test_example_config_documents_every_key_with_its_default() -> None:
    example = load_config(str(ROOT / "config.toml.example"))
    defaults = Config()
    for section in ("server", "upstream", "auth", "log"):
        documented = getattr(example, section)
        default = getattr(defaults, section)
        for f in dataclasses.fields(default):
            assert getattr(documented, f.name) == getattr(default, f.name), f"{section}.{f.name}"
    text = (ROOT / "config.toml.example").read_text()
    for section in ("server", "upstream", "auth", "log"):
        for f in dataclasses.fields(getattr(defaults, section)):
            assert f"\n{f.name} " in text or f"\n# {f.name} " in text, f"{section}.{f.name} is not documented"


@pytest.mark.parametrize("content,message", [
    ("[server]\nlistne = \"127.0.0.1:1\"\n", "server.listne: unknown key"),
    ("[auth]\nsession_ttl = \"long\"\n", "auth.session_ttl: expected an integer"),
    ("[auth]\nsession_ttl = -5\n", "auth.session_ttl: expected an integer >= 0"),
    ("[upstream]\nurl = \"https://x\"\n", "upstream.url:"),
    ("[nonsense]\n", "nonsense: unknown section"),
    ("[server]\ntls_cert = \"a.pem\"\n", "server.tls_key:"),
    ("this is not toml", "invalid TOML"),
])
def test_config_errors_name_the_key_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               content: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    assert main(["serve", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_missing_config_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_defaults_and_local_fastgate_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "defaults" in out and "listen 127.0.0.1:8000" in out and "upstream http://127.0.0.1:11434" in out
    (tmp_path / "fastgate.toml").write_text('[server]\nlisten = "127.0.0.1:9999"\n')
    assert main(["check-config"]) == 0
    assert "listen 127.0.0.1:9999" in capsys.readouterr().out
    assert main(["check-config", "--listen", "127.0.0.1:7777", "--upstream", "http://127.0.0.1:1234"]) == 0
    out = capsys.readouterr().out
    assert "listen 127.0.0.1:7777" in out and "upstream http://127.0.0.1:1234" in out


async def test_serve_runs_the_proxy_in_the_foreground(tmp_path: Path, ollama: FakeOllama) -> None:
    config = write_config(tmp_path / "fastgate.toml", "http://127.0.0.1:1", keys=KEYS)
    port = free_port()
    proc = await FastgateProcess.start("serve", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                                       "--upstream", ollama.url)
    try:
        assert proc.port == port  # the flags beat the file
        c = await Client.connect(port)
        assert (await c.request("GET", "/")).json()["version"] == __version__
        resp = await c.request("POST", "/api/chat", headers={"X-API-Key": KEY1}, json_body={
            "model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status == 200 and resp.lines[-1]["done"] is True
        assert (await c.request("GET", "/api/tags")).status == 401
        await c.close()
    finally:
        assert await proc.stop() == 0
    log = bytes(proc.log).decode()
    assert "Processing request: POST api/chat" in log
    assert "user1 (x-api-key:api-****0101)" in log
    assert KEY1 not in log


async def test_sigterm_lets_streams_finish_and_refuses_new_connections(tmp_path: Path, ollama: FakeOllama) -> None:
    config = write_config(tmp_path / "fastgate.toml", ollama.url, keys=KEYS)
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        async with await Client.connect(proc.port) as c, await Client.connect(proc.port) as idle:
            assert (await idle.request("GET", "/")).status == 200
            c.send(build_request("POST", "/api/generate", headers={"X-API-Key": KEY1}, body=json.dumps(
                {"model": "llama3.2:latest", "prompt": "hi", "options": {"num_predict": 10, "fake_gap_ms": 60}}).encode()))
            head = await c.response_head()  # the stream has started
            assert head.status == 200
            proc.signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            with pytest.raises(OSError):
                await Client.connect(proc.port)
            assert await idle.closed()  # idle keep-alive connections are closed at once
            rest = await c.body(head)  # the stream in flight finishes
            assert rest.complete and rest.lines[-1]["done"] is True
            assert await proc.wait() == 0
    finally:
        await proc.stop()


async def test_sigterm_grace_period_cuts_endless_streams(tmp_path: Path, ollama: FakeOllama) -> None:
    config = write_config(tmp_path / "fastgate.toml", ollama.url, keys=KEYS)
    config.write_text(config.read_text().replace("[upstream]", "shutdown_grace = 0.5\n\n[upstream]"))
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        async with await Client.connect(proc.port) as c:
            c.send(build_request("POST", "/api/generate", headers={"X-API-Key": KEY1}, body=json.dumps(
                {"model": "llama3.2:latest", "prompt": "hi", "options": {"num_predict": 10000, "fake_gap_ms": 20}}).encode()))
            await c.reader.readuntil(b"\n\r\n")
            proc.signal(signal.SIGTERM)
            assert await proc.wait(timeout=10) == 0
            assert await c.closed()
    finally:
        await proc.stop()
    disconnect = await ollama.wait_for_disconnect(timeout=2)
    assert disconnect.items_sent < 10000


async def test_sighup_reloads_keys_and_keeps_old_config_when_broken(tmp_path: Path, ollama: FakeOllama) -> None:
    config = write_config(tmp_path / "fastgate.toml", ollama.url, keys={KEY1: "user1"})
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        c = await Client.connect(proc.port)  # a kept-alive connection that must survive reloads
        assert (await c.request("GET", "/api/version", headers={"X-API-Key": "api-carols-new-key-1"})).status == 401
        text = config.read_text()
        config.write_text(text + '"api-carols-new-key-1" = "carol"\n')
        proc.signal(signal.SIGHUP)
        for _ in range(50):
            if b"Reloaded" in proc.log:
                break
            await asyncio.sleep(0.05)
        assert (await c.request("GET", "/api/version", headers={"X-API-Key": "api-carols-new-key-1"})).status == 200
        # the log level is reloaded too: at WARNING the per-request lines stop
        config.write_text(text + '"api-carols-new-key-1" = "carol"\n\n[log]\nlevel = "WARNING"\n')
        proc.signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        lines_before = proc.log.count(b"Processing request")
        assert (await c.request("GET", "/api/version", headers={"X-API-Key": "api-carols-new-key-1"})).status == 200
        await asyncio.sleep(0.2)
        assert proc.log.count(b"Processing request") == lines_before
        config.write_text(text.replace("[upstream]", "[upstream]\nbogus = 1"))
        proc.signal(signal.SIGHUP)
        for _ in range(50):
            if b"Reload failed" in proc.log:
                break
            await asyncio.sleep(0.05)
        assert b"upstream.bogus: unknown key" in proc.log
        assert (await c.request("GET", "/api/version", headers={"X-API-Key": "api-carols-new-key-1"})).status == 200
        await c.close()
    finally:
        assert await proc.stop() == 0
