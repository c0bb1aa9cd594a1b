"""Requests that several backends answer together (issue 9 rules 6 and 7): the I/O beside the pure
`routing.aggregate`, which decides what the client gets.

`serve` takes a Forward the gate marked `fan_out` (several backends, no X-Fastgate-Backend from an admin):
- a listing (`/api/tags`, `/api/ps`, `/v1/models`): GET it from every usable backend at once, each bounded by
  `listing_timeout`; a backend that fails is left out; none answering is a 502;
- `/api/pull`, `/api/delete`: the buffered request, as the gate built it, to every usable backend at once;
- `/api/copy`: the same to every usable backend whose /api/tags (read now) holds the source.

Management requests go out on fresh connections of each backend's pool (put back there when they end
cleanly): the request carries a body and is never sent twice, so a pooled connection the backend may have
closed meanwhile is not worth the risk. The client's pace and departure reach every backend connection at
once (`_Fan` is the ClientProtocol's exchange meanwhile): a client that leaves cancels the pulls, as it does
with one Ollama. After a pull, delete or copy the router's inventory of each backend asked is read again
before the client is answered, so a model just pulled can be used at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .access import model_refusal
from .config import BackendConfig, Config
from .cors import render as render_headers
from .errors import BadGateway, GateError, UpstreamTimeout, UpstreamUnreachable
from .gate import Forward
from .logs import log
from .messages import BodyKind, FramingError, ResponseHead, dechunk, http_date, local_response, retarget_head
from .routing.aggregate import (
    NO_ANSWER, ChunkDecoder, FanOut, LineSplitter, PartResult, PullTally, answer_result, copy_source,
    holds_model, listing_content_type, listing_entries, merge_listings, no_answer, verdict, verdict_body,
    wants_stream,
)
from .routing.pollers import LimitedSink, ProbeFailed, fetch
from .upstream import ClientGone, RelayOutcome, UpstreamConnection

if TYPE_CHECKING:
    from .proxy import Proxy, RequestContext

LAST_CHUNK = b"0\r\n\r\n"
# A whole answer read from one backend (delete, copy, a pull without a stream, an error before a stream): Ollama's
# are empty or one small JSON object. A backend that sends more (or never ends) is cut off there, not buffered.
MAX_ANSWER_BYTES = 1024 * 1024
ENDED = (RelayOutcome.COMPLETE, RelayOutcome.COMPLETE_CLOSE)


def listing_timeout(config: Config) -> float:
    """Seconds one backend has to answer a listing (or the /api/tags read around a copy or after a change):
    an Ollama lists its models from local manifests, so one that needs longer is left out rather than
    holding up the answer."""
    return max(config.routing.health_timeout, config.upstream.connect_timeout)


async def serve(proxy: Proxy, ctx: RequestContext, fwd: Forward) -> bool:
    """Answer `fwd` from every backend concerned. Returns whether the connection may carry another request."""
    kind = fwd.fan_out
    assert kind is not None
    if kind.listing:
        return await _listing(proxy, ctx, fwd, kind)
    fan = _Fan()
    protocol = ctx.conn.protocol
    protocol.exchange = fan
    if protocol.gone:
        fan.client_gone()
    try:
        return await _manage(proxy, ctx, fwd, kind, fan)
    finally:
        if protocol.exchange is fan:
            protocol.exchange = None
        fan.abort_all()  # whatever is still open was cut short (client gone, cancelled): never reused


class _Fan:
    """The client side's view of a fan-out (connection.Exchange): a slow client pauses every backend's
    relay, a client that leaves closes every backend connection (so the backends stop their pulls)."""

    __slots__ = ("conns", "paused", "gone")

    def __init__(self) -> None:
        self.conns: set[UpstreamConnection] = set()
        self.paused = False
        self.gone = False

    def pause_relay(self) -> None:
        self.paused = True
        for conn in self.conns:
            conn.pause_relay()

    def resume_relay(self) -> None:
        self.paused = False
        for conn in self.conns:
            conn.resume_relay()

    def client_gone(self) -> None:
        self.gone = True
        for conn in list(self.conns):
            conn.client_gone()

    def abort_all(self) -> None:
        for conn in list(self.conns):
            conn.abort()
        self.conns.clear()


# ---------------------------------------------------------------------------------------------------------
# Listings (rule 6)

async def _read_listings(proxy: Proxy, names: Sequence[str], kind: FanOut
                         ) -> list[tuple[str, list[dict[str, Any]] | None, str]]:
    """GET the listing `kind` of each backend at once: (name, entries or None, why it has none)."""
    backends = _backends(proxy.config)
    timeout = listing_timeout(proxy.config)

    async def one(name: str) -> tuple[str, list[dict[str, Any]] | None, str]:
        try:
            status, body = await fetch(proxy.pools[name], backends[name], kind.value, timeout)
        except ProbeFailed as exc:
            return name, None, str(exc)
        if status != 200:
            return name, None, f"answered {status}"
        entries = listing_entries(kind, body)
        return name, entries, "" if entries is not None else "not a model listing"

    return list(await asyncio.gather(*(one(name) for name in names)))


async def _listing(proxy: Proxy, ctx: RequestContext, fwd: Forward, kind: FanOut) -> bool:
    started = time.perf_counter()
    names = proxy.router.usable_backends()
    answers = await _read_listings(proxy, names, kind)
    answered = [name for name, entries, _ in answers if entries is not None]
    ctx.backend = ",".join(answered or names)
    fwd = _logged_as(proxy, fwd, answered or names)
    for name, entries, why in answers:
        proxy.metrics.backend_request(name, 200 if entries is not None else 502)
        if entries is None:
            log.info("[%s] Backend %s left out of %s: %s", ctx.rid.decode(), name, kind.value, why,
                     extra=ctx.log_fields(fwd))
    if not answered:
        return await proxy._refuse(ctx, BadGateway(f"no backend answered GET {kind.value}"), fwd=fwd)
    principal, allow_cloud = fwd.principal, proxy.config.auth.allow_cloud

    def allowed(name: str) -> bool:  # as a single backend's listing is trimmed (Proxy._relay_filtered)
        return model_refusal(principal, name, allow_cloud) is None

    body = merge_listings(kind, (entries for _, entries, _ in answers if entries is not None),
                          allowed if fwd.trim_listing else None)
    return await _answer(proxy, ctx, fwd, 200, body, started, content_type=listing_content_type(kind),
                         head_only=ctx.req.method == b"HEAD")


# ---------------------------------------------------------------------------------------------------------
# Pull, delete, copy (rule 7)

async def _manage(proxy: Proxy, ctx: RequestContext, fwd: Forward, kind: FanOut, fan: _Fan) -> bool:
    started = time.perf_counter()
    body = fwd.body or b""  # the gate buffers these bodies (they name the model): None is no body at all
    names = proxy.router.usable_backends()
    early: list[PartResult] = []  # backends that failed before being asked (a copy's unreadable /api/tags)
    if kind is FanOut.COPY:
        source = copy_source(body)
        if source is not None:  # else every backend answers the bad request itself
            names, early = await _holders(proxy, names, source)
            if not names and not early:
                ctx.backend = ""
                return await _answer(proxy, ctx, fwd, 404, verdict_body(kind, f'model "{source}" not found'),
                                     started)
    ctx.backend = ",".join(names)
    fwd = _logged_as(proxy, fwd, names)
    if kind is FanOut.PULL and wants_stream(body):
        return await _stream_pull(proxy, ctx, fwd, names, fan, started)
    method = fwd.upstream_method or ctx.req.method
    asked = await asyncio.gather(*(_ask(proxy, fan, kind, name, _request(proxy, fwd, name), method)
                                   for name in names))
    if fan.gone:
        return _client_left(proxy, ctx, fwd, started)
    results = early + list(asked)
    await _refresh(proxy, kind, fwd.model, names, results)
    status, message = verdict(kind, results)
    _record_parts(proxy, ctx, fwd, results)
    content_type = b"application/json" if kind is FanOut.PULL and not message else \
        b"application/json; charset=utf-8"
    return await _answer(proxy, ctx, fwd, status, verdict_body(kind, message), started, content_type=content_type)


async def _holders(proxy: Proxy, names: Sequence[str], source: str) -> tuple[list[str], list[PartResult]]:
    """The backends whose models (read now) include `source`, and those whose models could not be read."""
    holders, failed = [], []
    for name, entries, why in await _read_listings(proxy, names, FanOut.TAGS):
        if entries is None:
            failed.append(no_answer(name, f"could not read its models ({why})"))
        elif holds_model(entries, source):
            holders.append(name)
    return holders, failed


def _backends(config: Config) -> dict[str, BackendConfig]:
    return {backend.name: backend for backend in config.backends}


def _request(proxy: Proxy, fwd: Forward, name: str) -> bytes:
    """The request as it goes to backend `name`: the gate's head for it (target and Host) and the body."""
    url = _backends(proxy.config)[name].url
    head = retarget_head(fwd.head, url.base_path.encode() + fwd.target, url.host_header.encode())
    return head + fwd.body if fwd.body else head


def _logged_as(proxy: Proxy, fwd: Forward, names: Sequence[str]) -> Forward:
    """`fwd` with the URL its log lines show: each backend's, joined."""
    backends = _backends(proxy.config)
    target = fwd.target.decode("latin-1")
    urls = " ".join(f"{backends[name].url.scheme}://{backends[name].url.host_header}"
                    f"{backends[name].url.base_path}{target}" for name in names)
    return replace(fwd, url=urls or fwd.url)


async def _open(proxy: Proxy, fan: _Fan, name: str, request: bytes, method: bytes
                ) -> tuple[UpstreamConnection, ResponseHead]:
    """Send `request` to backend `name` on a fresh connection; its response head. Raises GateError,
    ClientGone."""
    try:
        conn = await proxy.pools[name].connect()
    except (UpstreamUnreachable, UpstreamTimeout) as err:
        refused = isinstance(err, UpstreamUnreachable) and err.refused
        if proxy.router.record_connection_error(name, asyncio.get_running_loop().time(), refused=refused):
            log.warning("Backend %s ejected: %s", name, err.message)
        raise
    if fan.gone:
        conn.close()
        raise ClientGone()
    fan.conns.add(conn)
    conn.send_head(request, method)
    return conn, await conn.response_head()


async def _read_whole(fan: _Fan, conn: UpstreamConnection, head: ResponseHead) -> tuple[RelayOutcome, bytes]:
    """The body after `head`, whole. BadGateway when it runs past MAX_ANSWER_BYTES."""
    sink = LimitedSink(conn, MAX_ANSWER_BYTES)
    outcome = await conn.start_relay(head, sink)
    _done_with(fan, conn, outcome)
    if sink.over:
        raise BadGateway(f"answer larger than {MAX_ANSWER_BYTES} bytes")
    if head.body_kind is BodyKind.CHUNKED and outcome is RelayOutcome.COMPLETE:
        # The relay hands on the wire's bytes; Ollama (Go) chunks any answer over 2 KiB (a long error message)
        try:
            return outcome, dechunk(bytes(sink.data))
        except FramingError:
            raise BadGateway("broken chunked framing") from None
    return outcome, bytes(sink.data)


def _done_with(fan: _Fan, conn: UpstreamConnection, outcome: RelayOutcome) -> None:
    fan.conns.discard(conn)
    if outcome is RelayOutcome.COMPLETE:
        conn.pool.release(conn)  # closed instead when not reusable


async def _ask(proxy: Proxy, fan: _Fan, kind: FanOut, name: str, request: bytes, method: bytes) -> PartResult:
    """One backend's part of a fan-out answered whole (delete, copy, a pull without a stream)."""
    try:
        conn, head = await _open(proxy, fan, name, request, method)
        outcome, data = await _read_whole(fan, conn, head)
    except ClientGone:
        return no_answer(name, "the client went away")
    except GateError as err:
        return no_answer(name, err.message)
    if outcome not in ENDED:
        return no_answer(name, f"answer cut off ({outcome.value})")
    return answer_result(kind, name, head.status, data)


class _ClientStream:
    """The one progress stream the client gets: lines held until the head is out, then one chunk each."""

    __slots__ = ("conn", "chunked", "pending", "begun")

    def __init__(self, conn: Any, chunked: bool) -> None:
        self.conn = conn  # the ClientConnection (write() is a no-op once the client is gone)
        self.chunked = chunked
        self.pending: list[bytes] = []
        self.begun = False

    def _framed(self, line: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(line), line) if self.chunked else line

    def line(self, line: bytes | None) -> None:
        if not line:
            return
        if self.begun:
            self.conn.write(self._framed(line))
        else:
            self.pending.append(line)

    def begin(self, head: bytes) -> None:
        self.begun = True
        pending, self.pending = self.pending, []
        self.conn.write(head + b"".join(self._framed(line) for line in pending))

    def end(self, final_line: bytes) -> None:
        self.conn.write(self._framed(final_line) + (LAST_CHUNK if self.chunked else b""))


class _LineSink:
    """Where one backend's pull stream is relayed to: taken apart into lines, each tagged and passed on.
    Runs in the upstream relay's data_received, so it never raises."""

    __slots__ = ("tally", "name", "out", "decoder", "splitter")

    def __init__(self, tally: PullTally, name: str, out: _ClientStream, chunked: bool) -> None:
        self.tally = tally
        self.name = name
        self.out = out
        self.decoder = ChunkDecoder() if chunked else None
        self.splitter = LineSplitter()

    def write(self, data: bytes) -> None:
        if self.decoder is not None:
            data = self.decoder.feed(data)
        for line in self.splitter.feed(data):
            self.out.line(self.tally.line(self.name, line))

    def flush(self) -> None:
        rest = self.splitter.rest()
        if rest.strip():
            self.out.line(self.tally.line(self.name, rest))


def _stream_head(ctx: RequestContext, *, chunked: bool, close: bool) -> bytes:
    parts = [b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nDate: ", http_date(),
             b"\r\nServer: fastgate\r\n"]
    if chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts += (b"X-Request-Id: ", ctx.rid, b"\r\n", render_headers(ctx.cors))
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


async def _stream_pull(proxy: Proxy, ctx: RequestContext, fwd: Forward, names: list[str], fan: _Fan,
                       started: float) -> bool:
    """A streamed pull on every backend: the client's 200 goes out once one backend has answered 200 (an
    error before that is answered with the backends' own status, as Ollama does before its stream begins)."""
    loop = ctx.conn.loop
    chunked = ctx.req.http_version != b"1.0"  # an HTTP/1.0 client gets a stream that ends with the connection
    close = ctx.close_after or proxy.closing or not chunked
    out = _ClientStream(ctx.conn, chunked)
    tally = PullTally(names)
    streaming = loop.create_future()  # set when the first backend answers 200
    begun = asyncio.Event()

    async def part(name: str) -> None:
        try:
            conn, head = await _open(proxy, fan, name, _request(proxy, fwd, name), b"POST")
        except ClientGone:
            return
        except GateError as err:
            out.line(tally.fail(no_answer(name, err.message)))
            return
        if head.status != 200:  # refused before any progress (bad name, ...): its own status and message
            try:
                outcome, data = await _read_whole(fan, conn, head)
            except GateError as err:
                out.line(tally.fail(no_answer(name, err.message)))
                return
            result = answer_result(FanOut.PULL, name, head.status, data) if outcome in ENDED else \
                no_answer(name, f"answer cut off ({outcome.value})")
            out.line(tally.fail(result))
            return
        if not streaming.done():
            streaming.set_result(None)
        await begun.wait()
        sink = _LineSink(tally, name, out, head.body_kind is BodyKind.CHUNKED)
        relay = conn.start_relay(head, sink)
        if fan.paused:
            conn.pause_relay()
        outcome = await relay
        _done_with(fan, conn, outcome)
        sink.flush()
        out.line(tally.ended(name, complete=outcome in ENDED, why=outcome.value))

    tasks = [loop.create_task(part(name)) for name in names]
    everything = asyncio.gather(*tasks)
    try:
        await asyncio.wait((streaming, everything), return_when=asyncio.FIRST_COMPLETED)
        if fan.gone:
            return _client_left(proxy, ctx, fwd, started)
        if not streaming.done():  # every backend refused it before streaming anything
            results = tally.results()
            _record_parts(proxy, ctx, fwd, results)
            status, message = verdict(FanOut.PULL, results)
            return await _answer(proxy, ctx, fwd, status, verdict_body(FanOut.PULL, message), started)
        out.begin(_stream_head(ctx, chunked=chunked, close=close))
        log.info("[%s] %s (%s) -> %s: 200 in %.1f ms", ctx.rid.decode(), fwd.user, fwd.key_label, fwd.url,
                 (time.perf_counter() - started) * 1000, extra=ctx.log_fields(fwd, status=200))
        begun.set()
        await everything
        if fan.gone:
            return _client_left(proxy, ctx, fwd, started)
        results = tally.results()
        await _refresh(proxy, FanOut.PULL, fwd.model, names, results)
        out.end(tally.final_line())
    finally:
        streaming.cancel()
        for task in tasks:
            task.cancel()
        everything.cancel()
    elapsed = time.perf_counter() - started
    _record_parts(proxy, ctx, fwd, results)
    log.info("[%s] Completed 200: pull on %d backend(s) in %.3f s", ctx.rid.decode(), len(names), elapsed,
             extra=ctx.log_fields(fwd, status=200, duration_ms=elapsed * 1000))
    proxy.metrics.request_duration.observe(elapsed)
    proxy._account(ctx, fwd, 200, None, elapsed)
    if close:
        ctx.conn.close()
        return False
    return True


async def _refresh(proxy: Proxy, kind: FanOut, model: str | None, names: Sequence[str],
                   results: Sequence[PartResult]) -> None:
    """Read the models of every backend asked again now (before the client hears the outcome), so the next
    request finds a model just pulled or copied, and none just deleted. A backend whose /api/tags fails now
    is left to its inventory poller, woken at once."""
    loop = asyncio.get_running_loop()
    router = proxy.router
    if kind is FanOut.DELETE and model is not None:
        for result in results:
            if result.ok:  # gone from its /api/ps at once too, not only at the next poll
                router.model_missing(result.backend, model, loop.time())
    asked = [name for name in names if any(r.backend == name and r.status != NO_ANSWER for r in results)]
    for name, entries, _ in await _read_listings(proxy, asked, FanOut.TAGS):
        if entries is not None:
            listed = (item.get("name") or item.get("model") for item in entries)
            router.set_inventory(name, [text for text in listed if isinstance(text, str) and text], loop.time())
        elif proxy.pollers is not None:
            proxy.pollers.refresh_inventory(name)


# ---------------------------------------------------------------------------------------------------------
# Answers

def _record_parts(proxy: Proxy, ctx: RequestContext, fwd: Forward, results: Sequence[PartResult]) -> None:
    """Each backend's part in /metrics (its status; 502 when it gave none) and, when it failed, in the log."""
    for result in results:
        proxy.metrics.backend_request(result.backend, result.status or 502)
        if not result.ok and not result.absent:
            log.info("[%s] Backend %s: %s failed (%s): %s", ctx.rid.decode(), result.backend, ctx.path,
                     result.status or "no answer", result.message, extra=ctx.log_fields(fwd))


async def _answer(proxy: Proxy, ctx: RequestContext, fwd: Forward, status: int, body: bytes, started: float, *,
                  content_type: bytes = b"application/json; charset=utf-8", head_only: bool = False) -> bool:
    """Answer the combined result in one response; log and count it as a forwarded request."""
    conn = ctx.conn
    close = ctx.close_after or proxy.closing or not await conn.drain_small_body(ctx.req.content_length)
    conn.write(local_response(status, body, content_type=content_type, request_id=ctx.rid, close=close,
                              head_only=head_only, extra_headers=ctx.cors))
    elapsed = time.perf_counter() - started
    log.info("[%s] %s (%s) -> %s: %d in %.1f ms, %d bytes", ctx.rid.decode(), fwd.user, fwd.key_label, fwd.url,
             status, elapsed * 1000, len(body),
             extra=ctx.log_fields(fwd, status=status, bytes=len(body), duration_ms=elapsed * 1000))
    proxy.metrics.request_duration.observe(elapsed)
    proxy._account(ctx, fwd, status, None, elapsed)
    if close and not conn.body_complete:
        conn.linger = True
    return not close


def _client_left(proxy: Proxy, ctx: RequestContext, fwd: Forward, started: float) -> bool:
    elapsed = time.perf_counter() - started
    log.info("[%s] Client went away during %s on %s (%s)", ctx.rid.decode(), ctx.path, ctx.backend, fwd.user,
             extra=ctx.log_fields(fwd, status=499, duration_ms=elapsed * 1000))
    proxy._account(ctx, fwd, 499, None, elapsed)
    ctx.conn.abort()
    return False
