"""HTTP/1.1 message pieces fastgate writes or reads itself, as pure functions over bytes.

- the request head sent to Ollama (hop-by-hop headers dropped, Host rewritten, X-Forwarded-* added);
- the response head read from Ollama (strictly parsed, framing decided per RFC 9112 section 6.3);
- body framing trackers that only find where a relayed response ends, never copy or re-frame it;
- fastgate's own responses (JSON, errors in Ollama's or OpenAI's shape).

Client requests are parsed by h11 (in `connection`); everything here is independent of sockets.
"""

from __future__ import annotations

import enum
import json
import re
import time
from dataclasses import dataclass
from http import HTTPStatus

from .errors import BadGateway, BadRequest, GateError

# RFC 9110 section 7.6.1: connection-specific fields a proxy must not forward, plus the ones HTTP/1.0-era
# software still sends. Fields named in `Connection` are dropped too (see `forwardable_headers`).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})
# Fields fastgate sets itself (or deliberately withholds) on the way to Ollama.
REPLACED_UPSTREAM = frozenset({
    b"host", b"content-length", b"expect", b"x-api-key", b"authorization",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-request-id",
    b"x-fastgate-backend",  # fastgate's own routing header (admins pin a backend with it): never Ollama's
})

MAX_RESPONSE_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE_BYTES = 4096


_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def origin_form(target: bytes) -> bytes:
    """The request target as a path (RFC 9112 section 3.2): absolute-form `http://host/p?q` becomes `/p?q`
    (servers must accept it; Go routes it on its path). Asterisk- and authority-forms are refused."""
    if target.startswith(b"/"):
        return target
    match = _ABSOLUTE_FORM.match(target)
    if match is None:
        raise BadRequest("request target must be a path")
    rest = target[match.end():]
    if rest.startswith(b"#"):
        rest = b""
    return rest if rest.startswith(b"/") else b"/" + rest


def forwardable_headers(raw_headers: list[tuple[bytes, bytes]], *, forward_origin: bool) -> list[tuple[bytes, bytes]]:
    """The client's headers that may travel on to Ollama, original case and order kept."""
    # Ollama answers 403 to any Origin it does not list (wire doc section 2).
    dropped = _NOT_FORWARDED if forward_origin else _NOT_FORWARDED_NOR_ORIGIN
    kept: list[tuple[bytes, bytes]] = []
    named: set[bytes] = set()  # fields the client's Connection header names: for this hop only
    for name, value in raw_headers:
        lname = _LOWER_NAMES.get(name)
        if lname is None:
            lname = name.lower()
            if len(_LOWER_NAMES) < _LOWER_NAMES_MAX and len(name) <= 64:
                _LOWER_NAMES[name] = lname
        if lname in dropped:
            if lname == b"connection":
                named.update(t.strip().lower() for t in value.split(b",") if t.strip())
            continue
        kept.append((name, value))
    if named:  # rare: named again rather than every kept field's lower case kept on the way
        kept = [field for field in kept if field[0].lower() not in named]
    return kept


_NOT_FORWARDED = HOP_BY_HOP | REPLACED_UPSTREAM
# Field names as sent -> lower case: clients send few distinct names, and a dict lookup costs less than
# bytes.lower() (a method call) for each field of each request. Bounded; a name's lower case is fixed.
_LOWER_NAMES: dict[bytes, bytes] = {}
_LOWER_NAMES_MAX = 512
_NOT_FORWARDED_NOR_ORIGIN = _NOT_FORWARDED | {b"origin"}


def upstream_request_head(*, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                          host_header: bytes, forwarded_for: bytes, forwarded_proto: bytes,
                          forwarded_host: bytes | None, request_id: bytes, content_length: int | None,
                          chunked: bool, http10: bool = False) -> bytes:
    """Serialize the request head for Ollama. `headers` must already be filtered by `forwardable_headers`."""
    version = b"HTTP/1.0" if http10 else b"HTTP/1.1"
    parts = [method, b" ", target, b" ", version, b"\r\nHost: ", host_header, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (b"X-Forwarded-For: ", forwarded_for, b"\r\nX-Forwarded-Proto: ", forwarded_proto, b"\r\n")
    if forwarded_host:
        parts += (b"X-Forwarded-Host: ", forwarded_host, b"\r\n")
    parts += (b"X-Request-Id: ", request_id, b"\r\n")
    if chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif content_length is not None:
        parts += (b"Content-Length: ", str(content_length).encode(), b"\r\n")
    if http10:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def retarget_head(head: bytes, target: bytes, host_header: bytes) -> bytes:
    """A head built by `upstream_request_head` for another Ollama: its request target (which carries that
    backend's base path) and Host (Ollama checks Host is its own host:port) replaced, the rest kept."""
    method_end = head.index(b" ")
    line_end = head.index(b"\r\n")
    host_end = head.index(b"\r\n", line_end + 2)  # Host is always the first field (upstream_request_head)
    version = head[:line_end].rpartition(b" ")[2]
    return b"".join((head[:method_end], b" ", target, b" ", version, b"\r\nHost: ", host_header,
                     head[host_end:]))


# ---------------------------------------------------------------------------------------------------------
# Response head from Ollama

class BodyKind(enum.Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs four times as much, once per response
class ResponseHead:
    status: int
    body_kind: BodyKind
    content_length: int
    keep_alive: bool  # may the upstream connection be reused after this response
    header_block: bytes  # the header lines to relay, each ending in CRLF, hop-by-hop ones removed
    reason: bytes

    @property
    def informational(self) -> bool:
        return 100 <= self.status < 200


_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([\t \x21-\x7e\x80-\xff]*))?\r?")
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# What Ollama's headers must not carry to the client: hop-by-hop ones except Transfer-Encoding, which is
# relayed as is because the chunked framing itself is relayed byte for byte.
_RESPONSE_DROP = HOP_BY_HOP - {b"transfer-encoding"}


def find_head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Index just past the blank line that ends a head beginning at `start`, or -1 if it has not arrived yet."""
    end = buf.find(b"\r\n\r\n", start)
    if end >= 0:
        return end + 4
    # Tolerate bare-LF heads from odd servers (RFC 9112 section 2.2 allows recipients to).
    end = buf.find(b"\n\n", start)
    return end + 2 if end >= 0 else -1


# A header block (after the status line, before the blank line) of well-formed CRLF-ended fields.
_FIELD_LINES = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
# The fields a response head is more than copied for: framing, and what is dropped before relaying.
_SPECIAL_FIELD = re.compile(rb"^(content-length|transfer-encoding|connection|keep-alive|proxy-connection|te|trailer|"
                            rb"upgrade|proxy-authorization|proxy-authenticate):([^\r]*)", re.IGNORECASE | re.MULTILINE)


def parse_response_head(head: bytes, request_method: bytes) -> ResponseHead:
    """Parse a complete response head (through its blank line). Raises BadGateway if malformed."""
    # What Ollama sends (CRLF lines, Content-Length or chunked, nothing hop-by-hop) is checked in two regex
    # passes and its header block relayed as it came, not taken apart and joined again line by line; anything
    # else, including everything malformed, is judged by the general parser below with the same result.
    line_end = head.find(b"\r\n")
    if line_end > 0 and head.endswith(b"\r\n\r\n"):
        block = head[line_end + 2:-2]
        match = _STATUS_LINE.fullmatch(head, 0, line_end)
        if match is not None and _FIELD_LINES.fullmatch(block):
            fast = _plain_head(match, block, request_method)
            if fast is not None:
                return fast
    return _parse_response_head(head, request_method)


def _plain_head(status_line: re.Match[bytes], block: bytes, request_method: bytes) -> ResponseHead | None:
    """The ResponseHead of a well-formed head whose only special fields are one Content-Length or one
    `Transfer-Encoding: chunked` (HTTP/1.1); None for anything else (the general parser decides)."""
    http11 = status_line.group(1) == b"1"
    status = int(status_line.group(2))
    length: bytes | None = None
    chunked = False
    for name, value in _SPECIAL_FIELD.findall(block):
        name = name.lower()
        if name == b"content-length" and length is None and not chunked:
            length = value.strip(b" \t")
            if not length.isdigit() or len(length) > 18:
                return None
        elif name == b"transfer-encoding" and length is None and not chunked and http11:
            if value.strip(b" \t").lower() != b"chunked":
                return None
            chunked = True
        else:
            return None
    reason = (status_line.group(3) or b"").strip()
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        if chunked:
            return None  # its Transfer-Encoding is dropped
        return ResponseHead(status, BodyKind.NONE, 0, http11, block, reason)
    if chunked:
        return ResponseHead(status, BodyKind.CHUNKED, 0, True, block, reason)
    if length is None:
        return ResponseHead(status, BodyKind.UNTIL_CLOSE, 0, False, block, reason)
    content_length = int(length)
    return ResponseHead(status, BodyKind.LENGTH if content_length else BodyKind.NONE, content_length, http11,
                        block, reason)


def _parse_response_head(head: bytes, request_method: bytes) -> ResponseHead:
    lines = head.split(b"\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise BadGateway("malformed status line from upstream")
    http11 = match.group(1) == b"1"
    status = int(match.group(2))
    reason = (match.group(3) or b"").strip()
    kept: list[bytes] = []
    content_lengths: list[bytes] = []
    transfer_codings: list[bytes] = []
    connection_tokens: set[bytes] = set()
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise BadGateway("malformed header from upstream")
        value = value.strip(b" \t")
        if _FIELD_VALUE_BAD.search(value):
            raise BadGateway("malformed header value from upstream")
        lname = name.lower()
        if lname == b"content-length":
            content_lengths += [v.strip() for v in value.split(b",")]
        elif lname == b"transfer-encoding":
            transfer_codings += [v.strip().lower() for v in value.split(b",") if v.strip()]
        elif lname == b"connection":
            connection_tokens.update(t.strip().lower() for t in value.split(b","))
        if lname in _RESPONSE_DROP:
            continue
        kept.append(line)
    if connection_tokens - {b"close", b"keep-alive", b""}:
        # RFC 9110 section 7.6.1: fields named in Connection are for this hop only.
        kept = [ln for ln in kept if ln.partition(b":")[0].strip().lower() not in connection_tokens]

    keep_alive = (http11 and b"close" not in connection_tokens) or (not http11 and b"keep-alive" in connection_tokens)
    content_length = 0
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        kind = BodyKind.NONE
        # Drop nothing: a HEAD answer's Content-Length describes the GET body and is relayed as is.
    elif transfer_codings:
        # RFC 9112 section 6.1: Transfer-Encoding overrides Content-Length, which must then be dropped.
        kept = [ln for ln in kept if not ln.lower().startswith(b"content-length:")]
        if transfer_codings[-1] == b"chunked" and http11:
            kind = BodyKind.CHUNKED
        else:
            kind = BodyKind.UNTIL_CLOSE
            keep_alive = False
    elif content_lengths:
        if len(set(content_lengths)) != 1 or not content_lengths[0].isdigit() or len(content_lengths[0]) > 18:
            raise BadGateway("invalid Content-Length from upstream")
        kind = BodyKind.LENGTH
        content_length = int(content_lengths[0])
        if content_length == 0:
            kind = BodyKind.NONE
    else:
        kind = BodyKind.UNTIL_CLOSE
        keep_alive = False
    if transfer_codings and kind is not BodyKind.CHUNKED:
        # Relaying a coding we do not track would leave the client unable to find the end; drop it and let
        # the close delimit the body instead.
        kept = [ln for ln in kept if not ln.lower().startswith(b"transfer-encoding:")]
    block = b"\r\n".join(kept) + b"\r\n" if kept else b""
    return ResponseHead(status, kind, content_length, keep_alive, block, reason)


def client_response_head(head: ResponseHead, *, request_id: bytes, close: bool, extra: bytes = b"") -> bytes:
    """The head fastgate sends its client for an upstream response: Ollama's own headers, relayed, plus
    `extra` ready-made header lines (CORS)."""
    reason = head.reason or _reason(head.status)
    parts = [b"HTTP/1.1 ", str(head.status).encode(), b" ", reason, b"\r\n", head.header_block, extra,
             b"X-Request-Id: ", request_id, b"\r\n"]
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Framing trackers. `feed(data)` returns -1 while the message goes on, else the index just past its end in
# `data`. They never copy the payload: only chunk-size lines are looked at.

class FramingError(Exception):
    pass


class LengthFraming:
    __slots__ = ("remaining",)
    at_boundary = False  # only chunked bodies have chunk boundaries to fast-path

    def __init__(self, length: int) -> None:
        self.remaining = length

    def feed(self, data: bytes) -> int:
        self.remaining -= len(data)
        if self.remaining > 0:
            return -1
        return len(data) + self.remaining


class UntilCloseFraming:
    __slots__ = ()
    at_boundary = False

    def feed(self, data: bytes) -> int:
        return -1


_SIZE, _DATA, _TRAILER = 0, 1, 2
# chunk-size [ chunk-ext ] CRLF (RFC 9112 section 7.1); a bare LF is tolerated as for other lines.
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\r\n]*)?\r?\n").match


class ChunkedFraming:
    """Follows RFC 9112 section 7.1 chunked framing just enough to find the end of the message."""

    __slots__ = ("_state", "_remaining", "_partial")

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._partial = b""  # an incomplete size or trailer line carried over between reads

    @property
    def at_boundary(self) -> bool:
        """Between chunks, with nothing carried over: the next read should start with a size line."""
        return self._state == _SIZE and not self._partial

    def feed(self, data: bytes) -> int:
        end = len(data)
        if self._state == _SIZE and not self._partial:
            # What Ollama writes per token: exactly one whole chunk per read. Nothing to carry over.
            match = _CHUNK_SIZE_LINE(data)
            if match is not None:
                size = int(match.group(1), 16)
                if size and match.end() + size + 2 == end:
                    return -1
        pos = 0
        while pos < end:
            state = self._state
            if state == _DATA:
                left = end - pos
                if self._remaining > left:
                    self._remaining -= left
                    return -1
                pos += self._remaining
                self._remaining = 0
                self._state = _SIZE
                continue
            if state == _SIZE and not self._partial:
                # The common case, a whole size line in this read: one regex match, no slicing.
                match = _CHUNK_SIZE_LINE(data, pos)
                if match is not None:
                    pos = match.end()
                    size = int(match.group(1), 16)
                    if size:
                        self._remaining = size + 2  # the data and its CRLF
                        self._state = _DATA
                    else:
                        self._state = _TRAILER
                    continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._partial += data[pos:]
                if len(self._partial) > MAX_CHUNK_LINE_BYTES:
                    raise FramingError("chunk line too long")
                return -1
            line = data[pos:newline]
            if self._partial:
                line = self._partial + line
                self._partial = b""
            pos = newline + 1
            if state == _SIZE:
                match = _CHUNK_SIZE_LINE(line + b"\n")
                if match is None:
                    raise FramingError("bad chunk size")
                size = int(match.group(1), 16)
                if size:
                    self._remaining = size + 2
                    self._state = _DATA
                else:
                    self._state = _TRAILER
            elif line in (b"", b"\r"):  # blank line: end of trailers, end of message
                return pos
        return -1


def dechunk(body: bytes) -> bytes:
    """The payload of a complete chunked body (for the few small answers fastgate reads itself)."""
    out = bytearray()
    pos = 0
    while True:
        match = _CHUNK_SIZE_LINE(body, pos)
        if match is None:
            raise FramingError("bad chunk size")
        size = int(match.group(1), 16)
        pos = match.end()
        if size == 0:
            return bytes(out)
        out += body[pos:pos + size]
        pos += size + 2


def framing_for(head: ResponseHead) -> LengthFraming | ChunkedFraming | UntilCloseFraming | None:
    """A tracker for the body that follows `head`, or None when it has no body."""
    kind = head.body_kind
    if kind is BodyKind.CHUNKED:
        return ChunkedFraming()
    if kind is BodyKind.LENGTH:
        return LengthFraming(head.content_length)
    if kind is BodyKind.UNTIL_CLOSE:
        return UntilCloseFraming()
    return None


# ---------------------------------------------------------------------------------------------------------
# fastgate's own responses

_date_cache: tuple[int, bytes] = (0, b"")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date() -> bytes:
    """IMF-fixdate (RFC 9110 section 5.6.7), computed once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        t = time.gmtime(now)
        text = (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")
        _date_cache = (now, text.encode())
    return _date_cache[1]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def local_response(status: int, body: bytes, *, content_type: bytes = b"application/json; charset=utf-8",
                   request_id: bytes = b"", close: bool = False, head_only: bool = False,
                   extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A complete response written by fastgate (not relayed). `head_only` for HEAD: same head, no body."""
    parts = [b"HTTP/1.1 ", str(status).encode(), b" ", _reason(status), b"\r\nDate: ", http_date(),
             b"\r\nServer: fastgate\r\n"]
    if status != 204:  # RFC 9110 section 8.6: no Content-Length on a 204
        parts += (b"Content-Type: ", content_type, b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n")
    if request_id:
        parts += (b"X-Request-Id: ", request_id, b"\r\n")
    for name, value in extra_headers:
        parts += (name, b": ", value, b"\r\n")
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def json_body(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def is_openai_path(path: bytes) -> bool:
    return path == b"/v1" or path.startswith(b"/v1/")


def error_body(error: GateError, *, openai: bool) -> bytes:
    """`{"error": msg}` as Ollama answers, or the OpenAI error object on /v1 so its SDKs show it properly."""
    if openai:
        return json_body({"error": {"message": error.message, "type": error.openai_type,
                                    "param": None, "code": error.openai_code}})
    return json_body({"error": error.message})


def error_response(error: GateError, *, path: bytes, request_id: bytes, close: bool,
                   head_only: bool = False, extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """The one place a GateError becomes bytes on the wire."""
    headers = error.extra_headers + extra_headers
    if error.status == 401:
        headers = (*headers, (b"WWW-Authenticate", b'Bearer realm="fastgate"'))
    return local_response(error.status, error_body(error, openai=is_openai_path(path)), request_id=request_id,
                          close=close, head_only=head_only, extra_headers=headers)
