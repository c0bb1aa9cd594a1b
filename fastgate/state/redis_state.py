"""Live state in Redis ([state]): what several fastgate instances must agree on, one truth for all.

Owns, per key: the requests-per-minute bucket, the concurrency leases and the daily token count; per address:
the key-guessing window and IP trust. Admission is one Lua script per admitted request, on Redis's clock
(`TIME`), so instances with skewed clocks still share one bucket (the same token bucket as limits.KeyLimits:
`rpm` requests of burst, refilled at rpm per minute). Concurrency is a sorted set of leases per key whose
scores are expiry times: renewed every LEASE_RENEW_S while the stream runs, removed when it ends, and a
crashed instance's leases fall out LEASE_TTL_S after their last renewal.

IP trust and lockouts are mirrored, not looked up: a grant is written to Redis with its TTL and published, a
lock is published when the shared count reaches the limit, and every instance applies both to its own tables
(trust.TrustTable, trust.FailureLimiter), so the per-request lookups stay local and synchronous.

Never hang a request on Redis: every call on a request's path is bounded by `state.timeout`. A timeout or a
connection error turns the instance DEGRADED at once: from then on no request touches Redis; limits are
local buckets of limit / live instances (the count of instances seen in the last heartbeat), trust and
lockout the local tables. A reconnect loop probes Redis every RECONNECT_S and, once it answers, reloads the
trust grants, resubscribes and goes back to SHARED.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import InvalidResponse, RedisError, ResponseError

from ..access import Principal
from ..config import StateConfig
from ..errors import GateError, TooManyRequests
from ..limits import DAY_S, KeyLimits, too_many
from ..logs import log
from ..metrics import Metrics
from ..trust import FailureLimiter, TrustGrant, TrustTable, failure_bucket
from . import DEGRADED, SHARED

PREFIX = "fastgate:"
def events_channel(db: int) -> str:
    """The pub/sub channel of the instances sharing database `db`: Redis's channels are server-wide, not per
    database, so fastgates on other databases of one server (other deployments, a staging copy) must not hear
    each other's trust grants and locks."""
    return f"{PREFIX}events:{db}"


EVENTS_CHANNEL = events_channel(0)
INSTANCES_KEY = PREFIX + "instances"
LEASE_TTL_S = 15.0  # a crashed instance's leases are free this long after their last renewal (< 30 s)
LEASE_RENEW_S = 5.0
HEARTBEAT_S = 1.0
INSTANCE_TTL_S = 3.0  # an instance missing this many seconds of heartbeats no longer counts as live
RECONNECT_S = 1.0  # Redis back: shared again within this plus one probe (well under 5 s)
PROBE_TIMEOUT_S = 1.0  # background calls (heartbeat, reconnect probe, trust reload) are off the request path
TOKENS_KEY_TTL_S = 2 * DAY_S
EXPIRY_RESEND_S = 60.0  # a daily count's expiry is set again at most this often per key (and on reconnect)
SEND_DELAY_S = 0.005  # how long a lease release or token count may wait to share the next admission's write
WARM_CONNECTIONS = 2  # pooled connections opened at connect, for the background calls

T = TypeVar("T")
# What a record or event another process wrote into Redis can raise when read (not JSON, not an object, a
# number like 1e999, a field missing or of the wrong type).
_MALFORMED = (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError)

# KEYS: rpm bucket, lease set, today's token count. ARGV: rpm (0: none), max_concurrent (0: none),
# tokens_per_day (-1: none), lease id, lease TTL (ms), seconds left in the day (client's wall clock, as the
# day of the token key is). Returns {0, tokens used} admitted; {1, s} daily tokens; {2, 1} concurrency;
# {3, "s"} rate limit, with the seconds until a token is back.
ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm = tonumber(ARGV[1])
local maxc = tonumber(ARGV[2])
local tpd = tonumber(ARGV[3])
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if tpd >= 0 and used >= tpd then return {1, ARGV[6]} end
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= maxc then return {2, 1} end
end
if rpm > 0 then
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  local tokens = tonumber(b[1])
  local at = tonumber(b[2])
  if tokens == nil or at == nil then tokens = rpm; at = now end
  tokens = math.min(rpm, tokens + math.max(0, now - at) * rpm / 60000)
  if tokens < 1 then
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
    redis.call('PEXPIRE', KEYS[1], 61000)
    return {3, tostring((1 - tokens) * 60 / rpm)}
  end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', now)
  redis.call('PEXPIRE', KEYS[1], 61000)
end
if maxc > 0 then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', KEYS[2], 2 * tonumber(ARGV[5]))
end
return {0, used}
"""

# KEYS: lease sets; ARGV: lease TTL (ms), then one lease id per key. Pushes each live lease's expiry on.
RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, 2 * ttl)
end
return #KEYS
"""

# KEYS: the instance set; ARGV: this instance's id, its TTL (ms). Returns how many instances are live.
HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""

# KEYS: a guessing window; ARGV: window (ms), max_failures, channel, bucket, instance id. Counts one wrong
# key; the one that reaches the limit publishes the lock. Returns {failures, ms left in the window}.
FAILURE_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local left = redis.call('PTTL', KEYS[1])
if n == tonumber(ARGV[2]) then
  redis.call('PUBLISH', ARGV[3], cjson.encode({t = 'lock', bucket = ARGV[4], ms = left, from = ARGV[5]}))
end
return {n, left}
"""

# KEYS: today's token count; ARGV: a count from the store, the key's TTL (s). Raises the count to it.
SEED_TOKENS_LUA = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > used then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
return 0
"""


def rpm_key(key_id: str) -> str:
    return f"{PREFIX}rpm:{key_id}"


def lease_key(key_id: str) -> str:
    return f"{PREFIX}lease:{key_id}"


def tokens_key(key_id: str, wall: float) -> str:
    return f"{PREFIX}tokens:{key_id}:{int(wall // DAY_S)}"


def failure_key(bucket: str) -> str:
    return f"{PREFIX}fail:{bucket}"


def trust_key(ip: str) -> str:
    return f"{PREFIX}trust:{ip}"


def local_share(limit: int | None, live: int) -> int | None:
    """One instance's part of a limit while the shared state is unreachable: limit / live instances, at least
    1 (an instance never refuses every request of a key that may make some)."""
    return None if limit is None else max(1, limit // max(1, live))


def _pack_in_python(args: tuple[Any, ...]) -> bytes:  # pragma: no cover - hiredis without pack_command
    return b"".join(_PYTHON_PACKER.pack_command(*args))


# hiredis (fastgate[redis] brings it): C packing of commands (redis-py's asyncio client packs in Python, several
# us a command) and its reply parser. Without it, redis-py's own.
_Reader: Any = None
_pack: Callable[[tuple[Any, ...]], bytes]
try:
    from hiredis import Reader as _Reader
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - no hiredis, or one older than pack_command (2.1)
    _PYTHON_PACKER = aioredis.Connection()
    _pack = _pack_in_python


if sys.version_info >= (3, 11):
    async def _bounded(awaitable: Awaitable[T], timeout_s: float) -> T:
        async with asyncio.timeout(timeout_s):  # no extra task, unlike wait_for on 3.11
            return await awaitable
else:  # pragma: no cover - 3.10
    async def _bounded(awaitable: Awaitable[T], timeout_s: float) -> T:
        return await asyncio.wait_for(awaitable, timeout_s)


class AutoPipeline:
    """The request path's commands, pipelined on one connection of their own, each reply awaited at most
    `timeout_s`.

    redis-py's client takes a pooled connection per command and holds it until the reply (64 requests admitted
    at once took 64 connections, and past the pool's bound failed), and its per-command machinery (a pooled
    connection, Python packing, a task or timer per call) cost more than Redis's own work. Here a command is
    packed in C (hiredis) and written at once to the connection's transport (uvloop sends what one turn of the
    event loop wrote in one syscall), and the replies are taken in order (Redis answers a connection's
    commands in the order sent), so several batches may be in flight at once. With hiredis the replies are
    parsed where the bytes arrive (the transport's protocol, _Replies) and each future is answered there: a
    reader task woken through a StreamReader cost each reply a turn of the loop. `call` returns a future of the
    reply; `send` wants none (lease releases, token counts) and waits up to SEND_DELAY_S to travel with the
    next call. Deadlines are kept by one watchdog timer for the oldest unanswered call (calls are answered in
    the order made, and all wait the same `timeout_s`), not a timer per call. A broken connection fails what
    waits on it and is reported to `on_error` (the instance turns degraded, and reconnecting opens a new one).
    """

    __slots__ = ("_broken", "_calls_pending", "_conn", "_flush_later", "_loop", "_parser", "_pending", "_pending_since",
                 "_reader", "_timeout_s", "_turn", "_waiting", "_watchdog", "_writer", "on_error")

    def __init__(self, conn: Any, on_error: Callable[[BaseException], None], timeout_s: float) -> None:
        self.on_error = on_error
        self._conn = conn  # a redis.asyncio Connection, connected
        # Its StreamWriter: redis-py's send_packed_command is a coroutine (a task per write to stay off the
        # caller's path), where a write to the transport is all it does for a connected connection.
        self._writer: asyncio.StreamWriter = conn._writer
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._pending: list[bytes] = []  # sends not written yet: they go out with the next call or at the timer
        self._pending_since = 0.0  # loop time of the oldest of them
        self._calls_pending = False  # calls among them (made after the first call of this turn of the loop)
        self._turn: asyncio.Handle | None = None  # set while a call written in this turn of the loop is the last
        # Per command written (or pending), in the order sent: the future its reply goes to (None: a send) and
        # the loop time past which nobody waits for it.
        self._waiting: collections.deque[tuple[asyncio.Future[Any] | None, float]] = collections.deque()
        self._flush_later: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._broken = False
        self._reader: asyncio.Task[None] | None = None  # without hiredis: the task reading the replies
        if _Reader is not None and isinstance(conn._reader, asyncio.StreamReader):
            # Error replies come back as ResponseError instances (the command's own error), not raised.
            self._parser = _Reader(protocolError=InvalidResponse, replyError=ResponseError)
            transport = self._writer.transport
            transport.set_protocol(_Replies(self, transport.get_protocol()))
        else:  # pragma: no cover - without hiredis
            self._reader = self._loop.create_task(self._read_with_redis_py())

    @classmethod
    async def open(cls, redis: aioredis.Redis, on_error: Callable[[BaseException], None],
                   timeout_s: float) -> AutoPipeline:
        conn = redis.connection_pool.make_connection()
        await conn.connect()
        return cls(conn, on_error, timeout_s)

    def call(self, *args: Any, timed: bool = True) -> asyncio.Future[Any]:
        """The reply to one command, or TimeoutError once it has not come within `timeout_s` (`timed`; else
        the caller bounds the wait itself)."""
        future: asyncio.Future[Any] = self._loop.create_future()
        if self._broken:
            future.set_exception(ConnectionError("shared state connection closed"))
            return future
        if timed:
            deadline = self._loop.time() + self._timeout_s
            self._waiting.append((future, deadline))
            if self._watchdog is None:
                self._watchdog = self._loop.call_at(deadline, self._expire)
        else:
            self._waiting.append((future, math.inf))
        if self._turn is not None:  # a call went out in this turn of the loop already: the rest go together
            if not self._pending:
                self._pending_since = self._loop.time()
            self._pending.append(_pack(args))
            self._calls_pending = True
            return future
        # The first call of a turn goes out at once (uvloop writes it now: a request admitted alone waits for
        # nothing else), the later ones in one write when the turn is over.
        self._turn = self._loop.call_soon(self._end_turn)
        pending = self._pending
        if pending:
            pending.append(_pack(args))
            self._pending = []
            self._write(b"".join(pending))
        else:
            self._write(_pack(args))
        return future

    def _end_turn(self) -> None:
        self._turn = None
        if self._calls_pending and not self._broken:
            self._calls_pending = False
            pending, self._pending = self._pending, []
            self._write(b"".join(pending))

    def send(self, *args: Any) -> None:
        """A command whose reply nobody waits for; written with the next call, or SEND_DELAY_S from now."""
        if self._broken:
            return
        if not self._pending:
            self._pending_since = self._loop.time()
        self._pending.append(_pack(args))
        self._waiting.append((None, 0.0))
        if self._flush_later is None:  # else left armed by a call that took earlier sends along
            self._flush_later = self._loop.call_at(self._pending_since + SEND_DELAY_S, self._flush)

    def _flush(self) -> None:
        self._flush_later = None
        if not self._pending or self._broken:
            return
        due = self._pending_since + SEND_DELAY_S
        if due > self._loop.time():  # these sends came after the ones the timer was armed for: not yet
            self._flush_later = self._loop.call_at(due, self._flush)
            return
        pending, self._pending = self._pending, []
        self._calls_pending = False
        self._write(b"".join(pending))

    def _write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
        except (RuntimeError, OSError) as exc:  # the transport is closing
            self._break(ConnectionError(f"shared state connection: {exc}"))

    def _expire(self) -> None:
        """Fail the calls past their deadline (their replies, if they come, are dropped); re-arm for the next."""
        self._watchdog = None
        now = self._loop.time()
        for future, deadline in self._waiting:
            if future is None or future.done() or deadline == math.inf:
                continue
            if deadline > now:  # the timed calls' deadlines grow along the queue: the rest are later still
                self._watchdog = self._loop.call_at(deadline, self._expire)
                return
            future.set_exception(asyncio.TimeoutError())

    def _received(self, data: bytes) -> None:
        """Bytes from Redis (in _Replies.data_received): each whole reply to the future of its command."""
        if self._broken:
            return
        parser = self._parser
        try:
            parser.feed(data)
            reply = parser.gets()
            while reply is not False:  # False: nothing whole yet (a reply is never False: RESP2 has no booleans)
                if not self._deliver(reply):
                    return
                reply = parser.gets()
        except (RedisError, OSError, EOFError) as exc:
            self._break(exc)

    async def _read_with_redis_py(self) -> None:  # pragma: no cover - without hiredis
        while True:
            try:
                reply: Any = await self._conn.read_response()
            except ResponseError as exc:  # that command's own error; the connection is fine
                reply = exc
            except (RedisError, OSError, EOFError) as exc:
                self._break(exc)
                return
            if not self._deliver(reply):
                return

    def _deliver(self, reply: Any) -> bool:
        if not self._waiting:
            self._break(ConnectionError("shared state: a reply nobody asked for"))
            return False
        future = self._waiting.popleft()[0]
        if future is not None and not future.done():  # done: its request stopped waiting (state.timeout)
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        return True

    def _break(self, exc: BaseException) -> None:
        if self._broken:
            return
        self._broken = True
        self._pending.clear()
        self._fail([future for future, _ in self._waiting], exc)
        self._waiting.clear()
        self.on_error(exc)

    @staticmethod
    def _fail(futures: list[asyncio.Future[Any] | None], exc: BaseException) -> None:
        for future in futures:
            if future is not None and not future.done():
                future.set_exception(exc)

    async def close(self, timeout_s: float) -> None:
        """Send what is queued, wait (at most `timeout_s`) for the replies, close the connection."""
        if (self._pending or self._waiting) and not self._broken:
            try:  # answered after everything sent before it
                await _bounded(self.call("PING", timed=False), timeout_s)
            except (asyncio.TimeoutError, RedisError, OSError):
                pass
        self._broken = True
        for handle in (self._flush_later, self._watchdog, self._turn):
            if handle is not None:
                handle.cancel()
        if self._reader is not None:
            self._reader.cancel()
        # Without the watchdog and the reader nothing would ever answer a call still waiting: it fails now.
        self._fail([future for future, _ in self._waiting], ConnectionError("shared state connection closed"))
        self._waiting.clear()
        try:
            await self._conn.disconnect()
        except (RedisError, OSError):
            pass


class _Replies(asyncio.Protocol):
    """The pipeline connection's protocol once it is the pipeline's: the bytes go to AutoPipeline._received,
    everything else on to the protocol redis-py connected with (its StreamReaderProtocol), so that closing
    the connection through redis-py still ends as it would."""

    __slots__ = ("_pipeline", "_stream")

    def __init__(self, pipeline: AutoPipeline, stream: Any) -> None:
        self._pipeline = pipeline
        self._stream = stream

    def data_received(self, data: bytes) -> None:
        self._pipeline._received(data)

    def eof_received(self) -> bool:
        self._pipeline._break(ConnectionError("shared state: Redis closed the connection"))
        return False  # the transport closes itself: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._pipeline._break(ConnectionError(f"shared state: connection lost ({exc or 'closed'})"))
        self._stream.connection_lost(exc)

    def pause_writing(self) -> None:
        self._stream.pause_writing()

    def resume_writing(self) -> None:
        self._stream.resume_writing()


class Admission:
    """One request's admission under way (RedisState.begin_admit): `await` it for its lease, or the
    TooManyRequests refusing it, once; `end` it when the request is over, however that went."""

    __slots__ = ("answered", "key", "lease", "member", "principal", "reply", "state", "wall")

    def __init__(self, state: RedisState, principal: Principal, wall: float, reply: asyncio.Future[Any] | None,
                 key: str = "", member: str = "") -> None:
        self.state = state
        self.principal = principal
        self.wall = wall
        self.reply = reply  # Redis's answer to come (None: answered locally, degraded; or already awaited)
        self.key = key
        self.member = member
        self.lease: SharedLease | None = None  # what the answer admitted with, until `end` gives it back
        self.answered = False

    def __await__(self) -> Generator[Any, None, SharedLease]:
        return self.state._answer(self).__await__()

    def end(self) -> None:
        """Give back the lease, or, for an admission nobody awaited, whatever lease the script may take."""
        if self.lease is not None:
            lease, self.lease = self.lease, None
            self.state.release(lease)
        elif self.reply is not None:
            reply, self.reply = self.reply, None
            reply.cancel()  # its answer, when it comes, is dropped
            if self.member:
                self.state.release(SharedLease(self.key, self.member))


@dataclass(slots=True)
class SharedLease:
    """A lease in Redis (`member` of `key`); `local` holds the scaled principal of a lease taken while
    degraded, released in the local limits instead."""

    key: str = ""
    member: str = ""
    local: Principal | None = None


NO_LEASE = SharedLease()  # a key without max_concurrent: nothing to give back


class MirroredLimits(KeyLimits):
    """gate.limits with [state]: admission moves to RedisState.admit (awaited by the proxy), so the gate's
    synchronous admit/release do nothing; the daily token count is kept here as a local mirror (for the
    degraded mode) and every change is sent on to Redis."""

    __slots__ = ("state",)

    def __init__(self, state: RedisState) -> None:
        super().__init__()
        self.state = state

    def admit(self, principal: Principal, now: float, wall: float) -> None:
        pass

    def release(self, principal: Principal) -> None:
        pass

    def add_tokens(self, key: str, tokens: int, wall: float) -> None:
        super().add_tokens(key, tokens, wall)
        self.state.send_tokens(key, tokens, wall)

    def set_tokens_today(self, key: str, tokens: int, wall: float) -> None:
        super().set_tokens_today(key, tokens, wall)
        self.state.seed_tokens(key, tokens, wall)

    def mirror_tokens(self, key: str, tokens: int, wall: float) -> None:
        """What Redis said today's count is: the mirror never goes down (local additions may be ahead)."""
        if tokens > self.tokens_today(key, wall):
            KeyLimits.set_tokens_today(self, key, tokens, wall)


class MirroredTrust(TrustTable):
    """gate.trust with [state]: a grant made here is also written to Redis and published; grants published
    by other instances are applied here with `apply` (without publishing them again)."""

    __slots__ = ("state",)

    def __init__(self, max_entries: int, state: RedisState) -> None:
        super().__init__(max_entries)
        self.state = state

    def grant(self, ip: str, user: str, key_label: str, ttl: float, now: float, key_id: str = "") -> TrustGrant:
        grant = super().grant(ip, user, key_label, ttl, now, key_id)
        self.state.send_grant(ip, grant, ttl)
        return grant

    def apply(self, ip: str, user: str, key_label: str, ttl: float, now: float, key_id: str) -> None:
        super().grant(ip, user, key_label, ttl, now, key_id)


class RedisState:
    """The LiveState of one instance, on one Redis. Create, `attach` to the gate, `start`; `stop` at exit."""

    def __init__(self, settings: StateConfig, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, lease_ttl_s: float = LEASE_TTL_S,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.timeout_s = settings.timeout
        self.clock = clock
        self.wall_clock = wall_clock
        self.lease_ttl_s = lease_ttl_s
        self.renew_s = min(LEASE_RENEW_S, lease_ttl_s / 3)  # three renewals may fail before a lease lapses
        self.instance = uuid.uuid4().hex[:16]
        self.events_channel = events_channel(settings.url.db)
        self.metrics = metrics or Metrics()
        self.mode = DEGRADED  # until the first answer from Redis
        self.metrics.state_shared = 0
        self.live_instances = 1
        self.degraded_total = 0  # times this instance fell back to local tables
        self.redis = aioredis.Redis.from_url(
            # No socket_timeout: every call is bounded by _bounded already, and redis-py would wrap each read
            # and write in a wait_for of its own (a task per call: tens of us on each request).
            settings.url.text, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=None,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._admit = self.redis.register_script(ADMIT_LUA)
        self._pipeline: AutoPipeline | None = None  # opened by _connect
        self._renew = self.redis.register_script(RENEW_LUA)
        self._heartbeat = self.redis.register_script(HEARTBEAT_LUA)
        self._failure = self.redis.register_script(FAILURE_LUA)
        self._seed = self.redis.register_script(SEED_TOKENS_LUA)
        self.local = KeyLimits()  # degraded mode: this instance's share of each limit
        self._scaled: dict[tuple[Principal, int], Principal] = {}
        self._leases: dict[str, str] = {}  # live shared leases: member -> lease set (renewed while they run)
        self._lease_seq = 0
        # Made while degraded, sent when Redis answers again (bounded: at most the trust table's size, and
        # one count per key and day): tokens spent and trust granted during an outage are not forgotten.
        self._unsent_tokens: dict[tuple[str, float], int] = {}
        self._unsent_grants: dict[str, TrustGrant] = {}
        self._renewed_at = 0.0
        self._expiry_sent: dict[str, float] = {}  # today's token count key -> when its EXPIRE was last sent
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._stopping = False
        self.limits: MirroredLimits | None = None
        self.trust: MirroredTrust | None = None
        self.failures: FailureLimiter | None = None

    def __repr__(self) -> str:
        return f"RedisState({self.settings.url.redacted}, {self.mode}, {self.live_instances} live)"

    # -- wiring ------------------------------------------------------------------------------------------

    def attach(self, gate: Any) -> None:
        """Put the mirrored tables into the gate (before it has served anyone)."""
        self.limits = MirroredLimits(self)
        self.trust = MirroredTrust(gate.trust.max_entries, self)
        gate.limits = self.limits
        gate.trust = self.trust
        self.failures = gate.failures

    async def start(self) -> None:
        """Connect (or start degraded when Redis does not answer: the reconnect loop keeps trying)."""
        try:
            await self._connect()
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.mode = SHARED  # so that _degrade says why, once
            self._degrade(exc)
        else:
            log.info("Shared state %s: limits, leases, IP trust and lockout shared by %d live instance(s)",
                     self.settings.url.redacted, self.live_instances)
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Give back this instance's leases and its heartbeat (best effort, bounded), close the connections."""
        self._stopping = True
        for task in (self._runner, self._listener):
            if task is not None:
                task.cancel()
        if self._pipeline is not None:
            await self._pipeline.close(PROBE_TIMEOUT_S)  # releases and token counts still queued go out first
        if self.mode == SHARED:
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S) if sys.version_info >= (3, 11) else _nullcontext():
                    pipe = self.redis.pipeline(transaction=False)
                    for member, key in self._leases.items():
                        pipe.zrem(key, member)
                    pipe.zrem(INSTANCES_KEY, self.instance)
                    await pipe.execute()
            except (RedisError, OSError, asyncio.TimeoutError):
                pass
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=PROBE_TIMEOUT_S)
        await self._close_pubsub()
        try:
            await self.redis.aclose()
        except (RedisError, OSError):
            pass

    # -- the request path --------------------------------------------------------------------------------

    async def admit(self, principal: Principal) -> SharedLease:
        return await self.begin_admit(principal)

    def begin_admit(self, principal: Principal) -> Admission:
        """`admit`, sent now and answered when awaited: the script is on its way to Redis when this returns,
        and the request's other preparations can go on while Redis answers. Whoever begins one ends it with
        Admission.end (an admission nobody awaited may still take a lease in Redis)."""
        wall = self.wall_clock()
        if self.mode == SHARED and self._pipeline is not None:
            self._lease_seq += 1
            member = f"{self.instance}:{self._lease_seq}" if principal.max_concurrent is not None else ""
            key = lease_key(principal.key_id)
            # EVALSHA only: _warm_up loaded the script, and a Redis that lost it (restarted, SCRIPT FLUSH)
            # answers NOSCRIPT, which degrades until the reconnect loop loads it again.
            # Bounded by state.timeout: the pipeline fails the future past it.
            reply = self._pipeline.call(
                "EVALSHA", self._admit.sha, 3, rpm_key(principal.key_id), key, tokens_key(principal.key_id, wall),
                principal.rpm or 0, principal.max_concurrent or 0,
                -1 if principal.tokens_per_day is None else principal.tokens_per_day,
                member, int(self.lease_ttl_s * 1000), int(DAY_S - wall % DAY_S) or 1)
            return Admission(self, principal, wall, reply, key, member)
        return Admission(self, principal, wall, None)

    async def _answer(self, admission: Admission) -> SharedLease:
        if admission.answered:
            raise RuntimeError("an admission is awaited once")
        admission.answered = True
        principal, wall, reply, key, member = (admission.principal, admission.wall, admission.reply, admission.key,
                                               admission.member)
        admission.reply = None  # from now on, ending it gives back only the lease it returns
        if reply is not None:
            try:
                code, value = await reply
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                self._degrade(exc)
            except asyncio.CancelledError:
                # The client left while Redis was answering: the script may have taken a lease for it, which
                # nothing would release or renew (held for the lease TTL). Removing one that was never added
                # is harmless.
                if member:
                    self.release(SharedLease(key, member))
                raise
            else:
                code = int(code)
                if code == 0:
                    if principal.tokens_per_day is not None and self.limits is not None:
                        self.limits.mirror_tokens(principal.key_id, int(value), wall)
                    if not member:
                        return NO_LEASE
                    self._leases[member] = key
                    admission.lease = SharedLease(key, member)
                    return admission.lease
                raise self._refusal(principal, code, value)
        admission.lease = self._admit_locally(principal, wall)
        return admission.lease

    def _refusal(self, principal: Principal, code: int, value: Any) -> TooManyRequests:
        # The messages and Retry-After of limits.KeyLimits, word for word.
        if code == 1:
            return too_many(f"daily token limit of {principal.tokens_per_day} reached for this key", float(value))
        if code == 2:
            return too_many(f"this key already has {principal.max_concurrent} requests in flight", 1)
        return too_many(f"rate limit of {principal.rpm} requests per minute reached for this key", float(value))

    def _admit_locally(self, principal: Principal, wall: float) -> SharedLease:
        """Degraded: the daily count from the mirror, rpm and concurrency from this instance's share."""
        if (principal.tokens_per_day is not None and self.limits is not None
                and self.limits.tokens_today(principal.key_id, wall) >= principal.tokens_per_day):
            raise too_many(f"daily token limit of {principal.tokens_per_day} reached for this key",
                           DAY_S - wall % DAY_S)
        if principal.rpm is None and principal.max_concurrent is None:
            return NO_LEASE
        live = self.live_instances
        scaled = self._scaled.get((principal, live))
        if scaled is None:
            if len(self._scaled) > 10000:
                self._scaled.clear()
            scaled = self._scaled[(principal, live)] = replace(
                principal, rpm=local_share(principal.rpm, live), tokens_per_day=None,
                max_concurrent=local_share(principal.max_concurrent, live))
        try:
            self.local.admit(scaled, self.clock(), wall)
        except TooManyRequests as err:
            # The refusal names the key's limit, not this instance's share of it.
            message = err.message.replace(f"of {scaled.rpm} ", f"of {principal.rpm} ").replace(
                f"has {scaled.max_concurrent} ", f"has {principal.max_concurrent} ")
            raise TooManyRequests(message, headers=err.extra_headers) from None
        return SharedLease(local=scaled) if scaled.max_concurrent is not None else NO_LEASE

    def release(self, lease: SharedLease) -> None:
        if lease.local is not None:
            self.local.release(lease.local)
        elif lease.member:
            self._leases.pop(lease.member, None)
            if self.mode == SHARED and self._pipeline is not None:
                self._pipeline.send("ZREM", lease.key, lease.member)
            # Degraded: the lease runs out by itself within the lease TTL.

    async def failed_guess(self, ip: str, error: GateError) -> GateError:
        failures = self.failures
        if self.mode != SHARED or failures is None or not failures.max_failures:
            return error
        bucket = failure_bucket(ip)
        try:
            count, left_ms = await _bounded(self._failure(
                keys=(failure_key(bucket),),
                args=(int(failures.window_s * 1000), failures.max_failures, self.events_channel, bucket,
                      self.instance)),
                self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._degrade(exc)
            return error
        count, left_s = int(count), max(0, int(left_ms)) / 1000
        if count >= failures.max_failures:
            failures.lock(bucket, left_s, self.clock())
        if count <= failures.max_failures:
            return error
        # Over the shared limit: this instance had not seen the lock yet. As trust.FailureLimiter answers.
        refused = TooManyRequests(headers=((b"Retry-After", str(max(1, round(left_s))).encode()),))
        refused.key_label, refused.detail = error.key_label, f"{error.key_label} from {ip}"
        return refused

    # -- sent on without waiting -------------------------------------------------------------------------

    def send_grant(self, ip: str, grant: TrustGrant, ttl_s: float) -> None:
        if self.mode == SHARED:
            self._spawn(self._send_grant(ip, grant, ttl_s))
        elif self.trust is not None and len(self._unsent_grants) < self.trust.max_entries:
            self._unsent_grants[ip] = grant

    async def _send_grant(self, ip: str, grant: TrustGrant, ttl_s: float) -> None:
        record = {"ip": ip, "user": grant.user, "label": grant.key_label, "key_id": grant.key_id}
        message = json.dumps({"t": "trust", "from": self.instance, "ms": int(ttl_s * 1000), **record})
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(trust_key(ip), json.dumps(record), px=max(1, int(ttl_s * 1000)))
            pipe.publish(self.events_channel, message)
            await _bounded(pipe.execute(), PROBE_TIMEOUT_S)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._degrade(exc)

    def send_tokens(self, key_id: str, tokens: int, wall: float) -> None:
        if self.mode == SHARED and tokens and self._pipeline is not None:
            key = tokens_key(key_id, wall)
            self._pipeline.send("INCRBY", key, tokens)
            # The count's expiry once a while, not with every count: a key that lost it (deleted and counted
            # again) gets it back within EXPIRY_RESEND_S.
            now = self.clock()
            if now - self._expiry_sent.get(key, -EXPIRY_RESEND_S) >= EXPIRY_RESEND_S:
                if len(self._expiry_sent) > 10000:
                    self._expiry_sent.clear()
                self._expiry_sent[key] = now
                self._pipeline.send("EXPIRE", key, TOKENS_KEY_TTL_S)
        elif tokens:
            day = (key_id, wall - wall % DAY_S)
            self._unsent_tokens[day] = self._unsent_tokens.get(day, 0) + tokens

    def seed_tokens(self, key_id: str, tokens: int, wall: float) -> None:
        if self.mode == SHARED:
            self._spawn(self._seed_tokens(key_id, tokens, wall))

    async def _seed_tokens(self, key_id: str, tokens: int, wall: float) -> None:
        try:
            await _bounded(self._seed(keys=(tokens_key(key_id, wall),), args=(tokens, TOKENS_KEY_TTL_S)),
                           PROBE_TIMEOUT_S)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._degrade(exc)

    def _send_unsent(self) -> None:
        tokens, self._unsent_tokens = self._unsent_tokens, {}
        for (key_id, day_start), count in tokens.items():
            self.send_tokens(key_id, count, day_start)
        grants, self._unsent_grants = self._unsent_grants, {}
        now = self.clock()
        for ip, grant in grants.items():
            if grant.expires_at > now:
                self._spawn(self._send_grant(ip, grant, grant.expires_at - now))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- shared, degraded, and back ----------------------------------------------------------------------

    def _degrade(self, exc: BaseException) -> None:
        if self.mode == DEGRADED:
            return
        self.mode = DEGRADED
        self.degraded_total += 1
        self.metrics.state_shared = 0
        self.metrics.state_fallbacks += 1
        what = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
        log.warning("Shared state %s unreachable (%s): limits are local (limit / %d live instances), IP trust and "
                    "lockout local, until it answers again", self.settings.url.redacted, what, self.live_instances)
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None

    async def _connect(self) -> None:
        """One probe and the state that must be fetched before going SHARED (live count, trust grants)."""
        self.live_instances = int(await _bounded(
            self._heartbeat(keys=(INSTANCES_KEY,), args=(self.instance, int(INSTANCE_TTL_S * 1000))),
            PROBE_TIMEOUT_S))
        await self._close_pubsub()
        self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await _bounded(self._pubsub.subscribe(self.events_channel), PROBE_TIMEOUT_S)
        await _bounded(self._load_grants(), 5 * PROBE_TIMEOUT_S)
        await _bounded(self._load_locks(), 5 * PROBE_TIMEOUT_S)
        await _bounded(self._warm_up(), PROBE_TIMEOUT_S)
        old, self._pipeline = self._pipeline, None
        if old is not None:
            await old.close(0)
        self._expiry_sent.clear()  # Redis may have lost the counts (restarted): expiries are set again
        self._pipeline = await _bounded(AutoPipeline.open(self.redis, self._degrade, self.timeout_s), PROBE_TIMEOUT_S)
        self._listener = asyncio.get_running_loop().create_task(self._listen(self._pubsub))
        was = self.mode
        self.mode = SHARED
        self.metrics.state_shared = 1
        self._renewed_at = 0.0  # leases taken before a blip: renew them at once
        self._send_unsent()
        if was == DEGRADED and self.degraded_total:
            log.warning("Shared state %s answers again: limits, leases, IP trust and lockout are shared "
                        "(%d live instances)", self.settings.url.redacted, self.live_instances)

    async def _warm_up(self) -> None:
        """Scripts loaded and a few connections open before the first request: otherwise that request pays
        for a connect and a NOSCRIPT round trip, which on a busy machine can pass state.timeout."""
        for script in (self._admit, self._renew, self._failure, self._seed):
            await self.redis.script_load(script.script)
        await asyncio.gather(*(self.redis.ping() for _ in range(WARM_CONNECTIONS)))  # background calls

    async def _load_locks(self) -> None:
        """Windows that reached the limit while this instance was away (started, or cut off from Redis)."""
        failures = self.failures
        if failures is None or not failures.max_failures:
            return
        prefix = failure_key("")
        async for name in self.redis.scan_iter(match=failure_key("*"), count=500):
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(name)
            pipe.pttl(name)
            count, left_ms = await pipe.execute()
            if count is not None and int(count) >= failures.max_failures and left_ms is not None and int(left_ms) > 0:
                bucket = name.decode() if isinstance(name, bytes) else str(name)
                failures.lock(bucket[len(prefix):], int(left_ms) / 1000, self.clock())

    async def _load_grants(self) -> None:
        if self.trust is None:
            return
        async for name in self.redis.scan_iter(match=trust_key("*"), count=500):
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(name)
            pipe.pttl(name)
            raw, left_ms = await pipe.execute()
            if raw is None or left_ms is None or int(left_ms) <= 0:
                continue
            try:
                self._apply_grant(json.loads(raw), int(left_ms) / 1000)
            except _MALFORMED:
                # Written by hand, by another version, or damaged: one bad record must not keep every
                # instance from starting (nor a degraded one from sharing again).
                log.warning("Shared state: ignored an unreadable trust record %s", name)

    def _apply_grant(self, record: dict[str, Any], ttl_s: float) -> None:
        if self.trust is None:
            return
        if not isinstance(record, dict) or not record.get("key_id"):
            return  # fastgate never writes a grant without its key: a record like that is not ours to honour
        ip = str(record["ip"])
        current = self.trust.lookup(ip, self.clock())
        if current is not None and current.user == record["user"] and current.expires_at >= self.clock() + ttl_s:
            return
        try:
            self.trust.apply(ip, str(record["user"]), str(record["label"]), ttl_s, self.clock(),
                             str(record.get("key_id", "")))
        except GateError:
            pass  # an address the table cannot hold trust for

    async def _listen(self, pubsub: Any) -> None:
        try:
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                try:
                    event = json.loads(message["data"])
                    if not isinstance(event, dict):
                        raise TypeError("not an object")
                    if event.get("from") == self.instance:
                        continue
                    if event["t"] == "trust":
                        self._apply_grant(event, int(event["ms"]) / 1000)
                    elif event["t"] == "lock" and self.failures is not None:
                        self.failures.lock(str(event["bucket"]), max(0, int(event["ms"])) / 1000, self.clock())
                except _MALFORMED:
                    log.warning("Shared state: ignored a malformed event on %s", self.events_channel)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            self._degrade(exc)

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await _bounded(pubsub.aclose(), PROBE_TIMEOUT_S)
            except (RedisError, OSError, asyncio.TimeoutError):
                pass

    async def _run(self) -> None:
        """Heartbeat and lease renewal while shared; a reconnect probe every RECONNECT_S while degraded."""
        while not self._stopping:
            await asyncio.sleep(min(HEARTBEAT_S, self.renew_s) if self.mode == SHARED else RECONNECT_S)
            try:
                if self.mode == DEGRADED:
                    await self._connect()
                    continue
                self.live_instances = int(await _bounded(
                    self._heartbeat(keys=(INSTANCES_KEY,), args=(self.instance, int(INSTANCE_TTL_S * 1000))),
                    PROBE_TIMEOUT_S))
                if self._leases and self.clock() - self._renewed_at >= self.renew_s:
                    leases = list(self._leases.items())
                    await _bounded(self._renew(keys=[key for _, key in leases],
                                               args=[int(self.lease_ttl_s * 1000), *[m for m, _ in leases]]),
                                   PROBE_TIMEOUT_S)
                    self._renewed_at = self.clock()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                if _cancelling():  # a cancel the client library turned into a connection error: still a cancel
                    raise asyncio.CancelledError() from exc
                self._degrade(exc)
            except Exception:  # noqa: BLE001 - the loop must outlive a bug, or the instance never reconnects
                log.exception("Shared state: unexpected error in the heartbeat")


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and sys.version_info >= (3, 11) and task.cancelling() > 0


class _nullcontext:  # pragma: no cover - 3.10 only
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


async def open_state(settings: StateConfig, gate: Any, *, lease_ttl_s: float = LEASE_TTL_S,
                     metrics: Metrics | None = None) -> RedisState:
    """The LiveState for `settings`, attached to `gate` and started (degraded if Redis does not answer yet)."""
    state = RedisState(settings, lease_ttl_s=lease_ttl_s, clock=gate.clock, wall_clock=gate.wall_clock,
                       metrics=metrics)
    state.attach(gate)
    await state.start()
    return state


