"""Every known way around a model allow-list, sent through a running fastgate to a recording fake Ollama.

Each refused case must be refused with the stated status and reach Ollama not at all. Each positive control
(the same shape naming an allowed model) must reach Ollama with its body unchanged: refusing what Ollama would
read as allowed is a bug too. The key under test is limited to `llama3*`; `qwen2.5` is the forbidden model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import pytest

from fastgate.access import Principal, Role
from fastgate.server import RunningServer
from tests.conftest import MakeGateway
from tests.fake_ollama import FakeOllama
from tests.rawhttp import Client

pytestmark = pytest.mark.timeout(60)

USER_SECRET = "fg_bypass-user-key-0000000000001"
ADMIN_SECRET = "fg_bypass-admin-key-000000000001"
ANY_SECRET = "fg_bypass-unlimited-user-000001"  # a user key without an allow-list


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: bytes | None
    status: int  # expected answer from fastgate; 0 for a positive control (forwarded unchanged)
    method: str = "POST"
    secret: str = USER_SECRET
    headers: tuple[tuple[str, str], ...] = ()
    config: dict = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        return self.name


def j(text: str) -> bytes:
    return text.encode("utf-8")


DEEP = b"[" * 1500 + b"1" + b"]" * 1500
HUGE_INT = b"1" * 4400
MULTIPART_BOUNDARY = "fgb0undary"


def multipart(model: str, *, extra: str = "") -> bytes:
    return (f"--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n"
            f"{extra}"
            f"--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\nRIFFdata\r\n--{MULTIPART_BOUNDARY}--\r\n").encode()


MP = (("Content-Type", f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"),)
FORM = (("Content-Type", "application/x-www-form-urlencoded"),)
ZSTD_FRAME = bytes.fromhex("28b52ffd2000b100007b226d6f64656c223a227177656e322e35227d")

CASES = [
    # 1. keys match fields case-insensitively, with Unicode simple folding; the last match wins
    Case("capitalised key", "/api/chat", j('{"Model":"qwen2.5","messages":[]}'), 403),
    Case("upper-case duplicate wins", "/api/chat", j('{"model":"llama3","MODEL":"qwen2.5"}'), 403),
    Case("mixed case", "/api/generate", j('{"mOdEl":"qwen2.5","prompt":"x"}'), 403),
    Case("escaped key", "/api/generate", j('{"mod\\u0065l":"qwen2.5"}'), 403),
    Case("escaped upper key", "/api/embed", j('{"\\u004dODEL":"qwen2.5","input":"x"}'), 403),
    Case("v1 capitalised", "/v1/chat/completions", j('{"Model":"qwen2.5","messages":[]}'), 403),
    Case("show by name", "/api/show", j('{"name":"qwen2.5"}'), 403),
    Case("show by NAME", "/api/show", j('{"NAME":"qwen2.5"}'), 403),
    Case("long s in source", "/api/copy", j('{"ſource":"qwen2.5","destination":"llama3-copy"}'), 403,
         secret=ADMIN_SECRET),
    Case("long s in destination", "/api/copy", j('{"source":"llama3","deſtination":"qwen2.5"}'), 403,
         secret=ADMIN_SECRET),
    Case("create from, capitalised", "/api/create", j('{"model":"llama3-mine","FROM":"qwen2.5"}'), 403,
         secret=ADMIN_SECRET),
    Case("delete by Name", "/api/delete", j('{"Name":"qwen2.5"}'), 403, method="DELETE", secret=ADMIN_SECRET),
    Case("pull by mOdel", "/api/pull", j('{"mOdel":"qwen2.5"}'), 403, secret=ADMIN_SECRET),
    # 2. null leaves a Go string field unchanged
    Case("null after", "/api/chat", j('{"model":"qwen2.5","messages":[],"model":null}'), 403),
    Case("null folded", "/api/chat", j('{"MODEL":"qwen2.5","model":null}'), 403),
    # 3. only the first JSON value is read by Go; fastgate refuses anything after it
    Case("trailing text", "/api/chat", j('{"model":"qwen2.5"} anything'), 400),
    Case("second object", "/api/chat", j('{"model":"qwen2.5"}{"model":"llama3"}'), 400),
    Case("allowed then forbidden", "/api/chat", j('{"model":"llama3"}{"model":"qwen2.5"}'), 400),
    Case("trailing on v1", "/v1/chat/completions", j('{"model":"qwen2.5"}]'), 400),
    # 4. invalid UTF-8: Go substitutes U+FFFD and reads on
    Case("invalid byte elsewhere", "/api/chat", b'{"x":"\xff","model":"qwen2.5"}', 403),
    Case("overlong elsewhere", "/api/chat", b'{"x":"\xc0\xaf","model":"qwen2.5"}', 403),
    Case("invalid byte in model", "/api/chat", b'{"model":"llama3\xff"}', 400),
    Case("lone surrogate in model", "/api/chat", j('{"model":"llama3\\ud800"}'), 400),
    # 5. what Python's json cannot read
    Case("deep nesting", "/api/chat", b'{"x":' + DEEP + b',"model":"qwen2.5"}', 403),
    Case("huge integer", "/api/chat", b'{"x":' + HUGE_INT + b',"model":"qwen2.5"}', 403),
    # 6. compressed bodies (Ollama's /v1 routes decompress zstd)
    Case("zstd on v1", "/v1/chat/completions", ZSTD_FRAME, 415, headers=(("Content-Encoding", "zstd"),)),
    Case("gzip on api", "/api/chat", b"\x1f\x8b\x08\x00", 415, headers=(("Content-Encoding", "gzip"),)),
    # 7. forms and the transcription query
    Case("multipart model", "/v1/audio/transcriptions", multipart("qwen2.5"), 403, headers=MP),
    Case("query model", "/v1/audio/transcriptions?model=qwen2.5", multipart("llama3"), 403, headers=MP),
    Case("urlencoded model", "/v1/audio/transcriptions", b"model=qwen2.5", 403, headers=FORM),
    Case("second multipart model", "/v1/audio/transcriptions",
         multipart("llama3", extra=f'--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name="model"'
                                    f'\r\n\r\nqwen2.5\r\n'), 403, headers=MP),
    Case("model in the path", "/v1/models/qwen2.5", None, 403, method="GET"),
    Case("escaped model in the path", "/v1/models/qwen2%2e5", None, 403, method="GET"),
    # 8. cloud models and server-side web tools
    Case("cloud tag", "/api/chat", j('{"model":"llama3:cloud"}'), 403),
    Case("cloud suffix", "/api/chat", j('{"model":"llama3.2:8b-cloud"}'), 403),
    Case("cloud upper case", "/api/chat", j('{"model":"llama3:8B-CLOUD"}'), 403),
    Case("cloud for a key without a list", "/api/chat", j('{"model":"gpt-oss:120b-cloud"}'), 403,
         secret=ANY_SECRET),
    Case("web search tool", "/v1/messages",
         j('{"model":"llama3.2","max_tokens":9,"messages":[],"tools":[{"type":"web_search_20250305",'
           '"name":"web_search"}]}'), 403, secret=ANY_SECRET),
    # names as Ollama resolves them
    Case("upper-case name", "/api/chat", j('{"model":"QWEN2.5"}'), 403),
    Case("long form", "/api/chat", j('{"model":"registry.ollama.ai/library/qwen2.5:latest"}'), 403),
    Case("namespace that starts like the pattern", "/api/chat", j('{"model":"llama3x/qwen2.5"}'), 403),
    Case("unknown route", "/api/experimental/new-thing", j('{"model":"qwen2.5"}'), 403, secret=ADMIN_SECRET),
    # positive controls: the same shapes, naming an allowed model, reach Ollama byte for byte
    Case("ok: capitalised key", "/api/chat", j('{"Model":"llama3.2","messages":[]}'), 0),
    Case("ok: last wins", "/api/chat", j('{"model":"qwen2.5","MODEL":"llama3.2"}'), 0),
    Case("ok: null after", "/api/chat", j('{"model":"llama3.2","model":null}'), 0),
    Case("ok: invalid byte elsewhere", "/api/chat", b'{"x":"\xff","model":"llama3.2"}', 0),
    Case("ok: deep nesting", "/api/chat", b'{"x":' + DEEP + b',"model":"llama3.2"}', 0),
    Case("ok: huge integer", "/api/chat", b'{"x":' + HUGE_INT + b',"model":"llama3.2"}', 0),
    Case("ok: trailing whitespace", "/api/chat", j('{"model":"llama3.2"} \r\n\t'), 0),
    Case("ok: long s", "/api/copy", j('{"ſource":"llama3.2","destination":"llama3-copy"}'), 0,
         secret=ADMIN_SECRET),
    Case("ok: multipart", "/v1/audio/transcriptions", multipart("llama3.2"), 0, headers=MP),
    Case("ok: model in the path", "/v1/models/llama3.2", None, 0, method="GET"),
    Case("ok: upper-case name", "/api/chat", j('{"model":"LLAMA3.2"}'), 0),
    Case("ok: long form", "/api/chat", j('{"model":"registry.ollama.ai/library/llama3.2:latest"}'), 0),
    Case("ok: v1 chat", "/v1/chat/completions", j('{"model":"llama3.2","messages":[]}'), 0),
    Case("ok: messages without tools", "/v1/messages", j('{"model":"llama3.2","max_tokens":9,"messages":[]}'), 0,
         secret=ANY_SECRET),
]


def install_keys(gw: RunningServer) -> None:
    gw.proxy.gate.set_managed_keys({
        hashlib.sha256(USER_SECRET.encode()).digest():
            Principal("ursula", "k_user", role=Role.USER, models=("llama3*",)),
        hashlib.sha256(ADMIN_SECRET.encode()).digest():
            Principal("adam", "k_admin", role=Role.ADMIN, models=("llama3*",)),
        hashlib.sha256(ANY_SECRET.encode()).digest(): Principal("una", "k_any", role=Role.USER),
    })


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_allow_list_case(case: Case, make_gateway: MakeGateway, ollama: FakeOllama) -> None:
    gw = await make_gateway()
    install_keys(gw)
    headers = [("X-API-Key", case.secret), *case.headers]
    client = await Client.connect(gw.port)
    try:
        resp = await client.request(case.method, case.path, headers=headers, body=case.body)
    finally:
        await client.close()
    if case.status:
        assert resp.status == case.status, resp.body
        assert "error" in resp.json()
        assert ollama.received == []
    else:
        assert resp.status not in (400, 403, 415) or ollama.received, resp.body
        assert len(ollama.received) == 1
        got = ollama.received[0]
        assert got.body == (case.body or b"")
        assert got.target == case.path


@pytest.mark.parametrize("body, forbidden", [
    (b'{"api_key":"%s","Model":"qwen2.5"}', True),
    (b'{"Model":"qwen2.5","api_key":"%s"}', True),
    (b'{"api_key":"%s","model":"llama3.2"}', False),
])
async def test_key_in_the_body_then_judged_as_forwarded(body: bytes, forbidden: bool, make_gateway: MakeGateway,
                                                         ollama: FakeOllama) -> None:
    gw = await make_gateway()
    install_keys(gw)
    client = await Client.connect(gw.port)
    try:
        resp = await client.request("POST", "/api/chat", body=body % USER_SECRET.encode())
    finally:
        await client.close()
    if forbidden:
        assert resp.status == 403 and ollama.received == []
    else:
        assert len(ollama.received) == 1
        assert json.loads(ollama.received[0].body) == {"model": "llama3.2"}


async def test_ip_trust_carries_the_allow_list_to_body_checks(make_gateway: MakeGateway,
                                                              ollama: FakeOllama) -> None:
    gw = await make_gateway()
    install_keys(gw)
    client = await Client.connect(gw.port)
    try:
        auth = await client.request("POST", "/auth", json_body={"api_key": USER_SECRET}, host="127.0.0.1")
        assert auth.status == 200
        resp = await client.request("POST", "/api/chat", body=b'{"MODEL":"qwen2.5"}', host="127.0.0.1")
        assert resp.status == 403
        resp = await client.request("POST", "/api/chat", body=b'{"model":"llama3.2","stream":false}',
                                    host="127.0.0.1")
        assert resp.status == 200
    finally:
        await client.close()
    assert [r.path for r in ollama.received] == ["/api/chat"]


async def test_allow_cloud_lets_explicit_cloud_patterns_through(make_gateway: MakeGateway,
                                                                ollama: FakeOllama) -> None:
    gw = await make_gateway(auth={"allow_cloud": True})
    secret = "fg_cloud-key-00000000000000000001"
    gw.proxy.gate.set_managed_keys({
        hashlib.sha256(secret.encode()).digest(): Principal("c", "k_c", role=Role.USER, models=("llama3:cloud", "gpt-oss:*-cloud", "llama3*")),
        hashlib.sha256(ANY_SECRET.encode()).digest(): Principal("una", "k_any", role=Role.USER),
    })
    client = await Client.connect(gw.port)
    try:
        ok = await client.request("POST", "/api/chat", headers={"X-API-Key": secret},
                                  body=b'{"model":"llama3:cloud"}')
        ok2 = await client.request("POST", "/api/chat", headers={"X-API-Key": secret},
                                   body=b'{"model":"gpt-oss:20b-cloud"}')
        refused = await client.request("POST", "/api/chat", headers={"X-API-Key": secret},
                                       body=b'{"model":"llama3.2:8b-cloud"}')  # `llama3*` is a local pattern
        free = await client.request("POST", "/api/chat", headers={"X-API-Key": ANY_SECRET},
                                    body=b'{"model":"gpt-oss:120b-cloud"}')
    finally:
        await client.close()
    assert refused.status == 403
    assert ok.status != 403 and ok2.status != 403 and free.status != 403
    assert [json.loads(r.body)["model"] for r in ollama.received] == [
        "llama3:cloud", "gpt-oss:20b-cloud", "gpt-oss:120b-cloud"]
