"""Operational faults (issue 13, item 10): what goes wrong around fastgate rather than in a request.

- the key store file replaced or deleted under a running gateway;
- a passphrase-protected TLS key (never a prompt on the terminal, at startup or on SIGHUP);
- SIGTERM while another process holds the store's write lock (no usage row lost, shutdown stays bounded);
- a config file holding clear keys that group or others can read (a warning);
- a blob upload slower than upstream.read_timeout but steadily progressing (not cut), or stalled (cut).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import KEY1, MakeGateway
from tests.rawhttp import Client, RawResponse

pytestmark = pytest.mark.timeout(60)

KEYED = {"X-API-Key": KEY1}


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, every: float = 0.05) -> None:
    """Poll `check` until it holds; fail after `timeout` seconds (never a fixed sleep as the only wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(every)


# -- item 5: upload progress counts as activity for upstream.read_timeout ------------------------------------

READ_TIMEOUT_S = 0.6
UPLOAD_PIECE_BYTES = 4096
UPLOAD_PACE_S = 0.1  # a sixth of the read timeout between pieces: steady progress, with a wide margin
UPLOAD_PIECES = 30  # 3 s in all: five times the read timeout


async def paced_blob_upload(port: int, *, pieces: int, send: int) -> RawResponse:
    """POST a blob of `pieces` pieces, sending only the first `send` of them, UPLOAD_PACE_S apart; then wait
    for the answer (with `send < pieces` the upload stalls, the client still connected)."""
    data = os.urandom(UPLOAD_PIECE_BYTES * pieces)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    c = await Client.connect(port)
    try:
        c.send(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: gw\r\nX-API-Key: {KEY1}\r\n"
               f"Content-Length: {len(data)}\r\n\r\n".encode())
        # Read the answer while uploading: an early one (the 504 without the fix) ends the upload.
        answer = asyncio.get_running_loop().create_task(c.response(timeout=20))
        for i in range(send):
            if answer.done():
                break
            try:
                c.send(data[i * UPLOAD_PIECE_BYTES:(i + 1) * UPLOAD_PIECE_BYTES])
                await c.writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(UPLOAD_PACE_S)  # pacing the upload, not waiting for a server
        return await answer
    finally:
        await c.close()


async def test_slow_but_steady_blob_upload_outlasts_the_read_timeout(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upstream={"read_timeout": READ_TIMEOUT_S}, server={"body_timeout": 30.0})
    resp = await paced_blob_upload(gw.port, pieces=UPLOAD_PIECES, send=UPLOAD_PIECES)
    assert resp.status == 201, (resp.status, resp.body)


async def test_stalled_blob_upload_is_still_cut_with_504(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upstream={"read_timeout": READ_TIMEOUT_S}, server={"body_timeout": 30.0})
    resp = await paced_blob_upload(gw.port, pieces=UPLOAD_PIECES, send=5)
    assert resp.status == 504
