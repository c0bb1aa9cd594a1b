"""Who a request acts as, and what that identity may do: roles, endpoint scopes, model allow-lists.

Pure: no I/O. A `Principal` is what a valid key (or the IP trust granted with one) resolves to; the gate
asks `missing_scope` and `forbidden_models` before forwarding, and the proxy uses `filter_model_list` to
trim model listings to what the key may see.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any


class Role(enum.Enum):
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    key_id: str  # "config:<16 hex of the digest>" for [keys] entries, the store id for managed keys
    role: Role = Role.ADMIN
    models: tuple[str, ...] = ()  # glob patterns; empty: every model
    rpm: int | None = None
    max_concurrent: int | None = None
    tokens_per_day: int | None = None
    expires_at: float | None = None  # epoch seconds; None: never

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.max_concurrent is not None or self.tokens_per_day is not None


# Role `user`: inference and read-only endpoints. Everything else Ollama serves (model management, blobs,
# and whatever future endpoints appear) needs `admin`: a new endpoint is closed until listed here.
USER_PATHS = frozenset({
    b"/api/chat", b"/api/generate", b"/api/embed", b"/api/embeddings", b"/api/tags", b"/api/ps",
    b"/api/show", b"/api/version",
})
USER_PREFIXES = (b"/v1/",)


def missing_scope(principal: Principal, normal_path: bytes) -> Role | None:
    """The role this request needs that the principal lacks, or None. `normal_path` as normalize_path gives."""
    if principal.role is Role.ADMIN:
        return None
    if normal_path in USER_PATHS or normal_path.startswith(USER_PREFIXES) or normal_path == b"/v1":
        return None
    return Role.ADMIN


# Which body fields name a model, per endpoint (wire doc section 5). Paths not listed name no model.
MODEL_FIELDS: dict[bytes, tuple[str, ...]] = {
    b"/api/chat": ("model",), b"/api/generate": ("model",), b"/api/embed": ("model",),
    b"/api/embeddings": ("model",), b"/api/show": ("model", "name"), b"/api/pull": ("model", "name"),
    b"/api/push": ("model", "name"), b"/api/create": ("model", "name", "from"),
    b"/api/delete": ("model", "name"), b"/api/copy": ("source", "destination"),
    b"/v1/chat/completions": ("model",), b"/v1/completions": ("model",), b"/v1/embeddings": ("model",),
    b"/v1/responses": ("model",), b"/v1/messages": ("model",),
}
MODEL_LISTS = frozenset({b"/api/tags", b"/api/ps", b"/v1/models"})


def names_models(normal_path: bytes) -> bool:
    return normal_path in MODEL_FIELDS or normal_path.startswith(b"/v1/models/")


def models_named(normal_path: bytes, body: bytes) -> list[str]:
    """Model names a request body (or, for /v1/models/NAME, the path) refers to."""
    if normal_path.startswith(b"/v1/models/"):
        return [normal_path[len(b"/v1/models/"):].decode("utf-8", "replace")]
    fields = MODEL_FIELDS.get(normal_path, ())
    if not fields or not body:
        return []
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return []
    if not isinstance(data, dict):
        return []
    return [value for name in fields if isinstance(value := data.get(name), str) and value]


def model_allowed(patterns: Sequence[str], model: str) -> bool:
    """Glob match (`llama3*`, `qwen2.5:*`); a bare name also matches its `:latest` tag, as Ollama resolves it."""
    if not patterns:
        return True
    candidates = (model, f"{model}:latest") if ":" not in model else (model,)
    return any(fnmatchcase(candidate, pattern) for candidate in candidates for pattern in patterns)


def forbidden_models(principal: Principal, models: Iterable[str]) -> list[str]:
    return [m for m in models if not model_allowed(principal.models, m)]


def filter_model_list(normal_path: bytes, body: bytes, patterns: Sequence[str]) -> bytes | None:
    """The listing with only the models `patterns` allow, or None when the body is not a listing we know."""
    try:
        data: Any = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    if normal_path == b"/v1/models":
        items, name_of = data.get("data"), (lambda item: item.get("id"))
        key = "data"
    else:
        items, name_of = data.get("models"), (lambda item: item.get("name") or item.get("model"))
        key = "models"
    if items is None:
        return body
    if not isinstance(items, list):
        return None
    data[key] = [item for item in items
                 if isinstance(item, dict) and isinstance(name_of(item), str)
                 and model_allowed(patterns, name_of(item))]
    return json.dumps(data, separators=(",", ":")).encode()
