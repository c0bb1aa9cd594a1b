"""What the router knows about each backend, kept fresh: the I/O beside the pure `choice.Router`.

Per backend, three loops on that backend's own connection pool (issue 9):
- GET /api/version every `routing.health_interval` (bounded by `health_timeout`) -> `Router.record_probe`;
- GET /api/tags every `inventory_interval` -> `Router.set_inventory` (and at once, rate limited, when a
  request met Ollama's 404 "model not found": `refresh_inventory`);
- GET /api/ps every `loaded_interval` -> `Router.set_loaded`.

Each loop does its first request at once, so a fresh fastgate knows what is where within one round trip.
Nothing here decides anything: failures of /api/tags or /api/ps leave what is known as it is (health is the
probe's business), and every observation goes to the router with `loop.time()`.

With one backend there is nothing to choose between: the proxy starts no pollers (and so never sends Ollama a
request of its own), and the router treats that backend as up and holding every model.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any

from .. import __version__
from ..config import BackendConfig, RoutingConfig
from ..errors import GateError, UpstreamUnreachable
from ..logs import log
from ..messages import BodyKind, FramingError, dechunk
from ..upstream import RelayOutcome, UpstreamConnection, UpstreamPool
from .choice import Router
from .health import HealthChange

# Listing bodies read by the pollers are small; this bounds what a confused backend can make fastgate hold.
MAX_LISTING_BYTES = 16 * 1024 * 1024
# A 404 "model not found" asks for a fresh /api/tags at once, but not more often than this per backend
# (seconds): a client asking for a missing model in a loop must not turn into a loop of listings.
INVENTORY_REFRESH_MIN_S = 1.0
# stop() cancels again after this long (seconds) while a loop still runs: before Python 3.12,
# asyncio.wait_for can swallow a cancellation that arrives as its inner request completes.
STOP_RECANCEL_S = 0.1


class ProbeFailed(Exception):
    """A poller's request got no usable answer. `refused`: nothing listens there."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


async def fetch(pool: UpstreamPool, backend: BackendConfig, path: str, timeout: float) -> tuple[int, bytes]:
    """One `GET path` to `backend` on a pooled connection: its status and body. Raises ProbeFailed."""
    held: list[UpstreamConnection] = []  # the connection in use, for the cleanup below
    url = backend.url

    async def exchange() -> tuple[int, bytes]:
        conn, _ = await pool.acquire()
        held.append(conn)
        conn.send_head(b"GET %s%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: fastgate/%s\r\n\r\n"
                       % (url.base_path.encode(), path.encode(), url.host_header.encode(),
                          __version__.encode()), b"GET")
        head = await conn.response_head()
        sink = LimitedSink(conn, MAX_LISTING_BYTES)
        outcome = await conn.start_relay(head, sink)
        if sink.over:
            raise ProbeFailed(f"answer larger than {MAX_LISTING_BYTES} bytes")
        if outcome is RelayOutcome.COMPLETE:
            held.clear()
            pool.release(conn)
        elif outcome is not RelayOutcome.COMPLETE_CLOSE:
            raise ProbeFailed(f"answer cut off ({outcome.value})")
        if head.body_kind is BodyKind.CHUNKED:
            # The relay hands on the wire's bytes; Ollama (Go) chunks any answer over 2 KiB, such as the
            # /api/tags of a few models.
            try:
                return head.status, dechunk(bytes(sink.data))
            except FramingError:
                raise ProbeFailed("broken chunked framing") from None
        return head.status, bytes(sink.data)

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:
        raise ProbeFailed("timed out") from None
    except UpstreamUnreachable as exc:
        raise ProbeFailed(exc.message, refused=exc.refused) from None
    except GateError as exc:
        raise ProbeFailed(exc.message) from None
    finally:
        for conn in held:
            conn.abort()  # mid-exchange (timed out, cut off): never reused


class LimitedSink:
    """A BufferSink that holds at most `limit` bytes: past that it keeps nothing more and aborts `conn`, so a
    backend that answers without end (or far more than any answer it should give) costs at most `limit`."""

    __slots__ = ("conn", "data", "limit", "over")

    def __init__(self, conn: UpstreamConnection, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit
        self.conn = conn
        self.over = False

    def write(self, data: bytes) -> None:
        if self.over:
            return
        if len(self.data) + len(data) > self.limit:
            self.over = True
            self.data = bytearray()
            self.conn.abort()  # ends the relay (UPSTREAM_CLOSED); the connection is never reused
            return
        self.data += data


def model_names(body: bytes) -> list[str] | None:
    """The `name` (else `model`) of each entry of an /api/tags or /api/ps answer; None if it is not one."""
    if len(body) > MAX_LISTING_BYTES:
        return None
    try:
        data: Any = json.loads(body)
    except (ValueError, RecursionError):
        return None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return None
    names = []
    for item in models:
        if isinstance(item, dict):
            name = item.get("name") or item.get("model")
            if isinstance(name, str) and name:
                names.append(name)
    return names


class Pollers:
    """The polling loops of every backend. `start` once the loop runs, `stop` at shutdown (awaits them)."""

    def __init__(self, router: Router, pools: dict[str, UpstreamPool], backends: Iterable[BackendConfig],
                 settings: RoutingConfig, *, on_health_change: Callable[[str, HealthChange], None] | None = None,
                 ) -> None:
        self.router = router
        self.pools = pools
        self.backends = {backend.name: backend for backend in backends}
        self.settings = settings
        self.on_health_change = on_health_change
        self._tasks: set[asyncio.Task[None]] = set()
        self._inventory_wakers: dict[str, asyncio.Event] = {}
        self._inventory_asked_at: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False

    def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        for name in self.backends:
            self._inventory_wakers[name] = asyncio.Event()
            for poll in (self._health, self._inventory, self._loaded):
                task = loop.create_task(poll(name), name=f"fastgate-{poll.__name__.strip('_')}-{name}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        self._stopped = True  # a loop whose cancellation was swallowed ends at its next turn
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            done, pending = await asyncio.wait(pending, timeout=STOP_RECANCEL_S)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: ended, not lost (the loops log their own errors)

    def refresh_inventory(self, backend: str) -> None:
        """A request met "model not found" there: read its /api/tags now (at most once a second)."""
        waker = self._inventory_wakers.get(backend)
        if waker is None or self._loop is None:
            return
        now = self._loop.time()
        if now - self._inventory_asked_at.get(backend, float("-inf")) < INVENTORY_REFRESH_MIN_S:
            return
        self._inventory_asked_at[backend] = now
        waker.set()

    # -- the loops -----------------------------------------------------------------------------------------

    async def _health(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        backend, pool = self.backends[name], self.pools[name]
        while not self._stopped:
            started = loop.time()
            try:
                status, _ = await fetch(pool, backend, "/api/version", self.settings.health_timeout)
                ok, refused, why = status == 200, False, f"answered {status}"
            except ProbeFailed as exc:
                ok, refused, why = False, exc.refused, str(exc)
            except Exception:  # a bug must not stop the probes: the backend would keep its last state
                log.exception("Probing backend %s failed unexpectedly", name)
                ok, refused, why = False, False, "failed unexpectedly"
            change = self.router.record_probe(name, loop.time(), ok=ok, refused=refused)
            if change is not None:
                if change is HealthChange.EJECTED:
                    log.warning("Backend %s (%s) ejected: GET /api/version %s", name, backend.url, why)
                else:
                    log.warning("Backend %s (%s) restored: it answers again", name, backend.url)
                if self.on_health_change is not None:
                    self.on_health_change(name, change)
            # Probes start every health_interval, however long the last one took: a backend that hangs is
            # ejected by its second timed-out probe within health_interval + 2 * health_timeout (3 s with the
            # defaults), not another interval later.
            await asyncio.sleep(max(0.0, started + self.settings.health_interval - loop.time()))

    async def _inventory(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        backend, pool = self.backends[name], self.pools[name]
        waker = self._inventory_wakers[name]
        while not self._stopped:
            waker.clear()
            try:
                status, body = await fetch(pool, backend, "/api/tags", self.settings.health_timeout)
            except ProbeFailed:
                pass  # health is the probe's to judge; the last inventory read stays
            except Exception:
                log.exception("Reading the models of backend %s failed unexpectedly", name)
            else:
                names = model_names(body) if status == 200 else None
                if names is not None:
                    self.router.set_inventory(name, names, loop.time())
            try:
                await asyncio.wait_for(waker.wait(), self.settings.inventory_interval)
            except asyncio.TimeoutError:
                pass

    async def _loaded(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        backend, pool = self.backends[name], self.pools[name]
        while not self._stopped:
            try:
                status, body = await fetch(pool, backend, "/api/ps", self.settings.health_timeout)
            except ProbeFailed:
                pass
            except Exception:
                log.exception("Reading the loaded models of backend %s failed unexpectedly", name)
            else:
                names = model_names(body) if status == 200 else None
                if names is not None:
                    self.router.set_loaded(name, names, loop.time())
            await asyncio.sleep(self.settings.loaded_interval)
