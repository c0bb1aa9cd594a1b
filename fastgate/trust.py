"""IP trust: after a successful `POST /auth`, requests from that IP need no key for a while.

Serves clients that cannot send headers (Ollama's own CLI). Pure: the caller passes `now` (monotonic
seconds), so expiry is tested without sleeping. The table is bounded: when full, expired entries go first,
then the entry closest to expiry, so a flood of /auth calls cannot grow memory without limit.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TrustGrant:
    user: str
    key_label: str  # masked key it was granted with, for logs
    expires_at: float  # monotonic seconds


class TrustTable:
    __slots__ = ("_grants", "max_entries")

    def __init__(self, max_entries: int) -> None:
        self._grants: dict[str, TrustGrant] = {}
        self.max_entries = max_entries

    def grant(self, ip: str, user: str, key_label: str, ttl: float, now: float) -> TrustGrant:
        grant = TrustGrant(user, key_label, now + ttl)
        self._grants.pop(ip, None)
        if len(self._grants) >= self.max_entries:
            self.expire(now)
        while len(self._grants) >= self.max_entries:
            soonest = min(self._grants, key=lambda k: self._grants[k].expires_at)
            del self._grants[soonest]
        self._grants[ip] = grant
        return grant

    def lookup(self, ip: str, now: float) -> TrustGrant | None:
        grant = self._grants.get(ip)
        if grant is None:
            return None
        if grant.expires_at <= now:
            del self._grants[ip]
            return None
        return grant

    def revoke_user(self, user: str) -> None:
        for ip in [ip for ip, g in self._grants.items() if g.user == user]:
            del self._grants[ip]

    def expire(self, now: float) -> int:
        stale = [ip for ip, g in self._grants.items() if g.expires_at <= now]
        for ip in stale:
            del self._grants[ip]
        return len(stale)

    def __len__(self) -> int:
        return len(self._grants)

    def __repr__(self) -> str:
        return f"TrustTable({len(self._grants)}/{self.max_entries})"


def client_ip(peer_ip: str, forwarded_for: Iterable[bytes], trusted_proxies: tuple[Network, ...]) -> str:
    """The address a request is attributed to.

    `X-Forwarded-For` is believed only when the TCP peer is a configured trusted proxy; then the
    rightmost address that is not itself a trusted proxy is the client (entries to its left could have
    been written by anyone).
    """
    if not trusted_proxies or not in_networks(peer_ip, trusted_proxies):
        return peer_ip
    hops = [h.strip() for v in forwarded_for for h in v.decode("latin-1").split(",") if h.strip()]
    hop = peer_ip
    for text in reversed(hops):
        try:
            hop = canonical_ip(text)
        except ValueError:
            return peer_ip  # a proxy we trust wrote garbage: believe nothing it said
        if not in_networks(hop, trusted_proxies):
            return hop
    return hop


def canonical_ip(text: str) -> str:
    """One spelling per address (`2001:DB8::1` == `2001:db8::1`; `::ffff:10.0.0.1` == `10.0.0.1`), so the
    trust table and proxy checks cannot be sidestepped by writing an address differently."""
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def in_networks(ip: str, networks: tuple[Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)
