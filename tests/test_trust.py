"""The IP-trust table (time passed in) and attributing a request to a client address."""

from __future__ import annotations

import ipaddress

import pytest

from fastgate.trust import TrustGrant, TrustTable, client_ip

LABEL = "x-api-key:api-****0101"


# ---------------------------------------------------------------------------------------------------------
# Table


def test_grant_then_lookup_until_expiry() -> None:
    table = TrustTable(10)
    grant = table.grant("10.0.0.1", "alice", LABEL, ttl=60, now=1000.0)
    assert grant == TrustGrant("alice", LABEL, 1060.0)
    assert table.lookup("10.0.0.1", now=1000.0) == grant
    assert table.lookup("10.0.0.1", now=1059.999) == grant
    assert table.lookup("10.0.0.2", now=1000.0) is None
    assert len(table) == 1
    # expiry is exclusive: at expires_at the grant is gone, and the lookup drops it
    assert table.lookup("10.0.0.1", now=1060.0) is None
    assert len(table) == 0
    assert table.lookup("10.0.0.1", now=1000.0) is None


def test_zero_ttl_grant_is_never_valid() -> None:
    table = TrustTable(10)
    table.grant("10.0.0.1", "alice", LABEL, ttl=0, now=5.0)
    assert table.lookup("10.0.0.1", now=5.0) is None


def test_regrant_replaces() -> None:
    table = TrustTable(10)
    table.grant("10.0.0.1", "alice", LABEL, ttl=60, now=0.0)
    second = table.grant("10.0.0.1", "bob", "bearer:api-****0202", ttl=10, now=30.0)
    assert len(table) == 1
    assert table.lookup("10.0.0.1", now=35.0) == second == TrustGrant("bob", "bearer:api-****0202", 40.0)
    # the shorter new grant wins even though the old one would still be valid
    assert table.lookup("10.0.0.1", now=45.0) is None


def test_regrant_when_full_does_not_evict_others() -> None:
    table = TrustTable(2)
    table.grant("a", "alice", LABEL, ttl=10, now=0.0)
    table.grant("b", "bob", LABEL, ttl=100, now=0.0)
    table.grant("a", "alice", LABEL, ttl=10, now=1.0)
    assert table.lookup("a", now=2.0) is not None
    assert table.lookup("b", now=2.0) is not None


def test_full_table_evicts_expired_first() -> None:
    table = TrustTable(3)
    table.grant("old-1", "u", LABEL, ttl=10, now=0.0)  # expires 10
    table.grant("long", "u", LABEL, ttl=1000, now=0.0)  # expires 1000
    table.grant("old-2", "u", LABEL, ttl=20, now=0.0)  # expires 20
    table.grant("new", "u", LABEL, ttl=5, now=50.0)  # both old ones expired at 50
    assert len(table) == 2
    assert table.lookup("long", now=50.0) is not None
    assert table.lookup("new", now=50.0) is not None


def test_full_table_evicts_soonest_expiring_when_nothing_expired() -> None:
    table = TrustTable(3)
    table.grant("a", "u", LABEL, ttl=300, now=0.0)
    table.grant("b", "u", LABEL, ttl=100, now=0.0)  # soonest to expire
    table.grant("c", "u", LABEL, ttl=200, now=0.0)
    table.grant("d", "u", LABEL, ttl=1, now=10.0)  # the newcomer is kept even though it expires first
    assert len(table) == 3
    assert table.lookup("b", now=10.0) is None
    assert [ip for ip in "acd" if table.lookup(ip, now=10.0)] == ["a", "c", "d"]


def test_flood_stays_bounded() -> None:
    table = TrustTable(50)
    for i in range(1000):
        table.grant(f"10.0.{i // 256}.{i % 256}", "u", LABEL, ttl=3600, now=float(i))
        assert len(table) <= 50
    assert len(table) == 50
    # the survivors are the latest (they expire last)
    assert table.lookup("10.0.3.231", now=1000.0) is not None  # i = 999
    assert table.lookup("10.0.0.0", now=1000.0) is None


def test_revoke_user() -> None:
    table = TrustTable(10)
    table.grant("1.1.1.1", "alice", LABEL, ttl=60, now=0.0)
    table.grant("2.2.2.2", "bob", LABEL, ttl=60, now=0.0)
    table.grant("3.3.3.3", "alice", LABEL, ttl=60, now=0.0)
    table.revoke_user("alice")
    assert len(table) == 1
    assert table.lookup("1.1.1.1", now=1.0) is None
    assert table.lookup("3.3.3.3", now=1.0) is None
    assert table.lookup("2.2.2.2", now=1.0) is not None
    table.revoke_user("nobody")
    assert len(table) == 1


def test_expire_returns_count() -> None:
    table = TrustTable(10)
    table.grant("a", "u", LABEL, ttl=10, now=0.0)
    table.grant("b", "u", LABEL, ttl=20, now=0.0)
    table.grant("c", "u", LABEL, ttl=30, now=0.0)
    assert table.expire(now=5.0) == 0
    assert table.expire(now=20.0) == 2
    assert len(table) == 1
    assert table.expire(now=20.0) == 0


def test_repr_shows_size() -> None:
    table = TrustTable(7)
    table.grant("a", "alice", LABEL, ttl=10, now=0.0)
    assert repr(table) == "TrustTable(1/7)"


# ---------------------------------------------------------------------------------------------------------
# Client address

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize("peer, xff, trusted, expected", [
    # no trusted proxies configured: the header means nothing
    ("203.0.113.9", [b"1.2.3.4"], (), "203.0.113.9"),
    # spoofed header from an untrusted peer is ignored
    ("203.0.113.9", [b"1.2.3.4"], PROXIES, "203.0.113.9"),
    ("203.0.113.9", [b"10.0.0.5"], PROXIES, "203.0.113.9"),
    # trusted proxy: the rightmost untrusted hop is the client
    ("10.0.0.1", [b"198.51.100.7"], PROXIES, "198.51.100.7"),
    ("10.0.0.1", [b"6.6.6.6, 198.51.100.7"], PROXIES, "198.51.100.7"),
    ("10.0.0.1", [b"6.6.6.6, 198.51.100.7, 10.0.0.2"], PROXIES, "198.51.100.7"),
    ("10.0.0.1", [b"6.6.6.6", b"198.51.100.7 ,10.9.9.9"], PROXIES, "198.51.100.7"),
    ("10.0.0.1", [b" 198.51.100.7 , , "], PROXIES, "198.51.100.7"),
    ("fd00::1", [b"2001:db8::7"], PROXIES, "2001:db8::7"),
    ("10.0.0.1", [b"2001:db8::7, fd00::2"], PROXIES, "2001:db8::7"),
    # trusted proxy without a header: the proxy itself
    ("10.0.0.1", [], PROXIES, "10.0.0.1"),
    ("10.0.0.1", [b""], PROXIES, "10.0.0.1"),
    # every hop is a trusted proxy: the leftmost one
    ("10.0.0.1", [b"10.0.0.3, 10.0.0.2"], PROXIES, "10.0.0.3"),
    # garbage where the client should be: fall back to the peer
    ("10.0.0.1", [b"unknown"], PROXIES, "10.0.0.1"),
    ("10.0.0.1", [b"6.6.6.6, not-an-ip"], PROXIES, "10.0.0.1"),
    ("10.0.0.1", [b"198.51.100.7:1234"], PROXIES, "10.0.0.1"),
    ("10.0.0.1", [b"[2001:db8::7]"], PROXIES, "10.0.0.1"),
    ("10.0.0.1", [b"\xff\xfe"], PROXIES, "10.0.0.1"),
    # garbage to the left of the client does not matter
    ("10.0.0.1", [b"junk, 198.51.100.7"], PROXIES, "198.51.100.7"),
    # a peer that is not an IP at all (unix socket, say) is never trusted
    ("", [b"1.2.3.4"], PROXIES, ""),
])
def test_client_ip(peer: str, xff: list[bytes], trusted: tuple, expected: str) -> None:
    assert client_ip(peer, xff, trusted) == expected


def test_client_ip_accepts_any_iterable() -> None:
    gen = (v for v in [b"198.51.100.7"])
    assert client_ip("10.1.2.3", gen, PROXIES) == "198.51.100.7"


# ---------------------------------------------------------------------------------------------------------
# Failed-key limiter

def test_failure_limiter_blocks_after_max_failures_until_the_window_ends() -> None:
    from fastgate.trust import FailureLimiter
    limiter = FailureLimiter(max_failures=3, window_s=60)
    for i in range(3):
        assert limiter.retry_after("1.2.3.4", 100 + i) == 0
        limiter.record_failure("1.2.3.4", 100 + i)
    assert limiter.retry_after("1.2.3.4", 103) == pytest.approx(57)
    assert limiter.retry_after("5.6.7.8", 103) == 0  # other addresses are untouched
    assert limiter.retry_after("1.2.3.4", 159.5) == pytest.approx(0.5)
    assert limiter.retry_after("1.2.3.4", 160) == 0  # a new window
    limiter.record_failure("1.2.3.4", 161)
    assert limiter.retry_after("1.2.3.4", 162) == 0


def test_failure_limiter_zero_disables_and_size_is_bounded() -> None:
    from fastgate.trust import FailureLimiter
    off = FailureLimiter(max_failures=0, window_s=60)
    for _ in range(100):
        off.record_failure("1.2.3.4", 0)
    assert off.retry_after("1.2.3.4", 1) == 0 and len(off) == 0
    small = FailureLimiter(max_failures=1, window_s=60, max_entries=3)
    for i in range(10):
        small.record_failure(f"10.0.0.{i}", i)
    assert len(small) <= 3
    assert small.retry_after("10.0.0.9", 10) > 0  # the newest is kept
