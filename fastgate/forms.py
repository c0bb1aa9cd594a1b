"""Which form values Ollama could take as a request's model: Go's `r.FormValue(field)`, read as Go reads it.

Owns: reading a field (by default `model`) the way Ollama's `POST /v1/audio/transcriptions` does, through Go
net/http's `FormValue`: the URL query (`url.ParseQuery`) plus an `application/x-www-form-urlencoded` or
`multipart/form-data` body (`mime.ParseMediaType`, `mime/multipart`, `net/textproto`). Pure: bytes in, a
list of strings or `UnreadableForm` out; no I/O, no logging, stdlib only.

Invariants:
- `form_field_values` returns EVERY value Go collects for the field (`r.Form[field]`), in Go's order:
  urlencoded body values before the query's, query values before multipart ones. `FormValue` returns the
  first, but a caller that checks all of them stays right even if that precedence ever changes.
- Fail closed. A gate that guesses fails open, so wherever this module cannot be sure it reads the request
  exactly as Go will, it raises `UnreadableForm` (a 400) instead of answering. Some refusals are
  stricter than Go (folded part headers, RFC 2231 names, field names that differ only in case, ...): each is
  a place where Go's reading is easy to get wrong or where another reader would disagree with Go. Refusing a
  request Go would have accepted costs a client a 400; accepting one we misread would let a key use a
  model it is not allowed.
- Linear in the body: big audio parts are located with regular expressions and `bytes` searches, never
  walked byte by byte in Python and never copied; only headers and field values are sliced out.

Facts from Go (net/http, mime, mime/multipart, net/textproto as of Go 1.26, the version Ollama's go.mod
names), each checked against real Go in tests/test_forms.py (oracle tests/go_oracle/forms/main.go):
- Ollama's handler calls `ParseMultipartForm(25<<20)` and answers 400 on any error (so also to urlencoded
  bodies, "not multipart", and to queries Go reports errors for), then `FormValue`. `FormValue` on its own
  ignores errors: a multipart body Go fails to read contributes nothing, silently. We read what `FormValue`
  reads, a superset of what reaches Ollama's model lookup.
- The media type is lower-cased with Unicode rules and trimmed of Unicode space, so
  `multİpart/form-data` (U+0130) IS multipart to Go; non-ASCII Content-Types are refused here.
- url.ParseQuery: pairs split on `&`; a pair containing `;` is dropped (with an error); a pair with a bad
  %-escape in its key or value is dropped; `+` is a space; more than 10,000 pairs: nothing is parsed.
- An urlencoded body over 10 MiB is ignored entirely ("http: POST too large").
- multipart: lines before the first `--boundary` line are skipped (even `--boundary--\\n` in CRLF mode);
  a first delimiter ending in a bare LF switches the whole body to LF line ends; a part body ends at the
  first "<nl>--boundary" followed by space, tab, CR, LF, `--` or the end; a body that starts with
  `--boundary` directly is empty; after the close delimiter nothing is read; part header lines may end in
  LF or CRLF independently; a whitespace-only line after a header continues it (it does not end the
  headers); a part whose Content-Disposition fails to parse, or is not form-data, or has no name is
  skipped; a body that ends inside a part's headers (even right after a delimiter line) ends the form
  without error, that part dropped; `filename=""` makes a value part, not a file; `name*=utf-8''model`
  renames a part; `Content-Transfer-Encoding: quoted-printable` is decoded; limits: 1000 parts, 10,000
  header lines, maxMemory + 10 MiB for non-file data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"

# Go limits (net/url, net/http, mime/multipart). Beyond them Go drops data or fails; we refuse.
MAX_QUERY_PAIRS = 10_000
MAX_URLENCODED_BODY = 10 << 20
MAX_PARTS = 1000
# Go allows 10,000 per part and across file parts; we count every part of the request, which is stricter.
MAX_PART_HEADER_LINES = 10_000
# Non-file data Go keeps in memory is capped at maxMemory + 10 MiB; staying within 10 MiB for field values
# plus generous per-part overhead (see _part_cost) keeps us under Go's cap for any maxMemory.
FIELD_DATA_BUDGET = 10 << 20

# Our own limits, stricter than Go's, so that Go's buffer sizes never come into play.
MAX_BOUNDARY = 70  # RFC 2046; Go reads delimiter lines through a 4096-byte buffer
MAX_STRUCTURE_LINE = 4000  # preamble and delimiter lines: Go's bufio.ReadSlice fails past 4096
MAX_PREAMBLE = 64 * 1024
MAX_PART_HEADER_BLOCK = 64 * 1024

# RFC 2045 token bytes (mime.isTokenChar); the same set as RFC 7230 header names (validHeaderFieldByte).
_TOKEN_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# unicode.IsSpace restricted to ASCII; Go also skips U+0085 and U+00A0, which we refuse instead.
_ASCII_SPACE = b" \t\n\v\f\r"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A quoted-string as mime.consumeValue reads it: a backslash escapes only a tspecial (otherwise it is a
# literal backslash); CR and LF end it in failure.
_TSPECIAL_CLASS = rb'()<>@,;:\\"/\[\]?='  # RFC 2045 tspecials, inside a regex character class
_QUOTED = re.compile(rb'"((?:\\[' + _TSPECIAL_CLASS + rb']|\\(?![' + _TSPECIAL_CLASS + rb'])|[^"\\\r\n])*)"')
_QUOTED_ESCAPE = re.compile(rb"\\([" + _TSPECIAL_CLASS + rb"])")
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_BAD_HEADER_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # textproto validHeaderValueByte
_BLANK_LINE = re.compile(rb"\n\r?\n")
_IDENTITY_TRANSFER_ENCODINGS = frozenset({b"7bit", b"8bit", b"binary"})


class UnreadableForm(ValueError):
    """The request's form cannot be read exactly as Ollama (Go) will read it; the message suits a 400 body."""


def form_field_values(query: bytes, content_type: bytes | None, body: bytes,
                      field: str = "model") -> list[str]:
    """Every value of `field` that Go's `FormValue(field)` could return for this request, in Go's order.

    `query` is the raw query (after the target's first `?`, without it); `content_type` the value of the
    request's first Content-Type header (None when absent; a caller should refuse several Content-Type
    headers, since Go reads the first and others may read the last); `body` the whole body after any
    chunked framing is removed and NOT decompressed (Ollama does not decompress this route). Meant for
    POST (Go reads urlencoded bodies only for POST, PUT and PATCH). An empty list means Go finds no value.

    Raises UnreadableForm wherever Go's reading is not certain (see the module docstring).
    """
    field_bytes = field.encode("utf-8")
    query_values = _urlencoded_values(query, field, field_bytes, "the query")
    media = _form_media_type(content_type)
    if media is None:
        return query_values
    media_type, params = media
    if media_type == URLENCODED:
        if len(body) > MAX_URLENCODED_BODY:
            # Go ignores the whole body then, so the values it would hold are not what Go reads.
            raise UnreadableForm(f"form body over {MAX_URLENCODED_BODY} bytes")
        # r.Form holds the body's values before the query's (ParseForm copies PostForm first).
        return _urlencoded_values(body, field, field_bytes, "the form body") + query_values
    if media_type == MULTIPART:
        boundary = params.get("boundary")
        if boundary is None:
            raise UnreadableForm("multipart/form-data without a boundary")
        # ParseMultipartForm appends multipart values after the query's.
        return query_values + _multipart_values(body, boundary, field, field_bytes)
    return query_values


# --- urlencoded (query and body) ------------------------------------------------------------------------


def _urlencoded_values(data: bytes, field: str, field_bytes: bytes, where: str) -> list[str]:
    """url.ParseQuery's values for `field`, refusing pairs Go drops that could still name the field."""
    if data.count(b"&") + 1 > MAX_QUERY_PAIRS:
        raise UnreadableForm(f"more than {MAX_QUERY_PAIRS} parameters in {where}")
    values: list[str] = []
    for pair in data.split(b"&"):
        if not pair:
            continue
        if b";" in pair:
            # Go drops the pair (semicolons are no separator since Go 1.17); other readers split on ';'.
            if _mentions(pair, field):
                raise UnreadableForm(f"a ';' in a parameter that may name {field!r} in {where}")
            continue
        raw_key, _, raw_value = pair.partition(b"=")
        key = _query_unescape(raw_key)
        value = _query_unescape(raw_value)
        if key is None or value is None:
            if _mentions(pair, field):
                raise UnreadableForm(f"a bad %-escape in a parameter that may name {field!r} in {where}")
            continue
        if key == field_bytes:
            values.append(_text(value, field, where))
        elif _loosely_names(key, field):
            raise UnreadableForm(f"a parameter named like {field!r} but not exactly in {where}")
    return values


def _query_unescape(raw: bytes) -> bytes | None:
    """url.QueryUnescape: every '%' takes two hex digits (else None, Go's error), '+' is a space."""
    if _BAD_PERCENT.search(raw):
        return None
    return unquote_to_bytes(raw.replace(b"+", b" "))


def _mentions(raw_pair: bytes, field: str) -> bool:
    """Whether a pair Go drops could be read by some other parser as naming `field` (lenient, casefolded)."""
    lenient = unquote_to_bytes(raw_pair.replace(b"+", b" ")).decode("utf-8", "replace").casefold()
    return field.casefold() in lenient


def _loosely_names(name: bytes, field: str) -> bool:
    """A name Go's exact map lookup tells apart from `field` but a human or another parser might not.

    Decision: names equal to the field up to case (Unicode casefolding, which also folds `ſ`/`K`) or up to
    surrounding whitespace/NUL are refused. Go ignores them, but Ollama's JSON routes do match keys
    case-insensitively, so such a request is at best a mistake and at worst an attempt to confuse a gate.
    """
    return name.decode("utf-8", "replace").strip().strip("\x00").casefold() == field.casefold()


def _text(value: bytes, field: str, where: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise UnreadableForm(f"{field!r} in {where} is not valid UTF-8") from None


# --- media types (Content-Type, Content-Disposition) -----------------------------------------------------


def _form_media_type(content_type: bytes | None) -> tuple[str, dict[str, bytes]] | None:
    """The request's media type and parameters, as mime.ParseMediaType gives them; None: no body form."""
    if content_type is None:
        return None
    content_type = content_type.strip(b" \t")  # Go's header reader trims the value
    if not content_type:
        return None  # Go: "" is application/octet-stream, and not multipart
    if not content_type.isascii():
        # Go lower-cases with Unicode rules (U+0130 becomes 'i') and trims Unicode space.
        raise UnreadableForm("non-ASCII Content-Type")
    media = parse_media_type(content_type)
    if any("*" in name for name in media.names):
        raise UnreadableForm("RFC 2231 parameters in Content-Type")
    return media.media_type, media.params


@dataclass(frozen=True, slots=True)
class MediaType:
    """mime.ParseMediaType's result: the lower-case type, its parameters (lower-case names, RFC 2231 pieces
    stitched as Go does), and every parameter name as written (lower-cased), starred ones included."""

    media_type: str
    params: dict[str, bytes]
    names: tuple[str, ...]


def parse_media_type(value: bytes) -> MediaType:
    """mime.ParseMediaType, for values whose structure is ASCII (quoted strings may hold any byte).

    Raises UnreadableForm where Go fails, and where Go would apply Unicode rules (non-ASCII in the type or
    where Go skips Unicode white space). Go returns the media type with ErrInvalidMediaParameter for bad
    parameters and some callers use it anyway: we refuse all of those.
    """
    base = value.split(b";", 1)[0]
    if not base.isascii():
        raise UnreadableForm("non-ASCII media type")
    media_type = base.lower().strip(_ASCII_SPACE).decode("ascii")
    _check_media_type(media_type)

    params: dict[str, bytes] = {}
    names: list[str] = []
    # Parameters whose name has a '*' (RFC 2231), by base name, stitched after the loop as Go does.
    starred: dict[str, dict[str, bytes]] = {}
    rest = value[len(base):]
    position = 0
    while True:
        position = _skip_space(rest, position)
        if position == len(rest):
            break
        parsed = _media_param(rest, position)
        if parsed is None:
            if rest[position:].strip(_ASCII_SPACE) == b";":
                break  # Go ignores trailing semicolons
            raise UnreadableForm("unreadable media type parameters")
        name, param_value, position = parsed
        names.append(name)
        target = starred.setdefault(name.split("*", 1)[0], {}) if "*" in name else params
        if name in target and target[name] != param_value:
            raise UnreadableForm(f"duplicate media type parameter {name!r}")
        target[name] = param_value
    for base_name, pieces in starred.items():
        stitched = _stitch_rfc2231(base_name, pieces)
        if stitched is not None:
            params[base_name] = stitched
    return MediaType(media_type, params, tuple(names))


def _check_media_type(media_type: str) -> None:
    """mime.checkMediaTypeDisposition: token, optionally '/' token, nothing else."""
    kind, slash, subtype = media_type.partition("/")
    if not _is_token(kind) or (slash and not _is_token(subtype)):
        raise UnreadableForm("unreadable media type")


def _is_token(text: str) -> bool:
    return bool(text) and all(ord(c) in _TOKEN_BYTES for c in text)


def _skip_space(data: bytes, position: int) -> int:
    """strings.TrimLeftFunc(unicode.IsSpace) for ASCII; a non-ASCII byte here may be Unicode space: refuse."""
    end = len(data)
    while position < end and data[position] in _ASCII_SPACE:
        position += 1
    if position < end and data[position] >= 0x80:
        raise UnreadableForm("non-ASCII between media type parameters")
    return position


def _media_param(data: bytes, position: int) -> tuple[str, bytes, int] | None:
    """mime.consumeMediaParam from `position`: `; name = value`; None where Go's returns no name."""
    if not data.startswith(b";", position):
        return None
    position = _skip_space(data, position + 1)
    token = _TOKEN.match(data, position)
    if token is None:
        return None
    key = token.group().lower().decode("ascii")
    position = _skip_space(data, token.end())
    if not data.startswith(b"=", position):
        return None
    position = _skip_space(data, position + 1)
    if data.startswith(b'"', position):
        quoted = _QUOTED.match(data, position)
        if quoted is None:
            return None
        return key, _QUOTED_ESCAPE.sub(rb"\1", quoted.group(1)), quoted.end()
    token = _TOKEN.match(data, position)
    if token is None:
        return None  # an empty token is a failure (an empty quoted string is not)
    return key, token.group(), token.end()


def _stitch_rfc2231(base_name: str, pieces: dict[str, bytes]) -> bytes | None:
    """The value Go's ParseMediaType gives `base_name` from its starred pieces; None: leaves it alone."""
    single = pieces.get(base_name + "*")
    if single is not None:
        return _decode_rfc2231(single)
    stitched: list[bytes] = []
    index = 0
    while True:
        plain = f"{base_name}*{index}"
        if plain in pieces:
            stitched.append(pieces[plain])
        elif plain + "*" in pieces:
            encoded = pieces[plain + "*"]
            if index == 0:
                stitched.append(_decode_rfc2231(encoded) or b"")
            else:
                stitched.append(_percent_unescape(encoded) or b"")
        else:
            break
        index += 1
    return b"".join(stitched) if index else None


def _decode_rfc2231(value: bytes) -> bytes | None:
    charset, sep, rest = value.partition(b"'")
    if not sep:
        return None
    _language, sep, encoded = rest.partition(b"'")
    if not sep or charset.lower() not in (b"us-ascii", b"utf-8"):
        return None
    return _percent_unescape(encoded)


def _percent_unescape(value: bytes) -> bytes | None:
    if _BAD_PERCENT.search(value):
        return None
    return unquote_to_bytes(value)


# --- multipart/form-data ---------------------------------------------------------------------------------


def _multipart_values(body: bytes, boundary: bytes, field: str, field_bytes: bytes) -> list[str]:
    """The values of `field` in a multipart/form-data body, read as mime/multipart's Reader.ReadForm does."""
    if not boundary:
        raise UnreadableForm("empty multipart boundary")
    if len(boundary) > MAX_BOUNDARY:
        raise UnreadableForm(f"multipart boundary over {MAX_BOUNDARY} bytes")
    dash_boundary = re.escape(b"--" + boundary)

    # Preamble: Go skips every line until a delimiter line (`--b` + LWSP + CRLF, or LF, which switches the
    # body to LF mode) or a close delimiter line (CRLF mode: `--b--` + LWSP + CRLF or the end).
    first = re.compile(rb"(?m)^" + dash_boundary + rb"(?:[ \t]*(?P<nl>\r?\n)|--[ \t]*(?:\r\n|\Z))")
    search_end = min(len(body), MAX_PREAMBLE + MAX_STRUCTURE_LINE)
    opening = first.search(body, 0, search_end)
    if opening is None:
        raise UnreadableForm("no multipart delimiter at the start of the body")
    if opening.end() == search_end < len(body):
        # `\Z` matched where the search stopped, not at the end of the body: a line this long is refused
        raise UnreadableForm("multipart preamble too long")
    preamble = body[:opening.start()]
    if len(preamble) > MAX_PREAMBLE or any(len(line) >= MAX_STRUCTURE_LINE for line in preamble.split(b"\n")):
        raise UnreadableForm("multipart preamble too long")
    if opening.end() - opening.start() > MAX_STRUCTURE_LINE:
        raise UnreadableForm("multipart delimiter line too long")
    nl = opening.group("nl")
    if nl is None:
        return []  # the body closes before any part: an empty form

    nl_re = re.escape(nl)
    # A part's content ends at the first <nl>--boundary that Go's matchAfterPrefix accepts.
    content_end = re.compile(nl_re + dash_boundary + rb"(?:[ \t\r\n]|--|\Z)")
    # Content that starts with --boundary (no line break before it) is empty.
    empty_content = re.compile(dash_boundary + rb"(?:[ \t\r\n]|--|\Z)")
    # The line after a part: another delimiter, or the close delimiter (then nothing more is read).
    next_line = re.compile(
        dash_boundary + rb"(?:[ \t]*" + nl_re + rb"|(?P<close>--[ \t]*(?:" + nl_re + rb"|\Z)))")

    values: list[str] = []
    header_lines = 0
    field_data = 0
    position = opening.end()
    for _part in range(MAX_PARTS):
        headers, content_start = _part_headers(body, position)
        header_lines += len(headers)
        if header_lines > MAX_PART_HEADER_LINES:
            raise UnreadableForm("too many multipart header lines")
        name, is_file = _part_name(headers, field, field_bytes)

        if empty_content.match(body, content_start):
            content_stop = line_start = content_start
        else:
            end = content_end.search(body, content_start)
            if end is None:
                raise UnreadableForm("multipart body without its closing delimiter")
            content_stop = end.start()
            line_start = content_stop + len(nl)
        delimiter = next_line.match(body, line_start)
        if delimiter is None:
            raise UnreadableForm("malformed multipart delimiter line")
        if delimiter.end() - line_start > MAX_STRUCTURE_LINE:
            raise UnreadableForm("multipart delimiter line too long")

        field_data += _part_cost(headers, name)
        if not is_file:
            field_data += content_stop - content_start
        if field_data > FIELD_DATA_BUDGET:
            raise UnreadableForm("multipart form fields too large")
        if name == field_bytes:
            values.append(_text(body[content_start:content_stop], field, "the multipart form"))
        if delimiter.group("close") is not None:
            return values
        position = delimiter.end()
    raise UnreadableForm(f"more than {MAX_PARTS} multipart parts")


def _part_headers(body: bytes, position: int) -> tuple[list[tuple[bytes, bytes]], int]:
    """A part's header fields (lower-case name, value) as net/textproto reads them, and where its content
    starts."""
    if body.startswith(b"\n", position):
        return [], position + 1
    if body.startswith(b"\r\n", position):
        return [], position + 2
    blank = _BLANK_LINE.search(body, position, position + MAX_PART_HEADER_BLOCK)
    if blank is None:
        raise UnreadableForm("multipart part headers unterminated or too long")
    headers: list[tuple[bytes, bytes]] = []
    for line in body[position:blank.start()].split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]  # bufio.ReadLine drops one CR before the LF, and only that one
        if line[:1] in (b" ", b"\t"):
            # Go joins a line starting with white space to the previous header (even an all-space line,
            # which then does not end the headers); other readers do not: refuse.
            raise UnreadableForm("folded multipart header line")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            # Go fails on these, except a name with spaces, which it keeps uncanonicalised: refuse both.
            raise UnreadableForm("malformed multipart header line")
        value = value.strip(b" \t")
        if _BAD_HEADER_VALUE_BYTE.search(value):
            raise UnreadableForm("control character in a multipart header")
        headers.append((name.lower(), value))
    return headers, blank.end()


def _part_name(headers: list[tuple[bytes, bytes]], field: str, field_bytes: bytes) -> tuple[bytes, bool]:
    """The part's form name and whether Go stores it as a file; refuses parts Go would skip or misread."""
    dispositions = [value for name, value in headers if name == b"content-disposition"]
    if len(dispositions) != 1:
        # Go skips a part without one (we refuse nameless parts) and reads the first of several.
        raise UnreadableForm("a multipart part needs exactly one Content-Disposition")
    disposition = parse_media_type(dispositions[0])
    params = disposition.params
    if disposition.media_type != "form-data":
        raise UnreadableForm("a multipart part that is not form-data")
    if any("*" in key and key.split("*", 1)[0] == "name" for key in disposition.names):
        raise UnreadableForm("RFC 2231 encoded part name")
    name = params.get("name", b"")
    if not name:
        raise UnreadableForm("a multipart part without a name")
    for header, value in headers:
        if header == b"content-transfer-encoding" and value.lower() not in _IDENTITY_TRANSFER_ENCODINGS:
            # Go decodes quoted-printable (and fails the whole form on bad input); other encodings it
            # passes through raw, which a client would not expect.
            raise UnreadableForm("unsupported Content-Transfer-Encoding in a multipart part")
    if name == field_bytes:
        if any(key.split("*", 1)[0] == "filename" for key in disposition.names):
            raise UnreadableForm(f"the {field!r} part is a file")
        if any(header == b"content-type" and value.lower().lstrip().startswith(b"multipart/")
               for header, value in headers):
            raise UnreadableForm(f"nested multipart in the {field!r} part")
        return name, False
    if _loosely_names(name, field):
        raise UnreadableForm(f"a multipart part named like {field!r} but not exactly")
    # Part.FileName: a non-empty filename (after RFC 2231 stitching) makes a file part.
    return name, bool(params.get("filename"))


def _part_cost(headers: list[tuple[bytes, bytes]], name: bytes) -> int:
    """An upper bound of what Go's ReadForm charges a part beyond its value bytes.

    Go charges len(name) + 200 per part, a file part's headers (400 + per field name + 200 + value) plus
    300, and checks each part's headers (name + 200 + value per field) against what is left. Doubling the
    header cost and adding 1100 covers all of it.
    """
    header_cost = sum(len(key) + len(value) + 200 for key, value in headers)
    return 1100 + len(name) + 2 * header_cost
