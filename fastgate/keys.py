"""API keys: where a request carries one, how it is removed before forwarding, how it is checked.

Pure functions over bytes and strings; no I/O. Keys are secrets: `PresentedKey.__repr__` masks them so an
accidental log or traceback never shows one, and the key ring looks keys up by digest so checking a key
takes the same time however many of its characters are right.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from json.decoder import scanstring
from urllib.parse import unquote_plus

from .access import Principal
from .gojson import UnreadableBody, remove_members, scan_object

try:  # CPython's own SHA-256: the same digest as OpenSSL's, for about a quarter fewer instructions per key
    from _sha256 import sha256 as _sha256  # type: ignore[import-not-found]  # Python 3.11
except ImportError:  # pragma: no cover
    try:
        from _sha2 import sha256 as _sha256  # type: ignore[import-not-found,no-redef]  # 3.12+
    except ImportError:
        _sha256 = hashlib.sha256  # type: ignore[assignment]

QUERY_KEY_NAME = "api_key"
BODY_KEY_NAME = "api_key"
# Headers that carry keys: removed from every forwarded request, whichever of them held the key,
# so a second (perhaps different) key never reaches Ollama either.
KEY_HEADERS = (b"x-api-key", b"authorization")


class KeySource(enum.Enum):
    X_API_KEY = "x-api-key"
    BEARER = "bearer"
    BASIC = "basic"
    AUTHORIZATION = "authorization"
    QUERY = "query"
    BODY = "body"


@dataclass(frozen=True, slots=True)
class PresentedKey:
    source: KeySource
    secret: str

    @property
    def masked(self) -> str:
        return mask(self.secret)

    @property
    def label(self) -> str:
        """How logs name this key: `x-api-key:api-****0101`. Never the full key."""
        # Masked as `mask` does, written out: this runs for every request with a key. _value_, as
        # Enum.value is a descriptor call.
        secret = self.secret
        if len(secret) >= 16:
            return f"{self.source._value_}:{secret[:4]}****{secret[-4:]}"
        return f"{self.source._value_}:{mask(secret)}"

    def __repr__(self) -> str:
        return f"PresentedKey({self.source.value}, {self.masked})"

    __str__ = __repr__


# A frozen dataclass's __init__ sets each field through object.__setattr__; the slots' own setters, called
# directly on a bare instance, build the same object for a third less (once or twice per request).
_new_object = object.__new__
_set_source = PresentedKey.source.__set__  # type: ignore[attr-defined]
_set_secret = PresentedKey.secret.__set__  # type: ignore[attr-defined]


def _presented(source: KeySource, secret: str) -> PresentedKey:
    key = _new_object(PresentedKey)
    _set_source(key, source)
    _set_secret(key, secret)
    return key


def mask(secret: str) -> str:
    """`api-20250312000101` -> `api-****0101`: at most half of a key shows; short keys show less, tiny ones nothing."""
    if len(secret) >= 16:
        return f"{secret[:4]}****{secret[-4:]}"
    if len(secret) >= 10:
        return f"****{secret[-4:]}"
    return "****"


def key_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> PresentedKey | None:
    """First key found in X-API-Key, then Authorization (Bearer, Basic password, or the bare value).

    `headers` are (lowercase name, value) pairs as h11 gives them.
    """
    authorization: bytes | None = None
    for name, value in headers:
        if name == b"x-api-key":
            secret = value.decode("latin-1").strip()
            if secret:
                return _presented(KeySource.X_API_KEY, secret)
        elif name == b"authorization" and authorization is None:
            authorization = value
    if authorization is None:
        return None
    return _key_from_authorization(authorization.decode("latin-1").strip())


def _key_from_authorization(value: str) -> PresentedKey | None:
    if not value:
        return None
    scheme, _, rest = value.partition(" ")
    rest = rest.strip()
    lowered = scheme.lower()
    if lowered == "bearer":
        return _presented(KeySource.BEARER, rest) if rest else None
    if lowered == "basic":
        if not rest:
            return None
        # `http://user:KEY@host` URLs (LangChain's base_url) arrive as Basic: the password is the key.
        try:
            user, _, password = base64.b64decode(rest, validate=True).decode("utf-8").partition(":")
        except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII input to b64decode
            return None
        secret = password or user
        return PresentedKey(KeySource.BASIC, secret) if secret else None
    return PresentedKey(KeySource.AUTHORIZATION, value)


def split_query_key(query: bytes) -> tuple[PresentedKey | None, bytes]:
    """Find `api_key=` in a raw query string; return it and the query without every api_key parameter.

    Other parameters are kept byte for byte, in order.
    """
    # find(), not `in`: a bytes needle's membership test costs several times a find() in CPython 3.11.
    if not query or (query.find(b"api_key") < 0 and query.find(b"%") < 0):
        return None, query
    found: PresentedKey | None = None
    kept: list[bytes] = []
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if unquote_plus(name.decode("latin-1")) == QUERY_KEY_NAME:
            secret = unquote_plus(value.decode("latin-1"))
            if found is None and secret:
                found = PresentedKey(KeySource.QUERY, secret)
            continue
        kept.append(part)
    if len(kept) == query.count(b"&") + 1:
        return None, query
    return found, b"&".join(kept)


def split_body_key(body: bytes) -> tuple[PresentedKey | None, bytes]:
    """Find a top-level `"api_key"` string in a JSON object body; return it and the body without it.

    The body is read once with `gojson`, exactly as Ollama's Go decoder reads it. Every member named exactly
    `api_key` is removed (so no copy of a key reaches Ollama), with one adjacent separator each; every other
    byte stays as it was. The key is the last of them, as a JSON decoder keeps the last duplicate, and only
    if it is a non-empty string. A body that is not one readable JSON object (bad JSON, data after it) is
    returned unchanged with no key.
    """
    # A key named api_key is written either literally or with \u escapes: skip the parse for other bodies.
    if body.find(b'"api_key"') < 0 and body.find(b"\\u") < 0:
        return None, body
    try:
        members = scan_object(body)
    except UnreadableBody:
        return None, body
    if members is None:
        return None, body
    last = next((member for member in reversed(members) if member.name == BODY_KEY_NAME), None)
    if last is None:
        return None, body
    found: PresentedKey | None = None
    if last.kind == "string":
        secret = last.text
        if secret is None:
            # Invalid UTF-8 or a lone surrogate escape: still the key the client sent (it will not match any
            # key, and a wrong key counts as one), read leniently instead of as Go's U+FFFD.
            secret = scanstring(str(body[last.value_start:last.end], "utf-8", "surrogateescape"), 1, True)[0]
        if secret:
            found = PresentedKey(KeySource.BODY, secret)
    return found, remove_members(body, members, BODY_KEY_NAME)


_DIGEST_KEY = re.compile(r"sha256:([0-9a-fA-F]{64})")


class KeyRing:
    """The valid keys, indexed by SHA-256 digest so lookups never compare secrets character by character.

    Holds the config file's `[keys]` (a key may be written as `"sha256:<hex>"`, its digest, so the file need
    not hold the secret; those keys act as admins with no limits, as they always have) and the managed keys
    of the key store, already resolved to principals.
    """

    __slots__ = ("_by_digest", "_by_id", "_labels")

    def __init__(self, keys: Mapping[str, str], managed: Mapping[bytes, Principal] | None = None) -> None:
        by_digest: dict[bytes, Principal] = {}
        for secret, user in keys.items():
            match = _DIGEST_KEY.fullmatch(secret)
            digest = bytes.fromhex(match.group(1)) if match else _digest(secret)
            by_digest[digest] = Principal(user, config_key_id(digest))
        by_digest.update(managed or {})
        self._by_digest = by_digest
        self._by_id = {p.key_id: p for p in by_digest.values()}
        # digest -> (source, label) of the last presentation of each valid key: a key's label is a function
        # of its secret and source, and clients present a key the same way each time. At most one per key.
        self._labels: dict[bytes, tuple[KeySource, str]] = {}

    def principal_for(self, secret: str, now: float | None = None) -> Principal | None:
        """The principal a key stands for; `now` (epoch seconds) also rules out expired managed keys."""
        principal = self._by_digest.get(_digest(secret))
        if principal is None:
            return None
        if now is not None and principal.expires_at is not None and principal.expired(now):
            return None
        return principal

    def identify(self, key: PresentedKey, now: float | None = None) -> tuple[Principal, str] | None:
        """`principal_for(key.secret, now)` and `key.label`, or None for a wrong (or expired) key."""
        digest = _digest(key.secret)
        principal = self._by_digest.get(digest)
        if principal is None:
            return None
        if now is not None and principal.expires_at is not None and principal.expired(now):
            return None
        labelled = self._labels.get(digest)
        source = key.source
        if labelled is not None and labelled[0] is source:
            return principal, labelled[1]
        label = key.label
        self._labels[digest] = (source, label)
        return principal, label

    def user_for(self, secret: str) -> str | None:
        principal = self._by_digest.get(_digest(secret))
        return principal.user if principal is not None else None

    def by_id(self, key_id: str, now: float | None = None) -> Principal | None:
        principal = self._by_id.get(key_id)
        if principal is None or (now is not None and principal.expired(now)):
            return None
        return principal

    def __len__(self) -> int:
        return len(self._by_digest)

    def __repr__(self) -> str:
        return f"KeyRing({len(self._by_digest)} keys)"


def config_key_id(digest: bytes) -> str:
    """A config key's id: from its digest, so two keys never share one (IP trust and usage follow the id).

    Never derived from the masked form, which many keys share. 64 bits of the digest are unique among any
    realistic number of keys; like the digests the key store keeps, they let someone holding the usage
    ledger test guesses of a weak key offline, which is why keys should be long and random. A key written
    in the file as `sha256:<hex>` gets the same id as the clear key it stands for.
    """
    return f"config:{digest[:8].hex()}"


def _digest(secret: str) -> bytes:
    try:
        data = secret.encode()
    except UnicodeEncodeError:
        # surrogatepass: a JSON body can carry lone surrogates ("\ud800"); they must hash, not raise. (Strict
        # UTF-8 first: the same bytes for every other string, and cheaper.)
        data = secret.encode("utf-8", "surrogatepass")
    return _sha256(data).digest()
