"""`[server] workers = N > 1`: one supervisor process and N workers serving the same address.

Each worker is a fork of the supervisor that runs `server.run` as a single fastgate would, with its own
listening socket bound with SO_REUSEPORT: the kernel spreads new connections over the workers' sockets by a
hash of their addresses and ports. One socket bound by the supervisor and inherited by every worker would also
work, but then every worker's event loop wakes for each connection and the one that wins takes whole bursts
(epoll has no fair hand-off between processes); separate sockets keep the spread even and need no locking.
What SO_REUSEPORT costs: connections still waiting in a dead worker's accept queue are reset with it (Linux
5.14+ can move them: sysctl net.ipv4.tcp_migrate_req = 1), and any process of the same user that sets the
option can join the address; the supervisor refuses to start when something already listens there.

The supervisor holds a bound, never listening, socket on each address (the kernel hands no connection to a
socket that does not listen): a port chosen by the kernel (port 0) stays the same for every worker and every
replacement, and stays reserved while all workers are being replaced.

Signals to the supervisor: SIGHUP is passed to every worker (each re-reads the config file and applies it as
one fastgate does); SIGTERM and SIGINT are passed on as SIGTERM (each worker stops taking connections and lets
its requests finish within server.shutdown_grace), and the supervisor exits once all have ended: 0 when each
ended cleanly. A worker that dies is replaced in its slot, at once the first time, then after 0.25 s, 0.5 s,
... up to 30 s while replacements keep failing (a worker that served 30 s resets the count). Workers get
SIGTERM when the supervisor dies (PR_SET_PDEATHSIG on Linux), so no orphan keeps serving unsupervised.

The pid file holds the supervisor's pid; each log line carries the pid of the process that wrote it.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from . import metrics_sum, pidfile
from .config import Config, HostPort
from .errors import ConfigError
from .logs import log, set_format, set_level
from .server import run, warn_if_example_keys, warn_if_keys_exposed
from .store import StoreError
from .worker import (
    RETIRED_FILE,
    WorkerRole,
    after_fork,
    read_json,
    read_retired,
    snapshot_path,
    socket_path,
    tag_log_lines,
    untag_log_lines,
    write_json,
)

RESTART_DELAY_MIN_S = 0.25  # the second quick failure in a row waits this long, each further one twice that
RESTART_DELAY_MAX_S = 30.0
STABLE_AFTER_S = 30.0  # a worker that served this long before it died is replaced at once
START_TIMEOUT_S = 60.0  # to serve (store, Redis, certificate, Ollama probe); a worker slower than that is killed
STOP_EXTRA_S = 10.0  # beyond server.shutdown_grace for a worker to end (last usage flush), then SIGKILL
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
_PR_SET_PDEATHSIG = 1


class WorkersFailed(Exception):
    """The workers could not be started, or did not stop cleanly; worded for the operator."""


def restart_delay(failures: int) -> float:
    """Seconds before replacing a worker after `failures` failures in a row (1: the first)."""
    if failures <= 1:
        return 0.0
    return min(RESTART_DELAY_MAX_S, RESTART_DELAY_MIN_S * 2 ** (failures - 2))


def describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Slot:
    """One of the N places a worker fills; a replacement takes the dead worker's slot."""

    index: int
    pid: int = 0  # 0: no worker in it now
    worker_id: str = ""
    started_at: float = 0.0  # time.monotonic() of the fork
    ready_at: float | None = None  # when it said it serves
    ready_line: str = ""  # the start line it would have logged alone (the supervisor logs the first one's)
    report_fd: int = -1  # read end of its start-report pipe, until that is closed
    report: bytearray = field(default_factory=bytearray)
    error: str = ""  # what it reported instead of serving
    error_kind: str = ""
    failures: int = 0  # in a row
    restart_at: float | None = None
    reload_pending: bool = False  # a SIGHUP came before it served: sent once it does
    stop_sent: bool = False


def _hold(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Bound, not listening, SO_REUSEPORT sockets on each address of host:port, and the port. OSError (the
    same as one fastgate gets) when something listens there already."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    held: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            if port == 0 and held:  # every address on the port the kernel chose for the first
                address = (address[0], held[0].getsockname()[1], *address[2:])
            if address[1] != 0:
                # A plain bind fails while anything listens on the address; with SO_REUSEPORT it would join it.
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    probe.bind(address)
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as the workers' listeners are
            sock.bind(address)
    except OSError:
        for sock in held:
            sock.close()
        raise
    return held, held[0].getsockname()[1]


def pin_ports(config: Config, listen: HostPort, metrics_listen: HostPort | None) -> Config:
    """`config` with the ports the supervisor holds where it says port 0 (a worker's reload then sees no change
    of server.listen, and a replacement binds the same port as its siblings)."""
    if config.server.listen.port == 0 and config.server.listen.host == listen.host:
        config = replace(config, server=replace(config.server, listen=listen))
    held = config.metrics.listen
    if metrics_listen is not None and held is not None and held.port == 0 and held.host == metrics_listen.host:
        config = replace(config, metrics=replace(config.metrics, listen=metrics_listen))
    return config


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies, even by SIGKILL (a graceful drain, then exit)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _ignore_signal(signum: int, frame: object) -> None:
    """The signal's number reaches the supervisor's loop through the wake-up socket; nothing to do here."""


class Supervisor:
    def __init__(self, config: Config, reread: Callable[[], Config]) -> None:
        self.config = config  # what each worker starts with (replacements too: SIGHUP once they serve)
        self.reread = reread
        self.latest = config  # the last config the supervisor itself read (log level, shutdown grace)
        self.count = config.server.workers
        self.pid = os.getpid()
        self.slots = [Slot(index) for index in range(1, self.count + 1)]
        self.spawned = 0
        self.reloaded = False  # a SIGHUP came since startup: replacements re-read the file once they serve
        self.serving = False  # every worker served once: from now on failures are retried, not fatal
        self.stopping = False
        self.stop_deadline = 0.0
        self.unclean: list[str] = []
        self.held: list[socket.socket] = []
        self.run_dir = ""
        self.selector: selectors.BaseSelector | None = None
        self.wake_r: socket.socket | None = None
        self.wake_w: socket.socket | None = None
        self.old_handlers: dict[int, object] = {}
        self.old_wakeup_fd = -1
        self.pinned: tuple[HostPort, HostPort | None] = (config.server.listen, None)

    # -- the supervisor's own life --------------------------------------------------------------------

    def run(self) -> None:
        """Start the workers, supervise them until SIGTERM/SIGINT, and return once they all ended."""
        tag_log_lines(self.pid)
        set_format(self.config.log.format)
        warn_if_keys_exposed(self.config)
        warn_if_example_keys(self.config)
        pid_path = self.config.server.pid_file
        if pid_path:
            stale = pidfile.claim(pid_path)
            if stale:
                log.warning("%s", stale)
        pid_written = False
        try:
            self._hold_addresses()
            self.run_dir = tempfile.mkdtemp(prefix="fastgate-workers-")  # 0700: only this user reaches it
            self._catch_signals()
            for slot in self.slots:
                self._spawn(slot)
            start_line = self._wait_until_serving()
            if start_line is not None:  # None: stopped by a signal before every worker served
                if pid_path:
                    pidfile.write(pid_path)
                    pid_written = True
                pids = ", ".join(str(slot.pid) for slot in self.slots)
                log.log(max(logging.INFO, log.getEffectiveLevel()), "%s; %d workers (pids %s)", start_line,
                        self.count, pids)
                log.info("Workers share their metrics through %s", self.run_dir)
                self.serving = True
            self._loop()
        finally:
            self._stop_all_now()
            self._release_signals()
            for sock in self.held:
                sock.close()
            if self.run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            if pid_written:
                pidfile.remove(pid_path)
            untag_log_lines()
        if self.unclean:
            raise WorkersFailed("; ".join(self.unclean))

    def _hold_addresses(self) -> None:
        listen = self.config.server.listen
        held, port = _hold(listen.host, listen.port)
        self.held += held
        pinned_listen = HostPort(listen.host, port)
        pinned_metrics = None
        metrics = self.config.metrics
        if metrics.enabled and metrics.listen is not None:
            try:
                held, port = _hold(metrics.listen.host, metrics.listen.port)
            except OSError as exc:
                raise WorkersFailed(f"cannot listen on {metrics.listen} (metrics.listen): "
                                    f"{exc.strerror or exc}") from None
            self.held += held
            pinned_metrics = HostPort(metrics.listen.host, port)
        self.pinned = (pinned_listen, pinned_metrics)
        self.config = pin_ports(self.config, *self.pinned)

    def _catch_signals(self) -> None:
        """Signals arrive as bytes on a socket the loop selects on (set_wakeup_fd), so none is lost between a
        check and a wait; the Python-level handlers do nothing."""
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.old_wakeup_fd = signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in _SIGNALS:
            self.old_handlers[sig] = signal.signal(sig, _ignore_signal)

    def _release_signals(self) -> None:
        for sig, handler in self.old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        if self.wake_w is not None:
            signal.set_wakeup_fd(self.old_wakeup_fd)
        for sock in (self.wake_r, self.wake_w):
            if sock is not None:
                sock.close()
        if self.selector is not None:
            self.selector.close()

    # -- workers ----------------------------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        self.spawned += 1
        worker_id = f"{slot.index}.{self.spawned}"
        read_fd, write_fd = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the child would write the parent's buffered output a second time
        # Blocked across the fork: the child must not run the supervisor's handlers before it has its own.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(read_fd)
                code = self._worker(slot.index, worker_id, write_fd, mask)
            except BaseException:  # never return into the supervisor's code in the child
                log.exception("Worker %d failed", slot.index)
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:
                        pass
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        assert self.selector is not None
        self.selector.register(read_fd, selectors.EVENT_READ, slot)
        slot.pid, slot.worker_id, slot.report_fd = pid, worker_id, read_fd
        slot.started_at, slot.ready_at, slot.restart_at = time.monotonic(), None, None
        slot.report, slot.error, slot.error_kind, slot.stop_sent = bytearray(), "", "", False
        slot.reload_pending = self.reloaded

    def _worker(self, index: int, worker_id: str, report_fd: int, mask: set[int | signal.Signals]) -> int:
        """In the forked child: let go of the supervisor's descriptors and signals, then serve."""
        signal.set_wakeup_fd(-1)
        # Until the worker's loop handles them: stopping before serving needs no drain, and a reload before
        # serving is pointless (the supervisor sends it again once it serves).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for other in self.slots:
            if other.report_fd >= 0:
                os.close(other.report_fd)
        if self.selector is not None:
            self.selector.close()
        for sock in (self.wake_r, self.wake_w, *self.held):
            if sock is not None:
                sock.close()
        _die_with_parent()
        if os.getppid() != self.pid:
            return 1  # the supervisor died before the death signal was armed
        after_fork()
        tag_log_lines(os.getpid())
        role = WorkerRole(index, self.count, worker_id, self.pid, self.run_dir, report_fd)
        pinned = self.pinned

        def reread() -> Config:
            return pin_ports(self.reread(), *pinned)

        try:
            run(self.config, reread=reread, worker=role)
        except ConfigError as exc:
            role.report({"error": str(exc), "kind": "config"})
            return 2
        except OSError as exc:
            role.report({"error": f"cannot listen on {self.config.server.listen}: {exc.strerror or exc}",
                         "kind": "listen"})
            return 1
        except StoreError as exc:  # the key store's database is down: worded for the operator already
            role.report({"error": str(exc), "kind": "store"})
            return 1
        except Exception as exc:
            log.exception("Worker %d failed", index)
            role.report({"error": f"worker {index} failed: {exc!r}", "kind": "other"})
            return 1
        return 0

    def _read_report(self, slot: Slot) -> None:
        try:
            data = os.read(slot.report_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        slot.report += data
        while b"\n" in slot.report:
            line, _, rest = bytes(slot.report).partition(b"\n")
            slot.report = bytearray(rest)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "ready" in message:
                slot.ready_at = time.monotonic()
                slot.ready_line = str(message["ready"])
                if slot.reload_pending:
                    slot.reload_pending = False
                    self._signal(slot, signal.SIGHUP)
            elif "error" in message:
                slot.error, slot.error_kind = str(message["error"]), str(message.get("kind", ""))
        if not data:
            self._close_report(slot)

    def _close_report(self, slot: Slot) -> None:
        if slot.report_fd >= 0:
            assert self.selector is not None
            self.selector.unregister(slot.report_fd)
            os.close(slot.report_fd)
            slot.report_fd = -1

    def _signal(self, slot: Slot, sig: int) -> None:
        if slot.pid:
            try:
                os.kill(slot.pid, sig)
            except ProcessLookupError:
                pass  # it died a moment ago: reaped on the next SIGCHLD

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is not None:
                self._exited(slot, status)

    def _exited(self, slot: Slot, status: int) -> None:
        if slot.report_fd >= 0:
            self._read_report(slot)  # what it said before it went
            self._close_report(slot)
        pid, how, now = slot.pid, describe_exit(status), time.monotonic()
        slot.pid = 0
        if self.stopping:
            code = os.waitstatus_to_exitcode(status)
            # Before it served, SIGTERM ends a worker at once (nothing to drain): that is a clean stop too.
            if code != 0 and not (slot.ready_at is None and code == -signal.SIGTERM):
                self.unclean.append(f"worker {slot.index} (pid {pid}) {how} while stopping")
            log.info("Worker %d (pid %d) %s", slot.index, pid, how)
            return
        self._retire(slot)
        if not self.serving:
            return  # _wait_until_serving reports it
        served = slot.ready_at is not None
        if served and now - slot.started_at >= STABLE_AFTER_S:
            slot.failures = 0
        slot.failures += 1
        delay = restart_delay(slot.failures)
        slot.restart_at = now + delay
        what = f"could not start: {slot.error}" if slot.error else how
        if served:
            log.error("Worker %d (pid %d) %s after serving %.1f s; a new one starts %s", slot.index, pid, what,
                      now - slot.started_at, f"in {delay:g} s" if delay else "now")
        else:
            log.error("Worker %d (pid %d) %s before serving; a new one starts %s", slot.index, pid, what,
                      f"in {delay:g} s" if delay else "now")

    def _retire(self, slot: Slot) -> None:
        """Fold the dead worker's last metrics snapshot into retired.json, then remove its files: its counts
        stay in the totals (see fastgate.worker for why this order never counts it twice)."""
        if not self.run_dir:
            return
        last = read_json(snapshot_path(self.run_dir, slot.worker_id))
        retired = read_retired(self.run_dir)
        try:
            metrics_sum.merge([last]) if last is not None else None
        except (ValueError, KeyError, TypeError):
            last = None
        retired = metrics_sum.fold(retired, slot.worker_id, last)
        try:
            write_json(os.path.join(self.run_dir, RETIRED_FILE), retired.to_json())
        except OSError as exc:
            log.warning("Cannot keep the metrics of worker %d: %s", slot.index, exc)
            return
        for path in (snapshot_path(self.run_dir, slot.worker_id), socket_path(self.run_dir, slot.worker_id)):
            try:
                os.remove(path)
            except OSError:
                pass

    # -- the loop ---------------------------------------------------------------------------------------

    def _wait(self, timeout: float | None) -> list[int]:
        """Wait for a signal, a worker's report or the timeout; returns the signals that came."""
        assert self.selector is not None and self.wake_r is not None
        signals: list[int] = []
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.wake_r:
                try:
                    signals += self.wake_r.recv(4096)
                except BlockingIOError:
                    pass
            else:
                self._read_report(key.data)
        return signals

    def _handle(self, signals: list[int]) -> None:
        for sig in dict.fromkeys(signals):  # each kind once per turn, in order of arrival
            if sig in (signal.SIGTERM, signal.SIGINT):
                self._begin_stop(sig)
            elif sig == signal.SIGHUP and not self.stopping:
                self._reload()
        if signal.SIGCHLD in signals or self.stopping:
            self._reap()

    def _wait_until_serving(self) -> str | None:
        """Until every worker serves: its start line (the first worker's), or None when stopped meanwhile.
        WorkersFailed (or the ConfigError a worker met) when one cannot start: the others are stopped."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self._handle(self._wait(max(deadline - time.monotonic(), 0.0)))
            if self.stopping:
                return None
            failed = next((slot for slot in self.slots if slot.pid == 0), None)
            if failed is not None:
                if failed.error_kind == "config":
                    raise ConfigError(failed.error)
                raise WorkersFailed(failed.error or f"worker {failed.index} stopped before serving")
            if all(slot.ready_at is not None for slot in self.slots):
                return self.slots[0].ready_line
            if time.monotonic() >= deadline:
                late = [str(slot.index) for slot in self.slots if slot.ready_at is None]
                raise WorkersFailed(f"worker(s) {', '.join(late)} did not start serving within "
                                    f"{START_TIMEOUT_S:g} s")

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            if self.stopping:
                if all(slot.pid == 0 for slot in self.slots):
                    return
                if now >= self.stop_deadline:
                    for slot in self.slots:
                        if slot.pid:
                            self.unclean.append(f"worker {slot.index} (pid {slot.pid}) did not end within "
                                                f"server.shutdown_grace + {STOP_EXTRA_S:g} s: killed")
                            self._signal(slot, signal.SIGKILL)
                    self.stop_deadline = float("inf")
            else:
                for slot in self.slots:
                    if slot.pid == 0 and slot.restart_at is not None and slot.restart_at <= now:
                        self._spawn(slot)
                        log.info("Worker %d started (pid %d)", slot.index, slot.pid)
                    elif slot.pid and slot.ready_at is None and now - slot.started_at >= START_TIMEOUT_S:
                        log.error("Worker %d (pid %d) did not start serving within %g s: killing it", slot.index,
                                  slot.pid, START_TIMEOUT_S)
                        self._signal(slot, signal.SIGKILL)
                        slot.started_at = float("inf")  # killed once; its exit is handled when reaped
            self._handle(self._wait(self._next_timeout(time.monotonic())))

    def _next_timeout(self, now: float) -> float | None:
        times = [slot.restart_at for slot in self.slots if slot.pid == 0 and slot.restart_at is not None]
        times += [slot.started_at + START_TIMEOUT_S for slot in self.slots if slot.pid and slot.ready_at is None]
        if self.stopping and self.stop_deadline != float("inf"):
            times.append(self.stop_deadline)
        return max(min(times) - now, 0.0) if times else None

    def _begin_stop(self, sig: int) -> None:
        if not self.stopping:
            self.stopping = True
            grace = self.latest.server.shutdown_grace
            self.stop_deadline = time.monotonic() + grace + STOP_EXTRA_S
            log.info("%s: stopping %d workers (each lets its requests finish, up to %g s)",
                     signal.Signals(sig).name, sum(1 for slot in self.slots if slot.pid), grace)
        for slot in self.slots:
            slot.restart_at = None
            if slot.pid:
                slot.stop_sent = True
                self._signal(slot, signal.SIGTERM)

    def _reload(self) -> None:
        """SIGHUP: every worker re-reads the config (and says how that went); the supervisor reads it too for
        its own log settings and the warnings, said once here rather than by each worker."""
        self.reloaded = True
        try:
            config = self.reread()
        except ConfigError:
            config = None  # each worker says why, keeping its running config
        if config is not None:
            warn_if_keys_exposed(config)
            warn_if_example_keys(config)
            set_level(config.log.level)
            set_format(config.log.format)
            if config.server.workers != self.count:
                log.warning("Reload: server.workers changed; that takes a restart, %d workers keep running",
                            self.count)
            self.latest = config
        for slot in self.slots:
            if slot.pid and slot.ready_at is not None:
                self._signal(slot, signal.SIGHUP)
            elif slot.pid:
                slot.reload_pending = True

    def _stop_all_now(self) -> None:
        """On the way out after an error: no worker outlives the supervisor (SIGTERM, then SIGKILL)."""
        live = [slot for slot in self.slots if slot.pid]
        if not live:
            return
        for slot in live:
            self._signal(slot, signal.SIGTERM)
        deadline = time.monotonic() + self.latest.server.shutdown_grace + STOP_EXTRA_S
        for slot in live:
            while slot.pid:
                try:
                    pid, _ = os.waitpid(slot.pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid:
                    break
                if time.monotonic() >= deadline:
                    os.kill(slot.pid, signal.SIGKILL)
                    os.waitpid(slot.pid, 0)
                    break
                time.sleep(0.05)
            slot.pid = 0
            self._close_report(slot)


def supervise(config: Config, reread: Callable[[], Config]) -> None:
    """`fastgate serve` with server.workers > 1. Returns after a clean stop; raises WorkersFailed (or the
    ConfigError, PidFileError or OSError a single fastgate would) when the workers cannot start or did not
    end cleanly."""
    if not hasattr(os, "fork") or not hasattr(socket, "SO_REUSEPORT"):  # pragma: no cover - Windows
        raise WorkersFailed("server.workers: more than 1 needs fork() and SO_REUSEPORT (Linux; other systems "
                            "do not spread connections over the workers): set workers = 1")
    Supervisor(config, reread).run()
