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

With `--attackers N`, a second process runs an attacker mix beside the honest clients, each attack at a low
rate and from its own loopback addresses (127.0.0.2-50 and 127.0.2.0/24-127.0.9.0/24, never the honest
clients' 127.0.0.1): keyless bodies held one byte short of their end to spend the body budget, thousands of
duplicate `"api_key"` members, bodies trickled a byte every 3 s, a client pipelining requests and never
reading, bare TCP connects, `/health` floods, 1-byte chunked bodies, wrong keys from 49 addresses, and decoy
model fields with a valid key. What each attacker got is checked against what fastgate promises, and the
honest clients' latency (p50/p99 of small requests, time to first token) and errors are reported, so that
runs with and without attackers (same seed, same length) can be compared. See bench/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
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
# fastgate's config for every soak run, with or without attackers (so the two can be compared): the timeouts
# the attacks meet are short enough for several rounds in a short run, the body budget small enough to be
# spent by a few held bodies, and the key-guessing limiter on (its default: 10 wrong keys per address per 60 s).
HEADER_TIMEOUT_S = 10.0
KEEPALIVE_TIMEOUT_S = 20.0
MAX_BODY_BYTES = 4 * MiB
MAX_BUFFERED_BYTES = 16 * MiB
MAX_FAILURES = 10
FAILURE_WINDOW_S = 60.0
# Honest clients' wrong keys come from these addresses in turn, a few per address and minute, so the limiter
# never locks one and they keep getting 401 (from 127.0.0.1, they would lock every honest client out).
HONEST_BADKEY_NET = "127.0.1"


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
    ttft: float = -1.0  # streams: seconds from the request's last byte written to the first chunk


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.exchanges = 0

    @classmethod
    async def open(cls, port: int, local: str | None = None) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20,
                                                       local_addr=(local, 0) if local else None)
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
        self.conn_other: Conn | None = None  # a one-request connection from another address (wrong keys)

    async def _conn(self) -> Conn:
        if self.conn is None:
            self.conn = await Conn.open(self.ctx.fastgate.port)
        return self.conn

    def _drop(self, rst: bool = False) -> None:
        if self.conn is not None:
            self.conn.abort(rst)
            self.conn = None
        if self.conn_other is not None:
            self.conn_other.abort()
            self.conn_other = None

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
                       on_chunk: Any = None, local: str | None = None) -> tuple[Any, OpResult]:
        """One request and its answer on the worker's connection, or with `local` on a connection of its own
        from that address, closed after the answer."""
        if local is not None:
            self.conn_other = conn = await Conn.open(self.ctx.fastgate.port, local)
        else:
            conn = await self._conn()
        try:
            return await self._exchange(conn, kind, data, method, body_source, on_chunk)
        finally:
            if local is not None:
                conn.writer.close()
                self.conn_other = None

    async def _exchange(self, conn: Conn, kind: str, data: bytes, method: bytes, body_source: Any,
                        on_chunk: Any) -> tuple[Any, OpResult]:
        loop = asyncio.get_running_loop()
        conn.exchanges += 1
        self.last_conn_uses = conn.exchanges
        conn.writer.write(data)
        up = 0
        sender: asyncio.Task[int] | None = None
        if body_source is not None:
            # The body goes up while the answer is awaited: Ollama may answer before reading it all.
            sender = loop.create_task(body_source(conn.writer))
        else:
            await conn.writer.drain()
        sent_at = loop.time()
        first_chunk: list[float] = []

        def chunk_hook(resp: Any, payload: bytes) -> None:
            if not first_chunk:
                first_chunk.append(loop.time())
            if on_chunk is not None:
                on_chunk(resp, payload)

        try:
            resp = await read_response(conn.reader, method, on_chunk=chunk_hook)
        finally:
            if sender is not None:
                if not sender.done():
                    sender.cancel()
                try:
                    up = await sender
                except (asyncio.CancelledError, ConnectionError, OSError):
                    pass
        if (resp.close or not resp.complete) and conn is self.conn:
            self._drop()
        rid = (resp.header(b"x-request-id") or b"").decode("latin-1")
        res = OpResult(kind, 0, 0, "ok", resp.status, rid, resp.complete, hashlib.sha256(resp.body_raw).hexdigest(),
                       len(resp.body_raw), up)
        if first_chunk:
            res.ttft = first_chunk[0] - sent_at
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
            # Wrong keys go on a connection of their own from one of 254 addresses in turn (see HONEST_BADKEY_NET)
            local = ctx.honest_badkey_address() if kind == "badkey" else None
            resp, res = await self.exchange(kind, data, method, local=local)
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
# Attackers (--attackers N): their own process (`python -m bench.soak attack ...`, started and stopped here by
# PID), so their work never slows the event loop that times the honest clients. Each attack runs at a low rate
# from loopback addresses of its own; what each got is recorded and judged against what fastgate promises.

ATTACKS = {  # attack -> instances per --attackers unit
    "hold-body": 1,     # keyless bodies held one byte short of their end: the body budget (503 + Retry-After)
    "dup-keys": 1,      # keyless POST /auth and /api/chat with thousands of duplicate "api_key" members
    "slow-body": 2,     # keyless body, one byte every 3 s: cut (408) at the header timeout
    "pipeline": 1,      # pipelines GET / and never reads: cut once it took nothing for keepalive_timeout
    "connect": 1,       # bare TCP connects that send nothing: closed at the header timeout
    "health-flood": 1,  # GET /health from 8 connections, 5 s bursts: Ollama probed at most once per second
    "tiny-chunks": 1,   # keyless bodies of 1-byte chunks: a whole one (401), an endless one (413, 503 if budget spent)
    "guess": 1,         # wrong keys from 127.0.0.2-50, 12 per address, then the right key: 429 once locked
    "decoy": 1,         # valid key, {"format":{"model":"spoof"},"model":"llama3.2:latest"}: the real model counts
}
ATTACK_NETS = {name: f"127.0.{i + 2}" for i, name in enumerate(a for a in ATTACKS if a != "guess")}
GUESS_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 51)]
HOLD_BODY_BYTES = 3 * MiB
ATTACK_LEAD_S = 3.0  # the attacker process is started this long before the run, and waits for its start
SLACK_S = 3.0  # timing slack on a shared 2-core machine for "cut at the deadline"
DECOY_BODY = (b'{"format":{"model":"spoof"},"model":"llama3.2:latest","messages":[{"role":"user","content":"hi"}],'
              b'"stream":false,"options":{"num_predict":4,"fake_gap_ms":1}}')
PIPELINED = b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n"


def _count_option(text: str, names: dict[str, int], what: str) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in names or not value.isdigit():
            raise ValueError(f"{what}: expected NAME=INTEGER with NAME one of {', '.join(names)}, got {item!r}")
        out[name] = int(value)
    return out


class Attackers:
    """The attacker mix, in the attacker process. Every loop ends by `deadline` (monotonic clock, shared with
    the soak process: asyncio's loop time is time.monotonic())."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.port: int = cfg["port"]
        self.t0: float = cfg["t0"]
        self.deadline: float = cfg["t0"] + cfg["seconds"]
        self.key: str = cfg["key"]
        self.counts: dict[str, int] = cfg["counts"]
        self.rng = random.Random(f"{cfg['seed']}:attackers")
        self.events: list[dict[str, Any]] = []
        self.tallies: dict[str, Counter[str]] = defaultdict(Counter)  # high-volume attacks: outcome counts only
        self.rids: list[str] = []  # X-Request-Ids of attacker requests fastgate forwarded (the soak's lost check)
        self.flood_bursts: list[tuple[float, float]] = []
        self.guess_next = 0
        self.dup_next = 0
        self.stop_flag = threading.Event()

    # -- helpers ------------------------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic()

    def left(self) -> float:
        return self.deadline - self.now()

    def record(self, kind: str, started: float, outcome: str, ok: bool, detail: str = "", **extra: Any) -> None:
        self.events.append({"kind": kind, "at_s": round(started - self.t0, 2),
                            "seconds": round(self.now() - started, 3), "outcome": outcome, "ok": ok,
                            "detail": detail[:300], **extra})

    async def sleep(self, seconds: float) -> bool:
        """Sleep, but not past the deadline; False once the run is over."""
        seconds = min(seconds, self.left())
        if seconds > 0:
            await asyncio.sleep(seconds)
        return self.left() > 0

    async def open(self, local: str, limit: int = 1 << 20) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, local_addr=(local, 0), limit=limit)

    async def answer(self, reader: asyncio.StreamReader, timeout: float, method: bytes = b"GET") -> Any:
        """The next response, None when the connection ended without one. Raises asyncio.TimeoutError."""
        try:
            return await asyncio.wait_for(read_response(reader, method), timeout)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            return None

    def keep_rid(self, resp: Any) -> None:
        rid = resp.header(b"x-request-id") if resp is not None else None
        if rid:
            self.rids.append(rid.decode("latin-1"))

    # -- the attacks --------------------------------------------------------------------------------------

    async def hold_body(self, idx: int) -> None:
        """Waves of keyless bodies of 3 MiB sent but for their last byte: more at once than the budget holds
        (auth.max_buffered_bytes). Those past it must get 503 with Retry-After at once; the rest 408 once the
        header timeout after their first byte has passed (a keyless request must be whole by then)."""
        holders = MAX_BUFFERED_BYTES // HOLD_BODY_BYTES + 2
        wave = 0
        while self.left() > HEADER_TIMEOUT_S + SLACK_S:
            wave += 1
            outcomes = await asyncio.gather(*(self._hold_one(f"{ATTACK_NETS['hold-body']}.{idx * 16 + i + 1}", wave)
                                              for i in range(holders)))
            refused = sum(1 for o in outcomes if o == "503")
            if refused == 0:
                self.record("hold-body", self.now(), "wave without a 503", False,
                            f"wave {wave}: {holders} bodies of {HOLD_BODY_BYTES} bytes, budget {MAX_BUFFERED_BYTES}: "
                            f"{outcomes}")
            if not await self.sleep(5.0):
                return

    async def _hold_one(self, local: str, wave: int) -> str:
        started = self.now()
        reader, writer = await self.open(local)
        try:
            prefix = b'{"messages":"'
            head = (b"POST /api/chat HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % HOLD_BODY_BYTES)
            writer.write(head + prefix + b"x" * (HOLD_BODY_BYTES - 1 - len(prefix)))  # all but the last byte
            try:
                resp = await self.answer(reader, HEADER_TIMEOUT_S + 2 * SLACK_S, b"POST")
            except asyncio.TimeoutError:
                self.record("hold-body", started, "no answer", False, f"wave {wave}: held past the header timeout")
                return "none"
            took = self.now() - started
            if resp is None:
                self.record("hold-body", started, "closed without answer", False, f"wave {wave}")
                return "closed"
            if resp.status == 503:
                ok = resp.header(b"retry-after") is not None and took < SLACK_S
                self.record("hold-body", started, "503", ok, f"wave {wave}" + ("" if ok else
                            f": Retry-After {resp.header(b'retry-after')!r}, after {took:.2f} s"),
                            retry_after=(resp.header(b"retry-after") or b"").decode())
                return "503"
            ok = resp.status == 408 and took <= HEADER_TIMEOUT_S + SLACK_S
            self.record("hold-body", started, str(resp.status), ok, f"wave {wave}: {resp.body[:120]!r}")
            return str(resp.status)
        finally:
            writer.transport.abort()

    async def dup_keys(self, idx: int) -> None:
        """Keyless bodies holding thousands of `"api_key"` members, every 3 s: all wrong (401), or wrong but the
        last one right (as Go's decoder reads a body, the last duplicate wins: /auth 200, /api/chat forwarded
        with every member removed, 200); /auth reads at most 64 KiB (2500 members fit, 5000 get 413). Each from
        another address of its /24, so the limiter does not lock them (the guess attack covers that)."""
        variants = (("/auth", 2500, False, 401), ("/auth", 2500, True, 200), ("/api/chat", 20000, False, 401),
                    ("/api/chat", 5000, True, 200), ("/api/chat", 20000, True, 200), ("/auth", 5000, True, 413))
        n = 0
        while await self.sleep(3.0):
            path, members, right_last, expected = variants[n % len(variants)]
            n += 1
            self.dup_next += 1
            local = f"{ATTACK_NETS['dup-keys']}.{self.dup_next % 254 + 1}"
            body = (b"{" + b"".join(b'"api_key":"wrong-%06d",' % i for i in range(members - 1))
                    + (b'"api_key":"%s",' % (self.key if right_last else "wrong-last").encode())
                    + b'"model":"llama3.2","messages":[]}')
            started = self.now()
            reader, writer = await self.open(local)
            try:
                writer.write(b"POST %s HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % (path.encode(), len(body)) + body)
                try:
                    resp = await self.answer(reader, 30.0, b"POST")
                except asyncio.TimeoutError:
                    resp = None
                self.keep_rid(resp)
                status = resp.status if resp is not None else 0
                # While held bodies have spent the budget, any keyless body is refused with 503 + Retry-After,
                # this one too: what fastgate promises, and what an honest client sending its key in the body
                # would get as well (reported apart).
                spent = status == 503 and resp.header(b"retry-after") is not None
                self.record("dup-keys", started, "503 budget spent" if spent else str(status or "no answer"),
                            status == expected or spent, f"{members} members, {'right' if right_last else 'wrong'} "
                            f"key last, {path}, {len(body)} bytes; expected {expected}", path=path, members=members)
            finally:
                writer.transport.abort()

    async def slow_body(self, idx: int) -> None:
        """A keyless body trickled one byte every 3 s (each read well inside body_timeout): the whole request
        must arrive within the header timeout of its first byte, so 408 then, whatever the trickle."""
        local = f"{ATTACK_NETS['slow-body']}.{idx + 1}"
        while self.left() > HEADER_TIMEOUT_S + SLACK_S:
            started = self.now()
            reader, writer = await self.open(local)
            sent = 0
            try:
                writer.write(b"POST /api/chat HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 200\r\n\r\n{")
                task = asyncio.ensure_future(self.answer(reader, HEADER_TIMEOUT_S + 5 * SLACK_S, b"POST"))
                while not task.done():
                    try:
                        await asyncio.wait_for(asyncio.shield(task), 3.0)
                    except asyncio.TimeoutError:
                        if not task.done():
                            writer.write(b" ")
                            sent += 1
                try:
                    resp = task.result()
                except asyncio.TimeoutError:
                    self.record("slow-body", started, "not cut", False, f"{sent} bytes trickled, no answer")
                    continue
                took = self.now() - started
                status = resp.status if resp is not None else 0
                self.record("slow-body", started, str(status or "closed"),
                            status == 408 and took <= HEADER_TIMEOUT_S + SLACK_S,
                            f"{sent} bytes trickled after the head")
            finally:
                writer.transport.abort()
            if not await self.sleep(1.0):
                return

    async def pipeline(self, idx: int) -> None:
        """Pipelined `GET /` (answered by fastgate itself) sent as fast as it goes, never reading a byte, with a
        4 KiB receive buffer: fastgate must stop parsing while its answers are not taken, and cut the connection
        once nothing was taken for keepalive_timeout (min of it and its 60 s send timeout)."""
        local = f"{ATTACK_NETS['pipeline']}.{idx + 1}"
        while self.left() > KEEPALIVE_TIMEOUT_S + 2 * SLACK_S:
            await asyncio.to_thread(self._pipeline_once, local)
            if not await self.sleep(5.0):
                return

    def _pipeline_once(self, local: str) -> None:
        started = self.now()
        data = PIPELINED * 2048
        sent = 0
        last_progress = started
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.bind((local, 0))
            sock.settimeout(5.0)
            sock.connect(("127.0.0.1", self.port))
            sock.settimeout(0.5)
            view = memoryview(data)
            pos = 0
            while not self.stop_flag.is_set():
                try:
                    n = sock.send(view[pos:])
                except socket.timeout:
                    if self.now() - last_progress > KEEPALIVE_TIMEOUT_S + 4 * SLACK_S:
                        self.record("pipeline", started, "not cut", False,
                                    f"{sent} bytes sent, nothing taken for {self.now() - last_progress:.1f} s")
                        return
                    if self.left() <= 0:
                        return  # the run is over before the cut: not judged
                    continue
                except OSError as exc:  # reset by fastgate
                    stalled = self.now() - last_progress
                    self.record("pipeline", started, "cut", stalled <= KEEPALIVE_TIMEOUT_S + 2 * SLACK_S,
                                f"{type(exc).__name__} after {sent} bytes ({sent // len(PIPELINED)} requests), "
                                f"{stalled:.1f} s after the last byte fastgate took", stalled_s=round(stalled, 2),
                                bytes_sent=sent)
                    return
                sent += n
                pos = (pos + n) % len(data)
                last_progress = self.now()
        finally:
            sock.close()

    async def connect(self, idx: int) -> None:
        """10 bare TCP connects at a time that never send a byte: each closed by fastgate at the header timeout.
        (No TLS listener in the soak: the TLS variant is covered by tests/test_connection_limits.py.)"""
        base = f"{ATTACK_NETS['connect']}"
        while self.left() > HEADER_TIMEOUT_S + SLACK_S:
            await asyncio.gather(*(self._bare(f"{base}.{(idx * 10 + i) % 254 + 1}") for i in range(10)))
            if not await self.sleep(2.0):
                return

    async def _bare(self, local: str) -> None:
        started = self.now()
        reader, writer = await self.open(local)
        try:
            try:
                data = await asyncio.wait_for(reader.read(65536), HEADER_TIMEOUT_S + 2 * SLACK_S)
            except asyncio.TimeoutError:
                self.record("connect", started, "still open", False, "past the header timeout")
                return
            except (ConnectionError, OSError):
                data = b""
            took = self.now() - started
            outcome = "closed" if not data else data[:12].decode("latin-1")
            self.record("connect", started, outcome,
                        not data and HEADER_TIMEOUT_S - SLACK_S <= took <= HEADER_TIMEOUT_S + SLACK_S,
                        f"closed after {took:.2f} s")
        finally:
            writer.transport.abort()

    async def health_flood(self, idx: int) -> None:
        """Bursts of 5 s every 15 s: 8 keep-alive connections each asking GET /health every 40 ms (about 200
        requests/s). Answers are tallied; the soak process counts the probes Ollama received."""
        while await self.sleep(10.0):
            start = self.now()
            end = min(start + 5.0, self.deadline)
            await asyncio.gather(*(self._flooder(f"{ATTACK_NETS['health-flood']}.{idx * 8 + i + 1}", end)
                                   for i in range(8)))
            self.flood_bursts.append((round(start - self.t0, 2), round(self.now() - self.t0, 2)))

    async def _flooder(self, local: str, end: float) -> None:
        tally = self.tallies["health-flood"]
        reader, writer = await self.open(local)
        try:
            while self.now() < end:
                writer.write(b"GET /health HTTP/1.1\r\nHost: soak\r\n\r\n")
                try:
                    resp = await self.answer(reader, 10.0)
                except asyncio.TimeoutError:
                    resp = None
                if resp is None:
                    tally["no answer"] += 1
                    return
                tally[str(resp.status)] += 1
                await asyncio.sleep(0.04)
        finally:
            writer.transport.abort()

    async def tiny_chunks(self, idx: int) -> None:
        """Keyless chunked bodies of 1-byte chunks, every 8 s: a whole 3000-byte JSON body (no key in it: 401)
        and 100000 chunks with no end (each piece costs 64 bytes on top of its byte: 413 past max_body_bytes,
        or 503 while the budget is spent)."""
        local = f"{ATTACK_NETS['tiny-chunks']}.{idx + 1}"
        n = 0
        while await self.sleep(8.0):
            endless = n % 2 == 1
            n += 1
            text = b'{"model":"llama3.2","messages":[]' + b" " * 2965 + b"}"
            if endless:
                body, expected = b"1\r\nx\r\n" * 100_000, ("413", "503")
            else:
                body, expected = b"".join(b"1\r\n%c\r\n" % c for c in text) + b"0\r\n\r\n", ("401",)
            started = self.now()
            reader, writer = await self.open(local)
            try:
                writer.write(b"POST /api/chat HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + body)
                try:
                    resp = await self.answer(reader, 30.0, b"POST")
                except asyncio.TimeoutError:
                    resp = None
                status = str(resp.status) if resp is not None else "no answer"
                if status == "503" and resp.header(b"retry-after") is None:
                    status = "503 without Retry-After"
                self.record("tiny-chunks", started, status, status in expected,
                            f"{'endless' if endless else 'whole'} body of {100_000 if endless else len(text)} "
                            f"chunks; expected {'/'.join(expected)}", variant="endless" if endless else "whole")
            finally:
                writer.transport.abort()

    async def guess(self, idx: int) -> None:
        """Key guessing from 49 addresses in turn, a request every 0.25 s: 12 wrong keys from one address (the
        limiter allows 10 per 60 s: 401 ten times, then 429 with Retry-After), then the right key from it,
        which must get 429 too (a locked address cannot confirm a guess)."""
        sources = ("x-api-key", "bearer", "query")
        while self.left() > 5.0:
            local = GUESS_ADDRESSES[self.guess_next % len(GUESS_ADDRESSES)]
            self.guess_next += 1
            reader, writer = await self.open(local)
            statuses = []
            try:
                for i in range(13):
                    right = i == 12
                    secret = self.key if right else f"guess-{self.rng.getrandbits(64):016x}"
                    how = sources[i % 3]
                    if how == "query":
                        req = b"GET /api/tags?api_key=%s HTTP/1.1\r\nHost: soak\r\n\r\n" % secret.encode()
                    else:
                        auth = f"X-API-Key: {secret}" if how == "x-api-key" else f"Authorization: Bearer {secret}"
                        req = b"GET /api/tags HTTP/1.1\r\nHost: soak\r\n%s\r\n\r\n" % auth.encode()
                    started = self.now()
                    writer.write(req)
                    try:
                        resp = await self.answer(reader, 10.0)
                    except asyncio.TimeoutError:
                        resp = None
                    status = resp.status if resp is not None else 0
                    statuses.append(status)
                    retry = resp is not None and resp.header(b"retry-after") is not None
                    self.tallies["guess"][f"{'right' if right else 'wrong'} key -> {status or 'no answer'}"] += 1
                    if right and status != 429:
                        self.record("guess", started, f"right key {status}", False,
                                    f"from {local} after 12 wrong keys: {statuses}")
                    elif status == 429 and not retry:
                        self.record("guess", started, "429 without Retry-After", False, local)
                    if status == 0:
                        break
                    if not await self.sleep(0.25):
                        break
            finally:
                writer.transport.abort()
            wrong = statuses[:12]
            ok = wrong.count(401) <= MAX_FAILURES and all(s == 429 for s in wrong[wrong.count(401):]) and \
                (len(statuses) < 13 or statuses[12] == 429)
            self.record("guess", self.now(), "address session", ok, f"{local}: {statuses}", address=local,
                        statuses=statuses)

    async def decoy(self, idx: int) -> None:
        """A valid key every 2 s, with a decoy model inside `format`: the answer (and fastgate's accounting)
        must name llama3.2:latest, the model Ollama runs; the soak then reads /metrics for any "spoof"."""
        local = f"{ATTACK_NETS['decoy']}.{idx + 1}"
        reader = writer = None
        try:
            while await self.sleep(2.0):
                if writer is None:
                    reader, writer = await self.open(local)
                started = self.now()
                writer.write(_post("/api/chat", DECOY_BODY, self.key))
                try:
                    resp = await self.answer(reader, 30.0, b"POST")
                except asyncio.TimeoutError:
                    resp = None
                self.keep_rid(resp)
                if resp is None or resp.close or not resp.complete:
                    writer.transport.abort()
                    writer = None
                if resp is None:
                    self.tallies["decoy"]["no answer"] += 1
                    continue
                model = ""
                if resp.status == 200:
                    try:
                        model = json.loads(resp.body).get("model", "")
                    except ValueError:
                        model = "unparseable"
                self.tallies["decoy"][f"{resp.status} {model}".strip()] += 1
                if resp.status == 200 and model != "llama3.2:latest":
                    self.record("decoy", started, "wrong model", False, f"answer names {model!r}")
        finally:
            if writer is not None:
                writer.transport.abort()

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        runners = {"hold-body": self.hold_body, "dup-keys": self.dup_keys, "slow-body": self.slow_body,
                   "pipeline": self.pipeline, "connect": self.connect, "health-flood": self.health_flood,
                   "tiny-chunks": self.tiny_chunks, "guess": self.guess, "decoy": self.decoy}
        await asyncio.sleep(max(0.0, self.t0 - self.now()))  # started ahead of the run: wait for its start
        tasks = {loop.create_task(runners[name](i)): name for name, n in self.counts.items() for i in range(n)}
        errors = []
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=max(0.0, self.left()) + 1.0)
            self.stop_flag.set()
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for t in done:
                if t.exception() is not None:
                    errors.append(f"{tasks[t]}: {t.exception()!r}")
        return {"counts": self.counts, "events": self.events, "cpu_s": round(time.process_time(), 2),
                "tallies": {k: dict(v) for k, v in self.tallies.items()}, "rids": self.rids,
                "flood_bursts": self.flood_bursts, "errors": errors}


def attack_main(argv: list[str]) -> int:
    """`python -m bench.soak attack CONFIG.json OUT.json`: the attacker process (the soak starts it)."""
    cfg = json.loads(Path(argv[0]).read_text())
    attackers = Attackers(cfg)

    def stop(*_: Any) -> None:
        attackers.deadline = time.monotonic()

    signal.signal(signal.SIGTERM, stop)
    result = asyncio.run(attackers.run())
    Path(argv[1]).write_text(json.dumps(result))
    return 0


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
    attack_counts: dict[str, int] = field(default_factory=dict)  # attack -> instances (empty: no attackers)
    attack_result: dict[str, Any] = field(default_factory=dict)
    probe_times: list[float] = field(default_factory=list)  # when the upstream logged a /health probe (±50 ms)
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_samples: list[tuple[float, float]] = field(default_factory=list)  # (t, fastgate's CPU seconds so far)
    metrics_after: str = ""
    _badkey_next: int = 0
    _digest_offset: int = 0

    def honest_badkey_address(self) -> str:
        self._badkey_next += 1
        return f"{HONEST_BADKEY_NET}.{self._badkey_next % 254 + 1}"

    def count_probes(self) -> int:
        """fastgate's /health probes the upstream logged since the last call: `GET /api/version` without an
        X-Request-Id (fastgate gives one to every request it forwards, none to its probes)."""
        try:
            with open(self.digest_log, "rb") as f:
                f.seek(self._digest_offset)
                data = f.read()
        except OSError:
            return 0
        end = data.rfind(b"\n") + 1
        self._digest_offset += end
        return sum(1 for line in data[:end].splitlines()
                   if line.startswith(b"- ") and line.endswith(b" GET /api/version"))

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
            self.cpu_samples.append((round(loop.time() - self.t0, 2), round(_cpu_seconds(self.fastgate.pid), 2)))
            if not self.fastgate.alive():
                self.fatal.append(f"fastgate exited with {self.fastgate.returncode} during the run")
                self.stopping = True
                return
            await asyncio.sleep(1.0)

    async def probe_watcher(self) -> None:
        """Timestamps fastgate's /health probes as the upstream logs them, to within the 50 ms poll."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            n = self.count_probes()
            self.probe_times += [round(loop.time() - self.t0, 3)] * n
            await asyncio.sleep(0.05)

    async def main(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        duration = self.minutes * 60.0
        attackers = None
        if any(self.attack_counts.values()):
            # The attacker process is started ahead and waits for t0: started at t0, its interpreter's startup
            # would take a core just as the honest clients open their connections (their first answers took
            # 60-70 ms instead of 2 ms that way: a harness artifact, not fastgate's).
            self.t0 = loop.time() + ATTACK_LEAD_S
            attackers = self.start_attackers(duration)
            await asyncio.sleep(self.t0 - loop.time())
        else:
            self.t0 = loop.time()
        clients = [Client(self, i) for i in range(self.concurrency)]
        self.count_probes()  # the upstream's log so far holds no probe of this run
        sampler = loop.create_task(self.sampler())
        watcher = loop.create_task(self.probe_watcher())
        cpu_start = (_cpu_seconds(self.fastgate.pid), time.process_time())
        restarter = loop.create_task(self.restarter(duration))
        tasks = [loop.create_task(c.run()) for c in clients]
        try:
            await asyncio.sleep(duration)
        finally:
            self.stopping = True
        if attackers is not None:
            self.attack_result = await loop.run_in_executor(None, self.wait_attackers, attackers)
        done, pending = await asyncio.wait(tasks, timeout=OP_TIMEOUT_S + 5)
        for t in pending:
            t.cancel()
        for t in done:
            if t.exception() is not None:
                self.fatal.append(f"client task failed: {t.exception()!r}")
        restarter.cancel()
        await sampler
        await watcher
        self.cpu = {"fastgate_s": round(_cpu_seconds(self.fastgate.pid) - cpu_start[0], 2),
                    "soak_clients_s": round(time.process_time() - cpu_start[1], 2),
                    "attackers_s": self.attack_result.get("cpu_s", 0.0)}
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

    def start_attackers(self, duration: float) -> subprocess.Popen[bytes]:
        cfg = {"port": self.fastgate.port, "t0": self.t0, "seconds": duration, "key": KEY, "seed": self.seed,
               "counts": self.attack_counts}
        (self.out_dir / "attackers-config.json").write_text(json.dumps(cfg))
        with open(self.out_dir / "attackers.log", "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "bench.soak", "attack",
                                     str(self.out_dir / "attackers-config.json"), str(self.out_dir / "attackers.json")],
                                    cwd=Path(__file__).resolve().parent.parent, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)

    def wait_attackers(self, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        """The attacker process ends by itself at the end of the run (its slowest attack gives up within
        about 35 s); past 60 s it gets SIGTERM, then SIGKILL, by its PID."""
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.fatal.append("the attacker process did not end by itself")
        try:
            return json.loads((self.out_dir / "attackers.json").read_text())
        except (OSError, ValueError) as exc:
            self.fatal.append(f"attacker process (exit {proc.returncode}) left no results: {exc!r}; see attackers.log")
            return {}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics_text(port: int) -> str:
    """fastgate's /metrics, asked with the admin key (config keys are admins)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nConnection: close\r\n\r\n" % KEY.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode("utf-8", "replace")


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
    seen_rids.update(ctx.attack_result.get("rids", []))  # attacker requests fastgate forwarded (decoys)
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

    honest = honest_figures(ctx)
    attack = attack_figures(ctx, load_s, failures)

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
        "fatal": ctx.fatal, "failures": failures, "honest": honest, "attack": attack, "cpu": ctx.cpu,
        "fastgate_cpu_samples": ctx.cpu_samples,
        "config": {"header_timeout": HEADER_TIMEOUT_S, "keepalive_timeout": KEEPALIVE_TIMEOUT_S,
                   "max_body_bytes": MAX_BODY_BYTES, "max_buffered_bytes": MAX_BUFFERED_BYTES,
                   "max_failures": MAX_FAILURES, "failure_window": FAILURE_WINDOW_S},
        "timeline_requests_per_10s": [timeline.get(t, 0) for t in range(0, int(load_s) + 10, 10)],
        "samples": [[round(t, 1), r, f, c, u] for t, r, f, c, u in samples],
        "samples_columns": ["seconds", "rss_kib", "fds", "client_sockets", "upstream_sockets"],
    }
    summary["ok"] = not (corrupted or lost or unverifiable or failures or ctx.fatal or log_errors or stop[0] != 0)
    return summary


def _stats_ms(values: list[float]) -> dict[str, Any]:
    """n, p50, p99, max in milliseconds (nearest-rank percentiles)."""
    if not values:
        return {"n": 0}
    v = sorted(values)

    def pct(q: float) -> float:
        return round(1000 * v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))], 1)

    return {"n": len(v), "p50": pct(0.50), "p99": pct(0.99), "max": round(1000 * v[-1], 1)}


SMALL_KINDS = ("version", "tags")  # forwarded small requests
STREAM_KINDS = ("generate", "v1chat")
ERROR_OUTCOMES = ("cut", "status", "conn-error", "timeout", "corrupt")


def honest_figures(ctx: Soak) -> dict[str, Any]:
    """The honest clients' latency and errors, over the whole run and outside the upstream restart windows."""
    out: dict[str, Any] = {}
    for label, keep in (("all", lambda r: True), ("outside_restarts", lambda r: not ctx.during_restart(r))):
        rs = [r for r in ctx.results if keep(r)]
        out[label] = {
            "small_ms": _stats_ms([r.end - r.start for r in rs if r.kind in SMALL_KINDS and r.outcome == "ok"]),
            "ttft_ms": _stats_ms([r.ttft for r in rs if r.kind in STREAM_KINDS and r.ttft >= 0]),
            "refused_401_ms": _stats_ms([r.end - r.start for r in rs if r.kind in ("badkey", "nokey")
                                         and r.outcome == "ok"]),
        }
    errors = [r for r in ctx.results if r.outcome in ERROR_OUTCOMES]
    outside = [r for r in errors if r.outcome in ("timeout", "corrupt") or not ctx.during_restart(r)]
    out["errors_outside_restarts"] = len(outside)
    out["errors_during_restarts"] = len(errors) - len(outside)
    out["errors_outside_by_kind"] = dict(Counter(f"{r.kind} {r.outcome} {r.status}" for r in outside))
    out["slowest"] = [{"kind": r.kind, "outcome": r.outcome, "status": r.status, "at_s": round(r.start - ctx.t0, 2),
                       "seconds": round(r.end - r.start, 3), "detail": r.detail[:120]}
                      for r in sorted(ctx.results, key=lambda r: r.start - r.end)[:8]]
    out["errors_outside_samples"] = [{"kind": r.kind, "outcome": r.outcome, "status": r.status,
                                      "at_s": round(r.start - ctx.t0, 2), "detail": r.detail[:200]}
                                     for r in outside[:20]]
    return out


def _metric_lines(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            out[labels[len(name):] or "-"] = float(value)
    return out


def attack_figures(ctx: Soak, load_s: float, failures: list[dict[str, Any]]) -> dict[str, Any]:
    """What the attackers got, judged; fastgate's /health probes as the upstream logged them; the accounting
    as /metrics shows it. Every attacker outcome fastgate does not promise is a failure."""
    res = ctx.attack_result
    events = res.get("events", [])
    windows = [(a - ctx.t0, b - ctx.t0) for a, b in ctx.windows]
    for e in events:
        # A forwarded attacker request (a decoy, a right key behind duplicates) meets upstream restarts too.
        if not e["ok"] and e["outcome"] in ("502", "504") and \
                any(e["at_s"] <= b and e["at_s"] + e["seconds"] >= a for a, b in windows):
            e["ok"], e["outcome"] = True, f"{e['outcome']} (upstream restart)"
    by_kind: dict[str, Any] = {}
    for name in ATTACKS:
        evs = [e for e in events if e["kind"] == name]
        if not ctx.attack_counts.get(name) and not evs:
            continue
        info: dict[str, Any] = {"instances": ctx.attack_counts.get(name, 0),
                                "outcomes": dict(Counter(e["outcome"] for e in evs)),
                                "unexpected": sum(1 for e in evs if not e["ok"])}
        if name in res.get("tallies", {}):
            info["answers"] = res["tallies"][name]
        secs = [e["seconds"] for e in evs]
        if name in ("slow-body", "connect"):
            info["cut_after_s"] = {"min": min(secs, default=0), "max": max(secs, default=0)}
        elif name == "hold-body":
            for status in ("408", "503"):
                s408 = [e["seconds"] for e in evs if e["outcome"] == status]
                info[f"answer_{status}_after_s"] = {"min": min(s408, default=0), "max": max(s408, default=0)}
        elif name == "pipeline":
            info["cut_after_stall_s"] = [e.get("stalled_s") for e in evs if e["outcome"] == "cut"]
            info["bytes_sent"] = [e.get("bytes_sent") for e in evs if e["outcome"] == "cut"]
        elif name in ("dup-keys", "tiny-chunks"):
            groups: dict[str, list[float]] = defaultdict(list)
            for e in evs:
                key = " ".join(str(x) for x in (e.get("path"), e.get("members"), e.get("variant")) if x)
                groups[key].append(e["seconds"])
            info["answer_s_max"] = {k: max(v) for k, v in sorted(groups.items())}
        elif name == "guess":
            sessions = [e for e in evs if e["outcome"] == "address session"]
            info["address_sessions"] = len(sessions)
            info["addresses"] = len({e.get("address") for e in sessions})
        by_kind[name] = info
        for e in evs:
            if not e["ok"] and len(failures) < 200:
                failures.append({"kind": f"attack:{name}", "outcome": e["outcome"], "why": "attacker got what "
                                 "fastgate does not promise", "at_s": e["at_s"], "detail": e["detail"]})
    for err in res.get("errors", []):
        ctx.fatal.append(f"attacker task failed: {err}")
    # /health probes: the upstream logged each; the soak saw each line appear (polling every 50 ms).
    times = ctx.probe_times
    gaps = [b - a for a, b in zip(times, times[1:])]
    bursts = res.get("flood_bursts", [])
    burst_s = sum(b - a for a, b in bursts)
    in_bursts = sum(1 for t in times if any(a <= t <= b + 0.5 for a, b in bursts))
    probe = {"total": len(times), "per_s_over_run": round(len(times) / max(load_s, 1e-9), 3),
             "min_gap_s": round(min(gaps), 3) if gaps else None,
             "max_in_any_1s": max((sum(1 for u in times if t <= u < t + 1.0) for t in times), default=0),
             "flood_bursts": len(bursts), "flood_seconds": round(burst_s, 1), "during_floods": in_bursts,
             "per_s_during_floods": round(in_bursts / burst_s, 2) if burst_s else None}
    # At most one probe per second; the poll's 50 ms and the log write leave some room for jitter.
    if (gaps and min(gaps) < 0.8) or len(times) > load_s + 2:
        failures.append({"kind": "attack:health-flood", "outcome": "probes", "why": "Ollama probed more than once "
                         "per second", "detail": json.dumps(probe)})
    text = ctx.metrics_after
    tokens = _metric_lines(text, "fastgate_tokens_total")
    metrics = {"spoof_in_metrics": "spoof" in text,
               "token_models": sorted({k.split('model="', 1)[1].split('"', 1)[0] for k in tokens if 'model="' in k}),
               "auth_failures": _metric_lines(text, "fastgate_auth_failures_total"),
               "buffer_refusals": _metric_lines(text, "fastgate_buffer_refusals_total").get("-", 0)}
    if metrics["spoof_in_metrics"]:
        failures.append({"kind": "attack:decoy", "outcome": "spoof", "why": "a decoy model reached /metrics",
                         "detail": ", ".join(line for line in text.splitlines() if "spoof" in line)[:300]})
    return {"enabled": any(ctx.attack_counts.values()), "by_kind": by_kind, "health_probes": probe,
            "metrics": metrics}


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
    ]
    h = s["honest"]

    def st(x: dict[str, Any]) -> str:
        return f"{x['p50']} / {x['p99']} ms (max {x['max']}, n {x['n']})" if x.get("n") else "-"

    lines += [
        "## Honest clients",
        "",
        "| figure | whole run | outside upstream restarts |", "| --- | --- | --- |",
        f"| small requests (GET /api/version, /api/tags) p50 / p99 | {st(h['all']['small_ms'])} | "
        f"{st(h['outside_restarts']['small_ms'])} |",
        f"| time to first token (streams) p50 / p99 | {st(h['all']['ttft_ms'])} | "
        f"{st(h['outside_restarts']['ttft_ms'])} |",
        f"| wrong or missing key (401) p50 / p99 | {st(h['all']['refused_401_ms'])} | "
        f"{st(h['outside_restarts']['refused_401_ms'])} |",
        f"| errors | {h['errors_outside_restarts'] + h['errors_during_restarts']} | "
        f"{h['errors_outside_restarts']} {h['errors_outside_by_kind'] or ''} |",
        "",
    ]
    a = s["attack"]
    if a["enabled"]:
        lines += ["## Attackers", "", "| attack | instances | outcomes | unexpected | details |",
                  "| --- | --- | --- | --- | --- |"]
        for name, info in a["by_kind"].items():
            details = {k: v for k, v in info.items() if k not in ("instances", "outcomes", "unexpected")}
            lines.append(f"| {name} | {info['instances']} | "
                         f"{', '.join(f'{o}: {n}' for o, n in info['outcomes'].items()) or '-'} | "
                         f"{info['unexpected']} | {json.dumps(details)[:400]} |")
        lines.append("")
    p, mt = a["health_probes"], a["metrics"]
    lines += [
        f"/health probes Ollama got: {p['total']} in {s['load_seconds']} s ({p['per_s_over_run']}/s), at least "
        f"{p['min_gap_s']} s apart (as logged, ±50 ms); "
        f"{p['during_floods']} during {p['flood_bursts']} floods ({p['flood_seconds']} s, "
        f"{p['per_s_during_floods']}/s).",
        "",
        f"CPU during the run: fastgate {s['cpu']['fastgate_s']} s, honest clients (soak process) "
        f"{s['cpu']['soak_clients_s']} s, attacker process {s['cpu']['attackers_s']} s.",
        "",
        f"/metrics: token models {mt['token_models']}, 'spoof' present: {mt['spoof_in_metrics']}, auth failures "
        f"{mt['auth_failures']}, body-budget refusals {mt['buffer_refusals']}.",
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
    p.add_argument("--attackers", type=int, default=0, metavar="N",
                   help="run the attacker mix beside the honest clients, N instances of each attack (default 0: "
                        "off; attacks: " + ", ".join(ATTACKS) + ")")
    p.add_argument("--attack-mix", metavar="NAME=N,...", default="",
                   help="instances per attack, overriding --attackers for those named (0 turns one off)")
    p.add_argument("--out", help="results directory (default bench/results/soak-<timestamp>)")
    args = p.parse_args(argv)
    attack_counts = {name: n * args.attackers for name, n in ATTACKS.items()}
    try:
        attack_counts.update(_count_option(args.attack_mix, ATTACKS, "--attack-mix"))
    except ValueError as exc:
        p.error(str(exc))
    attack_counts = {k: v for k, v in attack_counts.items() if v}
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
          f"restarts, attackers {attack_counts or 'none'}; results in {out_dir}", flush=True)
    ctx = Soak(args.seed, args.minutes, args.concurrency, restarts, out_dir)
    ctx.attack_counts = attack_counts
    ctx.upstream = ctx.upstream_proc().start()
    config = fastgate_config(out_dir / "fastgate.toml", port=free_port(), upstream_port=ctx.upstream_port,
                             keys={KEY: "soak"}, read_timeout=30.0, connect_timeout=2.0, shutdown_grace=10.0,
                             pool_idle_timeout=POOL_IDLE_S, header_timeout=HEADER_TIMEOUT_S,
                             keepalive_timeout=KEEPALIVE_TIMEOUT_S, max_body_bytes=MAX_BODY_BYTES,
                             max_failures=MAX_FAILURES)
    text = config.read_text()
    assert text.count("[auth]\n") == 1
    config.write_text(text.replace("[auth]\n", f"[auth]\nmax_buffered_bytes = {MAX_BUFFERED_BYTES}\n"
                                               f"failure_window = {FAILURE_WINDOW_S}\n"))
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
        try:
            ctx.metrics_after = metrics_text(ctx.fastgate.port)
        except (OSError, IndexError) as exc:
            ctx.fatal.append(f"/metrics after the run: {exc!r}")
        stop = ctx.fastgate.stop()
    finally:
        if hasattr(ctx, "fastgate") and ctx.fastgate.alive():
            ctx.fastgate.kill()
        ctx.upstream.stop()
    log_errors, log_warnings = log_problems(ctx.fastgate.log_since_start())
    summary = analyse(ctx, extra, idle, stop, h, machine, log_errors, log_warnings)
    (out_dir / "metrics.txt").write_text(ctx.metrics_after)
    with open(out_dir / "ops.jsonl", "w") as f:  # every honest request, for latency analysis
        for r in ctx.results:
            f.write(json.dumps({"kind": r.kind, "start": round(r.start - ctx.t0, 4), "end": round(r.end - ctx.t0, 4),
                                "outcome": r.outcome, "status": r.status, "ttft": round(r.ttft, 4)}) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    md = render_markdown(summary)
    (out_dir / "summary.md").write_text(md)
    print(md)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(attack_main(sys.argv[2:]) if sys.argv[1:2] == ["attack"] else main())
