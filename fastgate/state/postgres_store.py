"""The key store and usage ledger in PostgreSQL (`[store] url`), shared by every fastgate instance.

Same interface and rules as the SQLite store (`fastgate.store`, see `fastgate.state.stores.Store`), with what
sharing one database between machines adds:

- Every change to the keys bumps the revision row and sends `NOTIFY fastgate_keys` in the same transaction:
  the notification leaves only if the change commits, and `wait_for_change` (a LISTEN connection of its own)
  wakes every instance at once. The revision number is also what the slower safety-net poll reads.
- Every usage row carries a unique id chosen by the instance that served the request, and goes in with
  `ON CONFLICT (id) DO NOTHING`: a batch written again after a commit whose answer was lost (connection cut
  between COMMIT and its reply, a spill file imported twice) adds nothing the second time.
- The schema is created and migrated on first use, by whichever instance gets there first: the migration runs
  under a transaction-scoped advisory lock, and `fastgate_schema_version` records how far it got.
- A connection that broke (server restarted, network cut) is dropped and a new one made on the next call;
  connecting and every statement are bounded (`CONNECT_TIMEOUT_S`, `STATEMENT_TIMEOUT_S`), so a dead server
  costs a caller seconds, never a hang.
- Usage rows the database could not take at shutdown are appended to a local spill file (with their ids)
  and imported later by whichever instance finds it: imports claim the file by renaming it first, so rows
  appended meanwhile land in a new file, and the ids make a repeated import harmless.

Nothing here reads the clock for the data (times are parameters); no URL with its password is ever put in a
message. Blocking I/O: a caller on an event loop runs these calls in a worker thread. One `PostgresStore` may
be shared between threads: the main connection's calls are serialised by a lock; `wait_for_change` uses a
connection of its own and is meant for one watcher thread at a time.
"""

from __future__ import annotations

import builtins
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from ..store import (
    ACTIVE_KEYS_WHERE,
    ERROR_STATUS_MIN,
    KeySql,
    SqlCursor,
    SqlStore,
    StoreBusy,
    StoreError,
    append_spill,
)
from ..usage import UsageRecord
from .stores import StoreUnavailable, redacted_url

CHANNEL = "fastgate_keys"  # LISTEN/NOTIFY channel: a key was added, revoked, rotated or imported
CONNECT_TIMEOUT_S = 3  # libpq takes whole seconds
STATEMENT_TIMEOUT_S = 10.0  # any one statement; a server that stopped answering costs at most this
TCP_USER_TIMEOUT_MS = 5000  # unacknowledged data on a dead link: give up after this (Linux)
BUSY_TIMEOUT_S = 10.0  # lock waits when the caller gives no bound
# A fixed advisory-lock number for the schema migration ("fastgate" in ASCII, as an integer).
MIGRATION_LOCK = 0x66617374676174
INSERT_CHUNK_ROWS = 5000  # usage rows per INSERT statement
CLOSE_WAIT_S = 2.0  # close() waits this long for a call in progress
LISTEN_RETRY_S = 1.0  # a LISTEN connection that cannot be made is tried again after this long

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE fastgate_keys (
            id             text PRIMARY KEY,
            user_name      text NOT NULL,
            role           text NOT NULL,
            prefix         text NOT NULL,            -- first characters of the secret, for lists
            digest         text NOT NULL UNIQUE,     -- sha256 hex of the secret, which is never stored
            models         text NOT NULL,            -- JSON array of glob patterns, [] = every model
            created_at     double precision NOT NULL,
            expires_at     double precision,
            last_used_at   double precision,
            revoked_at     double precision,
            rpm            integer,
            max_concurrent integer,
            tokens_per_day bigint
        )""",
        "CREATE TABLE fastgate_meta (name text PRIMARY KEY, value bigint NOT NULL)",
        "INSERT INTO fastgate_meta (name, value) VALUES ('revision', 0)",
        """CREATE TABLE fastgate_usage (
            id                text PRIMARY KEY,         -- chosen by the instance: makes a retried write a no-op
            at                double precision NOT NULL,
            user_name         text NOT NULL,
            key_id            text NOT NULL,            -- "" for keys from the config file
            model             text NOT NULL,
            path              text NOT NULL,
            status            integer NOT NULL,
            prompt_tokens     bigint NOT NULL,
            completion_tokens bigint NOT NULL,
            duration_ms       double precision NOT NULL,
            backend           text                      -- the [[backends]] name that served it
        )""",
        "CREATE INDEX fastgate_usage_at ON fastgate_usage (at)",
        "CREATE INDEX fastgate_usage_key_at ON fastgate_usage (key_id, at)",  # tokens_used_since()
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_PG_USAGE_GROUPS = {"user": "user_name", "model": "model", "key": "key_id", "backend": "coalesce(backend, '')"}
_INSERT_USAGE = (
    "INSERT INTO fastgate_usage (id, at, user_name, key_id, model, path, status, prompt_tokens, completion_tokens, "
    "duration_ms, backend) SELECT * FROM unnest(%s::text[], %s::float8[], %s::text[], %s::text[], %s::text[], "
    "%s::text[], %s::int[], %s::int8[], %s::int8[], %s::float8[], %s::text[]) ON CONFLICT (id) DO NOTHING")
_STAMP_LAST_USED = (
    "UPDATE fastgate_keys AS k SET last_used_at = greatest(coalesce(k.last_used_at, s.at), s.at) "
    "FROM unnest(%s::text[], %s::float8[]) AS s(id, at) WHERE k.id = s.id")


def _shut_down_socket(conn: psycopg.Connection[Any]) -> None:
    """End the connection's TCP session under a call blocked on it (from another thread)."""
    try:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        pass  # already gone


def _first_line(exc: BaseException) -> str:
    """libpq's messages run over several lines (with hints); operators get one. Passwords never appear in
    them (libpq does not echo the connection string)."""
    text = " ".join(str(exc).split("\n", 1)[0].split())
    return text or type(exc).__name__


def _usage_columns(ids: Sequence[str], rows: Sequence[UsageRecord]) -> tuple[builtins.list[Any], ...]:
    """Rows -> one array per column, for the unnest() insert (one statement and one round trip a batch)."""
    return (list(ids), [r.at for r in rows], [r.user for r in rows], [r.key_id for r in rows],
            [r.model for r in rows], [r.path for r in rows], [r.status for r in rows],
            [r.prompt_tokens for r in rows], [r.completion_tokens for r in rows], [r.duration_ms for r in rows],
            [r.backend for r in rows])


def _stamp_columns(pairs: Iterable[tuple[str, float]]) -> tuple[builtins.list[str], builtins.list[float]]:
    stamps = dict(pairs)
    return list(stamps), list(stamps.values())


class PostgresStore(SqlStore):
    """One PostgreSQL database. Open it once per process and `close()` it; see the module docstring."""

    _SQL = KeySql.spelled(keys="fastgate_keys", meta="fastgate_meta", user_column="user_name", p="%s",
                          row_lock=" FOR UPDATE")
    _USAGE_GROUP_COLUMNS = _PG_USAGE_GROUPS
    _USAGE_SUMMARY = ("SELECT {column}, count(*), sum(prompt_tokens)::int8, sum(completion_tokens)::int8, "
                      f"sum(duration_ms), count(*) FILTER (WHERE status >= {ERROR_STATUS_MIN}) FROM fastgate_usage "
                      '{where} GROUP BY {column} ORDER BY {column} COLLATE "C"')
    _PRUNE_USAGE = ("DELETE FROM fastgate_usage WHERE id IN (SELECT id FROM fastgate_usage WHERE at < %s "
                    "LIMIT %s)")
    _TOKENS_USED_SINCE = ("SELECT coalesce(sum(prompt_tokens + completion_tokens), 0)::int8 FROM fastgate_usage "
                          "WHERE key_id = %s AND at >= %s")

    def __init__(self, url: str, *, spill_file: str) -> None:
        self.url = url
        self.path = redacted_url(url)  # what messages call it (the interface's `path`)
        self.spill_file = spill_file
        self._lock = threading.Lock()
        self._db: psycopg.Connection[Any] | None = None
        self._listen: psycopg.Connection[Any] | None = None
        self._closed = threading.Event()
        try:
            self._db = self._connect()
            self._migrate()
        except StoreError:
            self.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            # autocommit: reads hold no snapshot between calls; writes say where their transaction begins.
            return psycopg.connect(
                self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name="fastgate",
                keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                tcp_user_timeout=TCP_USER_TIMEOUT_MS,
                options=f"-c statement_timeout={int(STATEMENT_TIMEOUT_S * 1000)}")
        except psycopg.Error as exc:
            raise StoreUnavailable(f"key store {self.path}: cannot connect: {_first_line(exc)}") from None

    def _conn(self) -> psycopg.Connection[Any]:
        """The main connection, made anew when the last one broke."""
        if self._closed.is_set():
            raise StoreError(f"key store {self.path}: already closed")
        if self._db is None or self._db.closed:
            self._db = self._connect()
        return self._db

    def _failed(self, exc: psycopg.Error) -> StoreError:
        """Map a psycopg error at the module edge, once; a broken connection is dropped for the next call."""
        if self._db is not None and (self._db.broken or self._db.closed):
            self._db.close()
            self._db = None
        busy = isinstance(exc, (pg_errors.LockNotAvailable, pg_errors.QueryCanceled))
        return (StoreBusy if busy else StoreError)(f"key store {self.path}: {_first_line(exc)}")

    @contextmanager
    def _transaction(self, wait_s: float | None = None) -> Iterator[psycopg.Cursor[Any]]:
        """One write transaction; `wait_s` bounds waits for row locks (StoreBusy after it)."""
        self._take_lock(wait_s)
        try:
            conn = self._conn()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    lock_ms = int(max(BUSY_TIMEOUT_S if wait_s is None else wait_s, 0.001) * 1000)
                    cur.execute(f"SET LOCAL lock_timeout = {lock_ms}")
                    yield cur
            except psycopg.Error as exc:
                raise self._failed(exc) from None
        finally:
            self._lock.release()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[tuple[Any, ...]]:
        with self._lock:
            conn = self._conn()
            try:
                return conn.execute(sql, params).fetchall()
            except psycopg.Error as exc:
                raise self._failed(exc) from None

    def _migrate(self) -> None:
        with self._lock:
            conn = self._conn()
            try:
                version = self._schema_version(conn)
                if version == SCHEMA_VERSION:  # the usual case: no lock needed
                    return
                with conn.transaction():
                    # Two instances starting on a fresh database: the second waits here, then finds it done.
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                    conn.execute("CREATE TABLE IF NOT EXISTS fastgate_schema_version (version integer NOT NULL)")
                    row = conn.execute("SELECT version FROM fastgate_schema_version").fetchone()
                    if row is None:
                        conn.execute("INSERT INTO fastgate_schema_version (version) VALUES (0)")
                        version = 0
                    else:
                        version = row[0]
                    for statement in self._pending_migrations(version, _MIGRATIONS):
                        conn.execute(statement)
                    conn.execute("UPDATE fastgate_schema_version SET version = %s", (SCHEMA_VERSION,))
            except psycopg.Error as exc:
                raise StoreError(f"key store {self.path}: cannot prepare the schema: {_first_line(exc)}") from None

    @staticmethod
    def _schema_version(conn: psycopg.Connection[Any]) -> int | None:
        row = conn.execute("SELECT to_regclass('fastgate_schema_version') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return None
        found = conn.execute("SELECT version FROM fastgate_schema_version").fetchone()
        return None if found is None else int(found[0])

    def close(self) -> None:
        self._closed.set()
        if not self._lock.acquire(timeout=CLOSE_WAIT_S):
            # A call is stuck on a server that accepts bytes but does not answer (frozen, or its disk hung):
            # the kernel acknowledges everything, so no TCP timeout ends it, and the worker thread it blocks
            # would keep the process from exiting. Shutting the socket down wakes that call with an error.
            db = self._db
            if db is not None:
                _shut_down_socket(db)
            if not self._lock.acquire(timeout=CLOSE_WAIT_S):
                return  # leave it: the process is exiting and the server drops the session itself
        try:
            if self._db is not None:
                self._db.close()
                self._db = None
        finally:
            self._lock.release()
        listen = self._listen
        if listen is not None:
            listen.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.path!r}, {'closed' if self._closed.is_set() else 'open'})"

    def _bump_revision(self, db: SqlCursor) -> None:
        super()._bump_revision(db)
        db.execute(f"NOTIFY {CHANNEL}")  # delivered at COMMIT, and only if it commits

    # -- keys -------------------------------------------------------------------------------------------

    def change_token(self) -> int:
        """The revision number: it moves with every change to the keys, made by any instance or CLI."""
        return int(self._query("SELECT value FROM fastgate_meta WHERE name = 'revision'")[0][0])

    def wait_for_change(self, timeout_s: float) -> bool:
        """Block up to `timeout_s` for a key change anywhere (LISTEN). True when one was announced, or when
        the listening connection was (re)made, since changes in between went unheard; False on timeout or
        while the server cannot be reached (then it waits LISTEN_RETRY_S at least, so a caller's loop neither
        spins nor knocks on a server that is down more than once a second)."""
        if self._closed.is_set():
            return False
        listen = self._listen
        if listen is None or listen.closed:
            try:
                listen = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                         application_name="fastgate-listen", keepalives=1, keepalives_idle=10,
                                         keepalives_interval=5, keepalives_count=3,
                                         tcp_user_timeout=TCP_USER_TIMEOUT_MS)
                listen.execute(f"LISTEN {CHANNEL}")
            except psycopg.Error:
                self._listen = None
                self._closed.wait(max(timeout_s, LISTEN_RETRY_S))
                return False
            self._listen = listen
            return True
        try:
            for _ in listen.notifies(timeout=timeout_s, stop_after=1):
                return True
        except psycopg.Error:
            listen.close()
            self._listen = None
            return True  # a refresh at once finds out whether the server is back (and catches up if so)
        return False

    @property
    def listening(self) -> bool:
        listen = self._listen
        return listen is not None and not listen.closed

    # -- usage ------------------------------------------------------------------------------------------

    def write_usage(self, rows: Iterable[UsageRecord],
                    last_used: Mapping[str, float] | Iterable[tuple[str, float]] = (), *,
                    wait_s: float | None = None, ids: Sequence[str] | None = None) -> None:
        """Usage rows and last-used stamps in one transaction. `ids` (one per row, unique across every
        instance and every time) make the write idempotent: rows whose id is already stored are skipped. Rows
        without ids get fresh random ones (then a retry of the same rows would count them again)."""
        rows = list(rows)
        if ids is None:
            ids = [uuid.uuid4().hex for _ in rows]
        elif len(ids) != len(rows):
            raise ValueError(f"{len(ids)} usage ids for {len(rows)} rows")
        pairs = last_used.items() if isinstance(last_used, Mapping) else last_used
        stamp_ids, stamp_times = _stamp_columns(pairs)
        if not rows and not stamp_ids:
            return
        with self._transaction(wait_s) as cur:
            # The backlog of an outage can be 100,000 rows: in statements of bounded size, so that none runs
            # into STATEMENT_TIMEOUT_S (which would fail the same batch again every round).
            for start in range(0, len(rows), INSERT_CHUNK_ROWS):
                cur.execute(_INSERT_USAGE, _usage_columns(ids[start:start + INSERT_CHUNK_ROWS],
                                                          rows[start:start + INSERT_CHUNK_ROWS]))
            if stamp_ids:
                cur.execute(_STAMP_LAST_USED, (stamp_ids, stamp_times))

    # -- the local spill file ---------------------------------------------------------------------------

    def spill(self, rows: Sequence[UsageRecord], ids: Sequence[str], last_used: Mapping[str, float]) -> str:
        """Append rows (with their ids) and last-used stamps the database could not take to the spill file,
        flushed to disk; `import_spill` brings them in later. Returns its path; OSError when it cannot be
        written."""
        lines = [json.dumps({"id": row_id, **asdict(row)}, separators=(",", ":")) for row_id, row in zip(ids, rows)]
        if last_used:
            lines.append(json.dumps({"last_used": dict(last_used)}, separators=(",", ":")))
        append_spill(self.spill_file, ("\n".join(lines) + "\n").encode())
        return self.spill_file

    def _spill_file_path(self) -> str:
        return self.spill_file

    def _import_spill_lines(self, lines: builtins.list[str], wait_s: float | None) -> tuple[int, int]:
        """A spill file's rows, by id: rows already stored are skipped (and not counted)."""
        by_id: dict[str, UsageRecord] = {}  # a row spilled twice (by a stop that was retried) counts once
        stamps: dict[str, float] = {}
        unreadable = 0
        for line in lines:
            try:
                item = json.loads(line)
                if "last_used" in item:
                    for key_id, at in item["last_used"].items():
                        stamps[str(key_id)] = max(float(at), stamps.get(str(key_id), float(at)))
                else:
                    row_id = str(item.pop("id"))
                    by_id[row_id] = UsageRecord(**item)
            except (ValueError, TypeError, KeyError, AttributeError):
                unreadable += 1  # a line cut short by a crash mid-write: the others are still good
        ids, rows = list(by_id), list(by_id.values())
        before = self._count_ids(ids)
        self.write_usage(rows, stamps, wait_s=wait_s, ids=ids)
        return len(rows) - before, unreadable

    def _count_ids(self, ids: Sequence[str]) -> int:
        """How many of these usage ids are stored already (to report what an import added)."""
        if not ids:
            return 0
        return int(self._query("SELECT count(*) FROM fastgate_usage WHERE id = ANY(%s)", (list(ids),))[0][0])


def count_active_keys(url: str, now: float) -> int | None:
    """Active keys in the database at `url`, read without creating or migrating anything (for
    `check-config`); None when fastgate's tables are not there yet. StoreError when it cannot be read."""
    where = redacted_url(url)
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                             application_name="fastgate") as conn:
            found = conn.execute("SELECT to_regclass('fastgate_keys') IS NOT NULL").fetchone()
            if not found or not found[0]:
                return None
            row = conn.execute(f"SELECT count(*) FROM fastgate_keys WHERE {ACTIVE_KEYS_WHERE.format(p='%s')}",
                               (now,)).fetchone()
            return int(row[0]) if row else 0
    except psycopg.Error as exc:
        raise StoreError(f"key store {where}: cannot read: {_first_line(exc)}") from None
