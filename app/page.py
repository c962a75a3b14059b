"""The web status page: ``/`` (the job list) and ``/jobs/{id}`` (one job, live), plus their static files.

Plain HTML, CSS and ES modules from ``app/static/``, with no build step and nothing fetched from elsewhere
(the machines may be offline). These routes carry no data and need no API key: the page's scripts read
everything from the REST API (``/v1/jobs...``) with the key the user pasted, so the API's guard is the only
one. Every text from a job is put into the page with ``textContent``; the Content-Security-Policy below
allows scripts and styles from this server only, so an injected ``<script>`` could not run anyway.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent / "static"

# The files served, by name: nothing else under (or beside) static/ is reachable.
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
ASSETS: dict[str, str] = {
    path.name: _MEDIA_TYPES[path.suffix]
    for path in sorted(STATIC.iterdir())
    if path.is_file() and path.suffix in _MEDIA_TYPES and path.suffix != ".html"
}

_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new release's scripts are picked up at once
}

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type=_MEDIA_TYPES[".html"], headers=_HEADERS)


@router.get("/")
def job_list_page() -> FileResponse:
    """The job list, newest first, refreshed every few seconds."""
    return _page("index.html")


@router.get("/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:
    """One job: live progress, then its report (plots, tables) and artifacts (the script reads ``job_id``)."""
    return _page("job.html")


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail=f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=media_type, headers=_HEADERS)
