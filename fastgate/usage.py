"""Token counts and model names read from what already passed through, after the fact.

The relay keeps references to its last few reads (no copies); when a response ends, these functions scan
that bounded tail for the counts Ollama reports: `prompt_eval_count`/`eval_count` in the final object of
native answers, `usage.prompt_tokens`/`completion_tokens` in /v1 answers. The model recorded is the one the
policy read from the request when it read one, else the one Ollama's answer names: never a guess from the
request's raw bytes, which a client can fill with decoys. Nothing here runs per chunk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

TAIL_BYTES = 16 * 1024
# Usage rows and metric labels hold model names; a client chooses what it sends, so their length is bounded.
MAX_MODEL_NAME_CHARS = 200

_NATIVE_PROMPT = re.compile(rb'"prompt_eval_count"\s*:\s*(\d{1,12})')
_NATIVE_COMPLETION = re.compile(rb'"eval_count"\s*:\s*(\d{1,12})')
_OPENAI_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d{1,12})')
_OPENAI_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})')
# The name as a JSON string's content (an escape is one unit of the 256). The first branch is the same match for
# a name without escapes, found without trying the alternation at every character (which cost ~7k instructions
# per name); names with escapes take the second.
_MODEL = re.compile(rb'"model"\s*:\s*"(?:([^"\\\r\n]{1,256})"|((?:[^"\\\r\n]|\\.){1,256})")')
_MODEL_NAME = b'"model"'
# Bytes that can follow a newline inside a _MODEL match (its whitespace runs, then ":" or the opening quote).
_INSIDE_MODEL = frozenset(b' \t\n\r\x0b\x0c:"')


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One forwarded request, as the usage ledger keeps it."""

    at: float  # epoch seconds
    user: str
    key_id: str
    model: str
    path: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    duration_ms: float
    backend: str = ""  # the Ollama that served it, by its [[backends]] name ("" before routing chose one)


class TokenCounts(NamedTuple):
    """Immutable as the frozen dataclass it was, at a third of its construction cost (one per response)."""

    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def _last(pattern: re.Pattern[bytes], name: bytes, data: bytes) -> int | None:
    """The number of the last match of `pattern` (`"name" : digits`) in `data`, looked for from the end. The
    same as the last of finditer's matches: no match can begin inside another, since a match holds no quote
    after its name's closing one, and that one cannot begin `name` again (`:` or whitespace follows it)."""
    end = len(data)
    while (at := data.rfind(name, 0, end)) >= 0:
        match = pattern.match(data, at)
        if match is not None:
            return int(match[1])
        end = at + len(name) - 1  # an occurrence that ends inside this one (they share a quote) is still seen
    return None


def token_counts(tail: bytes, *, openai: bool) -> TokenCounts | None:
    """The counts in the last object that reports them, or None when the tail has none."""
    tail = tail[-TAIL_BYTES:]
    # Every pattern ends its name in `_count"` or `_tokens"`: most answers (a version, a listing) hold neither,
    # and one substring search is cheaper than two that find nothing. From the end: where the counts are.
    if openai:
        if tail.rfind(b'_tokens"') < 0:
            return None
        prompt = _last(_OPENAI_PROMPT, b'"prompt_tokens"', tail)
        completion = _last(_OPENAI_COMPLETION, b'"completion_tokens"', tail)
    else:
        if tail.rfind(b'_count"') < 0:
            return None
        prompt = _last(_NATIVE_PROMPT, b'"prompt_eval_count"', tail)
        completion = _last(_NATIVE_COMPLETION, b'"eval_count"', tail)
    if prompt is None and completion is None:
        return None
    return TokenCounts(prompt or 0, completion or 0)


def reported_model(tail: bytes) -> str:
    """The model Ollama's answer names: the last `"model": "..."` of the response's tail (the final object
    of a stream, or the whole small answer). "" when it names none."""
    tail = tail[-TAIL_BYTES:]
    at = tail.rfind(_MODEL_NAME)
    if at < 0:
        return ""
    # The last match of a scan from the start is the one at `at` when that is the only occurrence of the name
    # since a line start no match can cross (a newline followed by a byte no match holds after a newline): a
    # scan from there finds what the whole scan finds past it, and here only `at`. One object of a stream per
    # line, so usually the case; otherwise the whole scan, as before.
    start = at
    while (newline := tail.rfind(b"\n", 0, start)) >= 0 and tail[newline + 1] in _INSIDE_MODEL:
        start = newline
    start = newline + 1
    match = _MODEL.match(tail, at) if tail.rfind(_MODEL_NAME, start, at + len(_MODEL_NAME) - 1) < 0 else None
    if match is None:
        for match in _MODEL.finditer(tail):
            pass
        if match is None:
            return ""
    return match[match.lastindex or 1].decode("utf-8", "replace")


def bounded_model(name: str | None) -> str:
    """A model name fit for a usage row or a metric label: "-" for none, at most MAX_MODEL_NAME_CHARS."""
    if not name:
        return "-"
    return name if len(name) <= MAX_MODEL_NAME_CHARS else name[:MAX_MODEL_NAME_CHARS] + "..."
