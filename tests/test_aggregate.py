"""Several backends answering as one (issue 9 rules 6 and 7): the pure merging and verdicts, without sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastgate.routing.aggregate import (
    MAX_LINE_BYTES,
    NO_ANSWER,
    ChunkDecoder,
    FanOut,
    LineSplitter,
    PartResult,
    PullTally,
    answer_result,
    copy_source,
    fan_out_for,
    holds_model,
    listing_entries,
    merge_listings,
    no_answer,
    verdict,
    verdict_body,
    wants_stream,
)


def tags(*names: str, digest: str = "d") -> bytes:
    return json.dumps({"models": [{"name": n, "model": n, "digest": f"{digest}-{n}"} for n in names]}).encode()


@pytest.mark.parametrize("path, method, kind", [
    (b"/api/tags", b"GET", FanOut.TAGS), (b"/api/tags", b"HEAD", FanOut.TAGS), (b"/api/ps", b"GET", FanOut.PS),
    (b"/v1/models", b"HEAD", FanOut.V1_MODELS), (b"/api/pull", b"POST", FanOut.PULL),
    (b"/api/delete", b"DELETE", FanOut.DELETE), (b"/api/copy", b"POST", FanOut.COPY),
    (b"/api/tags", b"POST", None), (b"/api/pull", b"GET", None), (b"/api/delete", b"POST", None),
    (b"/api/create", b"POST", None), (b"/api/push", b"POST", None), (b"/api/blobs/sha256:00", b"POST", None),
    (b"/v1/models/llama3", b"GET", None), (b"/api/version", b"GET", None), (b"/api/chat", b"POST", None),
])
def test_which_requests_fan_out(path: bytes, method: bytes, kind: FanOut | None) -> None:
    assert fan_out_for(path, method) is kind


def test_tags_are_merged_once_per_name_sorted_first_backend_wins() -> None:
    a = listing_entries(FanOut.TAGS, tags("qwen2.5:0.5b", "llama3.2:latest", digest="a"))
    b = listing_entries(FanOut.TAGS, tags("llama3.2:latest", "bge-m3:latest", digest="b"))
    assert a is not None and b is not None
    merged = json.loads(merge_listings(FanOut.TAGS, [a, b]))
    assert [m["name"] for m in merged["models"]] == ["bge-m3:latest", "llama3.2:latest", "qwen2.5:0.5b"]
    assert merged["models"][1]["digest"] == "a-llama3.2:latest"  # the first backend's entry, whole
    assert set(merged) == {"models"}
    # the order does not depend on which backend is listed first
    assert [m["name"] for m in json.loads(merge_listings(FanOut.TAGS, [b, a]))["models"]] == \
        [m["name"] for m in merged["models"]]


def test_merged_listing_is_trimmed_by_the_allow_list() -> None:
    a = listing_entries(FanOut.TAGS, tags("qwen2.5:0.5b", "llama3.2:latest"))
    b = listing_entries(FanOut.TAGS, tags("llama3.2:latest", "bge-m3:latest"))
    assert a is not None and b is not None
    merged = json.loads(merge_listings(FanOut.TAGS, [a, b], lambda name: name.startswith("llama")))
    assert [m["name"] for m in merged["models"]] == ["llama3.2:latest"]
    assert json.loads(merge_listings(FanOut.TAGS, [a, b], lambda name: False)) == {"models": []}


def test_ps_entries_named_by_model_when_name_is_missing() -> None:
    body = json.dumps({"models": [{"model": "x:1"}, {"name": "", "model": "y:1"}, {"size": 3}, "junk"]}).encode()
    entries = listing_entries(FanOut.PS, body)
    assert entries is not None and len(entries) == 3  # "junk" is no entry
    assert [m.get("model") for m in json.loads(merge_listings(FanOut.PS, [entries]))["models"]] == ["x:1", "y:1"]


def test_v1_models_keep_openai_shape() -> None:
    a = listing_entries(FanOut.V1_MODELS, b'{"object":"list","data":[{"id":"b:1","object":"model"}]}\n')
    none = listing_entries(FanOut.V1_MODELS, b'{"object":"list","data":null}\n')  # Ollama with no model
    c = listing_entries(FanOut.V1_MODELS, b'{"object":"list","data":[{"id":"a:1"},{"id":"b:1","x":2}]}')
    assert none == []
    body = merge_listings(FanOut.V1_MODELS, [a or [], none or [], c or []])
    assert body.endswith(b"\n")
    assert json.loads(body) == {"object": "list", "data": [{"id": "a:1"}, {"id": "b:1", "object": "model"}]}


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"models": 3}', b'{"data": {}}'])
def test_what_is_not_a_listing(body: bytes) -> None:
    kind = FanOut.V1_MODELS if b"data" in body else FanOut.TAGS
    assert listing_entries(kind, body) is None


def test_holds_model_resolves_names_as_ollama_does() -> None:
    entries = listing_entries(FanOut.TAGS, tags("llama3:latest", "hf.co/org/model:Q4"))
    assert entries is not None
    assert holds_model(entries, "llama3")
    assert holds_model(entries, "registry.ollama.ai/library/llama3:latest")
    assert holds_model(entries, "hf.co/org/model:Q4")
    assert not holds_model(entries, "llama3:8b")
    assert not holds_model(entries, "qwen")


@pytest.mark.parametrize("body, streams", [
    (b'{"model":"x"}', True), (b'{"model":"x","stream":false}', False), (b'{"model":"x","STREAM":false}', False),
    (b'{"stream":false,"stream":true}', True), (b'{"stream":false,"stream":null}', True),
    (b'{"stream":true}', True), (b"", True), (b"{broken", True), (b'"just a string"', True),
])
def test_pull_stream_flag_read_as_go_reads_it(body: bytes, streams: bool) -> None:
    assert wants_stream(body) is streams


def test_copy_source() -> None:
    assert copy_source(b'{"source":"a:1","destination":"b:1"}') == "a:1"
    assert copy_source(b'{"Source":"a:1","source":"c:1"}') == "c:1"  # Go: the last match wins
    assert copy_source(b'{"destination":"b:1"}') is None
    assert copy_source(b'{"source":3}') is None
    assert copy_source(b"nope") is None


def test_every_part_succeeding_is_a_success() -> None:
    results = [answer_result(FanOut.DELETE, "a", 200, b""), answer_result(FanOut.DELETE, "b", 200, b"")]
    assert verdict(FanOut.DELETE, results) == (200, "")
    assert verdict_body(FanOut.DELETE, "") == b""
    assert verdict_body(FanOut.PULL, "") == b'{"status":"success"}'


def test_a_failed_part_is_named_with_why_and_who_succeeded() -> None:
    results = [answer_result(FanOut.PULL, "a", 200, b'{"status":"success"}'),
               answer_result(FanOut.PULL, "b", 500, b'{"error":"pull model manifest: file does not exist"}')]
    status, message = verdict(FanOut.PULL, results)
    assert status == 500
    assert message == "pull failed on b: pull model manifest: file does not exist (succeeded on a)"
    assert json.loads(verdict_body(FanOut.PULL, message)) == {"error": message}


def test_a_200_answer_carrying_an_error_is_a_failed_pull() -> None:
    result = answer_result(FanOut.PULL, "a", 200, b'{"error":"max retries exceeded"}')
    assert not result.ok and result.message == "max retries exceeded"


def test_failures_agreeing_on_a_status_keep_it_else_502() -> None:
    same = [answer_result(FanOut.PULL, name, 400, b'{"error":"model is required"}') for name in ("a", "b")]
    assert verdict(FanOut.PULL, same) == (400, "pull failed on a, b: model is required")
    mixed = [answer_result(FanOut.COPY, "a", 500, b'{"error":"disk full"}'), no_answer("b", "timed out")]
    status, message = verdict(FanOut.COPY, mixed)
    assert status == 502 and message == "copy failed on a: disk full; b: timed out"
    unreachable = [no_answer("a", "upstream unreachable (Connection refused)")]
    assert verdict(FanOut.COPY, unreachable)[0] == 502


def test_delete_of_a_model_on_no_backend_is_ollamas_404() -> None:
    absent = [answer_result(FanOut.DELETE, name, 404, b'{"error":"model \'x\' not found"}') for name in "ab"]
    assert all(r.absent and not r.ok for r in absent)
    assert verdict(FanOut.DELETE, absent) == (404, "model 'x' not found")
    # where it was, it is gone; where it was not, nothing was to do
    assert verdict(FanOut.DELETE, [absent[0], answer_result(FanOut.DELETE, "b", 200, b"")]) == (200, "")
    failed = [absent[0], answer_result(FanOut.DELETE, "b", 500, b"locked"), answer_result(FanOut.DELETE, "c", 200, b"")]
    assert verdict(FanOut.DELETE, failed) == (500, "delete failed on b: locked (succeeded on c)")


def test_a_404_is_not_absence_outside_delete() -> None:
    result = answer_result(FanOut.COPY, "a", 404, b'{"error":"model \\"x\\" not found"}')
    assert not result.absent and verdict(FanOut.COPY, [result]) == (404, 'copy failed on a: model "x" not found')


def chunked(*payloads: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in payloads) + b"0\r\n" + trailer + b"\r\n"


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_chunk_decoder_in_any_pieces(step: int) -> None:
    payloads = [b'{"status":"pulling manifest"}\n', b'{"status":"su', b'ccess"}\n', b"x" * 300]
    wire = chunked(*payloads, trailer=b"X-Trailer: 1\r\n") + b"ignored after the end"
    decoder = ChunkDecoder()
    out = b"".join(decoder.feed(wire[i:i + step]) for i in range(0, len(wire), step))
    assert out == b"".join(payloads)


def test_line_splitter_joins_pieces_and_drops_overlong_lines() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert splitter.feed(b':2}\n\n{"c":3}') == [b'{"b":2}', b""]
    assert splitter.rest() == b'{"c":3}'
    assert splitter.feed(b"y" * (MAX_LINE_BYTES + 1)) == []
    assert splitter.feed(b"yyy\n" + b'{"d":4}\n') == [b'{"d":4}']  # the rest of the long line is dropped
    assert splitter.dropped == 1


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=12),
       st.lists(st.integers(min_value=1, max_value=17), min_size=1, max_size=8))
def test_line_splitter_gives_the_lines_whatever_the_pieces(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"\n".join(parts) + b"\n"
    splitter, got, at, i = LineSplitter(), [], 0, 0
    while at < len(stream):
        size = cuts[i % len(cuts)]
        got += splitter.feed(stream[at:at + size])
        at, i = at + size, i + 1
    assert got == parts and splitter.rest() == b""


def test_a_long_line_in_small_pieces_is_dropped_and_the_next_lines_come() -> None:
    splitter, piece = LineSplitter(), b"x" * 4096
    for _ in range(MAX_LINE_BYTES // len(piece) + 2):
        assert splitter.feed(piece) == []
    assert splitter.dropped == 1
    assert splitter.feed(b"x\n" + b'{"e":5}\n{"f"') == [b'{"e":5}']
    assert splitter.rest() == b'{"f"'


def lines(data: bytes | None) -> dict[str, object]:
    assert data is not None and data.endswith(b"\n") and data.count(b"\n") == 1
    return json.loads(data)


def test_pull_tally_all_succeed() -> None:
    tally = PullTally(["a", "b"])
    assert lines(tally.line("a", b'{"status":"pulling manifest"}')) == {"status": "pulling manifest", "backend": "a"}
    progress = lines(tally.line("b", b'{"status":"pulling 1234","digest":"sha256:1","total":9,"completed":3}'))
    assert progress == {"status": "pulling 1234", "digest": "sha256:1", "total": 9, "completed": 3, "backend": "b"}
    assert tally.line("a", b"") is None and tally.line("a", b"garbage") is None and tally.line("a", b"[1]") is None
    assert lines(tally.line("a", b'{"status":"success"}')) == {"status": "success", "backend": "a"}
    assert lines(tally.final_line()) == {"error": "pull failed on b: did not finish (succeeded on a)"}
    assert lines(tally.line("b", b'{"status":"success"}'))["backend"] == "b"
    assert tally.ended("a", complete=True) is None and tally.ended("b", complete=True) is None
    assert lines(tally.final_line()) == {"status": "success"}


def test_pull_tally_one_backend_failing() -> None:
    tally = PullTally(["a", "b"])
    tally.line("a", b'{"status":"success"}')
    failed = lines(tally.line("b", b'{"error":"pull model manifest: file does not exist"}'))
    # not an error line: Ollama's clients stop at the first one, and would miss the rest of the fan-out
    assert failed == {"status": "failed: pull model manifest: file does not exist", "backend": "b"}
    tally.line("b", b'{"status":"success"}')  # after an error: still failed
    assert [r.ok for r in tally.results()] == [True, False]
    final = lines(tally.final_line())
    assert final == {"error": "pull failed on b: pull model manifest: file does not exist (succeeded on a)"}


def test_pull_tally_stream_ending_without_a_verdict_fails() -> None:
    tally = PullTally(["a", "b"])
    tally.line("a", b'{"status":"writing manifest"}')
    assert lines(tally.ended("a", complete=True)) == {
        "status": "failed: its progress stream ended without success", "backend": "a"}
    assert lines(tally.ended("b", complete=False, why="upstream closed mid-response")) == {
        "status": "failed: answer cut off (upstream closed mid-response)", "backend": "b"}
    result = tally.result("b")
    assert result == PartResult("b", False, NO_ANSWER, "answer cut off (upstream closed mid-response)")
    assert verdict(FanOut.PULL, tally.results())[0] == 502
