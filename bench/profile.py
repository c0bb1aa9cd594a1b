"""`python -m bench.profile`: one phase against one target with py-spy attached, and where the time went.

    python -m bench.profile --target fastgate --phase full_speed --seconds 8
    python -m bench.profile --target fastgate --phase small --out /tmp/prof
    python -m bench.profile --target fastgate-limited --phase full_speed

The proxy is pinned to the last CPU and the client and fake Ollama to the others, so that py-spy's
samples (taken without stopping the process) are rarely of a thread that is merely waiting for its CPU.
Writes py-spy's raw stacks, an SVG flame graph and a text summary (self and inclusive time per function,
and per line for the top functions) into --out, and prints the summary.

    python -m bench.profile --count small --connections 1
    python -m bench.profile --count paced --streams 8
    python -m bench.profile --count ttfb --managed redis

counts instead: fastgate runs under `valgrind --tool=callgrind` twice, once for a short and once for a long
fixed workload (the same warm-up before both), and the difference in instructions executed, divided by the
difference in requests (or tokens), is what one more request (or token) costs. Instruction counts do not
depend on what else the machine is doing, so two commits (or variants) can be compared on a busy machine;
they leave out the kernel (syscalls, wake-ups), which the timed harness measures. `--managed limited` serves
a managed key with limits from a key store (as the fastgate-limited target), `--managed redis` the same with
[state] in a redis-server of its own (fastgate-redis): their difference is what admission through Redis costs
fastgate (Redis's own work is not counted). `--target floor` counts bench/floor.py instead (the design card's
bare minimum; small, ttfb and paced), to put fastgate's count beside the design's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import subprocess
import sys
import time

from .phases import Params, Phases
from .procs import Spinners, set_affinity
from .targets import start_target, start_upstream

PHASES = ("paced", "full_speed", "small", "ttfb")


def summarize(raw_path: str, top: int = 30) -> str:
    """Self and inclusive share per function (and self per line) from py-spy's raw (collapsed) output."""
    by_func_self: collections.Counter[str] = collections.Counter()
    by_func_incl: collections.Counter[str] = collections.Counter()
    by_line_self: collections.Counter[str] = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            funcs = [re.sub(r":\d+\)$", ")", fr) for fr in frames]
            by_line_self[frames[-1]] += n
            by_func_self[funcs[-1]] += n
            for fn in set(funcs):
                by_func_incl[fn] += n
    if not total:
        return "no samples (was the target busy?)\n"
    out = [f"{total} samples", "", "self time by function:"]
    out += [f"  {100 * c / total:5.1f}%  {fn}" for fn, c in by_func_self.most_common(top)]
    out += ["", "self time by line:"]
    out += [f"  {100 * c / total:5.1f}%  {fn}" for fn, c in by_line_self.most_common(top)]
    out += ["", "inclusive time by function:"]
    out += [f"  {100 * c / total:5.1f}%  {fn}" for fn, c in by_func_incl.most_common(top + 10)]
    return "\n".join(out) + "\n"


async def run(args: argparse.Namespace) -> None:
    if not shutil.which("py-spy"):
        raise SystemExit("py-spy is not installed: bash bench/setup.sh")
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    ncpu = os.cpu_count() or 1
    proxy_cpus = {ncpu - 1} if ncpu > 1 else None
    other = (set(range(ncpu)) - proxy_cpus) if proxy_cpus else None
    set_affinity(other)
    params = Params.full()
    params.full_window_s = params.small_window_s = args.seconds
    params.paced_tokens = int(args.seconds * 1000 / params.paced_gap_ms)
    params.ttfb_requests = int(args.seconds * 500)
    upstream, port = start_upstream(args.out, other, True)
    target = start_target(args.target, args.out, port, proxy_cpus, args.log_level)
    try:
        if target.process is None:
            raise SystemExit("direct has no proxy process to profile")
        runner = Phases(params, upstream, port)
        await runner.auth(target)
        raw = os.path.join(args.out, f"{args.target}-{args.phase}.raw.txt")
        svg = os.path.join(args.out, f"{args.target}-{args.phase}.svg")
        spy_seconds = max(1, int(args.seconds) - 1)
        pid = str(target.process.refresh()[-1])  # nginx: the worker
        spy = [subprocess.Popen(["py-spy", "record", "-p", pid, "-d", str(spy_seconds), "-r", str(args.rate),
                                 "--nonblocking", "-f", fmt, "-o", path],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for fmt, path in (("raw", raw), ("flamegraph", svg))]
        spin = Spinners(sorted(range(ncpu))) if args.phase in ("paced", "ttfb") else None
        if spin:
            spin.__enter__()
            runner.spinner_pids = spin.pids
        t = time.monotonic()
        try:
            result = await getattr(runner, args.phase)(target)
        finally:
            if spin:
                spin.__exit__()
        for p in spy:
            p.wait()
        print(f"{args.phase} against {args.target} ({time.monotonic() - t:.1f} s): "
              + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in result.items() if not isinstance(v, list)))
        text = summarize(raw)
        with open(os.path.join(args.out, f"{args.target}-{args.phase}.summary.txt"), "w") as f:
            f.write(text)
        print(text)
        print(f"flame graph: {svg}")
    finally:
        target.stop()
        upstream.stop()


# -- instruction counts (callgrind) -------------------------------------------------------------------------

COUNT_WORKLOADS = ("small", "ttfb", "paced", "refused")
COUNT_WARMUP = 20  # requests before every measured workload, so lazily built things cost both runs alike


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One request and its whole response; the status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        await reader.readuntil(b"\r\n0\r\n\r\n")
    else:
        match = re.search(rb"content-length: *([0-9]+)", lower)
        if match and int(match.group(1)):
            await reader.readexactly(int(match.group(1)))
    return int(head[9:12])


async def _count_client(port: int, workload: str, n: int, connections: int, gap_ms: float, key: str) -> None:
    """The fixed workload, from this process (not counted): warm-up, then `n` requests (or `n` tokens per
    stream), with `key`. Raises if any answer is not the expected one."""
    from .client import get_request, stream_request
    from .targets import HOST

    async def conn() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(HOST, port, limit=64 * 1024 * 1024)

    small = get_request(f"{HOST}:{port}", key)
    refused = get_request(f"{HOST}:{port}", "wrong-key")
    one_token = stream_request(f"{HOST}:{port}", key, 1, 0, lean=True)
    reader, writer = await conn()
    for _ in range(COUNT_WARMUP):
        assert await _exchange(reader, writer, small) == 200
        assert await _exchange(reader, writer, one_token) == 200
    writer.close()

    async def loop(request: bytes, count: int, status: int) -> None:
        reader, writer = await conn()
        for _ in range(count):
            got = await _exchange(reader, writer, request)
            if got != status:
                raise RuntimeError(f"status {got}, expected {status}")
        writer.close()

    if workload == "small":
        await asyncio.gather(*(loop(small, n // connections, 200) for _ in range(connections)))
    elif workload == "refused":
        await asyncio.gather(*(loop(refused, n // connections, 401) for _ in range(connections)))
    elif workload == "ttfb":
        await asyncio.gather(*(loop(one_token, n // connections, 200) for _ in range(connections)))
    else:  # paced: `connections` streams of n tokens each, `gap_ms` apart
        stream = stream_request(f"{HOST}:{port}", key, n, gap_ms, lean=True)
        await asyncio.gather(*(loop(stream, 1, 200) for _ in range(connections)))


def _callgrind_total(path: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def count_run(args: argparse.Namespace, upstream_port: int, n: int, redis_url: str = "") -> int:
    """Instructions fastgate executed for start-up, warm-up, `n` units of the workload and shutdown."""
    from .procs import free_port, spawn, wait_port
    from .targets import API_KEY, HOST, ROOT, create_managed_key, fastgate_config

    port = free_port()
    managed = f"-{args.managed}" if args.managed else ""
    stem = f"{args.count}-{_counted(args)}{managed}-{n}".replace("+", "-")
    config = os.path.join(args.out, f"{stem}.toml")
    key, store_path = API_KEY, ""
    if args.managed:
        store_path = os.path.join(args.out, f"{stem}-keys.db")
        key = create_managed_key(store_path)
    if redis_url:
        import redis

        redis.Redis.from_url(redis_url).flushdb()  # every run starts from the same empty state
    with open(config, "w") as f:
        text = fastgate_config(port, upstream_port, args.log_level, store_path, state_url=redis_url)
        if redis_url:
            # Under callgrind every step is tens of times slower: at the default 50 ms the requests would
            # time out on Redis and be admitted locally (degraded), which is not what is counted.
            text = text.replace("[state]\n", "[state]\ntimeout = 10\n", 1)
        if args.count == "refused":  # every wrong key a 401, never the guessing limit's 429
            text = text.replace("[auth]\n", "[auth]\nmax_failures = 0\n", 1)
        if args.no_request_start:
            text = text.replace("[log]\n", "[log]\nrequest_start = false\n", 1)
        f.write(text)
    fastgate = ["-m", "fastgate", "serve", "--config", config]
    if args.variant:
        fastgate = ["-m", "bench.variants", args.variant, "serve", "--config", config]
    if args.target == "floor":  # bench/floor.py (the config written above is not read)
        fastgate = ["-m", "bench.floor", "--port", str(port), "--upstream-port", str(upstream_port)]
    out = os.path.join(args.out, f"{stem}.callgrind")
    tool = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    if args.cprofile:
        tool, out = [], os.path.join(args.out, f"{stem}.pstats")
        fastgate = ["-m", "cProfile", "-o", out] + fastgate
    # A fixed hash seed: with randomised string hashing, dict probes (and so the counts) vary from run to run.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = spawn(stem, tool + [sys.executable] + fastgate, log_path=os.path.join(args.out, "logs", f"{stem}.log"),
                 cwd=ROOT, env=env)
    try:
        wait_port(HOST, port, 300, proc.proc)
        run_loop(_count_client(port, args.count, n, args.connections, args.gap_ms, key))
    finally:
        code = proc.stop(timeout=300)
    if code != 0:
        raise RuntimeError(f"fastgate exited with {code}; see {args.out}/logs/{stem}.log")
    if redis_url:
        with open(os.path.join(args.out, "logs", f"{stem}.log"), errors="replace") as f:
            if "unreachable" in f.read():  # degraded at some point: not every request was admitted by Redis
                raise RuntimeError(f"fastgate lost its Redis during the run; see {args.out}/logs/{stem}.log")
    if args.cprofile:
        import pstats
        stats = pstats.Stats(out)
        stats.sort_stats("tottime").print_stats(40)
        return 0
    return _callgrind_total(out)


def count(args: argparse.Namespace) -> None:
    from .targets import start_upstream

    if not args.cprofile and not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    lo, hi = (int(x) for x in args.n.split(","))
    upstream, port = start_upstream(args.out, None, True)
    redis = None
    try:
        redis_url = ""
        if args.managed == "redis":
            from .targets import Redis

            redis = Redis(args.out, None)
            redis_url = redis.url
        if args.cprofile:
            count_run(args, port, hi, redis_url)
            return
        totals = {n: count_run(args, port, n, redis_url) for n in (lo, hi)}
    finally:
        upstream.stop()
        if redis is not None:
            redis.process.stop()
    units = (hi - lo) * (args.connections if args.count == "paced" else 1)
    unit = "token" if args.count == "paced" else "request"
    per = (totals[hi] - totals[lo]) / units
    line = (f"{args.count} {_counted(args)}{' ' + args.managed if args.managed else ''} "
            f"connections={args.connections} log={args.log_level}"
            f"{' request_start=false' if args.no_request_start else ''}: "
            f"{per:,.0f} instructions per {unit} (runs of {lo} and {hi}: {totals[lo]:,} and {totals[hi]:,})")
    print(line)
    with open(os.path.join(args.out, "counts.txt"), "a") as f:
        f.write(line + "\n")


def _counted(args: argparse.Namespace) -> str:
    return "floor" if args.target == "floor" else args.variant or "fastgate"


def run_loop(coro: object) -> None:
    try:
        import uvloop
        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="fastgate", choices=("fastgate", "fastgate-limited", "seed", "floor"),
                    help="fastgate-limited: a managed key with limits, a model allow-list and usage accounting; "
                         "floor: bench/floor.py, the design card's bare minimum (--count: its instructions, "
                         "to put beside fastgate's)")
    ap.add_argument("--phase", default="full_speed", choices=PHASES)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--count", choices=COUNT_WORKLOADS,
                    help="instead of py-spy: callgrind instruction counts per request (or per token) of a workload")
    ap.add_argument("--n", default="",
                    help="--count: the two workload sizes, requests (per token: tokens per stream) (default "
                         "300,1300; paced 100,600)")
    ap.add_argument("--connections", type=int, default=1, help="--count: client connections (paced: streams)")
    ap.add_argument("--gap-ms", type=float, default=20.0, help="--count paced: time between tokens")
    ap.add_argument("--variant", default="", help="--count: a bench.variants variant of fastgate")
    ap.add_argument("--no-request-start", action="store_true",
                    help="--count: [log] request_start = false (no \"Processing request\" line)")
    ap.add_argument("--managed", choices=("limited", "redis"), default="",
                    help="--count: a managed key with limits from a key store (limited), and with [state] in a "
                         "redis-server of its own (redis)")
    ap.add_argument("--cprofile", action="store_true",
                    help="--count: run the longer workload under cProfile instead and print its profile")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "profile-" + time.strftime("%Y%m%d-%H%M%S")))
    args = ap.parse_args(argv)
    if args.count:
        if args.target == "floor" and (args.count == "refused" or args.variant or args.managed
                                       or args.no_request_start):
            raise SystemExit("--target floor: small, ttfb or paced only, without fastgate's options "
                             "(it refuses no key)")
        args.n = args.n or ("100,600" if args.count == "paced" else "300,1300")
        count(args)
        return 0
    run_loop(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
