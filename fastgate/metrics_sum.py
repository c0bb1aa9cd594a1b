"""Totals across workers (`[server] workers = N`): one worker's metrics as a plain JSON-able snapshot, and the
sum of several snapshots as a `Metrics` plus the gauges `Metrics.render` takes.

Pure: no I/O, no clock. `fastgate.worker` moves the snapshots between processes (asked for at scrape time,
never per request); the supervisor folds a dead worker's last snapshot into the `retired` one so that
counters never go backwards when a worker is replaced (a drop would read as a counter reset to Prometheus,
and rate() would show the whole total again as a spike).

How each value adds up: counters and histograms are summed; the connection, in-flight and buffered-bytes
gauges are summed (each worker holds its own), and so are the usage rows pending; `fastgate_upstream_up` is 1
when any worker last reached Ollama; `fastgate_state_shared` is 0 when any worker is on local tables; per
backend, `up` when any worker sees it up, in-flight, waiting and ejections summed. A retired snapshot keeps
counters only: a dead worker holds no connections and no pending rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .metrics import BUCKETS_S, BackendGauges, Histogram, Metrics

SNAPSHOT_VERSION = 1
# Worker ids a retired snapshot remembers having absorbed (see `fold`): enough for any scrape in progress to
# see that the dead worker's own file is already counted; older ids cannot be listed by anyone any more.
MAX_ABSORBED_IDS = 1024


@dataclass
class Gauges:
    """What `Metrics.render` takes besides the counters: this process's gauges (see Proxy.metrics_gauges)."""

    in_flight: int = 0
    connections: int = 0
    buffered_bytes: int = 0
    buffer_refusals: int = 0  # a counter, but the body budget keeps it, not Metrics
    backends: list[BackendGauges] = field(default_factory=list)
    queue_depth: int | None = None

    def render_args(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, "connections": self.connections,
                "buffered_bytes": self.buffered_bytes, "buffer_refusals": self.buffer_refusals,
                "backends": self.backends, "queue_depth": self.queue_depth}


def _histogram(hist: Histogram) -> dict[str, Any]:
    return {"counts": list(hist.counts), "total": hist.total, "count": hist.count}


def snapshot(metrics: Metrics, gauges: Gauges) -> dict[str, Any]:
    """One worker's numbers as plain JSON values."""
    return {
        "v": SNAPSHOT_VERSION,
        "requests": [[*key, n] for key, n in metrics.requests.items()],
        "tokens": [[*key, n] for key, n in metrics.tokens.items()],
        "auth_failures": dict(metrics.auth_failures),
        "upstream_head": _histogram(metrics.upstream_head),
        "request_duration": _histogram(metrics.request_duration),
        "upstream_up": metrics.upstream_up,
        "usage_rows_pending": metrics.usage_rows_pending,
        "usage_rows_dropped": metrics.usage_rows_dropped,
        "state_shared": metrics.state_shared,
        "state_fallbacks": metrics.state_fallbacks,
        "backend_requests": [[*key, n] for key, n in metrics.backend_requests.items()],
        "backend_first_byte": {name: _histogram(hist) for name, hist in metrics.backend_first_byte.items()},
        "in_flight": gauges.in_flight,
        "connections": gauges.connections,
        "buffered_bytes": gauges.buffered_bytes,
        "buffer_refusals": gauges.buffer_refusals,
        "backends": [[g.name, g.up, g.in_flight, g.waiting, g.ejections] for g in gauges.backends],
        "queue_depth": gauges.queue_depth,
    }


def _add_histogram(into: Histogram, raw: Any) -> None:
    counts = raw["counts"]
    if len(counts) != len(BUCKETS_S) + 1:
        raise ValueError("histogram buckets differ")
    for i, n in enumerate(counts):
        into.counts[i] += int(n)
    into.total += float(raw["total"])
    into.count += int(raw["count"])


def merge(snapshots: Iterable[dict[str, Any]]) -> tuple[Metrics, Gauges]:
    """The sum of `snapshots` (see the module's docstring for how each value adds up). ValueError (or
    KeyError/TypeError) for a snapshot that is not one: the caller leaves that one out."""
    try:
        return _merge(snapshots)
    except (AttributeError, OverflowError, RecursionError) as exc:
        # What else a damaged snapshot raises (a list where a dict was, an Infinity count): the callers catch
        # ValueError, and one bad file must not end the supervisor or a scrape.
        raise ValueError(f"not a snapshot: {type(exc).__name__}") from None


def _merge(snapshots: Iterable[dict[str, Any]]) -> tuple[Metrics, Gauges]:
    total = Metrics()
    gauges = Gauges()
    backends: dict[str, list[int]] = {}  # name -> [up, in_flight, waiting, ejections], in first-seen order
    queue_depth: int | None = None
    for snap in snapshots:
        if not isinstance(snap, dict) or snap.get("v") != SNAPSHOT_VERSION:
            raise ValueError("not a snapshot of this version")
        for user, path, status, n in snap["requests"]:
            key = (str(user), str(path), str(status))
            total.requests[key] = total.requests.get(key, 0) + int(n)
        for user, model, kind, n in snap["tokens"]:
            key = (str(user), str(model), str(kind))
            total.tokens[key] = total.tokens.get(key, 0) + int(n)
        for reason, n in snap["auth_failures"].items():
            total.auth_failures[reason] = total.auth_failures.get(reason, 0) + int(n)
        _add_histogram(total.upstream_head, snap["upstream_head"])
        _add_histogram(total.request_duration, snap["request_duration"])
        total.upstream_up = max(total.upstream_up, int(snap["upstream_up"]))
        total.usage_rows_pending += int(snap["usage_rows_pending"])
        total.usage_rows_dropped += int(snap["usage_rows_dropped"])
        shared = int(snap["state_shared"])
        if shared >= 0:  # one worker on local tables makes the whole degraded
            total.state_shared = shared if total.state_shared < 0 else min(total.state_shared, shared)
        total.state_fallbacks += int(snap["state_fallbacks"])
        for backend, status, n in snap.get("backend_requests", ()):  # absent: written before they were kept
            pair = (str(backend), str(status))
            total.backend_requests[pair] = total.backend_requests.get(pair, 0) + int(n)
        for backend, raw in snap.get("backend_first_byte", {}).items():
            hist = total.backend_first_byte.get(str(backend))
            if hist is None:
                hist = total.backend_first_byte[str(backend)] = Histogram()
            _add_histogram(hist, raw)
        gauges.in_flight += int(snap["in_flight"])
        gauges.connections += int(snap["connections"])
        gauges.buffered_bytes += int(snap["buffered_bytes"])
        gauges.buffer_refusals += int(snap["buffer_refusals"])
        for name, up, in_flight, waiting, ejections in snap["backends"]:
            row = backends.setdefault(str(name), [0, 0, 0, 0])
            row[0] = max(row[0], int(bool(up)))
            row[1] += int(in_flight)
            row[2] += int(waiting)
            row[3] += int(ejections)
        if snap["queue_depth"] is not None:
            queue_depth = (queue_depth or 0) + int(snap["queue_depth"])
    gauges.backends = [BackendGauges(name, bool(up), in_flight, waiting, ejections)
                       for name, (up, in_flight, waiting, ejections) in backends.items()]
    gauges.queue_depth = queue_depth
    return total, gauges


def retire(snap: dict[str, Any]) -> dict[str, Any]:
    """A dead worker's last snapshot with only what outlives it: counters and histograms. Its connections,
    requests in flight and buffered bytes went with it; backends keep their ejection counts only."""
    kept = dict(snap)
    kept.update(upstream_up=-1, usage_rows_pending=0, state_shared=-1, in_flight=0, connections=0, buffered_bytes=0, queue_depth=None,
                backends=[[row[0], False, 0, 0, row[4]] for row in snap["backends"]])
    return kept


def empty_snapshot() -> dict[str, Any]:
    return snapshot(Metrics(), Gauges())


@dataclass
class Retired:
    """The counters of every worker that has died, and which workers (by id) they include."""

    snapshot: dict[str, Any] = field(default_factory=empty_snapshot)
    absorbed: list[str] = field(default_factory=list)  # the latest MAX_ABSORBED_IDS only
    exits: int = 0  # workers folded in, in all

    def to_json(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "absorbed": self.absorbed, "exits": self.exits}

    @classmethod
    def from_json(cls, raw: Any) -> Retired:
        if not isinstance(raw, dict) or not isinstance(raw.get("absorbed"), list):
            raise ValueError("not a retired snapshot")
        merge([raw["snapshot"]])  # raises when it is not a snapshot
        try:
            exits = int(raw["exits"])
        except OverflowError:
            raise ValueError("not a retired snapshot") from None
        return cls(raw["snapshot"], [str(wid) for wid in raw["absorbed"]], exits)


def fold(retired: Retired, worker_id: str, last: dict[str, Any] | None) -> Retired:
    """`retired` with worker `worker_id`'s last snapshot added (None: it never wrote one, or it could not be
    read; the id is still recorded, so that a file of it found later is not counted either)."""
    if worker_id in retired.absorbed:
        return retired
    counters = retired.snapshot
    if last is not None:
        summed, gauges = merge([retired.snapshot, retire(last)])
        counters = retire(snapshot(summed, gauges))
    return Retired(counters, [*retired.absorbed, worker_id][-MAX_ABSORBED_IDS:], retired.exits + 1)


def total(own: dict[str, Any], siblings: Sequence[tuple[str, dict[str, Any]]],
          retired: Retired) -> tuple[Metrics, Gauges, int]:
    """The scrape's answer: this worker's snapshot, each sibling's (by worker id) unless the retired
    snapshot already absorbed that worker, and the retired counters. Also returns how many workers counted
    (this one included)."""
    counted = [snap for wid, snap in siblings if wid not in retired.absorbed]
    metrics, gauges = merge([own, *counted, retired.snapshot])
    return metrics, gauges, 1 + len(counted)
