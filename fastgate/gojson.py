"""Read JSON request bodies exactly as Ollama's Go `encoding/json` does, or refuse them.

What this module owns: the one reading of a request body's JSON that the policy trusts. fastgate allows or
refuses a request by the model it names, but Ollama acts on the model *it* reads. Ollama decodes bodies
with `json.NewDecoder(body).Decode(&req)` into structs with `string` fields, and Go's reading differs from
Python's `json` module in ways a client can use to show fastgate one model and Ollama another:

- keys match struct fields case-insensitively under Unicode simple folding (`"Model"`, `"ſource"` with
  U+017F, `"\u212aey"`), and every matching key assigns, so the last one wins;
- `null` leaves a string field unchanged (`{"model":"a","model":null}` reads as "a");
- only the first JSON value is read: bytes after it are ignored;
- invalid UTF-8 and unpaired `\\u` surrogates in strings become U+FFFD instead of an error;
- nesting is allowed to 10,000 levels, and numbers of any length are accepted where they are skipped.

So this module resolves fields by Go's rules, and refuses (raises `UnreadableBody`, an HTTP 400) whatever it
cannot read exactly as Go would: JSON Go's scanner rejects, anything but whitespace after the value, a model
field holding a non-string (Go fails with a type error) or a string that is not valid UTF-8 (Go would read
U+FFFD, which no model name holds). Failing closed keeps the invariant the policy relies on: when fastgate
accepts a body, the value it sees for a field is the value Ollama will use.

Invariants:
- `scan_object`/`scan_array` validate the value once, left to right, in time linear in its length: regexes
  over bytes consume strings and runs of shallow values in C, and nesting is walked with an explicit stack
  (no recursion, so 10,000 levels need no recursion limit). Values are never decoded into Python objects,
  so numbers are never converted (no 4300-digit limit) and a string's text is decoded only when asked for.
- Spans are byte offsets into the caller's `body`; nothing is copied, and `remove_members` keeps every byte
  it does not remove.
- Pure: no I/O, standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = ["MAX_DEPTH", "Element", "Kind", "Member", "UnreadableBody", "go_key_matches", "go_string_field",
           "remove_members", "scan_array", "scan_object", "string_text"]

# encoding/json's scanner refuses a value nested deeper than this (maxNestingDepth); the top-level object
# counts as the first level. Verified with Go 1.27: 10,000 nested arrays decode, 10,001 do not.
MAX_DEPTH = 10_000

Kind = Literal["string", "null", "object", "array", "number", "bool"]


class UnreadableBody(ValueError):
    """A body fastgate cannot read exactly as Go would. The message is fit for an HTTP 400 answer."""


# ---------------------------------------------------------------------------------------------------------
# Grammar (RFC 8259 as Go's scanner applies it): whitespace is only space, tab, CR and LF; strings hold no
# raw byte below 0x20 and only the escapes \" \\ \/ \b \f \n \r \t \uXXXX; any other byte (including invalid
# UTF-8) is accepted inside strings, as Go does. Possessive quantifiers (`*+`, `++`, `?+`) never backtrack,
# so every pattern runs in linear time, and a long string is one C-level loop over a character class.

_WS = rb"[ \t\r\n]*+"
# The bytes a string holds as they are: written as a positive class (not [^"\\\x00-\x1f]) because the regex
# compiler turns it into a 256-bit table, one lookup per byte, about twice as fast on multi-MiB strings.
_PLAIN = rb"[\x20\x21\x23-\x5b\x5d-\xff]"
_ESCAPE_TAIL = rb'(?:["\\/bfnrt]|u[0-9a-fA-F]{4})'  # what may follow a backslash
# "Unrolled" (plain run, then escape + plain run, repeated): one loop iteration per escape, not per byte.
_STRING_BODY = _PLAIN + rb"*+(?:\\" + _ESCAPE_TAIL + _PLAIN + rb"*+)*+"
_STRING = rb'"' + _STRING_BODY + rb'"'
_NUMBER = rb"-?+(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][+-]?+[0-9]++)?+"
_SCALAR = rb"(?:" + _STRING + rb"|" + _NUMBER + rb"|true|false|null)"

# How many container levels one regex call takes. Values nested deeper are walked a level at a time with an
# explicit stack; shallower ones (messages: [{role, content}], a tool's parameters) are consumed whole in C.
# Each level doubles the patterns' size (and compile time): 3 keeps them a few KiB, compiled in ~40 ms.
_FAST_LEVELS = 3


def _item_pattern(levels: int) -> bytes:
    """A value nested at most `levels` containers deep; only valid JSON matches (no trailing commas)."""
    if levels == 0:
        return _SCALAR
    inner = _item_pattern(levels - 1)
    # After each element: a comma that is not followed by the closer, or the closer itself (not consumed).
    array = rb"\[" + _WS + rb"(?:" + inner + _WS + rb"(?:," + _WS + rb"(?=[^\]])|(?=\])))*+\]"
    obj = (rb"\{" + _WS + rb"(?:" + _STRING + _WS + rb":" + _WS + inner + _WS
           + rb'(?:,' + _WS + rb'(?=")|(?=\})))*+\}')
    return rb"(?:" + _SCALAR + rb"|" + array + rb"|" + obj + rb")"


@dataclass(frozen=True, slots=True)
class _FastPatterns:
    """The patterns for one nesting allowance (how many more levels may open before Go's limit).

    The four container patterns consume as many elements as the allowance covers, then end with one of:
    the container's closer (the container is complete), an opener (an element deeper than the allowance,
    or malformed inside: the walker pushes it and goes on inside), or nothing (an error right there). So
    the walker makes one regex call per container that is deeper than the allowance, not one per token.
    """

    item: re.Pattern[bytes]  # one value
    member: re.Pattern[bytes]  # key `:` [value, then `,` or `}`]; the value group is unset if it goes deeper
    array_open: re.Pattern[bytes]  # right after `[`
    array_next: re.Pattern[bytes]  # right after an element of an array
    object_open: re.Pattern[bytes]  # right after `{`
    object_next: re.Pattern[bytes]  # right after a member's value


def _compile(levels: int) -> _FastPatterns:
    item = _item_pattern(levels)
    key = _STRING + _WS + rb":" + _WS
    comma = _WS + rb"," + _WS
    opener = rb"([\[{])"
    return _FastPatterns(
        item=re.compile(item),
        member=re.compile(rb"(" + _STRING + rb")" + _WS + rb":" + _WS
                          + rb"(?:(" + item + rb")" + _WS + rb"(?:(,)" + _WS + rb"|\}))?"),
        # Each element followed by a comma that is not followed by `]`, or by `]` itself (not consumed).
        array_open=re.compile(_WS + rb"(?:" + item + _WS + rb"(?:," + _WS + rb"(?!\])|(?=\])))*+"
                              + rb"(?:(\])|" + opener + rb")?"),
        array_next=re.compile(rb"(?:" + comma + item + rb")*+" + _WS + rb"(?:(\])|," + _WS + opener + rb")?"),
        # Each member followed by a comma and the next key's quote, or by `}` (not consumed).
        object_open=re.compile(_WS + rb"(?:" + key + item + _WS + rb'(?:,' + _WS + rb'(?=")|(?=\})))*+'
                               + rb"(?:(\})|" + key + opener + rb")?"),
        object_next=re.compile(rb"(?:" + comma + key + item + rb")*+" + _WS
                               + rb"(?:(\})|," + _WS + key + opener + rb")?"),
    )


# Compiled on first use, so importing fastgate stays quick (two threads racing here at worst compile twice).
# Within _FAST_LEVELS of MAX_DEPTH the allowance shrinks, so the fast path never accepts nesting Go refuses.
_PATTERNS: dict[int, _FastPatterns] = {}


def _patterns(open_levels: int) -> _FastPatterns:
    """The fast patterns for values inside `open_levels` open containers."""
    allowance = min(_FAST_LEVELS, MAX_DEPTH - open_levels)
    found = _PATTERNS.get(allowance)
    if found is None:
        found = _PATTERNS[allowance] = _compile(allowance)
    return found


def warm_up() -> None:
    """Compile the patterns ordinary bodies use now (tens of milliseconds), so a server pays it at startup
    instead of on the event loop when the first body arrives."""
    _patterns(0)


_KEY = re.compile(rb"(" + _STRING + rb")" + _WS + rb":" + _WS)
_SPACE = re.compile(_WS)
_SPACE_BYTES = frozenset(b" \t\r\n")  # what _WS takes
# Error reporting only: whether a string token is whole, and how far a malformed one got.
_STRING_TOKEN = re.compile(_STRING)
_STRING_PREFIX = re.compile(rb'"' + _STRING_BODY)

_OPEN_ARRAY, _CLOSE_ARRAY, _OPEN_OBJECT, _CLOSE_OBJECT = b"[]{}"
_COMMA, _QUOTE = ord(","), ord('"')
_LOOKING_FOR_KEY = "looking for beginning of object key string"
_KIND_BY_FIRST_BYTE: dict[int, Kind] = {
    ord('"'): "string", ord("{"): "object", ord("["): "array", ord("t"): "bool", ord("f"): "bool",
    ord("n"): "null", **{b: "number" for b in b"-0123456789"}}


def _fail(body: bytes, pos: int, end: int, context: str) -> UnreadableBody:
    """The error for a body that breaks the grammar at `pos` (the start of the token that does not fit)."""
    pos = _SPACE.match(body, pos, end).end()  # type: ignore[union-attr]
    if pos < end and body[pos] == _QUOTE:
        token = _STRING_TOKEN.match(body, pos, end)
        if token is None:  # a string that does not close properly: point at the byte that breaks it
            pos = _STRING_PREFIX.match(body, pos, end).end()  # type: ignore[union-attr]
            context = "in string literal"
        elif context == _LOOKING_FOR_KEY:  # a good key without its colon
            pos = _SPACE.match(body, token.end(), end).end()  # type: ignore[union-attr]
            context = "after object key"
    if pos >= end:
        return UnreadableBody("request body is not valid JSON: unexpected end of JSON input")
    byte = body[pos]
    shown = repr(chr(byte)) if 0x20 < byte < 0x7F else f"0x{byte:02x}"
    return UnreadableBody(f"request body is not valid JSON: invalid character {shown} {context} (byte {pos})")


def _too_deep(pos: int) -> UnreadableBody:
    return UnreadableBody(f"request body is not valid JSON: nested deeper than {MAX_DEPTH} levels "
                          f"(byte {pos})")


def _value_end(body: bytes, pos: int, end: int, depth: int, *, whole_item_failed: bool = False) -> int:
    """Check the JSON value starting exactly at `pos` and return the offset just past it.

    `depth` is the number of containers already open around the value; `whole_item_failed` says the caller
    already tried the fast item pattern on this container (so its content is walked without a second try).
    Iterative: `closers` is the stack of open containers, so deep nesting costs memory proportional to its
    depth, never Python recursion.
    """
    opener = body[pos] if pos < end else -1
    if not whole_item_failed or (opener != _OPEN_ARRAY and opener != _OPEN_OBJECT):
        match = _patterns(depth).item.match(body, pos, end)
        if match is not None:
            return match.end()
    if opener != _OPEN_ARRAY and opener != _OPEN_OBJECT:
        raise _fail(body, pos, end, "looking for beginning of value")
    closers: list[int] = []
    # The patterns with the full allowance serve every level up to `roomy_levels`; only near Go's limit are
    # smaller allowances looked up (keeps the per-container step cheap: deep bodies take one per container).
    roomy_levels = MAX_DEPTH - _FAST_LEVELS
    roomy = _patterns(0)
    just_opened = True
    while True:
        # `opener` sits at pos: open it, then take as much of its content as the fast patterns cover.
        open_levels = depth + len(closers)
        if just_opened:
            if open_levels >= MAX_DEPTH:
                raise _too_deep(pos)
            closer = _CLOSE_ARRAY if opener == _OPEN_ARRAY else _CLOSE_OBJECT
            closers.append(closer)
            open_levels += 1
            pos += 1
        else:
            closer = closers[-1]
        patterns = roomy if open_levels <= roomy_levels else _patterns(open_levels)
        if closer == _CLOSE_ARRAY:
            match = (patterns.array_open if just_opened else patterns.array_next).match(body, pos, end)
        else:
            match = (patterns.object_open if just_opened else patterns.object_next).match(body, pos, end)
        if match.lastindex is None:  # type: ignore[union-attr]
            raise _diagnose(body, pos, end, closer, just_opened, patterns.item)
        last = match.end() - 1  # type: ignore[union-attr]  # the closer or the opener that ended the match
        if body[last] == closer:
            closers.pop()
            pos = last + 1
            if not closers:
                return pos
            just_opened = False
        else:
            opener = body[last]
            pos = last
            just_opened = True


def _diagnose(body: bytes, pos: int, end: int, closer: int, just_opened: bool,
              item: re.Pattern[bytes]) -> UnreadableBody:
    """The error in a container's content, from `pos` (just after its opener, or after an element).

    Runs only for a refused body: walks the elements one at a time to name the first byte that does not fit.
    The fast patterns take every valid element and push every container, so the error is among these.
    """
    after_element = "after array element" if closer == _CLOSE_ARRAY else "after object key:value pair"
    while True:
        pos = _SPACE.match(body, pos, end).end()  # type: ignore[union-attr]
        if not just_opened:
            if pos >= end or body[pos] != _COMMA:
                return _fail(body, pos, end, after_element)
            pos = _SPACE.match(body, pos + 1, end).end()  # type: ignore[union-attr]
        just_opened = False
        if closer == _CLOSE_OBJECT:
            key = _KEY.match(body, pos, end)
            if key is None:
                return _fail(body, pos, end, _LOOKING_FOR_KEY)
            pos = key.end()
        match = item.match(body, pos, end)
        if match is None:
            return _fail(body, pos, end, "looking for beginning of value")
        pos = match.end()


def _first_value(body: bytes, start: int, end: int | None) -> tuple[int, int]:
    """(start of the first value, end of the span), refusing an empty body as Go does (io.EOF)."""
    end = len(body) if end is None else end
    pos = start
    if pos < end and body[pos] in _SPACE_BYTES:  # a regex call costs more than this test: skip it when it can
        pos = _SPACE.match(body, pos, end).end()  # type: ignore[union-attr]
    if pos >= end:
        raise UnreadableBody("request body is empty: expected a JSON object")
    return pos, end


def _check_rest(body: bytes, pos: int, end: int, trailing_ok: bool) -> None:
    # Go's Decoder stops after the first value and ignores the rest, so a second value could carry a model
    # fastgate never judged (or judged instead): only whitespace may follow.
    if trailing_ok or pos >= end:
        return
    pos = _SPACE.match(body, pos, end).end()  # type: ignore[union-attr]
    if pos < end:
        raise UnreadableBody(f"request body is not valid JSON: data after the JSON value (byte {pos})")


# ---------------------------------------------------------------------------------------------------------
# Strings

# Escapes, with a surrogate pair first so it combines into one character as Go's unquote does.
_ESCAPE = re.compile(r"\\(?:u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})"  # high, low
                     r"|u([0-9a-fA-F]{4})|(.))")
_SLICED_STRING = 4096
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def string_text(body: bytes, start: int, end: int) -> str | None:
    """The text of the valid JSON string token body[start:end] (quotes included); None where Go would put
    U+FFFD (invalid UTF-8, an unpaired surrogate escape), since that is not the text the client wrote."""
    # Escapes are ASCII: decoding first is safe. A long string is decoded through a memoryview (not copied
    # first); a short one's slice costs less than making the view.
    try:
        if end - start <= _SLICED_STRING:
            text = body[start + 1:end - 1].decode()
        else:
            text = str(memoryview(body)[start + 1:end - 1], "utf-8")
    except UnicodeDecodeError:
        return None
    if "\\" not in text:
        return text
    unpaired = False

    def unescape(match: re.Match[str]) -> str:
        nonlocal unpaired
        high, low, single, simple = match.groups()
        if high is not None:
            return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00))
        if single is not None:
            code = int(single, 16)
            unpaired = unpaired or 0xD800 <= code <= 0xDFFF
            return chr(code)
        return _SIMPLE_ESCAPES[simple]

    text = _ESCAPE.sub(unescape, text)
    return None if unpaired else text


# ---------------------------------------------------------------------------------------------------------
# Objects and arrays


class Member(NamedTuple):
    """One member of a scanned object. Spans are offsets into the scanned body.

    A named tuple rather than a dataclass: bodies can hold hundreds of thousands of members, and a tuple is
    built several times faster than a frozen dataclass instance.
    """

    name: str | None  # decoded key; None when it holds invalid UTF-8 or an unpaired surrogate escape
    kind: Kind
    start: int  # the opening quote of the key
    value_start: int  # the first byte of the value
    end: int  # just past the value
    body: bytes

    @property
    def text(self) -> str | None:
        """The string value's text (decoded on each access); None for other kinds or unreadable text."""
        if self.kind != "string":
            return None
        return string_text(self.body, self.value_start, self.end)

    def __repr__(self) -> str:  # the body can be megabytes: leave it out
        return f"Member({self.name!r}, {self.kind}, {self.start}, {self.value_start}, {self.end})"


class Element(NamedTuple):
    """One element of a scanned array. Spans are offsets into the scanned body."""

    kind: Kind
    start: int  # the first byte of the value
    end: int  # just past the value
    body: bytes

    @property
    def text(self) -> str | None:
        """The string value's text (decoded on each access); None for other kinds or unreadable text."""
        if self.kind != "string":
            return None
        return string_text(self.body, self.start, self.end)

    def __repr__(self) -> str:
        return f"Element({self.kind}, {self.start}, {self.end})"


# Builds a named tuple without its Python-level __new__: a third of the per-member cost on bodies with
# hundreds of thousands of members.
_new_tuple = tuple.__new__


def _separator(body: bytes, pos: int, end: int, closer: int, context: str) -> tuple[int, bool]:
    """After a value deeper than the fast patterns: (position of the next entry or past the closer, more?)."""
    pos = _SPACE.match(body, pos, end).end()  # type: ignore[union-attr]
    byte = body[pos] if pos < end else -1
    if byte == _COMMA:
        return _SPACE.match(body, pos + 1, end).end(), True  # type: ignore[union-attr]
    if byte == closer:
        return pos + 1, False
    raise _fail(body, pos, end, context)


def scan_object(body: bytes, start: int = 0, end: int | None = None, *,
                trailing_ok: bool = False) -> list[Member] | None:
    """Validate the first JSON value in body[start:end] as Go's scanner does and return the members of the
    object it is, in order, duplicates included; None when it is valid JSON but not an object.

    Raises UnreadableBody for anything Go's scanner rejects (nesting is counted from `start`), for an empty
    span, and for anything but whitespace after the value unless `trailing_ok`. To walk a nested object, pass
    a member's span: `scan_object(body, m.value_start, m.end)`.
    """
    pos, end = _first_value(body, start, end)
    if body[pos] != _OPEN_OBJECT:
        _check_rest(body, _value_end(body, pos, end, 0), end, trailing_ok)
        return None
    members: list[Member] = []
    pos += 1
    if pos < end and body[pos] in _SPACE_BYTES:
        pos = _SPACE.match(body, pos, end).end()  # type: ignore[union-attr]
    if pos < end and body[pos] == _CLOSE_OBJECT:
        pos += 1
    else:
        # Values sit inside the object: one level open, so _patterns(1), the full allowance (looked up
        # directly once compiled).
        member_at = (_PATTERNS.get(_FAST_LEVELS) or _patterns(1)).member.match
        append = members.append
        kind_of = _KIND_BY_FIRST_BYTE
        more = True
        while more:
            # One regex call per member: key, colon, value (if no deeper than the fast patterns go) and the
            # separator after it. The loop is written for speed: bodies can hold 10^5 members.
            match = member_at(body, pos, end)
            if match is None:
                raise _fail(body, pos, end, _LOOKING_FOR_KEY)
            key_start, key_end = match.span(1)
            value_start, value_end = match.span(2)
            if value_start >= 0:
                more = match.lastindex == 3  # the comma group
                pos = match.end()
            else:  # deeper than the fast patterns (or malformed): walk it
                value_start = match.end()
                value_end = _value_end(body, value_start, end, 1, whole_item_failed=True)
                pos, more = _separator(body, value_end, end, _CLOSE_OBJECT, "after object key:value pair")
            raw_key = body[key_start + 1:key_end - 1]
            if 92 in raw_key:  # a backslash (an int's membership is a memchr; a bytes needle's costs ~10x)
                name = string_text(body, key_start, key_end)
            else:
                try:
                    name = raw_key.decode()
                except UnicodeDecodeError:
                    name = None
            append(_new_tuple(Member, (name, kind_of[body[value_start]], key_start, value_start, value_end,
                                       body)))
    _check_rest(body, pos, end, trailing_ok)
    return members


def scan_array(body: bytes, start: int = 0, end: int | None = None, *,
               trailing_ok: bool = False) -> list[Element] | None:
    """Like `scan_object`, for an array: its elements in order; None when the value is not an array."""
    pos, end = _first_value(body, start, end)
    if body[pos] != _OPEN_ARRAY:
        _check_rest(body, _value_end(body, pos, end, 0), end, trailing_ok)
        return None
    elements: list[Element] = []
    pos = _SPACE.match(body, pos + 1, end).end()  # type: ignore[union-attr]
    if pos < end and body[pos] == _CLOSE_ARRAY:
        pos += 1
    else:
        item_at = _patterns(1).item.match  # elements sit inside the array: one level open
        more = True
        while more:
            value_start = pos
            match = item_at(body, pos, end)
            if match is not None:
                value_end = match.end()
            else:
                value_end = _value_end(body, pos, end, 1, whole_item_failed=True)
            pos, more = _separator(body, value_end, end, _CLOSE_ARRAY, "after array element")
            elements.append(_new_tuple(Element, (_KIND_BY_FIRST_BYTE[body[value_start]], value_start,
                                                 value_end, body)))
    _check_rest(body, pos, end, trailing_ok)
    return elements


# ---------------------------------------------------------------------------------------------------------
# Fields

# The non-ASCII characters Go's key matching (bytes.EqualFold over unicode.SimpleFold orbits) treats as equal
# to an ASCII letter. Asked of Go 1.27 itself (tests/go_oracle/json, op "folds"), not guessed: only these two.
# U+0130 (İ) and U+0131 (ı) are *not* among them (they fold to i only under full or Turkish case mapping).
_FOLDS_TO_ASCII = str.maketrans({"\u017f": "s", "\u212a": "k"})


def go_key_matches(key: str, field_name: str) -> bool:
    """Whether Go decodes a member with this key into the struct field tagged `field_name` (ASCII)."""
    if key == field_name:
        return True
    if len(key) != len(field_name):  # folding maps each character to one character
        return False
    folded = key.translate(_FOLDS_TO_ASCII)
    return folded.isascii() and folded.lower() == field_name.lower()


def go_string_field(members: Sequence[Member], field_name: str) -> str | None:
    """The value Go leaves in a `string` field tagged `field_name` after decoding these members.

    Every member whose key matches (exactly or under Go's folding) assigns in order, so the last one wins;
    null assigns nothing. Any other kind makes Go's Decode fail (a type error), and a string Go would read
    with U+FFFD cannot be judged: both raise UnreadableBody. None when nothing assigned.
    """
    value: str | None = None
    size = len(field_name)
    for member in members:
        name = member.name
        # go_key_matches's own first tests, before calling it: most members are other fields.
        if name is None or (name != field_name
                             and (len(name) != size or not go_key_matches(name, field_name))):
            continue
        if member.kind == "null":
            continue
        if member.kind != "string":
            raise UnreadableBody(f"field {field_name!r} must be a string, not {member.kind}")
        text = member.text
        if text is None:
            raise UnreadableBody(f"invalid UTF-8 (or an unpaired \\u surrogate) in field {field_name!r}")
        value = text
    return value


def remove_members(body: bytes, members: Sequence[Member], name: str) -> bytes:
    """`body` without every member whose key is exactly `name`, each with one adjacent comma.

    `members` are the object's members as `scan_object` returned them. All other bytes stay as they were, so
    the result is still the same JSON object minus those members. Linear in the body, however many go.
    """
    kept = [not (member.name == name) for member in members]
    if all(kept):
        return body
    cuts: list[tuple[int, int]] = []  # byte ranges to drop, in order, not overlapping
    if not any(kept):
        cuts.append((members[0].start, members[-1].end))
    else:
        last_kept = max(i for i, keep in enumerate(kept) if keep)
        for i, member in enumerate(members[:last_kept]):
            if not kept[i]:
                # The member, its comma and the whitespace up to the next member's key.
                cuts.append((member.start, members[i + 1].start))
        if last_kept + 1 < len(members):
            # Removed members after the last kept one: from the end of the kept value through the last one.
            cuts.append((members[last_kept].end, members[-1].end))
    pieces: list[bytes] = []
    pos = 0
    for cut_start, cut_end in cuts:
        pieces.append(body[pos:cut_start])
        pos = cut_end
    pieces.append(body[pos:])
    return b"".join(pieces)
