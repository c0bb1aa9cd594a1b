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

TAIL_BYTES = 16 * 1024
# Usage rows and metric labels hold model names; a client chooses what it sends, so their length is bounded.
MAX_MODEL_NAME_CHARS = 200

_NATIVE_PROMPT = re.compile(rb'"prompt_eval_count"\s*:\s*(\d{1,12})')
_NATIVE_COMPLETION = re.compile(rb'"eval_count"\s*:\s*(\d{1,12})')
_OPENAI_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d{1,12})')
_OPENAI_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})')
_MODEL = re.compile(rb'"model"\s*:\s*"((?:[^"\\\r\n]|\\.){1,256})"')


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


@dataclass(frozen=True, slots=True)
class TokenCounts:
    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def _last(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    value = None
    for match in pattern.finditer(data):
        value = int(match.group(1))
    return value


def token_counts(tail: bytes, *, openai: bool) -> TokenCounts | None:
    """The counts in the last object that reports them, or None when the tail has none."""
    tail = tail[-TAIL_BYTES:]
    # Every pattern ends its name in `_count"` or `_tokens"`: most answers (a version, a listing) hold neither,
    # and a substring search is far cheaper than two regex scans that find nothing.
    if openai:
        if b'_tokens"' not in tail:
            return None
        prompt, completion = _last(_OPENAI_PROMPT, tail), _last(_OPENAI_COMPLETION, tail)
    else:
        if b'_count"' not in tail:
            return None
        prompt, completion = _last(_NATIVE_PROMPT, tail), _last(_NATIVE_COMPLETION, tail)
    if prompt is None and completion is None:
        return None
    return TokenCounts(prompt or 0, completion or 0)


def reported_model(tail: bytes) -> str:
    """The model Ollama's answer names: the last `"model": "..."` of the response's tail (the final object
    of a stream, or the whole small answer). "" when it names none."""
    name = ""
    for match in _MODEL.finditer(tail[-TAIL_BYTES:]):
        name = match.group(1).decode("utf-8", "replace")
    return name


def bounded_model(name: str | None) -> str:
    """A model name fit for a usage row or a metric label: "-" for none, at most MAX_MODEL_NAME_CHARS."""
    if not name:
        return "-"
    return name if len(name) <= MAX_MODEL_NAME_CHARS else name[:MAX_MODEL_NAME_CHARS] + "..."
