"""Client-visible errors and how each one is answered.

Every failure a client can see is one of these types. Each carries its HTTP status and a public message
(never a key, never a raw upstream or parser message), so the I/O layer maps foreign exceptions to one of
them at its edge and answers in one place (`error_response` in `messages`).
"""

from __future__ import annotations


class GateError(Exception):
    """Base of every error fastgate answers itself."""

    status: int = 500
    public_message: str = "internal error"
    # OpenAI error "type" used on /v1 paths.
    openai_type: str = "api_error"
    openai_code: str | None = None
    # Set by the gate when it refuses a key it recognised (role, model, limit): /metrics counts the refusal
    # under this user rather than "-", and the JSON log line names it. Never sent to the client.
    user: str = ""
    key_label: str = ""  # the masked key presented (`bearer:sk-o****9a1c`), when there was one

    def __init__(self, message: str | None = None, *, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message or self.public_message)
        self.message = message or self.public_message
        self.extra_headers = headers
        # For the log line only (e.g. the masked key that was refused); never sent to the client.
        self.detail = ""


class BadRequest(GateError):
    status = 400
    public_message = "bad request"
    openai_type = "invalid_request_error"


class Unauthorized(GateError):
    status = 401
    public_message = "missing or invalid API key"
    openai_type = "invalid_request_error"
    openai_code = "invalid_api_key"


class Forbidden(GateError):
    status = 403
    public_message = "forbidden"
    openai_type = "permission_error"


class NotFound(GateError):
    status = 404
    public_message = "not found"
    openai_type = "not_found_error"


class MethodNotAllowed(GateError):
    status = 405
    public_message = "method not allowed"
    openai_type = "invalid_request_error"


class RequestTimeout(GateError):
    status = 408
    public_message = "timed out reading the request"
    openai_type = "invalid_request_error"


class BodyTooLarge(GateError):
    status = 413
    public_message = "request body too large"
    openai_type = "invalid_request_error"


class UnsupportedMediaType(GateError):
    status = 415
    public_message = "unsupported content encoding"
    openai_type = "invalid_request_error"


class HeadersTooLarge(GateError):
    status = 431
    public_message = "request header fields too large"
    openai_type = "invalid_request_error"


class TooManyRequests(GateError):
    status = 429
    public_message = "too many failed attempts; try again later"
    openai_type = "rate_limit_error"
    openai_code = "rate_limit_exceeded"


class ServiceUnavailable(GateError):
    status = 503
    public_message = "service unavailable"


class UpstreamUnreachable(GateError):
    status = 502
    public_message = "upstream unreachable"
    # The connect was refused (nothing listens there): the router ejects that backend at once (issue 9 rule 5)
    refused: bool = False


class BadGateway(GateError):
    status = 502
    public_message = "bad response from upstream"


class UpstreamTimeout(GateError):
    status = 504
    public_message = "upstream timed out"


class ConfigError(Exception):
    """A configuration problem; the message names the dotted key (`auth.session_ttl: ...`)."""
