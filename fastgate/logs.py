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
from collections.abc import Mapping

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

    def format(self, record: logging.LogRecord) -> str:
        # LINE_FORMAT written out: logging.Formatter.format's generic %-style pass over the record's whole
        # __dict__ cost as much as the rest of a request line (the line is the same, see test_logs_json).
        # Control characters are escaped in the line only, so a traceback appended after it keeps its lines.
        message = record.getMessage()
        if _UNSAFE.search(message):
            message = _UNSAFE.sub(_escape_char, message)
        record.message = message
        record.asctime = stamp = self.formatTime(record)
        line = f"{stamp} - {record.levelname} - {message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}" if line[-1:] != "\n" else line + record.exc_text
        if record.stack_info:
            stack = self.formatStack(record.stack_info)
            line = f"{line}\n{stack}" if line[-1:] != "\n" else line + stack
        return line


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


# What LogRecord.__init__ sets that is the same for every fastgate record once the caller, thread and process
# are not looked up (setup_logging): copied from one real record, so the set of attributes is the running
# Python's own.
_PER_RECORD = frozenset({"name", "msg", "args", "levelname", "levelno", "created", "msecs", "relativeCreated"})
_record_template: dict[str, object] = {}
_new_record = logging.LogRecord.__new__


def _make_record(name: str, level: int, fn: str, lno: int, msg: object, args: object, exc_info: object,
                 func: str | None = None, extra: dict[str, object] | None = None, sinfo: str | None = None,
                 ) -> logging.LogRecord:
    """Logger.makeRecord for fastgate's logger: the same record, made by copying the constant attributes
    instead of recomputing them (file name and module of "(unknown file)", thread and process placeholders),
    which was a third of the cost of a request line."""
    if (exc_info or sinfo or fn != "(unknown file)" or not _record_template
            or logging.getLogRecordFactory() is not logging.LogRecord):
        return logging.Logger.makeRecord(log, name, level, fn, lno, msg, args, exc_info,  # type: ignore[arg-type]
                                         func, extra, sinfo)
    record = _new_record(logging.LogRecord)
    values = record.__dict__
    values.update(_record_template)
    if args and len(args) == 1 and isinstance(args[0], Mapping) and args[0]:  # type: ignore[arg-type]
        args = args[0]  # type: ignore[index]  # as LogRecord.__init__ does: logging.info("%(a)s", {"a": 1})
    created = time.time()
    values["name"] = name
    values["msg"] = msg
    values["args"] = args
    values["levelname"] = logging.getLevelName(level)
    values["levelno"] = level
    values["created"] = created
    values["msecs"] = int((created - int(created)) * 1000) + 0.0
    values["relativeCreated"] = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
    if extra is not None:
        for key in extra:
            if key in ("message", "asctime") or key in values:
                raise KeyError(f"Attempt to overwrite {key!r} in LogRecord")
            values[key] = extra[key]
    return record


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that flushes once per event loop iteration instead of once per line.

    Every line is written into the stream's buffer at once; on the event loop's thread the flush (a write
    system call) is left to a callback that runs right after the current batch of ready events, so a loop
    iteration that answers many requests writes their lines in one call. Elsewhere (start-up, other threads,
    no loop running) each line is flushed as it is written. `logging.shutdown` at exit flushes what is left.
    """

    def __init__(self, stream: object = None) -> None:
        super().__init__(stream)  # type: ignore[arg-type]
        self._flush_on: object = None  # the loop a flush is scheduled on (a forked worker has another one)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            # Looked up, not imported: this module stays free of asyncio (tests/test_layering.py).
            asyncio = sys.modules.get("asyncio")
            loop = asyncio._get_running_loop() if asyncio is not None else None
            if loop is None:
                self.flush()
            elif self._flush_on is not loop:
                self._flush_on = loop
                loop.call_soon(self.flush)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging.Handler's own policy: report, never raise
            self.handleError(record)

    def flush(self) -> None:
        self._flush_on = None
        super().flush()


def setup_logging(level: str, stream: object = None, fmt: str = "text") -> None:
    handler = LineHandler(stream or sys.stderr)
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
    prototype = logging.LogRecord(LOGGER_NAME, logging.INFO, "(unknown file)", 0, "", (), None,
                                  "(unknown function)")
    _record_template.clear()
    _record_template.update((k, v) for k, v in prototype.__dict__.items() if k not in _PER_RECORD)
    log.makeRecord = _make_record  # type: ignore[method-assign]


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
