"""HTTPS on the listener (server.tls_cert / server.tls_key) with a throwaway CA from trustme.

Covers: real clients over TLS (plain requests and streams), ALPN, certificate verification, the TLS 1.2
floor, plain HTTP on the TLS port (a readable 400 saying to use https), other non-TLS bytes (dropped without an
HTTP answer, listener unharmed), the handshake deadline, X-Forwarded-Proto, and configuration errors.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from fastgate.errors import ConfigError
from fastgate.server import RunningServer, start
from fastgate.tls import server_context
from tests.conftest import KEY1, MakeGateway, gateway_config
from tests.fake_ollama import FakeOllama
from tests.rawhttp import Client

pytestmark = pytest.mark.timeout(30)

MODEL = "llama3.2:latest"
TOKENS = "tok0 tok1 tok2 tok3 tok4 "


@dataclass
class CertFiles:
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> CertFiles:
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert = tmp_path / "fastgate.crt"
    key = tmp_path / "fastgate.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))  # leaf + chain, as documented
    leaf.private_key_pem.write_to_path(str(key))
    return CertFiles(cert, key)


@pytest.fixture
async def tls_gateway(make_gateway: MakeGateway, cert_files: CertFiles) -> RunningServer:
    return await make_gateway(server={"tls_cert": str(cert_files.cert), "tls_key": str(cert_files.key)})


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    ca.configure_trust(ctx)
    return ctx


async def assert_tls_still_served(gw: RunningServer, ca: trustme.CA) -> None:
    async with httpx.AsyncClient(verify=client_context(ca), timeout=5) as http:
        resp = await http.get(gw.url + "/")
    assert resp.status_code == 200 and resp.json()["name"] == "fastgate"


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes; (data, closed within `timeout`)."""
    data = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            piece = await asyncio.wait_for(reader.read(65536), max(deadline - loop.time(), 0.001))
        except (ConnectionError, OSError):
            return bytes(data), True
        except asyncio.TimeoutError:
            return bytes(data), False
        if not piece:
            return bytes(data), True
        data += piece


# -- working clients ---------------------------------------------------------------------------------------

async def test_https_root_and_streamed_generate(tls_gateway: RunningServer, ca: trustme.CA,
                                               ollama: FakeOllama) -> None:
    assert tls_gateway.url.startswith("https://127.0.0.1:")
    async with httpx.AsyncClient(verify=client_context(ca), timeout=10) as http:
        root = await http.get(tls_gateway.url + "/")
        assert root.status_code == 200
        assert root.json()["name"] == "fastgate" and root.json()["status"] == "running"
        assert root.http_version == "HTTP/1.1"
        lines = []
        async with http.stream("POST", tls_gateway.url + "/api/generate", headers={"X-API-Key": KEY1},
                               json={"model": MODEL, "prompt": "Why is the sky blue?"}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "application/x-ndjson"
            async for line in resp.aiter_lines():
                if line:
                    lines.append(json.loads(line))
    assert "".join(line["response"] for line in lines) == TOKENS
    assert [line["done"] for line in lines] == [False] * 5 + [True]
    got = ollama.received[-1]
    assert (got.method, got.path) == ("POST", "/api/generate")
    assert got.header("x-api-key") is None and KEY1 not in json.dumps(got.headers)


async def test_forwarded_proto_is_https(tls_gateway: RunningServer, gateway: RunningServer, ca: trustme.CA,
                                        ollama: FakeOllama) -> None:
    async with httpx.AsyncClient(verify=client_context(ca), timeout=10) as http:
        assert (await http.get(tls_gateway.url + "/api/tags", headers={"X-API-Key": KEY1})).status_code == 200
        assert (await http.get(gateway.url + "/api/tags", headers={"X-API-Key": KEY1})).status_code == 200
    over_tls, over_tcp = ollama.received
    assert over_tls.header("x-forwarded-proto") == "https"
    assert over_tcp.header("x-forwarded-proto") == "http"  # the same request without TLS, for contrast
    assert over_tls.header("x-forwarded-for") == "127.0.0.1"
    assert over_tls.header("x-forwarded-host") == f"127.0.0.1:{tls_gateway.port}"


async def test_alpn_negotiates_http11_and_tls12_or_newer(tls_gateway: RunningServer, ca: trustme.CA) -> None:
    ctx = client_context(ca)
    ctx.set_alpn_protocols(["h2", "http/1.1"])  # what browsers and h2-capable clients offer
    c = await Client.connect(tls_gateway.port, ssl=ctx, server_hostname="localhost")
    try:
        tls = c.writer.get_extra_info("ssl_object")
        assert tls.selected_alpn_protocol() == "http/1.1"
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.compression() is None
        resp = await c.request("GET", "/", host="localhost")
        assert resp.status == 200 and resp.json()["name"] == "fastgate"
    finally:
        await c.close()


# -- refused clients ---------------------------------------------------------------------------------------

async def test_client_trusting_another_ca_fails_verification(tls_gateway: RunningServer, ca: trustme.CA,
                                                            ollama: FakeOllama) -> None:
    stranger = client_context(trustme.CA())
    with pytest.raises(ssl.SSLCertVerificationError) as raw:
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", tls_gateway.port, ssl=stranger,
                                                       server_hostname="localhost"), 10)
    assert raw.value.verify_code == 20  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    async with httpx.AsyncClient(verify=stranger, timeout=10) as http:
        with pytest.raises(httpx.ConnectError) as via_httpx:
            await http.get(tls_gateway.url + "/api/tags", headers={"X-API-Key": KEY1})
    assert "CERTIFICATE_VERIFY_FAILED" in str(via_httpx.value)
    assert ollama.received == []
    await assert_tls_still_served(tls_gateway, ca)


def tls11_client_hello(ctx: ssl.SSLContext) -> bytes:
    """The ClientHello `ctx` would send (raises ssl.SSLError if it cannot offer anything)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")  # we set them on purpose
async def test_client_limited_to_tls11_is_refused(tls_gateway: RunningServer, ca: trustme.CA,
                                                 ollama: FakeOllama) -> None:
    ctx = client_context(ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 will not offer TLS 1.0/1.1 at its default level
    try:
        hello = tls11_client_hello(ctx)
    except ssl.SSLError as exc:
        pytest.skip(f"the local OpenSSL cannot offer TLS 1.1 at all: {exc}")
    # A TLS 1.1 ClientHello: handshake record, client_version 3.2, no TLS 1.2+ supported_versions.
    assert hello[0] == 0x16 and hello[5] == 0x01 and hello[9:11] == b"\x03\x02"

    started = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", tls_gateway.port, ssl=ctx,
                                                                   server_hostname="localhost"), 10)
    except (ssl.SSLError, ConnectionError):
        pass
    else:
        version = writer.get_extra_info("ssl_object").version()
        writer.close()
        pytest.fail(f"fastgate accepted a {version} handshake")
    assert time.monotonic() - started < 5  # refused at once, not left to time out
    assert ollama.received == []
    await assert_tls_still_served(tls_gateway, ca)


async def exchange_in_clear(port: int, request: bytes, timeout: float = 5) -> tuple[bytes, bool]:
    """Send `request` in clear text to `port`; everything answered until the server closes, and whether it did."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await read_until_closed(reader, timeout=timeout)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def wait_for_no_open_sockets(gw: RunningServer) -> None:
    deadline = time.monotonic() + 5
    while gw.proxy.open_sockets:
        assert time.monotonic() < deadline, f"{gw.proxy.open_sockets} sockets still counted"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("request_bytes,openai", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-API-Key: " + KEY1.encode() + b"\r\n\r\n", False,
                 id="get"),
    pytest.param(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", False, id="post"),
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n"
                 + b"x" * 70000, True, id="openai-post-with-a-body-not-read"),
])
async def test_plain_http_gets_a_readable_400_saying_to_use_https(tls_gateway: RunningServer, ca: trustme.CA,
                                                                 ollama: FakeOllama, request_bytes: bytes,
                                                                 openai: bool) -> None:
    data, closed = await exchange_in_clear(tls_gateway.port, request_bytes)
    assert closed, "the TLS listener kept the plain HTTP connection open"
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 400 Bad Request", data[:200]
    assert b"Connection: close" in lines[1:]
    assert int(next(line for line in lines if line.startswith(b"Content-Length: ")).split(b": ")[1]) == len(body)
    error = json.loads(body)["error"]
    message = error["message"] if openai else error
    assert "plain HTTP request was sent to an HTTPS port" in message and "https://" in message
    assert ollama.received == []
    assert not tls_gateway.proxy.connections  # never reached fastgate's HTTP layer
    await wait_for_no_open_sockets(tls_gateway)
    await assert_tls_still_served(tls_gateway, ca)


async def test_plain_http_answer_is_bounded_by_the_header_timeout(make_gateway: MakeGateway, cert_files: CertFiles,
                                                                  ca: trustme.CA) -> None:
    gw = await make_gateway(server={"tls_cert": str(cert_files.cert), "tls_key": str(cert_files.key),
                                    "header_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # a head never finished
        await writer.drain()
        started = time.monotonic()
        deadline = started + 5
        while gw.proxy.open_sockets != 1:  # counted like any other socket while it waits
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        data, closed = await read_until_closed(reader, timeout=5)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
    assert closed and data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert 0.3 <= time.monotonic() - started < 3
    await wait_for_no_open_sockets(gw)
    await assert_tls_still_served(gw, ca)


@pytest.mark.parametrize("junk", [
    pytest.param(bytes(range(256)) * 4, id="binary-garbage"),
    pytest.param(b"\x16\x03\x01\x00\x08garbage!" + b"\x00" * 64, id="broken-tls-record"),
])
async def test_non_tls_bytes_are_dropped_and_listener_survives(tls_gateway: RunningServer, ca: trustme.CA,
                                                               ollama: FakeOllama, junk: bytes) -> None:
    data, closed = await exchange_in_clear(tls_gateway.port, junk)
    assert closed, "the TLS listener kept a non-TLS connection open"
    assert b"HTTP/" not in data  # no HTTP answer in clear text (at most a TLS alert record)
    assert data == b"" or data[0] == 0x15  # 0x15: TLS alert
    assert ollama.received == []
    assert not tls_gateway.proxy.connections  # never reached fastgate's HTTP layer
    await assert_tls_still_served(tls_gateway, ca)


async def test_silent_connection_is_dropped_after_the_handshake_deadline(make_gateway: MakeGateway,
                                                                         cert_files: CertFiles,
                                                                         ca: trustme.CA) -> None:
    gw = await make_gateway(server={"tls_cert": str(cert_files.cert), "tls_key": str(cert_files.key),
                                    "header_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    started = time.monotonic()
    try:
        data, closed = await read_until_closed(reader, timeout=5)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
    assert closed and data == b""
    assert 0.3 <= time.monotonic() - started < 3
    await assert_tls_still_served(gw, ca)


# -- configuration errors ----------------------------------------------------------------------------------

def test_missing_cert_file_is_a_config_error_naming_server_tls_cert(cert_files: CertFiles,
                                                                      tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        server_context(str(tmp_path / "nope.crt"), str(cert_files.key))
    assert str(info.value).startswith("server.tls_cert:")


@pytest.mark.parametrize("missing", ["cert", "key"])
def test_missing_tls_file_error_names_the_key_and_the_path(cert_files: CertFiles, tmp_path: Path,
                                                           missing: str) -> None:
    absent = tmp_path / f"absent.{missing}"
    cert = absent if missing == "cert" else cert_files.cert
    key = absent if missing == "key" else cert_files.key
    with pytest.raises(ConfigError) as info:
        server_context(str(cert), str(key))
    message = str(info.value)
    assert message.startswith(f"server.tls_{missing}:"), message
    assert str(absent) in message, message  # the operator must see which file is missing


def test_unusable_cert_or_key_is_a_config_error(ca: trustme.CA, cert_files: CertFiles,
                                                tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("this is not a certificate\n")
    with pytest.raises(ConfigError, match=r"^server\.tls_cert: cannot load certificate and key"):
        server_context(str(not_pem), str(cert_files.key))
    other_key = tmp_path / "other.key"
    ca.issue_cert("localhost").private_key_pem.write_to_path(str(other_key))
    with pytest.raises(ConfigError, match=r"^server\.tls_cert: cannot load certificate and key"):
        server_context(str(cert_files.cert), str(other_key))  # a key that does not match the certificate


async def test_gateway_refuses_to_start_with_a_missing_cert(ollama: FakeOllama, cert_files: CertFiles,
                                                            tmp_path: Path) -> None:
    config = gateway_config(ollama.url, server={"tls_cert": str(tmp_path / "gone.crt"),
                                                "tls_key": str(cert_files.key)})
    with pytest.raises(ConfigError, match=r"^server\.tls_cert:"):
        await start(config)


@pytest.mark.parametrize("given,missing", [("tls_cert", "server.tls_key"), ("tls_key", "server.tls_cert")])
def test_cert_and_key_must_be_set_together(cert_files: CertFiles, given: str, missing: str) -> None:
    path = str(cert_files.cert if given == "tls_cert" else cert_files.key)
    with pytest.raises(ConfigError, match=rf"^{missing}:"):
        gateway_config("http://127.0.0.1:11434", server={given: path})


async def test_reload_swaps_the_certificate_for_new_handshakes(tls_gateway: RunningServer, ca: trustme.CA,
                                                               ollama: FakeOllama, tmp_path: Path) -> None:
    old = await Client.connect(tls_gateway.port, ssl=client_context(ca), server_hostname="127.0.0.1")
    assert (await old.request("GET", "/")).status == 200
    new_ca = trustme.CA()
    leaf = new_ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "new.crt", tmp_path / "new.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    tls_gateway.reload(gateway_config(ollama.url, server={"tls_cert": str(cert), "tls_key": str(key)}))
    fresh = await Client.connect(tls_gateway.port, ssl=client_context(new_ca), server_hostname="127.0.0.1")
    assert (await fresh.request("GET", "/")).status == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        await Client.connect(tls_gateway.port, ssl=client_context(ca), server_hostname="127.0.0.1")
    assert (await old.request("GET", "/")).status == 200  # connections made before the reload carry on
    # a reload with a broken certificate changes nothing
    (tmp_path / "broken.crt").write_text("not a certificate")
    with pytest.raises(ConfigError):
        tls_gateway.reload(gateway_config(ollama.url, server={"tls_cert": str(tmp_path / "broken.crt"),
                                                              "tls_key": str(key)}))
    again = await Client.connect(tls_gateway.port, ssl=client_context(new_ca), server_hostname="127.0.0.1")
    assert (await again.request("GET", "/")).status == 200
    for c in (old, fresh, again):
        await c.close()
