"""Per-key admission limits: requests per minute, requests in flight, tokens per day.

Pure and synchronous: the gate admits a request (or raises TooManyRequests with Retry-After) before it
is forwarded, the proxy releases it when the exchange ends, and recorded usage feeds the daily token count.
Clocks are parameters: `now` is monotonic seconds for the token bucket, `wall` epoch seconds for days.
"""

from __future__ import annotations

from .access import Principal
from .errors import TooManyRequests

DAY_S = 86400


def _too_many(message: str, retry_after: float) -> TooManyRequests:
    return TooManyRequests(message, headers=((b"Retry-After", str(max(1, int(retry_after + 0.999))).encode()),))


too_many = _too_many  # the same answers from the shared limits (fastgate/state)


class KeyLimits:
    __slots__ = ("_buckets", "_in_flight", "_tokens")

    def __init__(self) -> None:
        self._buckets: dict[str, list[float]] = {}  # key id -> [tokens left, last refill (monotonic)]
        self._in_flight: dict[str, int] = {}
        self._tokens: dict[str, list[int]] = {}  # key id -> [UTC day number, tokens used that day]

    def admit(self, principal: Principal, now: float, wall: float) -> None:
        """Count the request against the key's limits, or raise TooManyRequests without counting it."""
        key = principal.key_id
        if principal.tokens_per_day is not None:
            used = self.tokens_today(key, wall)
            if used >= principal.tokens_per_day:
                raise _too_many(f"daily token limit of {principal.tokens_per_day} reached for this key",
                                DAY_S - wall % DAY_S)
        if principal.max_concurrent is not None and self._in_flight.get(key, 0) >= principal.max_concurrent:
            raise _too_many(f"this key already has {principal.max_concurrent} requests in flight", 1)
        if principal.rpm is not None:
            self._take_token(key, principal.rpm, now)
        if principal.max_concurrent is not None:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def release(self, principal: Principal) -> None:
        """The exchange admitted for `principal` is over."""
        if principal.max_concurrent is None:
            return
        left = self._in_flight.get(principal.key_id, 0) - 1
        if left > 0:
            self._in_flight[principal.key_id] = left
        else:
            self._in_flight.pop(principal.key_id, None)

    def _take_token(self, key: str, rpm: int, now: float) -> None:
        # Token bucket: holds up to `rpm` requests and refills at rpm per minute, so bursts up to the
        # limit pass and a steady rate above it is refused.
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(rpm), now]
        tokens = min(float(rpm), bucket[0] + (now - bucket[1]) * rpm / 60.0)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            raise _too_many(f"rate limit of {rpm} requests per minute reached for this key",
                            (1.0 - tokens) * 60.0 / rpm if rpm else 60.0)
        bucket[0] = tokens - 1.0

    def tokens_today(self, key: str, wall: float) -> int:
        day = int(wall // DAY_S)
        entry = self._tokens.get(key)
        return entry[1] if entry is not None and entry[0] == day else 0

    def add_tokens(self, key: str, tokens: int, wall: float) -> None:
        day = int(wall // DAY_S)
        entry = self._tokens.get(key)
        if entry is None or entry[0] != day:
            self._tokens[key] = [day, tokens]
        else:
            entry[1] += tokens

    def set_tokens_today(self, key: str, tokens: int, wall: float) -> None:
        """Seed the count from recorded usage (at start, or when the store says otherwise)."""
        self._tokens[key] = [int(wall // DAY_S), tokens]

    def in_flight(self, key: str) -> int:
        return self._in_flight.get(key, 0)
