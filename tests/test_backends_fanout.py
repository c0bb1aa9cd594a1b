"""Several Ollamas answering as one (issue 9 rules 6 and 7), through a running fastgate in front of fake Ollamas:
merged /api/tags, /api/ps and /v1/models (trimmed to a key's allow-list), and pull, delete and copy sent to
every backend concerned."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import ollama as ollama_lib
import openai
import pytest

from fastgate.access import Principal, Role
from fastgate.logs import FIELDS
from fastgate.server import RunningServer
from tests.backends_support import USER_KEY, Fakes, Start, fake_ollamas, gateways
from tests.conftest import KEY1, MakeGateway
from tests.fake_ollama import FakeOllama, _norm_model
from tests.rawhttp import Client, RawResponse, build_request
from tests.test_backends import LLAMA, QWEN, generate, until, views

BGE = "bge-m3:latest"
PHI = "phi3:mini"
LIMITED_KEY = "api-20250312008888"  # role user, may use llama* only
LIMITED_ADMIN = "api-20250312007777"  # role admin, may use llama* only
MANAGED = {USER_KEY: Principal("plain", "k_plain", role=Role.USER),
           LIMITED_KEY: Principal("limited", "k_limited", role=Role.USER, models=("llama*",)),
           LIMITED_ADMIN: Principal("limited-admin", "k_ladmin", role=Role.ADMIN, models=("llama*",))}
# Pollers that read each backend once at start and then not for the length of a test: what fastgate knows
# afterwards it learnt from the fan-out itself.
SLOW_POLLS = {"health_interval": 30.0, "inventory_interval": 30.0, "loaded_interval": 30.0}


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    async with fake_ollamas() as make:
        yield make


@pytest.fixture
async def gateway_for() -> AsyncIterator[Start]:
    async with gateways(MANAGED) as make:
        yield make


def backends_of(*fakes: FakeOllama) -> list[dict[str, Any]]:
    return [{"name": name, "url": fake.url} for name, fake in zip("abc", fakes)]


async def settled(gw: RunningServer, *fakes: FakeOllama) -> None:
    """Every poller's first round is over (each fake saw /api/version, /api/tags and /api/ps), and the router
    knows every inventory: with SLOW_POLLS nothing more is polled during the test."""
    await until(lambda: all({"/api/version", "/api/tags", "/api/ps"} <= {r.path for r in fake.received}
                            for fake in fakes))
    await until(lambda: all(view.inventory_known for view in views(gw).values()))


async def call(port: int, method: str, path: str, *, key: str = KEY1, body: Any = None,
               headers: dict[str, str] | None = None) -> RawResponse:
    async with await Client.connect(port) as client:
        return await client.request(method, path, headers={"X-API-Key": key, **(headers or {})}, json_body=body)


def names(resp: RawResponse, field: str = "models", key: str = "name") -> list[str]:
    return [item[key] for item in resp.json()[field] or []]


def paths(fake: FakeOllama, path: str) -> list[Any]:
    return [r for r in fake.received if r.path == path]


# ---------------------------------------------------------------------------------------------------------
# Rule 6: listings

async def test_tags_ps_and_v1_models_are_the_union_of_the_backends(fakes: Fakes, gateway_for: Start) -> None:
    a, b, c = await fakes([QWEN, LLAMA]), await fakes([LLAMA, BGE]), await fakes([PHI])
    a._loaded[_norm_model(LLAMA)] = None
    b._loaded[_norm_model(LLAMA)] = None
    b._loaded[_norm_model(BGE)] = None
    gw = await gateway_for(backends_of(a, b, c))
    await settled(gw, a, b, c)
    tags = await call(gw.port, "GET", "/api/tags")
    assert tags.status == 200 and tags.header("content-type") == "application/json; charset=utf-8"
    assert names(tags) == [BGE, LLAMA, PHI, QWEN]  # once each, sorted
    assert set(tags.json()["models"][0]) >= {"name", "model", "modified_at", "size", "digest", "details"}
    ps = await call(gw.port, "GET", "/api/ps")
    assert ps.status == 200 and names(ps) == [BGE, LLAMA]
    version = await call(gw.port, "GET", "/api/version")  # from one backend, whichever
    assert version.status == 200 and version.json() == {"version": a.version}
    models = await call(gw.port, "GET", "/v1/models")
    assert models.status == 200 and models.json()["object"] == "list"
    assert names(models, "data", "id") == [BGE, LLAMA, PHI, QWEN]
    for path, full in (("/api/tags", tags), ("/v1/models", models)):
        head = await call(gw.port, "HEAD", path)
        assert head.status == 200 and head.body == b""
        assert head.header("content-length") == str(len(full.body))
    # asked live, each backend with its own Host, and never with the client's key
    asked = [r for fake in (a, b, c) for r in paths(fake, "/api/tags")]
    assert all(r.header("x-api-key") is None and r.header("authorization") is None for r in asked)
    assert {r.header("host") for r in paths(c, "/v1/models")} == {f"127.0.0.1:{c.port}"}


async def test_listings_are_trimmed_to_the_keys_allow_list(fakes: Fakes, gateway_for: Start) -> None:
    a, b = await fakes([QWEN, LLAMA]), await fakes(["llama3.1:8b", BGE])
    a._loaded[_norm_model(QWEN)] = None
    b._loaded[_norm_model("llama3.1:8b")] = None
    gw = await gateway_for(backends_of(a, b))
    await settled(gw, a, b)
    tags = await call(gw.port, "GET", "/api/tags", key=LIMITED_KEY)
    assert tags.status == 200 and names(tags) == ["llama3.1:8b", LLAMA]
    assert names(await call(gw.port, "GET", "/api/ps", key=LIMITED_KEY)) == ["llama3.1:8b"]
    models = await call(gw.port, "GET", "/v1/models", key=LIMITED_KEY)
    assert names(models, "data", "id") == ["llama3.1:8b", LLAMA]
    head = await call(gw.port, "HEAD", "/v1/models", key=LIMITED_KEY)
    assert head.status == 200 and head.header("content-length") == str(len(models.body))
    # a key without a list sees everything
    assert names(await call(gw.port, "GET", "/api/tags", key=USER_KEY)) == [BGE, "llama3.1:8b", LLAMA, QWEN]


async def test_a_backend_that_does_not_answer_is_left_out(fakes: Fakes, gateway_for: Start) -> None:
    a, b, c = await fakes([QWEN]), await fakes([LLAMA]), await fakes([PHI])
    gw = await gateway_for(backends_of(a, b, c), upstream={"connect_timeout": 0.3}, health_timeout=0.3)
    await settled(gw, a, b, c)
    c.hang_paths.add("/api/tags")  # hangs: left out after its timeout (0.3 s here), the others still answer
    await b.stop()  # refuses: left out at once
    tags = await call(gw.port, "GET", "/api/tags")
    assert tags.status == 200 and names(tags) == [QWEN]
    await a.stop()
    await until(lambda: views(gw)["a"].state != "up" or views(gw)["b"].state != "up")
    none = await call(gw.port, "GET", "/api/tags")
    assert none.status == 502 and "no backend answered" in none.json()["error"]


async def test_backend_header_pins_a_listing_for_admins_only(fakes: Fakes, gateway_for: Start) -> None:
    a, b = await fakes([QWEN]), await fakes([LLAMA])
    gw = await gateway_for(backends_of(a, b))
    await settled(gw, a, b)
    ignored = await call(gw.port, "GET", "/api/tags", key=USER_KEY, headers={"X-Fastgate-Backend": "a"})
    assert names(ignored) == [LLAMA, QWEN]  # a user key's header is ignored: the union
    pinned = await call(gw.port, "GET", "/api/tags", headers={"X-Fastgate-Backend": "a"})
    assert names(pinned) == [QWEN]  # an admin's: that backend's own answer, relayed
    assert all(r.header("x-fastgate-backend") is None for fake in (a, b) for r in fake.received)


async def test_one_model_by_name_goes_to_a_backend_that_has_it(fakes: Fakes, gateway_for: Start) -> None:
    a, b = await fakes([QWEN]), await fakes([LLAMA])
    gw = await gateway_for(backends_of(a, b))
    await settled(gw, a, b)
    for _ in range(5):
        resp = await call(gw.port, "GET", f"/v1/models/{LLAMA}")
        assert resp.status == 200 and resp.json()["id"] == LLAMA
    assert len(paths(b, f"/v1/models/{LLAMA}")) == 5 and paths(a, f"/v1/models/{LLAMA}") == []


# ---------------------------------------------------------------------------------------------------------
# Rule 7: pull, delete, copy

async def test_pull_goes_to_every_backend_in_one_stream(fakes: Fakes, gateway_for: Start) -> None:
    a, b = await fakes([QWEN]), await fakes([LLAMA])
    gw = await gateway_for(backends_of(a, b), **SLOW_POLLS)
    await settled(gw, a, b)
    records: list[Any] = []
    gw.proxy.set_usage_sink(records.append)
    resp = await call(gw.port, "POST", "/api/pull", body={"model": PHI})
    assert resp.status == 200 and resp.header("content-type") == "application/x-ndjson"
    assert resp.header("transfer-encoding") == "chunked" and resp.complete
    lines = resp.lines
    assert lines[-1] == {"status": "success"}
    progress = lines[:-1]
    assert {line["backend"] for line in progress} == {"a", "b"}  # every progress line says whose it is
    for name in "ab":
        mine = [line for line in progress if line["backend"] == name]
        assert mine[0]["status"] == "pulling manifest" and mine[-1]["status"] == "success"
        assert any("completed" in line for line in mine)
    assert all(len(chunk.splitlines()) == 1 for chunk in resp.chunks)  # one line per chunk, as Ollama streams
    assert a._has_model(PHI) and b._has_model(PHI)
    assert [json.loads(r.body)["model"] for r in paths(a, "/api/pull") + paths(b, "/api/pull")] == [PHI, PHI]
    # fastgate learnt where the model now is before answering: it is usable at once (inventory polls are 30 s)
    assert all(view.models == 2 for view in views(gw).values())
    run = await call(gw.port, "POST", "/api/generate", body=generate(PHI))
    assert run.status == 200, run.body
    assert (records[0].path, records[0].backend) == ("/api/pull", "a,b")
    metrics = (await call(gw.port, "GET", "/metrics")).body.decode()
    assert 'fastgate_backend_requests_total{backend="a",status="200"}' in metrics
    assert 'fastgate_backend_requests_total{backend="b",status="200"}' in metrics


async def test_pull_with_one_backend_failing_names_it_last(fakes: Fakes, gateway_for: Start) -> None:
    a, b, c = await fakes([QWEN]), await fakes([LLAMA]), await fakes([])
    b.pull_error = "pull model manifest: registry unreachable"
    gw = await gateway_for(backends_of(a, b, c), **SLOW_POLLS)
    await settled(gw, a, b, c)
    resp = await call(gw.port, "POST", "/api/pull", body={"model": PHI})
    assert resp.status == 200 and resp.complete
    lines = resp.lines
    assert lines[-1] == {"error": "pull failed on b: pull model manifest: registry unreachable "
                                  "(succeeded on a, c)"}
    assert {"status": "failed: pull model manifest: registry unreachable", "backend": "b"} in lines
    assert not any("error" in line for line in lines[:-1])  # clients stop at an error line: only the last
    assert a._has_model(PHI) and c._has_model(PHI) and not b._has_model(PHI)  # the others still pulled


async def test_pull_where_a_backend_is_down_fails_naming_it(fakes: Fakes, gateway_for: Start) -> None:
    a, b = await fakes([QWEN]), await fakes([LLAMA])
    gw = await gateway_for(backends_of(a, b), **SLOW_POLLS)
    await settled(gw, a, b)
    await b.stop()  # killed after its last probe: fastgate still counts it up, asks it, and is refused
    resp = await call(gw.port, "POST", "/api/pull", body={"model": PHI})
    assert resp.status == 200
    final = resp.lines[-1]["error"]
    assert final.startswith("pull failed on b: upstream unreachable") and final.endswith("(succeeded on a)")
    assert views(gw)["b"].state == "ejected"  # the refused connection counted for its health
    again = await call(gw.port, "POST", "/api/pull", body={"model": BGE})  # now only the healthy one
    assert again.lines[-1] == {"status": "success"} and {line.get("backend") for line in again.lines[:-1]} == {"a"}


async def test_pull_for_an_http10_client_ends_with_the_connection(fakes: Fakes, gateway_for: Start) -> None:
    a, b = await fakes([QWEN]), await fakes([LLAMA])
    gw = await gateway_for(backends_of(a, b), **SLOW_POLLS)
    await settled(gw, a, b)
    body = json.dumps({"model": PHI}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /api/pull HTTP/1.0\r\nHost: gateway.example.com\r\nX-API-Key: %s\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (KEY1.encode(), len(body), body))
    raw = await asyncio.wait_for(reader.read(), 10.0)  # to the end: the connection closes after the stream
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    lines = [json.loads(line) for line in rest.splitlines()]
    assert lines[-1] == {"status": "success"} and {line.get("backend") for line in lines[:-1]} == {"a", "b"}


async def test_pull_without_a_stream_answers_one_object(fakes: Fakes, gateway_for: Start) -> None:
    a, b = await fakes([QWEN]), await fakes([LLAMA])
    gw = await gateway_for(backends_of(a, b), **SLOW_POLLS)
    await settled(gw, a, b)
    ok = await call(gw.port, "POST", "/api/pull", body={"model": PHI, "stream": False})
    assert ok.status == 200 and ok.json() == {"status": "success"}
    assert a._has_model(PHI) and b._has_model(PHI)
    b.pull_error = "max retries exceeded"
    failed = await call(gw.port, "POST", "/api/pull", body={"model": BGE, "stream": False})
    assert failed.status == 500  # Ollama's status for a failed pull without a stream
    assert failed.json() == {"error": "pull failed on b: max retries exceeded (succeeded on a)"}
    assert a._has_model(BGE) and not b._has_model(BGE)


async def test_pull_every_backend_refuses_answers_their_status(fakes: Fakes, gateway_for: Start) -> None:
    a, b = await fakes([QWEN]), await fakes([LLAMA])
    gw = await gateway_for(backends_of(a, b), **SLOW_POLLS)
    await settled(gw, a, b)
    resp = await call(gw.port, "POST", "/api/pull", body={"insecure": True})  # no model: Ollama's 400
    assert resp.status == 400 and resp.json() == {"error": "pull failed on a, b: model is required"}


async def test_pull_checks_the_model_allow_list_first(fakes: Fakes, gateway_for: Start) -> None:
    a, b = await fakes([QWEN]), await fakes([LLAMA])
    gw = await gateway_for(backends_of(a, b), **SLOW_POLLS)
    await settled(gw, a, b)
    refused = await call(gw.port, "POST", "/api/pull", key=LIMITED_ADMIN, body={"model": PHI})
    assert refused.status == 403 and PHI in refused.json()["error"]
    user = await call(gw.port, "POST", "/api/pull", key=USER_KEY, body={"model": LLAMA},
                      headers={"X-Fastgate-Backend": "a"})
    assert user.status == 403  # pulling needs the admin role, whatever it names
    allowed = await call(gw.port, "POST", "/api/pull", key=LIMITED_ADMIN, body={"model": "llama3.1:8b"})
    assert allowed.lines[-1] == {"status": "success"}
    assert [json.loads(r.body)["model"] for fake in (a, b) for r in paths(fake, "/api/pull")] == ["llama3.1:8b"] * 2


async def test_an_admins_backend_header_pins_a_pull(fakes: Fakes, gateway_for: Start) -> None:
    a, b = await fakes([QWEN]), await fakes([LLAMA])
    gw = await gateway_for(backends_of(a, b), **SLOW_POLLS)
    await settled(gw, a, b)
    resp = await call(gw.port, "POST", "/api/pull", body={"model": PHI}, headers={"X-Fastgate-Backend": "b"})
    assert resp.lines[-1] == {"status": "success"} and all("backend" not in line for line in resp.lines)
    assert paths(a, "/api/pull") == [] and len(paths(b, "/api/pull")) == 1


async def test_a_client_leaving_a_pull_stops_it_everywhere(fakes: Fakes, gateway_for: Start) -> None:
    a, b = await fakes([QWEN]), await fakes([LLAMA])
    gw = await gateway_for(backends_of(a, b), **SLOW_POLLS)
    await settled(gw, a, b)
    client = await Client.connect(gw.port)
    client.send(build_request("POST", "/api/pull", headers={"X-API-Key": KEY1}, body=json.dumps(
        {"model": PHI, "options": {"fake_gap_ms": 200}}).encode()))
    head = await client.response_head()
    assert head.status == 200
    await client.close()
    gone = [await fake.wait_for_disconnect(5.0) for fake in (a, b)]
    assert [d.path for d in gone] == ["/api/pull", "/api/pull"]
    assert not a._has_model(PHI) and not b._has_model(PHI)


async def test_delete_goes_to_every_backend(fakes: Fakes, gateway_for: Start) -> None:
    a, b, c = await fakes([QWEN, LLAMA]), await fakes([LLAMA]), await fakes([BGE])
    gw = await gateway_for(backends_of(a, b, c), **SLOW_POLLS)
    await settled(gw, a, b, c)
    deleted = await call(gw.port, "DELETE", "/api/delete", body={"model": LLAMA})
    assert deleted.status == 200 and deleted.body == b""  # c did not have it: nothing to do there
    assert [len(paths(fake, "/api/delete")) for fake in (a, b, c)] == [1, 1, 1]
    assert not a._has_model(LLAMA) and not b._has_model(LLAMA) and a._has_model(QWEN)
    # fastgate knows at once: no backend is asked for it any more (inventory polls are 30 s)
    gone = await call(gw.port, "POST", "/api/generate", body=generate(LLAMA))
    assert gone.status == 404 and gone.json() == {"error": f'model "{LLAMA}" not found, try pulling it first'}
    assert all(paths(fake, "/api/generate") == [] for fake in (a, b, c))
    nowhere = await call(gw.port, "DELETE", "/api/delete", body={"model": LLAMA})
    assert nowhere.status == 404 and nowhere.json() == {"error": f"model '{LLAMA}' not found"}  # Ollama's


async def test_delete_failing_on_one_backend_names_it(fakes: Fakes, gateway_for: Start) -> None:
    a, b = await fakes([LLAMA]), await fakes([LLAMA])
    gw = await gateway_for(backends_of(a, b), **SLOW_POLLS)
    await settled(gw, a, b)
    b.faults.append("status-500")  # its next request: nothing else asks it during this test
    resp = await call(gw.port, "DELETE", "/api/delete", body={"model": LLAMA})
    assert resp.status == 500
    assert resp.json()["error"].startswith("delete failed on b: ") and resp.json()["error"].endswith(
        "(succeeded on a)")
    assert not a._has_model(LLAMA) and b._has_model(LLAMA)


async def test_copy_goes_only_to_backends_holding_the_source(fakes: Fakes, gateway_for: Start) -> None:
    a, b, c = await fakes([QWEN, LLAMA]), await fakes([BGE]), await fakes(["llama3.2"])
    gw = await gateway_for(backends_of(a, b, c), **SLOW_POLLS)
    await settled(gw, a, b, c)
    copied = await call(gw.port, "POST", "/api/copy", body={"source": "llama3.2", "destination": "mine:1"})
    assert copied.status == 200 and copied.body == b""
    assert [len(paths(fake, "/api/copy")) for fake in (a, b, c)] == [1, 0, 1]  # c lists it without a tag
    assert a._has_model("mine:1") and c._has_model("mine:1") and not b._has_model("mine:1")
    assert views(gw)["a"].models == 3 and views(gw)["b"].models == 1  # known at once
    missing = await call(gw.port, "POST", "/api/copy", body={"source": "nowhere:1", "destination": "x:1"})
    assert missing.status == 404 and missing.json() == {"error": 'model "nowhere:1" not found'}
    assert [len(paths(fake, "/api/copy")) for fake in (a, b, c)] == [1, 0, 1]


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/create", {"model": "mine", "from": LLAMA}),
    ("POST", "/api/push", {"model": LLAMA}),
    ("POST", "/api/blobs/sha256:" + "0" * 64, {}),
])
async def test_create_push_and_blobs_still_need_the_header(method: str, path: str, body: dict[str, Any],
                                                           fakes: Fakes, gateway_for: Start) -> None:
    a, b = await fakes([LLAMA]), await fakes([QWEN])
    gw = await gateway_for(backends_of(a, b))
    resp = await call(gw.port, method, path, body=body)
    assert resp.status == 400 and "X-Fastgate-Backend" in resp.json()["error"]
    assert paths(a, path) == [] and paths(b, path) == []


async def test_keys_are_never_logged_nor_sent(fakes: Fakes, gateway_for: Start, gate_logs: Any) -> None:
    a, b = await fakes([QWEN]), await fakes([LLAMA])
    b.pull_error = "nope"
    gw = await gateway_for(backends_of(a, b), **SLOW_POLLS)
    await settled(gw, a, b)
    assert (await call(gw.port, "POST", "/api/pull", body={"model": PHI})).status == 200
    assert (await call(gw.port, "GET", "/api/tags", key=LIMITED_KEY)).status == 200
    for record in gate_logs.records:
        text = record.getMessage() + json.dumps(getattr(record, FIELDS, {}), default=str)
        assert KEY1 not in text and LIMITED_KEY not in text
    assert all(r.header("x-api-key") is None for fake in (a, b) for r in fake.received)
    pull_lines = [getattr(r, FIELDS) for r in gate_logs.records
                  if getattr(r, FIELDS, {}).get("path") == "/api/pull" and "status" in getattr(r, FIELDS, {})]
    assert pull_lines and all(fields["backend"] == "a,b" for fields in pull_lines)


# ---------------------------------------------------------------------------------------------------------
# One backend: exactly as before

async def test_one_backend_answers_exactly_as_it_always_did(ollama: FakeOllama, make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    async with await Client.connect(ollama.port) as direct:
        own = await direct.request("GET", "/api/tags", host=f"127.0.0.1:{ollama.port}")
    tags = await call(gw.port, "GET", "/api/tags")
    assert tags.body == own.body  # relayed byte for byte, not merged
    pulled = await call(gw.port, "POST", "/api/pull", body={"model": PHI})
    assert pulled.lines[-1] == {"status": "success"} and all("backend" not in line for line in pulled.lines)
    assert (await call(gw.port, "DELETE", "/api/delete", body={"model": PHI})).status == 200
    copied = await call(gw.port, "POST", "/api/copy", body={"source": LLAMA, "destination": "x:1"})
    assert copied.status == 200 and ollama._has_model("x:1")


# ---------------------------------------------------------------------------------------------------------
# Real clients through three backends

async def test_ollama_and_openai_clients_through_three_backends(fakes: Fakes, gateway_for: Start) -> None:
    a, b, c = await fakes([QWEN]), await fakes([LLAMA]), await fakes([BGE])
    a._loaded[_norm_model(QWEN)] = None
    gw = await gateway_for(backends_of(a, b, c), **SLOW_POLLS)
    await settled(gw, a, b, c)
    async with ollama_lib.AsyncClient(host=gw.url, headers={"X-API-Key": KEY1}) as client:
        listed = await client.list()
        running = await client.ps()
        progress = [part async for part in await client.pull(PHI, stream=True)]
        done = await client.pull("llama3.1:8b")  # without a stream: one object
        copied = await client.copy(PHI, "phi-copy:1")
        deleted = await client.delete("llama3.1:8b")
        c.pull_error = "registry unreachable"
        with pytest.raises(ollama_lib.ResponseError) as failed:
            async for _ in await client.pull("smollm:135m", stream=True):
                pass
    assert [m.model for m in listed.models] == [BGE, LLAMA, QWEN]
    assert [m.model for m in running.models] == [QWEN]
    assert progress[-1].status == "success" and {p.status for p in progress[:-1]} >= {"pulling manifest"}
    assert done.status == "success"
    assert copied.status == "success" and deleted.status == "success"
    assert all(fake._has_model("phi-copy:1") for fake in (a, b, c))
    assert not any(fake._has_model("llama3.1:8b") for fake in (a, b, c))
    assert "pull failed on c: registry unreachable (succeeded on a, b)" in str(failed.value)
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY1, max_retries=0) as oai:
        ids = [m.id async for m in oai.models.list()]
        one = await oai.models.retrieve(BGE)
    assert ids == sorted([BGE, LLAMA, QWEN, PHI, "phi-copy:1", "smollm:135m"])
    assert one.id == BGE and len(paths(c, f"/v1/models/{BGE}")) == 1
