"""Client addresses, IP trust and guess limiting: the per-address state the gate keeps.

Everything here is pure: the caller passes `now` (monotonic seconds), so expiry is tested without sleeping.
Every table is bounded and every per-request call is O(1) (amortised), because the gate consults them on
every keyless or wrong-key request, which is exactly what a flood sends.

Addresses (`client_ip`)
    Behind a trusted proxy the client is the rightmost `X-Forwarded-For` hop that is not itself a trusted
    proxy. Hops may carry a port or IPv6 brackets (`198.51.100.9:40000`, `[2001:db8::1]:443`, the format of
    Azure Application Gateway); those are stripped. A hop that still does not parse is not an address we
    can attribute the request to, and it is never attributed to the proxy's own address (which may hold IP
    trust, and then everyone behind the proxy would share it). The request gets the sentinel
    `unattributed-via-<proxy>` instead: it never matches a network, `TrustTable.grant` refuses it (403: there
    is no address to trust), so it can hold no trust; and it has its own guess-limiting window, shared by
    everything that proxy sends unreadably, so wrong keys sent that way are still counted.

IP trust (`TrustTable`)
    After a successful `POST /auth`, requests from that exact address need no key for a while (clients that
    cannot send headers, like Ollama's CLI). One key holds at most `MAX_GRANTS_PER_KEY` addresses: granting
    beyond that replaces that key's own oldest grant, so a key `POST /auth`-ing from many addresses can only
    churn its own entries. When the table is full, expired grants go first, then a grant of the key holding
    the most, so a key holding one grant loses it only when no key holds more.

Guess limiting (`FailureLimiter`)
    Wrong keys are counted per fixed window of `failure_window` seconds that starts at the first wrong key.
    An IPv4 address is its own bucket; IPv6 addresses count per /64, because one host usually holds a whole
    /64 and could otherwise rotate through it for fresh budgets. A bucket that reaches `max_failures` gets
    429 for every key until its window ends, whatever the key: answering a correct key differently would
    confirm a guess.

    Shared addresses (NAT, one /64 for a whole LAN): honest users and a guesser behind one address cannot be
    told apart while it is locked. Serving a key during a lock, even only a key recently seen succeeding from
    there, would let the guesser test guesses at an unlimited rate against exactly the keys in use. So the
    design keeps locks short and hard to prolong instead: a lock ends when its window ends (at most
    `failure_window` after the first wrong key) and nothing sent during it prolongs it (the gate answers 429
    before checking, and does not count, the key); valid keys never count; a new lock needs `max_failures`
    new wrong keys; so one burst of wrong keys costs the people behind that address at most one window, which
    a client that retries a 429 after `Retry-After` rides out. A shorter lock, or a higher limit for addresses
    seen to be shared, was rejected: both hand the guesser more guesses per window, and a guesser that keeps
    sending `max_failures` wrong keys per window keeps any such scheme locked just the same.

    Full table: a locked window is never evicted (else flooding from many addresses would unlock an
    attacker). Expired windows go first, then the oldest unlocked one, whose count is not forgotten but folded
    into an overflow slot (else taking turns from more addresses than the table holds would evict every window
    before it locks); a new bucket that finds every entry locked is counted in an overflow slot too. There are
    `OVERFLOW_SLOTS` slots, chosen by a hash of the bucket's coarse prefix (IPv4 /24, IPv6 /48), each a window
    like any other, and an address with no window of its own is refused while its slot is locked. Memory stays
    bounded and nobody is unlocked; the price is collateral, and the coarse prefix keeps it near the flooder
    (a flood from one IPv6 /48 locks one slot). Slots only fill once more prefixes failed within one window
    than the table holds, so ordinary traffic never meets them.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import Forbidden

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Addresses one key may hold IP trust for at once (a person's machines; more is a key being passed around).
MAX_GRANTS_PER_KEY = 16
# What a request whose forwarded client hop does not parse is attributed to: followed by the proxy's address.
UNATTRIBUTED_PREFIX = "unattributed-via-"
# Guess limiting counts IPv6 per /64 (4 groups of 16 bits): the usual allocation of one host or one LAN.
GUESS_IPV6_GROUPS = 4
# Overflow slots of the failure limiter, and the coarse prefixes hashed into them: IPv4 /24, IPv6 /48.
OVERFLOW_SLOTS = 4096
OVERFLOW_IPV4_OCTETS = 3
OVERFLOW_IPV6_GROUPS = 3
_IPV6_BUCKET_SUFFIX = f"::/{16 * GUESS_IPV6_GROUPS}"
# The expiry heap may hold this many stale entries beyond twice the live ones before it is rebuilt.
_HEAP_SLACK_ENTRIES = 64
_MAX_PORT = 65535


# ---------------------------------------------------------------------------------------------------------
# IP trust

@dataclass(frozen=True, slots=True)
class TrustGrant:
    user: str
    key_label: str  # masked key it was granted with, for logs
    expires_at: float  # monotonic seconds
    key_id: str = ""  # the key it was granted with: its scope and limits apply, and revoking it ends the trust


# Who a grant counts against for MAX_GRANTS_PER_KEY: its key, or its user for grants made without a key id.
_Holder = tuple[str, str]


def _holder(grant: TrustGrant) -> _Holder:
    return ("key", grant.key_id) if grant.key_id else ("user", grant.user)


class TrustTable:
    __slots__ = ("_grants", "_held", "_by_count", "_expiry", "_seq", "max_entries", "max_grants_per_key")

    def __init__(self, max_entries: int, max_grants_per_key: int = MAX_GRANTS_PER_KEY) -> None:
        self._grants: dict[str, TrustGrant] = {}
        # holder -> its addresses, in grant order
        self._held: dict[_Holder, dict[str, None]] = {}
        # n -> holders holding exactly n grants, in the order they got there: finds the biggest holder in
        # O(max_grants_per_key) without scanning the table
        self._by_count: dict[int, OrderedDict[_Holder, None]] = {}
        # (expires_at, seq, ip, grant) min-heap, so expired grants are found without scanning; entries whose
        # grant was replaced or dropped are stale and skipped when they surface
        self._expiry: list[tuple[float, int, str, TrustGrant]] = []
        self._seq = itertools.count()
        self.max_entries = max_entries
        self.max_grants_per_key = max_grants_per_key

    def grant(self, ip: str, user: str, key_label: str, ttl: float, now: float, key_id: str = "") -> TrustGrant:
        """Trust `ip` as `user` for `ttl` seconds. Raises Forbidden for a request that has no address."""
        if ip.startswith(UNATTRIBUTED_PREFIX):
            raise Forbidden("this gateway cannot read your address from the X-Forwarded-For header its proxy "
                            "sent, so it cannot trust it: send the key with every request instead")
        grant = TrustGrant(user, key_label, now + ttl, key_id)
        self._remove(ip)
        held = self._held.get(_holder(grant))
        while held and len(held) >= self.max_grants_per_key:
            self._remove(self._soonest(held))  # this key's own oldest grant, never someone else's
        if len(self._grants) >= self.max_entries:
            self.expire(now)
        while self._grants and len(self._grants) >= self.max_entries:
            self._remove(self._victim())
        self._add(ip, grant)
        return grant

    def lookup(self, ip: str, now: float) -> TrustGrant | None:
        grant = self._grants.get(ip)
        if grant is None:
            return None
        if grant.expires_at <= now:
            self._remove(ip)
            return None
        return grant

    def revoke_user(self, user: str) -> None:
        for ip in [ip for ip, g in self._grants.items() if g.user == user]:
            self._remove(ip)

    def retain_users(self, users: set[str]) -> None:
        """Drop grants of users who no longer have a key (after a reload removed it)."""
        for ip in [ip for ip, g in self._grants.items() if g.user not in users]:
            self._remove(ip)

    def expire(self, now: float) -> int:
        """Drop expired grants; how many there were."""
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, _, ip, grant = heapq.heappop(self._expiry)
            if self._grants.get(ip) is grant:
                self._remove(ip)
                dropped += 1
        return dropped

    def grants_of(self, key_id: str) -> int:
        """How many addresses the key `key_id` holds trust for."""
        return len(self._held.get(("key", key_id), ()))

    def _add(self, ip: str, grant: TrustGrant) -> None:
        self._grants[ip] = grant
        holder = _holder(grant)
        held = self._held.setdefault(holder, {})
        held[ip] = None
        self._recount(holder, len(held) - 1, len(held))
        heapq.heappush(self._expiry, (grant.expires_at, next(self._seq), ip, grant))
        if len(self._expiry) > 2 * len(self._grants) + _HEAP_SLACK_ENTRIES:
            # Rebuilt after at least as many pushes as live grants: amortised O(1) per grant.
            self._expiry = [(g.expires_at, next(self._seq), a, g) for a, g in self._grants.items()]
            heapq.heapify(self._expiry)

    def _remove(self, ip: str) -> None:
        grant = self._grants.pop(ip, None)
        if grant is None:
            return
        holder = _holder(grant)
        held = self._held[holder]
        del held[ip]
        self._recount(holder, len(held) + 1, len(held))
        if not held:
            del self._held[holder]

    def _recount(self, holder: _Holder, old: int, new: int) -> None:
        if old:
            holders = self._by_count[old]
            del holders[holder]
            if not holders:
                del self._by_count[old]
        if new:
            self._by_count.setdefault(new, OrderedDict())[holder] = None

    def _soonest(self, held: dict[str, None]) -> str:
        # At most max_grants_per_key addresses; on equal expiry the first granted wins.
        return min(held, key=lambda ip: self._grants[ip].expires_at)

    def _victim(self) -> str:
        """The grant to evict from a full table: of the key holding the most, the one closest to expiry."""
        most = max(self._by_count)  # at most max_grants_per_key distinct counts
        return self._soonest(self._held[next(iter(self._by_count[most]))])

    def __len__(self) -> int:
        return len(self._grants)

    def __repr__(self) -> str:
        return f"TrustTable({len(self._grants)}/{self.max_entries})"


# ---------------------------------------------------------------------------------------------------------
# Guess limiting

class FailureLimiter:
    """Wrong keys per bucket (IPv4 address, IPv6 /64), counted in fixed windows; see the module docstring.

    Once a bucket reaches `max_failures` in a window it is refused (429) until that window ends, whatever key
    it sends. Other buckets are not touched, except through a locked overflow slot while the table is full.
    """

    __slots__ = ("_max_failures", "window_s", "max_entries", "_windows", "_open", "_overflow")

    def __init__(self, max_failures: int, window_s: float, max_entries: int = 10000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        # bucket -> [window start, failures], in order of window start (`now` never goes back), so expired
        # windows are always at the front
        self._windows: OrderedDict[str, list[float]] = OrderedDict()
        # the buckets of `_windows` below max_failures (evictable), in the same order
        self._open: OrderedDict[str, None] = OrderedDict()
        # slot -> [window start, failures]: at most OVERFLOW_SLOTS entries
        self._overflow: dict[int, list[float]] = {}
        self._max_failures = max_failures

    @property
    def max_failures(self) -> int:
        return self._max_failures

    @max_failures.setter
    def max_failures(self, value: int) -> None:
        # A reload may move the limit: which windows are locked (never evicted) changes with it.
        self._max_failures = value
        self._open = OrderedDict((b, None) for b, w in self._windows.items() if w[1] < value)

    def retry_after(self, ip: str, now: float) -> float:
        """Seconds until `ip` may try a key again; 0 when it may now."""
        if not self._max_failures or not (self._windows or self._overflow):
            return 0.0
        bucket = failure_bucket(ip)
        window = self._windows.get(bucket)
        if window is not None and now - window[0] >= self.window_s:
            self._drop(bucket)
            window = None
        if window is None and self._overflow:
            # No window of its own (new, or folded away while the table was full): its slot speaks for it.
            window = self._slot_window(_overflow_slot(bucket), now)
        if window is None or window[1] < self._max_failures:
            return 0.0
        return window[0] + self.window_s - now

    def record_failure(self, ip: str, now: float) -> None:
        if not self._max_failures:
            return
        bucket = failure_bucket(ip)
        window = self._windows.get(bucket)
        if window is not None:
            if now - window[0] < self.window_s:
                self._count(bucket, window)
                return
            self._drop(bucket)
        if len(self._windows) >= self.max_entries:
            self._make_room(now)
        if len(self._windows) < self.max_entries:
            window = self._windows[bucket] = [now, 0]
            self._open[bucket] = None
            self._count(bucket, window)
        else:  # every entry is locked
            self._fold(_overflow_slot(bucket), 1, now)

    def lock(self, bucket: str, left_s: float, now: float) -> None:
        """Lock `bucket` (a `failure_bucket`) for the `left_s` seconds left of a window that reached the limit
        elsewhere (another instance, counted in the shared state): refused here as if counted here."""
        if not self._max_failures or left_s <= 0:
            return
        self._windows.pop(bucket, None)
        self._open.pop(bucket, None)
        # Bounded like record_failure: other instances' locks arrive as fast as attackers lock buckets there.
        if len(self._windows) >= self.max_entries:
            self._make_room(now)
        if len(self._windows) >= self.max_entries:  # every entry is locked: its overflow slot speaks for it
            self._fold(_overflow_slot(bucket), self._max_failures, now)
            return
        # Ends when the shared window ends; kept at the back (the front's windows may end later, which costs
        # _make_room only an early stop, never an unlock).
        self._windows[bucket] = [now + left_s - self.window_s, float(self._max_failures)]

    def _count(self, bucket: str, window: list[float]) -> None:
        window[1] += 1
        if window[1] >= self._max_failures:
            self._open.pop(bucket, None)  # locked: no longer evictable

    def _drop(self, bucket: str) -> None:
        del self._windows[bucket]
        self._open.pop(bucket, None)

    def _make_room(self, now: float) -> None:
        while self._windows:
            bucket, window = next(iter(self._windows.items()))
            if now - window[0] < self.window_s:
                break
            self._drop(bucket)
        if len(self._windows) >= self.max_entries and self._open:
            bucket, _ = self._open.popitem(last=False)
            window = self._windows.pop(bucket)
            # Folded, not forgotten: otherwise cycling through more buckets than the table holds would evict
            # each window before it locks, for unlimited guesses.
            self._fold(_overflow_slot(bucket), int(window[1]), now)

    def _slot_window(self, slot: int, now: float) -> list[float] | None:
        window = self._overflow.get(slot)
        if window is not None and now - window[0] >= self.window_s:
            del self._overflow[slot]
            return None
        return window

    def _fold(self, slot: int, failures: int, now: float) -> None:
        window = self._slot_window(slot, now)
        if window is None:
            self._overflow[slot] = [now, failures]
        else:
            window[1] += failures

    def __len__(self) -> int:
        return len(self._windows)


def failure_bucket(ip: str) -> str:
    """The guess-limiting bucket of a client address: itself for IPv4, its /64 for IPv6."""
    if ":" not in ip or ip.startswith(UNATTRIBUTED_PREFIX):
        return ip  # IPv4 (or no address at all): no parsing on the common path
    try:
        addr = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    # Spelled out group by group ("2001:db8:0:7::/64"): building an IPv6Network costs five times as much.
    value = int(addr)
    groups = (f"{value >> (112 - 16 * i) & 0xFFFF:x}" for i in range(GUESS_IPV6_GROUPS))
    return ":".join(groups) + _IPV6_BUCKET_SUFFIX


def _overflow_slot(bucket: str) -> int:
    """The overflow slot of a bucket: a hash of its coarse prefix. String hashes are salted per process, so a
    flooder cannot aim at the slot of someone else's prefix."""
    if bucket.startswith(UNATTRIBUTED_PREFIX):
        coarse = bucket
    elif bucket.endswith(_IPV6_BUCKET_SUFFIX):
        coarse = ":".join(bucket.split(":")[:OVERFLOW_IPV6_GROUPS])  # "2001:db8:0"
    else:  # an IPv4 address, canonical: its first octets ("198.51.100")
        coarse = ".".join(bucket.split(".")[:OVERFLOW_IPV4_OCTETS])
    return hash(coarse) % OVERFLOW_SLOTS


# ---------------------------------------------------------------------------------------------------------
# Client addresses

def client_ip(peer_ip: str, forwarded_for: Iterable[bytes], trusted_proxies: tuple[Network, ...]) -> str:
    """The address a request is attributed to.

    `X-Forwarded-For` is believed only when the TCP peer is a configured trusted proxy; then the
    rightmost address that is not itself a trusted proxy is the client (entries to its left could have
    been written by anyone). A hop that does not parse where the client should be gives
    `unattributed-via-<peer>`: never the proxy's own address, which may hold trust.
    """
    if not trusted_proxies or not in_networks(peer_ip, trusted_proxies):
        return peer_ip
    hops = [h.strip() for v in forwarded_for for h in v.decode("latin-1").split(",") if h.strip()]
    hop = peer_ip
    for text in reversed(hops):
        try:
            hop = hop_address(text)
        except ValueError:
            return UNATTRIBUTED_PREFIX + peer_ip  # a proxy we trust wrote something else: attribute to no one
        if not in_networks(hop, trusted_proxies):
            return hop
    return hop


def hop_address(text: str) -> str:
    """The canonical address of one `X-Forwarded-For` hop, with any port and IPv6 brackets stripped:
    `198.51.100.9:40000`, `[2001:db8::1]:443` and `[2001:db8::1]` all name an address; a bare IPv6 address
    has colons of its own and is never read as host:port. ValueError for anything else."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            raise ValueError(f"not an address: {text!r}")
        addr: Address = ipaddress.IPv6Address(host)  # brackets enclose IPv6 only
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _is_port(port):
            raise ValueError(f"not an address: {text!r}")
        addr = ipaddress.IPv4Address(host)
    else:
        addr = ipaddress.ip_address(text)
    return _canonical(addr)


def _is_port(text: str) -> bool:
    # isdigit() alone would also take other scripts' digits ("٤٤٣"); ports are ASCII.
    return text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= _MAX_PORT


def canonical_ip(text: str) -> str:
    """One spelling per address (`2001:DB8::1` == `2001:db8::1`; `::ffff:10.0.0.1` == `10.0.0.1`), so the
    trust table and proxy checks cannot be sidestepped by writing an address differently."""
    return _canonical(ipaddress.ip_address(text))


def _canonical(addr: Address) -> str:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def in_networks(ip: str, networks: tuple[Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)
