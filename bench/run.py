"""`python -m bench`: start the fake Ollama and the targets, run the phases interleaved over rounds, report.

Round r runs every phase for every target in the order A B C D (r even) or D C B A (r odd), so that a
slow minute of a shared machine lands on all targets alike. Proxies are started fresh each round (so the
memory figures start from a process that has only been warmed up) and stopped by PID after it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import time
import traceback
from typing import Any

from . import report
from .phases import Params, Phases
from .procs import Spinners, SystemTimes, calibrate_ms, set_affinity
from .targets import (
    ALL_TARGETS,
    KNOWN_TARGETS,
    ROOT,
    TARGET_ORDER,
    RunResources,
    Target,
    start_target,
    start_upstream,
)

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
LIVE_LEVELS = (100, 200, 400)  # concurrent paced streams in the live phases (live100, live200, live400)
LIVE_PHASES = tuple(f"live{n}" for n in LIVE_LEVELS)
PHASES = ("auth", "mem_idle", "mem_active", "paced", "ttfb") + LIVE_PHASES + ("small", "full_speed")
# The latency phases (per-token latency, time to first byte, live streams) run with SCHED_IDLE spinners on
# every CPU.
SPIN_PHASES = ("paced", "ttfb") + LIVE_PHASES
# Phases that get a freshly started proxy (warmed up by the auth checks again first).
FRESH_PHASES = ("mem_active",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run (2 rounds, short windows; < 3 min)")
    ap.add_argument("--pin", action="store_true",
                    help="pin each proxy to the last CPU and the client + fake Ollama to the others")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS),
                    help=f"comma-separated subset of {','.join(KNOWN_TARGETS)}, or all "
                         f"(default {','.join(ALL_TARGETS)}; "
                         "direct is always added); fastgate:VARIANT[+VARIANT] adds fastgate patched by "
                         "bench/variants.py; fastgate-limited serves a managed key with limits and usage "
                         "accounting from a key store")
    ap.add_argument("--rounds", type=int, help="rounds (default 7, --quick 2); goals are judged from 7 up")
    ap.add_argument("--live-rounds", type=int,
                    help="run the live-stream phases in the first N rounds only (default: every round)")
    ap.add_argument("--out", default=os.path.join(BENCH_DIR, "results"),
                    help="directory for results/<timestamp>/ (default bench/results)")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma-separated subset of {','.join(PHASES)} (live: all three live phases)")
    ap.add_argument("--with-backends", action="store_true",
                    help="after the rounds, also run bench.backends (routing, warm-first, failover) and add its "
                         "figures to the report")
    ap.add_argument("--no-spin", action="store_true", help="no SCHED_IDLE spinners during the latency phases (paced, ttfb)")
    ap.add_argument("--log-level", default="INFO", help="fastgate's [log] level (default INFO, its default)")
    ap.add_argument("--no-lean", action="store_true",
                    help="use the fake Ollama's ordinary (slow) stream path")
    ap.add_argument("--latest", action=argparse.BooleanOptionalAction, default=None,
                    help="also copy report.md, chart.png and report.json to bench/latest/ (default: yes, except --quick)")
    return ap.parse_args(argv)


def environment(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "n/a"

    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for mod in ("fastgate", "h11", "uvloop", "fastapi", "starlette", "uvicorn", "httpx"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except ImportError:
            versions[mod] = "not installed"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "cpuidle_driver": _read("/sys/devices/system/cpu/cpuidle/current_driver"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": version(["nginx", "-v"]),
        "versions": versions,
        "fastgate_commit": environment_commit(),
        "quick": args.quick,
        "pin": args.pin,
        "spinners": not args.no_spin,
        "fastgate_log": f"{args.log_level} to a file (logs/fastgate.log in the run directory)",
        "params": params.__dict__,
    }


def environment_commit() -> str:
    """fastgate's commit, marked when fastgate/ has changes not committed."""
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "fastgate"],
                                    capture_output=True, text=True, timeout=10, check=False).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "n/a"
    return commit + (" (fastgate/ modified)" if dirty else "")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "n/a"


async def run(args: argparse.Namespace) -> str:
    params = Params.quick() if args.quick else Params.full()
    if args.rounds:
        params.rounds = args.rounds
    if args.no_lean:
        params.lean = False
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    if "all" in names:  # every target, the extra ones included
        names = [n for n in names if n != "all"] + [n for n in KNOWN_TARGETS if n not in names]
    if args.live_rounds is not None:
        params.live_rounds = args.live_rounds
    for n in names:
        if n not in KNOWN_TARGETS and n.partition(":")[0] not in KNOWN_TARGETS[1:]:
            raise SystemExit(f"unknown target {n!r} (known: {', '.join(KNOWN_TARGETS)}, fastgate:VARIANT)")
    # direct first (every "added" figure is relative to it), then the named targets, then variants
    names = ["direct"] + [n for n in TARGET_ORDER[1:] if n in names] + [n for n in names if ":" in n]
    phases = []
    for ph in (p.strip() for p in args.phases.split(",")):
        for one in (LIVE_PHASES if ph == "live" else (ph,) if ph else ()):
            if one not in PHASES:
                raise SystemExit(f"unknown phase {one!r} (known: {', '.join(PHASES)}, live)")
            if one not in phases:
                phases.append(one)
    ncpu = os.cpu_count() or 1
    all_cpus = set(range(ncpu))
    proxy_cpus = {ncpu - 1} if args.pin and ncpu > 1 else None
    other_cpus = (all_cpus - proxy_cpus) if proxy_cpus else None
    set_affinity(other_cpus)

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    run_dir = os.path.join(os.path.abspath(args.out), stamp)
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    env = environment(args, params)
    env["phases"] = phases
    print(f"bench: {', '.join(names)}; {params.rounds} rounds; results in {run_dir}", flush=True)

    upstream, upstream_port = start_upstream(run_dir, other_cpus, params.lean)
    resources = RunResources(run_dir, other_cpus, params.lean)
    # The client keeps every read of a window: a full collection over that heap mid-window would show up
    # as latency. Nothing here makes reference cycles worth collecting during a window; collect in between.
    gc.disable()
    rounds: list[dict[str, Any]] = []
    sys_start = SystemTimes.now()
    t_start = time.monotonic()
    try:
        runner = Phases(params, upstream, upstream_port)
        for r in range(params.rounds):
            order = names if r % 2 == 0 else list(reversed(names))
            cal = calibrate_ms()
            round_sys = SystemTimes.now()
            results: dict[str, dict[str, Any]] = {n: {} for n in names}
            targets: dict[str, Target] = {}
            try:
                for n in order:
                    _start(n, targets, results, r, params.rounds, run_dir, upstream_port, proxy_cpus,
                           args.log_level, resources)
                for i, phase in enumerate(phases):
                    if phase in LIVE_PHASES and params.live_rounds and r >= params.live_rounds:
                        continue
                    if phase in FRESH_PHASES and i > 0:
                        for n in reversed(order):
                            if n in targets:
                                targets.pop(n).stop()
                        for n in order:
                            _start(n, targets, results, r, params.rounds, run_dir, upstream_port, proxy_cpus,
                                   args.log_level, resources)
                        for n in order:
                            if n in targets:
                                results[n]["auth_restart"] = await runner.auth(targets[n])
                    # A target that did not start (its feature not there yet) is left out, not the run.
                    order_here = [n for n in order if n in targets]
                    if phase.startswith("mem_"):
                        order_here = [n for n in order_here if targets[n].is_proxy]
                    gc.collect()
                    spin = phase in SPIN_PHASES and not args.no_spin
                    with Spinners(sorted(all_cpus)) if spin else _Null() as spinners:
                        runner.spinner_pids = spinners.pids if spinners else []
                        for n in order_here:
                            t = time.monotonic()
                            try:
                                if phase in LIVE_PHASES:
                                    results[n][phase] = await runner.live(targets[n], int(phase[4:]))
                                else:
                                    results[n][phase] = await getattr(runner, phase)(targets[n])
                            except Exception as exc:  # noqa: BLE001 - one broken target must not lose the run
                                traceback.print_exc()
                                results[n][phase] = {"error": f"{type(exc).__name__}: {exc}"}
                            line = report.one_line(phase, results[n][phase])
                            print(f"  round {r + 1}/{params.rounds} {phase:<10} {n:<18} {line}  "
                                  f"({time.monotonic() - t:.1f} s)", flush=True)
            finally:
                for n in reversed(order):
                    if n in targets:
                        targets[n].stop()
                for n in order:
                    if n in targets and targets[n].store_path is not None:
                        # What the round's last process wrote to its key store (flushed on SIGTERM).
                        try:
                            results[n]["accounting"] = targets[n].accounting()
                        except Exception as exc:  # noqa: BLE001 - a report line, not a lost run
                            results[n]["accounting"] = {"error": f"{type(exc).__name__}: {exc}"}
                        print(f"  round {r + 1}/{params.rounds} {'accounting':<10} {n:<8} "
                              f"{report.one_line('accounting', results[n]['accounting'])}", flush=True)
            rounds.append({"order": order, "calibration_ms": cal,
                           "system": SystemTimes.now().since(round_sys), "results": results})
    finally:
        resources.stop()
        upstream.stop()
    env["duration_s"] = round(time.monotonic() - t_start, 1)
    env["system"] = SystemTimes.now().since(sys_start)
    data = report.build(env, names, rounds)
    if args.with_backends:
        from . import backends

        gc.enable()
        try:
            data["backends"] = await backends.collect(os.path.join(run_dir, "backends"),
                                                      ["routing", "warm", "failover"], args.quick)
        except Exception as exc:  # noqa: BLE001 - the rounds' figures must still be written
            traceback.print_exc()
            data["backends"] = {"error": f"{type(exc).__name__}: {exc}"}
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(strict_json(data), f, indent=1, default=_json_default)
    md = report.markdown(data)
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write(md)
    try:
        chart_ok = report.chart(data, rounds, os.path.join(run_dir, "chart.png"))
    except Exception:  # noqa: BLE001 - the figures are written already; a chart is not worth the run
        traceback.print_exc()
        chart_ok = False
    latest = args.latest if args.latest is not None else not args.quick
    if latest:
        dest = os.path.join(BENCH_DIR, "latest")
        os.makedirs(dest, exist_ok=True)
        shutil.copy(os.path.join(run_dir, "report.md"), os.path.join(dest, "report.md"))
        # The figures, goals (every round's comparison), noise and correctness, without each round's raw
        # phase results (those stay in the run directory).
        with open(os.path.join(dest, "report.json"), "w") as f:
            json.dump(strict_json({k: v for k, v in data.items() if k != "rounds"}), f, indent=1,
                      default=_json_default)
        if chart_ok:
            shutil.copy(os.path.join(run_dir, "chart.png"), os.path.join(dest, "chart.png"))
    print()
    print(md)
    print(f"report: {run_dir}/report.md" + (" (also bench/latest/)" if latest else ""))
    return run_dir


def _start(name: str, targets: dict[str, Target], results: dict[str, dict[str, Any]], r: int, rounds: int,
           run_dir: str, upstream_port: int, proxy_cpus: set[int] | None, log_level: str,
           resources: RunResources) -> None:
    try:
        targets[name] = start_target(name, run_dir, upstream_port, proxy_cpus, log_level, resources)
    except Exception as exc:  # noqa: BLE001 - reported in the round's results and the report
        msg = f"{type(exc).__name__}: {exc}"
        results[name]["start"] = {"error": msg}
        print(f"  round {r + 1}/{rounds} {'start':<10} {name:<18} ERROR {msg[:300]}", flush=True)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def strict_json(o: Any) -> Any:
    """`o` with NaN and infinities (figures not measured) as null: report.json stays valid JSON for any
    reader, not only Python's."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [strict_json(v) for v in o]
    return o


def _json_default(o: object) -> object:
    if isinstance(o, set):
        return sorted(o)
    return str(o)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
        uvloop.run(run(args))
    except ImportError:
        asyncio.run(run(args))
    return 0
