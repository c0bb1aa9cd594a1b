"""Several Ollamas behind one fastgate (issue 9 rules 1-5): fake Ollamas on loopback, the real router and
pollers. Intervals are short so that the pollers' first answers are in within a few tens of milliseconds."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from fastgate.access import Principal, Role
from fastgate.logs import FIELDS
from fastgate.server import RunningServer
from tests.backends_support import USER_KEY, Fakes, Start, fake_ollamas, gateways
from tests.conftest import KEY1
from tests.fake_ollama import FakeOllama, _norm_model
from tests.rawhttp import Client, RawResponse, build_request

QWEN = "qwen2.5:0.5b"
LLAMA = "llama3.2:latest"
POLL_WAIT_S = 5.0  # upper bound for the pollers' first answers to reach the router


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    async with fake_ollamas() as make:
        yield make


@pytest.fixture
async def gateway_for() -> AsyncIterator[Start]:
    async with gateways({USER_KEY: Principal("plain", "k_plain", role=Role.USER)}) as make:
        yield make


async def until(check: Callable[[], bool], timeout: float = POLL_WAIT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def views(gw: RunningServer) -> dict[str, Any]:
    snapshot = gw.proxy.router.snapshot(asyncio.get_running_loop().time())
    return {view.name: view for view in snapshot.backends}


async def inventories_read(gw: RunningServer) -> None:
    await until(lambda: all(view.inventory_known for view in views(gw).values() if view.state == "up"))


def chats(fake: FakeOllama) -> list[Any]:
    return [r for r in fake.received if r.path in ("/api/chat", "/api/generate")]


def generate(model: str, **options: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "hello there", "stream": bool(options.pop("stream", False)),
            "options": options}


async def post(port: int, body: dict[str, Any], headers: dict[str, str] | None = None,
               path: str = "/api/generate") -> RawResponse:
    async with await Client.connect(port) as client:
        return await client.request("POST", path, headers={"X-API-Key": KEY1, **(headers or {})},
                                    json_body=body)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then let go): connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_model_only_on_b_always_goes_to_b(fakes, gateway_for: Start) -> None:  # type: ignore[no-untyped-def]
    a = await fakes([LLAMA])
    b = await fakes([LLAMA, QWEN])
    gw = await gateway_for([{"name": "a", "url": a.url}, {"name": "b", "url": b.url}])
    await inventories_read(gw)
    async with await Client.connect(gw.port) as client:
        for _ in range(20):
            resp = await client.request("POST", "/api/generate", headers={"X-API-Key": KEY1},
                                        json_body=generate(QWEN))
            assert resp.status == 200, resp.body
        missing = await client.request("POST", "/api/generate", headers={"X-API-Key": KEY1},
                                       json_body=generate("nowhere:1b"))
    assert len(chats(b)) == 20 and chats(a) == []
    # Ollama checks Host: each backend got its own host:port (the fake refuses anything else with 403)
    assert {r.header("host") for r in chats(b)} == {f"127.0.0.1:{b.port}"}
    # on no backend: Ollama's own 404, answered by fastgate without asking any
    assert missing.status == 404
    assert missing.json() == {"error": 'model "nowhere:1b" not found, try pulling it first'}


async def test_warm_first_wins_over_a_cold_backend(fakes, gateway_for: Start) -> None:  # type: ignore[no-untyped-def]
    a = await fakes([LLAMA])
    b = await fakes([LLAMA])
    a._loaded[_norm_model(LLAMA)] = None  # loaded on A (its /api/ps says so), cold on B
    gw = await gateway_for([{"name": "a", "url": a.url, "max_parallel": 4},
                            {"name": "b", "url": b.url, "max_parallel": 4}])
    await until(lambda: LLAMA in views(gw)["a"].loaded and views(gw)["b"].inventory_known)

    async def worker() -> None:
        async with await Client.connect(gw.port) as client:
            for _ in range(50):
                resp = await client.request("POST", "/api/generate", headers={"X-API-Key": KEY1},
                                            json_body=generate(LLAMA))
                assert resp.status == 200, resp.body

    await asyncio.gather(*(worker() for _ in range(4)))  # never more at once than A has slots
    assert len(chats(a)) + len(chats(b)) == 200
    assert len(chats(a)) >= 190


async def test_slots_two_run_the_third_waits_then_runs(fakes, gateway_for: Start) -> None:  # type: ignore[no-untyped-def]
    a = await fakes([LLAMA])
    b = await fakes([LLAMA])
    gw = await gateway_for([{"name": "a", "url": a.url, "max_parallel": 1},
                            {"name": "b", "url": b.url, "max_parallel": 1}])
    await inventories_read(gw)
    stream = generate(LLAMA, stream=True, num_predict=6, fake_gap_ms=80)  # about half a second each
    tasks = [asyncio.create_task(post(gw.port, stream)) for _ in range(3)]
    await until(lambda: gw.proxy.router.queue_depth == 1)
    busy = views(gw)
    assert busy["a"].in_flight == 1 and busy["b"].in_flight == 1  # two run, one on each
    answers = await asyncio.gather(*tasks)
    assert [resp.status for resp in answers] == [200, 200, 200]
    assert all(resp.lines[-1]["done"] for resp in answers)
    assert gw.proxy.router.counters.queued == 1 and gw.proxy.router.queue_depth == 0
    assert len(chats(a)) + len(chats(b)) == 3


async def test_a_full_queue_answers_503_with_retry_after(fakes, gateway_for: Start) -> None:  # type: ignore[no-untyped-def]
    a = await fakes([LLAMA])
    b = await fakes([LLAMA])
    gw = await gateway_for([{"name": "a", "url": a.url, "max_parallel": 1},
                            {"name": "b", "url": b.url, "max_parallel": 1}], max_queue=1)
    await inventories_read(gw)
    stream = generate(LLAMA, stream=True, num_predict=6, fake_gap_ms=80)
    tasks = [asyncio.create_task(post(gw.port, stream)) for _ in range(3)]
    await until(lambda: gw.proxy.router.queue_depth == 1)
    refused = await post(gw.port, stream)
    assert refused.status == 503
    assert refused.header("retry-after") == "1"
    assert "busy" in refused.json()["error"]
    assert [resp.status for resp in await asyncio.gather(*tasks)] == [200, 200, 200]
    assert len(chats(a)) + len(chats(b)) == 3  # the refused one reached no backend


async def test_a_refusing_backend_gets_no_requests_within_a_second(fakes, gateway_for: Start) -> None:  # type: ignore[no-untyped-def]
    a = await fakes([LLAMA])
    gw = await gateway_for([{"name": "a", "url": a.url},
                            {"name": "down", "url": f"http://127.0.0.1:{closed_port()}"}])
    loop = asyncio.get_running_loop()
    started = loop.time()
    placed_at_1s = None
    async with await Client.connect(gw.port) as client:
        while loop.time() - started < 1.5:
            resp = await client.request("POST", "/api/generate", headers={"X-API-Key": KEY1},
                                        json_body=generate(LLAMA))
            assert resp.status == 200, resp.body  # a refused connect moves the request: nobody sees it
            if placed_at_1s is None and loop.time() - started >= 1.0:
                placed_at_1s = views(gw)["down"].placed
            await asyncio.sleep(0.01)
    down = views(gw)["down"]
    assert down.state == "ejected"
    assert placed_at_1s is not None and down.placed == placed_at_1s


async def test_backend_header_for_admins_only_and_never_forwarded(fakes, gateway_for: Start) -> None:  # type: ignore[no-untyped-def]
    a = await fakes([LLAMA])
    b = await fakes([LLAMA, QWEN])
    gw = await gateway_for([{"name": "a", "url": a.url}, {"name": "b", "url": b.url}])
    await inventories_read(gw)
    pinned = await post(gw.port, generate(LLAMA), {"X-Fastgate-Backend": "b"})
    assert pinned.status == 200 and len(chats(b)) == 1 and chats(a) == []
    # a user key's header is ignored (QWEN is only on B, whatever it names) and removed
    ignored = await post(gw.port, generate(QWEN), {"X-API-Key": USER_KEY, "X-Fastgate-Backend": "a"})
    assert ignored.status == 200 and len(chats(b)) == 2 and chats(a) == []
    assert all(r.header("x-fastgate-backend") is None for r in chats(b))
    unknown = await post(gw.port, generate(LLAMA), {"X-Fastgate-Backend": "nope"})
    assert unknown.status == 400 and "nope" in unknown.json()["error"]


async def test_health_and_metrics_show_each_backend(fakes, gateway_for: Start) -> None:  # type: ignore[no-untyped-def]
    a = await fakes([LLAMA])
    gw = await gateway_for([{"name": "a", "url": a.url, "max_parallel": 2},
                            {"name": "down", "url": f"http://127.0.0.1:{closed_port()}"}])
    await until(lambda: views(gw)["down"].state == "ejected")
    async with await Client.connect(gw.port) as client:
        public = await client.request("GET", "/health")
        detailed = await client.request("GET", "/health", headers={"X-API-Key": KEY1})
        metrics = await client.request("GET", "/metrics", headers={"X-API-Key": KEY1})
    assert public.status == 200 and public.json() == {"status": "ok"}
    backends = {item["name"]: item for item in detailed.json()["backends"]}
    assert backends["a"]["state"] == "up" and backends["a"]["max_parallel"] == 2
    assert backends["down"]["state"] == "ejected"
    assert {"in_flight", "queue_depth", "loaded"} <= set(backends["a"])
    text = metrics.body.decode()
    assert 'fastgate_backend_up{backend="a"} 1' in text
    assert 'fastgate_backend_up{backend="down"} 0' in text
    assert 'fastgate_backend_in_flight_requests{backend="a"} 0' in text
    assert "fastgate_routing_queue_depth 0" in text
    await a.stop()  # now none answers: 503
    # out ("last resort" when it is the one least recently failed: never eject every backend)
    await until(lambda: views(gw)["a"].state != "up")
    async with await Client.connect(gw.port) as client:
        assert (await client.request("GET", "/health")).status == 503


async def test_logs_and_usage_name_the_backend(fakes, gateway_for: Start, gate_logs) -> None:  # type: ignore[no-untyped-def]
    a = await fakes([LLAMA])
    b = await fakes([QWEN])
    gw = await gateway_for([{"name": "a", "url": a.url}, {"name": "b", "url": b.url}])
    records: list[Any] = []
    gw.proxy.set_usage_sink(records.append)
    await inventories_read(gw)
    assert (await post(gw.port, generate(QWEN))).status == 200
    assert [record.backend for record in records] == ["b"]
    forwarded = [r for r in gate_logs.records if getattr(r, FIELDS, {}).get("status") == 200
                 and getattr(r, FIELDS, {}).get("url")]
    assert forwarded, [r.getMessage() for r in gate_logs.records]
    fields = getattr(forwarded[-1], FIELDS)
    assert fields["backend"] == "b"
    assert fields["url"] == f"http://127.0.0.1:{b.port}/api/generate"  # the URL names that backend


async def test_model_not_found_refreshes_that_inventory_at_once(fakes, gateway_for: Start) -> None:  # type: ignore[no-untyped-def]
    a = await fakes([LLAMA])
    b = await fakes([LLAMA, QWEN])
    gw = await gateway_for([{"name": "a", "url": a.url}, {"name": "b", "url": b.url}], inventory_interval=30.0)
    await inventories_read(gw)
    b.models.remove(QWEN)  # deleted behind fastgate's back: its inventory still lists it for 30 s
    first = await post(gw.port, generate(QWEN))
    assert first.status == 404 and len(chats(b)) == 1  # Ollama's own answer
    await until(lambda: views(gw)["b"].models == 1)  # /api/tags read again at once, not in 30 s
    second = await post(gw.port, generate(QWEN))
    assert second.status == 404 and len(chats(b)) == 1  # now fastgate knows: no backend is asked


async def test_server_busy_moves_the_request_to_another_backend(fakes, gateway_for: Start) -> None:  # type: ignore[no-untyped-def]
    a = await fakes([LLAMA])
    b = await fakes([LLAMA])
    a.max_parallel = b.max_parallel = 1  # Ollama's own limit; fastgate is not told (max_parallel = 0)
    gw = await gateway_for([{"name": "a", "url": a.url}, {"name": "b", "url": b.url}])
    await inventories_read(gw)
    long_stream = generate(LLAMA, stream=True, num_predict=8, fake_gap_ms=80)
    on_a = asyncio.create_task(post(gw.port, long_stream, {"X-Fastgate-Backend": "a"}))
    await until(lambda: len(a._running) == 1)
    # warm on A (its stream just placed the model there), so A is tried first: busy, then B serves it
    moved = await post(gw.port, generate(LLAMA))
    assert moved.status == 200, moved.body
    assert a.busy_answers == 1 and len(chats(b)) == 1
    on_b = asyncio.create_task(post(gw.port, long_stream, {"X-Fastgate-Backend": "b"}))
    await until(lambda: len(b._running) == 1)
    both_busy = await post(gw.port, generate(LLAMA))  # every backend busy: Ollama's own 503, once moved
    assert both_busy.status == 503 and "server busy" in both_busy.json()["error"]
    assert a.busy_answers + b.busy_answers == 3
    assert [resp.status for resp in await asyncio.gather(on_a, on_b)] == [200, 200]


async def test_a_client_that_leaves_the_queue_gives_up_its_place(fakes, gateway_for: Start) -> None:  # type: ignore[no-untyped-def]
    a = await fakes([LLAMA])
    b = await fakes([LLAMA])
    gw = await gateway_for([{"name": "a", "url": a.url, "max_parallel": 1},
                            {"name": "b", "url": b.url, "max_parallel": 1}])
    await inventories_read(gw)
    stream = generate(LLAMA, stream=True, num_predict=6, fake_gap_ms=80)
    running = [asyncio.create_task(post(gw.port, stream)) for _ in range(2)]
    await until(lambda: views(gw)["a"].in_flight == 1 and views(gw)["b"].in_flight == 1)
    leaver = await Client.connect(gw.port)
    leaver.send(build_request("POST", "/api/generate", headers={"X-API-Key": KEY1},
                              body=json.dumps(generate(LLAMA)).encode()))
    await until(lambda: gw.proxy.router.queue_depth == 1)
    await leaver.close()
    await until(lambda: gw.proxy.router.queue_depth == 0, timeout=1.0)  # not at queue_timeout (5 s)
    assert gw.proxy.router.counters.cancelled == 1
    assert [resp.status for resp in await asyncio.gather(*running)] == [200, 200]
    assert len(chats(a)) + len(chats(b)) == 2  # the one that left reached no backend


@pytest.mark.parametrize("method, path, body", [  # pull, delete and copy fan out: tests/test_backends_fanout.py
    ("POST", "/api/create", {"model": "mine", "from": "llama3.2:latest"}),
    ("POST", "/api/blobs/sha256:" + "0" * 64, {}),
])
async def test_model_management_with_several_backends_names_its_backend(
        method: str, path: str, body: dict[str, Any], fakes: Callable[..., Awaitable[FakeOllama]],
        gateway_for: Start) -> None:
    a, b = await fakes(["llama3.2:latest"]), await fakes(["qwen2.5:0.5b"])
    gw = await gateway_for([{"name": "a", "url": a.url}, {"name": "b", "url": b.url}])
    async with await Client.connect(gw.port) as client:  # a 400 closes its connection
        refused = await client.request(method, path, headers={"X-API-Key": KEY1}, json_body=body)
    async with await Client.connect(gw.port) as client:
        pinned = await client.request(method, path, headers={"X-API-Key": KEY1, "X-Fastgate-Backend": "b"},
                                      json_body=body)
    assert refused.status == 400 and "X-Fastgate-Backend" in refused.json()["error"]
    assert pinned.status != 400 or "X-Fastgate-Backend" not in pinned.body.decode()
    assert [r.path for r in a.received if r.path == path] == []
    assert [r.path for r in b.received if r.path == path] == [path]
