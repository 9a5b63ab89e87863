"""Domain errors and their HTTP statuses, in one place.

Every error the service returns has the JSON body
``{"error": {"code": <machine name>, "message": <what went wrong>, ...details}}``.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: an HTTP status, a stable code, a message, optional details
    and headers. ``reason`` labels ``msdnet_rejected_requests_total``."""

    status = 500
    code = "internal"
    reason: str | None = None

    def __init__(self, message: str, headers: dict[str, str] | None = None, **details):
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class BadImage(ServiceError):
    """Empty, truncated or unreadable image data."""

    status, code, reason = 400, "bad_image", "bad_request"


class BadRequest(ServiceError):
    status, code, reason = 400, "bad_request", "bad_request"


class UnsupportedMedia(ServiceError):
    """An image format, image mode or request content type we do not take."""

    status, code, reason = 415, "unsupported_media_type", "unsupported_media"


class TooLarge(ServiceError):
    """Body over the byte limit, or image over the pixel limit (decompression bomb)."""

    status, code, reason = 413, "too_large", "too_large"


class InvalidParameter(ServiceError):
    status, code, reason = 422, "invalid_parameter", "invalid_parameter"


class BudgetTooSmall(ServiceError):
    status, code, reason = 422, "budget_too_small", "budget_too_small"


class RequestTimeout(ServiceError):
    """The client did not send its whole request (headers and body) in time."""

    status, code, reason = 408, "request_timeout", "timeout"


class NonFiniteOutput(ServiceError):
    """The network's logits for this image are not finite (NaN or infinite): it
    is never answered as a class, and nothing is charged to the budget controller."""

    status, code, reason = 422, "non_finite_output", "non_finite_output"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class UnknownRequest(NotFound):
    """``POST /feedback`` for a request id whose answer is not held (unknown or forgotten)."""

    status, code = 404, "unknown_request_id"


class AlreadyLabelled(ServiceError):
    """``POST /feedback`` for an answer that has a label already."""

    status, code = 409, "already_labelled"


class MethodNotAllowed(ServiceError):
    status, code = 405, "method_not_allowed"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class Overloaded(ServiceError):
    """The scheduler's queue is full; ``Retry-After`` says when to retry."""

    status, code, reason = 503, "overloaded", "queue_full"


class Saturated(Overloaded):
    """The latency objective cannot be kept even with every image leaving at exit 1
    (or a request's own deadline cannot be, at the forecast queueing delay):
    refused at once, before decoding; ``Retry-After`` says when to retry."""

    status, code, reason = 503, "saturated", "objective"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class DeadlineExceeded(ServiceError):
    """The deadline passed before exit 1 could run; nothing was computed."""

    status, code, reason = 504, "deadline_exceeded", "deadline"
