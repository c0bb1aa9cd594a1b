"""Log format and request ids.

Lines look like the seed's: `2025-03-13 10:15:23 - INFO - [a1b2c3d4] Processing request: POST api/chat`.
Nothing here ever sees a full key: callers pass masked labels (`x-api-key:api-****0101`). Logging happens
per request (start, upstream answer, end), never per chunk.
"""

from __future__ import annotations

import logging
import random
import sys

LOGGER_NAME = "fastgate"
LINE_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

log = logging.getLogger(LOGGER_NAME)

_random = random.Random()


def new_request_id() -> bytes:
    """8 hex digits: short enough to grep, random enough not to collide within a day's logs."""
    return b"%08x" % _random.getrandbits(32)


def setup_logging(level: str, stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter(LINE_FORMAT, DATE_FORMAT))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def set_level(level: str) -> None:
    log.setLevel(level)


def log_path(target: bytes) -> str:
    """The path as the seed logged it (`api/chat`): no leading slash and never the query string,
    which may hold `api_key=`."""
    return target.partition(b"?")[0].lstrip(b"/").decode("latin-1")
