"""The IP-trust table (time passed in) and attributing a request to a client address."""

from __future__ import annotations

import ipaddress
import random
from typing import TYPE_CHECKING, Any

import pytest

from fastgate.errors import Forbidden
from fastgate.trust import (
    MAX_GRANTS_PER_KEY,
    UNATTRIBUTED_PREFIX,
    FailureLimiter,
    TrustGrant,
    TrustTable,
    client_ip,
    failure_bucket,
    hop_address,
    in_networks,
)

if TYPE_CHECKING:
    from fastgate.gate import Gate, IncomingRequest

LABEL = "x-api-key:api-****0101"
KEY = "api-20250312000101"
BAD_KEY = "api-20259999999999"


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
    for i in range(1000):  # a thousand keys, one address each (one key alone is capped far lower)
        table.grant(f"10.0.{i // 256}.{i % 256}", "u", LABEL, ttl=3600, now=float(i), key_id=f"key-{i}")
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
    # ports and IPv6 brackets are stripped (Azure Application Gateway writes ip:port), on proxies' hops too
    ("10.0.0.1", [b"198.51.100.7:1234"], PROXIES, "198.51.100.7"),
    ("10.0.0.1", [b"[2001:db8::7]"], PROXIES, "2001:db8::7"),
    ("10.0.0.1", [b"[2001:DB8::7]:443"], PROXIES, "2001:db8::7"),
    ("fd00::1", [b"198.51.100.7:40000, [fd00::2]:443, 10.0.0.2:8080"], PROXIES, "198.51.100.7"),
    ("10.0.0.1", [b"[::ffff:198.51.100.7]:80"], PROXIES, "198.51.100.7"),
    # garbage where the client should be: attributed to no one, never to the proxy (which may hold trust)
    ("10.0.0.1", [b"unknown"], PROXIES, "unattributed-via-10.0.0.1"),
    ("10.0.0.1", [b"6.6.6.6, not-an-ip"], PROXIES, "unattributed-via-10.0.0.1"),
    ("10.0.0.1", [b"\xff\xfe"], PROXIES, "unattributed-via-10.0.0.1"),
    ("10.0.0.1", [b"198.51.100.7:http"], PROXIES, "unattributed-via-10.0.0.1"),
    ("10.0.0.1", [b"[198.51.100.7]:80"], PROXIES, "unattributed-via-10.0.0.1"),
    ("fd00::1", [b"_hidden, fd00::2"], PROXIES, "unattributed-via-fd00::1"),  # written by a trusted hop
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
    off = FailureLimiter(max_failures=0, window_s=60)
    for _ in range(100):
        off.record_failure("1.2.3.4", 0)
    assert off.retry_after("1.2.3.4", 1) == 0 and len(off) == 0
    small = FailureLimiter(max_failures=1, window_s=60, max_entries=3)
    for i in range(10):
        small.record_failure(f"10.0.0.{i}", i)
    assert len(small) <= 3
    # every entry is locked, so none is evicted: the newcomers are counted (and refused) in their /24's
    # overflow slot instead
    assert all(small.retry_after(f"10.0.0.{i}", 10) > 0 for i in range(10))


# ---------------------------------------------------------------------------------------------------------
# Forwarded hops with ports (issue 13, item 7)

@pytest.mark.parametrize("hop, address", [
    ("198.51.100.9", "198.51.100.9"),
    ("198.51.100.9:40000", "198.51.100.9"),
    ("198.51.100.9:0", "198.51.100.9"),
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("[2001:DB8:0::1]:65535", "2001:db8::1"),
    ("[::ffff:198.51.100.9]:80", "198.51.100.9"),
    # a bare IPv6 address has colons of its own: all of it is the address, never host:port
    ("2001:db8::1", "2001:db8::1"),
    ("2001:db8::1:443", "2001:db8::1:443"),
    ("::1", "::1"),
])
def test_hop_address_strips_ports_and_brackets(hop: str, address: str) -> None:
    assert hop_address(hop) == address


@pytest.mark.parametrize("hop", [
    "", "unknown", "_hidden", "host.example:80", "198.51.100.9:", "198.51.100.9:65536", "198.51.100.9:http",
    "198.51.100.9:+80", "198.51.100.9:٤٤٣", "198.51.100.9:80:80", "[198.51.100.9]:80", "[2001:db8::1",
    "[2001:db8::1]443", "[2001:db8::1]:", "[2001:db8::1]:99999", "2001:db8::1]", "[]", "[[2001:db8::1]]",
])
def test_hop_address_refuses_the_rest(hop: str) -> None:
    with pytest.raises(ValueError):
        hop_address(hop)


def test_an_unreadable_hop_is_never_the_trusted_proxy() -> None:
    # The proxy's own address holds trust (someone ran POST /auth on the proxy host). A hop it wrote that does
    # not parse must not make its clients that address, and what they get instead can hold no trust.
    table = TrustTable(10)
    table.grant("10.0.0.1", "alice", LABEL, ttl=3600, now=0.0, key_id="key-a")
    for xff in (b"unknown", b"198.51.100.7:http", b"[198.51.100.7]", b"6.6.6.6, junk, 10.0.0.2"):
        ip = client_ip("10.0.0.1", [xff], PROXIES)
        assert ip != "10.0.0.1"
        assert table.lookup(ip, now=1.0) is None
        assert not in_networks(ip, PROXIES)  # so it is never taken for a proxy hop either
        with pytest.raises(Forbidden):
            table.grant(ip, "bob", LABEL, ttl=3600, now=1.0, key_id="key-b")
    assert len(table) == 1
    # its wrong keys are counted in a bucket of its own: not the proxy's, not anyone else's
    limiter = FailureLimiter(max_failures=2, window_s=60)
    unattributed = client_ip("10.0.0.1", [b"unknown"], PROXIES)
    assert unattributed == UNATTRIBUTED_PREFIX + "10.0.0.1"
    for _ in range(2):
        limiter.record_failure(unattributed, 0.0)
    assert limiter.retry_after(unattributed, 1.0) == pytest.approx(59)
    assert limiter.retry_after("10.0.0.1", 1.0) == 0


def _gate(**sections: Any) -> Gate:
    # Imported here so the table and address tests above do not depend on the rest of the gate.
    from fastgate.config import build_config
    from fastgate.gate import Gate
    return Gate(build_config({"keys": {KEY: "alice"}, **sections}), clock=lambda: 1000.0,
                wall_clock=lambda: 1741737600.0)


def _request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], peer: str) -> IncomingRequest:
    from fastgate.gate import IncomingRequest
    raw = [(b"Host", b"127.0.0.1:8000"), *headers]
    length = next((int(v) for n, v in raw if n.lower() == b"content-length"), None)
    return IncomingRequest(method=method, target=target, headers=[(n.lower(), v) for n, v in raw],
                           raw_headers=raw, http_version=b"1.1", peer_ip=peer, tls=False,
                           content_length=length, chunked=False)


def test_gate_gives_an_unreadable_hop_neither_trust_nor_a_grant() -> None:
    from fastgate.errors import Unauthorized
    from fastgate.gate import Forward
    gate = _gate(server={"trusted_proxies": ["10.0.0.0/8"]})
    gate.trust.grant("10.0.0.1", "alice", LABEL, 3600, 1000.0)
    garbage = [(b"X-Forwarded-For", b"unknown")]
    with pytest.raises(Unauthorized):  # the proxy's trust is not theirs
        gate.decide(_request(b"GET", b"/api/tags", garbage, "10.0.0.1"), b"rid")
    body = b'{"api_key":"' + KEY.encode() + b'"}'
    auth = _request(b"POST", b"/auth", [(b"Content-Length", str(len(body)).encode()), *garbage], "10.0.0.1")
    with pytest.raises(Forbidden):  # a right key, but no address to trust
        gate.decide_with_body(auth, body, b"rid")
    assert len(gate.trust) == 1
    # with a port, the client is found and served as itself
    ported = [(b"X-Forwarded-For", b"198.51.100.9:40000")]
    reply = gate.decide_with_body(
        _request(b"POST", b"/auth", [(b"Content-Length", str(len(body)).encode()), *ported], "10.0.0.1"),
        body, b"rid")
    assert b'"ip":"198.51.100.9"' in reply.body.replace(b" ", b"")
    decision = gate.decide(_request(b"GET", b"/api/tags", ported, "10.0.0.1"), b"rid")
    assert isinstance(decision, Forward) and decision.client_ip == "198.51.100.9"
    with pytest.raises(Unauthorized):  # the next client behind the proxy is not trusted by that grant
        gate.decide(_request(b"GET", b"/api/tags", [(b"X-Forwarded-For", b"198.51.100.10:40001")],
                             "10.0.0.1"), b"rid")


# ---------------------------------------------------------------------------------------------------------
# Guess limiting per /64, full tables, shared addresses (issue 13, item 8)

def test_ipv6_guesses_count_per_64_and_ipv4_per_address() -> None:
    limiter = FailureLimiter(max_failures=10, window_s=60)
    neighbours = [f"2001:db8:0:7::{i:x}" for i in range(1, 41)]
    guesses = 0
    for _ in range(10):  # 40 addresses of one /64, ten rounds: 400 guesses if each address had its own budget
        for ip in neighbours:
            if limiter.retry_after(ip, 5.0) == 0:
                limiter.record_failure(ip, 5.0)
                guesses += 1
    assert guesses == 10
    assert all(limiter.retry_after(ip, 6.0) == pytest.approx(59) for ip in neighbours)
    assert limiter.retry_after("2001:db8:0:7:ffff:ffff:ffff:ffff", 6.0) > 0  # anywhere in that /64
    assert limiter.retry_after("2001:db8:0:8::1", 6.0) == 0  # the next /64 is someone else
    assert failure_bucket("2001:DB8:0:7::abcd") == failure_bucket("2001:db8:0:7::1") == "2001:db8:0:7::/64"
    # IPv4 stays per address: each neighbour in a /24 has its own budget
    for i in range(1, 41):
        for _ in range(9):
            limiter.record_failure(f"198.51.100.{i}", 5.0)
    assert all(limiter.retry_after(f"198.51.100.{i}", 6.0) == 0 for i in range(1, 41))
    assert failure_bucket("198.51.100.7") == "198.51.100.7"
    assert failure_bucket("::ffff:198.51.100.7") == "198.51.100.7"


def test_a_flood_of_new_addresses_never_evicts_a_locked_window() -> None:
    limiter = FailureLimiter(max_failures=3, window_s=60, max_entries=100)
    for _ in range(3):
        limiter.record_failure("203.0.113.66", 0.0)
    for i in range(10_000):  # each from its own /24, inside the attacker's window
        limiter.record_failure(f"198.{i // 256}.{i % 256}.7", 1.0 + i / 1000)
        assert len(limiter) <= 100
    assert limiter.retry_after("203.0.113.66", 20.0) == pytest.approx(40)


def test_a_full_table_of_locked_windows_counts_newcomers_in_their_prefix_slot() -> None:
    limiter = FailureLimiter(max_failures=2, window_s=60, max_entries=5)
    for i in range(5):
        for _ in range(2):
            limiter.record_failure(f"10.0.{i}.1", 0.0)
    newcomer = "198.51.100.7"
    limiter.record_failure(newcomer, 1.0)
    assert len(limiter) == 5
    assert all(limiter.retry_after(f"10.0.{i}.1", 1.0) > 0 for i in range(5))  # nobody was unlocked
    assert limiter.retry_after(newcomer, 1.0) == 0  # one wrong key is not a lock, even in overflow
    limiter.record_failure(newcomer, 2.0)
    assert limiter.retry_after(newcomer, 2.0) == pytest.approx(59)  # its slot's window started at 1.0
    assert limiter.retry_after("198.51.100.8", 2.0) > 0  # the /24 shares the slot
    # once the slot's window ends the newcomer may try again, with a window of its own
    assert limiter.retry_after(newcomer, 61.0) == 0
    limiter.record_failure(newcomer, 61.0)
    assert len(limiter) == 1 and limiter.retry_after(newcomer, 61.0) == 0


def test_cycling_through_more_addresses_than_the_table_holds_does_not_reset_counts() -> None:
    # Evicting an unlocked window would forget its count: twenty addresses taking turns on a table of ten
    # would then never lock. The count is folded into the address's overflow slot instead.
    limiter = FailureLimiter(max_failures=3, window_s=60, max_entries=10)
    guesses = 0
    for i in range(1000):
        ip = f"203.0.113.{i % 20 + 1}"
        if limiter.retry_after(ip, 1.0) == 0:
            limiter.record_failure(ip, 1.0)
            guesses += 1
    assert guesses <= limiter.max_entries * 3 + 3  # every window locked, plus what the slot took
    assert all(limiter.retry_after(f"203.0.113.{i}", 1.0) > 0 for i in range(1, 21))


def test_shared_address_lock_is_bounded_and_valid_keys_never_count() -> None:
    # The NAT choice: while locked, right and wrong keys get the same 429 (no oracle); valid keys never
    # count; a lock ends with its window whatever is sent meanwhile; a new lock needs new wrong keys.
    from fastgate.errors import TooManyRequests, Unauthorized
    from fastgate.gate import Forward
    now = [1000.0]
    gate = _gate(auth={"max_failures": 3, "failure_window": 60})
    gate.clock = lambda: now[0]
    nat = "198.51.100.20"
    good = [(b"X-API-Key", KEY.encode())]
    bad = [(b"X-API-Key", BAD_KEY.encode())]

    def send(headers: list[tuple[bytes, bytes]]) -> object:
        return gate.decide(_request(b"GET", b"/api/tags", headers, nat), b"rid")

    for _ in range(2):  # the guesser's wrong keys among the honest users' right ones
        with pytest.raises(Unauthorized):
            send(bad)
        for _ in range(50):
            assert isinstance(send(good), Forward)
    with pytest.raises(Unauthorized):
        send(bad)  # the third wrong key (a hundred right ones did not count): locked
    answers = []
    for headers in (good, bad):
        with pytest.raises(TooManyRequests) as info:
            send(headers)
        answers.append((info.value.status, info.value.message, info.value.extra_headers))
    assert answers[0] == answers[1]  # same answer for right and wrong keys
    for _ in range(100):  # hammering through the lock neither counts nor prolongs it
        now[0] += 0.5
        with pytest.raises(TooManyRequests):
            send(bad)
    now[0] = 1060.0  # the window began with the first wrong key at 1000
    assert isinstance(send(good), Forward)
    for _ in range(2):
        with pytest.raises(Unauthorized):
            send(bad)
    assert isinstance(send(good), Forward)  # two new wrong keys are not yet a new lock


# ---------------------------------------------------------------------------------------------------------
# Trust per key (issue 13, item 8)

def test_one_key_from_many_addresses_keeps_its_cap_and_evicts_no_one_else() -> None:
    table = TrustTable(10)
    table.grant("192.0.2.1", "bob", LABEL, ttl=3600, now=0.0, key_id="key-bob")
    table.grant("192.0.2.2", "carol", LABEL, ttl=3600, now=0.0, key_id="key-carol")
    for i in range(100):
        table.grant(f"198.51.100.{i}", "mallory", LABEL, ttl=3600, now=1.0 + i, key_id="key-mallory")
        assert len(table) <= 10
    assert table.lookup("192.0.2.1", now=200.0) is not None
    assert table.lookup("192.0.2.2", now=200.0) is not None
    held = [i for i in range(100) if table.lookup(f"198.51.100.{i}", now=200.0)]
    assert held == list(range(92, 100))  # its own newest, in what the others left
    # with room to spare, the key still holds no more than the cap: its own oldest go
    roomy = TrustTable(1000)
    roomy.grant("192.0.2.1", "bob", LABEL, ttl=3600, now=0.0, key_id="key-bob")
    for i in range(100):
        roomy.grant(f"198.51.100.{i}", "mallory", LABEL, ttl=3600, now=1.0 + i, key_id="key-mallory")
    held = [i for i in range(100) if roomy.lookup(f"198.51.100.{i}", now=200.0)]
    assert held == list(range(100 - MAX_GRANTS_PER_KEY, 100))
    assert roomy.grants_of("key-mallory") == MAX_GRANTS_PER_KEY and len(roomy) == MAX_GRANTS_PER_KEY + 1


def test_full_table_evicts_expired_then_from_the_key_holding_most() -> None:
    table = TrustTable(6)
    table.grant("192.0.2.1", "carol", LABEL, ttl=50, now=0.0, key_id="c")  # expires first, but alone
    table.grant("192.0.2.9", "dave", LABEL, ttl=5, now=0.0, key_id="d")  # expired by t=10
    for i in range(1, 4):
        table.grant(f"198.51.100.{i}", "alice", LABEL, ttl=100, now=float(i), key_id="a")
    table.grant("203.0.113.1", "bob", LABEL, ttl=100, now=4.0, key_id="b")
    table.grant("203.0.113.2", "erin", LABEL, ttl=100, now=10.0, key_id="e")  # full: the expired one goes
    assert table.lookup("192.0.2.9", now=10.0) is None and len(table) == 6
    table.grant("203.0.113.3", "frank", LABEL, ttl=100, now=11.0, key_id="f")  # alice holds most: her oldest
    assert table.lookup("198.51.100.1", now=11.0) is None
    table.grant("203.0.113.4", "grace", LABEL, ttl=100, now=12.0, key_id="g")  # alice still holds most
    assert table.lookup("198.51.100.2", now=12.0) is None
    # now everyone holds one: the one closest to expiry goes (carol), never more than one per grant
    table.grant("203.0.113.5", "heidi", LABEL, ttl=100, now=13.0, key_id="h")
    assert table.lookup("192.0.2.1", now=13.0) is None
    assert [ip for ip in ("198.51.100.3", "203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4",
                          "203.0.113.5") if table.lookup(ip, now=13.0)] == [
        "198.51.100.3", "203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4", "203.0.113.5"]


def test_regrants_leave_no_stale_expiry_behind() -> None:
    table = TrustTable(10)
    table.grant("192.0.2.1", "alice", LABEL, ttl=10, now=0.0, key_id="a")
    table.grant("192.0.2.1", "alice", LABEL, ttl=100, now=5.0, key_id="a")  # renewed
    assert table.expire(now=20.0) == 0
    assert table.lookup("192.0.2.1", now=20.0) is not None
    for i in range(10_000):  # a client renewing its trust every second
        table.grant("192.0.2.1", "alice", LABEL, ttl=3600, now=20.0 + i, key_id="a")
    assert len(table) == 1 and len(table._expiry) <= 2 + 64 + 1  # the expiry heap is rebuilt, not grown


def test_random_grants_keep_the_caps_and_the_indexes_consistent() -> None:
    rng = random.Random(13)
    table = TrustTable(40, max_grants_per_key=4)
    now = 0.0
    for _ in range(5000):
        now += rng.random()
        op = rng.random()
        if op < 0.7:
            key = rng.randrange(30)
            before = {ip: g for ip, g in table._grants.items() if g.expires_at > now}
            counts = {k: table.grants_of(k) for k in {g.key_id for g in before.values()}}
            ip = f"10.{key}.0.{rng.randrange(8)}"
            ttl = rng.choice((5.0, 30.0, 300.0))
            table.grant(ip, f"user{key % 7}", LABEL, ttl=ttl, now=now, key_id=f"{key}")
            lost = [g for a, g in before.items() if a != ip and table.lookup(a, now) is None]
            assert len(lost) <= 1
            for g in lost:  # the key's own grant beyond its cap, or one of a key holding the most
                assert g.key_id == f"{key}" or counts[g.key_id] == max(counts.values())
        elif op < 0.9:
            table.lookup(f"10.{rng.randrange(30)}.0.{rng.randrange(8)}", now)
        elif op < 0.97:
            table.expire(now)
        else:
            table.revoke_user(f"user{rng.randrange(7)}")
        assert len(table) <= 40
        held: dict[str, int] = {}
        for g in table._grants.values():
            held[g.key_id] = held.get(g.key_id, 0) + 1
        assert all(n <= 4 and table.grants_of(k) == n for k, n in held.items())
        assert {n: set(hs) for n, hs in table._by_count.items()} == {
            n: {("key", k) for k, c in held.items() if c == n} for n in set(held.values())}
