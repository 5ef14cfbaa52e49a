"""Snark's exceptions, one per kind of failure, each carrying its HTTP status.

Every error a client can cause is a ``SnarkError`` subclass raised with a message that says how to
fix the request. The API layer turns them into one JSON shape (see ``snark.api.errors``); anything
else that escapes is a bug in Snark and becomes a 500.
"""

from __future__ import annotations


class SnarkError(Exception):
    """Base class: ``status_code`` and ``type``/``code`` travel to the JSON error body."""

    status_code = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(SnarkError):
    """The request is malformed or asks for something out of bounds (400)."""

    status_code = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ImageError(InvalidRequest):
    """The image could not be fetched or decoded, or breaks a limit (400)."""

    code = "invalid_image"


class VideoError(InvalidRequest):
    """The video could not be fetched or decoded, or breaks a limit (400)."""

    code = "invalid_video"


class PayloadTooLarge(SnarkError):
    """A body, upload or fetched image is larger than the configured cap (413)."""

    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Unauthorized(SnarkError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Overloaded(SnarkError):
    """Too many requests are waiting; the client should retry later (503 + Retry-After)."""

    status_code = 503
    type = "server_overloaded"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelNotReady(SnarkError):
    status_code = 503
    type = "server_not_ready"
    code = "model_loading"


class ShuttingDown(ModelNotReady):
    """The server is stopping: the request was refused or stopped (503; retry elsewhere)."""

    code = "shutting_down"


class RequestTimeout(SnarkError):
    """A request ran past the configured per-request timeout (504)."""

    status_code = 504
    type = "timeout_error"
    code = "request_timeout"


class ConfigError(Exception):
    """Bad settings found at start-up. Not an HTTP error: the server refuses to start."""
