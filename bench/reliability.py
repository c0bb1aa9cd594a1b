"""Shared pieces of the reliability harnesses (`bench.fuzz`, `bench.soak`); see bench/RELIABILITY.md.

- `Proc`: a child process (fastgate, or the fake Ollama) whose output goes to a log file; started, watched
  and stopped by PID only. `/proc` readers for its RSS and open file descriptors.
- `fastgate_config`: a fastgate TOML config for the harnesses (short timeouts, no IP trust, no failure
  limiter unless asked for).
- `FakeThread`: the project's fake Ollama (tests/fake_ollama.py) running in this process on its own thread
  and event loop, so a harness can read what it received (`fake.received`) and whether its HTTP parser ever
  choked on what fastgate sent it.
- `python -m bench.reliability upstream --port N --digest-log FILE`: the fake Ollama as a process that also
  writes, per response, the SHA-256 of the body bytes it sent (keyed by the X-Request-Id fastgate gave the
  request), so a client can prove that what it got is byte for byte what the upstream wrote.
- `parse_responses` / `read_response`: strict HTTP/1.1 response parsing (status line, header syntax, framing)
  over raw bytes, for checking what fastgate answers.
- `machine_info`: nproc, CPU model, load, for the reports.

Nothing here opens anything but loopback sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
READY = re.compile(rb"listening on (https?)://([^\s:]+|\[[^\]]+\]):(\d+)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def results_dir(kind: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{kind}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = RESULTS / f"{kind}-{stamp}-{n}"
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# Processes

class Proc:
    """A child process with stdout+stderr in a log file. Stopped by its own PID, never by name."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log_offset = 0

    def start(self, timeout: float = 20.0) -> Proc:
        log = open(self.log_path, "ab")
        self._log_offset = log.tell()
        try:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_since_start()
            match = READY.search(text)
            if match:
                self.port = int(match.group(3))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before listening:\n"
                                   f"{text.decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not say it was listening within {timeout} s")
            time.sleep(0.02)

    def log_since_start(self) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read()
        except OSError:
            return b""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()

    def stop(self, timeout: float = 15.0) -> tuple[int | None, float]:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns (exit code, seconds it took)."""
        if self.proc is None:
            return None, 0.0
        started = time.monotonic()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode, time.monotonic() - started

    def rss_kib(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return 0

    def fd_kinds(self, listen_port: int, upstream_port: int) -> dict[str, int]:
        """Open fds by kind: `listener`, `client` (accepted connections), `upstream` (to Ollama), `other-socket`
        and `other` (files, pipes, epoll, eventfd...)."""
        inodes: dict[str, tuple[int, int, int]] = {}  # socket inode -> (local port, remote port, state)
        for table in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/{self.pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                parts = line.split()
                local, remote, state, inode = parts[1], parts[2], int(parts[3], 16), parts[9]
                inodes[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
        kinds = {"listener": 0, "client": 0, "upstream": 0, "other-socket": 0, "other": 0}
        try:
            names = os.listdir(f"/proc/{self.pid}/fd")
        except OSError:
            return kinds
        for name in names:
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{name}")
            except OSError:
                continue
            if not target.startswith("socket:["):
                kinds["other"] += 1
                continue
            info = inodes.get(target[8:-1])
            if info is None:
                kinds["other-socket"] += 1
            elif info[2] == 0x0A:  # LISTEN
                kinds["listener"] += 1
            elif info[0] == listen_port:
                kinds["client"] += 1
            elif info[1] == upstream_port:
                kinds["upstream"] += 1
            else:
                kinds["other-socket"] += 1
        return kinds


def fastgate_config(path: Path, *, port: int, upstream_port: int, keys: dict[str, str],
                    header_timeout: float = 30.0, keepalive_timeout: float = 75.0, body_timeout: float = 60.0,
                    read_timeout: float = 600.0, connect_timeout: float = 5.0, max_body_bytes: int = 20971520,
                    pool_idle_timeout: float = 60.0,
                    shutdown_grace: float = 10.0, session_ttl: int = 0, max_failures: int = 0,
                    log_level: str = "WARNING", hostnames: tuple[str, ...] = ()) -> Path:
    lines = [
        "[server]", f'listen = "127.0.0.1:{port}"', f"header_timeout = {header_timeout}",
        f"hostnames = {json.dumps(list(hostnames))}",
        f"keepalive_timeout = {keepalive_timeout}", f"body_timeout = {body_timeout}",
        f"shutdown_grace = {shutdown_grace}", "",
        "[upstream]", f'url = "http://127.0.0.1:{upstream_port}"', f"read_timeout = {read_timeout}",
        f"connect_timeout = {connect_timeout}", f"pool_idle_timeout = {pool_idle_timeout}", "",
        "[auth]", f"session_ttl = {session_ttl}", f"max_failures = {max_failures}",
        f"max_body_bytes = {max_body_bytes}", "",
        "[log]", f'level = "{log_level}"', "",
        "[keys]", *[f'"{k}" = "{u}"' for k, u in keys.items()], "",
    ]
    path.write_text("\n".join(lines))
    os.chmod(path, 0o600)  # it holds keys in clear: fastgate warns about a config others can read
    return path


def start_fastgate(config: Path, log_path: Path) -> Proc:
    return Proc("fastgate", [sys.executable, "-m", "fastgate", "serve", "--config", str(config)], log_path).start()


_LOG_ERROR = re.compile(rb"Traceback|Exception|exception|Error|ERROR|CRITICAL|never retrieved|destroyed")
_LOG_LINE = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d - (\w+) - ")


def log_problems(text: bytes) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) in a fastgate log excerpt; the startup line and shutdown chatter
    (SIGTERM) are not problems."""
    errors: list[str] = []
    warnings: list[str] = []
    for raw in text.splitlines():
        line = raw.decode("utf-8", "replace")
        if b"listening on" in raw or b"Shutting down" in raw or b"Stopped" in raw:
            continue
        match = _LOG_LINE.match(raw)
        level = match.group(1) if match else b""
        if level in (b"ERROR", b"CRITICAL") or (not match and _LOG_ERROR.search(raw)):
            errors.append(line)
        elif level == b"WARNING" and b"grace period" not in raw:
            warnings.append(line)
        elif not match and raw.strip():
            errors.append(line)  # anything unformatted (tracebacks, asyncio's own messages)
    return errors, warnings


# ---------------------------------------------------------------------------------------------------------
# The fake Ollama in this process, on its own thread (fuzzer)

class FakeThread:
    """tests.fake_ollama.FakeOllama on a private event loop in a daemon thread.

    Also records every HTTP parse error the fake hits (with the bytes it had received on that connection):
    fastgate must never send Ollama something its parser refuses.
    """

    def __init__(self) -> None:
        from tests import fake_ollama

        self.module = fake_ollama
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-ollama", daemon=True)
        self.fake: Any = None
        self.protocol_errors: list[dict[str, Any]] = []
        self._install_hooks()

    def _install_hooks(self) -> None:
        conn_cls = self.module._Conn
        if getattr(conn_cls, "_fz_hooked", False):
            return
        errors = self.protocol_errors
        orig_data = conn_cls.data_received
        orig_error = conn_cls._protocol_error

        def data_received(conn: Any, data: bytes) -> None:
            tail = conn.__dict__.get("_fz_tail", b"") + data
            conn._fz_tail = tail[-16384:]
            orig_data(conn, data)

        def protocol_error(conn: Any, exc: Exception) -> None:
            errors.append({"at": time.time(), "conn_id": conn.conn_id, "error": str(exc),
                           "tail": conn.__dict__.get("_fz_tail", b"")})
            orig_error(conn, exc)

        conn_cls.data_received = data_received
        conn_cls._protocol_error = protocol_error
        conn_cls._fz_hooked = True

    def start(self) -> FakeThread:
        self.thread.start()
        self.fake = self.module.FakeOllama("127.0.0.1", 0)
        self.call(self.fake.start())
        return self

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def received_since(self, start: int) -> list[Any]:
        async def get() -> list[Any]:
            return self.fake.received[start:]
        return self.call(get())

    def received_count(self) -> int:
        async def get() -> int:
            return len(self.fake.received)
        return self.call(get())

    @property
    def port(self) -> int:
        return self.fake.port

    def stop(self) -> None:
        try:
            self.call(self.fake.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


# ---------------------------------------------------------------------------------------------------------
# The fake Ollama as a process that logs digests of what it sends (soak)

class _Record:
    __slots__ = ("rid", "method", "path", "status", "head", "head_done", "hasher", "size")

    def __init__(self, rid: str, method: str, path: str) -> None:
        self.rid = rid
        self.method = method
        self.path = path
        self.status = 0
        self.head = bytearray()
        self.head_done = False
        self.hasher = hashlib.sha256()
        self.size = 0

    def feed(self, data: bytes) -> None:
        if not self.head_done:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            try:
                self.status = int(self.head[9:12])
            except ValueError:
                self.status = -1
            data = bytes(self.head[end + 4:])
            self.head_done = True
            self.head = bytearray()
            if not data:
                return
        self.hasher.update(data)
        self.size += len(data)


def install_digest_hooks(fake_module: Any, log_file: Any) -> None:
    """Wrap the fake's per-request handler and its writes: one line per response, when it ends:
    `<x-request-id> <status> <body bytes> <sha256 of body bytes> complete|cut <method> <path>`."""
    conn_cls = fake_module._Conn
    orig_handle = conn_cls._handle
    orig_write = conn_cls._write

    async def _handle(conn: Any, req: Any) -> None:
        rec = _Record(req.hmap.get("x-request-id", "-"), req.method or "-", req.path or "-")
        conn._fz_rec = rec
        ok = False
        try:
            await orig_handle(conn, req)
            ok = not conn.lost
        finally:
            conn._fz_rec = None
            log_file.write(f"{rec.rid} {rec.status} {rec.size} {rec.hasher.hexdigest()} "
                           f"{'complete' if ok else 'cut'} {rec.method} {rec.path}\n")

    def _write(conn: Any, data: bytes) -> None:
        orig_write(conn, data)
        rec = conn.__dict__.get("_fz_rec")
        if rec is not None:
            rec.feed(data)

    conn_cls._handle = _handle
    conn_cls._write = _write


@dataclass
class UpstreamEntry:
    rid: str
    status: int
    size: int
    sha256: str
    complete: bool
    method: str
    path: str


def read_digest_log(path: Path) -> dict[str, list[UpstreamEntry]]:
    out: dict[str, list[UpstreamEntry]] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(" ", 6)
        if len(parts) != 7:
            continue  # a line cut by SIGKILL
        rid, status, size, digest, state, method, req_path = parts
        out.setdefault(rid, []).append(UpstreamEntry(rid, int(status), int(size), digest, state == "complete",
                                                     method, req_path))
    return out


def upstream_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.reliability upstream")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--digest-log", required=True)
    args = p.parse_args(argv)
    from tests import fake_ollama

    log_file = open(args.digest_log, "a", buffering=1)
    install_digest_hooks(fake_ollama, log_file)

    async def run() -> None:
        fake = fake_ollama.FakeOllama("127.0.0.1", args.port)
        await fake.start()
        print(f"listening on {fake.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await fake.stop()

    try:
        import uvloop
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())


# ---------------------------------------------------------------------------------------------------------
# Strict HTTP/1.1 response parsing

STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: ([\t \x21-\x7e\x80-\xff]*))?")
HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t \x21-\x7e\x80-\xff]*?)[ \t]*")
CHUNK_LINE = re.compile(rb"([0-9a-fA-F]{1,16})(;[^\r\n]*)?")
MAX_HEAD = 65536


class Malformed(Exception):
    pass


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # lowercase names
    interim: list[int] = field(default_factory=list)  # 1xx statuses before this response
    body_raw: bytes = b""  # body bytes as received (chunk framing included)
    body: bytes = b""  # decoded payload
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = True
    head_size: int = 0

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    @property
    def close(self) -> bool:
        return any(n == b"connection" and b"close" in v.lower() for n, v in self.headers)


def parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Parse a head (without its final blank line). Raises Malformed."""
    lines = head.split(b"\r\n")
    for line in lines:
        if b"\n" in line or b"\r" in line:
            raise Malformed(f"bare CR or LF in response head: {line[:80]!r}")
    match = STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise Malformed(f"bad status line {lines[0][:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        m = HEADER_LINE.fullmatch(line)
        if m is None:
            raise Malformed(f"bad header line {line[:80]!r}")
        headers.append((m.group(1).lower(), m.group(2)))
    return int(match.group(1)), match.group(2) or b"", headers


def body_framing(status: int, headers: list[tuple[bytes, bytes]], method: bytes) -> tuple[str, int]:
    """('none'|'length'|'chunked'|'close', length). Raises Malformed on contradictory framing."""
    cls = [v for n, v in headers if n == b"content-length"]
    tes = [v for n, v in headers if n == b"transfer-encoding"]
    if tes and cls:
        raise Malformed("both Transfer-Encoding and Content-Length in a response")
    if len(cls) > 1:
        raise Malformed("several Content-Length fields in a response")
    if cls and not re.fullmatch(rb"[0-9]{1,18}", cls[0]):
        raise Malformed(f"bad Content-Length {cls[0]!r}")
    if tes and (len(tes) > 1 or tes[0].lower() != b"chunked"):
        raise Malformed(f"unexpected Transfer-Encoding {tes!r}")
    if method == b"HEAD" or status < 200 or status in (204, 304):
        return "none", 0
    if tes:
        return "chunked", 0
    if cls:
        return "length", int(cls[0])
    return "close", 0


def parse_chunked(data: bytes, pos: int) -> tuple[int, list[bytes], bool]:
    """Parse a chunked body from data[pos:]. Returns (end index, chunks, complete). Raises Malformed."""
    chunks: list[bytes] = []
    n = len(data)
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            if n - pos > 4096:
                raise Malformed("chunk size line too long")
            return n, chunks, False
        m = CHUNK_LINE.fullmatch(data, pos, eol)
        if m is None:
            raise Malformed(f"bad chunk size line {data[pos:eol][:80]!r}")
        size = int(m.group(1), 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailer section
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    return n, chunks, False
                line = data[pos:eol]
                pos = eol + 2
                if not line:
                    return pos, chunks, True
                if HEADER_LINE.fullmatch(line) is None:
                    raise Malformed(f"bad trailer line {line[:80]!r}")
        if pos + size + 2 > n:
            if pos + size <= n and n - (pos + size) >= 1 and data[pos + size:pos + size + 1] != b"\r":
                raise Malformed("chunk data not followed by CRLF")
            return n, chunks, False
        if data[pos + size:pos + size + 2] != b"\r\n":
            raise Malformed("chunk data not followed by CRLF")
        chunks.append(data[pos:pos + size])
        pos += size + 2


def parse_responses(data: bytes, methods: list[bytes], eof: bool) -> tuple[list[Response], bytes]:
    """Parse every response in `data` (all a connection delivered). `methods[i]` is the method of the i-th
    request (b"GET" beyond the list). Returns (responses, unparsed tail). The last response may be
    incomplete (complete=False) when the connection ended inside it. Raises Malformed."""
    out: list[Response] = []
    pos = 0
    interim: list[int] = []
    n = len(data)
    while pos < n:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            if n - pos > MAX_HEAD:
                raise Malformed("response head too large")
            if not data.startswith(b"HTTP/1."[: n - pos], pos):
                raise Malformed(f"bytes that are not a response: {data[pos:pos + 80]!r}")
            return out, data[pos:]
        if end - pos > MAX_HEAD:
            raise Malformed("response head too large")
        status, reason, headers = parse_head(data[pos:end])
        head_size = end + 4 - pos
        pos = end + 4
        if 100 <= status < 200:
            if status == 101:
                raise Malformed("101 Switching Protocols")
            interim.append(status)
            continue
        method = methods[len(out)] if len(out) < len(methods) else b"GET"
        kind, length = body_framing(status, headers, method)
        resp = Response(status, reason, headers, interim, head_size=head_size)
        interim = []
        if kind == "none":
            if method == b"HEAD" and length == 0 and n > pos and not data.startswith(b"HTTP/1."[: n - pos], pos):
                # A HEAD that byte mutations turned into something else: try it as a normal response.
                kind, length = body_framing(status, headers, b"GET")
        if kind == "length":
            resp.body_raw = resp.body = data[pos:pos + length]
            resp.complete = len(resp.body) == length
            pos = min(pos + length, n)
        elif kind == "chunked":
            end_pos, resp.chunks, resp.complete = parse_chunked(data, pos)
            resp.body_raw = data[pos:end_pos]
            resp.body = b"".join(resp.chunks)
            pos = end_pos
        elif kind == "close":
            resp.body_raw = resp.body = data[pos:]
            resp.complete = eof
            pos = n
        out.append(resp)
        if not resp.complete:
            break
    return out, b""


async def read_response(reader: asyncio.StreamReader, method: bytes = b"GET", *,
                        on_chunk: Any = None) -> Response:
    """Read one response from a stream (1xx skipped). Incomplete bodies give complete=False; a connection
    that ends before a head raises ConnectionError. `on_chunk(resp, payload)` is called per chunk and may
    raise to stop reading."""
    interim: list[int] = []
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError(f"connection closed before a response head ({len(exc.partial)} bytes)") from None
        except asyncio.LimitOverrunError:
            raise Malformed("response head too large") from None
        status, reason, headers = parse_head(head[:-4])
        if 100 <= status < 200:
            interim.append(status)
            continue
        break
    resp = Response(status, reason, headers, interim, head_size=len(head))
    kind, length = body_framing(status, headers, method)
    raw = bytearray()
    try:
        if kind == "length":
            data = await reader.readexactly(length)
            raw += data
        elif kind == "chunked":
            while True:
                line = await reader.readuntil(b"\r\n")
                raw += line
                m = CHUNK_LINE.fullmatch(line[:-2])
                if m is None:
                    raise Malformed(f"bad chunk size line {line[:80]!r}")
                size = int(m.group(1), 16)
                if size == 0:
                    while True:
                        line = await reader.readuntil(b"\r\n")
                        raw += line
                        if line == b"\r\n":
                            break
                    break
                data = await reader.readexactly(size + 2)
                raw += data
                if data[-2:] != b"\r\n":
                    raise Malformed("chunk data not followed by CRLF")
                resp.chunks.append(data[:-2])
                if on_chunk is not None:
                    on_chunk(resp, data[:-2])
        elif kind == "close":
            raw += await reader.read()
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        if isinstance(exc, asyncio.IncompleteReadError):
            raw += exc.partial
        resp.complete = False
    resp.body_raw = bytes(raw)
    resp.body = b"".join(resp.chunks) if kind == "chunked" else resp.body_raw
    return resp


# ---------------------------------------------------------------------------------------------------------
# Reporting helpers

def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg": [round(x, 2) for x in load],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def git_state() -> str:
    """The commit fastgate runs at, with `+dirty` when its working tree has changes (read-only git calls)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastgate"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) pairs, per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    var = sum((t - mx) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    return 60.0 * sum((t - mx) * (v - my) for t, v in samples) / var


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["upstream"]:
        upstream_main(argv[1:])
        return 0
    print("usage: python -m bench.reliability upstream --port N --digest-log FILE\n"
          "(the harnesses are python -m bench.fuzz and python -m bench.soak)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
