"""Model names as Ollama resolves them, model allow-list patterns, and Ollama's cloud and web-tool rules.

Pure: standard library only, no I/O. A key's allow-list must mean the models Ollama will actually run,
so this module answers with Ollama's own rules (ollama/ollama `types/model/name.go`,
`internal/modelref/modelref.go`, `server/model_resolver.go`) rather than with string comparison:

Names. `parse_model_name` is `parseAndValidateModelRef`: trim surrounding white space, take an explicit
source suffix off (`:cloud`, `:local`, or a tag ending in `-cloud`), then parse the rest as
`[[scheme://]host/][namespace/]model[:tag]` with defaults `registry.ollama.ai`, `library`, `latest`.
Every part must be valid (ASCII letters, digits, `_` first; then `-` `_`, plus `.` except in the
namespace, plus `:` in the host; 1-80 bytes, host 1-350). Ollama compares parts case-insensitively, so
the result is lowercased. Ollama no longer parses a digest (`model@sha256:...` is invalid), and the
scheme does not change which model is meant, so neither is kept. Anything Ollama rejects gives None.

Cloud. A name whose last `:`-separated part is `cloud` or ends in `-cloud` (case-insensitive, white space
around that part ignored) is a cloud model: Ollama does not run it but forwards the request to ollama.com
signed with the server owner's key. `gpt-oss:120b-cloud`, `gpt-oss:120b:cloud` and `GPT-OSS:120B-CLOUD`
are one cloud model, `gpt-oss:120b`; `llama3:cloud` is the cloud `llama3:latest`. A name without a tag
(`cloud`, `my-cloud`) is local. So spending the owner's cloud account is opt-in: a pattern reaches a
cloud model only when it names the cloud form itself.

Patterns (`pattern_allows`, `models_allowed`): case-insensitive globs over the resolved name, where `*`
and `?` (and `[...]`) never match across a `/`:
- no `/`: models in `registry.ollama.ai/library`, matched against `model:tag`, and against bare `model`
  when the tag is `latest`. `llama3` allows `LLAMA3`, `llama3:latest` and
  `registry.ollama.ai/library/llama3:latest` but not `llama3:8b`; `llama3*` allows `llama3.2:3b` and
  `llama3:8b` but not `evil/llama3` or `llama3x/qwen`; `qwen2.5:*` allows every tag of qwen2.5.
- one `/`: `namespace/model[:tag]` on `registry.ollama.ai`; two: `host/namespace/model[:tag]`. More
  `/`s (a scheme, say) match nothing.
- a cloud model is matched in its cloud forms (`model:tag-cloud`, `model:tag:cloud`, and `model:cloud`
  when the tag is `latest`), and only by a pattern that itself ends in `:cloud` or `-cloud`: `*:cloud`
  and `*-cloud` allow every library cloud model, `gpt-oss:120b-cloud` (or `gpt-oss:120b:cloud`) that one,
  `gpt-oss:*-cloud` every gpt-oss one. `*`, `llama3*` and `gpt-oss*cloud` never allow a cloud model.
An empty pattern list allows every name, even ones Ollama will reject (it rejects them itself); whether
cloud models are allowed at all is the caller's separate decision (`is_cloud_model`).

Web tools (`server_web_tool`, `is_web_tool`): `/v1/messages` and `/v1/responses` run web search on the
server, through ollama.com with the owner's key, for local and cloud models alike, when the request
declares it in `tools[i].type` (top-level `tools` array only): on `/v1/messages` a type starting with
`web_search` (`web_search_20250305`), on `/v1/responses` the type `web_search` exactly. Tool names do not
count, and neither route has a server-side `web_fetch` tool (only `POST /api/experimental/web_fetch`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# Go's strings.TrimSpace trims what unicode.IsSpace reports (str.strip() would also take \x1c-\x1f).
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
            "\u2028\u2029\u202f\u205f\u3000"
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_MISSING = "!MISSING!"  # Ollama's stand-in for a part promised by a separator but empty: never valid
_ALNUM_ = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_HOST, _NAMESPACE, _MODEL, _TAG = range(4)
_EXTRA = {_HOST: frozenset("-_.:"), _NAMESPACE: frozenset("-_"), _MODEL: frozenset("-_."),
          _TAG: frozenset("-_.")}
_CLOUD_PATTERN_ENDS = (":cloud", "-cloud")


@dataclass(frozen=True, slots=True)
class ModelName:
    """A model as Ollama resolves it: every part present, valid, lowercased.

    For a cloud model (`cloud` true) the parts are the name Ollama forwards to ollama.com, without the
    cloud suffix: `gpt-oss:120b-cloud` is `ModelName(DEFAULT_HOST, "library", "gpt-oss", "120b", True)`.
    """

    host: str
    namespace: str
    model: str
    tag: str
    cloud: bool = False

    def __str__(self) -> str:
        """The full form, which `parse_model_name` reads back to this name (`...:tag:cloud` for cloud)."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}" + (":cloud" if self.cloud else "")

    @property
    def shortest(self) -> str:
        """Without the default host and namespace, as Ollama displays names: `llama3:latest`, `me/m:7b`."""
        if self.host != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        else:
            prefix = ""
        return f"{prefix}{self.model}:{self.tag}" + (":cloud" if self.cloud else "")


def _go_trim(text: str) -> str:
    return text.strip(_GO_SPACE)


def _source_suffix(raw: str) -> tuple[str, str, bool]:
    """modelref.parseSourceSuffix: (base, "cloud" | "local" | "", whether a suffix was there)."""
    idx = raw.rfind(":")
    if idx >= 0:
        suffix_raw = _go_trim(raw[idx + 1:])
        # Go lowercases with Unicode rules; no non-ASCII letter lowercases into "cloud"/"local", so ASCII
        # lowering gives the same answers.
        suffix = suffix_raw.translate(_ASCII_LOWER)
        if suffix in ("cloud", "local"):
            return raw[:idx], suffix, True
        if "/" not in suffix_raw and suffix.endswith("-cloud"):
            return raw[:idx + 1] + suffix_raw[:-len("-cloud")], "cloud", True
    return raw, "", False


def _source(text: str) -> tuple[str, str] | None:
    """modelref.ParseRef: (base, source), or None when Ollama refuses the reference (empty, conflicting)."""
    raw = _go_trim(text)
    if not raw:
        return None
    base, source, explicit = _source_suffix(raw)
    if explicit and _source_suffix(base)[2]:
        return None  # `foo:cloud:local`, `foo:8b-cloud:cloud`: ErrConflictingSourceSuffix
    return base, source


def _cut_promised(s: str, sep: str) -> tuple[str, str, bool]:
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return s[:i] or _MISSING, s[i + len(sep):] or _MISSING, True


def _valid_part(kind: int, s: str) -> bool:
    if not 1 <= len(s) <= (350 if kind == _HOST else 80):
        return False
    if s[0] not in _ALNUM_:
        return False
    extra = _EXTRA[kind]
    return all(c in _ALNUM_ or c in extra for c in s[1:])


def _parse_base(s: str) -> tuple[str, str, str, str]:
    """model.ParseName without validation: (host, namespace, model, tag), defaults filled."""
    host = namespace = tag = ""
    if s.rfind(":") > s.rfind("/"):
        s, tag, _ = _cut_promised(s, ":")
    s, model, promised = _cut_promised(s, "/")
    if not promised:
        model = s
    else:
        s, namespace, promised = _cut_promised(s, "/")
        if not promised:
            namespace = s
        else:
            _scheme, sep, after = s.partition("://")
            host = after if sep else s
    return host or DEFAULT_HOST, namespace or DEFAULT_NAMESPACE, model, tag or DEFAULT_TAG


# The answers below are pure functions of their (immutable) arguments, asked again for every request that
# names the same model: the answers for names up to this long are kept (a bounded table each, least recently
# used out first), so a client can make them be worked out again but never change one.
_CACHED_NAME_LENGTH = 256
_CACHE_SIZE = 1024


def parse_model_name(text: str) -> ModelName | None:
    """The model Ollama's inference routes resolve `text` to, or None when Ollama rejects the name."""
    if len(text) <= _CACHED_NAME_LENGTH:
        return _parse_model_name_cached(text)
    return _parse_model_name(text)


def _parse_model_name(text: str) -> ModelName | None:
    ref = _source(text)
    if ref is None:
        return None
    base, source = ref
    parts = _parse_base(base)
    if not all(_valid_part(kind, part) for kind, part in enumerate(parts)):
        return None
    host, namespace, model, tag = (part.translate(_ASCII_LOWER) for part in parts)
    return ModelName(host, namespace, model, tag, source == "cloud")


_parse_model_name_cached = lru_cache(maxsize=_CACHE_SIZE)(_parse_model_name)


def is_cloud_model(text: str) -> bool:
    """modelref.HasExplicitCloudSource: the name asks for ollama.com (valid or not; Ollama then refuses)."""
    if len(text) <= _CACHED_NAME_LENGTH:
        return _is_cloud_model_cached(text)
    return _is_cloud_model(text)


def _is_cloud_model(text: str) -> bool:
    ref = _source(text)
    return ref is not None and ref[1] == "cloud"


_is_cloud_model_cached = lru_cache(maxsize=_CACHE_SIZE)(_is_cloud_model)


def _forms(name: ModelName, slashes: int) -> list[str]:
    """The strings a pattern with this many `/`s is matched against."""
    if slashes == 0 and (name.host, name.namespace) == (DEFAULT_HOST, DEFAULT_NAMESPACE):
        prefix = ""
    elif slashes == 1 and name.host == DEFAULT_HOST:
        prefix = f"{name.namespace}/"
    elif slashes == 2:
        prefix = f"{name.host}/{name.namespace}/"
    else:
        return []
    model, tag = prefix + name.model, name.tag
    if name.cloud:
        forms = [f"{model}:{tag}-cloud", f"{model}:{tag}:cloud"]
        return forms + [f"{model}:cloud"] if tag == DEFAULT_TAG else forms
    return [f"{model}:{tag}", model] if tag == DEFAULT_TAG else [f"{model}:{tag}"]


def names_cloud(pattern: str) -> bool:
    """Whether the pattern names the cloud form (ends in `:cloud` or `-cloud`), so may allow cloud models."""
    return pattern.translate(_ASCII_LOWER).endswith(_CLOUD_PATTERN_ENDS) and pattern.count("/") <= 2


def pattern_allows(pattern: str, name: ModelName) -> bool:
    """Whether one allow-list pattern covers `name` (see the module docstring for the rules)."""
    if name.cloud and not names_cloud(pattern):
        return False
    pattern = pattern.translate(_ASCII_LOWER)
    pattern_parts = pattern.split("/")
    for form in _forms(name, len(pattern_parts) - 1):
        # Segment by segment, so that no wildcard (nor a `[...]` class) can match a `/`.
        if all(fnmatchcase(part, glob) for part, glob in zip(form.split("/"), pattern_parts)):
            return True
    return False


def models_allowed(patterns: Iterable[str], text: str) -> bool:
    """Whether the model named `text` passes the allow-list. Empty list: everything; invalid name: refused."""
    patterns = tuple(patterns)
    if not patterns:
        return True
    if len(text) <= _CACHED_NAME_LENGTH:
        return _models_allowed_cached(patterns, text)
    return _models_allowed(patterns, text)


def _models_allowed(patterns: tuple[str, ...], text: str) -> bool:
    name = parse_model_name(text)
    return name is not None and any(pattern_allows(pattern, name) for pattern in patterns)


_models_allowed_cached = lru_cache(maxsize=_CACHE_SIZE)(_models_allowed)


def pattern_error(pattern: str) -> str | None:
    """Why a pattern can never match anything (for configuration checks), or None when it is usable."""
    if not pattern:
        return "empty model pattern"
    if any(c in _GO_SPACE for c in pattern):
        return f"model pattern {pattern!r} contains white space"
    parts = pattern.split("/")
    if len(parts) > 3:
        return f"model pattern {pattern!r} has more than host/namespace/model:tag"
    if any(not part for part in parts):
        return f"model pattern {pattern!r} has an empty part"
    last = parts[-1]
    if last.startswith(":") or last.endswith(":"):
        return f"model pattern {pattern!r} has an empty model or tag"
    return None


# Where the web-tool declarations are: the `type` of each element of the top-level `tools` array.
WEB_TOOL_FIELDS: dict[bytes, str] = {b"/v1/messages": "tools[].type", b"/v1/responses": "tools[].type"}


def server_web_tool(normal_path: bytes, tool_type: str) -> bool:
    """Whether a `tools[].type` value makes Ollama run web search server-side on this route.

    `/v1/messages`: `strings.HasPrefix(type, "web_search")` (middleware/anthropic.go hasWebSearchTool,
    anthropic.convertTool); the cloud pass-through (server/cloud_proxy.go hasWebSearchTool) trims white
    space first, and so does this. `/v1/responses`: `type == "web_search"` (openai/responses.go
    HasWebSearchTool). Case-sensitive values, as in Go.
    """
    if normal_path == b"/v1/messages":
        return _go_trim(tool_type).startswith("web_search")
    if normal_path == b"/v1/responses":
        return tool_type == "web_search"
    return False


def is_web_tool(tool_type: str | None, name: str | None = None) -> bool:
    """Route-independent form of `server_web_tool`, for a caller that reads `tools[].type` the same way on
    both routes: true when either route would run this type server-side (so `web_search_preview`, a plain
    function tool on `/v1/responses`, is refused there too). `name` is ignored: Ollama never decides by the
    tool's name (a custom tool named `web_search` stays the client's)."""
    del name
    return tool_type is not None and _go_trim(tool_type).startswith("web_search")


def uses_server_web_tools(normal_path: bytes, tool_types: Iterable[str]) -> bool:
    """Whether any of the request's `tools[].type` values is a server-side web tool on this route."""
    return any(server_web_tool(normal_path, tool_type) for tool_type in tool_types)
