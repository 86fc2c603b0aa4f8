"""Client-facing errors: one exception type, rendered as OpenAI error JSON or as a gRPC status.

Every failure a client can cause or must react to becomes an `APIError` with an HTTP status, an
OpenAI-style `type` and `code`, and a message that names the offending field (`param`). The HTTP app
and the gRPC servicer both translate from here, so the two front doors agree.
"""
from __future__ import annotations

from http import HTTPStatus

import grpc


class APIError(Exception):
    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after_s = retry_after_s

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, int(round(self.retry_after_s))))}

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _GRPC_CODES.get(self.status, grpc.StatusCode.UNKNOWN)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.message!r})"


class InvalidRequest(APIError):
    status, type, code = 400, "invalid_request_error", "invalid_parameter"


class ContextLengthExceeded(APIError):
    status, type, code = 400, "invalid_request_error", "context_length_exceeded"


class Unsupported(APIError):
    status, type, code = 400, "invalid_request_error", "unsupported_parameter"


class AuthenticationError(APIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class ModelNotFound(APIError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class NotFound(APIError):
    status, type, code = 404, "invalid_request_error", "not_found"


class RequestTooLarge(APIError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class Overloaded(APIError):
    """The queue is full: retry after `retry_after_s` (429 + Retry-After, gRPC RESOURCE_EXHAUSTED)."""

    status, type, code = 429, "rate_limit_error", "queue_full"


class Unavailable(APIError):
    """Not ready yet, draining for shutdown, or the engine died (503 + Retry-After, gRPC UNAVAILABLE)."""

    status, type, code = 503, "service_unavailable_error", "unavailable"


class InternalError(APIError):
    status, type, code = 500, "server_error", "internal_error"


_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
