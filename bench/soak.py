"""Soak test: `python -m bench.soak [--minutes M] [--concurrency C] [--seed S]`.

Mixed traffic at a fixed concurrency against a fastgate process in front of a fake Ollama process (both on
loopback, started and stopped by PID here):

- streams: POST /api/generate (NDJSON) and POST /v1/chat/completions (SSE), deterministic tokens
  `tok0 .. tok{n-1}` with small gaps; non-streamed generations;
- small requests: GET /api/version, GET /api/tags (exact bodies known in advance);
- blob uploads of 1-4 MiB, chunked or with Content-Length, each unique: 201 proves Ollama got every byte
  (it checks the SHA-256 digest in the URL);
- clients that vanish mid-stream (FIN or RST after a few tokens);
- bad and missing keys (401);
- upstream restarts: the fake Ollama is killed (SIGKILL or SIGTERM, alternately) and started again on the
  same port a few times. Requests in flight then may fail, but visibly: a cut stream (no terminating
  chunk), a reset, or a 502 - never a stream that ends cleanly with missing or altered bytes.

Every response fastgate relays is checked byte for byte: the fake Ollama process (see
`bench.reliability upstream`) logs the SHA-256 of each body it writes under the X-Request-Id fastgate gave
the request; the client hashes what it received under the same id. Streams are also checked for content
(every token in order, one item per chunk, the final item). fastgate's RSS and open file descriptors are
sampled every second. Results (JSON, Markdown, logs) go to bench/results/soak-<ts>/.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import signal
import socket
import struct
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .reliability import (
    Malformed, Proc, fastgate_config, free_port, git_state, log_problems, machine_info, read_digest_log,
    read_response, results_dir, slope_per_min, start_fastgate,
)

DEFAULT_SEED = 20250313
KEY = "soak-key-0123456789abcdef"
BAD_KEY = "soak-bad-key-000000000000"
OP_TIMEOUT_S = 60.0
RESTART_GRACE_S = 1.0  # after the upstream is back, requests that began before may still fail
MIX = {  # scenario -> weight
    "generate": 28, "v1chat": 16, "generate-nostream": 6, "version": 14, "tags": 10, "blob": 2, "blob-again": 1,
    "vanish": 10, "badkey": 10, "nokey": 4,
}
THINK_S = (0.0, 0.1)  # pause between a worker's requests: keeps the load light on a shared machine
GAPS_MS = (10, 20, 40)  # token gaps of streams
POOL_IDLE_S = 5.0  # upstream.pool_idle_timeout: after the run the pool must drain to nothing within 2x it
MiB = 1024 * 1024


def _expected_small_bodies() -> dict[str, bytes]:
    from tests import fake_ollama as fo
    fake = fo.FakeOllama()
    return {"version": fo._gojson({"version": fake.version}),
            "tags": fo._gojson({"models": [fake._model_info(m) for m in fake.models]})}


# ---------------------------------------------------------------------------------------------------------
# Client side

@dataclass
class OpResult:
    kind: str
    start: float
    end: float
    outcome: str  # ok | cut | status | corrupt | timeout | conn-error | vanished
    status: int = 0
    rid: str = ""
    complete: bool = False
    sha256: str = ""
    body_bytes: int = 0
    up_bytes: int = 0
    detail: str = ""


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.exchanges = 0

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    def abort(self, rst: bool = False) -> None:
        if rst:
            sock = self.writer.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.writer.transport.abort()


def _post(path: str, body: bytes, key: str | None, extra: str = "") -> bytes:
    auth = f"X-API-Key: {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: soak\r\n{auth}Content-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _get(path: str, key: str | None) -> bytes:
    auth = f"X-API-Key: {key}\r\n" if key else ""
    return f"GET {path} HTTP/1.1\r\nHost: soak\r\n{auth}\r\n".encode()


def check_generate_stream(chunks: list[bytes], n: int) -> str:
    """'' if the NDJSON stream holds exactly tok0..tok{n-1} then a final item, one item per chunk."""
    if len(chunks) != n + 1:
        return f"{len(chunks)} chunks, expected {n + 1}"
    for i, c in enumerate(chunks):
        if not c.endswith(b"\n") or c.count(b"\n") != 1:
            return f"chunk {i} is not one NDJSON line"
        item = json.loads(c)
        if i < n and (item.get("response") != f"tok{i} " or item.get("done") is not False):
            return f"item {i}: {c[:120]!r}"
        if i == n and (item.get("done") is not True or item.get("eval_count") != n or item.get("response") != ""):
            return f"final item: {c[:200]!r}"
    return ""


def check_v1_stream(chunks: list[bytes], n: int) -> str:
    if len(chunks) != n + 2:
        return f"{len(chunks)} chunks, expected {n + 2}"
    for i, c in enumerate(chunks):
        if not c.startswith(b"data: ") or not c.endswith(b"\n\n"):
            return f"chunk {i} is not one SSE event"
        if i == n + 1:
            if c != b"data: [DONE]\n\n":
                return f"last event {c!r}"
            continue
        choice = json.loads(c[6:])["choices"][0]
        if i < n and (choice["delta"].get("content") != f"tok{i} " or choice["finish_reason"] is not None):
            return f"event {i}: {c[:160]!r}"
        if i == n and choice["finish_reason"] != "length":
            return f"finish event {c[:160]!r}"
    return ""


class Client:
    """One worker: a persistent connection, a seeded scenario sequence."""

    def __init__(self, ctx: Soak, wid: int) -> None:
        self.ctx = ctx
        self.wid = wid
        self.rng = random.Random(f"{ctx.seed}:worker:{wid}")
        self.conn: Conn | None = None
        self.ops = 0
        self.last_blob: tuple[str, bytes] | None = None
        self.last_conn_uses = 0

    async def _conn(self) -> Conn:
        if self.conn is None:
            self.conn = await Conn.open(self.ctx.fastgate.port)
        return self.conn

    def _drop(self, rst: bool = False) -> None:
        if self.conn is not None:
            self.conn.abort(rst)
            self.conn = None

    async def run(self) -> None:
        kinds = list(MIX)
        weights = [MIX[k] for k in kinds]
        loop = asyncio.get_running_loop()
        while not self.ctx.stopping:
            kind = self.rng.choices(kinds, weights)[0]
            self.ops += 1
            start = loop.time()
            try:
                result = await asyncio.wait_for(self.op(kind), OP_TIMEOUT_S)
            except asyncio.TimeoutError:
                self._drop()
                result = OpResult(kind, start, loop.time(), "timeout", detail=f"no end within {OP_TIMEOUT_S} s")
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                self._drop()
                result = OpResult(kind, start, loop.time(), "conn-error",
                                  detail=f"{type(exc).__name__}: {exc} (request {self.last_conn_uses} on its "
                                         "connection)")
            except Malformed as exc:
                self._drop()
                result = OpResult(kind, start, loop.time(), "corrupt", detail=f"malformed response: {exc}")
            except (ValueError, KeyError, TypeError, IndexError) as exc:  # content checks choking on bad bytes
                self._drop()
                result = OpResult(kind, start, loop.time(), "corrupt", detail=f"unparseable content: {exc!r}")
            result.start = start
            result.end = loop.time()
            self.ctx.record(result)
            await asyncio.sleep(self.rng.uniform(*THINK_S))

    async def exchange(self, kind: str, data: bytes, method: bytes = b"GET", body_source: Any = None,
                       on_chunk: Any = None) -> tuple[Any, OpResult]:
        conn = await self._conn()
        conn.exchanges += 1
        self.last_conn_uses = conn.exchanges
        conn.writer.write(data)
        up = 0
        sender: asyncio.Task[int] | None = None
        if body_source is not None:
            # The body goes up while the answer is awaited: Ollama may answer before reading it all.
            sender = asyncio.get_running_loop().create_task(body_source(conn.writer))
        else:
            await conn.writer.drain()
        try:
            resp = await read_response(conn.reader, method, on_chunk=on_chunk)
        finally:
            if sender is not None:
                if not sender.done():
                    sender.cancel()
                try:
                    up = await sender
                except (asyncio.CancelledError, ConnectionError, OSError):
                    pass
        if resp.close or not resp.complete:
            self._drop()
        rid = (resp.header(b"x-request-id") or b"").decode("latin-1")
        res = OpResult(kind, 0, 0, "ok", resp.status, rid, resp.complete, hashlib.sha256(resp.body_raw).hexdigest(),
                       len(resp.body_raw), up)
        if not resp.complete:
            res.outcome, res.detail = "cut", f"{resp.status} response ended after {len(resp.body_raw)} body bytes"
        return resp, res

    async def op(self, kind: str) -> OpResult:
        rng = self.rng
        ctx = self.ctx
        if kind in ("version", "tags"):
            resp, res = await self.exchange(kind, _get(f"/api/{kind}", KEY))
            if res.outcome == "ok":
                if resp.status != 200:
                    res.outcome, res.detail = "status", f"{resp.status} {resp.body[:200]!r}"
                elif resp.body != ctx.small_bodies[kind]:
                    res.outcome, res.detail = "corrupt", f"body differs: {resp.body[:200]!r}"
            return res
        if kind in ("badkey", "nokey"):
            key = BAD_KEY if kind == "badkey" else None
            if rng.random() < 0.5:
                data, method = _get("/api/tags", key), b"GET"
            else:
                data, method = _post("/api/generate", b'{"model":"llama3.2","prompt":"x"}', key), b"POST"
            resp, res = await self.exchange(kind, data, method)
            if res.outcome == "ok" and (resp.status != 401 or b'"error"' not in resp.body):
                res.outcome, res.detail = "status", f"expected 401, got {resp.status} {resp.body[:200]!r}"
            return res
        if kind in ("generate", "generate-nostream", "v1chat"):
            n = rng.randint(4, 48)
            gap = rng.choice(GAPS_MS)
            stream = kind != "generate-nostream"
            if kind == "v1chat":
                body = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                                   "stream": True, "max_tokens": n, "fake_gap_ms": gap}).encode()
                path = "/v1/chat/completions"
            else:
                body = json.dumps({"model": "llama3.2", "prompt": f"soak {self.wid} {self.ops}", "stream": stream,
                                   "options": {"num_predict": n, "fake_gap_ms": gap if stream else 1}}).encode()
                path = "/api/generate"
            resp, res = await self.exchange(kind, _post(path, body, KEY), b"POST")
            if res.outcome == "ok":
                if resp.status != 200:
                    res.outcome, res.detail = "status", f"{resp.status} {resp.body[:200]!r}"
                    return res
                if kind == "v1chat":
                    problem = check_v1_stream(resp.chunks, n)
                elif stream:
                    problem = check_generate_stream(resp.chunks, n)
                else:
                    item = json.loads(resp.body)
                    text = "".join(f"tok{i} " for i in range(n))
                    problem = "" if item.get("response") == text and item.get("done") is True else \
                        f"body {resp.body[:200]!r}"
                if problem:
                    res.outcome, res.detail = "corrupt", problem
            return res
        if kind == "vanish":
            n = 200
            stop_after = rng.randint(1, 20)
            rst = rng.random() < 0.5
            body = json.dumps({"model": "llama3.2", "prompt": "vanish", "options": {"num_predict": n,
                                                                                   "fake_gap_ms": 10}}).encode()

            class Vanish(Exception):
                pass

            def on_chunk(resp: Any, payload: bytes) -> None:
                if len(resp.chunks) >= stop_after:
                    raise Vanish(resp.header(b"x-request-id"))

            try:
                resp, res = await self.exchange(kind, _post("/api/generate", body, KEY), b"POST", on_chunk=on_chunk)
            except Vanish as v:
                self._drop(rst)
                rid = (v.args[0] or b"").decode("latin-1")
                return OpResult(kind, 0, 0, "vanished", 200, rid, False, detail=f"left after {stop_after} chunks")
            res.outcome, res.detail = ("status" if resp.status != 200 else res.outcome), "stream ended before we left"
            return res
        if kind in ("blob", "blob-again"):
            if kind == "blob-again" and self.last_blob is not None:
                # An upload Ollama already has (`ollama create` run twice): it answers 200 from the digest alone,
                # before reading the body (201 if it restarted since and forgot the blob).
                digest, payload = self.last_blob
            else:
                size = rng.randint(1 * MiB, 3 * MiB)
                prefix = f"soak-blob {self.ctx.seed} {self.wid} {self.ops} ".encode().ljust(64, b".")
                payload = prefix + ctx.pattern[:size - len(prefix)]
                digest = hashlib.sha256(payload).hexdigest()
                self.last_blob = (digest, payload)
            chunked = rng.random() < 0.5
            framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(payload)}"
            head = (f"POST /api/blobs/sha256:{digest} HTTP/1.1\r\nHost: soak\r\nX-API-Key: {KEY}\r\n"
                    f"Content-Type: application/octet-stream\r\n{framing}\r\n\r\n").encode()
            piece = 64 * 1024 if kind == "blob-again" else rng.choice((64 * 1024, 256 * 1024, 1 * MiB))

            async def send(writer: asyncio.StreamWriter) -> int:
                view = memoryview(payload)
                for off in range(0, len(payload), piece):
                    if off and kind == "blob-again":
                        # Give an early answer (Ollama has the blob) a moment to arrive after the first piece, and
                        # stop sending if it did, as HTTP clients do. Writing on into a connection fastgate closes
                        # would make asyncio drop the answer before we parse it (a client artifact, not a loss).
                        for _ in range(50):
                            if self.conn is None or self.conn.reader._buffer:  # noqa: SLF001
                                return off
                            await asyncio.sleep(0.01)
                    part = view[off:off + piece]
                    if chunked:
                        writer.writelines([b"%x\r\n" % len(part), part, b"\r\n"])
                    else:
                        writer.write(part)
                    await writer.drain()
                if chunked:
                    writer.write(b"0\r\n\r\n")
                return len(payload)

            resp, res = await self.exchange(kind, head, b"POST", body_source=send)
            expected = (200, 201) if kind == "blob-again" else (201,)
            if res.outcome == "ok" and resp.status not in expected:
                res.outcome, res.detail = "status", f"expected {expected}, got {resp.status} {resp.body[:200]!r}"
            if resp.status == 200:
                self._drop()  # the rest of our upload is unread: fastgate closes this connection
            return res
        raise AssertionError(kind)


# ---------------------------------------------------------------------------------------------------------
# The run

@dataclass
class Soak:
    seed: int
    minutes: float
    concurrency: int
    restarts: int
    out_dir: Path
    fastgate: Proc = field(init=False)
    upstream: Proc = field(init=False)
    stopping: bool = False
    results: list[OpResult] = field(default_factory=list)
    windows: list[tuple[float, float]] = field(default_factory=list)
    restart_log: list[dict[str, Any]] = field(default_factory=list)
    samples: list[tuple[float, int, int, int, int]] = field(default_factory=list)  # t, rss, fds, client, upstream
    fatal: list[str] = field(default_factory=list)
    t0: float = 0.0

    def __post_init__(self) -> None:
        self.small_bodies = _expected_small_bodies()
        self.pattern = random.Random(f"{self.seed}:blob").randbytes(4 * MiB)
        self.upstream_port = free_port()
        self.digest_log = self.out_dir / "upstream-digests.log"
        self.digest_log.write_bytes(b"")

    def upstream_proc(self) -> Proc:
        return Proc("fake-ollama", [sys.executable, "-m", "bench.reliability", "upstream", "--port",
                                    str(self.upstream_port), "--digest-log", str(self.digest_log)],
                    self.out_dir / "upstream.log")

    def record(self, r: OpResult) -> None:
        self.results.append(r)

    def during_restart(self, r: OpResult) -> bool:
        return any(r.start <= b and r.end >= a for a, b in self.windows)

    async def restarter(self, duration: float) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(f"{self.seed}:restarts")
        for k in range(self.restarts):
            at = self.t0 + (k + 1) * duration / (self.restarts + 1)
            await asyncio.sleep(max(0.0, at - loop.time()))
            if self.stopping:
                return
            sig = signal.SIGKILL if k % 2 == 0 else signal.SIGTERM
            down_at = loop.time()
            self.upstream.signal(sig)
            await loop.run_in_executor(None, self.upstream.proc.wait)  # type: ignore[union-attr]
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            proc = self.upstream_proc()
            await loop.run_in_executor(None, proc.start)
            self.upstream = proc
            up_at = loop.time()
            self.windows.append((down_at, up_at + RESTART_GRACE_S))
            self.restart_log.append({"at_s": round(down_at - self.t0, 1), "signal": sig.name,
                                     "down_s": round(up_at - down_at, 2)})

    async def sampler(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            kinds = self.fastgate.fd_kinds(self.fastgate.port, self.upstream_port)
            self.samples.append((loop.time() - self.t0, self.fastgate.rss_kib(), self.fastgate.fds(), kinds["client"],
                                 kinds["upstream"]))
            if not self.fastgate.alive():
                self.fatal.append(f"fastgate exited with {self.fastgate.returncode} during the run")
                self.stopping = True
                return
            await asyncio.sleep(1.0)

    async def main(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        duration = self.minutes * 60.0
        self.t0 = loop.time()
        clients = [Client(self, i) for i in range(self.concurrency)]
        sampler = loop.create_task(self.sampler())
        restarter = loop.create_task(self.restarter(duration))
        tasks = [loop.create_task(c.run()) for c in clients]
        try:
            await asyncio.sleep(duration)
        finally:
            self.stopping = True
        done, pending = await asyncio.wait(tasks, timeout=OP_TIMEOUT_S + 5)
        for t in pending:
            t.cancel()
        for t in done:
            if t.exception() is not None:
                self.fatal.append(f"client task failed: {t.exception()!r}")
        restarter.cancel()
        await sampler
        for c in clients:
            c._drop()
        load_end = loop.time() - self.t0
        # Quiet: every client connection closed; fastgate should hold no client socket, and once its pool's
        # idle timeout has passed no upstream socket either: back to its idle footprint.
        await asyncio.sleep(3.0)
        quiet = {"rss_kib": self.fastgate.rss_kib(), "fds": self.fastgate.fds(),
                 **self.fastgate.fd_kinds(self.fastgate.port, self.upstream_port)}
        await asyncio.sleep(2 * POOL_IDLE_S + 2.0)  # the pool sweeps every POOL_IDLE_S
        idle = {"rss_kib": self.fastgate.rss_kib(), "fds": self.fastgate.fds(),
                **self.fastgate.fd_kinds(self.fastgate.port, self.upstream_port)}
        return {"load_seconds": round(load_end, 1), "after_drain": quiet, "after_pool_idle": idle}


def health(port: int) -> dict[str, Any]:
    """fastgate's /health, with its own state (shown to admin keys; config keys are admins)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nConnection: close\r\n\r\n" % KEY.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def analyse(ctx: Soak, extra: dict[str, Any], idle: dict[str, int], stop: tuple[int | None, float],
            h: dict[str, Any], machine: dict[str, Any], log_errors: list[str], log_warnings: list[str]) -> dict[str, Any]:
    upstream = read_digest_log(ctx.digest_log)
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    failures: list[dict[str, Any]] = []
    bytes_down = bytes_up = 0
    verified = verified_bytes = 0
    corrupted = corrupted_bytes = 0
    unverifiable = 0
    lost = lost_bytes = 0
    seen_rids: set[str] = set()
    visible_failures = 0

    def fail(r: OpResult, why: str) -> None:
        if len(failures) < 200:
            failures.append({"kind": r.kind, "outcome": r.outcome, "why": why, "status": r.status, "rid": r.rid,
                             "at_s": round(r.start - ctx.t0, 2), "detail": r.detail[:300]})

    paths = {"generate": "/api/generate", "generate-nostream": "/api/generate", "vanish": "/api/generate",
             "v1chat": "/v1/chat/completions", "version": "/api/version", "tags": "/api/tags", "blob": "/api/blobs/",
             "blob-again": "/api/blobs/"}
    for r in ctx.results:
        by_kind[r.kind][r.outcome] += 1
        bytes_down += r.body_bytes
        bytes_up += r.up_bytes
        if r.rid:
            seen_rids.add(r.rid)
        # What the upstream wrote for this request: same X-Request-Id, same path (request ids are random 32-bit
        # numbers, so an unrelated request may share one), same status. fastgate's own answers have none.
        path = paths.get(r.kind)
        entries = [e for e in upstream.get(r.rid, []) if path and e.path.startswith(path)] if r.rid else []
        relayed = any(e.status == r.status for e in entries)
        if r.outcome == "ok" and r.complete and relayed:
            if any(e.complete and e.sha256 == r.sha256 and e.size == r.body_bytes for e in entries):
                verified += 1
                verified_bytes += r.body_bytes
            else:
                corrupted += 1
                corrupted_bytes += r.body_bytes
                fail(r, "complete response differs from what the upstream wrote "
                        f"(client {r.body_bytes} bytes {r.sha256[:12]}, upstream "
                        f"{[(e.size, e.sha256[:12], e.complete) for e in entries]})")
        elif r.outcome == "ok" and r.complete and path:
            # A clean end with nothing to compare it with proves nothing: a failure, never a pass. (The upstream
            # logs a response right after its last write; only a SIGKILL in between could explain one.)
            unverifiable += 1
            fail(r, "complete response, but the upstream logged none under its X-Request-Id, path and status "
                    f"(logged for that id: {[(e.path, e.status, e.size) for e in upstream.get(r.rid, [])][:4]}): "
                    "it cannot be verified")
        if r.outcome == "corrupt":
            corrupted += 1
            corrupted_bytes += r.body_bytes
            fail(r, "response ended cleanly but its content is wrong")
        elif r.outcome == "timeout":
            fail(r, "no end within the deadline")
        elif r.outcome in ("cut", "status", "conn-error"):
            visible_failures += 1
            if not ctx.during_restart(r):
                fail(r, "failed outside an upstream restart")
            # A response the upstream finished but the client did not get whole: lost bytes.
            done = [e for e in entries if e.complete]
            if done and r.outcome == "cut":
                lost += 1
                lost_bytes += done[0].size - r.body_bytes
                if not ctx.during_restart(r):
                    fail(r, f"upstream wrote the whole response ({done[0].size} bytes), client got {r.body_bytes}")
    # Responses the upstream completed that no client ever saw the head of (vanished clients excluded).
    vanished = {r.rid for r in ctx.results if r.outcome == "vanished"}
    unseen = [e for rid, es in upstream.items() for e in es
              if e.complete and rid not in seen_rids and rid not in vanished and rid != "-"]
    for e in unseen[:20]:
        failures.append({"kind": "upstream", "outcome": "unseen", "why": "the upstream completed a response no "
                         "client received", "rid": e.rid, "detail": f"{e.method} {e.path} {e.status} {e.size} bytes"})
    lost += len(unseen)
    lost_bytes += sum(e.size for e in unseen)

    # Memory and descriptors.
    samples = ctx.samples
    load_s = extra["load_seconds"]
    warmup = min(60.0, 0.2 * load_s)

    def at(t: float) -> tuple[float, int, int, int, int]:
        return min(samples, key=lambda s: abs(s[0] - t)) if samples else (0.0, 0, 0, 0, 0)

    post = [s for s in samples if s[0] >= warmup]
    second_half = [s for s in samples if s[0] >= load_s / 2]
    rss = {"start_kib": samples[0][1] if samples else 0, "after_warmup_kib": at(warmup)[1],
           "end_kib": samples[-1][1] if samples else 0, "after_drain_kib": extra["after_drain"]["rss_kib"],
           "max_kib": max((s[1] for s in samples), default=0),
           "slope_post_warmup_kib_per_min": round(slope_per_min([(s[0], s[1]) for s in post]), 1),
           "slope_second_half_kib_per_min": round(slope_per_min([(s[0], s[1]) for s in second_half]), 1)}
    drain, pool_idle = extra["after_drain"], extra["after_pool_idle"]
    fds = {"idle_before": idle["fds"], "start": samples[0][2] if samples else 0, "after_warmup": at(warmup)[2],
           "end": samples[-1][2] if samples else 0, "after_drain": drain["fds"],
           "after_pool_idle": pool_idle["fds"], "max": max((s[2] for s in samples), default=0),
           "kinds_after_drain": {k: drain[k] for k in ("listener", "client", "upstream", "other-socket", "other")},
           "kinds_after_pool_idle": {k: pool_idle[k] for k in ("listener", "client", "upstream", "other-socket",
                                                               "other")},
           "clients_max": max((s[3] for s in samples), default=0),
           "upstream_max": max((s[4] for s in samples), default=0),
           "slope_post_warmup_per_min": round(slope_per_min([(s[0], s[2]) for s in post]), 2),
           "slope_second_half_per_min": round(slope_per_min([(s[0], s[2]) for s in second_half]), 2)}
    flags = []
    threshold = max(512.0, 0.01 * rss["after_warmup_kib"])
    if rss["slope_second_half_kib_per_min"] > threshold and rss["end_kib"] - rss["after_warmup_kib"] > 1024:
        flags.append(f"RSS grows {rss['slope_second_half_kib_per_min']} KiB/min over the second half "
                     f"(threshold {threshold:.0f})")
    if drain["client"]:
        flags.append(f"{drain['client']} client sockets still open 3 s after every client left")
    if fds["after_pool_idle"] > fds["idle_before"]:
        flags.append(f"{fds['after_pool_idle']} fds once the pool idled out vs {fds['idle_before']} before the run "
                     f"({fds['kinds_after_pool_idle']})")
    if fds["slope_second_half_per_min"] > 2.0 and fds["after_pool_idle"] > fds["idle_before"]:
        flags.append(f"fds grow {fds['slope_second_half_per_min']}/min over the second half")
    health_f = h.get("fastgate", {})
    if not health_f:
        flags.append(f"/health after the run did not report fastgate's state: {h}")
    elif health_f.get("connections", 0) > 1 or health_f.get("in_flight", 0):
        flags.append(f"/health after the run: {health_f}")

    requests = len(ctx.results)
    timeline: Counter[int] = Counter(int((r.end - ctx.t0) // 10) * 10 for r in ctx.results)
    summary = {
        "seed": ctx.seed, "minutes": ctx.minutes, "concurrency": ctx.concurrency, "machine": machine,
        "mix": dict(MIX), "git": git_state(),
        "load_seconds": load_s, "requests": requests, "requests_per_s": round(requests / max(load_s, 1e-9), 1),
        "bytes_down": bytes_down, "bytes_up": bytes_up,
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "verified_responses": verified, "verified_bytes": verified_bytes,
        "corrupted_responses": corrupted, "corrupted_bytes": corrupted_bytes,
        "lost_responses": lost, "lost_bytes": lost_bytes, "unverifiable_responses": unverifiable,
        "visible_failures": visible_failures,
        "visible_failures_outside_restarts": sum(1 for r in ctx.results
                                                 if r.outcome in ("cut", "status", "conn-error")
                                                 and not ctx.during_restart(r)),
        "timeouts": sum(1 for r in ctx.results if r.outcome == "timeout"),
        "upstream_restarts": ctx.restart_log, "upstream_responses_logged": sum(len(v) for v in upstream.values()),
        "rss": rss, "fds": fds, "flags": flags, "health_after": health_f,
        "fastgate_exit": {"code": stop[0], "seconds": round(stop[1], 2)},
        "fastgate_log_errors": log_errors[:40], "fastgate_log_warnings": len(log_warnings),
        "fatal": ctx.fatal, "failures": failures,
        "timeline_requests_per_10s": [timeline.get(t, 0) for t in range(0, int(load_s) + 10, 10)],
        "samples": [[round(t, 1), r, f, c, u] for t, r, f, c, u in samples],
        "samples_columns": ["seconds", "rss_kib", "fds", "client_sockets", "upstream_sockets"],
    }
    summary["ok"] = not (corrupted or lost or unverifiable or failures or ctx.fatal or log_errors or stop[0] != 0)
    return summary


def render_markdown(s: dict[str, Any]) -> str:
    m = s["machine"]
    rss, fds = s["rss"], s["fds"]
    lines = [
        f"# soak run: {s['minutes']:g} min, concurrency {s['concurrency']}, seed {s['seed']}",
        "",
        f"{m['date']}; {m['nproc']} CPUs ({m['cpu_model']}), load {m['loadavg']}, Python {m['python']}; "
        f"fastgate at {s['git']}",
        "",
        "Mix (weights): " + ", ".join(f"{k} {v}" for k, v in s["mix"].items()),
        "",
        "| figure | value |", "| --- | --- |",
        f"| traffic | {s['load_seconds']} s, {s['requests']} requests ({s['requests_per_s']}/s) |",
        f"| bytes relayed | {s['bytes_down']} down (response bodies), {s['bytes_up']} up (blob uploads) |",
        f"| responses verified byte for byte | {s['verified_responses']} ({s['verified_bytes']} bytes) |",
        f"| corrupted (clean end, wrong bytes) | {s['corrupted_responses']} responses, {s['corrupted_bytes']} bytes |",
        f"| lost (upstream finished, client did not get it) | {s['lost_responses']} responses, {s['lost_bytes']} bytes |",
        f"| unverifiable (clean end, no upstream record: each a failure) | {s['unverifiable_responses']} |",
        f"| visible failures (cut / 502 / reset) | {s['visible_failures']}, outside restart windows: "
        f"{s['visible_failures_outside_restarts']} |",
        f"| timeouts | {s['timeouts']} |",
        f"| upstream restarts | {len(s['upstream_restarts'])}: "
        + ", ".join(f"{r['signal']} at {r['at_s']} s ({r['down_s']} s down)" for r in s["upstream_restarts"]) + " |",
        f"| RSS start / after warm-up / end / after drain | {rss['start_kib']} / {rss['after_warmup_kib']} / "
        f"{rss['end_kib']} / {rss['after_drain_kib']} KiB (max {rss['max_kib']}) |",
        f"| RSS slope post-warm-up / second half | {rss['slope_post_warmup_kib_per_min']} / "
        f"{rss['slope_second_half_kib_per_min']} KiB/min |",
        f"| fds idle before / start / after warm-up / end / 3 s after drain / pool idle | {fds['idle_before']} / "
        f"{fds['start']} / {fds['after_warmup']} / {fds['end']} / {fds['after_drain']} / {fds['after_pool_idle']} "
        f"(max {fds['max']}; at most {fds['clients_max']} client and {fds['upstream_max']} upstream sockets) |",
        f"| fd slope post-warm-up / second half | {fds['slope_post_warmup_per_min']} / "
        f"{fds['slope_second_half_per_min']} per min |",
        f"| fastgate on SIGTERM | exit {s['fastgate_exit']['code']} in {s['fastgate_exit']['seconds']} s |",
        f"| fastgate log | {len(s['fastgate_log_errors'])} error lines, {s['fastgate_log_warnings']} warnings |",
        "",
        "Requests by scenario and outcome: " + "; ".join(
            f"{k} " + ", ".join(f"{o} {n}" for o, n in v.items()) for k, v in s["by_kind"].items()),
        "",
        f"Flags: {'; '.join(s['flags']) if s['flags'] else 'none (no RSS or fd growth)'}",
        "",
        f"**Verdict: {'PASS' if s['ok'] else 'FAIL'}**",
    ]
    if s["failures"] or s["fatal"] or s["fastgate_log_errors"]:
        lines += ["", "## Failures", ""]
        lines += [f"- fatal: {f}" for f in s["fatal"]]
        lines += [f"- {f.get('kind')} {f.get('outcome')} at {f.get('at_s')} s (rid {f.get('rid')}): {f['why']}; "
                  f"{f.get('detail', '')}" for f in s["failures"][:30]]
        lines += [f"- fastgate log: {e}" for e in s["fastgate_log_errors"][:10]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="traffic duration (default 10)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"scenario seed (default {DEFAULT_SEED})")
    p.add_argument("--restarts", type=int, default=None,
                   help="upstream kills/restarts during the run (default: 3, or 0.4 per minute if more)")
    p.add_argument("--mix", metavar="NAME=W,...", default="",
                   help="change scenario weights, e.g. blob-again=0 (scenarios: " + ", ".join(MIX) + ")")
    p.add_argument("--out", help="results directory (default bench/results/soak-<timestamp>)")
    args = p.parse_args(argv)
    for item in filter(None, args.mix.split(",")):
        name, _, weight = item.partition("=")
        if name not in MIX or not weight.isdigit():
            p.error(f"--mix: expected NAME=INTEGER with NAME one of {', '.join(MIX)}, got {item!r}")
        MIX[name] = int(weight)
    restarts = args.restarts if args.restarts is not None else max(3, round(args.minutes * 0.4))
    out_dir = Path(args.out) if args.out else results_dir("soak")
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(f"soak: {args.minutes:g} min, concurrency {args.concurrency}, seed {args.seed}, {restarts} upstream "
          f"restarts; results in {out_dir}", flush=True)
    ctx = Soak(args.seed, args.minutes, args.concurrency, restarts, out_dir)
    ctx.upstream = ctx.upstream_proc().start()
    config = fastgate_config(out_dir / "fastgate.toml", port=free_port(), upstream_port=ctx.upstream_port,
                             keys={KEY: "soak"}, read_timeout=30.0, connect_timeout=2.0, shutdown_grace=10.0,
                             pool_idle_timeout=POOL_IDLE_S)
    stop: tuple[int | None, float] = (None, 0.0)
    try:
        ctx.fastgate = start_fastgate(config, out_dir / "fastgate.log")
        time.sleep(1.0)
        idle = {"rss_kib": ctx.fastgate.rss_kib(), "fds": ctx.fastgate.fds()}
        extra = asyncio.run(ctx.main())
        try:
            h = health(ctx.fastgate.port)
        except (OSError, ValueError) as exc:
            h = {"error": repr(exc)}
        stop = ctx.fastgate.stop()
    finally:
        if hasattr(ctx, "fastgate") and ctx.fastgate.alive():
            ctx.fastgate.kill()
        ctx.upstream.stop()
    log_errors, log_warnings = log_problems(ctx.fastgate.log_since_start())
    summary = analyse(ctx, extra, idle, stop, h, machine, log_errors, log_warnings)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    md = render_markdown(summary)
    (out_dir / "summary.md").write_text(md)
    print(md)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
