"""Property: whatever the gate forwards for a key limited to `llama3*` names only models that key may use, as
Go's encoding/json (Ollama's decoder, asked directly through the Go oracle) reads the forwarded body.

Bodies are generated with random key casing and folding (ſ, K, \\u escapes), duplicates, nulls, nesting, huge
numbers, invalid UTF-8 and trailing bytes. One batch goes to the oracle in one process.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgate.access import Principal, Role
from fastgate.errors import GateError
from fastgate.gate import Forward, Gate, ReadBody
from fastgate.models import is_cloud_model, models_allowed
from tests.gooracle import ask_go_one, stop_oracles
from tests.test_gate import Clock, T0_WALL, make_config, req

SECRET = "fg_property-key-000000000000000001"
PATTERNS = ("llama3*",)

MODEL_KEYS = ["model", "Model", "MODEL", "mOdEl", "mod\\u0065l", "\\u004dodel", "name", "NAME", "Name", "nAme"]
OTHER_KEYS = ["messages", "prompt", "stream", "options", "format", "modelx", "x_model", "api_key", "nam"]
MODELS = ["llama3.2", "llama3", "LLAMA3:8B", "registry.ollama.ai/library/llama3.2:latest", "qwen2.5",
          "QWEN2.5:0.5b", "llama3:cloud", "llama3.2:8b-CLOUD", "evil/llama3", "llama3x/qwen", ""]

scalars = st.one_of(st.sampled_from(['1', '-0.5e3', 'true', 'false', '"x"', '"\\u00e9"', "1" * 4400]),
                    st.text(max_size=8).map(json.dumps))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
    st.lists(st.tuples(st.sampled_from(OTHER_KEYS + MODEL_KEYS), inner), max_size=3).map(
        lambda kvs: "{" + ",".join(f'"{k}":{v}' for k, v in kvs) + "}")), max_leaves=6)
model_values = st.one_of(st.sampled_from(MODELS).map(json.dumps), st.just("null"), st.just("7"))
members = st.one_of(
    st.tuples(st.sampled_from(MODEL_KEYS), model_values),
    st.tuples(st.sampled_from(OTHER_KEYS), values))


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    pairs = draw(st.lists(members, min_size=1, max_size=6))
    text = "{" + ",".join(f'"{k}":{v}' for k, v in pairs) + "}"
    body = text.encode()
    if draw(st.booleans()) and draw(st.booleans()):
        nest = draw(st.integers(1, 1200))
        body = body[:-1] + b',"deep":' + b"[" * nest + b"]" * nest + b"}"
    if draw(st.integers(0, 5)) == 0:
        body = body[:-1] + b',"bad":"' + draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80"])) + b'"}'
    if draw(st.integers(0, 5)) == 0:
        body += draw(st.sampled_from([b" ", b"\n", b" x", b'{"model":"qwen2.5"}', b"]"]))
    return body


def gate_decision(gate: Gate, path: bytes, body: bytes) -> Forward | None:
    request = req(b"POST", path, [(b"X-API-Key", SECRET.encode()),
                                  (b"Content-Length", str(len(body)).encode())])
    try:
        decision = gate.decide(request, b"rid00001")
        if isinstance(decision, ReadBody):
            decision = gate.decide_with_body(request, body, b"rid00001")
    except GateError:
        return None
    assert isinstance(decision, Forward)
    return decision


def may_use(model: str) -> bool:
    return not is_cloud_model(model) and models_allowed(PATTERNS, model)


@pytest.fixture(scope="module", autouse=True)
def _oracle_processes():  # type: ignore[no-untyped-def]
    yield
    stop_oracles()


GATE = Gate(make_config(), clock=Clock(), wall_clock=lambda: T0_WALL)
GATE.set_managed_keys({hashlib.sha256(SECRET.encode()).digest():
                       Principal("p", "k_p", role=Role.USER, models=PATTERNS)})
OUTCOMES = {"forwarded": 0, "refused": 0}


@settings(max_examples=400, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])
@given(st.sampled_from([b"/api/chat", b"/api/show", b"/v1/chat/completions"]), bodies())
def test_forwarded_bodies_name_only_allowed_models_as_go_reads_them(path: bytes, body: bytes) -> None:
    decision = gate_decision(GATE, path, body)
    if decision is None:
        OUTCOMES["refused"] += 1
        return
    OUTCOMES["forwarded"] += 1
    forwarded = decision.body if decision.body is not None else body
    answer = ask_go_one("json", {"body": base64.b64encode(forwarded).decode()})
    if answer["error"]:
        return  # Ollama refuses what Go cannot decode: nothing runs
    assert not answer["trailing"]
    named = [answer["fields"]["model"]] + ([answer["fields"]["name"]] if path == b"/api/show" else [])
    for model in named:
        assert not model or may_use(model), model


def test_the_property_saw_both_outcomes() -> None:
    """Not vacuous: the generated bodies were both forwarded and refused, plenty of each."""
    assert OUTCOMES["forwarded"] > 40 and OUTCOMES["refused"] > 40, OUTCOMES
