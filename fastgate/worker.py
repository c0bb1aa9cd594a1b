"""The worker side of `[server] workers = N`: who this process is, how it tells the supervisor it serves, how
its log lines name it, and how one scrape of `/metrics` sums every worker's numbers.

Metrics cost nothing per request: each worker counts in its own `Metrics` as a single process does. At scrape
time the worker that got the request asks each sibling for its snapshot over a unix socket in the run
directory (the supervisor's private 0700 directory) and sums them (`metrics_sum`). Each worker also writes its
snapshot to a file there once a second and when it stops; the file stands in for a sibling too busy to answer
within PEER_TIMEOUT_S, and the supervisor folds a dead worker's last file into `retired.json` so that totals
never go backwards (what a killed worker counted in its last second is lost, as with SIGKILL of one process).

Run directory entries: `w-<id>.sock` and `w-<id>.json` per worker (ids are the supervisor's, never reused
within a run, unlike pids), `retired.json`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import logs, metrics_sum
from .logs import FIELDS, JsonFormatter, log
from .metrics import Metrics

SNAPSHOT_INTERVAL_S = 1.0  # how often a worker writes its snapshot file (when it changed)
PEER_TIMEOUT_S = 1.0  # a scrape waits this long for its siblings' answers, then takes their files
MAX_SNAPSHOT_BYTES = 16 * 1024 * 1024
RETIRED_FILE = "retired.json"
SOCKET_SUFFIX = ".sock"
SNAPSHOT_SUFFIX = ".json"
WORKER_PREFIX = "w-"


def socket_path(run_dir: str, worker_id: str) -> str:
    return os.path.join(run_dir, f"{WORKER_PREFIX}{worker_id}{SOCKET_SUFFIX}")


def snapshot_path(run_dir: str, worker_id: str) -> str:
    return os.path.join(run_dir, f"{WORKER_PREFIX}{worker_id}{SNAPSHOT_SUFFIX}")


def write_json(path: str, value: Any) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, separators=(",", ":"))
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    """The file's JSON value; None when it is missing or not (yet, or no longer) readable JSON."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SNAPSHOT_BYTES + 1)
        if len(data) > MAX_SNAPSHOT_BYTES:
            return None
        return json.loads(data)
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep (a damaged file)
        return None


def read_retired(run_dir: str) -> metrics_sum.Retired:
    raw = read_json(os.path.join(run_dir, RETIRED_FILE))
    if raw is None:
        return metrics_sum.Retired()
    try:
        return metrics_sum.Retired.from_json(raw)
    except (ValueError, KeyError, TypeError):
        return metrics_sum.Retired()


@dataclass(frozen=True)
class WorkerRole:
    """This process is worker `index` of `count` under the supervisor `parent_pid`."""

    index: int  # 1..count: the slot it fills (a replacement fills the dead worker's slot)
    count: int
    worker_id: str  # unique within the supervisor's run
    parent_pid: int
    run_dir: str
    report_fd: int  # write end of the pipe the supervisor reads this worker's start (or failure) from

    def report(self, message: dict[str, str]) -> None:
        """Tell the supervisor how the start went (once: the pipe is closed after it)."""
        try:
            os.write(self.report_fd, json.dumps(message).encode() + b"\n")
        except OSError:
            pass  # the supervisor is gone; the parent-death signal ends this worker
        try:
            os.close(self.report_fd)
        except OSError:
            pass


class WorkerTag(logging.Filter):
    """Names the worker on each of fastgate's log lines: a `pid` field in the JSON format, a `[pid N] ` prefix
    to the message in the text format (its three ` - `-separated fields stay as the seed's). Only workers
    install it: one process writes exactly the lines it always did."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        self.prefix = f"[pid {pid}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if any(isinstance(handler.formatter, JsonFormatter) for handler in log.handlers):
            fields = record.__dict__.get(FIELDS)
            record.__dict__[FIELDS] = {"pid": self.pid, **fields} if fields else {"pid": self.pid}
        elif isinstance(record.msg, str) and not record.msg.startswith(self.prefix):
            record.msg = self.prefix + record.msg
        return True


def after_fork() -> None:
    """First thing in a new worker: request ids from a sequence of its own. The generator, forked with the
    supervisor's state, would give every worker the same ids in the same order."""
    logs._random.seed()


def tag_log_lines(pid: int) -> None:
    untag_log_lines()  # a worker forked from the supervisor: its own pid, never two tags
    log.addFilter(WorkerTag(pid))


def untag_log_lines() -> None:
    for existing in [f for f in log.filters if isinstance(f, WorkerTag)]:
        log.removeFilter(existing)


class MetricsPeers:
    """This worker's part in summing `/metrics` across workers: answers its siblings, writes its snapshot
    file, and asks the siblings when it is the one scraped."""

    def __init__(self, role: WorkerRole, metrics: Metrics, gauges: Callable[[], dict[str, Any]]) -> None:
        self.role = role
        self.metrics = metrics
        self.gauges = gauges  # Proxy.metrics_gauges: the keyword arguments Metrics.render takes
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.Task[None] | None = None
        self._last_written = b""
        self._write_failed = False  # said once until a write works again (it is tried every second)

    def snapshot(self) -> dict[str, Any]:
        return metrics_sum.snapshot(self.metrics, metrics_sum.Gauges(**self.gauges()))

    async def start(self) -> None:
        path = socket_path(self.role.run_dir, self.role.worker_id)
        self._server = await asyncio.start_unix_server(self._answer, path)
        self.write_snapshot()
        self._writer = asyncio.get_running_loop().create_task(self._write_periodically())

    async def stop(self) -> None:
        """After the drain: the final numbers to the file (the supervisor folds them in once this exits)."""
        if self._writer is not None:
            self._writer.cancel()
        if self._server is not None:
            self._server.close()
        try:
            os.remove(socket_path(self.role.run_dir, self.role.worker_id))
        except OSError:
            pass
        if os.getppid() == self.role.parent_pid:
            self.write_snapshot()
            return
        # The supervisor died (this worker is stopping on its parent-death signal): nobody will fold or read
        # these files, and nobody else removes the directory. The last orphan out removes it.
        run_dir = self.role.run_dir
        try:
            os.remove(snapshot_path(run_dir, self.role.worker_id))
            if not any(name.startswith(WORKER_PREFIX) for name in os.listdir(run_dir)):
                shutil.rmtree(run_dir, ignore_errors=True)
        except OSError:
            pass

    def write_snapshot(self) -> None:
        data = json.dumps(self.snapshot(), separators=(",", ":")).encode()
        if data == self._last_written:
            return
        path = snapshot_path(self.role.run_dir, self.role.worker_id)
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            if not self._write_failed:
                self._write_failed = True
                log.warning("Cannot write the metrics snapshot %s (the other workers' /metrics totals miss this "
                            "worker's numbers when it is too busy to answer them, or after it dies): %s", path, exc)
            return
        self._write_failed = False
        self._last_written = data

    async def _write_periodically(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            self.write_snapshot()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(self.snapshot(), separators=(",", ":")).encode())
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _ask(self, worker_id: str) -> tuple[str, dict[str, Any] | None]:
        try:
            reader, writer = await asyncio.open_unix_connection(socket_path(self.role.run_dir, worker_id))
        except OSError:
            return worker_id, None
        try:
            # At most what a snapshot file may hold: whatever answers on a sibling's socket, this scrape's
            # memory stays bounded (its time is bounded by PEER_TIMEOUT_S).
            data = bytearray()
            while chunk := await reader.read(65536):
                data += chunk
                if len(data) > MAX_SNAPSHOT_BYTES:
                    return worker_id, None
            return worker_id, json.loads(data)
        except (OSError, ValueError, RecursionError):
            return worker_id, None
        finally:
            writer.close()

    def _siblings(self) -> set[str]:
        ids = set()
        for name in os.listdir(self.role.run_dir):
            for suffix in (SOCKET_SUFFIX, SNAPSHOT_SUFFIX):
                if name.startswith(WORKER_PREFIX) and name.endswith(suffix):
                    ids.add(name[len(WORKER_PREFIX):-len(suffix)])
        ids.discard(self.role.worker_id)
        return ids

    async def render(self) -> bytes:
        """The /metrics answer: every worker's numbers summed. Siblings are listed and asked before the
        retired file is read: a worker that dies meanwhile is then either still listed (and skipped, as
        absorbed) or already in that file, never counted twice or not at all."""
        own = self.snapshot()
        try:
            siblings = self._siblings()
        except OSError:
            siblings = set()
        tasks = [asyncio.ensure_future(self._ask(worker_id)) for worker_id in sorted(siblings)]
        answers: dict[str, dict[str, Any] | None] = {worker_id: None for worker_id in siblings}
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=PEER_TIMEOUT_S)
            for task in pending:
                task.cancel()
            for task in done:
                worker_id, snap = task.result()
                answers[worker_id] = snap
        live = {worker_id for worker_id, snap in answers.items() if snap is not None}
        for worker_id, snap in answers.items():
            if snap is None:  # too busy to answer, stopping, or dead and not folded in yet: its last file
                answers[worker_id] = read_json(snapshot_path(self.role.run_dir, worker_id))
        retired = read_retired(self.role.run_dir)
        usable = []
        for worker_id, snap in answers.items():
            if snap is None or worker_id in retired.absorbed:
                continue
            try:
                metrics_sum.merge([snap])
            except (ValueError, KeyError, TypeError):
                continue
            usable.append((worker_id, snap))
        metrics, gauges, counted = metrics_sum.total(own, usable, retired)
        live_counted = 1 + sum(1 for worker_id, _ in usable if worker_id in live)
        body = metrics.render(**gauges.render_args()).decode()
        lines = [
            ("# HELP fastgate_workers Workers whose numbers this answer sums: answered now, or from the file "
             "each writes every second (too busy to answer in time, or just ended)."),
            "# TYPE fastgate_workers gauge",
            f'fastgate_workers{{source="live"}} {live_counted}',
            f'fastgate_workers{{source="file"}} {counted - live_counted}',
            ("# HELP fastgate_worker_exits_total Workers that ended while fastgate ran (each one replaced); "
             "their counts stay in the totals."),
            "# TYPE fastgate_worker_exits_total counter",
            f"fastgate_worker_exits_total {retired.exits}",
        ]
        return (body + "\n".join(lines) + "\n").encode()
