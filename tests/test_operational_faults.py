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
import os
import pty
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from tests.conftest import KEY1, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.proc import READY, free_port
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
