"""Exceptions of the model layer.

Each one carries what the HTTP layer needs to answer with the right status and
OpenAI error type, so that no caller maps exceptions to codes by reading their
text. ``backends`` itself knows nothing of HTTP: ``status`` is a plain number.
"""

from __future__ import annotations


class BackendError(Exception):
    """Base of every error the model layer raises on purpose."""

    status: int = 500
    error_type: str = "server_error"
    code: str | None = None
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


class UnknownModelError(BackendError):
    """No registry entry has the requested ``model_name``."""

    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"
    param = "model"


class InvalidModelEntryError(BackendError):
    """The registry entry exists but does not validate; the message lists why."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_model_entry"
    param = "model"


class UnsupportedBackendError(BackendError):
    """The entry names a backend this server cannot run (yet)."""

    status = 400
    error_type = "invalid_request_error"
    code = "unsupported_backend"
    param = "model"


class InvalidPlacementError(BackendError):
    """A load asked for a placement key or value the backend does not take."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class ModelLoadError(BackendError):
    """Weights could not be found, fetched or loaded; the message says what to do."""

    status = 500
    error_type = "server_error"
    code = "model_load_failed"


class GenerationError(BackendError):
    """A generation that started could not go on (the engine failed); the message says why."""

    status = 500
    error_type = "server_error"
    code = "generation_failed"


class KVCacheFullError(GenerationError):
    """The model's KV cache, shared by its concurrent requests, has no room left for this one."""

    status = 503
    error_type = "service_unavailable"
    code = "kv_cache_full"


class ContextLengthExceededError(BackendError):
    """Prompt plus requested completion does not fit the model's context window."""

    status = 400
    error_type = "invalid_request_error"
    code = "context_length_exceeded"
    param = "messages"

    def __init__(self, message: str, *, prompt_tokens: int, max_tokens: int, context_size: int) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_size = context_size


class PromptRenderError(BackendError):
    """The chat template refused the messages (e.g. ``raise_exception`` in the template)."""

    status = 400
    error_type = "invalid_request_error"
    code = "chat_template_error"
    param = "messages"


class CredentialsError(BackendError):
    """A gated model needs a Hugging Face token and none was found."""

    status = 500
    error_type = "server_error"
    code = "missing_credentials"


class GrammarError(BackendError):
    """A schema or grammar that llguidance cannot enforce; ``param`` names the request field it came from."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_schema"


class ConstraintUnavailableError(BackendError):
    """This model cannot be constrained (a slow tokenizer, for one)."""

    status = 400
    error_type = "invalid_request_error"
    code = "unsupported_parameter"
