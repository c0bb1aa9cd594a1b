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
    key_id: str = ""  # the key it was granted with: its scope and limits apply, and revoking it ends the trust


class TrustTable:
    __slots__ = ("_grants", "max_entries")

    def __init__(self, max_entries: int) -> None:
        self._grants: dict[str, TrustGrant] = {}
        self.max_entries = max_entries

    def grant(self, ip: str, user: str, key_label: str, ttl: float, now: float, key_id: str = "") -> TrustGrant:
        grant = TrustGrant(user, key_label, now + ttl, key_id)
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

    def retain_users(self, users: set[str]) -> None:
        """Drop grants of users who no longer have a key (after a reload removed it)."""
        for ip in [ip for ip, g in self._grants.items() if g.user not in users]:
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


class FailureLimiter:
    """Failed key checks per client address, counted in fixed windows.

    Once an address reaches `max_failures` in a window it is refused (429) until that window ends, whatever
    key it sends: answering a correct guess differently would keep the guessing oracle open. Other
    addresses are not touched. Bounded like the trust table; `now` is passed in.
    """

    __slots__ = ("max_failures", "window_s", "max_entries", "_windows")

    def __init__(self, max_failures: int, window_s: float, max_entries: int = 10000) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_entries = max_entries
        self._windows: dict[str, list[float]] = {}  # ip -> [window start, failures]

    def retry_after(self, ip: str, now: float) -> float:
        """Seconds until `ip` may try a key again; 0 when it may now."""
        window = self._windows.get(ip)
        if window is None or not self.max_failures:
            return 0.0
        if now - window[0] >= self.window_s:
            del self._windows[ip]
            return 0.0
        return window[0] + self.window_s - now if window[1] >= self.max_failures else 0.0

    def record_failure(self, ip: str, now: float) -> None:
        if not self.max_failures:
            return
        window = self._windows.get(ip)
        if window is None or now - window[0] >= self.window_s:
            if window is None and len(self._windows) >= self.max_entries:
                self._evict(now)
            self._windows[ip] = [now, 1]
        else:
            window[1] += 1

    def _evict(self, now: float) -> None:
        stale = [ip for ip, w in self._windows.items() if now - w[0] >= self.window_s]
        for ip in stale:
            del self._windows[ip]
        while len(self._windows) >= self.max_entries:
            del self._windows[next(iter(self._windows))]  # the oldest window goes first

    def __len__(self) -> int:
        return len(self._windows)


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
