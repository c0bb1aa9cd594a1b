"""The bounded wait for a free slot: FIFO per user, round robin between users, deadlines in a heap.

Pure: no I/O, no clock (deadlines are plain numbers the router compares with its `now`). The router owns
the bound (`max_queue`) and what happens to an item; this module only keeps the order:

- Each user's items wait in arrival order (FIFO within a user).
- Users take turns: `in_fair_order` yields the first item of every user in turn order, then the second of
  every user, and so on; a user who was just served (`served`) goes to the back of the turn order. So one
  user's burst of 50 does not starve another's single request: it is at most one turn away.
- `pop_expired(now)` takes the items whose deadline has passed, earliest first, in O(log n) each: the heap
  keeps entries of items removed earlier (served, cancelled) and skips them when they surface.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Waiter(Protocol):
    @property
    def user(self) -> str: ...

    @property
    def deadline(self) -> float: ...


W = TypeVar("W", bound=Waiter)

_COMPACT_SLACK = 64  # heap entries of departed items tolerated beyond the living ones (see push)


class FairQueue(Generic[W]):
    """Waiting items by user. Items are compared by identity, so one item can be queued only once."""

    def __init__(self) -> None:
        self._by_user: dict[str, deque[W]] = {}
        self._turns: deque[str] = deque()  # users with waiting items; the front one's turn is next
        self._members: set[W] = set()
        self._deadlines: list[tuple[float, int, W]] = []
        self._arrival = itertools.count()  # heap tie-break: equal deadlines leave in arrival order

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, item: object) -> bool:
        return item in self._members

    def push(self, item: W) -> None:
        if item in self._members:
            raise ValueError(f"{item!r} is already waiting")
        queue = self._by_user.get(item.user)
        if queue is None:
            queue = self._by_user[item.user] = deque()
            self._turns.append(item.user)  # a new user joins at the back of the turn order
        queue.append(item)
        self._members.add(item)
        heapq.heappush(self._deadlines, (item.deadline, next(self._arrival), item))
        if len(self._deadlines) > 2 * len(self._members) + _COMPACT_SLACK:
            # Entries of served items wait in the heap until their deadline; under a steady stream of short
            # waits that is most of the heap, holding dead items. Rebuild from the living ones.
            self._deadlines = [entry for entry in self._deadlines if entry[2] in self._members]
            heapq.heapify(self._deadlines)

    def in_fair_order(self) -> Iterator[W]:
        """Every waiting item, in turn order (see the module docstring). Do not change the queue while
        iterating: stop at the item you act on, or take a list first."""
        queues = [self._by_user[user] for user in self._turns]
        depth = 0
        while queues:
            deeper = []
            for queue in queues:
                if depth < len(queue):
                    yield queue[depth]
                    if depth + 1 < len(queue):
                        deeper.append(queue)
            queues = deeper
            depth += 1

    def served(self, item: W) -> None:
        """Take `item` out because it got its slot: its user's turn is over, so the user goes last."""
        self.remove(item)
        if item.user in self._by_user:
            self._turns.remove(item.user)
            self._turns.append(item.user)

    def remove(self, item: W) -> bool:
        """Take `item` out (cancelled, refused); its user keeps its place in the turn order."""
        if item not in self._members:
            return False
        self._members.discard(item)
        queue = self._by_user[item.user]
        queue.remove(item)
        if not queue:
            del self._by_user[item.user]
            self._turns.remove(item.user)
        return True

    def pop_expired(self, now: float) -> list[W]:
        """Remove and return the items whose deadline is <= now, earliest deadline first."""
        expired = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, item = heapq.heappop(self._deadlines)
            if self.remove(item):
                expired.append(item)
        return expired

    def next_deadline(self) -> float | None:
        """The earliest deadline of a waiting item (when `pop_expired` will next have work), or None."""
        while self._deadlines and self._deadlines[0][2] not in self._members:
            heapq.heappop(self._deadlines)  # left by an item served or cancelled earlier
        return self._deadlines[0][0] if self._deadlines else None

    def users(self) -> int:
        return len(self._by_user)

    def __repr__(self) -> str:
        return f"<FairQueue {len(self)} waiting, {len(self._by_user)} users>"
