"""`fastgate keys ...` and `fastgate usage ...`, run in-process: output, JSON, exit codes, secrets shown once."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from fastgate.admin import keys_command, parse_duration, parse_since, usage_command
from fastgate.store import KeyStore, UsageRow

NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
DAY_S = 86400.0
SECRET = re.compile(r"^API key: (fg_\S+)$", re.MULTILINE)

Command = Callable[..., int]


class Run:
    """Runs a command against one store file and keeps what it printed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.out = ""
        self.err = ""

    def __call__(self, command: Command, *argv: str, now: float = NOW, store_path: str | None = None) -> int:
        out, err = io.StringIO(), io.StringIO()
        code = command(list(argv), store_path=self.path if store_path is None else store_path, out=out, err=err,
                       now=now)
        self.out, self.err = out.getvalue(), err.getvalue()
        return code

    def add(self, *argv: str, now: float = NOW) -> tuple[str, str]:
        """`keys add ...` -> (key id, secret)."""
        assert self(keys_command, "add", *argv, now=now) == 0, self.err
        secret = SECRET.search(self.out)
        key_id = re.search(r"key (k_[0-9a-f]{8})", self.out)
        assert secret and key_id, self.out
        return key_id[1], secret[1]

    def store(self) -> KeyStore:
        return KeyStore(self.path)


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(str(tmp_path / "fastgate.db"))


def table(text: str) -> list[dict[str, str]]:
    """Parse an aligned table back into rows, using the header's column starts (proves the alignment)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]
    names = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        # every cell sits within its column: nothing spills across a column boundary
        for a in starts[1:]:
            assert line[a - 1:a] in (" ", ""), f"misaligned at {a}: {line!r}"
        rows.append(dict(zip(names, cells)))
    return rows


# ---------------------------------------------------------------------------------------------------------
# keys add


def test_add_prints_the_secret_once_and_stores_its_digest(run: Run) -> None:
    key_id, secret = run.add("alice")
    assert run.err == ""
    assert "Store it now: it will not be shown again." in run.out
    assert run.out.count(secret) == 1
    with run.store() as store:
        record = store.get(key_id)
        assert record.digest == hashlib.sha256(secret.encode()).hexdigest()
        assert hashlib.sha256(secret.encode()).digest() in store.active_by_digest(NOW)
    for listing in (("list",), ("list", "--all"), ("list", "--json")):
        assert run(keys_command, *listing) == 0
        assert secret not in run.out and secret[:8] not in run.out
        assert secret[:7] in run.out  # the display prefix is shown


def test_add_with_every_option(run: Run) -> None:
    key_id, _ = run.add("bob", "--role", "admin", "--models", "llama3*, qwen2.5:7b", "--expires", "30d",
                        "--rpm", "60", "--max-concurrent", "2", "--tokens-per-day", "100000")
    assert "It expires 2027-02-14 08:00 UTC." in run.out
    with run.store() as store:
        record = store.get(key_id)
    assert (record.user, record.role, record.models) == ("bob", "admin", ("llama3*", "qwen2.5:7b"))
    assert record.expires_at == NOW + 30 * DAY_S
    assert (record.rpm, record.max_concurrent, record.tokens_per_day) == (60, 2, 100_000)


@pytest.mark.parametrize("argv, message", [
    ([], "required: user"),
    (["alice", "--role", "root"], "invalid choice: 'root'"),
    (["alice", "--expires", "30"], "expected a duration like 30d"),
    (["alice", "--expires", "0d"], "expected a duration"),
    (["alice", "--expires=-1d"], "expected a duration"),
    (["alice", "--rpm", "0"], "--rpm: expected a whole number >= 1"),
    (["alice", "--tokens-per-day", "many"], "--tokens-per-day: expected a whole number"),
    (["alice", "--models", "a,,b"], "comma-separated model patterns"),
    (["alice", "--unknown"], "unrecognized arguments: --unknown"),
])
def test_add_usage_errors(run: Run, argv: list[str], message: str) -> None:
    assert run(keys_command, "add", *argv) == 2
    assert message in run.err and run.err.startswith("usage: fastgate keys")
    assert run.out == ""


def test_store_errors_are_operational(run: Run) -> None:
    assert run(keys_command, "add", " alice") == 1  # argparse accepts it, the store refuses it
    assert run.err.startswith("fastgate: user name must be")


@pytest.mark.parametrize("text, seconds", [("30d", 30 * DAY_S), ("12h", 12 * 3600.0), ("90m", 5400.0),
                                           ("45s", 45.0), ("2w", 14 * DAY_S)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, when", [
    ("2027-01-01", 1_798_761_600.0),
    ("2027-01-01T12:00", 1_798_761_600.0 + 12 * 3600),
    ("2027-01-01 12:00:00Z", 1_798_761_600.0 + 12 * 3600),
    ("2027-01-01T12:00:00+02:00", 1_798_761_600.0 + 10 * 3600),
    ("7d", NOW - 7 * DAY_S),
])
def test_parse_since(text: str, when: float) -> None:
    assert parse_since(text, NOW) == when


# ---------------------------------------------------------------------------------------------------------
# keys list / revoke / rotate


def test_list_table(run: Run) -> None:
    alice, alice_secret = run.add("alice", "--expires", "1h", "--models", "llama3*")
    bob, _ = run.add("bob", "--role", "admin", "--rpm", "60", now=NOW + 60)
    with run.store() as store:
        store.touch_last_used({bob: NOW + 120})
    assert run(keys_command, "list") == 0
    rows = table(run.out)
    assert rows == [
        {"ID": alice, "USER": "alice", "ROLE": "user", "PREFIX": alice_secret[:7] + "...", "STATUS": "active",
         "CREATED": "2027-01-15 08:00", "LAST USED": "-", "EXPIRES": "2027-01-15 09:00", "MODELS": "llama3*",
         "RPM": "-", "CONCURRENT": "-", "TOKENS/DAY": "-"},
        {**rows[1], "ID": bob, "USER": "bob", "ROLE": "admin", "STATUS": "active", "CREATED": "2027-01-15 08:01",
         "LAST USED": "2027-01-15 08:02", "EXPIRES": "-", "MODELS": "*", "RPM": "60"},
    ]
    assert run(keys_command, "list", now=NOW + 3600) == 0
    assert [r["STATUS"] for r in table(run.out)] == ["expired", "active"]


def test_list_json(run: Run) -> None:
    key_id, secret = run.add("alice", "--expires", "90m", "--models", "llama3*,qwen*", "--tokens-per-day", "5")
    assert run(keys_command, "list", "--json") == 0
    assert json.loads(run.out) == [{
        "id": key_id, "user": "alice", "role": "user", "prefix": secret[:7], "status": "active",
        "created_at": "2027-01-15T08:00:00Z", "last_used_at": None, "expires_at": "2027-01-15T09:30:00Z",
        "models": ["llama3*", "qwen*"], "rpm": None, "max_concurrent": None, "tokens_per_day": 5}]


def test_list_empty(run: Run) -> None:
    assert run(keys_command, "list") == 0 and run.out == "No active keys (--all shows revoked ones).\n"
    assert run(keys_command, "list", "--json") == 0 and json.loads(run.out) == []


def test_revoke(run: Run) -> None:
    key_id, _ = run.add("alice")
    assert run(keys_command, "revoke", key_id) == 0
    assert f"Revoked key {key_id} (alice)" in run.out
    assert run(keys_command, "revoke", key_id) == 0 and "already revoked" in run.out
    with run.store() as store:
        assert store.active_by_digest(NOW) == {}
    assert run(keys_command, "list") == 0 and key_id not in run.out
    assert run(keys_command, "list", "--all") == 0
    assert [(r["ID"], r["STATUS"]) for r in table(run.out)] == [(key_id, "revoked")]


def test_rotate(run: Run) -> None:
    key_id, old = run.add("alice", "--rpm", "7")
    assert run(keys_command, "rotate", key_id) == 0
    new = SECRET.search(run.out)
    assert new and new[1] != old and "will not be shown again" in run.out and "no longer works" in run.out
    with run.store() as store:
        active = store.active_by_digest(NOW)
    assert list(active) == [hashlib.sha256(new[1].encode()).digest()]
    assert active[hashlib.sha256(new[1].encode()).digest()].rpm == 7
    assert run(keys_command, "revoke", key_id) == 0
    assert run(keys_command, "rotate", key_id) == 1 and "is revoked" in run.err


@pytest.mark.parametrize("action", ["revoke", "rotate"])
def test_unknown_id(run: Run, action: str) -> None:
    assert run(keys_command, action, "k_deadbeef") == 1
    assert run.err == "fastgate: no key with id 'k_deadbeef' (see `fastgate keys list --all`)\n"
    assert run.out == ""


def test_help_and_missing_action(run: Run) -> None:
    assert run(keys_command, "--help") == 0 and "add" in run.out and "rotate" in run.out and run.err == ""
    assert run(keys_command) == 2 and "required: ACTION" in run.err
    assert run(keys_command, "delete", "x") == 2 and "invalid choice: 'delete'" in run.err


def test_no_store_configured(run: Run) -> None:
    for command, argv in ((keys_command, ["list"]), (usage_command, [])):
        assert run(command, *argv, store_path="") == 2
        assert run.err == "fastgate: no key store configured: set [store] path in the config file\n"


def test_unreadable_store(run: Run, tmp_path: Path) -> None:
    assert run(keys_command, "list", store_path=str(tmp_path / "missing" / "x.db")) == 1
    assert run.err.startswith("fastgate: key store ") and "cannot open" in run.err


# ---------------------------------------------------------------------------------------------------------
# usage


@pytest.fixture
def recorded(run: Run) -> tuple[str, str]:
    alice, _ = run.add("alice")
    bob, _ = run.add("bob")
    with run.store() as store:
        store.record_usage([
            UsageRow(NOW - 3 * DAY_S, "alice", alice, "llama3.2", "/api/chat", 200, 10, 100, 1000.0),
            UsageRow(NOW - 60, "alice", alice, "qwen2.5", "/api/generate", 200, 20, 200, 2500.0),
            UsageRow(NOW - 30, "bob", bob, "llama3.2", "/v1/chat/completions", 500, 5, 0, 40.0),
            UsageRow(NOW - 10, "carol", "", "llama3.2", "/api/chat", 200, 1, 2, 3.0),
        ])
    return alice, bob


def test_usage_by_user(run: Run, recorded: tuple[str, str]) -> None:
    assert run(usage_command) == 0
    assert table(run.out) == [
        {"USER": "alice", "REQUESTS": "2", "ERRORS": "0", "PROMPT TOKENS": "30", "COMPLETION TOKENS": "300",
         "TOTAL TOKENS": "330", "DURATION S": "3.5"},
        {"USER": "bob", "REQUESTS": "1", "ERRORS": "1", "PROMPT TOKENS": "5", "COMPLETION TOKENS": "0",
         "TOTAL TOKENS": "5", "DURATION S": "0.0"},
        {"USER": "carol", "REQUESTS": "1", "ERRORS": "0", "PROMPT TOKENS": "1", "COMPLETION TOKENS": "2",
         "TOTAL TOKENS": "3", "DURATION S": "0.0"},
        {"USER": "TOTAL", "REQUESTS": "4", "ERRORS": "1", "PROMPT TOKENS": "36", "COMPLETION TOKENS": "302",
         "TOTAL TOKENS": "338", "DURATION S": "3.5"},
    ]
    # numbers are right-aligned under their headers
    header, first = run.out.splitlines()[:2]
    assert header.index("REQUESTS") + len("REQUESTS") == first.index("2  ") + 1


def test_usage_by_model_and_key(run: Run, recorded: tuple[str, str]) -> None:
    alice, bob = recorded
    assert run(usage_command, "--by", "model") == 0
    assert [(r["MODEL"], r["REQUESTS"], r["TOTAL TOKENS"]) for r in table(run.out)] == \
        [("llama3.2", "3", "118"), ("qwen2.5", "1", "220"), ("TOTAL", "4", "338")]
    assert run(usage_command, "--by", "key") == 0
    rows = {(r["KEY"], r["USER"], r["REQUESTS"]) for r in table(run.out)}
    assert rows == {("(config)", "-", "1"), (alice, "alice", "2"), (bob, "bob", "1"), ("TOTAL", "", "4")}


def test_usage_since(run: Run, recorded: tuple[str, str]) -> None:
    assert run(usage_command, "--since", "2027-01-15") == 0
    assert run.out.startswith("Usage since 2027-01-15 00:00 UTC:\n")
    assert [(r["USER"], r["REQUESTS"]) for r in table(run.out.split("\n", 1)[1])] == \
        [("alice", "1"), ("bob", "1"), ("carol", "1"), ("TOTAL", "3")]
    assert run(usage_command, "--since", "45s") == 0
    assert [r["USER"] for r in table(run.out.split("\n", 1)[1])] == ["bob", "carol", "TOTAL"]
    assert run(usage_command, "--since", "2030-01-01") == 0
    assert run.out == "No usage recorded since 2030-01-01 00:00 UTC.\n"


def test_usage_json(run: Run, recorded: tuple[str, str]) -> None:
    alice, bob = recorded
    assert run(usage_command, "--json", "--by", "key", "--since", "2027-01-15T07:00:00Z") == 0
    assert json.loads(run.out) == {"since": "2027-01-15T07:00:00Z", "by": "key", "rows": [
        {"key": "", "user": None, "requests": 1, "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
         "duration_ms": 3.0, "errors": 0},
        *sorted([
            {"key": alice, "user": "alice", "requests": 1, "prompt_tokens": 20, "completion_tokens": 200,
             "total_tokens": 220, "duration_ms": 2500.0, "errors": 0},
            {"key": bob, "user": "bob", "requests": 1, "prompt_tokens": 5, "completion_tokens": 0,
             "total_tokens": 5, "duration_ms": 40.0, "errors": 1}], key=lambda r: str(r["key"]))]}
    assert run(usage_command, "--json") == 0
    assert json.loads(run.out)["since"] is None
    assert [r["user"] for r in json.loads(run.out)["rows"]] == ["alice", "bob", "carol"]


@pytest.mark.parametrize("argv, message", [
    (["--since", "yesterday"], "expected a date (2026-11-01)"),
    (["--by", "path"], "invalid choice: 'path'"),
])
def test_usage_errors(run: Run, argv: list[str], message: str) -> None:
    assert run(usage_command, *argv) == 2
    assert message in run.err and run.out == ""
