"""Every error the service names. User errors carry their HTTP status and serialise to one JSON shape."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of errors that reach a client: `{"error": {"type": ..., "message": ...}}` with `status`."""

    status = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        """The JSON body a client receives."""
        error = {"type": self.error_type, "message": self.message}
        if self.field:
            error["field"] = self.field
        return {"error": error}


class ValidationError(ServiceError):
    """A request field is missing, of the wrong type or out of range."""

    status = 400
    error_type = "invalid_request"


class ContextLengthError(ValidationError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""

    error_type = "context_length_exceeded"


class NoWorkerError(ServiceError):
    """The pool a request needs has no live worker."""

    status = 503
    error_type = "no_worker"


class OverloadedError(ServiceError):
    """Too much work is waiting (the pool's admission bound, or a key's concurrent-request limit): come back
    after `retry_after_s` seconds (at least 1), sent as the `Retry-After` header in whole seconds and as
    `Retry-After-Ms` in milliseconds, which OpenAI's and Anthropic's clients read first: whole seconds alone
    would bring a crowd refused together back together, second after second, however scattered."""

    status = 429
    error_type = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float, field: str | None = None):
        super().__init__(message, field=field)
        self.retry_after_s = max(1.0, float(retry_after_s))

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [("Retry-After", str(max(1, round(self.retry_after_s)))),
                ("Retry-After-Ms", str(round(1000 * self.retry_after_s)))]


class UnauthorizedError(ServiceError):
    """API keys are on and the request's `Authorization: Bearer` key is not one of them."""

    status = 401
    error_type = "invalid_api_key"


class MissingApiKeyError(UnauthorizedError):
    """API keys are on and the request carries no `Authorization: Bearer` header."""

    error_type = "missing_api_key"


class NotFoundError(ServiceError):
    """An unknown job or batch id."""

    status = 404
    error_type = "not_found"


class ModelNotFoundError(NotFoundError):
    """A request names a model this server does not serve."""

    error_type = "model_not_found"


class UnavailableError(ServiceError):
    """A dependency (Redis) does not answer."""

    status = 503
    error_type = "unavailable"


class ConfigurationError(Exception):
    """Settings or files on disk that cannot work; raised at start-up, never to a client."""


class ModelFilesMissing(ConfigurationError):
    """The prepared weights folder is absent: say which and how to make it."""

    def __init__(self, path, what: str = "weights"):
        super().__init__(
            f"{what} not found at {path}: run `python -m workers.preparation` "
            f"(or set MODEL_DIR to a prepared folder)"
        )
