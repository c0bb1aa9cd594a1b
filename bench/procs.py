"""Processes the harness starts, and what /proc says about them.

CPU time comes from `/proc/<pid>/task/<tid>/schedstat` (nanoseconds on CPU, summed over every thread of
every process in the target's tree), not from `/proc/<pid>/stat`, whose 10 ms ticks are too coarse for
windows of a few seconds. Memory is VmRSS from `/proc/<pid>/status`, summed the same way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until something accepts on host:port (the targets print nothing we could wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    pids = [pid]
    i = 0
    while i < len(pids):
        pids += children(pids[i])
        i += 1
    return pids


def cpu_ns(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split(None, 1)[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


@dataclass
class SystemTimes:
    """Aggregate /proc/stat counters (USER_HZ ticks)."""

    busy: int
    idle: int
    steal: int

    @classmethod
    def now(cls) -> SystemTimes:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return cls(user + nice + system + irq + softirq, idle + iowait, steal)

    def since(self, earlier: SystemTimes) -> dict[str, float]:
        busy = self.busy - earlier.busy
        idle = self.idle - earlier.idle
        steal = self.steal - earlier.steal
        total = max(busy + idle + steal, 1)
        return {"busy_pct": 100.0 * busy / total, "steal_pct": 100.0 * steal / total}


def busy_ns() -> int:
    """CPU time spent by everything on the machine (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = (fields + [0] * 7)[:7]
    return (user + nice + system + irq + softirq) * (1_000_000_000 // os.sysconf("SC_CLK_TCK"))


def set_affinity(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


@dataclass
class Managed:
    """A process the harness started; stopped by its PID, never by name."""

    name: str
    proc: subprocess.Popen[bytes]
    pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def refresh(self) -> list[int]:
        self.pids = tree(self.proc.pid)
        return self.pids

    def cpu_ns(self) -> int:
        return cpu_ns(self.pids or self.refresh())

    def rss_kib(self) -> int:
        return rss_kib(self.pids or self.refresh())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in reversed(tree(self.proc.pid)):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.wait(5)
        return self.proc.returncode


def spawn(name: str, argv: list[str], *, log_path: str, cpus: set[int] | None = None,
          env: dict[str, str] | None = None, cwd: str | None = None, stdout_pipe: bool = False) -> Managed:
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if stdout_pipe else log, stderr=log,
            env=env, cwd=cwd, preexec_fn=(lambda: set_affinity(cpus)) if cpus else None)
    finally:
        log.close()
    return Managed(name, proc)


SPIN_CODE = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
while True:
    pass
"""


class Spinners:
    """One SCHED_IDLE busy loop per CPU: idle cores on this VM halt and wake slowly, which would dominate
    per-token latency; a lowest-priority spinner keeps them awake and yields to any real work at once."""

    def __init__(self, cpus: Sequence[int]) -> None:
        self.cpus = list(cpus)
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Spinners:
        for cpu in self.cpus:
            self.procs.append(subprocess.Popen([sys.executable, "-c", SPIN_CODE, str(cpu)],
                                               stdin=subprocess.DEVNULL))
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs.clear()


def calibrate_ms(iterations: int = 300_000) -> float:
    """Wall time of a fixed pure-Python loop: how fast a CPU looks to us right now (noise indicator)."""
    t = time.perf_counter()
    x = 0
    for i in range(iterations):
        x += i
    return (time.perf_counter() - t) * 1000
