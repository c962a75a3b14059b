"""Request dependencies: the process's settings, store and Celery producer, and API-key checking."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from secateurs.app.errors import AuthenticationError, UnsupportedMediaTypeError
from secateurs.app.schemas import ErrorBody
from secateurs.app.settings import Settings, hash_api_key
from secateurs.app.store import JobStore


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


def get_celery(request: Request) -> Celery:
    celery: Celery = request.app.state.celery
    return celery


# Every error a route may answer, documented once: {"error": {"type", "message", "hint"}}.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 415, 422, 503)
}


async def require_json(request: Request) -> None:
    """A JSON body must come as JSON: FastAPI reads a body of any other Content-Type as raw bytes, which then
    fails validation as "not a valid dictionary" without naming the real mistake."""
    if not await request.body():
        return  # no body: validation says the fields are required
    content_type = request.headers.get("content-type")
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    sent = f"as Content-Type: {content_type}" if content_type else "without a Content-Type header"
    raise UnsupportedMediaTypeError(
        f"{request.method} {request.url.path} reads a JSON body, and this one was sent {sent}",
        hint="send it with 'Content-Type: application/json' (curl: -H 'Content-Type: application/json')",
    )


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]

_bearer = HTTPBearer(auto_error=False, description="An API key, when the server is configured with keys.")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same key, as a header.")


def require_api_key(
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> None:
    """When ``SECATEURS_API_KEYS`` holds hashes, every request must carry a key whose hash is among them."""
    if not settings.api_keys:
        return
    key = bearer.credentials if bearer is not None else header
    if not key:
        raise AuthenticationError(
            "this server needs an API key", hint="send 'Authorization: Bearer <key>' (secateurs: --api-key)"
        )
    digest = hash_api_key(key)
    if not any(hmac.compare_digest(digest, known) for known in settings.api_keys):
        raise AuthenticationError("the API key is not valid", hint="check the key; ask the operator for a new one")
