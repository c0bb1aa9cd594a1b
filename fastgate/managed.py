"""The running proxy's side of the key store: keys in, usage out, off the request path.

Every second it asks the store whether keys changed (a cheap revision check) and, if so, swaps the gate's
managed keys; usage records and last-used times collect in memory and go to the store in one transaction
per second. SQLite calls run in a worker thread so a slow disk or a CLI writer holding the lock never
stalls the event loop.

The store file itself is watched too (its device and inode, once a second): a file moved over it or restored
from a backup is reopened and its keys replace the ones loaded before; a deleted one leaves the last keys in
force and is reported loudly until a file is back (see `_check_file` for why). At shutdown the last usage
rows wait for the store's write lock only within the shutdown grace; rows it cannot take are spilled to a
file next to the store, which the next start imports.

With `[store] usage_retention_days`, usage rows older than that are deleted in the first round after start and
then once a day, in bounded batches on the worker thread (the write lock is never held for long).

With a PostgreSQL store (`[store] url`), shared by every instance: there is no file to watch; a watcher waits
on the database's key-change notifications (LISTEN) and wakes the sync at once, so a revocation made anywhere
applies here in well under a second, while the revision check of every round stays as the safety net. Every
usage row gets an id when it is recorded (this instance's random id and a sequence number) and keeps it through
retries and spills, so a batch written twice counts once. While the database is down the last keys stay in
force and rows wait in memory; at MAX_PENDING_ROWS the oldest tenth goes to the local spill file (imported when
the database is back) and only rows that cannot even be spilled are dropped (counted in /metrics).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace

from .access import Principal, Role
from .gate import Gate
from .limits import DAY_S
from .logs import log
from .metrics import Metrics
from .store import (
    BUSY_TIMEOUT_S, PRUNE_BATCH_ROWS, FileId, KeyRecord, KeyStore, StoreBusy, StoreError, file_id, spill_path,
    spill_usage,
)
from .state.stores import Store
from .usage import UsageRecord

POLL_S = 1.0
MAX_PENDING_ROWS = 100_000  # if the store is unwritable for long, drop the oldest rather than grow
# A periodic write waits this long for the store's write lock; if another process holds it longer, the rows
# stay in memory for the next round. Short, so that shutdown never waits long for a round in progress.
ROUND_WRITE_WAIT_S = 1.0
# The final write at shutdown waits for the lock until the shutdown grace ends, but at least this long.
FINAL_WRITE_MIN_WAIT_S = 1.0
# A lasting store problem (file gone, lock held) is logged when it starts, then again this often.
REPEAT_LOG_S = 60.0
PRUNE_INTERVAL_S = DAY_S  # usage retention is applied this often (seconds)
# A shared store's change watcher blocks this long per wait (a notification ends the wait at once); it bounds
# how long a stopping instance waits for the watcher's thread.
WATCH_WAIT_S = 0.25


def principal_of(record: KeyRecord) -> Principal:
    return Principal(record.user, record.id, Role(record.role), record.models, record.rpm, record.max_concurrent,
                     record.tokens_per_day, record.expires_at)


class ManagedKeys:
    def __init__(self, store: Store, gate: Gate, *, wall_clock: Callable[[], float] = time.time,
                 retention_days: int = 0, metrics: Metrics | None = None) -> None:
        self.store: Store | None = store  # None while the file at `path` cannot be opened
        self.path = store.path
        # A SQLite file on this machine (watched by inode) or a shared database (notifications, ids, spill file).
        self._local = isinstance(store, KeyStore)
        self._file_id: FileId | None = store.file_id if isinstance(store, KeyStore) else None  # the file open
        self.gate = gate
        self.wall_clock = wall_clock
        self.metrics = metrics
        self._token: int | None = None
        self._active = 0  # managed keys loaded last
        # (id, record): the id is given once, when the request is recorded, and kept through retries and spills.
        self._pending: list[tuple[str, UsageRecord]] = []
        self._instance = uuid.uuid4().hex[:16]  # this run's part of every usage id
        self._sequence = 0
        self._last_used: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # set by stop() and by the change watcher
        self._spill_waiting = False  # rows an earlier run spilled that could not be imported yet
        self._problems: dict[str, float] = {}  # problem -> monotonic time it was last logged
        self.retention_days = retention_days  # 0 keeps every usage row; a reload may change it
        self._next_prune = time.monotonic()  # monotonic time of the next retention pass (the first round)

    @property
    def active_keys(self) -> int:
        """Managed keys in force, as loaded last."""
        return self._active

    async def start(self) -> None:
        await self.refresh()
        await self._import_spill()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run())
        if not self._local and hasattr(self.store, "wait_for_change"):
            self._watcher = loop.create_task(self._watch_changes())

    async def _watch_changes(self) -> None:
        """Wake the sync as soon as the shared store announces a key change (see `PostgresStore.wait_for_change`,
        which also answers True after its listening connection was remade, since changes may have gone
        unheard meanwhile)."""
        wait = self.store.wait_for_change  # type: ignore[union-attr]  # checked in start()
        while not self._stopping.is_set():
            try:
                if await asyncio.to_thread(wait, WATCH_WAIT_S):
                    self._wake.set()
            except Exception as exc:  # never let the watcher die: the per-round poll still works, but slower
                log.error("Key store %s: change watcher: %s", self.path, exc)
                await asyncio.sleep(POLL_S)

    async def stop(self, deadline: float | None = None) -> None:
        """Stop polling and write the usage still pending. `deadline` (event-loop time; by default
        BUSY_TIMEOUT_S from now) bounds the wait for the store's write lock; rows it cannot write by then are
        spilled next to the store for the next start to import, never dropped."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + BUSY_TIMEOUT_S
        self._stopping.set()
        self._wake.set()
        if self._watcher is not None:
            await asyncio.wait({self._watcher}, timeout=WATCH_WAIT_S + 1.5)  # see LISTEN_RETRY_S
        task = self._task
        if task is not None:
            # Let a round in progress finish rather than cancel it mid-write: a cancelled write leaves a batch
            # nobody knows to be written or not. Its lock wait is at most ROUND_WRITE_WAIT_S.
            done, _ = await asyncio.wait({task}, timeout=max(deadline - loop.time(), 0.0) + ROUND_WRITE_WAIT_S)
            if not done:  # a hung file system: its batch is back in _pending (at worst written twice)
                log.warning("Key store %s: the last poll did not finish; stopping it", self.path)
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        problem: str | None = None
        current: FileId | None = None
        if self._local:
            try:
                current = await asyncio.to_thread(file_id, self.path)
            except OSError as exc:
                current, problem = None, f"cannot look at {self.path}: {exc.strerror}"
        if self.store is None or current != self._file_id:
            # Gone or replaced since the last round: rows written to the old file now would be lost with it.
            # The spill lies at the path, so the store next found there imports them.
            problem = problem or f"{self.path} is no longer the file fastgate opened"
        else:
            try:
                await self.flush(wait_s=max(deadline - loop.time(), FINAL_WRITE_MIN_WAIT_S))
            except StoreError as exc:
                problem = str(exc)
        if self._pending or self._last_used:
            await asyncio.to_thread(self._spill, problem or "store unavailable")
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    def _spill(self, problem: str) -> None:
        pending, last_used = self._pending, self._last_used
        self._pending, self._last_used = [], {}
        try:
            path = self._spill_rows(pending, last_used)
        except OSError as exc:
            self._dropped(len(pending))
            log.error("Could not write %d usage rows before shutdown (%s), nor save them to %s (%s): they are "
                      "lost", len(pending), problem, self._spill_file, exc.strerror)
            return
        log.error("Could not write %d usage rows before shutdown (%s); saved them to %s, which the next start "
                  "imports", len(pending), problem, path)

    @property
    def _spill_file(self) -> str:
        return spill_path(self.path) if self._local else str(getattr(self.store, "spill_file", ""))

    def _spill_rows(self, pending: Sequence[tuple[str, UsageRecord]], last_used: dict[str, float]) -> str:
        """Append rows to the spill file (blocking: a small fsync'd append). OSError when it cannot."""
        rows = [row for _, row in pending]
        if self._local:
            return spill_usage(self.path, rows, last_used, uuid.uuid4().hex)
        return self.store.spill(rows, [row_id for row_id, _ in pending], last_used)  # type: ignore[union-attr]

    def _dropped(self, count: int) -> None:
        if self.metrics is not None:
            self.metrics.usage_rows_dropped += count

    def record(self, usage: UsageRecord) -> None:
        """Usage sink for the proxy: called once per forwarded request, never blocks (but see the bound)."""
        if usage.key_id.startswith("k_"):
            self._last_used[usage.key_id] = usage.at
        else:
            usage = replace(usage, key_id="")  # config-file keys have no store id
        if len(self._pending) >= MAX_PENDING_ROWS:
            self._overflow()
        self._sequence += 1
        self._pending.append((f"{self._instance}-{self._sequence}", usage))
        if self.metrics is not None:
            self.metrics.usage_rows_pending = len(self._pending)

    def _overflow(self) -> None:
        """The store has not taken rows for a long while: the oldest tenth goes to the spill file (one small
        fsync'd append on the loop, once per MAX_PENDING_ROWS // 10 requests at worst), imported once the store
        takes writes again. Rows are dropped, and counted, only when even that fails."""
        oldest = self._pending[: MAX_PENDING_ROWS // 10]
        del self._pending[: MAX_PENDING_ROWS // 10]
        try:
            self._spill_rows(oldest, {})
        except OSError as exc:
            self._dropped(len(oldest))
            self._problem("dropped", "Usage buffer full (%d rows) and the spill file %s cannot be written (%s): "
                          "dropped the oldest %d rows", MAX_PENDING_ROWS, self._spill_file, exc.strerror,
                          len(oldest))
            return
        self._spill_waiting = True
        self._problem("overflow", "Usage buffer full (%d rows waiting for the key store): moved the oldest %d to "
                      "%s, imported once the store takes writes again", MAX_PENDING_ROWS, len(oldest),
                      self._spill_file)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_round = loop.time() + POLL_S
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), max(next_round - loop.time(), 0.0))
            except asyncio.TimeoutError:
                pass
            if self._stopping.is_set():
                return
            if self._wake.is_set():  # the shared store announced a key change: reload now, flush on schedule
                self._wake.clear()
                try:
                    await self.refresh()
                except StoreError as exc:
                    self._problem("down", "%s: the %d managed keys loaded last stay in force", exc, self._active)
                if loop.time() < next_round:
                    continue
            next_round = loop.time() + POLL_S
            try:
                if self._local and not await self._check_file():
                    continue
                await self.refresh()
                await self.flush()
                self._resolved("busy", "Key store %s: usage written again", self.path)
                if self._spill_waiting:
                    await self._import_spill()
                await self._prune_if_due()
            except StoreBusy as exc:
                self._problem("busy", "%s (another connection holds the write lock); %d usage rows wait in "
                              "memory and are retried every second", exc, len(self._pending))
            except StoreError as exc:
                if self._local:
                    log.error("Key store: %s", exc)
                else:  # a shared database that is down: said once a minute, not every second
                    self._problem("down", "%s: the %d managed keys loaded last stay in force, %d usage rows wait "
                                  "in memory (retried every second)", exc, self._active, len(self._pending))
            else:
                if not self._local:
                    self._resolved("down", "Key store %s is reachable again: usage written", self.path)

    async def _check_file(self) -> bool:
        """Is the file at the store's path still the one open? A replacement is reopened; False while none can
        be used (then nothing is read or written and the keys loaded last stay in force).

        Why a deleted store keeps the last keys rather than dropping every managed key: every revocation made
        before the deletion was already applied (the store is polled every second), so no revoked key comes
        back; and a revocation can only ever be made in a store file: the first file that appears at the path
        (a restored backup, or the empty store any `fastgate keys` command creates there) is loaded at once,
        and its revocations with it. Dropping the keys would turn an accidental `rm` or a backup tool's
        move-and-restore into an outage for every user without making any key safer. What cannot happen
        while the file is gone is a new revocation, so that is what the log says, loudly and repeatedly."""
        try:
            current = await asyncio.to_thread(file_id, self.path)
            reason = "deleted or moved away"
        except OSError as exc:
            current, reason = None, exc.strerror or str(exc)
        if current is None:
            self._problem("gone", "Key store %s is gone (%s): still serving the %d managed keys loaded last, but "
                          "revocations cannot be read until a store file is back at that path (restore it: any "
                          "store file that appears there is loaded at once, even the empty one a `fastgate keys` "
                          "command creates); %d usage rows wait in memory", self.path, reason, self._active,
                          len(self._pending))
            return False
        self._resolved("gone", "Key store %s is back", self.path)
        if current == self._file_id and self.store is not None:
            return True
        return await self._reopen(current)

    async def _reopen(self, current: FileId) -> bool:
        old, self.store = self.store, None
        if old is not None:
            # SQLite pairs a database with its -wal and -shm files by name, not by inode: the old connections
            # are closed first (the last one checkpoints into the old file and removes them), else the new
            # file would be read through the old file's WAL index.
            await asyncio.to_thread(old.close)
        self._file_id = current
        try:
            self.store = await asyncio.to_thread(KeyStore, self.path)
        except StoreError as exc:
            self._problem("unusable", "Key store %s was replaced by a file that cannot be used (%s): still serving "
                          "the %d managed keys loaded last; retrying every second", self.path, exc, self._active)
            return False
        self._file_id = self.store.file_id
        self._resolved("unusable", "Key store %s can be used again", self.path)
        self._token = None  # whatever its revision number, its keys are read afresh
        await self.refresh()
        log.warning("Key store %s was replaced by another file: reopened it, %d managed keys active (they "
                    "replace the ones loaded before)", self.path, self._active)
        return True

    def _problem(self, kind: str, message: str, *args: object) -> None:
        """Log a lasting problem at ERROR when it starts, then every REPEAT_LOG_S while it lasts."""
        now = time.monotonic()
        last = self._problems.get(kind)
        if last is None or now - last >= REPEAT_LOG_S:
            self._problems[kind] = now
            log.error(message, *args)

    def _resolved(self, kind: str, message: str, *args: object) -> bool:
        if self._problems.pop(kind, None) is None:
            return False
        log.info(message, *args)
        return True

    async def refresh(self) -> None:
        """Reload the keys if the store changed since the last look (CLI changes land within POLL_S)."""
        store = self.store
        if store is None:
            return
        token = await asyncio.to_thread(store.change_token)
        if token == self._token:
            return
        now = self.wall_clock()
        records = await asyncio.to_thread(store.active_by_digest, now)
        day_start = now - now % DAY_S
        for record in records.values():
            if record.tokens_per_day is not None:
                used = await asyncio.to_thread(store.tokens_used_since, record.id, day_start)
                # Pending rows are not in the store yet; the in-memory count already has them.
                self.gate.limits.set_tokens_today(record.id, max(used, self.gate.limits.tokens_today(record.id, now)),
                                                  now)
        self.gate.set_managed_keys({digest: principal_of(record) for digest, record in records.items()})
        if self._token is not None:
            log.info("Key store changed: %d managed keys active", len(records))
        self._token = token
        self._active = len(records)

    async def flush(self, wait_s: float = ROUND_WRITE_WAIT_S) -> None:
        """Write pending usage rows and last-used stamps in one transaction, waiting at most `wait_s` for the
        write lock. On failure (or cancellation) they go back to the front of the queue: nothing is lost."""
        store = self.store
        if store is None or (not self._pending and not self._last_used):
            return
        pending, self._pending = self._pending, []
        last_used, self._last_used = self._last_used, {}
        try:
            # The same ids on every try: a batch whose commit went through unseen is skipped, not added again.
            await asyncio.to_thread(store.write_usage, [row for _, row in pending], last_used, wait_s=wait_s,
                                    ids=[row_id for row_id, _ in pending])
        except BaseException:
            self._pending[:0] = pending  # try again next time rather than lose them
            for key_id, at in last_used.items():
                self._last_used.setdefault(key_id, at)
            raise
        finally:
            if self.metrics is not None:
                self.metrics.usage_rows_pending = len(self._pending)

    async def _prune_if_due(self) -> None:
        """Delete usage rows older than `retention_days`, once a day. A failure (StoreBusy) leaves the pass due,
        so the next round tries again."""
        store = self.store
        if not self.retention_days or store is None or time.monotonic() < self._next_prune:
            return
        cutoff = self.wall_clock() - self.retention_days * DAY_S
        deleted = 0
        while not self._stopping.is_set():  # batch by batch, so a shutdown never waits for a long delete
            batch = await asyncio.to_thread(store.prune_usage, cutoff, PRUNE_BATCH_ROWS, ROUND_WRITE_WAIT_S)
            deleted += batch
            if batch < PRUNE_BATCH_ROWS:
                self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
                break
        if deleted:
            log.info("Key store %s: deleted %d usage rows older than %d days ([store] usage_retention_days)",
                     self.path, deleted, self.retention_days)

    async def _import_spill(self) -> None:
        """Import usage rows an earlier run spilled next to the store (its lock was held at shutdown)."""
        store = self.store
        if store is None:
            return
        try:
            imported, unreadable = await asyncio.to_thread(store.import_spill, ROUND_WRITE_WAIT_S)
        except StoreError as exc:
            self._spill_waiting = True
            self._problem("spill", "Key store %s: usage rows saved by an earlier run in %s are not imported yet "
                          "(%s); retrying every second", self.path, spill_path(self.path), exc)
            return
        self._spill_waiting = False
        self._resolved("spill", "Key store %s: saved usage rows imported", self.path)
        if imported or unreadable:
            log.warning("Key store %s: imported %d usage rows an earlier run saved in %s%s", self.path, imported,
                        spill_path(self.path), f" ({unreadable} unreadable lines skipped)" if unreadable else "")
