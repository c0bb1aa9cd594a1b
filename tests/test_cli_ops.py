"""Operator commands of issue 12: help and --config placement, keys add/rotate --json, keys import, usage
prune and retention, public example keys, `fastgate init`, the start line, the pid file and `fastgate reload`.
Process-level where the process is what matters (start, refuse, signal), in-process elsewhere."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from fastgate import admin
from fastgate.cli import main
from fastgate.config import build_config, load_config, tomllib  # tomllib: tomli on Python 3.10
from fastgate.errors import ConfigError
from fastgate.gate import Gate
from fastgate.managed import ManagedKeys
from fastgate.proxy import Proxy
from fastgate.startup import (
    EXAMPLE_KEYS, OllamaStatus, example_keys_in, in_effect, is_loopback, refuse_example_keys,
)
from fastgate.store import KeyStore, UsageRow, secret_digest
from tests.conftest import KEY1, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.proc import FastgateProcess, free_port, write_config
from tests.rawhttp import Client

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent
DAY_S = 86400.0
SECRET_LINE = re.compile(r"^API key: (fg_\S+)$", re.MULTILINE)
CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]}
COMMANDS = ("serve", "check-config", "keys", "usage", "init", "reload")
FRESH_KEY = "fg_a-fresh-key-nobody-published-0001"
DIGEST_ONLY_SECRET = "fg_a-key-written-only-as-digest-0002"


def fastgate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m fastgate ...` in a separate process (what `fastgate` runs), output captured."""
    return subprocess.run([sys.executable, "-m", "fastgate", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=30)


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll `check` until it holds (never a fixed sleep): a condition on the process, not on time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def config_with_store(tmp_path: Path, keys: dict[str, str], extra: str = "") -> Path:
    return write_config(tmp_path / "fastgate.toml", "http://127.0.0.1:1", keys=keys,
                        extra=f'[store]\npath = "keys.db"\n{extra}')


# ---------------------------------------------------------------------------------------------------------
# Help and --config


def test_help_lists_every_command() -> None:
    exe = shutil.which("fastgate")
    argv = [exe, "--help"] if exe else [sys.executable, "-m", "fastgate", "--help"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\b", out, re.MULTILINE), f"{command} missing from --help:\n{out}"
    assert "--config" in out


@pytest.mark.parametrize("argv", [[c] for c in COMMANDS] + [
    ["keys", "add"], ["keys", "list"], ["keys", "rotate"], ["keys", "revoke"], ["keys", "import"],
    ["usage", "prune"]])
def test_every_command_help_shows_config(argv: list[str], tmp_path: Path) -> None:
    (tmp_path / "fastgate.toml").write_text("this is not toml")  # help must not need a readable config
    result = fastgate(*argv, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--config PATH" in result.stdout


def test_config_before_or_after_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_with_store(tmp_path, {})
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # no ./fastgate.toml to fall back on
    assert main(["keys", "add", "alice", "--config", str(config)]) == 0
    capsys.readouterr()
    outputs = []
    for argv in (["--config", str(config), "keys", "list"], ["keys", "list", "--config", str(config)],
                 [f"--config={config}", "keys", "list"], ["keys", f"--config={config}", "list"]):
        assert main(argv) == 0, argv
        outputs.append(capsys.readouterr().out)
    assert "alice" in outputs[0] and all(o == outputs[0] for o in outputs)
    for argv in (["--config", str(config), "usage"], ["--config", str(config), "check-config"]):
        assert main(argv) == 0, argv
        assert "no key store" not in capsys.readouterr().err
    # the one after the command wins
    assert main(["--config", str(tmp_path / "nope.toml"), "keys", "list", "--config", str(config)]) == 0


# ---------------------------------------------------------------------------------------------------------
# keys add / rotate --json


def test_keys_add_and_rotate_json(tmp_path: Path) -> None:
    config = config_with_store(tmp_path, {})
    added = fastgate("keys", "add", "bob", "--role", "admin", "--rpm", "5", "--json", "--config", str(config))
    assert added.returncode == 0, added.stderr
    obj = json.loads(added.stdout)  # the whole of stdout is one JSON object
    assert list(obj)[:4] == ["id", "user", "role", "key"]
    assert (obj["user"], obj["role"], obj["rpm"]) == ("bob", "admin", 5) and obj["key"].startswith("fg_")
    with KeyStore(str(tmp_path / "keys.db")) as store:
        assert store.get(obj["id"]).digest == secret_digest(obj["key"])
    rotated = fastgate("--config", str(config), "keys", "rotate", obj["id"], "--json")
    assert rotated.returncode == 0, rotated.stderr
    new = json.loads(rotated.stdout)
    assert (new["id"], new["user"], new["role"]) == (obj["id"], "bob", "admin") and new["key"] != obj["key"]
    with KeyStore(str(tmp_path / "keys.db")) as store:
        assert store.get(obj["id"]).digest == secret_digest(new["key"])


# ---------------------------------------------------------------------------------------------------------
# keys import


def test_keys_import_copies_digests_and_users_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    digest_entry = f"sha256:{secret_digest(DIGEST_ONLY_SECRET).upper()}"  # upper-case hex is a digest too
    config = config_with_store(tmp_path, {FRESH_KEY: "alice", digest_entry: "bob"})
    assert main(["keys", "import", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert FRESH_KEY not in out and "Imported 2 of 2 keys" in out
    assert "remove the [keys] table" in out and "fastgate reload" in out
    with KeyStore(str(tmp_path / "keys.db")) as store:
        records = {r.user: r for r in store.list()}
        active = store.active_by_digest(time.time())
    assert set(records) == {"alice", "bob"}
    assert records["alice"].digest == secret_digest(FRESH_KEY) and records["alice"].role == "admin"
    assert records["bob"].digest == secret_digest(DIGEST_ONLY_SECRET)  # imported by its digest
    # only a short prefix of a clear key is kept for lists; a digest has none
    assert FRESH_KEY.startswith(records["alice"].prefix) and len(records["alice"].prefix) <= len(FRESH_KEY) // 4
    assert records["bob"].prefix == ""
    assert hashlib.sha256(DIGEST_ONLY_SECRET.encode()).digest() in active
    db = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))
    assert FRESH_KEY.encode() not in db  # digests only

    # Idempotent: a second run adds nothing; a revoked key stays revoked.
    with KeyStore(str(tmp_path / "keys.db")) as store:
        store.revoke(records["bob"].id, time.time())
    assert main(["keys", "import", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "Imported 0 of 2 keys" in out and "REVOKED" in out
    with KeyStore(str(tmp_path / "keys.db")) as store:
        assert len(store.list(include_revoked=True)) == 2
        assert store.get(records["bob"].id).revoked


def test_keys_import_role_and_nothing_to_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_with_store(tmp_path, {})
    assert main(["keys", "import", "--config", str(config)]) == 0
    assert "nothing to import" in capsys.readouterr().out
    config = config_with_store(tmp_path, {FRESH_KEY: "carol"})
    assert main(["keys", "import", "--role", "user", "--config", str(config)]) == 0
    with KeyStore(str(tmp_path / "keys.db")) as store:
        assert [(r.user, r.role) for r in store.list()] == [("carol", "user")]


async def test_imported_keys_keep_working_once_removed_from_the_file(tmp_path: Path, ollama: FakeOllama) -> None:
    config = write_config(tmp_path / "fastgate.toml", ollama.url, keys={FRESH_KEY: "alice"},
                          extra='[store]\npath = "keys.db"\n')
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        imported = fastgate("keys", "import", "--config", str(config))
        assert imported.returncode == 0, imported.stderr
        text = config.read_text()
        config.write_text(text[:text.index("[keys]")])  # the next step the command names
        proc.signal(signal.SIGHUP)
        await eventually(lambda: b"Reloaded" in proc.log)
        async with await Client.connect(proc.port) as c:
            resp = await c.request("POST", "/api/chat", headers={"X-API-Key": FRESH_KEY}, json_body=CHAT)
            assert resp.status == 200 and resp.lines[-1]["done"] is True
            assert (await c.request("GET", "/api/tags", headers={"X-API-Key": "fg_not-a-key-at-all-000"})).status == 401
    finally:
        assert await proc.stop() == 0


# ---------------------------------------------------------------------------------------------------------
# usage prune and retention


def _rows(now: float, ages_days: list[float]) -> list[UsageRow]:
    return [UsageRow(now - age * DAY_S, "alice", "k_00000001", "llama3.2", "/api/chat", 200, 1, 2, 3.0)
            for age in ages_days]


def test_usage_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_with_store(tmp_path, {})
    now = time.time()
    with KeyStore(str(tmp_path / "keys.db")) as store:
        store.record_usage(_rows(now, [40, 35, 33, 32, 31, 1, 0.1]))
    monkeypatch.setattr(admin, "PRUNE_BATCH_ROWS", 2)  # several batches, and one that comes back short
    assert main(["usage", "prune", "--before", "30d", "--config", str(config)]) == 0
    assert re.match(r"Deleted 5 usage rows recorded before \d{4}-\d\d-\d\d \d\d:\d\d UTC\.\n$",
                    capsys.readouterr().out)
    with KeyStore(str(tmp_path / "keys.db")) as store:
        assert sum(s.requests for s in store.usage()) == 2
    assert main(["usage", "prune", "--before", "2000-01-01", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "Deleted 0 usage rows recorded before 2000-01-01 00:00 UTC.\n"
    assert main(["usage", "prune", "--config", str(config)]) == 2
    assert "--before" in capsys.readouterr().err


async def test_retention_deletes_old_usage_in_the_running_gateway(make_gateway: MakeGateway, tmp_path: Path) -> None:
    db = str(tmp_path / "keys.db")
    now = time.time()
    with KeyStore(db) as store:
        store.record_usage(_rows(now, [10, 8, 2.5, 1, 0.5]))
    await make_gateway(store={"path": db, "usage_retention_days": 2})
    reader = KeyStore(db)
    try:
        async def pruned() -> bool:
            return sum(s.requests for s in await asyncio.to_thread(reader.usage)) == 2

        await eventually(pruned)
    finally:
        reader.close()


async def test_retention_zero_keeps_everything(tmp_path: Path) -> None:
    db = str(tmp_path / "keys.db")
    now = time.time()
    store = KeyStore(db)
    store.record_usage(_rows(now, [4000, 50, 1]))
    managed = ManagedKeys(store, Gate(build_config({})), retention_days=0)
    await managed._prune_if_due()
    assert sum(s.requests for s in store.usage()) == 3
    managed.retention_days = 100  # what a reload does
    await managed._prune_if_due()
    assert sum(s.requests for s in store.usage()) == 2
    store.close()


# ---------------------------------------------------------------------------------------------------------
# Public example keys


def test_example_keys_are_the_examples_keys() -> None:
    with open(ROOT / "config.toml.example", "rb") as f:
        assert set(tomllib.load(f)["keys"]) == set(EXAMPLE_KEYS)


def test_example_keys_found_in_clear_and_as_digests(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[keys]\n"{FRESH_KEY}" = "me"\n\n"sha256:{secret_digest(EXAMPLE_KEYS[1])}" = "x"\n'
                    f'{EXAMPLE_KEYS[0]} = "y"\n')  # a bare TOML key too
    found = example_keys_in(load_config(str(path)))
    assert sorted((f.masked, f.where) for f in found) == [
        ("api-****0101", f"{path}:5"), ("api-****0202", f"{path}:4")]
    assert example_keys_in(build_config({"keys": {FRESH_KEY: "me"}})) == []


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True),
                                             ("localhost", True), ("0.0.0.0", False), ("::", False),
                                             ("192.168.1.5", False), ("gpu.example.com", False)])
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    config = build_config({"server": {"listen": f"[{host}]:8000" if ":" in host else f"{host}:8000"},
                           "keys": {KEY1: "user1"}})
    if loopback:
        refuse_example_keys(config, allowed=False)
    else:
        with pytest.raises(ConfigError, match="--allow-example-keys"):
            refuse_example_keys(config, allowed=False)
    refuse_example_keys(config, allowed=True)


async def test_example_key_warning_and_refusal(tmp_path: Path, ollama: FakeOllama) -> None:
    config = write_config(tmp_path / "fastgate.toml", ollama.url, keys={FRESH_KEY: "me", KEY1: "user1"})
    line = config.read_text().splitlines().index(f'"{KEY1}" = "user1"') + 1
    proc = await FastgateProcess.start("serve", "--config", str(config))  # loopback: a warning
    try:
        assert f"{config}:{line}: [keys] holds api-****0101, a key from config.toml.example".encode() in proc.log
    finally:
        assert await proc.stop() == 0
    port = free_port()
    refused = fastgate("serve", "--config", str(config), "--listen", f"0.0.0.0:{port}")
    assert refused.returncode == 2
    assert f"{config}:{line}" in refused.stderr and "--allow-example-keys" in refused.stderr
    assert KEY1 not in refused.stderr and "listening" not in refused.stderr
    checked = fastgate("check-config", "--config", str(config), "--listen", f"0.0.0.0:{port}")
    assert checked.returncode == 2 and "--allow-example-keys" in checked.stderr
    proc = await FastgateProcess.start("serve", "--config", str(config), "--listen", f"0.0.0.0:{port}",
                                       "--allow-example-keys")
    try:
        assert proc.port == port and b"[keys] holds api-****0101" in proc.log
    finally:
        assert await proc.stop() == 0


# ---------------------------------------------------------------------------------------------------------
# fastgate init


async def test_init_to_a_streamed_chat(tmp_path: Path, ollama: FakeOllama) -> None:
    config = tmp_path / "new.toml"
    port = free_port()
    init = fastgate("init", "--config", str(config), "--listen", f"127.0.0.1:{port}", "--upstream", ollama.url)
    assert init.returncode == 0, init.stderr
    secret = SECRET_LINE.search(init.stdout)
    assert secret and init.stdout.count(secret[1]) == 1  # printed once
    assert f"curl -N http://127.0.0.1:{port}/api/chat" in init.stdout
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert secret[1] not in config.read_text() and secret_digest(secret[1]) in config.read_text()
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        async with await Client.connect(proc.port) as c:
            resp = await c.request("POST", "/api/chat", headers={"X-API-Key": secret[1]}, json_body=CHAT)
            assert resp.status == 200 and len(resp.chunks) > 1  # streamed, chunk by chunk
            assert resp.lines[-1]["done"] is True
    finally:
        assert await proc.stop() == 0
    before = config.read_bytes()
    again = fastgate("init", "--config", str(config))
    assert again.returncode == 1 and "already exists" in again.stderr and again.stdout == ""
    assert config.read_bytes() == before


def test_init_defaults_to_fastgate_toml(tmp_path: Path) -> None:
    result = fastgate("init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = load_config(str(tmp_path / "fastgate.toml"))
    assert str(config.server.listen) == "127.0.0.1:8000" and str(config.upstream.url) == "http://127.0.0.1:11434"
    assert list(config.keys.values()) == ["admin"]
    assert config.server.pid_file == str(tmp_path / "fastgate.pid")
    assert "Start:  fastgate serve\n" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# What is in effect


async def test_start_line_says_what_is_in_effect(tmp_path: Path, ollama: FakeOllama) -> None:
    metrics_port = free_port()
    config = write_config(tmp_path / "fastgate.toml", ollama.url, keys={FRESH_KEY: "me"}, extra=(
        '[store]\npath = "keys.db"\n\n[metrics]\nlisten = "127.0.0.1:%d"\n\n'
        '[cors]\nallow_origins = ["https://chat.example.com"]\n' % metrics_port))
    with KeyStore(str(tmp_path / "keys.db")) as store:
        store.add("alice", now=time.time())
        store.add("bob", now=time.time())
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        line = next(line for line in bytes(proc.log).decode().splitlines() if "listening on" in line)
    finally:
        assert await proc.stop() == 0
    for part in (f"listening on http://127.0.0.1:{proc.port}", f"forwarding to {ollama.url}", f"config {config}",
                 f"pid {proc.pid}", "workers 1", f"keys: 1 from the file, 2 from the store {tmp_path / 'keys.db'}",
                 "TLS off", f"listener 127.0.0.1:{metrics_port}", "CORS origins https://chat.example.com",
                 "Ollama answered (version "):
        assert part in line, f"{part!r} not in {line!r}"


async def test_start_line_when_ollama_does_not_answer(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "fastgate.toml", dead, keys={FRESH_KEY: "me"})
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        line = next(line for line in bytes(proc.log).decode().splitlines() if "listening on" in line)
    finally:
        assert await proc.stop() == 0
    assert "Ollama did not answer (connection refused)" in line and "no store" in line and "CORS off" in line


def test_check_config_says_what_is_in_effect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_with_store(tmp_path, {FRESH_KEY: "me"}, extra='\n[metrics]\nenabled = false\n')
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "keys: 1 from the file, none yet (no file) from the store" in out and not (tmp_path / "keys.db").exists()
    with KeyStore(str(tmp_path / "keys.db")) as store:
        store.add("alice", now=time.time())
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    for part in (f"config {config}", "workers 1", "keys: 1 from the file, 1 from the store", "TLS off",
                 "metrics off", "CORS off", "Ollama did not answer"):
        assert part in out, part


def test_in_effect_tls_and_metrics() -> None:
    config = build_config({"server": {"tls_cert": "c.pem", "tls_key": "k.pem"}}, base_dir="/etc/fastgate")
    text = in_effect(config, ollama=OllamaStatus(True, "version 1.2.3"), store_keys=None, pid=42)
    assert "TLS on (/etc/fastgate/c.pem)" in text and "pid 42" in text and "config none (defaults)" in text
    assert "metrics /metrics for admin keys, no listener" in text and "Ollama answered (version 1.2.3)" in text


# ---------------------------------------------------------------------------------------------------------
# Pid file and fastgate reload


def test_pid_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[server]\npid_file = "run/fg.pid"\n')
    assert load_config(str(tmp_path / "c.toml")).server.pid_file == str(tmp_path / "run" / "fg.pid")
    (tmp_path / "c.toml").write_text('[server]\npid_file = "/run/fg.pid"\n')
    assert load_config(str(tmp_path / "c.toml")).server.pid_file == "/run/fg.pid"


async def test_reload_through_the_pid_file(tmp_path: Path, ollama: FakeOllama) -> None:
    config = write_config(tmp_path / "fastgate.toml", ollama.url, keys={FRESH_KEY: "me"})
    config.write_text(config.read_text().replace("[upstream]", 'pid_file = "fg.pid"\n\n[upstream]'))
    pid_path = tmp_path / "fg.pid"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = await FastgateProcess.start("serve", "--config", str(config), cwd=str(elsewhere))
    try:
        assert pid_path.read_text() == f"{proc.pid}\n"  # written by the time it says it listens
        new_key = "fg_carols-new-key-000000001"
        async with await Client.connect(proc.port) as c:
            assert (await c.request("GET", "/api/version", headers={"X-API-Key": new_key})).status == 401
            config.write_text(config.read_text() + f'"{new_key}" = "carol"\n')
            result = fastgate("reload", "--config", str(config), cwd=elsewhere)
            assert result.returncode == 0, result.stderr
            assert f"Sent SIGHUP to fastgate (pid {proc.pid})" in result.stdout
            await eventually(lambda: b"Reloaded" in proc.log)
            assert (await c.request("GET", "/api/version", headers={"X-API-Key": new_key})).status == 200
        # A second gateway with the same pid file refuses to start while the first runs.
        other = write_config(tmp_path / "other.toml", ollama.url, keys={FRESH_KEY: "me"})
        other.write_text(other.read_text().replace("[upstream]", f'pid_file = "{pid_path}"\n\n[upstream]'))
        second = fastgate("serve", "--config", str(other))
        assert second.returncode == 1 and f"names fastgate process {proc.pid}, which is running" in second.stderr
        assert pid_path.read_text() == f"{proc.pid}\n"
    finally:
        assert await proc.stop() == 0
    assert not pid_path.exists()  # removed at a clean exit
    gone = fastgate("reload", "--config", str(config))
    assert gone.returncode == 1 and f"no pid file at {pid_path}" in gone.stderr


async def test_reload_refuses_stale_and_foreign_pid_files(tmp_path: Path, ollama: FakeOllama) -> None:
    config = write_config(tmp_path / "fastgate.toml", ollama.url, keys={FRESH_KEY: "me"})
    config.write_text(config.read_text().replace("[upstream]", 'pid_file = "fg.pid"\n\n[upstream]'))
    pid_path = tmp_path / "fg.pid"
    ended = subprocess.Popen(["true"])
    ended.wait()
    pid_path.write_text(f"{ended.pid}\n")
    result = fastgate("reload", "--config", str(config))
    assert result.returncode == 1 and "which is not running" in result.stderr
    sleeper = subprocess.Popen(["sleep", "60"])  # alive, and not fastgate: SIGHUP would kill it
    try:
        pid_path.write_text(f"{sleeper.pid}\n")
        result = fastgate("reload", "--config", str(config))
        assert result.returncode == 1 and "not fastgate" in result.stderr
        assert sleeper.poll() is None
        # Neither file blocks a start: the gateway replaces it.
        proc = await FastgateProcess.start("serve", "--config", str(config))
        try:
            assert b"Replacing stale pid file" in proc.log and pid_path.read_text() == f"{proc.pid}\n"
        finally:
            assert await proc.stop() == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    pid_path.write_text("not a pid\n")
    result = fastgate("reload", "--config", str(config))
    assert result.returncode == 1 and "does not hold a process id" in result.stderr


def test_reload_without_pid_file_setting(tmp_path: Path) -> None:
    config = write_config(tmp_path / "fastgate.toml", "http://127.0.0.1:1", keys={})
    result = fastgate("reload", "--config", str(config))
    assert result.returncode == 2 and "server.pid_file is not set" in result.stderr and "kill -HUP" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[server]\nbogus = 1\n")
    result = fastgate("reload", "--config", str(broken))
    assert result.returncode == 2 and "server.bogus: unknown key" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# README


def test_readme_names_every_setting_that_needs_a_restart() -> None:
    """Whatever a reload keeps for a restart is in the README's list: a setting added to Proxy.reload's list
    fails here until the README (and this map) name it."""
    old = build_config({})
    new = build_config({"server": {"listen": "127.0.0.2:9", "tls_cert": "c", "tls_key": "k", "pid_file": "p"},
                        "upstream": {"url": "http://127.0.0.2:1"}, "store": {"path": "x.db"},
                        "metrics": {"listen": "127.0.0.1:9464"}})
    in_readme = {"server.listen": "`server.listen`", "server.tls_cert/tls_key (on or off)": "TLS on or off",
                 "upstream.url": "`upstream.url`", "store.path": "`store.path`",
                 "metrics.listen": "`metrics.listen`"}
    fixed = Proxy(old).reload(new)
    assert set(fixed) == set(in_readme), "a new setting needs a restart: name it in the README and here"
    readme = (ROOT / "README.md").read_text()
    paragraph = next((p for p in readme.split("\n\n") if "need a restart" in p), "")
    assert paragraph, "README has no paragraph saying what needs a restart"
    flat = " ".join(paragraph.split())
    for name in [*fixed, "server.pid_file"]:  # the pid file stays where it was written too (server.py)
        assert in_readme.get(name, f"`{name}`") in flat, (name, flat)


def test_start_line_names_the_workers_and_a_database_store_without_its_password() -> None:
    from fastgate.startup import OllamaStatus, in_effect
    config = build_config({"server": {"workers": 2},
                           "state": {"url": "redis://127.0.0.1:6379/0"},
                           "store": {"url": "postgresql://fastgate:s3cret@db.internal:5432/fastgate?sslmode=require"}})
    line = in_effect(config, ollama=OllamaStatus(True, "version 0.6.2"), store_keys=3)
    assert "workers 2" in line
    assert "3 from the store postgresql://fastgate@db.internal:5432/fastgate" in line
    assert "s3cret" not in line and "no store" not in line
