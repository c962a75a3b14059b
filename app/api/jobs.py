"""``/v1/jobs``: create (idempotent), list, read, cancel, follow (SSE), report and artifacts."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from secateurs.app.api.deps import ERRORS, CeleryDep, SettingsDep, StoreDep, require_json
from secateurs.app.artifacts import PARTS, Part, artifact_file, list_artifacts, tar_stream
from secateurs.app.errors import InvalidRequestError, JobNotFoundError, JobStateError
from secateurs.app.queue import send_job
from secateurs.app.schemas import ArtifactList, Job, JobEvent, JobPage, JobSpec, JobState
from secateurs.app.settings import Settings
from secateurs.app.sources import resolve_sources
from secateurs.app.store import JOB_ID, JobStore

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, "job id"]
_KEEPALIVE_SECONDS = 15.0
_KEY = re.compile(r"[\x20-\x7e]{1,200}")
MAX_EVENT_ID = 2**53  # far above any job's event count; bounds what reaches the database (SQLite: 64-bit)


def _output(settings: Settings, job: Job) -> Path:
    if job.state is not JobState.SUCCEEDED:
        raise JobStateError(
            f"job {job.id} is {job.state.value}; artifacts exist only for succeeded jobs",
            hint="wait for it: GET /v1/jobs/{id}/events, or `secateurs wait`",
        )
    return settings.artifacts_dir / job.id


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Job,
    responses={200: {"model": Job, "description": "The job a request with the same Idempotency-Key made"}, **ERRORS},
    dependencies=[Depends(require_json)],
)
def create_job(
    spec: JobSpec,
    *,
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    celery: CeleryDep,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=200, description="Same key + same body: the same job back (200), never a second one."),
    ] = None,
) -> Job:
    """Queue a pruning job. Local paths must lie under the server's allowed roots; ``upload:<id>`` names uploads."""
    if idempotency_key is not None and not _KEY.fullmatch(idempotency_key):
        raise InvalidRequestError(
            "the Idempotency-Key header holds characters other than printable ASCII",
            hint="use letters, digits and punctuation, e.g. 'llama-2of4-v1' (at most 200 characters)",
        )
    spec = resolve_sources(spec, settings.allowed_roots, settings.uploads_dir)
    job, created = store.create(spec, max_attempts=settings.max_attempts, idempotency_key=idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
        return job
    if send_job(celery, job.id):
        store.mark_enqueued(job.id)
    return job


def _check_cursor(store: JobStore, after: str) -> None:
    """A cursor is the id of a job that exists: anything else would silently answer an empty page."""
    hint = "pass the next_after of the previous page, or leave 'after' out for the first page"
    if not JOB_ID.fullmatch(after):
        raise InvalidRequestError(f"after={after!r} is not a job id (job_ and 20 hex digits)", hint=hint)
    try:
        store.get(after)
    except JobNotFoundError:
        raise InvalidRequestError(f"after={after!r}: there is no such job to continue after", hint=hint) from None


@router.get("", response_model=JobPage, responses=ERRORS)
def list_jobs(
    store: StoreDep,
    after: Annotated[str | None, Query(max_length=40, description="Id of the last job of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    state: JobState | None = None,
) -> JobPage:
    if after is not None:
        _check_cursor(store, after)
    jobs, has_more = store.page(after=after, limit=limit, state=state)
    return JobPage(data=jobs, has_more=has_more, next_after=jobs[-1].id if has_more and jobs else None)


@router.get("/{job_id}", response_model=Job, responses=ERRORS)
async def get_job(job_id: JobId, store: StoreDep) -> Response:
    """The hot path of every status poll: one primary-key read on the event loop (no thread hop) and the
    Job serialized once (no second validation against ``response_model``, which only documents it)."""
    return Response(store.get(job_id).model_dump_json(), media_type="application/json")


@router.post("/{job_id}/cancel", response_model=Job, responses=ERRORS)
def cancel_job(job_id: JobId, store: StoreDep) -> Job:
    """A queued job is cancelled at once; a running one stops at the next block boundary."""
    return store.request_cancel(job_id)


def _sse(event: JobEvent) -> str:
    return f"id: {event.id}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}, **ERRORS},
)
async def job_events(
    job_id: JobId,
    *,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(description="Resume after this event id.")] = None,
    after: Annotated[
        int, Query(ge=0, le=MAX_EVENT_ID, description="Same as Last-Event-ID, for clients that cannot set it.")
    ] = 0,
) -> StreamingResponse:
    """Server-Sent Events: one per state change and per pruned block; ends after the terminal state."""
    await run_in_threadpool(store.get, job_id)  # 404 before the stream starts
    resume = int(last_event_id) if last_event_id and last_event_id.isascii() and last_event_id.isdigit() else 0
    start = min(max(after, resume), MAX_EVENT_ID)  # ids beyond any real one mean "nothing older": no SQL overflow

    async def stream() -> AsyncIterator[str]:
        last, idle, first = start, 0.0, True
        while True:
            events = await run_in_threadpool(store.events, job_id, last)
            for event in events:
                yield _sse(event)
                last = event.id
                if event.type == "state" and event.state.terminal:
                    return
            if events:
                idle = 0.0
            elif first or idle >= _KEEPALIVE_SECONDS:
                # Resumed after the job's last event (or past it): a job that is over has nothing more to say.
                if (await run_in_threadpool(store.get, job_id)).state.terminal:
                    return
                if not first:
                    yield ": keep-alive\n\n"
                idle = 0.0
            first = False
            if await request.is_disconnected():
                return
            await asyncio.sleep(settings.event_poll_interval)
            idle += settings.event_poll_interval

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.get("/{job_id}/report", responses={200: {"content": {"application/json": {}}}, **ERRORS})
def job_report(job_id: JobId, store: StoreDep, settings: SettingsDep) -> Any:
    """The job's ``report.json`` (format ``secateurs.report/1``)."""
    folder = _output(settings, store.get(job_id))
    return json.loads(artifact_file(folder, "report.json").read_text(encoding="utf-8"))


PartQuery = Annotated[
    list[Part] | None,
    Query(
        description="Only these parts of the output folder (repeatable): dense (the Hugging Face checkpoint), "
        "packed (the packed N:M copy in packed/), report (report.json). Default: all of it."
    ),
]


def _parts_query(part: list[Part] | None) -> str:
    return "?" + "&".join(f"part={p}" for p in sorted(set(part), key=PARTS.index)) if part else ""


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=ERRORS)
def job_artifacts(job_id: JobId, store: StoreDep, settings: SettingsDep, part: PartQuery = None) -> ArtifactList:
    """The files of a succeeded job's output folder (or of some of its parts), with their sizes."""
    folder = _output(settings, store.get(job_id))
    files = list_artifacts(folder, part)
    return ArtifactList(
        data=files,
        archive=f"/v1/jobs/{job_id}/artifacts.tar{_parts_query(part)}",
        size=sum(artifact.size for artifact in files),
        parts=sorted(set(part or ()), key=PARTS.index),
    )


@router.get(
    "/{job_id}/artifacts.tar",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}, **ERRORS},
)
def job_archive(job_id: JobId, store: StoreDep, settings: SettingsDep, part: PartQuery = None) -> StreamingResponse:
    """The whole output folder (HF checkpoint, packed copy, report.json), or some of its parts, as one tar, streamed."""
    folder = _output(settings, store.get(job_id))
    return StreamingResponse(
        tar_stream(folder, part),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.tar"'},
    )


@router.get(
    "/{job_id}/artifacts/{path:path}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
)
def job_artifact(job_id: JobId, path: str, store: StoreDep, settings: SettingsDep) -> FileResponse:
    folder = _output(settings, store.get(job_id))
    return FileResponse(artifact_file(folder, path))
