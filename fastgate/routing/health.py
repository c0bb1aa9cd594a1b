"""Health of one backend: probe results and connection errors in, up or ejected out.

Pure: no I/O, no clock of its own (every method takes `now`, in the same monotonic seconds as the rest of
the router). Rule 5 of issue 9, for one backend:

- `EJECT_AFTER_FAILURES` failures in a row (active probes of GET /api/version, or connection errors that
  real requests met) eject it; a refused connection ejects it at once, because nothing listens there.
- An ejected backend stays out for a hold that doubles with each ejection in a row (`BASE_EJECTION_S`,
  `2 * BASE_EJECTION_S`, ... up to `MAX_EJECTION_S`), so one that flaps stops taking (and losing) traffic
  for longer each time; the count starts over once it has stayed up for `FORGET_EJECTIONS_AFTER_S`.
- It comes back after `RESTORE_AFTER_SUCCESSES` successful probes in a row, once its hold is over.

The rule that spans backends ("never eject every backend: if all look down, keep trying the least
recently failed") is the router's: it needs all of them (see `choice.Router`). `last_failure_at` is kept
here for it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

EJECT_AFTER_FAILURES = 2
RESTORE_AFTER_SUCCESSES = 2
BASE_EJECTION_S = 2.0  # the first ejection's hold: with 1 s probes, restoring takes 2 probes anyway
MAX_EJECTION_S = 120.0  # a backend that keeps failing is still retried every two minutes at least
FORGET_EJECTIONS_AFTER_S = 300.0  # up this long since its last restore: the next ejection is a first one


class HealthState(enum.Enum):
    UP = "up"
    EJECTED = "ejected"


class HealthChange(enum.Enum):
    """What an observation changed, for the caller's log line and /metrics."""

    EJECTED = "ejected"
    RESTORED = "restored"


@dataclass(slots=True)
class Health:
    """One backend's health. Starts up: before the first probe fastgate forwards as it always did."""

    state: HealthState = HealthState.UP
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    ejections: int = 0  # since start, for /metrics
    ejections_in_a_row: int = 0  # sets the hold; reset after FORGET_EJECTIONS_AFTER_S up
    ejected_until: float = -math.inf  # no restore before this
    last_failure_at: float = -math.inf
    restored_at: float = -math.inf

    @property
    def up(self) -> bool:
        return self.state is HealthState.UP

    def hold_s(self) -> float:
        """The hold of the current (or next) ejection: doubles with each ejection in a row."""
        return min(MAX_EJECTION_S, BASE_EJECTION_S * 2.0 ** max(0, self.ejections_in_a_row - 1))

    def success(self, now: float) -> HealthChange | None:
        """A probe answered. Restores an ejected backend after enough of them, once its hold is over."""
        self.consecutive_failures = 0
        self.consecutive_successes += 1
        if (self.state is HealthState.EJECTED and self.consecutive_successes >= RESTORE_AFTER_SUCCESSES
                and now >= self.ejected_until):
            self.state = HealthState.UP
            self.restored_at = now
            return HealthChange.RESTORED
        return None

    def failure(self, now: float, *, refused: bool = False) -> HealthChange | None:
        """A probe failed or timed out, or a request could not connect (`refused`: connection refused)."""
        self.consecutive_successes = 0
        self.consecutive_failures += 1
        self.last_failure_at = now
        if self.state is HealthState.EJECTED:
            return None
        if not refused and self.consecutive_failures < EJECT_AFTER_FAILURES:
            return None
        if now - self.restored_at >= FORGET_EJECTIONS_AFTER_S:
            self.ejections_in_a_row = 0
        self.ejections_in_a_row += 1
        self.ejections += 1
        self.state = HealthState.EJECTED
        self.ejected_until = now + self.hold_s()
        return HealthChange.EJECTED

    def __repr__(self) -> str:
        held = f" until {self.ejected_until:.1f}" if self.state is HealthState.EJECTED else ""
        return (f"<Health {self.state.value}{held} failures={self.consecutive_failures} "
                f"successes={self.consecutive_successes} ejections={self.ejections}>")
