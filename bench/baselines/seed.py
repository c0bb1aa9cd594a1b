"""The seed document's design, written plainly: the yardstick fastgate replaces.

FastAPI on uvicorn, one shared `httpx.AsyncClient`, the key checked against a dict, one log line per
request, and a `StreamingResponse` over the upstream's raw bytes. Nothing here is tuned to make it slower
or faster than that design is: uvicorn runs with its defaults (its event loop and HTTP parser are whatever
`uvicorn` picks with the installed packages; the harness records which), except that its access log is
off, so that each request logs exactly one line, the app's own.

    python -m bench.baselines.seed --listen 127.0.0.1:8001 --upstream http://127.0.0.1:11434 --keys keys.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import uuid

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

log = logging.getLogger("seed")

# Hop-by-hop and per-connection headers are not forwarded; the key never reaches Ollama.
DROP_REQUEST_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding",
                        "x-api-key", "authorization"}


def create_app(upstream: str, keys: dict[str, str]) -> FastAPI:
    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(600.0, connect=5.0))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        yield
        await client.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    async def proxy(path: str, request: Request):  # type: ignore[no-untyped-def]
        request_id = uuid.uuid4().hex[:8]
        user = keys.get(request.headers.get("x-api-key", ""))
        if user is None:
            log.info("[%s] Unauthorized request: %s %s", request_id, request.method, path)
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        log.info("[%s] Processing request: %s %s (user %s)", request_id, request.method, path, user)
        headers = {k: v for k, v in request.headers.items() if k not in DROP_REQUEST_HEADERS}
        upstream_request = client.build_request(request.method, "/" + path, params=request.query_params,
                                                headers=headers, content=await request.body())
        response = await client.send(upstream_request, stream=True)
        return StreamingResponse(response.aiter_raw(), status_code=response.status_code,
                                 media_type=response.headers.get("content-type"),
                                 background=BackgroundTask(response.aclose))

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines.seed")
    parser.add_argument("--listen", default="127.0.0.1:8001")
    parser.add_argument("--upstream", default="http://127.0.0.1:11434")
    parser.add_argument("--keys", required=True, help='JSON file {"key": "user", ...}')
    args = parser.parse_args(argv)
    with open(args.keys) as f:
        keys = json.load(f)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s")
    host, _, port = args.listen.rpartition(":")
    config = uvicorn.Config(create_app(args.upstream, keys), host=host, port=int(port), access_log=False)
    server = uvicorn.Server(config)
    config.load()
    log.info("seed baseline: uvicorn %s, loop=%s, http=%s", uvicorn.__version__, config.loop,
             type(config.http_protocol_class).__name__ if not isinstance(config.http_protocol_class, type)
             else config.http_protocol_class.__name__)
    server.run()


if __name__ == "__main__":
    main()
