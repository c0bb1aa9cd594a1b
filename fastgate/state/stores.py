"""The key store behind one interface, whichever engine holds it: `Store`, and `open_store` that picks one.

`[store] path` is a SQLite file on this machine (`fastgate.store.KeyStore`); `[store] url` is a PostgreSQL
database that every instance shares (`fastgate.state.postgres_store.PostgresStore`, imported only then, so
the core install never needs psycopg). `fastgate keys`, `fastgate usage` and the running proxy's sync
(`fastgate.managed`) speak only this interface.

Every method blocks (file or network I/O): a caller on an event loop runs them in a worker thread.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from ..store import KeyRecord, KeyStore, StoreError, UsageSummary
from ..usage import UsageRecord

if TYPE_CHECKING:
    from ..config import Config, StoreConfig

# The file a PostgreSQL-backed instance saves usage rows to when the database cannot take them at shutdown
# (or while the in-memory buffer is full); the next start imports it. See pg_spill_file for where.
PG_SPILL_FILE = "fastgate-usage.spill.jsonl"


class Store(Protocol):
    """What fastgate asks of a key store. Errors are `StoreError` (its message is for the operator and never
    holds a secret or a password); `StoreBusy` when a bounded wait for a lock ran out."""

    path: str  # where it is, for messages: the SQLite file, or the database URL without its password

    def close(self) -> None: ...

    def add(self, user: str, *, role: str = "user", models: Iterable[str] = (), expires_at: float | None = None,
            rpm: int | None = None, max_concurrent: int | None = None, tokens_per_day: int | None = None,
            now: float) -> tuple[KeyRecord, str]: ...

    def list(self, include_revoked: bool = False) -> builtins.list[KeyRecord]: ...

    def get(self, key_id: str) -> KeyRecord: ...

    def revoke(self, key_id: str, now: float) -> KeyRecord: ...

    def rotate(self, key_id: str, now: float) -> tuple[KeyRecord, str]: ...

    def import_digests(self, entries: Sequence[tuple[str, str, str]], *, role: str,
                       now: float) -> builtins.list[tuple[KeyRecord, bool]]: ...

    def active_by_digest(self, now: float) -> dict[bytes, KeyRecord]: ...

    def change_token(self) -> int: ...

    def touch_last_used(self, ids_with_times: Mapping[str, float] | Iterable[tuple[str, float]]) -> None: ...

    def record_usage(self, rows: Iterable[UsageRecord]) -> None: ...

    def write_usage(self, rows: Iterable[UsageRecord],
                    last_used: Mapping[str, float] | Iterable[tuple[str, float]] = (), *,
                    wait_s: float | None = None, ids: Sequence[str] | None = None) -> None:
        """`ids`: one per row, unique across instances and time. A shared store skips rows whose id it holds,
        so a batch retried after an unclear failure never counts twice."""

    def import_spill(self, wait_s: float | None = None) -> tuple[int, int]: ...

    def usage(self, since: float | None = None, by: str = "user") -> builtins.list[UsageSummary]: ...

    def prune_usage(self, before: float, limit: int = ..., wait_s: float | None = None) -> int: ...

    def tokens_used_since(self, key_id: str, since: float) -> int: ...


def redacted_url(url: str) -> str:
    """A store URL without its password or query (which may also hold one): safe for logs, messages and the
    start line. Cut at the value's last '@', not urlsplit's netloc: an unencoded '/', '?' or '#' in a password
    ends the netloc early and would leave the password in it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, tail = rest.rpartition("@")
    where = (tail if at else rest).partition("#")[0].partition("?")[0]
    user = f"{userinfo.partition(':')[0]}@" if at and userinfo.partition(":")[0] else ""
    return f"{scheme}://{user}{where}" if scheme else f"{user}{where}"


class StoreUnavailable(StoreError):
    """The store's server cannot be reached (down, unreachable, refusing this login): not a config error, and
    trying again later may work."""


def pg_spill_file(config_source: str, environ: Mapping[str, str] = os.environ) -> str:
    """Where a PostgreSQL-backed instance spills usage: in systemd's StateDirectory= when it runs as a unit
    ($STATE_DIRECTORY: the config's directory is read-only to the service there), else next to its config file
    (the working directory when it runs on defaults)."""
    state_dir = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state_dir:
        base = state_dir
    else:
        base = os.path.dirname(os.path.abspath(config_source)) if config_source else os.getcwd()
    return os.path.join(base, PG_SPILL_FILE)


def open_store_at(*, path: str = "", url: str = "", spill_file: str = "") -> Store:
    """Open the store named by `[store] path` or `url` (exactly one of them set). StoreError when it cannot be
    opened, or when url is set and psycopg is not installed."""
    if path and url:
        raise StoreError("store.path and store.url: set one of them")
    if url:
        try:
            from .postgres_store import PostgresStore
        except ImportError as exc:
            raise StoreError(f"[store] url needs psycopg 3: pip install 'fastgate[postgres]' ({exc})") from None
        return PostgresStore(url, spill_file=spill_file or pg_spill_file(""))
    if not path:
        raise StoreError("no key store configured: set [store] path or url in the config file")
    return KeyStore(path)


def open_store(config: Config) -> Store:
    """The store the config names ([store] path or url)."""
    store: StoreConfig = config.store
    return open_store_at(path=store.path, url=store.url, spill_file=pg_spill_file(config.source))
