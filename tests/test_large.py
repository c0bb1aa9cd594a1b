"""1 GiB through fastgate in each direction, with the proxy process's memory watched.

fastgate runs as its own process so its RSS is its own; the fake Ollama and the client share the test's loop.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from tests.conftest import KEY1, KEYS
from tests.fake_ollama import FakeOllama
from tests.proc import FastgateProcess, write_config
from tests.rawhttp import Client, build_request

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

GIB = 1024 ** 3
MAX_GROWTH_KIB = 100 * 1024  # the bound; a healthy relay stays far below it
PIECE = 256 * 1024
PATTERN = bytes(range(256)) * (PIECE // 256 + 2)


class RssWatch:
    """Samples a process's RSS until stopped; reports growth over the first sample."""

    def __init__(self, proc: FastgateProcess) -> None:
        self.proc = proc
        self.baseline = proc.rss_kib()
        self.peak = self.baseline
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.proc.rss_kib())
            await asyncio.sleep(0.05)

    async def stop(self) -> int:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self.peak = max(self.peak, self.proc.rss_kib())
        return self.peak - self.baseline


@pytest.fixture
async def fastgate_proc(tmp_path: Path, ollama: FakeOllama):  # type: ignore[no-untyped-def]
    proc = await FastgateProcess.start("serve", "--config",
                                       str(write_config(tmp_path / "fastgate.toml", ollama.url, keys=KEYS,
                                                        extra="[log]\nlevel = \"WARNING\"")))
    yield proc
    await proc.stop()


async def _warm_up(port: int) -> None:
    c = await Client.connect(port)
    for _ in range(3):
        assert (await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})).status == 200
    await c.close()


async def test_one_gib_download_streams_with_bounded_memory(fastgate_proc: FastgateProcess) -> None:
    await _warm_up(fastgate_proc.port)
    watch = RssWatch(fastgate_proc)
    c = await Client.connect(fastgate_proc.port)
    c.send(build_request("GET", f"/fake/bytes?n={GIB}", headers={"X-API-Key": KEY1}))
    head = await c.response_head()
    assert head.status == 200 and int(head.header("content-length") or 0) == GIB
    received = 0
    while received < GIB:
        data = await asyncio.wait_for(c.reader.read(PIECE), 10)
        assert data, f"connection ended after {received} bytes"
        start = received % 256
        assert data == PATTERN[start:start + len(data)], f"corrupt bytes at offset {received}"
        received += len(data)
    assert received == GIB
    growth = await watch.stop()
    print(f"download: fastgate RSS growth {growth} KiB")
    assert growth < MAX_GROWTH_KIB, f"RSS grew by {growth} KiB"
    # the connection is still usable afterwards
    assert (await c.request("GET", "/api/version", headers={"X-API-Key": KEY1})).status == 200
    await c.close()


async def test_one_gib_chunked_blob_upload_streams_with_bounded_memory(fastgate_proc: FastgateProcess,
                                                                     ollama: FakeOllama) -> None:
    await _warm_up(fastgate_proc.port)
    piece = bytes(range(256)) * (PIECE // 256)
    count = GIB // PIECE
    digest = hashlib.sha256()
    for _ in range(count):
        digest.update(piece)
    watch = RssWatch(fastgate_proc)
    c = await Client.connect(fastgate_proc.port)
    # As Ollama's CLI sends blobs: chunked, no Content-Length, Content-Type: application/json.
    c.send(build_request("POST", f"/api/blobs/sha256:{digest.hexdigest()}", headers=[
        ("X-API-Key", KEY1), ("Transfer-Encoding", "chunked"), ("Content-Type", "application/json")]))
    frame = b"%x\r\n" % len(piece)
    for _ in range(count):
        c.writer.writelines([frame, piece, b"\r\n"])
        await c.writer.drain()
    c.send(b"0\r\n\r\n")
    resp = await c.response(timeout=60)
    assert resp.status == 201, resp.body
    growth = await watch.stop()
    got = ollama.received[-1]
    assert got.blob_size == GIB and got.blob_sha256 == digest.hexdigest()
    print(f"upload: fastgate RSS growth {growth} KiB")
    assert growth < MAX_GROWTH_KIB, f"RSS grew by {growth} KiB"
    await c.close()


async def test_slow_reader_backpressure_bounds_memory(fastgate_proc: FastgateProcess) -> None:
    """A client that stops reading must not make fastgate buffer the stream: the upstream read pauses."""
    await _warm_up(fastgate_proc.port)
    watch = RssWatch(fastgate_proc)
    c = await Client.connect(fastgate_proc.port)
    c.writer.transport.pause_reading()  # type: ignore[attr-defined]
    c.send(build_request("GET", f"/fake/bytes?n={256 * 1024 * 1024}", headers={"X-API-Key": KEY1}))
    await asyncio.sleep(1.5)  # fastgate would have relayed ~all of it by now without backpressure
    growth = await watch.stop()
    print(f"stalled reader: fastgate RSS growth {growth} KiB")
    assert growth < 32 * 1024, f"RSS grew by {growth} KiB while the client was not reading"
    await c.close()
