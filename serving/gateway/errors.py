"""The gateway's exception tree, and the one function that turns any exception into OpenAI's
error JSON: `{"error": {"message", "type", "param", "code"}}`.

Every user mistake is a `ClientError` (4xx); only `UpstreamUnavailable` (503) and genuine bugs
(500, logged with a traceback, message kept generic) are server-side.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base class: carries the HTTP status and OpenAI's `type`, `param` and `code` fields."""

    status = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ClientError(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class InvalidRequest(ClientError):
    """Malformed JSON, a wrong type, a value out of range, a missing field."""


class AuthenticationFailed(ClientError):
    status = 401
    error_type = "authentication_error"


class PermissionDenied(ClientError):
    status = 403
    error_type = "permission_error"


class NotFound(ClientError):
    status = 404
    error_type = "not_found_error"


class ModelNotFound(NotFound):
    error_type = "invalid_request_error"


class PayloadTooLarge(ClientError):
    status = 413


class UpstreamClientError(ClientError):
    """An engine rejected the request as the client's mistake (say, a prompt longer than the
    model's context); its status and message are passed on."""

    def __init__(self, status: int, message: str, *, param: str | None = None):
        super().__init__(message, param=param)
        self.status = status


class UpstreamUnavailable(GatewayError):
    """No engine could answer within the request's deadline."""

    status = 503
    error_type = "service_unavailable"


class TrafficLogUnavailable(GatewayError):
    """Strict mode: the request's record could not be committed, so its answer is withheld."""

    status = 503
    error_type = "service_unavailable"


class Overloaded(GatewayError):
    """A concurrency budget is spent: refused at once, to be retried after `retry_after_s`."""

    status = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, code="overloaded")
        self.retry_after_s = retry_after_s


def error_headers(exc: BaseException) -> dict[str, str]:
    """The headers an error answer carries besides its body (Retry-After for a refusal)."""
    if isinstance(exc, Overloaded):
        return {"retry-after": str(exc.retry_after_s)}
    return {}


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error JSON) for any exception; the single mapping point."""
    if isinstance(exc, GatewayError):
        status, message, error_type = exc.status, exc.message, exc.error_type
        param, code = exc.param, exc.code
    else:
        status, message, error_type, param, code = (
            500,
            "internal gateway error; see the gateway log",
            "server_error",
            None,
            None,
        )
    return status, {"error": {"message": message, "type": error_type, "param": param, "code": code}}
