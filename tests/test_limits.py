"""Per-key admission limits with injected clocks (no sleeping)."""

from __future__ import annotations

import pytest

from fastgate.access import Principal
from fastgate.errors import TooManyRequests
from fastgate.limits import DAY_S, KeyLimits

WALL = 1_800_000_000.0  # some UTC day, 08:00


def retry_after(error: TooManyRequests) -> int:
    return int(dict(error.extra_headers)[b"Retry-After"])


def test_requests_per_minute_is_a_token_bucket() -> None:
    limits = KeyLimits()
    p = Principal("u", "k1", rpm=3)
    for _ in range(3):
        limits.admit(p, 100.0, WALL)  # a burst up to the limit passes
    with pytest.raises(TooManyRequests) as info:
        limits.admit(p, 100.0, WALL)
    assert info.value.status == 429 and retry_after(info.value) == 20  # one token per 20 s at 3 rpm
    with pytest.raises(TooManyRequests):
        limits.admit(p, 119.0, WALL)
    limits.admit(p, 120.5, WALL)  # refilled one
    other = Principal("v", "k2", rpm=3)
    limits.admit(other, 100.0, WALL)  # buckets are per key


def test_max_concurrent_counts_in_flight_until_released() -> None:
    limits = KeyLimits()
    p = Principal("u", "k1", max_concurrent=2)
    limits.admit(p, 0, WALL)
    limits.admit(p, 0, WALL)
    with pytest.raises(TooManyRequests) as info:
        limits.admit(p, 0, WALL)
    assert "2 requests in flight" in info.value.message
    limits.release(p)
    limits.admit(p, 0, WALL)
    assert limits.in_flight("k1") == 2


def test_refused_requests_do_not_use_up_allowance() -> None:
    limits = KeyLimits()
    p = Principal("u", "k1", rpm=60, max_concurrent=1)
    limits.admit(p, 0, WALL)
    for _ in range(5):
        with pytest.raises(TooManyRequests):
            limits.admit(p, 0, WALL)  # refused for concurrency: no rpm token taken
    limits.release(p)
    for _ in range(59):
        limits.admit(p, 0, WALL)
        limits.release(p)


def test_tokens_per_day_resets_at_utc_midnight() -> None:
    limits = KeyLimits()
    p = Principal("u", "k1", tokens_per_day=1000)
    limits.add_tokens("k1", 600, WALL)
    limits.admit(p, 0, WALL)
    limits.add_tokens("k1", 400, WALL)
    with pytest.raises(TooManyRequests) as info:
        limits.admit(p, 0, WALL)
    assert retry_after(info.value) == DAY_S - int(WALL % DAY_S)
    next_day = WALL - WALL % DAY_S + DAY_S
    limits.admit(p, 0, next_day)
    assert limits.tokens_today("k1", next_day) == 0


def test_unlimited_principal_is_not_tracked() -> None:
    limits = KeyLimits()
    p = Principal("u", "k1")
    for _ in range(1000):
        limits.admit(p, 0, WALL)
    limits.release(p)
    assert limits.in_flight("k1") == 0
