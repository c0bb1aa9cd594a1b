"""CORS for browser clients: fastgate answers preflights itself and marks answers for allowed origins.

Pure. Ollama never sees the browser's `Origin` (it refuses origins it does not list, and its preflight
answer omits `X-API-Key`), so CORS is decided here, per request, from `[cors] allow_origins`.
"""

from __future__ import annotations

from collections.abc import Sequence

ALLOW_METHODS = b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
# What the official clients and SDKs send, plus the key headers Ollama's own CORS list lacks.
ALLOW_HEADERS = (b"Authorization, X-API-Key, Content-Type, Accept, User-Agent, X-Requested-With, OpenAI-Beta, "
                 b"X-Stainless-Arch, X-Stainless-Lang, X-Stainless-OS, X-Stainless-Package-Version, "
                 b"X-Stainless-Runtime, X-Stainless-Runtime-Version, X-Stainless-Retry-Count, "
                 b"X-Stainless-Timeout")
EXPOSE_HEADERS = b"X-Request-Id, Retry-After"

Headers = tuple[tuple[bytes, bytes], ...]


def allowed_origin(allow_origins: Sequence[str], origin: bytes | None) -> bytes | None:
    """The origin to answer to, or None when the request is not a CORS request we allow."""
    if not origin or not allow_origins:
        return None
    text = origin.decode("latin-1")
    if "*" in allow_origins or text in allow_origins:
        return origin
    return None


def is_preflight(method: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return method == b"OPTIONS" and any(n == b"access-control-request-method" for n, _ in headers) \
        and any(n == b"origin" for n, _ in headers)


def preflight_headers(origin: bytes, requested: bytes | None, max_age: int) -> Headers:
    allow = ALLOW_HEADERS + b", " + requested if requested else ALLOW_HEADERS
    return ((b"Access-Control-Allow-Origin", origin), (b"Access-Control-Allow-Methods", ALLOW_METHODS),
            (b"Access-Control-Allow-Headers", allow), (b"Access-Control-Max-Age", str(max_age).encode()),
            (b"Vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"))


def response_headers(origin: bytes) -> Headers:
    """Added to every answer (relayed or fastgate's own) for an allowed origin."""
    return ((b"Access-Control-Allow-Origin", origin), (b"Access-Control-Expose-Headers", EXPOSE_HEADERS),
            (b"Vary", b"Origin"))


def render(headers: Headers) -> bytes:
    return b"".join(name + b": " + value + b"\r\n" for name, value in headers)


def without_cors_fields(header_block: bytes) -> bytes:
    """Header lines (each ending in CRLF) without Access-Control-* and Vary, which fastgate writes itself."""
    lines = header_block.split(b"\r\n")
    kept = [line for line in lines[:-1]
            if not line[:15].lower().startswith((b"access-control-", b"vary:"))]
    return b"".join(line + b"\r\n" for line in kept)
