"""A tiny raw HTTP/1.1 client for tests: exact bytes out, exact framing in (each chunk kept as received)."""

from __future__ import annotations

import asyncio
import json
import ssl as ssl_module
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)  # chunk payloads, one per chunk, for chunked bodies
    complete: bool = True  # False when the connection ended before the framing said the body was over
    raw: bytes = b""  # head + body bytes exactly as received

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for n, v in self.headers if n.lower() == name), None)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


class Client:
    """One client connection; responses are read one at a time, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1", *, ssl: ssl_module.SSLContext | None = None,
                      server_hostname: str | None = None) -> Client:
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl, server_hostname=server_hostname,
                                                       limit=4 * 1024 * 1024)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def request(self, method: str, target: str, *, headers: dict[str, str] | list[tuple[str, str]] | None = None,
                      body: bytes | None = None, host: str = "gateway.example.com", timeout: float = 10.0,
                      json_body: Any = None) -> RawResponse:
        if json_body is not None:
            body = json.dumps(json_body).encode()
        self.send(build_request(method, target, headers=headers, body=body, host=host))
        return await self.response(head_only=method == "HEAD", timeout=timeout)

    async def response(self, *, head_only: bool = False, timeout: float = 10.0) -> RawResponse:
        return await asyncio.wait_for(read_response(self.reader, head_only=head_only), timeout)

    async def response_head(self, timeout: float = 10.0) -> RawResponse:
        """Only the head; `body()` reads the rest (to act between the two)."""
        return await asyncio.wait_for(read_head(self.reader), timeout)

    async def body(self, response: RawResponse, timeout: float = 10.0) -> RawResponse:
        return await asyncio.wait_for(read_body(self.reader, response), timeout)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (EOF or reset) within `timeout`; data is discarded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while (left := deadline - loop.time()) > 0:
                if not await asyncio.wait_for(self.reader.read(65536), left):
                    return True
        except asyncio.TimeoutError:  # first: on 3.11+ it is a subclass of OSError
            return False
        except (ConnectionError, OSError):
            return True
        return False

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError, ssl_module.SSLError):
            pass

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def build_request(method: str, target: str, *, headers: dict[str, str] | list[tuple[str, str]] | None = None,
                  body: bytes | None = None, host: str | None = "gateway.example.com") -> bytes:
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None and not any(n.lower() == "host" for n, _ in items):
        lines.append(f"Host: {host}")
    lines += [f"{n}: {v}" for n, v in items]
    if body is not None and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in items):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def read_response(reader: asyncio.StreamReader, *, head_only: bool = False) -> RawResponse:
    """Read one response; 1xx interim responses are skipped."""
    response = await read_head(reader)
    if head_only or response.status in (204, 304):
        return response
    return await read_body(reader, response)


async def read_head(reader: asyncio.StreamReader) -> RawResponse:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        _, status_text, *reason = status_line.split(" ", 2)
        status = int(status_text)
        headers = [(n.strip(), v.strip()) for n, _, v in (ln.partition(":") for ln in header_lines if ln)]
        if not 100 <= status < 200:
            break
    return RawResponse(status, reason[0] if reason else "", headers, raw=head)


async def read_body(reader: asyncio.StreamReader, response: RawResponse) -> RawResponse:
    head = response.raw
    lowered = {n.lower(): v for n, v in response.headers}
    raw = bytearray()
    body = bytearray()
    try:
        if lowered.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readuntil(b"\r\n")
                raw += size_line
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    trailer = await reader.readuntil(b"\r\n")
                    raw += trailer
                    while trailer != b"\r\n":
                        trailer = await reader.readuntil(b"\r\n")
                        raw += trailer
                    break
                data = await reader.readexactly(size + 2)
                raw += data
                response.chunks.append(data[:-2])
                body += data[:-2]
        elif "content-length" in lowered:
            data = await reader.readexactly(int(lowered["content-length"]))
            raw += data
            body += data
        else:
            data = await reader.read()
            raw += data
            body += data
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        if isinstance(exc, asyncio.IncompleteReadError):
            raw += exc.partial
        response.complete = False
    response.body = bytes(body)
    response.raw = head + bytes(raw)
    return response
