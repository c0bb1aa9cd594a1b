"""The running proxy's side of the key store: keys in, usage out, off the request path.

Every second it asks the store whether keys changed (a cheap revision check) and, if so, swaps the gate's
managed keys; usage records and last-used times collect in memory and go to the store in one transaction
per second. SQLite calls run in a worker thread so a slow disk or a CLI writer holding the lock never
stalls the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

from .access import Principal, Role
from .gate import Gate
from .limits import DAY_S
from .logs import log
from .store import KeyRecord, KeyStore, StoreError
from .usage import UsageRecord

POLL_S = 1.0
MAX_PENDING_ROWS = 100_000  # if the store is unwritable for long, drop the oldest rather than grow


def principal_of(record: KeyRecord) -> Principal:
    return Principal(record.user, record.id, Role(record.role), record.models, record.rpm, record.max_concurrent,
                     record.tokens_per_day, record.expires_at)


class ManagedKeys:
    def __init__(self, store: KeyStore, gate: Gate, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.gate = gate
        self.wall_clock = wall_clock
        self._token: int | None = None
        self._pending: list[UsageRecord] = []
        self._last_used: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()
        await asyncio.to_thread(self.store.close)

    def record(self, usage: UsageRecord) -> None:
        """Usage sink for the proxy: called once per forwarded request, never blocks."""
        if usage.key_id.startswith("k_"):
            self._last_used[usage.key_id] = usage.at
        else:
            usage = replace(usage, key_id="")  # config-file keys have no store id
        if len(self._pending) >= MAX_PENDING_ROWS:
            del self._pending[: MAX_PENDING_ROWS // 10]
        self._pending.append(usage)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self.refresh()
                await self.flush()
            except StoreError as exc:
                log.error("Key store: %s", exc)

    async def refresh(self) -> None:
        """Reload the keys if the store changed since the last look (CLI changes land within POLL_S)."""
        token = await asyncio.to_thread(self.store.change_token)
        if token == self._token:
            return
        now = self.wall_clock()
        records = await asyncio.to_thread(self.store.active_by_digest, now)
        day_start = now - now % DAY_S
        for record in records.values():
            if record.tokens_per_day is not None:
                used = await asyncio.to_thread(self.store.tokens_used_since, record.id, day_start)
                # Pending rows are not in the store yet; the in-memory count already has them.
                self.gate.limits.set_tokens_today(record.id, max(used, self.gate.limits.tokens_today(record.id, now)),
                                                  now)
        self.gate.set_managed_keys({digest: principal_of(record) for digest, record in records.items()})
        if self._token is not None:
            log.info("Key store changed: %d managed keys active", len(records))
        self._token = token

    async def flush(self) -> None:
        rows, self._pending = self._pending, []
        last_used, self._last_used = self._last_used, {}
        try:
            if rows:
                await asyncio.to_thread(self.store.record_usage, rows)
            if last_used:
                await asyncio.to_thread(self.store.touch_last_used, last_used)
        except StoreError:
            self._pending[:0] = rows  # try again next time rather than lose them
            for key_id, at in last_used.items():
                self._last_used.setdefault(key_id, at)
            raise
