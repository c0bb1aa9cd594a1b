"""usage's tail scans against the plain definitions they replace (the last finditer match of each pattern):
found from the end, they must give the same answer whatever the bytes, valid JSON or not."""

from __future__ import annotations

import re

from hypothesis import example, given, settings, strategies as st

from fastgate.usage import TAIL_BYTES, TokenCounts, reported_model, token_counts

_REF_MODEL = re.compile(rb'"model"\s*:\s*"((?:[^"\\\r\n]|\\.){1,256})"')
_REF = {
    False: (re.compile(rb'"prompt_eval_count"\s*:\s*(\d{1,12})'), re.compile(rb'"eval_count"\s*:\s*(\d{1,12})')),
    True: (re.compile(rb'"prompt_tokens"\s*:\s*(\d{1,12})'), re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})')),
}


def _ref_last(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    value = None
    for match in pattern.finditer(data):
        value = int(match.group(1))
    return value


def ref_token_counts(tail: bytes, *, openai: bool) -> TokenCounts | None:
    tail = tail[-TAIL_BYTES:]
    prompt, completion = (_ref_last(pattern, tail) for pattern in _REF[openai])
    if prompt is None and completion is None:
        return None
    return TokenCounts(prompt or 0, completion or 0)


def ref_reported_model(tail: bytes) -> str:
    name = ""
    for match in _REF_MODEL.finditer(tail[-TAIL_BYTES:]):
        name = match.group(1).decode("utf-8", "replace")
    return name


# Pieces that make matches, near-matches and overlapping candidates likely.
PIECES = [b'"model"', b'"model":"', b'"eval_count"', b'"prompt_eval_count"', b'"prompt_tokens"',
          b'"completion_tokens"', b'"', b':', b' ', b'\n', b'\r', b'\t', b'\\', b'\\"', b'\\\\', b'{', b'}', b',',
          b'12', b'7', b'llama3.2:latest', b'x' * 130, b'model', b'data: ', b'\xc3\xa9', b'\xff']
tails = st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join)


@settings(max_examples=3000, deadline=None)
@given(tails)
@example(b'"model":"a"model":"b"')
@example(b'"model":"model":"x"')
@example(b'"model":"\\"model":"y"')
@example(b'"model":"a,"\n"model":"b"')
@example(b'{"model":\n"a"}\n{"model":"b"}\n')
@example(b'"model":"' + b'x' * 300 + b'"')
@example(b'"prompt_eval_count"prompt_eval_count": 5')
def test_scans_match_the_plain_definitions(tail: bytes) -> None:
    assert reported_model(tail) == ref_reported_model(tail)
    for openai in (False, True):
        assert token_counts(tail, openai=openai) == ref_token_counts(tail, openai=openai)


def test_a_stream_tail() -> None:
    tail = (b'{"model":"llama3.2:latest","response":"say \\"model\\": \\"x\\"","done":false}\n'
            b'{"model":"llama3.2:latest","done":true,"prompt_eval_count":11,"eval_count":1}\n')
    assert reported_model(tail) == "llama3.2:latest"
    assert token_counts(tail, openai=False) == TokenCounts(11, 1)
    assert token_counts(tail, openai=True) is None
    assert reported_model(b'{"model":"a\\"b"}') == 'a\\"b'  # as the plain scan: the escape kept
