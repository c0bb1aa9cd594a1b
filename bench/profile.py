"""`python -m bench.profile`: one phase against one target with py-spy attached, and where the time went.

    python -m bench.profile --target fastgate --phase full_speed --seconds 8
    python -m bench.profile --target fastgate --phase small --out /tmp/prof
    python -m bench.profile --target fastgate-limited --phase full_speed

The proxy is pinned to the last CPU and the client and fake Ollama to the others, so that py-spy's
samples (taken without stopping the process) are rarely of a thread that is merely waiting for its CPU.
Writes py-spy's raw stacks, an SVG flame graph and a text summary (self and inclusive time per function,
and per line for the top functions) into --out, and prints the summary.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="fastgate", choices=("fastgate", "fastgate-limited", "seed"),
                    help="fastgate-limited: a managed key with limits, a model allow-list and usage accounting")
    ap.add_argument("--phase", default="full_speed", choices=PHASES)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "profile-" + time.strftime("%Y%m%d-%H%M%S")))
    args = ap.parse_args(argv)
    try:
        import uvloop
        uvloop.run(run(args))
    except ImportError:
        asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
