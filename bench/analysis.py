"""After a measurement window: parse what the client stored, check it, and turn it into figures.

A response is rebuilt from its reads: status line, headers, then the chunked body, keeping for every
byte the arrival time of the read that brought it. Each NDJSON line then gets the arrival time of its
last byte, and its latency is that minus the `sent_ns` the fake Ollama wrote into it.

Correctness of a generate stream (every stream in every phase, every target):
- status 200, chunked, and the body is `num_predict` token items plus one final item, in order;
- every line is the exact compact JSON serialization of what it parses to (the fake writes
  `json.dumps(obj, separators=(",", ":"))`), so a changed, dropped or added byte shows;
- when the fake sends `fake_crc32` in the final item (its lean measurement mode), the CRC-32 of all
  bytes before the final line must match: byte-for-byte equality with what the upstream wrote;
- framing: every HTTP chunk holds exactly one whole line, as the upstream wrote it. A proxy that
  merges or splits chunks (nginx re-frames whatever it read in one go) is counted, not failed.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import zlib
from dataclasses import dataclass, field

from .client import Exchange

SENT_RE = re.compile(rb'"sent_ns":(\d+)')
LEAN_TOKEN_RE = re.compile(
    rb'\{"model":"[A-Za-z0-9.:_-]+","created_at":"[0-9T:.Z-]+","response":"tok(\d+) ","done":false,'
    rb'"sent_ns":(\d+)\}\n\Z')


def _isnan(v: float) -> bool:
    """NaN marks a figure that was not measured."""
    return v != v  # noqa: PLR0124


@dataclass
class Parsed:
    status: int = 0
    chunked: bool = False
    complete: bool = False
    lines: list[bytes] = field(default_factory=list)
    line_arrival_ns: list[int] = field(default_factory=list)
    chunks: int = 0
    reframed_chunks: int = 0  # chunks that are not exactly one whole line
    error: str = ""
    body_len: int = 0


def parse_exchange(ex: Exchange, *, want_times: bool = True) -> Parsed:
    out = Parsed()
    if not ex.reads:
        out.error = "no response"
        return out
    raw = b"".join(d for _, d in ex.reads)
    ends: list[int] = []
    total = 0
    for _, d in ex.reads:
        total += len(d)
        ends.append(total)
    times = [t for t, _ in ex.reads]

    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        out.error = "incomplete response head"
        return out
    head = raw[:head_end].decode("latin-1")
    status_line, *header_lines = head.split("\r\n")
    try:
        out.status = int(status_line.split(" ", 2)[1])
    except (IndexError, ValueError):
        out.error = f"bad status line {status_line!r}"
        return out
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    out.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    pos = head_end + 4
    segments: list[tuple[int, int]] = []  # (body offset, raw offset) where each chunk payload starts
    body_parts: list[bytes] = []
    body_off = 0
    chunk_bounds: list[tuple[int, int]] = []
    if out.chunked:
        while True:
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break  # cut off inside a size line
            try:
                size = int(raw[pos:eol].split(b";", 1)[0], 16)
            except ValueError:
                out.error = f"bad chunk size line {raw[pos:eol][:40]!r}"
                return out
            start = eol + 2
            if size == 0:
                out.complete = raw[start:start + 2] == b"\r\n"
                if out.complete and len(raw) != start + 2:
                    out.error = f"{len(raw) - start - 2} bytes after the end of the response"
                break
            if start + size + 2 > len(raw):
                # partial last chunk (a cut-off stream): keep what arrived for prefix checks
                part = raw[start:]
                segments.append((body_off, start))
                body_parts.append(part)
                body_off += len(part)
                break
            if raw[start + size:start + size + 2] != b"\r\n":
                out.error = "chunk not followed by CRLF"
                return out
            segments.append((body_off, start))
            body_parts.append(raw[start:start + size])
            chunk_bounds.append((body_off, body_off + size))
            body_off += size
            pos = start + size + 2
    else:
        length = int(headers.get("content-length", "0") or 0)
        part = raw[pos:pos + length]
        segments.append((0, pos))
        body_parts.append(part)
        body_off = len(part)
        out.complete = len(raw) - pos >= length
        if len(raw) - pos > length:
            out.error = f"{len(raw) - pos - length} bytes after the end of the response"
        if length:
            chunk_bounds.append((0, length))
    body = b"".join(body_parts)
    out.body_len = len(body)
    out.chunks = len(chunk_bounds)

    # lines and their arrival times
    seg_body = [s[0] for s in segments]
    line_ends: list[int] = []
    start = 0
    while True:
        nl = body.find(b"\n", start)
        if nl < 0:
            break
        out.lines.append(body[start:nl + 1])
        line_ends.append(nl + 1)
        start = nl + 1
    if start < len(body):
        out.lines.append(body[start:])  # an unterminated last line (cut off)
    if want_times:
        arrival = out.line_arrival_ns
        for e in line_ends:
            last = e - 1
            k = bisect.bisect_right(seg_body, last) - 1
            raw_off = segments[k][1] + (last - segments[k][0])
            arrival.append(times[bisect.bisect_right(ends, raw_off)])
    # framing: one chunk per line
    line_end_set = set(line_ends)
    line_starts = {0, *line_ends}
    for s, e in chunk_bounds:
        if s not in line_starts or e not in line_end_set or body.find(b"\n", s, e) != e - 1:
            out.reframed_chunks += 1
    return out


@dataclass
class StreamCheck:
    ok: bool
    error: str = ""
    tokens: int = 0
    crc_checked: bool = False


def check_stream(p: Parsed, num_predict: int, *, complete_expected: bool = True) -> StreamCheck:
    """Is this the fake's stream for `num_predict` tokens, byte for byte? (prefix only if cut off)"""
    if p.error:
        return StreamCheck(False, p.error)
    if p.status != 200:
        return StreamCheck(False, f"status {p.status}")
    if not p.chunked:
        return StreamCheck(False, "not chunked")
    if complete_expected and not p.complete:
        return StreamCheck(False, "stream did not end")
    lines = p.lines
    full_lines = lines if (lines and lines[-1].endswith(b"\n")) else lines[:-1]
    if len(full_lines) == num_predict + 1:
        # The fast path: the fake's CRC-32 of the token items proves them byte for byte at once.
        try:
            last = json.loads(full_lines[-1])
        except ValueError:
            last = None
        if isinstance(last, dict) and "fake_crc32" in last:
            if zlib.crc32(b"".join(full_lines[:-1])) != last["fake_crc32"]:
                return StreamCheck(False, "CRC-32 of the token items differs from the upstream's")
            if json.dumps(last, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" != full_lines[-1]:
                return StreamCheck(False, f"final line is not canonical JSON: {full_lines[-1][:80]!r}")
            if last.get("done") is not True or last.get("eval_count") != num_predict:
                return StreamCheck(False, f"expected the final item, got {full_lines[-1][:80]!r}")
            if complete_expected and not p.complete:
                return StreamCheck(False, "stream did not end")
            return StreamCheck(True, tokens=num_predict, crc_checked=True)
    prev_sent = 0
    crc = 0
    crc_checked = False
    for i, line in enumerate(full_lines):
        m = LEAN_TOKEN_RE.match(line) if i < num_predict else None
        if m is not None:
            # the lean template's token item: structure and token number are all that can vary
            sent = int(m.group(2))
            if int(m.group(1)) != i or sent < prev_sent:
                return StreamCheck(False, f"line {i}: token out of order or sent_ns decreasing")
            prev_sent = sent
            crc = zlib.crc32(line, crc)
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            return StreamCheck(False, f"line {i} is not JSON: {line[:60]!r}")
        canonical = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        if canonical != line:
            return StreamCheck(False, f"line {i} differs from its canonical JSON: {line[:80]!r}")
        sent = obj.get("sent_ns")
        if not isinstance(sent, int) or sent < prev_sent:
            return StreamCheck(False, f"line {i}: missing or decreasing sent_ns")
        prev_sent = sent
        if i < num_predict:
            text = obj.get("response", obj.get("message", {}).get("content"))
            if obj.get("done") is not False or text != f"tok{i} ":
                return StreamCheck(False, f"line {i}: unexpected token item {line[:80]!r}")
            crc = zlib.crc32(line, crc)
        elif i == num_predict:
            if obj.get("done") is not True or obj.get("eval_count") != num_predict:
                return StreamCheck(False, f"line {i}: expected the final item, got {line[:80]!r}")
            if "fake_crc32" in obj:
                if obj["fake_crc32"] != crc:
                    return StreamCheck(False, "CRC-32 of the token items differs from the upstream's")
                crc_checked = True
        else:
            return StreamCheck(False, f"{len(full_lines)} lines for {num_predict} tokens")
    tokens = min(len(full_lines), num_predict)
    if complete_expected and len(full_lines) != num_predict + 1:
        return StreamCheck(False, f"{len(full_lines)} lines for {num_predict} tokens")
    return StreamCheck(True, tokens=tokens, crc_checked=crc_checked)


def token_latencies_ns(p: Parsed, num_predict: int) -> list[int]:
    """Arrival minus upstream send time for each token item (the final item excluded)."""
    out = []
    for line, t in zip(p.lines[:num_predict], p.line_arrival_ns):  # noqa: B905 (a cut-off line has no time)
        m = SENT_RE.search(line)
        if m:
            out.append(t - int(m.group(1)))
    return out


def percentile(values: list[float] | list[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an unsorted list."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return float(s[k])


def median(values: list[float]) -> float:
    vals = [v for v in values if not _isnan(v)]
    if not vals:
        return math.nan
    s = sorted(vals)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def spread(values: list[float]) -> float:
    """(max - min) / median across rounds: how much a figure moved between rounds."""
    vals = [v for v in values if not _isnan(v)]
    if len(vals) < 2:
        return math.nan
    m = median(vals)
    return (max(vals) - min(vals)) / abs(m) if m else math.nan
