"""Review of [state]: an IP-trust grant that comes from Redis without the id of the key it was made with.

Every grant fastgate makes carries its key's id (gate.py `_authenticate`), and the gate scopes the trusted
address to that key (role, models, limits). A record without one is never written by fastgate; the gate's
fallback for it, `Principal(grant.user, "ip-trust")`, has Principal's defaults: role admin, every model, no
limit. Redis must be protected anyway (whoever writes to it can forge a grant for any key id it can read
there), but this path turns a write to Redis into admin rights even on a gateway whose keys are all users.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from fastgate.config import build_config
from fastgate.errors import GateError
from fastgate.gate import Gate
from fastgate.state.redis_state import open_state, trust_key
from tests.redis_server import RedisServer, require_redis_server

pytestmark = pytest.mark.timeout(60)

IP = "198.51.100.40"


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer(require_redis_server())
    server.start()
    yield server
    server.close()


async def test_a_grant_without_a_key_id_from_redis_gives_no_access(redis: RedisServer) -> None:
    redis.command("FLUSHALL")
    record = {"ip": IP, "user": "mallory", "label": "x-api-key:none"}
    redis.command("SET", trust_key(IP), json.dumps(record), "PX", "600000")
    config = build_config({"state": {"url": redis.url, "timeout": 1.0}})
    assert config.state is not None and config.auth.session_ttl
    gate = Gate(config)
    state = await open_state(config.state, gate)
    try:
        with pytest.raises(GateError) as info:
            gate._identify(None, IP)  # a request from that address without any key
        assert info.value.status == 401
    finally:
        await state.stop()
        redis.command("FLUSHALL")
