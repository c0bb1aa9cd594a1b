"""Issue 8 bugs outside the body reader, each driven through the gate with plain values."""

from __future__ import annotations

import pytest

from fastgate.config import build_config
from fastgate.gate import Forward
from fastgate.keys import KeyRing, mask
from tests.test_gate import Clock, RID, T0_WALL, make_gate, req, auth_request
from fastgate.gate import Gate

ALICE_KEY = "api-20250312000101"
BOB_KEY = "api-77777777770101"  # masks exactly like alice's


def test_keys_that_mask_alike_get_distinct_ids() -> None:
    assert mask(ALICE_KEY) == mask(BOB_KEY)
    ring = KeyRing({ALICE_KEY: "alice", BOB_KEY: "bob", "short1": "carol", "short2": "dave"})
    ids = {ring.principal_for(k).key_id for k in (ALICE_KEY, BOB_KEY, "short1", "short2")}  # type: ignore[union-attr]
    assert len(ids) == 4
    for key in (ALICE_KEY, BOB_KEY):
        assert mask(key) not in ring.principal_for(key).key_id  # type: ignore[union-attr]


def test_digest_form_has_the_same_id_as_the_clear_key() -> None:
    import hashlib
    digest = hashlib.sha256(ALICE_KEY.encode()).hexdigest()
    clear = KeyRing({ALICE_KEY: "alice"}).principal_for(ALICE_KEY)
    hashed = KeyRing({f"sha256:{digest.upper()}": "alice"}).principal_for(ALICE_KEY)
    assert clear is not None and hashed is not None and clear.key_id == hashed.key_id


def test_ip_trust_is_served_as_the_user_who_authenticated() -> None:
    config = build_config({"keys": {ALICE_KEY: "alice", BOB_KEY: "bob"}})
    gate = Gate(config, clock=Clock(), wall_clock=lambda: T0_WALL)
    body = b'{"api_key":"' + ALICE_KEY.encode() + b'"}'
    gate.decide_with_body(auth_request(body), body, RID)
    decision = gate.decide(req(b"GET", b"/api/tags", host=b"127.0.0.1:8000"), RID)
    assert isinstance(decision, Forward)
    assert decision.user == "alice"
