"""What the model manager refuses or ends a request with.

Each error carries its HTTP status, OpenAI error type and code, and whether and when to retry, as
``backends.errors`` does for the model layer; ``proxy.errors`` writes the envelope and headers from them.
"""

from __future__ import annotations


class ManagerError(Exception):
    """Base of every error the model manager raises on purpose."""

    status: int = 503
    error_type: str = "service_unavailable"
    code: str | None = None
    param: str | None = None
    retry_after: int | None = None  # seconds until a retry may succeed (Retry-After)
    retryable: bool = True  # False: the same request would fail the same way (x-should-retry: false)

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after


class ModelBusyError(ManagerError):
    """The model's queue is full."""

    code = "model_overloaded"


class ModelNotLoadedError(ManagerError):
    """The model is not loaded and this server does not load models on demand."""

    code = "model_not_loaded"
    param = "model"


class ServerShuttingDownError(ManagerError):
    """The server is draining: new requests are refused and, past the shutdown timeout, running ones end."""

    code = "server_shutting_down"


class ModelUnloadedError(ManagerError):
    """The model was unloaded while the request was generating (after the unload timeout)."""

    code = "model_unloaded"


class RequestTimeoutError(ManagerError):
    """The request waited and generated for longer than the server's request timeout."""

    status = 504
    error_type = "server_error"
    code = "request_timeout"
    retryable = False


class PlacementConflictError(ManagerError):
    """A load asked for another placement than the one the model is loaded with."""

    status = 409
    error_type = "conflict_error"
    code = "model_already_loaded"
