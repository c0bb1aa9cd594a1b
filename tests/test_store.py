"""The key store: keys (add, list, revoke, rotate, expiry), secrecy on disk, change detection across processes,
concurrent readers and writers, and usage accounting. Time is injected everywhere."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest

from fastgate.store import SCHEMA_VERSION, KeyStore, StoreError, UsageRow, secret_digest

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000.0  # 2027-01-15
DAY_S = 86400.0


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "fastgate.db")


@pytest.fixture
def store(path: str) -> Iterator[KeyStore]:
    with KeyStore(path) as s:
        yield s


def run_python(code: str, *args: str, wait: bool = True) -> subprocess.Popen[str]:
    """Run `code` in a fresh interpreter that imports this checkout (another process, as the CLI would be)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    return proc


def raw_bytes(directory: Path) -> bytes:
    """Every byte SQLite has written: the database and its WAL and shared-memory files."""
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


# ---------------------------------------------------------------------------------------------------------
# Keys


def test_add_returns_the_secret_and_a_record(store: KeyStore) -> None:
    record, secret = store.add("alice", role="admin", models=["llama3*", "qwen2.5:7b"], expires_at=NOW + DAY_S,
                               rpm=60, max_concurrent=2, tokens_per_day=100_000, now=NOW)
    assert secret.startswith("fg_") and len(secret) >= 40
    assert record.id.startswith("k_") and len(record.id) == 10
    assert (record.user, record.role, record.prefix) == ("alice", "admin", secret[:7])
    assert record.digest == hashlib.sha256(secret.encode()).hexdigest() == secret_digest(secret)
    assert record.models == ("llama3*", "qwen2.5:7b")
    assert (record.created_at, record.expires_at, record.last_used_at) == (NOW, NOW + DAY_S, None)
    assert (record.rpm, record.max_concurrent, record.tokens_per_day) == (60, 2, 100_000)
    assert not record.revoked
    assert store.get(record.id) == record


def test_keys_are_distinct(store: KeyStore) -> None:
    made = [store.add("alice", now=NOW) for _ in range(20)]
    assert len({r.id for r, _ in made}) == len({s for _, s in made}) == 20


def test_secret_never_reaches_the_disk(store: KeyStore, tmp_path: Path) -> None:
    record, secret = store.add("alice", now=NOW)
    rotated, new_secret = store.rotate(record.id, NOW)
    while_open = raw_bytes(tmp_path)  # the database and its write-ahead log
    store.close()  # checkpoints the log into the database file
    for data in (while_open, raw_bytes(tmp_path)):
        assert rotated.digest.encode() in data  # the scan does see what is stored
        for s in (secret, new_secret):
            assert s.encode() not in data
            assert s[3:].encode() not in data


def test_file_is_private(store: KeyStore, path: str) -> None:
    if os.name == "posix":
        assert os.stat(path).st_mode & 0o077 == 0


def test_list_get_revoke(store: KeyStore) -> None:
    a, _ = store.add("alice", now=NOW)
    b, _ = store.add("bob", now=NOW + 1)
    assert store.list() == [a, b]
    revoked = store.revoke(a.id, NOW + 2)
    assert revoked.revoked and revoked.status(NOW) == "revoked"
    assert store.list() == [b]
    assert store.list(include_revoked=True) == [revoked, b]
    assert store.revoke(a.id, NOW + 3) == revoked  # idempotent
    for call in (lambda: store.get("k_00000000"), lambda: store.revoke("k_00000000", NOW),
                 lambda: store.rotate("k_00000000", NOW)):
        with pytest.raises(StoreError, match="no key with id 'k_00000000'"):
            call()


def test_rotate_keeps_identity_and_limits(store: KeyStore) -> None:
    old, old_secret = store.add("alice", role="admin", models=["llama*"], rpm=5, tokens_per_day=10,
                                expires_at=NOW + DAY_S, now=NOW)
    new, new_secret = store.rotate(old.id, NOW + 5)
    assert new_secret != old_secret and new.prefix == new_secret[:7]
    assert new == replace(old, prefix=new.prefix, digest=new.digest) and new.digest != old.digest
    active = store.active_by_digest(NOW + 5)
    assert hashlib.sha256(new_secret.encode()).digest() in active
    assert hashlib.sha256(old_secret.encode()).digest() not in active
    store.revoke(old.id, NOW + 6)
    with pytest.raises(StoreError, match="revoked"):
        store.rotate(old.id, NOW + 7)


def test_active_by_digest_excludes_revoked_and_expired(store: KeyStore) -> None:
    keep, keep_secret = store.add("alice", now=NOW)
    expiring, expiring_secret = store.add("bob", expires_at=NOW + 60, now=NOW)
    gone, _ = store.add("carol", now=NOW)
    store.revoke(gone.id, NOW)
    digest = {s: hashlib.sha256(s.encode()).digest() for s in (keep_secret, expiring_secret)}
    assert store.active_by_digest(NOW) == {digest[keep_secret]: keep, digest[expiring_secret]: expiring}
    assert store.active_by_digest(NOW + 60) == {digest[keep_secret]: keep}
    assert not expiring.expired(NOW + 59.9) and expiring.expired(NOW + 60)
    assert expiring.status(NOW + 60) == "expired" and not keep.expired(NOW + 1e9)


@pytest.mark.parametrize("kwargs, message", [
    ({"user": ""}, "user name"),
    ({"user": " alice"}, "user name"),
    ({"user": "al\nice"}, "user name"),
    ({"role": "root"}, "role must be one of user, admin"),
    ({"models": "llama3*"}, "models: expected a sequence"),
    ({"models": ["llama 3"]}, "model patterns"),
    ({"models": [""]}, "model patterns"),
    ({"rpm": 0}, "rpm must be a whole number >= 1"),
    ({"max_concurrent": -1}, "max_concurrent"),
    ({"tokens_per_day": True}, "tokens_per_day"),
])
def test_add_validates(store: KeyStore, kwargs: dict[str, object], message: str) -> None:
    args = {"user": "alice", **kwargs}
    with pytest.raises(StoreError, match=message):
        store.add(args.pop("user"), now=NOW, **args)  # type: ignore[arg-type]
    assert store.list() == []


def test_touch_last_used_is_batched_and_monotonic(store: KeyStore) -> None:
    a, _ = store.add("alice", now=NOW)
    b, _ = store.add("bob", now=NOW)
    store.touch_last_used({a.id: NOW + 10, b.id: NOW + 20, "k_unknown0": NOW})
    store.touch_last_used([(a.id, NOW + 5)])  # older stamp: ignored
    store.touch_last_used({})
    assert (store.get(a.id).last_used_at, store.get(b.id).last_used_at) == (NOW + 10, NOW + 20)


# ---------------------------------------------------------------------------------------------------------
# Opening, schema, errors


def test_reopen_keeps_keys_and_sets_schema_version(path: str) -> None:
    with KeyStore(path) as s:
        record, _ = s.add("alice", now=NOW)
    with KeyStore(path) as s:
        assert s.list() == [record]
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(path: str) -> None:
    KeyStore(path).close()
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this fastgate understands"):
        KeyStore(path)


def test_unusable_paths(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    for target, message in ((garbage, "cannot open: file is not a database"),
                            (tmp_path / "missing" / "x.db", "cannot open"), (tmp_path, "cannot open")):
        with pytest.raises(StoreError, match=message):
            KeyStore(str(target))
    with pytest.raises(StoreError, match="expected a file path"):
        KeyStore(":memory:")


def test_closed_store_says_so(path: str) -> None:
    s = KeyStore(path)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.list()
    with pytest.raises(StoreError, match="closed"):
        s.change_token()


def test_imports_no_event_loop() -> None:
    proc = run_python("import sys, fastgate.store, fastgate.admin\n"
                      "assert not [m for m in sys.modules if m.split('.')[0] in ('asyncio', 'socket', 'ssl')]")
    assert proc.returncode == 0


# ---------------------------------------------------------------------------------------------------------
# Change detection and concurrency

ADD_IN_OTHER_PROCESS = "import sys\nfrom fastgate.store import KeyStore\n" \
                       "with KeyStore(sys.argv[1]) as s: s.add('bob', now=1.0)\n"


def test_change_token_moves_on_key_changes_from_another_process(store: KeyStore, path: str) -> None:
    token = store.change_token()
    assert store.change_token() == token
    run_python(ADD_IN_OTHER_PROCESS, path)
    moved = store.change_token()
    assert moved != token
    assert store.change_token() == moved


def test_change_token_moves_on_every_key_change_in_this_process(store: KeyStore) -> None:
    tokens = [store.change_token()]
    record, _ = store.add("alice", now=NOW)
    tokens.append(store.change_token())
    store.rotate(record.id, NOW)
    tokens.append(store.change_token())
    store.revoke(record.id, NOW)
    tokens.append(store.change_token())
    assert len(set(tokens)) == 4


def test_change_token_ignores_usage_and_last_used(store: KeyStore, path: str) -> None:
    record, _ = store.add("alice", now=NOW)
    token = store.change_token()
    store.record_usage([UsageRow(NOW, "alice", record.id, "m", "/api/chat", 200, 1, 1, 1.0)])
    store.touch_last_used({record.id: NOW})
    with KeyStore(path) as other:
        other.record_usage([UsageRow(NOW, "alice", record.id, "m", "/api/chat", 200, 1, 1, 1.0)])
    assert store.change_token() == token


WRITER = """
import sys, time
from fastgate.store import KeyStore, UsageRow
path, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
added = 0
with KeyStore(path) as store:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        record, _ = store.add(name, now=time.time())
        store.record_usage([UsageRow(time.time(), name, record.id, "m", "/api/chat", 200, 1, 2, 1.0)] * 3)
        if added % 5 == 0:
            store.revoke(record.id, time.time())
        added += 1
print(added)
"""


def test_concurrent_writers_and_a_reader(path: str) -> None:
    # Writers start on a file that does not exist yet: creating and migrating it is contended too.
    writers = [run_python(WRITER, path, f"user{i}", "2.0", wait=False) for i in range(4)]
    reads = 0
    tokens = []
    deadline = time.monotonic() + 2.5
    with KeyStore(path) as reader:
        while time.monotonic() < deadline:
            tokens.append(reader.change_token())
            reader.active_by_digest(time.time())
            reader.usage(by="key")
            reads += 1
        results = [w.communicate(timeout=30) for w in writers]
        for w, (out, err) in zip(writers, results):
            assert w.returncode == 0, err
        added = {f"user{i}": int(out) for i, (out, _) in enumerate(results)}
        everything = reader.list(include_revoked=True)
        assert {u: sum(r.user == u for r in everything) for u in added} == added  # no lost writes
        assert sum(r.revoked for r in everything) == sum((n + 4) // 5 for n in added.values())
        assert {s.group: s.requests for s in reader.usage(by="user")} == {u: 3 * n for u, n in added.items()}
        assert reader.change_token() == len(everything) + sum(r.revoked for r in everything)  # one per change
    # SQLite's lock is not fair (a writer that just committed often wins again), so only ask that every
    # writer got through: none was locked out for the busy timeout.
    assert min(added.values()) >= 1 and reads > 10
    assert tokens == sorted(tokens)  # the revision only moves forward


# ---------------------------------------------------------------------------------------------------------
# Usage


def usage_rows() -> list[UsageRow]:
    return [
        UsageRow(NOW - 2 * DAY_S, "alice", "k_aaaaaaaa", "llama3.2", "/api/chat", 200, 10, 100, 1000.0),
        UsageRow(NOW - 10, "alice", "k_aaaaaaaa", "llama3.2", "/api/generate", 200, 20, 200, 2000.0),
        UsageRow(NOW - 5, "alice", "k_aaaaaaab", "qwen2.5", "/v1/chat/completions", 500, 5, 0, 50.0),
        UsageRow(NOW, "bob", "", "llama3.2", "/api/chat", 401, 0, 0, 1.5),
    ]


def test_usage_groups(store: KeyStore) -> None:
    store.record_usage(usage_rows())
    by_user = store.usage()
    assert [(s.group, s.requests, s.prompt_tokens, s.completion_tokens, s.duration_ms, s.errors)
            for s in by_user] == [("alice", 3, 35, 300, 3050.0, 1), ("bob", 1, 0, 0, 1.5, 1)]
    assert by_user[0].total_tokens == 335
    assert [(s.group, s.requests, s.total_tokens) for s in store.usage(by="model")] == \
        [("llama3.2", 3, 330), ("qwen2.5", 1, 5)]
    assert [(s.group, s.requests) for s in store.usage(by="key")] == \
        [("", 1), ("k_aaaaaaaa", 2), ("k_aaaaaaab", 1)]
    assert [(s.group, s.requests) for s in store.usage(since=NOW - DAY_S)] == [("alice", 2), ("bob", 1)]
    assert store.usage(since=NOW + 1) == []
    with pytest.raises(StoreError, match="cannot group by 'path'"):
        store.usage(by="path")


def test_record_usage_appends_batches(store: KeyStore) -> None:
    store.record_usage([])
    store.record_usage(iter(usage_rows()))  # any iterable, written in one transaction
    store.record_usage(usage_rows()[:1])
    assert sum(s.requests for s in store.usage()) == 5


def test_tokens_used_since(store: KeyStore) -> None:
    assert store.tokens_used_since("k_aaaaaaaa", NOW - DAY_S) == 0
    store.record_usage(usage_rows())
    assert store.tokens_used_since("k_aaaaaaaa", NOW - DAY_S) == 220
    assert store.tokens_used_since("k_aaaaaaaa", NOW - 3 * DAY_S) == 330
    assert store.tokens_used_since("k_aaaaaaaa", NOW - 10) == 220  # `since` is inclusive
    assert store.tokens_used_since("k_aaaaaaab", NOW - DAY_S) == 5


def test_spill_rows_appended_while_an_import_runs_are_never_lost(tmp_path: Path) -> None:
    # Workers (or instances on one machine) append to one spill file while another process imports it; the
    # import used to read the file and then delete it, losing whatever was appended in between.
    import multiprocessing
    from fastgate.store import spill_path

    db = str(tmp_path / "keys.db")
    KeyStore(db).close()
    batches, rows_per_batch = 150, 4

    proc = multiprocessing.get_context("fork").Process(target=_spill_many, args=(db, batches, rows_per_batch))
    proc.start()
    imported = 0
    with KeyStore(db) as store:
        while proc.is_alive():
            imported += store.import_spill()[0]
        proc.join()
        assert proc.exitcode == 0
        imported += store.import_spill()[0]
        assert imported == batches * rows_per_batch
        assert sum(s.requests for s in store.usage()) == batches * rows_per_batch
    assert not os.path.exists(spill_path(db))
    assert not list(tmp_path.glob("*.importing-*"))


def _spill_many(db: str, batches: int, rows_per_batch: int) -> None:
    from fastgate.store import spill_usage
    from fastgate.usage import UsageRecord
    row = UsageRecord(at=time.time(), user="ann", key_id="k1", model="llama3", path="/api/generate", status=200,
                      prompt_tokens=1, completion_tokens=2, duration_ms=1.0)
    for batch in range(batches):
        spill_usage(db, [row] * rows_per_batch, {}, f"b{batch}")
