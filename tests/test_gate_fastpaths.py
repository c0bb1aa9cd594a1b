"""The policy's shortcuts (issue 11) decide exactly as the general way: per-path facts kept in a bounded
table, the ambient-credential flag read from the key's source instead of from its log label, model-name
answers kept per name, keys built and hashed more cheaply, short JSON strings read by slice."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgate import gate as gate_module
from fastgate import gojson, models
from fastgate.access import Principal, Role, missing_scope
from fastgate.config import build_config
from fastgate.errors import Unauthorized
from fastgate.gate import (
    AMBIENT_LABELS, BLOB_PREFIX, LOCAL_PATHS, RUNS_MODEL_PATHS, Gate, PathFacts, _is_account_path,
    _manages_models, _split_target, normalize_path, path_facts,
)
from fastgate.keys import KeySource, PresentedKey, _digest, _presented, mask
from fastgate.requested import Requested, _requested, route_for

KEY = "api-20250312000101"
PEER = "203.0.113.9"

# Path pieces that reach every branch: Ollama's routes, account and blob prefixes, dot segments, escapes.
_PIECES = st.sampled_from([
    b"/", b"api", b"v1", b"generate", b"chat", b"models", b"blobs", b"user", b"keys", b"me", b"signout",
    b"pull", b"version", b"metrics", b"health", b"auth", b"..", b".", b"%2e", b"%2F", b"%6de", b"//", b"?",
    b"sha256-ab", b"llama3", b"x",
])
PATHS = st.lists(_PIECES, max_size=8).map(lambda parts: b"/" + b"/".join(parts))


def _facts_the_general_way(path: bytes) -> dict[str, object]:
    normal = normalize_path(path)
    return {
        "local": path in (b"/", b"/health", b"/auth", b"/metrics"),
        "blob": path.startswith(BLOB_PREFIX),
        "normal": normal,
        "account": _is_account_path(normal),
        "user_needs": missing_scope(Principal("u", "k", Role.USER), normal),
        "route": route_for(normal),
        "runs_model": normal in RUNS_MODEL_PATHS,
        "manages": _manages_models(normal),
    }


def _as_dict(facts: PathFacts) -> dict[str, object]:
    return {name: getattr(facts, name) for name in PathFacts.__slots__}


@settings(max_examples=400)
@given(PATHS)
def test_path_facts_are_what_the_general_way_finds(path: bytes) -> None:
    expected = _facts_the_general_way(path)
    assert _as_dict(PathFacts(path)) == expected
    assert _as_dict(path_facts(path)) == expected  # first sight (maybe kept)
    assert _as_dict(path_facts(path)) == expected  # from the table, if kept
    assert LOCAL_PATHS == {b"/", b"/health", b"/auth", b"/metrics"}


@given(st.binary(max_size=40))
def test_split_target_is_partition(target: bytes) -> None:
    path, _, query = target.partition(b"?")
    assert _split_target(target) == (path, query)


def test_the_path_table_is_bounded_in_count_and_length(monkeypatch: pytest.MonkeyPatch) -> None:
    table: dict[bytes, PathFacts] = {}
    monkeypatch.setattr(gate_module, "_PATH_FACTS", table)
    for i in range(gate_module._PATH_FACTS_MAX + 100):
        path_facts(b"/api/x%d" % i)
    assert len(table) == gate_module._PATH_FACTS_MAX
    long_path = b"/api/" + b"a" * gate_module._PATH_FACTS_MAX_LENGTH
    table.clear()
    assert path_facts(long_path).normal == long_path
    assert long_path not in table
    # A path seen once the table is full is still judged right, each time.
    for i in range(gate_module._PATH_FACTS_MAX):
        path_facts(b"/v1/x%d" % i)
    assert path_facts(b"/api/%6de").normal == b"/api/me"
    assert path_facts(b"/api/%6de").account


@pytest.mark.parametrize("source", list(KeySource))
def test_ambient_flag_is_what_the_label_says(source: KeySource) -> None:
    gate = Gate(build_config({"keys": {KEY: "alice"}}))
    principal, label, ambient = gate._who(PresentedKey(source, KEY), PEER)
    assert principal.user == "alice"
    assert ambient == label.startswith(AMBIENT_LABELS)
    assert ambient == (source is KeySource.BASIC)


def test_ambient_flag_for_ip_trust() -> None:
    gate = Gate(build_config({"keys": {KEY: "alice"}, "auth": {"session_ttl": 60}}))
    principal = gate.keyring.principal_for(KEY)
    assert principal is not None
    gate.trust.grant(PEER, "alice", "x-api-key:api-****0101", 60, gate.clock(), principal.key_id)
    principal, label, ambient = gate._who(None, PEER)
    assert label.startswith(AMBIENT_LABELS) and ambient
    with pytest.raises(Unauthorized):
        gate._who(None, "198.51.100.1")


_NAME_PARTS = st.sampled_from(["llama3", "LLAMA3", "qwen2.5", "gpt-oss", "me", "registry.ollama.ai",
                               "library", "host.example:5000", "x" * 81, "", " ", "\u017f", "\u212a"])
_NAME_SEPARATORS = st.sampled_from(["/", ":", ":cloud", "-cloud", ":local", ":latest", ":8b", "://", "@"])
NAMES = st.lists(st.one_of(_NAME_PARTS, _NAME_SEPARATORS), max_size=7).map("".join)
PATTERNS = st.lists(st.sampled_from(["llama3*", "llama3", "qwen2.5:*", "*:cloud", "*-cloud", "me/*", "*",
                                     "gpt-oss:120b-cloud", "host.example:5000/*/*", "LLAMA3:8B"]),
                    min_size=1, max_size=3).map(tuple)


@settings(max_examples=400)
@given(NAMES, PATTERNS)
def test_kept_model_answers_are_the_answers(name: str, patterns: tuple[str, ...]) -> None:
    for _ in range(2):  # worked out, then (if kept) from the table
        assert models.parse_model_name(name) == models._parse_model_name(name)
        assert models.is_cloud_model(name) == models._is_cloud_model(name)
        assert models.models_allowed(patterns, name) == models._models_allowed(patterns, name)
        assert models.models_allowed(list(patterns), name) == models._models_allowed(patterns, name)


def test_long_model_names_are_not_kept() -> None:
    name = "llama3:" + "a" * models._CACHED_NAME_LENGTH
    before = models._models_allowed_cached.cache_info().currsize
    assert not models.models_allowed(("llama3*",), name)  # a tag over 80 bytes: Ollama refuses the name
    assert models.parse_model_name(name) is None
    assert models._models_allowed_cached.cache_info().currsize == before
    assert models._models_allowed_cached.cache_info().maxsize == models._CACHE_SIZE


@given(st.text())
def test_key_digest_is_sha256_of_the_utf8_with_surrogates_passed(secret: str) -> None:
    assert _digest(secret) == hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


@given(st.sampled_from(list(KeySource)), st.text(min_size=1))
def test_presented_keys_built_directly_are_presented_keys(source: KeySource, secret: str) -> None:
    built, made = _presented(source, secret), PresentedKey(source, secret)
    assert built == made and hash(built) == hash(made) and repr(built) == repr(made)
    assert type(built) is PresentedKey and built.source is source and built.secret is secret
    assert built.label == made.label == f"{source.value}:{mask(secret)}"


@given(st.binary(max_size=40).filter(lambda b: b'"' not in b and b"\\" not in b)
       | st.sampled_from([b"\\u00e9", b"\\ud800", b"a\\n\\t\\\"", b"\\ud83d\\ude00", b"\\/"]))
def test_short_strings_read_by_slice_as_by_view(inside: bytes) -> None:
    token = b'x"' + inside + b'"y'
    sliced = gojson.string_text(token, 1, len(token) - 1)
    old, gojson._SLICED_STRING = gojson._SLICED_STRING, -1  # every string through the memoryview
    try:
        assert gojson.string_text(token, 1, len(token) - 1) == sliced
    finally:
        gojson._SLICED_STRING = old


@given(st.lists(st.text(max_size=5), max_size=3).map(tuple), st.booleans())
def test_requested_built_directly_is_requested(models: tuple[str, ...], web_tools: bool) -> None:
    built, made = _requested(models, web_tools), Requested(models, web_tools)
    assert built == made and hash(built) == hash(made) and repr(built) == repr(made)
    assert type(built) is Requested and built.model == made.model


def test_the_header_key_is_read_once_and_is_key_from_headers() -> None:
    from fastgate.gate import IncomingRequest
    from fastgate.keys import key_from_headers

    headers = [(b"host", b"h"), (b"x-api-key", b" " + KEY.encode()), (b"authorization", b"Bearer other")]
    request = IncomingRequest(b"GET", b"/api/tags", headers, headers, b"1.1", PEER, False, None, False)
    first = request.header_key
    assert first == key_from_headers(headers) and request.header_key is first
    assert "header_key" not in repr(request)
    keyless = IncomingRequest(b"GET", b"/api/tags", [], [], b"1.1", PEER, False, None, False)
    assert keyless.header_key is None and keyless.header_key is None


def test_key_ring_identify_is_principal_for_and_label() -> None:
    from fastgate.keys import KeyRing, _digest

    managed = Principal("bob", "m1", Role.USER, expires_at=100.0)
    ring = KeyRing({KEY: "alice", "short-key": "carol"}, {_digest("managed-key-0123456789"): managed})
    for secret in (KEY, "short-key", "managed-key-0123456789", "wrong-key-0123456789"):
        for source in [*KeySource, KeySource.X_API_KEY, KeySource.BEARER, KeySource.BEARER]:
            key = PresentedKey(source, secret)
            for now in (None, 50.0, 100.0):
                principal = ring.principal_for(secret, now)
                expected = None if principal is None else (principal, key.label)
                assert ring.identify(key, now) == expected, (secret, source, now)
    assert len(ring._labels) <= len(ring)


def _forwardable_the_general_way(raw_headers: list[tuple[bytes, bytes]], forward_origin: bool) -> list:
    from fastgate.messages import HOP_BY_HOP, REPLACED_UPSTREAM

    dropped = HOP_BY_HOP | REPLACED_UPSTREAM | (set() if forward_origin else {b"origin"})
    named = {t.strip().lower() for n, v in raw_headers if n.lower() == b"connection"
             for t in v.split(b",") if t.strip()}
    return [(n, v) for n, v in raw_headers if n.lower() not in dropped and n.lower() not in named]


_FIELD_NAMES = st.sampled_from([b"Host", b"host", b"X-API-Key", b"Content-Type", b"content-type", b"Origin",
                                b"Connection", b"CONNECTION", b"Keep-Alive", b"X-Kept", b"x-kept", b"TE",
                                b"Authorization", b"Accept", b"X-Fastgate-Backend"])
_FIELD_VALUES = st.sampled_from([b"1", b"close", b"x-kept, Accept", b" X-KEPT ,,te", b"keep-alive", b""])


@given(st.lists(st.tuples(_FIELD_NAMES, _FIELD_VALUES), max_size=8), st.booleans())
def test_forwardable_headers_as_the_general_way(raw_headers: list[tuple[bytes, bytes]],
                                                forward_origin: bool) -> None:
    from fastgate.messages import forwardable_headers

    expected = _forwardable_the_general_way(raw_headers, forward_origin)
    for _ in range(2):  # names seen for the first time, then known
        assert forwardable_headers(raw_headers, forward_origin=forward_origin) == expected
