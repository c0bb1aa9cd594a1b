"""The key store and usage ledger: one SQLite file shared by `fastgate serve` and the `fastgate keys` CLI.

Owns the schema, key creation (the secret is returned once and only its SHA-256 digest is kept), revocation,
rotation, usage accounting and the cheap change check a running proxy polls to reload its keys.

Invariants:
- No secret is ever written to the file: keys are stored as `sha256(secret)` plus a short display prefix.
- Every change to the keys table bumps the `revision` row in the same transaction, so `change_token()` moves
  exactly when the key set may have changed (usage writes and last-used stamps do not move it).
- Several processes may read and write at once: WAL mode lets readers run beside a writer, every write
  transaction takes the write lock up front (`BEGIN IMMEDIATE`) and waits up to `BUSY_TIMEOUT_S` for it, so
  nobody sees "database is locked" under ordinary contention.
- Time is always a parameter; nothing here reads the clock.
- Usage rows a proxy could not write (the write lock held past its shutdown grace) are appended to a spill
  file next to the store (`spill_usage`) and imported once (`import_spill`): each spilled batch is recorded in
  `meta` in the same transaction as its rows, so an import cut short is never counted twice.

Blocking I/O (file access, fsync, lock waits): a caller on an event loop runs these calls in a worker thread.
A `KeyStore` may be shared between threads; its calls are serialised by a lock.

What this store does the same way as the PostgreSQL one (`fastgate.state.postgres_store`) is written once, in
`SqlStore` and `KeySql`: each engine supplies its SQL spelling and its connections, transactions and writes.
"""

from __future__ import annotations

import builtins
import fcntl
import glob
import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol
from urllib.parse import quote

if TYPE_CHECKING:  # typing.Self is 3.11+; only the type checker needs it
    from typing_extensions import Self

from .usage import UsageRecord

SECRET_PREFIX = "fg_"
SECRET_BYTES = 32  # 256 bits of entropy from `secrets`
DISPLAY_PREFIX_CHARS = len(SECRET_PREFIX) + 4  # "fg_ab12": enough to tell keys apart, too little to guess
BUSY_TIMEOUT_S = 10.0
SPILL_SUFFIX = ".usage-spill.jsonl"  # next to the store: usage rows waiting to be imported
SPILL_CLAIM_MARK = ".importing-"  # a spill file an import has claimed: `<spill>.importing-<random>`
_USAGE_COLUMNS = ("at", "user", "key_id", "model", "path", "status", "prompt_tokens", "completion_tokens",
                  "duration_ms", "backend")
PRUNE_BATCH_ROWS = 10_000  # usage rows deleted per transaction (see prune_usage)
ROLES = ("user", "admin")
USAGE_GROUPS = {"user": "user", "model": "model", "key": "key_id", "backend": "backend"}  # --by value -> column
ERROR_STATUS_MIN = 400
ACTIVE_KEYS_WHERE = "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > {p})"  # {p}: the placeholder

# Schema migrations, applied in order; PRAGMA user_version records how many have run. Append, never edit.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE keys (
            id             TEXT PRIMARY KEY,
            user           TEXT NOT NULL,
            role           TEXT NOT NULL,
            prefix         TEXT NOT NULL,          -- first characters of the secret, for lists
            digest         TEXT NOT NULL UNIQUE,   -- sha256 hex of the secret, which is never stored
            models         TEXT NOT NULL,          -- JSON array of glob patterns, [] = every model
            created_at     REAL NOT NULL,
            expires_at     REAL,
            last_used_at   REAL,
            revoked_at     REAL,
            rpm            INTEGER,
            max_concurrent INTEGER,
            tokens_per_day INTEGER
        )""",
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO meta (name, value) VALUES ('revision', 0)",
        """CREATE TABLE usage (
            at                REAL NOT NULL,
            user              TEXT NOT NULL,
            key_id            TEXT NOT NULL,       -- "" (or a label) for keys from the config file
            model             TEXT NOT NULL,
            path              TEXT NOT NULL,
            status            INTEGER NOT NULL,
            prompt_tokens     INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            duration_ms       REAL NOT NULL
        )""",
        "CREATE INDEX usage_at ON usage (at)",
        "CREATE INDEX usage_key_at ON usage (key_id, at)",  # tokens_used_since()
    ),
    (
        # Several backends (issue 9): the [[backends]] name that served the request; "" for rows written
        # before this column existed and for requests no backend was chosen for.
        "ALTER TABLE usage ADD COLUMN backend TEXT NOT NULL DEFAULT ''",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_GLOB = re.compile(r"[^\s,]+")


class StoreError(Exception):
    """A key-store operation failed; the message is meant for the operator (it never holds a secret)."""


class StoreBusy(StoreError):
    """The write lock stayed with another connection for longer than the caller was willing to wait."""


FileId = tuple[int, int]  # (st_dev, st_ino)


def file_id(path: str) -> FileId | None:
    """Which file is at `path` now, None when there is none. Compared with `KeyStore.file_id`, it tells a store
    file that was replaced (moved over, restored from a backup) or deleted while open. Other OSErrors raise."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def spill_path(store_path: str) -> str:
    return store_path + SPILL_SUFFIX


def spill_usage(store_path: str, rows: Sequence[UsageRecord], last_used: Mapping[str, float], batch: str) -> str:
    """Append usage rows (and last-used stamps) the store could not take to the spill file next to it, flushed
    to disk; `KeyStore.import_spill` brings them in later. `batch` must be unique (it makes the import
    idempotent). Returns the spill file's path; raises OSError when it cannot be written."""
    path = spill_path(store_path)
    lines = [json.dumps({"batch": batch, **asdict(row)}, separators=(",", ":")) for row in rows]
    if last_used:
        lines.append(json.dumps({"batch": batch, "last_used": dict(last_used)}, separators=(",", ":")))
    append_spill(path, ("\n".join(lines) + "\n").encode())
    return path


def append_spill(path: str, data: bytes) -> None:
    """Append `data` to the spill file at `path`, flushed to disk, under an exclusive lock. Several processes
    (workers, instances on one machine) append to one spill file while another imports it: the importer
    renames the file before reading (`claim_spills`), so a writer that opened the old name re-opens the new
    one rather than writing into a file that has already been read."""
    while True:
        # Private to its owner, like the store: usage rows say who ran what.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                continue
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                continue  # claimed by an import after we opened it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            return
        finally:
            os.close(fd)


def claim_spills(path: str) -> builtins.list[str]:
    """Rename the spill file at `path` to a name of this import's own, and return every claimed spill file
    (this one and any an earlier import claimed but did not finish), oldest claim first."""
    claimed = f"{path}{SPILL_CLAIM_MARK}{secrets.token_hex(8)}"
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StoreError(f"usage spill {path}: cannot claim it: {exc.strerror}") from None
    found = glob.glob(glob.escape(path) + SPILL_CLAIM_MARK + "*")
    return sorted(found, key=lambda name: (_mtime(name), name))


def read_claimed_spill(path: str) -> builtins.list[str] | None:
    """The lines of a claimed spill file, None when another import took it meanwhile. Waits for a writer that
    opened it before it was claimed to finish (the lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"usage spill {path}: cannot read: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    finally:
        os.close(fd)


def remove_claimed_spill(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StoreError(f"usage spill {path}: imported, but cannot remove it: {exc.strerror}") from None


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def count_active_keys(path: str, now: float) -> int | None:
    """Active keys in the store at `path`, read without creating, migrating or writing anything (for
    `check-config`); None when there is no file there yet. StoreError when it cannot be read."""
    if not os.path.exists(path):
        return None
    try:
        with closing(sqlite3.connect(f"file://{quote(os.path.abspath(path))}?mode=ro", uri=True,
                                     timeout=BUSY_TIMEOUT_S)) as db:
            return int(db.execute(f"SELECT count(*) FROM keys WHERE {ACTIVE_KEYS_WHERE.format(p='?')}",
                                  (now,)).fetchone()[0])
    except sqlite3.Error as exc:
        raise StoreError(f"key store {path}: cannot read: {exc}") from None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    user: str
    role: str
    prefix: str
    digest: str  # sha256 hex of the secret
    models: tuple[str, ...]  # glob patterns; empty = every model
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    revoked: bool
    rpm: int | None
    max_concurrent: int | None
    tokens_per_day: int | None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def status(self, now: float) -> str:
        return "revoked" if self.revoked else "expired" if self.expired(now) else "active"


# One finished request, as the proxy records it (the proxy's record is the row: one type, not two).
UsageRow = UsageRecord


@dataclass(frozen=True, slots=True)
class UsageSummary:
    group: str  # the user, model or key id the row sums up
    requests: int
    prompt_tokens: int
    completion_tokens: int
    duration_ms: float
    errors: int  # requests answered with status >= 400

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def secret_digest(secret: str) -> str:
    """sha256 hex of a key, as stored and as `"sha256:<hex>"` values in the config's [keys] table use it."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret() -> str:
    """A fresh API key: `fg_` and 256 random bits (what `keys add` and `fastgate init` hand out)."""
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def _validate(user: str, role: str, models: Iterable[str], limits: Mapping[str, int | None]) -> tuple[str, ...]:
    if not user or user != user.strip() or not user.isprintable():
        raise StoreError(f"user name must be non-empty printable text without surrounding spaces, got {user!r}")
    if role not in ROLES:
        raise StoreError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if isinstance(models, str):
        raise StoreError(f"models: expected a sequence of patterns, got the string {models!r}")
    patterns = tuple(models)
    for pattern in patterns:
        if not isinstance(pattern, str) or not _GLOB.fullmatch(pattern):
            raise StoreError(f"model patterns must be non-empty, without spaces or commas, got {pattern!r}")
    for name, value in limits.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise StoreError(f"{name} must be a whole number >= 1 or unset, got {value!r}")
    return patterns


def _record(row: tuple[Any, ...]) -> KeyRecord:
    (id_, user, role, prefix, digest, models, created_at, expires_at, last_used_at, revoked_at,
     rpm, max_concurrent, tokens_per_day) = row
    return KeyRecord(id_, user, role, prefix, digest, tuple(json.loads(models)), created_at, expires_at,
                     last_used_at, revoked_at is not None, rpm, max_concurrent, tokens_per_day)


def _no_such_key(key_id: str) -> StoreError:
    return StoreError(f"no key with id {key_id!r} (see `fastgate keys list --all`)")


@dataclass(frozen=True, slots=True)
class KeySql:
    """The statements both engines run on their keys and meta tables, in one engine's spelling (table and
    column names, placeholder, row lock); `SqlStore` holds the logic around them. Keys are selected in
    `_record`'s column order."""

    list_all: str
    list_unrevoked: str
    get: str
    active: str  # keys neither revoked nor expired at the time given
    key_exists: str
    revoked_at: str  # takes the row lock where the engine has one: a rotation reads the row, then writes it
    id_by_digest: str
    insert_key: str
    insert_digest: str
    revoke: str
    rotate: str
    bump_revision: str
    since: str  # usage(): the rows at or after a time

    @classmethod
    def spelled(cls, *, keys: str, meta: str, user_column: str, p: str, row_lock: str = "") -> KeySql:
        columns = (f"id, {user_column}, role, prefix, digest, models, created_at, expires_at, last_used_at, "
                   "revoked_at, rpm, max_concurrent, tokens_per_day")
        select = f"SELECT {columns} FROM {keys}"
        return cls(
            list_all=f"{select}  ORDER BY created_at, id",
            list_unrevoked=f"{select} WHERE revoked_at IS NULL ORDER BY created_at, id",
            get=f"{select} WHERE id = {p}",
            active=f"{select} WHERE {ACTIVE_KEYS_WHERE.format(p=p)}",
            key_exists=f"SELECT 1 FROM {keys} WHERE id = {p}",
            revoked_at=f"SELECT revoked_at FROM {keys} WHERE id = {p}{row_lock}",
            id_by_digest=f"SELECT id FROM {keys} WHERE digest = {p}",
            insert_key=(f"INSERT INTO {keys} ({columns}) VALUES ({', '.join([p] * 8)}, NULL, NULL, "
                        f"{', '.join([p] * 3)})"),
            insert_digest=(f"INSERT INTO {keys} ({columns}) VALUES ({', '.join([p] * 5)}, '[]', {p}, "
                           "NULL, NULL, NULL, NULL, NULL, NULL)"),
            revoke=f"UPDATE {keys} SET revoked_at = {p} WHERE id = {p} AND revoked_at IS NULL",
            rotate=f"UPDATE {keys} SET prefix = {p}, digest = {p} WHERE id = {p}",
            bump_revision=f"UPDATE {meta} SET value = value + 1 WHERE name = 'revision'",
            since=f"WHERE at >= {p}",
        )


class SqlResult(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...


class SqlCursor(Protocol):
    """What a write transaction hands the shared code: a sqlite3.Connection or a psycopg cursor."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> SqlResult: ...


class SqlStore(ABC):
    """What the SQLite `KeyStore` and `fastgate.state.postgres_store.PostgresStore` do the same way: validation,
    key ids and secrets, the key statements (`KeySql`), records, usage summaries, pruning, the spill file
    import loop and every message. Each engine keeps what differs: connections, transactions and their lock
    waits, migrations, the change token, how usage rows are written and how a spill file's lines are read."""

    path: str  # for messages: the file, or the URL without its password
    _lock: threading.Lock  # serialises this object's calls on its connection
    _SQL: ClassVar[KeySql]
    _USAGE_GROUP_COLUMNS: ClassVar[Mapping[str, str]]  # `by` (a USAGE_GROUPS key) -> the expression grouped by
    # group, requests, prompt and completion tokens, duration, errors; formatted with {column} and {where}
    _USAGE_SUMMARY: ClassVar[str]
    _PRUNE_USAGE: ClassVar[str]  # params (before, limit)
    _TOKENS_USED_SINCE: ClassVar[str]  # params (key_id, since)

    # -- what each engine provides ----------------------------------------------------------------------

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def _transaction(self, wait_s: float | None = None) -> AbstractContextManager[SqlCursor]: ...

    @abstractmethod
    def _query(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[tuple[Any, ...]]: ...

    @abstractmethod
    def write_usage(self, rows: Iterable[UsageRow],
                    last_used: Mapping[str, float] | Iterable[tuple[str, float]] = (), *,
                    wait_s: float | None = None, ids: Sequence[str] | None = None) -> None: ...

    @abstractmethod
    def _spill_file_path(self) -> str: ...

    @abstractmethod
    def _import_spill_lines(self, lines: builtins.list[str], wait_s: float | None) -> tuple[int, int]: ...

    # -- plumbing ---------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_lock(self, wait_s: float | None) -> None:
        """This object's lock, waiting at most `wait_s` (for ever when None); StoreBusy when that runs out."""
        if not self._lock.acquire(timeout=-1 if wait_s is None else max(wait_s, 0.0)):
            raise StoreBusy(f"key store {self.path}: busy (another call in this process is waiting for it)")

    def _pending_migrations(self, version: int, migrations: Sequence[Sequence[str]]) -> builtins.list[str]:
        """The statements that bring a schema at `version` up to date; StoreError when it is newer than this
        fastgate knows."""
        if version > len(migrations):
            raise StoreError(f"key store {self.path}: schema version {version} is newer than this "
                             f"fastgate understands ({len(migrations)}); upgrade fastgate")
        return [statement for migration in migrations[version:] for statement in migration]

    def _bump_revision(self, db: SqlCursor) -> None:
        db.execute(self._SQL.bump_revision)

    def _new_key_id(self, db: SqlCursor) -> str:
        while True:
            key_id = "k_" + secrets.token_hex(4)
            if db.execute(self._SQL.key_exists, (key_id,)).fetchone() is None:
                return key_id

    # -- keys -------------------------------------------------------------------------------------------

    def add(self, user: str, *, role: str = "user", models: Iterable[str] = (), expires_at: float | None = None,
            rpm: int | None = None, max_concurrent: int | None = None, tokens_per_day: int | None = None,
            now: float) -> tuple[KeyRecord, str]:
        """Create a key. Returns its record and the secret, which exists only in this return value."""
        patterns = _validate(user, role, models,
                             {"rpm": rpm, "max_concurrent": max_concurrent, "tokens_per_day": tokens_per_day})
        secret = new_secret()
        with self._transaction() as db:
            key_id = self._new_key_id(db)
            db.execute(self._SQL.insert_key,
                       (key_id, user, role, secret[:DISPLAY_PREFIX_CHARS], secret_digest(secret),
                        json.dumps(patterns), now, expires_at, rpm, max_concurrent, tokens_per_day))
            self._bump_revision(db)
        return self.get(key_id), secret

    def list(self, include_revoked: bool = False) -> builtins.list[KeyRecord]:
        return [_record(row) for row in self._query(self._SQL.list_all if include_revoked
                                                    else self._SQL.list_unrevoked)]

    def get(self, key_id: str) -> KeyRecord:
        rows = self._query(self._SQL.get, (key_id,))
        if not rows:
            raise _no_such_key(key_id)
        return _record(rows[0])

    def revoke(self, key_id: str, now: float) -> KeyRecord:
        """Revoke a key for good. Revoking a revoked key changes nothing."""
        with self._transaction() as db:
            if db.execute(self._SQL.key_exists, (key_id,)).fetchone() is None:
                raise _no_such_key(key_id)
            if db.execute(self._SQL.revoke, (now, key_id)).rowcount:
                self._bump_revision(db)
        return self.get(key_id)

    def rotate(self, key_id: str, now: float) -> tuple[KeyRecord, str]:
        """Give a key a new secret; id, user, role, models, limits and expiry stay. The old secret stops working.

        `now` is unused today but kept so every mutation has the same shape (and a rotation time can be stored
        without changing callers).
        """
        secret = new_secret()
        with self._transaction() as db:
            row = db.execute(self._SQL.revoked_at, (key_id,)).fetchone()
            if row is None:
                raise _no_such_key(key_id)
            if row[0] is not None:
                raise StoreError(f"key {key_id} is revoked; add a new key instead")
            db.execute(self._SQL.rotate, (secret[:DISPLAY_PREFIX_CHARS], secret_digest(secret), key_id))
            self._bump_revision(db)
        return self.get(key_id), secret

    def import_digests(self, entries: Sequence[tuple[str, str, str]], *, role: str,
                       now: float) -> builtins.list[tuple[KeyRecord, bool]]:
        """Add keys known only by digest (the config file's [keys]), all in one transaction. `entries` are
        (sha256 hex, display prefix, user). A digest the store already holds, revoked or not, is left as it is:
        importing twice adds nothing, and a revoked key is never brought back. Returns, per entry, its record
        and whether it was added now."""
        checked = []
        for digest, prefix, user in entries:
            _validate(user, role, (), {})
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise StoreError(f"expected a sha256 hex digest, got {len(digest)} characters")
            checked.append((digest, prefix, user))
        added: builtins.list[tuple[str, bool]] = []
        with self._transaction() as db:
            for digest, prefix, user in checked:
                row = db.execute(self._SQL.id_by_digest, (digest,)).fetchone()
                if row is not None:
                    added.append((row[0], False))
                    continue
                key_id = self._new_key_id(db)
                db.execute(self._SQL.insert_digest, (key_id, user, role, prefix, digest, now))
                added.append((key_id, True))
            if any(new for _, new in added):
                self._bump_revision(db)
        return [(self.get(key_id), new) for key_id, new in added]

    def active_by_digest(self, now: float) -> dict[bytes, KeyRecord]:
        """The keys a proxy should accept, by raw SHA-256 digest (what `keys.KeyRing` hashes a presented key to).

        Keys expiring later are included: the caller checks `record.expired(now)` per request, since a key can
        expire between two reloads without the store changing.
        """
        rows = self._query(self._SQL.active, (now,))
        return {bytes.fromhex(record.digest): record for record in map(_record, rows)}

    def touch_last_used(self, ids_with_times: Mapping[str, float] | Iterable[tuple[str, float]]) -> None:
        """Stamp last use for many keys in one transaction. Times never move backwards; unknown ids are ignored
        (a key may have been deleted since the proxy saw it). Does not move `change_token()`."""
        self.write_usage((), ids_with_times)

    # -- usage ------------------------------------------------------------------------------------------

    def record_usage(self, rows: Iterable[UsageRow]) -> None:
        """Append a batch of usage rows in one transaction (one fsync for the batch, never one per request)."""
        self.write_usage(rows, ())

    def import_spill(self, wait_s: float | None = None) -> tuple[int, int]:
        """Bring in the usage rows spilled next to the store (and any an earlier import claimed but did not
        finish), then remove the spill file. Returns (rows imported, unreadable lines skipped); rows an earlier
        import already brought in are skipped."""
        imported = unreadable = 0
        for claimed in claim_spills(self._spill_file_path()):
            lines = read_claimed_spill(claimed)
            if lines is None:
                continue  # another process or instance imported it meanwhile
            done, bad = self._import_spill_lines(lines, wait_s)
            remove_claimed_spill(claimed)
            imported += done
            unreadable += bad
        return imported, unreadable

    def usage(self, since: float | None = None, by: str = "user") -> builtins.list[UsageSummary]:
        """Totals per user, model, key id or backend (`by`), for rows at or after `since`, ordered by group."""
        column = self._USAGE_GROUP_COLUMNS.get(by)
        if column is None:
            raise StoreError(f"usage: cannot group by {by!r} (choose from {', '.join(USAGE_GROUPS)})")
        where, params = (self._SQL.since, (since,)) if since is not None else ("", ())
        rows = self._query(self._USAGE_SUMMARY.format(column=column, where=where), params)
        return [UsageSummary(group, int(n), int(p), int(c), float(d), int(e)) for group, n, p, c, d, e in rows]

    def prune_usage(self, before: float, limit: int = PRUNE_BATCH_ROWS, wait_s: float | None = None) -> int:
        """Delete up to `limit` usage rows recorded before `before` (epoch seconds) in one transaction; returns
        how many went. Callers repeat while it returns `limit`: a bounded batch holds the write lock briefly,
        so a proxy's usage writes and the CLI never wait behind one huge delete."""
        with self._transaction(wait_s) as db:
            return db.execute(self._PRUNE_USAGE, (before, limit)).rowcount

    def tokens_used_since(self, key_id: str, since: float) -> int:
        """Prompt plus completion tokens a key used at or after `since` (for a tokens-per-day limit)."""
        return int(self._query(self._TOKENS_USED_SINCE, (key_id, since))[0][0])


class KeyStore(SqlStore):
    """One SQLite file. Open it once per process and `close()` it; see the module docstring for the rules."""

    _SQL = KeySql.spelled(keys="keys", meta="meta", user_column="user", p="?")
    _USAGE_GROUP_COLUMNS = USAGE_GROUPS
    _USAGE_SUMMARY = ("SELECT {column}, count(*), sum(prompt_tokens), sum(completion_tokens), sum(duration_ms), "
                      f"sum(status >= {ERROR_STATUS_MIN}) FROM usage {{where}} GROUP BY {{column}} "
                      "ORDER BY {column}")
    _PRUNE_USAGE = "DELETE FROM usage WHERE rowid IN (SELECT rowid FROM usage WHERE at < ? LIMIT ?)"
    _TOKENS_USED_SINCE = ("SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM usage "
                          "WHERE key_id = ? AND at >= ?")

    def __init__(self, path: str) -> None:
        if not path or path == ":memory:" or path.startswith("file:"):
            raise StoreError(f"key store: expected a file path, got {path!r}")
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._watch: sqlite3.Connection | None = None
        self._seen_data_version: int | None = None
        self._revision = 0
        self.file_id: FileId | None = None
        try:
            if not os.path.exists(path):
                # Usage rows say who ran what: create the file private to its owner (the WAL and shm files
                # SQLite adds inherit these permissions).
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._db = self._connect()
            self._db.execute("PRAGMA journal_mode = WAL")
            self._migrate()
            # PRAGMA data_version only moves for commits made by *other* connections, so change_token() asks a
            # connection of its own that never writes: then every write, from this process or another, shows.
            self._watch = self._connect()
            # The file these connections have open, to tell later whether the path still names it.
            self.file_id = file_id(path)
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise StoreError(f"key store {path}: cannot open: {exc}") from None
        except StoreError:
            self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions, so reads never hold a snapshot open between calls
        # and writes say where their transaction begins. timeout is SQLite's busy_timeout. mode=rw: the file
        # was created above if it had to be; one deleted in between is an error, never a new empty store.
        return sqlite3.connect(f"file://{quote(os.path.abspath(self.path))}?mode=rw", uri=True,
                               timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)

    def _migrate(self) -> None:
        # Up to date (the usual case): no need for the write lock, which another process may hold for a while.
        if self._conn().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        with self._transaction() as db:
            # Checked inside the write lock: two processes opening a fresh file migrate it once.
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for statement in self._pending_migrations(version, _MIGRATIONS):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            for conn in (self._db, self._watch):
                if conn is not None:
                    conn.close()
            self._db = self._watch = None

    def __repr__(self) -> str:
        return f"KeyStore({self.path!r}, {'open' if self._db is not None else 'closed'})"

    # -- plumbing ---------------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"key store {self.path}: already closed")
        return self._db

    @contextmanager
    def _transaction(self, wait_s: float | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock first, so waiting for it goes through the busy
        timeout; a deferred transaction that upgrades to a writer can fail at once with SQLITE_BUSY in WAL.
        `wait_s` bounds the wait for the lock (BUSY_TIMEOUT_S otherwise); StoreBusy when it runs out."""
        self._take_lock(wait_s)
        try:
            db = self._conn()
            try:
                if wait_s is not None:
                    db.execute(f"PRAGMA busy_timeout = {int(max(wait_s, 0.0) * 1000)}")
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                busy = (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY
                raise (StoreBusy if busy else StoreError)(f"key store {self.path}: {exc}") from None
            finally:
                if wait_s is not None:
                    db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        finally:
            self._lock.release()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._conn().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"key store {self.path}: {exc}") from None

    # -- keys -------------------------------------------------------------------------------------------

    def change_token(self) -> int:
        """A number that changes whenever the key set may have changed, in any process. Cheap enough to call
        every second: it reads the revision row only after SQLite says some other connection committed."""
        with self._lock:
            if self._watch is None:
                raise StoreError(f"key store {self.path}: already closed")
            try:
                data_version = self._watch.execute("PRAGMA data_version").fetchone()[0]
                if data_version != self._seen_data_version:
                    self._revision = self._watch.execute(
                        "SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
                    self._seen_data_version = data_version
            except sqlite3.Error as exc:
                raise StoreError(f"key store {self.path}: {exc}") from None
            return self._revision

    @staticmethod
    def _stamp_last_used(db: sqlite3.Connection, params: builtins.list[tuple[float, str]]) -> None:
        db.executemany("UPDATE keys SET last_used_at = max(coalesce(last_used_at, ?1), ?1) WHERE id = ?2", params)

    # -- usage ------------------------------------------------------------------------------------------

    def write_usage(self, rows: Iterable[UsageRow],
                    last_used: Mapping[str, float] | Iterable[tuple[str, float]] = (), *,
                    wait_s: float | None = None, ids: Sequence[str] | None = None) -> None:
        """Usage rows and last-used stamps in one transaction: one wait for the lock, one fsync. `wait_s` bounds
        the wait for the write lock (StoreBusy after it). `ids` (the shared store's per-row ids, see
        fastgate.state.stores) are not kept: a local file's transaction commits or not, never "maybe"."""
        pairs = last_used.items() if isinstance(last_used, Mapping) else last_used
        stamps = [(at, key_id) for key_id, at in pairs]
        params = [self._usage_params(r) for r in rows]
        if not params and not stamps:
            return
        with self._transaction(wait_s) as db:
            if params:
                self._insert_usage(db, params)
            if stamps:
                self._stamp_last_used(db, stamps)

    @staticmethod
    def _usage_params(r: UsageRow) -> tuple[Any, ...]:
        return (r.at, r.user, r.key_id, r.model, r.path, r.status, r.prompt_tokens, r.completion_tokens,
                r.duration_ms, r.backend)

    @staticmethod
    def _insert_usage(db: sqlite3.Connection, params: builtins.list[tuple[Any, ...]]) -> None:
        db.executemany(f"INSERT INTO usage ({', '.join(_USAGE_COLUMNS)}) "
                       f"VALUES ({', '.join('?' * len(_USAGE_COLUMNS))})", params)

    def _spill_file_path(self) -> str:
        return spill_path(self.path)

    def _import_spill_lines(self, lines: builtins.list[str], wait_s: float | None) -> tuple[int, int]:
        """A spill file's batches (see `spill_usage`). A batch already imported (the file outlived an earlier
        import) is skipped: its id went into `meta` with its rows."""
        batches: dict[str, tuple[builtins.list[tuple[Any, ...]], builtins.list[tuple[float, str]]]] = {}
        unreadable = 0
        for line in lines:
            try:
                item = json.loads(line)
                batch = str(item.pop("batch"))
                rows, stamps = batches.setdefault(batch, ([], []))
                if "last_used" in item:
                    stamps.extend((float(at), str(key_id)) for key_id, at in item["last_used"].items())
                else:
                    rows.append(self._usage_params(UsageRow(**item)))
            except (ValueError, TypeError, KeyError, AttributeError):
                unreadable += 1  # a line cut short by a crash mid-write: the others are still good
        imported = 0
        with self._transaction(wait_s) as db:
            for batch, (rows, stamps) in batches.items():
                marker = f"spill:{batch}"
                if db.execute("SELECT 1 FROM meta WHERE name = ?", (marker,)).fetchone() is not None:
                    continue
                if rows:
                    self._insert_usage(db, rows)
                if stamps:
                    self._stamp_last_used(db, stamps)
                db.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (marker, len(rows)))
                imported += len(rows)
        return imported, unreadable
