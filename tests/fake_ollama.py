"""A fake Ollama server that behaves like the real one on the wire.

Used by fastgate's test-suite (in-process, on the test's event loop) and by the benchmark
(standalone: ``python -m tests.fake_ollama --port 11434``). The behaviour follows
/work/shared/reference/ollama-wire.md: Go net/http + gin framing rules, the Host and Origin
guards, NDJSON / SSE streaming with one chunk per item, blob upload semantics, and
"stop generating when the client goes away".

Design notes
- asyncio.Protocol + h11 for *parsing* requests only. Responses are written as raw bytes so the
  framing is exactly what we decide (and so faults can write broken HTTP on purpose).
- h11 handles one request/response cycle per Connection object; because we never send through
  h11 we start a fresh parser after every request and feed it the leftover bytes
  (``trailing_data``). That gives pipelining for free: later requests are parsed (and recorded)
  while an earlier response is still streaming, and are answered strictly in order by one
  worker task per connection.
- Everything is cheap on purpose (no per-chunk logging, no per-chunk allocations beyond the
  chunk itself) because the benchmark measures the proxy, not this fake.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import ipaddress
import itertools
import json
import re
import socket
import struct
import sys
import time
import traceback
import zlib
from collections import deque
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Iterable, Iterator
from urllib.parse import parse_qs, unquote

import h11

__all__ = ["FakeOllama", "ReceivedRequest", "Disconnect", "FAULTS", "DEFAULT_MODELS", "main"]

DEFAULT_MODELS = ["llama3.2:latest", "qwen2.5:0.5b"]
# Ollama's answer (503) when its scheduler queue is full (server/sched.go ErrMaxQueue).
SERVER_BUSY = "server busy, please try again.  maximum pending requests exceeded"

# Faults that act before anything is written, and faults that act after two stream items.
_PRE_FAULTS = frozenset(
    {"reset-before-status", "close-before-status", "stall", "malformed-status", "malformed-header", "status-500",
     "slow-first-byte"}
)
_MID_FAULTS = frozenset({"reset-mid-stream", "close-mid-stream", "stall-mid-stream", "error-mid-stream"})
FAULTS = _PRE_FAULTS | _MID_FAULTS
_FAULT_AFTER_ITEMS = 2
_SLOW_FIRST_BYTE_S = 0.3
_RST_SETTLE_S = 0.05  # let the peer read the items already sent before the RST destroys the socket
_FAULT_ERROR = "something went wrong"

_GO_BUFFER = 2048  # Go's pre-chunking buffer: bodies up to this size get Content-Length
_MAX_POST_HANDLER_READ = 256 * 1024  # Go discards at most this much unread body, else closes
_RST_AVOIDANCE_S = 0.5  # Go's closeWriteAndWait delay
_MAX_HEADER_BYTES = 1 << 20  # Go's DefaultMaxHeaderBytes
_BYTES_CHUNK = 64 * 1024
_PATTERN = bytes(range(256)) * (_BYTES_CHUNK // 256)  # /fake/bytes content, repeats every 256 bytes

_DIGEST_RE = re.compile(r"sha256[:-][0-9a-fA-F]{64}")
_JSON_CT = "application/json; charset=utf-8"  # gin c.JSON
_JSON_PLAIN_CT = "application/json"  # set by hand in streamResponse/waitForStream and the /v1 writers
_TEXT_CT = "text/plain; charset=utf-8"  # gin c.String
_NDJSON_CT = "application/x-ndjson"
_SSE_CT = "text/event-stream"

_TOKENS_DEFAULT = 5

# gin registers method trees in this order in Ollama's routes.go; the 405 Allow header follows it.
_METHOD_ORDER = ("HEAD", "GET", "POST", "DELETE")
_ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("HEAD", "GET"),
    "/api/version": ("HEAD", "GET"),
    "/api/tags": ("HEAD", "GET"),
    "/api/ps": ("GET",),
    "/api/show": ("POST",),
    "/api/generate": ("POST",),
    "/api/chat": ("POST",),
    "/api/embed": ("POST",),
    "/api/embeddings": ("POST",),
    "/api/pull": ("POST",),
    "/api/copy": ("POST",),
    "/api/delete": ("DELETE",),
    "/api/blobs/:digest": ("HEAD", "POST"),
    "/api/me": ("POST",),
    "/api/signout": ("POST",),
    "/v1/chat/completions": ("POST",),
    "/v1/completions": ("POST",),
    "/v1/embeddings": ("POST",),
    "/v1/models": ("GET",),
    "/v1/models/:model": ("GET",),
    "/fake/bytes": ("GET",),
}
_PARAM_ROUTES = (("/api/blobs/", "/api/blobs/:digest"), ("/v1/models/", "/v1/models/:model"))

# CORS: Ollama's fixed AllowHeaders list, canonicalised by gin-contrib/cors.
_CORS_ALLOW_HEADERS = ",".join(
    ["Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "Openai-Beta"]
    + [
        "X-Stainless-" + s
        for s in (
            "Arch", "Async", "Custom-Poll-Interval", "Helper-Method", "Lang", "Os", "Package-Version",
            "Poll-Helper", "Retry-Count", "Runtime", "Runtime-Version", "Timeout",
        )
    ]
)
_CORS_ALLOW_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"


def _default_origins() -> list[str]:
    out = []
    for h in ("localhost", "127.0.0.1", "0.0.0.0"):
        out += [f"http://{h}", f"https://{h}", f"http://{h}:*", f"https://{h}:*"]
    return out + ["app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"]


_ORIGINS_EXACT = frozenset(o for o in _default_origins() if "*" not in o)
_ORIGINS_WILD = tuple(tuple(o.split("*", 1)) for o in _default_origins() if "*" in o)


def _origin_allowed(origin: str) -> bool:
    # gin-contrib/cors: exact match, else one-'*' wildcard = prefix+suffix match (case-sensitive).
    if origin in _ORIGINS_EXACT:
        return True
    return any(origin.startswith(p) and origin.endswith(s) for p, s in _ORIGINS_WILD)


_PRIVATE_NETS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_local_ips: frozenset[Any] | None = None


def _is_local_ip(ip: Any) -> bool:
    # Go checks the addresses of every local interface; the stdlib cannot list them portably,
    # so the addresses the hostname resolves to are the approximation.
    global _local_ips
    if _local_ips is None:
        found = set()
        try:
            for info in socket.getaddrinfo(socket.gethostname(), None):
                found.add(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
        except (OSError, ValueError):
            pass
        _local_ips = frozenset(found)
    return ip in _local_ips


def _go_split_host(hostport: str) -> str:
    """net.SplitHostPort(host) falling back to the whole value on error, as Ollama does."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end == -1 or not hostport[end + 1 :].startswith(":") or ":" in hostport[end + 2 :]:
            return hostport
        return hostport[1:end]
    i = hostport.rfind(":")
    if i == -1 or ":" in hostport[:i]:
        return hostport  # "missing port" / "too many colons"
    return hostport[:i]


def _host_ip_allowed(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # netip unmaps before IsLoopback/IsPrivate
            ip = ip.ipv4_mapped
        elif ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%")[0])
    return ip.is_loopback or ip.is_unspecified or any(ip in n for n in _PRIVATE_NETS) or _is_local_ip(ip)


def _host_name_allowed(host: str) -> bool:
    h = host.lower()
    if h in ("", "localhost") or h == socket.gethostname().lower():
        return True
    return h.endswith((".localhost", ".local", ".internal"))


# Go's encoding/json escapes these inside strings; Python's json does not.
_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def _gojson(obj: Any) -> bytes:
    """Compact JSON like Go's json.Marshal (no trailing newline)."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    if "<" in s or ">" in s or "&" in s or "\u2028" in s or "\u2029" in s:
        s = s.translate(_GO_ESCAPES)
    return s.encode()


_ts_cache: list[Any] = [-1, ""]


def _rfc3339nano(ns: int | None = None) -> str:
    """time.Now().UTC() formatted like Go's RFC3339Nano (trailing zeros trimmed)."""
    sec, frac = divmod(time.time_ns() if ns is None else ns, 1_000_000_000)
    if sec != _ts_cache[0]:  # called per stream item: format the seconds part once per second
        _ts_cache[0], _ts_cache[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    if frac:
        return f"{_ts_cache[1]}.{frac:09d}".rstrip("0") + "Z"
    return _ts_cache[1] + "Z"


_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if now != _date_cache[0]:  # formatting once per second keeps per-response cost tiny
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True)
    return _date_cache[1]


def _reason(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return f"status code {code}"  # what Go writes for codes it has no text for (e.g. 499)


def _norm_model(name: str) -> str:
    n = name.lower()
    return n if ":" in n.rsplit("/", 1)[-1] else n + ":latest"


def _is_zero_keepalive(v: Any) -> bool:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v == 0
    return isinstance(v, str) and v.strip() in ("0", "0s", "0m", "0h")


def _embedding(text: str, dim: int = 16) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i % 32] - 127.5) / 127.5, 6) for i in range(dim)]


def _go_type(v: Any) -> str:
    if isinstance(v, list):
        return "array"
    if isinstance(v, str):
        return "string"
    if isinstance(v, bool):
        return "bool"
    return "number"


# Go's encoding/json decodes a body into a struct: keys match fields case-insensitively with simple folding
# (U+017F and U+212A fold to s and k), the last match wins and null leaves a field unchanged; nesting to
# 10,000 levels and numbers of any length in unknown fields are fine. The fake keeps one entry per folded key
# so handlers can look fields up by their lower-case tag, as Go's struct decoding finds them.
_GO_FOLD = str.maketrans({"\u017f": "s", "\u212a": "k"})


def _go_field_name(key: str) -> str:
    folded = key.translate(_GO_FOLD)
    return folded.lower() if folded.isascii() else key


def _go_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in pairs:
        name = _go_field_name(key)
        if value is None and name in fields:
            continue
        fields[name] = value
    return fields


def _go_number(text: str) -> Any:
    return int(text) if len(text) < 4000 else float("inf")


class _GoLikeDecoder(json.JSONDecoder):
    def raw_decode(self, s: str, idx: int = 0) -> tuple[Any, int]:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 25_000))  # Go accepts 10,000 levels of nesting
        try:
            return super().raw_decode(s, idx)
        finally:
            sys.setrecursionlimit(limit)


_GO_LIKE_DECODER = _GoLikeDecoder(object_pairs_hook=_go_object, parse_int=_go_number)


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)


def _split_option(opts: dict[str, Any]) -> tuple[int, float, bool] | None:
    """options.fake_split_final = N (>= 2): the object carrying the token counts (native `done:true`, /v1
    `usage`; the whole body of a non-streamed answer) is written in N pieces, fake_split_gap_ms apart (default
    20); with fake_split_chunks true each piece of a streamed object is an HTTP chunk of its own."""
    n = opts.get("fake_split_final")
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        return None
    gap = opts.get("fake_split_gap_ms", 20)
    return n, float(gap if isinstance(gap, (int, float)) else 20) / 1000.0, opts.get("fake_split_chunks") is True


class _Gone(Exception):
    """The connection is (being) closed: stop handling, write nothing more."""


@dataclass
class ReceivedRequest:
    method: str
    target: str  # raw request target, e.g. "/api/chat?x=1"
    path: str  # raw (not percent-decoded) path, e.g. "/api/chat"
    query: str  # "x=1" or ""
    headers: list[tuple[str, str]]  # names lowercased, in order, duplicates kept
    body: bytes  # full body; b"" for /api/blobs/* POST (see blob_*)
    conn_id: int  # upstream TCP connection number (1, 2, ...)
    blob_size: int | None = None
    blob_sha256: str | None = None  # hex digest of what was received for blob uploads
    received_at: float = 0.0  # time.monotonic() when the whole request was in

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Disconnect:
    path: str
    at: float  # time.monotonic() when the fake noticed its client went away
    items_sent: int  # stream items written before that


class _Req:
    """Per-request state inside a connection."""

    __slots__ = (
        "method", "target", "path", "route_path", "query", "headers", "hmap", "conn_id", "http10",
        "keep_alive", "close_after", "expect_continue", "fault", "chunks", "hasher", "blob_size",
        "early", "unread", "proto_error", "cors_headers", "items_sent", "head_sent", "t0", "openai", "split",
    )

    def __init__(self, conn_id: int, ev: h11.Request | None = None, proto_error: bytes = b"") -> None:
        self.conn_id = conn_id
        self.proto_error = proto_error
        self.fault: str | None = None
        self.chunks: list[bytes] = []
        self.hasher: Any = None
        self.blob_size = 0
        self.early = False  # answered from the headers alone, body never read
        self.unread = False  # body left unread on the wire (Go then closes after the reply)
        self.cors_headers: list[tuple[str, str]] = []
        self.split: tuple[int, float, bool] | None = None  # see _split_option
        self.items_sent = 0
        self.head_sent = False
        self.t0 = 0
        self.headers: list[tuple[str, str]] = []
        self.hmap: dict[str, str] = {}
        self.method = self.target = self.path = self.route_path = self.query = ""
        self.http10 = False
        self.keep_alive = False
        self.close_after = True
        self.expect_continue = False
        self.openai = False
        if ev is None:
            return
        self.method = ev.method.decode("ascii")
        self.target = ev.target.decode("latin-1")
        self.path, _, self.query = self.target.partition("?")
        self.route_path = unquote(self.path)  # gin routes on the decoded URL.Path
        self.openai = self.route_path.startswith("/v1/")
        self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers]
        for k, v in self.headers:
            self.hmap.setdefault(k, v)
        self.http10 = ev.http_version == b"1.0"
        tokens = {t.strip().lower() for k, v in self.headers if k == "connection" for t in v.split(",")}
        self.keep_alive = ("keep-alive" in tokens) if self.http10 else ("close" not in tokens)
        self.close_after = not self.keep_alive
        self.expect_continue = not self.http10 and self.hmap.get("expect", "").lower() == "100-continue"

    def has_body(self) -> bool:
        te = self.hmap.get("transfer-encoding", "")
        return "chunked" in te or self.hmap.get("content-length", "0") != "0"

    def record(self) -> ReceivedRequest:
        if self.hasher is not None:
            return ReceivedRequest(
                self.method, self.target, self.path, self.query, self.headers, b"", self.conn_id,
                self.blob_size, self.hasher.hexdigest(), received_at=time.monotonic(),
            )
        return ReceivedRequest(
            self.method, self.target, self.path, self.query, self.headers, b"".join(self.chunks), self.conn_id,
            received_at=time.monotonic(),
        )


def _match_route(path: str) -> tuple[str, str] | None:
    if path in _ROUTES:
        return path, ""
    for prefix, key in _PARAM_ROUTES:
        if path.startswith(prefix):
            param = path[len(prefix) :]
            if param and "/" not in param:
                return key, param
    return None


class _Conn(asyncio.Protocol):
    """One accepted TCP connection."""

    def __init__(self, fake: FakeOllama) -> None:
        self.fake = fake
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.conn_id = 0
        self.parser = self._new_parser()
        self.incoming: _Req | None = None  # request whose body is still arriving
        self.pending: deque[_Req] = deque()  # complete requests waiting for their turn
        self.active: _Req | None = None  # request being answered
        self.worker: asyncio.Task[None] | None = None
        self.ignore_input = False  # no further request will be parsed on this connection
        self.closing_by_us = False  # our own closes/resets are not client disconnects
        self.lost = False
        self.write_ready: asyncio.Future[None] | None = None  # set while the transport is paused
        self.reading_paused = False
        self.close_timer: asyncio.TimerHandle | None = None

    @staticmethod
    def _new_parser() -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)

    # ---- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # Go sets TCP_NODELAY too; without it small chunks would be delayed by Nagle
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        f = self.fake
        f.connections_opened += 1
        f.open_connections += 1
        self.conn_id = f.connections_opened
        f._conns.add(self)

    def data_received(self, data: bytes) -> None:
        if self.ignore_input:
            return
        if self.fake.lean and data.startswith(b"GET /api/version ") and self._lean_version(data):
            return
        self.parser.receive_data(data)
        self._parse()

    def _lean_version(self, data: bytes) -> bool:
        """Lean mode: answer one whole, plain `GET /api/version` on an idle connection straight away.

        Only when nothing else is in flight or buffered on this connection (so ordering and pipelining
        stay h11's job), with no Origin header, and with a Host the real guard would pass; anything
        else returns False and takes the faithful path.
        """
        if (self.worker is not None or self.pending or self.incoming is not None or not data.endswith(b"\r\n\r\n")
                or data.find(b"\r\n\r\n") != len(data) - 4 or self.parser.trailing_data[0]
                or not data.startswith(b"GET /api/version HTTP/1.1\r\n")):
            return False
        lower = data.lower()
        if b"\r\norigin:" in lower or b"\r\nconnection:" in lower or b"\r\nexpect:" in lower:
            return False
        at = lower.find(b"\r\nhost:")
        if at < 0 or lower.find(b"\r\nhost:", at + 1) >= 0:
            return False
        host = data[at + 7:data.index(b"\r\n", at + 2)].strip().decode("latin-1")
        if self.fake.check_host and self.fake._loopback and not _host_ip_allowed(_go_split_host(host)):
            return False
        body = b'{"version":"%s"}' % self.fake.version.encode()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nDate: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (_JSON_CT.encode(), _http_date().encode(), len(body), body))
        return True

    def eof_received(self) -> bool:
        # Go cancels the in-flight request's context when the client half-closes, so do we.
        self._client_gone()
        return False  # let asyncio close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_gone()
        self.lost = True
        if self.close_timer is not None:
            self.close_timer.cancel()
        f = self.fake
        f.open_connections -= 1
        f._conns.discard(self)

    def pause_writing(self) -> None:
        if self.write_ready is None:
            self.write_ready = self.loop.create_future()

    def resume_writing(self) -> None:
        fut, self.write_ready = self.write_ready, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    # ---- request parsing --------------------------------------------------------------------
    def _parse(self) -> None:
        while not self.ignore_input:
            try:
                ev = self.parser.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            t = type(ev)
            if t is h11.Data:
                self._on_body(ev.data)  # type: ignore[union-attr]
            elif t is h11.Request:
                self._on_request(ev)  # type: ignore[arg-type]
            elif t is h11.EndOfMessage:
                self._on_end()
            else:  # NEED_DATA, PAUSED, ConnectionClosed
                return

    def _on_request(self, ev: h11.Request) -> None:
        req = _Req(self.conn_id, ev)
        if self.fake.faults:
            req.fault = self.fake.faults.pop(0)
        self.incoming = req
        if req.method == "POST" and req.fault is None and self._blob_answer_early(req):
            # Go answers without touching the body. Up to 256 KiB of known-length body is
            # discarded to keep the connection; otherwise it replies "Connection: close".
            req.early = True
            self.fake.received.append(req.record())
            try:
                cl = int(req.hmap.get("content-length", "0"))
            except ValueError:
                cl = 0
            if req.expect_continue or "transfer-encoding" in req.hmap or cl > _MAX_POST_HANDLER_READ:
                req.close_after = req.unread = True
                self.ignore_input = True
                self.incoming = None
            self._enqueue(req)
            return
        if req.route_path.startswith("/api/blobs/") and req.method == "POST":
            req.hasher = hashlib.sha256()  # hash as it arrives; GiB uploads are never buffered
        if req.expect_continue and req.has_body() and self.active is None and not self.pending:
            # Go answers 100-continue on the handler's first body read, which is immediate.
            # (Skipped while an earlier response is in flight: it would corrupt that response.)
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _on_body(self, data: bytes) -> None:
        req = self.incoming
        if req is None or req.early:
            return
        if req.hasher is not None:
            req.hasher.update(data)
            req.blob_size += len(data)
        else:
            req.chunks.append(bytes(data))

    def _on_end(self) -> None:
        req, self.incoming = self.incoming, None
        leftover, _ = self.parser.trailing_data
        self.parser = self._new_parser()
        if req is not None and not req.keep_alive:
            self.ignore_input = True  # anything after a "Connection: close" request is ignored
        elif leftover:
            self.parser.receive_data(leftover)
        if req is None or req.early:
            return
        self.fake.received.append(req.record())
        self._enqueue(req)

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        self.ignore_input = True
        self.incoming = None
        msg = b"431 Request Header Fields Too Large" if exc.error_status_hint == 431 else b"400 Bad Request"
        self._enqueue(_Req(self.conn_id, proto_error=msg))

    def _enqueue(self, req: _Req) -> None:
        self.pending.append(req)
        if len(self.pending) >= 64 and not self.reading_paused:
            self.reading_paused = True  # bound memory if a client pipelines far ahead of us
            self.transport.pause_reading()
        if self.worker is None:
            self.worker = self.loop.create_task(self._work())

    # ---- connection life-cycle ----------------------------------------------------------------
    def _client_gone(self) -> None:
        if self.lost:
            return
        req = self.active or self.incoming
        if req is not None and not self.closing_by_us and not req.early:
            self.fake._record_disconnect(Disconnect(req.path, time.monotonic(), req.items_sent))
            self.closing_by_us = True  # record once (EOF is followed by connection_lost)
        if self.worker is not None:
            self.worker.cancel()  # stop generating at once
        self.pending.clear()
        self.active = self.incoming = None
        self.ignore_input = True

    def is_idle(self) -> bool:
        return (
            not self.lost and not self.closing_by_us and self.active is None and self.incoming is None
            and not self.pending and not self.parser.trailing_data[0]
        )

    def close(self) -> None:
        self.closing_by_us = True
        self.transport.close()

    def abort(self) -> None:
        self.closing_by_us = True
        if self.worker is not None:
            self.worker.cancel()
        self.transport.abort()

    def reset(self) -> None:
        """Close with RST: SO_LINGER(on, 0) makes close() send RST instead of FIN."""
        self.closing_by_us = True
        sock = self.transport.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError):
            pass
        self.transport.abort()

    # ---- writing ------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self.lost or self.transport.is_closing():
            raise _Gone
        self.transport.write(data)

    def _head(
        self, req: _Req, status: int, headers: Iterable[tuple[str, str]], length: int | None, chunked: bool
    ) -> bytes:
        # Go writes handler headers sorted by name, then Date, Content-Length, Connection, TE.
        proto = "HTTP/1.0" if req.http10 else "HTTP/1.1"
        parts = [f"{proto} {status} {_reason(status)}\r\n"]
        parts += [f"{k}: {v}\r\n" for k, v in sorted([*req.cors_headers, *headers], key=lambda kv: kv[0])]
        parts.append(f"Date: {_http_date()}\r\n")
        if length is not None:
            parts.append(f"Content-Length: {length}\r\n")
        if req.close_after:
            parts.append("Connection: close\r\n")
        elif req.http10:
            parts.append("Connection: keep-alive\r\n")
        if chunked:
            parts.append("Transfer-Encoding: chunked\r\n")
        parts.append("\r\n")
        req.head_sent = True
        return "".join(parts).encode("latin-1")

    async def _send(
        self, req: _Req, status: int, body: bytes = b"", ctype: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        """A one-shot response with Go's framing rules."""
        if req.fault == "error-mid-stream":  # nothing streamed yet: Ollama reports the real status
            req.fault = None
            await self._error(req, 500, _FAULT_ERROR, plain=True)
            return
        hdrs = list(headers)
        if ctype:
            hdrs.append(("Content-Type", ctype))
        if req.method == "HEAD" or status in (204, 304) or status < 200:
            length = len(body) if req.method == "HEAD" and 0 < len(body) <= _GO_BUFFER else None
            head = self._head(req, status, hdrs, length, False)
            data = head
        elif len(body) <= _GO_BUFFER or req.http10:
            head = self._head(req, status, hdrs, len(body), False)
            data = head + body
        else:  # a large body written in one go leaves Go's 2 KiB buffer: one big chunk
            head = self._head(req, status, hdrs, None, True)
            data = head + _chunk(body) + b"0\r\n\r\n"
        if req.fault in _MID_FAULTS:  # truncate the one-shot body to half, then misbehave
            self._write(data[: len(head) + (len(data) - len(head)) // 2])
            await self._mid_fault(req)
        if req.split is not None and len(data) > len(head):
            self._write(head)
            await self._write_split(req, data[len(head):])
            return
        self._write(data)

    async def _write_split(self, req: _Req, data: bytes, *, chunked_payload: bool = False) -> None:
        """Write `data` in `req.split` pieces with a pause between them (options.fake_split_final): the way a
        final object reaches a proxy over several reads. `chunked_payload`: `data` is one chunk's payload and,
        with fake_split_chunks, each piece becomes a chunk of its own; otherwise pieces of the chunk's bytes."""
        assert req.split is not None
        pieces, gap, as_chunks = req.split
        if chunked_payload and not as_chunks:
            data, chunked_payload = _chunk(data), False
        size = max(1, -(-len(data) // pieces))
        for n, at in enumerate(range(0, len(data), size)):
            if n:
                await asyncio.sleep(gap)
            part = data[at:at + size]
            self._write(_chunk(part) if chunked_payload else part)

    async def _error(
        self, req: _Req, status: int, msg: str, *, plain: bool = False, bind: bool = False
    ) -> None:
        """Error bodies: native `{"error":...}`; /v1 OpenAI error objects.

        plain: native error raised inside a stream handler (Content-Type set by hand, no charset).
        bind: /v1 middleware error (gin c.JSON, no trailing newline) instead of the /v1 writer's.
        """
        if req.openai:
            etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            obj = {"error": {"message": msg, "type": etype, "param": None, "code": None}}
            if bind:
                await self._send(req, status, _gojson(obj), _JSON_CT)
            else:
                await self._send(req, status, _gojson(obj) + b"\n", _JSON_PLAIN_CT)
        else:
            await self._send(req, status, _gojson({"error": msg}), _JSON_PLAIN_CT if plain else _JSON_CT)

    async def _stream(
        self, req: _Req, ctype: str, items: Iterator[Any], *, gap: float = 0.0, ts: bool = False,
        sse: bool = False,
    ) -> None:
        """Go's c.Stream: headers go out with the first item, one chunk (one write) per item."""
        chunked = not req.http10
        if not chunked:
            req.close_after = True  # HTTP/1.0 has no chunking: the body ends at close
        head: list[tuple[str, str]] = [("Content-Type", ctype)]
        for n, item in enumerate(items):
            if n and (gap or not n % 16):
                # Pause between items; without a gap still yield now and then so a disconnect
                # (EOF/RST) is noticed promptly. Every item still gets its own write either way.
                await asyncio.sleep(gap)
            if req.fault in _MID_FAULTS and req.items_sent == _FAULT_AFTER_ITEMS:
                await self._stream_fault(req, head, chunked, sse)
                return
            if isinstance(item, dict):
                if ts:
                    item["sent_ns"] = time.monotonic_ns()  # as late as possible before the write
                payload = b"data: " + _gojson(item) + b"\n\n" if sse else _gojson(item) + b"\n"
            else:
                payload = item
            if req.split is not None and isinstance(item, dict) and (item.get("done") is True or "usage" in item):
                # the object with the token counts, in pieces (options.fake_split_final)
                if not req.head_sent:
                    self._write(self._head(req, 200, head, None, chunked))
                await self._write_split(req, payload, chunked_payload=chunked)
                req.items_sent += 1
                continue
            frame = _chunk(payload) if chunked else payload
            if not req.head_sent:
                frame = self._head(req, 200, head, None, chunked) + frame
            self._write(frame)
            req.items_sent += 1
            if self.write_ready is not None:  # transport over its high-water mark: backpressure
                await self.write_ready
        if req.fault in _MID_FAULTS:
            await self._stream_fault(req, head, chunked, sse)
            return
        end = b"0\r\n\r\n" if chunked else b""
        if not req.head_sent:
            end = self._head(req, 200, head, None, chunked) + end
        if end:
            self._write(end)

    async def _lean_stream(self, req: _Req, item: Any, final: Any, n: int, gap: float, ts: bool) -> None:
        """options.fake_lean (the benchmark's upstream): the items `_stream` would write, one HTTP chunk per
        item, with the same pacing and backpressure, but cheap enough to outrun the proxy being measured:
        - each token item is filled into a template rendered once per response instead of one dict and
          `json.dumps` each (so `created_at` is the same in all token items);
        - with a gap, one write per item, as `_stream`; without one (full speed), the 16 items made between
          two yields go out in one write: still 16 chunks, as a fast model's flushes pile up in the socket
          buffer anyway, but one syscall instead of 16;
        - the final item carries `fake_crc32`, the CRC-32 of all token items' bytes, so a client can prove
          it received exactly what was sent.
        """
        before, after = _gojson(item("@TOKEN@")).split(b"@TOKEN@")
        template = (before.replace(b"%", b"%%") + b"tok%d " + after[:-1].replace(b"%", b"%%")
                    + (b',"sent_ns":%d}\n' if ts else b"}\n"))
        monotonic_ns = time.monotonic_ns
        crc = 0
        write = self._write
        batch: list[bytes] = []
        if not req.head_sent:
            batch.append(self._head(req, 200, [("Content-Type", _NDJSON_CT)], None, True))
        for i in range(n):
            if i and (gap or not i % 16):
                if batch:
                    write(b"".join(batch))
                    batch.clear()
                    if self.write_ready is not None:
                        await self.write_ready
                await asyncio.sleep(gap)  # as in _stream: a disconnect is noticed between items
            payload = template % ((i, monotonic_ns()) if ts else (i,))
            crc = zlib.crc32(payload, crc)
            batch.append(b"%x\r\n%b\r\n" % (len(payload), payload))
            req.items_sent += 1
            if gap:
                write(b"".join(batch))
                batch.clear()
                if self.write_ready is not None:
                    await self.write_ready
        if batch:
            write(b"".join(batch))
            batch.clear()
        if n and (gap or not n % 16):
            await asyncio.sleep(gap)
        last = final("")
        last["fake_crc32"] = crc
        if ts:
            last["sent_ns"] = monotonic_ns()
        write(_chunk(_gojson(last) + b"\n"))
        req.items_sent += 1
        write(b"0\r\n\r\n")

    async def _stream_fault(self, req: _Req, head: list[tuple[str, str]], chunked: bool, sse: bool) -> None:
        if not req.head_sent:
            self._write(self._head(req, 200, head, None, chunked))
        if req.fault == "error-mid-stream":
            # Output already started: status stays 200, one last error item ends the stream.
            req.fault = None
            if sse:
                err = {"error": {"message": _FAULT_ERROR, "type": "api_error", "param": None, "code": None}}
                line = b"data: " + _gojson(err) + b"\n\n"
            else:
                line = _gojson({"error": _FAULT_ERROR}) + b"\n"
            self._write(_chunk(line) + b"0\r\n\r\n" if chunked else line)
            return
        await self._mid_fault(req)

    async def _mid_fault(self, req: _Req) -> None:
        fault, req.fault = req.fault, None
        if fault == "reset-mid-stream":
            while self.transport.get_write_buffer_size():
                await asyncio.sleep(0.001)
            await asyncio.sleep(_RST_SETTLE_S)
            self.reset()
        elif fault == "close-mid-stream":
            self.close()  # FIN after the buffered bytes, never the terminating chunk
        elif fault == "stall-mid-stream":
            await self.loop.create_future()  # silent forever; cancelled when the client leaves
        raise _Gone

    async def _unknown_fault(self, req: _Req) -> None:
        bad, req.fault = req.fault, None  # loud, so a typo in a test does not pass silently
        await self._send(req, 500, _gojson({"error": f"fake_ollama: unknown fault {bad!r}"}), _JSON_CT)

    async def _pre_fault(self, req: _Req) -> bool:
        """Apply a fault that acts before the status line. True if the request is finished."""
        fault = req.fault
        if fault not in _PRE_FAULTS:
            return False
        req.fault = None
        if fault == "slow-first-byte":
            await asyncio.sleep(_SLOW_FIRST_BYTE_S)  # like a model load before the first item
            return False
        if fault == "status-500":
            await self._error(req, 500, _FAULT_ERROR, plain=True)
            return True
        if fault == "reset-before-status":
            self.reset()
        elif fault == "close-before-status":
            self.close()  # FIN with nothing written, as an idle timeout racing the request would look
        elif fault == "stall":
            await self.loop.create_future()
        elif fault == "malformed-status":
            self._write(b"HTTP/1.1 abc\r\n\r\n")
            self.close()
        elif fault == "malformed-header":
            bad = f"HTTP/1.1 200 OK\r\nDate: {_http_date()}\r\nthis header has no colon\r\n\r\n"
            self._write(bad.encode())
            self.close()
        raise _Gone

    # ---- dispatch -----------------------------------------------------------------------------
    async def _work(self) -> None:
        try:
            while self.pending and not self.lost:
                req = self.pending.popleft()
                if self.reading_paused and len(self.pending) < 16:
                    self.reading_paused = False
                    self.transport.resume_reading()
                self.active = req
                try:
                    await self._handle(req)
                finally:
                    self.fake._running.discard(req)  # its model slot (see max_parallel) is free again
                self.active = None
                if req.close_after:
                    self._finish_close(req)
                    return
        except _Gone:
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the fake: make it visible and fail the exchange loudly
            self.fake.errors.append(exc)
            traceback.print_exc()
            if self.active is not None and not self.active.head_sent and not self.transport.is_closing():
                self.transport.write(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            self.close()
        finally:
            self.worker = None
            self.active = None

    def _finish_close(self, req: _Req) -> None:
        self.closing_by_us = True
        if req.unread and self.transport.can_write_eof():
            # Go's closeWriteAndWait: FIN, then wait a bit before close() so the client can read
            # the reply before an RST (closing with unread input) would destroy it.
            self.transport.write_eof()
            self.close_timer = self.loop.call_later(_RST_AVOIDANCE_S, self.transport.close)
        else:
            self.transport.close()

    def _cors(self, req: _Req) -> tuple[str, list[tuple[str, str]]]:
        origin = req.hmap.get("origin", "")
        if not origin or not self.fake.check_origin:
            return "pass", []
        host = req.hmap.get("host", "")
        if origin in ("http://" + host, "https://" + host):
            return "pass", []  # same-origin fetch: not treated as CORS
        if not _origin_allowed(origin):
            return "forbid", []
        if req.method == "OPTIONS":
            return "preflight", [
                ("Access-Control-Allow-Headers", _CORS_ALLOW_HEADERS),
                ("Access-Control-Allow-Methods", _CORS_ALLOW_METHODS),
                ("Access-Control-Allow-Origin", origin),
                ("Access-Control-Max-Age", "43200"),
                ("Vary", "Origin"),
                ("Vary", "Access-Control-Request-Method"),
                ("Vary", "Access-Control-Request-Headers"),
            ]
        return "pass", [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]

    def _host_check(self, req: _Req) -> str:
        if not self.fake.check_host or not self.fake._loopback:
            return "pass"  # Ollama only guards loopback listeners
        host = _go_split_host(req.hmap.get("host", ""))
        if _host_ip_allowed(host):
            return "pass"
        if _host_name_allowed(host):
            return "options" if req.method == "OPTIONS" else "pass"
        return "forbid"

    def _blob_answer_early(self, req: _Req) -> bool:
        """Will the POST /api/blobs/:digest handler answer without reading the body?"""
        route = _match_route(req.route_path)
        if route is None or route[0] != "/api/blobs/:digest":
            return False
        if self._cors(req)[0] != "pass" or self._host_check(req) != "pass":
            return True
        digest = route[1]
        return not _DIGEST_RE.fullmatch(digest) or self.fake._has_blob(digest)

    async def _handle(self, req: _Req) -> None:
        if req.proto_error:
            # Go's own reply to unparseable requests, written before closing.
            self._write(
                b"HTTP/1.1 %b\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n%b"
                % (req.proto_error, req.proto_error)
            )
            return
        req.t0 = time.monotonic_ns()
        hang = self.fake.hang_paths
        if hang and ("*" in hang or req.route_path in hang):
            await self.loop.create_future()  # read and recorded, never answered: ends with the connection
        if req.fault is not None:
            if req.fault not in FAULTS:
                await self._unknown_fault(req)
                return
            if await self._pre_fault(req):
                return
        route = _match_route(req.route_path)
        if route is None and req.route_path.endswith("/") and req.route_path != "/":
            # gin RedirectTrailingSlash, which runs before any middleware.
            stripped = _match_route(req.route_path[:-1])
            if stripped is not None and req.method in _ROUTES[stripped[0]]:
                loc = req.path[:-1] + ("?" + req.query if req.query else "")
                if req.method == "GET":
                    body = f'<a href="{loc}">Moved Permanently</a>.\n\n'.encode()
                    await self._send(req, 301, body, "text/html; charset=utf-8", [("Location", loc)])
                else:
                    await self._send(req, 307, b"", None, [("Location", loc)])
                return
        kind, cors_headers = self._cors(req)
        req.cors_headers = cors_headers
        if kind == "forbid":
            await self._send(req, 403)
            return
        if kind == "preflight":
            await self._send(req, 204)
            return
        host = self._host_check(req)
        if host != "pass":
            await self._send(req, 403 if host == "forbid" else 204)
            return
        if route is None:
            # gin's serveError sets plain "text/plain" (no charset) for its 404/405 bodies.
            await self._send(req, 404, b"404 page not found", "text/plain")
            return
        key, param = route
        if req.method not in _ROUTES[key]:
            allow = ", ".join(m for m in _METHOD_ORDER if m in _ROUTES[key])
            await self._send(req, 405, b"405 method not allowed", "text/plain", [("Allow", allow)])
            return
        await getattr(self, _HANDLERS[key])(req, param)

    # ---- request body helpers -----------------------------------------------------------------
    async def _json(self, req: _Req, go_type: str) -> dict[str, Any] | None:
        """ShouldBindJSON: decode the first JSON value of the body; on error reply 400, return None."""
        text = b"".join(req.chunks).decode("utf-8", "replace")
        start = len(text) - len(text.lstrip(" \t\r\n"))
        err: str | None = None
        obj: Any = None
        if start == len(text):
            err = "EOF"
        else:
            try:
                obj, _ = _GO_LIKE_DECODER.raw_decode(text, start)  # Go ignores trailing data
            except json.JSONDecodeError as e:
                if e.pos >= len(text.rstrip(" \t\r\n")):
                    err = "unexpected EOF"
                elif e.pos == start:
                    err = f"invalid character '{text[e.pos]}' looking for beginning of value"
                else:
                    err = f"invalid character '{text[e.pos]}' in JSON value"
        if err is None:
            if obj is None:
                return {}  # `null` decodes into a zero struct in Go
            if isinstance(obj, dict):
                return obj
            err = f"json: cannot unmarshal {_go_type(obj)} into Go value of type {go_type}"
        if req.openai:
            await self._error(req, 400, err, bind=True)
        else:
            await self._error(req, 400, "missing request body" if err == "EOF" else err)
        return None

    async def _model(self, req: _Req, data: dict[str, Any], *, field: str = "model") -> str | None:
        """The request's model; handles fault:<name>, missing and unknown models (reply sent)."""
        model = data.get(field) or (data.get("name") if field == "model" else None) or ""
        if not isinstance(model, str):
            await self._error(req, 400, f"json: cannot unmarshal {_go_type(model)} into Go struct field "
                                        f".{field} of type string", bind=True)
            return None
        if model.startswith("fault:"):
            if req.fault is None:
                req.fault = model[len("fault:") :]
                if req.fault not in FAULTS:
                    await self._unknown_fault(req)
                    return None
                if await self._pre_fault(req):
                    return None
            return model
        if not model:
            await self._error(req, 400, "model is required")
            return None
        if not self.fake._has_model(model):
            await self._error(req, 404, f'model "{model}" not found, try pulling it first')
            return None
        if self.fake.max_parallel and len(self.fake._running) >= self.fake.max_parallel:
            self.fake.busy_answers += 1
            await self._error(req, 503, SERVER_BUSY)
            return None
        self.fake._running.add(req)
        self.fake._loaded[_norm_model(model)] = None
        return model

    # ---- native endpoints ---------------------------------------------------------------------
    async def _h_root(self, req: _Req, _: str) -> None:
        await self._send(req, 200, b"Ollama is running", _TEXT_CT)

    async def _h_version(self, req: _Req, _: str) -> None:
        await self._send(req, 200, _gojson({"version": self.fake.version}), _JSON_CT)

    async def _h_tags(self, req: _Req, _: str) -> None:
        models = [self.fake._model_info(m) for m in self.fake.models]
        await self._send(req, 200, _gojson({"models": models}), _JSON_CT)

    async def _h_ps(self, req: _Req, _: str) -> None:
        expires = _rfc3339nano(time.time_ns() + 300 * 1_000_000_000)
        out = []
        for name in self.fake._loaded:
            info = self.fake._model_info(name)
            del info["modified_at"]
            out.append({**info, "expires_at": expires, "size_vram": info["size"], "context_length": 4096})
        await self._send(req, 200, _gojson({"models": out}), _JSON_CT)

    async def _h_show(self, req: _Req, _: str) -> None:
        data = await self._json(req, "api.ShowRequest")
        if data is None:
            return
        name = data.get("model") or data.get("name") or ""
        if not name:
            await self._error(req, 400, "model is required")
            return
        if not self.fake._has_model(name):
            await self._error(req, 404, f"model '{name}' not found")
            return
        info = self.fake._model_info(name)
        body = {
            # A realistic /api/show is several KiB, so it goes out chunked (see the framing rule).
            "license": "FAKE MODEL LICENSE\n\n" + "This fake model may be used for testing only. " * 40,
            "modelfile": f'# Modelfile generated by "ollama show"\nFROM {name}\n'
                         'TEMPLATE "{{ .Prompt }}"\n',
            "parameters": 'stop                           "<|eot_id|>"',
            "template": "{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|assistant|>",
            "details": info["details"],
            "model_info": {
                "general.architecture": info["details"]["family"], "general.parameter_count": 3212749888,
                "llama.context_length": 131072, "llama.embedding_length": 3072,
            },
            "capabilities": ["completion", "tools"],
            "modified_at": info["modified_at"],
        }
        await self._send(req, 200, _gojson(body), _JSON_CT)

    def _metrics(self, req: _Req, prompt_tokens: int, n: int, gen_start: int) -> dict[str, int]:
        now = time.monotonic_ns()
        m = {
            "total_duration": max(1, now - req.t0),
            "load_duration": 1_234_567,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 2_345_678,
            "eval_count": n,
            "eval_duration": max(1, now - gen_start),
        }
        return {k: v for k, v in m.items() if v}  # Go's omitempty drops zero metrics

    async def _generation(self, req: _Req, data: dict[str, Any], model: str, chat: bool) -> None:
        opts = data.get("options") if isinstance(data.get("options"), dict) else {}
        n = int(opts.get("num_predict", _TOKENS_DEFAULT))
        n = n if n >= 0 else _TOKENS_DEFAULT
        reason = "length" if "num_predict" in opts else "stop"
        gap = float(opts.get("fake_gap_ms", 0) or 0) / 1000.0
        ts = bool(opts.get("fake_timestamps", False))
        req.split = _split_option(opts)
        if chat:
            msgs = [m for m in data["messages"] if isinstance(m, dict)]
            words = sum(len(str(m.get("content", "")).split()) for m in msgs)
        else:
            words = len(str(data.get("prompt", "")).split())
        prompt_tokens = max(1, words) + 10
        gen_start = time.monotonic_ns()

        def item(text: str) -> dict[str, Any]:
            if chat:
                return {"model": model, "created_at": _rfc3339nano(),
                        "message": {"role": "assistant", "content": text}, "done": False}
            return {"model": model, "created_at": _rfc3339nano(), "response": text, "done": False}

        def final(text: str) -> dict[str, Any]:
            out = item(text)
            if chat:
                del out["done"]
                out.update(done_reason=reason, done=True)
            else:
                out.update(done=True, done_reason=reason)
                if not data.get("raw"):
                    out["context"] = list(range(1, min(prompt_tokens + n, 32) + 1))
            out.update(self._metrics(req, prompt_tokens, n, gen_start))
            return out

        if data.get("stream", True) is not False:
            if opts.get("fake_lean") and req.fault is None and not req.http10:
                await self._lean_stream(req, item, final, n, gap, ts)
                return

            def items() -> Iterator[dict[str, Any]]:
                for i in range(n):
                    yield item(f"tok{i} ")
                yield final("")

            await self._stream(req, _NDJSON_CT, items(), gap=gap, ts=ts)
        else:
            for _ in range(n):  # same generation time as the stream, and cancellable
                await asyncio.sleep(gap)
            await self._send(req, 200, _gojson(final("".join(f"tok{i} " for i in range(n)))), _JSON_CT)

    async def _h_generate(self, req: _Req, _: str) -> None:
        data = await self._json(req, "api.GenerateRequest")
        if data is None or (model := await self._model(req, data)) is None:
            return
        if not data.get("prompt"):
            reason = "unload" if _is_zero_keepalive(data.get("keep_alive")) else "load"
            body = {"model": model, "created_at": _rfc3339nano(), "response": "", "done": True,
                    "done_reason": reason}
            await self._send(req, 200, _gojson(body), _JSON_CT)
            return
        await self._generation(req, data, model, chat=False)

    async def _h_chat(self, req: _Req, _: str) -> None:
        data = await self._json(req, "api.ChatRequest")
        if data is None or (model := await self._model(req, data)) is None:
            return
        if not isinstance(data.get("messages"), list) or not data["messages"]:
            reason = "unload" if _is_zero_keepalive(data.get("keep_alive")) else "load"
            body = {"model": model, "created_at": _rfc3339nano(),
                    "message": {"role": "assistant", "content": ""}, "done_reason": reason, "done": True}
            await self._send(req, 200, _gojson(body), _JSON_CT)
            return
        await self._generation(req, data, model, chat=True)

    async def _h_embed(self, req: _Req, _: str) -> None:
        data = await self._json(req, "api.EmbedRequest")
        if data is None or (model := await self._model(req, data)) is None:
            return
        inp = data.get("input")
        texts = [inp] if isinstance(inp, str) else [str(t) for t in inp] if isinstance(inp, list) else []
        body: dict[str, Any] = {"model": model, "embeddings": [_embedding(t) for t in texts]}
        if texts:
            body.update(total_duration=max(1, time.monotonic_ns() - req.t0), load_duration=1_234_567,
                        prompt_eval_count=sum(max(1, len(t.split())) for t in texts))
        await self._send(req, 200, _gojson(body), _JSON_CT)

    async def _h_embeddings(self, req: _Req, _: str) -> None:
        data = await self._json(req, "api.EmbeddingRequest")
        if data is None or await self._model(req, data) is None:
            return
        prompt = data.get("prompt") or ""
        await self._send(req, 200, _gojson({"embedding": _embedding(prompt) if prompt else []}), _JSON_CT)

    async def _h_pull(self, req: _Req, _: str) -> None:
        data = await self._json(req, "api.PullRequest")
        if data is None:
            return
        name = data.get("model") or data.get("name") or ""
        if not isinstance(name, str) or not name:
            await self._error(req, 400, "model is required")
            return
        if name.startswith("fault:") and await self._model(req, data) is None:
            return
        opts = data.get("options") if isinstance(data.get("options"), dict) else {}
        gap = float(opts.get("fake_gap_ms", 0) or 0) / 1000.0
        fake = self.fake

        def items() -> Iterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            if "missing" in name or fake.pull_error:  # lets tests exercise the 200-then-error-line case
                yield {"error": fake.pull_error or "pull model manifest: file does not exist"}
                return
            for i, size in enumerate((2_019_377_376, 1_429, 7_711)):
                digest = hashlib.sha256(f"{name}/{i}".encode()).hexdigest()
                status = f"pulling {digest[:12]}"
                yield {"status": status, "digest": f"sha256:{digest}", "total": size}  # completed 0: omitted
                yield {"status": status, "digest": f"sha256:{digest}", "total": size, "completed": size // 2}
                yield {"status": status, "digest": f"sha256:{digest}", "total": size, "completed": size}
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            if not fake._has_model(name):
                fake.models.append(name if ":" in name.rsplit("/", 1)[-1] else name + ":latest")
            yield {"status": "success"}

        if data.get("stream", True) is not False:
            await self._stream(req, _NDJSON_CT, items(), gap=gap)
            return
        last: dict[str, Any] = {}
        for obj in items():  # waitForStream: only the last progress object (or the error)
            await asyncio.sleep(gap)
            if "error" in obj:
                await self._error(req, 500, obj["error"], plain=True)
                return
            last = obj
        await self._send(req, 200, _gojson(last), _JSON_PLAIN_CT)

    async def _h_copy(self, req: _Req, _: str) -> None:
        data = await self._json(req, "api.CopyRequest")
        if data is None:
            return
        src, dst = data.get("source") or "", data.get("destination") or ""
        if not src or not dst:
            await self._error(req, 400, "source and destination are required")
        elif not self.fake._has_model(src):
            await self._error(req, 404, f'model "{src}" not found')
        else:
            if not self.fake._has_model(dst):
                self.fake.models.append(dst)
            await self._send(req, 200)

    async def _h_delete(self, req: _Req, _: str) -> None:
        data = await self._json(req, "api.DeleteRequest")
        if data is None:
            return
        name = data.get("model") or data.get("name") or ""
        if not name:
            await self._error(req, 400, "model is required")
        elif not self.fake._has_model(name):
            await self._error(req, 404, f"model '{name}' not found")
        else:
            target = _norm_model(name)
            self.fake.models[:] = [m for m in self.fake.models if _norm_model(m) != target]
            self.fake._loaded.pop(target, None)
            await self._send(req, 200)

    async def _h_blob(self, req: _Req, digest: str) -> None:
        if not _DIGEST_RE.fullmatch(digest):
            await self._error(req, 400, "invalid digest format")
            return
        if req.method == "HEAD":
            if self.fake._has_blob(digest):
                await self._send(req, 200)
            else:
                await self._error(req, 404, f'blob "{digest}" not found')
            return
        if req.early:  # already present: 200 without reading the body
            await self._send(req, 200)
            return
        got = "sha256:" + req.hasher.hexdigest()
        self.fake.blobs.add(got)  # Ollama keeps the data under its real digest even on mismatch
        if got != digest:
            await self._error(req, 400, f'digest mismatch, expected "{digest}", got "{got}"')
        else:
            await self._send(req, 201)

    async def _h_me(self, req: _Req, _: str) -> None:
        await self._send(req, 200, _gojson({"name": "fake-user", "email": "fake-user@example.com"}), _JSON_CT)

    async def _h_signout(self, req: _Req, _: str) -> None:
        await self._send(req, 200, b"{}", _JSON_CT)

    # ---- OpenAI-compatible endpoints -----------------------------------------------------------
    async def _v1_generation(self, req: _Req, chat: bool) -> None:
        data = await self._json(req, "openai.ChatCompletionRequest" if chat else "openai.CompletionRequest")
        if data is None:
            return
        if chat and (not isinstance(data.get("messages"), list) or not data["messages"]):
            await self._error(req, 400, "[] is too short - 'messages'", bind=True)
            return
        model = await self._model(req, data)
        if model is None:
            return
        opts = data.get("options") if isinstance(data.get("options"), dict) else {}
        limit = data.get("max_tokens", data.get("max_completion_tokens"))
        n = int(limit) if isinstance(limit, (int, float)) and limit >= 0 else _TOKENS_DEFAULT
        reason = "length" if limit is not None else "stop"
        gap = float(opts.get("fake_gap_ms", data.get("fake_gap_ms", 0)) or 0) / 1000.0
        ts = bool(opts.get("fake_timestamps", data.get("fake_timestamps", False)))
        req.split = _split_option({**data, **opts})
        prompt_text = json.dumps(data.get("messages")) if chat else str(data.get("prompt", ""))
        prompt_tokens = 10 + len(prompt_text) // 4
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{next(_ids) % 999}"
        created = int(time.time())

        def base(obj: str) -> dict[str, Any]:
            return {"id": cid, "object": obj, "created": created, "model": model,
                    "system_fingerprint": "fp_ollama"}

        if data.get("stream") is True:
            obj = "chat.completion.chunk" if chat else "text_completion"
            so = data.get("stream_options")
            include_usage = isinstance(so, dict) and so.get("include_usage") is True

            def choice(i: int | None, finish: str | None) -> dict[str, Any]:
                if not chat:
                    return {"text": "" if i is None else f"tok{i} ", "index": 0, "finish_reason": finish}
                delta: dict[str, Any] = {}
                if i is not None:
                    delta = {"content": f"tok{i} "}
                    if i == 0:  # the role only rides on the first delta
                        delta = {"role": "assistant", **delta}
                return {"index": 0, "delta": delta, "finish_reason": finish}

            def items() -> Iterator[Any]:
                for i in range(n):
                    yield {**base(obj), "choices": [choice(i, None)]}
                yield {**base(obj), "choices": [choice(None, reason)]}
                if include_usage:
                    yield {**base(obj), "choices": [], "usage": usage}
                yield b"data: [DONE]\n\n"

            await self._stream(req, _SSE_CT, items(), gap=gap, ts=ts, sse=True)
            return
        for _ in range(n):
            await asyncio.sleep(gap)
        text = "".join(f"tok{i} " for i in range(n))
        if chat:
            body = {**base("chat.completion"), "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}]}
        else:
            body = {**base("text_completion"),
                    "choices": [{"text": text, "index": 0, "finish_reason": reason}]}
        body["usage"] = usage
        await self._send(req, 200, _gojson(body) + b"\n", _JSON_PLAIN_CT)

    async def _h_v1_chat(self, req: _Req, _: str) -> None:
        await self._v1_generation(req, chat=True)

    async def _h_v1_completions(self, req: _Req, _: str) -> None:
        await self._v1_generation(req, chat=False)

    def _v1_model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 1735689600, "owned_by": "library"}

    async def _h_v1_models(self, req: _Req, _: str) -> None:
        data = [self._v1_model(m) for m in self.fake.models] or None  # Go: nil slice -> null
        await self._send(req, 200, _gojson({"object": "list", "data": data}) + b"\n", _JSON_PLAIN_CT)

    async def _h_v1_model(self, req: _Req, name: str) -> None:
        if not self.fake._has_model(name):
            await self._error(req, 404, f'model "{name}" not found')
            return
        await self._send(req, 200, _gojson(self._v1_model(name)) + b"\n", _JSON_PLAIN_CT)

    async def _h_v1_embeddings(self, req: _Req, _: str) -> None:
        data = await self._json(req, "openai.EmbedRequest")
        if data is None:
            return
        inp = data.get("input")
        texts = [inp] if isinstance(inp, str) else inp if isinstance(inp, list) else None
        if not texts:
            await self._error(req, 400, "invalid input", bind=True)
            return
        model = await self._model(req, data)
        if model is None:
            return
        b64 = data.get("encoding_format") == "base64"
        out = []
        for i, t in enumerate(texts):
            vec: Any = _embedding(str(t))
            if b64:
                vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            out.append({"object": "embedding", "embedding": vec, "index": i})
        tokens = sum(max(1, len(str(t).split())) for t in texts)
        body = {"object": "list", "data": out, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        await self._send(req, 200, _gojson(body) + b"\n", _JSON_PLAIN_CT)

    # ---- fake-only ----------------------------------------------------------------------------
    async def _h_bytes(self, req: _Req, _: str) -> None:
        """GET /fake/bytes?n=N: exactly N pattern bytes, Content-Length framed, 64 KiB writes."""
        try:
            n = int(parse_qs(req.query).get("n", ["0"])[0])
            if n < 0:
                raise ValueError
        except ValueError:
            await self._send(req, 400, b"bad n", _TEXT_CT)
            return
        if req.fault == "error-mid-stream":
            req.fault = None  # cannot inject a JSON line into a length-framed byte stream
        self._write(self._head(req, 200, [("Content-Type", "application/octet-stream")], n, False))
        left = n
        while left > 0:
            if req.fault in _MID_FAULTS and req.items_sent == _FAULT_AFTER_ITEMS:
                await self._mid_fault(req)
            k = min(_BYTES_CHUNK, left)
            self._write(_PATTERN if k == _BYTES_CHUNK else _PATTERN[:k])
            left -= k
            req.items_sent += 1
            if self.write_ready is not None:
                await self.write_ready  # never let a 1 GiB response pile up in memory
            else:
                await asyncio.sleep(0)  # stay responsive to disconnects
        if req.fault in _MID_FAULTS:
            await self._mid_fault(req)


_ids = itertools.count(int(time.time()))

_HANDLERS = {
    "/": "_h_root",
    "/api/version": "_h_version",
    "/api/tags": "_h_tags",
    "/api/ps": "_h_ps",
    "/api/show": "_h_show",
    "/api/generate": "_h_generate",
    "/api/chat": "_h_chat",
    "/api/embed": "_h_embed",
    "/api/embeddings": "_h_embeddings",
    "/api/pull": "_h_pull",
    "/api/copy": "_h_copy",
    "/api/delete": "_h_delete",
    "/api/blobs/:digest": "_h_blob",
    "/api/me": "_h_me",
    "/api/signout": "_h_signout",
    "/v1/chat/completions": "_h_v1_chat",
    "/v1/completions": "_h_v1_completions",
    "/v1/embeddings": "_h_v1_embeddings",
    "/v1/models": "_h_v1_models",
    "/v1/models/:model": "_h_v1_model",
    "/fake/bytes": "_h_bytes",
}
assert _HANDLERS.keys() == _ROUTES.keys()


class FakeOllama:
    """A fake Ollama HTTP server. Use ``async with FakeOllama() as fake: ... fake.url ...``.

    Faults: append names from FAULTS to ``faults`` (each request pops the first one), or use
    the model name ``"fault:<name>"`` in a JSON body (generate/chat, /v1, embed, pull).
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, version: str = "0.12.6",
        models: list[str] | None = None, blobs: set[str] | None = None,
        check_host: bool = True, check_origin: bool = True, lean: bool = False, max_parallel: int = 0,
    ) -> None:
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}"
        self.version = version
        self.models: list[str] = list(DEFAULT_MODELS if models is None else models)
        self.blobs: set[str] = set(blobs or ())
        self.check_host = check_host
        self.check_origin = check_origin
        # Benchmark measurement mode (bench/, `--lean`): a plain `GET /api/version` is answered before h11
        # parses it and is not recorded, so that the fake costs a small fraction of what the proxy in
        # front of it costs. Everything else behaves exactly as without it.
        self.lean = lean
        # Model requests run at once; one more is answered 503 "server busy" like a full Ollama queue
        # (OLLAMA_NUM_PARALLEL with OLLAMA_MAX_QUEUE=0). 0: no limit.
        self.max_parallel = max_parallel
        self.busy_answers = 0
        self._running: set[_Req] = set()
        # Per-instance fault (fan-out to several backends): every pull here ends with this error line after
        # "pulling manifest", like a registry this Ollama cannot reach. None: pulls behave as above.
        self.pull_error: str | None = None
        # Per-instance fault (several backends' failover): requests on these paths ("*": every path) are read
        # and recorded, then never answered, like a stuck Ollama whose kernel still accepts connections.
        # `stop()` is the other one: like a killed process (listener gone, every connection closed).
        self.hang_paths: set[str] = set()
        self.received: list[ReceivedRequest] = []
        self.disconnects: list[Disconnect] = []
        self.connections_opened = 0
        self.open_connections = 0
        self.faults: list[str] = []
        self.errors: list[BaseException] = []  # exceptions raised by the fake itself (bugs)
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()
        self._loopback = True
        self._loaded: dict[str, None] = {}  # models "in memory" for /api/ps, in load order
        self._dc_seen = 0
        self._dc_waiters: list[asyncio.Future[None]] = []

    async def start(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self), self.host, self.port, reuse_address=True, backlog=1024
        )
        bound = self._server.sockets[0].getsockname()
        self.port = bound[1]
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"
        try:
            self._loopback = ipaddress.ip_address(bound[0]).is_loopback
        except ValueError:
            self._loopback = False

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._conns):
            conn.abort()
        if server is not None:
            await server.wait_closed()
        await asyncio.sleep(0)  # run the connection_lost callbacks so counters are settled

    async def restart(self) -> None:
        await self.stop()
        await self.start()  # self.port is now fixed, so the same port is bound again

    async def close_idle_connections(self) -> None:
        """Close (FIN) keep-alive connections sitting between requests, like an idle timeout."""
        for conn in list(self._conns):
            if conn.is_idle():
                conn.close()
        await asyncio.sleep(0)

    async def wait_for_disconnect(self, timeout: float) -> Disconnect:
        """The next Disconnect not yet returned by an earlier call (waits up to `timeout`).

        Consuming in order (rather than "only ones recorded after this call") avoids the race
        where the client's close is noticed before the test gets to call this.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._dc_seen >= len(self.disconnects):
            fut: asyncio.Future[None] = loop.create_future()
            self._dc_waiters.append(fut)
            try:
                await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
            finally:
                if fut in self._dc_waiters:
                    self._dc_waiters.remove(fut)
        self._dc_seen += 1
        return self.disconnects[self._dc_seen - 1]

    async def __aenter__(self) -> FakeOllama:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- helpers used by the connections ----
    def _record_disconnect(self, d: Disconnect) -> None:
        self.disconnects.append(d)
        waiters, self._dc_waiters = self._dc_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _has_model(self, name: str) -> bool:
        n = _norm_model(name)
        return any(_norm_model(m) == n for m in self.models)

    def _has_blob(self, digest: str) -> bool:
        return "sha256:" + digest[7:] in self.blobs  # the URL may use "sha256-" too

    @staticmethod
    def _model_info(name: str) -> dict[str, Any]:
        digest = hashlib.sha256(name.encode()).hexdigest()
        family = re.split(r"[^a-z]", name.lower(), maxsplit=1)[0] or "llama"
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-01-01T12:00:00.123456789Z",
            "size": 1_000_000_000 + int(digest[:6], 16),
            "digest": digest,
            "details": {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                        "parameter_size": "3.2B", "quantization_level": "Q4_K_M"},
        }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fake_ollama", description="Fake Ollama server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11434)
    p.add_argument("--version", default="0.12.6", help="version reported by /api/version")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    p.add_argument("--no-host-check", action="store_true")
    p.add_argument("--no-origin-check", action="store_true")
    p.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    p.add_argument("--lean", action="store_true",
                   help="benchmark mode: answer plain GET /api/version before parsing it, unrecorded")
    args = p.parse_args(argv)

    async def run() -> None:
        import signal

        fake = FakeOllama(
            args.host, args.port, version=args.version, models=[m for m in args.models.split(",") if m],
            check_host=not args.no_host_check, check_origin=not args.no_origin_check, lean=args.lean,
        )
        await fake.start()
        print(f"listening on {fake.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await fake.stop()

    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(run())
            return
    asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
