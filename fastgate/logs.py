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
import os
import random
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

LOGGER_NAME = "fastgate"
FORMATS = ("text", "json")  # the values of `[log] format`
# The LogRecord attribute (set with `extra=`) holding a request line's fields for the JSON format.
FIELDS = "fields"
LINE_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

log = logging.getLogger(LOGGER_NAME)

_random = random.Random()
_IDS_PER_DRAW = 256
# Drawn ahead and split in C: formatting one id at a time cost 2k instructions per request, this 0.7k.
_ids: list[bytes] = []
# A forked worker must not hand out the ids its parent drew (worker.after_fork reseeds the generator).
os.register_at_fork(after_in_child=_ids.clear)


def new_request_id() -> bytes:
    """8 hex digits: short enough to grep, random enough not to collide within a day's logs."""
    if not _ids:
        _ids[:] = _random.randbytes(4 * _IDS_PER_DRAW).hex(" ", 4).encode().split()
    return _ids.pop()


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

    def line(self, created: float, levelname: str, message: str) -> str:
        """LINE_FORMAT written out (logging.Formatter's generic %-style pass over a record's whole __dict__
        cost as much as the rest of a request line). Control characters are escaped in the message only, so
        a traceback appended after it keeps its lines."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(DATE_FORMAT, self.converter(created))
        # Every character _UNSAFE matches is unprintable: the C-level isprintable() clears nearly every line
        # without a regex scan.
        if not message.isprintable() and _UNSAFE.search(message):
            message = _UNSAFE.sub(_escape_char, message)
        return f"{self._stamp} - {levelname} - {message}"

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        line = self.line(record.created, record.levelname, record.message)
        record.asctime = self._stamp
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
        parts = self._parts(record.created, record.levelname, record.getMessage(), record.__dict__.get(FIELDS))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(f',"exc":{_json_str(record.exc_text)}')
        if record.stack_info:
            parts.append(f',"stack":{_json_str(self.formatStack(record.stack_info))}')
        return _closed(parts)

    def line(self, created: float, levelname: str, message: str, fields: dict[str, Any] | None) -> str:
        """The record's line from its parts (no traceback), as format() writes it."""
        return _closed(self._parts(created, levelname, message, fields))

    def _parts(self, created: float, levelname: str, message: str, fields: dict[str, Any] | None) -> list[str]:
        parts = [f'{{"ts":"{self._timestamp(created)}","level":"{levelname}","msg":', _json_str(message)]
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
        return parts


def _closed(parts: list[str]) -> str:
    """The object's text from its parts, closed; DEL, which JSON allows raw, escaped."""
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


def _make_record(name: str, level: int, fn: str, lno: int, msg: object, args: Any, exc_info: Any,
                 func: str | None = None, extra: Mapping[str, object] | None = None, sinfo: str | None = None,
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
    if args and len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
        args = args[0]  # as LogRecord.__init__ does: logging.info("%(a)s", {"a": 1})
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
            self._write(self.format(record))
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging.Handler's own policy: report, never raise
            self.handleError(record)

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        # Looked up, not imported: this module stays free of asyncio (tests/test_layering.py).
        asyncio = sys.modules.get("asyncio")
        loop = asyncio._get_running_loop() if asyncio is not None else None
        if loop is None:
            self.flush()
        elif self._flush_on is not loop:
            self._flush_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_on = None
        # StreamHandler.flush, without its acquire() and release() calls (a flush per loop iteration).
        with self.lock:  # type: ignore[union-attr]
            stream = self.stream
            if stream and hasattr(stream, "flush"):
                stream.flush()


_direct: list[LineHandler] = []  # the handler setup_logging made (at most one)
_INFO = logging.INFO
_logger_info = logging.Logger.info


def _info(msg: object, *args: object, extra: Mapping[str, object] | None = None, **kwargs: object) -> None:
    """Logger.info for fastgate's logger. While the handler setup_logging made is its only one, with no
    filter anywhere (a worker's tag is one), an INFO line is formatted and written straight to that
    handler: the same line, without a LogRecord and the six calls logging makes to route it, which were half
    the cost of a request line. Anything else takes logging's own way: other handlers (a test's capture),
    filters, a traceback, `extra` beyond the request fields, a level that hides INFO, an error."""
    direct = _direct[0] if _direct else None
    handlers = log.handlers
    if (direct is None or kwargs or len(handlers) != 1 or handlers[0] is not direct or log.filters
            or direct.filters or direct.level > _INFO or not log.isEnabledFor(_INFO)
            or (extra is not None and (len(extra) != 1 or FIELDS not in extra))):
        _logger_info(log, msg, *args, extra=extra, **kwargs)  # type: ignore[arg-type]
        return
    formatter = direct.formatter
    try:
        if args and len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
            args = args[0]  # type: ignore[assignment]  # as LogRecord.getMessage: info("%(a)s", {"a": 1})
        message = str(msg) % args if args else str(msg)
        if type(formatter) is LineFormatter:
            line = formatter.line(time.time(), "INFO", message)
        elif type(formatter) is JsonFormatter:
            line = formatter.line(time.time(), "INFO", message,
                                  extra[FIELDS] if extra is not None else None)  # type: ignore[arg-type]
        else:
            raise TypeError("not a formatter of fastgate's")
    except Exception:  # noqa: BLE001 - a bad format string or argument: logging's way reports it
        _logger_info(log, msg, *args, extra=extra)  # type: ignore[arg-type]
        return
    with direct.lock:  # type: ignore[union-attr]
        try:
            direct._write(line)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as Handler.emit: report, never raise
            direct.handleError(logging.makeLogRecord({"name": LOGGER_NAME, "msg": line, "levelno": _INFO}))


def fields_wanted() -> bool:
    """Whether anything reads a request line's fields (`extra=`): not while fastgate's own handler, writing
    text, is the logger's only one and nothing filters (the text line is the message alone), so callers can
    skip building them."""
    if not _direct:
        return True
    direct = _direct[0]
    handlers = log.handlers
    return (len(handlers) != 1 or handlers[0] is not direct or type(direct.formatter) is not LineFormatter
            or bool(log.filters) or bool(direct.filters))


def setup_logging(level: str, stream: object = None, fmt: str = "text") -> None:
    handler = LineHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    log.handlers[:] = [handler]
    _direct[:] = [handler]
    log.info = _info  # type: ignore[method-assign]
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
    log.makeRecord = _make_record  # type: ignore[method-assign,assignment]


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
