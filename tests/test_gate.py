"""The per-request policy, driven with values: parsed heads in, decisions (or GateErrors) out."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from fastgate import __version__
from fastgate.config import Config, build_config
from fastgate.errors import BadRequest, Forbidden, GateError, MethodNotAllowed, Unauthorized
from fastgate.gate import (
    AUTH_BODY_LIMIT_BYTES,
    Forward,
    Gate,
    IncomingRequest,
    LocalReply,
    ProbeHealth,
    ReadBody,
    normalize_path,
)
from fastgate.trust import TrustTable

KEY = "api-20250312000101"
KEY2 = "api-20250312000202"
BAD_KEY = "api-20259999999999"
PEER = "203.0.113.9"
RID = b"a1b2c3d4"
T0_WALL = 1741737600.0  # 2025-03-12T00:00:00Z


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_config(**sections: dict[str, Any]) -> Config:
    # The name requests here are sent to; IP trust and Basic credentials are honoured only for the gateway's
    # own names (DNS-rebinding guard).
    server = {"hostnames": ["gate.example.com"], **sections.pop("server", {})}
    return build_config({"keys": {KEY: "alice", KEY2: "bob"}, "server": server, **sections})


def make_gate(config: Config | None = None, clock: Clock | None = None,
              trust: TrustTable | None = None) -> Gate:
    return Gate(config or make_config(), trust=trust, clock=clock or Clock(), wall_clock=lambda: T0_WALL)


def key_id_of(gate: Gate, secret: str) -> str:
    principal = gate.keyring.principal_for(secret)
    assert principal is not None
    return principal.key_id


def req(method: bytes = b"GET", target: bytes = b"/api/tags",
        headers: list[tuple[bytes, bytes]] | None = None, *, peer: str = PEER, tls: bool = False,
        http_version: bytes = b"1.1", host: bytes | None = b"gate.example.com") -> IncomingRequest:
    raw = ([(b"Host", host)] if host is not None else []) + list(headers or [])
    lower = [(n.lower(), v) for n, v in raw]
    content_length = next((int(v) for n, v in lower if n == b"content-length"), None)
    chunked = any(n == b"transfer-encoding" and v.lower() == b"chunked" for n, v in lower)
    return IncomingRequest(method=method, target=target, headers=lower, raw_headers=raw,
                           http_version=http_version, peer_ip=peer, tls=tls,
                           content_length=None if chunked else content_length, chunked=chunked)


def parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    assert head.endswith(b"\r\n\r\n")
    assert head.count(b"\r\n\r\n") == 1
    request_line, *lines = head[:-4].split(b"\r\n")
    fields = []
    for line in lines:
        name, sep, value = line.partition(b": ")
        assert sep, line
        fields.append((name, value))
    return request_line, fields


def field(head: bytes, name: bytes) -> list[bytes]:
    return [v for n, v in parse_head(head)[1] if n.lower() == name.lower()]


def basic(userpass: str) -> bytes:
    return b"Basic " + base64.b64encode(userpass.encode())


def assert_no_secret(head: bytes, *secrets: str) -> None:
    for secret in (KEY, KEY2, BAD_KEY, *secrets):
        assert secret.encode() not in head
        assert base64.b64encode(f"u:{secret}".encode()) not in head
    assert b"api_key" not in head
    lowered = head.lower()
    assert b"\r\nx-api-key:" not in lowered
    assert b"\r\nauthorization:" not in lowered


# ---------------------------------------------------------------------------------------------------------
# Local endpoints


@pytest.mark.parametrize("method, head_only", [(b"GET", False), (b"HEAD", True)])
@pytest.mark.parametrize("target", [b"/", b"/?api_key=whatever"])
def test_info(method: bytes, head_only: bool, target: bytes) -> None:
    decision = make_gate().decide(req(method, target), RID)
    assert isinstance(decision, LocalReply)
    assert decision.status == 200
    assert decision.head_only is head_only
    assert json.loads(decision.body) == {"name": "fastgate", "version": __version__, "status": "running"}


@pytest.mark.parametrize("method, head_only", [(b"GET", False), (b"HEAD", True)])
def test_health(method: bytes, head_only: bool) -> None:
    assert make_gate().decide(req(method, b"/health"), RID) == ProbeHealth(head_only=head_only)


def test_auth_asks_for_body() -> None:
    decision = make_gate().decide(req(b"POST", b"/auth", [(b"Content-Length", b"30")]), RID)
    assert decision == ReadBody(AUTH_BODY_LIMIT_BYTES, for_key=True)
    assert AUTH_BODY_LIMIT_BYTES == 64 * 1024


@pytest.mark.parametrize("method, target, allow", [
    (b"POST", b"/", b"GET, HEAD"),
    (b"DELETE", b"/", b"GET, HEAD"),
    (b"OPTIONS", b"/", b"GET, HEAD"),
    (b"POST", b"/health", b"GET, HEAD"),
    (b"PUT", b"/health?x=1", b"GET, HEAD"),
    (b"GET", b"/auth", b"POST"),
    (b"HEAD", b"/auth", b"POST"),
    (b"PUT", b"/auth", b"POST"),
])
def test_wrong_method(method: bytes, target: bytes, allow: bytes) -> None:
    with pytest.raises(MethodNotAllowed) as info:
        make_gate().decide(req(method, target, [(b"X-API-Key", KEY.encode())]), RID)
    assert info.value.status == 405
    assert info.value.extra_headers == ((b"Allow", allow),)


# ---------------------------------------------------------------------------------------------------------
# Forwarding with a key

KEY_SOURCES = [
    ([(b"X-API-Key", KEY.encode())], b"/api/tags", "x-api-key"),
    ([(b"Authorization", b"Bearer " + KEY.encode())], b"/api/tags", "bearer"),
    ([(b"Authorization", KEY.encode())], b"/api/tags", "authorization"),
    ([(b"Authorization", basic(f"user:{KEY}"))], b"/api/tags", "basic"),
    ([], b"/api/tags?api_key=" + KEY.encode(), "query"),
    # both key headers present: X-API-Key wins, both are removed
    ([(b"Authorization", b"Bearer " + KEY2.encode()), (b"X-API-Key", KEY.encode())], b"/api/tags",
     "x-api-key"),
]


@pytest.mark.parametrize("headers, target, source", KEY_SOURCES)
def test_forward_with_each_key_source(headers: list[tuple[bytes, bytes]], target: bytes, source: str) -> None:
    decision = make_gate().decide(req(b"GET", target, [(b"Accept", b"application/json"), *headers]), RID)
    assert isinstance(decision, Forward)
    assert decision.user == "alice"
    assert decision.key_label == f"{source}:api-****0101"
    assert decision.body is None
    assert decision.client_ip == PEER
    assert decision.url == "http://127.0.0.1:11434/api/tags"
    assert_no_secret(decision.head)
    request_line, fields = parse_head(decision.head)
    assert request_line == b"GET /api/tags HTTP/1.1"
    assert fields == [
        (b"Host", b"127.0.0.1:11434"),
        (b"Accept", b"application/json"),
        (b"X-Forwarded-For", PEER.encode()),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"gate.example.com"),
        (b"X-Request-Id", RID),
    ]


def test_query_key_stripped_other_params_kept() -> None:
    target = b"/api/tags?b=%20x+y&api_key=" + KEY.encode() + b"&a=1&api_key=" + KEY2.encode()
    decision = make_gate().decide(req(b"GET", target), RID)
    assert isinstance(decision, Forward)
    assert parse_head(decision.head)[0] == b"GET /api/tags?b=%20x+y&a=1 HTTP/1.1"
    assert decision.url == "http://127.0.0.1:11434/api/tags?b=%20x+y&a=1"
    assert_no_secret(decision.head)
    assert KEY not in decision.url


def test_query_key_stripped_even_when_a_header_key_wins() -> None:
    target = b"/api/tags?api_key=" + KEY2.encode() + b"&x=1"
    decision = make_gate().decide(req(b"GET", target, [(b"X-API-Key", KEY.encode())]), RID)
    assert isinstance(decision, Forward)
    assert decision.user == "alice"
    assert parse_head(decision.head)[0] == b"GET /api/tags?x=1 HTTP/1.1"
    assert_no_secret(decision.head)


def test_query_without_key_kept_verbatim() -> None:
    request = req(b"GET", b"/api/ps?verbose=1&x=%2F", [(b"X-API-Key", KEY.encode())])
    decision = make_gate().decide(request, RID)
    assert parse_head(decision.head)[0] == b"GET /api/ps?verbose=1&x=%2F HTTP/1.1"


def test_second_user() -> None:
    request = req(b"GET", b"/api/tags", [(b"Authorization", b"Bearer " + KEY2.encode())])
    decision = make_gate().decide(request, RID)
    assert isinstance(decision, Forward)
    assert decision.user == "bob"
    assert decision.key_label == "bearer:api-****0202"


def test_forward_with_body_relays_it() -> None:
    decision = make_gate().decide(req(b"POST", b"/api/chat", [(b"X-API-Key", KEY.encode()),
                                                              (b"Content-Type", b"application/json"),
                                                              (b"Content-Length", b"1234")]), RID)
    assert isinstance(decision, Forward)
    assert decision.body is None  # a header key means the body is relayed as it comes, unread
    assert field(decision.head, b"Content-Length") == [b"1234"]
    assert field(decision.head, b"Transfer-Encoding") == []
    assert parse_head(decision.head)[0] == b"POST /api/chat HTTP/1.1"


def test_forward_chunked_body() -> None:
    decision = make_gate().decide(req(b"POST", b"/api/chat", [(b"X-API-Key", KEY.encode()),
                                                              (b"Transfer-Encoding", b"chunked")]), RID)
    assert isinstance(decision, Forward)
    assert field(decision.head, b"Transfer-Encoding") == [b"chunked"]
    assert field(decision.head, b"Content-Length") == []


def test_client_hop_by_hop_and_replaced_headers_not_forwarded() -> None:
    headers = [(b"X-API-Key", KEY.encode()), (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"),
               (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"), (b"Upgrade", b"h2c"),
               (b"Proxy-Authorization", b"Basic eA=="), (b"Expect", b"100-continue"),
               (b"X-Forwarded-For", b"6.6.6.6"), (b"X-Forwarded-Proto", b"https"),
               (b"Forwarded", b"for=6.6.6.6"),
               (b"X-Request-Id", b"spoofed"), (b"Content-Length", b"5"), (b"User-Agent", b"ollama-python")]
    decision = make_gate().decide(req(b"POST", b"/api/generate", headers), RID)
    assert isinstance(decision, Forward)
    names = [n.lower() for n, _ in parse_head(decision.head)[1]]
    assert names == [b"host", b"user-agent", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                     b"x-request-id", b"content-length"]
    assert field(decision.head, b"X-Forwarded-For") == [PEER.encode()]
    assert field(decision.head, b"X-Forwarded-Proto") == [b"http"]
    assert field(decision.head, b"X-Request-Id") == [RID]
    assert b"6.6.6.6" not in decision.head and b"spoofed" not in decision.head


@pytest.mark.parametrize("forward_origin, expected", [(False, []), (True, [b"https://app.example.com"])])
def test_origin(forward_origin: bool, expected: list[bytes]) -> None:
    config = make_config(upstream={"forward_origin": forward_origin})
    headers = [(b"X-API-Key", KEY.encode()), (b"Origin", b"https://app.example.com")]
    request = req(b"GET", b"/api/tags", headers)
    decision = make_gate(config).decide(request, RID)
    assert isinstance(decision, Forward)
    assert field(decision.head, b"Origin") == expected


def test_no_client_host_means_no_forwarded_host() -> None:
    decision = make_gate().decide(req(b"GET", b"/api/tags", [(b"X-API-Key", KEY.encode())], host=None), RID)
    assert field(decision.head, b"Host") == [b"127.0.0.1:11434"]
    assert field(decision.head, b"X-Forwarded-Host") == []


def test_tls_sets_forwarded_proto() -> None:
    decision = make_gate().decide(req(b"GET", b"/api/tags", [(b"X-API-Key", KEY.encode())], tls=True), RID)
    assert field(decision.head, b"X-Forwarded-Proto") == [b"https"]


def test_http10_request() -> None:
    decision = make_gate().decide(req(b"GET", b"/api/tags", [(b"X-API-Key", KEY.encode())],
                                      http_version=b"1.0"), RID)
    assert isinstance(decision, Forward)
    assert parse_head(decision.head)[0] == b"GET /api/tags HTTP/1.0"
    assert field(decision.head, b"Connection") == [b"close"]
    assert field(decision.head, b"Host") == [b"127.0.0.1:11434"]


@pytest.mark.parametrize("url, target, line, host, logged", [
    ("http://ollama:11500/prefix/", b"/api/chat?x=1", b"POST /prefix/api/chat?x=1 HTTP/1.1", b"ollama:11500",
     "http://ollama:11500/prefix/api/chat?x=1"),
    ("http://[::1]:11434/a/b", b"/v1/models", b"POST /a/b/v1/models HTTP/1.1", b"[::1]:11434",
     "http://[::1]:11434/a/b/v1/models"),
    ("http://localhost", b"/api/chat", b"POST /api/chat HTTP/1.1", b"localhost:80",
     "http://localhost:80/api/chat"),
])
def test_upstream_base_path_and_host(url: str, target: bytes, line: bytes, host: bytes, logged: str) -> None:
    gate = make_gate(make_config(upstream={"url": url}))
    with_key = target + (b"&" if b"?" in target else b"?") + b"api_key=" + KEY.encode()
    decision = gate.decide(req(b"POST", with_key), RID)
    assert isinstance(decision, Forward)
    assert parse_head(decision.head)[0] == line
    assert field(decision.head, b"Host") == [host]
    assert decision.url == logged


# ---------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("headers, target, secret, label", [
    ([(b"X-API-Key", BAD_KEY.encode())], b"/api/tags", BAD_KEY, "x-api-key:api-****9999"),
    ([(b"Authorization", b"Bearer " + BAD_KEY.encode())], b"/api/tags", BAD_KEY, "bearer:api-****9999"),
    ([(b"Authorization", BAD_KEY.encode())], b"/api/tags", BAD_KEY, "authorization:api-****9999"),
    ([(b"Authorization", basic(f"u:{BAD_KEY}"))], b"/api/tags", BAD_KEY, "basic:api-****9999"),
    ([], b"/api/tags?api_key=" + BAD_KEY.encode(), BAD_KEY, "query:api-****9999"),
    ([(b"X-API-Key", b"tiny-k")], b"/api/tags", "tiny-k", "x-api-key:****"),
])
def test_invalid_key(headers: list[tuple[bytes, bytes]], target: bytes, secret: str, label: str) -> None:
    with pytest.raises(Unauthorized) as info:
        make_gate().decide(req(b"GET", target, headers), RID)
    error = info.value
    assert error.status == 401
    assert error.detail == label
    for text in (error.message, str(error), repr(error), error.detail):
        assert secret not in text


def test_invalid_key_from_a_trusted_ip_is_served_as_the_trusted_user() -> None:
    # A wrong key gains nothing a keyless request from that address would not get; clients that must send
    # some key (OpenAI SDK with api_key="ollama") keep working under IP trust. The key still never travels.
    gate = make_gate()
    gate.trust.grant(PEER, "alice", "x-api-key:api-****0101", 3600, gate.clock(), key_id_of(gate, KEY))
    decision = gate.decide(req(b"GET", b"/api/tags", [(b"Authorization", b"Bearer ollama")]), RID)
    assert isinstance(decision, Forward)
    assert decision.user == "alice" and decision.key_label.startswith("ip-trust:")
    assert b"ollama" not in decision.head.split(b"\r\n", 1)[1].lower().replace(b"127.0.0.1", b"")
    gate.trust.revoke_user("alice")
    with pytest.raises(Unauthorized):
        gate.decide(req(b"GET", b"/api/tags", [(b"X-API-Key", BAD_KEY.encode())]), RID)


@pytest.mark.parametrize("method, headers", [
    (b"GET", []),
    (b"HEAD", []),
    (b"DELETE", []),
    (b"POST", [(b"Content-Length", b"0")]),
    (b"GET", [(b"Content-Length", b"20")]),  # GET bodies are not searched for keys
    (b"POST", [(b"X-API-Key", b"")]),
])
def test_no_key_and_no_body_is_unauthorized(method: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(Unauthorized) as info:
        make_gate().decide(req(method, b"/api/tags", headers), RID)
    assert info.value.detail == ""
    assert "POST /auth" in info.value.message


# ---------------------------------------------------------------------------------------------------------
# Keys in the JSON body


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"PATCH", b"DELETE"])
@pytest.mark.parametrize("framing", [[(b"Content-Length", b"40")], [(b"Transfer-Encoding", b"chunked")]])
def test_keyless_body_is_read(method: bytes, framing: list[tuple[bytes, bytes]]) -> None:
    config = make_config(auth={"max_body_bytes": 1234})
    decision = make_gate(config).decide(req(method, b"/api/chat", [(b"Content-Type", b"application/json"),
                                                                   *framing]), RID)
    assert decision == ReadBody(1234, for_key=True)


def test_default_body_limit() -> None:
    decision = make_gate().decide(req(b"POST", b"/api/chat", [(b"Content-Length", b"40")]), RID)
    assert decision == ReadBody(20 * 1024 * 1024, for_key=True)


@pytest.mark.parametrize("framing", [[(b"Content-Length", b"999")], [(b"Transfer-Encoding", b"chunked")]])
def test_body_key_found_and_stripped(framing: list[tuple[bytes, bytes]]) -> None:
    gate = make_gate()
    request = req(b"POST", b"/api/chat?api_key=&x=1", [(b"Content-Type", b"application/json"), *framing])
    assert isinstance(gate.decide(request, RID), ReadBody)
    body = b'{"model":"llama3","api_key":"' + KEY.encode() + b'","stream":false}'
    decision = gate.decide_with_body(request, body, RID)
    assert isinstance(decision, Forward)
    assert decision.body == b'{"model":"llama3","stream":false}'
    assert decision.user == "alice"
    assert decision.key_label == "body:api-****0101"
    assert field(decision.head, b"Content-Length") == [str(len(decision.body)).encode()]
    assert field(decision.head, b"Transfer-Encoding") == []
    assert parse_head(decision.head)[0] == b"POST /api/chat?x=1 HTTP/1.1"
    assert_no_secret(decision.head)


def test_body_key_invalid() -> None:
    gate = make_gate()
    request = req(b"POST", b"/api/chat", [(b"Content-Length", b"40")])
    with pytest.raises(Unauthorized) as info:
        gate.decide_with_body(request, b'{"api_key":"' + BAD_KEY.encode() + b'"}', RID)
    assert info.value.detail == "body:api-****9999"
    assert BAD_KEY not in str(info.value)


@pytest.mark.parametrize("body", [b'{"model":"m"}', b'{"api_key":5}', b"not json", b'[{"api_key":"' +
                                  KEY.encode() + b'"}]', b'{"options":{"api_key":"' + KEY.encode() + b'"}}'])
def test_body_without_usable_key_is_unauthorized(body: bytes) -> None:
    gate = make_gate()
    request = req(b"POST", b"/api/chat", [(b"Content-Length", str(len(body)).encode())])
    with pytest.raises(Unauthorized):
        gate.decide_with_body(request, body, RID)


def test_body_with_lone_surrogate_key_is_unauthorized() -> None:
    gate = make_gate()
    body = b'{"api_key":"\\ud800xxxxxxxxxxxx"}'
    with pytest.raises(Unauthorized):
        request = req(b"POST", b"/api/chat", [(b"Content-Length", str(len(body)).encode())])
        gate.decide_with_body(request, body, RID)


def test_keyless_body_from_trusted_ip_is_forwarded_unchanged() -> None:
    gate = make_gate()
    gate.trust.grant(PEER, "bob", "bearer:api-****0202", 3600, gate.clock(), key_id_of(gate, KEY2))
    body = b'{\n  "model": "m",\n  "prompt": "hi"\n}'
    request = req(b"POST", b"/api/generate", [(b"Transfer-Encoding", b"chunked")])
    assert isinstance(gate.decide(request, RID), ReadBody)
    decision = gate.decide_with_body(request, body, RID)
    assert isinstance(decision, Forward)
    assert decision.body == body
    assert decision.user == "bob"
    assert decision.key_label.startswith("ip-trust:")
    assert decision.key_label.endswith("api-****0202")
    assert field(decision.head, b"Content-Length") == [str(len(body)).encode()]
    assert field(decision.head, b"Transfer-Encoding") == []


@pytest.mark.parametrize("framing", [[(b"Content-Length", b"4000000000")],
                                     [(b"Transfer-Encoding", b"chunked")]])
def test_blob_uploads_are_never_buffered(framing: list[tuple[bytes, bytes]]) -> None:
    target = b"/api/blobs/sha256:" + b"ab" * 32
    headers = [(b"Content-Type", b"application/json"), *framing]
    gate = make_gate()
    with pytest.raises(Unauthorized):  # no key, no trust: refused rather than read
        gate.decide(req(b"POST", target, headers), RID)
    gate.trust.grant(PEER, "alice", "x-api-key:api-****0101", 3600, gate.clock(), key_id_of(gate, KEY))
    decision = gate.decide(req(b"POST", target, headers), RID)
    assert isinstance(decision, Forward)
    assert decision.body is None
    assert decision.user == "alice"
    with_key = gate.decide(req(b"POST", target, [(b"X-API-Key", KEY.encode()), *headers]), RID)
    assert isinstance(with_key, Forward) and with_key.body is None
    assert (field(with_key.head, b"Content-Length") + field(with_key.head, b"Transfer-Encoding")
            == [framing[0][1]])


# ---------------------------------------------------------------------------------------------------------
# POST /auth and IP trust


def auth_request(body: bytes, headers: list[tuple[bytes, bytes]] | None = None,
                 peer: str = PEER) -> IncomingRequest:
    return req(b"POST", b"/auth", [(b"Content-Length", str(len(body)).encode()), *(headers or [])], peer=peer)


def test_auth_grants_ip_trust_until_session_ttl() -> None:
    clock = Clock(1000.0)
    gate = make_gate(make_config(auth={"session_ttl": 600}), clock)
    body = b'{"api_key":"' + KEY.encode() + b'"}'
    reply = gate.decide_with_body(auth_request(body), body, RID)
    assert isinstance(reply, LocalReply)
    assert reply.status == 200
    assert json.loads(reply.body) == {"user": "alice", "ip": PEER, "ip_trust": True,
                                      "expires_at": "2025-03-12T00:10:00+00:00", "expires_in": 600}
    assert KEY not in reply.note and KEY.encode() not in reply.body
    assert PEER in reply.note and "api-****0101" in reply.note

    keyless = req(b"GET", b"/api/tags")
    clock.now = 1599.9
    decision = gate.decide(keyless, RID)
    assert isinstance(decision, Forward)
    assert decision.user == "alice"
    assert decision.key_label.startswith("ip-trust:")
    assert decision.key_label.endswith("api-****0101")
    assert decision.client_ip == PEER
    assert_no_secret(decision.head)

    # another address is not trusted
    with pytest.raises(Unauthorized):
        gate.decide(req(b"GET", b"/api/tags", peer="203.0.113.10"), RID)

    clock.now = 1600.0
    with pytest.raises(Unauthorized):
        gate.decide(keyless, RID)


@pytest.mark.parametrize("headers, body, label", [
    ([(b"X-API-Key", KEY.encode())], b"", "x-api-key:api-****0101"),
    ([(b"Authorization", b"Bearer " + KEY.encode())], b"{}", "bearer:api-****0101"),
    ([], b'{"api_key": "' + KEY.encode() + b'"}', "body:api-****0101"),
    ([(b"X-API-Key", KEY.encode())], b'{"api_key":"' + BAD_KEY.encode() + b'"}', "x-api-key:api-****0101"),
])
def test_auth_key_sources(headers: list[tuple[bytes, bytes]], body: bytes, label: str) -> None:
    gate = make_gate()
    reply = gate.decide_with_body(auth_request(body, headers), body, RID)
    assert isinstance(reply, LocalReply)
    assert json.loads(reply.body)["user"] == "alice"
    grant = gate.trust.lookup(PEER, gate.clock())
    assert grant is not None
    assert (grant.user, grant.key_label, grant.expires_at) == ("alice", label, gate.clock() + 3600)


@pytest.mark.parametrize("body", [b"", b"{}", b'{"key":"x"}', b"garbage", b'{"api_key":""}'])
def test_auth_without_key(body: bytes) -> None:
    gate = make_gate()
    with pytest.raises(Unauthorized) as info:
        gate.decide_with_body(auth_request(body), body, RID)
    assert "api_key" in info.value.message
    assert len(gate.trust) == 0


def test_auth_with_invalid_key() -> None:
    gate = make_gate()
    body = b'{"api_key":"' + BAD_KEY.encode() + b'"}'
    with pytest.raises(Unauthorized) as info:
        gate.decide_with_body(auth_request(body), body, RID)
    assert info.value.detail == "body:api-****9999"
    assert len(gate.trust) == 0


def test_reauth_switches_user() -> None:
    gate = make_gate()
    for key, user in ((KEY, "alice"), (KEY2, "bob")):
        body = b'{"api_key":"' + key.encode() + b'"}'
        gate.decide_with_body(auth_request(body), body, RID)
        decision = gate.decide(req(b"GET", b"/api/tags"), RID)
        assert isinstance(decision, Forward) and decision.user == user
    assert len(gate.trust) == 1


def test_session_ttl_zero_disables_trust() -> None:
    table = TrustTable(10)
    # even a grant already in the table is ignored
    table.grant(PEER, "alice", "x-api-key:api-****0101", 3600, 1000.0)
    gate = make_gate(make_config(auth={"session_ttl": 0}), Clock(1000.0), trust=table)
    body = b'{"api_key":"' + KEY.encode() + b'"}'
    reply = gate.decide_with_body(auth_request(body), body, RID)
    assert isinstance(reply, LocalReply)
    assert json.loads(reply.body) == {"user": "alice", "ip": PEER, "ip_trust": False, "expires_at": None,
                                      "expires_in": 0}
    with pytest.raises(Unauthorized):
        gate.decide(req(b"GET", b"/api/tags"), RID)
    with pytest.raises(Unauthorized):
        gate.decide_with_body(req(b"POST", b"/api/chat", [(b"Content-Length", b"2")]), b"{}", RID)


def test_gate_uses_config_table_size() -> None:
    gate = make_gate(make_config(auth={"max_trusted_ips": 3}))
    assert gate.trust.max_entries == 3


# ---------------------------------------------------------------------------------------------------------
# X-Forwarded-For and trusted proxies

PROXY = "10.0.0.1"


def test_forwarded_for_ignored_from_untrusted_peer() -> None:
    gate = make_gate(make_config(server={"trusted_proxies": ["10.0.0.0/8"]}))
    spoof = [(b"X-Forwarded-For", b"198.51.100.7"), (b"X-Forwarded-Proto", b"https")]
    body = b'{"api_key":"' + KEY.encode() + b'"}'
    reply = gate.decide_with_body(auth_request(body, spoof), body, RID)
    assert json.loads(reply.body)["ip"] == PEER
    assert gate.trust.lookup("198.51.100.7", gate.clock()) is None
    decision = gate.decide(req(b"GET", b"/api/tags", spoof), RID)
    assert isinstance(decision, Forward)
    assert decision.client_ip == PEER
    assert field(decision.head, b"X-Forwarded-For") == [PEER.encode()]
    assert field(decision.head, b"X-Forwarded-Proto") == [b"http"]


def test_forwarded_for_ignored_without_trusted_proxies() -> None:
    gate = make_gate()
    request = req(b"GET", b"/api/tags", [(b"X-API-Key", KEY.encode()), (b"X-Forwarded-For", b"198.51.100.7")],
                  peer=PROXY)
    decision = gate.decide(request, RID)
    assert decision.client_ip == PROXY
    assert field(decision.head, b"X-Forwarded-For") == [PROXY.encode()]


def test_forwarded_for_honoured_from_trusted_proxy() -> None:
    gate = make_gate(make_config(server={"trusted_proxies": ["10.0.0.0/8"]}))
    hops = [(b"X-Forwarded-For", b"6.6.6.6, 198.51.100.7"), (b"X-Forwarded-Proto", b"https")]
    body = b'{"api_key":"' + KEY.encode() + b'"}'
    reply = gate.decide_with_body(auth_request(body, hops, peer=PROXY), body, RID)
    assert json.loads(reply.body)["ip"] == "198.51.100.7"
    decision = gate.decide(req(b"GET", b"/api/tags", hops, peer=PROXY), RID)
    assert isinstance(decision, Forward)
    assert decision.client_ip == "198.51.100.7"
    assert decision.user == "alice"
    assert field(decision.head, b"X-Forwarded-For") == [b"6.6.6.6, 198.51.100.7, 10.0.0.1"]
    assert field(decision.head, b"X-Forwarded-Proto") == [b"https"]
    # the proxy's own address is not trusted by that grant
    with pytest.raises(Unauthorized):
        gate.decide(req(b"GET", b"/api/tags", peer=PROXY), RID)


# ---------------------------------------------------------------------------------------------------------
# Account endpoints

ACCOUNT_TARGETS = [b"/api/me", b"/api/signout", b"/api/user/keys", b"/api/user/keys/x", b"/api/user/keys/a/b",
                   b"/api/%6De", b"/api/%6de", b"/api/m%65", b"/api//me/", b"/api/./me", b"/api/x/../me",
                   b"//api/me", b"///api///me", b"/api/me/", b"/api/me?x=1", b"/api/me%2F", b"/api/%2e/me",
                   b"/api/user/%6Beys/x", b"/v1/../api/signout", b"/api/me/."]


@pytest.mark.parametrize("target", ACCOUNT_TARGETS)
@pytest.mark.parametrize("method", [b"GET", b"POST", b"DELETE"])
def test_account_endpoints_forbidden(target: bytes, method: bytes) -> None:
    with pytest.raises(Forbidden) as info:
        make_gate().decide(req(method, target, [(b"X-API-Key", KEY.encode())]), RID)
    assert info.value.status == 403


def test_account_endpoints_forbidden_with_ip_trust_and_body_key() -> None:
    gate = make_gate()
    gate.trust.grant(PEER, "alice", "x-api-key:api-****0101", 3600, gate.clock(), key_id_of(gate, KEY))
    with pytest.raises(Forbidden):
        gate.decide(req(b"POST", b"/api/me"), RID)
    body = b'{"api_key":"' + KEY.encode() + b'"}'
    with pytest.raises(Forbidden):
        gate.decide_with_body(req(b"POST", b"/api/signout", [(b"Content-Length", b"31")]), body, RID)


@pytest.mark.parametrize("target", [b"http://localhost/api/me", b"http://127.0.0.1:11434/api/signout",
                                    b"HTTP://localhost/api/user/keys/x"])
def test_absolute_form_target_cannot_reach_account_endpoints(target: bytes) -> None:
    # Go's net/http routes an absolute-form request-target on its path part.
    with pytest.raises((Forbidden, BadRequest)):
        make_gate().decide(req(b"POST", target, [(b"X-API-Key", KEY.encode())]), RID)


def test_account_endpoint_needs_a_key_first() -> None:
    with pytest.raises(Unauthorized):
        make_gate().decide(req(b"POST", b"/api/me"), RID)


@pytest.mark.parametrize("target", ACCOUNT_TARGETS[:6])
def test_account_endpoints_allowed_when_configured(target: bytes) -> None:
    gate = make_gate(make_config(auth={"allow_account_endpoints": True}))
    decision = gate.decide(req(b"POST", target, [(b"X-API-Key", KEY.encode())]), RID)
    assert isinstance(decision, Forward)
    assert parse_head(decision.head)[0] == b"POST " + target + b" HTTP/1.1"  # forwarded as sent


@pytest.mark.parametrize("target", [b"/api/mem", b"/api/me2", b"/api/meta", b"/api/signouts",
                                    b"/api/user/keysX", b"/api/user", b"/api/chat", b"/v1/api/me", b"/me",
                                    b"/api/me/../chat"])
def test_lookalikes_are_not_account_endpoints(target: bytes) -> None:
    decision = make_gate().decide(req(b"POST", target, [(b"X-API-Key", KEY.encode())]), RID)
    assert isinstance(decision, Forward)
    assert parse_head(decision.head)[0] == b"POST " + target + b" HTTP/1.1"


@pytest.mark.parametrize("path, normal", [
    (b"/api/me", b"/api/me"),
    (b"/api/%6De", b"/api/me"),
    (b"/api//me/", b"/api/me"),
    (b"/api/./me", b"/api/me"),
    (b"//api/me", b"/api/me"),
    (b"/a/b/../../api/me", b"/api/me"),
    (b"/../../api/me", b"/api/me"),
    (b"api/me", b"/api/me"),
    (b"/", b"/"),
    (b"", b"/"),
])
def test_normalize_path(path: bytes, normal: bytes) -> None:
    assert normalize_path(path) == normal


# ---------------------------------------------------------------------------------------------------------
# Misc


def test_request_id_is_sent_upstream() -> None:
    decision = make_gate().decide(req(b"GET", b"/api/tags", [(b"X-API-Key", KEY.encode())]), b"0badf00d")
    assert field(decision.head, b"X-Request-Id") == [b"0badf00d"]


def test_errors_are_gate_errors() -> None:
    for exc in (Unauthorized, Forbidden, MethodNotAllowed, BadRequest):
        assert issubclass(exc, GateError)


def test_gate_builds_keyring_from_config() -> None:
    gate = make_gate()
    assert len(gate.keyring) == 2
    assert gate.keyring.user_for(KEY) == "alice"


# ---------------------------------------------------------------------------------------------------------
# Key guessing

def test_repeated_bad_keys_get_429_with_retry_after_and_other_clients_are_unaffected() -> None:
    from fastgate.errors import TooManyRequests
    now = [1000.0]
    gate = Gate(make_config(auth={"max_failures": 3, "failure_window": 30}), clock=lambda: now[0])
    bad = [(b"X-API-Key", BAD_KEY.encode())]
    for _ in range(3):
        with pytest.raises(Unauthorized):
            gate.decide(req(b"GET", b"/api/tags", bad), RID)
    with pytest.raises(TooManyRequests) as info:
        gate.decide(req(b"GET", b"/api/tags", bad), RID)
    assert info.value.status == 429
    assert dict(info.value.extra_headers)[b"Retry-After"] == b"30"
    # a correct key from the blocked address is refused too: no oracle for guesses
    with pytest.raises(TooManyRequests):
        gate.decide(req(b"GET", b"/api/tags", [(b"X-API-Key", KEY.encode())]), RID)
    # another address is served normally
    other = req(b"GET", b"/api/tags", [(b"X-API-Key", KEY.encode())])
    other.peer_ip = "192.0.2.99"
    assert isinstance(gate.decide(other, RID), Forward)
    now[0] += 31
    assert isinstance(gate.decide(req(b"GET", b"/api/tags", [(b"X-API-Key", KEY.encode())]), RID), Forward)


def test_successful_keys_do_not_count_as_failures() -> None:
    gate = Gate(make_config(auth={"max_failures": 2}))
    for _ in range(20):
        assert isinstance(gate.decide(req(b"GET", b"/api/tags", [(b"X-API-Key", KEY.encode())]), RID), Forward)
    with pytest.raises(Unauthorized):
        gate.decide(req(b"GET", b"/api/tags", [(b"X-API-Key", BAD_KEY.encode())]), RID)


def test_reload_swaps_keys_and_drops_trust_of_removed_users() -> None:
    gate = make_gate()
    gate.trust.grant("192.0.2.1", "user1", "x", 3600, gate.clock())
    new_key = "api-brand-new-key-0001"
    gate.reload(make_config(keys={new_key: "newbie"}))
    decision = gate.decide(req(b"GET", b"/api/tags", [(b"X-API-Key", new_key.encode())]), RID)
    assert isinstance(decision, Forward) and decision.user == "newbie"
    with pytest.raises(Unauthorized):
        gate.decide(req(b"GET", b"/api/tags", [(b"X-API-Key", KEY.encode())]), RID)
    assert gate.trust.lookup("192.0.2.1", gate.clock()) is None


# ---------------------------------------------------------------------------------------------------------
# Managed keys: roles, model allow-lists, expiry (issue 5)

def managed_gate(**principal_fields: Any) -> tuple[Gate, str, list[float]]:
    import hashlib
    from fastgate.access import Principal, Role
    wall = [1_800_000_000.0]
    gate = Gate(make_config(), wall_clock=lambda: wall[0])
    secret = "fg_managed-secret-for-tests"
    fields = {"role": Role.USER, **principal_fields}
    gate.set_managed_keys({hashlib.sha256(secret.encode()).digest(): Principal("dana", "k_0001", **fields)})
    return gate, secret, wall


@pytest.mark.parametrize("method,target,allowed", [
    (b"POST", b"/api/chat", True), (b"POST", b"/api/generate", True), (b"GET", b"/api/tags", True),
    (b"POST", b"/v1/chat/completions", True), (b"GET", b"/v1/models", True), (b"GET", b"/api/version", True),
    (b"POST", b"/api/pull", False), (b"DELETE", b"/api/delete", False), (b"POST", b"/api/create", False),
    (b"POST", b"/api/blobs/sha256:" + b"a" * 64, False), (b"POST", b"/api/copy", False),
    (b"POST", b"/api/%70ull", False), (b"GET", b"/api/experimental/x", False),
])
def test_user_role_scope(method: bytes, target: bytes, allowed: bool) -> None:
    gate, secret, _ = managed_gate()
    request = req(method, target, [(b"X-API-Key", secret.encode())])
    if allowed:
        decision = gate.decide(request, RID)
        assert isinstance(decision, Forward) and decision.user == "dana"
        assert decision.principal.key_id == "k_0001"
    else:
        with pytest.raises(Forbidden) as info:
            gate.decide(request, RID)
        assert "admin" in info.value.message


def test_model_allow_list_reads_the_body_and_refuses_other_models() -> None:
    gate, secret, _ = managed_gate(models=("llama3*", "qwen2.5:*"))
    body = json.dumps({"model": "mistral:7b", "prompt": "x"}).encode()
    request = req(b"POST", b"/api/generate", [(b"X-API-Key", secret.encode()),
                                               (b"Content-Length", str(len(body)).encode())])
    decision = gate.decide(request, RID)
    assert isinstance(decision, ReadBody)  # the key is in the head, but the model is in the body
    with pytest.raises(Forbidden) as info:
        gate.decide_with_body(request, body, RID)
    assert "mistral:7b" in info.value.message
    for model in ("llama3.2:latest", "llama3", "qwen2.5:0.5b"):
        ok = json.dumps({"model": model}).encode()
        request = req(b"POST", b"/api/generate", [(b"X-API-Key", secret.encode()),
                                                   (b"Content-Length", str(len(ok)).encode())])
        assert isinstance(gate.decide_with_body(request, ok, RID), Forward), model
    # the model named in the path of /v1/models/NAME
    with pytest.raises(Forbidden):
        gate.decide(req(b"GET", b"/v1/models/mistral:7b", [(b"X-API-Key", secret.encode())]), RID)


def test_expired_managed_key_is_refused() -> None:
    gate, secret, wall = managed_gate(expires_at=1_800_000_100.0)
    assert isinstance(gate.decide(req(b"GET", b"/api/tags", [(b"X-API-Key", secret.encode())]), RID), Forward)
    wall[0] = 1_800_000_100.0
    with pytest.raises(Unauthorized):
        gate.decide(req(b"GET", b"/api/tags", [(b"X-API-Key", secret.encode())]), RID)


def test_ip_trust_carries_the_scope_of_the_key_and_ends_when_it_is_revoked() -> None:
    gate, secret, _ = managed_gate(models=("llama3*",))
    body = json.dumps({"api_key": secret}).encode()
    assert gate.decide_with_body(req(b"POST", b"/auth"), body, RID).status == 200  # type: ignore[union-attr]
    pull = req(b"POST", b"/api/pull", [(b"Content-Length", b"2")])
    assert isinstance(gate.decide(pull, RID), ReadBody)  # no key in the head: the body might hold one
    with pytest.raises(Forbidden):
        gate.decide_with_body(pull, b"{}", RID)  # user role, via trust
    decision = gate.decide(req(b"GET", b"/api/tags"), RID)
    assert isinstance(decision, Forward) and decision.principal.key_id == "k_0001"
    gate.set_managed_keys({})  # the key was revoked in the store
    with pytest.raises(Unauthorized):
        gate.decide(req(b"GET", b"/api/tags"), RID)


def test_config_key_given_as_digest() -> None:
    import hashlib
    digest = hashlib.sha256(b"the-secret-key-123").hexdigest()
    gate = Gate(make_config(keys={f"sha256:{digest}": "erin"}))
    decision = gate.decide(req(b"GET", b"/api/tags", [(b"X-API-Key", b"the-secret-key-123")]), RID)
    assert isinstance(decision, Forward) and decision.user == "erin"
    with pytest.raises(Unauthorized):
        gate.decide(req(b"GET", b"/api/tags", [(b"X-API-Key", f"sha256:{digest}".encode())]), RID)
