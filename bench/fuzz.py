"""HTTP request fuzzer for fastgate's request path: `python -m bench.fuzz [--seconds N] [--seed S]`.

Starts the fake Ollama in this process (its own thread and event loop, so what it receives can be read)
and fastgate as a process in front of it, both on loopback. For `--seconds` it feeds generated and
mutated requests to fastgate over raw TCP, several connections at a time, and checks for every input:

- fastgate answers with well-formed HTTP/1.1 (status line, header syntax, framing; status in ALLOWED) or
  closes the connection, within a deadline; nothing follows a `Connection: close` answer; no answer is
  truncated while the client is still there; no answer echoes a key;
- the process stays up (polled after every input) and logs no error or traceback;
- nothing unexpected reaches the fake Ollama: every request it receives carries exactly one X-Request-Id
  of fastgate's format, exactly one Host (Ollama's own), fastgate's X-Forwarded-For/-Proto, no key header,
  no `api_key` query parameter, no hop-by-hop or Origin header, both a Content-Length and a
  Transfer-Encoding never; it never has a path that appeared only inside a body (`SMUGGLED` marker) or an
  account path (/api/me, /api/signout, /api/user/keys); it is attributed to one request of one input (by the
  X-Request-Id the client saw, or the `fz=` marker in its target) and that request carried a valid key (a
  request that cannot be attributed fails too); and the fake's own HTTP parser never rejects what fastgate
  sent it.

Inputs are deterministic given (seed, input number): `random.Random(f"{seed}:{i}")` builds each one, so a
run with the same seed tries the same inputs in the same order (how many depends on the time given).
Failures are replayed alone, minimised (delta debugging over bytes) and saved under
bench/results/fuzz-<ts>/failures/; `python -m bench.fuzz --replay FILE` sends one saved input again.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import posixpath
import random
import re
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus

from .reliability import (
    FakeThread, Malformed, Proc, Response, fastgate_config, free_port, git_state, log_problems, machine_info,
    parse_responses, results_dir, start_fastgate,
)

DEFAULT_SEED = 20250313
KEY = "fz-key-0123456789abcdef"
KEY2 = "fz-key-second-000000000"
BAD_KEY = "fz-bad-key-999999999999"
KEYS = {KEY: "fuzzer", KEY2: "second"}
SMUGGLE_MARK = "SMUGGLED"

# Statuses fastgate may answer (its own or relayed from the fake) to whatever a client sends.
ALLOWED = frozenset({200, 201, 204, 301, 307, 400, 401, 403, 404, 405, 408, 413, 431, 501})
TIMEOUTS = {"header": 1.0, "keepalive": 1.0, "body": 1.0}
CASE_DEADLINE_S = 10.0  # > any fastgate timeout + its 2 s lingering close
MAX_BODY_BYTES = 256 * 1024  # auth.max_body_bytes in the fuzz config: keyless bodies above it get 413
RID = re.compile(r"[0-9a-f]{8}")
ACCOUNT_PATHS = ("/api/me", "/api/signout")
HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authorization",
              "expect", "origin", "forwarded", "x-api-key", "authorization")


# ---------------------------------------------------------------------------------------------------------
# Generation

@dataclass
class Req:
    method: str
    path: str
    query: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    framing: str = "cl"  # cl | chunked | none | expect
    version: str = "1.1"
    keyed: bool = False
    chunk_games: bool = False


@dataclass
class Case:
    index: int
    seed: int
    data: bytes
    splits: list[int]
    delays: list[float]
    end: str  # keep | half | close | rst
    methods: list[str]
    keyed: bool
    control: dict[str, Any] | None
    desc: list[str]
    sentinel: bool


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _chunk_body(rng: random.Random, body: bytes, games: bool) -> bytes:
    parts: list[bytes] = []
    pos = 0
    while pos < len(body):
        n = rng.randint(1, max(1, min(len(body) - pos, rng.choice((1, 7, 64, 4096)))))
        size = b"%x" % n
        if games and rng.random() < 0.3:
            size = rng.choice((b"0" * rng.randint(1, 6) + size, size.upper(), size + b" ", size + b";ext=1",
                               size + b';q="a b"', size + b";" + b"x" * rng.randint(1, 300)))
        parts.append(size + b"\r\n" + body[pos:pos + n] + b"\r\n")
        pos += n
    last = b"0\r\n"
    if games and rng.random() < 0.3:
        last += rng.choice((b"X-Trailer: 1\r\n", b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n",
                            b"X-Api-Key: " + KEY.encode() + b"\r\n"))
    parts.append(last + b"\r\n")
    return b"".join(parts)


def _place_key(rng: random.Random, req: Req, choice: str) -> None:
    key = {"good": KEY if rng.random() < 0.8 else KEY2, "bad": BAD_KEY}.get(choice)
    if key is None:
        return
    req.keyed = choice == "good"
    json_body = req.body is not None and req.body.startswith(b"{") and not req.path.startswith("/api/blobs/")
    places = ["x-api-key", "bearer", "authorization", "basic", "query"] + (["body"] * 2 if json_body else [])
    where = rng.choice(places)
    if where == "x-api-key":
        req.headers.append((rng.choice(("X-API-Key", "x-api-key", "X-Api-Key")), key))
    elif where == "bearer":
        req.headers.append(("Authorization", f"{rng.choice(('Bearer', 'bearer', 'BEARER'))} {key}"))
    elif where == "authorization":
        req.headers.append(("Authorization", key))
    elif where == "basic":
        req.headers.append(("Authorization", "Basic " + base64.b64encode(f"user:{key}".encode()).decode()))
    elif where == "query":
        req.query.append("api_key=" + (key if rng.random() < 0.8 else key.replace("-", "%2D")))
    else:
        obj = json.loads(req.body)  # type: ignore[arg-type]
        obj["api_key"] = key
        req.body = _json(obj)


def _base_request(rng: random.Random, marker: str) -> Req:
    """A valid request to one of the endpoints fastgate and the fake know."""
    model = rng.choice(("llama3.2", "qwen2.5:0.5b", "llama3.2:latest", "missing-model"))
    kind = rng.choices(
        ["version", "tags", "ps", "v1models", "root", "health", "generate", "chat", "v1chat", "embed", "show",
         "auth", "blob", "blobhead", "account", "delete", "pathgame", "absolute"],
        [6, 6, 2, 2, 2, 1, 10, 6, 6, 3, 3, 3, 5, 2, 3, 1, 5, 2])[0]
    q = [f"fz={marker}"]
    if kind in ("version", "tags", "ps", "v1models", "root", "health"):
        path = {"version": "/api/version", "tags": "/api/tags", "ps": "/api/ps", "v1models": "/v1/models",
                "root": "/", "health": "/health"}[kind]
        method = "HEAD" if kind in ("tags", "version", "root") and rng.random() < 0.15 else "GET"
        return Req(method, path, q, framing="none")
    if kind in ("generate", "chat", "v1chat", "embed", "show", "delete"):
        n = rng.randint(0, 4)
        stream = rng.random() < 0.6
        body: dict[str, Any]
        if kind == "generate":
            path, body = "/api/generate", {"model": model, "prompt": f"fuzz {marker}",
                                           "options": {"num_predict": n}, "stream": stream}
        elif kind == "chat":
            path, body = "/api/chat", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                       "options": {"num_predict": n}, "stream": stream}
        elif kind == "v1chat":
            path, body = "/v1/chat/completions", {"model": model, "stream": stream, "max_tokens": n,
                                                  "messages": [{"role": "user", "content": "hi"}]}
        elif kind == "embed":
            path, body = "/api/embed", {"model": model, "input": ["a", "b"][: rng.randint(1, 2)]}
        elif kind == "delete":
            path, body = "/api/delete", {"model": "ghost-model"}
        else:
            path, body = "/api/show", {"model": model}
        method = "DELETE" if kind == "delete" else "POST"
        raw = _json(body)
        if rng.random() < 0.1:
            raw = b" \n" + raw + b"\n"
        return Req(method, path, q, [("Content-Type", "application/json")], raw, rng.choice(
            ("cl", "cl", "cl", "chunked", "expect")))
    if kind == "auth":
        return Req("POST", "/auth", [], [], _json({"api_key": rng.choice((KEY, BAD_KEY))}), "cl")
    if kind in ("blob", "blobhead"):
        data = rng.randbytes(rng.choice((1, 100, 3000, 70000)))
        digest = hashlib.sha256(data).hexdigest() if rng.random() < 0.8 else "0" * 64
        path = f"/api/blobs/sha256{rng.choice((':', '-'))}{digest}"
        if kind == "blobhead":
            return Req("HEAD", path, q, framing="none")
        return Req("POST", path, q, [("Content-Type", "application/octet-stream")], data,
                   rng.choice(("cl", "chunked", "expect")))
    if kind == "account":
        path = rng.choice(("/api/me", "/api/signout", "/api/user/keys", "/api/user/keys/abc"))
        return Req("POST", path, q, [("Content-Type", "application/json")], b"{}", "cl")
    if kind == "pathgame":
        path = rng.choice((
            "/api/%6de", "/api//me", "/api/./me", "/api/x/../me", "/../api/me", "/api/me/", "//api/me",
            "/api/%2e%2e/api/me", "/api%2Fme", "/api/me%00", "/api/me;x", "/API/ME", "/api/user/keys/../../me",
            "/api/%2fsignout", "/./api/tags", "/api/tags/", "/%61pi/tags", "/api/tags%3F", "/api/tags#frag",
            "/v1/../api/me", "/api/signout%2F", "/api/me%2f..", "/api/user%2Fkeys",
        ))
        return Req("POST" if "me" in path.lower() or "sign" in path else "GET", path, q,
                   [("Content-Type", "application/json")], b"{}" if rng.random() < 0.5 else None,
                   "cl")
    # absolute-form and odd targets
    path = rng.choice(("http://127.0.0.1/api/tags", "http://evil.example/api/me", "HTTP://x:1/api/version",
                       "http://x", "https://h/api/tags?x=1", "http://h?api_key=" + KEY, "*", "127.0.0.1:80"))
    return Req(rng.choice(("GET", "OPTIONS", "CONNECT")) if path in ("*", "127.0.0.1:80") else "GET", path,
               q if "?" not in path and path != "*" and ":80" not in path else [], framing="none")


def _serialize(rng: random.Random, req: Req, host: str, *, pristine: bool = False) -> tuple[bytes, int]:
    """The request's bytes and the length of its head."""
    target = req.path
    if req.query:
        target += ("&" if "?" in target else "?") + "&".join(req.query)
    lines = [f"{req.method} {target} HTTP/{req.version}"]
    if host and (pristine or rng.random() < 0.97):
        lines.append(f"Host: {host}")
    headers = list(req.headers)
    body = req.body
    framed = b""
    if body is not None:
        if req.framing == "chunked":
            headers.append(("Transfer-Encoding", "chunked"))
            framed = _chunk_body(rng, body, req.chunk_games)
        else:
            headers.append(("Content-Length", str(len(body))))
            if req.framing == "expect":
                headers.append(("Expect", "100-continue"))
            framed = body
    if rng.random() < 0.2:
        rng.shuffle(headers)
    lines += [f"{n}: {v}" for n, v in headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + framed, len(head)


def _extra_headers(rng: random.Random, req: Req) -> None:
    """Headers fastgate must drop or rewrite, and noise."""
    pool = [
        ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Proto", "https"), ("Forwarded", "for=6.6.6.6"),
        ("X-Request-Id", "deadbeef"), ("Origin", "http://evil.example"), ("Connection", "keep-alive"),
        ("Connection", "close"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic eDp5"), ("Proxy-Connection", "keep-alive"), ("Trailer", "X-T"),
        ("Connection", "X-Secret, Content-Type"), ("X-Secret", "drop-me"), ("User-Agent", "fuzz/1.0"),
        ("Accept", "*/*"), ("X-Obs", "a\r\n b"), ("X-Utf8", "\xe9\xe8"), ("Cookie", "a=b"),
    ]
    for _ in range(rng.choice((0, 0, 1, 2, 4))):
        req.headers.append(rng.choice(pool))


def _smuggle_case(rng: random.Random, marker: str, host: str) -> tuple[bytes, list[str], bool, list[str]]:
    """A keyed request whose body holds a second request (keyless: must never reach Ollama), with a framing
    game played on the outer request. Returns (bytes, methods, keyed, description)."""
    inner_key = rng.random() < 0.3
    inner_path = f"/api/tags?fz={marker}.inner&{SMUGGLE_MARK if not inner_key else 'INNER'}=1"
    inner = f"GET {inner_path} HTTP/1.1\r\nHost: {host}\r\n"
    if inner_key:
        inner += f"X-API-Key: {KEY}\r\n"
    inner_b = (inner + "\r\n").encode()
    if rng.random() < 0.3:
        inner_b = (f"POST /api/generate?fz={marker}.inner&{SMUGGLE_MARK}=2 HTTP/1.1\r\nHost: {host}\r\n"
                   f"Content-Length: 2\r\n\r\n{{}}").encode()
        inner_key = False
    outer_path = rng.choice(("/api/generate", "/api/chat", "/api/blobs/sha256:" + "0" * 64, "/api/embed"))
    key_line = rng.choice((f"X-API-Key: {KEY}", f"Authorization: Bearer {KEY}"))
    start = f"POST {outer_path}?fz={marker}.0 HTTP/1.1\r\nHost: {host}\r\n{key_line}\r\n"
    body = b'{"model":"llama3.2","prompt":"x","stream":false}'
    n = len(body)
    game = rng.choice(("cl-te", "te-cl", "te-obfuscated", "double-cl", "cl-short", "cl-long", "chunk-size-games",
                       "chunk-early-zero", "chunk-overflow", "lf-only", "cl-comma", "te-then-inner", "cl-zero",
                       "te-trailer-smuggle", "http10-te", "space-before-colon"))
    te = "Transfer-Encoding: chunked\r\n"
    if game == "cl-te":
        data = (start + f"Content-Length: {len(b'0' + inner_b) + 4}\r\n{te}\r\n").encode() + b"0\r\n\r\n" + inner_b
    elif game == "te-cl":
        chunk = b"%x\r\n" % len(inner_b) + inner_b + b"\r\n0\r\n\r\n"
        data = (start + f"{te}Content-Length: 4\r\n\r\n").encode() + chunk
    elif game == "te-obfuscated":
        variant = rng.choice(("Transfer-Encoding: xchunked", "Transfer-Encoding : chunked",
                              "Transfer-Encoding: chunked, identity", "Transfer-Encoding:\tchunked",
                              "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
                              "Transfer-Encoding: identity, chunked", "Transfer-Encoding: \x0bchunked",
                              "Transfer_Encoding: chunked", "Transfer-Encoding: chunke"))
        data = (start + f"Content-Length: {n}\r\n{variant}\r\n\r\n").encode() + body + inner_b
    elif game == "double-cl":
        data = (start + f"Content-Length: {n}\r\nContent-Length: {n + len(inner_b)}\r\n\r\n").encode() + body + inner_b
    elif game == "cl-short":
        data = (start + f"Content-Length: {n}\r\n\r\n").encode() + body + inner_b  # inner = pipelined request
    elif game == "cl-long":
        data = (start + f"Content-Length: {n + len(inner_b)}\r\n\r\n").encode() + body + inner_b
    elif game == "chunk-size-games":
        sz = rng.choice((b"%x" % len(inner_b), b"0%x" % len(inner_b), b"%X " % len(inner_b),
                         b"%x;a=b" % len(inner_b), b"+%x" % len(inner_b), b"-1", b"0x%x" % len(inner_b)))
        data = (start + te + "\r\n").encode() + sz + b"\r\n" + inner_b + b"\r\n0\r\n\r\n"
    elif game == "chunk-early-zero":
        data = (start + te + "\r\n").encode() + b"0\r\n\r\n" + inner_b
    elif game == "chunk-overflow":
        data = (start + te + "\r\n").encode() + rng.choice((b"1" + b"0" * 16, b"f" * 20, b"1" + b"0" * 20)) + \
            b"\r\n" + inner_b + b"\r\n0\r\n\r\n"
    elif game == "lf-only":
        data = (start.replace("\r\n", "\n") + f"Content-Length: {n}\n\n").encode() + body + inner_b
    elif game == "cl-comma":
        v = rng.choice((f"{n}, {n}", f"{n}, {n + len(inner_b)}", f"{n},", f" {n}", f"0{n}", f"{n}.0", f"+{n}"))
        data = (start + f"Content-Length: {v}\r\n\r\n").encode() + body + inner_b
    elif game == "te-then-inner":
        data = (start + te + "\r\n").encode() + b"%x\r\n" % n + body + b"\r\n0\r\n\r\n" + inner_b
    elif game == "cl-zero":
        data = (start + "Content-Length: 0\r\n\r\n").encode() + inner_b
    elif game == "te-trailer-smuggle":
        data = (start + te + "\r\n").encode() + b"%x\r\n" % n + body + b"\r\n0\r\n" + inner_b
    elif game == "http10-te":
        data = (start.replace("HTTP/1.1", "HTTP/1.0") + te + "\r\n").encode() + b"%x\r\n" % n + body + \
            b"\r\n0\r\n\r\n" + inner_b
    else:
        data = (start + f"Content-Length : {n}\r\n\r\n").encode() + body + inner_b
    return data, ["POST", "GET"], True, [f"smuggle:{game}{'+inner-key' if inner_key else ''}"]


def _mutate(rng: random.Random, data: bytes, heads: list[tuple[int, int]]) -> tuple[bytes, str]:
    """One byte-level mutation; heads are (start, end) spans of request heads, where most of them land."""
    def pos() -> int:
        if heads and rng.random() < 0.75:
            s, e = rng.choice(heads)
            p = rng.randint(s, max(s, e - 1))
        else:
            p = rng.randint(0, max(0, len(data) - 1))
        return min(p, len(data) - 1)

    op = rng.choice(("flip", "insert", "insert", "delete", "dup-line", "drop-line", "swap-lines", "truncate",
                     "number", "repeat", "case"))
    if not data:
        return data, "empty"
    if op == "flip":
        p = pos()
        return data[:p] + bytes([data[p] ^ (1 << rng.randint(0, 7))]) + data[p + 1:], f"flip@{p}"
    if op == "insert":
        p = pos()
        ins = rng.choice((b"\r", b"\n", b"\r\n", b"\x00", b" ", b":", b",", b"\t", b"\r\n\r\n", b"0\r\n\r\n",
                          b"\xff", b'"', b"%", b"/", b"?", b"&", b";", b"\x0b", b"\r\n "))
        return data[:p] + ins + data[p:], f"insert{ins!r}@{p}"
    if op == "delete":
        p = pos()
        k = rng.randint(1, 16)
        return data[:p] + data[p + k:], f"delete{k}@{p}"
    heads = [(min(s, len(data)), min(e, len(data))) for s, e in heads]
    if op in ("dup-line", "drop-line", "swap-lines") and heads:
        s, e = rng.choice(heads)
        head = data[s:e]
        lines = head.split(b"\r\n")
        body_lines = [i for i in range(1, len(lines)) if lines[i]]
        if not body_lines:
            return data, "noop"
        i = rng.choice(body_lines)
        if op == "dup-line":
            lines.insert(rng.choice(body_lines), lines[i])
        elif op == "drop-line":
            del lines[i]
        else:
            j = rng.choice(body_lines)
            lines[i], lines[j] = lines[j], lines[i]
        return data[:s] + b"\r\n".join(lines) + data[e:], f"{op}@{s}"
    if op == "truncate":
        p = rng.randint(1, len(data))
        return data[:p], f"truncate@{p}"
    if op == "number":
        nums = [m for m in re.finditer(rb"[0-9a-fA-F]{1,16}", data)]
        if not nums:
            return data, "noop"
        m = rng.choice(nums)
        new = rng.choice((b"0", b"1", b"-1", b"99999999999999999999", b"%d" % (int(m.group(), 16) + 1),
                          b"%x" % (int(m.group(), 16) + 1), m.group() + m.group(), b"4294967296", b"00"))
        return data[:m.start()] + new + data[m.end():], f"number@{m.start()}"
    if op == "repeat":
        p = pos()
        k = rng.randint(1, 8)
        times = rng.choice((2, 10, 1000, 20000))
        piece = data[p:p + k] * times
        return data[:p] + piece[:120000] + data[p:], f"repeat{k}x{times}@{p}"
    if op == "case" and heads:
        s, e = rng.choice(heads)
        span = data[s:e].swapcase() if rng.random() < 0.2 else data[s:e].lower()
        return data[:s] + span + data[e:], f"case@{s}"
    return data, "noop"


def make_case(seed: int, index: int, port_host: str = "fuzz.example") -> Case:
    rng = random.Random(f"{seed}:{index}")
    desc: list[str] = []
    control: dict[str, Any] | None = None
    heads: list[tuple[int, int]] = []
    methods: list[str] = []
    keyed = False
    roll = rng.random()
    if roll < 0.12:
        # Control: one pristine request whose answer is known.
        which = rng.choice(("tags-ok", "version-ok", "generate-ok", "nokey", "badkey", "account", "blob-ok"))
        marker = f"{index}.0"
        if which in ("tags-ok", "version-ok", "nokey", "badkey"):
            path = "/api/tags" if which != "version-ok" else "/api/version"
            req = Req("GET", path, [f"fz={marker}"], framing="none")
            _place_key(rng, req, {"nokey": "none", "badkey": "bad"}.get(which, "good"))
            control = {"status": 200 if which.endswith("-ok") else 401, "forwarded": which.endswith("-ok")}
        elif which == "generate-ok":
            req = Req("POST", "/api/generate", [f"fz={marker}"], [("Content-Type", "application/json")],
                      _json({"model": "llama3.2", "prompt": "x", "options": {"num_predict": 3}}), "cl")
            _place_key(rng, req, "good")
            control = {"status": 200, "forwarded": True}
        elif which == "blob-ok":
            body = rng.randbytes(200)
            req = Req("POST", f"/api/blobs/sha256:{hashlib.sha256(body).hexdigest()}", [f"fz={marker}"],
                      [], body, "cl")
            _place_key(rng, req, "good")
            control = {"status": 201, "forwarded": True}
        else:
            req = Req("POST", "/api/me", [f"fz={marker}"], [], b"{}", "cl")
            _place_key(rng, req, "good")
            control = {"status": 403, "forwarded": False}
        data, hl = _serialize(rng, req, port_host, pristine=True)
        keyed = req.keyed
        methods = [req.method]
        desc.append(f"control:{which}")
        end = "keep"
        splits: list[int] = []
        delays: list[float] = []
        sentinel = rng.random() < 0.5
    else:
        if roll < 0.30:
            data, methods, keyed, d = _smuggle_case(rng, f"{index}", port_host)
            desc += d
            heads.append((0, max(0, data.find(b"\r\n\r\n")) + 4))
        else:
            parts: list[bytes] = []
            count = rng.choices((1, 2, 3, 5), (60, 20, 12, 8))[0]
            for j in range(count):
                req = _base_request(rng, f"{index}.{j}")
                if req.method == "HEAD" and count > 1:
                    req.method = "GET"
                _place_key(rng, req, rng.choices(("good", "none", "bad"), (75, 15, 10))[0])
                if rng.random() < 0.3:
                    _extra_headers(rng, req)
                if req.body is not None and rng.random() < 0.2:
                    req.chunk_games = True
                    req.framing = "chunked"
                if rng.random() < 0.05:
                    req.version = "1.0"
                if rng.random() < 0.05 and req.body is None:
                    req.headers.append(("X-Big", "A" * rng.choice((1000, 30000, 70000))))
                if rng.random() < 0.03:
                    req.headers += [(f"X-H{i}", "v") for i in range(rng.choice((100, 3000)))]
                if req.body is not None and not req.keyed and rng.random() < 0.05:
                    req.body = b'{"pad":"' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
                raw, hl = _serialize(rng, req, port_host)
                start = sum(map(len, parts))
                heads.append((start, start + hl))
                parts.append(raw)
                methods.append(req.method)
                keyed = keyed or req.keyed
                desc.append(f"{req.method} {req.path} {req.framing}{' 1.0' if req.version == '1.0' else ''}"
                            f"{' keyed' if req.keyed else ''}")
            data = b"".join(parts)
        for _ in range(rng.choices((0, 1, 2, 3, 6), (25, 40, 18, 10, 7))[0]):
            data, what = _mutate(rng, data, heads)
            desc.append(what)
        nsplit = rng.choices((0, 1, 2, 8, 40), (45, 25, 12, 12, 6))[0]
        splits = sorted(rng.sample(range(1, len(data)), min(nsplit, max(0, len(data) - 1)))) if len(data) > 1 else []
        delays = [rng.choice((0.0, 0.0, 0.001, 0.005, 0.02, 0.2)) for _ in splits]
        end = rng.choices(("keep", "half", "close", "rst"), (68, 16, 10, 6))[0]
        sentinel = end == "keep" and rng.random() < 0.8
    if sentinel:
        data += f"GET /?fz={index}.s HTTP/1.1\r\nHost: {port_host}\r\nConnection: close\r\n\r\n".encode()
    # An input "holds a key" if any valid key text (or its Basic/percent form) is anywhere in it.
    keyed = keyed or _holds_key(data)
    return Case(index, seed, data, splits, delays, end, methods + (["GET"] if sentinel else []), keyed, control,
                desc, sentinel)


def _holds_key(data: bytes) -> bool:
    low = data
    for key in KEYS:
        kb = key.encode()
        if kb in low or kb.replace(b"-", b"%2D") in low or base64.b64encode(b"user:" + kb) in low:
            return True
    return False


# ---------------------------------------------------------------------------------------------------------
# Running one input

@dataclass
class Outcome:
    received: bytes = b""
    eof: bool = False
    reset: bool = False
    timed_out: bool = False
    send_error: str = ""
    connect_error: str = ""
    seconds: float = 0.0


async def run_case(case: Case, port: int) -> Outcome:
    out = Outcome()
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, limit=1 << 20), 5)
    except (OSError, asyncio.TimeoutError) as exc:
        out.connect_error = f"{type(exc).__name__}: {exc}"
        return out
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()

    async def reader_task() -> None:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                out.eof = True
                return
            buf.extend(data)

    rt = loop.create_task(reader_task())
    try:
        cuts = [0, *case.splits, len(case.data)]
        for i in range(len(cuts) - 1):
            writer.write(case.data[cuts[i]:cuts[i + 1]])
            await writer.drain()
            if i < len(case.delays) and case.delays[i]:
                await asyncio.sleep(case.delays[i])
            if rt.done():
                break
    except (ConnectionError, OSError) as exc:
        out.send_error = type(exc).__name__
    if case.end == "rst":
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already closed by a failed write
        writer.transport.abort()
    elif case.end == "close":
        writer.transport.abort() if rt.done() else writer.close()
    elif case.end == "half" and not rt.done():
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            pass
    if case.end in ("keep", "half"):
        try:
            await asyncio.wait_for(asyncio.shield(rt), CASE_DEADLINE_S - (loop.time() - started))
        except asyncio.TimeoutError:
            out.timed_out = True
        except (ConnectionError, OSError):
            out.reset = True
    rt.cancel()
    try:
        await rt
    except (asyncio.CancelledError, ConnectionError, OSError):
        if not out.eof and case.end in ("keep", "half") and not out.timed_out:
            out.reset = True
    writer.transport.abort()
    out.received = bytes(buf)
    out.seconds = loop.time() - started
    return out


def check_case(case: Case, out: Outcome) -> tuple[list[tuple[str, str]], list[Response], str]:
    """Client-side verdict: (failures as (kind, detail), parsed responses, outcome label)."""
    fails: list[tuple[str, str]] = []
    if out.connect_error:
        kind = "harness-error" if out.connect_error.startswith("harness error") else "connect-failed"
        return [(kind, out.connect_error)], [], kind
    if case.end in ("close", "rst"):
        return [], [], f"client-{case.end}"
    methods = [m.encode() for m in case.methods]
    try:
        responses, tail = parse_responses(out.received, methods, out.eof or out.reset)
    except Malformed as exc:
        return [("malformed-response", str(exc))], [], "malformed"
    label = ",".join(str(r.status) for r in responses) or "none"
    if out.timed_out:
        fails.append(("hang", f"neither answered nor closed within {CASE_DEADLINE_S} s "
                              f"({len(out.received)} bytes received)"))
    if tail:
        fails.append(("truncated-head", f"connection ended inside a response head: {tail[:80]!r}"))
    for i, r in enumerate(responses):
        if r.status not in ALLOWED:
            fails.append((f"status-{r.status}", f"response {i}: {r.status} {r.reason!r} {r.body[:200]!r}"))
        if r.close and i + 1 < len(responses):
            fails.append(("data-after-close", f"response {i} said Connection: close, yet more followed"))
    if responses and not responses[-1].complete and case.end == "keep" and not out.timed_out:
        fails.append(("truncated-response", f"status {responses[-1].status}, connection closed mid-body "
                                            f"({len(responses[-1].body_raw)} body bytes)"))
    for key in KEYS:
        if key.encode() in out.received:
            fails.append(("key-echoed", "a valid key appears in fastgate's answer"))
    if case.control is not None and case.end == "keep":
        if not responses:
            fails.append(("control", f"no answer to a pristine request (expected {case.control['status']})"))
        elif responses[0].status != case.control["status"]:
            fails.append(("control", f"pristine request got {responses[0].status}, expected "
                                     f"{case.control['status']}: {responses[0].body[:200]!r}"))
    return fails, responses, label


# ---------------------------------------------------------------------------------------------------------
# What reached the fake Ollama

MARKER = re.compile(r"[?&](fz=(\d+)\.(\w+))")  # the whole marker (fz=12.3, fz=12.inner), its input number
_REQUEST_LINE = re.compile(rb"([A-Za-z]+) (\S+) HTTP/")  # not anchored: a pipelined request may follow a body
_CHUNK_SEAM = re.compile(rb"\r\n[0-9a-fA-F]+[ \t]*(?:;[^\r\n]*)?\r\n")


def _span_holds_key(span: bytes) -> bool:
    """A key anywhere in one request's bytes, also when chunk framing cut it in two."""
    return _holds_key(span) or _holds_key(_CHUNK_SEAM.sub(b"", span))


def _target_path(target: bytes) -> bytes:
    path = target.split(b"?", 1)[0]
    if b"://" in path:  # absolute-form: fastgate forwards the path
        path = b"/" + path.split(b"://", 1)[1].partition(b"/")[2]
    return path


def request_spans(data: bytes, rec_method: str, rec_target: str, marker: bytes | None) -> list[bytes]:
    """The bytes, as sent (after mutations), of each request line in an input that may be the one behind a
    request the fake received, up to the next request line: the lines whose target holds its `fz=` marker,
    else (a mutation destroyed the marker) the lines with its method and path."""
    lines = list(_REQUEST_LINE.finditer(data))
    if marker is not None:
        picked = [m for m in lines if re.search(re.escape(marker) + rb"(?!\w)", m.group(2))]
    else:
        want = _target_path(rec_target.encode("latin-1"))
        picked = [m for m in lines
                  if m.group(1) == rec_method.encode("latin-1") and _target_path(m.group(2)) == want]
    spans = []
    for m in picked:
        later = [n.start() for n in lines if n.start() > m.start()]
        spans.append(data[m.start():later[0] if later else len(data)])
    return spans


def attribute(rec: Any, rid_case: dict[str, int], data_of: Any) -> tuple[int | None, tuple[str, str] | None]:
    """Which input, and which request line of it, a request the fake received came from; and a failure unless
    that request carried a valid key. `rid_case`: X-Request-Id -> input (from the answers clients saw);
    `data_of(index)`: that input's bytes as sent. IP trust is off in the fuzz config, so only a key opens the
    gate: a recorded request passes only when it is pinned to a client request that held a valid key."""
    rid = rec.header("x-request-id") or ""
    m = MARKER.search(rec.target)
    index = rid_case.get(rid)
    if index is None and m is not None:
        index = int(m.group(2))
    where = f"{rec.method} {rec.target[:200]} (X-Request-Id {rid or 'none'})"
    if index is None:
        return None, ("unattributed", f"{where} reached Ollama; no input answered with that id or holds its marker")
    data = data_of(index)
    if data is None:
        return index, ("unattributed", f"{where}: input {index} is unknown")
    spans = request_spans(data, rec.method, rec.target, m.group(1).encode("latin-1") if m else None)
    if not spans and m is not None:  # the marker is not in that input's request lines: try method and path
        spans = request_spans(data, rec.method, rec.target, None)
    if not spans:
        return index, ("unattributed", f"{where}: no request line of input {index} matches it")
    # Several candidates only when a mutation repeated a request line: one carrying a key is enough.
    if any(_span_holds_key(span) for span in spans):
        return index, None
    return index, ("unauthenticated", f"{where}: the request of input {index} it came from held no valid key")


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)):", re.M)


def split_tracebacks(errors: list[str]) -> list[list[str]]:
    """Error lines grouped per logged event (each starts with a timestamped line)."""
    groups: list[list[str]] = []
    for line in errors:
        if re.match(r"\d{4}-\d\d-\d\d |Unhandled exception|Exception in callback|Task exception|Fatal error|"
                    r"Task was destroyed", line) or not groups:
            groups.append([line])
        else:
            groups[-1].append(line)
    return groups


_FRAME = re.compile(r'File "[^"]*/fastgate/(\w+)\.py", line \d+, in (\w+)')


def log_kind(errors: list[str]) -> str:
    """`log-error:<exception type>@<module>.<function>` from a logged traceback (its last exception line and
    its innermost fastgate frame), so that distinct bugs stay apart."""
    text = "\n".join(errors)
    found = _EXC_LINE.findall(text)
    frames = _FRAME.findall(text)
    kind = f"log-error:{found[-1]}" if found else "log-error"
    return kind + ("@" + ">".join(f"{m}.{f}" for m, f in frames[-2:]) if frames else "")


def is_health_probe(rec: Any) -> bool:
    """fastgate's own `GET /api/version` for /health (no X-Request-Id, its own User-Agent)."""
    return (rec.method == "GET" and rec.path.endswith("/api/version") and rec.header("x-request-id") is None
            and (rec.header("user-agent") or "").startswith("fastgate/"))


def check_received(rec: Any, upstream_host: str, attributed: Any) -> list[tuple[str, str]]:
    """Per request the fake received. `attributed(rec)` -> (input or None, failure or None): see attribute()."""
    fails: list[tuple[str, str]] = []
    if is_health_probe(rec):
        return fails
    headers = rec.headers
    names = [n for n, _ in headers]

    def values(name: str) -> list[str]:
        return [v for n, v in headers if n == name]

    rids = values("x-request-id")
    if len(rids) != 1 or not RID.fullmatch(rids[0]):
        fails.append(("upstream-request-id", f"X-Request-Id {rids!r}: not one request fastgate made"))
    hosts = values("host")
    if hosts != [upstream_host]:
        fails.append(("upstream-host", f"Host {hosts!r}"))
    if values("x-forwarded-for") != ["127.0.0.1"]:
        fails.append(("upstream-xff", f"X-Forwarded-For {values('x-forwarded-for')!r}"))
    if values("x-forwarded-proto") != ["http"]:
        fails.append(("upstream-xfp", f"X-Forwarded-Proto {values('x-forwarded-proto')!r}"))
    for name in HOP_BY_HOP:
        if name in names and not (name == "connection" and values(name) == ["close"]):
            fails.append(("upstream-header", f"{name}: {values(name)!r} forwarded"))
    te = values("transfer-encoding")
    if te and (te != ["chunked"] or "content-length" in names):
        fails.append(("upstream-framing", f"Transfer-Encoding {te!r}, Content-Length {values('content-length')!r}"))
    if len(values("content-length")) > 1:
        fails.append(("upstream-framing", f"Content-Length {values('content-length')!r}"))
    for part in rec.query.split("&"):
        if unquote_plus(part.partition("=")[0]) == "api_key":
            fails.append(("key-forwarded", "api_key query parameter reached Ollama"))
    for key in KEYS:
        if key in rec.target or any(key in v for _, v in headers):
            fails.append(("key-forwarded", "a valid key reached Ollama in the target or a header"))
    if SMUGGLE_MARK in rec.target:
        fails.append(("smuggled", f"a request that was only inside a body reached Ollama: {rec.method} {rec.target}"))
    decoded = posixpath.normpath("/" + unquote(rec.path).lstrip("/")).replace("//", "/")
    if decoded in ACCOUNT_PATHS or decoded == "/api/user/keys" or decoded.startswith("/api/user/keys/"):
        fails.append(("account-endpoint", f"blocked endpoint reached Ollama: {rec.method} {rec.target}"))
    _, unkeyed = attributed(rec)
    if unkeyed is not None:
        fails.append(unkeyed)
    return fails


# ---------------------------------------------------------------------------------------------------------
# The stack

class Stack:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.fake = FakeThread().start()
        self.port = free_port()
        self.config = fastgate_config(
            out_dir / "fastgate.toml", port=self.port, upstream_port=self.fake.port, keys=KEYS,
            header_timeout=TIMEOUTS["header"], keepalive_timeout=TIMEOUTS["keepalive"],
            body_timeout=TIMEOUTS["body"], read_timeout=10.0, connect_timeout=2.0,
            max_body_bytes=MAX_BODY_BYTES, shutdown_grace=2.0, hostnames=("fuzz.example",))
        self.log_path = out_dir / "fastgate.log"
        self.fastgate: Proc = start_fastgate(self.config, self.log_path)
        self.restarts = 0
        self.upstream_host = f"127.0.0.1:{self.fake.port}"
        self._log_pos = 0

    def ensure_up(self) -> bool:
        """True if fastgate was found dead (and has been restarted)."""
        if self.fastgate.alive():
            return False
        self.restarts += 1
        self.fastgate = start_fastgate(self.config, self.log_path)
        return True

    def new_log(self) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_pos)
                data = f.read()
        except OSError:
            return b""
        cut = data.rfind(b"\n") + 1
        self._log_pos += cut
        return data[:cut]

    def stop(self) -> tuple[int | None, float]:
        try:
            return self.fastgate.stop()
        finally:
            self.fake.stop()


def health(port: int) -> dict[str, Any]:
    """fastgate's /health, with its own state (shown to admin keys; config keys are admins)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nConnection: close\r\n\r\n" % KEY.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


# ---------------------------------------------------------------------------------------------------------
# Replay, minimisation

def replay(stack: Stack, case: Case) -> list[tuple[str, str]]:
    return replay_outcome(stack, case)[0]


def replay_outcome(stack: Stack, case: Case) -> tuple[list[tuple[str, str]], Outcome]:
    """Run one input alone and apply every check (client side, upstream side, process, log)."""
    before = stack.fake.received_count()
    perrs = len(stack.fake.protocol_errors)
    stack.new_log()
    out = asyncio.run(run_case(case, stack.fastgate.port))
    fails, responses, _ = check_case(case, out)
    time.sleep(0.2)
    if not stack.fastgate.alive():
        fails.append(("process-died", f"fastgate exited with {stack.fastgate.returncode}"))
        stack.ensure_up()
    rid_case = {r.header(b"x-request-id").decode("latin-1"): case.index  # type: ignore[union-attr]
                for r in check_case(case, out)[1] if r.header(b"x-request-id")}
    for rec in stack.fake.received_since(before):
        fails += check_received(rec, stack.upstream_host, lambda r: attribute(
            r, rid_case, lambda i: case.data if i == case.index else None))
    for err in stack.fake.protocol_errors[perrs:]:
        fails.append(("upstream-parse-error", f"{err['error']}; Ollama had received {err['tail'][-400:]!r}"))
    errors, _ = log_problems(stack.new_log())
    if errors:
        fails.append((log_kind(errors), "\n".join(errors)[:3000]))
    return fails, out


def minimize(stack: Stack, case: Case, kind: str, budget_s: float) -> Case:
    """Delta debugging over the input bytes (and its write splits), keeping failure `kind`."""
    deadline = time.monotonic() + budget_s

    def fails_with(data: bytes, splits: list[int]) -> bool:
        trial = Case(case.index, case.seed, data, splits, [case.delays[0] if case.delays else 0.0] * len(splits),
                     case.end, case.methods, case.keyed, None, case.desc, case.sentinel)
        return any(k == kind for k, _ in replay(stack, trial))

    data, splits = case.data, case.splits
    if splits and fails_with(data, []):
        splits = []
    n = 2
    while len(data) > 1 and time.monotonic() < deadline:
        size = max(1, len(data) // n)
        reduced = False
        for start in range(0, len(data), size):
            if time.monotonic() > deadline:
                break
            trial = data[:start] + data[start + size:]
            tsplits = [s for s in splits if s < len(trial)]
            if trial and fails_with(trial, tsplits):
                data, splits = trial, tsplits
                n = max(n - 1, 2)
                reduced = True
                break
        if not reduced:
            if size == 1:
                break
            n = min(len(data), n * 2)
    return Case(case.index, case.seed, data, splits, case.delays[:len(splits)], case.end, case.methods, case.keyed,
                None, case.desc, case.sentinel)


def save_failure(base: Path, n: int, kind: str, case: Case, detail: str, minimized: Case | None,
                 reproduced: bool | None) -> Path:
    safe = re.sub(r"[^a-z0-9-]+", "-", kind.lower())
    d = base / "failures" / f"{n:02d}-{safe}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "input.bin").write_bytes(case.data)
    meta = {"kind": kind, "detail": detail, "seed": case.seed, "input": case.index, "end": case.end,
            "splits": case.splits, "delays": case.delays, "methods": case.methods, "keyed": case.keyed,
            "description": case.desc, "reproduced_alone": reproduced}
    if minimized is not None:
        (d / "minimized.bin").write_bytes(minimized.data)
        meta["minimized"] = {"bytes": len(minimized.data), "splits": minimized.splits, "repr": repr(minimized.data[:2000])}
    meta["replay"] = f"python -m bench.fuzz --replay {d / ('minimized.bin' if minimized else 'input.bin')}"
    (d / "meta.json").write_text(json.dumps(meta, indent=2))
    return d


# ---------------------------------------------------------------------------------------------------------
# The run

@dataclass
class Failure:
    kind: str
    detail: str
    cases: list[int]


async def fuzz_loop(stack: Stack, seed: int, seconds: float, concurrency: int, stats: dict[str, Any],
                    failures: list[Failure], cases: dict[int, Case], rid_case: dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    end_at = loop.time() + seconds
    next_index = 0
    active: dict[int, float] = {}
    outcomes: Counter[str] = stats["outcomes"]
    recent: list[tuple[float, int]] = []  # (finished at, case) for attributing log lines

    async def worker() -> None:
        nonlocal next_index
        while loop.time() < end_at:
            index = next_index
            next_index += 1
            case = make_case(seed, index)
            cases[index] = Case(case.index, case.seed, b"", [], [], case.end, case.methods, case.keyed,
                                case.control, case.desc, case.sentinel)  # keep memory small
            active[index] = loop.time()
            try:
                out = await run_case(case, stack.fastgate.port)
            except Exception as exc:  # a harness bug must not end the run; it is reported
                out = Outcome(connect_error=f"harness error: {exc!r}")
                stats["harness_errors"] += 1
            del active[index]
            recent.append((loop.time(), index))
            fails, responses, label = check_case(case, out)
            if not stack.fastgate.alive():
                fails = [f for f in fails if f[0] != "connect-failed"]
                fails.append(("process-died", f"fastgate exited with {stack.fastgate.returncode}"))
                stack.ensure_up()
            for r in responses:
                rid = r.header(b"x-request-id")
                if rid:
                    rid_case[rid.decode("latin-1")] = index
            stats["inputs"] += 1
            stats["bytes_sent"] += len(case.data)
            outcomes[f"{case.end}:{label}"[:80]] += 1
            stats["seconds_by_outcome"][f"{case.end}:{label}"[:80]] += out.seconds
            for r in responses:
                stats["statuses"][r.status] += 1
            for kind, detail in fails:
                failures.append(Failure(kind, detail, [index]))
                cases[index] = case  # keep the bytes of failing inputs
                stats["failing_inputs"].add(index)

    async def log_watch() -> None:
        while loop.time() < end_at + CASE_DEADLINE_S:
            await asyncio.sleep(0.5)
            errors, warnings = log_problems(stack.new_log())
            now = loop.time()
            suspects = sorted(active) + [i for t, i in reversed(recent) if now - t < 3.0 and i not in active]
            del recent[:max(0, len(recent) - 200)]
            for chunk in split_tracebacks(errors):
                failures.append(Failure(log_kind(chunk), "\n".join(chunk)[:3000], suspects))
            stats["log_warnings"] += len(warnings)

    watcher = loop.create_task(log_watch())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await asyncio.sleep(1.0)
    watcher.cancel()
    errors, warnings = log_problems(stack.new_log())
    for chunk in split_tracebacks(errors):
        failures.append(Failure(log_kind(chunk), "\n".join(chunk)[:3000], [i for _, i in reversed(recent[-50:])]))


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out) if args.out else results_dir("fuzz")
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(f"fuzz: seed {args.seed}, {args.seconds:g} s, concurrency {args.concurrency}, results in {out_dir}")
    stack = Stack(out_dir)
    fd_start = stack.fastgate.fds()
    rss_start = stack.fastgate.rss_kib()
    stats: dict[str, Any] = {"inputs": 0, "bytes_sent": 0, "outcomes": Counter(), "statuses": Counter(),
                             "failing_inputs": set(), "log_warnings": 0, "harness_errors": 0,
                             "seconds_by_outcome": Counter(), "attributed": 0, "health_probes": 0}
    failures: list[Failure] = []
    cases: dict[int, Case] = {}
    rid_case: dict[str, int] = {}
    started = time.monotonic()
    try:
        asyncio.run(fuzz_loop(stack, args.seed, args.seconds, args.concurrency, stats, failures, cases, rid_case))
        elapsed = time.monotonic() - started
        # Everything the fake received, judged request by request.
        received = stack.fake.received_since(0)

        def data_of(index: int) -> bytes | None:
            return make_case(args.seed, index).data if index in cases else None  # the same bytes again

        attributions: dict[int, tuple[int | None, tuple[str, str] | None]] = {}

        def attributed(rec: Any) -> tuple[int | None, tuple[str, str] | None]:
            if id(rec) not in attributions:
                attributions[id(rec)] = attribute(rec, rid_case, data_of)
            return attributions[id(rec)]

        upstream_fails: Counter[str] = Counter()
        notes: Counter[str] = Counter()
        for rec in received:
            if is_health_probe(rec):
                stats["health_probes"] += 1
                continue
            index, unkeyed = attributed(rec)
            stats["attributed"] += unkeyed is None
            for kind, detail in check_received(rec, stack.upstream_host, attributed):
                case = cases.get(index) if index is not None else None
                if (kind == "upstream-xff" and "['unknown']" in detail and case is not None
                        and case.end in ("close", "rst", "half")):
                    # The client left before fastgate read its address: attributed to "unknown" (see
                    # RELIABILITY.md). Counted, not a failure.
                    notes["x-forwarded-for-unknown-after-client-left"] += 1
                    continue
                if index is not None:
                    stats["failing_inputs"].add(index)
                upstream_fails[kind] += 1
                if upstream_fails[kind] <= 5:
                    failures.append(Failure(kind, detail, [index] if index is not None else []))
        for err in stack.fake.protocol_errors:
            failures.append(Failure("upstream-parse-error",
                                    f"{err['error']}; Ollama had received {err['tail'][-400:]!r}", []))
        # Leaks: after a quiet second, fastgate should hold no client connection but /health's own.
        time.sleep(1.5)
        try:
            h = health(stack.fastgate.port)
            conns, in_flight = h["fastgate"]["connections"], h["fastgate"]["in_flight"]
            if conns > 1 or in_flight:
                failures.append(Failure("connection-leak", f"/health after the run: {h['fastgate']}", []))
        except (OSError, ValueError, KeyError) as exc:
            failures.append(Failure("health-failed", repr(exc), []))
            h = {}
        fd_end = stack.fastgate.fds()
        rss_end = stack.fastgate.rss_kib()
        if fd_end > fd_start + 2 and stack.restarts == 0:
            failures.append(Failure("fd-leak", f"{fd_start} open fds at start, {fd_end} after the run", []))
        # Triage: replay each distinct failure alone, minimise it, save it.
        triage_deadline = time.monotonic() + args.triage_seconds
        saved: list[dict[str, Any]] = []
        seen_kinds: set[str] = set()
        for f in failures:
            key = f.kind
            if key in seen_kinds:
                continue
            seen_kinds.add(key)
            reproduced: bool | None = None
            minimized: Case | None = None
            case: Case | None = None
            for index in f.cases[:30]:
                candidate = make_case(args.seed, index)
                if time.monotonic() > triage_deadline:
                    break
                if any(k == f.kind for k, _ in replay(stack, candidate)):
                    case, reproduced = candidate, True
                    break
            if case is None and f.cases:
                case, reproduced = make_case(args.seed, f.cases[-1]), False
            if case is not None and reproduced and time.monotonic() < triage_deadline:
                minimized = minimize(stack, case, f.kind, min(60.0, triage_deadline - time.monotonic()))
            path = save_failure(out_dir, len(saved), f.kind, case, f.detail, minimized, reproduced) if case else None
            saved.append({"kind": f.kind, "detail": f.detail[:1000], "inputs": f.cases[:20],
                          "reproduced_alone": reproduced, "saved": str(path) if path else None,
                          "minimized_bytes": len(minimized.data) if minimized else None})
        code, stop_s = stack.stop()
    except BaseException:
        stack.stop()
        raise
    kinds = Counter(f.kind for f in failures)
    summary = {
        "seed": args.seed, "seconds": round(elapsed, 1), "concurrency": args.concurrency, "machine": machine,
        "git": git_state(),
        "inputs": stats["inputs"], "inputs_per_s": round(stats["inputs"] / max(elapsed, 1e-9), 1),
        "bytes_sent": stats["bytes_sent"], "requests_reaching_ollama": len(received),
        "requests_attributed_to_a_keyed_request": stats["attributed"], "health_probes": stats["health_probes"],
        "distinct_outcomes": len(stats["outcomes"]), "outcomes": dict(stats["outcomes"].most_common()),
        "statuses": {str(k): v for k, v in sorted(stats["statuses"].items())},
        "slowest_outcomes_s": {k: round(v, 1) for k, v in stats["seconds_by_outcome"].most_common(8)},
        "failures": sum(kinds.values()), "failure_kinds": dict(kinds), "failing_inputs": len(stats["failing_inputs"]),
        "saved_failures": saved, "fastgate_restarts": stack.restarts, "log_warnings": stats["log_warnings"],
        "notes": dict(notes), "harness_errors": stats["harness_errors"],
        "fastgate": {"fds_start": fd_start, "fds_end": fd_end, "rss_kib_start": rss_start, "rss_kib_end": rss_end,
                     "health_after": h.get("fastgate"), "exit_code": code, "stop_seconds": round(stop_s, 2)},
        "fake_ollama_errors": [repr(e) for e in stack.fake.fake.errors][:10],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    md = render_markdown(summary)
    (out_dir / "summary.md").write_text(md)
    print(md)
    return 1 if failures else 0


def render_markdown(s: dict[str, Any]) -> str:
    m = s["machine"]
    lines = [
        f"# fuzz run, seed {s['seed']}",
        "",
        f"{m['date']}; {m['nproc']} CPUs ({m['cpu_model']}), load {m['loadavg']}, Python {m['python']}; "
        f"fastgate at {s['git']}",
        "",
        "| figure | value |", "| --- | --- |",
        f"| time | {s['seconds']} s at concurrency {s['concurrency']} |",
        f"| inputs tried | {s['inputs']} ({s['inputs_per_s']}/s, {s['bytes_sent']} bytes) |",
        f"| requests that reached the fake Ollama | {s['requests_reaching_ollama']}: "
        f"{s['requests_attributed_to_a_keyed_request']} pinned each to one client request that held a valid key, "
        f"{s['health_probes']} fastgate's own /health probes, the rest failures |",
        f"| distinct outcomes (end mode : statuses) | {s['distinct_outcomes']} |",
        f"| failures | {s['failures']} {s['failure_kinds'] or ''} |",
        f"| inputs with a failure of their own (client- or upstream-side) | {s['failing_inputs']} |",
        f"| notes (not failures) | {s['notes'] or 'none'} |",
        f"| fastgate restarts (crashes) | {s['fastgate_restarts']} |",
        f"| fastgate fds start/end | {s['fastgate']['fds_start']} / {s['fastgate']['fds_end']} |",
        f"| fastgate RSS start/end | {s['fastgate']['rss_kib_start']} / {s['fastgate']['rss_kib_end']} KiB |",
        f"| fastgate exit on SIGTERM | code {s['fastgate']['exit_code']} in {s['fastgate']['stop_seconds']} s |",
        "",
        "Statuses seen: " + ", ".join(f"{k}: {v}" for k, v in s["statuses"].items()),
        "",
        "Most frequent outcomes: " + ", ".join(f"`{k}` {v}" for k, v in list(s["outcomes"].items())[:12]),
    ]
    if s["saved_failures"]:
        lines += ["", "## Failures", ""]
        for f in s["saved_failures"]:
            lines.append(f"- **{f['kind']}** (inputs {f['inputs'][:5]}, reproduced alone: {f['reproduced_alone']}, "
                         f"minimized to {f['minimized_bytes']} bytes): {f['detail'][:300]!s}  \n  saved: {f['saved']}")
    return "\n".join(lines) + "\n"


def replay_main(args: argparse.Namespace) -> int:
    path = Path(args.replay)
    meta_path = path.parent / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    data = path.read_bytes()
    splits = meta.get("minimized", {}).get("splits", []) if path.name == "minimized.bin" else meta.get("splits", [])
    case = Case(meta.get("input", 0), meta.get("seed", 0), data, splits, [0.0] * len(splits),
                args.end or meta.get("end", "keep"), meta.get("methods", ["GET"]), meta.get("keyed", _holds_key(data)),
                None, meta.get("description", []), False)
    out_dir = results_dir("fuzz-replay")
    stack = Stack(out_dir)
    try:
        fails, out = replay_outcome(stack, case)
    finally:
        stack.stop()
    print(f"sent {len(data)} bytes ({case.end}); received {len(out.received)} bytes, eof={out.eof}, "
          f"timed_out={out.timed_out}, {out.seconds:.2f} s")
    print(out.received[:3000].decode("latin-1"))
    for kind, detail in fails:
        print(f"FAIL {kind}: {detail}")
    print("no failure" if not fails else f"{len(fails)} failure(s); fastgate log: {out_dir / 'fastgate.log'}")
    return 1 if fails else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="how long to generate inputs (default 60)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"input seed (default {DEFAULT_SEED})")
    p.add_argument("--concurrency", type=int, default=8, help="connections at a time (default 8)")
    p.add_argument("--triage-seconds", type=float, default=120.0,
                   help="time to replay and minimise failures after the run (default 120)")
    p.add_argument("--out", help="results directory (default bench/results/fuzz-<timestamp>)")
    p.add_argument("--replay", metavar="FILE", help="send one saved input (input.bin/minimized.bin) and report")
    p.add_argument("--end", choices=("keep", "half", "close", "rst"), help="with --replay: how the client ends")
    p.add_argument("--show", type=int, metavar="N", help="print input N of --seed and exit")
    args = p.parse_args(argv)
    if args.show is not None:
        case = make_case(args.seed, args.show)
        print(json.dumps({k: v for k, v in asdict(case).items() if k != "data"}, indent=1))
        print(case.data[:4000].decode("latin-1"))
        return 0
    if args.replay:
        return replay_main(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
