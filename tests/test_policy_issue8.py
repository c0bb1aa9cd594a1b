"""Issue 8 bugs outside the body reader, each driven through the gate with plain values."""

from __future__ import annotations

import hashlib
import io
import json
import logging

import pytest

from fastgate.access import Principal, Role
from fastgate.config import build_config
from fastgate.gate import Forward, Gate
from fastgate.keys import KeyRing, mask
from fastgate.logs import LOGGER_NAME, LineFormatter
from tests.conftest import KEY1, MakeGateway
from tests.fake_ollama import FakeOllama
from tests.rawhttp import Client
from tests.test_gate import Clock, RID, T0_WALL, auth_request, req

ALICE_KEY = "api-20250312000101"
BOB_KEY = "api-77777777770101"  # masks exactly like alice's


def test_keys_that_mask_alike_get_distinct_ids() -> None:
    assert mask(ALICE_KEY) == mask(BOB_KEY)
    ring = KeyRing({ALICE_KEY: "alice", BOB_KEY: "bob", "short1": "carol", "short2": "dave"})
    ids = {ring.principal_for(k).key_id for k in (ALICE_KEY, BOB_KEY, "short1", "short2")}  # type: ignore[union-attr]
    assert len(ids) == 4
    for key in (ALICE_KEY, BOB_KEY):
        assert mask(key) not in ring.principal_for(key).key_id  # type: ignore[union-attr]


def test_digest_form_has_the_same_id_as_the_clear_key() -> None:
    import hashlib
    digest = hashlib.sha256(ALICE_KEY.encode()).hexdigest()
    clear = KeyRing({ALICE_KEY: "alice"}).principal_for(ALICE_KEY)
    hashed = KeyRing({f"sha256:{digest.upper()}": "alice"}).principal_for(ALICE_KEY)
    assert clear is not None and hashed is not None and clear.key_id == hashed.key_id


def test_ip_trust_is_served_as_the_user_who_authenticated() -> None:
    config = build_config({"keys": {ALICE_KEY: "alice", BOB_KEY: "bob"}})
    gate = Gate(config, clock=Clock(), wall_clock=lambda: T0_WALL)
    body = b'{"api_key":"' + ALICE_KEY.encode() + b'"}'
    gate.decide_with_body(auth_request(body), body, RID)
    decision = gate.decide(req(b"GET", b"/api/tags", host=b"127.0.0.1:8000"), RID)
    assert isinstance(decision, Forward)
    assert decision.user == "alice"


# ---------------------------------------------------------------------------------------------------------
# Through a running gateway



LIMITED = "fg_issue8-limited-key-00000000001"


async def trusted_client(gw) -> Client:  # type: ignore[no-untyped-def]
    client = await Client.connect(gw.port)
    resp = await client.request("POST", "/auth", json_body={"api_key": KEY1}, host="127.0.0.1:8000")
    assert resp.status == 200
    return client


@pytest.mark.parametrize("headers, host", [
    ({"Origin": "https://evil.example"}, "127.0.0.1:8000"),
    ({"Origin": "null"}, "127.0.0.1:8000"),
    ({"Sec-Fetch-Site": "cross-site"}, "127.0.0.1:8000"),
    ({}, "rebind.evil.example:8100"),
    ({"Origin": "http://rebind.evil.example:8100"}, "rebind.evil.example:8100"),
])
async def test_drive_by_requests_with_ambient_credentials_are_refused(
        headers: dict[str, str], host: str, make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway()
    client = await trusted_client(gw)
    try:
        for method, path, body in (("POST", "/api/pull", b'{"model":"x"}'),
                                   ("POST", "/api/generate", b'{"model":"llama3.2","prompt":"x"}'),
                                   ("GET", "/api/tags", None)):
            resp = await client.request(method, path, headers={"Content-Type": "text/plain", **headers},
                                        body=body, host=host)
            assert resp.status == 403, (path, resp.body)
        # Basic credentials a browser cached are ambient too
        import base64
        basic = "Basic " + base64.b64encode(f"u:{KEY1}".encode()).decode()
        resp = await client.request("GET", "/api/tags", headers={"Authorization": basic, **headers}, host=host)
        assert resp.status == 403
    finally:
        await client.close()
    assert ollama.received == []


async def test_key_headers_and_allowed_origins_are_not_drive_by(make_gateway: MakeGateway,
                                                                ollama: FakeOllama) -> None:
    gw = await make_gateway(cors={"allow_origins": ["https://chat.example.com"]},
                            server={"hostnames": ["gpu.example.com"]})
    client = await trusted_client(gw)
    try:
        # a key in a header: a rebinding page cannot know it
        resp = await client.request("GET", "/api/tags", headers={"X-API-Key": KEY1, "Origin": "https://evil.example"},
                                    host="rebind.evil.example")
        assert resp.status == 200
        # IP trust from an allowed origin, to a configured host name; and without any Origin (CLI, curl)
        resp = await client.request("GET", "/api/tags", headers={"Origin": "https://chat.example.com"},
                                    host="GPU.example.com:8000")
        assert resp.status == 200
        resp = await client.request("GET", "/api/tags", host="[::1]:8000")
        assert resp.status == 200
        resp = await client.request("GET", "/api/tags", host="localhost")
        assert resp.status == 200
    finally:
        await client.close()
    assert len(ollama.received) == 4


async def test_cors_answers_carry_each_field_once(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    # An origin Ollama allows by default: with forward_origin it answers CORS itself as well.
    gw = await make_gateway(cors={"allow_origins": ["http://localhost:3000"]}, upstream={"forward_origin": True})
    origin = {"Origin": "http://localhost:3000"}
    client = await Client.connect(gw.port)
    try:
        answers = [
            await client.request("OPTIONS", "/api/chat", headers={**origin, "Access-Control-Request-Method": "POST",
                                                                  "Access-Control-Request-Headers": "x-api-key"}),
            await client.request("GET", "/", headers=origin),
            await client.request("GET", "/api/tags", headers=origin),  # 401
            await client.request("GET", "/api/version", headers={**origin, "X-API-Key": KEY1}),  # relayed
        ]
    finally:
        await client.close()
    for resp in answers:
        names = [n.lower() for n, _ in resp.headers]
        assert names.count("access-control-allow-origin") == 1, resp.headers
        assert names.count("vary") == 1, resp.headers
        assert resp.header("access-control-allow-origin") == "http://localhost:3000"
    assert answers[-1].status == 200


async def test_head_on_a_trimmed_listing_has_no_body(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway()
    gw.proxy.gate.set_managed_keys({hashlib.sha256(LIMITED.encode()).digest():
                                    Principal("lim", "k_lim", role=Role.USER, models=("qwen2.5:*",))})
    client = await Client.connect(gw.port)
    try:
        head = await client.request("HEAD", "/api/tags", headers={"X-API-Key": LIMITED})
        # the connection must still be in sync: the next answer is read correctly
        full = await client.request("GET", "/api/tags", headers={"X-API-Key": LIMITED})
    finally:
        await client.close()
    assert head.status == 200 and head.body == b""
    assert full.status == 200 and [m["name"] for m in full.json()["models"]] == ["qwen2.5:0.5b"]
    assert int(head.header("content-length") or -1) == len(full.body)


async def test_client_text_cannot_break_log_lines(make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter())
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    gw = await make_gateway()
    gw.proxy.gate.set_managed_keys({hashlib.sha256(LIMITED.encode()).digest():
                                    Principal("lim", "k_lim", role=Role.USER, models=("qwen2.5:*",))})
    client = await Client.connect(gw.port)
    forged = "2025-03-13 10:15:23 - INFO - [deadbeef] admin (x-api-key:api-****0101) -> forged"
    try:
        await client.request("GET", "/api/tags?api_key=%0a" + "x" * 20 + "%0d%0a")
        await client.request("POST", "/api/chat", body=json.dumps({"api_key": "\n" + "y" * 20 + "\n"}).encode())
        await client.request("POST", "/api/chat", headers={"X-API-Key": LIMITED},
                             body=json.dumps({"model": "x\r\n" + forged + "\u2028y"}).encode())
    finally:
        await client.close()
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert lines and not any(line.startswith("2025-03-13 10:15:23") for line in lines)
    assert all(" - " in line for line in lines)
    assert sum("Refused" in line for line in lines) == 3
    assert sum(line.startswith("x") or line.startswith("y") or line.startswith("*") for line in lines) == 0

