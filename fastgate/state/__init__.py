"""Shared state of several fastgate instances: the key store engines and the live state in Redis.

I/O behind small interfaces: the proxy asks `LiveState` questions without knowing which engine answers, and
without [state] none of this is imported at all (the gate's synchronous, in-process limits stay as they are).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Protocol

from ..access import Principal
from ..errors import GateError

SHARED = "shared"  # every limit, lease, trust grant and lockout is read and written in the shared store
DEGRADED = "degraded"  # the shared store is unreachable or slow: local tables, limits divided by live instances


# What `LiveState.admit` hands out for one admitted request and `release` takes back: the engine's own type.
Lease = Any


class Admission(Protocol):
    """An admission under way (LiveState.begin_admit)."""

    def __await__(self) -> Generator[Any, None, Lease]:
        """Its answer, once: the lease, or TooManyRequests (429 with Retry-After), uncounted."""
        ...

    def end(self) -> None:
        """The request is over (served, refused, gone): the lease goes back, whether or not it was awaited."""
        ...


class LiveState(Protocol):
    """Live state shared by every instance (rate limits, concurrency leases, daily tokens, key-guessing
    counts, IP trust). No call waits longer than the configured timeout: past it, local tables answer."""

    @property
    def mode(self) -> str:
        """SHARED or DEGRADED (for /health and /metrics)."""
        ...

    async def admit(self, principal: Principal) -> Lease:
        """Count one request of a limited key, or raise TooManyRequests (429 with Retry-After) uncounted."""
        ...

    def begin_admit(self, principal: Principal) -> Admission:
        """`admit`, sent now and answered when awaited (the request's other preparations go on meanwhile)."""
        ...

    def release(self, lease: Lease) -> None:
        """The exchange admitted with `lease` is over (never waits)."""
        ...

    async def failed_guess(self, ip: str, error: GateError) -> GateError:
        """A wrong key from `ip` (already counted locally): counted in the shared window too. Returns the
        error to answer: `error` itself, or 429 once the shared window is over the limit."""
        ...

    async def stop(self) -> None:
        ...
