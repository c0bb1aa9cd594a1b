"""Measure a change to fastgate before making it: fastgate with patches applied at startup.

    python -m bench --targets fastgate,fastgate:lean-logging,nginx
    python -m bench.variants lean-logging,c-framing serve --config fastgate.toml

A target named `fastgate:<variant>[+<variant>...]` runs `python -m bench.variants <variants> serve ...`,
which patches the named variants into the imported fastgate modules and then runs fastgate's own CLI.
Each variant is a candidate for fastgate's hot path, measured in the same run as the unpatched fastgate
and nginx (interleaved, same conditions); bench/README.md's optimisation log records what each one bought.
Nothing here changes fastgate's files.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable


def lean_logging() -> None:
    """The same log lines, without the per-record work nobody reads: the caller's file and line
    (`findCaller` walks the stack), and the process/thread ids (a getpid() syscall per record)."""
    logging._srcfile = None  # type: ignore[attr-defined]  # documented switch: skip findCaller
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def quiet() -> None:
    """No per-request log lines at all (log level WARNING): the whole cost of request logging."""
    from fastgate import cli

    original = cli.setup_logging

    def setup(level: str, stream: object = None, fmt: str = "text") -> None:
        original("WARNING", stream, fmt)

    cli.setup_logging = setup  # type: ignore[assignment]


def c_framing() -> None:
    """Chunked framing tracked by llhttp (C, via httptools) instead of fastgate's Python state machine:
    one C call per read whatever the number of chunks in it, with only `on_message_complete` defined so
    that no Python code runs per chunk. For measurement: bytes past the end of a response (never sent by
    Ollama) are only detected (a second message beginning, or a parse error), not located, so such a read
    is reported as ending at 0 (the connection is then not reused), where fastgate's tracker gives the
    exact offset. httptools must be importable in the variant's process only (see bench/README.md: it is
    kept off the main environment because uvicorn would pick it up and change the seed baseline)."""
    import httptools  # type: ignore[import-not-found]

    from fastgate import messages, upstream

    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    class CChunkedFraming:
        __slots__ = ("_parser", "_messages", "_complete")

        def __init__(self) -> None:
            self._messages = 0
            self._complete = False
            self._parser = httptools.HttpResponseParser(self)
            self._parser.feed_data(head)

        def on_message_begin(self) -> None:
            self._messages += 1

        def on_message_complete(self) -> None:
            self._complete = True

        def feed(self, data: bytes) -> int:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError:
                if not self._complete:
                    raise messages.FramingError("bad chunked framing") from None
                return 0  # complete, then garbage: not reusable
            if not self._complete:
                return -1
            return len(data) if self._messages == 1 else 0

    original = messages.framing_for

    def framing_for(head_: messages.ResponseHead):  # type: ignore[no-untyped-def]
        if head_.body_kind is messages.BodyKind.CHUNKED:
            return CChunkedFraming()
        return original(head_)

    messages.framing_for = framing_for
    upstream.framing_for = framing_for  # imported by name there


def gc_stats() -> None:
    """Measures rather than changes: every garbage collection's generation and pause, summed up on stderr
    at exit (count, total and longest pause per generation, and the objects each generation held)."""
    import atexit
    import gc
    import time

    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - started[0])

    def report() -> None:
        for generation, values in pauses.items():
            if values:
                values.sort()
                sys.stderr.write(
                    f"gc-stats: generation {generation}: {len(values)} collections, total "
                    f"{sum(values) * 1000:.1f} ms, p50 {values[len(values) // 2] * 1e6:.0f} us, max "
                    f"{values[-1] * 1e6:.0f} us\n")
        sys.stderr.write(f"gc-stats: objects tracked {len(gc.get_objects())}, frozen {gc.get_freeze_count()}\n")

    gc.callbacks.append(callback)
    atexit.register(report)


VARIANTS: dict[str, Callable[[], None]] = {
    "gc-stats": gc_stats,
    "lean-logging": lean_logging,
    "quiet": quiet,
    "c-framing": c_framing,
}


def apply(names: str) -> None:
    for name in names.replace("+", ",").split(","):
        if name:
            if name not in VARIANTS:
                raise SystemExit(f"unknown fastgate variant {name!r} (known: {', '.join(VARIANTS)})")
            VARIANTS[name]()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    extra = os.environ.get("BENCH_VARIANT_PATH")  # packages only the variants may import (httptools)
    if extra:
        sys.path[:0] = extra.split(os.pathsep)
    if not args:
        raise SystemExit(f"usage: python -m bench.variants VARIANT[,VARIANT...] serve --config PATH "
                         f"(variants: {', '.join(VARIANTS)})")
    apply(args[0])
    from fastgate import cli

    return cli.main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
