"""Usage records name the backend that served (issue 9 rule 8): the SQLite `usage.backend` column, its migration
for stores written before it existed, and `fastgate usage --by backend`."""

from __future__ import annotations

import io
import json
import sqlite3
from contextlib import closing
from pathlib import Path

from fastgate.admin import usage_command
from fastgate.store import SCHEMA_VERSION, KeyStore, UsageRow

NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC

# The store as fastgate wrote it before several backends (schema version 1), statement for statement.
VERSION_1 = (
    """CREATE TABLE keys (id TEXT PRIMARY KEY, user TEXT NOT NULL, role TEXT NOT NULL, prefix TEXT NOT NULL,
        digest TEXT NOT NULL UNIQUE, models TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL,
        last_used_at REAL, revoked_at REAL, rpm INTEGER, max_concurrent INTEGER, tokens_per_day INTEGER)""",
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT INTO meta (name, value) VALUES ('revision', 0)",
    """CREATE TABLE usage (at REAL NOT NULL, user TEXT NOT NULL, key_id TEXT NOT NULL, model TEXT NOT NULL,
        path TEXT NOT NULL, status INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL, duration_ms REAL NOT NULL)""",
    "CREATE INDEX usage_at ON usage (at)",
    "CREATE INDEX usage_key_at ON usage (key_id, at)",
)


def old_store(path: str) -> None:
    with closing(sqlite3.connect(path)) as db:
        for statement in VERSION_1:
            db.execute(statement)
        db.execute("INSERT INTO usage VALUES (?, 'alice', '', 'llama3.2', '/api/chat', 200, 3, 4, 10.0)",
                   (NOW - 100,))
        db.execute("PRAGMA user_version = 1")
        db.commit()


def columns(path: str) -> list[str]:
    with closing(sqlite3.connect(path)) as db:
        return [row[1] for row in db.execute("PRAGMA table_info(usage)")]


def test_an_old_store_gains_the_backend_column_and_keeps_its_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    old_store(path)
    assert "backend" not in columns(path)
    with KeyStore(path) as store:
        store.record_usage([
            UsageRow(NOW - 50, "alice", "", "llama3.2", "/api/chat", 200, 1, 2, 5.0, backend="gpu2"),
            UsageRow(NOW - 40, "bob", "", "qwen2.5", "/api/generate", 502, 0, 0, 1.0, backend="gpu1"),
            UsageRow(NOW - 30, "bob", "", "qwen2.5", "/api/generate", 200, 5, 6, 2.0, backend="gpu1"),
        ])
        by_backend = [(s.group, s.requests, s.total_tokens, s.errors) for s in store.usage(by="backend")]
    assert "backend" in columns(path)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # the row written before the column existed has no backend; it is still counted
    assert by_backend == [("", 1, 7, 0), ("gpu1", 2, 11, 1), ("gpu2", 1, 3, 0)]
    with KeyStore(path) as store:  # opened again: migrated once, nothing doubled
        assert sum(s.requests for s in store.usage(by="backend")) == 4


def test_a_new_store_keeps_the_backend_of_every_row(tmp_path: Path) -> None:
    path = str(tmp_path / "new.db")
    with KeyStore(path) as store:
        store.record_usage([UsageRow(NOW, "alice", "", "m", "/api/chat", 200, 1, 1, 1.0, backend="b")])
        store.record_usage([UsageRow(NOW, "alice", "", "m", "/api/chat", 200, 1, 1, 1.0)])  # one backend: ""
    with closing(sqlite3.connect(path)) as db:
        assert sorted(row[0] for row in db.execute("SELECT backend FROM usage")) == ["", "b"]


def test_usage_command_groups_by_backend(tmp_path: Path) -> None:
    path = str(tmp_path / "fastgate.db")
    with KeyStore(path) as store:
        store.record_usage([
            UsageRow(NOW - 20, "alice", "", "m", "/api/chat", 200, 10, 20, 1000.0, backend="gpu1"),
            UsageRow(NOW - 10, "bob", "", "m", "/api/chat", 200, 1, 2, 500.0, backend="gpu2"),
            UsageRow(NOW - 5, "bob", "", "m", "/api/chat", 404, 0, 0, 1.0),
        ])

    def run(*argv: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        assert usage_command(list(argv), store_path=path, out=out, err=err, now=NOW) == 0, err.getvalue()
        return out.getvalue()

    rows = [line.split() for line in run("--by", "backend").splitlines()]
    assert rows[0][0] == "BACKEND"
    assert [(row[0], row[1], row[2]) for row in rows[1:]] == [
        ("-", "1", "1"), ("gpu1", "1", "0"), ("gpu2", "1", "0"), ("TOTAL", "3", "1")]
    as_json = json.loads(run("--by", "backend", "--json"))
    assert as_json["by"] == "backend"
    assert [(r["backend"], r["total_tokens"]) for r in as_json["rows"]] == [("", 0), ("gpu1", 30), ("gpu2", 3)]
