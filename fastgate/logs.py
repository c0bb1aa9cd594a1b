"""Log format and request ids.

Lines look like the seed's: `2025-03-13 10:15:23 - INFO - [a1b2c3d4] Processing request: POST api/chat`.
Nothing here ever sees a full key: callers pass masked labels (`x-api-key:api-****0101`). Logging happens
per request (start, end, and for streams the moment the answer began), never per chunk.
"""

from __future__ import annotations

import logging
import random
import re
import sys
import time

LOGGER_NAME = "fastgate"
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


def _no_caller(*args: object, **kwargs: object) -> tuple[str, int, str, None]:
    return "(unknown file)", 0, "(unknown function)", None


def setup_logging(level: str, stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(LineFormatter())
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


def log_path(target: bytes) -> str:
    """The path as the seed logged it (`api/chat`): no leading slash and never the query string,
    which may hold `api_key=`."""
    return target.partition(b"?")[0].lstrip(b"/").decode("latin-1")
