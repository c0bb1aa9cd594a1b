"""`python -m bench.backends`: the several-backends figures of issue 9 that are not CPU or latency per token.

- **routing**: the pure Router's decision (`fastgate/routing/choice.py`), in this process, no sockets:
  `choose()` alone and `choose()` + `release()`, per call, p50 / p99 / p99.9 in microseconds, for 3 backends
  (model loaded on one, present on all) and for 20 backends with slot caps and requests in flight.
  Goal (issue 9): a decision under 20 us.
- **warm**: warm-first hit rate. Three fake Ollamas with the model; it is loaded on gpu1 only (one request
  sent to it directly, then fastgate's /api/ps poll must have seen it); `max_parallel = 4` on each. 200
  streams through fastgate, (a) two at a time (within gpu1's slots) and (b) eight at a time (beyond them:
  a spill to the cold backends is the rule working, not a miss). Share that landed on gpu1, counted by the
  fakes themselves.
- **failover**: continuous traffic (12 client loops of 20-token streams, 5 ms apart, through a three-
  backend fastgate), then one backend fails: `killed` (its listener closed and every connection reset, as
  a killed process), `refusing` (its listener closed, its idle connections closed, streams already running
  finish; new connections are refused), `hanging` (every request it receives from then on, probes
  included, is read and never answered, as a stopped process whose socket still accepts). Figures: time
  from the fault until fastgate's /health shows the backend not up (polled every 20 ms), for `hanging` the
  time until the backend received its last new model request (counted by the fake), and the client-visible
  outcome of every request: ok, an error status, a stream that ended visibly (connection closed before
  the end, or an error item), or a silently truncated stream (must be zero).

The fakes run in this process (tests/fake_ollama.py's FakeOllama), so that they can count what they
receive and be made to fail; fastgate runs as its own process with a generated config.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from . import analysis
from .client import HttpConn, connect, stream_request
from .procs import Managed, free_port, spawn, wait_port
from .targets import API_KEY, API_USER, HOST, ROOT

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
MODEL = "llama3.2"
MODEL_FULL = "llama3.2:latest"
ROUTING_GOAL_US = 20.0
HEALTH_POLL_S = 0.02
READ_TIMEOUT_S = 8.0  # [upstream] read_timeout for the failover runs: a request on a hung backend ends
CLIENT_TIMEOUT_S = READ_TIMEOUT_S + 7.0
FAILOVER_SLOTS = 6  # max_parallel per backend in the failover runs: 12 loops fit on the two that stay


# -- routing: the pure decision, in-process ------------------------------------------------------------------

def routing_microbench(iterations: int) -> dict[str, Any]:
    from fastgate.config import BackendConfig, RoutingConfig, UpstreamURL
    from fastgate.routing.choice import Placement, Router

    def router(n: int, max_parallel: int) -> Router:
        configs = [BackendConfig(f"gpu{i + 1}", UpstreamURL("http", HOST, 11434 + i, ""), max_parallel=max_parallel)
                   for i in range(n)]
        r = Router(configs, RoutingConfig(), rng=random.Random(1))
        for i in range(n):
            r.set_inventory(f"gpu{i + 1}", [MODEL_FULL, "qwen2.5:0.5b", "mistral:latest"], 0.0)
            r.record_probe(f"gpu{i + 1}", 0.0, ok=True)
        r.set_loaded("gpu1", [MODEL_FULL], 0.0)
        return r

    out: dict[str, Any] = {}
    for label, n, cap, in_flight in (("3 backends, loaded on one, no cap", 3, 0, 0),
                                     ("20 backends, max_parallel 4, 40 requests in flight", 20, 4, 40)):
        r = router(n, cap)
        held = []
        for k in range(in_flight):
            p = r.choose(MODEL, f"u{k % 7}", 1.0)
            assert isinstance(p, Placement), p
            held.append(p)
        choose_ns: list[int] = []
        pair_ns: list[int] = []
        clock = time.perf_counter_ns
        for k in range(iterations):
            now = 1.0 + k * 1e-4
            t0 = clock()
            p = r.choose(MODEL, "bench", now)
            t1 = clock()
            r.release(p, now)  # type: ignore[arg-type]
            t2 = clock()
            assert isinstance(p, Placement), p
            choose_ns.append(t1 - t0)
            pair_ns.append(t2 - t0)
        for p in held:
            r.release(p, 2.0)
        out[label] = {
            "choose_p50_us": analysis.percentile(choose_ns, 50) / 1000,
            "choose_p99_us": analysis.percentile(choose_ns, 99) / 1000,
            "choose_p999_us": analysis.percentile(choose_ns, 99.9) / 1000,
            "choose_release_p50_us": analysis.percentile(pair_ns, 50) / 1000,
            "choose_release_p99_us": analysis.percentile(pair_ns, 99) / 1000,
            "iterations": iterations,
        }
        out[label]["goal_met"] = out[label]["choose_p99_us"] < ROUTING_GOAL_US
    # the clock's own cost, to read the figures against
    clock = time.perf_counter_ns
    empty = []
    for _ in range(10000):
        t0 = clock()
        empty.append(clock() - t0)
    out["timer_overhead_p50_us"] = statistics.median(empty) / 1000
    return out


# -- fakes and fastgate ------------------------------------------------------------------------------------

class TimedList(list):  # type: ignore[type-arg]
    """The fake's `received`, with the arrival time of each request beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: Any) -> None:
        self.times.append(time.monotonic())
        super().append(item)


async def start_fakes(count: int, max_parallel: int = 0) -> list[Any]:
    sys.path.insert(0, ROOT)
    from tests.fake_ollama import FakeOllama

    fakes = []
    for _ in range(count):
        fake = FakeOllama(HOST, 0, max_parallel=max_parallel)
        fake.received = TimedList()
        await fake.start()
        fakes.append(fake)
    return fakes


def model_requests(fake: Any, since: float = 0.0) -> list[float]:
    """Arrival times of the model requests (not the pollers' probes) a fake received after `since`."""
    return [t for t, r in zip(fake.received.times, fake.received, strict=True)
            if r.path in ("/api/generate", "/api/chat") and t >= since]


def fastgate_backends_config(port: int, fakes: list[Any], max_parallel: int, read_timeout_s: float) -> str:
    backends = "".join(f'[[backends]]\nname = "gpu{i + 1}"\nurl = "http://{HOST}:{f.port}"\n'
                       f"max_parallel = {max_parallel}\n\n" for i, f in enumerate(fakes))
    return f"""# generated by bench/backends.py
[server]
listen = "{HOST}:{port}"

[upstream]
read_timeout = {read_timeout_s}

{backends}[auth]
session_ttl = 0

[log]
level = "INFO"

[keys]
"{API_KEY}" = "{API_USER}"
"""


class Fastgate:
    def __init__(self, run_dir: str, name: str, fakes: list[Any], *, max_parallel: int = 0,
                 read_timeout_s: float = 600.0) -> None:
        self.port = free_port()
        path = os.path.join(run_dir, f"{name}.toml")
        with open(path, "w") as f:
            f.write(fastgate_backends_config(self.port, fakes, max_parallel, read_timeout_s))
        self.proc: Managed = spawn(name, [sys.executable, "-m", "fastgate", "serve", "--config", path],
                                   log_path=os.path.join(run_dir, "logs", f"{name}.log"), cwd=ROOT)

    async def ready(self, timeout_s: float = 20.0) -> None:
        await asyncio.to_thread(wait_port, HOST, self.port, timeout_s, self.proc.proc)
        await self.wait_health(lambda bs: all(b["state"] == "up" and b["models"] for b in bs), timeout_s)

    async def health(self) -> list[dict[str, Any]]:
        reader, writer = await asyncio.open_connection(HOST, self.port)
        try:
            writer.write(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\nX-API-Key: {API_KEY}\r\n"
                         f"Connection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        body = data.partition(b"\r\n\r\n")[2]
        return json.loads(body).get("backends", [])

    async def wait_health(self, ok: Any, timeout_s: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                last = await self.health()
                if ok(last):
                    return last
            except (OSError, ValueError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(HEALTH_POLL_S)
        raise RuntimeError(f"fastgate's /health did not reach the state wanted in {timeout_s} s: {last}")

    def stop(self) -> None:
        self.proc.stop()


# -- warm-first ------------------------------------------------------------------------------------------------

async def _stream_once(port: int, req: bytes, conn: HttpConn | None) -> tuple[HttpConn | None, str]:
    """One stream on `conn` (a new one if None or broken); its outcome: ok, status NNN, visible, silent."""
    try:
        if conn is None or conn.eof:
            conn = await connect(HOST, port)
        ex = await asyncio.wait_for(conn.request(req), CLIENT_TIMEOUT_S)
    except asyncio.TimeoutError:
        if conn is not None:
            conn.abort()
        return None, "hung"
    except (ConnectionError, OSError):
        if conn is not None:
            conn.abort()
        return None, "visible"  # closed before the end of the response: a client sees the break
    parsed = analysis.parse_exchange(ex, want_times=False)
    if parsed.status != 200:
        return conn, f"status {parsed.status}"
    return conn, _classify(parsed, _tokens_of(req))


def _tokens_of(req: bytes) -> int:
    body = req.partition(b"\r\n\r\n")[2]
    return int(json.loads(body)["options"]["num_predict"])


def _classify(parsed: analysis.Parsed, tokens: int) -> str:
    check = analysis.check_stream(parsed, tokens)
    if check.ok:
        return "ok"
    if not parsed.complete or any(b'"error"' in line for line in parsed.lines):
        return "visible"  # no terminating chunk, or an error item: the client knows it broke
    return "silent"  # framed as complete yet not the whole stream


async def warm_first(run_dir: str, requests: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, concurrency in (("2 at a time (within gpu1's 4 slots)", 2), ("8 at a time (beyond its slots)", 8)):
        fakes = await start_fakes(3, max_parallel=4)
        fg = Fastgate(run_dir, "fastgate-warm", fakes, max_parallel=4)
        try:
            # Load the model on gpu1 only: one request straight to it, as an earlier user would have.
            await _stream_once(fakes[0].port, stream_request(f"{HOST}:{fakes[0].port}", None, 1, 0), None)
            await fg.ready()
            await fg.wait_health(lambda bs: any(b["name"] == "gpu1" and b["loaded"] for b in bs), 10)
            t0 = time.monotonic()
            req = stream_request(f"{HOST}:{fg.port}", API_KEY, 5, 2)
            outcomes: dict[str, int] = {}
            per_conn = requests // concurrency

            async def loop(port: int, req: bytes, count: int, outcomes: dict[str, int]) -> None:
                conn = None
                for _ in range(count):
                    conn, outcome = await _stream_once(port, req, conn)
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if conn is not None:
                    conn.close()

            await asyncio.gather(*(loop(fg.port, req, per_conn, outcomes) for _ in range(concurrency)))
            landed = [len(model_requests(f, t0)) for f in fakes]
            total = sum(landed)
            out[label] = {"requests": per_conn * concurrency, "landed": dict(zip(("gpu1", "gpu2", "gpu3"), landed)),
                          "warm_hit_rate": landed[0] / total if total else float("nan"), "outcomes": outcomes}
        finally:
            fg.stop()
            for f in fakes:
                await f.stop()
    return out


# -- failover --------------------------------------------------------------------------------------------------

@dataclass
class Traffic:
    port: int
    loops: int
    req: bytes
    running: bool = True
    results: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, outcome)

    async def run(self) -> None:
        async def loop() -> None:
            conn = None
            while self.running:
                t = time.monotonic()
                conn, outcome = await _stream_once(self.port, self.req, conn)
                self.results.append((t, time.monotonic(), outcome))
            if conn is not None:
                conn.close()

        await asyncio.gather(*(loop() for _ in range(self.loops)))


async def failover(run_dir: str, kind: str, before_s: float, after_s: float) -> dict[str, Any]:
    fakes = await start_fakes(3)
    fg = Fastgate(run_dir, f"fastgate-failover-{kind}", fakes, max_parallel=FAILOVER_SLOTS,
                  read_timeout_s=READ_TIMEOUT_S)
    victim = fakes[1]
    closer: asyncio.Task[None] | None = None
    try:
        # The model loaded on all three (else warm-first sends everything to the one that has it), and
        # slots, so that the 12 loops spread over the three.
        for f in fakes:
            await _stream_once(f.port, stream_request(f"{HOST}:{f.port}", None, 1, 0), None)
        await fg.ready()
        await fg.wait_health(lambda bs: all(b["loaded"] for b in bs), 10)
        traffic = Traffic(fg.port, 12, stream_request(f"{HOST}:{fg.port}", API_KEY, 20, 5))
        task = asyncio.ensure_future(traffic.run())
        await asyncio.sleep(before_s)
        before = [len(model_requests(f)) for f in fakes]
        t0 = time.monotonic()
        if kind == "killed":
            await victim.stop()
        elif kind == "refusing":
            # Shut down as a server does gracefully: no new connections, running answers finish, each
            # keep-alive connection closed as soon as it is idle.
            server, victim._server = victim._server, None
            server.close()

            async def close_idle() -> None:
                while True:
                    await victim.close_idle_connections()
                    await asyncio.sleep(0.001)

            closer = asyncio.ensure_future(close_idle())
        elif kind == "hanging":
            victim.faults[:] = ["stall"] * 10**6
        else:
            raise ValueError(kind)
        ejected_at = None
        deadline = t0 + after_s
        while time.monotonic() < deadline:
            try:
                states = {b["name"]: b["state"] for b in await fg.health()}
            except (OSError, ValueError, asyncio.TimeoutError):
                states = {}
            if ejected_at is None and states.get("gpu2") not in (None, "up"):
                ejected_at = time.monotonic()
            await asyncio.sleep(HEALTH_POLL_S)
        traffic.running = False
        await asyncio.wait_for(task, CLIENT_TIMEOUT_S + 5)
        after = model_requests(victim, t0)
        in_flight = [o for s, e, o in traffic.results if s < t0 <= e]
        started_after = [o for s, e, o in traffic.results if s >= t0]
        started_before = [o for s, e, o in traffic.results if e < t0]

        def count(outcomes: list[str]) -> dict[str, int]:
            c: dict[str, int] = {}
            for o in outcomes:
                c[o] = c.get(o, 0) + 1
            return c

        return {
            "fault": kind,
            "requests_before_fault": dict(zip(("gpu1", "gpu2", "gpu3"), before)),
            "ejected_after_s": (ejected_at - t0) if ejected_at else None,
            "victim_new_requests_after_fault": len(after),
            "victim_last_new_request_after_s": (max(after) - t0) if after else 0.0,
            "before_fault": count(started_before),
            "in_flight_at_fault": count(in_flight),
            "started_after_fault": count(started_after),
        }
    finally:
        if closer is not None:
            closer.cancel()
        fg.stop()
        for f in fakes:
            await f.stop()


# -- report ----------------------------------------------------------------------------------------------------

def markdown(data: dict[str, Any], *, level: int = 1) -> str:
    """The report; `level` 2 when it is a section of the main report (its headings one level down)."""
    h = "#" * level
    lines = [f"{h} fastgate several-backends benchmark (bench.backends): {data['date']}", "",
             (f"fastgate at {data['commit']}; {'quick; ' if data['quick'] else ''}took {data['duration_s']} s. "
              f"The machine was busy {data['busy_cpus']:.2f} CPUs on average over the run (fastgate included, "
              f"this process not)."), ""]
    r = data.get("routing")
    if r:
        lines += [f"{h}# Routing decision (pure Router, in-process)", "",
                  (f"Per call, {next(iter(v for v in r.values() if isinstance(v, dict)))['iterations']:,} "
                   f"calls; timer overhead p50 {r['timer_overhead_p50_us']:.2f} us (included). Goal: under "
                   f"{ROUTING_GOAL_US:g} us."), "",
                  "| setting | choose p50 | p99 | p99.9 | choose + release p50 | p99 | goal (p99 < 20 us) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for label, v in r.items():
            if not isinstance(v, dict):
                continue
            lines.append(f"| {label} | {v['choose_p50_us']:.2f} us | {v['choose_p99_us']:.2f} us | "
                         f"{v['choose_p999_us']:.2f} us | {v['choose_release_p50_us']:.2f} us | "
                         f"{v['choose_release_p99_us']:.2f} us | {'met' if v['goal_met'] else 'missed'} |")
        lines.append("")
    w = data.get("warm")
    if w:
        lines += [f"{h}# Warm-first hit rate", "",
                  ("Three fake Ollamas with the model, loaded on gpu1 only, max_parallel 4 each; 5-token "
                   "streams through fastgate. Hit rate: share of the streams that landed on gpu1 (counted by the "
                   "fakes)."), "",
                  "| traffic | requests | gpu1 / gpu2 / gpu3 | hit rate | client outcomes |",
                  "| --- | --- | --- | --- | --- |"]
        for label, v in w.items():
            landed = v["landed"]
            lines.append(f"| {label} | {v['requests']} | {landed['gpu1']} / {landed['gpu2']} / {landed['gpu3']} | "
                         f"{100 * v['warm_hit_rate']:.1f}% | {_outcomes(v['outcomes'])} |")
        lines.append("")
    f = data.get("failover")
    if f:
        lines += [f"{h}# Failover", "",
                  ("12 client loops of 20-token streams (5 ms apart) through a three-backend fastgate "
                   f"(max_parallel {FAILOVER_SLOTS} each, the model loaded on all three); gpu2 "
                   f"fails at t0. [upstream] read_timeout = {READ_TIMEOUT_S:g} s for these runs (a request "
                   "already sent to a hung backend waits that long). Ejected: first /health poll (every "
                   f"{HEALTH_POLL_S * 1000:.0f} ms) showing gpu2 not up. Outcomes: ok, an error status, "
                   "`visible` (the connection closed before the end, or an error item), `hung` (no answer "
                   f"within {CLIENT_TIMEOUT_S:g} s), `silent` (framed as complete but cut: must be 0)."), "",
                  ("| fault | requests before t0 (gpu1 / gpu2 / gpu3) | gpu2 ejected after "
                   "| gpu2 new model requests after t0 (last at) | in flight at t0 | started after t0 |"),
                  "| --- | --- | --- | --- | --- | --- |"]
        for v in f:
            ej = "never" if v["ejected_after_s"] is None else f"{v['ejected_after_s'] * 1000:,.0f} ms"
            before = " / ".join(str(x) for x in v["requests_before_fault"].values())
            if v["fault"] == "killed":
                new = "- (nothing can reach it)"
            else:
                new = (f"{v['victim_new_requests_after_fault']} "
                       f"({v['victim_last_new_request_after_s'] * 1000:,.0f} ms)")
            lines.append(f"| {v['fault']} | {before} | {ej} | {new} | "
                         f"{_outcomes(v['in_flight_at_fault'])} | {_outcomes(v['started_after_fault'])} |")
        lines.append("")
    return "\n".join(lines)


def _outcomes(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (kv[0] != "ok", kv[0]))) or "-"


async def collect(run_dir: str, parts: list[str], quick: bool) -> dict[str, Any]:
    """Run the named parts; their figures (what report.json holds). Logs and configs go to run_dir."""
    from .procs import busy_ns
    from .run import environment_commit

    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    t_start = time.monotonic()
    busy0, me0 = busy_ns(), time.process_time_ns()
    data: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "commit": environment_commit(), "quick": quick}
    if "routing" in parts:
        print("backends: routing microbenchmark", flush=True)
        data["routing"] = routing_microbench(20_000 if quick else 200_000)
    if "warm" in parts:
        print("backends: warm-first hit rate", flush=True)
        data["warm"] = await warm_first(run_dir, 100 if quick else 200)
    if "failover" in parts:
        data["failover"] = []
        for kind in ("killed", "refusing", "hanging"):
            print(f"backends: failover, {kind}", flush=True)
            data["failover"].append(await failover(run_dir, kind, 1.0 if quick else 2.0, 5.0 if quick else 8.0))
    data["duration_s"] = round(time.monotonic() - t_start, 1)
    wall = data["duration_s"] * 1e9
    data["busy_cpus"] = max(0.0, (busy_ns() - busy0 - (time.process_time_ns() - me0)) / wall) if wall else 0.0
    return data


async def main_async(args: argparse.Namespace) -> str:
    from .run import strict_json

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-backends" + ("-quick" if args.quick else "")
    run_dir = os.path.join(os.path.abspath(args.out), stamp)
    data = await collect(run_dir, parts, args.quick)
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(strict_json(data), f, indent=1, default=str)
    md = markdown(data)
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write(md)
    latest = args.latest if args.latest is not None else not args.quick
    if latest:
        with open(os.path.join(BENCH_DIR, "latest", "backends.md"), "w") as f:
            f.write(md)
    print()
    print(md)
    print(f"report: {run_dir}/report.md" + (" (also bench/latest/backends.md)" if latest else ""))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and shorter failover windows")
    ap.add_argument("--parts", default="routing,warm,failover", help="subset of routing,warm,failover")
    ap.add_argument("--out", default=os.path.join(BENCH_DIR, "results"), help="directory for results/")
    ap.add_argument("--latest", action=argparse.BooleanOptionalAction, default=None,
                    help="also write bench/latest/backends.md (default: yes, except --quick)")
    args = ap.parse_args(argv)
    try:
        import uvloop
        uvloop.run(main_async(args))
    except ImportError:
        asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
