"""Operational faults (issue 13, item 10): what goes wrong around fastgate rather than in a request.

- the key store file replaced or deleted under a running gateway;
- a passphrase-protected TLS key (never a prompt on the terminal, at startup or on SIGHUP);
- SIGTERM while another process holds the store's write lock (no usage row lost, shutdown stays bounded);
- a config file holding clear keys that group or others can read (a warning);
- a blob upload slower than upstream.read_timeout but steadily progressing (not cut), or stalled (cut).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import pty
import signal
import sqlite3
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

import fastgate.managed
from fastgate.store import KeyStore, spill_path
from tests.conftest import KEY1, KEYS, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.proc import READY, FastgateProcess, free_port, write_config
from tests.rawhttp import Client, RawResponse

pytestmark = pytest.mark.timeout(60)

KEYED = {"X-API-Key": KEY1}


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, every: float = 0.05) -> None:
    """Poll `check` until it holds; fail after `timeout` seconds (never a fixed sleep as the only wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(every)


@asynccontextmanager
async def connected(port: int) -> AsyncIterator[Client]:
    c = await Client.connect(port)
    try:
        yield c
    finally:
        await c.close()


# -- item 5: upload progress counts as activity for upstream.read_timeout ------------------------------------

READ_TIMEOUT_S = 0.6
UPLOAD_PIECE_BYTES = 4096
UPLOAD_PACE_S = 0.1  # a sixth of the read timeout between pieces: steady progress, with a wide margin
UPLOAD_PIECES = 30  # 3 s in all: five times the read timeout


async def paced_blob_upload(port: int, *, pieces: int, send: int) -> RawResponse:
    """POST a blob of `pieces` pieces, sending only the first `send` of them, UPLOAD_PACE_S apart; then wait
    for the answer (with `send < pieces` the upload stalls, the client still connected)."""
    data = os.urandom(UPLOAD_PIECE_BYTES * pieces)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    c = await Client.connect(port)
    try:
        c.send(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY1}\r\n"
               f"Content-Length: {len(data)}\r\n\r\n".encode())
        # Read the answer while uploading: an early one (the 504 without the fix) ends the upload.
        answer = asyncio.get_running_loop().create_task(c.response(timeout=20))
        for i in range(send):
            if answer.done():
                break
            try:
                c.send(data[i * UPLOAD_PIECE_BYTES:(i + 1) * UPLOAD_PIECE_BYTES])
                await c.writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(UPLOAD_PACE_S)  # pacing the upload, not waiting for a server
        return await answer
    finally:
        await c.close()


async def test_slow_but_steady_blob_upload_outlasts_the_read_timeout(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upstream={"read_timeout": READ_TIMEOUT_S}, server={"body_timeout": 30.0})
    resp = await paced_blob_upload(gw.port, pieces=UPLOAD_PIECES, send=UPLOAD_PIECES)
    assert resp.status == 201, (resp.status, resp.body)


async def test_stalled_blob_upload_is_still_cut_with_504(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upstream={"read_timeout": READ_TIMEOUT_S}, server={"body_timeout": 30.0})
    resp = await paced_blob_upload(gw.port, pieces=UPLOAD_PIECES, send=5)
    assert resp.status == 504


# -- item 2: a passphrase-protected TLS key never makes fastgate prompt on a terminal ----------------------

PROCESS_TIMEOUT_S = 15.0  # generous: fastgate starts or fails in well under a second


class TerminalProcess:
    """`python -m fastgate ...` as an operator runs it: with a controlling terminal (a pty whose master the
    test holds, so anything written to /dev/tty, like OpenSSL's passphrase prompt, can be read back) and
    stdin detached. Output is collected as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int) -> None:
        self.proc = proc
        self.master = master
        self.log = bytearray()
        self.reader = asyncio.get_running_loop().create_task(self._collect())

    @classmethod
    async def spawn(cls, *args: str) -> TerminalProcess:
        master, slave = pty.openpty()
        slave_name = os.ttyname(slave)

        def take_terminal() -> None:
            # The child is a new session's leader (start_new_session) with no terminal: opening the pty makes
            # it the controlling terminal, so /dev/tty is the pty and a prompt would block on it.
            os.close(os.open(slave_name, os.O_RDWR))

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fastgate", *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            preexec_fn=take_terminal, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        os.close(slave)
        os.set_blocking(master, False)
        return cls(proc, master)

    async def _collect(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.log += line

    def terminal_output(self) -> bytes:
        out = bytearray()
        while True:
            try:
                data = os.read(self.master, 4096)
            except (BlockingIOError, OSError):  # nothing more (EIO once the child's side is closed)
                return bytes(out)
            if not data:
                return bytes(out)
            out += data

    async def port(self) -> int:
        async def ready() -> bool:
            return READY.search(self.log) is not None or self.proc.returncode is not None

        await eventually(ready, timeout=PROCESS_TIMEOUT_S)
        match = READY.search(self.log)
        assert match, bytes(self.log).decode(errors="replace")
        return int(match.group(3))

    async def exit_code(self) -> int | None:
        """The exit code, or None if the process is still running after PROCESS_TIMEOUT_S (it hangs)."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), PROCESS_TIMEOUT_S)
        except asyncio.TimeoutError:
            return None
        await asyncio.wait_for(self.reader, PROCESS_TIMEOUT_S)
        return code

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), PROCESS_TIMEOUT_S)
            except asyncio.TimeoutError:
                self.proc.kill()  # it hung (the bug this guards against): do not leave it behind
                await self.proc.wait()
        self.reader.cancel()
        os.close(self.master)


@asynccontextmanager
async def on_a_terminal(*args: str) -> AsyncIterator[TerminalProcess]:
    proc = await TerminalProcess.spawn(*args)
    try:
        yield proc
    finally:
        await proc.close()


def write_leaf(ca: trustme.CA, directory: Path, name: str, *, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, the key encrypted with `passphrase` when one is given."""
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    pem = leaf.private_key_pem.bytes()
    if passphrase is not None:
        private = serialization.load_pem_private_key(pem, password=None)
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(passphrase))
        assert b"ENCRYPTED" in pem
    key.write_bytes(pem)
    key.chmod(0o600)
    return cert, key


def write_tls_config(path: Path, upstream_url: str, port: int, cert: Path, key: Path) -> Path:
    path.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n\n'
                    f'[upstream]\nurl = "{upstream_url}"\n\n[keys]\n"{KEY1}" = "user1"\n')
    path.chmod(0o600)
    return path


async def served_certificate(port: int, ca: trustme.CA) -> bytes:
    """DER of the certificate a new handshake gets, after checking the gateway answers over it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    c = await Client.connect(port, ssl=ctx, server_hostname="127.0.0.1")
    try:
        assert (await c.request("GET", "/", timeout=5)).status == 200
        return c.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        await c.close()


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text().split("-----END CERTIFICATE-----")[0]
                                    + "-----END CERTIFICATE-----\n")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_encrypted_tls_key_fails_startup_at_once_without_prompting(tmp_path: Path, ollama: FakeOllama,
                                                                         ca: trustme.CA) -> None:
    cert, key = write_leaf(ca, tmp_path, "locked", passphrase=b"correct horse")
    config = write_tls_config(tmp_path / "fastgate.toml", ollama.url, free_port(), cert, key)
    async with on_a_terminal("serve", "--config", str(config)) as proc:
        code = await proc.exit_code()
        prompt = proc.terminal_output()
    assert code is not None, f"fastgate hung at startup; its terminal shows {prompt!r}"
    assert b"pass phrase" not in prompt.lower() and b"passphrase" not in prompt.lower(), prompt
    output = bytes(proc.log).decode(errors="replace")
    assert code == 2, output
    assert "config error: server.tls_key" in output and str(key) in output and "encrypted" in output, output


async def test_sighup_with_an_encrypted_tls_key_fails_and_keeps_the_old_certificate(
        tmp_path: Path, ollama: FakeOllama, ca: trustme.CA) -> None:
    old_cert, old_key = write_leaf(ca, tmp_path, "old")
    new_cert, new_key = write_leaf(ca, tmp_path, "new", passphrase=b"correct horse")
    config = write_tls_config(tmp_path / "fastgate.toml", ollama.url, free_port(), old_cert, old_key)
    async with on_a_terminal("serve", "--config", str(config)) as proc:
        port = await proc.port()
        assert await served_certificate(port, ca) == der(old_cert)
        write_tls_config(config, ollama.url, port, new_cert, new_key)
        proc.proc.send_signal(signal.SIGHUP)

        async def reload_failed() -> bool:
            return b"Reload failed" in proc.log

        try:
            await eventually(reload_failed, timeout=PROCESS_TIMEOUT_S)
            failed_in_time = True
        except AssertionError:
            failed_in_time = False
        prompt = proc.terminal_output()
        assert b"pass phrase" not in prompt.lower(), f"fastgate prompted on its terminal: {prompt!r}"
        assert failed_in_time, bytes(proc.log).decode(errors="replace")
        assert str(new_key).encode() in proc.log and b"encrypted" in proc.log
        assert await served_certificate(port, ca) == der(old_cert)  # still serving, with the old certificate


# -- item 1: a store file replaced or deleted under a running gateway ---------------------------------------

def copy_store(src: Path, dst: Path) -> None:
    """A consistent copy of a live store (SQLite's online backup), as a backup tool would make."""
    source, target = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def add_keys(db: Path, *users: str) -> dict[str, tuple[str, str]]:
    """user -> (key id, secret), written with a connection closed again before the gateway starts."""
    with KeyStore(str(db)) as store:
        return {user: (record.id, secret) for user in users
                for record, secret in [store.add(user, now=time.time())]}


async def key_status(c: Client, secret: str) -> int:
    return (await c.request("GET", "/api/version", headers={"X-API-Key": secret})).status


def store_logs(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.ERROR) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


async def test_replaced_store_is_reopened_and_its_revocations_apply(make_gateway: MakeGateway, tmp_path: Path,
                                                                    gate_logs: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "keys.db"
    keys = add_keys(db, "alice", "bob")
    gw = await make_gateway(store={"path": str(db)}, auth={"max_failures": 0})
    async with connected(gw.port) as c:
        assert await key_status(c, keys["alice"][1]) == 200 and await key_status(c, keys["bob"][1]) == 200
        # A restored backup in which alice's key is revoked is moved over the store the gateway has open.
        restored = tmp_path / "restored.db"
        copy_store(db, restored)
        with KeyStore(str(restored)) as other:
            other.revoke(keys["alice"][0], time.time())
        os.replace(restored, db)

        async def alice_refused() -> bool:
            return await key_status(c, keys["alice"][1]) == 401

        await eventually(alice_refused)
        assert await key_status(c, keys["bob"][1]) == 200
        assert store_logs(gate_logs, "was replaced", logging.WARNING)
        # From now on the new file is the one watched: a CLI revocation in it lands too.
        with KeyStore(str(db)) as cli:
            cli.revoke(keys["bob"][0], time.time())

        async def bob_refused() -> bool:
            return await key_status(c, keys["bob"][1]) == 401

        await eventually(bob_refused)


async def test_deleted_store_keeps_the_last_keys_logs_loudly_and_picks_up_a_restored_file(
        make_gateway: MakeGateway, tmp_path: Path, gate_logs: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "keys.db"
    keys = add_keys(db, "alice", "bob")
    gw = await make_gateway(store={"path": str(db)}, auth={"max_failures": 0})
    assert gw.managed is not None
    backup = tmp_path / "backup.db"
    copy_store(db, backup)
    async with connected(gw.port) as c:
        assert await key_status(c, keys["alice"][1]) == 200
        db.unlink()

        async def reported() -> bool:
            return bool(store_logs(gate_logs, "is gone"))

        await eventually(reported)
        # Keeps serving the keys loaded last (see ManagedKeys._check_file for why) ...
        for _ in range(3):
            assert await key_status(c, keys["alice"][1]) == 200
        # ... and says so once, then periodically rather than every second.
        for _ in range(3):
            await gw.managed._check_file()
        assert len(store_logs(gate_logs, "is gone")) == 1
        monkeypatch.setattr(fastgate.managed, "REPEAT_LOG_S", 0.0)
        await gw.managed._check_file()
        assert len(store_logs(gate_logs, "is gone")) >= 2
        assert "revocations cannot be read" in store_logs(gate_logs, "is gone")[0]
        # The backup (taken before alice's requests) comes back, with bob's key revoked meanwhile: the gateway
        # loads it, and the usage of the requests served while the file was gone lands in it rather than in
        # the deleted file.
        with KeyStore(str(backup)) as restored:
            restored.revoke(keys["bob"][0], time.time())
        os.replace(backup, db)

        async def bob_refused() -> bool:
            return await key_status(c, keys["bob"][1]) == 401

        await eventually(bob_refused)
        with KeyStore(str(db)) as store:
            async def alice_usage_landed() -> bool:
                rows = {s.group: s for s in await asyncio.to_thread(store.usage, None, "user")}
                return "alice" in rows and rows["alice"].requests >= 3  # the three served while it was gone

            await eventually(alice_usage_landed)


# -- item 3: SIGTERM while another process holds the store's write lock -------------------------------------

SHUTDOWN_GRACE_S = 1.0
SHUTDOWN_MARGIN_S = 4.0  # the poll round in progress and the final write's minimum wait, plus process exit
USAGE_REQUESTS = 5


def store_config(tmp_path: Path, upstream_url: str, grace: float) -> Path:
    config = write_config(tmp_path / "fastgate.toml", upstream_url, keys=KEYS,
                          extra='[store]\npath = "keys.db"\n\n[auth]\nmax_failures = 0\n')
    # server.shutdown_grace goes at the end of the [server] table, which write_config opens first.
    config.write_text(config.read_text().replace("[upstream]", f"shutdown_grace = {grace}\n\n[upstream]", 1))
    return config


def hold_write_lock(db: Path) -> sqlite3.Connection:
    """Another connection in an exclusive write transaction, as a `sqlite3` shell or a backup job could be."""
    locker = sqlite3.connect(db, isolation_level=None, timeout=0)
    locker.execute("BEGIN EXCLUSIVE")
    return locker


async def make_usage(port: int) -> None:
    async with connected(port) as c:
        for _ in range(USAGE_REQUESTS):
            assert (await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})).status == 200


def usage_requests(db: Path, user: str) -> int:
    with KeyStore(str(db)) as store:
        return sum(s.requests for s in store.usage(by="user") if s.group == user)


async def test_sigterm_with_the_store_locked_past_the_grace_spills_usage_for_the_next_start(
        tmp_path: Path, ollama: FakeOllama) -> None:
    config = store_config(tmp_path, ollama.url, SHUTDOWN_GRACE_S)
    db = tmp_path / "keys.db"
    proc = await FastgateProcess.start("serve", "--config", str(config))
    locker = None
    try:
        locker = hold_write_lock(db)
        await make_usage(proc.port)
        proc.signal(signal.SIGTERM)
        # Shutdown stays within the grace plus a small margin although the lock is never released ...
        code = await proc.wait(timeout=SHUTDOWN_GRACE_S + SHUTDOWN_MARGIN_S)
        assert code == 0, proc.log.decode(errors="replace")
    finally:
        if locker is not None:
            locker.close()  # rolls back: nothing of the locker's lands
        await proc.stop()
    # ... and the rows it could not write wait in the spill file next to the store.
    spill = Path(spill_path(str(db)))
    rows = [json.loads(line) for line in spill.read_text().splitlines()]
    assert sum(1 for row in rows if row.get("user") == "user1") == USAGE_REQUESTS
    assert oct(spill.stat().st_mode & 0o777) == oct(0o600)
    assert b"saved them to" in proc.log and usage_requests(db, "user1") == 0
    # The next start imports them, once.
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        async def imported() -> bool:
            return not spill.exists()

        await eventually(imported)
        assert usage_requests(db, "user1") == USAGE_REQUESTS
        assert b"imported 5 usage rows" in proc.log
    finally:
        assert await proc.stop() == 0
    assert usage_requests(db, "user1") == USAGE_REQUESTS


async def test_sigterm_with_the_store_locked_for_a_while_writes_usage_once_the_lock_is_free(
        tmp_path: Path, ollama: FakeOllama) -> None:
    grace = 10.0  # long enough that the lock is surely released within it
    config = store_config(tmp_path, ollama.url, grace)
    db = tmp_path / "keys.db"
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        locker = hold_write_lock(db)
        await make_usage(proc.port)
        proc.signal(signal.SIGTERM)

        async def shutting_down() -> bool:
            return b"Shutting down" in proc.log

        await eventually(shutting_down)
        locker.close()
        assert await proc.wait(timeout=grace + SHUTDOWN_MARGIN_S) == 0
    finally:
        await proc.stop()
    assert usage_requests(db, "user1") == USAGE_REQUESTS
    assert not Path(spill_path(str(db))).exists()


# -- item 4: a config file with clear keys that group or others can read -----------------------------------

EXPOSED = b"group or others can read it"


async def reloaded(proc: FastgateProcess, times: int) -> None:
    async def done() -> bool:
        return proc.log.count(b"Reloaded") >= times

    await eventually(done)


async def test_world_readable_config_with_clear_keys_is_warned_about_at_startup_and_on_reload(
        tmp_path: Path, ollama: FakeOllama) -> None:
    config = write_config(tmp_path / "fastgate.toml", ollama.url, keys=KEYS)
    config.chmod(0o644)
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        warned = [line for line in proc.log.splitlines() if EXPOSED in line]  # logged before "listening"
        assert warned, proc.log.decode(errors="replace")
        first = warned[0]
        assert b"WARNING" in first and str(config).encode() in first and b"mode 644" in first
        assert b"chmod 600" in first and KEY1.encode() not in proc.log
        config.chmod(0o600)
        proc.signal(signal.SIGHUP)
        await reloaded(proc, 1)
        assert proc.log.count(EXPOSED) == 1  # private now: no warning
        config.chmod(0o640)
        proc.signal(signal.SIGHUP)
        await reloaded(proc, 2)
        assert proc.log.count(EXPOSED) == 2 and b"mode 640" in proc.log
    finally:
        assert await proc.stop() == 0


async def test_readable_config_holding_only_key_digests_is_not_warned_about(tmp_path: Path,
                                                                           ollama: FakeOllama) -> None:
    digests = {f"sha256:{hashlib.sha256(key.encode()).hexdigest()}": user for key, user in KEYS.items()}
    config = write_config(tmp_path / "fastgate.toml", ollama.url, keys=digests)
    config.chmod(0o644)
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        async with connected(proc.port) as c:
            assert await key_status(c, KEY1) == 200  # the digests are the keys
        proc.signal(signal.SIGHUP)
        await reloaded(proc, 1)
        assert EXPOSED not in proc.log
    finally:
        assert await proc.stop() == 0
