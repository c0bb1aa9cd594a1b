"""Message pieces as pure functions: request heads for Ollama, response heads from it, body framing,
fastgate's own responses."""

from __future__ import annotations

import json

import pytest

from fastgate.errors import (
    BadGateway,
    BadRequest,
    BodyTooLarge,
    Forbidden,
    GateError,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
    UpstreamTimeout,
)
from fastgate.messages import (
    HOP_BY_HOP,
    BodyKind,
    ChunkedFraming,
    FramingError,
    LengthFraming,
    ResponseHead,
    UntilCloseFraming,
    client_response_head,
    error_body,
    error_response,
    find_head_end,
    forwardable_headers,
    framing_for,
    is_openai_path,
    local_response,
    parse_response_head,
    upstream_request_head,
)

# ---------------------------------------------------------------------------------------------------------
# forwardable_headers

RFC9110_HOP_BY_HOP = [b"Connection", b"Keep-Alive", b"Proxy-Connection", b"TE", b"Trailer",
                      b"Transfer-Encoding", b"Upgrade", b"Proxy-Authorization", b"Proxy-Authenticate"]


@pytest.mark.parametrize("name", RFC9110_HOP_BY_HOP + [n.lower() for n in RFC9110_HOP_BY_HOP]
                         + [n.upper() for n in RFC9110_HOP_BY_HOP])
def test_hop_by_hop_dropped(name: bytes) -> None:
    headers = [(b"Content-Type", b"application/json"), (name, b"x"), (b"User-Agent", b"ua")]
    assert forwardable_headers(headers, forward_origin=False) == [(b"Content-Type", b"application/json"),
                                                                  (b"User-Agent", b"ua")]


def test_hop_by_hop_constant_covers_rfc_list() -> None:
    assert {n.lower() for n in RFC9110_HOP_BY_HOP} <= HOP_BY_HOP


@pytest.mark.parametrize("name", [b"Host", b"Content-Length", b"Expect", b"X-API-Key", b"Authorization",
                                  b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Forwarded-Host", b"Forwarded",
                                  b"X-Request-Id", b"x-api-key", b"AUTHORIZATION"])
def test_replaced_or_secret_headers_dropped(name: bytes) -> None:
    headers = [(name, b"secret-ish"), (b"Accept", b"*/*")]
    assert forwardable_headers(headers, forward_origin=True) == [(b"Accept", b"*/*")]


def test_fields_listed_in_connection_dropped() -> None:
    headers = [
        (b"Connection", b"keep-alive, X-Custom ,x-other"),
        (b"X-Custom", b"1"),
        (b"X-Other", b"2"),
        (b"X-Kept", b"3"),
        (b"connection", b"X-Second"),
        (b"x-second", b"4"),
    ]
    assert forwardable_headers(headers, forward_origin=False) == [(b"X-Kept", b"3")]


def test_connection_listing_earlier_field_drops_it_too() -> None:
    headers = [(b"X-Before", b"1"), (b"Accept", b"a"), (b"Connection", b"x-before")]
    assert forwardable_headers(headers, forward_origin=False) == [(b"Accept", b"a")]


@pytest.mark.parametrize("forward_origin, kept", [(False, False), (True, True)])
def test_origin(forward_origin: bool, kept: bool) -> None:
    headers = [(b"Origin", b"https://app.example.com"), (b"Accept", b"a")]
    expected = headers if kept else [(b"Accept", b"a")]
    assert forwardable_headers(headers, forward_origin=forward_origin) == expected


def test_order_case_and_duplicates_kept() -> None:
    headers = [(b"x-b", b"1"), (b"X-A", b"2"), (b"x-b", b"3"), (b"Cookie", b"a=b"),
               (b"ACCEPT", b"text/plain")]
    assert forwardable_headers(headers, forward_origin=False) == headers


# ---------------------------------------------------------------------------------------------------------
# upstream_request_head

HEAD_ARGS = dict(host_header=b"127.0.0.1:11434", forwarded_for=b"203.0.113.9", forwarded_proto=b"https",
                 request_id=b"a1b2c3d4")


def test_upstream_request_head_layout_with_length() -> None:
    head = upstream_request_head(method=b"POST", target=b"/api/chat?x=1", headers=[(b"Content-Type", b"json"),
                                                                                   (b"User-Agent", b"ua")],
                                 forwarded_host=b"gate.example.com", content_length=17, chunked=False,
                                 **HEAD_ARGS)
    assert head == (b"POST /api/chat?x=1 HTTP/1.1\r\n"
                    b"Host: 127.0.0.1:11434\r\n"
                    b"Content-Type: json\r\n"
                    b"User-Agent: ua\r\n"
                    b"X-Forwarded-For: 203.0.113.9\r\n"
                    b"X-Forwarded-Proto: https\r\n"
                    b"X-Forwarded-Host: gate.example.com\r\n"
                    b"X-Request-Id: a1b2c3d4\r\n"
                    b"Content-Length: 17\r\n"
                    b"\r\n")


def test_upstream_request_head_chunked_beats_length() -> None:
    head = upstream_request_head(method=b"POST", target=b"/api/blobs/sha256:ab", headers=[],
                                 forwarded_host=None, content_length=5, chunked=True, **HEAD_ARGS)
    assert head == (b"POST /api/blobs/sha256:ab HTTP/1.1\r\nHost: 127.0.0.1:11434\r\n"
                    b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nX-Request-Id: a1b2c3d4\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
    assert b"Content-Length" not in head


@pytest.mark.parametrize("content_length, line", [(None, None), (0, b"Content-Length: 0\r\n")])
def test_upstream_request_head_no_body(content_length: int | None, line: bytes | None) -> None:
    head = upstream_request_head(method=b"GET", target=b"/api/tags", headers=[], forwarded_host=b"",
                                 content_length=content_length, chunked=False, **HEAD_ARGS)
    assert b"Transfer-Encoding" not in head
    assert b"X-Forwarded-Host" not in head  # empty Host means none
    if line is None:
        assert b"Content-Length" not in head
    else:
        assert line in head
    assert head.startswith(b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1:11434\r\n")
    assert head.endswith(b"X-Request-Id: a1b2c3d4\r\n" + (line or b"") + b"\r\n")


def test_upstream_request_head_http10() -> None:
    head = upstream_request_head(method=b"GET", target=b"/", headers=[], forwarded_host=None,
                                 content_length=None, chunked=False, http10=True, **HEAD_ARGS)
    assert head.startswith(b"GET / HTTP/1.0\r\nHost: 127.0.0.1:11434\r\n")
    assert head.endswith(b"Connection: close\r\n\r\n")
    assert head.count(b"\r\n\r\n") == 1


# ---------------------------------------------------------------------------------------------------------
# parse_response_head


def parse(head: bytes, method: bytes = b"GET") -> ResponseHead:
    return parse_response_head(head, method)


def test_content_length_response() -> None:
    head = parse(b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                 b"Date: Wed, 12 Mar 2025 00:00:00 GMT\r\nContent-Length: 42\r\n\r\n")
    assert head == ResponseHead(
        status=200, body_kind=BodyKind.LENGTH, content_length=42, keep_alive=True,
        header_block=(b"Content-Type: application/json; charset=utf-8\r\n"
                      b"Date: Wed, 12 Mar 2025 00:00:00 GMT\r\nContent-Length: 42\r\n"),
        reason=b"OK")
    assert head.informational is False


def test_chunked_response_keeps_transfer_encoding() -> None:
    head = parse(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    assert head.body_kind is BodyKind.CHUNKED
    assert head.keep_alive is True
    assert head.header_block == b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n"


def test_transfer_encoding_and_content_length_drops_length() -> None:
    head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n")
    assert head.body_kind is BodyKind.CHUNKED
    assert head.content_length == 0
    assert head.header_block == b"Transfer-Encoding: chunked\r\nX-A: 1\r\n"


@pytest.mark.parametrize("te", [b"gzip", b"chunked, gzip"])
def test_transfer_coding_not_ending_in_chunked_reads_until_close(te: bytes) -> None:
    head = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\nContent-Length: 3\r\n\r\n")
    assert head.body_kind is BodyKind.UNTIL_CLOSE
    assert head.keep_alive is False
    assert head.header_block == b""


def test_gzip_then_chunked_is_chunked() -> None:
    head = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    assert head.body_kind is BodyKind.CHUNKED


@pytest.mark.parametrize("head_bytes, method", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", b"HEAD"),
    (b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n", b"GET"),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", b"GET"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"POST"),
])
def test_responses_without_body(head_bytes: bytes, method: bytes) -> None:
    head = parse(head_bytes, method)
    assert head.body_kind is BodyKind.NONE
    assert head.content_length == 0
    assert head.keep_alive is True
    assert framing_for(head) is None


def test_head_response_relays_its_content_length() -> None:
    head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", b"HEAD")
    assert head.header_block == b"Content-Length: 1234\r\n"


@pytest.mark.parametrize("status", [100, 102, 103])
def test_informational(status: int) -> None:
    head = parse(b"HTTP/1.1 %d Whatever\r\n\r\n" % status)
    assert head.status == status
    assert head.informational is True
    assert head.body_kind is BodyKind.NONE
    assert head.header_block == b""


def test_no_length_reads_until_close() -> None:
    head = parse(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    assert head.body_kind is BodyKind.UNTIL_CLOSE
    assert head.keep_alive is False
    assert isinstance(framing_for(head), UntilCloseFraming)


@pytest.mark.parametrize("head_bytes, keep_alive", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 1\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n", True),
    (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 1\r\n\r\n",
     True),
])
def test_keep_alive(head_bytes: bytes, keep_alive: bool) -> None:
    head = parse(head_bytes)
    assert head.keep_alive is keep_alive
    assert head.body_kind is BodyKind.LENGTH
    # Connection and Keep-Alive are hop-by-hop: never relayed
    assert head.header_block == b"Content-Length: 1\r\n"


def test_http10_chunked_is_until_close() -> None:
    head = parse(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert head.body_kind is BodyKind.UNTIL_CLOSE
    assert head.keep_alive is False
    assert head.header_block == b""


def test_hop_by_hop_response_headers_dropped() -> None:
    head = parse(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nUpgrade: h2c\r\nTrailer: X-T\r\n"
                 b"Proxy-Authenticate: Basic\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
                 b"Content-Length: 2\r\nX-Kept: y\r\n\r\n")
    assert head.header_block == b"Content-Length: 2\r\nX-Kept: y\r\n"


def test_fields_named_in_response_connection_dropped() -> None:
    # RFC 9110 section 7.6.1 applies to responses too.
    head = parse(b"HTTP/1.1 200 OK\r\nConnection: X-Secret-Hop\r\nX-Secret-Hop: 1\r\n"
                 b"Content-Length: 0\r\n\r\n")
    assert b"X-Secret-Hop" not in head.header_block


@pytest.mark.parametrize("status_line, status, reason", [
    (b"HTTP/1.1 200 OK", 200, b"OK"),
    (b"HTTP/1.1 404 Not Found", 404, b"Not Found"),
    (b"HTTP/1.1 200", 200, b""),
    (b"HTTP/1.1 200 ", 200, b""),
    (b"HTTP/1.1 500 Internal\tServer \xe9rror", 500, b"Internal\tServer \xe9rror"),
    (b"HTTP/1.1 599 Custom", 599, b"Custom"),
])
def test_status_line(status_line: bytes, status: int, reason: bytes) -> None:
    head = parse(status_line + b"\r\nContent-Length: 0\r\n\r\n")
    assert (head.status, head.reason) == (status, reason)


def test_bare_lf_head() -> None:
    head = parse(b"HTTP/1.1 200 OK\nContent-Length: 3\nX-A: b\n\n")
    assert head.body_kind is BodyKind.LENGTH
    assert head.content_length == 3
    assert head.header_block == b"Content-Length: 3\r\nX-A: b\r\n"


def test_repeated_equal_content_lengths_accepted() -> None:
    head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5, 5\r\n\r\n")
    assert head.content_length == 5
    assert head.body_kind is BodyKind.LENGTH


def test_header_value_whitespace_trimmed_and_obs_text_allowed() -> None:
    head = parse(b"HTTP/1.1 200 OK\r\nX-A:   v\xe9 \t\r\nContent-Length:7\r\n\r\n")
    assert head.header_block == b"X-A:   v\xe9 \t\r\nContent-Length:7\r\n"  # relayed as received
    assert head.content_length == 7


@pytest.mark.parametrize("head_bytes", [
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 099 Low\r\n\r\n",
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.2 200 OK\r\n\r\n",
    b"http/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1  200 OK\r\n\r\n",
    b"HTTP/1.1 OK 200\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
    b"HTTP/1.1 200 O\x00K\r\n\r\n",
    b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nNoColonHere\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n: empty-name\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nName : x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: x\r\n continuation\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\x1bb\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
])
def test_malformed_heads_raise_bad_gateway(head_bytes: bytes) -> None:
    with pytest.raises(BadGateway) as info:
        parse(head_bytes)
    assert info.value.status == 502
    assert b"\x00" not in info.value.message.encode()


def test_bad_gateway_message_is_public() -> None:
    with pytest.raises(BadGateway) as info:
        parse(b"HTTP/1.1 200 OK\r\nX-Secret-Upstream-Detail\r\n\r\n")
    assert "X-Secret" not in info.value.message


@pytest.mark.parametrize("data, end", [
    (b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody", 25),
    (b"HTTP/1.1 200 OK\r\nA: b\r\n", -1),
    (b"HTTP/1.1 200 OK\nA: b\n\nbody", 22),
    (b"HTTP/1.1 200 OK\r\n\r\n", 19),
    (b"", -1),
])
def test_find_head_end(data: bytes, end: int) -> None:
    assert find_head_end(data) == end
    assert find_head_end(bytearray(data)) == end


def test_client_response_head() -> None:
    head = parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\nX-A: b\r\n\r\n")
    assert client_response_head(head, request_id=b"deadbeef", close=False) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\nX-Request-Id: deadbeef\r\n\r\n")
    no_reason = parse(b"HTTP/1.0 404\r\n\r\n")
    assert client_response_head(no_reason, request_id=b"r", close=True) == (
        b"HTTP/1.1 404 Not Found\r\nX-Request-Id: r\r\nConnection: close\r\n\r\n")


# ---------------------------------------------------------------------------------------------------------
# Framing

CHUNKED_MESSAGES = [
    b"0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    b"A\r\n0123456789\r\n0\r\n\r\n",
    b"a\r\n0123456789\r\n00\r\n\r\n",
    b"1;name=value\r\nx\r\n0;last\r\n\r\n",  # chunk extensions
    b'3 ; q="a;b"\r\nabc\r\n0\r\n\r\n',
    b"3\r\n\r\n\n\r\n0\r\n\r\n",  # data that looks like line ends
    b"3\r\n0\r\n\r\n0\r\n\r\n",  # data that looks like the last chunk
    b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\nX-Other: two\r\n\r\n",  # trailers
    b"2\nhi\r\n0\n\n",  # bare LF size and trailer lines (the CRLF after data is part of the framing)
    b"10\r\n" + b"{" * 16 + b"\r\n0\r\n\r\n",
]


@pytest.mark.parametrize("message", CHUNKED_MESSAGES)
def test_chunked_whole(message: bytes) -> None:
    assert ChunkedFraming().feed(message) == len(message)


@pytest.mark.parametrize("message", CHUNKED_MESSAGES)
def test_chunked_split_at_every_position(message: bytes) -> None:
    for split in range(len(message) + 1):
        framing = ChunkedFraming()
        first, second = message[:split], message[split:]
        if split == len(message):
            assert framing.feed(first) == len(message), split
            continue
        assert framing.feed(first) == -1, split
        assert framing.feed(second) == len(second), split


@pytest.mark.parametrize("message", CHUNKED_MESSAGES)
def test_chunked_byte_by_byte(message: bytes) -> None:
    framing = ChunkedFraming()
    for i in range(len(message) - 1):
        assert framing.feed(message[i:i + 1]) == -1, i
    assert framing.feed(message[-1:]) == 1


@pytest.mark.parametrize("message", CHUNKED_MESSAGES)
def test_chunked_bytes_after_the_end(message: bytes) -> None:
    tail = b"HTTP/1.1 200 OK\r\n\r\n"  # a pipelined next response, say
    assert ChunkedFraming().feed(message + tail) == len(message)
    # and when the end arrives in a later read
    framing = ChunkedFraming()
    assert framing.feed(message[:3]) == -1 or len(message) <= 3
    if len(message) > 3:
        assert framing.feed(message[3:] + tail) == len(message) - 3


def test_chunked_empty_feed() -> None:
    framing = ChunkedFraming()
    assert framing.feed(b"") == -1
    assert framing.feed(b"0\r\n\r\n") == 5


def test_chunked_large_chunk_in_pieces() -> None:
    framing = ChunkedFraming()
    size = 1_000_000
    assert framing.feed(b"%x\r\n" % size) == -1
    for _ in range(size // 4096):
        assert framing.feed(b"x" * 4096) == -1
    assert framing.feed(b"x" * (size % 4096) + b"\r\n") == -1
    assert framing.feed(b"0\r\n\r\nextra") == 5


@pytest.mark.parametrize("message", [
    b"\r\n",
    b"zz\r\n",
    b"-1\r\n",
    b"0x5\r\n",
    b"+5\r\n",
    b";ext\r\n",
    b"1 2\r\n",
    b"11111111111111111\r\n",  # 17 hex digits
    b"5\r\nhello\r\nq\r\n",
])
def test_chunked_bad_sizes(message: bytes) -> None:
    with pytest.raises(FramingError):
        ChunkedFraming().feed(message)


@pytest.mark.parametrize("message", [b"zz\r\n", b"5\r\nhello\r\nq\r\n"])
def test_chunked_bad_sizes_split(message: bytes) -> None:
    for split in range(1, len(message)):
        framing = ChunkedFraming()
        with pytest.raises(FramingError):
            framing.feed(message[:split])
            framing.feed(message[split:])


def test_chunked_size_line_too_long() -> None:
    framing = ChunkedFraming()
    with pytest.raises(FramingError):
        for _ in range(100):
            framing.feed(b"5;" + b"e" * 100)


def test_chunked_trailer_line_too_long() -> None:
    framing = ChunkedFraming()
    assert framing.feed(b"0\r\nX-T: ") == -1
    with pytest.raises(FramingError):
        for _ in range(100):
            framing.feed(b"v" * 100)


@pytest.mark.parametrize("length, pieces, results", [
    (0, [b""], [0]),
    (0, [b"next"], [0]),
    (5, [b"hello"], [5]),
    (5, [b"hel", b"lo"], [-1, 2]),
    (5, [b"hel", b"lo!!"], [-1, 2]),
    (5, [b"hello world"], [5]),
    (5, [b"", b"h", b"", b"ello"], [-1, -1, -1, 4]),
    (3, [b"a", b"b", b"cde"], [-1, -1, 1]),
])
def test_length_framing(length: int, pieces: list[bytes], results: list[int]) -> None:
    framing = LengthFraming(length)
    assert [framing.feed(p) for p in pieces] == results


def test_until_close_framing_never_ends() -> None:
    framing = UntilCloseFraming()
    assert framing.feed(b"0\r\n\r\n") == -1
    assert framing.feed(b"") == -1


def test_framing_for() -> None:
    chunked = framing_for(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"))
    assert isinstance(chunked, ChunkedFraming)
    length = framing_for(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"))
    assert isinstance(length, LengthFraming)
    assert length.remaining == 9


# ---------------------------------------------------------------------------------------------------------
# fastgate's own responses


def split_response(raw: bytes) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep
    status_line, *lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, colon, value = line.partition(b": ")
        assert colon, line
        headers.setdefault(name.lower(), []).append(value)
    return status_line, headers, body


def test_local_response_shape() -> None:
    raw = local_response(200, b'{"a":1}', request_id=b"cafe0001", extra_headers=((b"X-A", b"b"),))
    status, headers, body = split_response(raw)
    assert status == b"HTTP/1.1 200 OK"
    assert body == b'{"a":1}'
    assert headers[b"content-length"] == [b"7"]
    assert headers[b"content-type"] == [b"application/json; charset=utf-8"]
    assert headers[b"server"] == [b"fastgate"]
    assert headers[b"x-request-id"] == [b"cafe0001"]
    assert headers[b"x-a"] == [b"b"]
    assert headers[b"date"][0].endswith(b" GMT")
    assert b"connection" not in headers


def test_local_response_close_and_no_request_id() -> None:
    status, headers, body = split_response(local_response(503, b"", content_type=b"text/plain", close=True))
    assert status == b"HTTP/1.1 503 Service Unavailable"
    assert headers[b"connection"] == [b"close"]
    assert headers[b"content-type"] == [b"text/plain"]
    assert headers[b"content-length"] == [b"0"]
    assert b"x-request-id" not in headers
    assert body == b""


def test_local_response_head_only_same_length_no_body() -> None:
    full = local_response(200, b'{"status":"running"}', request_id=b"r")
    head_only = local_response(200, b'{"status":"running"}', request_id=b"r", head_only=True)
    assert full.startswith(head_only)
    assert full[len(head_only):] == b'{"status":"running"}'
    assert head_only.endswith(b"\r\n\r\n")
    assert split_response(head_only)[1][b"content-length"] == [b"20"]


def test_unknown_status_reason() -> None:
    assert local_response(599, b"").startswith(b"HTTP/1.1 599 Unknown\r\n")


@pytest.mark.parametrize("path, openai", [
    (b"/v1", True), (b"/v1/chat/completions", True), (b"/v1/models", True),
    (b"/api/chat", False), (b"/v10/x", False), (b"/", False), (b"/api/v1/x", False), (b"v1/x", False),
])
def test_is_openai_path(path: bytes, openai: bool) -> None:
    assert is_openai_path(path) is openai


ERRORS = [BadRequest(), Unauthorized("invalid API key"), Forbidden(), NotFound(), MethodNotAllowed(),
          BodyTooLarge(), BadGateway(), UpstreamTimeout(), GateError()]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_error_body_ollama_shape(error: GateError) -> None:
    assert json.loads(error_body(error, openai=False)) == {"error": error.message}


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_error_body_openai_shape(error: GateError) -> None:
    assert json.loads(error_body(error, openai=True)) == {"error": {
        "message": error.message, "type": error.openai_type, "param": None, "code": error.openai_code}}


def test_unauthorized_openai_fields() -> None:
    body = json.loads(error_body(Unauthorized(), openai=True))
    assert body == {"error": {"message": "missing or invalid API key", "type": "invalid_request_error",
                              "param": None, "code": "invalid_api_key"}}


@pytest.mark.parametrize("path, expected", [
    (b"/api/chat", {"error": "invalid API key"}),
    (b"/v1/chat/completions", {"error": {"message": "invalid API key", "type": "invalid_request_error",
                                         "param": None, "code": "invalid_api_key"}}),
])
def test_error_response_401(path: bytes, expected: dict) -> None:
    error = Unauthorized("invalid API key")
    error.detail = "x-api-key:api-****0101"
    status, headers, body = split_response(error_response(error, path=path, request_id=b"r1", close=False))
    assert status == b"HTTP/1.1 401 Unauthorized"
    assert json.loads(body) == expected
    assert headers[b"www-authenticate"] == [b'Bearer realm="fastgate"']
    assert headers[b"content-length"] == [str(len(body)).encode()]
    assert headers[b"x-request-id"] == [b"r1"]
    assert b"****" not in body  # the detail is for logs only


@pytest.mark.parametrize("error", [Forbidden(), NotFound(), BadGateway()], ids=lambda e: type(e).__name__)
def test_error_response_without_www_authenticate(error: GateError) -> None:
    raw = error_response(error, path=b"/api/tags", request_id=b"r", close=True)
    status, headers, body = split_response(raw)
    assert status.startswith(b"HTTP/1.1 %d " % error.status)
    assert b"www-authenticate" not in headers
    assert headers[b"connection"] == [b"close"]
    assert json.loads(body) == {"error": error.message}


def test_error_response_carries_extra_headers() -> None:
    error = MethodNotAllowed(headers=((b"Allow", b"GET, HEAD"),))
    status, headers, _ = split_response(error_response(error, path=b"/", request_id=b"r", close=False))
    assert status == b"HTTP/1.1 405 Method Not Allowed"
    assert headers[b"allow"] == [b"GET, HEAD"]


@pytest.mark.parametrize("path", [b"/api/chat", b"/v1/models"])
def test_error_response_head_only(path: bytes) -> None:
    full = error_response(Unauthorized(), path=path, request_id=b"r", close=False)
    head = error_response(Unauthorized(), path=path, request_id=b"r", close=False, head_only=True)
    assert full.startswith(head)
    assert head.endswith(b"\r\n\r\n")
    _, headers, body = split_response(full)
    expected_length = [str(len(body)).encode()]
    assert split_response(head)[1][b"content-length"] == headers[b"content-length"] == expected_length
    assert split_response(head)[2] == b""
