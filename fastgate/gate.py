"""The policy for one request: answer it here, read its body first, or forward it (and how).

Pure: no sockets, no logging, no awaiting. The I/O layer hands in a parsed request head (and, when asked
for it, the buffered body) and gets back a decision or a `GateError` to answer with. Shared state (the
IP-trust table) changes only in these plain methods; time comes from injected clocks.
"""

from __future__ import annotations

import ipaddress
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import unquote_to_bytes

from . import __version__
from .config import Config
from .cors import allowed_origin, is_preflight, preflight_headers, response_headers
from .errors import (
    BadRequest, Forbidden, GateError, MethodNotAllowed, TooManyRequests, Unauthorized, UnsupportedMediaType,
)
from .access import (
    Principal, Role, judges_models, missing_scope, model_refusal, web_tools_refusal,
)
from .limits import KeyLimits
from .keys import KeyRing, KeySource, PresentedKey, key_from_headers, split_body_key, split_query_key
from .messages import forwardable_headers, json_body, origin_form, upstream_request_head
from .requested import NOTHING, BufferedBody, Requested, Route, Unreadable, read_requested, route_for
from .routing.aggregate import FanOut, fan_out_for
from .trust import FailureLimiter, TrustTable, client_ip, in_networks

AUTH_BODY_LIMIT_BYTES = 64 * 1024
BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})
# Ollama endpoints that act on the server owner's ollama.com identity (wire doc section 5).
ACCOUNT_PATHS = (b"/api/me", b"/api/signout")
ACCOUNT_PREFIXES = (b"/api/user/keys",)
BLOB_PREFIX = b"/api/blobs/"
# Log labels of credentials a browser sends by itself (IP trust, cached Basic credentials).
AMBIENT_LABELS = ("ip-trust:", "basic:")
BACKEND_HEADER = b"x-fastgate-backend"  # an admin's choice of backend (issue 9); removed for everyone
# Routes that run a model on Ollama, so take one of a backend's max_parallel slots (issue 9 rule 2); the
# rest (/api/show, /api/tags, /api/version, pulls...) neither take nor wait for one.
RUNS_MODEL_PATHS = frozenset({
    b"/api/generate", b"/api/chat", b"/api/embed", b"/api/embeddings", b"/v1/chat/completions",
    b"/v1/completions", b"/v1/embeddings", b"/v1/responses", b"/v1/messages", b"/v1/audio/transcriptions",
})


_UNREAD = object()


@dataclass(slots=True)
class IncomingRequest:
    """What the gate needs to know about a parsed request head."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # lowercase names, as h11 gives them
    raw_headers: list[tuple[bytes, bytes]]  # original case, forwarded
    http_version: bytes
    peer_ip: str
    tls: bool
    content_length: int | None  # None: chunked, or no body
    chunked: bool
    # The key its headers carry (`header_key`), read once: the gate asks up to three times per request.
    _header_key: PresentedKey | None | object = field(default=_UNREAD, init=False, repr=False, compare=False)

    @property
    def header_key(self) -> PresentedKey | None:
        """`key_from_headers(self.headers)`, worked out on first use (the headers do not change)."""
        key = self._header_key
        if key is _UNREAD:
            key = self._header_key = key_from_headers(self.headers)
        return key  # type: ignore[return-value]

    @property
    def path(self) -> bytes:
        return self.target.partition(b"?")[0]

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


# ---------------------------------------------------------------------------------------------------------
# Decisions

@dataclass(frozen=True, slots=True)
class LocalReply:
    status: int
    body: bytes
    head_only: bool = False
    note: str = ""  # for the log line; never holds a full key
    headers: tuple[tuple[bytes, bytes], ...] = ()
    content_type: bytes = b"application/json; charset=utf-8"
    cors_included: bool = False  # `headers` already hold the CORS fields (a preflight answer)


@dataclass(frozen=True, slots=True)
class ServeMetrics:
    head_only: bool


@dataclass(frozen=True, slots=True)
class ProbeHealth:
    head_only: bool
    detailed: bool = False  # an admin asked: versions, uptime and traffic; others learn only up or degraded


@dataclass(frozen=True, slots=True)
class ReadBody:
    """Buffer the request body (at most `limit` bytes, else 413) and ask again with `decide_with_body`."""

    limit: int
    for_key: bool = False  # the key may be in it: until it is read the caller is unknown (tighter deadline)


# Not frozen: a frozen dataclass's __init__ sets each of its 13 fields through object.__setattr__, once per
# forwarded request; nothing changes a Forward after the gate built it (dataclasses.replace makes a new one).
@dataclass(slots=True, eq=False)
class Forward:
    head: bytes  # the complete request head for Ollama
    body: bytes | None  # rewritten, buffered body; None: relay the client's body as it comes
    principal: Principal
    key_label: str  # "x-api-key:api-****0101", or "ip-trust:<label of the key /auth got>"; never a full key
    url: str  # forwarded URL for logs (query without api_key)
    client_ip: str
    model: str | None = None  # the model the policy read from the request, when it read one
    trim_listing: bool = False  # a model listing to cut down to what the principal may use
    upstream_method: bytes = b""  # the method sent to Ollama, when it differs from the client's
    target: bytes = b""  # path and query as sent, without the backend's base path (to retarget the head)
    pin: str | None = None  # an admin's X-Fastgate-Backend: the backend to use
    runs_model: bool = False  # takes a backend slot (RUNS_MODEL_PATHS)
    fan_out: FanOut | None = None  # several backends, none named: ask them all (issue 9 rules 6 and 7)

    @property
    def user(self) -> str:
        return self.principal.user


Decision = LocalReply | ProbeHealth | ServeMetrics | ReadBody | Forward


def normalize_path(path: bytes) -> bytes:
    """The path as Ollama's router will match it: percent-decoded, dot segments and `//` resolved.

    Only used for policy checks, so `/api/%6de` or `/api//me/` cannot slip past a block.
    """
    if (path[:1] == b"/" and b"%" not in path and b"/." not in path and b"//" not in path
            and (path[-1:] != b"/" or path == b"/")):
        return path  # nothing to decode or resolve (nearly every request): what the general way returns too
    decoded = unquote_to_bytes(path)
    if not decoded.startswith(b"/"):
        decoded = b"/" + decoded
    return posixpath.normpath(decoded).replace(b"//", b"/")


def _split_target(target: bytes) -> tuple[bytes, bytes]:
    """(path, query) of an origin-form target: what `target.partition(b"?")` gives either side of the `?`."""
    if 63 in target:  # b"?"; an int's membership test is a memchr, a bytes needle's costs far more (3.11)
        path, _, query = target.partition(b"?")
        return path, query
    return target, b""


_USER = Principal("", "", Role.USER)  # asks `missing_scope` what a path needs of a non-admin


class PathFacts:
    """What the policy reads from a request path alone: a pure function of the path, so kept per path."""

    __slots__ = ("local", "blob", "normal", "account", "user_needs", "route", "runs_model", "manages")

    def __init__(self, path: bytes) -> None:
        self.local = path in LOCAL_PATHS  # answered (or, for /metrics, maybe answered) by fastgate itself
        self.blob = path.startswith(BLOB_PREFIX)  # the raw path, as the body-key rule reads it
        normal = self.normal = normalize_path(path)
        self.account = _is_account_path(normal)
        self.user_needs = missing_scope(_USER, normal)  # an admin needs nothing more, whatever the path
        self.route = route_for(normal)
        self.runs_model = normal in RUNS_MODEL_PATHS
        self.manages = _manages_models(normal)


LOCAL_PATHS = frozenset({b"/", b"/health", b"/auth", b"/metrics"})
# Paths seen are few (Ollama's routes); each one's facts are worked out once. Bounded in count and in path
# length, so a client sending endless distinct paths costs memory only up to the bound, and later paths are
# worked out each time instead; nothing a client sends changes the facts of another path.
_PATH_FACTS: dict[bytes, PathFacts] = {}
_PATH_FACTS_MAX = 512
_PATH_FACTS_MAX_LENGTH = 200


def path_facts(path: bytes) -> PathFacts:
    facts = _PATH_FACTS.get(path)
    if facts is None:
        facts = PathFacts(path)
        if len(_PATH_FACTS) < _PATH_FACTS_MAX and len(path) <= _PATH_FACTS_MAX_LENGTH:
            _PATH_FACTS[path] = facts
    return facts


class Gate:
    def __init__(self, config: Config, *, trust: TrustTable | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.trust = trust if trust is not None else TrustTable(config.auth.max_trusted_ips)
        self.failures = FailureLimiter(config.auth.max_failures, config.auth.failure_window)
        self.clock = clock
        self.wall_clock = wall_clock
        self._managed: dict[bytes, Principal] = {}
        self.limits = KeyLimits()
        self.reload(config)

    def reload(self, config: Config) -> None:
        """Take a new config (SIGHUP): keys, trust and limits change at once; trust granted to users whose
        keys are gone is dropped. The upstream address is fixed for the life of the process."""
        self.config = config
        self.keyring = KeyRing(config.keys, self._managed)
        self.trust.max_entries = config.auth.max_trusted_ips
        self.trust.retain_users({*config.keys.values(), *(p.user for p in self._managed.values())})
        self.failures.max_failures = config.auth.max_failures
        self.failures.window_s = config.auth.failure_window
        # With several backends the router needs the model of every request, not only of those judged.
        self._route_models = len(config.backends) > 1
        upstream = config.upstream.url
        self._host_header = upstream.host_header.encode()
        self._base_path = upstream.base_path.encode()
        self._origin = f"http://{upstream.host_header}"
        self._trusted_proxies = config.server.trusted_proxies
        # Read for every request: kept here rather than looked up through three attributes each time.
        self._cors_origins = config.cors.allow_origins
        self._allow_account_endpoints = config.auth.allow_account_endpoints
        self._allow_cloud = config.auth.allow_cloud
        self._forward_origin = config.upstream.forward_origin
        self._session_ttl = config.auth.session_ttl
        # Decisions are immutable: the two ReadBody answers for requests to forward are made once.
        self._read_body = ReadBody(config.auth.max_body_bytes)
        self._read_body_for_key = ReadBody(config.auth.max_body_bytes, for_key=True)
        self._info = json_body({"name": "fastgate", "version": __version__, "status": "running"})

    def set_managed_keys(self, managed: dict[bytes, Principal]) -> None:
        """Swap in the key store's current keys (digest -> principal); config keys stay as they are."""
        self._managed = managed
        self.keyring = KeyRing(self.config.keys, managed)

    # -- entry points ------------------------------------------------------------------------------------

    def decide(self, req: IncomingRequest, request_id: bytes) -> Decision:
        """Decide on the head alone. Raises GateError for requests to refuse."""
        # Policy is decided on paths only: an absolute-form target becomes its path first, so
        # `POST http://localhost/api/me` is judged (and forwarded) as `/api/me`.
        target = req.target
        if target[:1] != b"/":
            req.target = target = origin_form(target)
        path, query = _split_target(target)
        facts = path_facts(path)
        local = facts.local
        if local:
            if path == b"/":
                self._allow(req, (b"GET", b"HEAD"))
                return LocalReply(200, self._info, head_only=req.method == b"HEAD")
            if path == b"/health":
                self._allow(req, (b"GET", b"HEAD"))
                return ProbeHealth(head_only=req.method == b"HEAD", detailed=self._is_admin(req))
            if path == b"/auth":
                self._allow(req, (b"POST",))
                return ReadBody(AUTH_BODY_LIMIT_BYTES, for_key=True)
        if self._cors_origins and is_preflight(req.method, req.headers):
            # Browsers never send credentials on a preflight: answer it here, without a key.
            origin = allowed_origin(self._cors_origins, _header(req, b"origin"))
            if origin is None:
                raise Forbidden("this origin is not allowed to call this gateway")
            return LocalReply(204, b"", headers=preflight_headers(
                origin, _header(req, b"access-control-request-headers"), self.config.cors.max_age),
                cors_included=True)
        if local and path == b"/metrics" and self.config.metrics.enabled:
            self._allow(req, (b"GET", b"HEAD"))
            key = req.header_key or split_query_key(query)[0]
            principal, label = self._identify(key, self.client_ip(req))
            if principal.role is not Role.ADMIN:
                error = Forbidden("metrics need a key with the admin role")
                error.user, error.key_label = principal.user, label  # a known key: counted under its user
                raise error
            return ServeMetrics(head_only=req.method == b"HEAD")

        return self._decide_forward(req, request_id, None, path, query, facts)

    def decide_with_body(self, req: IncomingRequest, body: bytes | BufferedBody, request_id: bytes) -> Decision:
        """Decide again once the body asked for by `ReadBody` is in (raw, or already read by `read_body`)."""
        if isinstance(body, bytes):
            body = self.buffered_body(req, body)
        path, query = _split_target(req.target)
        if path == b"/auth":
            return self._authenticate(req, body.raw)
        return self._decide_forward(req, request_id, body, path, query, path_facts(path))

    @staticmethod
    def buffered_body(req: IncomingRequest, raw: bytes) -> BufferedBody:
        """The body as `decide_with_body` will read it; `read_all()` on it may run on another thread."""
        if req.header_key is not None:
            return BufferedBody(raw, key_search=False)
        return BufferedBody(raw, key_search=split_query_key(_split_target(req.target)[1])[0] is None)

    def client_ip(self, req: IncomingRequest) -> str:
        if not self._trusted_proxies:
            return req.peer_ip
        return client_ip(req.peer_ip, (v for n, v in req.headers if n == b"x-forwarded-for"),
                         self._trusted_proxies)

    # -- helpers ----------------------------------------------------------------------------------------

    @staticmethod
    def _allow(req: IncomingRequest, methods: tuple[bytes, ...]) -> None:
        if req.method not in methods:
            raise MethodNotAllowed(headers=((b"Allow", b", ".join(methods)),))

    def _decide_forward(self, req: IncomingRequest, request_id: bytes, body: BufferedBody | None, path: bytes,
                        query: bytes, facts: PathFacts) -> Decision:
        """Identify the caller, check what it may do, and build the request for Ollama.

        `body` is None until read; the body is asked for (`ReadBody`) only when the head has no key and
        the body may hold one, or when the policy must read the models the body names. `path` and `query`
        are the target's two parts (`_split_target`), `facts` what the path alone says (`path_facts`).
        """
        key = req.header_key
        if query:
            query_key, query = split_query_key(query)  # api_key is removed from the query in any case
            if key is None:
                key = query_key
        if key is None:
            if body is None:
                # Blob uploads are multi-GB model files: never buffered or parsed (wire doc section 7).
                if req.has_body and req.method in BODY_METHODS and not facts.blob:
                    return self._read_body_for_key
            else:
                key = body.split()[0]
        forward_body = body.forwarded if body is not None else None
        ip = self.client_ip(req) if self._trusted_proxies else req.peer_ip
        principal, label, ambient = self._who(key, ip)
        try:
            if ambient:
                self._refuse_drive_by(req)
            normal = facts.normal
            if facts.account and not self._allow_account_endpoints:
                raise Forbidden("Ollama account endpoints are disabled on this gateway")
            if facts.user_needs is not None and principal.role is not Role.ADMIN:
                raise Forbidden(f"this key's role ({principal.role.value}) does not allow "
                                f"{req.method.decode()} {normal.decode('latin-1')}: "
                                f"it needs the {facts.user_needs.value} role")
            requested = NOTHING
            route = facts.route
            judged = judges_models(principal, self._allow_cloud)
            if judged:
                if route is None:
                    if principal.models:
                        raise Forbidden(f"{normal.decode('latin-1')} is not an Ollama endpoint this gateway "
                                        "can check against this key's model list")
                elif route.reads_body and body is None and req.has_body:
                    return self._read_body
                else:
                    requested = self._judge(req, route, normal, query, body, principal)
            elif self._route_models and route is not None and (route.reads_body or route.path_model):
                # Not judged, but routed by model: read it the same way; what cannot be read is Ollama's to
                # refuse (routed as naming no model), since this key was never limited by it.
                if route.reads_body and body is None and req.has_body:
                    return self._read_body
                try:
                    requested = _read_requested(req, route, normal, query, body)
                except Unreadable:
                    requested = NOTHING
            pin = None
            if principal.role is Role.ADMIN:
                pinned = _header(req, BACKEND_HEADER)
                if pinned is not None:
                    pin = pinned.strip().decode("latin-1")
            fan_out = None
            if pin is None and self._route_models:
                fan_out = fan_out_for(normal, req.method)
                if fan_out is None and facts.manages:
                    # Pull, delete and copy go to every backend (fan_out); which Ollama should get a new model
                    # made from blobs, push one, or hold a blob is the admin's to name.
                    raise BadRequest(f"with several backends, {normal.decode('latin-1')} needs an "
                                     f"X-Fastgate-Backend: NAME header (an admin key's) naming the Ollama to "
                                     f"act on")
            forward = self._forward(req, request_id, principal, label, path, query, forward_body, ip,
                                    requested, judged and route is not None and route.listing, pin,
                                    facts.runs_model, fan_out)
            if principal.limited:
                # Last, so a request refused for any other reason never uses up the key's allowance.
                self.limits.admit(principal, self.clock(), self.wall_clock())
            return forward
        except GateError as err:
            # Refused after the key was recognised (role, model, limit...): counted and logged under its user
            err.user, err.key_label = principal.user, label
            raise

    def _judge(self, req: IncomingRequest, route: Route, normal: bytes, query: bytes, body: BufferedBody | None,
               principal: Principal) -> Requested:
        """Read the models the request names, exactly as Ollama will, and refuse what the principal may not
        use. What cannot be read exactly is refused too (fail closed)."""
        if route.form and sum(1 for n, _ in req.headers if n == b"content-type") > 1:
            raise BadRequest("more than one Content-Type")  # Go reads the first; another parser may not
        try:
            requested = _read_requested(req, route, normal, query, body)
        except Unreadable as exc:
            if exc.status == 415:
                raise UnsupportedMediaType(str(exc)) from None
            raise BadRequest(str(exc)) from None
        allow_cloud = self._allow_cloud
        for model in requested.models:
            refusal = model_refusal(principal, model, allow_cloud)
            if refusal is not None:
                raise Forbidden(refusal)
        if requested.web_tools:
            refusal = web_tools_refusal(principal, allow_cloud)
            if refusal is not None:
                raise Forbidden(refusal)
        return requested

    def _refuse_drive_by(self, req: IncomingRequest) -> None:
        """Refuse what a web page could make a browser send with a credential the browser adds by itself.

        IP trust and cached Basic credentials are ambient: a page on any site, opened by someone they cover,
        could reach Ollama through them. Ollama refuses unknown Origins itself, but fastgate removes Origin
        before forwarding, so it judges here: a cross-site request (Origin not allowed, or Sec-Fetch-Site
        cross-site) is refused. DNS rebinding makes the page same-origin under an attacker's name, which is
        why the Host must also be an address, localhost, or one of server.hostnames.
        """
        origin = _header(req, b"origin")
        if origin is not None:
            if allowed_origin(self.config.cors.allow_origins, origin) is None:
                raise Forbidden("cross-site requests are refused without an API key header "
                                "(this origin is not in cors.allow_origins)")
        elif (_header(req, b"sec-fetch-site") or b"").strip().lower() in (b"cross-site", b"same-site"):
            raise Forbidden("cross-site requests are refused without an API key header")
        host = _header(req, b"host")
        if host is not None and not _host_is_ours(host, self.config.server.hostnames):
            raise Forbidden("this Host is not one of the gateway's names (server.hostnames); "
                            "send an API key header to use it")

    def cors_headers(self, req: IncomingRequest) -> tuple[tuple[bytes, bytes], ...]:
        """CORS headers for every answer to this request (none unless its Origin is allowed)."""
        if not self._cors_origins:
            return ()
        origin = allowed_origin(self._cors_origins, _header(req, b"origin"))
        return response_headers(origin) if origin is not None else ()

    def finished(self, forward: Forward) -> None:
        """The exchange for `forward` is over (however it ended): it no longer counts as in flight."""
        if forward.principal.max_concurrent is not None:
            self.limits.release(forward.principal)

    def _identify(self, key: PresentedKey | None, ip: str) -> tuple[Principal, str]:
        """Who the request acts as, and the log label saying how that was established."""
        principal, label, _ = self._who(key, ip)
        return principal, label

    def _who(self, key: PresentedKey | None, ip: str) -> tuple[Principal, str, bool]:
        """`_identify`, and whether the credential is ambient (AMBIENT_LABELS: IP trust, Basic credentials a
        browser may add by itself), which the label says too, without reading it back."""
        now = self.clock()
        if key is not None:
            known = self._check_key(key, ip, now)
            if known is not None:
                return known[0], known[1], key.source is KeySource.BASIC
        # A wrong key from a trusted address gains nothing a keyless request would not get, and clients that
        # must send some key (the OpenAI SDK with Ollama's documented api_key="ollama") keep working.
        grant = self.trust.lookup(ip, now) if self._session_ttl else None
        if grant is not None and grant.key_id:
            # Scoped to the key it was granted with; a grant naming no key (fastgate never makes one: it could
            # only come from a forged shared-state record) grants nothing, rather than Principal's defaults.
            principal = self.keyring.by_id(grant.key_id, self.wall_clock())
            if principal is not None:
                return principal, f"ip-trust:{grant.key_label}", True
        if key is not None:
            raise self._refuse_key(key, ip, now)
        raise Unauthorized("missing API key: send X-API-Key or Authorization: Bearer, "
                           "or POST /auth from this address first")

    def _is_admin(self, req: IncomingRequest) -> bool:
        """Whether a request that needs no key carries an admin's (or comes from an admin's trusted address).
        A wrong key counts toward the guessing limit here as anywhere: this must not become a free oracle."""
        key = req.header_key or split_query_key(_split_target(req.target)[1])[0]
        try:
            principal, _ = self._identify(key, self.client_ip(req))
        except Unauthorized:
            return False
        return principal.role is Role.ADMIN

    def _check_key(self, key: PresentedKey, ip: str, now: float) -> tuple[Principal, str] | None:
        """The key's principal and label, None for a wrong key. Addresses that guessed wrong too often get 429
        first."""
        wait = self.failures.retry_after(ip, now)
        if wait:
            error = TooManyRequests(headers=((b"Retry-After", str(max(1, round(wait))).encode()),))
            error.key_label = key.label
            error.detail = f"{error.key_label} from {ip}"
            raise error
        return self.keyring.identify(key, self.wall_clock())

    def _refuse_key(self, key: PresentedKey, ip: str, now: float) -> Unauthorized:
        self.failures.record_failure(ip, now)
        error = Unauthorized("invalid API key")
        error.detail = error.key_label = key.label  # the masked key: logs only
        return error

    def _authenticate(self, req: IncomingRequest, body: bytes) -> LocalReply:
        key = req.header_key or split_body_key(body)[0]
        if key is None:
            raise Unauthorized('expected a JSON body {"api_key": "..."}')
        ip = self.client_ip(req)
        now = self.clock()
        known = self._check_key(key, ip, now)
        if known is None:
            raise self._refuse_key(key, ip, now)
        principal = known[0]
        user = principal.user
        ttl = self.config.auth.session_ttl
        if not ttl:
            return LocalReply(200, json_body({"user": user, "ip": ip, "ip_trust": False, "expires_at": None,
                                              "expires_in": 0}))
        self.trust.grant(ip, user, key.label, ttl, now, principal.key_id)
        expires = datetime.fromtimestamp(self.wall_clock() + ttl, tz=timezone.utc)
        return LocalReply(200, json_body({"user": user, "ip": ip, "ip_trust": True,
                                          "expires_at": expires.isoformat(timespec="seconds"),
                                          "expires_in": ttl}),
                          note=f"trusted {ip} as {user} ({key.source.value}:{key.masked}) for {ttl} s")

    def _forward(self, req: IncomingRequest, request_id: bytes, principal: Principal, label: str, path: bytes,
                 query: bytes, body: bytes | None, ip: str, requested: Requested, trim_listing: bool,
                 pin: str | None, runs_model: bool, fan_out: FanOut | None) -> Forward:
        # A trimmed listing's length is only known after trimming: a HEAD for one is sent as GET, so the
        # answer's head can carry the trimmed body's length.
        method = req.method
        if trim_listing and method == b"HEAD":
            method = b"GET"
        rest = path + b"?" + query if query else path
        target = self._base_path + rest if self._base_path else rest
        if self._trusted_proxies and in_networks(req.peer_ip, self._trusted_proxies):
            prior = b", ".join(v for n, v in req.headers if n == b"x-forwarded-for")
            forwarded_for = prior + b", " + req.peer_ip.encode() if prior else req.peer_ip.encode()
            forwarded_proto = next((v for n, v in req.headers if n == b"x-forwarded-proto"),
                                   b"https" if req.tls else b"http")
        else:
            forwarded_for = ip.encode()
            forwarded_proto = b"https" if req.tls else b"http"
        if body is not None:
            content_length: int | None = len(body)
            chunked = False
        else:
            content_length, chunked = req.content_length, req.chunked
        head = upstream_request_head(
            method=method, target=target,
            headers=forwardable_headers(req.raw_headers, forward_origin=self._forward_origin),
            host_header=self._host_header, forwarded_for=forwarded_for, forwarded_proto=forwarded_proto,
            forwarded_host=_header(req, b"host"), request_id=request_id, content_length=content_length,
            chunked=chunked, http10=req.http_version == b"1.0")
        return Forward(head, body, principal, label, self._origin + target.decode("latin-1"), ip,
                       requested.model, trim_listing, method if method != req.method else b"", rest, pin,
                       runs_model, fan_out)


def _header(req: IncomingRequest, name: bytes) -> bytes | None:
    # A loop, not next() over a generator: this runs for several names per request.
    for n, v in req.headers:
        if n == name:
            return v
    return None


def _read_requested(req: IncomingRequest, route: Route, normal: bytes, query: bytes,
                    body: BufferedBody | None) -> Requested:
    """`read_requested` with this request's Content-Type and Content-Encoding. Raises Unreadable."""
    return read_requested(route, normal, query=query, content_type=_header(req, b"content-type"),
                          content_encoding=_joined_header(req, b"content-encoding"), body=body)


def _joined_header(req: IncomingRequest, name: bytes) -> bytes | None:
    values = None  # a loop, not a list comprehension: the field is nearly always absent
    for n, v in req.headers:
        if n == name:
            if values is None:
                values = [v]
            else:
                values.append(v)
    return b",".join(values) if values is not None else None


def _host_is_ours(host: bytes, hostnames: tuple[str, ...]) -> bool:
    """Whether a Host header names this gateway in a way no rebinding page can: an IP literal, localhost,
    or a configured name (port ignored, case-insensitive, one trailing dot allowed)."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        name = text[1:].partition("]")[0]
    else:
        name = text.rpartition(":")[0] if text.count(":") == 1 else text
    name = name.rstrip(".") if name.endswith(".") and not name.endswith("..") else name
    if name == "localhost" or name in hostnames:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# Model management: what it acts on is not where a model already is (a pull of a new model, a blob upload).
MANAGEMENT_PATHS = frozenset({b"/api/pull", b"/api/push", b"/api/create", b"/api/delete", b"/api/copy"})


def _manages_models(normal: bytes) -> bool:
    return normal in MANAGEMENT_PATHS or normal.startswith(BLOB_PREFIX)


def _is_account_path(normal: bytes) -> bool:
    return normal in ACCOUNT_PATHS or normal in ACCOUNT_PREFIXES or normal.startswith(_ACCOUNT_SUBPATHS)


_ACCOUNT_SUBPATHS = tuple(p + b"/" for p in ACCOUNT_PREFIXES)

