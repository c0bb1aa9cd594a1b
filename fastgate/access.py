"""Who a request acts as, and what that identity may do: roles, endpoint scopes, model allow-lists.

Pure: no I/O. A `Principal` is what a valid key (or the IP trust granted with one) resolves to; the gate
asks `missing_scope` and `model_refusal` before forwarding, and the proxy uses `filter_model_list` to
trim model listings to what the key may see.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .models import is_cloud_model, models_allowed, names_cloud


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


def judges_models(principal: Principal, allow_cloud: bool) -> bool:
    """Whether this principal's requests must have their models read: it has an allow-list, or it is not an
    admin while cloud models are off (a cloud model spends the server owner's ollama.com account)."""
    return bool(principal.models) or (principal.role is not Role.ADMIN and not allow_cloud)


def model_refusal(principal: Principal, model: str, allow_cloud: bool) -> str | None:
    """Why `principal` may not use `model` (a message for a 403), or None when it may."""
    if is_cloud_model(model) and not allow_cloud and principal.role is not Role.ADMIN:
        return f"cloud models are disabled on this gateway (auth.allow_cloud): '{model}'"
    if principal.models and not models_allowed(principal.models, model):
        return f"this key may not use model '{model}'"
    return None


def web_tools_refusal(principal: Principal, allow_cloud: bool) -> str | None:
    """Why `principal` may not ask Ollama for server-side web tools (they run on ollama.com), or None."""
    if not allow_cloud and principal.role is not Role.ADMIN:
        return "server-side web tools are disabled on this gateway (auth.allow_cloud)"
    if principal.models and not any(names_cloud(pattern) for pattern in principal.models):
        return "this key's model list does not name a cloud model, so it may not use server-side web tools"
    return None


def json_object(body: bytes) -> dict[str, Any] | None:
    """An Ollama answer (or line) read as a JSON object; None when it is not one."""
    try:
        data: Any = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def filter_model_list(normal_path: bytes, body: bytes, allowed: Callable[[str], bool]) -> bytes | None:
    """The listing with only the models `allowed` accepts, or None when the body is not a listing we know."""
    data = json_object(body)
    if data is None:
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
                 and allowed(name_of(item))]
    return json.dumps(data, separators=(",", ":")).encode()
