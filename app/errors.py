"""The one error hierarchy of secateurs.

Every error a person can act on is a :class:`SecateursError`: ``message`` says what was wrong, ``hint`` what
to change. ``status_code`` is the single place an error maps to HTTP; ``code`` is what a failed job records.
Anything else that escapes is a bug, reported as ``internal``.
"""

from __future__ import annotations

from typing import ClassVar


class SecateursError(Exception):
    """Base class: an error whose message a user can act on."""

    status_code: ClassVar[int] = 400
    code: ClassVar[str] = "error"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def as_dict(self) -> dict[str, str | None]:
        return {"type": self.code, "message": self.message, "hint": self.hint}


class InvalidSpecError(SecateursError, ValueError):
    """The job description itself is wrong (a pattern like ``3:2``, a negative sample count).

    Also a ``ValueError`` so that pydantic validators raising it produce ordinary validation errors.
    """

    status_code = 422
    code = "invalid_spec"


class ModelSourceError(SecateursError):
    """The model cannot be used: missing, pickle-only weights, remote code, not a causal LM."""

    status_code = 422
    code = "invalid_model"


class DataSourceError(SecateursError):
    """Calibration or evaluation text is missing, empty or too short."""

    status_code = 422
    code = "invalid_data"


class DeviceError(SecateursError):
    """The requested compute device does not exist on this machine."""

    status_code = 422
    code = "device_unavailable"


class PruningError(SecateursError):
    """The model's shapes do not admit the pattern, or the solver could not factor a Hessian."""

    status_code = 422
    code = "pruning_failed"


class OutputExistsError(SecateursError):
    """The output folder already holds something; nothing is overwritten without being asked."""

    status_code = 409
    code = "output_exists"


class StorageError(SecateursError):
    """An output could not be written (a full disk, a read-only folder); nothing partial is left visible."""

    status_code = 507
    code = "storage_failed"


class AssetError(SecateursError):
    """An offline asset could not be fetched or converted."""

    status_code = 503
    code = "asset_unavailable"


class JobNotFoundError(SecateursError):
    """No job (or artifact, or upload) with that id."""

    status_code = 404
    code = "not_found"


class JobStateError(SecateursError):
    """The job is not in a state that allows this (cancel a finished job, report of a running one)."""

    status_code = 409
    code = "conflict"


class IdempotencyConflictError(SecateursError):
    """An Idempotency-Key was reused with a different request body."""

    status_code = 409
    code = "idempotency_conflict"


class InvalidRequestError(SecateursError):
    """A request that no job spec problem explains: an unknown list cursor, a header the API cannot use."""

    status_code = 422
    code = "invalid_request"


class UnsupportedMediaTypeError(SecateursError):
    """A body sent with a Content-Type the route does not read (a JSON route given text/plain, a form)."""

    status_code = 415
    code = "unsupported_media_type"


class PathNotAllowedError(SecateursError):
    """A local path outside the server's allow-listed roots (or with ``..``, or escaping by a symlink)."""

    status_code = 403
    code = "path_not_allowed"


class UploadTooLargeError(SecateursError):
    """An upload went over the configured cap while streaming."""

    status_code = 413
    code = "upload_too_large"


class AuthenticationError(SecateursError):
    """API keys are configured and the request carried none, or a wrong one."""

    status_code = 401
    code = "unauthorized"


class ApiError(SecateursError):
    """Seen by a client: a secateurs server refused a request or could not be reached.

    ``http_status`` and ``error_type`` are the server's (``None`` when no answer came back).
    """

    status_code = 502
    code = "api_error"

    def __init__(
        self, message: str, hint: str | None = None, *, http_status: int | None = None, error_type: str | None = None
    ) -> None:
        super().__init__(message, hint)
        self.http_status = http_status
        self.error_type = error_type


class ClientError(ApiError):
    """The server answered 4xx: the request has to change (bad spec, unknown job, missing API key)."""

    status_code = 400
    code = "client_error"


class ServerError(ApiError):
    """The server answered 5xx, sent something that is not the API's, or was unreachable."""

    status_code = 502
    code = "server_error"
