"""Counters and histograms for `GET /metrics`, rendered in the Prometheus text format (version 0.0.4).

Written directly rather than with prometheus-client: fastgate updates a handful of dict entries once per
request (never per chunk), and the format is a few lines of text; the library would add a dependency and
locking for nothing. Label values are bounded: paths are collapsed to Ollama's known endpoints.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

# Distinct model label values kept; later new names are counted as "other" (a client picks what it sends).
MAX_MODEL_LABELS = 100
# Seconds. Model loads take minutes, tokens milliseconds: the buckets span both.
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

KNOWN_PATHS = frozenset({
    "/", "/health", "/auth", "/metrics", "/api/chat", "/api/generate", "/api/embed", "/api/embeddings",
    "/api/tags", "/api/ps", "/api/show", "/api/version", "/api/pull", "/api/push", "/api/create",
    "/api/copy", "/api/delete", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
    "/v1/responses", "/v1/messages",
})


def path_label(path: str) -> str:
    if path in KNOWN_PATHS:
        return path
    if path.startswith("/api/blobs/"):
        return "/api/blobs/:digest"
    if path.startswith("/v1/models/"):
        return "/v1/models/:model"
    return "other"


@dataclass(frozen=True, slots=True)
class BackendGauges:
    """One backend's gauges (issue 9). The backend label's values are the configured names: bounded."""

    name: str
    up: bool
    in_flight: int
    waiting: int  # requests in the queue this backend could take
    ejections: int


class Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_S) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self.total += seconds
        self.count += 1


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    text = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + text + "}" if text else ""


_BACKEND_FAMILIES: tuple[tuple[str, str, str, Callable[[BackendGauges], int]], ...] = (
    ("fastgate_backend_up", "gauge", "1 while the backend is healthy, 0 while ejected.",
     lambda g: int(g.up)),
    ("fastgate_backend_in_flight_requests", "gauge", "Requests with this backend now.", lambda g: g.in_flight),
    ("fastgate_backend_waiting_requests", "gauge", "Requests waiting for a slot that this backend could take.",
     lambda g: g.waiting),
    ("fastgate_backend_ejections_total", "counter", "Times the backend was ejected for failing.",
     lambda g: g.ejections),
)


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.tokens: dict[tuple[str, str, str], int] = {}
        self._models: set[str] = set()
        self.auth_failures: dict[str, int] = {}
        self.upstream_head = Histogram()
        self.request_duration = Histogram()
        self.upstream_up = -1  # unknown until the first exchange or health probe
        # Usage rows for the key store (set by fastgate.managed): waiting in memory, and lost for good because
        # the buffer was full and not even the spill file could take them (0 unless something is badly wrong).
        self.usage_rows_pending = 0
        self.usage_rows_dropped = 0
        # Several backends: answers by backend and status, and each backend's time to its response head. Keys
        # are configured backend names (bounded); recorded once per request, never per chunk.
        self.backend_requests: dict[tuple[str, str], int] = {}
        self.backend_first_byte: dict[str, Histogram] = {}
        # [state] (set by fastgate.state): 1 shared, 0 degraded (local tables); -1 without [state] (not shown).
        self.state_shared = -1
        self.state_fallbacks = 0

    def request(self, user: str, path: str, status: int) -> None:
        key = (user, path if path in KNOWN_PATHS else path_label(path), str(status))  # a call less, usually
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1

    def backend_request(self, backend: str, status: int) -> None:
        key = (backend, str(status))
        self.backend_requests[key] = self.backend_requests.get(key, 0) + 1

    def backend_head(self, backend: str, seconds: float) -> None:
        hist = self.backend_first_byte.get(backend)
        if hist is None:
            hist = self.backend_first_byte[backend] = Histogram()
        hist.observe(seconds)

    def add_tokens(self, user: str, model: str, prompt: int, completion: int) -> None:
        if model not in self._models:
            if len(self._models) >= MAX_MODEL_LABELS:
                model = "other"
            else:
                self._models.add(model)
        tokens = self.tokens  # written out: the loop over (kind, count) pairs built them on every response
        if prompt:
            key = (user, model, "prompt")
            tokens[key] = tokens.get(key, 0) + prompt
        if completion:
            key = (user, model, "completion")
            tokens[key] = tokens.get(key, 0) + completion

    def auth_failure(self, reason: str) -> None:
        self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1

    def render(self, *, in_flight: int, connections: int, buffered_bytes: int = 0, buffer_refusals: int = 0,
               backends: Sequence[BackendGauges] = (), queue_depth: int | None = None) -> bytes:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family("fastgate_requests_total", "counter", "Requests answered, by user, endpoint and status.")
        for (user, path, status), n in sorted(self.requests.items()):
            lines.append(f"fastgate_requests_total{_labels((('user', user), ('path', path), ('status', status)))} {n}")
        family("fastgate_tokens_total", "counter", "Tokens Ollama reported, by user, model and kind.")
        for (user, model, kind), n in sorted(self.tokens.items()):
            lines.append(f"fastgate_tokens_total{_labels((('user', user), ('model', model), ('kind', kind)))} {n}")
        family("fastgate_auth_failures_total", "counter", "Requests refused for their key, by reason.")
        for reason, n in sorted(self.auth_failures.items()):
            lines.append(f"fastgate_auth_failures_total{_labels((('reason', reason),))} {n}")
        family("fastgate_in_flight_requests", "gauge", "Requests currently with Ollama (streams included).")
        lines.append(f"fastgate_in_flight_requests {in_flight}")
        family("fastgate_client_connections", "gauge", "Open client connections.")
        lines.append(f"fastgate_client_connections {connections}")
        family("fastgate_buffered_body_bytes", "gauge",
               "Request-body bytes held in memory now, for key search and model checks (auth.max_buffered_bytes).")
        lines.append(f"fastgate_buffered_body_bytes {buffered_bytes}")
        family("fastgate_buffer_refusals_total", "counter", "Requests refused because the body budget was spent.")
        lines.append(f"fastgate_buffer_refusals_total {buffer_refusals}")
        family("fastgate_usage_rows_pending", "gauge", "Usage rows waiting in memory for the key store.")
        lines.append(f"fastgate_usage_rows_pending {self.usage_rows_pending}")
        family("fastgate_usage_rows_dropped_total", "counter",
               "Usage rows lost: the buffer was full and the spill file could not be written.")
        lines.append(f"fastgate_usage_rows_dropped_total {self.usage_rows_dropped}")
        if self.state_shared >= 0:
            family("fastgate_state_shared", "gauge",
                   "1 while limits, leases, IP trust and lockout are shared in Redis; 0 while local ([state]).")
            lines.append(f"fastgate_state_shared {self.state_shared}")
            family("fastgate_state_fallbacks_total", "counter",
                   "Times Redis was unreachable or slower than state.timeout and local tables took over.")
            lines.append(f"fastgate_state_fallbacks_total {self.state_fallbacks}")
        family("fastgate_upstream_up", "gauge", "1 if Ollama answered the last exchange or probe, 0 if not.")
        lines.append(f"fastgate_upstream_up {max(self.upstream_up, 0)}")
        if backends:  # several backends ([[backends]]): each one's state, as the router sees it
            for name, kind, help_text, value_of in _BACKEND_FAMILIES:
                family(name, kind, help_text)
                for gauges in backends:
                    lines.append(f"{name}{_labels((('backend', gauges.name),))} {value_of(gauges)}")
            if queue_depth is not None:
                family("fastgate_routing_queue_depth", "gauge", "Requests waiting for a free backend slot.")
                lines.append(f"fastgate_routing_queue_depth {queue_depth}")
            family("fastgate_backend_requests_total", "counter",
                   "Answers to requests a backend was chosen for, by backend and status (its own or fastgate's "
                   "502/504 when it failed).")
            for (backend, status), n in sorted(self.backend_requests.items()):
                lines.append(f"fastgate_backend_requests_total{_labels((('backend', backend), ('status', status)))} {n}")
            family("fastgate_backend_first_byte_seconds", "histogram",
                   "Time from writing a request to a backend to its response head (its first byte).")
            for backend, hist in sorted(self.backend_first_byte.items()):
                _histogram_lines(lines, "fastgate_backend_first_byte_seconds", hist, f'backend="{_escape(backend)}",')
        for name, hist, help_text in (
                ("fastgate_upstream_first_byte_seconds", self.upstream_head,
                 "Time from sending a request to Ollama to its response head (its first byte)."),
                ("fastgate_request_duration_seconds", self.request_duration,
                 "Time from sending a request to Ollama to the end of its response.")):
            family(name, "histogram", help_text)
            _histogram_lines(lines, name, hist)
        return ("\n".join(lines) + "\n").encode()


def _histogram_lines(lines: list[str], name: str, hist: Histogram, labels: str = "") -> None:
    """One histogram's series; `labels`: more label pairs, each followed by a comma (`backend="a",`)."""
    cumulative = 0
    for bound, n in zip((*BUCKETS_S, float("inf")), hist.counts):
        cumulative += n
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f'{name}_bucket{{{labels}le="{le}"}} {cumulative}')
    tail = "{" + labels.rstrip(",") + "}" if labels else ""
    lines.append(f"{name}_sum{tail} {hist.total:.6f}")
    lines.append(f"{name}_count{tail} {hist.count}")
