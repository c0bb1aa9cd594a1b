"""Key sources, key stripping (query and JSON body, byte for byte), masking and the key ring."""

from __future__ import annotations

import base64
import json
import sys

import pytest

from fastgate.keys import (
    KEY_HEADERS,
    KeyRing,
    KeySource,
    PresentedKey,
    key_from_headers,
    mask,
    split_body_key,
    split_query_key,
)

KEY = "api-20250312000101"
OTHER = "api-20250312000202"


def basic(userpass: str) -> bytes:
    return b"Basic " + base64.b64encode(userpass.encode())


# ---------------------------------------------------------------------------------------------------------
# Headers


@pytest.mark.parametrize("headers, expected", [
    ([(b"x-api-key", KEY.encode())], PresentedKey(KeySource.X_API_KEY, KEY)),
    ([(b"x-api-key", b"  " + KEY.encode() + b" ")], PresentedKey(KeySource.X_API_KEY, KEY)),
    ([(b"authorization", b"Bearer " + KEY.encode())], PresentedKey(KeySource.BEARER, KEY)),
    ([(b"authorization", b"bearer " + KEY.encode())], PresentedKey(KeySource.BEARER, KEY)),
    ([(b"authorization", b"BEARER   " + KEY.encode() + b"  ")], PresentedKey(KeySource.BEARER, KEY)),
    ([(b"authorization", KEY.encode())], PresentedKey(KeySource.AUTHORIZATION, KEY)),
    ([(b"authorization", b"  " + KEY.encode())], PresentedKey(KeySource.AUTHORIZATION, KEY)),
    ([(b"authorization", basic(f"user:{KEY}"))], PresentedKey(KeySource.BASIC, KEY)),
    ([(b"authorization", basic(f"anything:{KEY}:with:colons"))],
     PresentedKey(KeySource.BASIC, f"{KEY}:with:colons")),
    ([(b"authorization", basic(f":{KEY}"))], PresentedKey(KeySource.BASIC, KEY)),
    # http://KEY@host: no password, the user part is the key
    ([(b"authorization", basic(KEY))], PresentedKey(KeySource.BASIC, KEY)),
    ([(b"authorization", basic(f"{KEY}:"))], PresentedKey(KeySource.BASIC, KEY)),
    ([(b"authorization", b"basic " + base64.b64encode(f"u:{KEY}".encode()))],
     PresentedKey(KeySource.BASIC, KEY)),
])
def test_key_sources(headers: list[tuple[bytes, bytes]], expected: PresentedKey) -> None:
    assert key_from_headers(headers) == expected


@pytest.mark.parametrize("headers", [
    [],
    [(b"content-type", b"application/json"), (b"host", b"x")],
    [(b"x-api-key", b"")],
    [(b"x-api-key", b"   ")],
    [(b"authorization", b"")],
    [(b"authorization", b"   ")],
    [(b"authorization", b"Basic !!!not-base64!!!")],
    [(b"authorization", b"Basic " + base64.b64encode(b"\xff\xfe:\xff"))],  # not UTF-8
    [(b"authorization", basic(":"))],
    # names are matched lowercase, as h11 hands them over
    [(b"X-API-Key", KEY.encode())],
])
def test_no_key(headers: list[tuple[bytes, bytes]]) -> None:
    assert key_from_headers(headers) is None


@pytest.mark.parametrize("auth", [b"Bearer " + OTHER.encode(), OTHER.encode(), basic(f"u:{OTHER}")])
def test_x_api_key_beats_authorization(auth: bytes) -> None:
    for headers in ([(b"x-api-key", KEY.encode()), (b"authorization", auth)],
                    [(b"authorization", auth), (b"x-api-key", KEY.encode())]):
        assert key_from_headers(headers) == PresentedKey(KeySource.X_API_KEY, KEY)


def test_empty_x_api_key_falls_back_to_authorization() -> None:
    headers = [(b"x-api-key", b""), (b"authorization", b"Bearer " + KEY.encode())]
    assert key_from_headers(headers) == PresentedKey(KeySource.BEARER, KEY)


def test_first_of_several_keys_wins() -> None:
    assert key_from_headers([(b"x-api-key", KEY.encode()), (b"x-api-key", OTHER.encode())]).secret == KEY
    assert key_from_headers([(b"authorization", b"Bearer " + KEY.encode()),
                             (b"authorization", b"Bearer " + OTHER.encode())]).secret == KEY


def test_latin1_header_bytes_decode() -> None:
    assert key_from_headers([(b"x-api-key", b"caf\xe9-key-12345")]) == PresentedKey(KeySource.X_API_KEY,
                                                                                    "caf\xe9-key-12345")


def test_key_headers_constant() -> None:
    assert set(KEY_HEADERS) == {b"x-api-key", b"authorization"}


# ---------------------------------------------------------------------------------------------------------
# Query strings


@pytest.mark.parametrize("query, secret, rest", [
    (b"api_key=" + KEY.encode(), KEY, b""),
    (b"api_key=" + KEY.encode() + b"&stream=false", KEY, b"stream=false"),
    (b"a=1&api_key=" + KEY.encode() + b"&b=2", KEY, b"a=1&b=2"),
    (b"a=1&b=%20x+y&api_key=" + KEY.encode(), KEY, b"a=1&b=%20x+y"),
    # every api_key parameter goes; the first non-empty one is the key
    (b"api_key=" + KEY.encode() + b"&x=1&api_key=" + OTHER.encode(), KEY, b"x=1"),
    (b"api_key=&api_key=" + KEY.encode(), KEY, b""),
    # percent-encoding and plus in the value
    (b"api_key=a%2Bb%20c+d", "a+b c d", b""),
    (b"api_key=caf%C3%A9", "caf\u00e9", b""),
    # percent-encoded name
    (b"api%5Fkey=" + KEY.encode() + b"&z=%41", KEY, b"z=%41"),
    (b"%61pi_key=" + KEY.encode(), KEY, b""),
    # other parameters kept byte for byte, in order, empty ones too
    (b"z=1&&y=2&api_key=k-123&x=%2f&w", "k-123", b"z=1&&y=2&x=%2f&w"),
    (b"model=llama3&api_key=k-123&model=other", "k-123", b"model=llama3&model=other"),
])
def test_split_query_key(query: bytes, secret: str, rest: bytes) -> None:
    key, stripped = split_query_key(query)
    assert key == PresentedKey(KeySource.QUERY, secret)
    assert stripped == rest


@pytest.mark.parametrize("query, rest", [
    (b"api_key=", b""),
    (b"api_key", b""),
    (b"a=1&api_key=&b=2", b"a=1&b=2"),
])
def test_empty_query_key_is_removed_but_not_a_key(query: bytes, rest: bytes) -> None:
    assert split_query_key(query) == (None, rest)


@pytest.mark.parametrize("query", [
    b"", b"a=1", b"a=%20&b=2", b"my_api_key=x", b"api_keys=x", b"API_KEY=x", b"api-key=x", b"x=api_key",
    b"api+key=x", b"a=%ZZ",
])
def test_query_without_key_unchanged(query: bytes) -> None:
    key, stripped = split_query_key(query)
    assert key is None
    assert stripped == query


# ---------------------------------------------------------------------------------------------------------
# JSON bodies: the member goes, every other byte stays


@pytest.mark.parametrize("body, expected", [
    # only member
    (b'{"api_key":"K"}', b"{}"),
    (b'{ "api_key" : "K" }', b"{  }"),
    # first member
    (b'{"api_key":"K","model":"m"}', b'{"model":"m"}'),
    (b'{"api_key": "K", "model": "m", "stream": false}', b'{"model": "m", "stream": false}'),
    # middle member
    (b'{"model":"m","api_key":"K","stream":true}', b'{"model":"m","stream":true}'),
    (b'{"model": "m", "api_key": "K", "stream": true}', b'{"model": "m", "stream": true}'),
    # last member
    (b'{"model":"m","api_key":"K"}', b'{"model":"m"}'),
    (b'{"model": "m" , "api_key" : "K" }', b'{"model": "m" }'),
    # pretty-printed
    (b'{\n  "model": "m",\n  "api_key": "K"\n}\n', b'{\n  "model": "m"\n}\n'),
    (b'{\n  "api_key": "K",\n  "model": "m"\n}', b'{\n  "model": "m"\n}'),
    (b'{\r\n\t"model": "m",\r\n\t"api_key": "K",\r\n\t"n": 1\r\n}', b'{\r\n\t"model": "m",\r\n\t"n": 1\r\n}'),
    (b'  \n{"api_key":"K","a":[1, 2,  3]}  \n', b'  \n{"a":[1, 2,  3]}  \n'),
    # nested "api_key" members are data, not keys: untouched
    (b'{"options":{"api_key":"nested"},"api_key":"K"}', b'{"options":{"api_key":"nested"}}'),
    (b'{"api_key":"K","messages":[{"role":"user","content":"{\\"api_key\\": 1}","api_key":"x"}]}',
     b'{"messages":[{"role":"user","content":"{\\"api_key\\": 1}","api_key":"x"}]}'),
    # a value that merely contains the text
    (b'{"prompt":"my \\"api_key\\" is","api_key":"K"}', b'{"prompt":"my \\"api_key\\" is"}'),
    # non-ASCII elsewhere survives the round trip
    ('{"prompt":"caf\u00e9 \u2603 \U0001f600","api_key":"K"}'.encode(),
     '{"prompt":"caf\u00e9 \u2603 \U0001f600"}'.encode()),
    (b'{"prompt":"\\u00e9\\ud83d\\ude00","api_key":"K"}', b'{"prompt":"\\u00e9\\ud83d\\ude00"}'),
    # numbers keep their spelling
    (b'{"temperature":0.10,"n":1E2,"api_key":"K","big":12345678901234567890}',
     b'{"temperature":0.10,"n":1E2,"big":12345678901234567890}'),
])
def test_split_body_key_layouts(body: bytes, expected: bytes) -> None:
    key, stripped = split_body_key(body)
    assert key == PresentedKey(KeySource.BODY, "K")
    assert stripped == expected
    assert json.loads(stripped) == {k: v for k, v in json.loads(body).items() if k != "api_key"}


def test_split_body_key_escaped_value() -> None:
    key, stripped = split_body_key(b'{"api_key":"a\\"b\\u00e9\\\\","x":1}')
    assert key == PresentedKey(KeySource.BODY, 'a"b\u00e9\\')
    assert stripped == b'{"x":1}'


@pytest.mark.parametrize("body, secret, expected", [
    (b'{"api_key":"A","model":"m","api_key":"B"}', "B", b'{"model":"m"}'),
    (b'{"api_key":"A","api_key":"B","api_key":"C"}', "C", b"{}"),
    (b'{"x":1,"api_key":"A","y":2,"api_key":"B","z":3}', "B", b'{"x":1,"y":2,"z":3}'),
    (b'{\n "api_key": "A",\n "m": 1,\n "api_key": "B"\n}', "B", b'{\n "m": 1\n}'),
])
def test_duplicate_body_keys_all_removed_last_wins(body: bytes, secret: str, expected: bytes) -> None:
    key, stripped = split_body_key(body)
    assert key == PresentedKey(KeySource.BODY, secret)
    assert stripped == expected


@pytest.mark.parametrize("body", [
    b'{"api_key":"A","api_key":5}',
    b'{"api_key":"A","api_key":null}',
    b'{"api_key":"A","api_key":""}',
])
def test_duplicate_body_keys_last_non_string_means_no_key(body: bytes) -> None:
    # A JSON decoder keeps the last duplicate: the client's api_key is not a (non-empty) string.
    key, stripped = split_body_key(body)
    assert key is None
    assert b"A" not in stripped  # the earlier string is still removed before forwarding


@pytest.mark.parametrize("value", [b"123", b"null", b"true", b'""', b'{"k":"v"}', b'["K"]', b"1.5"])
def test_non_string_body_key_is_no_key(value: bytes) -> None:
    key, stripped = split_body_key(b'{"model":"m","api_key":' + value + b"}")
    assert key is None
    assert json.loads(stripped)["model"] == "m"


@pytest.mark.parametrize("body", [
    b"",
    b'{"model":"m"}',
    b'{"options":{"api_key":"nested"}}',
    b'[{"api_key":"K"}]',
    b'"api_key"',
    b'"api_key": "K"',
    b'api_key="K"',
    b'{"api_key":"K"',  # truncated
    b'{"api_key":"K",}',  # trailing comma
    b'{"api_key":"K"} {"x":1}',  # two documents
    b'{"api_key":"K"}x',
    b'{"api_key" "K"}',
    b'{api_key:"K"}',
    b'\xff{"api_key":"K"}',
    b'{"api_key":"K\x01"}',  # control character in a string
    b'--boundary\r\nContent-Disposition: form-data; name="api_key"\r\n\r\nK\r\n--boundary--\r\n',
])
def test_bodies_that_are_not_a_json_object_stay_unchanged(body: bytes) -> None:
    key, stripped = split_body_key(body)
    assert key is None
    assert stripped == body


@pytest.mark.parametrize("body, secret, expected", [
    # Go reads invalid UTF-8 inside strings (as U+FFFD), so these are JSON objects Ollama accepts: the key must
    # go. (Python's json refused them, and the old reading forwarded the key to Ollama unchanged.)
    (b'{"api_key":"K","x":"\xff"}', "K", b'{"x":"\xff"}'),
    (b'{"x":"\xc0\xaf","api_key":"K"}', "K", b'{"x":"\xc0\xaf"}'),
    # an unreadable key is still the client's key (it matches no key), and it is removed too
    (b'{"api_key":"\xffK","x":1}', "\udcffK", b'{"x":1}'),
])
def test_invalid_utf8_body_still_loses_its_key(body: bytes, secret: str, expected: bytes) -> None:
    key, stripped = split_body_key(body)
    assert key == PresentedKey(KeySource.BODY, secret)
    assert stripped == expected


@pytest.mark.parametrize("body, secret, expected", [
    # Members are named by their decoded key, as Go decodes it: escapes count, folding does not (fastgate's
    # own field, never Ollama's) - other spellings are left for Ollama to ignore.
    (b'{"api\\u005fkey":"K","x":1}', "K", b'{"x":1}'),
    (b'{"\\u0061pi_key":"A","api_key":"B"}', "B", b"{}"),
    (b'{"API_KEY":"A","x":1}', None, b'{"API_KEY":"A","x":1}'),
])
def test_body_key_names_are_decoded(body: bytes, secret: str | None, expected: bytes) -> None:
    key, stripped = split_body_key(body)
    assert key == (PresentedKey(KeySource.BODY, secret) if secret else None)
    assert stripped == expected


def test_many_duplicate_body_keys_are_removed_in_one_pass() -> None:
    # The old reading re-parsed the body once per duplicate (quadratic); now one scan removes them all.
    body = b'{"model":"m",' + b",".join(b'"api_key":"k%d"' % i for i in range(2000)) + b',"stream":false}'
    key, stripped = split_body_key(body)
    assert key == PresentedKey(KeySource.BODY, "k1999")
    assert stripped == b'{"model":"m","stream":false}'


def test_big_base64_body() -> None:
    image = base64.b64encode(bytes(range(256)) * 16000).decode()  # ~5.5 MB of base64
    prefix = '{"model":"llava","prompt":"what is this?","images":["' + image + '"],'
    body = (prefix + '"api_key":"' + KEY + '","stream":false}').encode()
    key, stripped = split_body_key(body)
    assert key == PresentedKey(KeySource.BODY, KEY)
    assert stripped == (prefix + '"stream":false}').encode()


def test_big_body_without_key_is_returned_as_is() -> None:
    body = b'{"images":["' + b"A" * 5_000_000 + b'"],"api_key_hint":"x"}'
    key, stripped = split_body_key(body)
    assert key is None
    assert stripped == body


def test_deeply_nested_body_does_not_crash() -> None:
    depth = sys.getrecursionlimit() * 4
    body = b'{"api_key":"K","x":' + b"[" * depth + b"]" * depth + b"}"
    key, stripped = split_body_key(body)  # must not raise RecursionError
    if key is None:
        assert stripped == body
    else:
        assert b'"api_key"' not in stripped


# ---------------------------------------------------------------------------------------------------------
# Masking and repr


@pytest.mark.parametrize("secret, masked", [
    ("api-20250312000101", "api-****0101"),
    ("abcdefghijklmnop", "abcd****mnop"),
    ("abcdefghijkl", "****ijkl"),
    ("abcdefghij", "****ghij"),
    ("abcdefghi", "****"),
    ("abcdefgh", "****"),
    ("abcdefg", "****"),
    ("a", "****"),
    ("", "****"),
])
def test_mask(secret: str, masked: str) -> None:
    assert mask(secret) == masked
    assert PresentedKey(KeySource.BEARER, secret).masked == masked


@pytest.mark.parametrize("source", list(KeySource))
@pytest.mark.parametrize("secret", [KEY, "abcdefghij", "short"])
def test_presented_key_never_shows_its_secret(source: KeySource, secret: str) -> None:
    key = PresentedKey(source, secret)
    for text in (repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr({"k": key})):
        assert secret not in text
        assert source.value in text
    assert repr(key) == f"PresentedKey({source.value}, {mask(secret)})"


def test_presented_key_is_frozen_and_compares_by_value() -> None:
    key = PresentedKey(KeySource.QUERY, KEY)
    assert key == PresentedKey(KeySource.QUERY, KEY)
    assert key != PresentedKey(KeySource.BODY, KEY)
    with pytest.raises(AttributeError):
        key.secret = "x"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------
# Key ring


def test_keyring_lookups() -> None:
    ring = KeyRing({KEY: "alice", OTHER: "bob", "caf\u00e9": "carol"})
    assert ring.user_for(KEY) == "alice"
    assert ring.user_for(OTHER) == "bob"
    assert ring.user_for("caf\u00e9") == "carol"
    assert ring.user_for(KEY[:-1]) is None
    assert ring.user_for(KEY + "x") is None
    assert ring.user_for(KEY.upper()) is None
    assert ring.user_for("") is None
    assert len(ring) == 3
    assert repr(ring) == "KeyRing(3 keys)"
    assert KEY not in repr(ring) and "alice" not in repr(ring)


def test_empty_keyring() -> None:
    ring = KeyRing({})
    assert len(ring) == 0
    assert ring.user_for(KEY) is None


@pytest.mark.parametrize("secret", ["\ud800", "a\udfffb", "\udc80"])
def test_keyring_survives_lone_surrogates(secret: str) -> None:
    # A JSON body can carry "\ud800"; looking it up must be a plain miss, never an exception.
    assert KeyRing({KEY: "alice"}).user_for(secret) is None


def test_lone_surrogate_body_key_reaches_lookup_safely() -> None:
    key, _ = split_body_key(b'{"api_key":"\\ud800-not-a-key"}')
    assert key is not None
    assert KeyRing({KEY: "alice"}).user_for(key.secret) is None
