"""What a request asks Ollama for: the models and server-side tools it names, read exactly as Ollama will.

Pure: no I/O. Owns the table of Ollama's routes (../shared/reference/ollama-routes.md) and, for each, where
a model is named: JSON body fields, the `/v1/models/NAME` path segment, or the transcription form and query.

The invariant that keeps the model allow-list closed: for any request this module accepts, every value
Ollama can take as a model name is among `Requested.models`. It reads bodies with `gojson` (the field
resolution of Go's `encoding/json`: case-folded keys, last non-null match, first value only) and forms with
`forms` (Go's `FormValue`), and raises `Unreadable` for anything it cannot read exactly as Go will: a
body that is not one clean JSON value, a model field that is not a string, a compressed body. The caller
refuses those (400, or 415 for a coding) instead of guessing: a gate that guesses fails open.

The alternative design, forwarding a canonical re-encoding of the judged body, was not taken: it would
rewrite every inference request (costly on multi-megabyte image bodies, and no longer byte for byte), while
exact reading plus refusal changes nothing for the requests real clients send.
"""

from __future__ import annotations

from dataclasses import dataclass

from .forms import UnreadableForm, form_field_values
from .gojson import Member, UnreadableBody, go_key_matches, go_string_field, scan_array, scan_object
from .keys import PresentedKey, split_body_key
from .models import uses_server_web_tools


class Unreadable(ValueError):
    """The request names its model in a way fastgate cannot read exactly as Ollama will."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Route:
    """How one Ollama route names models."""

    fields: tuple[str, ...] = ()  # JSON body fields (Go struct tags) that name a model
    form: bool = False  # `model` in the query or the form body (Go's FormValue)
    path_model: bool = False  # the last path segment is the model (`/v1/models/NAME`)
    web_tools: bool = False  # the body's `tools` may ask Ollama to run web tools on ollama.com
    listing: bool = False  # the answer lists models (trimmed for keys that may not see them all)
    # Ollama's cloud passthrough on /v1 first reads `model` with an exact-key map lookup (not the struct's
    # case-folding), and proxies the request to ollama.com if that names a cloud model: both readings count.
    exact_model_too: bool = False

    @property
    def reads_body(self) -> bool:
        return bool(self.fields) or self.form or self.web_tools


NO_MODEL = Route()
# Every route Ollama serves (read from its source; see the reference). A path that is not here is unknown:
# it may name a model in a way nobody checks, so keys with a model allow-list may not use it.
ROUTES: dict[bytes, Route] = {
    b"/": NO_MODEL, b"/api/version": NO_MODEL, b"/api/status": NO_MODEL,
    b"/api/tags": Route(listing=True), b"/api/ps": Route(listing=True), b"/v1/models": Route(listing=True),
    b"/api/pull": Route(("model", "name")), b"/api/push": Route(("model", "name")),
    b"/api/show": Route(("model", "name")), b"/api/delete": Route(("model", "name")),
    b"/api/create": Route(("model", "name", "from")), b"/api/copy": Route(("source", "destination")),
    b"/api/generate": Route(("model",)), b"/api/chat": Route(("model",)),
    b"/api/embed": Route(("model",)), b"/api/embeddings": Route(("model",)),
    b"/v1/chat/completions": Route(("model",), exact_model_too=True),
    b"/v1/completions": Route(("model",), exact_model_too=True),
    b"/v1/embeddings": Route(("model",), exact_model_too=True),
    b"/v1/responses": Route(("model",), web_tools=True, exact_model_too=True),
    b"/v1/messages": Route(("model",), web_tools=True, exact_model_too=True),
    b"/v1/audio/transcriptions": Route(form=True),
    b"/api/me": NO_MODEL, b"/api/signout": NO_MODEL,
    b"/api/experimental/web_search": NO_MODEL, b"/api/experimental/web_fetch": NO_MODEL,
    b"/api/experimental/model-recommendations": NO_MODEL,
}
PREFIX_ROUTES: tuple[tuple[bytes, Route], ...] = (
    (b"/api/blobs/", NO_MODEL), (b"/api/user/keys/", NO_MODEL), (b"/v1/models/", Route(path_model=True)),
)
LISTINGS = frozenset(path for path, route in ROUTES.items() if route.listing)
# Codings Ollama decodes itself before reading (zstd on /v1) or that a client may send anyway: a compressed
# body cannot be read here, so it is refused rather than passed on unjudged.
IDENTITY_CODINGS = frozenset({b"", b"identity"})


def route_for(normal_path: bytes) -> Route | None:
    """The route a normalized path reaches, or None when Ollama has no such route that fastgate knows."""
    route = ROUTES.get(normal_path)
    if route is not None:
        return route
    for prefix, prefixed in PREFIX_ROUTES:
        if normal_path.startswith(prefix) and len(normal_path) > len(prefix):
            return prefixed
    return None


@dataclass(frozen=True, slots=True)
class Requested:
    models: tuple[str, ...]  # every model name Ollama may act on for this request, in field order
    web_tools: bool = False  # asks for server-side web tools (they run on ollama.com)

    @property
    def model(self) -> str | None:
        """The model this request runs (for usage records): the first named."""
        return self.models[0] if self.models else None


NOTHING = Requested(())
# A frozen dataclass's __init__ sets each field through object.__setattr__; the slots' own setters, called on
# a bare instance, build the same object for less (once per judged request).
_new_object = object.__new__
_set_models = Requested.models.__set__  # type: ignore[attr-defined]
_set_web_tools = Requested.web_tools.__set__  # type: ignore[attr-defined]


def _requested(models: tuple[str, ...], web_tools: bool) -> Requested:
    requested = _new_object(Requested)
    _set_models(requested, models)
    _set_web_tools(requested, web_tools)
    return requested


class BufferedBody:
    """A request body fastgate buffered, read at most once: the key it may carry (when the head had none),
    the bytes that go on to Ollama, and the JSON members of those bytes.

    Reading is pure and touches nothing shared, so a large body can be read on a worker thread (`read_all`)
    while the event loop serves other connections; the gate then finds the results already there.
    """

    __slots__ = ("raw", "key_search", "_split", "_members", "_scanned", "_error")

    def __init__(self, raw: bytes, *, key_search: bool) -> None:
        self.raw = raw
        self.key_search = key_search  # the head had no key: look for "api_key" and remove it
        self._split: tuple[PresentedKey | None, bytes] | None = None
        self._members: list[Member] | None = None
        self._scanned = False
        self._error: UnreadableBody | None = None

    def split(self) -> tuple[PresentedKey | None, bytes]:
        """The key found in the body (None without key search) and the body as it goes to Ollama."""
        if self._split is None:
            self._split = split_body_key(self.raw) if self.key_search else (None, self.raw)
        return self._split

    @property
    def forwarded(self) -> bytes:
        return self.split()[1]

    def members(self) -> list[Member] | None:
        """The forwarded body's top-level members (None: not an object). Raises UnreadableBody."""
        if self._error is not None:
            raise self._error
        if not self._scanned:
            try:
                self._members = scan_object(self.forwarded)
            except UnreadableBody as exc:
                self._error = exc
                raise
            self._scanned = True
        return self._members

    def read_all(self) -> BufferedBody:
        """Do every parse now (for a worker thread); errors are kept for the caller to meet."""
        self.split()
        try:
            self.members()
        except UnreadableBody:
            pass
        return self


def read_requested(route: Route, normal_path: bytes, *, query: bytes, content_type: bytes | None,
                   content_encoding: bytes | None, body: BufferedBody | None) -> Requested:
    """What `route` asks of Ollama, from the path, query and (buffered) body. Raises Unreadable."""
    if route.path_model:
        name = normal_path.rpartition(b"/")[2]
        try:
            return Requested((name.decode("utf-8"),))
        except UnicodeDecodeError:
            raise Unreadable("model name in the path is not valid UTF-8") from None
    if not route.reads_body:
        return NOTHING
    data = body.forwarded if body is not None else b""
    if data and content_encoding is not None and content_encoding.strip().lower() not in IDENTITY_CODINGS:
        raise Unreadable("compressed request bodies cannot be checked by this gateway; send it uncompressed",
                         status=415)
    if route.form:
        try:
            return Requested(tuple(form_field_values(query, content_type, data, "model")))
        except UnreadableForm as exc:
            raise Unreadable(str(exc)) from None
    if body is None or not data:
        return NOTHING  # Ollama answers "missing request body" itself
    try:
        members = body.members()
        if members is None:
            return NOTHING  # valid JSON that is not an object: Go's decode into a struct fails (400)
        if len(route.fields) == 1:  # most routes: no generator for one field
            value = go_string_field(members, route.fields[0])
            models = (value,) if value else ()
        else:
            models = tuple(value for name in route.fields if (value := go_string_field(members, name)))
        if route.exact_model_too:
            exact = _exact_string_member(members, "model")
            if exact and exact not in models:
                models += (exact,)
        web = route.web_tools and _uses_web_tools(normal_path, data, members)
    except UnreadableBody as exc:
        raise Unreadable(str(exc)) from None
    return _requested(models, web)


def _exact_string_member(members: list, name: str) -> str | None:  # type: ignore[type-arg]
    """What `json.Unmarshal` into a map gives for key `name`: the last member with exactly that name."""
    last = next((m for m in reversed(members) if m.name == name), None)
    return last.text if last is not None and last.kind == "string" else None


def _uses_web_tools(normal_path: bytes, body: bytes, members: list) -> bool:  # type: ignore[type-arg]
    """Whether the body's `tools` ask for a server-side web tool, resolved as Go reads `tools[*].type`.

    A later `"tools": null` resets the slice in Go; it is ignored here (the earlier array still counts),
    which can only refuse more, never less."""
    tools = [m for m in members if m.name is not None and go_key_matches(m.name, "tools")]
    last = next((m for m in reversed(tools) if m.kind != "null"), None)
    if last is None:
        return False
    if last.kind != "array":
        raise UnreadableBody("field 'tools' must be an array")
    types = []
    for element in scan_array(body, last.value_start, last.end):
        if element.kind == "null":
            continue
        if element.kind != "object":
            raise UnreadableBody("each of 'tools' must be an object")
        tool = scan_object(body, element.start, element.end)
        assert tool is not None
        types.append(go_string_field(tool, "type") or "")
    return uses_server_web_tools(normal_path, types)

