"""Review of [server] workers = N: what a damaged snapshot file or a sibling's garbage answer does.

The run directory is private to the user (0700), so only a bug, a full disk or that user can damage what is in
it; even so, one bad file must cost its numbers, never the supervisor (whose death stops every worker) or a
scrape.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import pytest

from fastgate import metrics_sum
from fastgate.metrics import BackendGauges, Metrics
from fastgate.worker import read_json, read_retired
from tests.fake_ollama import FakeOllama
from tests.proc import FastgateProcess
from tests.redis_server import RedisServer
from tests.test_workers import TAGS_200, Workers, get, metric, redis, wait_for, workers_config

__all__ = ["redis"]  # the module-scoped redis-server fixture of test_workers

pytestmark = pytest.mark.timeout(90)


def good_snapshot() -> dict[str, object]:
    metrics = Metrics()
    metrics.request("user1", "/api/tags", 200)
    return metrics_sum.snapshot(metrics, metrics_sum.Gauges())


@pytest.mark.parametrize("damage", [
    {"in_flight": float("inf")},  # json.loads reads `1e999` or `Infinity` as inf: int(inf) is OverflowError
    {"requests": [["u", "/p", "200", float("inf")]]},
    {"auth_failures": [["invalid_key", 1]]},  # a list where a dict was: AttributeError
])
def test_a_damaged_snapshot_is_a_value_error_the_callers_catch(damage: dict[str, object]) -> None:
    snap = {**good_snapshot(), **damage}
    with pytest.raises(ValueError):
        metrics_sum.merge([snap])


def test_a_damaged_retired_file_is_an_empty_one(tmp_path: Path) -> None:
    retired = metrics_sum.Retired(good_snapshot(), ["1.1"], 1).to_json()
    (tmp_path / "retired.json").write_text(json.dumps(retired).replace('"exits":1', '"exits":1e999')
                                           .replace('"exits": 1', '"exits": 1e999'))
    assert read_retired(str(tmp_path)).exits == 0


def test_per_backend_counts_are_summed_across_workers_and_kept_for_dead_ones() -> None:
    """metrics_sum.snapshot left out backend_requests and backend_first_byte (added to Metrics for several
    backends): with workers > 1 every scrape answered fastgate_backend_requests_total and
    fastgate_backend_first_byte_seconds empty, the scraped worker's own counts included. The existing
    every-attribute test did not see it, its Metrics holding no backend numbers."""
    metrics = Metrics()
    metrics.backend_request("a", 200)
    metrics.backend_request("a", 200)
    metrics.backend_request("b", 502)
    metrics.backend_head("a", 0.02)
    gauges = metrics_sum.Gauges(backends=[BackendGauges("a", True, 0, 0, 0), BackendGauges("b", True, 0, 0, 0)])
    snap = json.loads(json.dumps(metrics_sum.snapshot(metrics, gauges)))  # as it travels between processes
    retired = metrics_sum.fold(metrics_sum.Retired(), "2.2", snap)
    merged, summed = metrics_sum.merge([snap, snap, retired.snapshot])
    assert merged.backend_requests == {("a", "200"): 6, ("b", "502"): 3}
    assert merged.backend_first_byte["a"].count == 3
    text = merged.render(**summed.render_args()).decode()
    assert 'fastgate_backend_requests_total{backend="a",status="200"} 6' in text
    assert 'fastgate_backend_first_byte_seconds_count{backend="a"} 3' in text


def test_a_snapshot_file_nested_too_deep_reads_as_none(tmp_path: Path) -> None:
    path = tmp_path / "w-1.1.json"
    path.write_text("[" * 100_000)
    assert read_json(str(path)) is None


async def test_a_killed_worker_with_a_damaged_snapshot_is_still_replaced(
        tmp_path: Path, ollama: FakeOllama, redis: RedisServer) -> None:
    """The supervisor folds a dead worker's last snapshot into retired.json: a file whose counts read as
    Infinity raised OverflowError there, which nothing caught, so the supervisor died and took every worker."""
    config = workers_config(tmp_path, ollama, redis)
    proc = await FastgateProcess.start("serve", "--config", str(config))
    try:
        workers = Workers(proc)
        run_dir = await workers.run_dir()
        victim_file = run_dir / "w-1.1.json"  # slot 1, first start: the first pid of the start line
        await wait_for(victim_file.exists, "worker 1's snapshot file")
        damaged = victim_file.read_text().replace('"in_flight":0', '"in_flight":1e999')
        assert damaged != victim_file.read_text()
        tmp = run_dir / "damaged.tmp"
        tmp.write_text(damaged)
        os.replace(tmp, victim_file)
        os.kill(workers.pids[0], signal.SIGKILL)
        started = re.compile(rb"Worker 1 started \(pid (\d+)\)")
        await wait_for(lambda: started.search(bytes(proc.log)) or proc.proc.returncode is not None,
                       "a replacement or the supervisor's end")
        assert proc.proc.returncode is None, bytes(proc.log).decode(errors="replace")[-3000:]
        new = int(started.search(bytes(proc.log)).group(1))  # type: ignore[union-attr]
        await wait_for(lambda: b"[pid %d] Worker 1 of 2 serving" % new in bytes(proc.log), "the replacement")
        status, body = await get(proc.port, "/metrics")
        assert status == 200
        assert metric(body, "fastgate_worker_exits_total") == 1
    finally:
        assert await proc.stop() == 0


async def test_a_sibling_answering_garbage_costs_only_its_numbers(
        tmp_path: Path, ollama: FakeOllama, redis: RedisServer) -> None:
    """A scrape asks every `w-*.sock` in the run directory: an answer nested too deep raised RecursionError out
    of the scrape (not a ValueError), and an endless one was read whole for as long as the scrape waited."""
    config = workers_config(tmp_path, ollama, redis)
    proc = await FastgateProcess.start("serve", "--config", str(config))
    servers: list[asyncio.AbstractServer] = []
    try:
        run_dir = await Workers(proc).run_dir()

        async def deep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"[" * 200_000)
            writer.close()

        async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    writer.write(b"0" * 65536)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        for name, answer in (("w-9.1.sock", deep), ("w-9.2.sock", endless)):
            servers.append(await asyncio.start_unix_server(answer, str(run_dir / name)))
        sent = 6
        for _ in range(sent):
            assert (await get(proc.port, "/api/tags"))[0] == 200
        for _ in range(4):  # whichever worker the kernel hands the scrape to
            status, body = await asyncio.wait_for(get(proc.port, "/metrics"), 10)
            assert status == 200, body[:300]
            assert metric(body, TAGS_200) == sent
            assert metric(body, 'fastgate_workers{source="live"}') == 2
    finally:
        for server in servers:
            server.close()
        assert await proc.stop() == 0
