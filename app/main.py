"""The FastAPI application: ``create_app()`` wires settings, the job store, the Celery producer and the reaper.

Never imports torch: the API process stays light (``uvicorn --factory secateurs.app.main:create_app``).
Errors are mapped to HTTP here, once: a :class:`SecateursError` becomes its ``status_code`` with an
:class:`ErrorBody`; a request that does not validate becomes 422 naming each bad field; anything else is a
500 that says it is a bug, without internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import unicodedata
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from celery import Celery
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from secateurs.app import __version__, page
from secateurs.app.api import health, jobs, uploads
from secateurs.app.api.deps import require_api_key
from secateurs.app.errors import SecateursError
from secateurs.app.queue import make_celery, send_job
from secateurs.app.schemas import ErrorBody, JobError, error_message
from secateurs.app.settings import Settings, get_settings
from secateurs.app.store import JobStore

log = logging.getLogger(__name__)


def reap_once(store: JobStore, settings: Settings, celery: Celery) -> list[str]:
    """Requeue jobs whose worker died and (re)send queued jobs the broker never got; returns their ids."""
    sent = []
    for job_id in store.reap(settings.heartbeat_timeout):
        if send_job(celery, job_id):
            store.mark_enqueued(job_id)
            sent.append(job_id)
    if sent:
        log.warning("reaper requeued %s", ", ".join(sent))
    return sent


async def _reaper(app: FastAPI) -> None:
    settings: Settings = app.state.settings
    while True:
        try:
            await run_in_threadpool(reap_once, app.state.store, settings, app.state.celery)
        except Exception:  # the reaper must outlive a database hiccup
            log.exception("reaper pass failed; retrying in %.0f s", settings.reaper_interval)
        await asyncio.sleep(settings.reaper_interval)


def _escaped(char: str) -> str:
    if char in "\n\t" or unicodedata.category(char) not in ("Cc", "Cs"):
        return char
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def _printable(text: str) -> str:
    """``text`` with control characters (newlines and tabs aside) and lone surrogates escaped.

    Error messages quote what the client sent; a NUL or a lone surrogate in them must neither reach a
    terminal raw nor break the UTF-8 encoding of the response (which would turn a 4xx into a 500).
    """
    return "".join(_escaped(char) for char in text)


def _error(
    status: int, type_: str, message: str, hint: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    error = JobError(type=type_, message=_printable(message), hint=None if hint is None else _printable(hint))
    return JSONResponse(ErrorBody(error=error).model_dump(), status_code=status, headers=headers)


JSON_HINT = (
    'send one JSON object, e.g. {"model": "org/name", "calibration": {"file": "/texts/c4.utf8"}}: names and '
    "strings in double quotes, no trailing commas, no comments (see /docs for the fields)"
)


def _json_position(document: object, position: int) -> str:
    """'line L, column C' of character ``position`` in the body (both 1-based, as editors count)."""
    if not isinstance(document, str):
        return f"character {position + 1}"
    line = document.count("\n", 0, position) + 1
    column = position - (document.rfind("\n", 0, position) + 1) + 1
    return f"line {line}, column {column}"


def _describe(exc: RequestValidationError) -> tuple[str, str]:
    """The problems of a request that did not validate, one per field, and what to do about them."""
    parts = []
    hint = "see the OpenAPI schema at /docs for the fields"
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            loc = error.get("loc", ())
            position = loc[-1] if loc and isinstance(loc[-1], int) else 0
            reason = error.get("ctx", {}).get("error", "JSON decode error")
            parts.append(f"the body is not valid JSON: {reason} at {_json_position(exc.body, position)}")
            hint = JSON_HINT
            continue
        loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "request body"
        message = error_message(error)
        parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts) or "the request is not valid", hint


def _unreadable_body(cause: BaseException | None) -> tuple[str, str] | None:
    """Why FastAPI could not parse a JSON body (its bare 400 says only "There was an error parsing the body")."""
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"the body is not UTF-8 text: byte 0x{cause.object[cause.start]:02x} at position {cause.start} "
            f"is not valid {cause.encoding}",
            "JSON bodies are UTF-8: re-encode the file (e.g. iconv -t UTF-8) or escape the character as \\uXXXX",
        )
    if isinstance(cause, RecursionError):
        return (
            "the body is JSON nested too deeply to read",
            "a job spec is nested two levels deep at most: " + JSON_HINT,
        )
    if isinstance(cause, ValueError):
        return f"the body cannot be read as JSON: {cause}", JSON_HINT
    return None


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method the OpenAPI schema documents for ``path`` (Starlette's 405 names only one route's)."""
    for template, operations in app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path):
            return sorted(method.upper() for method in operations)
    return []


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = JobStore(settings.store_url)
        app.state.celery = make_celery(settings)
        reaper = asyncio.create_task(_reaper(app))
        gc.freeze()  # the long-lived objects of startup leave the collector's generations: shorter GC pauses
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            app.state.store.engine.dispose()

    app = FastAPI(
        title="secateurs",
        version=__version__,
        summary="One-shot 2:4 SparseGPT pruning of Hugging Face causal LMs, as jobs.",
        lifespan=lifespan,
    )
    app.state.settings = settings

    @app.exception_handler(SecateursError)
    async def _secateurs_error(_request: Request, exc: SecateursError) -> JSONResponse:
        return _error(exc.status_code, exc.code, exc.message, exc.hint)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", *_describe(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and (unreadable := _unreadable_body(exc.__cause__)):
            return _error(422, "invalid_request", *unreadable)
        hints = {400: "send a UTF-8 JSON object (Content-Type: application/json)", 404: "see /docs for the routes"}
        hint = hints.get(exc.status_code, hints[404] if exc.status_code == 405 else None)
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and (allowed := _allowed_methods(app, request.url.path)):
            headers["Allow"] = ", ".join(allowed)
        return _error(exc.status_code, "http_error", str(exc.detail), hint, headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal", f"internal error ({type(exc).__name__})", "this is a bug in secateurs")

    guarded = [Depends(require_api_key)]
    app.include_router(health.router)
    app.include_router(jobs.router, dependencies=guarded)
    app.include_router(uploads.router, dependencies=guarded)
    app.include_router(page.router)  # the status page: HTML and static files, no data, no key
    return app
