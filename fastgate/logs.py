"""Log formats and request ids.

Text lines look like the seed's: `2025-03-13 10:15:23 - INFO - [a1b2c3d4] Processing request: POST api/chat`.
With `[log] format = "json"` each record is one JSON object per line instead: `ts`, `level`, `msg` (the same
message the text line carries) and, for request lines, the fields the caller passed as structured data
(`extra={FIELDS: {...}}`, see `request_fields`), never re-parsed from the message.
Nothing here ever sees a full key: callers pass masked labels (`x-api-key:api-****0101`). Logging happens
per request (start, end, and for streams the moment the answer began), never per chunk.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import time

LOGGER_NAME = "fastgate"
FORMATS = ("text", "json")  # the values of `[log] format`
# The LogRecord attribute (set with `extra=`) holding a request line's fields for the JSON format.
FIELDS = "fields"
LINE_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

log = logging.getLogger(LOGGER_NAME)

_random = random.Random()


def new_request_id() -> bytes:
    """8 hex digits: short enough to grep, random enough not to collide within a day's logs."""
    return b"%08x" % _random.getrandbits(32)


# What must never reach a log line raw: anything a client sends (a masked key from a query or JSON body, a
# model name, a path) could otherwise end the line and write one of its own. C0 and C1 controls, DEL, and the
# Unicode line and paragraph separators that some log viewers break lines on.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with control characters written as `\\xNN` escapes, so it stays on one line."""
    return _UNSAFE.sub(_escape_char, text) if _UNSAFE.search(text) else text


class LineFormatter(logging.Formatter):
    """The seed's line format, with the timestamp rendered once per second instead of once per line, and
    control characters in the message escaped (one record is always one line, whatever a client sent)."""

    def __init__(self) -> None:
        super().__init__(LINE_FORMAT, DATE_FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(DATE_FORMAT, self.converter(record.created))
        return self._stamp

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        # `record.message` is set by format() just before; escaping here leaves the record itself untouched
        # for other handlers, and a traceback appended after it keeps its own lines.
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: `ts` (RFC 3339, UTC, milliseconds), `level`, `msg`, then the
    record's request fields, then `exc` (a traceback, as one JSON string) if there is one.

    ASCII-only output: every control character, and every non-ASCII one (C1 controls, U+2028/U+2029 that
    some viewers break lines on), is a `\\uXXXX` escape, so one record is always one line whatever a client
    sent; DEL, which JSON allows raw, is escaped too.

    The object is written piece by piece rather than with json.dumps of a dict: request fields are str, int
    or float (strings through json's own C escaper), and this takes about half the time of the generic
    encoder (see the README's Logs section for the figures). Field names are fastgate's own identifiers,
    written as they are."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # strftime once per second, as LineFormatter does
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        parts = [f'{{"ts":"{self._timestamp(record.created)}","level":"{record.levelname}","msg":',
                 _json_str(record.getMessage())]
        fields = record.__dict__.get(FIELDS)
        if fields:
            for name, value in fields.items():
                kind = type(value)
                if kind is str:
                    parts.append(f',"{name}":{_json_str(value)}')
                elif kind is int:
                    parts.append(f',"{name}":{value}')
                elif kind is float and -_INF < value < _INF:
                    # Floats are durations in milliseconds, passed unrounded (rounding is JSON-only work):
                    # written to the microsecond.
                    parts.append(f',"{name}":{round(value, 3)!r}')
                else:  # None, bool, anything else: the generic encoder (NaN and infinities as null)
                    parts.append(f',"{name}":{_json_other(value)}')
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(f',"exc":{_json_str(record.exc_text)}')
        if record.stack_info:
            parts.append(f',"stack":{_json_str(self.formatStack(record.stack_info))}')
        parts.append("}")
        line = "".join(parts)
        return line.replace("\x7f", "\\u007f") if "\x7f" in line else line


_json_str = json.encoder.encode_basestring_ascii  # a JSON string literal, quotes included, ASCII only
_INF = float("inf")


def _json_other(value: object) -> str:
    if isinstance(value, float):  # NaN or an infinity: not JSON
        return "null"
    return json.dumps(value, ensure_ascii=True, default=str)


def make_formatter(fmt: str) -> logging.Formatter:
    """The formatter for `[log] format`: "text" (the seed's lines) or "json"."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return LineFormatter()
    raise ValueError(f"log format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


def request_fields(request_id: str, method: str, path: str, *, user: str | None = None,
                   key: str | None = None, backend: str | None = None, **more: object) -> dict[str, object]:
    """`extra=` for a request line: its fields as the JSON format writes them. `key` is the masked label,
    `path` the request's path without its query (so never `api_key=`).

    `backend`: the Ollama that served the request, when there are several ([[backends]]); with one the
    proxy leaves it out and the field is not written."""
    fields: dict[str, object] = {"request_id": request_id, "method": method, "path": path}
    if user is not None:
        fields["user"] = user
    if key is not None:
        fields["key"] = key
    if backend is not None:
        fields["backend"] = backend
    if more:
        fields.update(more)
    return {FIELDS: fields}


def _no_caller(*args: object, **kwargs: object) -> tuple[str, int, str, None]:
    return "(unknown file)", 0, "(unknown function)", None


def setup_logging(level: str, stream: object = None, fmt: str = "text") -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(make_formatter(fmt))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    # The line format shows no source location, thread or process: skip computing them for every record
    # (walking the stack for the caller is the dearest part of a log call).
    log.findCaller = _no_caller  # type: ignore[method-assign]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def set_level(level: str) -> None:
    log.setLevel(level)


def set_format(fmt: str) -> None:
    """Switch fastgate's own handlers (those setup_logging made) to `fmt`, at startup and on reload. Handlers
    someone else attached (a test's capture, an embedding application's) keep their formatters."""
    for handler in log.handlers:
        if isinstance(handler.formatter, (LineFormatter, JsonFormatter)):
            current = "json" if isinstance(handler.formatter, JsonFormatter) else "text"
            if current != fmt:
                handler.setFormatter(make_formatter(fmt))


def log_path(target: bytes) -> str:
    """The path as the seed logged it (`api/chat`): no leading slash and never the query string,
    which may hold `api_key=`."""
    return target.partition(b"?")[0].lstrip(b"/").decode("latin-1")
