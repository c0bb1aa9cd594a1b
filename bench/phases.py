"""The measurement phases. Each one runs against one target and returns plain numbers for one round.

CPU figures are the target's own process tree (schedstat nanoseconds) over the window, divided by the
tokens or requests the client received inside that window. The fake upstream's and the client's CPU over
the same window are recorded too, to show that the load generator stays cheap.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from . import analysis
from .client import Exchange, HttpConn, connect, connect_many, get_request, send_raw, stream_request
from .procs import Managed, busy_ns, cpu_ns
from .targets import BAD_KEY, DENIED_MODEL, HOST, Target

VERSION_BODY = b'{"version":'
MEM_SETTLE_S = 0.3
OWN_KEY = object()  # "the key the target is served with", as opposed to None (no key) or a wrong one


@dataclass
class Params:
    rounds: int
    paced_tokens: int  # tokens in the paced (latency) stream
    paced_gap_ms: float
    paced_streams: int
    full_streams: int
    full_tokens: int  # tokens per full-speed stream (a new one starts when one ends)
    full_warmup_s: float
    full_window_s: float
    small_conns: int
    small_warmup_s: float
    small_window_s: float
    ttfb_requests: int
    idle_conns: int
    active_streams: int
    active_gap_ms: float
    lean: bool  # ask the fake for its lean measurement mode
    live_tokens: int = 100  # tokens per live stream
    live_gap_ms: float = 50.0  # 20 tokens/s, a chat model's pace
    live_rounds: int = 0  # rounds that run the live phases (the first ones); 0: every round

    @classmethod
    def full(cls) -> Params:
        return cls(rounds=7, paced_tokens=1500, paced_gap_ms=2.0, paced_streams=1, full_streams=32,
                   full_tokens=2000, full_warmup_s=0.5, full_window_s=3.0, small_conns=64, small_warmup_s=0.5,
                   small_window_s=3.0, ttfb_requests=200, idle_conns=500, active_streams=64,
                   active_gap_ms=20.0, lean=True)

    @classmethod
    def quick(cls) -> Params:
        return cls(rounds=2, paced_tokens=300, paced_gap_ms=2.0, paced_streams=1, full_streams=32,
                   full_tokens=1000, full_warmup_s=0.3, full_window_s=1.0, small_conns=64, small_warmup_s=0.3,
                   small_window_s=1.0, ttfb_requests=50, idle_conns=200, active_streams=32,
                   active_gap_ms=20.0, lean=True, live_tokens=30)


class Meter:
    """CPU of the target, the upstream and this process between two points in time, and how much CPU the
    rest of the machine (other people's work on a shared VM) took meanwhile."""

    def __init__(self, target: Target, upstream: Managed, extra_pids: list[int] | None = None) -> None:
        self.target = target
        # A target with backends of its own (fastgate-3backends) is fed by them, not by the shared fake.
        self.upstreams = list(target.upstreams) or [upstream]
        self.me = [os.getpid()]
        self.extra = extra_pids or []  # our spinners: not "others"

    def snap(self) -> tuple[int, ...]:
        return (time.monotonic_ns(), self.target.cpu_ns(), sum(u.cpu_ns() for u in self.upstreams),
                cpu_ns(self.me), cpu_ns(self.extra), busy_ns(), self.target.aux_cpu_ns())

    @staticmethod
    def diff(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int, int, int]:
        return (b[0] - a[0], b[1] - a[1], b[2] - a[2], b[3] - a[3])

    @staticmethod
    def aux(a: tuple[int, ...], b: tuple[int, ...]) -> int:
        """CPU of the target's helper processes (its redis-server), ns."""
        return b[6] - a[6]

    @staticmethod
    def others(a: tuple[int, ...], b: tuple[int, ...]) -> float:
        """CPUs' worth of work by processes other than ours during the window (USER_HZ resolution)."""
        wall = b[0] - a[0]
        ours = sum(b[i] - a[i] for i in (1, 2, 3, 4, 6))
        return max(0.0, (b[5] - a[5] - ours) / wall) if wall else float("nan")


class Phases:
    def __init__(self, params: Params, upstream: Managed, upstream_port: int) -> None:
        self.p = params
        self.spinner_pids: list[int] = []  # set by the runner while spinners run
        self.upstream = upstream
        self.upstream_port = upstream_port

    def _host(self, target: Target) -> str:
        return f"{HOST}:{target.port}"

    def _stream_req(self, target: Target, tokens: int, gap_ms: float, key: str | None | object = OWN_KEY,
                    model: str | None = None) -> bytes:
        """A stream request for `target`, sent with its own key (Target.key) unless `key` says otherwise
        (None: no key); `model`: another model than the client's default."""
        k = target.key if key is OWN_KEY else key
        assert k is None or isinstance(k, str)
        if model:
            return stream_request(self._host(target), k, tokens, gap_ms, lean=self.p.lean, model=model)
        return stream_request(self._host(target), k, tokens, gap_ms, lean=self.p.lean)

    # -- correctness of auth, and a warm-up -----------------------------------------------------------------

    async def auth(self, target: Target) -> dict[str, object]:
        out: dict[str, object] = {}
        ok = await send_raw(HOST, target.port, get_request(self._host(target), target.key))
        out["good_key_status"] = _status(ok)
        out["good_key_ok"] = _status(ok) == 200 and VERSION_BODY in ok
        stream = await send_raw(HOST, target.port, self._stream_req(target, 5, 0))
        parsed = analysis.parse_exchange(Exchange(0, [(0, stream)]), want_times=False)
        check = analysis.check_stream(parsed, 5)
        out["stream_ok"] = check.ok
        if not check.ok:
            out["failures"] = [f"5-token stream: {check.error}"]
        if target.is_proxy:
            bad = [await send_raw(HOST, target.port, get_request(self._host(target), BAD_KEY)),
                   await send_raw(HOST, target.port, get_request(self._host(target), None)),
                   await send_raw(HOST, target.port, self._stream_req(target, 5, 0, key=BAD_KEY)),
                   await send_raw(HOST, target.port, self._stream_req(target, 5, 0, key=None))]
            out["bad_key_statuses"] = [_status(b) for b in bad]
            out["bad_key_401"] = all(_status(b) == 401 for b in bad)
        if target.models:
            # The key's model allow-list is in force: a model outside it is refused before forwarding.
            denied = await send_raw(HOST, target.port, self._stream_req(target, 5, 0, model=DENIED_MODEL))
            out["denied_model_status"] = _status(denied)
            out["denied_model_403"] = _status(denied) == 403
        return out

    # -- 1 and 2a: paced tokens: added latency per token and CPU per token ---------------------------------

    async def paced(self, target: Target) -> dict[str, object]:
        p = self.p
        meter = Meter(target, self.upstream, self.spinner_pids)
        conns = [await connect(HOST, target.port) for _ in range(p.paced_streams)]
        req = self._stream_req(target, p.paced_tokens, p.paced_gap_ms)
        futs = []
        firsts = []
        for c in conns:
            futs.append(c.request(req, first_data=True))
            firsts.append(c.first_data)
            if p.paced_streams > 1:
                await asyncio.sleep(p.paced_gap_ms / 1000 / p.paced_streams)  # spread the streams' ticks
        await asyncio.wait_for(asyncio.gather(*firsts), 30)
        a = meter.snap()
        deadline_s = p.paced_tokens * p.paced_gap_ms / 1000 * 3 + 30
        exchanges = await asyncio.wait_for(asyncio.gather(*futs), deadline_s)
        b = meter.snap()
        for c in conns:
            c.close()
        lat: list[int] = []
        tokens = 0
        failures: list[str] = []
        reframed = 0
        chunks = 0
        crc = 0
        for ex in exchanges:
            parsed = analysis.parse_exchange(ex)
            check = analysis.check_stream(parsed, p.paced_tokens)
            if not check.ok:
                failures.append(check.error)
            crc += check.crc_checked
            reframed += parsed.reframed_chunks
            chunks += parsed.chunks
            lat += analysis.token_latencies_ns(parsed, p.paced_tokens)
            tokens += sum(1 for t in parsed.line_arrival_ns if t > a[0])
        wall, cpu, up, me = Meter.diff(a, b)
        return {
            "others_cpus": Meter.others(a, b),
            "latency_p50_us": analysis.percentile(lat, 50) / 1000,
            "latency_p99_us": analysis.percentile(lat, 99) / 1000,
            "latency_us_sample": [v / 1000 for v in lat],
            "cpu_per_token_us": cpu / tokens / 1000 if tokens else float("nan"),
            "upstream_cpu_per_token_us": up / tokens / 1000 if tokens else float("nan"),
            "client_cpu_per_token_us": me / tokens / 1000 if tokens else float("nan"),
            "aux_cpu_per_token_us": Meter.aux(a, b) / tokens / 1000 if tokens else float("nan"),
            "tokens": tokens,
            "wall_s": wall / 1e9,
            "streams_ok": len(exchanges) - len(failures),
            "streams": len(exchanges),
            "crc_checked": crc,
            "failures": failures[:5],
            "chunks": chunks,
            "reframed_chunks": reframed,
        }

    # -- 1b: live streams: many concurrent paced streams, as a shared chat service sees them -----------------

    async def live(self, target: Target, streams: int) -> dict[str, object]:
        """`streams` concurrent streams of `live_tokens` tokens `live_gap_ms` apart, their starts spread
        evenly over one gap (so that the ticks of different streams do not coincide). Per-token latency
        over every token of every stream (p50, p99, p99.9), CPU per token over the whole exchange (the
        requests' own cost included, as a service pays it), and the client's CPU use: if the client
        itself were saturated, every target's latency would grow with it."""
        p = self.p
        meter = Meter(target, self.upstream, self.spinner_pids)
        conns = await connect_many(HOST, target.port, streams)
        req = self._stream_req(target, p.live_tokens, p.live_gap_ms)
        gap_s = p.live_gap_ms / 1000

        async def one(c: HttpConn, delay_s: float) -> Exchange:
            await asyncio.sleep(delay_s)
            return await c.request(req)

        a = meter.snap()
        deadline_s = p.live_tokens * gap_s * 4 + 60
        try:
            exchanges = await asyncio.wait_for(
                asyncio.gather(*(one(c, i * gap_s / streams) for i, c in enumerate(conns))), deadline_s)
        finally:
            b = meter.snap()
            for c in conns:
                c.abort()
        lat: list[int] = []
        tokens = 0
        failures: list[str] = []
        crc = 0
        durations: list[float] = []
        first_token: list[float] = []
        for ex in exchanges:
            parsed = analysis.parse_exchange(ex)
            check = analysis.check_stream(parsed, p.live_tokens)
            if not check.ok:
                failures.append(check.error)
            crc += check.crc_checked
            lat += analysis.token_latencies_ns(parsed, p.live_tokens)
            tokens += min(len(parsed.line_arrival_ns), p.live_tokens)
            if ex.reads:
                durations.append((ex.reads[-1][0] - ex.sent_ns) / 1e9)
            if parsed.line_arrival_ns:
                # Includes any wait before the request reached Ollama (which per-token latency, measured
                # from the fake's send time, cannot see): a proxy that queues requests shows it here.
                first_token.append((parsed.line_arrival_ns[0] - ex.sent_ns) / 1e6)
        wall, cpu, up, me = Meter.diff(a, b)
        expected_s = p.live_tokens * gap_s
        return {
            "others_cpus": Meter.others(a, b),
            "streams_live": streams,
            "latency_p50_us": analysis.percentile(lat, 50) / 1000,
            "latency_p99_us": analysis.percentile(lat, 99) / 1000,
            "latency_p999_us": analysis.percentile(lat, 99.9) / 1000,
            "cpu_per_token_us": cpu / tokens / 1000 if tokens else float("nan"),
            "upstream_cpu_per_token_us": up / tokens / 1000 if tokens else float("nan"),
            "client_cpu_per_token_us": me / tokens / 1000 if tokens else float("nan"),
            "aux_cpu_per_token_us": Meter.aux(a, b) / tokens / 1000 if tokens else float("nan"),
            # CPUs' worth each process used over the window: near 1.0 for the client means it was the
            # bottleneck.
            "proxy_cpu_util": cpu / wall,
            "client_cpu_util": me / wall,
            "upstream_cpu_util": up / wall,
            "first_token_ms_p50": analysis.percentile(first_token, 50),
            "first_token_ms_p99": analysis.percentile(first_token, 99),
            "stream_s_p50": analysis.percentile(durations, 50),
            "stream_s_max": max(durations) if durations else float("nan"),
            "stream_s_expected": expected_s,
            "tokens": tokens,
            "wall_s": wall / 1e9,
            "streams_ok": len(exchanges) - len(failures),
            "streams": len(exchanges),
            "crc_checked": crc,
            "failures": failures[:5],
        }

    # -- 2b: full speed, 32 concurrent streams -------------------------------------------------------------

    async def full_speed(self, target: Target) -> dict[str, object]:
        p = self.p
        meter = Meter(target, self.upstream)
        conns = await connect_many(HOST, target.port, p.full_streams)
        req = self._stream_req(target, p.full_tokens, 0)
        for c in conns:
            c.start_loop(req)
        await asyncio.sleep(p.full_warmup_s)
        a = meter.snap()
        await asyncio.sleep(p.full_window_s)
        b = meter.snap()
        for c in conns:
            c.running = False
        partial = [c.partial() for c in conns]
        for c in conns:
            c.abort()
        t0, t1 = a[0], b[0]
        tokens = 0
        streams = 0
        failures: list[str] = []
        reframed = 0
        chunks = 0
        crc = 0
        for c, part in zip(conns, partial, strict=True):
            for ex in c.exchanges:
                parsed = analysis.parse_exchange(ex)
                check = analysis.check_stream(parsed, p.full_tokens)
                streams += 1
                if not check.ok:
                    failures.append(check.error)
                crc += check.crc_checked
                reframed += parsed.reframed_chunks
                chunks += parsed.chunks
                tokens += sum(1 for t in parsed.line_arrival_ns if t0 < t <= t1)
            if part is not None and part.reads:
                parsed = analysis.parse_exchange(part)
                check = analysis.check_stream(parsed, p.full_tokens, complete_expected=False)
                if not check.ok:
                    failures.append("cut-off stream: " + check.error)
                reframed += parsed.reframed_chunks
                chunks += parsed.chunks
                tokens += sum(1 for t in parsed.line_arrival_ns if t0 < t <= t1)
        wall, cpu, up, me = Meter.diff(a, b)
        return {
            "others_cpus": Meter.others(a, b),
            "cpu_per_token_us": cpu / tokens / 1000 if tokens else float("nan"),
            "upstream_cpu_per_token_us": up / tokens / 1000 if tokens else float("nan"),
            "client_cpu_per_token_us": me / tokens / 1000 if tokens else float("nan"),
            "aux_cpu_per_token_us": Meter.aux(a, b) / tokens / 1000 if tokens else float("nan"),
            "tokens_per_s": tokens / (wall / 1e9),
            "proxy_cpu_util": cpu / wall,
            "tokens": tokens,
            "streams_ok": streams - len([f for f in failures if not f.startswith("cut-off")]),
            "streams": streams,
            "crc_checked": crc,
            "failures": failures[:5],
            "chunks": chunks,
            "reframed_chunks": reframed,
        }

    # -- 3: small requests on 64 keep-alive connections ----------------------------------------------------

    async def small(self, target: Target) -> dict[str, object]:
        p = self.p
        meter = Meter(target, self.upstream)
        conns = await connect_many(HOST, target.port, p.small_conns, keep_reads=False)
        req = get_request(self._host(target), target.key)
        await asyncio.wait_for(asyncio.gather(*(c.request(req) for c in conns)), 30)  # warm: one each
        for c in conns:
            c.start_loop(req)
        await asyncio.sleep(p.small_warmup_s)
        marks0 = [len(c.latencies_ns) for c in conns]
        split0 = _per_process_ns(target)
        a = meter.snap()
        await asyncio.sleep(p.small_window_s)
        b = meter.snap()
        split1 = _per_process_ns(target)
        marks1 = [len(c.latencies_ns) for c in conns]
        for c in conns:
            c.running = False
        await asyncio.sleep(0.05)
        bad = sum(c.bad_status for c in conns)
        sampled = [ex for c in conns for ex in c.sample]
        body_bad = sum(1 for ex in sampled if not _version_ok(ex))
        for c in conns:
            c.abort()
        lat = [v for c, i0, i1 in zip(conns, marks0, marks1, strict=True) for v in c.latencies_ns[i0:i1]]
        n = len(lat)
        wall, cpu, up, me = Meter.diff(a, b)
        return {
            "others_cpus": Meter.others(a, b),
            "requests_per_s": n / (wall / 1e9),
            "p50_us": analysis.percentile(lat, 50) / 1000,
            "p99_us": analysis.percentile(lat, 99) / 1000,
            "cpu_per_request_us": cpu / n / 1000 if n else float("nan"),
            "upstream_cpu_per_request_us": up / n / 1000 if n else float("nan"),
            "client_cpu_per_request_us": me / n / 1000 if n else float("nan"),
            "aux_cpu_per_request_us": Meter.aux(a, b) / n / 1000 if n else float("nan"),
            "client_cpu_util": me / wall,
            "proxy_cpu_util": cpu / wall,
            "requests": n,
            "non_200": bad,
            "reconnects": sum(c.reconnects for c in conns),
            # several processes (workers): each one's share of the target's CPU, the supervisor first
            "process_cpu_shares": _shares(split0, split1),
            "bodies_checked": len(sampled),
            "bodies_bad": body_bad,
        }

    # -- 4: time to first byte of a stream -------------------------------------------------------------------

    async def ttfb(self, target: Target) -> dict[str, object]:
        p = self.p
        conn = await connect(HOST, target.port)
        req = self._stream_req(target, 1, 0)
        for _ in range(5):
            await asyncio.wait_for(conn.request(req), 10)
        values = []
        failures: list[str] = []
        exchanges = []
        meter = Meter(target, self.upstream, self.spinner_pids)
        a = meter.snap()
        for _ in range(p.ttfb_requests):
            ex = await asyncio.wait_for(conn.request(req), 10)
            values.append((ex.first_byte_ns - ex.sent_ns) / 1000)
            exchanges.append(ex)
        b = meter.snap()
        for ex in exchanges:  # checked after the window, so that the checks' CPU is not in it
            check = analysis.check_stream(analysis.parse_exchange(ex, want_times=False), 1)
            if not check.ok:
                failures.append(check.error)
        conn.close()
        n = len(values)
        _, cpu, _, _ = Meter.diff(a, b)
        return {
            "others_cpus": Meter.others(a, b),
            "cpu_per_request_us": cpu / n / 1000 if n else float("nan"),
            "aux_cpu_per_request_us": Meter.aux(a, b) / n / 1000 if n else float("nan"),
            "p50_us": analysis.percentile(values, 50),
            "p99_us": analysis.percentile(values, 99),
            "streams_ok": len(values) - len(failures),
            "streams": len(values),
            "failures": failures[:5],
        }

    # -- 5: memory per idle keep-alive connection and per active stream ------------------------------------
    # Each is measured on a freshly started (and warmed-up) proxy: measured one after the other in the same
    # process, the second would reuse memory the first freed (nginx frees a request's pool when it ends and
    # keeps only a small buffer per idle connection), and come out near zero.

    async def mem_idle(self, target: Target) -> dict[str, object]:
        p = self.p
        await asyncio.sleep(MEM_SETTLE_S)
        base = target.rss_kib()
        idle = await connect_many(HOST, target.port, p.idle_conns)
        get = get_request(self._host(target), target.key)
        await asyncio.wait_for(asyncio.gather(*(c.request(get) for c in idle)), 60)
        await asyncio.sleep(MEM_SETTLE_S)
        after = target.rss_kib()
        still_open = sum(1 for c in idle if not c.eof)
        for c in idle:
            c.close()
        return {
            "base_kib": base,
            "after_kib": after,
            "conns": p.idle_conns,
            "conns_open": still_open,
            "per_idle_conn_kib": (after - base) / max(still_open, 1),
        }

    async def mem_active(self, target: Target) -> dict[str, object]:
        p = self.p
        await asyncio.sleep(MEM_SETTLE_S)
        base = target.rss_kib()
        active = await connect_many(HOST, target.port, p.active_streams)
        req = self._stream_req(target, 1_000_000, p.active_gap_ms)
        for c in active:
            c.request(req, first_data=True)
        await asyncio.wait_for(asyncio.gather(*(c.first_data for c in active if c.first_data)), 60)
        await asyncio.sleep(MEM_SETTLE_S)
        after = target.rss_kib()
        flowing = sum(1 for c in active if not c.eof and c.current is not None and len(c.current.reads) > 3)
        for c in active:
            c.abort()
        return {
            "base_kib": base,
            "after_kib": after,
            "active_streams": p.active_streams,
            "streams_flowing": flowing,
            "per_active_stream_kib": (after - base) / max(flowing, 1),
        }


def _per_process_ns(target: Target) -> dict[int, int]:
    if not target.multi_process or target.process is None:
        return {}
    return {pid: cpu_ns([pid]) for pid in target.process.refresh()}


def _shares(before: dict[int, int], after: dict[int, int]) -> list[float]:
    """Each process's share of the CPU used between two per-process readings (in process-tree order)."""
    used = [after[pid] - before.get(pid, 0) for pid in after]
    total = sum(used)
    return [u / total for u in used] if total > 0 else []


def _status(response: bytes) -> int:
    try:
        return int(response.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def _version_ok(ex: object) -> bool:
    parsed = analysis.parse_exchange(ex, want_times=False)  # type: ignore[arg-type]
    return (parsed.status == 200 and parsed.complete and not parsed.error
            and b"".join(parsed.lines).startswith(VERSION_BODY))

