"""Several backends answering as one (issue 9 rules 6 and 7): merged model listings and fanned-out model
management, decided from values.

Pure: no I/O, no asyncio, no clock. The I/O layer (`fastgate.fanout`) asks each backend and hands the
answers in; this module says what the client gets:

- `/api/tags`, `/api/ps`, `/v1/models` (GET, HEAD): one listing, in Ollama's shape, holding every model any
  answering backend listed, once per name (the first backend in config order that lists a name gives its
  entry), sorted by name so the order does not depend on which backend answered first, trimmed to the key's
  allow-list exactly as a single backend's listing is.
- `/api/pull`: one progress stream. Each backend's lines go on with a `"backend"` member naming it; a
  backend's `{"error": ...}` line becomes `{"status": "failed: ...", "backend": ...}` (Ollama's clients stop
  reading at the first error line, which would hide how the other backends fared); the last line is
  `{"status": "success"}` only when every backend ended with success, else one `{"error": ...}` naming the
  backends that failed and why.
- `/api/delete`: success if every backend that had the model deleted it; the model on none: Ollama's 404.
- `/api/copy`: to the backends holding the source; none holds it: Ollama's 404.

A combined failure answers the status the failed backends agree on (Ollama's own, e.g. 400 for a missing
model name), else 502.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..access import json_object
from ..gojson import UnreadableBody, go_key_matches, go_string_field, scan_object
from ..models import parse_model_name

# What one progress line may hold: Ollama's own Go client reads at most this much per line. A longer line is
# dropped rather than buffered without bound.
MAX_LINE_BYTES = 8 * 1024 * 1024
# A backend that gave no answer at all (unreachable, cut off): no status of its own.
NO_ANSWER = 0
# How much of a backend's error message is kept (Ollama's are one short sentence): it is logged, repeated in
# the combined answer and in the pull's last line, so a backend's megabyte-long "error" must not be.
MAX_MESSAGE_CHARS = 500
_COMPACT = (",", ":")


class FanOut(enum.Enum):
    """A request that goes to several backends at once, by its path."""

    TAGS = "/api/tags"
    PS = "/api/ps"
    V1_MODELS = "/v1/models"
    PULL = "/api/pull"
    DELETE = "/api/delete"
    COPY = "/api/copy"

    @property
    def listing(self) -> bool:
        return self in _LISTINGS

    @property
    def action(self) -> str:
        """The word for it in messages ("pull failed on b: ...")."""
        return self.value.rpartition("/")[2]


_LISTINGS = frozenset({FanOut.TAGS, FanOut.PS, FanOut.V1_MODELS})
_METHODS = {FanOut.PULL: b"POST", FanOut.DELETE: b"DELETE", FanOut.COPY: b"POST"}
_BY_PATH = {kind.value.encode(): kind for kind in FanOut}


def fan_out_for(normal_path: bytes, method: bytes) -> FanOut | None:
    """The fan-out a request (path as `gate.normalize_path` gives it) gets when there are several backends and
    no backend is named, or None when it goes to one backend. A wrong method goes to one backend too, which
    answers it as Ollama does (405)."""
    kind = _BY_PATH.get(normal_path)
    if kind is None:
        return None
    if kind.listing:
        return kind if method in (b"GET", b"HEAD") else None
    return kind if method == _METHODS[kind] else None


# ---------------------------------------------------------------------------------------------------------
# Listings (rule 6)

def _name_of(kind: FanOut, item: dict[str, Any]) -> object:
    if kind is FanOut.V1_MODELS:
        return item.get("id")
    return item.get("name") or item.get("model")


def listing_entries(kind: FanOut, body: bytes) -> list[dict[str, Any]] | None:
    """The entries of one backend's listing answer, or None when the body is not such a listing."""
    data = json_object(body)
    if data is None:
        return None
    items = data.get("data" if kind is FanOut.V1_MODELS else "models")
    if items is None:
        return []  # Ollama's /v1/models answers `"data": null` when it has no model
    if not isinstance(items, list):
        return None
    return [item for item in items if isinstance(item, dict)]


def merge_listings(kind: FanOut, listings: Iterable[Sequence[dict[str, Any]]],
                   allowed: Callable[[str], bool] | None = None) -> bytes:
    """One listing body from the backends' entries (in backend order): once per name, sorted by name, only
    the names `allowed` accepts (None: all). Entries without a name are left out."""
    chosen: dict[str, dict[str, Any]] = {}
    for entries in listings:
        for item in entries:
            name = _name_of(kind, item)
            if not isinstance(name, str) or not name or name in chosen:
                continue
            if allowed is not None and not allowed(name):
                continue
            chosen[name] = item
    items = [chosen[name] for name in sorted(chosen)]
    if kind is FanOut.V1_MODELS:
        # Ollama's /v1 writer ends its JSON with a newline (json.Encoder)
        return json.dumps({"object": "list", "data": items}, separators=_COMPACT).encode() + b"\n"
    return json.dumps({"models": items}, separators=_COMPACT).encode()


def listing_content_type(kind: FanOut) -> bytes:
    """As Ollama labels it: gin's c.JSON on /api, a hand-set type on /v1."""
    return b"application/json" if kind is FanOut.V1_MODELS else b"application/json; charset=utf-8"


def holds_model(entries: Iterable[dict[str, Any]], model: str) -> bool:
    """Whether an /api/tags listing has `model`, compared as Ollama resolves names (`llama3` is
    `llama3:latest`). An unparseable name is compared as written."""
    wanted = parse_model_name(model)
    key = str(wanted) if wanted is not None else model
    for item in entries:
        name = _name_of(FanOut.TAGS, item)
        if not isinstance(name, str):
            continue
        parsed = parse_model_name(name)
        if (str(parsed) if parsed is not None else name) == key:
            return True
    return False


# ---------------------------------------------------------------------------------------------------------
# Request bodies

def _members(body: bytes) -> list[Any] | None:
    try:
        return scan_object(body) if body else None
    except UnreadableBody:
        return None


def wants_stream(body: bytes) -> bool:
    """Whether a pull asks for a progress stream: Ollama's `stream` (a *bool, nil meaning true), read as Go
    reads it (keys folded, the last one wins, null sets it back to nil). A body Go cannot read streams
    nothing either way: each backend answers it with its own 400, so the default is as good as any."""
    members = _members(body)
    value = True
    for member in members or ():
        if member.name is not None and go_key_matches(member.name, "stream"):
            if member.kind == "bool":
                value = body[member.value_start:member.end] == b"true"
            elif member.kind == "null":
                value = True
    return value


def copy_source(body: bytes) -> str | None:
    """The `source` of a copy request as Ollama reads it; None when it has none or cannot be read."""
    members = _members(body)
    if members is None:
        return None
    try:
        return go_string_field(members, "source") or None
    except UnreadableBody:
        return None


# ---------------------------------------------------------------------------------------------------------
# Results and the verdict (rule 7)

@dataclass(frozen=True, slots=True)
class PartResult:
    """How one backend's part of a fan-out ended."""

    backend: str
    ok: bool
    status: int = 200  # Ollama's HTTP status for it; NO_ANSWER when there was none
    message: str = ""  # why it failed
    absent: bool = False  # a delete whose model was not there (Ollama's 404): nothing to do, not a failure


def error_message(body: bytes) -> str:
    """The `error` of an Ollama error body, else the body's text (short)."""
    try:
        data: Any = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return _short(data["error"])
    text = body[:4 * MAX_MESSAGE_CHARS].decode("utf-8", "replace").strip()
    return text[:200] if text else "no message"


def _short(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."


def answer_result(kind: FanOut, backend: str, status: int, body: bytes) -> PartResult:
    """A whole answer (delete, copy, a pull without a stream, or any answer whose head was not 200) as a
    result. Ollama answers a failed non-streamed pull with an error status, but a stream's 200 may still
    carry an `error`: both count as failures."""
    if status == 200:
        if kind is FanOut.PULL:
            try:
                data: Any = json.loads(body)
            except (ValueError, RecursionError):
                data = None
            if isinstance(data, dict) and "error" in data:
                return PartResult(backend, False, 500, error_message(body))
        return PartResult(backend, True, status)
    if status == 404 and kind is FanOut.DELETE:
        return PartResult(backend, False, status, error_message(body), absent=True)
    return PartResult(backend, False, status, error_message(body))


def no_answer(backend: str, why: str) -> PartResult:
    return PartResult(backend, False, NO_ANSWER, why)


def verdict(kind: FanOut, results: Sequence[PartResult]) -> tuple[int, str]:
    """The status and error message of a fan-out's combined answer ("" and 200 when every part succeeded).

    A delete of a model that was on no backend is Ollama's own 404, with its message."""
    if kind is FanOut.DELETE:
        present = [result for result in results if not result.absent]
        if not present and results:
            return 404, results[0].message
        results = present
    failed = [result for result in results if not result.ok]
    if not failed:
        return 200, ""
    statuses = {result.status for result in failed}
    status = statuses.pop() if len(statuses) == 1 and NO_ANSWER not in statuses else 502
    by_message: dict[str, list[str]] = {}
    for result in failed:
        by_message.setdefault(result.message or "failed", []).append(result.backend)
    message = f"{kind.action} failed on " + "; ".join(
        f"{', '.join(names)}: {why}" for why, names in by_message.items())
    succeeded = [result.backend for result in results if result.ok]
    if succeeded:
        message += f" (succeeded on {', '.join(succeeded)})"
    return status, message


def verdict_body(kind: FanOut, message: str) -> bytes:
    """The combined answer's body, `message` from `verdict`: `{"error": ...}` when something failed, else
    what Ollama answers itself: the last progress object of a pull without a stream, an empty body for delete
    and copy."""
    if message:
        return json.dumps({"error": message}, separators=_COMPACT).encode()
    return b'{"status":"success"}' if kind is FanOut.PULL else b""


# ---------------------------------------------------------------------------------------------------------
# The pull stream

class ChunkDecoder:
    """The payload of a chunked body fed in arbitrary pieces (RFC 9112 section 7.1). The relay's framing
    tracker has already checked these bytes, so this only takes them apart."""

    __slots__ = ("_buffer", "_left", "_state")

    _SIZE, _DATA, _CRLF, _TRAILER, _DONE = range(5)

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0  # data bytes left in the current chunk, or CRLF bytes left after it
        self._state = self._SIZE

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        out: list[bytes] = []
        pos, end = 0, len(buffer)
        while pos < end:
            state = self._state
            if state == self._DATA:
                take = min(self._left, end - pos)
                out.append(buffer[pos:pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state, self._left = self._CRLF, 2
            elif state == self._CRLF:
                take = min(self._left, end - pos)
                pos += take
                self._left -= take
                if not self._left:
                    self._state = self._SIZE
            elif state == self._DONE:
                break
            else:
                newline = buffer.find(b"\n", pos)
                if newline < 0:
                    self._buffer = buffer[pos:]
                    break
                line = buffer[pos:newline].strip()
                pos = newline + 1
                if state == self._SIZE:
                    size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                    if size:
                        self._state, self._left = self._DATA, size
                    else:
                        self._state = self._TRAILER
                elif not line:  # the blank line after the trailers: the end
                    self._state = self._DONE
        return b"".join(out)


class LineSplitter:
    """Complete lines out of a byte stream fed in pieces. A line longer than MAX_LINE_BYTES is dropped.

    An unfinished line is kept as its pieces and joined once, at its newline: re-joining it on every read made
    a long line sent in small pieces cost time quadratic in its length."""

    __slots__ = ("_dropping", "_pieces", "_size", "dropped")

    def __init__(self) -> None:
        self._pieces: list[bytes] = []  # the unfinished line so far
        self._size = 0
        self._dropping = False  # inside an over-long line: skip to its end
        self.dropped = 0

    def feed(self, data: bytes) -> list[bytes]:
        if b"\n" not in data:
            if not self._dropping and data:
                self._pieces.append(data)
                self._size += len(data)
                self._drop_if_too_long()
            return []
        lines = data.split(b"\n")
        last = lines.pop()
        if self._dropping:
            lines.pop(0)  # the end of the over-long line
            self._dropping = False
        elif self._pieces:
            self._pieces.append(lines[0])
            lines[0] = b"".join(self._pieces)
        self._pieces = [last] if last else []
        self._size = len(last)
        self._drop_if_too_long()
        return lines

    def _drop_if_too_long(self) -> None:
        if self._size > MAX_LINE_BYTES:
            self._pieces, self._size = [], 0
            self._dropping = True
            self.dropped += 1

    def rest(self) -> bytes:
        """What is left after the last newline (a last line without one)."""
        rest = b"".join(self._pieces)
        self._pieces, self._size = [], 0
        return b"" if self._dropping else rest


class PullTally:
    """A fanned-out pull's stream: each backend's progress lines tagged for the client, and how each ended."""

    def __init__(self, backends: Sequence[str]) -> None:
        self.backends = tuple(backends)
        self._results: dict[str, PartResult] = {}

    def line(self, backend: str, raw: bytes) -> bytes | None:
        """The line (with its newline) the client gets for one line of `backend`'s stream; None for a line
        that is not a progress object (blank, or not JSON: nothing a client could read)."""
        data = json_object(raw)
        if data is None:
            return None
        if "error" in data:
            message = data["error"] if isinstance(data["error"], str) else json.dumps(data["error"])
            return self.fail(PartResult(backend, False, 500, _short(message)))
        if data.get("status") == "success":
            self._results.setdefault(backend, PartResult(backend, True))
        data["backend"] = backend
        return json.dumps(data, separators=_COMPACT).encode() + b"\n"

    def fail(self, result: PartResult) -> bytes:
        """Record a backend's failure (the first word on it stays); the progress line that tells of it."""
        previous = self._results.get(result.backend)
        if previous is None or previous.ok:
            self._results[result.backend] = result
        return json.dumps({"status": f"failed: {result.message}", "backend": result.backend},
                          separators=_COMPACT).encode() + b"\n"

    def ended(self, backend: str, *, complete: bool, why: str = "") -> bytes | None:
        """`backend`'s stream is over. Ended without a success or error line: a failure, and its line."""
        if backend in self._results:
            return None
        message = "its progress stream ended without success" if complete else f"answer cut off ({why})"
        return self.fail(PartResult(backend, False, NO_ANSWER, message))

    def result(self, backend: str) -> PartResult | None:
        return self._results.get(backend)

    def results(self) -> list[PartResult]:
        """Every backend's result, in the order given; one not ended yet counts as failed."""
        return [self._results.get(name) or no_answer(name, "did not finish") for name in self.backends]

    def final_line(self) -> bytes:
        """`{"status":"success"}` when every backend succeeded, else an error line naming those that failed."""
        _, message = verdict(FanOut.PULL, self.results())
        body = {"error": message} if message else {"status": "success"}
        return json.dumps(body, separators=_COMPACT).encode() + b"\n"
